"""The front door: `plan` a model onto devices, or `auto_parallelize` it (plan, then rewrite).

trace -> profile -> layers -> cost model -> solve -> plan -> rewrite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from partitioner.cost_model import build_problem
from partitioner.device_resolution import resolve_devices
from partitioner.devices import Device
from partitioner.errors import DeviceError, PartitionerError, PlanMismatchError, ProfileError
from partitioner.ir import Problem, Solution
from partitioner.assemble import annotate_plan, make_plan
from partitioner.layers import LayeredModel, build_layers
from partitioner.measure import measure_layers
from partitioner.options import PlanOptions, Strategy, check_split_modules
from partitioner.plan import Plan
from partitioner.profiling import profile_nodes
from partitioner.progress import Progress, listening, reporting
from partitioner.replicate import Replicated, replication_hazards
from partitioner.rewrite import (
    InsertedTransfer,
    gather_graph,
    mode_constants,
    node_devices,
    place_tensors,
    rewrite_graph,
    tensor_devices,
)
from partitioner.simdevice import SimulatedDevices
from partitioner.solve import solve
from partitioner.trace import Frontend, Granularity, trace_model

__all__ = [
    "analyze",
    "Analysis",
    "solve_analysis",
    "plan",
    "auto_parallelize",
    "PartitionedModule",
    "Compiled",
    "compile_plan",
    "trace_layers",
    "make_plan",
    "annotate_plan",
    "dtype_of",
    "replication_hazards",
]


@dataclass(frozen=True, slots=True)
class Compiled:
    """Everything one planning run produced (for tools that want more than the plan)."""

    layered: LayeredModel
    devices: tuple[Device, ...]
    problem: Problem
    solution: Solution
    plan: Plan
    timings_s: Mapping[str, float]
    """Seconds spent tracing, profiling and solving."""


@dataclass(frozen=True, slots=True)
class Analysis:
    """The model, traced, profiled and timed for a set of devices: what every planner solves on."""

    layered: LayeredModel
    devices: tuple[Device, ...]
    options: PlanOptions
    """The options asked for, with data parallelism off where replicas would compute something else."""
    dtype: str
    """The roofline dtype of the model's parameters (`dtype_of`)."""
    granularity: Granularity
    """The layer granularity it was traced at (the plan records it)."""
    timings_s: dict[str, float]
    """Seconds spent tracing (``trace_s``) and profiling and timing (``profile_s``)."""


def analyze(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
    max_memory: Mapping[str | int, int | str] | None = None,
    frontend: Frontend = "auto",
    granularity: Granularity = "block",
    split_modules: Sequence[str] = (),
    no_split_module_classes: Sequence[str] = (),
    measure: bool = True,
    measure_budget_s: float = 10.0,
    progress: Progress | None = None,
) -> Analysis:
    """Resolve `devices`, trace and profile `model`, and time its layers on the present
    devices: the half of planning before any solver, which `compile_plan`, training plans
    and checking a saved plan share. See `plan` for the arguments."""
    model = _as_model(model)
    options = options or PlanOptions()
    say = progress or (lambda _: None)
    hazards = replication_hazards(model)
    if options.allow_data_parallel and hazards:
        say(f"not considering data parallelism: {hazards[0]}")
        options = dataclasses.replace(options, allow_data_parallel=False)
    if isinstance(devices, str):
        devices = [devices]
    resolved = resolve_devices(list(devices), max_memory)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    layered, timings = trace_layers(
        model, args, kwargs, training=options.training, frontend=frontend, granularity=granularity,
        split_modules=split_modules, no_split_module_classes=no_split_module_classes, progress=say,
    )
    if measure and any(d.present for d in resolved):
        start = time.perf_counter()
        say("timing layers on the devices present")
        timed = measure_layers(layered, args, kwargs, resolved, budget_s=measure_budget_s, progress=say)
        layered = dataclasses.replace(layered, graph=timed)
        timings["profile_s"] += time.perf_counter() - start
    return Analysis(layered, resolved, options, dtype_of(model), granularity, timings)


