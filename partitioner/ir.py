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
    "BatchShare",
    "Problem",
    "OrderSearch",
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
    module_calls: int = 0
    """``nn.Module`` calls one forward makes (the modules whose first node it holds, by the
    nodes' module stacks; a repeated call export records apart counts again): each costs
    the host `DeviceProfile.module_call_s`. 0 when unknown."""
    gemms: tuple[tuple[int, ...], ...] = ()
    """(FLOPs of one op, how many such ops[, m, n, k]) for the forward's FLOP-counting ops
    (matmuls, convolutions, attention), largest first: ``m, n, k`` its sides as a matmul
    ``(m x k) @ (k x n)``, 0 where unknown (`partitioner.profiling.NodeStats.gemm_shapes`);
    empty when unknown (then `fwd_flops` is priced at the profile's flat `compute_efficiency`)."""
    elementwise_bytes: int = 0
    """The part of `traffic_bytes` moved by nodes that count no FLOPs (element-wise ops,
    norms, softmax, copies): memory-bound kernels that run after the matmuls, not beside them."""
    passes: tuple[tuple[int, ...], ...] = ()
    """(bytes one such node moves, how many such nodes[, kind]), largest first:
    `elementwise_bytes` node by node, less what its lookups leave unread; a device's
    `DeviceProfile.memory_curve` prices each at its size, no faster than the profile's
    `DeviceProfile.op_rates` of its kind (``partitioner.devices.OP_KINDS`` index + 1; absent
    for a plain element-wise node). Empty when unknown (then `elementwise_bytes` is priced
    whole)."""
    convs: tuple[tuple[int, int], ...] = ()
    """(FLOPs of one convolution, how many such) of `gemms`, largest first: priced by the
    profile's `DeviceProfile.conv_efficiency` where it has one."""
    attention: tuple[tuple[int, int, int, int], ...] = ()
    """(FLOPs of one attention as torch counts them (a causal mask not taken off), how many
    such, 1 if causal else 0, its FLOPs per sample and head) of `gemms`, largest first:
    priced by the profile's `DeviceProfile.attention_efficiency`
    (`causal_attention_efficiency`) at its FLOPs per sample and head, where it has one."""
    unread_bytes: int = 0
    """Of `traffic_bytes`, bytes of parameter and buffer tables its lookups (embedding,
    index_select, gather) leave unread in a forward: they read only the rows they pick."""
    table_grad_bytes: int = 0
    """Of `unread_bytes`, those of tables that take a gradient: a backward writes the whole
    table's gradient, so it moves them (a frozen table's or a buffer's, it does not)."""
    tp_flops: int = 0
    """Of its forward plus backward FLOPs, those of its tensor-parallel pairs and vocabulary
    shards (`partitioner.tp_detect`): what a TP group divides. The fields below are figures
    of the traced batch, as the ones above; `partitioner.training_costs` takes them per sample."""
    tp_params: int = 0
    """Parameter elements it owns that the pairs and vocabulary shards split."""
    tp_activation_bytes: int = 0
    """Of `saved_bytes`, those of nodes inside the pairs (columns and what follows them up to
    the rows) and of a head's logits: split over the TP group."""
    tp_comm_bytes: int = 0
    """Bytes a TP group all-reduces in one forward: each row's output, a vocabulary embedding's."""
    tp_traffic_bytes: int = 0
    """Of `traffic_bytes`, the split parameters its pairs' and shards' nodes read (a vocabulary
    embedding's table): the share of a layer priced on its bytes (no FLOPs) a TP group divides."""
    tp_divisor: int = 0
    """The gcd of its pairs' `partitioner.tp_layout.Pair.divisor`: a degree dividing it splits
    them all, any other leaves the layer whole; 0 for a layer with no pair."""
    tp_vocab: tuple[int, ...] = ()
    """Sizes of the vocabulary shards among its nodes, which split at any degree ``t``: the
    busiest rank holds ``ceil(V / t)`` rows (`partitioner.tp_layout.VocabShard.rows`)."""
    core_flops: int = 0
    """Forward plus backward FLOPs of its attention cores (scores through the weighted sum)."""
    core_activation_bytes: int = 0
    """Of `saved_bytes`, those its attention cores keep (scores, softmax, dropout)."""


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
    batched: bool = True
    """Whether its bytes scale with the batch: False for a weight one layer owns and another
    reads (a tied embedding), which a replica given part of the batch moves whole."""


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
    """Cost of data parallelism: the whole model on each of some devices, the batch split."""

    time_s: float
    """Predicted time of one step (slowest replica plus gradient all-reduce when training)."""
    memory: tuple[int, ...]
    """Bytes needed on each device of the problem (0 on a device that holds no replica)."""
    devices: tuple[int, ...] = ()
    """The devices holding a replica, in the order the batch is split between them (the first
    ones take a sample more when it does not divide); empty: every device, in order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchShare:
    """One replica's tables when the batch is split over `replicas` copies of a placement.

    Every replica is priced at the largest share, ``samples = ceil(batch / replicas)``: the
    replicas of one placement on alike devices finish when the largest share does.
    """

    replicas: int
    """How many copies split the batch (>= 2)."""
    samples: int
    """Samples of the largest share."""
    compute_s: tuple[tuple[float, ...], ...]
    """compute_s[i][d]: seconds layer i takes on device d at `samples` samples."""
    memory: tuple[int, ...]
    """memory[i]: bytes layer i needs at `samples` samples."""
    capacity: tuple[int, ...]
    """capacity[d]: bytes available on device d at `samples` samples."""
    value_bytes: tuple[int, ...]
    """value_bytes[v]: bytes of `Problem.values[v]` at `samples` samples."""


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
    """Data-parallel alternative over every device, if it is to be considered."""
    data_parallel: tuple[ReplicaCost, ...] = ()
    """Data parallelism over some of the devices (each its `ReplicaCost.devices`)."""
    batch_shares: tuple[BatchShare, ...] = ()
    """Tables for copies of a placement on groups of alike devices, the batch split between
    them (`partitioner.solve.replicas`); empty: no such replication is considered."""

    def __post_init__(self) -> None:
        n, d = len(self.compute_s), len(self.capacity)
        if len(self.memory) != n:
            raise ValueError(f"memory has {len(self.memory)} entries for {n} layers")
        if any(len(row) != d for row in self.compute_s):
            raise ValueError(f"every compute_s row needs {d} entries (one per device)")
        for table in (self.seconds_per_byte, self.latency_s):
            if len(table) != d or any(len(row) != d for row in table):
                raise ValueError(f"link tables must be {d} x {d}")
        for replica in self.data_parallel:
            if len(replica.memory) != d or not replica.devices or any(not 0 <= e < d for e in replica.devices):
                raise ValueError(f"every data_parallel entry needs {d} memory entries and devices among 0..{d - 1}")
        for share in self.batch_shares:
            shapes = (len(share.compute_s), len(share.memory), len(share.capacity), len(share.value_bytes))
            if shapes != (n, n, d, len(self.values)) or any(len(row) != d for row in share.compute_s):
                raise ValueError(
                    f"batch share of {share.replicas} replicas: tables must match {n} layers, {d} devices "
                    f"and {len(self.values)} values"
                )

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
class OrderSearch:
    """How the order of the devices along the pipeline was chosen (`partitioner.solve.order`)."""

    orders: int
    """Distinct orders of the devices (sequences of device classes; identical devices are
    interchangeable): ``D! / (n_1! ... n_k!)`` for classes of ``n_1, ..., n_k`` devices."""
    solved: int
    """Orders placed by a solver."""
    cut: int
    """Orders never solved: a lower bound showed they cannot beat the placement found, or
    they pose the same problem as an order weighed (two nodes of like GPUs swapped)."""
    exhaustive: bool
    """Whether every order was solved or cut; False: some were left unsolved (too many to
    weigh one by one, or out of time). `Solution.lower_bound_s` bounds every order either way."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Solution:
    """The solver's answer."""

    strategy: Strategy
    assignment: tuple[int, ...]
    """assignment[i]: position along `device_order` of the device of layer i (all zeros for
    data parallelism over every device; with `replicas`, the device index of layer i in the
    first copy, `device_order` empty)."""
    objective_s: float
    """Value of the objective (seconds) for this assignment."""
    lower_bound_s: float
    """Best proven lower bound on the objective (equals objective_s when optimal)."""
    optimal: bool
    """Whether optimality was proved (within the requested gap)."""
    solver: str
    """Which method produced it: ``dp``, ``highs``, ``cbc``, ``brute``, ``replicate``, or
    ``<method>+replicate`` for copies of a placement that method found."""
    solve_time_s: float = 0.0
    replicas: tuple[tuple[int, ...], ...] = ()
    """Device groups that each run a copy of the placement, the batch split between them in
    this order: copy ``g`` runs on ``replicas[g][k]`` what `assignment` puts on
    ``replicas[0][k]`` (`Strategy.HYBRID`, or `Strategy.DATA_PARALLEL` with one device per
    group). Empty: one copy, or, for `Strategy.DATA_PARALLEL`, one replica on every device."""
    device_order: tuple[int, ...] = ()
    """device_order[k]: index in `Problem`'s devices of the k-th device along the pipeline,
    the order the solver chose; empty: the devices as given. `assignment` indexes this
    order: it is a placement of ``partitioner.solve.reorder(problem, device_order)``."""
    orders: OrderSearch | None = None
    """How the order was searched; None: the order given was kept (one class of devices,
    data parallelism, or `SolverOptions.keep_device_order`)."""

    @property
    def gap(self) -> float:
        """Relative optimality gap (0 when optimal)."""
        if self.objective_s <= 0:
            return 0.0
        return max(0.0, (self.objective_s - self.lower_bound_s) / self.objective_s)
