"""Pure cost model: a `LayerGraph` and devices -> a `Problem` of seconds and bytes (no torch).

Compute is a roofline unless the layer was timed on the device's profile. Each kind of
kernel is priced at its own ceiling and the kinds run one after another, as torch's own
estimator prices each op (``torch.utils._runtime_estimation``: per op the larger of
FLOPs / peak and bytes / bandwidth, summed over ops):

    matmuls  = max(sum_g flops_g / (peak_flops[dtype] * min(gemm_efficiency(flops_g),
                                                             narrow_efficiency(m_g, n_g, k_g))),
                   matmul bytes / bandwidth)
               (a convolution at conv_efficiency(flops_g), an attention at
                attention_efficiency(its FLOPs per sample and head), where the profile has them)
    kernels  = matmuls + sum_p max(pass_bytes_p / (memory_bandwidth * memory_fraction(pass_bytes_p)),
                                   pass_bytes_p / op_rates[kind_p])   (norms, pooling, activations)
    host     = launches x launch_s + module calls x module_call_s   (module calls: forward only)
    time     = max(kernels, host)     GPU: launches are asynchronous
               kernels + host          CPU: one thread dispatches and computes

with bandwidth = memory_bandwidth * memory_efficiency. `gemm_efficiency` is the profile's
curve by the size of each matmul (small ones run far below peak), `compute_efficiency`
where it has none; `narrow_efficiency` its curves by each side of a matmul
``(m x k) @ (k x n)`` (a narrow one, as a 10-class head's n, runs far below what its FLOPs
give), 1 where it has none; `memory_fraction` the profile's curve by the bytes one
element-wise node moves (`Layer.passes`: a small one runs from caches, a CPU op whose
output is larger than the allocator keeps maps fresh pages each call), `memory_efficiency`
where it has none. A CUDA launch returns before its kernel runs, so the host queues the
next kernels while the device works: a step takes the longer of the two streams (NVIDIA,
"Getting Started with CUDA Graphs", 2019: back-to-back launches of a short kernel ran at
3.8 us each, 9.6 us when each was synchronised). On a CPU the thread that dispatches an op
also runs it, so the two add. A layer traced before kernels were counted (0 launches, no
matmul sizes, no element-wise bytes) is priced as the plain roofline
``max(flops / (peak * compute_efficiency), bytes / bandwidth)``.

Memory per layer (bytes, on whichever device holds it):

    inference: params + buffers; each device also keeps room for the largest layer's
               outputs (a forward frees a layer's activations once the next layer has
               read them, so only one layer's working set is live at a time)
    training:  params + grads (= params) + optimizer state (state_factor x params)
               + buffers + activations saved for backward (all live until backward)

Neither counts the framework's workspace or allocator slack; `PlanOptions.memory_reserve`
keeps that fraction of every device free. Mixed-precision master weights are not modelled
there; the training planner's tables (`partitioner.training_costs`) model them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from partitioner.devices import DTYPES, GEMM_AXES, OP_KINDS, Device, DeviceProfile, link_cost
from partitioner.errors import DeviceError
from partitioner.ir import INPUT, OUTPUT, TIME_SOURCES, BatchShare, Layer, LayerGraph, Problem, ReplicaCost
from partitioner.options import PlanOptions

__all__ = [
    "split_sizes",
    "roofline_time",
    "gemm_efficiency",
    "narrow_efficiency",
    "memory_fraction",
    "layer_time_source",
    "TIME_SOURCES",
    "layer_memory",
    "working_set_bytes",
    "layer_time",
    "layer_fwd_bwd_time",
    "build_problem",
    "device_links",
    "Links",
    "replica_cost",
    "data_parallel_costs",
    "batch_shares",
    "ring_allreduce_s",
]

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


def gemm_efficiency(profile: DeviceProfile, flops: float) -> float:
    """Achieved fraction of peak for one matmul of `flops` FLOPs on a device of `profile`.

    The profile's `DeviceProfile.gemm_efficiency` points, interpolated linearly in
    ``log(flops)`` and held at the end points; `compute_efficiency` when it has none.
    """
    points = profile.gemm_efficiency
    if not points:
        return profile.compute_efficiency
    return _log_interpolated(points, flops)


def narrow_efficiency(profile: DeviceProfile, m: int, n: int, k: int) -> float:
    """Achieved fraction of peak for a matmul ``(m x k) @ (k x n)`` by its sides: the least
    of the profile's `DeviceProfile.gemm_narrow` curves at them (each interpolated linearly
    in log(size), held at its end points); 1 without curves, or for a side 0 (unknown)."""
    out = 1.0
    for axis, side in zip(GEMM_AXES, (m, n, k)):
        points = [(size, eff) for a, size, eff in profile.gemm_narrow if a == axis]
        if side > 0 and points:
            out = min(out, _log_interpolated(points, side))
    return out


def memory_fraction(profile: DeviceProfile, nbytes: float) -> float:
    """Achieved fraction of `memory_bandwidth_Bps` for one memory-bound op moving `nbytes`:
    the profile's `DeviceProfile.memory_curve` interpolated linearly in log(bytes), held at
    the end points; `memory_efficiency` when it has none."""
    points = profile.memory_curve
    if not points or nbytes <= 0:
        return profile.memory_efficiency
    return _log_interpolated(points, nbytes)


def _elementwise_s(layer: Layer, profile: DeviceProfile, nbytes: float, batch_fraction: float) -> tuple[float, float]:
    """(forward, backward) seconds of the forward's memory-bound nodes moving `nbytes` in
    all: each of `Layer.passes` at its size's `memory_fraction` (scaled to `nbytes`), or the
    whole at `memory_efficiency` for a layer that does not itemise them; the backward moves
    `BACKWARD_TRAFFIC_FACTOR` times the bytes. A node of a kind the profile prices apart (a
    batch norm, a pooling) runs no faster than its `DeviceProfile.op_rates`, each way."""
    bandwidth = profile.memory_bandwidth_Bps
    total = sum(b * count for b, count, *_ in layer.passes) * batch_fraction
    if not layer.passes or total <= 0 or not (profile.memory_curve or profile.op_rates):
        seconds = nbytes / (bandwidth * profile.memory_efficiency)
        return seconds, BACKWARD_TRAFFIC_FACTOR * seconds
    share = nbytes / total
    rates = {kind: (forward, backward) for kind, forward, backward in profile.op_rates}
    fwd = bwd = 0.0
    for b, count, *kind in layer.passes:
        moved = b * batch_fraction * share
        curve = moved / (bandwidth * memory_fraction(profile, moved))
        rate = rates.get(OP_KINDS[kind[0] - 1]) if kind and 0 < kind[0] <= len(OP_KINDS) else None
        fwd += count * (max(curve, moved / rate[0]) if rate else curve)
        bwd += count * (max(BACKWARD_TRAFFIC_FACTOR * curve, moved / rate[1]) if rate else BACKWARD_TRAFFIC_FACTOR * curve)
    return fwd, bwd


def _log_interpolated(points: Sequence[tuple[float, float]], x: float) -> float:
    """The value at `x` of `points` (x increasing), linear in log(x), held at the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[-1][1]


