"""One job of a suite: compare plans, time the planner, or measure plans on this CPU.

Every figure of a placement comes from `partitioner.solve.evaluate` on the cost tables the
planner used (`Problem`), so a baseline and the plan are priced alike:

- a pipeline split (equal layers, parameter- or time-balanced) by the mode's objective:
  ``latency`` (one batch through the stages) or ``throughput`` (the pipeline's period: the busiest
  stage's compute, or its link traffic, which overlaps compute);
- an Accelerate device map by ``latency`` in every mode: Accelerate runs one device at a
  time (``dispatch_model``'s hooks), so its time per batch is the sum over devices plus the
  transfers; and in throughput modes also as the pipeline ``torch.distributed.pipelining``
  would run on the same per-device layer sets (`pipelined`): the period;
- data parallelism by the planner's replica cost (`Problem.replica`);
- at inference, an expert's replicated split (`replicated_split`): r replicas of an equal
  split over n / r devices, each on its share of the batch, the best r and split.

The training mode is planned and priced by the training planner instead
(`benchmarks.training_runs`): microbatches, schedules and replicated stages, every split
played by the same pipeline simulator.

Each job returns plain JSON-able data (`benchmarks.schema` describes it).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from partitioner.analysis import trace_layers
from partitioner.api import auto_parallelize, compile_plan
from partitioner.calibrate import measure_device
from partitioner.cluster import Cluster, load_cluster
from partitioner.cost_model import build_problem, layer_time
from partitioner.training_costs import training_state_bytes
from partitioner.device_resolution import resolve_devices
from partitioner.devices import Device
from partitioner.dtypes import dtype_of
from partitioner.errors import InfeasibleError
from partitioner.ir import INPUT, OUTPUT, LayerGraph, Problem, Solution
from partitioner.layers import LayeredModel
from partitioner.models import BuiltModel
from partitioner.options import Granularity, Objective, Optimizer, PlanOptions, Strategy, TraceOptions
from partitioner.partitioned import PartitionedModule
from partitioner.rewrite import gather_graph, place_tensors
from partitioner.simdevice import SimulatedDevices
from partitioner.solve import evaluate, reorder, solve
from partitioner.solve.replicas import copy_evaluations, replicated_objective

from benchmarks import baselines, training_runs
from benchmarks.models import build
from benchmarks.suites import DEVICE_SETS, MODELS, MODES, AccuracyCase, DeviceSet, Job, Mode, ScalingPoint
from benchmarks.training_runs import training_tables

__all__ = ["run_job", "trace_once", "plan_options", "compare_run", "without_simulation", "rss_bytes",
           "peak_rss_bytes", "pipelined", "replicated_price", "replicated_split", "PIPELINED", "REPLICATED_SPLITS"]

_TOLERANCE = 1e-9
"""Relative slack when comparing two prices of the same tables (float summation order)."""


# ---------------------------------------------------------------------------- process figures


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return 0


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``getrusage``: KiB on Linux)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------- planning


def plan_options(mode: Mode, **overrides: Any) -> PlanOptions:
    """The planner options of a suite mode."""
    return PlanOptions(
        objective=Objective(mode.objective),
        training=mode.training,
        optimizer=Optimizer(mode.optimizer),
        **overrides,
    )


def trace_once(built: BuiltModel, training: bool, granularity: str) -> tuple[LayeredModel, dict[str, float]]:
    """`partitioner.analysis.trace_layers`, the first half of `compile_plan`, so that one trace
    serves every device set and objective of a comparison group (tests/test_benchmarks.py
    checks that the problems agree with `compile_plan`'s)."""
    return trace_layers(built.model, built.example_args, built.example_kwargs, training=training,
                        trace=TraceOptions(granularity=Granularity(granularity)))


def _graph_nodes(layered: LayeredModel) -> int:
    return sum(1 for _ in layered.traced.gm.graph.nodes)


def _solution_step(problem: Problem, solution: Solution) -> tuple[float, bool]:
    """(seconds per step, whether `evaluate` agrees) of the planner's answer (`problem` with
    its devices in the solver's order; copies of the model index its devices as given)."""
    if solution.strategy is Strategy.DATA_PARALLEL or solution.replicas:
        priced = replicated_objective(problem, solution)
        return solution.objective_s, math.isclose(solution.objective_s, priced, rel_tol=_TOLERANCE)
    priced = evaluate(problem, solution.assignment).objective_s
    return solution.objective_s, math.isclose(solution.objective_s, priced, rel_tol=_TOLERANCE, abs_tol=1e-15)


def _planner_record(problem: Problem, options: PlanOptions) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        solution = solve(problem, options.solver)
    except InfeasibleError as e:
        return {"status": "infeasible", "reason": str(e), "solve_s": time.perf_counter() - start}
    solve_s = time.perf_counter() - start
    problem = reorder(problem, solution.device_order)  # the assignment places along the solver's order
    step, agrees = _solution_step(problem, solution)
    record: dict[str, Any] = {
        "status": "ok",
        "strategy": solution.strategy.value,
        "solver": solution.solver,
        "optimal": solution.optimal,
        "gap": solution.gap,
        "lower_bound_s": solution.lower_bound_s,
        "solve_s": solve_s,
        "step_s": step,
        "evaluate_agrees": agrees,
        "assignment": list(solution.assignment),
    }
    if solution.device_order:
        record["device_order"] = list(solution.device_order)
    if solution.strategy is not Strategy.DATA_PARALLEL:
        # A copy of a placement: its first copy's stages, at its share of the batch.
        ev = copy_evaluations(problem, solution)[0] if solution.replicas else evaluate(problem, solution.assignment)
        record["slowest_stage_s"] = max(ev.load_s)
        record["slowest_compute_s"] = max(ev.compute_s)
    return record


def _memory_over(problem: Problem, memory: Sequence[int]) -> list[int]:
    return [d for d, (need, room) in enumerate(zip(memory, problem.capacity)) if need > room]


def _price(
    problem: Problem, name: str, assignment: Sequence[int], sequential: bool, note: str = ""
) -> dict[str, Any]:
    """A baseline's placement priced by `evaluate`: by latency when it runs one device at a
    time (`sequential`), else by the problem's objective; feasible when it fits memory (and,
    for a pipeline, keeps the device order along every edge)."""
    ev = evaluate(problem, assignment)
    over = _memory_over(problem, ev.memory)
    reasons = [f"{problem.device_names[d]} needs {ev.memory[d]} B of {problem.capacity[d]} B" for d in over]
    if not sequential:
        reasons += [v for v in ev.violations if "earlier device" in v][:1]
    return {
        "name": name,
        "implementation": baselines.IMPLEMENTATIONS[name],
        "status": "ok" if not reasons else "infeasible",
        "step_s": ev.latency_s if sequential else ev.objective_s,
        "reason": "; ".join(reasons[:3]) if reasons else note,
        "assignment": list(assignment),
        "devices_used": len(set(assignment)),
    }


def _not_applicable(name: str, reason: str) -> dict[str, Any]:
    return {
        "name": name,
        "implementation": baselines.IMPLEMENTATIONS[name],
        "status": "n/a",
        "step_s": None,
        "reason": reason,
        "assignment": None,
        "devices_used": 0,
    }


def _producers(problem: Problem) -> list[list[int]]:
    producers: list[list[int]] = [[] for _ in range(problem.num_layers)]
    for value in problem.values:
        if value.producer >= 0:
            for consumer in value.consumers:
                if consumer >= 0 and value.producer not in producers[consumer]:
                    producers[consumer].append(value.producer)
    return [sorted(p) for p in producers]


def _accelerate(
    problem: Problem, graph: LayerGraph, built: BuiltModel, balanced: bool, weight_share: float = 1.0
) -> dict[str, Any]:
    """Accelerate's ``device_map="auto"`` (or ``"balanced"``) with the devices' capacities as
    ``max_memory``, times `weight_share`: Accelerate packs weights alone, so a user who trains
    leaves room for the gradients and optimizer state (a quarter of the memory for weights
    with Adam in float32)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    name = "accelerate-balanced" if balanced else "accelerate-sequential"
    caps: dict[int | str, int] = {d: int(problem.capacity[d] * weight_share) for d in range(problem.num_devices)}
    no_split = list(built.no_split_module_classes)
    # Accelerate warns on stdout/stderr that the integer devices are not present; its maps
    # for absent GPUs are what it computes for present ones.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if balanced:
            caps = dict(get_balanced_memory(built.model, max_memory=caps, no_split_module_classes=no_split))
        device_map = infer_auto_device_map(built.model, max_memory=caps, no_split_module_classes=no_split)
    layers = [(layer.modules, layer.params) for layer in graph.layers]
    assignment, offloaded, split = baselines.device_map_to_assignment(device_map, layers, _producers(problem))
    if offloaded:
        record = _price(problem, name, assignment, sequential=True)
        record.update(
            status="infeasible",
            step_s=None,
            reason=f"offloads {len(offloaded)} layer(s) to cpu/disk: the weights do not fit the devices' max_memory",
        )
    else:
        note = f"{len(split)} layer(s) split across devices" if split else ""
        record = _price(problem, name, assignment, sequential=True, note=note)
    record["device_map"] = {k: v for k, v in device_map.items()}
    return record


def _param_counts(graph: LayerGraph, model: nn.Module) -> list[int]:
    """Trainable parameters per layer, as DeepSpeed counts them: the parameters of the
    layer's modules (a tied head counts its shared weight again) and those it owns."""
    counts = []
    for layer in graph.layers:
        seen: dict[int, int] = {}
        for name in layer.modules:
            for p in model.get_submodule(name).parameters():
                if p.requires_grad:
                    seen[id(p)] = p.numel()
        for name in layer.params:
            with contextlib.suppress(AttributeError):
                p = model.get_parameter(name)
                if p.requires_grad:
                    seen[id(p)] = p.numel()
        counts.append(sum(seen.values()))
    return counts


def _is_block(graph: LayerGraph, model: nn.Module, classes: Sequence[str]) -> list[bool]:
    return [
        bool(layer.modules) and type(model.get_submodule(layer.modules[0])).__name__ in classes
        for layer in graph.layers
    ]


def _baselines(
    problem: Problem,
    graph: LayerGraph,
    built: BuiltModel,
    devices: Sequence[Device],
    dtype: str,
    param_counts: Sequence[int],
    is_block: Sequence[bool],
    weight_share: float = 1.0,
) -> list[dict[str, Any]]:
    n, num_devices = problem.num_layers, problem.num_devices
    out = [_accelerate(problem, graph, built, False, weight_share), _accelerate(problem, graph, built, True, weight_share)]
    out.append(_price(problem, "equal-layers", baselines.parts_to_assignment(
        baselines.partition_uniform(n, num_devices)), sequential=False))
    if any(is_block):
        out.append(_price(problem, "equal-blocks", baselines.equal_blocks(is_block, num_devices), sequential=False))
    else:
        out.append(_not_applicable("equal-blocks", "the model has no repeated blocks"))
    out.append(_price(problem, "parameters", baselines.parts_to_assignment(
        baselines.partition_balanced(param_counts, num_devices)), sequential=False))
    forward = [layer_time(layer, devices[0].profile, PlanOptions(training=False), dtype) for layer in graph.layers]
    partitions = min(num_devices, n)
    sizes = baselines.block_partition(baselines.profiled_microseconds(forward), partitions)
    note = f"{partitions} stages: torchgpipe needs a layer per stage" if partitions < num_devices else ""
    out.append(_price(problem, "time-balanced", baselines.sizes_to_assignment(sizes), sequential=False, note=note))
    replica = problem.replica
    if replica is None or num_devices < 2:
        out.append(_not_applicable("data-parallel", "needs two or more devices and a sample per device"))
    else:
        over = _memory_over(problem, replica.memory)
        out.append({
            "name": "data-parallel",
            "implementation": baselines.IMPLEMENTATIONS["data-parallel"],
            "status": "infeasible" if over else "ok",
            "step_s": replica.time_s,
            "reason": "; ".join(
                f"{problem.device_names[d]} needs {replica.memory[d]} B of {problem.capacity[d]} B" for d in over[:3]
            ),
            "assignment": None,
            "devices_used": num_devices,
        })
    return out


def _cluster(device_set: DeviceSet) -> Cluster:
    """The devices of a set and their links: its cluster profile's (several nodes), else one node's."""
    devices = resolve_devices(list(device_set.specs))
    if device_set.cluster is None:
        return Cluster.from_devices(devices)
    cluster = load_cluster(device_set.cluster)
    kinds = [d.profile.name for d in cluster.devices]
    if kinds != [d.profile.name for d in devices]:
        raise ValueError(f"device set {device_set.name!r}: cluster {device_set.cluster} has {kinds}, "
                         f"its specs say {[d.profile.name for d in devices]}")
    return cluster


def _element_size(model: nn.Module) -> int:
    """Bytes per element of the model's floating parameters (4 when it has none)."""
    return next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)