def compile_plan(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
    max_memory: Mapping[str | int, int | str] | None = None,
    frontend: Frontend = "auto",
    granularity: Granularity = "block",
    split_modules: Sequence[str] = (),
    no_split_module_classes: Sequence[str] = (),
    measure: bool = True,
    measure_budget_s: float = 10.0,
    progress: Progress | None = None,
) -> Compiled:
    """Analyse (`analyze`) and solve (`solve_analysis`); see `plan` for the arguments."""
    analysis = analyze(
        model, devices, example_inputs, example_kwargs, options=options, max_memory=max_memory, frontend=frontend,
        granularity=granularity, split_modules=split_modules, no_split_module_classes=no_split_module_classes,
        measure=measure, measure_budget_s=measure_budget_s, progress=progress,
    )
    return solve_analysis(analysis, progress)


def solve_analysis(analysis: Analysis, progress: Progress | None = None) -> Compiled:
    """Price `analysis`'s layers on its devices, solve, and assemble the plan."""
    say = progress or (lambda _: None)
    start = time.perf_counter()
    graph, resolved, options = analysis.layered.graph, analysis.devices, analysis.options
    say(f"solving: {len(graph.layers)} layers on {len(resolved)} device(s)")
    problem = build_problem(graph, resolved, options, analysis.dtype)
    # The solver's progress (incumbent, bound, gap) goes where the caller's progress goes.
    with reporting(say) if progress is not None and not listening() else contextlib.nullcontext():
        solution = solve(problem, options.solver)
    timings = {**analysis.timings_s, "solve_s": time.perf_counter() - start}
    result = annotate_plan(
        make_plan(graph, resolved, problem, solution, options, analysis.granularity), analysis.layered, problem
    )
    return Compiled(analysis.layered, resolved, problem, solution, result, timings)


def trace_layers(
    model: nn.Module,
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    training: bool = False,
    frontend: Frontend = "auto",
    granularity: Granularity = "block",
    split_modules: Sequence[str] = (),
    no_split_module_classes: Sequence[str] = (),
    progress: Progress | None = None,
) -> tuple[LayeredModel, dict[str, float]]:
    """Trace `model`, profile every graph node on fake tensors and group the nodes into layers.

    The first half of `compile_plan`, device-independent (nothing runs on a device, nothing
    is allocated for a model on ``meta``): one call serves any number of device sets and
    objectives through `partitioner.cost_model.build_problem`. A torch.fx graph that does
    not replay under profiling is traced again with torch.export (``frontend="auto"``).

    Args:
        model: The model (not modified); a `PartitionedModule` is traced as what it computes.
        example_inputs: Positional example inputs.
        example_kwargs: Keyword example inputs.
        training: Profile forward and backward (else forward only).
        frontend, granularity, split_modules, no_split_module_classes, progress: As for `plan`.

    Returns:
        The layered model, and seconds spent tracing (``trace_s``) and profiling (``profile_s``).

    Raises:
        TraceError: Neither frontend traces the model.
        ProfileError: The graph does not run on fake tensors.
    """
    model = _as_model(model)
    say = progress or (lambda _: None)
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    start = time.perf_counter()
    classes = {f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()}
    split_modules = check_split_modules(
        split_modules, classes, type(model).__name__, no_split_module_classes=no_split_module_classes
    )
    say(f"tracing {type(model).__name__}")
    traced = trace_model(model, args, kwargs, frontend=frontend, granularity=granularity, split_modules=split_modules)
    timings = {"trace_s": time.perf_counter() - start}
    start = time.perf_counter()
    say(f"profiling {sum(1 for _ in traced.gm.graph.nodes)} graph nodes on fake tensors")
    try:
        stats = profile_nodes(traced.gm, args, kwargs, training=training)
    except ProfileError:
        if frontend != "auto" or traced.frontend != "fx":
            raise
        say("torch.fx graph did not replay; tracing again with torch.export")
        traced = trace_model(model, args, kwargs, frontend="export", granularity=granularity, split_modules=split_modules)
        stats = profile_nodes(traced.gm, args, kwargs, training=training)
    layered = build_layers(traced, stats, batch_size=_batch_size(args, kwargs))
    timings["profile_s"] = time.perf_counter() - start
    return layered, timings


