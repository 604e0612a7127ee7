"""`LogicalTensor`: a real CPU tensor that reports a simulated device ``cpu:<k>``, and its helpers."""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch import nn

from partitioner.errors import DeviceError

__all__ = [
    "HOST",
    "LogicalTensor",
    "device_of",
    "hold",
    "index_of",
    "is_logical",
    "logical_device",
    "to_plain",
]

HOST = torch.device("cpu")
"""The host: plain ``cpu``, no index."""
_TENSOR_DATA: Any = torch._C.TensorBase.data  # the getset descriptor behind Tensor.data
_make_wrapper = torch.Tensor._make_wrapper_subclass
_STRIDED = torch.strided
_NO_KWARGS: dict[str, Any] = {}


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
        return hold(elem, logical_device(index), requires_grad)

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
        # rules apply, but nothing is logged. Imported here: the dispatch module builds on
        # this one.
        from partitioner.simdevice.dispatch import run

        return run(func, args, kwargs or {}, None)

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


_LOGICAL: dict[int, torch.device] = {}


def device_of(index: int | None) -> torch.device:
    """``cpu:<index>``, or the host for None; one `torch.device` per index, made once (per-op path)."""
    if index is None:
        return HOST
    device = _LOGICAL.get(index)
    if device is None:
        device = _LOGICAL[index] = torch.device("cpu", index)
    return device


def index_of(value: object) -> int | None:
    """The simulated device index of `value`, None for anything but a `LogicalTensor`."""
    return value._index if isinstance(value, LogicalTensor) else None


def hold(elem: torch.Tensor, device: torch.device, requires_grad: bool = False) -> LogicalTensor:
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

