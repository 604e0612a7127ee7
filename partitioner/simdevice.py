"""Simulated logical devices ``cpu:0``, ``cpu:1``, ... on one CPU, for dry-running a placement.

A `LogicalTensor` holds a real CPU tensor and reports a logical device
``torch.device("cpu", k)``. Inside ``with SimulatedDevices(n) as sim:`` every op unwraps its
arguments, runs the ordinary CPU kernel (so the numbers are bit-identical to plain CPU) and
wraps its outputs again on the op's logical device. An op whose tensors live on two devices
raises `DeviceMismatchError`, as a GPU would; only transfers cross devices, and the mode logs
each one as a `CopyRecord` (source, destination, bytes, forward or backward).

What may meet in one op, and why (CUDA draws the same lines):

* Logical tensors on one device, plus 0-dim plain CPU tensors: CUDA kernels take CPU scalars.
* The index tensors of advanced indexing (``aten.index``, ``aten.index_put``) may be plain CPU
  tensors: ``x[[0, 2]]`` builds them on the host, and CUDA accepts host indices. Not logged.
* Any other plain CPU tensor beside logical ones raises: it is an input, parameter or buffer
  that was never placed.
* ``_to_copy`` (``.to``, ``.cpu``) and ``copy_`` are the transfers: they may cross, and are
  logged. Plain ``cpu`` (no index) is the host: ``.to("cpu")`` gives back a plain tensor.
* Ops given ``device=`` (factories, ``*_like``, ``new_*``) create on that device and read no
  data from their tensor arguments, so they never mismatch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
)

from partitioner.errors import DeviceError, DeviceMismatchError

__all__ = [
    "LogicalTensor",
    "SimulatedDevices",
    "CopyRecord",
    "is_logical",
    "logical_device",
    "place",
    "to_plain",
]

_HOST = torch.device("cpu")
_TENSOR_DATA: Any = torch._C.TensorBase.data  # the getset descriptor behind Tensor.data
_make_wrapper = torch.Tensor._make_wrapper_subclass
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


def logical_device(index: int) -> torch.device:
    """The logical device ``cpu:<index>``.

    Raises:
        DeviceError: ``index`` is not a non-negative int.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise DeviceError(f"a logical device index is an int >= 0, got {index!r}")
    return torch.device("cpu", index)


def is_logical(value: object) -> bool:
    """Whether ``value`` is a tensor on a simulated device (a `LogicalTensor`)."""
    return isinstance(value, LogicalTensor)


