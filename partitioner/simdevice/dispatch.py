"""How one op runs on simulated devices: unwrap, check the devices meet, run on CPU, wrap, log copies.

The rules (what may meet in one op, and why) are in the `partitioner.simdevice` docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from partitioner.errors import DeviceMismatchError
from partitioner.simdevice.tensor import HOST, LogicalTensor, device_of, hold, index_of

if TYPE_CHECKING:
    from partitioner.simdevice.mode import SimulatedDevices

__all__ = ["run"]

_aten = torch.ops.aten

# Ops are looked up by id(): OpOverloads are singletons, and their __hash__ is Python code
# that would run several times per op.
_TO_COPY = _aten._to_copy.default
# (dst, src) ops: the output lives where dst lives, the data comes from src.
_COPY_INTO = frozenset(map(id, (_aten.copy_.default, _aten.copy.default)))
# Advanced indexing: argument 1 (the list of index tensors) may stay on the host.
_HOST_INDICES = frozenset(
    map(
        id,
        (
            _aten.index.Tensor,
            _aten.index_put.default,
            _aten.index_put_.default,
            _aten._index_put_impl_.default,
        ),
    )
)

_STRIDED = torch.strided
_NO_KWARGS: dict[str, Any] = {}
_NUMBERS = frozenset({int, float, bool})

class _Found:
    """What unwrapping an op's list and keyword arguments saw (the positional tensors are
    unwrapped inline in `run`)."""

    __slots__ = ("by_elem", "indices", "stray")

    def __init__(self, by_elem: dict[int, LogicalTensor]) -> None:
        self.indices: set[int] = set()
        # id(held tensor) -> its wrapper, to hand back the caller's tensor from in-place ops.
        self.by_elem = by_elem
        # Whether a plain tensor of rank >= 1 sits where only logical ones may be.
        self.stray = False

    def unwrap(self, value: Any, host_ok: bool = False) -> Any:
        if isinstance(value, LogicalTensor):
            self.indices.add(value._index)
            self.by_elem[id(value._elem)] = value
            return value._elem
        if isinstance(value, torch.Tensor):
            if not host_ok and value.dim() != 0:
                self.stray = True
            return value
        if type(value) is list or type(value) is tuple:
            return type(value)([self.unwrap(v, host_ok) for v in value])
        return value


def run(func: Any, args: Any, kwargs: dict[str, Any], sim: SimulatedDevices | None) -> Any:
    """Run one op on the held CPU tensors and wrap its outputs on the op's device."""
    # This runs for every op, so the common case is inlined: positional tensors, all on one
    # device. `index` is the first device seen, `crossed` whether a second one (or a stray
    # plain tensor) was; lists and keyword arguments go through `_Found`.
    index: int | None = None
    crossed = False
    by_elem: dict[int, LogicalTensor] = {}
    found: _Found | None = None
    host_arg = 1 if id(func) in _HOST_INDICES else -1
    plain_args = list(args)
    i = 0
    for arg in args:
        if isinstance(arg, LogicalTensor):
            if index is None:
                index = arg._index
            elif arg._index != index:
                crossed = True
            elem = plain_args[i] = arg._elem
            by_elem[id(elem)] = arg
        elif isinstance(arg, torch.Tensor):
            if i != host_arg and arg.dim() != 0:
                crossed = True
        elif (type(arg) is list or type(arg) is tuple) and arg and type(arg[0]) not in _NUMBERS:
            # ATen lists hold one type: int[] and friends (sizes, strides) hold no tensors.
            found = found or _Found(by_elem)
            plain_args[i] = found.unwrap(arg, i == host_arg)
        i += 1
    plain_kwargs = kwargs
    if kwargs:
        found = found or _Found(by_elem)
        plain_kwargs = {k: found.unwrap(v) for k, v in kwargs.items()}
    if found is not None:
        crossed = crossed or found.stray
        if index is not None:
            found.indices.add(index)
        if found.indices:
            if len(found.indices) > 1:
                crossed = True
            index = next(iter(found.indices))

    out_index: int | None
    device = kwargs.get("device") if kwargs else None
    if device is not None:
        # A device argument names where the output goes; logical ones run on the host.
        out_index = device.index if device.type == "cpu" else None
        if out_index is not None:
            if sim is not None:
                sim.check_index(out_index)
            plain_kwargs["device"] = HOST
    elif id(func) in _COPY_INTO:
        out_index = index_of(args[0])
    elif index is None:
        return func._op(*args, **kwargs)
    elif crossed:
        raise _mismatch(func, args, kwargs, sim)
    else:
        out_index = index

    # OpOverload.__call__ only forwards to `_op`; calling it directly saves a Python frame.
    out = func._op(*plain_args, **plain_kwargs)

    if sim is not None:
        if func is _TO_COPY:
            src = index_of(args[0])
            if device is not None and device.type == "cpu" and src != out_index:
                sim.log_copy(func, plain_args[0], src, out_index)
        elif id(func) in _COPY_INTO:
            src = index_of(args[1])
            if src != out_index:
                sim.log_copy(func, plain_args[1], src, out_index)
    if out_index is None and not by_elem:
        return out
    if type(out) is torch.Tensor:
        # One plain output (most ops): `_wrap` inlined.
        same = by_elem.get(id(out))
        if same is None:
            return out if out_index is None else hold(out, device_of(out_index))
    return _wrap(func, out, out_index, by_elem)


