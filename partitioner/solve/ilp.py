"""The placement as a mixed-integer program (pulp; HiGHS when installed, else CBC).

Sets: layers ``i`` (topological order), devices ``d, s, e`` (in order), edges ``(p, c)``
(some value of layer ``p`` is read by layer ``c``), bundles ``b`` (the values of one
producer with the same consumer set, which move together: ``B_b`` bytes, ``K_b``
values). Times are in units of ``scale`` seconds (about the warm start's objective, so
that the solver's absolute tolerances mean the same on microseconds as on hours)::

    y[i, d] in {0, 1}        = [dev(i) <= d]                  d < D - 1; y[i, D-1] = 1
    x[i, d]                  = y[i, d] - y[i, d-1]            = [dev(i) = d]
    z[p, c, s, e] in [0, 1]  = [dev(p) = s and dev(c) = e]    s <= e
    m[b, s, e]               = [bundle b moves from s to e]   s < e
                             = z[p, c, s, e] when b has one consumer c, else a variable
                               with m >= z[p, c, s, e] for each consumer c
    u[d] in {0, 1}           = [device d holds a layer]       d of an interchangeable pair
    cost[b, s, e]            = B_b * seconds_per_byte[s][e] + K_b * latency_s[s][e]

    [Monotone]    y[i, d-1] <= y[i, d]
    [Joint]       sum_{e >= s} z[p, c, s, e] = x[p, s],   sum_{s <= e} z[p, c, s, e] = x[c, e]
    [Memory]      sum_i memory[i] x[i, d] <= capacity[d]
    [Usage]       x[i, d] <= u[d] for every i,   u[d] <= sum_i x[i, d]
    [Symmetry]    u[d+1] <= u[d]   when devices d and d + 1 are interchangeable
    LATENCY       min sum_{i, d} compute_s[i][d] x[i, d] + sum_{b, s < e} cost[b, s, e] m[b, s, e]
    THROUGHPUT    min T,  T >= sum_i compute_s[i][d] x[i, d]
                          T >= sum_{b, s < d} cost[b, s, d] m[b, s, d]
                          T >= sum_{b, e > d} cost[b, d, e] m[b, d, e]        for every d
                  (transfers overlap compute: `partitioner.solve.evaluate`)

Variables exist only inside each layer's range of candidate devices (`device_ranges`:
what its ancestors and descendants leave room for); ``x`` is 0 outside it. With tight
memory this removes most of the model.

``z`` is the joint placement of an edge's two ends: integral ``x`` force it, and
``z`` exists only for ``s <= e``, so [Joint] also keeps the device order along every
edge (``dev(p) <= dev(c)``, as prefix sums ``sum_{d' <= d} x[c, d'] <= sum_{d' <= d} x[p, d']``
even in the LP relaxation). Per-link costs are exact, and the relaxation is tighter than
the usual ``m >= x[p, s] + x[c, e] - 1`` (the product of two assignments linearised by
their joint, as Adams & Johnson, 1994, do for the QAP). Cf. the contiguous-placement ILP
of Tarnawski et al., "Efficient algorithms for device placement of DNN graph
operators", NeurIPS 2020.

[Symmetry] removes no optimum (`partitioner.solve.symmetry` has the proof) but spares
the solver the proof of optimality over every relabelling of identical devices: with
8 identical GPUs and room for the model on 4, there are 70 ways to pick the 4, all of
them the same plan. The warm start is given as its canonical twin, which meets it.

Neither backend sees the objective's constant term (pulp hands over only the
variables' costs), yet the relative gap at which the solver stops is measured on
what it sees. The constant (the compute of layers pinned to one device, and of the
last device, ``x[i, D-1] = 1 - y[i, D-2]``) can be nearly all of a LATENCY objective,
the placement moving only transfers, so it rides on a variable fixed at 1: the
solver then stops at the gap of the whole objective, the one `Solution.gap` reports.

The LATENCY bound is usually close. The THROUGHPUT bound is weak when memory is loose:
the relaxation spreads every layer over all devices and moves nothing, so large DAGs
often stop at the time limit with a gap although the placement found is good.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pulp

from partitioner.errors import SolverError
from partitioner.ir import Problem, Solution
from partitioner.options import Objective, SolverBackend, SolverOptions
from partitioner.solve.evaluate import evaluate, placement_solution, simple_lower_bound
from partitioner.solve.feasibility import check_memory, device_ranges, no_contiguous_fit
from partitioner.units import format_seconds
from partitioner.progress import note, say
from partitioner.solve.symmetry import canonical, interchangeable

__all__ = ["highs_available", "solve_ilp"]

MEMORY_TOLERANCE = 1e-6
"""Relative slack a MIP solver may leave on a row (HiGHS' and CBC's default feasibility
tolerance); capacities are tightened by it so that a solution the solver accepts fits
to the byte."""


class _HiGHSWithStart(pulp.HiGHS):
    """pulp's HiGHS interface, silent from the start, also handing the variables' initial
    values to HiGHS, reporting progress and stopping on Ctrl-C (`_run_highs`)."""

    scale = 1.0
    """Seconds per model time unit (`_time_scale`), for the progress lines."""

    def createAndConfigureSolver(self, lp: Any) -> None:
        # What `solve_ilp` asks for, gap and time limit, on a silent instance (pulp's own
        # method would also set threads, callbacks and extra options, which it never passes).
        lp.solverModel = _quiet_highs()
        lp.solverModel.setOptionValue("mip_rel_gap", float(self.gapRel))
        lp.solverModel.setOptionValue("time_limit", float(self.timeLimit))

    def callSolver(self, lp: Any) -> None:
        start = [(v.index, v.varValue) for v in lp.variables() if v.varValue is not None]
        if start:
            index, value = zip(*start)
            lp.solverModel.setSolution(
                len(index), np.asarray(index, dtype=np.int32), np.asarray(value, dtype=float)
            )
        _run_highs(lp.solverModel, self.scale, float(self.timeLimit))


_REPORT_EVERY_S = 0.5
"""Seconds between two progress lines of a running HiGHS solve."""


class _Watch:
    """HiGHS' interrupt callbacks: keep the MIP's latest bounds, and stop it on request."""

    def __init__(self) -> None:
        from highspy import cb

        self._mip = cb.HighsCallbackType.kCallbackMipInterrupt
        self.stop = threading.Event()
        self.bounds: tuple[float, float] | None = None
        """(incumbent, lower bound) in model units, as of the last MIP callback."""

    def __call__(self, event: Any) -> None:
        if event.callback_type == self._mip:
            self.bounds = (float(event.data_out.mip_primal_bound), float(event.data_out.mip_dual_bound))
        if self.stop.is_set():
            event.interrupt()


def _run_highs(highs: Any, scale: float, limit_s: float) -> None:
    """``highs.run()`` in a thread, so that this one can report and take Ctrl-C.

    HiGHS runs in C and holds its caller until it returns: a Ctrl-C used to wait for the
    time limit. Here the calling thread waits instead, hands the incumbent, bound and gap
    to `progress.say` every `_REPORT_EVERY_S`, and on KeyboardInterrupt (or any exception
    while it waits) stops HiGHS and re-raises. HiGHS looks at its interrupt callbacks only between search steps (none during
    presolve; seconds apart at the root), but at its time limit also inside presolve and LP
    solves, so both are pulled: HiGHS stops at the first of its checks (0.1-3 s measured on
    a loaded 2-core machine). The thread is waited for, not left behind: a HiGHS thread that
    enters a Python callback while the interpreter exits aborts the process ("terminate
    called without an active exception"). A second Ctrl-C stops the waiting.
    """
    watch = _Watch()
    for callbacks in (highs.cbSimplexInterrupt, highs.cbIpmInterrupt, highs.cbMipInterrupt):
        callbacks.subscribe(watch)
    done = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            highs.run()
        except BaseException as error:  # Raised in the calling thread below.
            failures.append(error)
        finally:
            done.set()

    begin = time.perf_counter()
    say(f"solving the placement ILP with HiGHS (time limit {limit_s:g} s)")
    threading.Thread(target=run, name="partitioner-highs", daemon=True).start()
    try:
        while not done.wait(_REPORT_EVERY_S):
            say(_highs_line(watch.bounds, scale, time.perf_counter() - begin, limit_s))
    except BaseException:  # Ctrl-C, or a progress sink that raised: HiGHS stops first.
        watch.stop.set()
        highs.setOptionValue("time_limit", 0.0)  # A double HiGHS reads at each time check.
        done.wait()
        raise
    if failures:
        raise failures[0]


def _highs_line(bounds: tuple[float, float] | None, scale: float, elapsed_s: float, limit_s: float) -> str:
    """``HiGHS: 12 s of 60 s, best 4.212 ms, bound 4.05 ms, gap 3.8%``."""
    line = f"HiGHS: {elapsed_s:.0f} s of {limit_s:g} s"
    if bounds is None:
        return f"{line}, no bound yet"  # Presolve and the root node call no MIP callback.
    best, lower = bounds
    line += f", best {format_seconds(best * scale)}" if np.isfinite(best) else ", no placement yet"
    if np.isfinite(lower):
        line += f", bound {format_seconds(lower * scale)}"
        if np.isfinite(best) and best > 0:
            line += f", gap {max(best - lower, 0.0) / best:.1%}"
    return line


@functools.cache
def _quiet_highs_class() -> type:
    """``highspy.Highs`` with its output switched off before its first call.

    highspy 1.16's constructor enables callbacks, and HiGHS prints its banner to the
    process's stdout (file descriptor 1, below Python's ``sys.stdout``) at an instance's
    first call unless ``output_flag`` is off by then: pulp turns it off one call too late,
    and ``partitioner plan --json > plan.json`` wrote a file that is not JSON.
    """
    import highspy

    class QuietHighs(highspy.Highs):
        def enableCallbacks(self) -> None:
            self.setOptionValue("output_flag", False)  # Setting options prints nothing.
            super().enableCallbacks()

    return QuietHighs


def _quiet_highs() -> Any:
    """A new HiGHS instance that writes nothing."""
    highs = _quiet_highs_class()()
    highs.setOptionValue("output_flag", False)  # Where the constructor made no call.
    return highs


def highs_available() -> bool:
    """Whether pulp can drive HiGHS (the ``highspy`` package is installed)."""
    return bool(pulp.HiGHS().available())


@dataclass(slots=True)
class _Model:
    """The pulp problem and its decision variables."""

    problem: pulp.LpProblem
    y: list[list[Any]]
    z: dict[tuple[int, int], dict[tuple[int, int], Any]]
    moved: list[tuple[tuple[int, ...], dict[tuple[int, int], Any]]]
    """Per bundle: its layers (producer, consumers...) and m[s, e] as a variable or z."""
    usage: dict[int, Any]
    """u[d] for the devices of interchangeable pairs."""
    one: Any
    """The variable fixed at 1 that carries the LATENCY objective's constant, or None."""
    bottleneck: Any


