"""Measure each layer's forward and backward seconds on the present devices.

The roofline in `partitioner.cost_model` is a guess; a timing is not. `measure_layers`
runs every layer alone on each present device kind and records medians in
`Layer.fwd_time_s` / `Layer.bwd_time_s`, keyed by profile name, which `layer_time`
prefers to the roofline.

How a layer is run alone. The traced graph is split by layer with
`torch.fx.passes.split_module` (one submodule per layer; nodes no layer holds, such as
torch.export's ``_guards_fn``, go with the latest layer they read from, else the first).
One run of the split module on the example inputs (on the CPU, with autograd on) records
each submodule's real inputs; every output is detached at the layer boundary but keeps its
``requires_grad``, so a layer is later differentiated exactly with respect to what the
whole model would differentiate, and nothing else. Where the split is impossible
(split_module reports a cycle between partitions, or a grad or autocast region that would
need monotone labels) or the split graph does not run, every graph node is timed alone the
same way, its inputs recorded through an `fx.Interpreter`, and nodes are summed per layer;
that overstates layers made of many tiny ops by a few microseconds of Python a node.

What one timing is. Forward: a call under `torch.no_grad`. Backward: the call again with
autograd on, then, from every floating output that requires grad and with gradients of
ones, the gradients of every input and parameter that requires grad (`torch.autograd.grad`:
what a training step's backward computes after ``zero_grad(set_to_none=True)``, and
nothing lands in any ``.grad``). The layer's backward time is

    bwd = backward call + max(0, forward with autograd - forward without)

so that ``fwd + bwd`` is the cost of a training step's forward and backward, autograd's
bookkeeping included. A layer with no output that requires grad has ``bwd = 0``. A layer
faster than a millisecond is called several times back to back per timing (up to 64,
as many as the warm-up says fill a millisecond), so that reading the clock and
synchronising stay small beside it; such a layer then runs with its weights in cache,
where inside the whole model it might not.

Noise (see the field notes, "Timing on these machines"): one torch thread while measuring
(the caller's setting is restored), a warm-up round, then `repeats` rounds that visit every
layer once each (round-robin: a burst of host load spreads over all layers instead of
spoiling one), and the median per layer. A budget of seconds stops the rounds early; layers
then keep what was measured, and a layer never timed gets no entry (the cost model then
falls back to its estimate).

Nothing of the caller's is changed: the work runs on a host copy of the graph module whose
parameters share storage with the originals where they are on the host (read only:
gradients are returned, not stored, and the parameters a forward writes in place, found by
`profiling.written_parameters` on fake tensors, are copied) and whose buffers
and other tensors are copies (BatchNorm's running statistics advance there); the example
inputs are copied; the random number generators are restored afterwards.

On CUDA one layer at a time is copied to the device with its inputs, timed between
`torch.cuda.synchronize` calls, and freed, so the whole model need not fit; copies are kept
across rounds while they fill less than half of the memory free at the start. A layer that
does not fit alone, or fails there, is left to the estimate (the progress line says why).
Models on ``meta`` have no values to run: the graph is returned unchanged.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_leaves, tree_map

from partitioner.devices import Device
from partitioner.errors import ProfileError
from partitioner.ir import LayerGraph
from partitioner.layers import LayeredModel
from partitioner.profiling import _flat_inputs, written_parameters
from partitioner.progress import Progress
from partitioner.rewrite import place_tensors
from partitioner.trace import TRACE_LOCK

__all__ = ["measure_layers", "whole_step_time"]


_HOST = torch.device("cpu")

# Device copies of layers stay resident across rounds while they fill at most this share
# of the device memory free when measuring starts; the rest is left for activations.
_RESIDENT_SHARE = 0.5

# One timing of a fast layer repeats it back to back until it lasts about this long, so
# that reading the clock and synchronising (microseconds on a CPU, tens of them with
# CUDA) stay small beside it; at most _MAX_CALLS calls. Slower layers run once a visit.
_TIMING_S = 1e-3
_MAX_CALLS = 64


@dataclass(slots=True)
class _Unit:
    """One thing timed alone: a layer's split submodule, or (fallback) one graph node."""

    layer: int
    """Index of the layer whose time it adds to."""
    name: str
    """Graph node name, for error messages."""
    fn: Callable[..., Any]
    """The submodule, function or method caller."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    """Recorded inputs: tensors detached, floating ones requiring grad as in the whole model."""
    clone_inputs: bool = False
    """The call writes an input in place (an error on a leaf that requires grad): feed it clones."""
    differentiable: bool = False
    """Some output is a floating tensor that requires grad: there is a backward to time."""
    nbytes: int = 0
    """Bytes of its tensors (inputs, parameters, buffers) once copied to a device."""


@dataclass(slots=True)
class _Samples:
    """Seconds of each timed visit of one unit, one entry per round."""

    fwd: list[float] = field(default_factory=list)
    fwd_grad: list[float] = field(default_factory=list)
    bwd: list[float] = field(default_factory=list)


def measure_layers(
    layered: LayeredModel,
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None,
    devices: Sequence[Device],
    *,
    repeats: int = 5,
    budget_s: float = 10.0,
    progress: Progress | None = None,
) -> LayerGraph:
    """Time every layer of `layered` on each present kind of device among `devices`.

    Devices sharing a profile (``cpu``, ``cpu:0``, ``cpu:1``) are measured once, on the
    first of them; absent devices (profiles only) are skipped. The method is in the
    module docstring.

    Args:
        layered: The traced model and its layers (from `partitioner.layers.build_layers`).
        example_args: Positional example inputs, as traced.
        example_kwargs: Keyword example inputs, as traced.
        devices: The plan's devices.
        repeats: Timed rounds after the warm-up; each layer's median is kept.
        budget_s: Seconds the whole measurement may take (split evenly between device
            kinds); when spent, the rounds stop and the layers keep what was measured.
        progress: Called with a line per round.

    Returns:
        `layered.graph` with ``fwd_time_s[profile]`` and ``bwd_time_s[profile]`` set on
        every layer that was timed; the graph itself when nothing was (no present device,
        a model on ``meta``, a budget spent before the first round).

    Raises:
        ValueError: `repeats` < 1 or `budget_s` < 0.
        ProfileError: A layer failed when run on the example inputs (the message names
            its node).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    if budget_s < 0:
        raise ValueError(f"budget_s must be >= 0 seconds (got {budget_s})")
    say = progress or (lambda _: None)
    start = time.perf_counter()
    targets: dict[str, torch.device] = {}
    for d in devices:
        if d.present and d.torch_device is not None:
            targets.setdefault(d.profile.name, torch.device(d.torch_device))
    gm = layered.traced.gm
    kwargs = dict(example_kwargs or {})
    if not targets or _on_meta(gm, example_args, kwargs):
        return layered.graph

    cuda = sorted({t.index or 0 for t in targets.values() if t.type == "cuda"})
    measured: dict[str, dict[int, tuple[float, float]]] = {}
    written = written_parameters(gm, tuple(example_args), kwargs)
    # One measurement at a time: it sets torch's thread count and runs the model's modules.
    with TRACE_LOCK, _timing_settings(cuda):
        units = _capture_units(layered, _flat_inputs(gm, tuple(example_args), kwargs), written, say)
        for k, (profile, device) in enumerate(targets.items()):
            remaining = budget_s - (time.perf_counter() - start)
            deadline = time.perf_counter() + remaining / (len(targets) - k)
            samples = _time_rounds(
                units,
                device,
                copy_to_device=device.type != "cpu",
                repeats=repeats,
                deadline=deadline,
                say=say,
                label=f"measuring layers on {profile}",
            )
            measured[profile] = _layer_times(units, samples)
    if not any(measured.values()):
        return layered.graph

    layers = list(layered.graph.layers)
    for profile, times in measured.items():
        for i, (fwd, bwd) in times.items():
            layer = layers[i]
            layers[i] = replace(
                layer, fwd_time_s={**layer.fwd_time_s, profile: fwd}, bwd_time_s={**layer.bwd_time_s, profile: bwd}
            )
    return replace(layered.graph, layers=tuple(layers))


