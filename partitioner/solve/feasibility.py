"""Why no placement fits: the memory checks run before solving, and the messages they raise."""

from __future__ import annotations

import numpy as np

from partitioner.units import format_bytes
from partitioner.errors import InfeasibleError
from partitioner.ir import Problem
from partitioner.solve._text import device_label, layer_label, span_label

__all__ = ["check_memory", "device_ranges", "no_contiguous_fit"]


def check_memory(problem: Problem) -> None:
    """Raise when memory alone rules every placement out, whatever the order.

    Args:
        problem: The cost tables.

    Raises:
        InfeasibleError: If there are no devices, if one layer is larger than the largest
            device, or if all layers together exceed all devices together.
    """
    if problem.num_devices == 0:
        raise InfeasibleError(
            "there are no devices to place the layers on; name at least one device"
        )
    largest = max(range(problem.num_devices), key=lambda d: problem.capacity[d])
    for layer, need in enumerate(problem.memory):
        if need > problem.capacity[largest]:
            raise InfeasibleError(
                f"layer {layer_label(problem, layer)} needs {format_bytes(need)} but the largest "
                f"device {device_label(problem, largest)} has "
                f"{format_bytes(problem.capacity[largest])}; give it more memory or split the "
                f"layer finer"
            )
    total, room = sum(problem.memory), sum(problem.capacity)
    if total > room:
        raise InfeasibleError(
            f"the layers need {format_bytes(total)} in all but the devices hold "
            f"{format_bytes(room)} together; add devices or memory, or lower the memory use "
            f"(smaller batch, no optimizer state)"
        )


def device_ranges(problem: Problem) -> list[range]:
    """The devices each layer can take in a placement that fits memory and keeps the order.

    A layer and its ancestors sit on its device or earlier ones, so together they must fit
    in devices ``0..dev(i)``; the layer and its descendants must fit in ``dev(i)..D-1``; the
    layer itself must fit its device; and along an edge ``p -> c`` the ranges start and
    end no earlier for ``c`` than for ``p``. These are necessary conditions only: the ILP
    drops the variables outside the ranges.

    Returns:
        ``ranges[i]``: the candidate devices of layer i, in order (empty if there are none).
    """
    n, num_devices = problem.num_layers, problem.num_devices
    memory = np.asarray(problem.memory, dtype=np.int64)
    edges = sorted(
        {(v.producer, c) for v in problem.values if v.producer >= 0 for c in v.consumers if c >= 0}
    )
    ancestors = np.zeros((n, n), dtype=bool)
    for p, c in edges:  # Sorted by producer, so every row of p is complete when it is read.
        ancestors[c] |= ancestors[p]
        ancestors[c, p] = True
    before = memory + ancestors.astype(np.int64) @ memory
    after = memory + ancestors.T.astype(np.int64) @ memory
    capacity = np.asarray(problem.capacity, dtype=np.int64)
    up_to = np.cumsum(capacity)  # up_to[d]: devices 0..d together
    from_on = np.cumsum(capacity[::-1])[::-1]  # from_on[d]: devices d..D-1 together
    lo = np.searchsorted(up_to, before, side="left")
    hi = num_devices - 1 - np.searchsorted(from_on[::-1], after, side="left")
    changed = True
    while changed:
        changed = False
        for i in range(n):
            while lo[i] <= hi[i] and memory[i] > capacity[lo[i]]:
                lo[i], changed = lo[i] + 1, True
            while hi[i] >= lo[i] and memory[i] > capacity[hi[i]]:
                hi[i], changed = hi[i] - 1, True
        for p, c in edges:
            if lo[c] < lo[p]:
                lo[c], changed = lo[p], True
        for p, c in reversed(edges):
            if hi[p] > hi[c]:
                hi[p], changed = hi[c], True
    return [range(int(lo[i]), max(int(lo[i]), int(hi[i]) + 1)) for i in range(n)]


def _first_left_over(problem: Problem) -> int:
    """Fill the devices in order along the layers' order, each as far as it goes.

    On a chain this decides feasibility exactly: a placement in device order exists if
    and only if every layer gets placed (a device that takes the longest prefix that fits
    can only leave the later devices less to do).

    Returns:
        The first layer that finds no room, or ``num_layers`` when all fit.
    """
    device, used = 0, 0
    for layer, need in enumerate(problem.memory):
        while device < problem.num_devices and used + need > problem.capacity[device]:
            device, used = device + 1, 0
        if device == problem.num_devices:
            return layer
        used += need
    return problem.num_layers


def no_contiguous_fit(problem: Problem) -> InfeasibleError:
    """The error for a problem whose memory fits in total but in no device order.

    The message walks the greedy fill of `_first_left_over` to show where the room runs out.
    """
    first_left = _first_left_over(problem)
    rooms = ", ".join(
        f"{device_label(problem, d)} {format_bytes(problem.capacity[d])}"
        for d in range(problem.num_devices)
    )
    if first_left < problem.num_layers:
        left = sum(problem.memory[first_left:])
        where = (
            f"filling the devices in order ({rooms}) along the layers' order leaves "
            f"{span_label(problem, first_left, problem.num_layers - 1)} "
            f"({format_bytes(left)}) without room"
        )
    else:
        where = f"the devices ({rooms}) cannot hold the layers without sending a value back"
    return InfeasibleError(
        f"no contiguous placement fits: {where}; the layers need "
        f"{format_bytes(sum(problem.memory))} in all, but a device must hold whole runs of "
        f"consecutive layers; give the devices more memory or add a device"
    )
