"""Training comparisons priced by the training planner's pipeline simulator.

A training step is what `partitioner.training.plan_training` plans: a global batch in
microbatches through pipeline stages, each stage possibly replicated, under a schedule
(GPipe, 1F1B, interleaved 1F1B), gradients all-reduced among replicas. Here partitioner's
plan is `plan_pipeline`'s answer, and every baseline's split is priced on the same tables
(`StageModel`) by the same simulator, as its users would run it:

- a pipeline split (equal layers or blocks, parameter- or time-balanced): one device per
  stage, the best of GPipe and 1F1B at the best microbatch count (what DeepSpeed's
  pipeline engine, torchgpipe and ``torch.distributed.pipelining`` offer), recomputing
  activations only where a stage does not fit otherwise;
- an Accelerate device map: one microbatch at a time, the devices one after another
  (forward through them, backward back, a device visited again where the map returns to
  it), gradients accumulated over the best microbatch count that fits;
- data parallelism: one stage replicated on every device (DDP), the best microbatch count
  (gradient accumulation).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from partitioner.cluster import Cluster
from partitioner.training_costs import training_costs
from partitioner.devices import Device
from partitioner.errors import InfeasibleError
from partitioner.layers import LayeredModel
from partitioner.options import Optimizer, Precision, TrainingOptions
from partitioner.pipeline_plan import plan_pipeline
from partitioner.pipeline_plan.space import Configuration, Group, microbatch_counts, microbatch_sizes
from partitioner.pipeline_plan.stages import Partition, StageModel
from partitioner.simulate import PipelineSchedule, gpipe_step_time

__all__ = ["TrainingTables", "training_tables", "planner_record", "price_split", "price_data_parallel"]

_STRATEGY = {"single device": "single", "pipeline": "model_parallel", "hybrid": "hybrid",
             "data parallel": "data_parallel", "FSDP": "data_parallel", "TP x DP": "hybrid", "TP x PP x DP": "hybrid"}
"""`Configuration.family` as the result's ``strategy``."""
_PIPELINE_SCHEDULES = (PipelineSchedule.GPIPE, PipelineSchedule.ONE_F_ONE_B)


class TrainingTables:
    """The training planner's tables for one traced model on one device set."""

    def __init__(self, layered: LayeredModel, cluster: Cluster, dtype: str, element_size: int,
                 optimizer: Optimizer, memory_reserve: float) -> None:
        graph = layered.graph
        self.batch = graph.batch_size
        self.cluster = cluster
        precision = Precision.FP32 if dtype == "float32" else Precision.BF16 if dtype == "bfloat16" else Precision.FP16
        self.options = TrainingOptions(optimizer=optimizer, precision=precision, memory_reserve=memory_reserve)
        parameters = {n.name for n in layered.traced.gm.graph.nodes if n.op == "get_attr"}
        profiles = list({d.profile.name: d.profile for d in self.cluster.devices}.values())
        self.costs = training_costs(
            graph, profiles, microbatch_sizes(self.cluster, self.batch, self.options), precision=precision,
            optimizer=optimizer, element_size=element_size, parameter_values=parameters,
        )
        self.model = StageModel(self.costs, self.cluster, self.batch, self.options)

    def best(self, configs: Sequence[Configuration], ranges: tuple[tuple[int, int], ...]) -> float:
        """The least simulated step of the split `ranges` over `configs`; inf when it fits none."""
        best = math.inf
        for config in configs:
            part = self.model.policy_partition(config, ranges, "baseline")
            if part is not None:
                best = min(best, self.model.timed(part).step_time_s)
        return best


def training_tables(
    layered: LayeredModel, devices: Sequence[Device] | Cluster, dtype: str, element_size: int
) -> TrainingTables:
    """The tables of the suite's training mode (Adam, the model's own precision, 10% memory
    kept free) on a cluster, or on devices in one node."""
    cluster = devices if isinstance(devices, Cluster) else Cluster.from_devices(devices)
    return TrainingTables(layered, cluster, dtype, element_size, Optimizer.ADAM, memory_reserve=0.1)


def planner_record(tables: TrainingTables) -> dict[str, Any]:
    """partitioner's training plan (`plan_pipeline`) as a result record."""
    start = time.perf_counter()
    try:
        result = plan_pipeline(tables.costs, tables.cluster, tables.batch, tables.options)
    except InfeasibleError as e:
        return {"status": "infeasible", "reason": str(e), "solve_s": time.perf_counter() - start}
    pipeline = result.pipeline
    assignment = [0] * tables.model.n  # Each layer's stage's first device.
    for stage in pipeline.stages:
        size = stage.last_layer + 1 - stage.first_layer
        assignment[stage.first_layer : stage.last_layer + 1] = [stage.devices[0]] * size
    return {
        "status": "ok",
        "strategy": _STRATEGY[pipeline.family],
        "solver": pipeline.description,
        "optimal": False,
        "gap": max(0.0, 1 - pipeline.lower_bound_s / pipeline.step_time_s) if pipeline.step_time_s > 0 else 0.0,
        "lower_bound_s": pipeline.lower_bound_s,
        "solve_s": result.solve_time_s,
        "step_s": pipeline.step_time_s,
        "evaluate_agrees": _replayed(tables, result.partition, pipeline.step_time_s),
        "assignment": assignment,
    }


