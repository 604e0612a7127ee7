"""Put a model back as it was after its forward ran for planning (tracing, the eager check).

Planning runs the user's ``forward``: torch.fx runs it on proxies (real ops still run on
tensors no proxy reaches, and ``self.calls += 1`` still counts), the safety replay runs it
eagerly, and torch.export runs its Python. A forward may change its module as it goes:
``self.step += 1`` on a buffer, an int counter, a weight updated in place under
``no_grad``, a cache list appended to. `preserved` undoes all of that:

- the attributes of every submodule (``vars(module)``), and one level into the lists,
  dicts and sets they hold (``_parameters``, ``_buffers``, ``_modules`` among them);
- each parameter's and buffer's data (a ``.data =`` swap keeps the old storage alive
  through an alias), ``requires_grad`` and ``.grad``;
- the values of tensors written in place. Cloning every parameter beforehand would
  double the model's memory; instead a dispatch mode clones a parameter or buffer the
  first time an op writes to its storage (copy on write), which costs nothing for a
  forward that writes nothing. Plain tensor attributes (not parameters or buffers,
  usually small) are copied up front: torch.export writes to them where no dispatch mode
  sees it. Tensors on ``meta`` hold no values and are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["named_tensors", "preserved"]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body, then put `model` back as it was before it (see the module docstring).

    A dispatch mode is active in the body: it saves a parameter or buffer before the first
    op that writes to it in place.
    """
    modules = _state_modules(model)
    saved = [_ModuleState(m) for m in modules]
    tensors = _TensorStates(modules)
    try:
        with _SaveBeforeWrite(tensors):
            yield
    finally:
        for state in saved:
            state.restore()
        tensors.restore()


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of `module` by qualified name: parameters, buffers, and plain tensor
    attributes (the constants torch.export lifts from ``forward``); aliases listed under each name."""
    named: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False))
    named += list(module.named_buffers(remove_duplicate=False))
    for name, sub in module.named_modules(remove_duplicate=False):
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and attr not in sub._buffers:
                named.append((f"{name}.{attr}" if name else attr, value))
    return named


def _state_modules(model: nn.Module) -> list[nn.Module]:
    return list(dict.fromkeys(m for _, m in model.named_modules(remove_duplicate=False)))


_CONTAINERS = (dict, list, set)


class _ModuleState:
    """A module's attributes, and the contents of the containers among them."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attrs = dict(vars(module))
        self.contents: list[tuple[Any, Any]] = [
            (value, value.copy()) for value in self.attrs.values() if isinstance(value, _CONTAINERS)
        ]

    def restore(self) -> None:
        attrs = vars(self.module)
        attrs.clear()
        attrs.update(self.attrs)
        for container, content in self.contents:
            if isinstance(container, list):
                container[:] = content
            else:
                container.clear()
                container.update(content)


def _storage_key(t: torch.Tensor) -> int | None:
    """The address of `t`'s storage, or None where it has none worth saving (meta, empty, sparse)."""
    if t.is_meta or t.layout is not torch.strided or t.is_nested:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - a tensor subclass without a real storage: nothing to save
        return None
    return ptr or None


class _TensorStates:
    """Every parameter, buffer and plain tensor attribute of the modules, as they were."""

    def __init__(self, modules: list[nn.Module]) -> None:
        seen: dict[int, torch.Tensor] = {}
        plain: list[torch.Tensor] = []
        for m in modules:
            for t in [*m._parameters.values(), *m._buffers.values()]:
                if t is not None:
                    seen.setdefault(id(t), t)
            for t in vars(m).values():
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen[id(t)] = t
                    plain.append(t)
        self.tensors = list(seen.values())
        # The alias holds the storage the tensor had, should forward swap it (``.data = ...``).
        self.before = [(t.detach(), t.requires_grad, t.grad) for t in self.tensors]
        self.by_storage: dict[int, list[torch.Tensor]] = {}
        for t in self.tensors:
            key = _storage_key(t)
            if key is not None:
                self.by_storage.setdefault(key, []).append(t)
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """id(tensor) -> (the tensor's alias, a copy of its values before the first write)."""
        # torch.export runs ops on fake copies of parameters and buffers, but writes to a
        # plain tensor attribute (a constant to it) for real, below any dispatch mode of
        # ours: those, usually small, are copied now.
        for t in plain:
            self.save(t)

    def save(self, written: torch.Tensor) -> None:
        """Copy the values of every tracked tensor sharing `written`'s storage, once."""
        key = _storage_key(written)
        for t in self.by_storage.pop(key, ()) if key is not None else ():
            alias = t.detach()
            self.copies[id(t)] = (alias, alias.clone())

    def restore(self) -> None:
        with torch.no_grad():
            for t, (alias, requires_grad, grad) in zip(self.tensors, self.before):
                if not _same_storage(t, alias):
                    t.data = alias
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
                if t.grad is not grad:
                    t.grad = grad
            for alias, values in self.copies.values():
                alias.copy_(values)


def _same_storage(t: torch.Tensor, alias: torch.Tensor) -> bool:
    return (
        t.shape == alias.shape
        and t.stride() == alias.stride()
        and t.dtype == alias.dtype
        and t.device == alias.device
        and (t.is_meta or t.data_ptr() == alias.data_ptr())
    )


class _SaveBeforeWrite(TorchDispatchMode):
    """Saves a tracked tensor's values before the first op that writes to its storage."""

    def __init__(self, tensors: _TensorStates) -> None:
        super().__init__()
        self.tensors = tensors

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.tensors.by_storage:
            if "batch_norm" in func.__name__:
                # Batch norm updates its running statistics in place though its schema does
                # not say so: save every tensor but the input (statistics, weight, bias: small).
                written = [*args[1:], *kwargs.values()]
            else:
                written = [
                    args[i] if i < len(args) else kwargs.get(arg.name)
                    for i, arg in enumerate(func._schema.arguments)
                    if arg.alias_info is not None and arg.alias_info.is_write
                ]
            for t in tree_leaves(written):
                if isinstance(t, torch.Tensor):
                    self.tensors.save(t)
        return func(*args, **kwargs)
