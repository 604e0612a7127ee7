"""Best-first search over the space, and the plan it answers with (`plan_pipeline`)."""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from partitioner.cluster import Cluster
from partitioner.training_costs import TrainingCosts
from partitioner.progress import Progress
from partitioner.units import format_bytes
from partitioner.errors import InfeasibleError
from partitioner.options import Sharding, TrainingOptions
from partitioner.pipeline_plan.space import FAMILIES, Configuration, configurations
from partitioner.pipeline_plan.stages import Partition, StageModel
from partitioner.plan import PipelinePlan, PlanCandidate
from partitioner.simulate import PipelineSchedule, Timeline, simulate

__all__ = ["PipelineResult", "plan_pipeline", "search"]

_INF = math.inf


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineResult:
    """What `plan_pipeline` found."""

    pipeline: PipelinePlan
    partition: Partition
    timeline: Timeline
    """The chosen plan's step, played by `simulate` (its makespan is `PipelinePlan.step_time_s`)."""
    solve_time_s: float


@dataclass(frozen=True, slots=True)
class _Found:
    """One family's search: its best split, the least bound over its configurations, how many fit."""

    best: Partition | None
    lower_bound_s: float
    feasible: int


_ORDER = {Sharding.NONE: 0, Sharding.ZERO1: 1, Sharding.ZERO2: 2, Sharding.ZERO3_KEEP: 3, Sharding.ZERO3: 4}
"""Shardings of otherwise equal configurations in the order they are tried (see `_dominated`)."""


def _dominated(model: StageModel, config: Configuration, present: set[Configuration]) -> bool:
    """Whether a configuration of the space that differs only in its sharding makes `config`
    pointless: it holds no more memory in any stage and communicates no more, and so
    reaches every split's step at least as fast.

    zero3-keep over zero3, once its split was not held back by memory (the same
    collectives but one gather fewer per microbatch, the same optimizer step on a shard).
    Replicated (none) does not dominate ZeRO-1, though a reduce-scatter of the gradients and
    a gather of the weights move at least an all-reduce's bytes: each ZeRO-1 replica steps
    its optimizer over a 1/d shard. ZeRO-2 is always tried: its reduce-scatters hide under
    the backward.
    """
    if config.sharding is Sharding.ZERO3:
        other = replace(config, sharding=Sharding.ZERO3_KEEP)
        return other in present and model.unconstrained(other)
    return False


