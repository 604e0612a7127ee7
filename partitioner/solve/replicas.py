"""Copies of the model, the batch split between them: data parallelism over some of the
devices, and copies of one placement on groups of alike devices (pure, no torch).

`solve` weighs these beside the single copy (a placement over every device, or the whole
model on every device, `Problem.replica`). Times are seconds, as `Problem.replica` prices
them: the slowest copy plus moving each copy's inputs and outputs (scatter and gather).

    data parallelism over S    `Problem.data_parallel`: the cost model prices each subset
                               S it offers (`partitioner.cost_model.data_parallel_costs`)
    r copies of a placement    devices are grouped by kind (equal columns in every compute
                               table and equal capacities, `device_kinds`); each copy takes
                               ``c_k = floor(n_k / r)`` devices of kind k, copy g the kind's
                               devices ``g c_k .. (g + 1) c_k - 1`` in list order
                               (`copy_groups`). One placement P, at the tables of
                               ``ceil(batch / r)`` samples (`BatchShare`), is solved on copy
                               0's devices by the caller's solver and run by every copy:
                               ``max_g objective(P on copy g) + sum_g overhead_g``, where
                               ``overhead_g`` moves copy g's share of the inputs from device 0
                               to the first device P uses in copy g, and its outputs back
                               (0 when that is device 0), as `Problem.replica` scatters

Every candidate's objective is exact for its configuration (`replicated_objective` prices
it for the plan and the benchmarks too). Its lower bound is the solver's bound for copy 0
plus each copy's least overhead (no copy finishes before copy 0 could), so the solution's
``optimal`` claims optimality over all these candidates and placements, within the gap;
with copies on unlike links (several nodes) the one placement P may not suit every copy,
and the bound then says how far it may be from the best.

Never worse with more devices. The candidates for the first ``n`` devices of a list are
among those for ``n + 1`` (a device added at the end): the cost model offers data
parallelism over the first ``k`` devices for every ``k``; a placement may leave a device
idle, so each copy's placement space only grows as ``c_k`` does; and alike devices are
interchangeable (`partitioner.solve.symmetry`), so which ones a copy takes does not change
its cost where their links agree (one node). With the placement solver exact within its
gap, the plan for ``n + 1`` devices is never predicted slower than the one for ``n`` by
more than that gap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from partitioner.errors import InfeasibleError
from partitioner.ir import INPUT, OUTPUT, BatchShare, Problem, ReplicaCost, Solution
from partitioner.options import SolverOptions, Strategy
from partitioner.solve.bounds import lower_bound
from partitioner.solve.evaluate import Evaluation, evaluate

__all__ = [
    "device_kinds",
    "copy_groups",
    "share_problem",
    "overhead_s",
    "copy_evaluations",
    "replicated_objective",
    "solve_with_replicas",
]

_Solver = Callable[[Problem, SolverOptions], Solution]


def device_kinds(problem: Problem) -> tuple[int, ...]:
    """A kind number per device: devices with equal compute columns (in `Problem.compute_s`
    and every `BatchShare`) and equal capacities share one; numbered in order of first use."""
    keys: dict[tuple[object, ...], int] = {}
    out = []
    for d in range(problem.num_devices):
        key = (
            tuple(row[d] for row in problem.compute_s),
            problem.capacity[d],
            tuple((tuple(row[d] for row in s.compute_s), s.capacity[d]) for s in problem.batch_shares),
        )
        out.append(keys.setdefault(key, len(keys)))
    return tuple(out)


def copy_groups(kinds: tuple[int, ...], copies: int) -> tuple[tuple[int, ...], ...] | None:
    """The devices of each of `copies` copies: ``floor(n_k / copies)`` devices of each kind k
    per copy, copy g taking the kind's ``g``-th block in list order; each group in list order.

    Returns:
        None when no kind has `copies` devices (a copy would have none).
    """
    members: dict[int, list[int]] = {}
    for d, kind in enumerate(kinds):
        members.setdefault(kind, []).append(d)
    groups: list[list[int]] = [[] for _ in range(copies)]
    for devices in members.values():
        c = len(devices) // copies
        for g in range(copies):
            groups[g] += devices[g * c : (g + 1) * c]
    if not groups[0]:
        return None
    return tuple(tuple(sorted(g)) for g in groups)


def share_problem(problem: Problem, share: BatchShare, group: tuple[int, ...]) -> Problem:
    """The problem of one copy: `share`'s tables on the devices of `group` (in its order)."""
    return Problem(
        compute_s=tuple(tuple(row[d] for d in group) for row in share.compute_s),
        memory=share.memory,
        capacity=tuple(share.capacity[d] for d in group),
        values=tuple(replace(v, bytes=b) for v, b in zip(problem.values, share.value_bytes, strict=True)),
        seconds_per_byte=tuple(tuple(problem.seconds_per_byte[a][b] for b in group) for a in group),
        latency_s=tuple(tuple(problem.latency_s[a][b] for b in group) for a in group),
        objective=problem.objective,
        names=problem.names,
        device_names=tuple(problem.device_names[d] for d in group) if problem.device_names else (),
    )


