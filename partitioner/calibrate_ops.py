"""Calibration of the kernels a matmul and an element-wise op do not stand for: convolutions,
fused attention, batch norms, layer norms, pooling, and the transcendental functions of activations and
softmax (`DeviceProfile.conv_efficiency`, `DeviceProfile.attention_efficiency`,
`DeviceProfile.causal_attention_efficiency`, `DeviceProfile.op_rates`).

- convolution efficiency by size: 3x3 convolutions (stride 1, padding 1) of a fixed batch
  and image, channels in = channels out doubled from 8 (`_CONV_SHAPES`), in the profile's
  fastest dtype, each as a fraction of the peak matmul rate (a convolution of few channels
  vectorises poorly, far below a matmul of its FLOPs);
- attention efficiency by size: ``scaled_dot_product_attention`` of a fixed batch, heads
  and head size, sequences doubled (`_ATTENTION_SHAPES`), full and causal, in the profile's
  fastest dtype, each as a fraction of the peak matmul rate (a short sequence keeps a tiled
  kernel far below a matmul of its FLOPs; a causal one skips the masked half);
- op rates: one op of each kind of `OP_KINDS` on an input of about a sixteenth of the
  bandwidth copy (`_op_cases`: a batch norm computing batch statistics, a layer norm over
  1,024 features, a 3x3 max pooling of stride 2, a 2x2 average pooling; each activation
  and softmax over rows of 1,024), its forward timed under ``no_grad`` and its backward
  apart: the bytes its forward reads and writes per second of each.

On a CPU the dispatch floor is taken off each time (at most half of it), as for the matmul
curves, since the cost model adds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from partitioner.devices import OP_KINDS
from partitioner.dtypes import torch_dtype

__all__ = ["conv_curve", "attention_curves", "op_rates", "fp32_precision", "without_floor", "CONV_SHAPES_NOTE",
           "ATTENTION_SHAPES_NOTE"]

Timer = Callable[[Callable[[], object]], float]
"""Median seconds of one call of a function (`partitioner.calibrate`'s timing)."""

_CONV_SHAPES = {"cpu": (8, 16, (8, 16, 32, 64, 128)), "cuda": (32, 56, (16, 32, 64, 128, 256, 512))}
"""Device type -> (batch, image side, channels) of `conv_curve`'s convolutions."""
CONV_SHAPES_NOTE = "; ".join(
    f"{kind}: batch {b}, {s}x{s} images, {', '.join(map(str, c))} channels" for kind, (b, s, c) in _CONV_SHAPES.items()
)


def without_floor(seconds: float, device: torch.device, launch_s: float) -> float:
    """`seconds` less the dispatch floor `launch_s` (at most half of it) on a CPU, whose cost
    model adds the floor back; unchanged on a GPU, where the floor is a max and stays in."""
    return max(seconds - launch_s, seconds / 2) if device.type == "cpu" else seconds


@contextmanager
def fp32_precision(backend: Any, tf32: bool) -> Iterator[None]:
    """Let float32 CUDA kernels of `backend` (``torch.backends.cuda.matmul``,
    ``torch.backends.cudnn``) use TF32 tensor cores, or forbid it; restored after. torch
    >= 2.9 sets ``fp32_precision`` (on ``cudnn.conv`` for convolutions: mixing it with
    ``allow_tf32`` raises), older torch ``allow_tf32``."""
    new = getattr(backend, "conv", backend)
    value: str | bool
    if hasattr(new, "fp32_precision"):
        target, key, value = new, "fp32_precision", "tf32" if tf32 else "ieee"
    else:
        target, key, value = backend, "allow_tf32", tf32
    saved = getattr(target, key)
    setattr(target, key, value)
    try:
        yield
    finally:
        setattr(target, key, saved)


def conv_curve(
    device: torch.device, dtype: str, rate: float, launch_s: float, timer: Timer
) -> tuple[tuple[float, float], ...]:
    """(FLOPs, fraction of `rate`) of `_CONV_SHAPES`' 3x3 convolutions in `dtype`, FLOPs
    increasing; empty where the device has no convolution in `dtype` (it raises)."""
    batch, side, channels = _CONV_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    points = []
    precision = fp32_precision(torch.backends.cudnn, dtype == "tf32") if device.type == "cuda" else nullcontext()
    with torch.no_grad(), precision:
        for c in channels:
            x = torch.randn(batch, c, side, side, device=device).to(torch_dtype(dtype))
            w = torch.randn(c, c, 3, 3, device=device).to(torch_dtype(dtype))
            flops = 2 * batch * side * side * c * c * 9
            try:
                seconds = without_floor(timer(partial(F.conv2d, x, w, padding=1)), device, launch_s)
            except RuntimeError:  # no kernel for this dtype here: convolutions priced as matmuls
                return ()
            points.append((float(flops), min(1.0, max(1e-3, round(flops / seconds / rate, 4)))))
    return tuple(points)


_ATTENTION_SHAPES = {"cpu": (2, 4, 64, (32, 64, 128, 256, 512)), "cuda": (4, 16, 128, (256, 512, 1024, 2048, 4096))}
"""Device type -> (batch, heads, head size, sequence lengths) of `attention_curves`' attention."""
ATTENTION_SHAPES_NOTE = "; ".join(
    f"{kind}: batch {b}, {h} heads of {d}, sequences of {', '.join(map(str, t))}"
    for kind, (b, h, d, t) in _ATTENTION_SHAPES.items()
)


def attention_curves(
    device: torch.device, dtype: str, rate: float, launch_s: float, timer: Timer
) -> tuple[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]]:
    """(full, causal) (FLOPs per sample and head, fraction of `rate`) points of
    `_ATTENTION_SHAPES`' ``scaled_dot_product_attention`` in `dtype` (self-attention,
    sequences increasing), the FLOPs as torch counts them (``4 x sequence^2 x head size``
    per sample and head, a causal one's too); both empty where the device has no attention
    kernel in `dtype` (it raises)."""
    batch, heads, size, lengths = _ATTENTION_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    full: list[tuple[float, float]] = []
    causal: list[tuple[float, float]] = []
    with torch.no_grad():
        for t in lengths:
            q, k, v = (torch.randn(batch, heads, t, size, device=device).to(torch_dtype(dtype)) for _ in range(3))
            head = 4 * t * t * size
            flops = batch * heads * head
            try:
                for points, is_causal, cap in ((full, False, 1.0), (causal, True, 2.0)):
                    call = partial(F.scaled_dot_product_attention, q, k, v, is_causal=is_causal)
                    seconds = without_floor(timer(call), device, launch_s)
                    points.append((float(head), min(cap, max(1e-3, round(flops / seconds / rate, 4)))))
            except RuntimeError:  # no kernel for this dtype here: attention priced as matmuls
                return (), ()
    return tuple(full), tuple(causal)