_Own = dict[int, list[tuple[Sequence[tuple[float, float]], float, list[int]]]]
"""FLOPs of one op -> (its curve, where to read it (0: at its FLOPs), [how many such ops])."""


def _own_curves(layer: Layer, profile: DeviceProfile) -> _Own:
    """`layer`'s convolutions (read at their FLOPs) and attention (read at their FLOPs per
    sample and head; causal ones on `causal_attention_efficiency` where the profile has
    it), where the profile has their curve."""
    out: _Own = {}
    if profile.conv_efficiency:
        for flops, count in layer.convs:
            out.setdefault(flops, []).append((profile.conv_efficiency, 0.0, [count]))
    for flops, count, causal, head in layer.attention:
        curve = (causal and profile.causal_attention_efficiency) or profile.attention_efficiency
        if curve:
            out.setdefault(flops, []).append((curve, float(head), [count]))
    return out


def _matmul_s(layer: Layer, profile: DeviceProfile, dtype: str, batch_fraction: float) -> float:
    """Compute seconds of the forward's FLOPs, each matmul at its size's efficiency and its
    sides' (`narrow_efficiency`), the lesser; a convolution at its size's
    `DeviceProfile.conv_efficiency`, a fused attention at its `attention_efficiency`
    (`causal_attention_efficiency`), where the profile has that curve.

    A matmul of ``g`` FLOPs at a fraction of the batch does ``g x fraction`` (its rows
    shrink, and so does its side m, the traced batch's rows); FLOPs the layer does not
    itemise (layers traced before `Layer.gemms`) run at `compute_efficiency`.
    """
    peak = profile.peak_flops_for(dtype)
    itemised = 0
    seconds = 0.0
    # Convolutions and fused attention are entries of `gemms` too (sides unknown): those
    # `convs` and `attention` count run at the profile's curve for them where it has one.
    own = _own_curves(layer, profile)
    for flops, count, *sides in layer.gemms:
        scaled = flops * batch_fraction
        # Their sides are unknown (0, 0, 0): a matmul of as many FLOPs is not one of them.
        for curve, at, left in (own.get(flops, []) if not any(sides) else []):
            taken = min(count, left[0])
            if taken:
                left[0] -= taken
                seconds += taken * scaled / (peak * _log_interpolated(curve, at or scaled))
                itemised += flops * taken
                count -= taken
        if not count:
            continue
        efficiency = gemm_efficiency(profile, scaled)
        if len(sides) == 3 and profile.gemm_narrow:
            m, n, k = sides
            rows = max(1, round(m * batch_fraction)) if m else 0
            efficiency = min(efficiency, narrow_efficiency(profile, rows, n, k))
        seconds += count * scaled / (peak * efficiency)
        itemised += flops * count
    rest = max(0, layer.fwd_flops - itemised) * batch_fraction
    return seconds + rest / (peak * profile.compute_efficiency)


