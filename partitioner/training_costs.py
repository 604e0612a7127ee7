"""Pure training tables: per-layer times and bytes of a training step, for the pipeline planner (no torch).

State per parameter (bytes):

    per parameter     weights  grads  optimizer (master copy + state)
    fp32              4        4      4 x state_factor
    bf16/fp16 mixed   2        2      4 + 4 x state_factor     (Adam: 16 bytes in all)

as counted by Rajbhandari et al. 2020, "ZeRO" (arXiv:1910.02054), section 3.1. Layer
times come from `partitioner.cost_model.layer_fwd_bwd_time` (measured or roofline).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from partitioner.cost_model import layer_fwd_bwd_time
from partitioner.devices import DeviceProfile
from partitioner.ir import INPUT, OUTPUT, Layer, LayerGraph
from partitioner.options import Optimizer, Precision
from partitioner.tp_layout import vocab_rows

__all__ = [
    "StateBytes",
    "training_state_bytes",
    "resolve_precision",
    "ChainLayer",
    "TiedParameter",
    "LayerTimes",
    "TrainingCosts",
    "training_costs",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class StateBytes:
    """Bytes that stay on a device for the whole training step, for some parameters."""

    weights: int
    """The weights at the compute precision."""
    grads: int
    """Their gradients."""
    optimizer: int
    """Optimizer state, plus the float32 master weights under mixed precision."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def training_state_bytes(params: int, precision: Precision, optimizer: Optimizer) -> StateBytes:
    """Weights, gradients and optimizer state of `params` parameters (the table in the module docstring).

    Raises:
        ValueError: `precision` is `Precision.AUTO` (resolve it first: `resolve_precision`).
    """
    if precision is Precision.AUTO:
        raise ValueError("resolve Precision.AUTO for the devices first (resolve_precision)")
    element = precision.element_bytes
    master = 4 if precision.mixed else 0
    return StateBytes(
        weights=params * element,
        grads=params * element,
        optimizer=params * (master + 4 * optimizer.state_factor),
    )


def resolve_precision(precision: Precision, profiles: Sequence[DeviceProfile]) -> Precision:
    """`precision`, with `Precision.AUTO` made concrete for the devices of `profiles`.

    AUTO is bf16 when every profile has a bfloat16 peak, else fp16 when every one has a
    float16 peak (V100), else fp32 (CPUs).
    """
    if precision is not Precision.AUTO:
        return precision
    if all(p.peak_flops.bfloat16 is not None for p in profiles):
        return Precision.BF16
    if all(p.peak_flops.float16 is not None for p in profiles):
        return Precision.FP16
    return Precision.FP32


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainLayer:
    """One layer of a model seen as a chain, as the training planner costs it."""

    name: str
    params: int
    """Parameter elements it owns."""
    buffer_bytes: int = 0
    """Buffers (not trained), bytes."""
    activation_bytes: int
    """Bytes one sample keeps alive from its forward to its backward, at the training precision."""
    flops: float
    """Forward plus backward FLOPs of one sample (model FLOPs: no recomputation)."""
    tp_flops: float = 0.0
    """Of `flops`, those of its tensor-parallel pairs (`partitioner.tp_layout`): the columns,
    rows and what lies between them (attention cores); divided by the degree under TP."""
    tp_params: int = 0
    """Of `params`, those the pairs and vocabulary shards split over the TP group."""
    tp_activation_bytes: int = 0
    """Of `activation_bytes` (per sample), those inside the pairs, split over the TP group;
    the rest (norm and residual inputs) split too only under sequence parallelism."""
    tp_comm_bytes: int = 0
    """Bytes per sample each row's output (and a vocabulary-parallel embedding's) all-reduces
    over the TP group in the forward; the backward all-reduces as many at the columns'
    inputs. Under sequence parallelism each all-reduce is a reduce-scatter and an
    all-gather of the same bytes."""
    tp_bytes_share: float = 0.0
    """For a layer without FLOPs, priced on the bytes it moves (an embedding lookup), the share
    of those its split parameters make (`_split_bytes_share`: the table's rows read forward
    and its gradient written backward), which the TP group divides as it divides `tp_flops`
    of other layers; 0 otherwise."""
    tp_divisor: int = 0
    """TP degrees ``t`` with ``tp_divisor % t == 0`` split the layer's pairs evenly (the gcd of
    their heads, key/value heads and sharded widths); any other leaves the layer replicated.
    0: the layer has no pair."""
    tp_vocab: tuple[int, ...] = ()
    """Sizes of its vocabulary shards (an embedding's rows, a head's outputs): any degree
    splits them, ``ceil(V / t)`` rows on the busiest rank (`partitioner.tp_layout.vocab_rows`)."""
    core_flops: float = 0.0
    """Forward plus backward FLOPs per sample of its attention cores (scores, softmax,
    weighted sum): selective recomputation re-runs their forward (a third of these)."""
    core_activation_bytes: int = 0
    """Of `activation_bytes` (per sample), those its attention cores keep: what selective
    recomputation frees."""

    @property
    def tp_time_share(self) -> float:
        """The share of its time tensor parallelism splits: ``tp_flops / flops``, or
        `tp_bytes_share` for a layer without FLOPs."""
        return min(1.0, self.tp_flops / self.flops) if self.flops > 0 else self.tp_bytes_share

    def tp_splits(self, t: int) -> bool:
        """Whether tensor-parallel degree `t` splits this layer: it has pairs or vocabulary
        shards, and `t` > 1 divides its pairs' `tp_divisor` (vocabularies split at any degree)."""
        if t < 2 or not (self.tp_divisor or self.tp_vocab):
            return False
        return self.tp_divisor == 0 or self.tp_divisor % t == 0

    def tp_share(self, t: int) -> Fraction:
        """The share of its split figures (`tp_flops`, `tp_params`, `tp_activation_bytes`) the
        busiest of `t` ranks holds: ``1 / t`` of pairs, ``ceil(V / t) / V`` of a vocabulary of
        ``V`` rows (GPT-3's 50,257 at 8: 6,283 / 50,257, 0.4% over an eighth); the largest of
        those when a layer has several (exact for a layer of one kind, the usual case, and an
        upper bound otherwise); 1 where `t` leaves the layer whole (`tp_splits`)."""
        if not self.tp_splits(t):
            return Fraction(1)
        shares = [Fraction(vocab_rows(v, t), v) for v in self.tp_vocab]
        return max(shares + [Fraction(1, t)] if self.tp_divisor else shares)


