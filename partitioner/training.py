"""The front door for training plans: `plan_training` a model onto a cluster (pipeline x data parallel).

trace -> profile -> layers (`partitioner.api.compile_plan`) -> training cost tables
(`partitioner.training_costs.training_costs`) -> stages, replicas, microbatches and schedule
(`partitioner.pipeline_plan.plan_pipeline`, judged by `partitioner.simulate`) -> `Plan`
with a `PipelinePlan` section. See docs/training.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from typing_extensions import Unpack

from torch import nn

from partitioner.analysis import Analysis, AnalysisArgs, analyze, check_analysis_args
from partitioner.assemble import annotate_plan
from partitioner.cluster import Cluster, resolve_cluster
from partitioner.cost_model import layer_time_source
from partitioner.training_costs import TrainingCosts, resolve_precision, training_costs, training_state_bytes
from partitioner.errors import DeviceError
from partitioner.ir import OUTPUT, TIME_SOURCES, LayerGraph
from partitioner.options import Objective, PlanOptions, Strategy, TrainingOptions
from partitioner.pipeline_plan import PipelineResult, microbatch_sizes, plan_pipeline
from partitioner.plan import Plan, PlanDevice, PlanLayer, PlanTransfer, SolverInfo
from partitioner.simulate import EventKind, Timeline

__all__ = [
    "TrainingArgs",
    "TrainingCompiled",
    "compile_training",
    "plan_training",
    "replan_training",
    "make_training_plan",
]


class TrainingArgs(AnalysisArgs, total=False):
    """The keyword arguments `plan_training` passes to `compile_training`."""

    global_batch: int | None
    options: TrainingOptions | None


@dataclass(frozen=True, slots=True)
class TrainingCompiled:
    """Everything a training planning run produced."""

    plan: Plan
    result: PipelineResult
    """The planner's answer: the chosen split and its simulated `Timeline`."""
    cluster: Cluster
    graph: LayerGraph
    costs: TrainingCosts
    timings_s: Mapping[str, float]
    """Seconds spent tracing, profiling, tabulating and planning."""
    analysis: Analysis | None = None
    """The traced and profiled model the plan was made from (`replan_training` reuses it)."""
    element_size: int = 4
    """Bytes per element of the model's floating parameters."""

    @property
    def timeline(self) -> Timeline:
        """The chosen plan's step, event by event (draw it with `partitioner.simulate.render_timeline`)."""
        return self.result.timeline


def compile_training(
    model: nn.Module,
    devices: Cluster | str | Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    global_batch: int | None = None,
    options: TrainingOptions | None = None,
    **kw: Unpack[AnalysisArgs],
) -> TrainingCompiled:
    """Trace, profile and plan a training step; see `plan_training` for the arguments."""
    check_analysis_args(kw)
    options = options or TrainingOptions()
    say = kw.get("progress") or (lambda _: None)
    cluster = resolve_cluster(devices, kw.pop("max_memory", None))
    # One device per kind: present ones are timed there (a layer's time is keyed by profile).
    by_kind: dict[str, str] = {}
    for d in cluster.devices:
        if d.present or d.profile.name not in by_kind:
            by_kind.setdefault(d.profile.name, d.name if d.present else d.profile.name)
    representatives = list(by_kind.values())
    compiled = analyze(
        model,
        representatives,
        example_inputs,
        example_kwargs,
        options=PlanOptions(training=True, allow_data_parallel=False, memory_reserve=0.0),
        **kw,
    )
    timings = dict(compiled.timings_s)
    graph = compiled.layered.graph
    batch = global_batch or options.global_batch or graph.batch_size
    start = time.perf_counter()
    profiles = list({d.profile.name: d.profile for d in cluster.devices}.values())
    precision = resolve_precision(options.precision, profiles)
    element_size = _element_size(model)
    gm = compiled.layered.traced.gm
    parameters = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    costs = training_costs(
        graph,
        profiles,
        microbatch_sizes(cluster, batch, options),
        precision=precision,
        optimizer=options.optimizer,
        element_size=element_size,
        parameter_values=parameters,
    )
    timings["tables_s"] = time.perf_counter() - start
    start = time.perf_counter()
    say(f"planning {len(graph.layers)} layers on {cluster}")
    result = plan_pipeline(costs, cluster, batch, options, say)
    timings["solve_s"] = time.perf_counter() - start
    plan = _assemble(compiled, cluster, costs, result, element_size, options)
    return TrainingCompiled(plan, result, cluster, graph, costs, timings, compiled, element_size)