def to_plain(tree: Any) -> Any:
    """Replace every `LogicalTensor` in a pytree by the plain CPU tensor it holds.

    For inspecting results (``torch.testing.assert_close`` checks devices): the plain tensors
    share memory with the logical ones, carry no autograd history, and nothing is logged.
    """
    return pytree.tree_map_only(LogicalTensor, lambda t: t._elem.detach(), tree)


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move `module`'s parameters (with their grads) and buffers to `device`, in place.

    What ``module.to(device)`` does, for modules it cannot move: for a tensor subclass it
    swaps each parameter's contents with `torch.utils.swap_tensors`, which refuses tensors
    something holds a weak reference to, such as the parameters of a ``torch.export`` module
    (the export's fake-tensor memo holds them). `place` puts new tensors in the module
    instead, so other holders of the old ones (the model torch.export was given, an optimizer
    made before) keep them unchanged. Parameters tied within `module` stay tied. Plain tensor
    attributes (an export module's lifted constants) stay where they are, as with Module.to.

    Args:
        module: The module whose tensors move.
        device: ``"cpu:k"`` (a simulated device; needs an active `SimulatedDevices`), or any
            device ``Tensor.to`` accepts.

    Returns:
        `module`.

    Raises:
        DeviceError: `device` is a simulated one and no `SimulatedDevices` is active.
    """
    target = torch.device(device)
    if target.type == "cpu" and target.index is not None and not any(
        isinstance(m, SimulatedDevices) for m in _get_current_dispatch_mode_stack()
    ):
        raise DeviceError(f"place(..., '{target}') needs an active `with SimulatedDevices(n):`")
    moved: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for sub in module.modules():
            tables: tuple[dict[str, Any], ...] = (sub._parameters, sub._buffers)
            for table in tables:
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in moved:
                        moved[id(tensor)] = _moved(tensor, target)
                    table[name] = moved[id(tensor)]
    return module


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(tensor, nn.Parameter):
        return tensor.to(device)
    out: torch.Tensor = nn.Parameter(tensor.to(device), requires_grad=tensor.requires_grad)
    if tensor.grad is not None:
        out.grad = tensor.grad.to(device)
    return out


class LogicalTensor(torch.Tensor):
    """A real CPU tensor that reports the logical device ``cpu:<index>``.

    Made by ops inside `SimulatedDevices` (``x.to("cpu:1")``, ``torch.zeros(..., device=
    "cpu:1")``, ``module.to("cpu:1")``); autograd, ``nn.Parameter``, optimizers,
    ``state_dict``, ``copy.deepcopy`` and printing work on it as on any tensor.
    """

    _elem: torch.Tensor
    _index: int
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(
        cls, elem: torch.Tensor, index: int, requires_grad: bool = False
    ) -> LogicalTensor:
        if isinstance(elem, LogicalTensor) or elem.device.type != "cpu":
            raise TypeError(f"a LogicalTensor holds a plain CPU tensor, got {elem.device}")
        return _hold(elem, logical_device(index), requires_grad)

    def __tensor_flatten__(self) -> tuple[list[str], int]:
        return ["_elem"], self._index

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], index: int, outer_size: Any, outer_stride: Any
    ) -> LogicalTensor:
        return LogicalTensor(inner["_elem"], index)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        # Reached only outside SimulatedDevices (the mode runs first when active): the same
        # rules apply, but nothing is logged.
        return _run(func, args, kwargs or {}, None)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        text = repr(self._elem)[:-1] + f", device='{self.device}'"
        if self.grad_fn is not None:
            text += f", grad_fn=<{type(self.grad_fn).__name__}>"
        elif self.requires_grad:
            text += ", requires_grad=True"
        prefix = "Parameter containing:\n" if getattr(self, "_is_param", False) else ""
        return f"{prefix}{text})"

    def __format__(self, format_spec: str) -> str:
        if self.dim() == 0:
            return self._elem.item().__format__(format_spec)
        return object.__format__(self, format_spec)

    def tolist(self) -> Any:
        return self._elem.tolist()

    @property
    def data(self) -> torch.Tensor:
        return cast(torch.Tensor, _TENSOR_DATA.__get__(self, LogicalTensor))

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if isinstance(value, LogicalTensor):
            # Tensor's own setter copies shape, strides and device from `value`'s wrapper;
            # the held tensor has to follow.
            self._elem, self._index = value._elem, value._index
            _TENSOR_DATA.__set__(self, value)
        else:
            self._become_plain(value)

    def _become_plain(self, value: torch.Tensor) -> None:
        """Turn this object into a plain tensor holding `value`'s data (``p.data = plain``).

        ``Module.to("cpu")`` moves parameters so, and their grads after them. The class must
        change, which only `torch.utils.swap_tensors` does; autograd state stays as it was.
        """
        requires_grad, grad, extra = self.requires_grad, self.grad, dict(self.__dict__)
        if grad is not None:
            self.grad = None  # a grad must match its tensor's device: move it first
            if isinstance(grad, LogicalTensor):
                grad.data = grad._elem
        is_param = extra.pop("_is_param", False)
        for name in ("_elem", "_index"):
            extra.pop(name, None)
        plain = value.detach()
        torch.utils.swap_tensors(self, nn.Parameter(plain, False) if is_param else plain)
        self.__dict__.update(extra)
        self.requires_grad_(requires_grad)
        if grad is not None:
            self.grad = grad

    def __deepcopy__(self, memo: dict[int, Any]) -> LogicalTensor:
        if id(self) in memo:
            return cast(LogicalTensor, memo[id(self)])
        if not self.is_leaf:
            raise RuntimeError(
                "only graph leaves support deepcopy (the same rule as for plain tensors)"
            )
        # Deep-copying the held tensor through `memo` keeps views of one storage sharing it.
        new = LogicalTensor(
            copy.deepcopy(self._elem, memo), self._index, requires_grad=self.requires_grad
        )
        memo[id(self)] = new
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        for name, value in self.__dict__.items():
            if name not in ("_elem", "_index"):
                setattr(new, name, copy.deepcopy(value, memo))
        return new


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyRecord:
    """One copy between devices; the host (plain ``cpu``) counts as a device here."""

    src: torch.device
    """Where the data came from: ``cpu:k``, or ``cpu`` for the host."""
    dst: torch.device
    """Where the data went."""
    nbytes: int
    """Bytes read from the source: ``numel * element_size`` of the source tensor."""
    shape: tuple[int, ...]
    """Shape of the source tensor."""
    dtype: torch.dtype
    """Dtype of the source tensor."""
    backward: bool
    """Whether autograd's engine made it (a gradient copy during ``backward()``)."""
    op: str
    """The ATen op that moved it, e.g. ``aten._to_copy.default``."""

    @property
    def host(self) -> bool:
        """Whether one end is the host rather than a simulated device."""
        return self.src.index is None or self.dst.index is None

    def __str__(self) -> str:
        phase = "backward" if self.backward else "forward"
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.src} -> {self.dst}: {self.nbytes} B "
            f"({dtype}{list(self.shape)}, {phase}, {self.op})"
        )