def solve_ilp(
    problem: Problem,
    options: SolverOptions = SolverOptions(),
    *,
    warm_start: Sequence[int] | None = None,
) -> Solution:
    """Solve the program of the module docstring.

    Args:
        problem: The cost tables (any DAG).
        options: Backend (AUTO picks HiGHS when installed, else CBC), time limit, gap.
        warm_start: A feasible placement to start from, e.g. `solve_dp`'s. If the solver
            finds nothing better in time, it is returned, marked not optimal.

    Returns:
        The best placement found, its `evaluate` objective, the solver's lower bound, and
        whether optimality was proved within ``options.gap``.

    Raises:
        InfeasibleError: If no placement fits memory.
        SolverError: If the backend is unavailable or fails, or if time runs out with no
            placement and no warm start.
    """
    begin = time.perf_counter()
    check_memory(problem)
    backend = _backend(options.backend)
    if problem.num_devices == 1 or problem.num_layers == 0:  # Nothing to decide.
        return placement_solution(problem, (0,) * problem.num_layers, solver=backend, optimal=True)
    start = canonical(problem, warm_start) if warm_start is not None else None
    if start is not None and not evaluate(problem, start).feasible:
        start = None
    scale = _time_scale(problem, start)
    model = _build(problem, scale)
    if start is not None:
        _set_start(model, problem, start, scale)

    log_path = None
    if backend == "highs":
        solver = _HiGHSWithStart(
            msg=False, timeLimit=options.time_limit_s, gapRel=options.gap
        )
        solver.scale = scale
    else:
        # CBC runs as a subprocess whose log pulp buffers 4 KiB at a time: no progress to show.
        say(f"solving the placement ILP with CBC (time limit {options.time_limit_s:g} s)")
        handle, log_path = tempfile.mkstemp(prefix="partitioner-cbc-", suffix=".log")
        os.close(handle)
        solver = pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=options.time_limit_s,
            gapRel=options.gap,
            warmStart=start is not None,
            logPath=log_path,
        )
    try:
        model.problem.solve(solver)
        bound = _bound(model.problem, backend, log_path, options.gap)
    except pulp.PulpSolverError as error:
        raise SolverError(f"{backend} failed on the placement ILP: {error}") from error
    finally:
        if log_path is not None:
            os.unlink(log_path)

    proved = model.problem.sol_status == pulp.LpSolutionOptimal
    candidates: list[tuple[float, tuple[int, ...], str]] = []  # (objective, placement, by)
    if model.problem.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        found = evaluate(problem, _assignment(model))
        if found.feasible:
            candidates.append((found.objective_s, found.assignment, backend))
        else:
            proved = False  # Rounding broke a row the solver met within its tolerance.
    if start is not None:
        candidates.append((evaluate(problem, start).objective_s, start, "dp"))
    if not candidates:
        if model.problem.status == pulp.LpStatusInfeasible:
            raise no_contiguous_fit(problem)
        raise SolverError(
            f"{backend} found no placement within {options.time_limit_s:g} s "
            f"(status {pulp.LpStatus[model.problem.status]}); raise time_limit_s or lower "
            f"max_candidates"
        )
    # The cheapest; of equals, the one on the earliest devices (idle devices last).
    objective, assignment, solver_name = min(candidates, key=lambda c: (c[0], c[1]))
    lower = max(bound * scale if bound is not None else 0.0, simple_lower_bound(problem))
    return placement_solution(
        problem,
        assignment,
        solver=solver_name,
        optimal=proved or objective - lower <= options.gap * objective,
        lower_bound_s=lower,
        solve_time_s=time.perf_counter() - begin,
    )


