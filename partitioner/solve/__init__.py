"""Place layers on devices: a pure solver over plain cost tables (no torch).

The model, written out in `partitioner.solve.evaluate`: each layer goes to one device;
a device holds at most its capacity; the device index never goes back along an edge;
a value crossing devices is moved once per destination device at a per-link cost.
LATENCY minimises compute plus transfers, THROUGHPUT a pipeline's period: the largest of
any device's compute, transfers in and transfers out (which overlap compute). Data
parallelism (the whole model on every device) competes when the problem prices it.

`solve` coarsens large graphs (`coarsen`; chains only when even their DP would be slow),
then solves chains exactly with the dynamic
program (`solve_dp`), near-chains (one layer order, values broadcast to many layers,
links priced by destination, LATENCY: transformers on identical GPUs) exactly with the
run DP of `solve_near_chain`, and other graphs with the ILP (`solve_ilp`, HiGHS or
CBC), warm-started by the better of the two DPs run along the topological order.
Under THROUGHPUT, `solve_near_chain`'s bottleneck DP bounds every placement of a graph
with one layer order (skip and residual edges) and usually meets its bound, which
settles the placement with no ILP.
Copies of the model weigh in where the problem prices them (`solve_with_replicas`): data
parallelism over some of the devices, and copies of one placement on groups of alike
devices, the batch split between them; so more devices never make the plan slower.
Interchangeable devices are filled in order by every solver (`canonical`). The ILP reports
its incumbent, bound and gap while it runs, and stops on Ctrl-C, to the sink a caller sets
with `progress.reporting` (the ``partitioner`` command's status line).
On unlike devices the order of the devices along the pipeline is the solver's choice too:
`solve_in_best_order` (`partitioner.solve.order`) places the layers in every order of the
device classes that a bound does not cut, and returns the best with its order.
`solve_brute` is the tests' oracle. `lower_bound` (`partitioner.solve.bounds`) settles
what it can before any search: data parallelism that beats it needs no placement
searched, and a DP placement within the gap of it needs no ILP.
"""

from __future__ import annotations

import time
from dataclasses import replace

from partitioner.errors import InfeasibleError, SolverError
from partitioner.ir import Problem, Solution
from partitioner.options import SolverBackend, SolverOptions, Strategy
from partitioner.units import format_bytes
from partitioner.solve._text import device_label
from partitioner.solve.bounds import lower_bound, path_lower_bound
from partitioner.solve.brute import solve_brute
from partitioner.solve.coarsen import coarsen, expand
from partitioner.solve.dp import dp_work, is_chain, is_sequential, solve_dp, uniform_links
from partitioner.solve.evaluate import Evaluation, PricedTransfer, evaluate, simple_lower_bound
from partitioner.solve.feasibility import check_memory
from partitioner.solve.ilp import highs_available, solve_ilp
from partitioner.solve.nearchain import is_near_chain, solve_near_chain
from partitioner.solve.order import order_free_bound, reorder, solve_in_best_order
from partitioner.solve.replicas import solve_with_replicas
from partitioner.solve.symmetry import canonical, interchangeable

__all__ = [
    "solve",
    "evaluate",
    "Evaluation",
    "PricedTransfer",
    "simple_lower_bound",
    "lower_bound",
    "path_lower_bound",
    "solve_dp",
    "solve_near_chain",
    "solve_ilp",
    "solve_brute",
    "solve_with_replicas",
    "is_chain",
    "is_sequential",
    "uniform_links",
    "dp_work",
    "is_near_chain",
    "canonical",
    "interchangeable",
    "reorder",
    "order_free_bound",
    "coarsen",
    "expand",
    "highs_available",
]


