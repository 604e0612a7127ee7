"""A unit timed alone (a layer's split submodule, or one graph node) and the copies timing makes of it.

Tensors are detached at layer boundaries but keep ``requires_grad``, so a unit is
differentiated with respect to what the whole model would differentiate and nothing else.
The host working copy of a graph shares parameter storage with the caller's (copying the
ones a forward writes in place); a device copy of a unit copies everything to the device
and retargets device constants baked into its graphs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from partitioner.rewrite import place_tensors

__all__ = [
    "HOST",
    "Unit",
    "takes_grad",
    "leaf",
    "detach",
    "differentiable",
    "working_copy",
    "unit_to",
    "unit_bytes",
    "clones",
    "call_inputs",
]


HOST = torch.device("cpu")


@dataclass(slots=True)
class Unit:
    """One thing timed alone: a layer's split submodule, or (fallback) one graph node."""

    layer: int
    """Index of the layer whose time it adds to."""
    name: str
    """Graph node name, for error messages."""
    fn: Callable[..., Any]
    """The submodule, function or method caller."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    """Recorded inputs: tensors detached, floating ones requiring grad as in the whole model."""
    clone_inputs: bool = False
    """The call writes an input in place (an error on a leaf that requires grad): feed it clones."""
    differentiable: bool = False
    """Some output is a floating tensor that requires grad: there is a backward to time."""
    nbytes: int = 0
    """Bytes of its tensors (inputs, parameters, buffers) once copied to a device."""


# --------------------------------------------------------------------------- tensors


def takes_grad(t: torch.Tensor) -> bool:
    """Whether a backward differentiates `t`: it requires grad and is floating (or complex)."""
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


def leaf(t: torch.Tensor, device: torch.device | None = None, *, copy: bool = False) -> torch.Tensor:
    """`t` detached (on `device` if given; a copy if `copy`), requiring grad as `t` does."""
    out = t.detach().to(t.device if device is None else device, copy=copy)
    return out.requires_grad_() if takes_grad(t) else out


def detach(value: Any) -> Any:
    """Every tensor of a pytree detached at a layer boundary, keeping ``requires_grad``."""
    return tree_map(lambda x: leaf(x) if isinstance(x, torch.Tensor) else x, value)


def differentiable(value: Any) -> list[torch.Tensor]:
    """The floating tensors of a pytree that require grad: where a backward starts."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and takes_grad(t)]


def _retarget(module: nn.Module, device: torch.device) -> None:
    """Make device constants baked into `module`'s graphs (``arange(..., device=cpu)``) `device`."""

    def swap(x: Any) -> Any:
        return device if isinstance(x, torch.device) and x != device else x

    for m in module.modules():
        if not isinstance(m, fx.GraphModule):
            continue
        changed = False
        for n in m.graph.nodes:
            args, kwargs = tree_map(swap, n.args), tree_map(swap, n.kwargs)
            if args != n.args or kwargs != n.kwargs:
                n.args, n.kwargs, changed = args, kwargs, True
        if changed:
            m.recompile()


def working_copy(gm: fx.GraphModule, written: frozenset[str] = frozenset()) -> fx.GraphModule:
    """A CPU copy of `gm` to split and run: parameters share storage, but for the `written`
    ones (that forward changes in place: the timing runs must not change the caller's), and
    the rest is copied."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().clone() if name in written else p.detach(), requires_grad=p.requires_grad)
        for name, p in gm.named_parameters(remove_duplicate=False)
        if p.device == HOST
    }
    work = copy.deepcopy(gm, place_tensors(gm, {}, "cpu", memo=memo))
    _retarget(work, HOST)
    return work


def _module_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `module` on `device`: every tensor copied there, device constants retargeted."""
    moved = copy.deepcopy(module, place_tensors(module, {}, str(device)))
    _retarget(moved, device)
    return moved


def unit_to(unit: Unit, device: torch.device) -> Unit:
    """`unit` with its module and recorded inputs copied to `device`."""

    def move(x: Any) -> Any:
        if isinstance(x, nn.Module):
            return _module_to(x, device)
        if isinstance(x, torch.Tensor):
            return leaf(x, device)
        if isinstance(x, torch.device):
            return device
        return x

    fn = move(unit.fn) if isinstance(unit.fn, nn.Module) else unit.fn
    args, kwargs = tree_map(move, (unit.args, unit.kwargs))
    return replace(unit, fn=fn, args=args, kwargs=kwargs)


def unit_bytes(unit: Unit) -> int:
    """Bytes of `unit`'s inputs, parameters and buffers, each tensor counted once."""
    tensors = {id(t): t for t in tree_leaves((unit.args, unit.kwargs)) if isinstance(t, torch.Tensor)}
    for m in [unit.fn, *tree_leaves((unit.args, unit.kwargs))]:
        if isinstance(m, nn.Module):
            tensors.update((id(t), t) for t in [*m.parameters(), *m.buffers()])
    return sum(t.numel() * t.element_size() for t in tensors.values())


def clones(value: Any) -> Any:
    """Every tensor of a pytree cloned, except parameters (never written by a forward)."""

    def clone(x: Any) -> Any:
        return x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter) else x

    return tree_map(clone, value)


def call_inputs(unit: Unit, grad: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs for one call: clones (recorded by autograd when `grad`) if the call writes them."""
    if not unit.clone_inputs:
        return unit.args, unit.kwargs
    with torch.set_grad_enabled(grad):
        return clones((unit.args, unit.kwargs))