def _assemble(
    analysis: Analysis, cluster: Cluster, costs: TrainingCosts, result: PipelineResult, element_size: int,
    options: TrainingOptions,
) -> Plan:
    gm = analysis.layered.traced.gm
    parameters = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    plan = make_training_plan(analysis.layered.graph, cluster, costs, result, granularity=analysis.granularity,
                              element_size=element_size, parameter_values=parameters,
                              memory_reserve=options.memory_reserve)
    return annotate_plan(plan, analysis.layered)


def replan_training(
    compiled: TrainingCompiled,
    cluster: Cluster,
    options: TrainingOptions | None = None,
    *,
    global_batch: int | None = None,
) -> TrainingCompiled:
    """Plan the same model again on `cluster` with `options`, from the layers and cost tables
    `compile_training` made (nothing is traced or timed again).

    For what-ifs on the same device kinds: other links (a measured cluster profile),
    other capacities, another search space. Layer times are those of ``compiled``, so two
    plans compare on the same measurements.

    Args:
        compiled: What `compile_training` returned.
        cluster: Devices of the kinds ``compiled`` planned for (layer times are keyed by kind).
        options: The search space (default: `TrainingOptions()`); its microbatch sizes must
            be among those ``compiled`` tabulated.
        global_batch: Samples per step (default: the batch ``compiled`` planned).

    Raises:
        DeviceError: `cluster` holds a device kind that ``compiled`` has no times for, or
            `options` needs a microbatch size it did not tabulate.
        InfeasibleError: No configuration fits memory.
    """
    if compiled.analysis is None:
        raise DeviceError("replan_training needs what compile_training returned (its analysis is missing)")
    options = options or TrainingOptions()
    batch = global_batch or compiled.plan.batch_size
    have = {(t.kind, t.samples) for t in compiled.costs.times}
    need = {(k, b) for k in cluster.kinds for b in microbatch_sizes(cluster, batch, options)}
    missing = sorted(need - have)
    if missing:
        kind, samples = missing[0]
        raise DeviceError(
            f"replan_training: no layer times for {kind} at {samples} samples per microbatch "
            f"({len(missing)} table(s) missing); compile_training on these device kinds with a search space "
            f"that covers this one (options' microbatch range and batch {batch})"
        )
    start = time.perf_counter()
    result = plan_pipeline(compiled.costs, cluster, batch, options)
    timings = dict(compiled.timings_s, solve_s=time.perf_counter() - start)
    plan = _assemble(compiled.analysis, cluster, compiled.costs, result, compiled.element_size, options)
    return TrainingCompiled(plan, result, cluster, compiled.graph, compiled.costs, timings, compiled.analysis,
                            compiled.element_size)


def plan_training(
    model: nn.Module,
    devices: Cluster | str | Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    **kw: Unpack[TrainingArgs],
) -> Plan:
    """Plan a training step of `model` on a cluster: pipeline stages, replicas, microbatches, schedule.

    The example inputs fix the shapes of one sample (their batch may be 1); the step
    trains on ``global_batch`` samples. Nothing runs on the devices: absent hardware named
    by a profile or a cluster profile is estimated by the roofline.

    Example:
        >>> import partitioner
        >>> from partitioner.models import build_model
        >>> from partitioner.training import plan_training
        >>> built = build_model("gpt2", batch_size=1)
        >>> plan = plan_training(built.model, "dgx-a100-8", built.example_args, built.example_kwargs,
        ...                      global_batch=64, split_modules=built.no_split_module_classes)
        >>> plan.pipeline.step_time_s == plan.simulate_pipeline().step_time_s
        True

    Args:
        model: The model (not modified).
        devices: A `Cluster`, a cluster profile's name (``"h100-8x8-ib"``, see
            `partitioner.cluster.available_clusters`), or device strings
            (``["a100-80gb x4"]``: one node, links from the device profiles).
        example_inputs: Positional example inputs.
        example_kwargs: Keyword example inputs.
        **kw: ``global_batch`` (samples per step; default `TrainingOptions.global_batch`,
            else the example batch), ``options`` (`TrainingOptions`), ``max_memory``
            (caps for device strings), and tracing arguments as for `partitioner.plan`
            (`TrainingArgs`): ``trace`` or ``frontend``, ``granularity``,
            ``split_modules``; ``measure``, ``measure_budget_s``, ``progress``.

    Returns:
        The plan; ``plan.pipeline`` holds the stages, schedule, runner-ups and throughput.

    Raises:
        InfeasibleError: No configuration fits memory.
        DeviceError: Unknown devices or cluster.
    """
    return compile_training(model, devices, example_inputs, example_kwargs, **kw).plan


