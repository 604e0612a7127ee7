"""Place layers on devices: a pure solver over plain cost tables (no torch).

The model, written out in `partitioner.solve.evaluate`: each layer goes to one device;
a device holds at most its capacity; the device index never goes back along an edge;
a value crossing devices is moved once per destination device at a per-link cost.
LATENCY minimises compute plus transfers, THROUGHPUT the busiest device's compute plus
its transfers in and out. Data parallelism (the whole model on every device) competes
when the problem prices it.

`solve` coarsens large graphs (`coarsen`), then solves chains exactly with the dynamic
program (`solve_dp`) and DAGs with the ILP (`solve_ilp`, HiGHS or CBC), warm-started
by the DP run along the topological order. `solve_brute` is the tests' oracle.
"""

from __future__ import annotations

import time
from dataclasses import replace

from partitioner.errors import InfeasibleError, SolverError
from partitioner.ir import Problem, Solution
from partitioner.options import SolverBackend, SolverOptions, Strategy
from partitioner.devices import format_bytes
from partitioner.solve._text import device_label
from partitioner.solve.brute import solve_brute
from partitioner.solve.coarsen import coarsen, expand
from partitioner.solve.dp import is_chain, solve_dp
from partitioner.solve.evaluate import Evaluation, Transfer, evaluate, simple_lower_bound
from partitioner.solve.feasibility import check_memory
from partitioner.solve.ilp import highs_available, solve_ilp

__all__ = [
    "solve",
    "evaluate",
    "Evaluation",
    "Transfer",
    "simple_lower_bound",
    "solve_dp",
    "solve_ilp",
    "solve_brute",
    "is_chain",
    "coarsen",
    "expand",
    "highs_available",
]


def solve(problem: Problem, options: SolverOptions = SolverOptions()) -> Solution:
    """Best placement of ``problem``'s layers, or data parallelism when that is faster.

    Graphs with more than ``options.max_candidates`` layers are coarsened first (the
    answer is then not proved optimal for the original layers). With
    `SolverBackend.AUTO`, chains go to the exact DP and other graphs to the ILP; with
    `SolverBackend.HIGHS` or `SolverBackend.CBC` every graph goes to the ILP.

    Args:
        problem: The cost tables.
        options: Backend, ILP time limit and gap, coarsening threshold.

    Returns:
        A `Solution` for the original layers whose ``objective_s`` is
        ``evaluate(problem, assignment).objective_s`` (``replica.time_s`` for
        `Strategy.DATA_PARALLEL`, whose assignment is all zeros).

    Raises:
        InfeasibleError: If neither a placement nor data parallelism fits memory; the
            message names the layer or device that binds and the numbers.
        SolverError: If `SolverBackend.DP` is asked for a graph that is not a chain, or
            the ILP backend fails.

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
    replica = problem.replica
    replica_fits = (
        replica is not None
        and len(replica.memory) == problem.num_devices
        and all(need <= room for need, room in zip(replica.memory, problem.capacity))
    )
    try:
        placed = _place(problem, options)
    except InfeasibleError as error:
        if not replica_fits:
            raise InfeasibleError(f"{error}{_replica_note(problem)}") from error
        placed = None
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
    if options.backend is SolverBackend.DP and not is_chain(problem):
        raise SolverError(
            "SolverBackend.DP is exact only on chains (each layer feeding only the next "
            "one, every layer fed by the previous one); this graph has skips or branches: "
            "use SolverBackend.AUTO, HIGHS or CBC"
        )
    if problem.num_layers <= options.max_candidates:
        return _solve_as_is(problem, options)
    coarse, groups = coarsen(problem, options.max_candidates)
    try:
        solution = _solve_as_is(coarse, options)
    except InfeasibleError:
        # Merged layers can pack worse than single ones: try the original layers.
        return _solve_as_is(problem, options)
    assignment = expand(solution.assignment, groups)
    objective = evaluate(problem, assignment).objective_s
    lower = min(objective, simple_lower_bound(problem))
    return replace(
        solution,
        assignment=assignment,
        objective_s=objective,
        lower_bound_s=lower,
        optimal=objective - lower <= options.gap * objective,
    )


def _solve_as_is(problem: Problem, options: SolverOptions) -> Solution:
    """The DP on chains (AUTO, DP), else the ILP warm-started by the DP heuristic."""
    chain = is_chain(problem)
    if options.backend is SolverBackend.DP or (options.backend is SolverBackend.AUTO and chain):
        return solve_dp(problem)
    try:
        start: tuple[int, ...] | None = solve_dp(problem).assignment
    except InfeasibleError:
        start = None  # No run along the layer order fits; the ILP may interleave branches.
    return solve_ilp(problem, options, warm_start=start)


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