def solve(problem: Problem, options: SolverOptions = SolverOptions()) -> Solution:
    """Best placement of ``problem``'s layers, or copies of the model when they are faster.

    Graphs with more than ``options.max_candidates`` layers are coarsened first (the
    answer is then not proved optimal for the original layers), but for chains whose
    exact DP stays cheap (about ``10**8`` array entries, `dp_work`). With
    `SolverBackend.AUTO` (or `SolverBackend.DP`), chains and near-chains go to their
    exact DPs and, with AUTO, other graphs to the ILP; with `SolverBackend.HIGHS` or
    `SolverBackend.CBC` every graph goes to the ILP.

    Args:
        problem: The cost tables.
        options: Backend, ILP time limit and gap, coarsening threshold.

    Unlike devices are placed in the best order found (`solve_in_best_order`), unless
    ``options.keep_device_order``; ``Solution.optimal`` then means optimal over every order.

    Returns:
        A `Solution` for the original layers whose ``objective_s`` is
        ``evaluate(reorder(problem, device_order), assignment).objective_s``
        (``replica.time_s`` for `Strategy.DATA_PARALLEL` over every device, whose
        assignment is all zeros and whose devices keep their order; the replicated
        candidate's time where `Solution.replicas` names the copies, whose assignment
        indexes the problem's devices as given).

    Raises:
        InfeasibleError: If neither a placement nor data parallelism fits memory; the
            message names the layer or device that binds and the numbers.
        SolverError: If `SolverBackend.DP` is asked for a problem that neither `is_chain`
            nor `is_near_chain`, or the ILP backend fails.

    Example:
        >>> from partitioner.ir import Problem, Value
        >>> chain = Problem(
        ...     compute_s=((1.0, 1.0), (1.0, 1.0)), memory=(6, 6), capacity=(8, 8),
        ...     values=(Value(name="h", producer=0, consumers=(1,), bytes=100),),
        ...     seconds_per_byte=((0.0, 0.01), (0.01, 0.0)), latency_s=((0.0, 0.0), (0.0, 0.0)),
        ... )
        >>> solve(chain).assignment, solve(chain).objective_s
        ((0, 1), 3.0)
    """
    begin = time.perf_counter()
    if problem.data_parallel or problem.batch_shares:
        solution = solve_with_replicas(problem, options, solve)
        return replace(solution, solve_time_s=time.perf_counter() - begin)
    replica = problem.replica
    replica_fits = (
        replica is not None
        and len(replica.memory) == problem.num_devices
        and all(need <= room for need, room in zip(replica.memory, problem.capacity))
    )
    # None: data parallelism wins with no placement to weigh, as none fits or none can beat it.
    placed: Solution | None = None
    if not (replica_fits and replica is not None and replica.time_s < order_free_bound(problem)):
        try:
            placed = solve_in_best_order(problem, options, _place)
        except InfeasibleError as error:
            if not replica_fits:
                raise InfeasibleError(f"{error}{_replica_note(problem)}") from error
    if replica_fits and replica is not None and (
        placed is None or replica.time_s < placed.objective_s
    ):
        time_s = replica.time_s
        lower = time_s if placed is None else min(time_s, placed.lower_bound_s)
        return Solution(
            strategy=Strategy.DATA_PARALLEL,
            assignment=(0,) * problem.num_layers,
            objective_s=time_s,
            lower_bound_s=lower,
            optimal=placed is None or placed.optimal or time_s <= placed.lower_bound_s,
            solver="replicate",
            solve_time_s=time.perf_counter() - begin,
        )
    assert placed is not None
    return replace(placed, solve_time_s=time.perf_counter() - begin)


def _place(problem: Problem, options: SolverOptions) -> Solution:
    """Best model-parallel placement of the original layers."""
    check_memory(problem)
    if options.backend is SolverBackend.DP and not (is_chain(problem) or is_near_chain(problem)):
        raise SolverError(
            "SolverBackend.DP is exact only on chains (each layer feeding only the next "
            "one, every layer fed by the previous one) and on near-chains (every layer fed "
            "by the previous one, links priced by destination alone, LATENCY); this problem "
            "is neither: use SolverBackend.AUTO, HIGHS or CBC"
        )
    if problem.num_layers <= options.max_candidates or _exact_dp_affordable(problem, options):
        return _solve_as_is(problem, options)
    runs = _runs_as_is(problem, options)
    if runs is not None:
        runs = _with_bound(runs, lower_bound(problem), options.gap)
        if runs.optimal:
            return runs
    coarse, groups = coarsen(problem, options.max_candidates)
    try:
        solution = _solve_as_is(coarse, options)
    except InfeasibleError:
        # Merged layers can pack worse than single ones: try the original layers.
        return _solve_as_is(problem, options)
    assignment = expand(solution.assignment, groups)
    objective = evaluate(problem, assignment).objective_s
    lower = lower_bound(problem)
    if runs is not None:
        lower = max(lower, runs.lower_bound_s)
        if runs.objective_s < objective:
            solution, assignment, objective = runs, runs.assignment, runs.objective_s
    lower = min(objective, lower)
    return replace(
        solution,
        assignment=assignment,
        objective_s=objective,
        lower_bound_s=lower,
        optimal=objective - lower <= options.gap * objective,
    )


