"""The half of planning before any solver: resolve devices, trace, profile, time the layers.

`analyze` is the one path from a model to what every planner solves on: `compile_plan`,
the training planner and checking a saved plan call it; `partitioner.distributed` calls
its device-independent half, `trace_layers`, to rebuild a plan's layers on each process.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from typing_extensions import Unpack

from partitioner.device_resolution import MaxMemory, resolve_devices
from partitioner.devices import Device
from partitioner.dtypes import dtype_of
from partitioner.errors import PlanMismatchError, ProfileError
from partitioner.layers import LayeredModel, build_layers, refine_layers
from partitioner.measure import measure_layers
from partitioner.options import (
    Frontend,
    Granularity,
    PlanOptions,
    SplitLayer,
    TraceOptions,
    check_split_modules,
    trace_options,
)
from partitioner.partitioned import plain_model
from partitioner.plan import Plan
from partitioner.profiling import profile_nodes
from partitioner.progress import Progress
from partitioner.replicate import replication_hazards
from partitioner.split_layers import split_graph
from partitioner.trace import trace_model

__all__ = [
    "AnalysisArgs",
    "Analysis",
    "analyze",
    "check_analysis_args",
    "trace_layers",
    "refine_analysis",
    "plan_trace",
    "check_plan_applies",
    "devices_for_plan",
    "example_batch_size",
]


class AnalysisArgs(TypedDict, total=False):
    """The keyword arguments every front door takes for its analysis (see `partitioner.plan`)."""

    trace: TraceOptions | None
    max_memory: MaxMemory | None
    frontend: Frontend | str | None
    granularity: Granularity | str | None
    split_modules: str | type | Iterable[str | type]
    no_split_module_classes: str | type | Iterable[str | type]
    measure: bool
    measure_budget_s: float
    progress: Progress | None


@dataclass(frozen=True, slots=True)
class Analysis:
    """The model, traced, profiled and timed for a set of devices: what every planner solves on."""

    layered: LayeredModel
    devices: tuple[Device, ...]
    options: PlanOptions
    """The options asked for, with data parallelism off where replicas would compute something else."""
    dtype: str
    """The roofline dtype of the model's parameters (`partitioner.dtypes.dtype_of`)."""
    trace: TraceOptions
    """How it was traced (the plan records the granularity)."""
    timings_s: dict[str, float]
    """Seconds spent tracing (``trace_s``) and profiling and timing (``profile_s``)."""

    @property
    def granularity(self) -> str:
        """The layer granularity its layers are at: ``block``, ``leaf``, or ``auto`` where
        blocks were refined (`refined`); ``auto`` that refined nothing is ``block``."""
        if self.trace.granularity is Granularity.AUTO and not self.refined:
            return Granularity.BLOCK.value
        return self.trace.granularity.value

    @property
    def refined(self) -> tuple[str, ...]:
        """The modules split into their children (`TraceOptions.refine`), sorted."""
        return tuple(sorted(self.layered.traced.refined))

    @property
    def split(self) -> tuple[SplitLayer, ...]:
        """The linear layers cut into column pieces (`TraceOptions.split`)."""
        return self.layered.traced.split


