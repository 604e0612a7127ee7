"""The order of the devices along the pipeline: the solver's choice, not the user's listing.

A placement never sends a value back to an earlier device (`partitioner.solve.evaluate`),
so the order of the devices is part of the answer: four A100s then four V100s put BERT's
vocabulary head on a V100; listed otherwise, the head lands on an A100 and the pipeline is
1.24x faster. `solve_in_best_order` searches the orders.

Classes. Devices ``d`` and ``e`` are twins when swapping them, the permutation
``(d e)``, leaves the problem as it is, to the bit: the same compute column and capacity,
the same links to every other device, and ``link[d][e] = link[e][d]`` (the condition of
`partitioner.solve.symmetry`, for any pair). Symmetries compose, so twins form classes, and
reordering the devices of one class changes nothing: an order is a sequence of classes,
one of ``D! / (n_1! ... n_k!)`` for classes of ``n_1, ..., n_k`` devices (70 for four
A100s and four V100s; one for identical devices, which are never searched).

Search (branch and bound over orders). With at most `ORDER_LIMIT` orders, every one is
weighed, the order as listed first (ties keep it), then the others by their lower bound:
`partitioner.solve.bounds`' path bound under THROUGHPUT, which depends on the order
(computed for all orders at once, `_PathTables`), the compute bound under LATENCY. An order
whose bound is within the gap of the best placement found cannot beat it and is cut
without a solve. The others are placed by their DP first (`solve_dp` on chains, else
`solve_near_chain`: milliseconds, with a bound of its own on sequential graphs), and by
the full solver (`partitioner.solve`: the ILP where no DP is exact) only if that proved
nothing and the order's bound still lies below the best placement. The bound reported is
the least over all orders of what each one's solve proved or its own bound: optimal means
optimal over every order. ``SolverOptions.time_limit_s`` caps the whole search; orders left
unsolved then keep their bounds in it (`OrderSearch.exhaustive` is False).

With more orders, a heuristic: the order as listed, the orders that keep each class
together, then swaps of neighbouring devices of unlike classes while they pay, at most
`_HEURISTIC_SOLVES` solves. The bound reported then holds for every order at once:
`order_free_bound`, the path bound minimised over all orders by a dynamic program over how
many devices of each class the path has used (under LATENCY the compute bound, which no
order changes).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np

from partitioner.errors import InfeasibleError
from partitioner.ir import OrderSearch, Problem, Solution
from partitioner.options import Objective, SolverBackend, SolverOptions
from partitioner.solve.bounds import _BISECTION_STEPS, _RELATIVE_SLACK, heaviest_path, least_cover
from partitioner.solve.dp import is_chain, solve_dp
from partitioner.solve.evaluate import simple_lower_bound
from partitioner.solve.feasibility import check_memory
from partitioner.solve.nearchain import solve_near_chain

__all__ = [
    "ORDER_LIMIT",
    "device_classes",
    "order_count",
    "device_orders",
    "reorder",
    "order_free_bound",
    "solve_in_best_order",
]

ORDER_LIMIT = 1000
"""Most orders weighed one by one. Each costs a reordered problem and its path bound (about
a millisecond at 250 layers); most are cut by their bound. 8 devices in 3 classes (3, 3, 2)
have 560 orders; in 4 classes of 2, 2,520."""

_BOUND_STATES = 2048
"""Most (state x class) pairs of `order_free_bound`'s dynamic program (about 0.2 s of bisection);
above it the compute bound alone is used."""

_TIE = 1e-12
"""A later order replaces the best one only when better by more than this fraction: float
sums in another order of devices differ in the last bits, and ties keep the order listed."""

Place = Callable[[Problem, SolverOptions], Solution]
"""A solver for one fixed order (`partitioner.solve`'s ``_place``)."""


def device_classes(problem: Problem) -> tuple[int, ...]:
    """Each device's class: the lowest index of its twins (see the module docstring).

    Returns:
        ``classes[d]``: the first device ``e <= d`` that swapping with ``d`` leaves the
        problem unchanged (``d`` itself when none).
    """
    num_devices = problem.num_devices
    compute = np.asarray(problem.compute_s, dtype=float).reshape(-1, num_devices)
    links = [
        np.asarray(table, dtype=float).reshape(num_devices, num_devices)
        for table in (problem.seconds_per_byte, problem.latency_s)
    ]
    classes = list(range(num_devices))
    for d in range(num_devices):
        for e in sorted(set(classes[:d])):
            if _twins(problem, compute, links, e, d):
                classes[d] = e
                break
    return tuple(classes)


def _twins(problem: Problem, compute: np.ndarray, links: list[np.ndarray], d: int, e: int) -> bool:
    """Whether the swap ``(d e)`` leaves compute, capacity and both link tables as they are."""
    if problem.capacity[d] != problem.capacity[e] or not np.array_equal(compute[:, d], compute[:, e]):
        return False
    others = np.ones(problem.num_devices, dtype=bool)
    others[[d, e]] = False
    return all(
        np.array_equal(link[d, others], link[e, others])
        and np.array_equal(link[others, d], link[others, e])
        and link[d, e] == link[e, d]
        for link in links
    )


def order_count(classes: Sequence[int]) -> int:
    """Distinct orders of devices in these classes: the multinomial ``D! / prod(n_c!)``."""
    count = math.factorial(len(classes))
    for n in Counter(classes).values():
        count //= math.factorial(n)
    return count


def device_orders(classes: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every distinct order, as the device indices along the pipeline.

    Each sequence of classes comes once (lexicographic by class, so the listed order's
    sequence may come anywhere); within a class, devices keep their listed order.
    """
    members: dict[int, list[int]] = {}
    for d, c in enumerate(classes):
        members.setdefault(c, []).append(d)
    labels = sorted(members)
    left = {c: len(members[c]) for c in labels}
    sequence: list[int] = []

    def extend() -> Iterator[tuple[int, ...]]:
        if len(sequence) == len(classes):
            yield _devices_of(sequence, members)
            return
        for c in labels:
            if left[c]:
                left[c] -= 1
                sequence.append(c)
                yield from extend()
                sequence.pop()
                left[c] += 1

    yield from extend()


def _devices_of(sequence: Sequence[int], members: dict[int, list[int]]) -> tuple[int, ...]:
    """The devices along a sequence of classes, each class's in their listed order."""
    taken = {c: iter(devices) for c, devices in members.items()}
    return tuple(next(taken[c]) for c in sequence)


def reorder(problem: Problem, order: Sequence[int]) -> Problem:
    """``problem`` with its devices in ``order`` (``order[k]``: the device placed k-th).

    The data-parallel alternatives keep their times (priced for the devices as given) and
    permute their memory and device indices, the copies' tables their device columns. An
    empty ``order`` returns ``problem`` itself.
    """
    if not order or tuple(order) == tuple(range(problem.num_devices)):
        return problem
    replica = problem.replica
    if replica is not None and len(replica.memory) == problem.num_devices:
        replica = replace(replica, memory=tuple(replica.memory[d] for d in order))
    position = {d: k for k, d in enumerate(order)}
    # Copies of the model keep their devices (and the time priced for them), renumbered.
    data_parallel = tuple(
        replace(r, memory=tuple(r.memory[d] for d in order), devices=tuple(position[d] for d in r.devices))
        for r in problem.data_parallel
    )
    shares = tuple(
        replace(
            s,
            compute_s=tuple(tuple(row[d] for d in order) for row in s.compute_s),
            capacity=tuple(s.capacity[d] for d in order),
        )
        for s in problem.batch_shares
    )
    return replace(
        problem,
        data_parallel=data_parallel,
        batch_shares=shares,
        compute_s=tuple(tuple(row[d] for d in order) for row in problem.compute_s),
        capacity=tuple(problem.capacity[d] for d in order),
        seconds_per_byte=tuple(tuple(problem.seconds_per_byte[s][e] for e in order) for s in order),
        latency_s=tuple(tuple(problem.latency_s[s][e] for e in order) for s in order),
        device_names=tuple(problem.device_names[d] for d in order) if problem.device_names else (),
        replica=replica,
    )


class _PathTables:
    """The heaviest path's prefix sums (`partitioner.solve.bounds`), for path bounds of many
    orders at once: the path and its sums are the same in every order, only which device
    runs the k-th run changes."""

    def __init__(self, problem: Problem):
        path = heaviest_path(problem)
        self.m = len(path)
        compute = np.asarray([problem.compute_s[i] for i in path], dtype=float).reshape(self.m, -1)
        self.finite = bool(np.all(np.isfinite(compute)))
        # prefix[k, d]: compute of the path's first k layers on device d; memory likewise.
        self.prefix = np.vstack([np.zeros(problem.num_devices), np.cumsum(compute, axis=0)])
        self.memory = np.concatenate([[0], np.cumsum([problem.memory[i] for i in path], dtype=np.int64)])
        self.capacity = np.asarray(problem.capacity, dtype=np.int64)
        self._columns: list[list[float]] | None = None
        self._memory: list[int] = []

    def extend(self, j: np.ndarray, devices: np.ndarray, limits: np.ndarray) -> np.ndarray:
        """Where the greedy run of ``devices[o]`` from layer ``j[o]`` of the path ends, for each o."""
        by_memory = np.searchsorted(self.memory, self.memory[j] + self.capacity[devices], side="right") - 1
        by_compute = np.empty_like(j)
        for d in np.unique(devices):
            mine = devices == d
            column = self.prefix[:, d]
            by_compute[mine] = np.searchsorted(column, column[j[mine]] + limits[mine], side="right") - 1
        return np.maximum(j, np.minimum(np.minimum(by_memory, by_compute), self.m))

    def extend_one(self, j: int, device: int, limit: float) -> int:
        """`extend` for one run (plain Python: no array overhead for the order-free DP)."""
        if self._columns is None:
            self._columns = [self.prefix[:, d].tolist() for d in range(self.prefix.shape[1])]
            self._memory = self.memory.tolist()
        column, memory = self._columns[device], self._memory
        by_memory = bisect.bisect_right(memory, memory[j] + int(self.capacity[device])) - 1
        by_compute = bisect.bisect_right(column, column[j] + limit) - 1
        return max(j, min(by_memory, by_compute, self.m))

    def covers(self, orders: np.ndarray, limits: np.ndarray) -> np.ndarray:
        """Whether runs of compute at most ``limits[o]`` on the devices in ``orders[o]`` cover the path."""
        j = np.zeros(len(orders), dtype=np.int64)
        for k in range(orders.shape[1]):
            j = self.extend(j, orders[:, k], limits)
        return j == self.m

    def bounds(self, orders: np.ndarray) -> np.ndarray:
        """`bounds.path_lower_bound` of each order (rows of device indices), by one bisection
        for all of them: ``math.inf`` where the path fits no run placement in memory."""
        count = len(orders)
        if self.m == 0 or not self.finite:
            return np.zeros(count)
        result = np.full(count, math.inf)
        fits = self.covers(orders, np.full(count, math.inf))
        result[fits] = 0.0
        low = np.zeros(count)
        high = np.full(count, float(self.prefix[-1].max()))  # Every run fits this much compute.
        open_ = fits & ~self.covers(orders, low)
        for _ in range(_BISECTION_STEPS):  # Invariant: covers(high), not covers(low).
            active = np.flatnonzero(open_ & (high - low > _RELATIVE_SLACK * high))
            if not len(active):
                break
            middle = (low[active] + high[active]) / 2
            ok = self.covers(orders[active], middle)
            high[active[ok]] = middle[ok]
            low[active[~ok]] = middle[~ok]
        result[open_] = low[open_] * (1 - _RELATIVE_SLACK)
        return result


def order_free_bound(problem: Problem, classes: Sequence[int] | None = None) -> float:
    """A bound on every placement in every order of the devices.

    LATENCY: `simple_lower_bound` (no order changes it). THROUGHPUT: the larger of it and
    the path bound of `partitioner.solve.bounds` minimised over every order: along the
    heaviest path, runs on distinct devices in any order. Whether runs of compute at most
    ``T`` can cover the path is a dynamic program over ``s``, how many devices of each
    class are used: ``reach(s) = max over classes c used in s of extend(reach(s - e_c), c)``
    (the greedy run of a device of class ``c`` from where the others left off; starting
    further never ends sooner, so the furthest reach is all each state needs). ``T`` is
    found by bisection, as for one order. Falls back to the compute bound when the states
    are too many (`_BOUND_STATES`).

    Returns:
        The bound, lowered by `bounds._RELATIVE_SLACK`; ``math.inf`` if the heaviest path
        fits no order in memory.
    """
    simple = simple_lower_bound(problem)
    if problem.objective is not Objective.THROUGHPUT or problem.num_layers == 0:
        return simple
    classes = device_classes(problem) if classes is None else classes
    counts = Counter(classes)
    labels = sorted(counts)
    states = math.prod(counts[c] + 1 for c in labels)
    if states * len(labels) > _BOUND_STATES:
        return simple
    return max(simple, _any_order_path_bound(_PathTables(problem), [counts[c] for c in labels], labels))


def _any_order_path_bound(tables: _PathTables, counts: list[int], devices: list[int]) -> float:
    """The path bound minimised over orders of ``counts[k]`` devices like ``devices[k]``."""
    if tables.m == 0 or not tables.finite:
        return 0.0
    # State s (devices used of each class) as a mixed-radix number: s - e_c is s - stride[c].
    stride = [math.prod(c + 1 for c in counts[:k]) for k in range(len(counts))]
    digits = [
        tuple((s // stride[k]) % (counts[k] + 1) for k in range(len(counts)))
        for s in range(math.prod(c + 1 for c in counts))
    ]

    def covers(limit: float) -> bool:
        """Whether runs of compute at most `limit`, on devices in some order, cover the path."""
        reach = [0] * len(digits)
        for s in range(1, len(digits)):
            best = 0
            for k, used in enumerate(digits[s]):
                if used:
                    best = max(best, tables.extend_one(reach[s - stride[k]], devices[k], limit))
            if best == tables.m:
                return True
            reach[s] = best
        return False

    return least_cover(covers, float(tables.prefix[-1].max()))


def solve_in_best_order(problem: Problem, options: SolverOptions, place: Place) -> Solution:
    """The best placement over the orders of ``problem``'s devices (see the module docstring).

    Args:
        problem: The cost tables, devices as listed.
        options: Solver options; ``time_limit_s`` also caps the search over orders (the
            order as listed is always solved in full).
        place: The solver for one order.

    Returns:
        The best placement found, with `Solution.device_order` (empty when the order as
        listed won), `Solution.orders`, and a bound over every order: optimal only if no
        order can beat it by more than the gap.

    Raises:
        InfeasibleError: If no order fits (the listed order's reason, with the number of
            orders tried).
    """
    classes = device_classes(problem)
    if options.keep_device_order or len(set(classes)) == 1:
        return place(problem, options)
    check_memory(problem)  # A layer no device holds: no order helps, and the error says so.
    count = order_count(classes)
    exhaustive = count <= ORDER_LIMIT
    search = _Search(problem, options, place, classes, max_solves=None if exhaustive else _HEURISTIC_SOLVES)
    search.weigh([tuple(range(problem.num_devices))])
    if exhaustive:
        search.weigh(list(device_orders(classes)))
    else:
        search.weigh(_grouped_orders(problem, classes))
        search.descend()
    return search.result(count, weighed_all=exhaustive)


_GROUPED_CLASSES = 5
"""Up to this many classes, every order of whole classes is weighed (at most 120)."""

_HEURISTIC_SOLVES = 32
"""Most orders solved when they are too many to weigh all (`ORDER_LIMIT`)."""

_LEAST_TIME_S = 1.0
"""Time limit of a full solve when the search has used up ``time_limit_s`` before finding
any placement (the first one found is always kept)."""


def _grouped_orders(problem: Problem, classes: Sequence[int]) -> list[tuple[int, ...]]:
    """Orders that keep each class's devices together: fastest class first, slowest first,
    and with at most `_GROUPED_CLASSES` classes every order of them."""
    members: dict[int, list[int]] = {}
    for d, c in enumerate(classes):
        members.setdefault(c, []).append(d)
    speed = sorted(members, key=lambda c: sum(row[c] for row in problem.compute_s))
    blocks = [speed, speed[::-1]]
    if len(members) <= _GROUPED_CLASSES:
        blocks += [list(block) for block in itertools.permutations(speed)]
    return [tuple(d for c in block for d in members[c]) for block in blocks]


class _Search:
    """The orders weighed so far, the best placement, and the bounds of the rest."""

    def __init__(
        self, problem: Problem, options: SolverOptions, place: Place, classes: tuple[int, ...], max_solves: int | None
    ):
        self.problem, self.options, self.place, self.classes = problem, options, place, classes
        self.max_solves = max_solves
        self.begin = time.perf_counter()
        self.tables = _PathTables(problem) if problem.objective is Objective.THROUGHPUT else None
        # Each order's DP first, where `place` would solve the layers as they are and may pick.
        self.quick = options.backend is SolverBackend.AUTO and problem.num_layers <= options.max_candidates
        self.simple = simple_lower_bound(problem)
        # Classes alike but for their links get one id: orders that only swap them (two
        # nodes of like GPUs) may still be the same problem, which the key then shows.
        alike: dict[tuple[object, ...], int] = {}
        self.content = {
            c: alike.setdefault((problem.capacity[c], tuple(row[c] for row in problem.compute_s)), len(alike))
            for c in sorted(set(classes))
        }
        self.best: tuple[Solution, tuple[int, ...]] | None = None
        self.seen: set[tuple[object, ...]] = set()
        self.bounds: list[float] = []
        """Per order weighed: its solve's bound, or its own bound when cut or left unsolved."""
        self.solved = self.cut = 0
        self.unsolved = False
        self.first_error: InfeasibleError | None = None

    def _key(self, order: tuple[int, ...]) -> tuple[object, ...]:
        """What the reordered problem depends on: orders with one key are the same problem."""
        p = self.problem
        return (
            tuple(self.content[self.classes[d]] for d in order),
            tuple(p.seconds_per_byte[s][e] for s in order for e in order),
            tuple(p.latency_s[s][e] for s in order for e in order),
        )

    def weigh(self, orders: Sequence[tuple[int, ...]]) -> bool:
        """Place the new orders among ``orders``, cutting those that cannot win; whether the
        best one changed.

        Best bound first (`bounds.lower_bound` of each reordered problem). Where the layers
        are few enough to be placed as they are, each order not cut is first placed by its
        DP (`solve_dp` on a chain, else `solve_near_chain`: milliseconds, and a bound of its
        own on sequential graphs); the full solver (the ILP) runs only on orders whose DP
        proved nothing and whose bound still lies below the best placement.
        """
        fresh = []
        for order in orders:
            key = self._key(order)
            if key not in self.seen:
                self.seen.add(key)
                fresh.append(order)
        if not fresh:
            return False
        if self.tables is None:
            bounds = [self.simple] * len(fresh)
        else:
            bounds = np.maximum(self.simple, self.tables.bounds(np.asarray(fresh, dtype=np.int64))).tolist()
        ranked = sorted(zip(bounds, fresh), key=lambda item: item[0])  # stable: ties keep their sequence
        improved = False
        pending = []
        for bound, order in ranked:
            if self._cut(bound):
                continue
            if not self.quick:
                pending.append((bound, order))
                continue
            solution = self._run(bound, order, quick=True)
            if solution is None:
                continue
            improved = self._offer(solution, order) or improved
            bound = min(max(bound, solution.lower_bound_s), solution.objective_s)
            if solution.objective_s - bound <= self.options.gap * solution.objective_s:  # Proved for its order.
                self.solved += 1
                self.bounds.append(bound)
            else:
                pending.append((bound, order))
        for bound, order in sorted(pending, key=lambda item: item[0]):
            if self._cut(bound):
                continue
            solution = self._run(bound, order, quick=False)
            if solution is not None:
                self.solved += 1
                self.bounds.append(max(bound, solution.lower_bound_s))
                improved = self._offer(solution, order) or improved
        return improved

    def _cut(self, bound: float) -> bool:
        """Whether an order with this bound cannot beat the best placement (then it is recorded)."""
        if self.best is None or bound < self.best[0].objective_s * (1 - self.options.gap):
            return False
        self.cut += 1
        self.bounds.append(bound)
        return True

    def _run(self, bound: float, order: tuple[int, ...], *, quick: bool) -> Solution | None:
        """Place one order: its DP when ``quick``, else the full solver with the time left.

        None, with the order's bound recorded, when out of time or solves (the search is then
        no longer exhaustive) or when nothing fits in this order.
        """
        elapsed = time.perf_counter() - self.begin
        over = self.max_solves is not None and self.solved >= self.max_solves
        if self.best is not None and (elapsed >= self.options.time_limit_s or over):
            self.unsolved = True
            self.bounds.append(bound)
            return None
        problem = reorder(self.problem, order)
        try:
            if quick:
                return solve_dp(problem) if is_chain(problem) else solve_near_chain(problem)
            left = max(self.options.time_limit_s - elapsed, _LEAST_TIME_S)
            return self.place(problem, replace(self.options, time_limit_s=left))
        except InfeasibleError as error:
            self.solved += 1
            self.bounds.append(math.inf)
            self.first_error = self.first_error or error
            return None

    def _offer(self, solution: Solution, order: tuple[int, ...]) -> bool:
        """Keep ``solution`` if it beats the best by more than `_TIE`; whether it did."""
        if self.best is None or solution.objective_s < self.best[0].objective_s * (1 - _TIE):
            self.best = (solution, order)
            return True
        return False

    def descend(self) -> None:
        """Swap neighbouring devices of unlike classes in the best order while that pays."""
        while self.best is not None:
            order = self.best[1]
            swaps = [
                (*order[:k], order[k + 1], order[k], *order[k + 2 :])
                for k in range(len(order) - 1)
                if self.classes[order[k]] != self.classes[order[k + 1]]
            ]
            if not self.weigh(swaps):
                return

    def result(self, count: int, *, weighed_all: bool) -> Solution:
        """The best placement, its order, and the bound over every order."""
        exhaustive = weighed_all and not self.unsolved
        if self.best is None:
            assert self.first_error is not None
            raise InfeasibleError(
                f"{self.first_error}; no other order of the devices fits either "
                f"({self.solved} of {count} orders tried)"
            ) from self.first_error
        solution, order = self.best
        lower = order_free_bound(self.problem, self.classes)
        if weighed_all:  # Every order's bound is known, solved or not.
            lower = max(lower, min(self.bounds))
        objective = solution.objective_s
        lower = min(lower, objective)
        return replace(
            solution,
            device_order=() if order == tuple(range(self.problem.num_devices)) else order,
            lower_bound_s=lower,
            optimal=objective - lower <= self.options.gap * objective,
            orders=OrderSearch(
                orders=count,
                solved=self.solved,
                cut=count - self.solved if exhaustive else self.cut,
                exhaustive=exhaustive,
            ),
        )
