"""Pure cost model: a `LayerGraph` and devices -> a `Problem` of seconds and bytes (no torch).

Compute is a roofline unless the layer was timed on the device's profile:

    time = max(flops / (peak_flops[dtype] * compute_efficiency),
               bytes / (memory_bandwidth * memory_efficiency))

Memory per layer (bytes, on whichever device holds it):

    inference: params + buffers + output activations
    training:  params + grads (= params) + optimizer state (state_factor x params)
               + buffers + activations saved for backward

Neither counts the framework's workspace or allocator slack; `PlanOptions.memory_reserve`
keeps that fraction of every device free. Mixed-precision master weights are not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from partitioner.devices import DTYPES, Device, DeviceProfile, link_cost
from partitioner.errors import DeviceError
from partitioner.ir import INPUT, OUTPUT, Layer, LayerGraph, Problem, ReplicaCost
from partitioner.options import PlanOptions

__all__ = ["roofline_time", "layer_memory", "layer_time", "build_problem", "replica_cost"]

# Backward of a layer reads its saved activations and output gradient and writes input
# and weight gradients: about twice the forward's memory traffic (as its FLOPs are about
# twice the forward's for matmuls).
BACKWARD_TRAFFIC_FACTOR = 2.0


def roofline_time(flops: float, bytes_moved: float, profile: DeviceProfile, dtype: str = "float32") -> float:
    """Seconds for `flops` FLOPs touching `bytes_moved` bytes of device memory.

    ``max(flops / (peak_flops[dtype] * compute_efficiency),
    bytes / (memory_bandwidth * memory_efficiency))``: the kernel is bound by whichever
    ceiling it hits first (Williams, Waterman, Patterson: "Roofline", CACM 2009).

    Raises:
        ValueError: `dtype` is unknown, or `flops` or `bytes_moved` is negative.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops and bytes must be >= 0 (got flops={flops}, bytes={bytes_moved})")
    compute = flops / (profile.peak_flops_for(dtype) * profile.compute_efficiency)
    memory = bytes_moved / (profile.memory_bandwidth_Bps * profile.memory_efficiency)
    return max(compute, memory)


def _state_bytes(layer: Layer, options: PlanOptions) -> int:
    """Bytes that do not shrink with the batch: weights, buffers, and when training grads and optimizer state."""
    if not options.training:
        return layer.param_bytes + layer.buffer_bytes
    return layer.param_bytes * (2 + options.optimizer.state_factor) + layer.buffer_bytes


def _activation_bytes(layer: Layer, options: PlanOptions) -> int:
    return layer.saved_bytes if options.training else layer.output_bytes


def layer_memory(layer: Layer, options: PlanOptions) -> int:
    """Bytes `layer` needs on its device (the model is in the module docstring).

    With Adam (state_factor 2), training needs 4x the parameter bytes: weights, grads and
    two moments.
    """
    return _state_bytes(layer, options) + _activation_bytes(layer, options)


def _forward_bytes(layer: Layer, batch_fraction: float) -> float:
    """Forward memory traffic when the layer sees `batch_fraction` of the batch.

    Reading the parameters and buffers does not shrink with the batch; the rest of
    `traffic_bytes` (activations) does.
    """
    fixed = min(layer.traffic_bytes, layer.param_bytes + layer.buffer_bytes)
    return fixed + (layer.traffic_bytes - fixed) * batch_fraction


def _estimate(layer: Layer, profile: DeviceProfile, dtype: str, batch_fraction: float) -> tuple[float, float]:
    """Roofline (forward, backward) seconds at `batch_fraction` of the batch."""
    fwd_bytes = _forward_bytes(layer, batch_fraction)
    fwd = roofline_time(layer.fwd_flops * batch_fraction, fwd_bytes, profile, dtype)
    bwd = roofline_time(layer.bwd_flops * batch_fraction, BACKWARD_TRAFFIC_FACTOR * fwd_bytes, profile, dtype)
    return fwd, bwd


def layer_time(
    layer: Layer, profile: DeviceProfile, options: PlanOptions, dtype: str = "float32", batch_fraction: float = 1.0
) -> float:
    """Seconds of one step of `layer` on a device of `profile` (forward, plus backward when training).

    A time measured for this profile (``layer.fwd_time_s[profile.name]``,
    ``bwd_time_s``) is preferred to the roofline estimate, each direction separately.
    At a fraction of the batch (data parallelism) a measured time is scaled by the
    roofline's ratio between that fraction and the whole batch (by the fraction itself
    when the layer has no FLOPs or bytes to estimate with).
    """
    full = _estimate(layer, profile, dtype, 1.0)
    part = full if batch_fraction == 1.0 else _estimate(layer, profile, dtype, batch_fraction)
    directions = [(layer.fwd_time_s, full[0], part[0])]
    if options.training:
        directions.append((layer.bwd_time_s, full[1], part[1]))
    total = 0.0
    for measured, estimate_full, estimate_part in directions:
        seconds = measured.get(profile.name)
        if seconds is None:
            total += estimate_part
        elif estimate_full > 0:
            total += seconds * estimate_part / estimate_full
        else:
            total += seconds * batch_fraction
    return total