def _device_s(kernels_s: float, launches: int, profile: DeviceProfile, module_calls: int = 0) -> float:
    """The launch floor applied to `kernels_s` (the module docstring: max on a GPU, sum on a
    CPU), with the host's `module_calls` module calls in it."""
    floor = launches * profile.launch_s + module_calls * profile.module_call_s
    return max(kernels_s, floor) if profile.kind == "gpu" else kernels_s + floor


def layer_time_source(layer: Layer, profile: DeviceProfile, training: bool) -> str:
    """How sure `layer_time` is of `layer` on `profile`: one of `TIME_SOURCES`.

    ``measured``: timed on this profile (forward, and backward when training);
    ``calibrated``: the roofline on figures measured on the device (`partitioner profile`);
    ``roofline``: the roofline on datasheet figures only.
    """
    timed = profile.name in layer.fwd_time_s and (not training or profile.name in layer.bwd_time_s)
    if timed:
        return "measured"
    return "calibrated" if profile.calibrated else "roofline"


def _state_bytes(layer: Layer, options: PlanOptions) -> int:
    """Bytes that do not shrink with the batch: weights, buffers, and when training grads and optimizer state."""
    if not options.training:
        return layer.param_bytes + layer.buffer_bytes
    return layer.param_bytes * (2 + options.optimizer.state_factor) + layer.buffer_bytes


def _activation_bytes(layer: Layer, options: PlanOptions) -> int:
    """Activations that stay live as long as the layer's device runs the step (training only)."""
    return layer.saved_bytes if options.training else 0


def working_set_bytes(graph: LayerGraph, options: PlanOptions) -> int:
    """Room every device keeps for transient activations: the largest layer's outputs at
    inference (0 when training, where `layer_memory` counts every saved activation)."""
    if options.training:
        return 0
    return max((layer.output_bytes for layer in graph.layers), default=0)


def layer_memory(layer: Layer, options: PlanOptions) -> int:
    """Bytes `layer` needs on its device for the whole step (the model is in the module docstring).

    With Adam (state_factor 2), training needs 4x the parameter bytes: weights, grads and
    two moments.
    """
    return _state_bytes(layer, options) + _activation_bytes(layer, options)


def _forward_bytes(layer: Layer, batch_fraction: float) -> float:
    """Forward memory traffic when the layer sees `batch_fraction` of the batch.

    Reading the parameters and buffers does not shrink with the batch; the rest of
    `traffic_bytes` (activations) does. The parameter and buffer bytes its lookups leave
    unread (`Layer.unread_bytes`) are not moved.
    """
    traffic = layer.traffic_bytes - layer.unread_bytes
    fixed = min(traffic, max(0, layer.param_bytes + layer.buffer_bytes - layer.unread_bytes))
    return fixed + (traffic - fixed) * batch_fraction


