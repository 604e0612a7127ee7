"""The frozen, torch-free data that crosses the compiler's phases.

trace/profiling produce a `LayerGraph`; the cost model turns it and the devices into a
`Problem` (seconds and bytes); the solver answers with a `Solution`. Units are named
once here: times in seconds, sizes in bytes, FLOPs as counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from partitioner.options import Objective, Strategy

__all__ = [
    "INPUT",
    "OUTPUT",
    "Layer",
    "Value",
    "LayerGraph",
    "ReplicaCost",
    "Problem",
    "Solution",
    "TIME_SOURCES",
]

INPUT = -1
"""`Value.producer` of a model input (a placeholder of the graph)."""
OUTPUT = -2
"""A `Value.consumers` entry meaning the model's output uses the value."""
TIME_SOURCES = ("measured", "calibrated", "roofline")
"""Where a predicted time comes from, surest first: timed on the device; the roofline on
figures measured on the device (`partitioner profile`); the roofline on datasheet figures."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    """A group of graph nodes that is placed as a unit."""

    index: int
    """Position in `LayerGraph.layers` (a topological order)."""
    name: str
    """Qualified module name the layer stands for (e.g. ``transformer.h.0``), or an op name."""
    modules: tuple[str, ...] = ()
    """Qualified names of the modules whose calls this layer holds, outermost first."""
    params: tuple[str, ...] = ()
    """Qualified names of the parameters and buffers this layer owns (placed with it)."""
    param_bytes: int = 0
    """Bytes of the parameters it owns."""
    buffer_bytes: int = 0
    """Bytes of the buffers it owns."""
    output_bytes: int = 0
    """Bytes of every tensor its nodes produce (peak activation of one forward, upper bound)."""
    saved_bytes: int = 0
    """Bytes kept alive for backward when training (estimate: outputs of its nodes that need grad)."""
    fwd_flops: int = 0
    """Floating-point operations of one forward."""
    bwd_flops: int = 0
    """Floating-point operations of one backward."""
    traffic_bytes: int = 0
    """Bytes read and written by its ops in one forward, for the roofline's memory term."""
    fwd_time_s: dict[str, float] = field(default_factory=dict)
    """Measured forward seconds, by device kind (only for devices that were present)."""
    bwd_time_s: dict[str, float] = field(default_factory=dict)
    """Measured backward seconds, by device kind."""
    num_nodes: int = 0
    """Graph nodes grouped into this layer."""
    fwd_kernels: int = 0
    """Device kernels one forward launches (`partitioner.profiling`: ATen ops other than views);
    0 when unknown (layers built before it was counted: no launch floor)."""
    bwd_kernels: int = 0
    """Device kernels one backward launches (estimate: `BACKWARD_KERNEL_FACTOR` x forward)."""
    gemms: tuple[tuple[int, int], ...] = ()
    """(FLOPs of one op, how many such ops) for the forward's FLOP-counting ops (matmuls,
    convolutions, attention), largest first; empty when unknown (then `fwd_flops` is priced
    at the profile's flat `compute_efficiency`)."""
    elementwise_bytes: int = 0
    """The part of `traffic_bytes` moved by nodes that count no FLOPs (element-wise ops,
    norms, softmax, copies): memory-bound kernels that run after the matmuls, not beside them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Value:
    """A tensor (or pytree of tensors) produced by one layer and read by others.

    When producer and a consumer sit on different devices the value is moved once per
    destination device, however many consumers read it there.
    """

    name: str
    """Name of the graph node that produces it."""
    producer: int
    """Index of the producing layer, or `INPUT`."""
    consumers: tuple[int, ...]
    """Indices of the reading layers (each > producer), possibly with `OUTPUT`; sorted, unique."""
    bytes: int
    """Bytes moved when the value crosses devices."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerGraph:
    """A model as a DAG of layers in topological order, with the values between them."""

    layers: tuple[Layer, ...]
    values: tuple[Value, ...]
    fingerprint: str
    """Hash of the graph's structure, to check that a saved plan fits this model."""
    model_name: str = ""
    """Class name of the traced model."""
    frontend: str = ""
    """``fx`` (torch.fx.symbolic_trace) or ``export`` (torch.export)."""
    batch_size: int = 1
    """Size of dimension 0 of the first tensor input (the batch data parallelism splits)."""

    def __post_init__(self) -> None:
        for i, layer in enumerate(self.layers):
            if layer.index != i:
                raise ValueError(f"layer {layer.name!r} has index {layer.index}, expected {i}")
        for v in self.values:
            if any(c != OUTPUT and c <= v.producer for c in v.consumers):
                raise ValueError(f"value {v.name!r} flows backwards: {v.producer} -> {v.consumers}")

    @property
    def is_chain(self) -> bool:
        """Every value between layers goes from layer i to layer i + 1 only."""
        return all(
            v.producer == INPUT or all(c in (OUTPUT, v.producer + 1) for c in v.consumers)
            for v in self.values
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaCost:
    """Cost of data parallelism: the whole model on every device, the batch split."""

    time_s: float
    """Predicted time of one step (slowest replica plus gradient all-reduce when training)."""
    memory: tuple[int, ...]
    """Bytes needed on each device."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """Everything the solver needs, as plain numbers: layers x devices.

    Transfer of value ``v`` from device ``d`` to device ``e`` costs
    ``v.bytes * seconds_per_byte[d][e] + latency_s[d][e]`` (zero when ``d == e``).
    """

    compute_s: tuple[tuple[float, ...], ...]
    """compute_s[i][d]: seconds layer i takes on device d (forward, plus backward when training)."""
    memory: tuple[int, ...]
    """memory[i]: bytes layer i needs on whichever device holds it."""
    capacity: tuple[int, ...]
    """capacity[d]: bytes available on device d."""
    values: tuple[Value, ...]
    """The values between layers (producers and consumers index `compute_s`)."""
    seconds_per_byte: tuple[tuple[float, ...], ...]
    """seconds_per_byte[d][e]: inverse bandwidth of the link d -> e."""
    latency_s: tuple[tuple[float, ...], ...]
    """latency_s[d][e]: fixed cost of one transfer over d -> e."""
    objective: Objective = Objective.LATENCY
    names: tuple[str, ...] = ()
    """Layer names, for error messages."""
    device_names: tuple[str, ...] = ()
    """Device names, for error messages."""
    replica: ReplicaCost | None = None
    """Data-parallel alternative, if it is to be considered."""

    def __post_init__(self) -> None:
        n, d = len(self.compute_s), len(self.capacity)
        if len(self.memory) != n:
            raise ValueError(f"memory has {len(self.memory)} entries for {n} layers")
        if any(len(row) != d for row in self.compute_s):
            raise ValueError(f"every compute_s row needs {d} entries (one per device)")
        for table in (self.seconds_per_byte, self.latency_s):
            if len(table) != d or any(len(row) != d for row in table):
                raise ValueError(f"link tables must be {d} x {d}")

    @property
    def num_layers(self) -> int:
        return len(self.compute_s)

    @property
    def num_devices(self) -> int:
        return len(self.capacity)

    def transfer_s(self, value: Value, src: int, dst: int) -> float:
        """Seconds to move `value` from device `src` to device `dst`."""
        if src == dst:
            return 0.0
        return value.bytes * self.seconds_per_byte[src][dst] + self.latency_s[src][dst]


@dataclass(frozen=True, slots=True, kw_only=True)
class Solution:
    """The solver's answer."""

    strategy: Strategy
    assignment: tuple[int, ...]
    """assignment[i]: device index of layer i (all zeros for data parallelism)."""
    objective_s: float
    """Value of the objective (seconds) for this assignment."""
    lower_bound_s: float
    """Best proven lower bound on the objective (equals objective_s when optimal)."""
    optimal: bool
    """Whether optimality was proved (within the requested gap)."""
    solver: str
    """Which method produced it: ``dp``, ``highs``, ``cbc``, ``brute``, ``replicate``..."""
    solve_time_s: float = 0.0

    @property
    def gap(self) -> float:
        """Relative optimality gap (0 when optimal)."""
        if self.objective_s <= 0:
            return 0.0
        return max(0.0, (self.objective_s - self.lower_bound_s) / self.objective_s)
