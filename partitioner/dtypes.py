"""Dtype names: the roofline's (``float32``, ``tf32``, ``bfloat16``, ``float16``) and torch's."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DTYPE_NAMES", "torch_dtype", "dtype_name", "dtype_of"]

_BY_NAME = {
    "float32": torch.float32,
    "tf32": torch.float32,  # float32 tensors, TensorFloat-32 matmuls
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

DTYPE_NAMES = tuple(_BY_NAME)
"""Every dtype name `torch_dtype` reads."""


def torch_dtype(name: str, allowed: tuple[str, ...] = DTYPE_NAMES) -> torch.dtype:
    """The torch dtype of `name` (one of `allowed`).

    Raises:
        ValueError: `name` is not one of `allowed`; the message lists them.
    """
    if name not in allowed or name not in _BY_NAME:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {name!r}")
    return _BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The roofline dtype of tensors of `dtype`: ``bfloat16``, ``float16``, else ``float32``
    (float64 and integer work is priced at the float32 peak, the closest the profiles list)."""
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def dtype_of(model: nn.Module) -> str:
    """The roofline dtype of `model`: that of its first floating parameter (``float32`` for none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return dtype_name(p.dtype)
    return "float32"
