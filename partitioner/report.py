"""Render a plan for people: per device, the layers it holds, memory, compute and transfers.

A training plan (with a `PipelinePlan`) renders per stage instead: the strategy and why,
its runner-ups, throughput and MFU against the bounds, and each stage's memory broken down
against its capacity; its step draws as a Gantt chart or writes as a Chrome/Perfetto trace.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from partitioner.ir import TIME_SOURCES
from partitioner.options import Strategy
from partitioner.plan import PipelinePlan, Plan, PlanLayer, PlanStage, PlanTransfer
from partitioner.tp_layout import Pair, TensorParallelLayout
from partitioner.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from partitioner.simulate import Timeline

__all__ = [
    "render_text",
    "render_training",
    "render_tensor_parallel",
    "render_plan_timeline",
    "write_plan_trace",
    "layer_ranges",
    "format_seconds",
    "device_list",
    "transfer_names",
    "time_basis",
]

_SOURCE_WORDS = {"measured": "measured", "calibrated": "calibrated", "roofline": "roofline-only"}
"""How the report names each `TIME_SOURCES` entry."""
_BASIS_LEGEND = (
    "measured: timed on the device; calibrated: roofline on figures measured on the device "
    "(partitioner profile); roofline-only: roofline on datasheet figures"
)


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


def time_basis(layers: Sequence[PlanLayer]) -> str:
    """Where the predicted times of `layers` come from: ``measured``, ``calibrated`` or
    ``roofline-only`` when they agree, else each with its count, surest first (``2 measured +
    3 roofline-only``); ``-`` for plans written before the plan recorded it."""
    counts = {source: sum(1 for layer in layers if layer.time_source == source) for source in TIME_SOURCES}
    present = [(source, n) for source, n in counts.items() if n]
    if not present:
        return "-"
    if len(present) == 1 and present[0][1] == len(layers):
        return _SOURCE_WORDS[present[0][0]]
    return " + ".join(f"{n} {_SOURCE_WORDS[source]}" for source, n in present)


def _basis_line(layers: Sequence[PlanLayer]) -> str | None:
    """The report's line on how sure its times are, or None for an old plan that does not say."""
    basis = time_basis(layers)
    if basis == "-":
        return None
    return f"layer times: {basis} ({_BASIS_LEGEND})"


def _share(used: int, capacity: int) -> str:
    return f"{used / capacity:.0%}" if capacity > 0 else "no capacity"


def _orders_note(plan: Plan) -> str:
    """How the order of the devices was chosen, when there was a choice."""
    info = plan.solver
    if info.orders <= 1:
        return ""
    if info.orders_exhaustive:
        return f"; device order: best of {info.orders} ({info.orders_solved} solved, the rest cut by bounds)"
    return (
        f"; device order: best of {info.orders_solved} solved of {info.orders} "
        "(the rest unsolved: out of time, or too many; the gap holds over every order)"
    )


