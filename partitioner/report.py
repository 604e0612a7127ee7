"""Render a plan for people: per device, the layers it holds, memory, compute and transfers."""

from __future__ import annotations

from partitioner.devices import format_bytes
from partitioner.options import Strategy
from partitioner.plan import Plan, PlanLayer

__all__ = ["render_text", "layer_ranges", "format_seconds"]


def format_seconds(s: float) -> str:
    """``1.23 s``, ``45.60 ms``, ``7.8 us``: the largest unit the rounded figure reaches."""
    if round(s * 1e3, 2) >= 1000:
        return f"{s:.2f} s"
    if round(s * 1e6, 1) >= 1000:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def layer_ranges(layers: tuple[PlanLayer, ...], device: int) -> list[str]:
    """Runs of consecutive layers on `device`, as ``first .. last (n layers)``."""
    runs: list[list[PlanLayer]] = []
    previous = -2
    for i, layer in enumerate(layers):
        if layer.device != device:
            continue
        if i == previous + 1 and runs:
            runs[-1].append(layer)
        else:
            runs.append([layer])
        previous = i
    return [r[0].name if len(r) == 1 else f"{r[0].name} .. {r[-1].name} ({len(r)} layers)" for r in runs]


def _share(used: int, capacity: int) -> str:
    return f"{used / capacity:.0%}" if capacity > 0 else "no capacity"


def render_text(plan: Plan) -> str:
    """The plan as a table, with the strategy, predicted time and the bound it is judged against."""
    mode = "training step" if plan.training else "inference"
    ratio = plan.predicted_s / plan.bound_s if plan.bound_s > 0 else float("nan")
    status = "optimal" if plan.solver.optimal else f"not proved optimal (gap {plan.solver.gap:.2%})"
    lines = [
        f"partitioner plan for {plan.model_name} ({len(plan.layers)} layers, {plan.frontend} graph, "
        f"batch {plan.batch_size}, fingerprint {plan.fingerprint})",
        f"strategy: {plan.strategy.value} on {len(plan.devices)} device(s); objective: {plan.objective.value} "
        f"of one {mode}",
        f"predicted: {format_seconds(plan.predicted_s)}   bound max(total/devices, largest layer): "
        f"{format_seconds(plan.bound_s)}   predicted/bound: {ratio:.2f}",
        f"solver: {plan.solver.method}, {status}",
        "",
    ]
    header = ("device", "profile", "memory / capacity", "params", "compute", "transfers in/out", "layers")
    rows: list[tuple[str, ...]] = []
    for i, d in enumerate(plan.devices):
        if plan.strategy is Strategy.DATA_PARALLEL:
            held = ["all layers (replica)"]
        else:
            held = layer_ranges(plan.layers, i) or ["-"]
        rows.append(
            (
                d.name,
                d.profile,
                f"{format_bytes(d.memory_bytes)} / {format_bytes(d.capacity_bytes)} "
                f"({_share(d.memory_bytes, d.capacity_bytes)})",
                format_bytes(d.param_bytes),
                format_seconds(d.compute_s),
                f"{format_seconds(d.transfer_in_s)} / {format_seconds(d.transfer_out_s)}",
                held[0],
            )
        )
        rows.extend(("", "", "", "", "", "", more) for more in held[1:])
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for r in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    if plan.transfers:
        total = sum(t.bytes for t in plan.transfers)
        lines.append("")
        lines.append(
            f"transfers per step: {len(plan.transfers)}, {format_bytes(total)} forward"
            + (" (and their gradients back)" if plan.training else "")
        )
        for t in plan.transfers[:12]:
            lines.append(
                f"  {t.value}: {plan.devices[t.src].name} -> {plan.devices[t.dst].name}, "
                f"{format_bytes(t.bytes)}, {format_seconds(t.seconds)}"
            )
        if len(plan.transfers) > 12:
            lines.append(f"  ... {len(plan.transfers) - 12} more")
    lines.append(f"outputs gathered on {plan.devices[plan.output_device].name}")
    return "\n".join(lines)
