"""Apply a placement: a runnable module with parameters placed and transfers inserted.

Mechanism only: the placement (a device per layer) comes from the solver. The invariant,
as for `torch.fx.passes.split_module`: the rewritten module computes what the original
computes, outputs and gradients, with every tensor an op reads on that op's device.

- each layer's parameters and buffers live on its device (copies: the user's model is
  untouched unless ``inplace=True``);
- one transfer node per (value, destination device) where an edge crosses devices;
  graph inputs are moved to the devices that read them, outputs to ``output_device``;
- ops that create tensors with an explicit ``device=`` run on their layer's device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from partitioner.errors import PartitionerError
from partitioner.layers import LayeredModel

__all__ = ["move_to", "rewrite_graph", "place_tensors", "Transfer", "node_devices", "tensor_devices"]


def move_to(value: Any, device: str) -> Any:
    """Move every tensor in a pytree `value` to `device` (the inserted transfer op)."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transfer node the rewrite inserted."""

    value: str
    """Name of the graph node whose value moves."""
    src: str
    """Device it comes from (``input`` for a model input, which may be anywhere)."""
    dst: str
    """Device it goes to."""


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False))
    named += list(module.named_buffers(remove_duplicate=False))
    for name, sub in module.named_modules(remove_duplicate=False):
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and attr not in sub._buffers:
                named.append((f"{name}.{attr}" if name else attr, value))  # tensor constants of export graphs
    return named


def place_tensors(
    module: nn.Module, device_of: dict[str, str], default: str, *, inplace: bool = False
) -> dict[int, torch.Tensor]:
    """Place each tensor of `module` on its device; return a deepcopy memo (id -> placed tensor).

    Args:
        module: The module whose parameters, buffers and tensor constants are placed.
        device_of: Qualified tensor name -> device; a tensor reachable under several names
            (tied weights) takes the device of the first name found here.
        default: Device of tensors no layer owns (unused parameters).
        inplace: Move the tensors themselves (``param.data``) rather than copies.

    Raises:
        PartitionerError: a tensor is on ``meta`` (it has no values to place).
    """
    memo: dict[int, torch.Tensor] = {}
    for name, t in _named_tensors(module):
        if id(t) in memo:
            continue
        if t.is_meta:
            raise PartitionerError(
                f"tensor {name!r} is on the meta device and has no values to place; load the weights "
                "first (e.g. accelerate.load_checkpoint_in_model), or plan only with partitioner.plan()"
            )
        device = device_of.get(name, default)
        if inplace:
            with torch.no_grad():
                t.data = t.data.to(device)
            memo[id(t)] = t
            continue
        moved = t.detach().to(device, copy=True)
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(moved, requires_grad=t.requires_grad)
        else:
            memo[id(t)] = moved.requires_grad_(t.requires_grad) if moved.is_floating_point() else moved
    return memo


def rewrite_graph(
    layered: LayeredModel,
    node_device: dict[str, str],
    output_device: str,
    memo: dict[int, Any],
) -> tuple[fx.GraphModule, list[Transfer]]:
    """Copy the traced graph module with `memo`'s tensors and insert the transfers.

    Args:
        layered: The traced model and its layers.
        node_device: Node name -> device, for every placed node.
        output_device: Where the outputs are gathered.
        memo: From `place_tensors`.

    Returns:
        The new graph module and the transfers inserted.
    """
    gm = copy.deepcopy(layered.traced.gm, memo)
    graph = gm.graph
    nodes = list(graph.nodes)
    last_placeholder = max((n for n in nodes if n.op == "placeholder"), key=nodes.index, default=None)
    transfers: dict[tuple[str, str], fx.Node] = {}
    inserted: list[Transfer] = []

    def moved(a: fx.Node, device: str) -> fx.Node:
        src = node_device.get(a.name)
        if src == device or (src is None and a.op != "placeholder"):
            return a
        k = (a.name, device)
        if k not in transfers:
            anchor = last_placeholder if a.op == "placeholder" else a
            with graph.inserting_after(anchor):
                t = graph.call_function(move_to, (a, device))
            t.name = graph._graph_namespace.create_name(f"{a.name}_to_{device.replace(':', '_')}", None)
            t.meta = {k2: v for k2, v in a.meta.items() if k2 in ("val", "tensor_meta")}
            transfers[k] = t
            inserted.append(Transfer(a.name, src or "input", device))
        return transfers[k]

    for n in nodes:
        device = node_device.get(n.name)
        if n.op == "output":
            n.args = fx.node.map_arg(n.args, lambda a: moved(a, output_device))
            continue
        if device is None or n.op in ("placeholder", "get_attr"):
            continue
        n.args = fx.node.map_arg(n.args, lambda a: moved(a, device))
        n.kwargs = fx.node.map_arg(n.kwargs, lambda a: moved(a, device))
        n.args, n.kwargs = _retarget_devices(n.args, device), _retarget_devices(n.kwargs, device)
    graph.lint()
    gm.recompile()
    return gm, inserted


def _retarget_devices(value: Any, device: str) -> Any:
    """Replace device constants baked into the graph (``arange(..., device=cpu)``) by `device`."""
    target = torch.device(device)
    return tree_map(lambda x: target if isinstance(x, torch.device) else x, value)


def node_devices(layered: LayeredModel, assignment: Sequence[int], devices: Sequence[str]) -> dict[str, str]:
    """Node name -> device under a per-layer `assignment` of device indices."""
    return {name: devices[assignment[layer]] for name, layer in layered.node_layer.items()}


def tensor_devices(layered: LayeredModel, assignment: Sequence[int], devices: Sequence[str]) -> dict[str, str]:
    """Qualified tensor name -> device of the layer that owns it."""
    return {
        name: devices[assignment[layer.index]] for layer in layered.graph.layers for name in layer.params
    }
