"""A stage's tensors under the original model's ``state_dict`` names (several for a tied weight)."""

from __future__ import annotations

import torch
from torch import nn

from partitioner.distributed.stages import StageGraphs
from partitioner.layers import LayeredModel

__all__ = ["named_tensors", "original_names"]


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers of `module`, a shared one under each of its names."""
    return list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))


def original_names(
    model: nn.Module, layered: LayeredModel, graphs: StageGraphs
) -> tuple[list[dict[str, tuple[str, ...]]], dict[str, torch.Tensor]]:
    """Per stage, its tensor names -> the original model's ``state_dict`` names of the same
    tensor (several for a tied weight); and the state entries no stage holds."""
    state = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for name, t in state.items():
        by_id.setdefault(id(t), []).append(name)
    held: set[str] = set()
    aliases = []
    for module in graphs.modules:
        names: dict[str, tuple[str, ...]] = {}
        for name, t in named_tensors(module):
            originals = tuple(by_id.get(id(t), [name] if name in state else []))
            names[name] = originals
            held.update(originals)
        aliases.append(names)
    extra = {k: t.detach().clone() for k, t in state.items() if k not in held}
    return aliases, extra
