"""The solver on hand-made tables: exact DP, ILP (HiGHS and CBC), brute force, coarsening."""

from __future__ import annotations

import importlib
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pulp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.errors import InfeasibleError, SolverError
from partitioner.ir import INPUT, OUTPUT, Problem, ReplicaCost, Solution, Value
from partitioner.options import Objective, SolverBackend, SolverOptions, Strategy
from partitioner.solve import (
    canonical,
    coarsen,
    evaluate,
    expand,
    highs_available,
    interchangeable,
    is_chain,
    is_near_chain,
    is_sequential,
    simple_lower_bound,
    solve,
    solve_brute,
    solve_dp,
    solve_ilp,
    solve_near_chain,
    uniform_links,
)
from partitioner.solve import ilp as ilp_module
from partitioner.solve import nearchain as nearchain_module
from partitioner.solve.feasibility import device_ranges
from partitioner.progress import reporting

# The module, which `partitioner.solve.evaluate` (the function) hides.
evaluate_module = importlib.import_module("partitioner.solve.evaluate")
solve_module = importlib.import_module("partitioner.solve")

GiB = 2**30
KEEP_ORDER = SolverOptions(keep_device_order=True)
"""Default options, placing along the devices as listed (as `assert_plan_valid` checks)."""
EXACT = SolverOptions(gap=0.0, time_limit_s=60, keep_device_order=True)
"""ILP options for cross-checks: gap 0, so the ILP must reach the optimum, in the device
order given (as the oracles here place; tests/test_solve_order.py searches the orders)."""
ILP_BACKENDS = [SolverBackend.HIGHS, SolverBackend.CBC]
OBJECTIVES = [Objective.LATENCY, Objective.THROUGHPUT]


# --- Tables -------------------------------------------------------------------------------


def make_problem(
    compute: list[list[float]],
    memory: list[int],
    capacity: list[int],
    edges: Sequence[tuple[int, tuple[int, ...], int]],
    *,
    per_byte: float | list[list[float]] = 0.0,
    latency: float | list[list[float]] = 0.0,
    objective: Objective = Objective.LATENCY,
    names: tuple[str, ...] = (),
    device_names: tuple[str, ...] = (),
    replica: ReplicaCost | None = None,
) -> Problem:
    """A problem from rows of compute, (producer, consumers, bytes) edges and link costs."""
    num_devices = len(capacity)

    def table(cost: float | list[list[float]]) -> tuple[tuple[float, ...], ...]:
        if isinstance(cost, list):
            return tuple(tuple(row) for row in cost)
        return tuple(
            tuple(0.0 if s == e else cost for e in range(num_devices)) for s in range(num_devices)
        )

    return Problem(
        compute_s=tuple(tuple(row) for row in compute),
        memory=tuple(memory),
        capacity=tuple(capacity),
        values=tuple(
            Value(name=f"v{k}", producer=p, consumers=tuple(sorted(set(c))), bytes=b)
            for k, (p, c, b) in enumerate(edges)
        ),
        seconds_per_byte=table(per_byte),
        latency_s=table(latency),
        objective=objective,
        names=names,
        device_names=device_names,
        replica=replica,
    )


def random_problem(
    rng: random.Random,
    num_layers: int,
    num_devices: int,
    *,
    objective: Objective,
    dag: bool,
    tightness: float,
    links: str = "any",
) -> Problem:
    """Heterogeneous device speeds and per-link costs; a chain or a DAG with skips and branches.

    ``tightness`` is the share of all memory one device holds (1: any device holds all).
    ``links``: ``any`` (a price per link) or ``uniform`` (one price for every link).
    """
    speed = [rng.uniform(0.5, 2.0) for _ in range(num_devices)]
    work = [rng.uniform(1.0, 5.0) * 1e-3 for _ in range(num_layers)]
    memory = [rng.randint(1, 10) * 100 for _ in range(num_layers)]
    room = max(max(memory), int(sum(memory) * tightness))
    capacity = [room + rng.randint(0, 100) for _ in range(num_devices)]
    edges: list[tuple[int, tuple[int, ...], int]] = [(INPUT, (0,), 1000)]
    for i in range(num_layers - 1):
        readers = {i + 1}
        if dag and i + 2 < num_layers and rng.random() < 0.5:
            readers.add(rng.randint(i + 2, num_layers - 1))
        edges.append((i, tuple(readers), rng.randint(1, 50) * 10**5))
        if dag and i + 2 < num_layers and rng.random() < 0.3:
            edges.append((i, (rng.randint(i + 2, num_layers - 1),), rng.randint(1, 50) * 10**5))
    edges.append((num_layers - 1, (OUTPUT,), 1000))
    one_price = (rng.uniform(0.2, 2.0) * 1e-9, rng.uniform(0.0, 1.0) * 1e-4)

    def price() -> tuple[float, float]:
        if links == "uniform":
            return one_price
        return rng.uniform(0.2, 2.0) * 1e-9, rng.uniform(0.0, 1.0) * 1e-4

    prices = [[price() for _ in range(num_devices)] for _ in range(num_devices)]
    per_byte = [[0.0 if s == e else prices[s][e][0] for e in range(num_devices)] for s in range(num_devices)]
    delays = [[0.0 if s == e else prices[s][e][1] for e in range(num_devices)] for s in range(num_devices)]
    return make_problem(
        [[w / s for s in speed] for w in work],
        memory,
        capacity,
        edges,
        per_byte=per_byte,
        latency=delays,
        objective=objective,
    )


def random_near_chain(
    rng: random.Random,
    num_layers: int,
    num_devices: int,
    *,
    objective: Objective = Objective.LATENCY,
    links: str = "uniform",
    tightness: float = 0.5,
) -> Problem:
    """A chain plus values broadcast from early layers to many later ones (a transformer's
    mask and rotary tables).

    ``links``: ``uniform`` (one cost for every link), ``inbound`` (one per destination),
    ``islands`` (cheap inside the first ``num_devices // 2`` devices and inside the others,
    dear across) or ``any``.
    """
    half = num_devices // 2
    speed = [rng.uniform(0.5, 2.0) for _ in range(num_devices)]
    work = [rng.uniform(1.0, 5.0) * 1e-3 for _ in range(num_layers)]
    memory = [rng.randint(1, 10) * 100 for _ in range(num_layers)]
    room = max(max(memory), int(sum(memory) * tightness))
    edges: list[tuple[int, tuple[int, ...], int]] = [(INPUT, (0,), 1000)]
    edges += [(i, (i + 1,), rng.randint(1, 50) * 10**5) for i in range(num_layers - 1)]
    for _ in range(rng.randint(1, 3) if num_layers > 2 else 0):
        producer = rng.randint(0, min(2, num_layers - 3))
        later = range(producer + 1, num_layers)
        readers = rng.sample(later, rng.randint(2, len(later)) if len(later) > 1 else 1)
        edges.append((producer, tuple(readers), rng.randint(1, 50) * 10**5))
    edges.append((num_layers - 1, (OUTPUT,), 1000))
    cost: dict[str, Callable[[int, int], float]] = {
        "uniform": lambda s, e: 1.0,
        "inbound": lambda s, e: 1.0 + e,
        "islands": lambda s, e: 1.0 if (s < half) == (e < half) else 4.0,
        "any": lambda s, e: rng.uniform(0.5, 3.0),
    }
    price = cost[links]
    per_byte = rng.uniform(0.2, 2.0) * 1e-9
    delay = rng.uniform(0.0, 1.0) * 1e-4
    return make_problem(
        [[w / s for s in speed] for w in work],
        memory,
        [room + rng.randint(0, 100) for _ in range(num_devices)],
        edges,
        per_byte=[[0.0 if s == e else per_byte * price(s, e) for e in range(num_devices)]
                  for s in range(num_devices)],
        latency=[[0.0 if s == e else delay * price(s, e) for e in range(num_devices)]
                 for s in range(num_devices)],
        objective=objective,
    )


