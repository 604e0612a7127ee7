"""The path lower bound (`partitioner.solve.bounds`) and what `solve` skips with it."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from partitioner.errors import InfeasibleError
from partitioner.ir import INPUT, OUTPUT, Problem, ReplicaCost, Value
from partitioner.options import Objective, SolverOptions, Strategy
import partitioner.solve as solve_module
from partitioner.solve import (
    evaluate,
    lower_bound,
    path_lower_bound,
    simple_lower_bound,
    solve,
    solve_brute,
    solve_ilp,
)
from partitioner.solve.bounds import heaviest_path


def _problem(
    compute: list[list[float]],
    memory: list[int],
    capacity: list[int],
    edges: list[tuple[int, tuple[int, ...]]],
    *,
    objective: Objective = Objective.THROUGHPUT,
    replica: ReplicaCost | None = None,
    per_byte: float = 1e-9,
) -> Problem:
    d = len(capacity)
    values = tuple(
        Value(name=f"v{k}", producer=p, consumers=c, bytes=10**6) for k, (p, c) in enumerate(edges)
    )
    return Problem(
        compute_s=tuple(tuple(row) for row in compute),
        memory=tuple(memory),
        capacity=tuple(capacity),
        values=values,
        seconds_per_byte=tuple(tuple(0.0 if s == e else per_byte for e in range(d)) for s in range(d)),
        latency_s=tuple(tuple(0.0 for _ in range(d)) for _ in range(d)),
        objective=objective,
        replica=replica,
    )


def _random_dag(rng: random.Random, num_layers: int, num_devices: int, tightness: float) -> Problem:
    """Branches (layers fed by an earlier one but not the previous one), skips, unlike devices."""
    speed = [rng.uniform(0.5, 2.0) for _ in range(num_devices)]
    compute = [[rng.uniform(1.0, 5.0) / s for s in speed] for _ in range(num_layers)]
    memory = [rng.randint(1, 10) * 100 for _ in range(num_layers)]
    room = max(max(memory), int(sum(memory) * tightness))
    capacity = [room + rng.randint(0, 100) for _ in range(num_devices)]
    edges: list[tuple[int, tuple[int, ...]]] = [(INPUT, (0,))]
    for c in range(1, num_layers):
        producers = {rng.randrange(c)} | ({c - 1} if rng.random() < 0.6 else set())
        edges += [(p, (c,)) for p in sorted(producers)]
    edges.append((num_layers - 1, (OUTPUT,)))
    return _problem(compute, memory, capacity, edges, per_byte=rng.uniform(0.0, 2.0) * 1e-6)


@pytest.mark.parametrize("seed", range(60))
def test_path_bound_never_exceeds_the_optimum(seed):
    rng = random.Random(seed)
    problem = _random_dag(rng, rng.randint(1, 7), rng.randint(1, 3), rng.choice([1.0, 0.5, 0.35]))
    try:
        best = solve_brute(problem).objective_s
    except InfeasibleError:
        return
    assert simple_lower_bound(problem) <= lower_bound(problem) <= best


def test_path_bound_is_the_compute_bottleneck_of_a_chain():
    # Four layers on two devices: the best split is 3 | 1+2+... , bottleneck 5.
    chain = _problem(
        [[3.0, 3.0], [2.0, 2.0], [2.0, 2.0], [1.0, 1.0]],
        [1, 1, 1, 1],
        [4, 4],
        [(INPUT, (0,)), (0, (1,)), (1, (2,)), (2, (3,)), (3, (OUTPUT,))],
    )
    assert heaviest_path(chain) == [0, 1, 2, 3]
    assert path_lower_bound(chain) == pytest.approx(5.0, rel=1e-8)
    assert path_lower_bound(chain) <= 5.0
    assert simple_lower_bound(chain) == pytest.approx(4.0)


def test_path_bound_follows_the_heaviest_branch_and_memory():
    # 0 feeds a light branch (1) and a heavy one (2 -> 3); each device holds two layers.
    problem = _problem(
        [[1.0, 1.0], [0.5, 0.5], [4.0, 4.0], [4.0, 4.0]],
        [1, 1, 1, 1],
        [2, 2],
        [(INPUT, (0,)), (0, (1, 2)), (2, (3,)), (1, (OUTPUT,)), (3, (OUTPUT,))],
    )
    assert heaviest_path(problem) == [0, 2, 3]
    # Along 0 -> 2 -> 3 the best runs are [0, 2 | 3]: 5 s.
    assert path_lower_bound(problem) == pytest.approx(5.0, rel=1e-8)
    assert solve_brute(problem).objective_s >= path_lower_bound(problem)
    # The path alone cannot fit: no placement can.
    tight = _problem(
        [[1.0], [1.0], [1.0]], [2, 2, 2], [5], [(INPUT, (0,)), (0, (1,)), (1, (2,)), (2, (OUTPUT,))]
    )
    assert path_lower_bound(tight) == math.inf


def test_latency_keeps_the_simple_bound():
    problem = _random_dag(random.Random(1), 6, 3, 0.5)
    latency = replace(problem, objective=Objective.LATENCY)
    assert lower_bound(latency) == simple_lower_bound(latency)


def _blocks(num_blocks: int, num_devices: int, replica_s: float) -> Problem:
    """A transformer's shape: an embedding read again by the head (tied weights), so not a chain."""
    n = num_blocks + 2
    compute = [[1.0] * num_devices for _ in range(n)]
    compute[-1] = [2.5] * num_devices
    edges: list[tuple[int, tuple[int, ...]]] = [(INPUT, (0,)), (0, (1, n - 1))]
    edges += [(i, (i + 1,)) for i in range(1, n - 1)] + [(n - 1, (OUTPUT,))]
    replica = ReplicaCost(time_s=replica_s, memory=(n,) * num_devices)
    return _problem(compute, [1] * n, [n] * num_devices, edges, replica=replica, per_byte=0.0)


def test_data_parallelism_below_the_bound_skips_the_search(monkeypatch):
    problem = _blocks(10, 4, replica_s=3.5)  # Any pipeline's busiest device computes >= 4 s.
    assert lower_bound(problem) > 3.5 > simple_lower_bound(problem)
    monkeypatch.setattr(solve_module, "_place", lambda *a, **k: pytest.fail("a placement was searched"))
    solution = solve(problem)
    assert solution.strategy is Strategy.DATA_PARALLEL
    assert solution.objective_s == solution.lower_bound_s == 3.5 and solution.optimal


def test_a_dp_placement_at_the_bound_needs_no_ilp(monkeypatch):
    problem = _blocks(10, 4, replica_s=100.0)
    monkeypatch.setattr(solve_module, "solve_ilp", lambda *a, **k: pytest.fail("the ILP ran"))
    solution = solve(problem, SolverOptions())
    assert solution.strategy is not Strategy.DATA_PARALLEL and solution.optimal
    assert solution.objective_s == evaluate(problem, solution.assignment).objective_s
    monkeypatch.undo()
    assert solution.objective_s == pytest.approx(solve_ilp(replace(problem, replica=None)).objective_s)