def search(model: StageModel, configs: Sequence[Configuration], progress: Progress) -> _Found:
    """Best-first branch and bound over `configs` and their splits.

    One frontier holds configurations, keyed by their bound ``work`` (perfect balance),
    and splits, keyed by their own bound (`StageModel.split_bound`, and at least their
    configuration's ``m x T*``). The least key goes first: a configuration is solved by the
    DP and offers two splits (the DP's and equal layer counts: the DP minimises the
    bottleneck, which is not quite the makespan); a split is simulated. Once the least key
    is no less than the best step simulated, nothing left can beat it. So the simulator,
    the dearest step, plays only splits whose bound is the least so far. A configuration
    another sharding dominates (`_dominated`) is skipped; its bound is at least the
    dominating one's.
    """
    works = {c: model.work(c) for c in configs}

    def key(c: Configuration) -> tuple[float, float, int]:
        estimate = works[c] * (c.microbatches + (c.ranks - 1) / c.virtual_stages) / c.microbatches
        return works[c], estimate, _ORDER[c.sharding]

    present = set(configs)
    frontier: list[tuple[tuple[float, float, int], int, Configuration | Partition]] = [
        (key(c), k, c) for k, c in enumerate(configs)
    ]
    heapq.heapify(frontier)
    tiebreak = len(configs)
    best: Partition | None = None
    lower = _INF
    feasible = solved = 0
    while frontier:
        (bound, *_), _, item = heapq.heappop(frontier)
        incumbent = best.step_time_s if best else _INF
        if bound >= incumbent:
            lower = min(lower, bound)
            break
        if isinstance(item, Partition):
            played = model.timed(item)
            if played.step_time_s < incumbent:
                best = played
                progress(
                    f"{solved}/{len(configs)}: {item.configuration.describe(model.cluster)}: step {played.step_time_s:.4g} s"
                )
            continue
        config = item
        solved += 1
        if _dominated(model, config, present):
            continue
        found = model.split(config) if model.may_fit(config) else None
        if found is None:
            continue
        feasible += 1
        t_star, ranges, flags = found
        bound = max(bound, config.microbatches * t_star)
        lower = min(lower, bound)
        if bound >= incumbent:
            continue  # the incumbent only falls: its splits could never be played
        split = model.options.config.split if model.options.config is not None else None
        offered = (
            model.partition(config, ranges, flags, "dp") if split in (None, "dp") else None,
            model.equal_partition(config) if split in (None, "equal") else None,
        )
        for candidate in offered:
            if candidate is not None:
                tiebreak += 1
                split_bound = max(bound, model.split_bound(candidate))
                heapq.heappush(frontier, ((split_bound, split_bound, _ORDER[config.sharding]), tiebreak, candidate))
    return _Found(best, min(lower, best.step_time_s) if best else lower, feasible)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector: a long pipeline's simulation allocates ~10^5
    events that form no cycles, and the collector rescanning them doubled its time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plan_pipeline(
    costs: TrainingCosts,
    cluster: Cluster,
    global_batch: int,
    options: TrainingOptions | None = None,
    progress: Progress | None = None,
) -> PipelineResult:
    """Plan one training step of `global_batch` samples (see the package docstring).

    Args:
        costs: Per-layer tables; `TrainingCosts.times` must cover every device kind of
            `cluster` at every size of `microbatch_sizes`.
        cluster: The devices and links.
        global_batch: Samples per optimizer step.
        options: Limits of the search (its ``global_batch`` is not read here).
        progress: Called with a line on each better plan found.

    Returns:
        The chosen plan as `PipelinePlan` data, its split and its simulated timeline.

    Raises:
        InfeasibleError: No configuration fits memory; the message gives the sizes.
        KeyError: `costs` lacks a time table the space needs.
        ValueError: `global_batch` below 1.
    """
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch must be an integer >= 1 samples (got {global_batch!r})")
    options = options or TrainingOptions()
    say = progress or (lambda _: None)
    start = time.perf_counter()
    fixed = options.config
    if fixed is not None:
        fixed.check_devices(cluster.num_devices)
        if fixed.recompute is not None:
            options = replace(options, recompute=fixed.recompute)
    model = StageModel(costs, cluster, global_batch, options)
    degrees = (fixed.tp,) if fixed is not None and fixed.tp is not None else model.useful_degrees()
    space = replace(options, tensor_parallel=degrees)
    configs = configurations(cluster, global_batch, model.n, space)
    if fixed is not None and not configs:
        raise InfeasibleError(
            f"no configuration of the space is {fixed} on {cluster.name} ({cluster.num_devices} devices, "
            f"global batch {global_batch}): check that the degrees use every device of one kind (or the "
            f"first devices of a node, or a half, quarter, ... of its whole nodes), that "
            f"tensor-parallel groups fit in a node, that the microbatches times the data-parallel degree divide "
            f"the batch (options allow {options.min_microbatches}-{options.max_microbatches} microbatches) and "
            f"that the schedule and sharding are among the options'"
        )
    with _no_gc():
        families = {}
        for family in FAMILIES:
            members = [c for c in configs if c.family == family]
            if members:
                families[family] = search(model, members, say)
        found = [f.best for f in families.values() if f.best is not None]
        if not found:
            raise _infeasible(model)
        chosen = min(found, key=lambda part: part.step_time_s)
        config = chosen.configuration
        timeline = chosen.timeline or simulate(
            chosen.stages,
            config.microbatches,
            config.schedule,
            overlap_allreduce=options.overlap_allreduce,
            virtual_stages=config.virtual_stages,
        )
        step = timeline.step_time_s
        runner_ups = _runner_ups(model, chosen, families, step)
    dtype = costs.precision.compute_dtype
    peak = sum(d.profile.peak_flops_for(dtype) for d in cluster.devices)
    model_flops = global_batch * costs.flops_per_sample
    pipeline = PipelinePlan(
        family=config.family,
        description=config.describe(cluster),
        schedule=config.schedule.value,
        microbatches=config.microbatches,
        virtual_stages=config.virtual_stages,
        global_batch=global_batch,
        precision=costs.precision.value,
        optimizer=costs.optimizer.value,
        overlap_allreduce=options.overlap_allreduce,
        layout=config.layout,
        split=chosen.origin,
        tensor_parallel=config.tp,
        data_parallel=config.data_parallel(config.groups[0]),
        sharding=config.sharding.value,
        sequence_parallel=options.sequence_parallel and config.tp > 1,
        stages=chosen.plan_stages,
        step_time_s=step,
        bubble_fraction=timeline.bubble_fraction,
        samples_per_s=global_batch / step if step > 0 else 0.0,
        model_flops=model_flops,
        peak_flops=peak,
        mfu=model_flops / (step * peak) if step > 0 else 0.0,
        bound_s=_balanced_bound(model, global_batch),
        lower_bound_s=min(min(f.lower_bound_s for f in families.values()), step),
        runner_ups=runner_ups,
        space=_space(cluster, space, len(configs)),
        configurations=len(configs),
        solved=model.solved,
        simulated=model.simulated,
    )
    return PipelineResult(pipeline=pipeline, partition=chosen, timeline=timeline, solve_time_s=time.perf_counter() - start)


