"""`SimulatedDevices`: the mode that runs a step on simulated devices and logs its copies; `place`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
)

from partitioner.errors import DeviceError
from partitioner.simdevice.dispatch import run
from partitioner.simdevice.tensor import HOST, device_of

__all__ = ["CopyRecord", "SimulatedDevices", "place"]


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

    def check_index(self, index: int) -> None:
        """Refuse ``cpu:<index>`` unless this mode simulates it.

        Raises:
            DeviceError: `index` is ``num_devices`` or more.
        """
        if index >= self.num_devices:
            raise DeviceError(
                f"cpu:{index} is not a simulated device: SimulatedDevices({self.num_devices}) "
                f"has cpu:0 .. cpu:{self.num_devices - 1}"
            )

    def log_copy(self, func: Any, source: torch.Tensor, src: int | None, dst: int | None) -> None:
        """Log op `func` copying `source` from device `src` to `dst` (None: the host) as a `CopyRecord`."""
        self._transfers.append(
            CopyRecord(
                src=device_of(src),
                dst=device_of(dst),
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
        return run(func, args, kwargs or {}, self)


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
        self.sim.check_index(device.index)
        data = args[1] if func is _NEW_TENSOR else args[0]
        host_kwargs = {**kwargs, "device": HOST}
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