def _estimate(layer: Layer, profile: DeviceProfile, dtype: str, batch_fraction: float) -> tuple[float, float]:
    """Roofline (forward, backward) seconds at `batch_fraction` of the batch, launch floor included.

    Backward does `bwd_flops / fwd_flops` times each forward matmul's work at the same sizes
    (the input and weight gradients of a matmul are matmuls of its size), moves
    `BACKWARD_TRAFFIC_FACTOR` times the forward's bytes and launches `Layer.bwd_kernels`.
    """
    bandwidth = profile.memory_bandwidth_Bps * profile.memory_efficiency
    fwd_bytes = _forward_bytes(layer, batch_fraction)
    # Activations: they shrink with the batch. A lookup counts no FLOPs, so its table's bytes
    # are element-wise: the unread ones move in the backward only, as a trained table's
    # gradient (the rest of the table's gradient: its read rows, with the forward's bytes).
    elementwise = min(max(0, layer.elementwise_bytes - layer.unread_bytes) * batch_fraction, fwd_bytes)
    matmul_bytes = fwd_bytes - elementwise
    fwd_compute = _matmul_s(layer, profile, dtype, batch_fraction)
    if layer.fwd_flops > 0:
        bwd_compute = fwd_compute * layer.bwd_flops / layer.fwd_flops
    else:
        bwd_compute = layer.bwd_flops * batch_fraction / (profile.peak_flops_for(dtype) * profile.compute_efficiency)
    elementwise_fwd, elementwise_bwd = _elementwise_s(layer, profile, elementwise, batch_fraction)
    fwd = max(fwd_compute, matmul_bytes / bandwidth) + elementwise_fwd
    bwd = (max(bwd_compute, BACKWARD_TRAFFIC_FACTOR * matmul_bytes / bandwidth)
           + elementwise_bwd + layer.table_grad_bytes / bandwidth)
    return (_device_s(fwd, layer.fwd_kernels, profile, layer.module_calls),
            _device_s(bwd, layer.bwd_kernels, profile))


def layer_fwd_bwd_time(
    layer: Layer, profile: DeviceProfile, dtype: str = "float32", batch_fraction: float = 1.0
) -> tuple[float, float]:
    """(forward, backward) seconds of `layer` on a device of `profile` at `batch_fraction` of the batch.

    A time measured for this profile (``layer.fwd_time_s[profile.name]``,
    ``bwd_time_s``) is preferred to the roofline estimate, each direction separately.
    At a fraction of the batch a measured time is scaled by the roofline's ratio between
    that fraction and the whole batch (by the fraction itself when the layer has no FLOPs
    or bytes to estimate with). Fractions above 1 (a larger batch) scale the same way.
    """
    full = _estimate(layer, profile, dtype, 1.0)
    part = full if batch_fraction == 1.0 else _estimate(layer, profile, dtype, batch_fraction)

    def pick(measured: dict[str, float], estimate_full: float, estimate_part: float) -> float:
        seconds = measured.get(profile.name)
        if seconds is None:
            return estimate_part
        if estimate_full > 0:
            return seconds * estimate_part / estimate_full
        return seconds * batch_fraction

    return pick(layer.fwd_time_s, full[0], part[0]), pick(layer.bwd_time_s, full[1], part[1])


def layer_time(
    layer: Layer, profile: DeviceProfile, options: PlanOptions, dtype: str = "float32", batch_fraction: float = 1.0
) -> float:
    """Seconds of one step of `layer` on a device of `profile` (forward, plus backward when training).

    Each direction is `layer_fwd_bwd_time`'s: measured if timed on this profile, else the
    roofline, scaled to `batch_fraction` of the batch (data parallelism).
    """
    fwd, bwd = layer_fwd_bwd_time(layer, profile, dtype, batch_fraction)
    return fwd + bwd if options.training else fwd


def ring_allreduce_s(nbytes: float, hops: Sequence[tuple[float, float]]) -> float:
    """Seconds of a ring all-reduce of `nbytes` bytes over ``k = len(hops)`` devices.

    ``2 (k-1)/k x bytes x max hop (s/B) + 2 (k-1) x max hop latency``: a reduce-scatter
    then an all-gather, each ``k - 1`` steps of ``bytes / k`` along the ring, paced by its
    slowest hop (Patarasuk and Yuan 2009, "Bandwidth optimal all-reduce algorithms for
    clusters of workstations"). `hops` holds (seconds per byte, latency) of each hop
    ``j -> j + 1 (mod k)``; 0 for one device.
    """
    k = len(hops)
    if k < 2:
        return 0.0
    return 2 * (k - 1) / k * nbytes * max(h[0] for h in hops) + 2 * (k - 1) * max(h[1] for h in hops)


