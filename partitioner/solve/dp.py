"""Dynamic program over contiguous runs of layers: exact on chains, a heuristic on DAGs.

A placement that respects the device order along every edge of a chain cuts the layers
into runs ``[j, k)``, one per used device, the devices increasing from run to run (some
may be skipped). A run on device ``g`` that follows a run on device ``e`` and precedes
one on device ``h`` costs::

    compute(j, k, g) = sum_{j <= i < k} compute_s[i][g]           (memory(j, k) <= capacity[g])
    in               = cut(j, e, g),    out = cut(k, g, h)
    cut(k, s, t)     = sum over values v crossing the boundary before layer k of
                       bytes(v) * seconds_per_byte[s][t] + latency_s[s][t]

The state ``G[k, g, h]`` is the best cost of layers ``0..k-1`` whose last run ends at ``k``
on device ``g``, the next run starting on device ``h > g``; it already counts the cut into
``h``. With ``P = G[j, e, g]`` (or 0 for the first run)::

    LATENCY     G[k, g, h] = min_{j, e} P + compute(j, k, g) + cut(k, g, h)
    THROUGHPUT  G[k, g, h] = min_{j, e} max(P, in, compute(j, k, g), out)

Both sides of a cut pay it under THROUGHPUT, the receiver on its inbound lane, the
sender on its outbound one (`partitioner.solve.evaluate`), hence ``in`` there. Time is
``O(N^2 D + N D^2)`` for LATENCY (the next device only adds its cut, and the best
earlier device is taken once per boundary) and ``O(N^2 D^3)`` for THROUGHPUT (the
device pair at both ends of a run matters, as link costs differ per pair), vectorised
over the run starts; memory caps bound the runs' lengths.

When every link costs the same (`uniform_links`: one switch), a cut's price does not
depend on the devices and THROUGHPUT needs no pair: with ``E[j, g] = min_{e < g} G[j, e]``
(0 at ``j = 0``),

    G[k, g] = min_j max(E[j, g], cut(j), compute(j, k, g), cut(k))

in ``O(N^2 D)``, vectorised over run starts and devices (a thousand layers on 64
devices in well under a second).

On a DAG the runs are taken along the given topological order (so every edge keeps the
device order) and a value is charged at every boundary it crosses, as if it hopped from
run to run: an estimate, whose true cost `evaluate` then gives. It seeds and backs up
the ILP. Cf. alpa's ``training_dp`` (Zheng et al., OSDI 2022) and torchgpipe's
``blockpartition`` (Bárány & Grinberg's block partitions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from partitioner.ir import OUTPUT, Problem, Solution
from partitioner.options import Objective
from partitioner.solve.evaluate import placement_solution
from partitioner.solve.feasibility import check_memory, no_contiguous_fit

__all__ = ["bottleneck_runs", "dp_work", "exclusive_running_min", "is_chain", "is_sequential", "run_tables", "solve_dp", "trace_back", "uniform_links"]


def is_sequential(problem: Problem) -> bool:
    """Whether every pair of consecutive layers is joined by a value.

    Then the layer order is the only topological order, and every placement that keeps
    the device order along the edges is a run placement along it.
    """
    joined = [False] * problem.num_layers
    for value in problem.values:
        if value.producer >= 0 and value.producer + 1 in value.consumers:
            joined[value.producer + 1] = True
    return all(joined[1:])


def is_chain(problem: Problem) -> bool:
    """Whether the DP is exact: the layers form one path.

    Every value goes from layer ``i`` to layer ``i + 1`` (or to `OUTPUT`, or comes from
    `INPUT`), and every pair of consecutive layers is joined by a value. Without the
    second condition (say a layer reads only model inputs) the device order would not
    bind between the two parts, and runs along the layer order would be a restriction.
    """
    for value in problem.values:
        if value.producer >= 0 and any(
            c not in (OUTPUT, value.producer + 1) for c in value.consumers
        ):
            return False
    return is_sequential(problem)


def uniform_links(problem: Problem) -> bool:
    """Whether every link between two different devices has the same price."""
    n = problem.num_devices
    prices = {
        (problem.seconds_per_byte[s][t], problem.latency_s[s][t])
        for s in range(n)
        for t in range(n)
        if s != t
    }
    return len(prices) <= 1


def dp_work(problem: Problem) -> int:
    """About how many array entries `solve_dp` touches: ``N^2 D + N D^2`` (its tables hold
    ``N D^2`` entries), or ``N^2 D^3`` for THROUGHPUT over links of different prices (the
    module docstring)."""
    n, d = problem.num_layers, problem.num_devices
    pairs = problem.objective is Objective.THROUGHPUT and not uniform_links(problem)
    return n * n * d * (d * d if pairs else 1) + n * d * d


def solve_dp(problem: Problem) -> Solution:
    """Best placement in contiguous runs along the layer order.

    Args:
        problem: The cost tables; exact when `is_chain` holds, a heuristic otherwise.

    Returns:
        The placement, with its `evaluate` objective. On a chain it is optimal; otherwise
        ``optimal`` is False and the lower bound is `simple_lower_bound`.

    Raises:
        InfeasibleError: If no run placement fits memory (on a chain: no placement at all).
    """
    check_memory(problem)
    chain = is_chain(problem)
    cut = _cut_table(problem, chain)
    if problem.objective is Objective.THROUGHPUT and uniform_links(problem):
        assignment = _uniform_throughput_runs(problem, cut)
    else:
        assignment = _runs(problem, cut)
    if assignment is None:
        raise no_contiguous_fit(problem)
    return placement_solution(problem, assignment, solver="dp", optimal=chain)


def _cut_table(problem: Problem, chain: bool) -> np.ndarray:
    """cut[k, s, t]: seconds to move what crosses the boundary before layer k from s to t.

    On a chain a value crosses one boundary; otherwise every boundary between its
    producer and its last consumer (the hop-by-hop estimate).
    """
    n, num_devices = problem.num_layers, problem.num_devices
    # Difference arrays: a value adds its bytes and one transfer to boundaries p+1..last.
    crossing_bytes = np.zeros(n + 2)
    crossing_count = np.zeros(n + 2)
    for value in problem.values:
        readers = [c for c in value.consumers if c >= 0]
        if value.producer < 0 or not readers:
            continue
        last = value.producer + 1 if chain else max(readers)
        crossing_bytes[value.producer + 1] += value.bytes
        crossing_bytes[last + 1] -= value.bytes
        crossing_count[value.producer + 1] += 1
        crossing_count[last + 1] -= 1
    crossing_bytes = np.cumsum(crossing_bytes)[: n + 1]
    crossing_count = np.cumsum(crossing_count)[: n + 1]
    per_byte = np.asarray(problem.seconds_per_byte, dtype=float).reshape(num_devices, num_devices)
    latency = np.asarray(problem.latency_s, dtype=float).reshape(num_devices, num_devices)
    cut = crossing_bytes[:, None, None] * per_byte + crossing_count[:, None, None] * latency
    cut[:, np.arange(num_devices), np.arange(num_devices)] = 0.0
    return cut


def run_tables(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """What a DP over runs ``[j, k)`` of the layers needs to know of compute and memory.

    Returns:
        ``compute[k, g]``: seconds of layers ``0..k-1`` on device ``g`` (so a run costs
        ``compute[k, g] - compute[j, g]``), and ``first[g, k]``: the earliest start ``j``
        of a run ``[j, k)`` that fits device ``g`` (``k`` when not even layer ``k - 1`` does).
    """
    num_devices = problem.num_devices
    compute = np.vstack(
        [np.zeros(num_devices), np.cumsum(np.asarray(problem.compute_s, dtype=float), axis=0)]
    )
    memory = np.concatenate([[0], np.cumsum(np.asarray(problem.memory, dtype=np.int64))])
    capacity = np.asarray(problem.capacity, dtype=np.int64)
    first = np.searchsorted(memory, memory[None, :] - capacity[:, None], side="left")
    return compute, first


def _runs(problem: Problem, cut: np.ndarray) -> tuple[int, ...] | None:
    """The DP of the module docstring; None when no run placement fits memory."""
    n, num_devices = problem.num_layers, problem.num_devices
    if n == 0:
        return ()
    throughput = problem.objective is Objective.THROUGHPUT
    start = num_devices  # Row of G standing for "no earlier run" (only at j = 0).
    compute, first = run_tables(problem)

    # cost[j, e, g] = G[j, e, g]; e = start is the empty prefix.
    cost = np.full((n + 1, num_devices + 1, num_devices), np.inf)
    cost[0, start, :] = 0.0
    cut_in = np.zeros((n + 1, num_devices + 1, num_devices))
    cut_in[:, :num_devices, :] = cut
    back = np.zeros((n + 1, num_devices + 1, num_devices, 2), dtype=np.int64)
    final = np.full(num_devices, np.inf)
    final_back = np.zeros((num_devices, 2), dtype=np.int64)
    # LATENCY only: entry[j, g] = min_e G[j, e, g], the best prefix before a run from j on g.
    entry = np.full((n + 1, num_devices), np.inf)
    entry[0, :] = 0.0
    entry_from = np.full((n + 1, num_devices), start, dtype=np.int64)

    for k in range(1, n + 1):
        for g in range(num_devices):
            j0 = int(first[g, k])
            if j0 >= k:
                continue
            nexts = np.arange(g + 1, num_devices) if k < n else np.array([g])
            if len(nexts) == 0:
                continue
            run = compute[k, g] - compute[j0:k, g]  # (J,)
            outs = cut[k, g, nexts] if k < n else np.zeros(1)  # (H,)
            if throughput:
                total = np.maximum(
                    np.maximum(cost[j0:k, :, g], cut_in[j0:k, :, g])[:, :, None],
                    np.maximum(run[:, None, None], outs[None, None, :]),
                )  # (J, E, H)
                flat = total.reshape(-1, len(nexts))
                best = np.argmin(flat, axis=0)
                values = flat[best, np.arange(len(nexts))]
                j_best, e_best = np.divmod(best, num_devices + 1)
            else:
                lead = entry[j0:k, g] + run  # (J,): the next device only adds its cut.
                j = int(np.argmin(lead))
                values = lead[j] + outs
                j_best = np.full(len(nexts), j)
                e_best = np.full(len(nexts), entry_from[j0 + j, g])
            if k < n:
                cost[k, g, nexts] = values
                back[k, g, nexts, 0] = j0 + j_best
                back[k, g, nexts, 1] = e_best
            else:
                final[g] = values[0]
                final_back[g] = (j0 + j_best[0], e_best[0])
        if k < n and not throughput:
            entry[k] = cost[k].min(axis=0)
            entry_from[k] = cost[k].argmin(axis=0)

    device = int(np.argmin(final))
    if not np.isfinite(final[device]):
        return None
    assignment = [0] * n
    end, (begin, previous) = n, final_back[device]
    while True:
        assignment[int(begin) : end] = [device] * (end - int(begin))
        if previous == start:
            break
        end, device = int(begin), int(previous)
        begin, previous = back[end, device, assignment[end]]
    return tuple(assignment)


def _uniform_throughput_runs(problem: Problem, cut: np.ndarray) -> tuple[int, ...] | None:
    """THROUGHPUT over links of one price: the ``O(N^2 D)`` DP of the module docstring.

    None when no run placement fits memory.
    """
    n, num_devices = problem.num_layers, problem.num_devices
    compute, _ = run_tables(problem)
    # cut(k): the price of the boundary before layer k between any two devices.
    boundary = cut[:, 0, 1].copy() if num_devices > 1 else np.zeros(n + 1)
    boundary[0] = 0.0  # Nothing moves into the first run.

    def stage(k: int) -> np.ndarray:
        out = boundary[k] if k < n else 0.0
        return np.maximum(np.maximum(compute[k, :][None, :] - compute[:k, :], out), boundary[:k, None])

    found = bottleneck_runs(problem, stage)
    return None if found is None else found[0]


def bottleneck_runs(
    problem: Problem, stage: Callable[[int], np.ndarray]
) -> tuple[tuple[int, ...], float] | None:
    """The least largest run cost over run placements, in ``O(N^2 D)``.

    ``G[k, g] = min_j max(min_{e < g} G[j, e], stage(k)[j, g])`` (the prefix term is 0 at
    ``j = 0``) over the runs ``[j, k)`` that fit ``g``'s memory: Bellman holds for a
    maximum as for a sum.

    Args:
        problem: The cost tables (layers, devices, memory).
        stage: ``stage(k)[j, g]``: the cost of the run ``[j, k)`` on device ``g``, for
            ``0 <= j < k``, as a ``(k, D)`` array.

    Returns:
        The placement and its DP cost; None if no run placement fits memory.
    """
    n, num_devices = problem.num_layers, problem.num_devices
    if n == 0:
        return (), 0.0
    _, first = run_tables(problem)
    starts = np.arange(n + 1)[:, None]
    cost = np.full((n + 1, num_devices), np.inf)  # G[k, g]
    start = np.zeros((n + 1, num_devices), dtype=np.int64)  # The best run's first layer.
    # entry[j, g] = min_{e < g} G[j, e] (0 at j = 0), entry_from[j, g] its device e.
    entry = np.full((n + 1, num_devices), np.inf)
    entry[0, :] = 0.0
    entry_from = np.full((n + 1, num_devices), -1, dtype=np.int64)
    for k in range(1, n + 1):
        total = np.maximum(entry[:k, :], stage(k))
        total[starts[:k] < first[:, k][None, :]] = np.inf  # Runs too large for memory.
        best = np.argmin(total, axis=0)
        cost[k] = total[best, np.arange(num_devices)]
        start[k] = best
        if k < n:
            entry[k], entry_from[k] = exclusive_running_min(cost[k])
    device = int(np.argmin(cost[n]))
    optimum = float(cost[n, device])
    if not np.isfinite(optimum):
        return None
    return trace_back(start, entry_from, device), optimum


def exclusive_running_min(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``min_{e < g} row[e]`` for every ``g`` and the ``e`` it is found at (ties keep the
    lower ``e``); ``inf`` and ``-1`` at ``g = 0``, which has no earlier device."""
    size = len(row)
    entry = np.full(size, np.inf)
    entry_from = np.full(size, -1, dtype=np.int64)
    if size > 1:
        running = np.minimum.accumulate(row)
        entry[1:] = running[:-1]
        improves = np.concatenate([[True], row[1:] < running[:-1]])
        position = np.where(improves, np.arange(size), 0)
        entry_from[1:] = np.maximum.accumulate(position)[:-1]
    return entry, entry_from


def trace_back(start: np.ndarray, entry_from: np.ndarray, device: int) -> tuple[int, ...]:
    """The placement of a DP over runs that ends on ``device`` after the last layer.

    ``start[k, g]``: the first layer of the best run ending at ``k`` on ``g``;
    ``entry_from[j, g]``: the device of the run before one that starts at ``j`` on ``g``.
    """
    end = start.shape[0] - 1
    assignment = [0] * end
    while end > 0:
        begin = int(start[end, device])
        assignment[begin:end] = [device] * (end - begin)
        end, device = begin, int(entry_from[begin, device])
    return tuple(assignment)