def _simulated(tables: training_runs.TrainingTables, row: dict[str, Any]) -> dict[str, Any]:
    """A baseline row re-priced by the training simulator (`benchmarks.training_runs`)."""
    if row["status"] == "n/a" or (row["status"] == "infeasible" and row["step_s"] is None):
        return row  # Not applicable, or Accelerate offloading weights: no pipeline to price.
    if row["name"] == "data-parallel":
        step, reason, applies = training_runs.price_data_parallel(tables)
        if not applies:
            return _not_applicable("data-parallel", reason)
    else:
        step, reason = training_runs.price_split(tables, row["assignment"], row["name"].startswith("accelerate"))
    return {**row, "status": "ok" if step is not None else "infeasible", "step_s": step,
            "reason": reason or (row["reason"] if row["status"] == "ok" else "")}


# What a user whose training run does not fit tries next: a lower ``max_memory``.
LOWERED_MAX_MEMORY = (0.75, 0.5, 0.25)


def _accelerate_lowered(
    tables: training_runs.TrainingTables,
    problem: Problem,
    graph: LayerGraph,
    built: BuiltModel,
    share: float,
    row: dict[str, Any],
) -> dict[str, Any]:
    """An Accelerate map that does not fit training memory, re-made with ``max_memory``
    lowered step by step (`LOWERED_MAX_MEMORY` of the weight share) until its runs fit: the
    first map that trains, as a user lowering the caps would get it. Stops once a map
    offloads weights (lower caps only offload more)."""
    if not row["name"].startswith("accelerate") or row["status"] != "infeasible":
        return row
    if row.get("reason", "").startswith("offloads"):
        return row
    for fraction in LOWERED_MAX_MEMORY:
        lowered = _accelerate(problem, graph, built, row["name"] == "accelerate-balanced", share * fraction)
        if lowered.get("reason", "").startswith("offloads"):
            return row
        priced = _simulated(tables, lowered)
        if priced["status"] == "ok":
            note = f"max_memory lowered to {fraction:.0%} of the weight share for training to fit"
            return {**priced, "reason": "; ".join(x for x in (priced["reason"], note) if x)}
    return row


