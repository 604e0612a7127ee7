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

from partitioner.simdevice.mode import CopyRecord, SimulatedDevices, place
from partitioner.simdevice.tensor import LogicalTensor, is_logical, logical_device, to_plain

__all__ = [
    "LogicalTensor",
    "SimulatedDevices",
    "CopyRecord",
    "is_logical",
    "logical_device",
    "place",
    "to_plain",
]