@dataclass(frozen=True, slots=True, kw_only=True)
class TiedParameter:
    """A parameter owned by one layer and read by later ones (a tied embedding).

    A stage that holds a reader but not the owner keeps a copy (weights, gradients and
    optimizer state: Megatron-LM keeps the embedding in the first and last stages).
    """

    owner: int
    users: tuple[int, ...]
    params: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerTimes:
    """Seconds of every layer on one device kind for microbatches of `samples` samples."""

    kind: str
    """Device profile name."""
    samples: int
    fwd_s: tuple[float, ...]
    bwd_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.fwd_s) != len(self.bwd_s):
            raise ValueError(f"{self.kind} x {self.samples}: {len(self.fwd_s)} forward times, {len(self.bwd_s)} backward")
        if any(not (math.isfinite(t) and t >= 0) for t in self.fwd_s + self.bwd_s):
            raise ValueError(f"{self.kind} x {self.samples}: times must be finite and >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingCosts:
    """The training planner's tables for a chain of layers (`training_costs`, or by hand in tests).

    Bytes are per sample unless named otherwise; a microbatch of ``b`` samples on one
    device moves ``b x cut_bytes[k]`` at cut ``k`` and keeps ``b x activation_bytes``.
    """

    layers: tuple[ChainLayer, ...]
    cut_bytes: tuple[int, ...]
    """cut_bytes[k], k = 0..N: bytes per sample that cross from layers < k to layers >= k
    (the activations sent forward and, as gradients, back). cut_bytes[0] is the model's
    input (kept by a recomputing first stage), cut_bytes[N] is 0."""
    tied: tuple[TiedParameter, ...] = ()
    times: tuple[LayerTimes, ...]
    """Per (device kind, samples per microbatch): the sizes the planner may use."""
    precision: Precision
    """Concrete (not AUTO): weights, gradients and activations are counted in it."""
    optimizer: Optimizer

    def __post_init__(self) -> None:
        n = len(self.layers)
        if n == 0:
            raise ValueError("TrainingCosts needs at least one layer")
        if len(self.cut_bytes) != n + 1 or self.cut_bytes[n] != 0 or min(self.cut_bytes) < 0:
            raise ValueError(f"cut_bytes needs {n + 1} entries >= 0, the last 0 (got {len(self.cut_bytes)})")
        if self.precision is Precision.AUTO:
            raise ValueError("TrainingCosts.precision must be concrete; resolve Precision.AUTO first")
        for t in self.times:
            if len(t.fwd_s) != n:
                raise ValueError(f"times for {t.kind} x {t.samples} cover {len(t.fwd_s)} layers of {n}")
        for tie in self.tied:
            if not all(tie.owner < u < n for u in tie.users):
                raise ValueError(f"tied parameter of layer {tie.owner}: its users {tie.users} must come after it")

    def times_for(self, kind: str, samples: int) -> LayerTimes:
        """The table of `kind` at `samples` samples per microbatch.

        Raises:
            KeyError: No such table.
        """
        for t in self.times:
            if t.kind == kind and t.samples == samples:
                return t
        raise KeyError(f"no layer times for {kind} at {samples} samples per microbatch")

    @property
    def flops_per_sample(self) -> float:
        return sum(layer.flops for layer in self.layers)


def _split_bytes_share(layer: Layer) -> float:
    """The share of a FLOP-less layer's priced bytes (forward and backward, as
    `partitioner.cost_model` moves them) that its split parameters make: of the forward's
    bytes, the split tables' bytes it reads (their rows, `Layer.unread_bytes` left out);
    the backward moves twice the forward's, plus the trained tables' gradients beyond those
    rows (`Layer.table_grad_bytes`), which are split too. 0 for a layer with FLOPs."""
    if layer.fwd_flops or not layer.traffic_bytes:
        return 0.0
    forward = layer.traffic_bytes - layer.unread_bytes
    split = max(0, layer.tp_traffic_bytes - layer.unread_bytes)
    total = 3 * forward + layer.table_grad_bytes
    return min(1.0, (3 * split + layer.table_grad_bytes) / total) if total > 0 else 0.0


def training_costs(
    graph: LayerGraph,
    profiles: Sequence[DeviceProfile],
    samples: Collection[int],
    *,
    precision: Precision,
    optimizer: Optimizer,
    element_size: int,
    parameter_values: Collection[str] = (),
) -> TrainingCosts:
    """The training planner's tables for `graph`, traced at batch ``graph.batch_size``.

    Per sample is the traced figure over the traced batch. Bytes traced at `element_size`
    bytes per element are counted at the precision's (``scale = precision bytes /
    element_size``: activations, cut values and the roofline's memory traffic; a model
    traced in float32 and trained in bf16 moves half). Measured layer times are used as
    measured, scaled to each microbatch size by the roofline (`layer_fwd_bwd_time`).

    Args:
        graph: The layers in topological order.
        profiles: The device kinds to tabulate.
        samples: Microbatch sizes (samples per device) to tabulate.
        precision: Concrete training precision.
        optimizer: Optimizer whose state counts.
        element_size: Bytes per element of the traced model's floating tensors.
        parameter_values: Names of values that are parameters read by a later layer
            (tied weights): they become `TiedParameter`s instead of activations.
    """
    n = len(graph.layers)
    b0 = graph.batch_size
    scale = precision.element_bytes / element_size
    cuts = [0] * (n + 1)
    tied = []
    for v in graph.values:
        readers = tuple(c for c in v.consumers if c != OUTPUT)
        if not readers:
            continue  # outputs only: the loss is taken where they are made
        if v.name in parameter_values and v.producer >= 0:
            tied.append(TiedParameter(owner=v.producer, users=readers, params=v.bytes // element_size))
            continue
        per_sample = math.ceil(v.bytes * scale / b0)
        if v.producer == INPUT:
            cuts[0] += per_sample  # each stage loads the inputs it reads; only recomputation keeps them
            continue
        for k in range(v.producer + 1, max(readers) + 1):
            cuts[k] += per_sample
    layers = tuple(
        ChainLayer(
            name=layer.name,
            params=layer.param_bytes // element_size,
            buffer_bytes=layer.buffer_bytes,
            activation_bytes=math.ceil(layer.saved_bytes * scale / b0),
            flops=(layer.fwd_flops + layer.bwd_flops) / b0,
            tp_flops=layer.tp_flops / b0,
            tp_params=layer.tp_params,
            tp_activation_bytes=math.ceil(layer.tp_activation_bytes * scale / b0),
            tp_comm_bytes=math.ceil(layer.tp_comm_bytes * scale / b0),
            tp_bytes_share=_split_bytes_share(layer),
            tp_divisor=layer.tp_divisor,
            tp_vocab=layer.tp_vocab,
            core_flops=layer.core_flops / b0,
            core_activation_bytes=math.ceil(layer.core_activation_bytes * scale / b0),
        )
        for layer in graph.layers
    )
    scaled = graph.layers
    if scale != 1:
        scaled = tuple(
            replace(
                layer,
                traffic_bytes=round(layer.traffic_bytes * scale),
                elementwise_bytes=round(layer.elementwise_bytes * scale),
                passes=tuple((round(b * scale), count, *kind) for b, count, *kind in layer.passes),
                unread_bytes=round(layer.unread_bytes * scale),
                table_grad_bytes=round(layer.table_grad_bytes * scale),
                param_bytes=round(layer.param_bytes * scale),
                buffer_bytes=round(layer.buffer_bytes * scale),
            )
            for layer in graph.layers
        )
    times = []
    for profile in dict.fromkeys(profiles):
        for b in sorted(set(samples)):
            pairs = [layer_fwd_bwd_time(layer, profile, precision.compute_dtype, b / b0) for layer in scaled]
            times.append(
                LayerTimes(kind=profile.name, samples=b, fwd_s=tuple(p[0] for p in pairs), bwd_s=tuple(p[1] for p in pairs))
            )
    return TrainingCosts(
        layers=layers,
        cut_bytes=tuple(cuts[:n]) + (0,),
        tied=tuple(tied),
        times=tuple(times),
        precision=precision,
        optimizer=optimizer,
    )
