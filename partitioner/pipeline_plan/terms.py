"""What one pipeline stage costs under tensor parallelism, sharding and recomputation (pure, vectorised).

A stage of layers ``[i, e)`` on a rank of ``r`` devices with tensor-parallel degree ``t``
runs ``d = r / t`` data-parallel replicas of ``t`` devices each; ``b`` samples per replica
per microbatch. Layer ``l``'s pairs split over the ``t`` devices only where ``t`` divides
its ``tp_divisor``, its vocabulary shards at any ``t``
(`partitioner.training_costs.ChainLayer.tp_splits`); elsewhere it stays replicated. Per
device (sums over the stage's layers; ``x`` per split layer is ``tp_flops / flops``, or the
split bytes' share of a layer without FLOPs, `ChainLayer.tp_time_share`; ``1 / t`` below is
the busiest rank's share, ``ceil(V / t) / V`` of a vocabulary of ``V`` rows,
`ChainLayer.tp_share`)::

    compute     f_t = f (1 - x + x / t), the same for b
    tp comm     2 (t-1)/t x b x tp_comm_bytes x s/B + 2 (t-1) x latency per layer that
                all-reduces, on the TP group's slowest hop: every microbatch, in forward
                and again in backward (on the critical path: added to f and to b)
    params      (params - tp_params) + tp_params / t  ->  weights W, grads G, optimizer O
    held        none: W + G + O; zero1: W/d + W + G + O/d; zero2 and zero3-keep:
                (W + G + O)/d + W; zero3: (W + G + O)/d + the two largest layers' W (in
                use, prefetched). FSDP2 keeps each shard beside its gathered copy (W/d + W);
                zero1 accumulates whole gradients over the microbatches
    act         b x ((act - tp_act) + tp_act / t), and all of it / t with sequence
                parallelism (the stage's input and output, sent and kept, too)
    recompute   none; selective: frees the attention cores' activations (core bytes, / t
                when split), re-runs their forward (``core_flops / 3``) in backward;
                full: keeps the input only and re-runs the whole forward (its TP
                all-reduces too)

Data-parallel communication over the ``d`` replicas (ring over devices strided by ``t``;
all-gather and reduce-scatter ``(d-1)/d x bytes x s/B + (d-1) x latency``, all-reduce
twice that):

    none        all-reduce of G, once per step (after the stage's last backward), in DDP's
                buckets: the latency term once per bucket (`ddp_buckets`), the bytes once
    loss        the last stage all-reduces the step's loss over its ``r = t d`` devices (a
                scalar: ``2 (r-1)`` latencies of its slower ring, once per step, under any
                sharding and tensor parallelism)
    zero1       reduce-scatter of G and all-gather of W, once per step (exposed: the
                reduce-scatter after the last backward, the gather before the first forward)
    zero2       W gathered once per step (exposed); G reduce-scattered every microbatch in
                backward (its shard accumulates), overlapped with the backward's compute,
                exposed ``max(0, comm - compute)`` plus the last reduce-scatter
    zero3       every microbatch: W gathered in forward and again in backward, G
                reduce-scattered in backward, a latency per layer; overlapped with the
                pass's compute, exposed ``max(0, comm - compute)`` plus what cannot hide:
                the first layer's gather of each pass and the last reduce-scatter
    zero3-keep  as zero3, one gather (forward) per microbatch

Gradients accumulate over the microbatches: each backward but the first adds its gradients
into those the device holds (autograd's AccumulateGrad, ``grad += new``), memory-bound::

    accumulate  3 x G bytes (read both, write the sum), G the gradients held (1/d under
                ZeRO-2/3, whose shards accumulate); (m-1)/m of it in every backward, priced
                as the update below (bytes x s/B x slowdown)

The optimizer step runs once per step on the compute lane, after the stage's last backward
and its data-parallel collectives above (nothing overlaps it, whether or not the all-reduce
hides under the backward). It is memory-bound: it reads the gradients, reads and writes the
optimizer state (the float32 master weights with it under mixed precision) and writes the
weights, read and written too without mixed precision (they are then the master copy)::

    update      G + 2 O + W bytes (mixed precision), G + 2 O + 2 W (fp32), of W, G, O as
                `training_state_bytes` counts them for the parameters the device updates:
                its stage's (its TP share, with the tied copies it holds), 1/d of them under
                any sharding (each replica steps its shard of the optimizer state);
                28 bytes per parameter with Adam either way, 12 with SGD in fp32
    seconds     update x s/B of the stage's slowest kind's memory (1 / (bandwidth x
                efficiency)) x its slowdown (processes sharing a node's cores)

This is what `partitioner.distributed` runs (FSDP2 ``fully_shard`` per layer;
`partitioner.distributed.spmd`): zero1 as torch's pipelining schedules drive an FSDP2
stage (gradients kept whole until the last backward), the others reducing every
microbatch, zero2 keeping its gathered weights until the step ends.

Collectives that span nodes are priced per link level (`partitioner.collectives`: inside
each node, then a slice per device over the network), through the ring hop
`StageModel.ring` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from partitioner.options import Precision, Sharding
from partitioner.training_costs import TrainingCosts, training_state_bytes

__all__ = [
    "NONE",
    "SELECTIVE",
    "FULL",
    "RECOMPUTE_NAMES",
    "LayerTables",
    "StageSpec",
    "StageTerms",
    "stage_terms",
    "with_memory",
    "per_step_collectives",
    "ddp_buckets",
    "DDP_FIRST_BUCKET_BYTES",
    "DDP_BUCKET_BYTES",
    "update_bytes",
    "accumulate_bytes",
    "shards_gradients",
]

NONE, FULL, SELECTIVE = 0, 1, 2
"""Recomputation of a stage (as ints, so that a bool reads as before: True is full)."""
RECOMPUTE_NAMES = ("none", "full", "selective")


DDP_FIRST_BUCKET_BYTES = 1 << 20
"""The first gradient bucket of `torch.nn.parallel.DistributedDataParallel` (torch's
``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``: the last layers' gradients, sent early)."""
DDP_BUCKET_BYTES = 25 << 20
"""Its other buckets (``bucket_cap_mb=25``, DDP's default, as `partitioner.distributed` wraps stages)."""


def ddp_buckets(layer_grads: Any) -> np.ndarray:
    """ddp_buckets(g)[i, e]: how many all-reduces DDP makes of the gradients of layers
    ``[i, e)`` (`g`: each layer's gradient bytes; 0 where they hold none).

    DDP fills buckets in the order gradients arrive, the last layer's first, and closes one
    once it holds `DDP_FIRST_BUCKET_BYTES` (the first) or `DDP_BUCKET_BYTES` (the others):
    a layer is not split, so a layer larger than a bucket closes one of its own. Counted per
    layer, as DDP counts per parameter (a layer's parameters arrive together).
    """
    g = np.asarray(layer_grads, dtype=np.int64)
    n = len(g)
    prefix = _prefix(g)
    out = np.zeros((n + 1, n + 1), dtype=np.int64)
    starts = np.arange(n + 1)
    for e in range(1, n + 1):
        closed = []  # where each full bucket (walking down from layer e - 1) ends, descending
        top, cap = e, DDP_FIRST_BUCKET_BYTES
        while True:
            k = int(np.searchsorted(prefix, prefix[top] - cap, side="right")) - 1
            if k < 0:
                break
            closed.append(k)
            top, cap = k, DDP_BUCKET_BYTES
        ends = np.array(closed[::-1] + [e], dtype=np.int64)  # ascending, e last
        first = np.searchsorted(ends, starts[:e], side="left")  # the first bucket end at or above i
        # Full buckets inside [i, e), and one more where layers below the lowest hold gradients.
        out[:e, e] = len(closed) - first + (prefix[ends[first]] > prefix[starts[:e]])
    return out


def per_step_collectives(
    sharding: Sharding, d: int, weights: Any, grads: Any, ring: tuple[float, float], buckets: Any = 1
) -> Any:
    """Seconds of a stage's data-parallel collectives once per step (the docstring's table):
    all-reduce of the gradients (none), their reduce-scatter and the weights' all-gather
    (zero1), the weights' all-gather (zero2); nothing for zero3 (its collectives run every
    microbatch). 0 for one replica. The all-reduce runs in `buckets` all-reduces (DDP's,
    `ddp_buckets`), each paying the ring's latency (on a gloo loopback of 4 processes about
    6 ms each)."""
    if d < 2 or sharding in (Sharding.ZERO3, Sharding.ZERO3_KEEP):
        return 0.0
    per_byte, latency = ring
    share = (d - 1) / d
    if sharding is Sharding.ZERO2:
        return share * weights * per_byte + (d - 1) * latency
    if sharding is Sharding.ZERO1:
        return share * (grads + weights) * per_byte + 2 * (d - 1) * latency
    return 2 * share * grads * per_byte + 2 * (d - 1) * latency * buckets


def shards_gradients(sharding: Sharding) -> bool:
    """Whether `sharding` holds a 1/d shard of the gradients, reduce-scattered every
    microbatch (ZeRO-2 and both ZeRO-3s; ZeRO-1 keeps them whole until the step)."""
    return sharding in (Sharding.ZERO2, Sharding.ZERO3, Sharding.ZERO3_KEEP)


def accumulate_bytes(grads: Any, m: int) -> Any:
    """Bytes one backward moves, on average over `m` microbatches, to add its gradients into
    the `grads` bytes held: ``3 G`` (read both, write the sum) in each but the first."""
    return 3 * grads * (m - 1) / m


def update_bytes(weights: Any, grads: Any, optimizer: Any, precision: Precision) -> Any:
    """Bytes one optimizer step reads and writes over parameters of these weight, gradient
    and optimizer-state bytes (`training_state_bytes`; the module docstring's update)."""
    return grads + 2 * optimizer + (1 if precision.mixed else 2) * weights


def _prefix(values: Any, dtype: Any = np.int64) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(np.asarray(values, dtype=dtype))))