def render_text(plan: Plan) -> str:
    """The plan as a table, with the strategy, predicted time and the bound it is judged against."""
    if plan.pipeline is not None:
        return render_training(plan)
    mode = "training step" if plan.training else "inference"
    ratio = plan.predicted_s / plan.bound_s if plan.bound_s > 0 else float("nan")
    status = "optimal" if plan.solver.optimal else f"not proved optimal (gap {plan.solver.gap:.2%})"
    lines = [
        f"partitioner plan for {plan.model_name} ({len(plan.layers)} layers, {plan.frontend} graph, "
        f"batch {plan.batch_size}, fingerprint {plan.fingerprint})",
        f"strategy: {plan.strategy.value} on {_devices_used(plan)}; objective: {plan.objective.value} "
        f"of one {mode}",
        f"predicted: {format_seconds(plan.predicted_s)}   bound {_bound_formula(plan)}: "
        f"{format_seconds(plan.bound_s)}   predicted/bound: {ratio:.2f}",
        f"solver: {plan.solver.method}, {status}{_orders_note(plan)}",
    ]
    if plan.strategy is Strategy.MODEL_PARALLEL and len(plan.devices) > 1:
        lines.insert(3, _balance_line(plan))
    if plan.why:
        lines.append(f"why: {plan.why}")
    for split in plan.split:
        on = ", ".join(plan.devices[d].name for d in plan.split_devices(split))
        lines.append(f"split: {split.module} in {split.pieces} column pieces (outputs concatenated) on {on}")
    basis_line = _basis_line(plan.layers)
    if basis_line:
        lines.append(basis_line)
    lines.append("")
    header = ("device", "profile", "memory / capacity", "params", "compute", "from", "transfers in/out", "layers")
    rows: list[tuple[str, ...]] = []
    copy_of = {d: (g, k) for g, group in enumerate(plan.replica_groups) for k, d in enumerate(group)}
    copies = len(plan.replica_groups)
    for i, d in enumerate(plan.devices):
        if i not in copy_of and (copies > 1 or plan.replicas):
            held, basis = ["- (idle)"], "-"
        elif plan.strategy is Strategy.DATA_PARALLEL:
            held = [f"all layers (replica {copy_of[i][0]})" if plan.replicas else "all layers (replica)"]
            basis = time_basis(plan.layers)
        elif copies > 1:
            g, k = copy_of[i]
            first = plan.replica_groups[0][k]
            held = [f"copy {g}: {r}" for r in layer_ranges(plan.layers, first)]
            mine = [layer for layer in plan.layers if layer.device == first]
            basis = time_basis(mine) if mine else "-"
        else:
            held = layer_ranges(plan.layers, i) or ["-"]
            mine = [layer for layer in plan.layers if layer.device == i]
            basis = time_basis(mine) if mine else "-"
        rows.append(
            (
                d.name,
                d.profile,
                f"{format_bytes(d.memory_bytes)} / {format_bytes(d.capacity_bytes)} "
                f"({_share(d.memory_bytes, d.capacity_bytes)})",
                format_bytes(d.param_bytes),
                format_seconds(d.compute_s),
                basis,
                f"{format_seconds(d.transfer_in_s)} / {format_seconds(d.transfer_out_s)}",
                held[0],
            )
        )
        rows.extend(("", "", "", "", "", "", "", more) for more in held[1:])
    lines.extend(_table(header, rows))
    if plan.transfers:
        total = sum(t.bytes for t in plan.transfers)
        lines.append("")
        lines.append(
            f"transfers per step: {len(plan.transfers)}, {format_bytes(total)} forward"
            + (" (and their gradients back)" if plan.training else "")
        )
        names = transfer_names(plan.transfers)
        for t, name in zip(plan.transfers[:12], names):
            lines.append(
                f"  {name}: {plan.devices[t.src].name} -> {plan.devices[t.dst].name}, "
                f"{format_bytes(t.bytes)}, {format_seconds(t.seconds)}"
            )
        if len(plan.transfers) > 12:
            lines.append(f"  ... {len(plan.transfers) - 12} more")
    lines.append(f"outputs gathered on {plan.devices[plan.output_device].name}")
    return "\n".join(lines)


def _balance_line(plan: Plan) -> str:
    """The busiest device's period (its compute, or its link traffic, which overlaps compute
    in a pipeline) against the even share, total / devices of this placement's compute, and
    the largest layer beside it: a layer heavier than the even share keeps every split of
    whole layers above it, and the line says so rather than judging against that layer."""
    periods = [max(d.compute_s, d.transfer_in_s, d.transfer_out_s) for d in plan.devices]
    busiest = max(range(len(periods)), key=periods.__getitem__)
    even = sum(layer.compute_s for layer in plan.layers) / len(plan.devices)
    largest = max(plan.layers, key=lambda layer: layer.compute_s)

    def share(seconds: float) -> str:
        return f"{seconds / even:.2f}x" if even > 0 else "-"

    return (f"balance: busiest device {plan.devices[busiest].name} {format_seconds(periods[busiest])} = "
            f"{share(periods[busiest])} the even share (total/devices of this placement's compute: "
            f"{format_seconds(even)}); largest layer {largest.name} {format_seconds(largest.compute_s)} = "
            f"{share(largest.compute_s)}")


def _bound_formula(plan: Plan) -> str:
    """What `Plan.bound_s` is for the plan's strategy (replicas split every layer)."""
    if plan.strategy is Strategy.DATA_PARALLEL:
        return "total/devices (replicas share every layer)"
    if plan.strategy is Strategy.HYBRID:
        return "total/devices (copies share every layer)"
    return "max(total/devices, largest layer)"