_DP_WORK_LIMIT = 10**8
"""Array entries the chain DP may touch before a long chain is coarsened (about a second)."""


def _exact_dp_affordable(problem: Problem, options: SolverOptions) -> bool:
    """Whether a chain too long for the ILP is cheap enough for its exact DP as it is."""
    return (
        options.backend in (SolverBackend.AUTO, SolverBackend.DP)
        and is_chain(problem)
        and dp_work(problem) <= _DP_WORK_LIMIT
    )


_RUN_TABLE_LIMIT = 4 * 10**6
"""Entries of one of `solve_near_chain`'s ``(N + 2)^2`` run tables (about 2,000 layers: four
tables of 32 MB)."""


def _runs_as_is(problem: Problem, options: SolverOptions) -> Solution | None:
    """`solve_near_chain` on a graph too large for the ILP but with one layer order, where
    it bounds every placement, and its tables stay small; None elsewhere, or when no run
    placement fits."""
    n = problem.num_layers
    affordable = (
        options.backend in (SolverBackend.AUTO, SolverBackend.DP)
        and (n + 2) ** 2 <= _RUN_TABLE_LIMIT
        and n * n * problem.num_devices <= _DP_WORK_LIMIT
        and is_sequential(problem)
    )
    if not affordable:
        return None
    try:
        return solve_near_chain(problem)
    except InfeasibleError:
        return None


def _solve_as_is(problem: Problem, options: SolverOptions) -> Solution:
    """An exact DP where one is (AUTO, DP), else the ILP seeded by both DPs.

    The better DP placement warm-starts the ILP. `solve_near_chain` also proves a bound
    where only the links' prices keep it from being exact: with AUTO, a DP placement
    within ``options.gap`` of it is returned without the ILP, and else it may sharpen
    the ILP's bound.
    """
    if options.backend in (SolverBackend.AUTO, SolverBackend.DP):
        if is_chain(problem):
            return solve_dp(problem)
        if is_near_chain(problem):
            return solve_near_chain(problem)
    seeds = []
    for heuristic in (solve_dp, solve_near_chain):
        try:
            seeds.append(heuristic(problem))
        except InfeasibleError:
            pass  # No run along the layer order fits; the ILP may interleave branches.
    if not seeds:
        return solve_ilp(problem, options)
    lower = max(lower_bound(problem), *(seed.lower_bound_s for seed in seeds))
    best = _with_bound(min(seeds, key=lambda seed: seed.objective_s), lower, options.gap)
    if options.backend is SolverBackend.AUTO and best.optimal:
        return best
    return _with_bound(solve_ilp(problem, options, warm_start=best.assignment), lower, options.gap)


def _with_bound(solution: Solution, lower_bound_s: float, gap: float) -> Solution:
    """``solution`` with the better of its bound and ``lower_bound_s``; optimal within ``gap``."""
    lower = min(max(lower_bound_s, solution.lower_bound_s), solution.objective_s)
    within = solution.objective_s - lower <= gap * solution.objective_s
    return replace(solution, lower_bound_s=lower, optimal=solution.optimal or within)


def _replica_note(problem: Problem) -> str:
    """Why data parallelism is no way out either, if the problem priced it."""
    replica = problem.replica
    if replica is None:
        return ""
    if len(replica.memory) != problem.num_devices:
        return (
            f"; data parallelism was priced for {len(replica.memory)} devices, "
            f"not {problem.num_devices}"
        )
    for d, (need, room) in enumerate(zip(replica.memory, problem.capacity)):
        if need > room:
            return (
                f"; data parallelism needs {format_bytes(need)} on "
                f"{device_label(problem, d)}, which has {format_bytes(room)}"
            )
    return ""
