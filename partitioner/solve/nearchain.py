"""Exact DP for near-chains: one layer order, broadcast values, links priced by destination.

A transformer is a chain of blocks plus a few values made early and read by every block
(attention mask, rotary cos/sin). That is no chain, but under three conditions a DP over
contiguous runs is still exact. Layers ``i = 0..N-1`` come in topological order, and
a link ``s -> e`` is *forward* when ``s < e``::

    (1) sequential   every pair of consecutive layers i, i + 1 is joined by a value
                     (`is_sequential`)
    (2) inbound      every forward link into a device costs the same, whatever its source:
                     seconds_per_byte[s][e] = a[e] and latency_s[s][e] = b[e] for s < e
                     (uniform links, e.g. identical GPUs on one switch, are a case)
    (3) LATENCY      the objective sums compute and transfers

The proof, in three steps.

* The placements are the run placements. By (1) and the device order along edges,
  ``dev(i) <= dev(i + 1)`` for every ``i``: ``dev`` never decreases, so each used device
  holds one run ``[j, k)`` of consecutive layers and the runs' devices increase.
  Conversely every such placement keeps the order along every edge, as edges go
  forward in the layer order.
* Their cost is a sum over runs. A value ``v`` made by layer ``p`` moves once to every
  other device holding one of its consumers (`evaluate`). A device holds one run, so
  that is once to every run other than ``p``'s holding a consumer; consumers come after
  ``p``, so a run ``[j, k)`` holding one is ``p``'s exactly when ``j <= p``. That run's
  device ``g`` comes after ``dev(p)``, so by (2) the move costs ``bytes(v) a[g] + b[g]``,
  wherever ``p`` sits. By (3) the objective is then the sum over runs ``[j, k)`` on ``g`` of::

      run(j, k, g) = sum_{j <= i < k} compute_s[i][g] + bytes(j, k) a[g] + count(j, k) b[g]
      bytes(j, k), count(j, k) = the bytes and number of the values v with
                                 0 <= producer(v) < j and a consumer in [j, k)

  (model inputs and outputs move nothing).
* A sum of per-run terms over runs with increasing devices and memory caps is what a
  DP minimises exactly (Bellman): with ``G[k, g]`` the best cost of layers ``0..k-1``
  whose last run ends at ``k`` on device ``g``::

      G[k, g] = min over j < k with memory(j, k) <= capacity[g] of
                (0 if j = 0 else min_{e < g} G[j, e]) + run(j, k, g)

  and the optimum is ``min_g G[N, g]``, in ``O(N^2 D)`` time.

Each condition is needed. Without (1) a placement may interleave two branches, which
no run along one order gives. Without (2) the price of a move into a run depends on the
producer's device, an earlier run that need not be the previous one. Without (3) a
device's THROUGHPUT load holds its transfers out, and a broadcast value's count of
moves out depends on every later run, not on the run itself.

Where (2) fails but (1) and (3) hold, pricing every forward link into ``e`` at the
cheapest one, ``a[e] = min_{s < e} seconds_per_byte[s][e]`` (and so for ``b``), prices
every transfer at most at its cost, so the DP's optimum is a lower bound on every
placement's cost; its placement, costed by `evaluate`, may meet it. Elsewhere the DP is
a heuristic over runs along the given order. `solve` uses both to seed the ILP.

THROUGHPUT (a pipeline's period, the busiest device's compute, inbound or outbound
traffic) on a sequential problem. The placements are still the run placements, and a
run ``[j, k)`` on ``g`` has its compute, and its inbound traffic ``bytes(j, k) a[g] +
count(j, k) b[g]`` as above. Its outbound traffic depends on the later runs: a value
made in the run goes once to every later run holding a consumer. It is at least once
if any consumer comes at or after ``k``, at the cheapest forward link out of ``g``::

    out(j, k, g) = out_bytes(j, k) a_out[g] + out_count(j, k) b_out[g]
    out_bytes(j, k), out_count(j, k) = the bytes and number of the values v with
                                       j <= producer(v) < k and a consumer >= k
    a_out[g] = min_{e > g} seconds_per_byte[g][e]                  (and so for b_out)

and a device's load is the largest of the three, so the bottleneck DP::

    G[k, g] = min over j < k with memory(j, k) <= capacity[g] of
              max(0 if j = 0 else min_{e < g} G[j, e],
                  compute(j, k, g), in(j, k, g), out(j, k, g))

(Bellman holds for a max as for a sum: the prefix's best is the best prefix) prices every
run placement at most at its period: its optimum bounds every placement from below. Its
placement, costed by `evaluate`, meets the bound when each value's later consumers fall
in one run and links are priced alike (identical GPUs on one switch, runs longer than
the skip edges): then it is optimal, proved with no ILP. ``O(N^2 D)`` time, vectorised
over run starts and devices. Without (1) it is a heuristic along the given order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from partitioner.ir import OUTPUT, Problem, Solution
from partitioner.options import Objective
from partitioner.solve.dp import bottleneck_runs, is_sequential, run_tables, trace_back
from partitioner.solve.evaluate import evaluate, placement_solution, simple_lower_bound
from partitioner.solve.feasibility import check_memory, no_contiguous_fit

__all__ = ["is_near_chain", "solve_near_chain"]

ROUNDING = 1e-12
"""Least relative error allowed the DP's float sums before its optimum is reported as a
lower bound (`_slack`)."""


def _slack(problem: Problem) -> float:
    """Relative error of the DP's run costs: a run's compute is a difference of prefix sums
    over up to N layers, off by about N eps of the prefix, which is at most D times the
    busiest run (4x for the margin)."""
    return max(ROUNDING, 4.0 * problem.num_layers * problem.num_devices * float(np.finfo(float).eps))


def is_near_chain(problem: Problem) -> bool:
    """Whether `solve_near_chain` is exact: conditions (1), (2) and (3) of the module docstring."""
    return (
        problem.objective is Objective.LATENCY
        and is_sequential(problem)
        and all(map(np.array_equal, _prices(problem, np.min), _prices(problem, np.max)))
    )


def solve_near_chain(problem: Problem) -> Solution:
    """Best placement in runs along the layer order, each value charged once per run.

    Args:
        problem: The cost tables; exact when `is_near_chain` holds.

    Returns:
        The placement, with its `evaluate` objective. When `is_near_chain` holds it is
        optimal. When only (2) fails, the lower bound is the DP's optimum with the
        cheapest forward links, and the placement the better of that DP's and the one
        with mean link prices: optimal if the first pays no more than its bound (up to
        `_slack`). Under THROUGHPUT on a sequential problem, the bottleneck DP of the
        module docstring gives the bound and the placement likewise. Otherwise (branches)
        it is a heuristic whose lower bound is `simple_lower_bound`.

    Raises:
        InfeasibleError: If no run placement fits memory (when `is_sequential` holds: no
            placement at all).
    """
    check_memory(problem)
    throughput = problem.objective is Objective.THROUGHPUT
    inbound = _inbound(problem)
    outbound = _outbound(problem) if throughput else None

    def runs(pick: Callable[..., Any]) -> tuple[tuple[int, ...], float] | None:
        if outbound is None:
            return _runs(problem, *inbound, *_prices(problem, pick))
        return _bottleneck_runs(problem, inbound, outbound, pick)

    cheapest = runs(np.min)
    if cheapest is None:
        raise no_contiguous_fit(problem)
    if is_near_chain(problem):
        return placement_solution(problem, cheapest[0], solver="dp", optimal=True)
    if is_sequential(problem):
        bound = cheapest[1]  # No placement costs less (condition (1)).
        slack = _slack(problem)
        if evaluate(problem, cheapest[0]).objective_s <= bound * (1 + slack):
            return placement_solution(problem, cheapest[0], solver="dp", optimal=True)
        lower = max(bound * (1 - slack), simple_lower_bound(problem))
    else:
        lower = None
    mean = runs(np.mean)
    assert mean is not None  # Which runs fit memory does not depend on the prices.
    assignment = min(cheapest[0], mean[0], key=lambda a: evaluate(problem, a).objective_s)
    return placement_solution(
        problem, assignment, solver="dp", optimal=False, lower_bound_s=lower
    )


def _prices(problem: Problem, pick: Callable[..., Any]) -> tuple[np.ndarray, np.ndarray]:
    """``pick`` (np.min, np.mean...) over the forward links into each device: ``(a, b)``.

    Device 0 has no forward link into it (nothing moves into the first run): 0.
    """
    per_byte, latency = (
        np.array([float(pick(column[:e])) if e else 0.0 for e, column in enumerate(zip(*table))])
        for table in (problem.seconds_per_byte, problem.latency_s)
    )
    return per_byte, latency


def _out_prices(problem: Problem, pick: Callable[..., Any]) -> tuple[np.ndarray, np.ndarray]:
    """``pick`` over the forward links out of each device: ``(a_out, b_out)``.

    The last device has none (a run there sends nothing forward): 0.
    """
    last = problem.num_devices - 1
    per_byte, latency = (
        np.array([float(pick(row[g + 1 :])) if g < last else 0.0 for g, row in enumerate(table)])
        for table in (problem.seconds_per_byte, problem.latency_s)
    )
    return per_byte, latency


def _inbound(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """``bytes[j, k]`` and ``count[j, k]`` of the module docstring, for ``0 <= j <= k <= N``.

    A value made by ``p`` counts for a run starting at ``j > p`` once the run reaches the
    first consumer at or after ``j``: difference arrays along ``k``, one entry per (value, j).
    """
    n = problem.num_layers
    rows, columns, sizes = [], [], []
    for value in problem.values:
        readers = np.array(sorted({c for c in value.consumers if c != OUTPUT}), dtype=np.int64)
        if value.producer < 0 or len(readers) == 0:
            continue
        starts = np.arange(value.producer + 1, readers[-1] + 1)
        reached = readers[np.searchsorted(readers, starts)]  # First consumer at or after j.
        rows.append(starts)
        columns.append(reached + 1)  # A run [j, k) holds it when k > reached.
        sizes.append(np.full(len(starts), float(value.bytes)))
    delta_bytes = np.zeros((n + 1, n + 2))
    delta_count = np.zeros((n + 1, n + 2))
    if rows:
        at = (np.concatenate(rows), np.concatenate(columns))
        np.add.at(delta_bytes, at, np.concatenate(sizes))
        np.add.at(delta_count, at, 1.0)
    for delta in (delta_bytes, delta_count):
        np.cumsum(delta, axis=1, out=delta)  # In place: the tables are (N + 1)^2.
    return delta_bytes[:, : n + 1], delta_count[:, : n + 1]


def _outbound(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """``out_bytes[j, k]`` and ``out_count[j, k]`` of the module docstring, ``0 <= j <= k <= N``.

    A value made by ``p`` whose last consumer is ``q`` counts for every run ``[j, k)``
    with ``j <= p < k <= q``: a rectangle, added with a two-dimensional difference array.
    """
    n = problem.num_layers
    delta_bytes = np.zeros((n + 2, n + 2))
    delta_count = np.zeros((n + 2, n + 2))
    for value in problem.values:
        readers = [c for c in value.consumers if c != OUTPUT]
        if value.producer < 0 or not readers:
            continue
        p, q = value.producer, max(readers)
        for delta, amount in ((delta_bytes, float(value.bytes)), (delta_count, 1.0)):
            delta[0, p + 1] += amount
            delta[0, q + 1] -= amount
            delta[p + 1, p + 1] -= amount
            delta[p + 1, q + 1] += amount
    for delta in (delta_bytes, delta_count):
        np.cumsum(delta, axis=0, out=delta)  # In place: the tables are (N + 2)^2.
        np.cumsum(delta, axis=1, out=delta)
    return delta_bytes[: n + 1, : n + 1], delta_count[: n + 1, : n + 1]


def _bottleneck_runs(
    problem: Problem,
    inbound: tuple[np.ndarray, np.ndarray],
    outbound: tuple[np.ndarray, np.ndarray],
    pick: Callable[..., Any],
) -> tuple[tuple[int, ...], float] | None:
    """The THROUGHPUT DP of the module docstring, links priced by ``pick``: the placement
    and its DP cost; None if no run fits."""
    compute, _ = run_tables(problem)
    (in_bytes, in_count), (out_bytes, out_count) = inbound, outbound
    a_in, b_in = _prices(problem, pick)
    a_out, b_out = _out_prices(problem, pick)

    def stage(k: int) -> np.ndarray:
        return np.maximum.reduce([
            compute[k, :][None, :] - compute[:k, :],
            in_bytes[:k, k, None] * a_in + in_count[:k, k, None] * b_in,
            out_bytes[:k, k, None] * a_out + out_count[:k, k, None] * b_out,
        ])

    return bottleneck_runs(problem, stage)


def _runs(
    problem: Problem,
    inbound_bytes: np.ndarray,
    inbound_count: np.ndarray,
    per_byte: np.ndarray,
    latency: np.ndarray,
) -> tuple[tuple[int, ...], float] | None:
    """The DP of the module docstring: the placement and its DP cost; None if no run fits."""
    n, num_devices = problem.num_layers, problem.num_devices
    if n == 0:
        return (), 0.0
    compute, first = run_tables(problem)

    cost = np.full((n + 1, num_devices), np.inf)  # cost[k, g] = G[k, g]
    start = np.zeros((n + 1, num_devices), dtype=np.int64)  # The best run's start j.
    # entry[j, g]: the best prefix before a run from j on g; entry_from[j, g]: its last device.
    entry = np.full((n + 1, num_devices), np.inf)
    entry[0, :] = 0.0
    entry_from = np.full((n + 1, num_devices), -1, dtype=np.int64)
    for k in range(1, n + 1):
        for g in range(num_devices):
            j0 = int(first[g, k])
            if j0 >= k:
                continue
            run = (
                entry[j0:k, g]
                + (compute[k, g] - compute[j0:k, g])
                + inbound_bytes[j0:k, k] * per_byte[g]
                + inbound_count[j0:k, k] * latency[g]
            )
            j = int(np.argmin(run))
            cost[k, g], start[k, g] = run[j], j0 + j
        # entry[k, g] = min_{e < g} cost[k, e], a running minimum (ties keep the lower e).
        best, best_from = np.inf, -1
        for g in range(num_devices):
            entry[k, g], entry_from[k, g] = best, best_from
            if cost[k, g] < best:
                best, best_from = float(cost[k, g]), g

    device = int(np.argmin(cost[n]))
    optimum = float(cost[n, device])
    if not np.isfinite(optimum):
        return None
    return trace_back(start, entry_from, device), optimum