def _backend(choice: SolverBackend) -> str:
    """``highs`` or ``cbc`` for the requested backend."""
    if choice is SolverBackend.DP:
        raise SolverError("the ILP needs a MIP backend (AUTO, HIGHS or CBC), not DP")
    if choice is SolverBackend.CBC:
        return "cbc"
    if highs_available():
        return "highs"
    if choice is SolverBackend.HIGHS:
        raise SolverError("HiGHS is not available: pip install highspy, or use SolverBackend.CBC")
    note("HiGHS (highspy) is not installed: solving the placement ILP with CBC, which is slower; pip install highspy")
    return "cbc"


def _bundles(problem: Problem) -> dict[tuple[int, ...], tuple[int, int]]:
    """(producer, consumers...) -> (bytes, number of values), for values that can move."""
    bundles: dict[tuple[int, ...], list[int]] = defaultdict(lambda: [0, 0])
    for value in problem.values:
        readers = tuple(sorted({c for c in value.consumers if c >= 0}))
        if value.producer >= 0 and readers:
            totals = bundles[(value.producer, *readers)]
            totals[0] += value.bytes
            totals[1] += 1
    return {key: (b, k) for key, (b, k) in bundles.items()}


def _time_scale(problem: Problem, start: tuple[int, ...] | None) -> float:
    """Seconds per model time unit: the warm start's objective, else a crude upper bound."""
    if start is not None:
        scale = evaluate(problem, start).objective_s
    else:
        scale = sum(max(row) for row in problem.compute_s) + sum(
            problem.transfer_s(v, s, e)
            for v in problem.values
            for s in range(problem.num_devices)
            for e in range(problem.num_devices)
        )
    return scale if scale > 0 else 1.0