def with_kinds(problem: Problem, kinds: Sequence[int], rng: random.Random) -> Problem:
    """``problem`` on devices of the given kinds: devices of one kind compute alike (the
    column of the kind's first device), hold alike, and every link costs by its ends' kinds."""
    first = [kinds.index(kind) for kind in kinds]
    num_kinds = max(kinds) + 1
    links = [[rng.uniform(0.2, 2.0) * 1e-9 for _ in range(num_kinds)] for _ in range(num_kinds)]
    delays = [[rng.uniform(0.0, 1.0) * 1e-4 for _ in range(num_kinds)] for _ in range(num_kinds)]

    def table(cost: list[list[float]]) -> tuple[tuple[float, ...], ...]:
        return tuple(
            tuple(0.0 if s == e else cost[kinds[s]][kinds[e]] for e in range(len(kinds)))
            for s in range(len(kinds))
        )

    return replace(
        problem,
        compute_s=tuple(tuple(row[f] for f in first) for row in problem.compute_s),
        capacity=tuple(problem.capacity[f] for f in first),
        seconds_per_byte=table(links),
        latency_s=table(delays),
    )


def assert_plan_valid(problem: Problem, solution: Solution) -> None:
    """Every layer placed, memory within capacity, device order kept, objective == evaluate."""
    n, num_devices = problem.num_layers, problem.num_devices
    assert len(solution.assignment) == n
    assert all(0 <= d < num_devices for d in solution.assignment)
    assert solution.lower_bound_s <= solution.objective_s * (1 + 1e-12)
    assert solution.gap >= 0
    if solution.strategy is Strategy.DATA_PARALLEL:
        assert problem.replica is not None
        assert all(m <= c for m, c in zip(problem.replica.memory, problem.capacity))
        assert solution.assignment == (0,) * n
        assert solution.objective_s == problem.replica.time_s
        return
    used = [0] * num_devices
    for layer, device in enumerate(solution.assignment):
        used[device] += problem.memory[layer]
    assert all(u <= c for u, c in zip(used, problem.capacity)), (used, problem.capacity)
    for value in problem.values:
        for consumer in value.consumers:
            if value.producer >= 0 and consumer != OUTPUT:
                assert solution.assignment[value.producer] <= solution.assignment[consumer]
    evaluation = evaluate(problem, solution.assignment)
    assert evaluation.feasible, evaluation.violations
    assert solution.objective_s == evaluation.objective_s
    expected = Strategy.SINGLE if len(set(solution.assignment)) <= 1 else Strategy.MODEL_PARALLEL
    assert solution.strategy is expected


def same(a: float, b: float) -> bool:
    """Equal objectives, up to the ILP's absolute tolerance (1e-6 of the scale)."""
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