def analyze(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
    **kw: Unpack[AnalysisArgs],
) -> Analysis:
    """Resolve `devices`, trace and profile `model`, and time its layers on the present devices.

    Args:
        model: The model (not modified); a `PartitionedModule` is analysed as what it computes.
        devices, example_inputs, example_kwargs: As for `partitioner.plan`.
        options: What is planned for (training profiles backward too).
        **kw: `AnalysisArgs`: ``trace`` (`TraceOptions`) or its fields ``frontend``,
            ``granularity``, ``split_modules`` / ``no_split_module_classes``;
            ``max_memory``, ``measure``, ``measure_budget_s``, ``progress``, as for
            `partitioner.plan`.

    Returns:
        The `Analysis`.

    Raises:
        TypeError: A keyword argument that is none of these.
        ValueError: A trace setting with no such value, or `trace` given with one of its fields.
        DeviceError, ProfileError: A device string or profile is wrong.
        TraceError: No front end traces the model.
    """
    check_analysis_args(kw)
    trace = trace_options(
        kw.get("trace"), frontend=kw.get("frontend"), granularity=kw.get("granularity"),
        split_modules=kw.get("split_modules", ()), no_split_module_classes=kw.get("no_split_module_classes", ()),
    )
    measure, measure_budget_s = kw.get("measure", True), kw.get("measure_budget_s", 10.0)
    progress, max_memory = kw.get("progress"), kw.get("max_memory")
    model = plain_model(model)
    options = options or PlanOptions()
    say = progress or (lambda _: None)
    hazards = replication_hazards(model)
    if options.allow_data_parallel and hazards:
        say(f"not considering data parallelism: {hazards[0]}")
        options = dataclasses.replace(options, allow_data_parallel=False)
    if isinstance(devices, str):
        devices = [devices]
    resolved = resolve_devices(list(devices), max_memory)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    layered, timings = trace_layers(model, args, kwargs, training=options.training, trace=trace, progress=say)
    if measure and any(d.present for d in resolved):
        start = time.perf_counter()
        say("timing layers on the devices present")
        timed = measure_layers(layered, args, kwargs, resolved, budget_s=measure_budget_s, progress=say)
        layered = dataclasses.replace(layered, graph=timed)
        timings["profile_s"] += time.perf_counter() - start
    return Analysis(layered, resolved, options, dtype_of(model), trace, timings)


