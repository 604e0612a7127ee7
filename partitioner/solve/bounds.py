"""Lower bounds no placement beats, cheap enough to try before any search.

`simple_lower_bound` (compute spread evenly, transfers and memory ignored) is weak under
THROUGHPUT when layers are coarse: eight devices cannot split 50 layers into eight
equal shares. `path_lower_bound` adds the shares' granularity.

Path bound (THROUGHPUT). The device index never goes back along an edge, so along any
path ``i_1 -> i_2 -> ... -> i_m`` of the layer graph it never decreases: a placement
cuts the path into runs on increasing devices (some skipped), whatever it does with the
layers off the path. Each device's compute is at least that of its run, and its memory
at least that run's. So the least bottleneck over run placements of the path, with
memory caps and transfers ignored,

    B(path) = min over runs [j_g, k_g) on devices g = 0..D-1 (in order) of
              max_g sum_{j_g <= t < k_g} compute_s[i_t][g],   sum memory[i_t] <= capacity[g],

bounds the THROUGHPUT objective of every placement from below. The path taken is the
heaviest by fastest compute (longest path in a DAG, one pass in topological order); on a
chain it is every layer, and the bound is the compute part of the chain DP's optimum.

``T >= B`` iff packing the path greedily (each device, in order, takes the longest run
that fits ``T`` and its memory) covers it: taking more on an earlier device never leaves
a longer rest. `B` is found by bisection on that test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from partitioner.ir import Problem
from partitioner.options import Objective
from partitioner.solve.evaluate import simple_lower_bound

__all__ = ["lower_bound", "path_lower_bound", "heaviest_path", "least_cover"]

_BISECTION_STEPS = 100
"""Halvings of the bracket; it stops sooner once it is within `_RELATIVE_SLACK`."""

_RELATIVE_SLACK = 1e-9
"""The bound is lowered by this fraction: prefix sums round differently from `evaluate`'s
per-device sums, and a bound must never exceed a placement's objective."""


def lower_bound(problem: Problem) -> float:
    """The best of `simple_lower_bound` and, under THROUGHPUT, `path_lower_bound`.

    ``math.inf`` when the heaviest path alone fits no run placement in memory (then no
    placement fits at all).
    """
    simple = simple_lower_bound(problem)
    if problem.objective is not Objective.THROUGHPUT or problem.num_layers == 0:
        return simple
    return max(simple, path_lower_bound(problem))


def heaviest_path(problem: Problem) -> list[int]:
    """The layers of a path of the layer graph with the most fastest-device compute.

    Layers are in topological order (`Problem`), so one pass over them finds it.
    """
    n = problem.num_layers
    if n == 0:
        return []
    weight = [min(row) for row in problem.compute_s]
    predecessors: list[set[int]] = [set() for _ in range(n)]
    for value in problem.values:
        if value.producer >= 0:
            for consumer in value.consumers:
                if consumer > value.producer:
                    predecessors[consumer].add(value.producer)
    best = list(weight)
    previous = [-1] * n
    for c in range(n):
        for p in predecessors[c]:
            if best[p] + weight[c] > best[c]:
                best[c], previous[c] = best[p] + weight[c], p
    layer = max(range(n), key=best.__getitem__)
    path = []
    while layer >= 0:
        path.append(layer)
        layer = previous[layer]
    return path[::-1]


def path_lower_bound(problem: Problem) -> float:
    """``B(heaviest path)`` of the module docstring, lowered by `_RELATIVE_SLACK`.

    Returns:
        A lower bound on the THROUGHPUT objective of every placement that fits memory and
        keeps the device order: ``math.inf`` if none can, 0.0 without layers.
    """
    path = heaviest_path(problem)
    if not path:
        return 0.0
    compute = np.asarray([problem.compute_s[i] for i in path], dtype=float)  # (m, D)
    if not np.all(np.isfinite(compute)):
        return 0.0
    # prefix[k, g]: compute of the path's first k layers on device g; memory likewise.
    prefix = np.vstack([np.zeros(problem.num_devices), np.cumsum(compute, axis=0)])
    memory = np.concatenate([[0], np.cumsum([problem.memory[i] for i in path], dtype=np.int64)])
    m = len(path)

    def covers(limit: float) -> bool:
        """Whether greedy runs of compute at most `limit` cover the path."""
        j = 0
        for g, capacity in enumerate(problem.capacity):
            by_memory = int(np.searchsorted(memory, memory[j] + capacity, side="right")) - 1
            by_compute = int(np.searchsorted(prefix[:, g], prefix[j, g] + limit, side="right")) - 1
            j = max(j, min(by_memory, by_compute, m))
            if j == m:
                return True
        return False

    return least_cover(covers, float(prefix[-1].max()))  # Every run fits the most compute.


def least_cover(covers: Callable[[float], bool], high: float) -> float:
    """The least ``T`` with ``covers(T)``, by bisection below ``high`` (which covers if
    anything does), lowered by `_RELATIVE_SLACK`: ``math.inf`` if not even an unbounded
    ``T`` covers, 0.0 if 0 does.
    """
    if not covers(math.inf):
        return math.inf
    low = 0.0
    if covers(low):
        return 0.0
    for _ in range(_BISECTION_STEPS):  # Invariant: covers(high), not covers(low).
        if high - low <= _RELATIVE_SLACK * high:
            break
        middle = (low + high) / 2
        if covers(middle):
            high = middle
        else:
            low = middle
    return low * (1 - _RELATIVE_SLACK)