def split_sizes(batch_size: int, k: int) -> tuple[int, ...]:
    """Samples per replica when `batch_size` is split as evenly as integers allow, as
    `torch.tensor_split` splits it (the first ``batch_size % k`` take one more)."""
    return tuple(batch_size // k + (1 if j < batch_size % k else 0) for j in range(k))


Links = Sequence[Sequence[tuple[float, float]]]
"""``links[a][b]``: (seconds per byte, latency) from device ``a`` to device ``b``."""


def device_links(devices: Sequence[Device]) -> list[list[tuple[float, float]]]:
    """Every pair's `link_cost`: the links of devices in one node, from their profiles."""
    return [[link_cost(a, b) for b in devices] for a in devices]


def replica_cost(
    graph: LayerGraph,
    devices: Sequence[Device],
    options: PlanOptions,
    dtype: str = "float32",
    links: Links | None = None,
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
    the order given. `links` (default `device_links`) prices every move. Memory per device: the state of the whole model plus the
    activations of its share of the batch.

    Returns:
        None when there are fewer than two devices or fewer samples than devices.
    """
    k = len(devices)
    if k < 2 or graph.batch_size < k:
        return None
    shares = split_sizes(graph.batch_size, k)
    fractions = [s / graph.batch_size for s in shares]
    replica_s: dict[tuple[DeviceProfile, float], float] = {}  # identical devices are costed once
    for d, f in zip(devices, fractions, strict=True):
        if (d.profile, f) not in replica_s:
            replica_s[d.profile, f] = sum(layer_time(layer, d.profile, options, dtype, f) for layer in graph.layers)
    compute = max(replica_s.values())
    links = device_links(devices) if links is None else links
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
        allreduce = ring_allreduce_s(param_bytes, [links[j][(j + 1) % k] for j in range(k)])
    state = sum(_state_bytes(layer, options) for layer in graph.layers)
    activations = sum(_activation_bytes(layer, options) for layer in graph.layers)
    working = working_set_bytes(graph, options)
    memory = tuple(state + math.ceil((activations + working) * f) for f in fractions)
    return ReplicaCost(time_s=compute + scatter + allreduce, memory=memory)


def build_problem(
    graph: LayerGraph,
    devices: Sequence[Device],
    options: PlanOptions,
    dtype: str = "float32",
    links: Links | None = None,
) -> Problem:
    """The solver's tables for placing `graph`'s layers on `devices`.

    - ``compute_s[i][d]``: `layer_time` (measured if timed on the device's profile, else
      roofline); forward only for inference.
    - ``memory[i]``: `layer_memory`; ``capacity[d] = memory_bytes x (1 - memory_reserve)``,
      less `working_set_bytes` at inference.
    - links: `links` when given (a multi-node cluster's, `partitioner.cluster.Cluster`),
      else `partitioner.devices.link_cost` of each pair. When training, every value that
      crosses devices forward has its gradient cross back, so per-byte and latency costs
      double.
    - with ``options.allow_data_parallel``: ``replica``, `replica_cost` over every device;
      ``data_parallel``, `data_parallel_costs` over some of them; and at inference
      ``batch_shares``, `batch_shares` (copies of a placement on groups of alike devices).

    Args:
        graph: The layers and the values between them.
        devices: Placement targets, in plan order.
        options: Training or inference, optimizer, memory reserve, objective.
        dtype: Compute dtype for the roofline: one of ``float32``, ``tf32``,
            ``bfloat16``, ``float16``.
        links: ``links[a][b]``, (seconds per byte, latency) from device ``a`` to ``b``;
            None: `device_links`.

    Raises:
        DeviceError: No devices, or `links` not one row and column per device.
        ValueError: Unknown dtype.
    """
    if not devices:
        raise DeviceError("build_problem needs at least one device (got none)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    compute = tuple(tuple(layer_time(layer, d.profile, options, dtype) for d in devices) for layer in graph.layers)
    direction_factor = 2.0 if options.training else 1.0
    if links is None:
        links = device_links(devices)
    elif len(links) != len(devices) or any(len(row) != len(devices) for row in links):
        raise DeviceError(f"links must be {len(devices)} x {len(devices)} (one per pair of devices)")
    return Problem(
        compute_s=compute,
        memory=tuple(layer_memory(layer, options) for layer in graph.layers),
        capacity=tuple(
            max(0, int(d.memory_bytes * (1 - options.memory_reserve)) - working_set_bytes(graph, options))
            for d in devices
        ),
        values=graph.values,
        seconds_per_byte=tuple(tuple(direction_factor * c[0] for c in row) for row in links),
        latency_s=tuple(tuple(direction_factor * c[1] for c in row) for row in links),
        objective=options.objective,
        names=tuple(layer.name for layer in graph.layers),
        device_names=tuple(d.name for d in devices),
        replica=replica_cost(graph, devices, options, dtype, links) if options.allow_data_parallel else None,
        data_parallel=data_parallel_costs(graph, devices, options, dtype, links) if options.allow_data_parallel else (),
        batch_shares=(
            batch_shares(graph, devices, options, dtype) if options.allow_data_parallel and not options.training else ()
        ),
    )


def _replica_fits(graph: LayerGraph, device: Device, options: PlanOptions, samples: int) -> bool:
    """Whether a replica of `samples` samples fits `device`, as the solver checks it: `replica_cost`'s
    memory against `build_problem`'s capacity."""
    f = samples / graph.batch_size
    state = sum(_state_bytes(layer, options) for layer in graph.layers)
    working = working_set_bytes(graph, options)
    activations = sum(_activation_bytes(layer, options) for layer in graph.layers) + working
    return state + math.ceil(activations * f) <= max(0, int(device.memory_bytes * (1 - options.memory_reserve)) - working)


def data_parallel_costs(
    graph: LayerGraph,
    devices: Sequence[Device],
    options: PlanOptions,
    dtype: str = "float32",
    links: Links | None = None,
) -> tuple[ReplicaCost, ...]:
    """Data parallelism over some of `devices`: `replica_cost` of each subset weighed.

    For each replica count ``k = 2 .. min(devices, batch)``, two subsets: the first ``k``
    devices (so that a device added at the end of the list never takes a choice away), and
    the ``k`` devices the whole model runs fastest on among those it fits (ties in list
    order). Subsets of every device are left to `replica_cost` (`Problem.replica`).

    Returns:
        One `ReplicaCost` per distinct subset, its ``memory`` 0 on the devices it leaves idle.
    """
    n = len(devices)
    links = device_links(devices) if links is None else links
    whole: dict[DeviceProfile, float] = {}
    for d in devices:
        if d.profile not in whole:
            whole[d.profile] = sum(layer_time(layer, d.profile, options, dtype) for layer in graph.layers)
    out: dict[tuple[int, ...], ReplicaCost] = {}
    for k in range(2, min(n - 1, graph.batch_size) + 1):
        samples = split_sizes(graph.batch_size, k)[0]
        fitting = [j for j in range(n) if _replica_fits(graph, devices[j], options, samples)]
        fastest = sorted(fitting, key=lambda j: (whole[devices[j].profile], j))[:k]
        for subset in (tuple(range(k)), tuple(sorted(fastest))):
            if len(subset) != k or subset in out:
                continue
            sub_links = [[links[a][b] for b in subset] for a in subset]
            cost = replica_cost(graph, [devices[j] for j in subset], options, dtype, sub_links)
            if cost is None:
                continue
            memory = [0] * n
            for j, need in zip(subset, cost.memory):
                memory[j] = need
            out[subset] = ReplicaCost(time_s=cost.time_s, memory=tuple(memory), devices=subset)
    return tuple(out.values())


def batch_shares(
    graph: LayerGraph, devices: Sequence[Device], options: PlanOptions, dtype: str = "float32"
) -> tuple[BatchShare, ...]:
    """The tables of one copy of a placement when the batch is split ``r`` ways, for each ``r``
    from 2 up to the batch and the most devices of one profile (each copy needs a device of
    some profile). Priced as `build_problem` prices the whole batch, at ``ceil(batch / r)``
    samples: layer times at that fraction, the working set and the values that scale with
    the batch (`Value.batched`) at that fraction of their bytes."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.profile.name] = counts.get(d.profile.name, 0) + 1
    most = min(graph.batch_size, max(counts.values(), default=0))
    working = working_set_bytes(graph, options)
    memory = tuple(layer_memory(layer, options) for layer in graph.layers)
    out = []
    for r in range(2, most + 1):
        samples = split_sizes(graph.batch_size, r)[0]
        f = samples / graph.batch_size
        columns: dict[DeviceProfile, tuple[float, ...]] = {}
        for d in devices:
            if d.profile not in columns:
                columns[d.profile] = tuple(layer_time(layer, d.profile, options, dtype, f) for layer in graph.layers)
        out.append(
            BatchShare(
                replicas=r,
                samples=samples,
                compute_s=tuple(zip(*(columns[d.profile] for d in devices))),
                memory=memory,
                capacity=tuple(
                    max(0, int(d.memory_bytes * (1 - options.memory_reserve)) - math.ceil(working * f)) for d in devices
                ),
                value_bytes=tuple(math.ceil(v.bytes * f) if v.batched else v.bytes for v in graph.values),
            )
        )
    return tuple(out)