class LayerTables:
    """Per-layer figures of one tensor-parallel degree ``t``, as prefix sums over the layers.

    ``t = 1`` gives the unsplit model.
    """

    def __init__(self, costs: TrainingCosts, t: int, sequence_parallel: bool) -> None:
        layers = costs.layers
        self.t = t
        split = np.array([layer.tp_splits(t) for layer in layers])
        self.split = split
        self.splits_any = bool(split.any())
        # The busiest rank's share of what a split layer splits: 1 / t, or ceil(V / t) / V of a vocabulary.
        shares = [layer.tp_share(t) for layer in layers]
        params = [layer.params - layer.tp_params + math.ceil(layer.tp_params * share) for layer, share in zip(layers, shares)]
        states = [training_state_bytes(p, costs.precision, costs.optimizer) for p in params]
        self.layer_weights = np.array([s.weights for s in states], dtype=np.int64)
        self.layer_grads = np.array([s.grads for s in states], dtype=np.int64)
        self.weights = _prefix(self.layer_weights)
        self.grads = _prefix(self.layer_grads)
        self.optimizer = _prefix([s.optimizer for s in states])
        self.precision = costs.precision
        self.update = _prefix([update_bytes(s.weights, s.grads, s.optimizer, costs.precision) for s in states])
        # Time kept per device: 1 - x + x share of each split layer, x the part of its time that
        # splits (of its FLOPs; of its bytes for a layer without FLOPs, `ChainLayer.tp_time_share`).
        pairs = np.array([layer.tp_time_share for layer in layers])
        rows = np.array([share.numerator for share in shares])
        self.scale = np.where(split, 1 - pairs + pairs * rows / np.array([share.denominator for share in shares]), 1.0)
        # Selective recomputation re-runs the cores' forward, core_flops / 3 of the layer's
        # forward flops / 3: that share of the layer's forward time (split with the pairs).
        self.core_share = np.array(
            [(layer.core_flops / layer.flops if layer.flops > 0 else 0.0) / (t if s else 1)
             for layer, s in zip(layers, split)]
        )
        sp = sequence_parallel and t > 1
        self.sequence_parallel = sp
        self.activations = _prefix(
            [
                # Sequence parallelism splits the rest on the sequence, t ways evenly.
                math.ceil(Fraction(layer.activation_bytes - layer.tp_activation_bytes, t) + layer.tp_activation_bytes * share)
                if s and sp
                else layer.activation_bytes - layer.tp_activation_bytes + math.ceil(layer.tp_activation_bytes * share) if s
                else layer.activation_bytes
                for layer, s, share in zip(layers, split, shares)
            ]
        )
        self.core = _prefix(
            [math.ceil(layer.core_activation_bytes / t) if s else layer.core_activation_bytes for layer, s in zip(layers, split)]
        )
        self.tp_comm = _prefix([layer.tp_comm_bytes if s else 0 for layer, s in zip(layers, split)])
        self.tp_collectives = _prefix([1 if s and layer.tp_comm_bytes > 0 else 0 for layer, s in zip(layers, split)])
        self._top2: np.ndarray | None = None
        self._buckets: np.ndarray | None = None

    def buckets(self) -> np.ndarray:
        """buckets()[i, e]: DDP's all-reduces of the gradients of ``[i, e)`` (`ddp_buckets`)."""
        if self._buckets is None:
            self._buckets = ddp_buckets(self.layer_grads)
        return self._buckets

    def top_two(self) -> np.ndarray:
        """top_two()[i, e]: weights of the two largest layers of ``[i, e)`` (0 where e <= i)."""
        if self._top2 is None:
            n = len(self.layer_weights)
            out = np.zeros((n + 1, n + 1), dtype=np.int64)
            first = np.zeros(n + 1, dtype=np.int64)
            second = np.zeros(n + 1, dtype=np.int64)
            for e in range(1, n + 1):
                w = self.layer_weights[e - 1]
                rows = np.arange(n + 1) < e  # ranges [i, e) with i < e gain layer e - 1
                bigger = rows & (w > first)
                second = np.where(bigger, first, np.where(rows & (w > second), w, second))
                first = np.where(bigger, w, first)
                out[:, e] = first + second
            self._top2 = out
        return self._top2


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What a stage's costs depend on besides its layers (hashable: equal stages share matrices)."""

    kinds: tuple[str, ...]
    samples: int
    """Per data-parallel replica per microbatch."""
    replicas: int
    """Devices of its rank."""
    inflight: int
    capacity: int
    first: bool
    last: bool
    send_out: tuple[float, float]
    """(seconds per byte, latency) to the next stage's group."""
    send_in: tuple[float, float]
    """(seconds per byte, latency) to the previous stage's group (where gradients go)."""
    ring: tuple[float, float]
    """(slowest hop's seconds per byte, its latency) of the data-parallel ring (devices strided by tp)."""
    tp: int = 1
    tp_ring: tuple[float, float] = (0.0, 0.0)
    """The same for the tensor-parallel groups' rings (inside a node)."""
    sharding: Sharding = Sharding.NONE
    """NONE where the rank has one data-parallel replica (nothing to shard)."""
    slowdown: float = 1.0
    """Its compute times this: processes of the launch sharing a node's cores (`Cluster.slowdown`)."""
    update_per_byte: float = 0.0
    """Seconds per byte of its optimizer step: ``1 / (memory_bandwidth_Bps x memory_efficiency)``
    of its slowest kind (the largest), before the slowdown."""
    host_sends: bool = False
    """Whether its sends hold its compute lane (its devices are CPUs: `StageCost.host_sends`)."""

    @property
    def data_parallel(self) -> int:
        return self.replicas // self.tp