PIPELINED = {"accelerate-sequential": "accelerate-pipelined", "accelerate-balanced": "accelerate-balanced-pipelined"}
"""Each Accelerate map's row -> the row of the same map run as a pipeline."""


def pipelined(problem: Problem, row: dict[str, Any], mode: Mode,
               tables: training_runs.TrainingTables | None) -> dict[str, Any]:
    """An Accelerate map's per-device layer sets run as a pipeline, as
    ``torch.distributed.pipelining`` would run that split (a stage per run of layers on one
    device, the batch in microbatches, the stages of a device that the map comes back to on
    the same rank, as its looped schedules run them).

    At inference the price is `evaluate`'s throughput period of the map's placement
    (``bottleneck_s``: the busiest device's compute, or its link traffic, which overlaps
    compute), what partitioner's throughput objective prices its own placements by; it is
    infeasible only where a device cannot hold its layers. In training the price is the
    training simulator's best schedule and microbatch count (`training_runs.price_split`),
    which runs one stage per device: a map that comes back to a device is not priced there.
    At latency one batch runs the stages one after another, which is the map's own row: not
    applicable.
    """
    name = PIPELINED[row["name"]]
    if mode.objective != "throughput":
        return _not_applicable(name, "latency: one batch through a pipeline runs its stages one after another, "
                                     f"as {row['name']}")
    if row["reason"].startswith("offloads"):  # `_accelerate`: the weights do not fit the devices.
        return {**_not_applicable(name, row["reason"]), "status": "infeasible"}
    assignment = list(row["assignment"])
    record = {"name": name, "implementation": baselines.IMPLEMENTATIONS[name], "assignment": assignment,
              "devices_used": len(set(assignment))}
    if tables is not None:
        step, reason = training_runs.price_split(tables, assignment, sequential=False)
        if step is None and "not a pipeline" in reason:
            return {**record, "status": "n/a", "step_s": None, "reason": f"the map comes back to a device ({reason}); "
                    "the training simulator runs one stage per device"}
        return {**record, "status": "ok" if step is not None else "infeasible", "step_s": step,
                "reason": reason or (row["reason"] if row["status"] == "ok" else "")}
    ev = evaluate(problem, assignment)
    over = _memory_over(problem, ev.memory)
    runs = [d for d, _ in itertools.groupby(assignment)]
    looped = sorted({problem.device_names[d] for d in runs if runs.count(d) > 1})
    notes = [row["reason"]] if row["status"] == "ok" and row["reason"] else []
    if looped:
        one = len(looped) == 1
        notes.append(f"{', '.join(looped)} {'runs' if one else 'run'} two or more stages (the map comes back to "
                     f"{'it' if one else 'them'}): a looped schedule")
    return {**record, "status": "infeasible" if over else "ok", "step_s": ev.bottleneck_s,
            "reason": "; ".join(f"{problem.device_names[d]} needs {ev.memory[d]} B of {problem.capacity[d]} B"
                                for d in over[:3]) if over else "; ".join(notes)}


