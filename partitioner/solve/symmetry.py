"""Interchangeable devices, and the canonical placement that fills them in order.

Devices ``d`` and ``d + 1`` are interchangeable when swapping them, the permutation
``tau = (d d+1)``, leaves the problem as it is, to the bit::

    compute_s[i][d]      = compute_s[i][d+1]     for every layer i
    capacity[d]          = capacity[d+1]
    link[tau(s)][tau(e)] = link[s][e]            for every s != e and
                                                 link in (seconds_per_byte, latency_s)

(several identical GPUs on one switch). Then a placement that leaves ``d`` empty and
uses ``d + 1`` has a twin that uses ``d`` instead, as good, so a solver may ask, with
no loss, that ``d + 1`` hold layers only if ``d`` does: identical devices fill in
order, idle ones last. The proof, for a placement ``A`` with ``d`` empty and ``d + 1``
used, and ``A' = tau(A)`` (the layers of ``d + 1`` moved to ``d``):

* the device order holds along every edge: ``tau`` keeps the order of any two devices
  but ``d`` and ``d + 1``, and no layer sits on ``d``;
* memory fits: the capacities are equal;
* the cost is the same: every device's compute is the one of its twin (equal columns),
  and every transfer ``s -> e`` becomes ``tau(s) -> tau(e)`` at the same price, so
  the LATENCY sum and the THROUGHPUT loads (permuted) are unchanged.

Each such move lowers the sum of the used devices' indices, so repeating it ends in a
placement where every interchangeable pair has ``used(d + 1) => used(d)``: every
placement, the optimal ones included, has a canonical twin of the same cost. The ILP
states it with a usage binary per device of a pair (cf. the ordering constraints for identical
machines of Sherali & Smith, "Improving discrete model representations via symmetry
considerations", Management Science, 2001); the DP's and the brute force's answers
are mapped to their twins with `canonical`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from partitioner.ir import Problem

__all__ = ["interchangeable", "canonical"]


def interchangeable(problem: Problem) -> tuple[int, ...]:
    """The devices ``d`` that are interchangeable with ``d + 1``.

    Args:
        problem: The cost tables.

    Returns:
        Every ``d`` (in order) whose swap with ``d + 1`` leaves compute, capacity and
        link costs exactly equal.
    """
    num_devices = problem.num_devices
    if num_devices < 2:
        return ()
    compute = np.asarray(problem.compute_s, dtype=float).reshape(-1, num_devices)
    links = [
        np.asarray(table, dtype=float).reshape(num_devices, num_devices)
        for table in (problem.seconds_per_byte, problem.latency_s)
    ]
    pairs = []
    for d in range(num_devices - 1):
        if problem.capacity[d] != problem.capacity[d + 1]:
            continue
        if not np.array_equal(compute[:, d], compute[:, d + 1]):
            continue
        if all(_swap_keeps(link, d) for link in links):
            pairs.append(d)
    return tuple(pairs)


def _swap_keeps(link: np.ndarray, d: int) -> bool:
    """Whether ``link[tau(s)][tau(e)] == link[s][e]`` for every ``s != e``, ``tau = (d d+1)``.

    Only the entries in rows or columns ``d`` and ``d + 1`` move, so the swap keeps the
    table when those two rows agree outside the two columns, those two columns agree
    outside the two rows, and the link between the pair costs the same both ways: O(D)
    per pair, instead of comparing two permuted D x D tables.
    """
    others = np.ones(link.shape[0], dtype=bool)
    others[[d, d + 1]] = False
    return (
        np.array_equal(link[d, others], link[d + 1, others])
        and np.array_equal(link[others, d], link[others, d + 1])
        and link[d, d + 1] == link[d + 1, d]
    )


def canonical(problem: Problem, assignment: Sequence[int]) -> tuple[int, ...]:
    """The twin of ``assignment`` in which interchangeable devices fill in order.

    Moves the layers of ``d + 1`` to ``d`` while some interchangeable ``d`` is empty
    and ``d + 1`` is not (see the module docstring): feasibility and every cost are
    unchanged, to the bit.

    Args:
        problem: The cost tables.
        assignment: One device index per layer.

    Returns:
        The placement with ``used(d + 1) => used(d)`` for every interchangeable ``d``.
    """
    placement = [int(d) for d in assignment]
    pairs = interchangeable(problem)
    used = set(placement)
    moved = True
    while moved:
        moved = False
        for d in pairs:
            if d not in used and d + 1 in used:
                placement = [d if device == d + 1 else device for device in placement]
                used = set(placement)
                moved = True
    return tuple(placement)