@dataclass(frozen=True, slots=True)
class StageTerms:
    """Every figure of a stage (scalars for one range, matrices for all: rows i, columns e).

    Per recomputation mode ``X``: ``bwd`` (none), ``bwd_sel``, ``bwd_rc`` (full), and
    likewise ``fits``, ``cost`` (T, the DP's objective) and ``total`` (f + b + sends, its
    tie-break). Seconds per microbatch; ``allreduce`` and ``update`` once per step.
    """

    fwd: Any
    bwd: Any
    bwd_sel: Any
    bwd_rc: Any
    send_fwd: Any
    send_bwd: Any
    allreduce: Any
    update: Any
    """The optimizer step (after `allreduce`, never overlapped)."""
    tp_comm: Any
    """TP all-reduces of one pass (in `fwd`, and again in each `bwd`)."""
    dp_fwd: Any
    """Exposed ZeRO-3 communication of a forward (in `fwd`)."""
    dp_bwd: Any
    """Exposed ZeRO-2/3 communication of a backward without recomputation (in `bwd`)."""
    dp_bwd_sel: Any
    dp_bwd_rc: Any
    weights: Any
    grads: Any
    optimizer: Any
    gathered: Any
    """Unsharded working weights (ZeRO-3: the two largest layers; the other shardings: all)."""
    buffers: Any
    act: Any
    core: Any
    """Bytes of one microbatch's attention cores: what selective recomputation frees and rebuilds."""
    keep: Any
    """Bytes a fully recomputing stage keeps per microbatch: its input."""
    static: Any
    """Held throughout the step: weights, grads, optimizer state, gathered weights, buffers."""
    fits: Any
    fits_sel: Any
    fits_rc: Any
    cost: Any
    cost_sel: Any
    cost_rc: Any
    total: Any
    total_sel: Any
    total_rc: Any

    def mode(self, recompute: int) -> tuple[Any, Any, Any, Any, Any]:
        """(bwd, fits, cost, total, exposed ZeRO-3 backward communication) under one recomputation mode."""
        if recompute == FULL:
            return self.bwd_rc, self.fits_rc, self.cost_rc, self.total_rc, self.dp_bwd_rc
        if recompute == SELECTIVE:
            return self.bwd_sel, self.fits_sel, self.cost_sel, self.total_sel, self.dp_bwd_sel
        return self.bwd, self.fits, self.cost, self.total, self.dp_bwd


