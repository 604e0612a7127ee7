"""Why a plan keeps every layer on one device, in one line, from the cost tables (no torch).

A split of whole layers helps only when what it saves in compute (a faster device, a
shorter pipeline period) exceeds what its transfers add. The best two-device split at a
cut in layer order is the runner-up the sentence names, with its largest transfer (a
tied weight sent every step is the usual culprit); data parallelism, when priced, is
named beside it.
"""

from __future__ import annotations

from collections.abc import Callable

from partitioner.units import format_bytes
from partitioner.ir import Problem
from partitioner.options import Objective
from partitioner.units import format_seconds
from partitioner.solve.evaluate import Evaluation, evaluate

__all__ = ["why_single_device", "best_split", "MAX_CUTS"]

MAX_CUTS = 256
"""Cut positions tried per other device (evenly spaced over the layers beyond that)."""


def _cuts(num_layers: int) -> list[int]:
    if num_layers - 1 <= MAX_CUTS:
        return list(range(1, num_layers))
    step = (num_layers - 1) / MAX_CUTS
    return sorted({1 + round(k * step) for k in range(MAX_CUTS)})


def best_split(problem: Problem, device: int) -> Evaluation | None:
    """The fastest feasible placement of the layers before a cut on one device and the rest on
    another, `device` being one of the two (None when no such split fits)."""
    n = problem.num_layers
    best: Evaluation | None = None
    tried = set()
    for other in range(problem.num_devices):
        # Devices alike as seen from `device` (same speeds, link, memory and side) split alike.
        alike = (
            other > device,
            tuple(row[other] for row in problem.compute_s),
            problem.capacity[other],
            problem.seconds_per_byte[device][other],
            problem.seconds_per_byte[other][device],
            problem.latency_s[device][other],
            problem.latency_s[other][device],
        )
        if other == device or alike in tried:
            continue
        tried.add(alike)
        first, second = min(device, other), max(device, other)  # the device index never goes back
        for k in _cuts(n):
            ev = evaluate(problem, (first,) * k + (second,) * (n - k))
            if ev.feasible and (best is None or ev.objective_s < best.objective_s):
                best = ev
    return best


def why_single_device(
    problem: Problem,
    assignment: tuple[int, ...],
    objective_s: float,
    describe: Callable[[str], str] = str,
) -> str:
    """Why no split beats keeping every layer on ``assignment``'s one device.

    Args:
        problem: The cost tables the plan was solved on.
        assignment: The single-device placement.
        objective_s: Its objective.
        describe: A value's graph name -> how a person names it (its module, a weight's name).

    Returns:
        One sentence; empty when there is one device or no layer.
    """
    if problem.num_devices < 2 or not assignment:
        return ""
    device = assignment[0]
    split = best_split(problem, device)
    parts = []
    if split is None:
        parts.append("no split of whole layers over two devices fits their memory")
    else:
        if problem.objective is Objective.LATENCY:
            compute = sum(split.compute_s)
            saved = objective_s - compute
        else:
            compute = max(split.compute_s)
            saved = objective_s - compute
        added = split.objective_s - compute
        if saved <= 1e-6 * objective_s:
            saved = 0.0  # float noise of two sums of the same times
        used = sorted({d for d in split.assignment})
        where = " and ".join(problem.device_names[d] if problem.device_names else f"device {d}" for d in used)
        text = (
            f"the best split over {where} takes {format_seconds(split.objective_s)}: its transfers add "
            f"{format_seconds(added)}"
            + (f" and it saves {format_seconds(saved)} of compute" if saved > 0 else " and it saves no compute")
        )
        if problem.objective is Objective.LATENCY and saved == 0:
            text += " (the layers run one after another, so a second device of the same speed only waits)"
        if split.transfers:
            largest = max(split.transfers, key=lambda t: t.seconds)
            value = problem.values[largest.value]
            text += (
                f"; the largest, {describe(value.name)} ({format_bytes(largest.bytes)}, "
                f"{format_seconds(largest.seconds)}), would be sent every step"
            )
        parts.append(text)
    if problem.replica is not None and problem.replica.time_s > objective_s:
        parts.append(f"data parallelism takes {format_seconds(problem.replica.time_s)}")
    return f"one device is fastest ({format_seconds(objective_s)}): " + "; ".join(parts)