def _batch_shares(batch_size: int, k: int) -> tuple[int, ...]:
    """Samples per replica when `batch_size` is split as evenly as integers allow."""
    return tuple(batch_size // k + (1 if j < batch_size % k else 0) for j in range(k))


def replica_cost(
    graph: LayerGraph, devices: Sequence[Device], options: PlanOptions, dtype: str = "float32"
) -> ReplicaCost | None:
    """Cost of data parallelism: the whole model on every device, the batch split evenly.

    Even split (a later refinement could split in proportion to speed): replica j gets
    ``batch // k`` or one more sample. Time:

        max_j compute_j(share_j)                                  slowest replica
        + sum_{j>0} (input_bytes x share_j / batch) x link(0 -> j)  scatter of inputs
        + sum_{j>0} (output_bytes x share_j / batch) x link(j -> 0) gather of outputs
          (x 2 when training: their gradients come back)
        + 2 (k-1)/k x param_bytes x max_ring_hop(s/B)             ring all-reduce of
          + 2 (k-1) x max_ring_hop(latency)                        gradients (training)

    Inputs start and outputs end on the first device; the ring visits the devices in
    the order given. Memory per device: the state of the whole model plus the
    activations of its share of the batch.

    Returns:
        None when there are fewer than two devices or fewer samples than devices.
    """
    k = len(devices)
    if k < 2 or graph.batch_size < k:
        return None
    shares = _batch_shares(graph.batch_size, k)
    fractions = [s / graph.batch_size for s in shares]
    replica_s: dict[tuple[DeviceProfile, float], float] = {}  # identical devices are costed once
    for d, f in zip(devices, fractions, strict=True):
        if (d.profile, f) not in replica_s:
            replica_s[d.profile, f] = sum(layer_time(layer, d.profile, options, dtype, f) for layer in graph.layers)
    compute = max(replica_s.values())
    links = [[link_cost(a, b) for b in devices] for a in devices]
    inputs = [v for v in graph.values if v.producer == INPUT]
    outputs = [v for v in graph.values if OUTPUT in v.consumers]
    gather_factor = 2 if options.training else 1
    scatter = 0.0
    for j in range(1, k):
        for v in inputs:
            per_byte, latency = links[0][j]
            scatter += v.bytes * fractions[j] * per_byte + latency
        for v in outputs:
            per_byte, latency = links[j][0]
            scatter += gather_factor * (v.bytes * fractions[j] * per_byte + latency)
    allreduce = 0.0
    if options.training:
        param_bytes = sum(layer.param_bytes for layer in graph.layers)
        hops = [links[j][(j + 1) % k] for j in range(k)]
        allreduce = 2 * (k - 1) / k * param_bytes * max(h[0] for h in hops) + 2 * (k - 1) * max(h[1] for h in hops)
    state = sum(_state_bytes(layer, options) for layer in graph.layers)
    activations = sum(_activation_bytes(layer, options) for layer in graph.layers)
    memory = tuple(state + math.ceil(activations * f) for f in fractions)
    return ReplicaCost(time_s=compute + scatter + allreduce, memory=memory)


def build_problem(
    graph: LayerGraph, devices: Sequence[Device], options: PlanOptions, dtype: str = "float32"
) -> Problem:
    """The solver's tables for placing `graph`'s layers on `devices`.

    - ``compute_s[i][d]``: `layer_time` (measured if timed on the device's profile, else
      roofline); forward only for inference.
    - ``memory[i]``: `layer_memory`; ``capacity[d] = memory_bytes x (1 - memory_reserve)``.
    - links: `partitioner.devices.link_cost`. When training, every value that crosses
      devices forward has its gradient cross back, so per-byte and latency costs double.
    - ``replica``: `replica_cost` when ``options.allow_data_parallel``.

    Args:
        graph: The layers and the values between them.
        devices: Placement targets, in plan order.
        options: Training or inference, optimizer, memory reserve, objective.
        dtype: Compute dtype for the roofline: one of ``float32``, ``tf32``,
            ``bfloat16``, ``float16``.

    Raises:
        DeviceError: No devices.
        ValueError: Unknown dtype.
    """
    if not devices:
        raise DeviceError("build_problem needs at least one device (got none)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    compute = tuple(tuple(layer_time(layer, d.profile, options, dtype) for d in devices) for layer in graph.layers)
    direction_factor = 2.0 if options.training else 1.0
    links = [[link_cost(a, b) for b in devices] for a in devices]
    return Problem(
        compute_s=compute,
        memory=tuple(layer_memory(layer, options) for layer in graph.layers),
        capacity=tuple(int(d.memory_bytes * (1 - options.memory_reserve)) for d in devices),
        values=graph.values,
        seconds_per_byte=tuple(tuple(direction_factor * c[0] for c in row) for row in links),
        latency_s=tuple(tuple(direction_factor * c[1] for c in row) for row in links),
        objective=options.objective,
        names=tuple(layer.name for layer in graph.layers),
        device_names=tuple(d.name for d in devices),
        replica=replica_cost(graph, devices, options, dtype) if options.allow_data_parallel else None,
    )