def _element_size(model: nn.Module) -> int:
    """Bytes per element of the model's floating parameters (4 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return int(p.element_size())
    return 4


def make_training_plan(
    graph: LayerGraph,
    cluster: Cluster,
    costs: TrainingCosts,
    result: PipelineResult,
    *,
    granularity: str,
    element_size: int,
    parameter_values: set[str] | frozenset[str] = frozenset(),
    memory_reserve: float = 0.1,
) -> Plan:
    """The `Plan` of a pipeline result: per-device figures from the simulated timeline.

    Each layer's device is its stage's first replica; a device's memory is its rank's
    simulated peak, its compute the rank's busy seconds, its transfers the rank's sends
    and receives (all per step).
    """
    pipeline = result.pipeline
    timeline = result.timeline
    m = pipeline.microbatches
    rank_of = {d: s.rank for s in pipeline.stages for d in s.devices}
    weights_on: dict[int, int] = {}
    for s in pipeline.stages:
        for d in s.devices:
            weights_on[d] = weights_on.get(d, 0) + s.weight_bytes
    devices = []
    for k, dev in enumerate(cluster.devices):
        rank = timeline.ranks[rank_of[k]] if k in rank_of else None
        sends = sum(e.duration_s for e in rank.of_kind(EventKind.SEND)) if rank else 0.0
        recvs = sum(e.duration_s for e in rank.of_kind(EventKind.RECV)) if rank else 0.0
        devices.append(
            PlanDevice(
                name=dev.name,
                profile=dev.profile.name,
                kind=dev.profile.kind,
                torch_device=dev.torch_device,
                capacity_bytes=int(dev.memory_bytes * (1 - memory_reserve)),
                memory_bytes=rank.peak_memory_bytes if rank else 0,
                param_bytes=weights_on.get(k, 0),
                compute_s=rank.busy_s if rank else 0.0,
                transfer_in_s=recvs,
                transfer_out_s=sends,
            )
        )
    stage_of = [s for s in pipeline.stages for _ in range(s.first_layer, s.last_layer + 1)]
    used = {d for s in pipeline.stages for d in s.devices}
    layers = []
    for i, layer in enumerate(graph.layers):
        s = stage_of[i]
        kinds = s.profile.split("+")
        seconds = cluster.group_slowdown(used, s.devices) * max(
            costs.times_for(k, s.samples).fwd_s[i] + costs.times_for(k, s.samples).bwd_s[i] for k in kinds
        )
        c = costs.layers[i]
        state = training_state_bytes(c.params, costs.precision, costs.optimizer).total + c.buffer_bytes
        kept = 1 if s.recompute else s.inflight_microbatches  # a recomputing stage rebuilds one microbatch
        layers.append(
            PlanLayer(
                name=layer.name,
                modules=layer.modules,
                params=layer.params,
                device=s.devices[0],
                compute_s=m * seconds,
                memory_bytes=state + kept * s.samples * c.activation_bytes,
                time_source=max(
                    (layer_time_source(layer, cluster.devices[d].profile, True) for d in s.devices),
                    key=TIME_SOURCES.index,
                ),
            )
        )
    scale = costs.precision.element_bytes / element_size
    transfers = []
    for v in graph.values:
        readers = [c for c in v.consumers if c != OUTPUT]
        if v.producer < 0 or not readers or v.name in parameter_values:
            continue
        src = stage_of[v.producer]
        for dst in dict.fromkeys(stage_of[c].index for c in readers if stage_of[c].index != src.index):
            # The value passes every stage in between: each boundary moves it once per microbatch.
            for j in range(src.index, dst):
                a, b = pipeline.stages[j], pipeline.stages[j + 1]
                nbytes = math.ceil(v.bytes * scale / graph.batch_size) * a.samples
                transfers.append(
                    PlanTransfer(
                        value=v.name,
                        src=a.devices[0],
                        dst=b.devices[0],
                        bytes=nbytes,
                        seconds=cluster.transfer_s(nbytes, a.devices[0], b.devices[0]),
                    )
                )
    transfers = list({(t.value, t.src, t.dst): t for t in transfers}.values())
    single = len(pipeline.stages) == 1
    strategy = (
        (Strategy.SINGLE if len(pipeline.stages[0].devices) == 1 else Strategy.DATA_PARALLEL)
        if single
        else Strategy.MODEL_PARALLEL
    )
    return Plan(
        model_name=graph.model_name,
        fingerprint=graph.fingerprint,
        frontend=graph.frontend,
        granularity=granularity,
        strategy=strategy,
        objective=Objective.THROUGHPUT,
        training=True,
        batch_size=pipeline.global_batch,
        devices=tuple(devices),
        layers=tuple(layers),
        transfers=tuple(transfers),
        output_device=pipeline.stages[-1].devices[0],
        predicted_s=pipeline.step_time_s,
        bound_s=pipeline.bound_s,
        solver=SolverInfo(method="pipeline-dp", optimal=True, gap=0.0),
        pipeline=pipeline,
    )
