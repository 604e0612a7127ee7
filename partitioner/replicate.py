"""Data parallelism inside one process: replicate, scatter the batch, gather the outputs.

`Copies` does the same for a split model: copies of the rewritten graph on groups of
devices (`Plan.replicas`), each placed as the plan places copy 0, all reading the one set
of parameters that copy 0 holds.

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

from partitioner.cost_model import split_sizes
from partitioner.layers import LayeredModel
from partitioner.rewrite import (
    InsertedTransfer,
    gather_graph,
    mode_constants,
    move_to,
    node_devices,
    place_tensors,
    rewrite_graph,
    tensor_devices,
)
from partitioner.snapshot import named_tensors

__all__ = ["Replicated", "replicate", "Copies", "replicate_split", "scatter", "replication_hazards"]


def scatter(value: Any, batch_size: int, shards: int) -> list[Any]:
    """Split every tensor whose dim 0 is `batch_size` into `shards` pieces; replicate the rest."""
    leaves, spec = tree_flatten(value)
    split = [
        torch.tensor_split(x, shards) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == batch_size else None
        for x in leaves
    ]
    return [tree_unflatten([s[k] if s is not None else x for s, x in zip(split, leaves)], spec) for k in range(shards)]


def _shards(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int, copies: int
) -> tuple[list[Any], list[int]]:
    """The (args, kwargs) of each of at most `copies` shards of the batch, and their sizes."""
    shards = min(copies, batch_size)
    return scatter((args, kwargs), batch_size, shards), list(split_sizes(batch_size, shards))


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
        pieces, sizes = _shards(args, kwargs, self.batch_size, len(self.devices))
        state: dict[str, torch.Tensor] = dict(self.module.named_parameters())
        state.update(self.module.named_buffers())
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


class Copies(nn.Module):
    """Copies of a rewritten graph on groups of devices, the batch split between them.

    `module` is copy 0, which holds the parameters and buffers on its devices. Each forward
    copies them with differentiable ``.to`` onto every other copy's devices (so autograd sums
    the copies' gradients into the one set) and runs that copy's graph, `others[g - 1]`, on
    them with `torch.func.functional_call`; batched outputs are concatenated on
    `output_device`, as `Replicated` does.
    """

    def __init__(
        self,
        module: fx.GraphModule,
        others: Sequence[tuple[fx.GraphModule, dict[str, str]]],
        output_device: str,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.module = module
        # A plain list: the other copies' graphs share copy 0's tensors, which must be
        # registered (state dict, optimizer) once.
        self.others = list(others)
        """(graph, device map): each other copy's graph and, per device of copy 0, its own."""
        self.output_device = output_device
        self.batch_size = batch_size
        self.register_state_dict_post_hook(_drop_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.others:
            return self.module(*args, **kwargs)
        pieces, sizes = _shards(args, kwargs, self.batch_size, 1 + len(self.others))
        outputs = [self.module(*pieces[0][0], **pieces[0][1])]
        tensors = named_tensors(self.module)
        for (graph, device_of), (a, kw) in zip(self.others, pieces[1:]):
            moved: dict[int, torch.Tensor] = {}
            state = {}
            for name, t in tensors:
                if id(t) not in moved:
                    moved[id(t)] = t.to(device_of.get(str(t.device), str(t.device)))
                state[name] = moved[id(t)]
            outputs.append(functional_call(graph, state, a, kw))
        return _gather(outputs, sizes, self.output_device)

    def gather(self, device: str) -> None:
        """Run one copy on `device` (after its tensors moved there): the others are dropped."""
        gather_graph(self.module, device)
        self.others = []
        self.output_device = device


def replicate_split(
    model: nn.Module,
    layered: LayeredModel,
    assignment: Sequence[int],
    groups: Sequence[Sequence[int]],
    devices: Sequence[str],
    output_device: str,
    batch_size: int,
    *,
    inplace: bool = False,
) -> tuple[Copies, list[InsertedTransfer]]:
    """A plan of copies applied: `layered`'s graph with layer ``i`` on ``devices[assignment[i]]``
    (copy 0, as `partitioner.rewrite.split_model` places it), and for every other group ``g``
    a graph that runs on ``devices[groups[g][k]]`` what copy 0 runs on ``devices[groups[0][k]]``.

    Returns:
        The copies and every transfer their graphs insert.
    """
    device_of = tensor_devices(layered, assignment, devices)
    memo = place_tensors(model, device_of, devices[0], inplace=True) if inplace else {}
    memo = place_tensors(layered.traced.gm, device_of, devices[0], memo=memo)
    # deepcopy adds what it copies to its memo: each copy's graph starts from the placed tensors alone.
    first, transfers = rewrite_graph(layered, node_devices(layered, assignment, devices), output_device, dict(memo))
    others = []
    for group in groups[1:]:
        position = dict(zip(groups[0], group, strict=True))
        mine = [position[a] for a in assignment]
        graph, inserted = rewrite_graph(layered, node_devices(layered, mine, devices), output_device, dict(memo))
        transfers += inserted
        others.append((graph, {devices[a]: devices[b] for a, b in position.items()}))
    return Copies(first, others, output_device, batch_size), transfers


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
