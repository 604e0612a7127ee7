"""The exception types users catch: each message names the cause, the numbers and a fix."""

from __future__ import annotations

__all__ = [
    "PartitionerError",
    "TraceError",
    "ProfileError",
    "DeviceError",
    "DeviceMismatchError",
    "InfeasibleError",
    "SolverError",
    "PlanFormatError",
    "PlanMismatchError",
    "ModelError",
]


class PartitionerError(Exception):
    """Base class of every error partitioner raises on purpose."""


class TraceError(PartitionerError):
    """No front end (torch.fx, torch.export) could turn the model into a graph."""


class ProfileError(PartitionerError):
    """A layer could not be profiled, or a device profile file is invalid."""


class DeviceError(PartitionerError, ValueError):
    """A device string or profile name is unknown, unavailable, duplicated or empty."""


class DeviceMismatchError(PartitionerError, RuntimeError):
    """One op got tensors on two devices: a transfer is missing before it (simulated devices)."""


class InfeasibleError(PartitionerError):
    """No placement fits the devices' memory; the message names what binds."""


class SolverError(PartitionerError):
    """The solver failed for a reason other than infeasibility."""


class PlanFormatError(PartitionerError, ValueError):
    """A saved plan is malformed (wrong types, missing keys, bad numbers)."""


class PlanMismatchError(PartitionerError):
    """A saved plan was made for another model (graph fingerprints differ)."""


class ModelError(PartitionerError, TypeError):
    """A ``path/to/file.py:factory`` does not give a model: the file or the factory fails,
    the factory takes arguments, or it returns something else than a model and its inputs."""
