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

The modules: `units` (a unit and its copies), `capture` (recording the units), `timing`
(the rounds on a device and the medians), `step` (`whole_step_time`, a whole model's step).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from partitioner.devices import Device
from partitioner.ir import LayerGraph
from partitioner.layers import LayeredModel
from partitioner.measure.capture import capture_units
from partitioner.measure.step import whole_step_time
from partitioner.measure.timing import layer_times, time_rounds, timing_settings
from partitioner.profiling import _flat_inputs, written_parameters
from partitioner.progress import Progress
from partitioner.trace import TRACE_LOCK

__all__ = ["measure_layers", "whole_step_time"]


def measure_layers(
    layered: LayeredModel,
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None,
    devices: Sequence[Device],
    *,
    repeats: int = 5,
    budget_s: float = 10.0,
    progress: Progress | None = None,
    only: Collection[int] | None = None,
) -> LayerGraph:
    """Time every layer of `layered` (or those in `only`) on each present kind of device
    among `devices`.

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
        only: Indices of the layers to time (the forward still runs whole, to record
            their inputs); None: every layer. The others keep the times they have.

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
    with TRACE_LOCK, timing_settings(cuda):
        units = capture_units(layered, _flat_inputs(gm, tuple(example_args), kwargs), written, say)
        if only is not None:
            units = [u for u in units if u.layer in only]
            if not units:
                return layered.graph
        for k, (profile, device) in enumerate(targets.items()):
            remaining = budget_s - (time.perf_counter() - start)
            deadline = time.perf_counter() + remaining / (len(targets) - k)
            samples = time_rounds(
                units,
                device,
                copy_to_device=device.type != "cpu",
                repeats=repeats,
                deadline=deadline,
                say=say,
                label=f"measuring layers on {profile}",
            )
            measured[profile] = layer_times(units, samples)
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


def _on_meta(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    tensors = [*gm.parameters(), *gm.buffers(), *tree_leaves((args, dict(kwargs)))]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)
