"""Merge runs of consecutive layers into one, so that large graphs solve in seconds.

A group is a contiguous run of the topological order, so the groups stay in topological
order and the coarse graph stays acyclic. Adjacent groups are merged cheapest first,
with a heap (``O(N log N)``):

1. a group with no compute and no memory (views, reshapes) joins its lighter neighbour;
2. then the pair with the smallest combined weight, where a group's weight is its share
   of all compute (summed over devices) plus its share of all memory, so that neither
   long-running nor large groups form early;
3. a merge that would no longer fit the largest device is never made, so coarsening
   can stop above ``max_layers`` rather than make the problem infeasible.

The coarse layer sums the compute and memory of its members. A value keeps its
producer's group and its consumers' groups; consumers inside the producer's group are
dropped, and so are values left with no consumer.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from partitioner.ir import OUTPUT, Problem, Value

__all__ = ["coarsen", "expand"]


def coarsen(problem: Problem, max_layers: int) -> tuple[Problem, tuple[range, ...]]:
    """Merge adjacent layers until at most ``max_layers`` remain (or no merge fits memory).

    Args:
        problem: The cost tables, layers in topological order.
        max_layers: How many layers the coarse problem may have (at least 1).

    Returns:
        The coarse problem, and ``groups[g]``: the original layers of coarse layer ``g``.

    Raises:
        ValueError: If ``max_layers < 1``.
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1 (got {max_layers})")
    n = problem.num_layers
    if n <= max_layers:
        return problem, tuple(range(i, i + 1) for i in range(n))
    work = [sum(row) for row in problem.compute_s]
    total_work, total_memory = sum(work), sum(problem.memory)
    largest = max(problem.capacity, default=0)

    # Group g covers [g, end[g]); alive groups form a list through before/after.
    end = list(range(1, n + 1))
    before = list(range(-1, n - 1))
    after = list(range(1, n + 1))
    group_work = list(work)
    group_memory = list(problem.memory)
    version = [0] * n

    def weight(g: int) -> float:
        share = group_work[g] / total_work if total_work > 0 else 0.0
        return share + (group_memory[g] / total_memory if total_memory > 0 else 0.0)

    heap: list[tuple[int, float, int, int, int]] = []

    def push(left: int) -> None:
        right = after[left]
        if right >= n or group_memory[left] + group_memory[right] > largest:
            return
        trivial = (group_work[left] == 0 and group_memory[left] == 0) or (
            group_work[right] == 0 and group_memory[right] == 0
        )
        key = weight(left) + weight(right)
        heapq.heappush(heap, (0 if trivial else 1, key, left, version[left], version[right]))

    for g in range(n - 1):
        push(g)
    remaining = n
    while remaining > max_layers and heap:
        _, _, left, left_version, right_version = heapq.heappop(heap)
        right = after[left]
        if (
            version[left] != left_version
            or right >= n
            or version[right] != right_version
            or before[right] != left
        ):
            continue  # A merge since this entry was pushed changed one of the two groups.
        end[left] = end[right]
        group_work[left] += group_work[right]
        group_memory[left] += group_memory[right]
        after[left] = after[right]
        if after[right] < n:
            before[after[right]] = left
        version[left] += 1
        version[right] = -1  # Gone.
        remaining -= 1
        push(left)
        if before[left] >= 0:
            push(before[left])

    groups = []
    g = 0
    while g < n:
        groups.append(range(g, end[g]))
        g = after[g]
    return _merged(problem, groups), tuple(groups)


def expand(assignment: Sequence[int], groups: Sequence[range]) -> tuple[int, ...]:
    """The device of every original layer, from the devices of the coarse layers.

    Args:
        assignment: assignment[g]: device of coarse layer g.
        groups: As returned by `coarsen`.

    Returns:
        One device per original layer.
    """
    if len(assignment) != len(groups):
        raise ValueError(f"assignment has {len(assignment)} entries for {len(groups)} groups")
    return tuple(device for device, group in zip(assignment, groups) for _ in group)


def _merged(problem: Problem, groups: list[range]) -> Problem:
    """The problem whose layers are the groups."""
    group_of = [0] * problem.num_layers
    for g, members in enumerate(groups):
        for layer in members:
            group_of[layer] = g
    num_devices = problem.num_devices
    compute = tuple(
        tuple(sum(problem.compute_s[i][d] for i in members) for d in range(num_devices))
        for members in groups
    )
    values = []
    for value in problem.values:
        producer = group_of[value.producer] if value.producer >= 0 else value.producer
        consumers = {
            c if c == OUTPUT else group_of[c]
            for c in value.consumers
        }
        consumers.discard(producer)
        if consumers:
            values.append(
                Value(
                    name=value.name,
                    producer=producer,
                    consumers=tuple(sorted(consumers)),
                    bytes=value.bytes,
                    batched=value.batched,
                )
            )
    names: tuple[str, ...] = ()
    if problem.names:
        names = tuple(
            problem.names[m.start]
            if len(m) == 1
            else f"{problem.names[m.start]}..{problem.names[m.stop - 1]}"
            for m in groups
        )
    return Problem(
        compute_s=compute,
        memory=tuple(sum(problem.memory[i] for i in members) for members in groups),
        capacity=problem.capacity,
        values=tuple(values),
        seconds_per_byte=problem.seconds_per_byte,
        latency_s=problem.latency_s,
        objective=problem.objective,
        names=names,
        device_names=problem.device_names,
        replica=problem.replica,
    )
