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
- an Accelerate device map: one microbatch, the devices one after another (forward
  through them, backward back): GPipe with one microbatch;
- data parallelism: one stage replicated on every device (DDP), the best microbatch count
  (gradient accumulation).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

from partitioner.cluster import Cluster
from partitioner.cost_model import training_costs
from partitioner.devices import Device
from partitioner.errors import InfeasibleError
from partitioner.layers import LayeredModel
from partitioner.options import Optimizer, Precision, TrainingOptions
from partitioner.pipeline_plan import plan_pipeline
from partitioner.pipeline_plan.space import Configuration, Group, microbatch_counts, microbatch_sizes
from partitioner.pipeline_plan.stages import StageModel
from partitioner.simulate import PipelineSchedule

__all__ = ["TrainingTables", "training_tables", "planner_record", "price_split", "price_data_parallel"]

_STRATEGY = {"single device": "single", "pipeline": "model_parallel", "hybrid": "hybrid",
             "data parallel": "data_parallel"}
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
    assignment = [0] * tables.model.n
    for stage in pipeline.stages:
        assignment[stage.first_layer : stage.last_layer + 1] = [stage.devices[0]] * (stage.last_layer + 1 - stage.first_layer)
    return {
        "status": "ok",
        "strategy": _STRATEGY[pipeline.family],
        "solver": pipeline.description,
        "optimal": False,
        "gap": max(0.0, 1 - pipeline.lower_bound_s / pipeline.step_time_s) if pipeline.step_time_s > 0 else 0.0,
        "lower_bound_s": pipeline.lower_bound_s,
        "solve_s": result.solve_time_s,
        "step_s": pipeline.step_time_s,
        "evaluate_agrees": math.isclose(result.timeline.step_time_s, pipeline.step_time_s, rel_tol=1e-9),
        "assignment": assignment,
    }


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

    One stage per run of equal devices; a device may hold one run only (a pipeline's stages
    go forward through the devices).
    """
    runs = _runs(assignment)
    devices = [d for d, _, _ in runs]
    if len(set(devices)) < len(devices):
        return None, "a device holds two separate runs of layers: not a pipeline"
    groups = tuple(Group((d,)) for d in devices)
    ranges = tuple((i, e) for _, i, e in runs)
    layout = "one group" if len(groups) == 1 else "one device per stage"
    if sequential:
        configs = [Configuration(groups=groups, layout=layout, microbatches=1, schedule=PipelineSchedule.GPIPE)]
    else:
        counts = microbatch_counts(tables.batch, [1], tables.options)
        configs = [Configuration(groups=groups, layout=layout, microbatches=m, schedule=s)
                   for m in counts for s in _PIPELINE_SCHEDULES]
    step = tables.best(configs, ranges)
    if math.isinf(step):
        return None, "a stage does not fit its device, even recomputing activations"
    return step, ""


def price_data_parallel(tables: TrainingTables) -> tuple[float | None, str]:
    """Simulated step of the whole model replicated on every device (DDP, gradient accumulation)."""
    k = tables.cluster.num_devices
    counts = microbatch_counts(tables.batch, [k], tables.options)
    if k < 2 or not counts:
        return None, f"needs two or more devices and a batch that divides among them ({tables.batch} on {k})"
    group = (Group(tuple(range(k))),)
    configs = [Configuration(groups=group, layout="one group", microbatches=m, schedule=PipelineSchedule.GPIPE)
               for m in counts]
    step = tables.best(configs, ((0, tables.model.n),))
    if math.isinf(step):
        return None, "the whole model does not fit one device, even recomputing activations"
    return step, ""