def _op_cases(elements: int, device: torch.device) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """Kind -> (an op of that kind, an input for it of about `elements` float32 elements)."""
    images = torch.randn(max(1, elements // (32 * 32 * 32)), 32, 32, 32, device=device)
    rows = torch.randn(max(1, elements // 1024), 1024, device=device)
    ones = torch.ones(32, device=device)
    zeros = torch.zeros(32, device=device)
    return {
        "batch_norm": (lambda x: F.batch_norm(x, zeros.clone(), ones.clone(), ones, zeros, training=True), images),
        "norm": (lambda x: F.layer_norm(x, (1024,)), rows),
        "max_pool": (lambda x: F.max_pool2d(x, 3, 2, 1), images),
        "avg_pool": (lambda x: F.avg_pool2d(x, 2), images),
        "tanh": (torch.tanh, rows),
        "exp": (torch.exp, rows),
        "sigmoid": (torch.sigmoid, rows),
        "silu": (F.silu, rows),
        "gelu": (F.gelu, rows),
        "gelu_tanh": (partial(F.gelu, approximate="tanh"), rows),
        "softmax": (partial(torch.softmax, dim=-1), rows),
        "log_softmax": (partial(torch.log_softmax, dim=-1), rows),
    }


def _gradient(op: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor, ones: torch.Tensor) -> object:
    return torch.autograd.grad(op(leaf), leaf, ones)


def op_rates(
    device: torch.device, nbytes: int, launch_s: float, timer: Timer
) -> tuple[tuple[str, float, float], ...]:
    """(kind, forward rate, backward rate) of one op of each of `OP_KINDS` on about `nbytes` of
    float32 input, kinds in `OP_KINDS` order: the bytes its forward reads and writes over the
    seconds of its forward (under ``no_grad``) and of its backward (the input's gradient from
    ones, less the forward with autograd on; at least a twentieth of the two)."""
    out = []
    for kind, (op, x) in _op_cases(max(1, nbytes // 4), device).items():
        with torch.no_grad():
            moved = (x.numel() + op(x).numel()) * 4
            forward = without_floor(timer(partial(op, x)), device, launch_s)
        leaf = x.clone().requires_grad_()
        ones = torch.ones_like(op(leaf))
        recorded = timer(partial(op, leaf))
        both = timer(partial(_gradient, op, leaf, ones))
        backward = without_floor(max(both - recorded, both / 20), device, launch_s)
        out.append((kind, float(f"{moved / forward:.4g}"), float(f"{moved / backward:.4g}")))
    return tuple(out)