class SimulatedDevices(TorchDispatchMode):
    """Run ops on simulated devices ``cpu:0`` .. ``cpu:<num_devices - 1>`` and log transfers.

    Run the whole step (placement, forward, ``backward()``, optimizer step) inside one
    ``with`` block: outside it, ``device="cpu:k"`` makes plain tensors, as in plain PyTorch.

    Example:
        >>> with SimulatedDevices(2) as sim:
        ...     x = torch.ones(4, 8).to("cpu:0")
        ...     y = (x * 2).to("cpu:1").sum()
        >>> y.device, sim.bytes_moved(host=False)
        (device(type='cpu', index=1), 128)

    Args:
        num_devices: how many logical devices exist; ``device="cpu:k"`` with
            ``k >= num_devices`` raises `DeviceError`.
    """

    def __init__(self, num_devices: int) -> None:
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise DeviceError(f"SimulatedDevices needs num_devices >= 1, got {num_devices!r}")
        super().__init__()
        self.num_devices = num_devices
        self._transfers: list[CopyRecord] = []
        self._constructors: list[_Constructors] = []

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The simulated devices, ``cpu:0`` first."""
        return tuple(torch.device("cpu", k) for k in range(self.num_devices))

    @property
    def transfers(self) -> tuple[CopyRecord, ...]:
        """Every transfer since construction or the last `reset`, in order."""
        return tuple(self._transfers)

    def bytes_moved(self, *, backward: bool | None = None, host: bool = True) -> int:
        """Total bytes of the logged transfers.

        Args:
            backward: ``False`` counts forward transfers only, ``True`` backward ones only,
                ``None`` both.
            host: whether to count transfers to or from the host (placing inputs and
                parameters, ``.to("cpu")``, ``load_state_dict`` from plain tensors).
        """
        return sum(t.nbytes for t in self._select(backward, host))

    def _select(self, backward: bool | None, host: bool) -> Iterator[CopyRecord]:
        for t in self._transfers:
            if (backward is None or t.backward == backward) and (host or not t.host):
                yield t

    def reset(self) -> None:
        """Forget the logged transfers."""
        self._transfers.clear()

    def _check_index(self, index: int) -> None:
        if index >= self.num_devices:
            raise DeviceError(
                f"cpu:{index} is not a simulated device: SimulatedDevices({self.num_devices}) "
                f"has cpu:0 .. cpu:{self.num_devices - 1}"
            )

    def _log(self, func: Any, source: torch.Tensor, src: int | None, dst: int | None) -> None:
        self._transfers.append(
            CopyRecord(
                src=_device(src),
                dst=_device(dst),
                nbytes=source.numel() * source.element_size(),
                shape=tuple(source.shape),
                dtype=source.dtype,
                # -1 outside backward(): the id of the graph task the engine is running.
                backward=torch._C._current_graph_task_id() != -1,
                op=str(func),
            )
        )

    def __enter__(self) -> SimulatedDevices:
        constructors = _Constructors(self)
        constructors.__enter__()
        self._constructors.append(constructors)
        try:
            super().__enter__()
        except BaseException:
            self._constructors.pop().__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._constructors.pop().__exit__(*exc)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps a subclass's __torch_dispatch__ in torch._disable_dynamo
        # unless this says False; the wrapper costs more than the rest of an op's overhead,
        # and nothing here is compiled.
        return False

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        return _run(func, args, kwargs or {}, self)


# torch.tensor and friends build on the host and copy to `device` below the Python dispatch
# key, so the dispatch mode never learns the device: catch them one level up.
_DATA_CONSTRUCTORS = frozenset({torch.tensor, torch.as_tensor, torch.asarray})
_NEW_TENSOR = torch.Tensor.new_tensor
_INTERCEPTED = _DATA_CONSTRUCTORS | {_NEW_TENSOR}


class _Constructors(TorchFunctionMode):
    """Give ``torch.tensor(data, device="cpu:k")`` and ``t.new_tensor(data)`` a logical device."""

    def __init__(self, sim: SimulatedDevices) -> None:
        super().__init__()
        self.sim = sim

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        # Every torch call made inside the mode comes here: pass the others on first.
        if func not in _INTERCEPTED:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if func is _NEW_TENSOR:
            device = kwargs.get("device") or args[0].device
        else:
            device = kwargs.get("device")
        device = torch.device(device) if device is not None else None
        if device is None or device.type != "cpu" or device.index is None:
            return func(*args, **kwargs)
        self.sim._check_index(device.index)
        data = args[1] if func is _NEW_TENSOR else args[0]
        host_kwargs = {**kwargs, "device": _HOST}
        requires_grad = bool(host_kwargs.pop("requires_grad", False))
        if isinstance(data, torch.Tensor):
            # A tensor argument moves (a logged transfer). torch.tensor and new_tensor copy
            # and detach; as_tensor and asarray keep autograd and alias where they can.
            dtype = kwargs.get("dtype") or (
                args[0].dtype if func is _NEW_TENSOR else data.dtype
            )
            if func is torch.tensor or func is _NEW_TENSOR:
                out = data.detach().to(device=device, dtype=dtype, copy=True)
            else:
                out = data.to(device=device, dtype=dtype, copy=bool(kwargs.get("copy")))
        else:
            # Python data goes host -> device, as on a GPU; the copy is logged.
            out = func(*args, **host_kwargs).to(device)
        return out.requires_grad_(requires_grad) if requires_grad else out


_LOGICAL: dict[int, torch.device] = {}


def _device(index: int | None) -> torch.device:
    if index is None:
        return _HOST
    device = _LOGICAL.get(index)
    if device is None:
        device = _LOGICAL[index] = torch.device("cpu", index)
    return device


def _index(value: object) -> int | None:
    return value._index if isinstance(value, LogicalTensor) else None


_STRIDED = torch.strided
_NO_KWARGS: dict[str, Any] = {}
_NUMBERS = frozenset({int, float, bool})


def _hold(elem: torch.Tensor, device: torch.device, requires_grad: bool = False) -> LogicalTensor:
    """Wrap `elem` on `device`: `LogicalTensor` without its checks, for the per-op path."""
    # Keyword arguments left at their defaults (strided, no grad) are not passed: parsing
    # each costs about as much as a dict lookup, and this runs for every output.
    rare = (
        {"layout": elem.layout, "requires_grad": requires_grad}
        if requires_grad or elem.layout is not _STRIDED
        else _NO_KWARGS
    )
    out = _make_wrapper(
        LogicalTensor,
        elem.shape,
        strides=elem.stride(),
        storage_offset=elem.storage_offset(),
        dtype=elem.dtype,
        device=device,
        **rare,
    )
    out._elem = elem
    out._index = device.index
    return cast(LogicalTensor, out)


class _Found:
    """What unwrapping an op's list and keyword arguments saw (the positional tensors are
    unwrapped inline in `_run`)."""

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


def _run(func: Any, args: Any, kwargs: dict[str, Any], sim: SimulatedDevices | None) -> Any:
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
                sim._check_index(out_index)
            plain_kwargs["device"] = _HOST
    elif id(func) in _COPY_INTO:
        out_index = _index(args[0])
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
            src = _index(args[0])
            if device is not None and device.type == "cpu" and src != out_index:
                sim._log(func, plain_args[0], src, out_index)
        elif id(func) in _COPY_INTO:
            src = _index(args[1])
            if src != out_index:
                sim._log(func, plain_args[1], src, out_index)
    if out_index is None and not by_elem:
        return out
    if type(out) is torch.Tensor:
        # One plain output (most ops): `_wrap` inlined.
        same = by_elem.get(id(out))
        if same is None:
            return out if out_index is None else _hold(out, _device(out_index))
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
        return out if index is None else _hold(out, _device(index))
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