def _devices_used(plan: Plan) -> str:
    """``8 device(s)``, or for copies ``4 of 8 devices (4 copies of 1 device, batch split 1/1/1/1)``
    (``8 devices (...)`` when the copies use every device)."""
    if not plan.replicas:
        return f"{len(plan.devices)} device(s)"
    groups = plan.replica_groups
    used = sum(len(g) for g in groups)
    r = len(groups)
    shares = "/".join(str(plan.batch_size // r + (g < plan.batch_size % r)) for g in range(r))
    size = f"{len(groups[0])} device{'s' if len(groups[0]) > 1 else ''}"
    of = f"{used} of {len(plan.devices)}" if used < len(plan.devices) else f"{used}"
    return f"{of} devices ({r} copies of {size}, batch split {shares})"


def transfer_names(transfers: Sequence[PlanTransfer]) -> list[str]:
    """How the report names each transfer: the module that produces it (`PlanTransfer.module`),
    with the graph node's name after it where one module produces several, and the node's
    name alone for plans that do not record the module."""
    count: dict[str, int] = {}
    for t in transfers:
        count[t.module] = count.get(t.module, 0) + 1
    return [
        t.value if not t.module else t.module if count[t.module] == 1 else f"{t.module} [{t.value}]" for t in transfers
    ]



# --------------------------------------------------------------------------- training plans

_MAX_STAGE_ROWS = 24
"""Longer pipelines show their first and last stages (a 64-stage table hides the point)."""


def device_list(names: Sequence[str]) -> str:
    """``dgx0/0-7`` for a node's devices ``dgx0/0`` .. ``dgx0/7``; nodes after the third elided."""
    by_node: dict[str, list[str]] = {}
    for name in names:
        node, sep, local = name.rpartition("/")
        by_node.setdefault(node if sep else "", []).append(local if sep else name)
    parts = []
    for node, locals_ in by_node.items():
        if node and all(x.isdigit() for x in locals_):
            numbers = [int(x) for x in locals_]
            contiguous = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
            text = f"{numbers[0]}-{numbers[-1]}" if contiguous and len(numbers) > 1 else ",".join(locals_)
            parts.append(f"{node}/{text}")
        else:
            parts.extend(f"{node}/{x}" if node else x for x in locals_)
    if len(parts) > 3:
        return f"{', '.join(parts[:3])} +{len(parts) - 3} more"
    return ", ".join(parts)


def _stage_layers(plan: Plan, stage: PlanStage) -> str:
    first, last = plan.layers[stage.first_layer].name, plan.layers[stage.last_layer].name
    count = stage.last_layer - stage.first_layer + 1
    return first if count == 1 else f"{first} .. {last} ({count})"


def _sharded(p: PipelinePlan) -> bool:
    """Whether the plan splits layers or shards state (the stage table then shows that too)."""
    return p.tensor_parallel > 1 or p.sharding != "none"


def _steps_optimizer(p: PipelinePlan) -> bool:
    """Whether the plan prices the optimizer step (plans from before it was priced hold 0)."""
    return any(s.optimizer_s > 0 for s in p.stages)


def _stage_header(p: PipelinePlan) -> tuple[str, ...]:
    head = (
        "stage", "layers", "devices", "kind", "mb", "recompute", "fwd / bwd", "from", "send f / b", "all-reduce",
    ) + (("opt step",) if _steps_optimizer(p) else ())
    extra = ("tp comm", "zero-3 f / b") if _sharded(p) else ()
    memory = ("weights", "grads", "optimizer") + (("gathered",) if _sharded(p) else ())
    return head + extra + memory + ("activations", "buffers", "memory / capacity")


def _stage_rows(plan: Plan, p: PipelinePlan) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    sharded, stepped = _sharded(p), _steps_optimizer(p)
    for s in p.stages:
        activations = s.inflight_microbatches * s.microbatch_activation_bytes + s.recompute_bytes
        extra = (
            (
                format_seconds(s.tp_comm_s) if p.tensor_parallel > 1 else "-",
                f"{format_seconds(s.dp_comm_fwd_s)} / {format_seconds(s.dp_comm_bwd_s)}"
                if s.dp_comm_fwd_s or s.dp_comm_bwd_s else "-",
            )
            if sharded
            else ()
        )
        rows.append(
            (
                str(s.index),
                _stage_layers(plan, s),
                device_list([plan.devices[d].name for d in s.devices]),
                s.profile,
                str(s.samples),
                "full" if s.recompute else "selective" if s.selective else "no",
                f"{format_seconds(s.fwd_s)} / {format_seconds(s.bwd_s)}",
                time_basis(plan.layers[s.first_layer : s.last_layer + 1]),
                f"{format_seconds(s.send_fwd_s)} / {format_seconds(s.send_bwd_s)}",
                format_seconds(s.allreduce_s) if len(s.devices) > 1 or s.allreduce_s > 0 else "-",
                *((format_seconds(s.optimizer_s) if s.optimizer_s > 0 else "-",) if stepped else ()),
                *extra,
                format_bytes(s.weight_bytes),
                format_bytes(s.grad_bytes),
                format_bytes(s.optimizer_bytes),
                *((format_bytes(s.gathered_bytes),) if sharded else ()),
                f"{format_bytes(activations)} ({s.inflight_microbatches} mb)",
                format_bytes(s.buffer_bytes),
                f"{format_bytes(s.peak_memory_bytes)} / {format_bytes(s.capacity_bytes)} "
                f"({_share(s.peak_memory_bytes, s.capacity_bytes)})",
            )
        )
    if len(rows) > _MAX_STAGE_ROWS:
        head, tail = _MAX_STAGE_ROWS * 2 // 3, _MAX_STAGE_ROWS // 3
        gap = ("...", f"{len(rows) - head - tail} more stages") + ("",) * (len(rows[0]) - 2)
        rows = rows[:head] + [gap] + rows[-tail:]
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Plain-text lines of a table: columns two spaces apart, aligned by display width (rich
    measures wide characters, as in a CJK module name, as two cells), no markup read."""
    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0), header_style="", expand=False)
    for name in header:
        table.add_column(Text(name), no_wrap=True, overflow="ignore")
    for r in rows:
        table.add_row(*map(Text, r))
    width = sum(max(cell_len(c) for c in column) + 2 for column in zip(header, *rows))
    console = Console(file=io.StringIO(), width=width, color_system=None, emoji=False, highlight=False)
    with console.capture() as captured:
        console.print(table)
    return [line.rstrip() for line in captured.get().splitlines()]


_SHARDING = {
    "none": "replicated",
    "zero1": "ZeRO-1 (optimizer state sharded; gradients reduced and weights gathered once per step)",
    "zero2": "ZeRO-2 (optimizer state and gradients sharded; weights gathered once per step)",
    "zero3": "ZeRO-3 / FSDP (parameters sharded too, gathered per layer in forward and backward)",
    "zero3-keep": "ZeRO-3 / FSDP, parameters kept gathered from forward to backward",
}
"""`PipelinePlan.sharding` in words."""


def _why(p: PipelinePlan) -> str:
    """The runner-ups in one line: how much longer each takes, or why it is out."""
    parts = []
    for c in p.runner_ups:
        if c.label == "chosen":
            continue
        name = {"data parallel": "data parallelism", "pipeline": "the best pipeline", "hybrid": "the best hybrid",
                "FSDP": "FSDP alone", "TP x DP": "the best TP x DP", "TP x PP x DP": "the best TP x PP x DP",
                "equal layers": "equal layer counts", "DP split": "the DP's split"}.get(c.label, c.label)
        if c.step_time_s is None:
            parts.append(f"{name} {c.note}")
        elif p.step_time_s > 0:
            parts.append(f"{name} {c.step_time_s / p.step_time_s:.2f}x as long")
    return "the fastest simulated step; " + "; ".join(parts) if parts else "the only configuration that fits"


def render_training(plan: Plan) -> str:
    """A training plan: strategy and why, throughput against the bounds, stages, runner-ups.

    Raises:
        ValueError: The plan has no pipeline section.
    """
    p = plan.pipeline
    if p is None:
        raise ValueError("render_training needs a plan with a pipeline (partitioner.training.plan_training)")
    kinds: dict[str, int] = {}
    for d in plan.devices:
        kinds[d.profile] = kinds.get(d.profile, 0) + 1
    cluster = " + ".join(f"{n} x {k}" for k, n in kinds.items())
    gap = p.step_time_s / p.lower_bound_s - 1 if p.lower_bound_s > 0 else 0.0
    lines = [
        f"partitioner training plan for {plan.model_name} ({len(plan.layers)} layers, {plan.frontend} graph, "
        f"fingerprint {plan.fingerprint}) on {cluster}",
        f"strategy: {p.family}: {p.description}",
        f"  why: {_why(p)}",
        *(
            [
                f"  parallelism: tensor parallel {p.tensor_parallel} x data parallel {p.data_parallel}"
                f"{', sequence parallel' if p.sequence_parallel else ''}; state {_SHARDING.get(p.sharding, p.sharding)}"
            ]
            if _sharded(p)
            else []
        ),
        f"  layers split by {'the DP (least bottleneck)' if p.split == 'dp' else 'equal counts (simulated faster than the DP split)'}"
        f"; layout: {p.layout}",
        f"step: {format_seconds(p.step_time_s)} for {p.global_batch} samples = {p.samples_per_s:.4g} samples/s; "
        f"bubble {p.bubble_fraction:.1%}; {p.precision}, {p.optimizer}"
        + ("; all-reduce overlapped with backward" if p.overlap_allreduce else ""),
        f"MFU: {p.mfu:.1%} ({p.model_flops:.3g} model FLOPs per step / step x {p.peak_flops:.3g} peak FLOP/s of all "
        f"{len(plan.devices)} devices)",
        f"bound: total compute / total device speed = {format_seconds(p.bound_s)} (step/bound "
        f"{p.step_time_s / p.bound_s:.2f})" if p.bound_s > 0 else "bound: -",
        f"search: exact DP per configuration (gap 0 on the bottleneck); no plan in the space steps faster than "
        f"{format_seconds(p.lower_bound_s)} (this one is within {gap:.1%}); {p.solved} of {p.configurations} "
        f"configurations solved, {p.simulated} splits simulated",
    ]
    basis_line = _basis_line(plan.layers)
    if basis_line:
        lines.append(basis_line)
    counts = [len(p.stages[r].devices) for r in range(p.num_ranks)]
    if len(set(counts)) > 1:
        lines.append(
            f"runs on: the simulator only: its ranks hold {'/'.join(map(str, counts))} replicas, which "
            "partitioner.distributed cannot launch; plan with --equal-replicas (TrainingOptions(equal_replicas=True)) "
            "for a plan it runs"
        )
    lines.append("")
    lines += _table(_stage_header(p), _stage_rows(plan, p))
    if p.runner_ups:
        lines += ["", "strategies compared (simulated step per global batch):"]
        rows: list[tuple[str, ...]] = []
        for c in p.runner_ups:
            step = format_seconds(c.step_time_s) if c.step_time_s is not None else "-"
            rate = f"{c.samples_per_s:.4g}/s" if c.samples_per_s is not None else "-"
            rows.append((f"  {c.label}", step, rate, c.description, c.note))
        lines += _table(("  strategy", "step", "samples", "configuration", "note"), rows)
    lines += ["", f"space: {p.space}"]
    return "\n".join(lines)


def _plan_timeline(plan: Plan, max_actions: int, caller: str, verb: str) -> tuple[Timeline, str]:
    """The plan's step played by the simulator, with at most about `max_actions` forwards and
    backwards (see `render_plan_timeline`), and a title that says what was played (`verb`: drawn)."""
    from partitioner.simulate import peak_inflight_microbatches, simulate

    p = plan.pipeline
    if p is None:
        raise ValueError(f"{caller} needs a plan with a pipeline (partitioner.training.plan_training)")
    shown = p.microbatches
    if 2 * len(p.stages) * shown > max_actions:
        shown = max(1, max_actions // (2 * len(p.stages)))
        while shown < p.microbatches:
            try:
                peak_inflight_microbatches(p.schedule, p.num_ranks, shown, p.virtual_stages)
                break
            except ValueError:
                shown += 1  # interleaving takes only some counts
    stages = p.stage_costs([d.name for d in plan.devices])
    timeline = simulate(stages, shown, p.schedule, overlap_allreduce=p.overlap_allreduce, virtual_stages=p.virtual_stages)
    head = f"{plan.model_name}: {p.family}, {len(p.stages)} stages, {p.schedule}"
    title = (
        f"{head}, {p.microbatches} microbatches; step {format_seconds(p.step_time_s)}, bubble {p.bubble_fraction:.1%}"
        if shown == p.microbatches
        else f"{head}; {verb} with {shown} of its {p.microbatches} microbatches"
    )
    return timeline, title


def render_plan_timeline(plan: Plan, path: str | Path, *, max_actions: int = 1024) -> Path:
    """Draw a training plan's step as a Gantt chart (PNG, SVG or PDF by suffix).

    The step is played by the simulator from the plan's stages. A long pipeline (more
    than `max_actions` forwards and backwards) is played and drawn with fewer
    microbatches, the fewest its schedule takes from ``max_actions / (2 x stages)`` up, and
    the title says so: the shape (warm-up, steady state, drain) is what a picture shows.

    Raises:
        ValueError: The plan has no pipeline, or a bad suffix.
        ImportError: matplotlib is missing (``pip install 'partitioner[plot]'``).
    """
    from partitioner.simulate import render_timeline

    timeline, title = _plan_timeline(plan, max_actions, "render_plan_timeline", "drawn")
    return render_timeline(timeline, path, title=title)


def write_plan_trace(plan: Plan, path: str | Path, *, max_actions: int = 16384) -> Path:
    """Write a training plan's step as a Chrome trace, to open in ui.perfetto.dev or chrome://tracing.

    A process per pipeline rank, threads for its compute, sends, receives and all-reduce,
    a memory counter (see `partitioner.simulate.chrome_trace`). A long pipeline (more than
    `max_actions` forwards and backwards: about 600 bytes of JSON each with their sends, receives
    and idle gaps) is played with fewer microbatches, as in `render_plan_timeline`; the
    trace's ``otherData.title`` says so.

    Args:
        plan: A training plan.
        path: ``.json``, or ``.json.gz`` for gzipped JSON (both tools open it).
        max_actions: Most forwards and backwards played.

    Raises:
        ValueError: The plan has no pipeline, or a bad suffix.
    """
    from partitioner.simulate import write_chrome_trace

    timeline, title = _plan_timeline(plan, max_actions, "write_plan_trace", "played")
    return write_chrome_trace(timeline, path, title=title)


def render_tensor_parallel(layout: TensorParallelLayout, *, examples: int = 3) -> str:
    """What tensor parallelism splits in a model and what it leaves whole: a line per kind of
    pair (how many, their modules' last names, heads and width), the vocabulary shards, the
    sequence-parallel norms and dropouts, and the replicated modules grouped by reason.

    Args:
        layout: From `partitioner.tp_detect` (``LayeredModel.tensor_parallel``).
        examples: Module names shown per group before ``...``.
    """

    def some(names: Sequence[str]) -> str:
        more = f", ... ({len(names)})" if len(names) > examples else ""
        return ", ".join(names[:examples]) + more

    lines = ["tensor parallel (found on the traced graph):"]
    kinds: dict[tuple[str, str], list[Pair]] = {}
    for p in layout.pairs:
        columns = " + ".join(_last(c.module) + (f" ({c.parts} parts)" if c.parts > 1 else "") for c in p.columns)
        shape = f"{p.heads} heads / {p.kv_heads} key-value heads, width {p.width}" if p.heads else f"width {p.width}"
        kinds.setdefault((p.kind, f"{columns} -> {_last(p.row)}, {shape}"), []).append(p)
    for (kind, what), pairs in kinds.items():
        lines.append(f"  {kind} x {len(pairs)}: {what} ({some([p.row for p in pairs])})")
    if not layout.pairs:
        lines.append("  no column->row pairs: tensor parallelism splits no matmul")
    else:
        divisor = math.gcd(*(p.divisor for p in layout.pairs))
        lines.append(f"  degrees that split every pair evenly: {', '.join(str(t) for t in range(1, divisor + 1) if divisor % t == 0)}")
    if layout.vocab:
        lines.append("  vocabulary: " + "; ".join(f"{v.module} ({v.kind}, {v.vocab})" for v in layout.vocab))
    if layout.sequence:
        lines.append(f"  sequence parallel (norms, dropouts): {some(layout.sequence)}")
    reasons: dict[str, list[str]] = {}
    for module, why in layout.replicated:
        reasons.setdefault(why, []).append(module or "<root>")
    for why, modules in reasons.items():
        lines.append(f"  replicated: {some(modules)}: {why}")
    return "\n".join(lines)


def _last(module: str) -> str:
    return module.rsplit(".", 1)[-1]