def whole_step_time(
    module: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    repeats: int = 5,
) -> tuple[float, float]:
    """Median seconds of a whole forward, and of a forward plus backward, of `module`.

    The counterpart of summing `measure_layers`' per-layer times, for checking the cost
    model: the same settings (one torch thread, a warm-up call, CUDA synchronised before
    and after each timing). The forward runs under `torch.no_grad`; the training step
    runs the forward with autograd and differentiates the floating outputs that require
    grad (gradients of ones) with respect to the parameters that require grad, with
    `torch.autograd.grad`, so no ``.grad`` is stored on the module. Buffers change as in
    any forward (BatchNorm's running statistics advance).

    Args:
        module: The model, on whichever devices it lives (a rewritten model too).
        args: Positional inputs.
        kwargs: Keyword inputs.
        repeats: Timings of each kind after the warm-up.

    Returns:
        (forward seconds, forward + backward seconds).

    Raises:
        ValueError: `repeats` < 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    kwargs = dict(kwargs or {})
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tensors += list(module.parameters()) + list(module.buffers())
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})

    def sync() -> None:
        for index in cuda:
            torch.cuda.synchronize(index)

    params = [p for p in module.parameters() if p.requires_grad]

    def forward() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            module(*args, **kwargs)
        sync()
        return time.perf_counter() - t0

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.enable_grad():
            roots = _differentiable(module(*args, **kwargs))
            if roots and params:
                torch.autograd.grad(roots, params, [torch.ones_like(r) for r in roots], allow_unused=True)
        sync()
        return time.perf_counter() - t0

    with _timing_settings(cuda):
        forward(), step()
        fwd = [forward() for _ in range(repeats)]
        both = [step() for _ in range(repeats)]
    return statistics.median(fwd), statistics.median(both)


# --------------------------------------------------------------------------- settings


@contextmanager
def _timing_settings(cuda_indices: Sequence[int]) -> Iterator[None]:
    """One torch thread while timing (the notes' advice), the random generators restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=list(cuda_indices)):
            yield
    finally:
        torch.set_num_threads(threads)


def _on_meta(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    tensors = [*gm.parameters(), *gm.buffers(), *tree_leaves((args, dict(kwargs)))]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)


# --------------------------------------------------------------------------- copies


def _requires_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


def _leaf(t: torch.Tensor, device: torch.device | None = None, *, copy: bool = False) -> torch.Tensor:
    """`t` detached (on `device` if given; a copy if `copy`), requiring grad as `t` does."""
    out = t.detach().to(t.device if device is None else device, copy=copy)
    return out.requires_grad_() if _requires_grad(t) else out


def _detach(value: Any) -> Any:
    """Every tensor of a pytree detached at a layer boundary, keeping ``requires_grad``."""
    return tree_map(lambda x: _leaf(x) if isinstance(x, torch.Tensor) else x, value)


def _differentiable(value: Any) -> list[torch.Tensor]:
    """The floating tensors of a pytree that require grad: where a backward starts."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and _requires_grad(t)]


def _retarget(module: nn.Module, device: torch.device) -> None:
    """Make device constants baked into `module`'s graphs (``arange(..., device=cpu)``) `device`."""

    def swap(x: Any) -> Any:
        return device if isinstance(x, torch.device) and x != device else x

    for m in module.modules():
        if not isinstance(m, fx.GraphModule):
            continue
        changed = False
        for n in m.graph.nodes:
            args, kwargs = tree_map(swap, n.args), tree_map(swap, n.kwargs)
            if args != n.args or kwargs != n.kwargs:
                n.args, n.kwargs, changed = args, kwargs, True
        if changed:
            m.recompile()


def _working_copy(gm: fx.GraphModule, written: frozenset[str] = frozenset()) -> fx.GraphModule:
    """A CPU copy of `gm` to split and run: parameters share storage, but for the `written`
    ones (that forward changes in place: the timing runs must not change the caller's), and
    the rest is copied."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().clone() if name in written else p.detach(), requires_grad=p.requires_grad)
        for name, p in gm.named_parameters(remove_duplicate=False)
        if p.device == _HOST
    }
    work = copy.deepcopy(gm, place_tensors(gm, {}, "cpu", memo=memo))
    _retarget(work, _HOST)
    return work


def _module_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `module` on `device`: every tensor copied there, device constants retargeted."""
    moved = copy.deepcopy(module, place_tensors(module, {}, str(device)))
    _retarget(moved, device)
    return moved


def _unit_to(unit: _Unit, device: torch.device) -> _Unit:
    """`unit` with its module and recorded inputs copied to `device`."""

    def move(x: Any) -> Any:
        if isinstance(x, nn.Module):
            return _module_to(x, device)
        if isinstance(x, torch.Tensor):
            return _leaf(x, device)
        if isinstance(x, torch.device):
            return device
        return x

    fn = move(unit.fn) if isinstance(unit.fn, nn.Module) else unit.fn
    args, kwargs = tree_map(move, (unit.args, unit.kwargs))
    return replace(unit, fn=fn, args=args, kwargs=kwargs)


def _unit_bytes(unit: _Unit) -> int:
    tensors = {id(t): t for t in tree_leaves((unit.args, unit.kwargs)) if isinstance(t, torch.Tensor)}
    for m in [unit.fn, *tree_leaves((unit.args, unit.kwargs))]:
        if isinstance(m, nn.Module):
            tensors.update((id(t), t) for t in [*m.parameters(), *m.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------- capture


def _call_method(name: str, self: Any, *args: Any, **kwargs: Any) -> Any:
    return getattr(self, name)(*args, **kwargs)


def _clones(value: Any) -> Any:
    """Every tensor of a pytree cloned, except parameters (never written by a forward)."""
    def clone(x: Any) -> Any:
        return x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter) else x

    return tree_map(clone, value)


def _call_inputs(unit: _Unit, grad: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs for one call: clones (recorded by autograd when `grad`) if the call writes them."""
    if not unit.clone_inputs:
        return unit.args, unit.kwargs
    with torch.set_grad_enabled(grad):
        return _clones((unit.args, unit.kwargs))


class _Recorder(fx.Interpreter):
    """Runs a graph once, recording the inputs of the nodes in `unit_layer` as `_Unit`s.

    Each recorded node runs with autograd on and its outputs are detached (keeping
    ``requires_grad``), so no autograd graph outlives one unit. It runs on clones of its
    inputs: a clone's version counter tells whether the call writes an input in place
    (torch.export's training IR keeps ``add_`` and friends; ``ReLU(inplace=True)`` may
    open a layer). Such a unit records its inputs as they were before the call and is
    timed on fresh clones, so repeated calls neither compound the write nor trip
    autograd's check against writing a leaf; the write is then applied to the originals,
    as the program would see it.
    """

    def __init__(self, gm: fx.GraphModule, unit_layer: Mapping[str, int]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.unit_layer = unit_layer
        self.units: list[_Unit] = []

    def run_node(self, n: fx.Node) -> Any:
        layer = self.unit_layer.get(n.name)
        if layer is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_module":
            fn: Callable[..., Any] = self.fetch_attr(str(n.target))
        elif n.op == "call_method":
            fn = partial(_call_method, str(n.target))
        else:
            fn = n.target  # type: ignore[assignment]
        unit = _Unit(layer=layer, name=n.name, fn=fn, args=tuple(args), kwargs=dict(kwargs))
        try:
            with torch.enable_grad():
                call_args, call_kwargs = _clones((unit.args, unit.kwargs))
                out = unit.fn(*call_args, **call_kwargs)
        except Exception as e:
            raise ProfileError(
                f"running layer {layer} (node {n.name!r}, {n.op} {n.target}) on the example inputs failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        written = [
            (original, used)
            for original, used in zip(tree_leaves((unit.args, unit.kwargs)), tree_leaves((call_args, call_kwargs)))
            if isinstance(used, torch.Tensor) and used is not original and used._version > 0
        ]
        if written:
            before = {id(original): _leaf(original, copy=True) for original, _ in written}
            unit.args, unit.kwargs = tree_map(lambda x: before.get(id(x), x), (unit.args, unit.kwargs))
            unit.clone_inputs = True
            with torch.no_grad():
                for original, used in written:
                    original.copy_(used)
        unit.differentiable = bool(_differentiable(out))
        unit.nbytes = _unit_bytes(unit)
        self.units.append(unit)
        return _detach(out)


def _labels(gm: fx.GraphModule, node_layer: Mapping[str, int]) -> dict[str, int]:
    """Layer of every call node; one no layer holds joins the latest layer it reads from, else 0."""
    labels: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op.startswith("call_"):
            inputs = [labels[a.name] for a in n.all_input_nodes if a.name in labels]
            labels[n.name] = node_layer.get(n.name, max(inputs, default=0))
    return labels


def _capture_units(
    layered: LayeredModel, flat_inputs: Sequence[Any], written: frozenset[str], say: Progress
) -> list[_Unit]:
    """Split a working copy of the graph by layer and record every layer's inputs.

    Where split_module fails, or its split graph does not run, every node is a unit.
    """
    work = _working_copy(layered.traced.gm, written)
    labels = _labels(work, layered.node_layer)

    def record(gm: fx.GraphModule, unit_layer: Mapping[str, int]) -> list[_Unit]:
        recorder = _Recorder(gm, unit_layer)
        recorder.run(*[_leaf(x, _HOST, copy=True) if isinstance(x, torch.Tensor) else x for x in flat_inputs])
        return recorder.units

    try:
        split = split_module(work, work, lambda n: labels[n.name])
    except Exception as e:  # noqa: BLE001 - e.g. a cycle between layers, or non-monotone grad regions
        say(f"split_module could not split the graph by layer ({type(e).__name__}: {e}); timing node by node")
    else:
        submodules = {n.name: int(str(n.target).rpartition("_")[2]) for n in split.graph.nodes if n.op == "call_module"}
        try:
            return record(split, submodules)
        except ProfileError as e:
            say(f"the graph split by layer did not run ({e}); timing node by node")
    return record(work, labels)


# --------------------------------------------------------------------------- timing


def _grad_leaves(unit: _Unit) -> list[torch.Tensor]:
    """What a backward through `unit` differentiates: its inputs and parameters that require grad."""
    leaves: dict[int, torch.Tensor] = {}
    for x in [unit.fn, *tree_leaves((unit.args, unit.kwargs))]:
        tensors = list(x.parameters()) if isinstance(x, nn.Module) else [x]
        leaves.update((id(t), t) for t in tensors if isinstance(t, torch.Tensor) and _requires_grad(t))
    return list(leaves.values())


def _time_unit(unit: _Unit, sync: Callable[[], None], calls: int) -> tuple[float, float, float]:
    """(forward, forward with autograd, backward) seconds of one call, averaged over `calls`.

    The calls of each kind run back to back between two synchronisations. The backward
    is repeated on one forward's graph (``retain_graph``), so only one forward's
    activations are alive at a time, and computes the gradients of every input and
    parameter that requires grad with `torch.autograd.grad`: as a training step's first
    backward after ``zero_grad(set_to_none=True)``, without adding into ``.grad``.
    """
    inputs = [_call_inputs(unit, grad=False) for _ in range(calls)]
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for args, kwargs in inputs:
            unit.fn(*args, **kwargs)
    sync()
    fwd = (time.perf_counter() - t0) / calls

    with torch.enable_grad():
        inputs = [_call_inputs(unit, grad=True) for _ in range(calls)]
        sync()
        t0 = time.perf_counter()
        for args, kwargs in inputs:
            out = unit.fn(*args, **kwargs)
        sync()
        fwd_grad = (time.perf_counter() - t0) / calls
        del inputs
        bwd = 0.0
        roots = _differentiable(out)
        leaves = _grad_leaves(unit)
        if roots and leaves:
            grads = [torch.ones_like(r) for r in roots]
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.autograd.grad(roots, leaves, grads, retain_graph=True, allow_unused=True)
            sync()
            bwd = (time.perf_counter() - t0) / calls
    return fwd, fwd_grad, bwd


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return partial(torch.cuda.synchronize, device)
    return lambda: None


def _resident_capacity(device: torch.device) -> int:
    """Bytes of layer copies kept on `device` between rounds (none off CUDA)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * _RESIDENT_SHARE)


class _DeviceCopies:
    """Copies of units on a device: made for a visit, kept while they fit `capacity` bytes."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self.kept: dict[int, _Unit] = {}
        self.kept_bytes = 0

    def get(self, i: int, unit: _Unit) -> _Unit:
        kept = self.kept.get(i)
        return kept if kept is not None else _unit_to(unit, self.device)

    def done(self, i: int, copied: _Unit, nbytes: int) -> None:
        if i not in self.kept and self.kept_bytes + nbytes <= self.capacity:
            self.kept[i] = copied
            self.kept_bytes += nbytes

    def drop_all(self) -> bool:
        """Free every kept copy and keep none from now on; whether there was any."""
        had = bool(self.kept)
        self.kept.clear()
        self.kept_bytes = self.capacity = 0
        if had and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return had


def _time_rounds(
    units: Sequence[_Unit],
    device: torch.device,
    *,
    copy_to_device: bool,
    repeats: int,
    deadline: float,
    say: Progress,
    label: str,
) -> list[_Samples]:
    """A warm-up round, then `repeats` timed rounds of every unit in turn, until `deadline`.

    The warm-up also sets how many calls each unit's timings batch (see `_TIMING_S`).

    With `copy_to_device`, each unit is copied to `device` for its visit (copies are kept
    across rounds while they fill at most `_RESIDENT_SHARE` of the free CUDA memory);
    else it runs where it was recorded. A unit that cannot run on the device (see
    `_visit`) is not timed again.
    """
    samples = [_Samples() for _ in units]
    sync = _synchronizer(device)
    copies = _DeviceCopies(device, _resident_capacity(device)) if copy_to_device else None
    dropped: set[int] = set()
    calls = [1] * len(units)
    for r in range(repeats + 1):
        say(f"{label}: " + ("warm-up" if r == 0 else f"round {r} of {repeats}"))
        for i, unit in enumerate(units):
            if time.perf_counter() > deadline:
                where = "the warm-up" if r == 0 else f"round {r}"
                say(f"{label}: stopped by the time budget in {where}; keeping what was measured")
                return samples
            if i in dropped:
                continue
            seconds = _visit(unit, i, copies, sync, calls[i])
            if isinstance(seconds, str):
                dropped.add(i)
                say(f"{label}: layer {unit.layer} ({unit.name!r}) {seconds} on {device}; it keeps its estimate")
            elif r == 0:
                calls[i] = max(1, min(_MAX_CALLS, math.ceil(_TIMING_S / max(seconds[0], 1e-9))))
            else:
                s = samples[i]
                s.fwd.append(seconds[0])
                s.fwd_grad.append(seconds[1])
                s.bwd.append(seconds[2])
    return samples


def _visit(
    unit: _Unit, i: int, copies: _DeviceCopies | None, sync: Callable[[], None], calls: int
) -> tuple[float, float, float] | str:
    """Time unit `i` once (on its device copy when `copies`), or say why it cannot run there.

    Out of memory, the kept copies of other units are freed and the visit tried again.
    On the host any error propagates (the unit ran there when its inputs were recorded);
    on another device an error (say, a tensor the copy missed) leaves the unit untimed.
    """
    while True:
        visit: _Unit | None = None
        try:
            visit = unit if copies is None else copies.get(i, unit)
            seconds = _time_unit(visit, sync, calls)
        except torch.OutOfMemoryError:
            visit = None
            if copies is None or not copies.drop_all():
                return "does not fit"
            continue
        except RuntimeError as e:
            if copies is None:
                raise
            first_line = (str(e).strip().splitlines() or [""])[0]
            return f"failed ({type(e).__name__}: {first_line})"
        if copies is not None:
            copies.done(i, visit, unit.nbytes)
        return seconds


def _layer_times(units: Sequence[_Unit], samples: Sequence[_Samples]) -> dict[int, tuple[float, float]]:
    """(forward, backward) median seconds per layer, over the rounds every unit of it completed."""
    by_layer: dict[int, list[int]] = {}
    for i, unit in enumerate(units):
        by_layer.setdefault(unit.layer, []).append(i)
    out: dict[int, tuple[float, float]] = {}
    for layer, members in by_layer.items():
        rounds = min(len(samples[i].fwd) for i in members)
        if rounds == 0:
            continue

        def median(kind: str) -> float:
            return statistics.median(sum(getattr(samples[i], kind)[r] for i in members) for r in range(rounds))

        fwd = median("fwd")
        bwd = 0.0
        if any(units[i].differentiable for i in members):
            bwd = median("bwd") + max(0.0, median("fwd_grad") - fwd)
        out[layer] = (fwd, bwd)
    return out
