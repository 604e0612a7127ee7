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
import inspect
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from partitioner.errors import PartitionerError
from partitioner.layers import LayeredModel
from partitioner.snapshot import named_tensors

__all__ = [
    "split_model",
    "move_to",
    "copy_to",
    "rewrite_graph",
    "place_tensors",
    "InsertedTransfer",
    "node_devices",
    "tensor_devices",
    "gather_graph",
    "mode_constants",
]


def split_model(
    model: nn.Module,
    layered: LayeredModel,
    assignment: Sequence[int],
    devices: Sequence[str],
    output_device: str,
    *,
    inplace: bool = False,
) -> tuple[fx.GraphModule, list[InsertedTransfer]]:
    """Apply a placement: `layered`'s graph with layer ``i`` on ``devices[assignment[i]]``.

    Args:
        model: The model `layered` was traced from (its tensors are copied, or with
            `inplace` moved, to their layers' devices).
        layered: The traced model and its layers.
        assignment: Device index of each layer.
        devices: Torch device strings.
        output_device: Where the outputs are gathered.
        inplace: Move `model`'s own tensors instead of copying them.

    Returns:
        The rewritten graph module and the transfers inserted.
    """
    device_of = tensor_devices(layered, assignment, devices)
    memo = place_tensors(model, device_of, devices[0], inplace=True) if inplace else {}
    memo = place_tensors(layered.traced.gm, device_of, devices[0], memo=memo)
    return rewrite_graph(layered, node_devices(layered, assignment, devices), output_device, memo)