def _fits(static: Any, act: Any, core: Any, keep: Any, inflight: int, capacity: int) -> dict[str, Any]:
    """Memory per device under each recomputation mode, against the capacity."""
    return {
        "fits": static + inflight * act <= capacity,
        "fits_sel": static + core + inflight * (act - core) <= capacity,
        "fits_rc": static + act + inflight * keep <= capacity,
    }


def with_memory(terms: StageTerms, spec: StageSpec) -> StageTerms:
    """`terms` of a stage that differs from `spec` only in its microbatches in flight and
    capacity, made for `spec` (the seconds and bytes are the same; only what fits changes)."""
    return replace(terms, **_fits(terms.static, terms.act, terms.core, terms.keep, spec.inflight, spec.capacity))


def stage_terms(
    tables: LayerTables,
    spec: StageSpec,
    i: Any,
    e: Any,
    m: int,
    *,
    times: tuple[Any, Any, Any],
    cut: np.ndarray,
    buffers: np.ndarray,
    tied: tuple[Any, Any, Any, Any],
    overlap_allreduce: bool,
    zero1_weight_shard: bool = True,
) -> StageTerms:
    """The figures of the module docstring for layers ``[i, e)`` (ints or broadcasting index arrays).

    Args:
        tables: The layer tables of ``spec.tp``.
        times: (forward, backward, selective re-run) seconds of ``[i, e)`` at ``spec.samples``
            on the stage's slowest kind, already scaled by tensor parallelism.
        cut: Cut bytes per sample at each layer boundary.
        buffers: Prefix sums of model buffer bytes.
        tied: (weights, grads, optimizer, all-reduce seconds) of tied-weight copies the stage holds.
        overlap_allreduce: Whether the per-step all-reduce hides under the last backward (the
            optimizer step never does).
        zero1_weight_shard: Whether ZeRO-1 holds a 1/d weight shard beside the whole
            weights (FSDP2, as partitioner.distributed runs it; not DeepSpeed).
    """
    b, t, d = spec.samples, spec.tp, spec.data_parallel
    fc, bc, sel = times
    # Tensor parallelism: one ring all-reduce of the pairs' outputs per layer, each pass.
    tp_comm: Any = 0.0
    if t > 1:
        per_byte, latency = spec.tp_ring
        tp_comm = (2 * (t - 1) / t * (tables.tp_comm[e] - tables.tp_comm[i]) * b * per_byte
                   + 2 * (t - 1) * latency * (tables.tp_collectives[e] - tables.tp_collectives[i]))
    weights = tables.weights[e] - tables.weights[i] + tied[0]
    grads = tables.grads[e] - tables.grads[i] + tied[1]
    optimizer = tables.optimizer[e] - tables.optimizer[i] + tied[2]
    sharding = spec.sharding if d > 1 else Sharding.NONE
    per_byte, latency = spec.ring
    share = (d - 1) / d

    def gather(nbytes: Any, count: Any = 1) -> Any:  # all-gather (or reduce-scatter) over the d replicas
        return share * nbytes * per_byte + (d - 1) * latency * count

    held_w, held_g, held_o = weights, grads, optimizer
    gathered: Any = 0
    buckets = tables.buckets()[i, e] if sharding is Sharding.NONE and d > 1 else 1
    allreduce: Any = per_step_collectives(sharding, d, weights, grads, spec.ring, buckets)
    if spec.last and spec.replicas > 1:
        # partitioner.distributed's step all-reduces the loss over the last stage's processes
        # (its tensor-parallel ranks too): a scalar, latency only, on the slower of its rings.
        allreduce = allreduce + 2 * (spec.replicas - 1) * max(latency, spec.tp_ring[1])
    dp_fwd: Any = 0.0
    layers = e - i
    reduces = shards_gradients(sharding)  # every microbatch
    if sharding is not Sharding.NONE:
        held_w, held_o = weights / d, optimizer / d
        gathered = tables.top_two()[i, e] if sharding is Sharding.ZERO3 else weights
        if sharding is not Sharding.ZERO1:
            held_g = grads / d
        elif not zero1_weight_shard:  # DeepSpeed's ZeRO-1: the whole weights alone, no shard
            held_w, gathered = weights, 0
    last_w = tables.layer_weights[np.maximum(e - 1, 0)]
    first_g = tables.layer_grads[np.minimum(i, len(tables.layer_grads) - 1)]
    if sharding in (Sharding.ZERO3, Sharding.ZERO3_KEEP):
        first_w = tables.layer_weights[np.minimum(i, len(tables.layer_weights) - 1)]
        dp_fwd = np.maximum(0.0, gather(weights, layers) - fc) + gather(first_w)
    allreduce = allreduce + tied[3]
    # The optimizer step over what this device updates: a 1/d shard under any sharding.
    stepped = tables.update[e] - tables.update[i] + update_bytes(tied[0], tied[1], tied[2], tables.precision)
    update = stepped / (d if sharding is not Sharding.NONE else 1) * spec.update_per_byte * spec.slowdown
    # Each microbatch after the first adds its gradients into those held (autograd's
    # AccumulateGrad: read both, write one), in its backward: (m - 1) / m of it in each.
    bc = bc + accumulate_bytes(held_g, m) * spec.update_per_byte * spec.slowdown

    def dp_bwd(compute: Any) -> Any:
        if not reduces:
            return 0.0
        comm = gather(grads, layers)
        lead = gather(first_g)  # the last reduce-scatter waits for the last backward
        if sharding is Sharding.ZERO3:
            comm = comm + gather(weights, layers)
            lead = lead + gather(last_w)
        return np.maximum(0.0, comm - compute) + lead

    scale = t if tables.sequence_parallel else 1
    cut_in, cut_out = cut[i] * b / scale, cut[e] * b / scale
    boundary = (0 if spec.first else cut_in) + (0 if spec.last else cut_out)
    buffer_bytes = buffers[e] - buffers[i] + 2 * boundary
    act = (tables.activations[e] - tables.activations[i]) * b
    core = (tables.core[e] - tables.core[i]) * b
    static = held_w + held_g + held_o + gathered + buffer_bytes
    send_fwd = 0.0 if spec.last else cut_out * spec.send_out[0] + spec.send_out[1]
    send_bwd = 0.0 if spec.first else cut_in * spec.send_in[0] + spec.send_in[1]
    fwd = fc + tp_comm + dp_fwd
    bwd = bc + tp_comm + dp_bwd(bc)
    bwd_sel = bc + sel + tp_comm + dp_bwd(bc + sel)
    bwd_rc = bc + fc + 2 * tp_comm + dp_bwd(bc + fc)

    def exposed(backward: Any) -> Any:
        return np.maximum(0.0, allreduce - backward) if overlap_allreduce else allreduce

    sends = send_fwd + send_bwd
    # A CPU stage's sends hold its compute lane: its period is its passes and sends together,
    # and its all-reduce overlaps the last backward with that backward's send.
    busy, link = (sends, 0.0) if spec.host_sends else (0.0, sends)
    held_bwd = send_bwd if spec.host_sends else 0.0
    return StageTerms(
        fwd=fwd,
        bwd=bwd,
        bwd_sel=bwd_sel,
        bwd_rc=bwd_rc,
        send_fwd=send_fwd,
        send_bwd=send_bwd,
        allreduce=allreduce,
        update=update,
        tp_comm=tp_comm,
        dp_fwd=dp_fwd,
        dp_bwd=dp_bwd(bc),
        dp_bwd_sel=dp_bwd(bc + sel),
        dp_bwd_rc=dp_bwd(bc + fc),
        weights=held_w,
        grads=held_g,
        optimizer=held_o,
        gathered=gathered,
        buffers=buffer_bytes,
        act=act,
        core=core,
        keep=cut_in,
        static=static,
        **_fits(static, act, core, cut_in, spec.inflight, spec.capacity),
        cost=np.maximum(fwd + bwd + busy + (exposed(bwd + held_bwd) + update) / m, link),
        cost_sel=np.maximum(fwd + bwd_sel + busy + (exposed(bwd_sel + held_bwd) + update) / m, link),
        cost_rc=np.maximum(fwd + bwd_rc + busy + (exposed(bwd_rc + held_bwd) + update) / m, link),
        total=fwd + bwd + sends,
        total_sel=fwd + bwd_sel + sends,
        total_rc=fwd + bwd_rc + sends,
    )