def _replica_problem(problem: Problem, graph: LayerGraph, devices: Sequence[Device], group: Sequence[int],
                     options: PlanOptions, dtype: str, fraction: float) -> Problem:
    """`problem` on the devices of `group` for one replica's `fraction` of the batch: every
    layer's step from `layer_time` at that fraction (as `replica_cost` prices a replica) and
    every value's bytes scaled alike; memory and capacities as in `problem` (at inference a
    layer's memory is its weights, whatever the batch)."""
    times: dict[str, list[float]] = {}
    for d in group:
        profile = devices[d].profile
        if profile.name not in times:
            times[profile.name] = [layer_time(layer, profile, options, dtype, fraction) for layer in graph.layers]
    return replace(
        problem,
        compute_s=tuple(tuple(times[devices[d].profile.name][i] for d in group) for i in range(problem.num_layers)),
        capacity=tuple(problem.capacity[d] for d in group),
        values=tuple(replace(v, bytes=math.ceil(v.bytes * fraction)) for v in problem.values),
        seconds_per_byte=tuple(tuple(problem.seconds_per_byte[a][b] for b in group) for a in group),
        latency_s=tuple(tuple(problem.latency_s[a][b] for b in group) for a in group),
        device_names=tuple(problem.device_names[d] for d in group),
        replica=None,
        data_parallel=(),
        batch_shares=(),
    )


REPLICATED_SPLITS = ("equal-bytes", "equal-time")
"""How `replicated_split` divides a replica's layers: by weight bytes or by time."""


