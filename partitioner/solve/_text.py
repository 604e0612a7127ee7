"""Layer and device names as messages print them."""

from __future__ import annotations

from partitioner.ir import Problem

__all__ = ["layer_label", "device_label", "span_label"]


def layer_label(problem: Problem, layer: int) -> str:
    """``'transformer.h.3'`` when the problem names its layers, else ``#3``."""
    if layer < len(problem.names):
        return repr(problem.names[layer])
    return f"#{layer}"


def device_label(problem: Problem, device: int) -> str:
    """``'cuda:1'`` when the problem names its devices, else ``device 1``."""
    if device < len(problem.device_names):
        return repr(problem.device_names[device])
    return f"device {device}"


def span_label(problem: Problem, first: int, last: int) -> str:
    """Layers ``first..last`` (inclusive) as one label."""
    if first == last:
        return f"layer {layer_label(problem, first)}"
    return f"layers {layer_label(problem, first)}..{layer_label(problem, last)}"