def _wrap(func: Any, out: Any, index: int | None, by_elem: dict[int, LogicalTensor]) -> Any:
    if isinstance(out, torch.Tensor):
        same = by_elem.get(id(out))
        if same is not None:
            # In-place or out= op: hand back the caller's tensor, whose metadata must still
            # describe the held one (a wrapper's shape cannot change after creation).
            if (
                same.shape != out.shape
                or same.stride() != out.stride()
                or same.storage_offset() != out.storage_offset()
            ):
                raise NotImplementedError(
                    f"{func} changed the shape or strides of a tensor on {same.device} in "
                    "place, which simulated devices cannot follow; use the out-of-place op"
                )
            return same
        return out if index is None else hold(out, device_of(index))
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap(func, o, index, by_elem) for o in out)
    return out


def _named_tensors(func: Any, args: Any, kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(argument name, tensor) for every tensor an op got, lists expanded as ``name[i]``."""
    names = [a.name for a in func._schema.arguments]
    named: list[tuple[str, torch.Tensor]] = []
    items = [(names[i] if i < len(names) else str(i), a) for i, a in enumerate(args)]
    for name, value in [*items, *kwargs.items()]:
        if isinstance(value, torch.Tensor):
            named.append((name, value))
        elif isinstance(value, (list, tuple)):
            named.extend(
                (f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)
            )
    return named


def _mismatch(
    func: Any, args: Any, kwargs: dict[str, Any], sim: SimulatedDevices | None
) -> DeviceMismatchError:
    named = _named_tensors(func, args, kwargs)
    host_ok = id(func) in _HOST_INDICES
    logical = [(n, t) for n, t in named if isinstance(t, LogicalTensor)]
    strays = [
        (n, t)
        for n, t in named
        if not isinstance(t, LogicalTensor)
        and t.dim() != 0
        and not (host_ok and n.startswith("indices"))
    ]
    first: dict[torch.device, str] = {}
    for name, t in logical:
        first.setdefault(t.device, f"{t.device} ({name}, shape {list(t.shape)})")
    devices = sorted(first, key=lambda d: d.index)
    if len(devices) > 1:
        message = (
            f"{func} got tensors on {' and '.join(first[d] for d in devices)}; a transfer is "
            f"missing before this op: move the {devices[0]} tensor with .to('{devices[-1]}') "
            f"(or the other way round)"
        )
    else:
        name, stray = strays[0]
        message = (
            f"{func} got a plain CPU tensor ({name}, shape {list(stray.shape)}) beside tensors on "
            f"{first[devices[0]]}; it was never placed (a model input, or a tensor Module.to "
            f"does not move): call .to('{devices[0]}') on it first"
        )
    if sim is None:
        where = "backward()" if torch._C._current_graph_task_id() != -1 else "this op"
        message += (
            f". No SimulatedDevices is active around {where}, so device='cpu:k' made plain "
            "tensors: run the whole step, backward() included, inside `with SimulatedDevices(n):`"
        )
    return DeviceMismatchError(message)
