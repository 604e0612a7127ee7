"""The cost and feasibility of one placement: the single source of truth for every solver.

Layers ``i = 0..N-1`` come in topological order, devices ``d = 0..D-1`` in the given
order, and a placement assigns each layer a device ``dev(i)``. Times are seconds, sizes
bytes::

    compute_d   = sum over i with dev(i) = d of compute_s[i][d]
    memory_d    = sum over i with dev(i) = d of memory[i]            <= capacity[d]
    contiguity  dev(p) <= dev(c) for every value p -> c (c != OUTPUT): the device
                index never goes back along an edge; devices may be left empty
    transfers   a value v made by layer p >= 0 moves once from dev(p) to every other
                device e that holds one of its consumers, for
                t(v, dev(p), e) = bytes(v) * seconds_per_byte[dev(p)][e] + latency_s[dev(p)][e]
                (INPUT producers and OUTPUT consumers cost nothing)
    LATENCY     sum_d compute_d + sum of every t
    THROUGHPUT  max_d max(compute_d, in_d, out_d), where in_d and out_d sum the t of the
                transfers into and out of device d

THROUGHPUT is the period of a pipeline in its steady state: while device ``d`` computes
one microbatch, its links carry the previous one's outputs and the next one's inputs
(asynchronous sends and receives on their own streams, as ``torch.distributed.pipelining``
and GPipe-style runtimes do, and as PipeDream's planner prices a stage: Narayanan et al.,
SOSP 2019, section 3.1). So a device is busy for the longest of its compute, its inbound
and its outbound traffic, each link direction a lane of its own, as in
`partitioner.simulate`.

Every solver reports ``evaluate(problem, assignment).objective_s`` as its objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.ir import Problem, Solution
from partitioner.options import Objective, Strategy
from partitioner.units import format_bytes
from partitioner.solve._text import device_label, layer_label
from partitioner.solve.symmetry import canonical

__all__ = ["PricedTransfer", "Evaluation", "evaluate", "simple_lower_bound", "placement_solution"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PricedTransfer:
    """One value moved between two devices."""

    value: int
    """Index into `Problem.values`."""
    src: int
    """Device that produces it."""
    dst: int
    """Device that reads it."""
    bytes: int
    """Bytes moved."""
    seconds: float
    """``bytes * seconds_per_byte[src][dst] + latency_s[src][dst]``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """What one placement costs, per device, and what it violates."""

    assignment: tuple[int, ...]
    """assignment[i]: device of layer i."""
    compute_s: tuple[float, ...]
    """compute_s[d]: seconds of compute on device d."""
    transfer_in_s: tuple[float, ...]
    """transfer_in_s[d]: seconds of the transfers into device d."""
    transfer_out_s: tuple[float, ...]
    """transfer_out_s[d]: seconds of the transfers out of device d."""
    memory: tuple[int, ...]
    """memory[d]: bytes the layers on device d need."""
    transfers: tuple[PricedTransfer, ...]
    """Every transfer, by value then destination."""
    latency_s: float
    """All compute plus all transfers."""
    bottleneck_s: float
    """The busiest device's period: the largest of any device's compute, inbound and outbound transfers."""
    objective_s: float
    """`latency_s` or `bottleneck_s`, as the problem's objective says."""
    violations: tuple[str, ...]
    """One sentence per broken constraint (memory, contiguity); empty when feasible."""

    @property
    def feasible(self) -> bool:
        """Whether the placement fits memory and keeps the device order along every edge."""
        return not self.violations

    @property
    def load_s(self) -> tuple[float, ...]:
        """load_s[d]: the largest of device d's compute, transfers in and transfers out.

        Its period in a pipeline's steady state, where transfers overlap compute (what
        THROUGHPUT maximises).
        """
        return tuple(
            max(c, i, o) for c, i, o in zip(self.compute_s, self.transfer_in_s, self.transfer_out_s)
        )