def refine_analysis(
    analysis: Analysis,
    modules: Iterable[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    split: Iterable[SplitLayer] = (),
    measure: bool = True,
    measure_budget_s: float = 10.0,
    progress: Progress | None = None,
) -> Analysis:
    """`analysis` with `modules` split into their children (`refine_layers`) and the linear
    layers of `split` cut into column pieces (`partitioner.split_layers`): the same trace
    and profile regrouped (a cut changes the graph: it is profiled again on fake tensors),
    the new layers timed again where `analyze` timed them."""
    split = tuple(split)
    if not split:
        layered = refine_layers(analysis.layered, modules)
        return _retimed(analysis, layered, example_inputs, example_kwargs, measure, measure_budget_s, progress)
    traced = split_graph(analysis.layered.traced, split)
    traced = dataclasses.replace(traced, refined=traced.refined | frozenset(modules))
    start = time.perf_counter()
    args, kwargs = _inputs(example_inputs, example_kwargs)
    stats = profile_nodes(traced.gm, args, kwargs, training=analysis.options.training)
    layered = build_layers(traced, stats, batch_size=analysis.layered.graph.batch_size)
    timings = {**analysis.timings_s, "profile_s": analysis.timings_s.get("profile_s", 0.0) + time.perf_counter() - start}
    analysis = dataclasses.replace(analysis, timings_s=timings)
    return _retimed(analysis, layered, example_inputs, example_kwargs, measure, measure_budget_s, progress)


def _retimed(
    analysis: Analysis,
    layered: LayeredModel,
    example_inputs: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None,
    measure: bool,
    measure_budget_s: float,
    progress: Progress | None,
) -> Analysis:
    """`analysis` with its layers regrouped as `layered`: a layer of the same nodes as before
    keeps its measured times, the others are timed where `analyze` timed them."""
    timings = dict(analysis.timings_s)
    if measure and any(d.present for d in analysis.devices):
        start = time.perf_counter()
        args, kwargs = _inputs(example_inputs, example_kwargs)
        say = progress or (lambda _: None)
        # A layer of the same nodes as before keeps its times; only the new ones are timed.
        before = _layers_by_nodes(analysis.layered)
        kept = {i: before[nodes] for nodes, i in _layers_by_nodes(layered).items() if nodes in before}
        old = analysis.layered.graph.layers
        carried = (
            dataclasses.replace(l, fwd_time_s=old[kept[l.index]].fwd_time_s, bwd_time_s=old[kept[l.index]].bwd_time_s)
            if l.index in kept
            else l
            for l in layered.graph.layers
        )
        graph = dataclasses.replace(layered.graph, layers=tuple(carried))
        layered = dataclasses.replace(layered, graph=graph)
        new = [l.index for l in graph.layers if l.index not in kept]
        timed = measure_layers(
            layered, args, kwargs, analysis.devices, budget_s=measure_budget_s, progress=say, only=new
        )
        layered = dataclasses.replace(layered, graph=timed)
        timings["profile_s"] = timings.get("profile_s", 0.0) + time.perf_counter() - start
    return dataclasses.replace(analysis, layered=layered, timings_s=timings)


def _layers_by_nodes(layered: LayeredModel) -> dict[frozenset[str], int]:
    """Each layer's index, keyed by the graph nodes it is made of."""
    nodes: dict[int, set[str]] = {}
    for node, i in layered.node_layer.items():
        nodes.setdefault(i, set()).add(node)
    return {frozenset(members): i for i, members in nodes.items()}


def plan_trace(plan: Plan, kw: AnalysisArgs) -> AnalysisArgs:
    """`kw` with the granularity `plan` was made at (and the blocks it refined), unless `kw`
    names a granularity or `TraceOptions` itself: applying a plan groups layers as it did."""
    if kw.get("trace") is not None or kw.get("granularity") is not None:
        return kw
    granularity = Granularity(plan.granularity) if plan.granularity in {g.value for g in Granularity} else None
    if granularity is None:
        return kw
    trace = trace_options(
        frontend=kw.get("frontend"), granularity=granularity,
        split_modules=kw.get("split_modules", ()), no_split_module_classes=kw.get("no_split_module_classes", ()),
    )
    rest = {k: v for k, v in kw.items() if k not in ("frontend", "split_modules", "no_split_module_classes")}
    return {**rest, "trace": dataclasses.replace(trace, refine=plan.refined, split=plan.split)}  # type: ignore[typeddict-item]


def check_analysis_args(kw: Mapping[str, Any], more: Iterable[str] = ()) -> None:
    """Raise TypeError for a keyword that is not an `AnalysisArgs` field (nor one of `more`):
    ``**kw`` would otherwise take a misspelt ``granularty="leaf"`` and plan at block granularity."""
    known = {*AnalysisArgs.__annotations__, *more}
    for key in kw:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unexpected keyword argument {key!r}{hint} (planning takes {', '.join(sorted(known))})")


def trace_layers(
    model: nn.Module,
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    training: bool = False,
    trace: TraceOptions | None = None,
    progress: Progress | None = None,
) -> tuple[LayeredModel, dict[str, float]]:
    """Trace `model`, profile every graph node on fake tensors and group the nodes into layers.

    Device-independent (nothing runs on a device, nothing is allocated for a model on
    ``meta``): one call serves any number of device sets and objectives through
    `partitioner.cost_model.build_problem`. A torch.fx graph that does not replay under
    profiling is traced again with torch.export (``Frontend.AUTO``).

    Args:
        model: The model (not modified); a `PartitionedModule` is traced as what it computes.
        example_inputs: Positional example inputs.
        example_kwargs: Keyword example inputs.
        training: Profile forward and backward (else forward only).
        trace: How to trace (default `TraceOptions()`); its split modules are checked
            against the model's classes.
        progress: Called with a status line per phase.

    Returns:
        The layered model, and seconds spent tracing (``trace_s``) and profiling (``profile_s``).

    Raises:
        ValueError: A split module names a class the model lacks, or `trace.refine` a
            module it lacks.
        TraceError: Neither frontend traces the model.
        ProfileError: The graph does not run on fake tensors.
    """
    model = plain_model(model)
    trace = trace or TraceOptions()
    say = progress or (lambda _: None)
    args, kwargs = _inputs(example_inputs, example_kwargs)
    start = time.perf_counter()
    classes = {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}
    split_modules = check_split_modules(trace.split_modules, classes, type(model).__name__)
    refined = _refined(model, trace.refine)
    say(f"tracing {type(model).__name__}")
    traced = trace_model(
        model, args, kwargs, frontend=trace.frontend, granularity=trace.granularity, split_modules=split_modules
    )
    traced = split_graph(traced, trace.split)
    timings = {"trace_s": time.perf_counter() - start}
    start = time.perf_counter()
    say(f"profiling {sum(1 for _ in traced.gm.graph.nodes)} graph nodes on fake tensors")
    try:
        stats = profile_nodes(traced.gm, args, kwargs, training=training)
    except ProfileError:
        if trace.frontend is not Frontend.AUTO or traced.frontend != "fx":
            raise
        say("torch.fx graph did not replay; tracing again with torch.export")
        traced = trace_model(
            model, args, kwargs, frontend=Frontend.EXPORT, granularity=trace.granularity, split_modules=split_modules
        )
        traced = split_graph(traced, trace.split)
        stats = profile_nodes(traced.gm, args, kwargs, training=training)
    if refined:
        traced = dataclasses.replace(traced, refined=refined)
    layered = build_layers(traced, stats, batch_size=example_batch_size(args, kwargs))
    timings["profile_s"] = time.perf_counter() - start
    return layered, timings


def check_plan_applies(plan: Plan, layered: LayeredModel, devices: Sequence[Device] | None = None) -> None:
    """Raise unless `plan` was made for the model `layered` traces, and for as many devices.

    Raises:
        PlanMismatchError: Another fingerprint, another device count (when `devices` is
            given), or other layers (an edited plan, another granularity).
    """
    graph = layered.graph
    if plan.fingerprint != graph.fingerprint:
        raise PlanMismatchError(
            f"the plan was made for {plan.model_name} (fingerprint {plan.fingerprint}) but this model "
            f"traces to {graph.model_name} (fingerprint {graph.fingerprint}) on these example inputs; pass the "
            f"model and example inputs the plan was made with (and its split_modules; its granularity, "
            f"{_granularity(plan)}, is taken from the plan unless given), or plan this model again"
        )
    if devices is not None:
        devices_for_plan(plan, devices)
    names, expected = [layer.name for layer in plan.layers], [layer.name for layer in graph.layers]
    if names != expected:
        raise PlanMismatchError(
            f"the plan has {len(names)} layers but this model has {len(expected)} "
            f"(first difference: {next((a, b) for a, b in zip([*names, None], [*expected, None]) if a != b)}); "
            "the plan was edited or made with other granularity or split_modules; plan this model again"
        )


def devices_for_plan(plan: Plan, devices: Sequence[Device]) -> tuple[Device, ...]:
    """`devices` in the order of `plan.devices`: ``result[k]`` runs what the plan puts on its k-th.

    The solver chooses the order of the devices along the pipeline, so a plan's order need
    not be the order the devices are listed in now. Each plan device is matched with a given
    device of the same name (``cuda:1``, ``a100-80gb:2``); failing that, of the same profile
    (``a100-80gb``), in the order both list them; failing that (a plan made for other
    hardware), by position, as listed.

    Raises:
        PlanMismatchError: Not as many devices as the plan has.
    """
    if len(plan.devices) != len(devices):
        raise PlanMismatchError(
            f"the plan places layers on {len(plan.devices)} device(s) ({', '.join(d.name for d in plan.devices)}) "
            f"but {len(devices)} were given ({', '.join(d.name for d in devices)}); "
            "give as many devices as the plan has, or plan again"
        )
    for planned, given in (
        ([d.name for d in plan.devices], [d.name for d in devices]),
        ([d.profile for d in plan.devices], [d.profile.name for d in devices]),
    ):
        if sorted(planned) == sorted(given):
            waiting: dict[str, list[int]] = {}
            for k, key in enumerate(given):
                waiting.setdefault(key, []).append(k)
            return tuple(devices[waiting[key].pop(0)] for key in planned)
    return tuple(devices)


def _granularity(plan: Plan) -> str:
    refined = f" refining {len(plan.refined)} module(s)" if plan.refined else ""
    return f"{plan.granularity!r}{refined}"


def _refined(model: nn.Module, refine: Sequence[str]) -> frozenset[str]:
    """`refine` checked against `model`'s module paths."""
    paths = {name for name, _ in model.named_modules() if name}
    for path in refine:
        if path not in paths:
            close = difflib.get_close_matches(path, sorted(paths), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"TraceOptions.refine names {path!r}, but {type(model).__name__} has no such module{hint}")
    return frozenset(refine)


def example_batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The batch the example inputs carry: dimension 0 of their first tensor of rank >= 1 (else 1)."""
    for x in tree_leaves((args, dict(kwargs))):
        if isinstance(x, torch.Tensor) and x.ndim:
            return int(x.shape[0])
    return 1


def _inputs(example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return args, dict(example_kwargs or {})
