"""The torch.fx front end: a symbolic trace that records grad modes and mirrors the model's state."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from partitioner.mutations import thread_mutations
from partitioner.snapshot import named_tensors
from partitioner.trace_checks import InferenceMode, Unfaithful

__all__ = ["RootState", "check_grad_modes", "trace_fx"]


_GRAD_MODE = "partitioner_grad_mode"
"""Node meta key (torch.fx graphs): ``(grad enabled, inference mode on)`` when the node was recorded."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with two changes.

    - A buffer read in ``forward`` is a graph value (a ``get_attr``), not the tensor: an
      op on it alone (``self.c.clone()``) then runs each call on the buffer as it is,
      instead of once at trace time into a constant that fx would store on the model.
    - Each node records the grad mode it was made under (`_GRAD_MODE`): a symbolic trace
      runs ``with torch.no_grad():`` for real but records no trace of it in the graph.
    """

    proxy_buffer_attributes = True

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[_GRAD_MODE] = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        return node


def trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """`model` traced symbolically, its in-place changes threaded, its state mirrored.

    Raises:
        TypeError: The example inputs do not fit the traced forward's arguments.
    """
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = set(kwargs) - set(placeholders)
    if unknown or len(args) > len(placeholders):
        raise TypeError(f"the traced forward takes {placeholders}, got {len(args)} positional and {sorted(kwargs)}")
    if thread_mutations(gm):
        gm.recompile()
    _mirror_state(model, gm)
    return gm


def check_grad_modes(gm: fx.GraphModule) -> None:
    """Raise if a node of the symbolic trace was recorded with autograd off.

    The trace runs with autograd on (`trace_checks.recording_modes`), so such a node ran in a
    ``torch.no_grad()``, ``torch.set_grad_enabled(False)`` or ``torch.inference_mode()``
    region of ``forward`` (or of a ``@torch.no_grad`` function it calls), which the fx
    graph drops: the graph would compute gradients the model does not.
    """
    for n in gm.graph.nodes:
        grad, inference = n.meta.get(_GRAD_MODE, (True, False))
        if n.op not in ("call_function", "call_method", "call_module") or (grad and not inference):
            continue
        if n.op == "call_module":
            target = f"module {n.target}"
        else:
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if inference:
            raise InferenceMode(
                f"node {n.name!r} ({target}) runs under torch.inference_mode(), which a graph does not record: "
                "split, it would compute gradients the model does not"
            )
        raise Unfaithful(
            f"node {n.name!r} ({target}) runs with autograd off (torch.no_grad(), set_grad_enabled(False) "
            "or a @torch.no_grad function), which a torch.fx graph does not record: split, it would "
            "compute gradients the model does not"
        )


def _mirror_state(model: nn.Module, gm: fx.GraphModule) -> None:
    """Give `gm` every parameter and buffer of `model`, under the same names and persistence.

    A symbolic trace copies only what the graph reads, and copies buffers read by
    ``get_attr`` as persistent ones; the rewritten module's ``state_dict`` must load
    into the original model (``strict=True``), so unused tensors (a module never called)
    are added and non-persistent buffers stay out of the state dict. The tensors are the
    model's own, as the trace's are. A tensor the root holds under two names
    (``self.p1 = self.p0 = nn.Parameter(...)``) keeps both, as the original's state dict
    does, also in deep copies (`GraphModule.__deepcopy__` copies the root's tensors by
    their first name only).
    """
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        path, _, attr = name.rpartition(".")
        src, dst = model.get_submodule(path), cast(nn.Module, gm)
        for part in path.split(".") if path else ():
            child = dst._modules.get(part)
            if child is None:
                child = nn.Module()
                dst.add_module(part, child)
            dst = child
        if dst is src:
            continue  # the trace holds this module itself
        if attr in src._parameters:
            if attr not in dst._parameters:
                dst.register_parameter(attr, src._parameters[attr])
        elif attr not in dst._buffers:
            dst.register_buffer(attr, tensor, persistent=attr not in src._non_persistent_buffers_set)
        elif attr in src._non_persistent_buffers_set:
            dst._non_persistent_buffers_set.add(attr)
    for path, original in model.named_modules(remove_duplicate=False):
        made = _submodule(gm, path)
        if made is not None and made is not original:  # a module the trace made: the original's order
            _reorder(made, tuple(original._parameters), tuple(original._buffers))
    first: dict[int, str] = {}
    aliases = {
        name: first[id(t)]
        for name, t in named_tensors(gm)
        if first.setdefault(id(t), name) != name and "." not in name and (name in gm._parameters or name in gm._buffers)
    }
    if gm._non_persistent_buffers_set or aliases:
        gm._register_deepcopy_hook(RootState(gm, aliases))


class RootState:
    """Deep-copy hook: `GraphModule.__deepcopy__` registers the root's tensors again, by
    their first name and as persistent buffers; this puts back the second names of tied
    root tensors and marks the non-persistent buffers again."""

    def __init__(self, gm: fx.GraphModule, aliases: dict[str, str]) -> None:
        self.non_persistent = frozenset(gm._non_persistent_buffers_set)
        self.aliases = dict(aliases)
        """Root attribute -> qualified name of the tensor it aliases."""
        self.order = (tuple(gm._parameters), tuple(gm._buffers))
        """The root's parameter and buffer names in the original's order (the state dict's)."""

    def __call__(self, gm: fx.GraphModule) -> None:
        for name, target in self.aliases.items():
            path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(path)
            if attr in owner._parameters and name not in gm._parameters:
                gm._parameters[name] = owner._parameters[attr]
            elif attr in owner._buffers and name not in gm._buffers:
                gm._buffers[name] = owner._buffers[attr]
        _reorder(gm, *self.order)
        gm._non_persistent_buffers_set |= {n for n in self.non_persistent if n in gm._buffers}


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or None where `root` has no such module."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _reorder(module: nn.Module, parameters: tuple[str, ...], buffers: tuple[str, ...]) -> None:
    """Put `module`'s parameters and buffers in these orders (the state dict's); others after them."""
    tables: tuple[tuple[dict[str, Any], tuple[str, ...]], ...] = (
        (module._parameters, parameters),
        (module._buffers, buffers),
    )
    for table, order in tables:
        rank = {name: k for k, name in enumerate(order)}
        ordered = sorted(table.items(), key=lambda item: rank.get(item[0], len(rank)))
        table.clear()
        table.update(ordered)