def assert_finds_the_optimum(problem: Problem, run: Callable[[Problem], Solution]) -> None:
    """``run`` matches brute force: a valid plan as good, or InfeasibleError as well."""
    try:
        best = solve_brute(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            run(problem)
        return
    found = run(problem)
    assert_plan_valid(problem, found)
    assert same(found.objective_s, best.objective_s), (found, best)


# --- evaluate -------------------------------------------------------------------------------


def three_layers(objective: Objective) -> Problem:
    """0 -> 1 -> 2 plus a skip 0 -> 2; the output of 2 leaves the model."""
    return make_problem(
        [[1.0, 2.0], [1.0, 2.0], [3.0, 1.0]],
        [4, 4, 4],
        [8, 8],
        [(INPUT, (0,), 50), (0, (1, 2), 100), (1, (2,), 200), (2, (OUTPUT,), 999)],
        per_byte=[[0.0, 0.01], [0.02, 0.0]],
        latency=[[0.0, 0.5], [0.5, 0.0]],
        objective=objective,
    )


def test_evaluate_breaks_down_a_placement():
    problem = three_layers(Objective.LATENCY)
    evaluation = evaluate(problem, (0, 0, 1))
    # Value 1 (100 B, read on devices 0 and 1) moves once; value 2 (200 B) moves once.
    assert [(t.value, t.src, t.dst, t.bytes) for t in evaluation.transfers] == [
        (1, 0, 1, 100),
        (2, 0, 1, 200),
    ]
    assert evaluation.compute_s == (2.0, 1.0)
    assert evaluation.transfer_out_s == pytest.approx((1.5 + 2.5, 0.0))
    assert evaluation.transfer_in_s == pytest.approx((0.0, 4.0))
    assert evaluation.memory == (8, 4)
    assert evaluation.latency_s == pytest.approx(3.0 + 4.0)
    # Transfers overlap compute: device 0 computes 2 s and sends 4 s, device 1 receives 4 s.
    assert evaluation.load_s == pytest.approx((4.0, 4.0))
    assert evaluation.bottleneck_s == pytest.approx(4.0)
    assert evaluation.objective_s == evaluation.latency_s
    assert evaluation.feasible
    assert evaluate(three_layers(Objective.THROUGHPUT), (0, 0, 1)).objective_s == pytest.approx(4.0)


def test_evaluate_moves_a_value_once_per_device():
    # Layer 0's value is read by layers 1, 2 (device 1) and 3 (device 2).
    problem = make_problem(
        [[1.0] * 3] * 4, [1] * 4, [9] * 3, [(0, (1, 2, 3, OUTPUT), 10)], per_byte=0.1
    )
    evaluation = evaluate(problem, (0, 1, 1, 2))
    assert [(t.src, t.dst) for t in evaluation.transfers] == [(0, 1), (0, 2)]
    assert evaluation.latency_s == pytest.approx(4.0 + 2.0)
    # Device 0 sends twice (2 s out), device 1 computes 2 s and receives 1 s, device 2 computes 1 s.
    assert evaluation.load_s == pytest.approx((2.0, 2.0, 1.0))


def test_evaluate_reports_memory_and_order_violations():
    problem = three_layers(Objective.LATENCY)
    crowded = evaluate(problem, (0, 0, 0))
    assert not crowded.feasible
    assert "device 0 holds 12 B but has 8 B" in crowded.violations
    backwards = evaluate(problem, (1, 0, 1))
    order = "layer #0 on device 1 feeds layer #1 on device 0, an earlier device"
    assert order in backwards.violations


def test_evaluate_rejects_what_is_no_placement():
    problem = three_layers(Objective.LATENCY)
    with pytest.raises(ValueError, match="3 layers"):
        evaluate(problem, (0, 0))
    with pytest.raises(ValueError, match="device 2 of 2"):
        evaluate(problem, (0, 0, 2))


def test_simple_lower_bound():
    assert simple_lower_bound(three_layers(Objective.LATENCY)) == 3.0
    assert simple_lower_bound(three_layers(Objective.THROUGHPUT)) == 1.5


# --- Known optima ----------------------------------------------------------------------------

SOLVERS = {
    "auto": lambda p: solve(p, EXACT),
    "dp": solve_dp,
    "brute": solve_brute,
    "highs": lambda p: solve_ilp(p, SolverOptions(backend=SolverBackend.HIGHS, gap=0.0)),
    "cbc": lambda p: solve_ilp(p, SolverOptions(backend=SolverBackend.CBC, gap=0.0)),
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_memory_forces_two_and_two(solver, objective):
    # Four equal layers, each device holds two: one transfer of 100 B at 0.01 s/B.
    problem = make_problem(
        [[1.0, 1.0]] * 4,
        [5] * 4,
        [10, 10],
        [(0, (1,), 100), (1, (2,), 100), (2, (3,), 100)],
        per_byte=0.01,
        objective=objective,
    )
    solution = SOLVERS[solver](problem)
    assert_plan_valid(problem, solution)
    assert solution.assignment == (0, 0, 1, 1)
    # THROUGHPUT: the 1 s transfer overlaps each device's 2 s of compute.
    assert solution.objective_s == pytest.approx(5.0 if objective is Objective.LATENCY else 2.0)
    assert solution.optimal


@pytest.mark.parametrize("solver", SOLVERS)
def test_throughput_balances_and_latency_does_not_split(solver):
    # Six equal layers, three equal devices, cheap links: the pipeline splits 2+2+2
    # (its 0.1 s transfers overlap compute), while one batch alone is fastest on one device.
    edges = [(i, (i + 1,), 10) for i in range(5)]
    for objective, expected, value in [
        (Objective.THROUGHPUT, (0, 0, 1, 1, 2, 2), 2.0),
        (Objective.LATENCY, (0,) * 6, 6.0),
    ]:
        problem = make_problem(
            [[1.0] * 3] * 6, [1] * 6, [6] * 3, edges, per_byte=0.01, objective=objective
        )
        solution = SOLVERS[solver](problem)
        assert_plan_valid(problem, solution)
        assert solution.objective_s == pytest.approx(value)
        assert solution.assignment == expected or solver in ("highs", "cbc")


def test_per_link_costs_pick_the_cheap_link():
    # Two layers must split (memory); device 1 is slow to reach, device 2 is cheap.
    problem = make_problem(
        [[1.0, 1.0, 1.0]] * 2,
        [6, 6],
        [8, 8, 8],
        [(0, (1,), 100)],
        per_byte=[[0.0, 0.1, 0.001], [0.1, 0.0, 0.1], [0.1, 0.1, 0.0]],
    )
    for solver in SOLVERS.values():
        solution = solver(problem)
        assert solution.assignment == (0, 2)
        assert solution.objective_s == pytest.approx(2.1)


# --- Cross-checks on grids -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ILP_BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("tightness", [1.0, 0.55, 0.3])
@pytest.mark.parametrize("num_devices", [1, 2, 3])
@pytest.mark.parametrize("num_layers", [3, 7, 12])
def test_ilp_matches_dp_on_chains(num_layers, num_devices, tightness, objective, backend):
    rng = random.Random(f"{num_layers}-{num_devices}-{tightness}-{objective}")
    problem = random_problem(
        rng, num_layers, num_devices, objective=objective, dag=False, tightness=tightness
    )
    assert is_chain(problem)
    options = SolverOptions(backend=backend, gap=0.0)
    try:
        exact = solve_dp(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError, match="no contiguous placement fits|in all but"):
            solve_ilp(problem, options)
        return
    assert_plan_valid(problem, exact)
    assert exact.optimal and exact.lower_bound_s == exact.objective_s
    found = solve_ilp(problem, options)
    assert_plan_valid(problem, found)
    assert same(found.objective_s, exact.objective_s), (found, exact)
    assert found.optimal


@pytest.mark.parametrize("links", ["any", "uniform"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_brute_force_on_chains(seed, objective, links):
    # "uniform" links take the O(N^2 D) THROUGHPUT recurrence.
    rng = random.Random(seed)
    problem = random_problem(
        rng, rng.randint(1, 8), rng.randint(1, 4), objective=objective, dag=False,
        tightness=rng.choice([1.0, 0.5, 0.35]), links=links,
    )
    assert uniform_links(problem) == (links == "uniform" or problem.num_devices == 1)
    assert_finds_the_optimum(problem, solve_dp)


def test_long_chains_on_many_devices_are_solved_exactly_without_coarsening():
    # 1,000 layers on 64 devices (in the order given): over max_candidates, but the chain DP is cheap.
    rng = random.Random(3)
    problem = random_problem(
        rng, 1000, 64, objective=Objective.THROUGHPUT, dag=False, tightness=0.05, links="uniform"
    )
    solution = solve(problem, KEEP_ORDER)
    assert solution.solver == "dp" and solution.optimal
    assert solution.objective_s == evaluate(problem, solution.assignment).objective_s
    coarse, groups = coarsen(problem, 100)
    merged = expand(solve_dp(coarse).assignment, groups)
    assert solution.objective_s <= evaluate(problem, merged).objective_s * (1 + 1e-12)


@pytest.mark.parametrize("backend", ILP_BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_brute_force_on_dags(seed, objective, backend):
    rng = random.Random(seed)
    problem = random_problem(
        rng, rng.randint(4, 7), rng.randint(2, 3), objective=objective, dag=True,
        tightness=rng.choice([1.0, 0.5, 0.4]),
    )
    assert_finds_the_optimum(problem, lambda p: solve_ilp(p, SolverOptions(backend=backend, gap=0)))
    if is_chain(problem):
        return
    try:
        heuristic = solve_dp(problem)
    except InfeasibleError:
        return  # Runs along the order may not fit where interleaved branches do.
    assert_plan_valid(problem, heuristic)
    assert heuristic.objective_s >= solve_brute(problem).objective_s * (1 - 1e-12)
    assert not heuristic.optimal


@st.composite
def small_problems(draw: st.DrawFn) -> Problem:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    num_layers, num_devices = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    objective = draw(st.sampled_from(OBJECTIVES))
    tightness = draw(st.sampled_from([1.0, 0.6, 0.4]))
    shape = draw(st.sampled_from(["chain", "dag", "identical devices", "near-chain"]))
    if shape == "near-chain":
        links = draw(st.sampled_from(["uniform", "inbound", "islands", "any"]))
        return random_near_chain(
            rng, num_layers, num_devices, objective=objective, links=links, tightness=tightness
        )
    problem = random_problem(
        rng, num_layers, num_devices, objective=objective, dag=shape != "chain",
        tightness=tightness,
    )
    if shape == "identical devices":
        return with_kinds(problem, [0] * num_devices, rng)
    return problem


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_solve_matches_brute_force(problem):
    assert_finds_the_optimum(problem, lambda p: solve(p, EXACT))


def test_ilp_may_interleave_branches_where_runs_cannot_fit():
    # 0 -> {1, 2} -> 3, two branches: device 0 holds 0 and 2, device 1 holds 1 and 3.
    # No split of the order 0, 1, 2, 3 into two runs fits.
    problem = make_problem(
        [[1.0, 1.0]] * 4,
        [1, 5, 1, 5],
        [5, 10],
        [(0, (1, 2), 10), (1, (3,), 10), (2, (3,), 10)],
    )
    assert not is_chain(problem)
    with pytest.raises(InfeasibleError, match="no contiguous placement fits"):
        solve_dp(problem)
    for backend in ILP_BACKENDS:
        solution = solve(problem, SolverOptions(backend=backend))
        assert_plan_valid(problem, solution)
        assert solution.assignment == (0, 1, 0, 1)


# --- Chains --------------------------------------------------------------------------------


def test_is_chain():
    chain = [(INPUT, (0, 2), 1), (0, (1,), 1), (1, (2, OUTPUT), 1)]
    assert is_chain(make_problem([[1.0]] * 3, [1] * 3, [9], chain))
    skip = chain + [(0, (2,), 1)]
    assert not is_chain(make_problem([[1.0]] * 3, [1] * 3, [9], skip))
    # Layer 2 reads only a model input: nothing keeps it after layer 1.
    apart = [(INPUT, (0, 2), 1), (0, (1,), 1)]
    assert not is_chain(make_problem([[1.0]] * 3, [1] * 3, [9], apart))


def test_dp_backend_refuses_what_no_dp_solves_exactly():
    # Layers 0, 1 and 2 of three_layers are joined in order: a near-chain, but for THROUGHPUT.
    problem = three_layers(Objective.THROUGHPUT)
    with pytest.raises(SolverError, match="exact only on chains .* and on near-chains"):
        solve(problem, SolverOptions(backend=SolverBackend.DP))
    # Two branches: no single layer order.
    branches = make_problem(
        [[1.0, 1.0]] * 4, [1] * 4, [9, 9], [(0, (1, 2), 10), (1, (3,), 10), (2, (3,), 10)]
    )
    with pytest.raises(SolverError, match="this problem is neither"):
        solve(branches, SolverOptions(backend=SolverBackend.DP))
    near_chain = three_layers(Objective.LATENCY)
    solution = solve(near_chain, SolverOptions(backend=SolverBackend.DP))
    assert solution.solver == "dp" and solution.optimal
    assert same(solution.objective_s, solve_brute(near_chain).objective_s)


def test_single_device_strategy():
    problem = three_layers(Objective.LATENCY)
    solution = solve(problem)
    assert_plan_valid(problem, solution)
    assert solution.strategy is Strategy.MODEL_PARALLEL
    roomy = make_problem([[1.0, 5.0]] * 3, [1] * 3, [9, 9], [(0, (1,), 1), (1, (2,), 1)])
    assert solve(roomy).strategy is Strategy.SINGLE


def test_no_layers():
    problem = make_problem([], [], [5, 5], [])
    solution = solve(problem)
    assert solution.assignment == ()
    assert solution.objective_s == 0.0
    assert solution.strategy is Strategy.SINGLE


# --- Interchangeable devices ---------------------------------------------------------------


def assert_canonical(problem: Problem, assignment: Sequence[int]) -> None:
    """Of two interchangeable devices, the second holds layers only if the first does."""
    used = set(assignment)
    for d in interchangeable(problem):
        assert d + 1 not in used or d in used, (assignment, interchangeable(problem))


def test_interchangeable():
    identical = make_problem([[1.0] * 4] * 2, [1, 1], [5] * 4, [], per_byte=1e-9, latency=1e-5)
    assert interchangeable(identical) == (0, 1, 2)
    slower = make_problem([[1.0, 1.0, 2.0, 1.0]] * 2, [1, 1], [5] * 4, [], per_byte=1e-9)
    assert interchangeable(slower) == (0,)  # Device 2 computes apart from its neighbours.
    smaller = make_problem([[1.0] * 4] * 2, [1, 1], [5, 5, 5, 4], [], per_byte=1e-9)
    assert interchangeable(smaller) == (0, 1)
    # Two islands of two (cheap inside, dear across): 0~1 and 2~3, but not 1~2.
    islands = [[0.0 if s == e else (1.0 if s // 2 == e // 2 else 4.0) for e in range(4)]
               for s in range(4)]
    problem = make_problem([[1.0] * 4] * 2, [1, 1], [5] * 4, [], per_byte=islands)
    assert interchangeable(problem) == (0, 2)
    # A one-way dear link between two otherwise equal devices breaks their swap.
    one_way = [[0.0, 1.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    assert interchangeable(make_problem([[1.0] * 3], [1], [5] * 3, [], latency=one_way)) == ()
    assert interchangeable(make_problem([[1.0]], [1], [5], [])) == ()


def test_interchangeable_agrees_with_the_swap_it_defines():
    """Every pair found, and no other, leaves compute, capacity and both link tables as
    they are under the swap, on random tables built from few distinct prices (so that
    rows and columns often agree in part)."""
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(2, 6)
        prices = [1.0, 2.0, 3.0][: rng.randint(1, 3)]

        def table() -> list[list[float]]:
            return [[0.0 if s == e else rng.choice(prices) for e in range(n)] for s in range(n)]

        per_byte, latency = table(), table()
        compute = [[rng.choice(prices) for _ in range(n)] for _ in range(2)]
        capacity = [rng.choice([4, 5]) for _ in range(n)]
        problem = make_problem(compute, [1, 1], capacity, [], per_byte=per_byte, latency=latency)
        expected = []
        for d in range(n - 1):
            tau = list(range(n))
            tau[d], tau[d + 1] = d + 1, d
            kept = all(
                t[tau[s]][tau[e]] == t[s][e] for t in (per_byte, latency) for s in range(n) for e in range(n) if s != e
            )
            same = capacity[d] == capacity[d + 1] and all(row[d] == row[d + 1] for row in compute)
            if kept and same:
                expected.append(d)
        assert interchangeable(problem) == tuple(expected), (per_byte, latency, compute, capacity)


def test_canonical_fills_twins_in_order_at_the_same_cost():
    rng = random.Random(2)
    for objective in OBJECTIVES:
        base = random_problem(rng, 9, 6, objective=objective, dag=True, tightness=1.0)
        problem = with_kinds(base, [0, 0, 0, 1, 1, 1], rng)
        assert interchangeable(problem) == (0, 1, 3, 4)
        placement = (1, 1, 2, 2, 2, 5, 5, 5, 5)
        twin = canonical(problem, placement)
        assert twin == (0, 0, 1, 1, 1, 3, 3, 3, 3)
        assert evaluate(problem, twin).objective_s == evaluate(problem, placement).objective_s
        assert canonical(problem, twin) == twin
        assert canonical(base, placement) == placement  # No twins: nothing moves.


KINDS = [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("seed", range(5))
def test_symmetry_breaking_keeps_the_optimum(seed, objective, monkeypatch):
    rng = random.Random(f"twins-{seed}")
    kinds = KINDS[seed]
    problem = with_kinds(
        random_problem(
            rng, rng.randint(5, 7), len(kinds), objective=objective, dag=seed % 2 == 1,
            tightness=rng.choice([0.5, 0.35]),
        ),
        kinds,
        rng,
    )
    assert interchangeable(problem)
    options = SolverOptions(backend=SolverBackend.HIGHS, gap=0.0)
    # Without canonical answers, what the ILP returns is what its constraints allow.
    monkeypatch.setattr(evaluate_module, "canonical", lambda p, a: tuple(a))
    monkeypatch.setattr(ilp_module, "canonical", lambda p, a: tuple(a))
    try:
        best = solve_brute(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            solve_ilp(problem, options)
        return
    ordered = solve_ilp(problem, options)
    assert_plan_valid(problem, ordered)
    assert same(ordered.objective_s, best.objective_s)
    assert_canonical(problem, ordered.assignment)
    monkeypatch.setattr(ilp_module, "interchangeable", lambda p: ())  # No [Symmetry] rows.
    free = solve_ilp(problem, options)
    assert same(free.objective_s, best.objective_s)


@pytest.mark.parametrize("backend", ILP_BACKENDS)
def test_every_solver_answers_with_idle_twins_last(backend):
    # Six equal layers on five identical devices that hold two each: three are used.
    problem = make_problem(
        [[1.0] * 5] * 6, [5] * 6, [10] * 5, [(i, (i + 1,), 100) for i in range(5)], per_byte=0.01
    )
    expected = (0, 0, 1, 1, 2, 2)
    assert solve_dp(problem).assignment == expected
    assert solve_brute(problem).assignment == expected
    assert solve_ilp(problem, SolverOptions(backend=backend, gap=0.0)).assignment == expected
    skips = (0, 0, 2, 2, 4, 4)  # A warm start that skips devices is taken as its twin.
    solution = solve_ilp(problem, SolverOptions(backend=backend), warm_start=skips)
    assert solution.assignment == expected


# --- Near-chains ---------------------------------------------------------------------------


def test_is_near_chain():
    rng = random.Random(0)
    problem = random_near_chain(rng, 6, 3)
    assert is_sequential(problem) and not is_chain(problem) and is_near_chain(problem)
    assert is_near_chain(random_near_chain(rng, 6, 3, links="inbound"))
    assert not is_near_chain(random_near_chain(rng, 6, 3, links="islands"))
    assert not is_near_chain(replace(problem, objective=Objective.THROUGHPUT))
    # Only forward links count: a dear way back changes nothing.
    back = [[0.0 if s <= e else 9.0 for e in range(3)] for s in range(3)]
    assert is_near_chain(replace(problem, latency_s=tuple(map(tuple, back))))
    # Layers 0 and 1 both feed layer 2 (two embeddings): two layer orders.
    apart = make_problem([[1.0] * 2] * 3, [1] * 3, [9] * 2, [(0, (2,), 8), (1, (2,), 8)])
    assert not is_sequential(apart) and not is_near_chain(apart)


@pytest.mark.parametrize("links", ["uniform", "inbound"])
@pytest.mark.parametrize("seed", range(10))
def test_near_chain_dp_matches_brute_force(seed, links):
    rng = random.Random(f"near-{seed}-{links}")
    num_devices = rng.randint(2, 4)
    problem = random_near_chain(
        rng, rng.randint(4, 9), num_devices, links=links,
        tightness=rng.uniform(1.3 / num_devices, 0.8),  # Room for a split, on some devices.
    )
    assert is_near_chain(problem)
    assert_finds_the_optimum(problem, solve_near_chain)
    assert_finds_the_optimum(problem, lambda p: solve(p, replace(EXACT, backend=SolverBackend.DP)))
    try:
        solution = solve(problem, EXACT)
    except InfeasibleError:
        return
    assert solution.solver == "dp" and solution.optimal and solution.gap == 0


@pytest.mark.parametrize("seed", range(4))
def test_near_chain_dp_matches_the_ilp(seed):
    rng = random.Random(f"near-ilp-{seed}")
    problem = random_near_chain(rng, 12, 4, tightness=0.3)
    exact = solve_near_chain(problem)
    assert_plan_valid(problem, exact)
    found = solve_ilp(problem, SolverOptions(backend=SolverBackend.HIGHS, gap=0.0))
    assert same(found.objective_s, exact.objective_s), (found, exact)


@pytest.mark.parametrize(
    "links, objective",
    [("islands", Objective.LATENCY), ("any", Objective.LATENCY), ("uniform", Objective.THROUGHPUT)],
)
@pytest.mark.parametrize("seed", range(6))
def test_where_the_near_chain_dp_is_not_exact(seed, links, objective):
    rng = random.Random(f"not-{seed}-{links}-{objective}")
    problem = random_near_chain(
        rng, rng.randint(5, 8), rng.randint(3, 4), objective=objective, links=links,
        tightness=rng.choice([0.6, 0.45]),
    )
    assert not is_near_chain(problem)
    assert_finds_the_optimum(problem, lambda p: solve(p, EXACT))
    try:
        best = solve_brute(problem)
    except InfeasibleError:
        return
    heuristic = solve_near_chain(problem)
    assert_plan_valid(problem, heuristic)
    # Its bound holds: under LATENCY on one layer order, the DP's with the cheapest links.
    assert heuristic.lower_bound_s <= best.objective_s
    if heuristic.optimal:
        assert same(heuristic.objective_s, best.objective_s)


def skip_chain(
    rng: random.Random, num_layers: int, num_devices: int, *, reach: int = 2, tightness: float = 0.5,
    links: str = "uniform",
) -> Problem:
    """Layer ``i`` reads layers ``i - 1 .. i - reach`` (residual or dense skips), THROUGHPUT;
    ``links``: ``uniform`` (identical devices on a switch) or ``any``."""
    speed = [rng.uniform(0.5, 2.0) for _ in range(num_devices)]
    work = [rng.uniform(1.0, 5.0) * 1e-3 for _ in range(num_layers)]
    memory = [rng.randint(1, 10) * 100 for _ in range(num_layers)]
    room = max(max(memory), int(sum(memory) * tightness))
    edges: list[tuple[int, tuple[int, ...], int]] = [(INPUT, (0,), 1000)]
    edges += [
        (i, tuple(range(i + 1, min(i + reach, num_layers - 1) + 1)), rng.randint(1, 50) * 10**5)
        for i in range(num_layers - 1)
    ]
    edges.append((num_layers - 1, (OUTPUT,), 1000))
    per_byte = rng.uniform(0.2, 2.0) * 1e-9
    delay = rng.uniform(0.0, 1.0) * 1e-4

    def table(base: float) -> list[list[float]]:
        return [
            [0.0 if s == e else base * (1.0 if links == "uniform" else rng.uniform(0.5, 3.0))
             for e in range(num_devices)]
            for s in range(num_devices)
        ]

    return make_problem(
        [[w / s for s in speed] for w in work], memory,
        [room + rng.randint(0, 100) for _ in range(num_devices)], edges,
        per_byte=table(per_byte), latency=table(delay), objective=Objective.THROUGHPUT,
    )


def test_outbound_tables_count_what_leaves_a_run():
    rng = random.Random(3)
    problem = random_near_chain(rng, 7, 3, objective=Objective.THROUGHPUT)
    out_bytes, out_count = nearchain_module._outbound(problem)
    n = problem.num_layers
    for j in range(n + 1):
        for k in range(j, n + 1):
            leaving = [
                v for v in problem.values
                if j <= v.producer < k and any(c != OUTPUT and c >= k for c in v.consumers)
            ]
            assert out_bytes[j, k] == sum(v.bytes for v in leaving)
            assert out_count[j, k] == len(leaving)


@pytest.mark.parametrize("shape", ["near-chain", "skip", "skip-any-links", "dense"])
@pytest.mark.parametrize("seed", range(8))
def test_throughput_run_dp_bounds_every_placement(seed, shape):
    # Sequential problems under THROUGHPUT: the bottleneck DP's optimum never exceeds the
    # best placement's period, and when its placement meets it, that is the optimum.
    rng = random.Random(f"bottleneck-{seed}-{shape}")
    num_layers, num_devices = rng.randint(4, 8), rng.randint(2, 4)
    tightness = rng.uniform(1.3 / num_devices, 0.8)
    if shape == "near-chain":
        problem = random_near_chain(
            rng, num_layers, num_devices, objective=Objective.THROUGHPUT, tightness=tightness
        )
    else:
        problem = skip_chain(
            rng, num_layers, num_devices, reach=3 if shape == "dense" else 2,
            tightness=tightness, links="any" if shape == "skip-any-links" else "uniform",
        )
    assert is_sequential(problem) and not is_chain(problem) and not is_near_chain(problem)
    try:
        best = solve_brute(problem)
    except InfeasibleError:
        with pytest.raises(InfeasibleError):
            solve_near_chain(problem)
        return
    found = solve_near_chain(problem)
    assert_plan_valid(problem, found)
    assert found.lower_bound_s <= best.objective_s * (1 + 1e-12)
    if found.optimal:
        assert same(found.objective_s, best.objective_s), (found, best)
    assert_finds_the_optimum(problem, lambda p: solve(p, EXACT))


def test_throughput_on_skip_connections_needs_no_ilp(monkeypatch):
    # Forty residual layers (each reads the last two) on 16 identical devices: the THROUGHPUT
    # ILP's relaxation spreads every layer over every device (the benchmark's skip MLP on
    # 32 GPUs ran the ILP to its time limit); the bottleneck DP proves its placement.
    n, num_devices = 40, 16
    edges: list[tuple[int, tuple[int, ...], int]] = [(INPUT, (0,), 8)]
    edges += [(i, tuple(range(i + 1, min(i + 2, n - 1) + 1)), 2**20) for i in range(n - 1)]
    edges.append((n - 1, (OUTPUT,), 8))
    problem = make_problem(
        [[1e-5] * num_devices] * n, [2**20] * n, [2**40] * num_devices, edges,
        per_byte=1 / 100e9, latency=5e-6, objective=Objective.THROUGHPUT,
    )

    def no_ilp(*args, **kwargs):
        raise AssertionError("the ILP ran")

    monkeypatch.setattr(solve_module, "solve_ilp", no_ilp)
    solution = solve(problem)
    assert_plan_valid(problem, solution)
    assert solution.solver == "dp" and solution.optimal
    # A run of three layers computes 30 us and takes in and sends out two values of 1 MiB
    # (2 x 15.5 us with latency), as any run of two or more does: the lanes set the period,
    # and 40 layers need 14 such runs.
    two_values = 2 * (2**20 / 100e9 + 5e-6)
    assert solution.objective_s == pytest.approx(two_values, rel=1e-9)
    assert len(set(solution.assignment)) == 14
    assert solution.lower_bound_s == pytest.approx(solution.objective_s, rel=1e-9)


def test_long_skip_chains_are_bounded_without_coarsening(monkeypatch):
    # 600 residual layers, more than max_candidates: the bottleneck DP runs on every layer
    # (proving its placement), where coarsening would only give merged layers' answer.
    problem = skip_chain(random.Random(7), 600, 4, tightness=0.4)

    def no_coarsening(*args, **kwargs):
        raise AssertionError("coarsened")

    monkeypatch.setattr(solve_module, "coarsen", no_coarsening)
    solution = solve(problem, KEEP_ORDER)
    assert_plan_valid(problem, solution)
    assert solution.solver == "dp" and solution.optimal
    assert solution.lower_bound_s > simple_lower_bound(problem)


def test_a_transformer_on_identical_gpus_takes_the_first_ones():
    # Embedding, 14 blocks reading the mask and rotary tables made by layer 1, a head; eight
    # identical devices, memory for four. The ILP proves the DP's answer.
    blocks = 14
    n = blocks + 3
    blocks_read = tuple(range(2, 2 + blocks))
    edges: list[tuple[int, tuple[int, ...], int]] = [(INPUT, (0,), 8)]
    edges += [(i, (i + 1,), 16 * 2**20) for i in range(n - 1)]
    edges += [(1, blocks_read, 2**16), (1, blocks_read, 2**14), (n - 1, (OUTPUT,), 2**20)]
    problem = make_problem(
        [[0.01] * 8] * n, [3 * GiB] * n, [15 * GiB] * 8, edges,
        per_byte=1 / 255e9, latency=5e-6,
    )
    assert is_near_chain(problem) and interchangeable(problem) == tuple(range(7))
    solution = solve(problem)
    assert_plan_valid(problem, solution)
    assert solution.solver == "dp" and solution.optimal
    assert set(solution.assignment) == {0, 1, 2, 3}
    found = solve_ilp(problem, SolverOptions(backend=SolverBackend.HIGHS, gap=0.0))
    assert same(found.objective_s, solution.objective_s)
    assert set(found.assignment) == {0, 1, 2, 3}


def test_the_ilp_stops_at_the_gap_of_the_whole_objective():
    # Compute the placement cannot change (identical devices) dwarfs the transfers: the
    # solver must see it, or its relative gap would be measured on the transfers alone.
    problem = random_near_chain(random.Random(5), 10, 3, links="islands", tightness=0.4)
    problem = replace(problem, compute_s=tuple((row[0],) * 3 for row in problem.compute_s))
    start = solve_near_chain(problem).assignment
    scale = evaluate(problem, start).objective_s
    model = ilp_module._build(problem, scale)
    assert model.problem.objective.constant == 0
    ilp_module._set_start(model, problem, start, scale)
    assert model.problem.objective.value() == pytest.approx(1.0)  # The whole objective.


# --- Data parallelism ------------------------------------------------------------------------


def replicated(time_s: float, memory: tuple[int, ...], capacity: list[int]) -> Problem:
    return make_problem(
        [[1.0, 1.0]] * 4,
        [5] * 4,
        capacity,
        [(0, (1,), 100), (1, (2,), 100), (2, (3,), 100)],
        per_byte=0.01,
        replica=ReplicaCost(time_s=time_s, memory=memory),
    )


def test_data_parallel_wins_when_faster_and_it_fits():
    problem = replicated(2.5, (20, 20), [20, 20])
    solution = solve(problem)
    assert_plan_valid(problem, solution)
    assert solution.strategy is Strategy.DATA_PARALLEL
    assert solution.solver == "replicate"
    assert solution.optimal


def test_data_parallel_loses_a_tie_and_when_it_does_not_fit():
    tie = replicated(4.0, (20, 20), [20, 20])  # The placement all on device 0 costs 4.0.
    assert solve(tie).strategy is Strategy.SINGLE
    too_big = replicated(0.1, (21, 20), [20, 20])
    solution = solve(too_big)
    assert_plan_valid(too_big, solution)
    assert solution.strategy is Strategy.SINGLE


def test_data_parallel_when_no_placement_fits():
    # Each layer needs 5 of 10; the replica needs 8 (say, with activation checkpointing).
    problem = replicated(9.0, (8, 8), [8, 8])
    solution = solve(problem)
    assert solution.strategy is Strategy.DATA_PARALLEL
    assert solution.objective_s == 9.0
    with pytest.raises(InfeasibleError, match="data parallelism needs 9 B on 'b', which has 8 B"):
        solve(
            make_problem(
                [[1.0, 1.0]] * 4, [5] * 4, [8, 8], [], device_names=("a", "b"),
                replica=ReplicaCost(time_s=1.0, memory=(8, 9)),
            )
        )


# --- Infeasibility ---------------------------------------------------------------------------

NAMES = ("transformer.wte", "transformer.h.0", "transformer.h.1", "transformer.h.2")
DEVICES = ("cuda:0", "cuda:1")


@pytest.mark.parametrize("backend", list(SolverBackend))
def test_a_layer_larger_than_every_device(backend):
    problem = make_problem(
        [[1.0, 1.0]] * 4, [GiB, int(3.2 * GiB), GiB, GiB], [GiB, 2 * GiB], [],
        names=NAMES, device_names=DEVICES,
    )
    message = (
        "layer 'transformer.h.0' needs 3.2 GiB but the largest device 'cuda:1' has 2 GiB; "
        "give it more memory or split the layer finer"
    )
    with pytest.raises(InfeasibleError, match=message):
        solve(problem, SolverOptions(backend=backend))


def test_more_memory_than_all_devices():
    problem = make_problem(
        [[1.0, 1.0]] * 4, [2 * GiB, 2 * GiB, 3 * GiB, 3 * GiB], [4 * GiB, 4 * GiB], [],
        names=NAMES, device_names=DEVICES,
    )
    with pytest.raises(InfeasibleError, match="need 10 GiB in all but the devices hold 8 GiB"):
        solve(problem)


@pytest.mark.parametrize("backend", list(SolverBackend))
def test_memory_fits_in_total_but_not_in_order(backend):
    # 3 + 4 + 3 GB on two 5 GB devices: the 4 GB layer shares a device with neither.
    problem = make_problem(
        [[1.0, 1.0]] * 3, [3 * GiB, 4 * GiB, 3 * GiB], [5 * GiB, 5 * GiB],
        [(0, (1,), 1), (1, (2,), 1)], names=NAMES[:3], device_names=DEVICES,
    )
    with pytest.raises(InfeasibleError) as caught:
        solve(problem, SolverOptions(backend=backend))
    message = str(caught.value)
    assert message.startswith("no contiguous placement fits")
    assert "leaves layer 'transformer.h.1' (3 GiB) without room" in message


@pytest.mark.parametrize("backend", ILP_BACKENDS)
def test_the_ilp_proves_a_dag_infeasible(backend):
    # Two branches that must share device 0 with layer 0 or device 1 with layer 3.
    problem = make_problem(
        [[1.0, 1.0]] * 4, [3, 3, 3, 3], [7, 5],
        [(0, (1, 2), 10), (1, (3,), 10), (2, (3,), 10)],
    )
    with pytest.raises(InfeasibleError, match="no contiguous placement fits"):
        solve_ilp(problem, SolverOptions(backend=backend))


def test_device_ranges():
    chain = [(i, (i + 1,), 1) for i in range(4)]
    # Five 4-byte layers on 8 + 4 + 8 bytes: layers 0, 1 fill device 0, layer 2 device 1.
    ranges = device_ranges(make_problem([[1.0] * 3] * 5, [4] * 5, [8, 4, 8], chain))
    assert ranges == [range(0, 1), range(0, 1), range(1, 2), range(2, 3), range(2, 3)]
    # With room to spare, only the ends are pinned.
    ranges = device_ranges(make_problem([[1.0] * 3] * 5, [4] * 5, [8, 8, 8], chain))
    assert ranges == [range(0, 1), range(0, 2), range(1, 2), range(1, 3), range(2, 3)]
    # Branches: layer 2 is free, its sibling 1 must follow layer 0 onto device 1.
    branches = [(0, (1, 2), 10), (1, (3,), 10), (2, (3,), 10)]
    ranges = device_ranges(make_problem([[1.0, 1.0]] * 4, [1, 5, 1, 5], [5, 10], branches))
    assert ranges == [range(0, 1), range(1, 2), range(0, 2), range(1, 2)]
    # A layer too large for device 1 skips it at the ends of its range, not in the middle.
    ranges = device_ranges(make_problem([[1.0] * 3] * 2, [9, 2], [9, 1, 9], [(0, (1,), 1)]))
    assert ranges == [range(0, 1), range(2, 3)]
    ranges = device_ranges(make_problem([[1.0] * 3] * 2, [1, 2], [9, 1, 9], [(0, (1,), 1)]))
    assert ranges == [range(0, 3), range(0, 3)]


# --- The ILP under a time limit -----------------------------------------------------------


def test_a_time_limited_run_reports_its_gap():
    # A branchy DAG whose bottleneck no solver proves within half a second.
    rng = random.Random(7)
    problem = random_problem(
        rng, 120, 6, objective=Objective.THROUGHPUT, dag=True, tightness=1.0
    )
    options = SolverOptions(backend=SolverBackend.HIGHS, time_limit_s=0.5)
    solution = solve(problem, options)
    assert_plan_valid(problem, solution)
    assert not solution.optimal
    assert solution.gap > options.gap
    assert solution.lower_bound_s >= simple_lower_bound(problem)
    assert solution.gap == pytest.approx(
        (solution.objective_s - solution.lower_bound_s) / solution.objective_s
    )


@pytest.mark.parametrize("backend", ILP_BACKENDS)
def test_the_gap_of_an_optimal_run_is_within_the_tolerance(backend):
    rng = random.Random(3)
    problem = random_problem(rng, 10, 3, objective=Objective.THROUGHPUT, dag=True, tightness=0.5)
    options = SolverOptions(backend=backend, gap=0.01)
    solution = solve_ilp(problem, options)
    assert_plan_valid(problem, solution)
    assert solution.optimal
    assert solution.gap <= options.gap + 1e-6  # Up to the solver's feasibility tolerance.


def test_no_integer_solution_in_time_falls_back_to_the_warm_start(monkeypatch):
    problem = random_problem(
        random.Random(1), 8, 3, objective=Objective.LATENCY, dag=True, tightness=0.5
    )
    heuristic = solve_dp(problem)
    monkeypatch.setattr(pulp.LpProblem, "solve", lambda self, solver=None: pulp.LpStatusNotSolved)
    options = SolverOptions(backend=SolverBackend.CBC, time_limit_s=1)
    solution = solve_ilp(problem, options, warm_start=heuristic.assignment)
    assert_plan_valid(problem, solution)
    assert solution.assignment == heuristic.assignment
    assert solution.solver == "dp"
    with pytest.raises(SolverError, match="found no placement within 1 s"):
        solve_ilp(problem, options)


def test_highs_missing(monkeypatch):
    assert highs_available()  # highspy is a dependency; without it AUTO falls back to CBC.
    monkeypatch.setattr(ilp_module, "highs_available", lambda: False)
    problem = three_layers(Objective.LATENCY)
    with pytest.raises(SolverError, match="pip install highspy"):
        solve_ilp(problem, SolverOptions(backend=SolverBackend.HIGHS))
    with pytest.warns(RuntimeWarning, match="HiGHS"):
        assert solve_ilp(problem, SolverOptions()).solver in ("cbc", "dp")


CBC_NOTE = (
    "HiGHS (highspy) is not installed: solving the placement ILP with CBC, which is slower; "
    "pip install highspy"
)


def test_the_fallback_to_cbc_is_said_in_one_line(monkeypatch):
    monkeypatch.setattr(ilp_module, "highs_available", lambda: False)
    problem = three_layers(Objective.LATENCY)
    lines: list[str] = []
    notes: list[str] = []
    with reporting(lines.append, note=notes.append):
        solve_ilp(problem, SolverOptions())
        solve_ilp(problem, SolverOptions(backend=SolverBackend.CBC))  # asked for: no note
    assert notes == [CBC_NOTE]
    assert lines == ["solving the placement ILP with CBC (time limit 60 s)"] * 2


def test_highs_reports_progress_and_stops_on_ctrl_c():
    """A Ctrl-C during a HiGHS solve stops it within HiGHS' next check, not at the time limit."""
    # The branchy DAG of the time-limit test, which HiGHS takes 5-20 s to prove here.
    problem = random_problem(random.Random(7), 120, 6, objective=Objective.THROUGHPUT, dag=True, tightness=1.0)
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if "best" in line:  # The first line with an incumbent: press Ctrl-C.
            signal.raise_signal(signal.SIGINT)

    with reporting(progress), pytest.raises(KeyboardInterrupt):
        solve_ilp(problem, SolverOptions(backend=SolverBackend.HIGHS, time_limit_s=600))
    assert lines[0] == "solving the placement ILP with HiGHS (time limit 600 s)"
    assert re.fullmatch(
        r"HiGHS: \d+ s of 600 s, best [\d.]+ m?s, bound [\d.]+ m?s, gap \d+\.\d%", lines[-1]
    ), lines[-1]
    # HiGHS has stopped: a thread left in it could abort the interpreter's exit.
    assert not [t for t in threading.enumerate() if t.name == "partitioner-highs"]


def test_highs_progress_line():
    assert ilp_module._highs_line(None, 1e-3, 0.4, 60) == "HiGHS: 0 s of 60 s, no bound yet"
    inf = float("inf")
    assert ilp_module._highs_line((inf, -inf), 1e-3, 2.0, 60) == "HiGHS: 2 s of 60 s, no placement yet"
    assert (
        ilp_module._highs_line((4.0, 3.0), 1e-3, 12.6, 60)
        == "HiGHS: 13 s of 60 s, best 4.00 ms, bound 3.00 ms, gap 25.0%"
    )


# --- Coarsening ------------------------------------------------------------------------------


def test_coarsen_keeps_totals_and_order():
    rng = random.Random(5)
    problem = random_problem(rng, 60, 3, objective=Objective.LATENCY, dag=True, tightness=1.0)
    coarse, groups = coarsen(problem, 10)
    assert len(groups) == coarse.num_layers == 10
    assert [i for group in groups for i in group] == list(range(60))
    for d in range(3):
        assert sum(row[d] for row in coarse.compute_s) == pytest.approx(
            sum(row[d] for row in problem.compute_s)
        )
    assert sum(coarse.memory) == sum(problem.memory)
    for value in coarse.values:
        assert value.consumers == tuple(sorted(set(value.consumers)))
        assert all(c == OUTPUT or c > value.producer for c in value.consumers)
    # A value read only inside its producer's group is dropped; the others stay.
    kept = [
        v for v in problem.values
        if v.producer == INPUT
        or any(c == OUTPUT or c not in groups_of(groups, v.producer) for c in v.consumers)
    ]
    assert [v.name for v in coarse.values] == [v.name for v in kept]
    assert [v.bytes for v in coarse.values] == [v.bytes for v in kept]
    solution = solve(coarse)
    assignment = expand(solution.assignment, groups)
    evaluation = evaluate(problem, assignment)
    assert evaluation.feasible
    assert evaluation.objective_s == pytest.approx(
        evaluate(coarse, solution.assignment).objective_s
    )


def groups_of(groups: tuple[range, ...], layer: int) -> range:
    if layer < 0:
        return range(0)
    return next(group for group in groups if layer in group)


def test_coarsen_merges_empty_layers_first():
    # Layers 1 and 3 are views: no compute, no memory.
    compute = [[4.0], [0.0], [3.0], [0.0], [5.0]]
    problem = make_problem(compute, [4, 0, 3, 0, 5], [99], [(i, (i + 1,), 1) for i in range(4)])
    _, groups = coarsen(problem, 3)
    assert [list(g) for g in groups] == [[0], [1, 2, 3], [4]]
    # Even before a lighter pair of real layers (3, 4).
    compute = [[5.0], [0.0], [5.0], [1.0], [1.0]]
    problem = make_problem(compute, [5, 0, 5, 1, 1], [99], [(i, (i + 1,), 1) for i in range(4)])
    _, groups = coarsen(problem, 4)
    assert [list(g) for g in groups] == [[0, 1], [2], [3], [4]]


def test_coarsen_never_builds_a_group_larger_than_a_device():
    problem = make_problem([[1.0]] * 6, [4] * 6, [8], [(i, (i + 1,), 1) for i in range(5)])
    coarse, groups = coarsen(problem, 1)
    assert len(groups) == 3
    assert max(coarse.memory) == 8


def test_coarsen_is_fast():
    n = 20_000
    problem = make_problem(
        [[1.0 + (i % 7), 2.0] for i in range(n)], [i % 5 for i in range(n)], [10**9, 10**9],
        [(i, (i + 1,) if i % 3 else (i + 1, min(i + 9, n - 1)), 8) for i in range(n - 1)],
    )
    begin = time.perf_counter()
    coarse, _ = coarsen(problem, 256)
    assert time.perf_counter() - begin < 10  # Quadratic merging would take minutes.
    assert coarse.num_layers == 256


def test_solve_coarsens_large_graphs():
    rng = random.Random(11)
    problem = random_problem(rng, 300, 4, objective=Objective.THROUGHPUT, dag=False, tightness=0.4)
    solution = solve(problem, replace(KEEP_ORDER, max_candidates=40))
    assert_plan_valid(problem, solution)
    exact = solve(problem, replace(KEEP_ORDER, max_candidates=1000))
    assert exact.solver == "dp" and exact.optimal
    assert solution.objective_s >= exact.objective_s * (1 - 1e-12)
    assert solution.lower_bound_s <= exact.objective_s
    with pytest.raises(ValueError, match="max_layers"):
        coarsen(problem, 0)
    with pytest.raises(ValueError, match="2 groups"):
        expand((0,), (range(0, 1), range(1, 2)))


def test_a_warm_start_that_fills_a_device_to_the_byte_survives_the_ilp_margin():
    # The ILP keeps MEMORY_TOLERANCE of a large device free (and its solver may use it up).
    problem = make_problem([[1.0, 1.0]] * 2, [GiB, GiB], [2 * GiB, 1], [(0, (1,), 8)])
    for backend in ILP_BACKENDS:
        solution = solve_ilp(problem, SolverOptions(backend=backend), warm_start=(0, 0))
        assert_plan_valid(problem, solution)
        assert solution.assignment == (0, 0)


def test_the_solver_runs_without_torch():
    # Load partitioner.solve (and what it imports) with torch unimportable, bypassing the
    # package's __init__ (the front door imports torch).
    script = f"""
import sys, types
sys.modules["torch"] = None
package = types.ModuleType("partitioner")
package.__path__ = [{str(Path(__file__).parents[1] / "partitioner")!r}]
sys.modules["partitioner"] = package
from partitioner.solve import solve
from partitioner.ir import Problem
one = ((0.0,),)
print(solve(Problem(compute_s=((1.0,),), memory=(1,), capacity=(1,), values=(),
                    seconds_per_byte=one, latency_s=one)).objective_s)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.0"


@pytest.mark.parametrize("backend", ILP_BACKENDS)
def test_the_ilp_writes_nothing_to_stdout(backend):
    # HiGHS prints its banner below Python's sys.stdout (file descriptor 1) unless told not
    # to before its first call: `partitioner plan --json > plan.json` then held no JSON.
    # Only a separate process sees what reaches the descriptor.
    script = f"""
from partitioner.ir import INPUT, OUTPUT, Problem, Value
from partitioner.options import Objective, SolverBackend, SolverOptions
from partitioner.solve import solve_ilp
links = ((0.0, 1e-9), (1e-9, 0.0))
problem = Problem(
    compute_s=((1.0, 1.0),) * 4, memory=(1, 1, 1, 1), capacity=(2, 2),
    values=(Value(name="a", producer=0, consumers=(1, 2), bytes=10),
            Value(name="b", producer=1, consumers=(3,), bytes=10),
            Value(name="c", producer=2, consumers=(3,), bytes=10)),
    seconds_per_byte=links, latency_s=links, objective=Objective.THROUGHPUT,
)
solve_ilp(problem, SolverOptions(backend=SolverBackend.{backend.name}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
