"""Exhaustive search over every placement that keeps the device order: the tests' oracle."""

from __future__ import annotations

from partitioner.ir import Problem, Solution
from partitioner.solve.evaluate import evaluate, placement_solution
from partitioner.solve.feasibility import check_memory, no_contiguous_fit

__all__ = ["solve_brute"]

MAX_PLACEMENTS = 1_000_000
"""Refuse problems with more candidate placements than this (D ** N before pruning)."""


def solve_brute(problem: Problem) -> Solution:
    """Try every placement with ``dev(p) <= dev(c)`` on each edge that fits memory.

    Layers are placed in order; a layer may go to any device from the latest of its
    producers' devices on, if it still fits. Ties keep the first placement found.

    Args:
        problem: A tiny problem (``num_devices ** num_layers <= MAX_PLACEMENTS``).

    Returns:
        An optimal placement (``solver="brute"``).

    Raises:
        ValueError: If the problem is too large to enumerate.
        InfeasibleError: If no placement fits.
    """
    n, num_devices = problem.num_layers, problem.num_devices
    check_memory(problem)
    if num_devices**n > MAX_PLACEMENTS:
        raise ValueError(
            f"brute force over {num_devices}^{n} placements is too slow; "
            f"keep num_devices ** num_layers <= {MAX_PLACEMENTS}"
        )
    producers: list[list[int]] = [[] for _ in range(n)]
    for value in problem.values:
        for consumer in value.consumers:
            if value.producer >= 0 and consumer >= 0:
                producers[consumer].append(value.producer)

    best: tuple[float, tuple[int, ...]] | None = None
    placement = [0] * n
    room = list(problem.capacity)

    def place(layer: int) -> None:
        nonlocal best
        if layer == n:
            objective = evaluate(problem, placement).objective_s
            if best is None or objective < best[0]:
                best = (objective, tuple(placement))
            return
        lowest = max((placement[p] for p in producers[layer]), default=0)
        for device in range(lowest, num_devices):
            if problem.memory[layer] <= room[device]:
                placement[layer] = device
                room[device] -= problem.memory[layer]
                place(layer + 1)
                room[device] += problem.memory[layer]

    place(0)
    if best is None:
        raise no_contiguous_fit(problem)
    return placement_solution(problem, best[1], solver="brute", optimal=True)
