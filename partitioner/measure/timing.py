"""Time units on a device in round-robin rounds, and take each layer's median.

One visit of a unit times its forward, its forward with autograd and its backward (the
method and why are in the package docstring, `partitioner.measure`). A unit faster than
`TIMING_S` is called several times back to back per timing (at most `MAX_CALLS`), as
many as the warm-up says fill it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from partitioner.measure.units import Unit, call_inputs, differentiable, takes_grad, unit_to
from partitioner.progress import Progress

__all__ = ["Samples", "timing_settings", "time_rounds", "layer_times", "TIMING_S", "MAX_CALLS"]


# Device copies of layers stay resident across rounds while they fill at most this share
# of the device memory free when measuring starts; the rest is left for activations.
_RESIDENT_SHARE = 0.5

# One timing of a fast layer repeats it back to back until it lasts about this long, so
# that reading the clock and synchronising (microseconds on a CPU, tens of them with
# CUDA) stay small beside it; at most MAX_CALLS calls. Slower layers run once a visit.
TIMING_S = 1e-3
MAX_CALLS = 64


@dataclass(slots=True)
class Samples:
    """Seconds of each timed visit of one unit, one entry per round."""

    fwd: list[float] = field(default_factory=list)
    fwd_grad: list[float] = field(default_factory=list)
    bwd: list[float] = field(default_factory=list)


@contextmanager
def timing_settings(cuda_indices: Sequence[int]) -> Iterator[None]:
    """One torch thread while timing (the notes' advice), the random generators restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=list(cuda_indices)):
            yield
    finally:
        torch.set_num_threads(threads)


def _grad_leaves(unit: Unit) -> list[torch.Tensor]:
    """What a backward through `unit` differentiates: its inputs and parameters that require grad."""
    leaves: dict[int, torch.Tensor] = {}
    for x in [unit.fn, *tree_leaves((unit.args, unit.kwargs))]:
        tensors = list(x.parameters()) if isinstance(x, nn.Module) else [x]
        leaves.update((id(t), t) for t in tensors if isinstance(t, torch.Tensor) and takes_grad(t))
    return list(leaves.values())


def _time_unit(unit: Unit, sync: Callable[[], None], calls: int) -> tuple[float, float, float]:
    """(forward, forward with autograd, backward) seconds of one call, averaged over `calls`.

    The calls of each kind run back to back between two synchronisations. The backward
    is repeated on one forward's graph (``retain_graph``), so only one forward's
    activations are alive at a time, and computes the gradients of every input and
    parameter that requires grad with `torch.autograd.grad`: as a training step's first
    backward after ``zero_grad(set_to_none=True)``, without adding into ``.grad``.

    Timed by hand, not with `torch.utils.benchmark.Timer`: its ``timeit(n)`` adds at least
    two untimed calls each time (a visit of a slow layer would cost three of each kind),
    and its autoranges time one statement for a minimum time of their own, not one visit
    a round within a budget (``blocked_autorange(min_run_time=1e-3)`` took 21 ms on a
    9 us matmul here).
    """
    inputs = [call_inputs(unit, grad=False) for _ in range(calls)]
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for args, kwargs in inputs:
            unit.fn(*args, **kwargs)
    sync()
    fwd = (time.perf_counter() - t0) / calls

    with torch.enable_grad():
        inputs = [call_inputs(unit, grad=True) for _ in range(calls)]
        sync()
        t0 = time.perf_counter()
        for args, kwargs in inputs:
            out = unit.fn(*args, **kwargs)
        sync()
        fwd_grad = (time.perf_counter() - t0) / calls
        del inputs
        bwd = 0.0
        roots = differentiable(out)
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
        self.kept: dict[int, Unit] = {}
        self.kept_bytes = 0

    def get(self, i: int, unit: Unit) -> Unit:
        kept = self.kept.get(i)
        return kept if kept is not None else unit_to(unit, self.device)

    def done(self, i: int, copied: Unit, nbytes: int) -> None:
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


def time_rounds(
    units: Sequence[Unit],
    device: torch.device,
    *,
    copy_to_device: bool,
    repeats: int,
    deadline: float,
    say: Progress,
    label: str,
) -> list[Samples]:
    """A warm-up round, then `repeats` timed rounds of every unit in turn, until `deadline`.

    The warm-up also sets how many calls each unit's timings batch (see `TIMING_S`).

    With `copy_to_device`, each unit is copied to `device` for its visit (copies are kept
    across rounds while they fill at most `_RESIDENT_SHARE` of the free CUDA memory);
    else it runs where it was recorded. A unit that cannot run on the device (see
    `_visit`) is not timed again.
    """
    samples = [Samples() for _ in units]
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
                calls[i] = max(1, min(MAX_CALLS, math.ceil(TIMING_S / max(seconds[0], 1e-9))))
            else:
                s = samples[i]
                s.fwd.append(seconds[0])
                s.fwd_grad.append(seconds[1])
                s.bwd.append(seconds[2])
    return samples


def _visit(
    unit: Unit, i: int, copies: _DeviceCopies | None, sync: Callable[[], None], calls: int
) -> tuple[float, float, float] | str:
    """Time unit `i` once (on its device copy when `copies`), or say why it cannot run there.

    Out of memory, the kept copies of other units are freed and the visit tried again.
    On the host any error propagates (the unit ran there when its inputs were recorded);
    on another device an error (say, a tensor the copy missed) leaves the unit untimed.
    """
    while True:
        visit: Unit | None = None
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


def layer_times(units: Sequence[Unit], samples: Sequence[Samples]) -> dict[int, tuple[float, float]]:
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