def evaluate(problem: Problem, assignment: Sequence[int]) -> Evaluation:
    """Cost and feasibility of placing layer ``i`` on device ``assignment[i]``.

    Args:
        problem: The cost tables.
        assignment: One device index per layer.

    Returns:
        The per-device breakdown, the objective and the violated constraints.

    Raises:
        ValueError: If the assignment has the wrong length or names a device that does
            not exist (that is no placement at all, rather than an infeasible one).
    """
    placement = tuple(int(d) for d in assignment)
    n, num_devices = problem.num_layers, problem.num_devices
    if len(placement) != n:
        raise ValueError(f"assignment has {len(placement)} entries for {n} layers")
    compute = [0.0] * num_devices
    memory = [0] * num_devices
    for layer, device in enumerate(placement):
        if not 0 <= device < num_devices:
            raise ValueError(f"layer {layer} is assigned to device {device} of {num_devices}")
        compute[device] += problem.compute_s[layer][device]
        memory[device] += problem.memory[layer]

    violations = [
        f"{device_label(problem, d)} holds {format_bytes(memory[d])} "
        f"but has {format_bytes(problem.capacity[d])}"
        for d in range(num_devices)
        if memory[d] > problem.capacity[d]
    ]
    transfers: list[PricedTransfer] = []
    transfer_in = [0.0] * num_devices
    transfer_out = [0.0] * num_devices
    for index, value in enumerate(problem.values):
        if value.producer < 0:
            continue
        src = placement[value.producer]
        destinations = set()
        for consumer in value.consumers:
            if consumer < 0:
                continue
            dst = placement[consumer]
            if dst < src:
                violations.append(
                    f"layer {layer_label(problem, value.producer)} on {device_label(problem, src)} "
                    f"feeds layer {layer_label(problem, consumer)} on "
                    f"{device_label(problem, dst)}, an earlier device"
                )
            if dst != src:
                destinations.add(dst)
        for dst in sorted(destinations):
            seconds = problem.transfer_s(value, src, dst)
            transfers.append(
                PricedTransfer(value=index, src=src, dst=dst, bytes=value.bytes, seconds=seconds)
            )
            transfer_out[src] += seconds
            transfer_in[dst] += seconds

    latency = sum(compute) + sum(t.seconds for t in transfers)
    bottleneck = max(
        (max(c, i, o) for c, i, o in zip(compute, transfer_in, transfer_out)), default=0.0
    )
    return Evaluation(
        assignment=placement,
        compute_s=tuple(compute),
        transfer_in_s=tuple(transfer_in),
        transfer_out_s=tuple(transfer_out),
        memory=tuple(memory),
        transfers=tuple(transfers),
        latency_s=latency,
        bottleneck_s=bottleneck,
        objective_s=latency if problem.objective is Objective.LATENCY else bottleneck,
        violations=tuple(violations),
    )


def simple_lower_bound(problem: Problem) -> float:
    """A bound no placement beats, from compute alone (transfers and memory ignored).

    LATENCY: every layer on its fastest device. THROUGHPUT: the slowest single layer on
    its fastest device, and the fastest total compute spread evenly over the devices.
    """
    fastest = [min(row) for row in problem.compute_s]
    if problem.objective is Objective.LATENCY:
        return sum(fastest)
    if not fastest:
        return 0.0
    return max(max(fastest), sum(fastest) / problem.num_devices)


def placement_solution(
    problem: Problem,
    assignment: tuple[int, ...],
    *,
    solver: str,
    optimal: bool,
    lower_bound_s: float | None = None,
    solve_time_s: float = 0.0,
) -> Solution:
    """The `Solution` of a model-parallel placement, with its `evaluate` objective.

    The placement is given as its `canonical` twin (interchangeable devices filled in
    order, idle ones last), which costs the same, so that every solver answers alike.

    Args:
        problem: The cost tables.
        assignment: The placement.
        solver: Which method found it.
        optimal: Whether it is proved optimal.
        lower_bound_s: The best bound known; None means the objective itself (optimal) or
            `simple_lower_bound` (not optimal). Capped at the objective.
        solve_time_s: Seconds spent.

    Returns:
        `Strategy.SINGLE` when one device holds every layer, else
        `Strategy.MODEL_PARALLEL`.
    """
    assignment = canonical(problem, assignment)
    objective = evaluate(problem, assignment).objective_s
    if lower_bound_s is None:
        lower_bound_s = objective if optimal else simple_lower_bound(problem)
    return Solution(
        strategy=Strategy.SINGLE if len(set(assignment)) <= 1 else Strategy.MODEL_PARALLEL,
        assignment=assignment,
        objective_s=objective,
        lower_bound_s=min(lower_bound_s, objective),
        optimal=optimal,
        solver=solver,
        solve_time_s=solve_time_s,
    )