def _build(problem: Problem, scale: float) -> _Model:
    """The pulp model of the module docstring, times divided by ``scale``."""
    n, num_devices = problem.num_layers, problem.num_devices
    prob = pulp.LpProblem("placement", pulp.LpMinimize)

    ranges = device_ranges(problem)  # Outside them, x is 0: no variables there.
    if any(len(r) == 0 for r in ranges):
        raise no_contiguous_fit(problem)

    # y[i][d] = [dev(i) <= d]: binary inside layer i's range, 0 before it, 1 from its end on.
    y: list[list[Any]] = [
        [
            pulp.LpVariable(f"y_{i}_{d}", cat=pulp.LpBinary) if d in r[:-1] else int(d >= r.start)
            for d in range(num_devices)
        ]
        for i, r in enumerate(ranges)
    ]

    def x(i: int, d: int) -> pulp.LpAffineExpression:
        """[dev(i) = d] = y[i][d] - y[i][d-1]."""
        terms, constant = [], 0
        for term, sign in ((y[i][d], 1), (y[i][d - 1] if d > 0 else 0, -1)):
            if isinstance(term, pulp.LpVariable):
                terms.append((term, sign))
            else:
                constant += sign * term
        return pulp.LpAffineExpression(terms, constant=constant)

    # [Constraint] Monotone: the device index only grows with d.
    for i, r in enumerate(ranges):
        for d in range(r.start + 1, r.stop - 1):
            prob += y[i][d - 1] <= y[i][d], f"monotone_{i}_{d}"

    # z[(p, c)][(s, e)] = [dev(p) = s and dev(c) = e], s <= e in the ranges (continuous; integral
    # x force it).
    edges = sorted({(key[0], c) for key in _bundles(problem) for c in key[1:]})
    z = {
        (p, c): {
            (s, e): pulp.LpVariable(f"z_{p}_{c}_{s}_{e}", 0, 1)
            for s in ranges[p]
            for e in ranges[c]
            if s <= e
        }
        for p, c in edges
    }
    # [Constraint] Joint: z's marginals are the placements of p and c (so dev(p) <= dev(c)).
    for (p, c), joint in z.items():
        for s in ranges[p]:
            row = pulp.lpSum(var for (s2, _), var in joint.items() if s2 == s)
            prob += row == x(p, s), f"joint_src_{p}_{c}_{s}"
        for e in ranges[c]:
            column = pulp.lpSum(var for (_, e2), var in joint.items() if e2 == e)
            prob += column == x(c, e), f"joint_dst_{p}_{c}_{e}"

    # m[b][(s, e)] = [bundle b moves s -> e]: z itself for one consumer, else a variable >= each z.
    moved: list[tuple[tuple[int, ...], dict[tuple[int, int], Any]]] = []
    transfer_terms: dict[tuple[int, int], list[tuple[Any, float]]] = defaultdict(list)
    for b, (key, (size, count)) in enumerate(_bundles(problem).items()):
        producer, readers = key[0], key[1:]
        moves: dict[tuple[int, int], Any] = {}
        pairs = sorted({pair for c in readers for pair in z[producer, c]})
        for s, e in pairs:
            seconds = size * problem.seconds_per_byte[s][e] + count * problem.latency_s[s][e]
            seconds /= scale
            if s == e or seconds == 0:
                continue
            if len(readers) == 1:
                moves[s, e] = z[producer, readers[0]][s, e]
            else:
                moves[s, e] = pulp.LpVariable(f"m_{b}_{s}_{e}", 0, 1)
                # [Constraint] Moved: the bundle moves s -> e if any consumer sits on e.
                for c in readers:
                    if (s, e) in z[producer, c]:
                        prob += moves[s, e] >= z[producer, c][s, e], f"moved_{b}_{s}_{e}_{c}"
            transfer_terms[s, e].append((moves[s, e], seconds))
        moved.append((key, moves))

    # u[d] = [device d holds a layer], for the devices of interchangeable pairs.
    twins = interchangeable(problem)
    usage = {
        d: pulp.LpVariable(f"u_{d}", cat=pulp.LpBinary)
        for d in sorted({*twins, *(d + 1 for d in twins)})
    }
    # [Constraint] Usage: u[d] is 1 exactly when some layer sits on d.
    for d, u in usage.items():
        holders = [i for i in range(n) if d in ranges[i]]
        for i in holders:
            prob += x(i, d) <= u, f"usage_{i}_{d}"
        prob += u <= pulp.lpSum(x(i, d) for i in holders), f"usage_{d}"
    # [Constraint] Symmetry: of two interchangeable devices, the first fills first.
    for d in twins:
        prob += usage[d + 1] <= usage[d], f"symmetry_{d}"

    # [Constraint] Memory: what a device holds fits its capacity (rows in units of capacity,
    # tightened by the solver's tolerance; +0.5 byte as byte counts are integers).
    for d in range(num_devices):
        capacity = problem.capacity[d]
        limit = (capacity + 0.5) / capacity - MEMORY_TOLERANCE if capacity > 0 else MEMORY_TOLERANCE
        used = pulp.lpSum(
            (problem.memory[i] / max(capacity, 1)) * x(i, d)
            for i in range(n)
            if problem.memory[i] and d in ranges[i]
        )
        prob += used <= limit, f"memory_{d}"

    compute = [
        pulp.lpSum(
            (problem.compute_s[i][d] / scale) * x(i, d)
            for i in range(n)
            if problem.compute_s[i][d] and d in ranges[i]
        )
        for d in range(num_devices)
    ]
    bottleneck = one = None
    if problem.objective is Objective.LATENCY:
        objective = pulp.lpSum(compute) + pulp.lpSum(
            coef * var for terms in transfer_terms.values() for var, coef in terms
        )
        constant = float(objective.constant)
        if constant:
            # one = 1: carries the objective's constant, so that the solver's gap is the
            # whole objective's (the module docstring says why).
            one = pulp.LpVariable("one", 1, 1)
            objective += constant * one - constant
        prob += objective
    else:
        # T: the period, the longest of any device's compute, transfers in, transfers out.
        bottleneck = pulp.LpVariable("T", 0)
        prob += bottleneck
        # [Constraint] Bottleneck: T bounds every device's compute and each of its two lanes.
        for d in range(num_devices):
            prob += bottleneck >= compute[d], f"compute_{d}"
            for lane, side in (("in", 1), ("out", 0)):
                terms = [
                    coef * var
                    for link, link_terms in transfer_terms.items()
                    if link[side] == d
                    for var, coef in link_terms
                ]
                if terms:
                    prob += bottleneck >= pulp.lpSum(terms), f"{lane}_{d}"
    return _Model(problem=prob, y=y, z=z, moved=moved, usage=usage, one=one, bottleneck=bottleneck)