def plan(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    **kw: Any,
) -> Plan:
    """Plan `model` onto `devices` without running anything on them.

    Works for absent hardware named by a profile (``"a100-80gb x4"``) and for models
    built on ``meta`` (nothing is allocated).

    Args:
        model: The model (not modified).
        devices: Device strings (``cpu``, ``cuda:1``, ``cpu:0`` simulated, profile names).
        example_inputs: Positional example inputs (their shapes are planned for).
        example_kwargs: Keyword example inputs.
        **kw: ``options`` (`PlanOptions`), ``max_memory`` (Accelerate-style caps),
            ``frontend`` (``auto``, ``fx``, ``export``), ``granularity`` (``block``,
            ``leaf``), ``split_modules`` (class names kept whole, one layer each; also
            spelt ``no_split_module_classes``, as in Accelerate),
            ``measure`` (time each layer on the present devices, default True; models on
            ``meta`` are never timed; timings vary from run to run, so pass False for
            reproducible plans), ``measure_budget_s``, ``progress`` (a callable taking a
            status line).

    Returns:
        The plan.

    The model is left as it was, also when its forward changes it (a counter, a buffer
    updated in place): tracing runs forward, and puts back whatever it changed.

    Thread safety: threads may plan at once (other models, or the same one). Tracing,
    profiling and timing hold a process-wide lock (`partitioner.trace.TRACE_LOCK`:
    torch.fx patches ``nn.Module`` for every thread while it traces, and torch.export
    keeps global tracing state), so those phases run one at a time; solving runs in
    parallel. Do not run a model eagerly in one thread while another plans with the
    torch.fx front end: fx's patch of ``nn.Module.__call__`` would see its calls.
    """
    return compile_plan(model, devices, example_inputs, example_kwargs, **kw).plan


