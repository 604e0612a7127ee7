"""Whole-step timing: median seconds of a module's forward, and of its forward plus backward."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from partitioner.measure.timing import timing_settings
from partitioner.measure.units import differentiable

__all__ = ["whole_step_time"]


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
            roots = differentiable(module(*args, **kwargs))
            if roots and params:
                torch.autograd.grad(roots, params, [torch.ones_like(r) for r in roots], allow_unused=True)
        sync()
        return time.perf_counter() - t0

    with timing_settings(cuda):
        forward(), step()
        fwd = [forward() for _ in range(repeats)]
        both = [step() for _ in range(repeats)]
    return statistics.median(fwd), statistics.median(both)
