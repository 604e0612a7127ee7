"""The order of the devices along the pipeline (`partitioner.solve.order`): the solver's choice."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.errors import InfeasibleError
from partitioner.ir import INPUT, OUTPUT, Problem, Value
from partitioner.options import Objective, SolverOptions
from partitioner.solve import (
    evaluate,
    lower_bound,
    order_free_bound,
    path_lower_bound,
    reorder,
    solve,
    solve_brute,
)
from partitioner.solve import order as order_module
from partitioner.solve.order import device_classes, device_orders, order_count

EXACT = SolverOptions(gap=0.0)
"""Every order solved to its optimum, so that any listing must reach the same one."""


def _kinds_problem(
    rng: random.Random,
    counts: tuple[int, ...],
    num_layers: int,
    *,
    objective: Objective,
    dag: bool,
    tightness: float,
) -> Problem:
    """Devices of ``len(counts)`` kinds (``counts[k]`` alike: speed, memory), listed kind by kind.

    Links: fast within a kind, slower between kinds (NVLink inside a box, PCIe across).
    ``tightness``: the share of all the layers' memory one device of the roomiest kind holds.
    """
    speed = [rng.uniform(0.3, 3.0) for _ in counts]
    room = [rng.uniform(0.4, 1.0) for _ in counts]
    kinds = [k for k, n in enumerate(counts) for _ in range(n)]
    work = [rng.uniform(1.0, 5.0) * 1e-3 for _ in range(num_layers)]
    memory = [rng.randint(1, 10) * 100 for _ in range(num_layers)]
    largest = max(room)
    capacity = [max(max(memory), int(sum(memory) * tightness * room[k] / largest)) for k in kinds]
    edges: list[tuple[int, tuple[int, ...]]] = [(INPUT, (0,))]
    for i in range(num_layers - 1):
        consumers = {i + 1}
        if dag and i + 2 < num_layers and rng.random() < 0.4:
            consumers.add(rng.randrange(i + 2, num_layers))
        edges.append((i, tuple(sorted(consumers))))
    edges.append((num_layers - 1, (OUTPUT,)))
    per_byte = [[0.0 if s == e else (1e-9 if kinds[s] == kinds[e] else 1e-8) for e in range(len(kinds))]
                for s in range(len(kinds))]
    return Problem(
        compute_s=tuple(tuple(w / speed[k] for k in kinds) for w in work),
        memory=tuple(memory),
        capacity=tuple(capacity),
        values=tuple(
            Value(name=f"v{n}", producer=p, consumers=c, bytes=rng.randint(1, 50) * 10**5)
            for n, (p, c) in enumerate(edges)
        ),
        seconds_per_byte=tuple(map(tuple, per_byte)),
        latency_s=tuple(tuple(0.0 if s == e else 1e-5 for e in range(len(kinds))) for s in range(len(kinds))),
        objective=objective,
        device_names=tuple(f"kind{k}:{sum(1 for j in kinds[:d] if j == k)}" for d, k in enumerate(kinds)),
    )


def _best_over_every_order(problem: Problem) -> float:
    """The oracle: brute force in every permutation of the devices."""
    best = math.inf
    for order in itertools.permutations(range(problem.num_devices)):
        try:
            best = min(best, solve_brute(reorder(problem, order)).objective_s)
        except InfeasibleError:
            pass
    return best


def _assert_placed_in_its_order(problem: Problem, solution) -> None:
    """The assignment is a feasible placement of the reordered problem at the reported cost."""
    ev = evaluate(reorder(problem, solution.device_order), solution.assignment)
    assert ev.feasible, ev.violations
    assert ev.objective_s == pytest.approx(solution.objective_s, rel=1e-12)
    assert sorted(solution.device_order or range(problem.num_devices)) == list(range(problem.num_devices))


# --- Classes and orders ----------------------------------------------------------------------


def test_device_classes_group_devices_alike_wherever_they_are_listed():
    problem = _kinds_problem(random.Random(1), (2, 2), 4, objective=Objective.THROUGHPUT, dag=False, tightness=1.0)
    assert device_classes(problem) == (0, 0, 2, 2)
    interleaved = reorder(problem, (0, 2, 1, 3))
    assert device_classes(interleaved) == (0, 1, 0, 1)


def test_devices_alike_but_on_two_nodes_are_two_classes_whose_swaps_are_one_problem():
    # Four identical GPUs, two per node: fast links inside a node, slow across.
    node = [0, 0, 1, 1]
    problem = Problem(
        compute_s=((1.0,) * 4,) * 3,
        memory=(1, 1, 1),
        capacity=(10,) * 4,
        values=(Value(name="a", producer=0, consumers=(1,), bytes=10), Value(name="b", producer=1, consumers=(2,), bytes=10)),
        seconds_per_byte=tuple(tuple(0.0 if s == e else (0.01 if node[s] == node[e] else 0.1) for e in range(4)) for s in range(4)),
        latency_s=((0.0,) * 4,) * 4,
        objective=Objective.THROUGHPUT,
    )
    assert device_classes(problem) == (0, 0, 2, 2)
    assert order_count(device_classes(problem)) == 6
    solution = solve(problem)
    assert solution.orders is not None and solution.orders.exhaustive
    # The listed order and its mirror (nodes swapped) pose the same problem: weighed once.
    search = order_module._Search(problem, EXACT, lambda p, o: solve(p, SolverOptions(keep_device_order=True)),
                                  device_classes(problem), max_solves=None)
    keys = {search._key(order) for order in device_orders(device_classes(problem))}
    assert len(keys) == 3  # aabb = bbaa, abab = baba, abba = baab


def test_device_orders_are_every_sequence_of_classes_once():
    classes = (0, 0, 2, 2, 4)
    orders = list(device_orders(classes))
    assert len(orders) == order_count(classes) == math.factorial(5) // (2 * 2)
    assert len({tuple(classes[d] for d in order) for order in orders}) == len(orders)
    assert all(sorted(order) == list(range(5)) for order in orders)


def test_reorder_moves_every_per_device_table():
    problem = _kinds_problem(random.Random(2), (1, 2), 3, objective=Objective.LATENCY, dag=True, tightness=0.5)
    order = (2, 0, 1)
    moved = reorder(problem, order)
    for k, d in enumerate(order):
        assert moved.capacity[k] == problem.capacity[d]
        assert moved.device_names[k] == problem.device_names[d]
        assert all(row[k] == original[d] for row, original in zip(moved.compute_s, problem.compute_s))
        for j, e in enumerate(order):
            assert moved.seconds_per_byte[k][j] == problem.seconds_per_byte[d][e]
    back = [order.index(d) for d in range(3)]
    assert reorder(moved, back) == problem
    assert reorder(problem, ()) is problem


# --- The search ------------------------------------------------------------------------------


def test_bert_like_head_goes_last_onto_a_fast_device_whatever_the_listing():
    # Four fast and four slow devices; the last layer (a vocabulary head) is the heaviest.
    # Listed fast then slow, layers flow fast -> slow and the head lands on a slow device
    # (4 / 0.6 s), as all 32 s of work do not fit the fast ones in less. With a fast device
    # last, the head takes 4 s there: 3 fast devices x 5 layers, 4 slow x 3, and 1 beside
    # the head cover the 28 layers in 5 s.
    work = [1.0] * 28 + [4.0]
    kinds = [0] * 4 + [1] * 4
    speed = (1.0, 0.6)
    problem = Problem(
        compute_s=tuple(tuple(w / speed[k] for k in kinds) for w in work),
        memory=(1,) * 29,
        capacity=(100,) * 8,
        values=tuple(Value(name=f"v{i}", producer=i, consumers=(i + 1,), bytes=1) for i in range(28)),
        seconds_per_byte=tuple(tuple(0.0 for _ in kinds) for _ in kinds),
        latency_s=tuple(tuple(0.0 for _ in kinds) for _ in kinds),
        objective=Objective.THROUGHPUT,
    )
    kept = solve(problem, SolverOptions(keep_device_order=True))
    assert kept.objective_s == pytest.approx(4.0 / 0.6)
    solution = solve(problem)
    assert solution.objective_s <= 5.0 * (1 + 1e-12)
    assert solution.optimal and solution.orders is not None and solution.orders.exhaustive
    assert solution.orders.orders == 70 and solution.orders.solved < 70
    head_device = (solution.device_order or tuple(range(8)))[solution.assignment[-1]]
    assert kinds[head_device] == 0
    _assert_placed_in_its_order(problem, solution)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    counts=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 1, 1), (2, 1, 1), (1, 3)]),
    num_layers=st.integers(2, 6),
    objective=st.sampled_from([Objective.LATENCY, Objective.THROUGHPUT]),
    dag=st.booleans(),
    tightness=st.sampled_from([0.3, 0.5, 1.0]),
)
def test_any_listing_of_mixed_devices_gets_the_best_order(seed, counts, num_layers, objective, dag, tightness):
    rng = random.Random(seed)
    problem = _kinds_problem(rng, counts, num_layers, objective=objective, dag=dag, tightness=tightness)
    best = _best_over_every_order(problem)
    listing = list(range(problem.num_devices))
    rng.shuffle(listing)
    for listed in (problem, reorder(problem, listing)):
        if math.isinf(best):
            with pytest.raises(InfeasibleError):
                solve(listed, EXACT)
            continue
        solution = solve(listed, EXACT)
        assert solution.objective_s == pytest.approx(best, rel=1e-9)
        assert solution.optimal and solution.lower_bound_s <= solution.objective_s
        _assert_placed_in_its_order(listed, solution)


def test_keep_device_order_places_along_the_listing():
    problem = _kinds_problem(random.Random(5), (2, 2), 5, objective=Objective.THROUGHPUT, dag=False, tightness=1.0)
    kept = solve(problem, SolverOptions(keep_device_order=True))
    assert kept.device_order == () and kept.orders is None
    assert kept.objective_s == pytest.approx(solve_brute(problem).objective_s)
    with pytest.raises(ValueError, match="keep_device_order must be True or False"):
        SolverOptions(keep_device_order=1)  # type: ignore[arg-type]


def test_orders_too_many_to_weigh_are_searched_heuristically_with_a_bound_over_all(monkeypatch):
    problem = _kinds_problem(random.Random(7), (1, 1, 1, 1), 8, objective=Objective.THROUGHPUT, dag=False,
                             tightness=0.4)
    exhaustive = solve(problem, EXACT)
    monkeypatch.setattr(order_module, "ORDER_LIMIT", 5)
    heuristic = solve(problem, EXACT)
    assert heuristic.orders is not None and not heuristic.orders.exhaustive
    assert heuristic.orders.orders == 24
    _assert_placed_in_its_order(problem, heuristic)
    assert heuristic.objective_s >= exhaustive.objective_s * (1 - 1e-12)
    # The bound it reports holds for every order, so the exhaustive optimum is above it.
    assert heuristic.lower_bound_s <= exhaustive.objective_s
    assert heuristic.optimal == (heuristic.objective_s - heuristic.lower_bound_s <= 0.0)


@pytest.mark.parametrize("objective", [Objective.LATENCY, Objective.THROUGHPUT])
def test_order_free_bound_is_below_every_order(objective):
    rng = random.Random(11)
    for _ in range(20):
        problem = _kinds_problem(rng, (2, 1, 1), rng.randint(3, 9), objective=objective, dag=rng.random() < 0.5,
                                 tightness=rng.choice([0.3, 0.6, 1.0]))
        bound = order_free_bound(problem)
        orders = list(device_orders(device_classes(problem)))
        per_order = [lower_bound(reorder(problem, order)) for order in orders]
        assert bound <= min(per_order)
        if objective is Objective.THROUGHPUT:
            assert bound == pytest.approx(min(per_order), rel=1e-6)  # the DP finds the least path bound
            # The search's bounds of all orders at once are each order's own path bound.
            at_once = order_module._PathTables(problem).bounds(np.asarray(orders))
            one_by_one = [path_lower_bound(reorder(problem, order)) for order in orders]
            assert at_once.tolist() == pytest.approx(one_by_one, rel=1e-6)


def test_no_order_fitting_names_the_orders_tried():
    # Two unlike devices of 7 bytes hold the 14 bytes of three layers, but not in runs:
    # whichever comes first takes only the first layer (6 + 2 > 7), leaving 8 for the other.
    problem = Problem(
        compute_s=((1.0, 2.0), (1.0, 2.0), (1.0, 2.0)),
        memory=(6, 2, 6),
        capacity=(7, 7),
        values=(Value(name="a", producer=0, consumers=(1,), bytes=1), Value(name="b", producer=1, consumers=(2,), bytes=1)),
        seconds_per_byte=((0.0, 0.0), (0.0, 0.0)),
        latency_s=((0.0, 0.0), (0.0, 0.0)),
        objective=Objective.THROUGHPUT,
    )
    with pytest.raises(InfeasibleError, match=r"no other order of the devices fits either \(2 of 2 orders tried\)"):
        solve(problem)
