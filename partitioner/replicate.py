"""Data parallelism inside one process: replicate, scatter the batch, gather the outputs.

As `torch.nn.DataParallel` does, but on any devices (simulated ``cpu:k`` included): each
forward copies the parameters to every device with differentiable ``.to`` (so autograd
sums the replicas' gradients into the one set of parameters), splits every tensor whose
first dimension is the batch, runs the replicas with `torch.func.functional_call`, and
concatenates batched outputs on the output device. A 0-dim output (a loss) is averaged,
weighted by shard size, which equals the full batch's mean for mean-reduced losses.

Like `nn.DataParallel`, buffers updated in a forward (BatchNorm running statistics in
training mode) are updated on replica copies and the updates are lost, and per-batch
statistics are computed per shard; so the planner never replicates a model that has such
modules (`replication_hazards`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from partitioner.rewrite import mode_constants, move_to, place_tensors

__all__ = ["Replicated", "replicate", "scatter", "replication_hazards"]


def scatter(value: Any, batch_size: int, shards: int) -> list[Any]:
    """Split every tensor whose dim 0 is `batch_size` into `shards` pieces; replicate the rest."""
    leaves, spec = tree_flatten(value)
    split = [
        torch.tensor_split(x, shards) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch_size else None
        for x in leaves
    ]
    return [tree_unflatten([s[k] if s is not None else x for s, x in zip(split, leaves)], spec) for k in range(shards)]


def _gather(outputs: list[Any], sizes: list[int], device: str) -> Any:
    flat = [tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    total = sum(sizes)
    merged = []
    for parts in zip(*(leaves for leaves, _ in flat)):
        first = parts[0]
        if not isinstance(first, torch.Tensor):
            merged.append(first)
        elif first.ndim == 0:
            merged.append(sum(p.to(device) * (n / total) for p, n in zip(parts, sizes)))
        elif all(p.shape[0] == n for p, n in zip(parts, sizes)):
            merged.append(torch.cat([p.to(device) for p in parts]))
        else:
            merged.append(first.to(device))
    return tree_unflatten(merged, spec)


def _drop_prefix(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    inner = prefix + "module."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner) :]] = state.pop(key)


def _add_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
        state[prefix + "module." + key[len(prefix) :]] = state.pop(key)


class Replicated(nn.Module):
    """`module` replicated over `devices` for each forward; its parameters live on ``devices[0]``."""

    def __init__(self, module: nn.Module, devices: Sequence[str], output_device: str, batch_size: int) -> None:
        super().__init__()
        self.module = module
        self.devices = tuple(devices)
        self.output_device = output_device
        self.batch_size = batch_size
        # The state dict keeps the model's own names (no "module." prefix), as a split
        # model's does, so it loads into the original model and back.
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        shards = min(len(self.devices), self.batch_size)
        pieces = scatter((args, kwargs), self.batch_size, shards)
        state: dict[str, torch.Tensor] = dict(self.module.named_parameters())
        state.update(self.module.named_buffers())
        # torch.tensor_split gives the first (batch % shards) shards one extra sample.
        sizes = [self.batch_size // shards + (k < self.batch_size % shards) for k in range(shards)]
        outputs = []
        for device, (a, kw) in zip(self.devices, pieces):
            replica_state = {name: t.to(device) for name, t in state.items()}
            outputs.append(functional_call(self.module, replica_state, move_to(a, device), move_to(kw, device)))
        return _gather(outputs, sizes, self.output_device)


def replicate(
    model: nn.Module, devices: Sequence[str], output_device: str, batch_size: int, *, inplace: bool = False
) -> Replicated:
    """`model` replicated over `devices` (a data-parallel plan applied): a copy of its
    tensors on ``devices[0]``, or with `inplace` the model itself moved there."""
    memo = place_tensors(model, {}, devices[0], inplace=inplace)
    return Replicated(model if inplace else copy.deepcopy(model, memo), devices, output_device, batch_size)


def replication_hazards(model: nn.Module) -> list[str]:
    """Why replicas would not compute what `model` computes, one line per module (empty if none).

    A BatchNorm in training mode normalises by the statistics of the batch it sees, so a
    replica given a shard of the batch computes other outputs; and a norm layer tracking
    running statistics updates them in forward, an update a replica makes on its copy
    and loses (as `torch.nn.DataParallel` does).
    """
    out = []
    for name, m in model.named_modules():
        if not m.training or not isinstance(m, nn.modules.batchnorm._NormBase):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(f"{name or 'the model'} ({type(m).__name__}, training) normalises by batch statistics")
        elif m.track_running_stats:
            out.append(f"{name or 'the model'} ({type(m).__name__}, training) updates its running statistics")
    if isinstance(model, fx.GraphModule):  # a torch.export graph holds batch norm as ops, not modules
        targets = {n.name: str(n.target) for n in model.graph.nodes}
        out += [
            f"node {name} ({targets[name]}, training) normalises by batch statistics"
            for name, training in mode_constants(model)
            if training and "batch_norm" in targets[name]
        ]
    return out