class PartitionedModule(nn.Module):
    """The rewritten model: layers on their devices, transfers inserted.

    ``pm(*args, **kwargs)`` computes what the original computes. ``pm.plan`` is the plan,
    ``pm.transfers`` the transfers the rewrite inserted, and, on simulated devices,
    ``pm.simulator`` the `SimulatedDevices` mode whose log counts the bytes moved.

    It is an ordinary module: ``pm.module.state_dict()`` has the original model's keys,
    ``copy.deepcopy(pm)`` works, and ``pm.to(device)`` gathers every layer onto one
    device (the transfers then stay there; ``pm.plan`` still describes the plan it was
    made with). ``pm.train()`` and ``pm.eval()`` switch the mode where the graph can
    follow; where the trace fixed dropout or BatchNorm to the model's mode at planning
    time, switching raises `PartitionerError` (plan the model again in the other mode).
    A `PartitionedModule` can be planned again: `auto_parallelize` and `plan` take it as
    a model.
    """

    def __init__(
        self,
        module: nn.Module,
        plan: Plan,
        transfers: Sequence[InsertedTransfer],
        simulator: SimulatedDevices | None,
        training: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self.transfers = tuple(transfers)
        self.simulator = simulator
        # The mode the model was traced in; only the top-level flags are set, so each
        # submodule keeps the mode it had (a frozen BatchNorm stays in eval mode).
        self.training = module.training = training
        # (node name, mode) of the graph's nodes whose train/eval behaviour the trace fixed.
        self.fixed_modes = tuple(mode_constants(module)) if isinstance(module, fx.GraphModule) else ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.simulator is None or any(isinstance(m, SimulatedDevices) for m in _get_current_dispatch_mode_stack()):
            return self.module(*args, **kwargs)
        with self.simulator:
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> PartitionedModule:
        """Set the mode, as `nn.Module.train` does.

        Raises:
            PartitionerError: `mode` is not the planned one and the graph fixed some op to
                the planned mode (``aten.dropout(x, p, True)``); nothing is changed.
        """
        fixed = [name for name, m in self.fixed_modes if m != mode]
        if mode != self.training and fixed:
            raise PartitionerError(
                f"cannot switch to {'train' if mode else 'eval'} mode: the trace fixed {len(fixed)} op(s) to "
                f"{'eval' if mode else 'train'} mode (dropout, batch norm; first: node {fixed[0]!r}); "
                f"put the model in {'train' if mode else 'eval'} mode and plan it again"
            )
        return super().train(mode)

    def to(self, *args: Any, **kwargs: Any) -> PartitionedModule:
        """`nn.Module.to`; a device gathers every layer, and every transfer, onto it."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        super().to(*args, **kwargs)
        if device is not None:
            self._gather(device)
        return self

    def cpu(self) -> PartitionedModule:
        return self.to("cpu")

    def cuda(self, device: int | torch.device | None = None) -> PartitionedModule:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def _gather(self, device: torch.device) -> None:
        target = str(device)
        if isinstance(self.module, Replicated):
            self.module.devices, self.module.output_device = (target,), target
        elif isinstance(self.module, fx.GraphModule):
            gather_graph(self.module, target)
        if self.simulator is not None and not (device.type == "cpu" and device.index is not None):
            self.simulator = None  # nothing is simulated any more


def auto_parallelize(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    plan: Plan | None = None,
    output_device: str | None = None,
    inplace: bool = False,
    simulate: bool = False,
    **kw: Any,
) -> PartitionedModule:
    """Split `model` over `devices`: trace, profile, solve, and rewrite with transfers.

    Example:
        >>> import torch, partitioner
        >>> model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
        >>> x = torch.randn(8, 1024)
        >>> pm = partitioner.auto_parallelize(model, ["cpu:0", "cpu:1"], (x,), max_memory={"cpu:0": "3MB"})
        >>> torch.testing.assert_close(partitioner.to_plain(pm(x)), model(x))
        >>> pm.plan.strategy.value
        'model_parallel'

    Args:
        model: The model. It is not modified unless ``inplace=True``, which moves its own
            parameters to the planned devices (no copy).
        devices: As for `plan`; every device must be present (``cpu``, ``cuda:N``,
            simulated ``cpu:N``), unless ``simulate=True``.
        example_inputs: Positional example inputs.
        example_kwargs: Keyword example inputs.
        plan: A saved plan to apply instead of solving (its fingerprint must match).
        output_device: Where outputs are gathered (default: the last layer's device).
        inplace: Move the model's own tensors instead of copying them.
        simulate: Run on simulated CPU devices ``cpu:0..`` standing for the planned ones
            (dry-run a plan for absent GPUs on a laptop).
        **kw: Planning arguments, as for `plan`.

    Returns:
        A `PartitionedModule`.

    Raises:
        DeviceError: A device is absent and ``simulate`` is off.
        PlanMismatchError: ``plan`` was made for another model.

    Thread safety: as for `plan` (tracing, profiling and timing run one at a time across
    threads; the rest in parallel).
    """
    model = _as_model(model)
    if plan is not None:  # a saved plan: checked against the model's analysis, nothing solved or timed
        analysis = analyze(model, devices, example_inputs, example_kwargs, **{**kw, "measure": False})
        _check_applies(plan, analysis)
        layered, resolved, chosen = analysis.layered, analysis.devices, plan
    else:
        compiled = compile_plan(model, devices, example_inputs, example_kwargs, **kw)
        layered, resolved, chosen = compiled.layered, compiled.devices, compiled.plan
    hazards = replication_hazards(model)
    if chosen.strategy is Strategy.DATA_PARALLEL and hazards:
        raise PlanMismatchError(
            f"the plan replicates the model, but {hazards[0]}; "
            "put those modules in eval mode, or plan this model again (it will not replicate it)"
        )
    targets = _run_devices(resolved, simulate)
    out = targets[chosen.output_device] if output_device is None else output_device
    logical = all(t.startswith("cpu:") for t in targets)
    simulator = SimulatedDevices(1 + max(torch.device(t).index or 0 for t in targets)) if logical else None
    with simulator if simulator is not None else contextlib.nullcontext():
        if chosen.strategy is Strategy.DATA_PARALLEL:
            memo = place_tensors(model, {}, targets[0], inplace=inplace)
            replica_module = model if inplace else copy.deepcopy(model, memo)
            module: nn.Module = Replicated(replica_module, targets, out, layered.graph.batch_size)
            transfers: list[InsertedTransfer] = []
        else:
            device_of = tensor_devices(layered, chosen.assignment, targets)
            memo = place_tensors(model, device_of, targets[0], inplace=True) if inplace else {}
            memo = place_tensors(layered.traced.gm, device_of, targets[0], memo=memo)
            module, transfers = rewrite_graph(layered, node_devices(layered, chosen.assignment, targets), out, memo)
    if simulator is not None:
        simulator.reset()
    return PartitionedModule(module, chosen, transfers, simulator, training=model.training)


def _check_applies(plan: Plan, fresh: Analysis) -> None:
    """Raise unless `plan` was made for the model and devices `fresh` analysed."""
    graph = fresh.layered.graph
    if plan.fingerprint != graph.fingerprint:
        raise PlanMismatchError(
            f"the plan was made for {plan.model_name} (fingerprint {plan.fingerprint}) but this model "
            f"traces to {graph.model_name} (fingerprint {graph.fingerprint}); plan this model again"
        )
    if len(plan.devices) != len(fresh.devices):
        raise PlanMismatchError(
            f"the plan places layers on {len(plan.devices)} device(s) ({', '.join(d.name for d in plan.devices)}) "
            f"but {len(fresh.devices)} were given ({', '.join(d.name for d in fresh.devices)}); "
            "give as many devices as the plan has, or plan again"
        )
    names, expected = [layer.name for layer in plan.layers], [layer.name for layer in graph.layers]
    if names != expected:
        raise PlanMismatchError(
            f"the plan has {len(names)} layers but this model has {len(expected)} "
            f"(first difference: {next((a, b) for a, b in zip([*names, None], [*expected, None]) if a != b)}); "
            "the plan was edited or made with other granularity; plan this model again"
        )


def _as_model(model: nn.Module) -> nn.Module:
    """`model`, or for a `PartitionedModule` a copy of what it computes as one plain module on
    the host (no transfers, plain CPU tensors), to be traced and planned again. The
    `PartitionedModule` itself is left as it is."""
    if not isinstance(model, PartitionedModule):
        return model
    inner = model.module.module if isinstance(model.module, Replicated) else model.module
    plain = copy.deepcopy(inner, place_tensors(inner, {}, "cpu"))
    if isinstance(plain, fx.GraphModule):
        gather_graph(plain, "cpu", drop_transfers=True)
        plain.__class__.__name__ = model.plan.model_name  # GraphModule gives each instance its own class
    plain.training = model.training
    return plain


def _run_devices(devices: Sequence[Device], simulate: bool) -> list[str]:
    if simulate:
        return [f"cpu:{k}" for k in range(len(devices))]
    absent = [d.name for d in devices if d.torch_device is None]
    if absent:
        raise DeviceError(
            f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not present here, so the plan cannot run; "
            "use partitioner.plan() to plan only, or simulate=True to dry-run on simulated CPU devices"
        )
    targets = [str(d.torch_device) for d in devices]
    for t in targets:
        try:
            ok = str(torch.device(t)) == t
        except RuntimeError:
            ok = False
        if not ok:  # torch keeps a device index in 8 bits: "cpu:200" becomes "cpu:-56", "cpu:255" the host
            raise DeviceError(f"torch cannot address device {t!r} (indices go up to 127); number the devices from 0")
    return targets


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    for x in tree_leaves((args, dict(kwargs))):
        if isinstance(x, torch.Tensor) and x.ndim:
            return int(x.shape[0])
    return 1


def dtype_of(model: nn.Module) -> str:
    """The roofline dtype of `model`: that of its first floating parameter (``float32``,
    ``bfloat16`` or ``float16``; ``float32`` for any other or none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(p.dtype, "float32")
    return "float32"