def replicated_price(problem: Problem, graph: LayerGraph, devices: Sequence[Device], options: PlanOptions,
                     dtype: str, replicas: int, split: str) -> tuple[float | None, tuple[int, ...], str]:
    """``replicas`` copies of one `split` (`REPLICATED_SPLITS`) over ``p = n / replicas``
    consecutive devices (copy j on devices ``j p .. j p + p - 1``), each on its share of the
    batch (``batch // replicas``, the first ``batch % replicas`` one more sample), priced by
    `evaluate` on each copy's problem (`_replica_problem`) as `replica_cost` prices data
    parallelism: the slowest copy's objective (latency, or throughput period), plus moving
    every other copy's inputs from the first device to its first device and its outputs back.
    With ``replicas = n`` that is `replica_cost`; with 1, `evaluate` on `problem`.

    Returns:
        ``(step, assignment, why)``: the step (None where a device cannot hold its layers,
        and `why` says which), and the first copy's device per layer.
    """
    n, batch = problem.num_devices, graph.batch_size
    if n % replicas or not 1 <= replicas <= batch:
        raise ValueError(f"{replicas} replicas: need a divisor of the {n} devices, at most the batch of {batch}")
    p = n // replicas
    inputs = [v for v in problem.values if v.producer == INPUT]
    outputs = [v for v in problem.values if OUTPUT in v.consumers]
    slowest, moves = 0.0, 0.0
    first: tuple[int, ...] = ()
    for j in range(replicas):
        group = list(range(j * p, (j + 1) * p))
        f = (batch // replicas + (1 if j < batch % replicas else 0)) / batch
        sub = _replica_problem(problem, graph, devices, group, options, dtype, f)
        costs = problem.memory if split == "equal-bytes" else [row[0] for row in sub.compute_s]
        local = baselines.parts_to_assignment(baselines.min_max_parts(costs, p))
        ev = evaluate(sub, local)
        over = _memory_over(sub, ev.memory)
        if over:
            return None, (), (f"{replicas} replica(s) x {split} split over {p} device(s): "
                              f"{sub.device_names[over[0]]} needs {ev.memory[over[0]]} B of {sub.capacity[over[0]]} B")
        slowest = max(slowest, ev.objective_s)
        if j == 0:
            first = tuple(group[d] for d in local)
            continue
        for v in inputs:
            moves += v.bytes * f * problem.seconds_per_byte[0][group[0]] + problem.latency_s[0][group[0]]
        for v in outputs:
            src = group[local[v.producer]] if v.producer >= 0 else group[0]
            moves += v.bytes * f * problem.seconds_per_byte[src][0] + problem.latency_s[src][0]
    return slowest + moves, first, ""


def replicated_split(problem: Problem, graph: LayerGraph, devices: Sequence[Device], options: PlanOptions,
                     dtype: str) -> dict[str, Any]:
    """An expert's inference layout, the ``replicated-split`` row: the fastest of
    `replicated_price` over every replica count dividing the devices (up to the batch) and
    both splits, equal by weight bytes (`problem.memory`) or by time (each copy's first
    device's), each the contiguous split whose heaviest stage is least
    (`baselines.min_max_parts`)."""
    name, n = "replicated-split", problem.num_devices
    best: dict[str, Any] | None = None
    reasons: list[str] = []
    for r in (r for r in range(1, n + 1) if n % r == 0 and r <= graph.batch_size):
        p = n // r
        for split in REPLICATED_SPLITS:
            step, assignment, why = replicated_price(problem, graph, devices, options, dtype, r, split)
            if step is None:
                reasons.append(why)
            elif best is None or step < best["step_s"]:
                note = (f"{r} replica(s) x {split} split over {p} device(s)"
                        + (" (data parallelism)" if p == 1 else " (a pipeline)" if r == 1 else ""))
                best = {"name": name, "implementation": baselines.IMPLEMENTATIONS[name], "status": "ok",
                        "step_s": step, "reason": note, "assignment": list(assignment), "devices_used": n,
                        "replicas": r}
    if best is None:
        return {**_not_applicable(name, "; ".join(reasons[:3]) or "no replica count fits"), "status": "infeasible"}
    return best


def _bounds(problem: Problem, device_set: DeviceSet, pipeline: dict[str, Any] | None) -> dict[str, Any]:
    """The busiest stage against perfect balance, each layer on its fastest device:

    - ``even_share_s``: total / devices, what a perfectly balanced split reaches, and the
      figure every throughput case is judged against (``pipeline_even_ratio``);
    - ``bound_s``: ``max(total / devices, largest layer)`` (`Plan.bound_s`): no split of
      whole layers beats it (``pipeline_ratio``); the largest layer is ``largest_layer_s``;
    - ``granularity_ratio``, ``granularity_even_ratio``: the least heaviest stage that
      contiguous stages of whole layers allow on identical devices, over each.
    """
    fastest = [min(row) for row in problem.compute_s]
    even = sum(fastest) / problem.num_devices
    largest = max(fastest, default=0.0)
    bound = max(largest, even)
    record: dict[str, Any] = {"bound_s": bound, "even_share_s": even, "largest_layer_s": largest,
                              "granularity_ratio": None, "granularity_even_ratio": None, "pipeline_ratio": None,
                              "pipeline_even_ratio": None, "pipeline_compute_ratio": None,
                              "pipeline_compute_even_ratio": None}
    if device_set.identical and bound > 0:
        best = baselines.min_max_contiguous([row[0] for row in problem.compute_s], problem.num_devices)
        record["granularity_ratio"] = best / bound
        record["granularity_even_ratio"] = best / even
    if pipeline is not None and pipeline.get("status") == "ok" and bound > 0:
        record["pipeline_ratio"] = pipeline["slowest_stage_s"] / bound
        record["pipeline_compute_ratio"] = pipeline["slowest_compute_s"] / bound
        record["pipeline_even_ratio"] = pipeline["slowest_stage_s"] / even
        record["pipeline_compute_even_ratio"] = pipeline["slowest_compute_s"] / even
    return record


def compare_run(
    layered: LayeredModel,
    built: BuiltModel,
    device_set: DeviceSet,
    mode: Mode,
    dtype: str,
    param_counts: Sequence[int],
    is_block: Sequence[bool],
) -> dict[str, Any]:
    """Plan one (device set, mode) on a traced model and price every baseline alike."""
    options = plan_options(mode)
    cluster = _cluster(device_set)
    devices = cluster.devices
    start = time.perf_counter()
    links = [list(zip(spb, lat)) for spb, lat in zip(cluster.seconds_per_byte, cluster.latency_s)]
    problem = build_problem(layered.graph, devices, options, dtype, links)
    tables = training_tables(layered, cluster, dtype, _element_size(built.model)) if mode.training else None
    build_s = time.perf_counter() - start
    planner = _planner_record(problem, options) if tables is None else training_runs.planner_record(tables)
    planner["build_problem_s"] = build_s
    pipeline = None
    if mode.objective == "throughput":
        pipeline = _planner_record(replace(problem, replica=None, data_parallel=(), batch_shares=()), options)
    share = 1.0
    if tables is not None:
        state = training_state_bytes(1, tables.options.precision, tables.options.optimizer)
        share = state.weights / (state.weights + state.grads + state.optimizer)
    rows = _baselines(problem, layered.graph, built, devices, dtype, param_counts, is_block, share)
    if tables is not None:
        rows = [_simulated(tables, row) for row in rows]
        rows = [_accelerate_lowered(tables, problem, layered.graph, built, share, row) for row in rows]
    rows[2:2] = [pipelined(problem, row, mode, tables) for row in rows if row["name"] in PIPELINED]
    if tables is None:
        rows.append(replicated_split(problem, layered.graph, devices, options, dtype))
    else:
        rows.append(_not_applicable("replicated-split", "inference only: training's replicated splits are the "
                                                        "training planner's hybrids, and DDP is data-parallel"))
    step = planner.get("step_s")
    for row in rows:
        row["ratio"] = row["step_s"] / step if row["step_s"] is not None and step else None
    return {
        "devices": device_set.name,
        "mode": mode.name,
        "device_names": list(problem.device_names),
        "capacity_bytes": list(problem.capacity),
        "layers": problem.num_layers,
        "partitioner": planner,
        "pipeline_only": pipeline,
        "baselines": rows,
        "bound": _bounds(problem, device_set, pipeline),
    }


def _compare(job: Job) -> dict[str, Any]:
    spec = MODELS[job.model]
    start = time.perf_counter()
    built = build(spec)
    build_s = time.perf_counter() - start
    layered, timings = trace_once(built, job.training, spec.granularity)
    dtype = dtype_of(built.model)
    counts = _param_counts(layered.graph, built.model)
    blocks = _is_block(layered.graph, built.model, built.no_split_module_classes)
    runs = []
    for devices, mode in job.runs:
        run = compare_run(layered, built, DEVICE_SETS[devices], MODES[mode], dtype, counts, blocks)
        runs.append({"model": job.model, **run})
    return {
        "model": job.model,
        "description": built.description,
        "training": job.training,
        "build_s": build_s,
        **timings,
        "graph_nodes": _graph_nodes(layered),
        "layers": len(layered.graph.layers),
        "layer_names": [layer.name for layer in layered.graph.layers],
        "runs": runs,
    }


# ---------------------------------------------------------------------------- planner growth


def _scaling(point: ScalingPoint) -> dict[str, Any]:
    spec = MODELS[point.model]
    start = time.perf_counter()
    built = build(spec)
    build_s = time.perf_counter() - start
    rss_before = rss_bytes()
    options = plan_options(MODES[point.mode])
    start = time.perf_counter()
    compiled = compile_plan(built.model, list(DEVICE_SETS[point.devices].specs), built.example_args,
                            built.example_kwargs, options=options, granularity=spec.granularity)
    wall = time.perf_counter() - start
    graph = compiled.layered.graph
    return {
        "series": point.series,
        "model": point.model,
        "devices": point.devices,
        "num_devices": len(compiled.devices),
        "mode": point.mode,
        "graph_nodes": _graph_nodes(compiled.layered),
        "layers": len(graph.layers),
        "chain": graph.is_chain,
        "build_s": build_s,
        "compile_s": wall,
        "timings_s": dict(compiled.timings_s),
        "solver": compiled.solution.solver,
        "optimal": compiled.solution.optimal,
        "gap": compiled.solution.gap,
        "strategy": compiled.solution.strategy.value,
        "rss_before_bytes": rss_before,
    }


# ---------------------------------------------------------------------------- runs on this CPU


def _loss(out: Any) -> torch.Tensor:
    floats = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum((t.float().sum() for t in floats[1:]), floats[0].float().sum())


def _step(module: nn.Module, built: BuiltModel, training: bool, sim: SimulatedDevices | None) -> Callable[[], None]:
    """One inference forward (no autograd), or one forward and backward, of `module`."""
    params = [p for p in module.parameters() if p.requires_grad]
    args, kwargs = built.example_args, built.example_kwargs

    def run() -> None:
        with sim if sim is not None else contextlib.nullcontext():
            if training:
                _loss(module(*args, **kwargs)).backward()
            else:
                with torch.no_grad():
                    module(*args, **kwargs)
        for p in params:
            p.grad = None

    return run


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Median seconds of each step, timed round-robin (the order reversed every other
    round) so that a burst of load on the host spreads over all of them alike."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "samples_s": s} for name, s in samples.items()}


def _unmeasured(graph: LayerGraph) -> LayerGraph:
    """`graph` without measured layer times, so that the cost model falls back to its roofline."""
    return replace(graph, layers=tuple(replace(l, fwd_time_s={}, bwd_time_s={}) for l in graph.layers))


def without_simulation(pm: PartitionedModule) -> nn.Module:
    """`pm`'s rewritten graph and placement on plain CPU tensors: the simulation layer taken out.

    Each transfer between two of the plan's devices stays a real copy of the same bytes,
    forward and backward (`gather_graph` with ``copy_transfers``); model inputs are read where
    they are, as on one device. So a step costs compute plus the plan's copies, what two
    devices sharing this CPU's memory would cost, which is what the cost model predicts; the
    simulated run costs that plus the simulation's own per-op Python work.

    Raises:
        ValueError: `pm` replicates the model (its module is no rewritten graph).
    """
    if not isinstance(pm.module, fx.GraphModule):
        raise ValueError(f"without_simulation needs a rewritten graph, got {type(pm.module).__name__} "
                         f"({pm.plan.strategy.value}); plan with allow_data_parallel=False")
    host = copy.deepcopy(pm.module, place_tensors(pm.module, {}, "cpu"))
    gather_graph(host, "cpu", copy_transfers=True)
    return host


def _accuracy_case(case: AccuracyCase, spec_name: str, built: BuiltModel, profile: Any, repeats: int) -> dict[str, Any]:
    """Plan `built` for `case` as a user would (`compile_plan` times the layers on the CPU
    here), run the rewritten module, and compare its measured step with the predictions:
    the planner's own, and the roofline alone with the built-in and a calibrated profile.

    On simulated devices the step is measured twice, interleaved with the original: without
    the simulation (`without_simulation`: compute plus real copies, the figure the errors
    are computed from) and on the simulated devices (with the simulation's own cost)."""
    devices = list(case.devices)
    options = PlanOptions(objective=Objective.THROUGHPUT, training=case.training, allow_data_parallel=False)
    compiled = compile_plan(built.model, devices, built.example_args, built.example_kwargs, options=options)
    pm = auto_parallelize(built.model, devices, built.example_args, built.example_kwargs, options=options,
                          plan=compiled.plan, measure=False)
    assignment = compiled.solution.assignment
    dtype = dtype_of(built.model)
    plain = _unmeasured(compiled.layered.graph)
    calibrated = tuple(replace(d, profile=profile) for d in compiled.devices)
    # One CPU runs the devices one after another: a step takes the placement's latency.
    predicted = {
        "planner": evaluate(compiled.problem, assignment).latency_s,
        "roofline-builtin": evaluate(build_problem(plain, compiled.devices, options, dtype), assignment).latency_s,
        "roofline-calibrated": evaluate(build_problem(plain, calibrated, options, dtype), assignment).latency_s,
    }
    layers = _layer_accuracy(compiled, plain, calibrated[0], options, dtype)
    steps = {"eager": _step(built.model, built, case.training, None)}
    if pm.simulator is None:
        steps["partitioned"] = _step(pm, built, case.training, None)
    else:
        steps["partitioned"] = _step(without_simulation(pm), built, case.training, None)
        steps["simulated"] = _step(pm, built, case.training, pm.simulator)
    timed = interleaved_medians(steps, repeats)
    measured = timed["partitioned"]["median_s"]
    simulated = timed["simulated"]["median_s"] if "simulated" in timed else None
    return {
        "model": spec_name,
        "devices": devices,
        "training": case.training,
        "assignment": list(assignment),
        "transfers": len(pm.plan.transfers),
        "predicted_s": predicted,
        "measured_s": measured,
        "simulated_s": simulated,
        "simulation_cost": simulated / measured if simulated is not None else None,
        "eager_s": timed["eager"]["median_s"],
        "error": {k: (v - measured) / measured for k, v in predicted.items()},
        "layers": layers,
        "overhead": measured / timed["eager"]["median_s"],
        "planner_timings_s": dict(compiled.timings_s),
        "samples_s": {k: v["samples_s"] for k, v in timed.items()},
    }


def _layer_accuracy(compiled: Any, plain: LayerGraph, calibrated: Device, options: PlanOptions,
                    dtype: str) -> list[dict[str, Any]]:
    """Per layer timed by `compile_plan` on the first device's kind: the measured seconds of
    one step (forward, plus backward when training) against the roofline's, with the built-in
    and the calibrated profile (what the cost model predicts for a device that is not here)."""
    device = compiled.devices[0]
    rows = []
    for layer, unmeasured in zip(compiled.layered.graph.layers, plain.layers):
        if device.profile.name not in layer.fwd_time_s:
            continue  # The measurement budget ran out before this layer.
        rows.append({
            "name": layer.name,
            "measured_s": layer_time(layer, device.profile, options, dtype),
            "predicted_s": {
                "roofline-builtin": layer_time(unmeasured, device.profile, options, dtype),
                "roofline-calibrated": layer_time(unmeasured, calibrated.profile, options, dtype),
            },
        })
    return rows


def _profile_figures(profile: Any) -> dict[str, float]:
    return {
        "float32_flops": profile.peak_flops.float32 * profile.compute_efficiency,
        "memory_bandwidth_Bps": profile.memory_bandwidth_Bps * profile.memory_efficiency,
    }


def _accuracy(job: Job, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = MODELS[job.model]
    built = build(spec, device="cpu")
    profile = measure_device("cpu", dtypes=("float32",), quick=True, threads=1)
    builtin = resolve_devices(["cpu"])[0].profile
    cases = [_accuracy_case(case, job.model, built, profile, repeats) for case in job.cases]
    return {
        "model": job.model,
        "description": built.description,
        "calibrated_profile": _profile_figures(profile),
        "builtin_profile": _profile_figures(builtin),
        "cases": cases,
    }


def _mlp_split(repeats: int) -> dict[str, Any]:
    """The seed MLP split automatically (throughput objective) against the tutorials' hand split."""
    from tests.models import HandSplitMLP

    torch.set_num_threads(1)
    built = build(MODELS["mlp"], device="cpu")
    devices = ["cpu:0", "cpu:1"]
    options = PlanOptions(objective=Objective.THROUGHPUT, allow_data_parallel=False)
    compiled = compile_plan(built.model, devices, built.example_args, options=options)
    pm = auto_parallelize(built.model, devices, built.example_args, options=options, plan=compiled.plan,
                          measure=False)
    first_stage = {"fc1", "relu1", "fc2", "relu2"}
    hand = tuple(0 if set(layer.modules) <= first_stage else 1 for layer in compiled.layered.graph.layers)
    problem = compiled.problem
    priced = {name: evaluate(problem, a) for name, a in (("auto", compiled.solution.assignment), ("hand", hand))}
    sim = SimulatedDevices(2)
    with sim:
        hand_module = HandSplitMLP("cpu:0", "cpu:1", source=built.model)
    timed = interleaved_medians(
        {
            "eager": _step(built.model, built, True, None),
            "auto": _step(pm, built, True, pm.simulator),
            "hand": _step(hand_module, built, True, sim),
        },
        repeats,
    )
    return {
        "layers": [layer.name for layer in compiled.layered.graph.layers],
        "auto_assignment": list(compiled.solution.assignment),
        "hand_assignment": list(hand),
        "predicted": {
            name: {"throughput_s": ev.bottleneck_s, "latency_s": ev.latency_s, "feasible": ev.feasible}
            for name, ev in priced.items()
        },
        "throughput_ratio": priced["hand"].bottleneck_s / priced["auto"].bottleneck_s,
        "measured_s": {name: v["median_s"] for name, v in timed.items()},
        "measured_latency_ratio": timed["hand"]["median_s"] / timed["auto"]["median_s"],
        "samples_s": {name: v["samples_s"] for name, v in timed.items()},
    }


# ---------------------------------------------------------------------------- entry point


def run_job(job: Job, repeats: int) -> dict[str, Any]:
    """Run `job` in this process and return its record (the worker adds process figures)."""
    if job.kind == "compare":
        return _compare(job)
    if job.kind == "scaling":
        assert job.point is not None
        return _scaling(job.point)
    if job.kind == "accuracy":
        return _accuracy(job, repeats)
    return _mlp_split(repeats)