def move_to(value: Any, device: str) -> Any:
    """Move every tensor in a pytree `value` to `device` (the inserted transfer op)."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)


def copy_to(value: Any, device: str) -> Any:
    """`move_to` that always copies: every tensor in a pytree `value` is copied to `device`, and
    its gradient is copied back in backward.

    A transfer between two devices that share one memory: the graph gathered onto the host
    with ``gather_graph(..., copy_transfers=True)`` still pays for the bytes the plan moves.
    """
    return tree_map(lambda x: _Copy.apply(x, device) if isinstance(x, torch.Tensor) else x, value)


class _Copy(torch.autograd.Function):
    """A copy to a device whose backward copies the gradient back (``Tensor.to`` returns the
    gradient itself when it is already where it should go, so copies it nothing)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, device: str) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.device = x.device
        return x.to(device, copy=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        return (None if grad is None else grad.to(ctx.device, copy=True)), None


@dataclass(frozen=True, slots=True)
class InsertedTransfer:
    """A transfer node the rewrite inserted."""

    value: str
    """Name of the graph node whose value moves."""
    src: str
    """Device it comes from (``input`` for a model input, which may be anywhere)."""
    dst: str
    """Device it goes to."""


def place_tensors(
    module: nn.Module,
    device_of: dict[str, str],
    default: str,
    *,
    inplace: bool = False,
    memo: dict[int, Any] | None = None,
) -> dict[int, Any]:
    """Place each tensor of `module` on its device; return a deepcopy memo (id -> placed tensor).

    Args:
        module: The module whose parameters, buffers and tensor constants are placed.
        device_of: Qualified tensor name -> device; a tensor reachable under several names
            (tied weights) takes the device of the first name found here.
        default: Device of tensors no layer owns (unused parameters).
        inplace: Also register the placed tensors in `module` in place of the old ones
            (the caller's model then holds them; optimizers made before hold the old ones).
        memo: Tensors already placed (by id); they are kept as they are.

    Raises:
        PartitionerError: a tensor is on ``meta`` (it has no values to place).
    """
    aliases: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, t in named_tensors(module):
        aliases.setdefault(id(t), (t, []))[1].append(name)
    memo = dict(memo or {})
    for key, (t, names) in aliases.items():
        if key in memo:
            continue
        if t.is_meta:
            raise PartitionerError(
                f"tensor {names[0]!r} is on the meta device and has no values to place; load the weights "
                "first (e.g. accelerate.load_checkpoint_in_model), or plan only with partitioner.plan()"
            )
        device = next((device_of[n] for n in names if n in device_of), default)
        moved = t.detach().to(device, copy=True)
        if isinstance(t, nn.Parameter):
            placed: torch.Tensor = nn.Parameter(moved, requires_grad=t.requires_grad)
        else:
            placed = moved.requires_grad_(t.requires_grad) if moved.is_floating_point() else moved
        if inplace:
            for name in names:
                _register(module, name, placed)
        memo[key] = placed
    return memo


def _register(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = root.get_submodule(path)
    if attr in owner._parameters:
        owner._parameters[attr] = tensor  # type: ignore[assignment]
    elif attr in owner._buffers:
        owner._buffers[attr] = tensor
    else:
        setattr(owner, attr, tensor)


def rewrite_graph(
    layered: LayeredModel,
    node_device: dict[str, str],
    output_device: str,
    memo: dict[int, Any],
) -> tuple[fx.GraphModule, list[InsertedTransfer]]:
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
    inserted: list[InsertedTransfer] = []

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
            inserted.append(InsertedTransfer(a.name, src or "input", device))
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
        for a in n.all_input_nodes:  # subgraphs of higher-order ops (torch.cond, set_grad_enabled regions)
            sub = _attr(gm, str(a.target)) if a.op == "get_attr" else None
            if isinstance(sub, fx.GraphModule):
                _retarget_subgraph(sub, device)
    graph.lint()
    gm.recompile()
    return gm, inserted


def _retarget_devices(value: Any, device: str) -> Any:
    """Replace device constants baked into the graph (``arange(..., device=cpu)``) by `device`."""
    target = torch.device(device)
    return tree_map(lambda x: target if isinstance(x, torch.device) else x, value)


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _retarget_subgraph(gm: fx.GraphModule, device: str) -> None:
    for n in gm.graph.nodes:
        n.args, n.kwargs = _retarget_devices(n.args, device), _retarget_devices(n.kwargs, device)
    gm.recompile()


def node_devices(layered: LayeredModel, assignment: Sequence[int], devices: Sequence[str]) -> dict[str, str]:
    """Node name -> device under a per-layer `assignment` of device indices."""
    return {name: devices[assignment[layer]] for name, layer in layered.node_layer.items()}


def tensor_devices(layered: LayeredModel, assignment: Sequence[int], devices: Sequence[str]) -> dict[str, str]:
    """Qualified tensor name -> device of the layer that owns it."""
    return {
        name: devices[assignment[layer.index]] for layer in layered.graph.layers for name in layer.params
    }


def gather_graph(
    gm: fx.GraphModule, device: str, *, drop_transfers: bool = False, copy_transfers: bool = False
) -> None:
    """Point every transfer and device constant of a rewritten graph at one `device`, in place.

    After ``module.to(device)`` has moved the tensors, the graph must stop sending values
    to the devices of the plan. With `drop_transfers` the transfer nodes go altogether
    (for a graph that is traced and planned again). With `copy_transfers` each transfer
    of a value between two of the plan's devices becomes a copy on `device` (`copy_to`,
    forward and backward) while model inputs are read where they are: the graph then costs
    what it would on devices that share one memory, compute plus the plan's copies.
    """
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and (n.target is move_to or n.target is copy_to):
            if drop_transfers:
                n.replace_all_uses_with(n.args[0])
                gm.graph.erase_node(n)
            else:
                n.target = copy_to if copy_transfers and n.args[0].op != "placeholder" else move_to
                n.args = (n.args[0], device)
            continue
        n.args, n.kwargs = _retarget_devices(n.args, device), _retarget_devices(n.kwargs, device)
        sub = _attr(gm, str(n.target)) if n.op == "get_attr" else None
        if isinstance(sub, fx.GraphModule):
            _retarget_subgraph(sub, device)
    gm.recompile()


_MODE_ARGS = ("training", "train")


def mode_constants(gm: fx.GraphModule) -> list[tuple[str, bool]]:
    """(node name, mode) for each node whose train/eval behaviour the trace fixed.

    torch.export writes ``aten.dropout(x, p, train)`` and ``aten.batch_norm(..., training,
    ...)`` with the mode of the traced model as a constant, and a symbolic trace does the
    same for ``F.dropout(x, training=self.training)``; ``module.train()`` cannot change
    them. Dropout with ``p == 0`` computes the same in both modes and is left out.
    """
    found: list[tuple[str, bool]] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        target = n.target
        if target is torch.ops.aten._native_batch_norm_legit_no_training.default:
            found.append((n.name, False))
            continue
        schema = getattr(target, "_schema", None)
        try:
            if schema is not None:
                names = [a.name for a in schema.arguments]
                defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
                bound = {**defaults, **dict(zip(names, n.args)), **n.kwargs}
            else:
                signature = inspect.signature(target)
                call = signature.bind(*n.args, **n.kwargs)
                call.apply_defaults()
                bound = dict(call.arguments)
        except (TypeError, ValueError):
            continue  # builtins without a signature, calls that do not bind: no mode argument to read
        mode = next((bound[k] for k in _MODE_ARGS if k in bound), None)
        if isinstance(mode, bool) and bound.get("p") != 0:
            found.append((n.name, mode))
    return found