def _balanced_bound(model: StageModel, batch: int) -> float:
    """``batch / sum over devices of samples per second``: every device at its best rate over
    the tabulated microbatch sizes, no bubble, no communication, no memory limit."""
    rate: dict[str, float] = {}
    for t in model.costs.times:
        seconds = sum(t.fwd_s) + sum(t.bwd_s)
        rate[t.kind] = max(rate.get(t.kind, 0.0), t.samples / seconds if seconds > 0 else _INF)
    total = sum(rate.get(d.profile.name, 0.0) for d in model.cluster.devices)
    return batch / total if total > 0 else 0.0


def _space(cluster: Cluster, options: TrainingOptions, count: int) -> str:
    schedules = ", ".join(
        s.value + (f" (2-{options.max_virtual_stages} stages per rank)" if s is PipelineSchedule.INTERLEAVED_1F1B else "")
        for s in options.schedules
    )
    degrees = ", ".join(map(str, options.tensor_parallel))
    return (
        f"{count} configurations: device kinds {', '.join(cluster.kinds)} (every subset, every order), all devices "
        f"of a chosen kind (of one kind alone also its first half, quarter, ... in whole nodes and its first c devices "
        f"for any c in a node, the rest idle); ranks of r devices (r divides the kind's count; replicas in a node, or "
        f"stages in a node across nodes; of one kind in a node also r and 2r in monotone order) or one group of all; tensor parallel {degrees} (of those splitting some layer; dividing r "
        f"and a node's devices){', sequence parallel' if options.sequence_parallel else ''}; sharding "
        f"{', '.join(s.value for s in options.shardings)} over the r / tp replicas; "
        f"{options.min_microbatches}-{options.max_microbatches} microbatches dividing the batch; {schedules}; "
        f"recompute {options.recompute.value}; contiguous stages, at most {options.max_stages or 'one per layer'}, "
        f"split by the exact DP (and equal layer counts)"
        + (f"; only the configuration {options.config}" if options.config is not None else "")
    )


def _infeasible(model: StageModel) -> InfeasibleError:
    costs, cluster = model.costs, model.cluster
    return InfeasibleError(
        f"no training plan fits {cluster.name}: the model's weights, gradients and optimizer state take "
        f"{format_bytes(model.state_bytes)} ({costs.precision.value}, {costs.optimizer.value}) and one sample keeps "
        f"{format_bytes(int(model.activations[-1]))} of activations; the {cluster.num_devices} devices hold "
        f"{format_bytes(sum(model.capacity))} in all (the largest {format_bytes(max(model.capacity))}, after the "
        f"{model.options.memory_reserve:.0%} reserve). Allow recomputation, more microbatches (smaller ones) or "
        f"stages, a smaller optimizer or precision, or more devices"
    )


def _row(model: StageModel, label: str, part: Partition | None, note: str) -> PlanCandidate:
    if part is None:
        return PlanCandidate(label=label, description="-", step_time_s=None, samples_per_s=None, note=note)
    return PlanCandidate(
        label=label,
        description=part.configuration.describe(model.cluster),
        step_time_s=part.step_time_s,
        samples_per_s=model.batch / part.step_time_s if part.step_time_s > 0 else None,
        note=note,
    )


def _runner_ups(
    model: StageModel, chosen: Partition, families: dict[str, _Found], step: float
) -> tuple[PlanCandidate, ...]:
    """The chosen plan, the best of every other family, and the chosen configuration split
    the other way (equal layer counts, or the DP's split)."""
    family = chosen.configuration.family
    chosen = replace(chosen, step_time_s=step)  # the simulation's figure (GPipe was ranked by its closed form)
    rows = [_row(model, "chosen", chosen, f"{family}: the fastest simulated step in the space")]
    for other in FAMILIES:
        if other in (family, "single device"):
            continue
        found = families.get(other)
        if found is None and other not in ("data parallel", "pipeline", "hybrid"):
            continue  # a family of sharding or tensor parallelism the options or the model leave out
        if found is None:
            why = "not in the configuration named" if model.options.config is not None else "not in the space for these devices"
            rows.append(_row(model, other, None, why))
        elif found.best is None:
            rows.append(_row(model, other, None, "does not fit in memory"))
        else:
            rows.append(_row(model, other, found.best, f"{found.best.step_time_s / step:.2f}x the chosen step"))
    config = chosen.configuration
    if config.stages > 1:
        if chosen.origin == "dp":
            other_split, label = model.equal_partition(config), "equal layers"
        else:
            dp = model.split(config)
            other_split = model.partition(config, dp[1], dp[2], "dp") if dp else None
            label = "DP split"
        if other_split is None:
            rows.append(_row(model, label, None, "does not fit in memory"))
        else:
            played = model.timed(other_split)
            same = played.ranges == chosen.ranges
            note = "the same split" if same else f"same configuration, {played.step_time_s / step:.2f}x the chosen step"
            rows.append(_row(model, label, played, note))
    return tuple(rows)