def overhead_s(problem: Problem, share: BatchShare, group: tuple[int, ...]) -> float:
    """Seconds to move one copy's share of the inputs from device 0 to the copy's first
    device and its outputs back (0 when that device is device 0)."""
    first = group[0]
    if first == 0:
        return 0.0
    total = 0.0
    for v, nbytes in zip(problem.values, share.value_bytes, strict=True):
        if v.producer == INPUT:
            total += nbytes * problem.seconds_per_byte[0][first] + problem.latency_s[0][first]
        if OUTPUT in v.consumers:
            total += nbytes * problem.seconds_per_byte[first][0] + problem.latency_s[first][0]
    return total


def copy_evaluations(problem: Problem, solution: Solution) -> tuple[Evaluation, ...]:
    """`evaluate` of each copy of a solution that copies a placement (`Strategy.HYBRID`, or
    `Strategy.DATA_PARALLEL` priced from a `BatchShare`): its share's tables on its devices.

    Raises:
        ValueError: The solution has no copies, or the problem no share for as many.
    """
    groups = solution.replicas
    share = next((s for s in problem.batch_shares if s.replicas == len(groups)), None)
    if not groups or share is None:
        raise ValueError(f"no batch share of {len(groups)} copies to price this solution with")
    local = {d: k for k, d in enumerate(groups[0])}
    inner = tuple(local[a] for a in solution.assignment)
    return tuple(evaluate(share_problem(problem, share, g), inner) for g in groups)


def replicated_objective(problem: Problem, solution: Solution) -> float:
    """The objective of a solution with copies, priced as `solve` prices it (module docstring):
    `Problem.replica` or the `Problem.data_parallel` entry over its devices, else its copies'
    `copy_evaluations` and overheads.

    Raises:
        ValueError: The problem prices no such configuration.
    """
    if solution.strategy is Strategy.DATA_PARALLEL and not solution.replicas:
        if problem.replica is None:
            raise ValueError("the problem prices no data parallelism over every device")
        return problem.replica.time_s
    devices = tuple(d for g in solution.replicas for d in g)
    priced = [r.time_s for r in problem.data_parallel if r.devices == devices]
    if priced and solution.strategy is Strategy.DATA_PARALLEL and solution.objective_s in priced:
        return solution.objective_s
    share = next(s for s in problem.batch_shares if s.replicas == len(solution.replicas))
    slowest = max(e.objective_s for e in copy_evaluations(problem, solution))
    return slowest + sum(overhead_s(problem, share, g) for g in solution.replicas)


def _count(problem: Problem, solution: Solution) -> int:
    """How many copies of the model a solution runs."""
    if solution.replicas:
        return len(solution.replicas)
    return problem.num_devices if solution.strategy is Strategy.DATA_PARALLEL else 1


def _fits(problem: Problem, replica: ReplicaCost) -> bool:
    return len(replica.memory) == problem.num_devices and all(
        need <= room for need, room in zip(replica.memory, problem.capacity)
    )