def _set_start(model: _Model, problem: Problem, start: tuple[int, ...], scale: float) -> None:
    """Give every variable its value in the placement ``start``."""
    for i, row in enumerate(model.y):
        for d, var in enumerate(row):
            if isinstance(var, pulp.LpVariable):
                var.setInitialValue(1 if start[i] <= d else 0)
    for (p, c), joint in model.z.items():
        for (s, e), var in joint.items():
            var.setInitialValue(1 if (start[p], start[c]) == (s, e) else 0)
    for key, moves in model.moved:
        destinations = {start[c] for c in key[1:]}
        for (s, e), var in moves.items():
            if var.name.startswith("m_"):
                var.setInitialValue(1 if start[key[0]] == s and e in destinations else 0)
    for d, u in model.usage.items():
        u.setInitialValue(1 if d in start else 0)
    if model.one is not None:
        model.one.setInitialValue(1)
    if model.bottleneck is not None:
        model.bottleneck.setInitialValue(evaluate(problem, start).bottleneck_s / scale)


def _assignment(model: _Model) -> tuple[int, ...]:
    """dev(i) = the number of d with y[i, d] = 0."""
    return tuple(sum(1 for y in row if pulp.value(y) < 0.5) for row in model.y)


_CBC_BOUND = re.compile(r"^Lower bound:\s*(\S+)", re.MULTILINE)


def _bound(prob: pulp.LpProblem, backend: str, log_path: str | None, gap: float) -> float | None:
    """The solver's proven lower bound on the objective (model units), if it reports one.

    The objective has no constant term (`_build` puts it on a variable), so the bound the
    solver sees is the objective's.
    """
    if backend == "highs":
        bound = float(prob.solverModel.getInfo().mip_dual_bound)
        return bound if np.isfinite(bound) else None
    assert log_path is not None
    with open(log_path) as log:
        match = _CBC_BOUND.search(log.read())
    if match is not None:
        return float(match.group(1))
    incumbent = prob.objective.value()
    if prob.sol_status == pulp.LpSolutionOptimal and incumbent is not None:
        # CBC prints no bound when it proves optimality: it stopped within the gap.
        return float(incumbent) * (1 - gap)
    return None