def _replayed(tables: TrainingTables, chosen: Partition, step_s: float) -> bool:
    """Whether the chosen split, priced again on the tables the baselines use, steps as planned."""
    part = tables.model.partition(chosen.configuration, chosen.ranges, chosen.recompute, "replay")
    return part is not None and math.isclose(tables.model.timed(part).step_time_s, step_s, rel_tol=1e-9)


def _runs(assignment: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(device, first, end)`` of each run of equal devices along the layers."""
    out, first = [], 0
    for device, run in itertools.groupby(assignment):
        size = len(list(run))
        out.append((device, first, first + size))
        first += size
    return out


def price_split(tables: TrainingTables, assignment: Sequence[int], sequential: bool) -> tuple[float | None, str]:
    """Simulated step of a baseline's split, or None and why it cannot run.

    One stage per run of equal devices. A pipeline (`sequential` False) goes forward
    through the devices, so a device may hold one run only. A sequential map (Accelerate)
    runs one microbatch at a time through every run, forward then backward, and may come
    back to a device (its hooks move the data); it accumulates gradients over ``m``
    microbatches of ``batch / m`` samples where that fits: ``m`` times the step of one,
    the optimizer stepping after the last only.
    """
    runs = _runs(assignment)
    devices = [d for d, _, _ in runs]
    groups = tuple(Group((d,)) for d in devices)
    ranges = tuple((i, e) for _, i, e in runs)
    layout = "one group" if len(groups) == 1 else "one device per stage"
    if sequential:
        return _sequential(tables, groups, ranges, layout)
    if len(set(devices)) < len(devices):
        return None, "a device holds two separate runs of layers: not a pipeline"
    counts = microbatch_counts(tables.batch, [1], tables.options)
    configs = [Configuration(groups=groups, layout=layout, microbatches=m, schedule=s)
               for m in counts for s in _PIPELINE_SCHEDULES]
    step = tables.best(configs, ranges)
    if math.isinf(step):
        return None, "a stage does not fit its device, even recomputing activations"
    return step, ""


def _sequential(
    tables: TrainingTables, groups: tuple[Group, ...], ranges: tuple[tuple[int, int], ...], layout: str
) -> tuple[float | None, str]:
    """The least step of one-microbatch-at-a-time runs, over the accumulation counts that fit.

    With one microbatch nothing overlaps: GPipe's step is the sum of every stage's forward,
    backward and sends, ``m`` rounds of it, the optimizer step after the last only. Memory is
    checked per device (all its runs' peaks together, as a step holds every run's
    activations until its backward).
    """
    best = math.inf
    config = Configuration(groups=groups, layout=layout, microbatches=1, schedule=PipelineSchedule.GPIPE)
    for m in microbatch_counts(tables.batch, [1], tables.options):
        model = tables.model if m == 1 else StageModel(tables.costs, tables.cluster, tables.batch // m, tables.options)
        part = model.policy_partition(config, ranges, "baseline")
        if part is None:
            continue
        held: dict[int, int] = {}
        for stage in part.plan_stages:
            held[stage.devices[0]] = held.get(stage.devices[0], 0) + stage.peak_memory_bytes
        if any(need > model.capacity[d] for d, need in held.items()):
            continue
        rounds = gpipe_step_time([replace(s, optimizer_s=0) for s in part.stages], 1)  # the first m - 1
        best = min(best, (m - 1) * rounds + model.timed(part).step_time_s)
    if math.isinf(best):
        return None, "some device cannot hold its layers' training state and activations at any accumulation count, even recomputing activations"
    return best, ""


def price_data_parallel(tables: TrainingTables) -> tuple[float | None, str, bool]:
    """Simulated step of the whole model replicated on every device (DDP, gradient accumulation).

    Returns:
        The step (None when it cannot run), why not, and whether it applies at all (two
        or more devices and a batch that divides among them).
    """
    k = tables.cluster.num_devices
    counts = microbatch_counts(tables.batch, [k], tables.options)
    if k < 2 or not counts:
        return None, f"needs two or more devices and a batch that divides among them ({tables.batch} on {k})", False
    group = (Group(tuple(range(k))),)
    configs = [Configuration(groups=group, layout="one group", microbatches=m, schedule=PipelineSchedule.GPIPE)
               for m in counts]
    step = tables.best(configs, ((0, tables.model.n),))
    if math.isinf(step):
        return None, "the whole model does not fit one device, even recomputing activations", True
    return step, "", True