def _data_parallel(problem: Problem, replica: ReplicaCost) -> Solution:
    return Solution(
        strategy=Strategy.DATA_PARALLEL,
        assignment=(replica.devices[0],) * problem.num_layers,
        objective_s=replica.time_s,
        lower_bound_s=replica.time_s,
        optimal=True,
        solver="replicate",
        replicas=tuple((d,) for d in replica.devices),
    )


def _copies(
    problem: Problem, share: BatchShare, kinds: tuple[int, ...], options: SolverOptions, solver: _Solver, beat: float
) -> tuple[Solution | None, float]:
    """(the best ``share.replicas`` copies of one placement, or None where none fits or its
    bound cannot beat `beat`; a lower bound on every such configuration)."""
    groups = copy_groups(kinds, share.replicas)
    if groups is None:
        return None, math.inf
    first = share_problem(problem, share, groups[0])
    cheap = lower_bound(first)  # no copy finishes before copy 0 could; overheads are >= 0
    if cheap >= beat:
        return None, cheap
    try:
        inner = solver(first, options)
    except InfeasibleError:
        return None, math.inf
    # Copy 0's placement may run its devices in another order (unlike devices, `solve.order`):
    # every copy takes that order, so `assignment` indexes each group as copy 0's does.
    order = inner.device_order or tuple(range(len(groups[0])))
    groups = tuple(tuple(g[k] for k in order) for g in groups)
    used = sorted(set(inner.assignment))
    solution = Solution(
        strategy=Strategy.DATA_PARALLEL if len(used) == 1 else Strategy.HYBRID,
        assignment=tuple(groups[0][a] for a in inner.assignment),
        objective_s=0.0,
        lower_bound_s=0.0,
        optimal=False,
        solver="replicate" if len(used) == 1 else f"{inner.solver}+replicate",
        replicas=tuple(tuple(g[k] for k in used) for g in groups),
        orders=inner.orders,
    )
    objective = replicated_objective(problem, solution)
    # No configuration of these copies beats copy 0's bound plus, for each copy, the least
    # overhead of any device its placement could start on.
    least = sum(min(overhead_s(problem, share, g[k:]) for k in range(len(g))) for g in groups)
    lower = min(inner.lower_bound_s + least, objective)
    solution = replace(
        solution, objective_s=objective, lower_bound_s=lower, optimal=objective - lower <= options.gap * objective
    )
    return solution, solution.lower_bound_s


def solve_with_replicas(problem: Problem, options: SolverOptions, solver: _Solver) -> Solution:
    """The best of one copy (``solver`` on `problem` without its replication tables) and
    every replicated candidate (module docstring); ties go to the fewest copies.

    Raises:
        InfeasibleError: Nothing fits: the single copy's error.
    """
    base: Solution | None = None
    failure: InfeasibleError | None = None
    try:
        base = solver(replace(problem, data_parallel=(), batch_shares=()), options)
    except InfeasibleError as error:
        failure = error
    tried: list[Solution] = [] if base is None else [base]
    pruned: list[float] = []
    for replica in problem.data_parallel:
        if _fits(problem, replica):
            tried.append(_data_parallel(problem, replica))
    kinds = device_kinds(problem)
    # Most copies first: at small shares their bound is lowest, and a strong incumbent early
    # lets the bound of the others skip their solves.
    for share in sorted(problem.batch_shares, key=lambda s: -s.replicas):
        incumbent = min((s.objective_s for s in tried), default=math.inf)
        found, bound = _copies(problem, share, kinds, options, solver, incumbent)
        if found is not None:
            tried.append(found)
        else:
            pruned.append(bound)
    if not tried:
        assert failure is not None
        raise failure
    best = min(tried, key=lambda s: (s.objective_s, _count(problem, s)))  # of equals, the fewest copies
    lower = min([s.lower_bound_s for s in tried] + pruned)
    slack = best.objective_s * (1 - options.gap)
    optimal = best.optimal and all(s.optimal or s.lower_bound_s >= slack for s in tried)
    return replace(best, lower_bound_s=min(lower, best.objective_s), optimal=optimal)
