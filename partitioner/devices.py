"""Devices: the typed figures of a device (`DeviceProfile`), placement targets (`Device`), link cost.

A profile holds the few figures the cost model's roofline needs (peak FLOP/s per dtype,
memory bandwidth, links); ``profiles/README.md`` documents the schema and every figure's
source. A `Device` is one placement target of a plan: present hardware (``cuda:0``, the
host ``cpu``), a logical CPU device for dry runs (``cpu:1``), or a profile that is only
estimated (``a100-80gb:3``). A `DeviceProfile` checks its figures when constructed.

The neighbours: `partitioner.profile_files` reads and writes profile files,
`partitioner.device_detection` asks torch which hardware is present, and
`partitioner.device_resolution` turns device strings into `Device` objects. Their public
names are importable from here too, as they always were.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from partitioner.errors import DeviceError, ProfileError
from partitioner.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from partitioner.device_detection import match_cuda_profile, system_memory_bytes
    from partitioner.device_resolution import MaxMemory, resolve_devices
    from partitioner.profile_files import (
        PROFILE_PATH_ENV,
        available_profiles,
        load_profile,
        profile_from_dict,
        profile_search_path,
        profile_to_json,
    )

__all__ = [
    "DTYPES",
    "PROFILE_NAME_RE",
    "MAX_MEMORY_BYTES",
    "MAX_BANDWIDTH_BPS",
    "MIN_BANDWIDTH_BPS",
    "MAX_LATENCY_S",
    "PeakFlops",
    "Link",
    "DeviceProfile",
    "OP_KINDS",
    "Device",
    "FieldError",
    "InvalidProfileError",
    "check_link",
    "link_cost",
    # re-exported from their own modules (loaded on first use: they import this one)
    "PROFILE_PATH_ENV",
    "profile_search_path",
    "available_profiles",
    "load_profile",
    "profile_from_dict",
    "profile_to_json",
    "match_cuda_profile",
    "system_memory_bytes",
    "MaxMemory",
    "resolve_devices",
    "parse_bytes",
    "format_bytes",
]

DTYPES = ("float32", "tf32", "bfloat16", "float16")
"""The dtypes a profile may give a peak for; `DeviceProfile.peak_flops_for` accepts these."""

PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a profile name (and a link's interface) may be: 1-64 of A-Z a-z 0-9 . _ -, starting alnum."""

# Upper bounds that no single device comes near (the largest figures in profiles/ are
# 141 GiB, 4.8 TB/s, 1e15 FLOP/s, 450 GB/s): a value past them is a typo in units.
MAX_MEMORY_BYTES = 2**50  # 1 PiB
"""Most memory a profile may give; a ``max_memory`` cap this large or larger reads as no limit."""
MAX_BANDWIDTH_BPS = 1e15  # 1 PB/s
_MAX_FLOPS = 1e18  # 1 EFLOP/s
MAX_LATENCY_S = 1.0
# Lower bounds as far below every real device (a 1990s PC moved 1 MB/s and did 1 MFLOP/s;
# no link or roofline reaches only 0.1% of its nominal rate). They also keep every
# seconds = amount / (rate x efficiency) finite: with 1e-200 x 1e-200 the product
# underflows to 0 and the division fails; a time of 1e300 s breaks the plan's JSON.
MIN_BANDWIDTH_BPS = 1e6  # 1 MB/s
_MIN_FLOPS = 1e6  # 1 MFLOP/s
_MIN_EFFICIENCY = 1e-3
# A kernel launch or op dispatch takes microseconds; 10 ms is a typo in units.
_MAX_LAUNCH_S = 1e-2
_MAX_GEMM_POINTS = 64

# Fixed cost of one tensor copy between two logical CPU devices (allocation plus the
# dispatcher's overhead of `Tensor.to`, a few microseconds).
_HOST_COPY_LATENCY_S = 5e-6

@dataclass(frozen=True, slots=True, kw_only=True)
class PeakFlops:
    """Dense (not sparsity) peak FLOP/s per dtype; None where the hardware has no such path."""

    float32: float
    """IEEE float32 on the vector units (what torch uses unless TF32 is allowed)."""
    tf32: float | None = None
    """float32 matmuls on TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``)."""
    bfloat16: float | None = None
    float16: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """One direction of a data path: time = bytes / (bandwidth_Bps * efficiency) + latency_s."""

    interface: str
    """``pcie``, ``nvlink``, or ``measured`` (calibrated, path unknown)."""
    generation: int | None
    """PCIe or NVLink generation, None when unknown."""
    bandwidth_Bps: float
    """Nominal bytes per second in one direction."""
    latency_s: float
    """Fixed cost of one transfer (launch and DMA set-up)."""
    efficiency: float
    """Achievable fraction of the nominal bandwidth (protocol overhead)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceProfile:
    """The roofline figures of one device type; validated on construction (raises ProfileError)."""

    name: str
    """Short name (``a100-80gb``); the key of measured layer times (`Layer.fwd_time_s`)."""
    description: str
    kind: Literal["cpu", "gpu"]
    memory_bytes: int
    """Memory capacity in bytes."""
    memory_bandwidth_Bps: float
    """Nominal device memory bandwidth, bytes per second."""
    peak_flops: PeakFlops
    compute_efficiency: float
    """Achievable fraction of `peak_flops` (roofline compute ceiling)."""
    memory_efficiency: float
    """Achievable fraction of `memory_bandwidth_Bps` (roofline memory ceiling)."""
    host_link: Link | None
    """GPU <-> host CPU (PCIe); None for a CPU."""
    peer_link: Link | None
    """GPU <-> GPU of the same profile (NVLink); None when GPUs talk through the host."""
    source: str
    """Where the figures come from (datasheet, measurement)."""
    launch_s: float = 0.0
    """Floor per kernel, seconds: launching one CUDA kernel from eager PyTorch (GPU), or
    dispatching one op (CPU). 0 (profiles without it): no floor."""
    module_call_s: float = 0.0
    """Host seconds one ``nn.Module`` call adds beyond its ops (``__call__``, hooks, Python):
    a forward pays it per module it calls; a backward (autograd's engine) does not. Adds to
    a CPU's compute, and to a GPU's launch stream (the host issues both). 0 (profiles
    without it): not priced."""
    gemm_efficiency: tuple[tuple[float, float], ...] = ()
    """(FLOPs of one matmul, achieved fraction of `peak_flops`) points, FLOPs increasing:
    small matmuls run far below peak. Interpolated linearly in log(FLOPs), held at the end
    points. Empty: every matmul at `compute_efficiency`."""
    gemm_narrow: tuple[tuple[str, float, float], ...] = ()
    """(axis ``m``, ``n`` or ``k``, its size, achieved fraction of `peak_flops`) points: a
    matmul ``(m x k) @ (k x n)`` with one narrow side runs below what its FLOPs alone give
    (a 10-class head, a 3-channel first convolution). Per axis, sizes increasing,
    interpolated linearly in log(size), held at the end points; a matmul runs at the least
    of its sides' values and its FLOPs' `gemm_efficiency`. Empty: no such limit."""
    memory_curve: tuple[tuple[float, float], ...] = ()
    """(bytes one memory-bound op reads and writes, achieved fraction of
    `memory_bandwidth_Bps`) points, bytes increasing: an element-wise op's time by its size.
    Above 1 where it runs from caches, far below where each call maps fresh pages (a CPU
    allocator returns large blocks to the system). Interpolated linearly in log(bytes), held
    at the end points; it replaces `memory_efficiency` for such ops. Empty: every
    element-wise op at `memory_efficiency`."""
    conv_efficiency: tuple[tuple[float, float], ...] = ()
    """(FLOPs of one convolution, achieved fraction of `peak_flops`) points, FLOPs increasing,
    as `gemm_efficiency` for matmuls: a convolution runs its own kernels (direct, Winograd,
    implicit GEMM), often far below a matmul of its FLOPs (few channels vectorise poorly).
    Empty: convolutions are priced as matmuls of their FLOPs."""
    attention_efficiency: tuple[tuple[float, float], ...] = ()
    """(FLOPs of one attention per sample and head, ``4 x query length x key length x head
    size``; achieved fraction of `peak_flops`) points, FLOPs increasing, as
    `gemm_efficiency`: ``scaled_dot_product_attention``'s kernels (flash, memory-efficient;
    a CPU's) run their two matmuls in tiles with a softmax between, far below a matmul of
    their FLOPs at short sequences, and a head's sizes, not the batch, set that. Empty:
    attention is priced as matmuls of its FLOPs."""
    causal_attention_efficiency: tuple[tuple[float, float], ...] = ()
    """The same for causal attention (``is_causal``), its FLOPs counted as torch counts them
    (whole, though a kernel skips the masked half): up to 2 at long sequences. Empty: causal
    attention is priced as `attention_efficiency` says."""
    op_rates: tuple[tuple[str, float, float], ...] = ()
    """(op kind, forward bytes per second, backward bytes per second) triples, kinds of
    `OP_KINDS` in that order: the sustained rates of an op of that kind, measured, by the
    bytes its forward reads and writes. Its forward takes the longer of its `memory_curve`
    price and its bytes at the forward rate, its backward the longer of twice that price and
    its bytes at the backward rate: a batch norm that computes batch statistics reads its
    input twice and reduces per channel, a CPU's max pooling compares element by element
    (its backward only scatters), a CPU's ``tanh`` runs at a twentieth of a copy's rate, and
    none runs faster from caches. A kind missing: priced on the curve alone."""
    calibrated: bool = False
    """Whether the figures were measured on the device (`partitioner profile`), not read
    from a datasheet: the report says how sure its times are by it."""

    def __post_init__(self) -> None:
        try:
            _validate_profile(self)
        except FieldError as e:
            raise InvalidProfileError(f"profile {self.name!r}: {e.detail}", e.detail) from None

    def peak_flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`, falling back to float32 where the hardware has no faster path.

        The fallback is what torch does: float32 matmuls without TF32 tensor cores run on
        the vector units, and bfloat16 on a V100 (no bf16 tensor cores) runs at best at the
        float32 rate.

        Raises:
            ValueError: `dtype` is not one of `DTYPES`.
        """
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        value = getattr(self.peak_flops, dtype)
        return float(self.peak_flops.float32 if value is None else value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One placement target of a plan."""

    name: str
    """As the plan shows it: ``cpu``, ``cpu:1``, ``cuda:0``, ``a100-80gb`` or ``a100-80gb:2``."""
    torch_device: str | None
    """Device string for torch, or None when the device is absent and only estimated."""
    profile: DeviceProfile
    present: bool
    """Whether the hardware is here (``cpu``, ``cpu:N`` and visible ``cuda:N``)."""
    memory_bytes: int
    """Capacity in bytes: the profile's, or the present hardware's, or the user's max_memory."""

    def __post_init__(self) -> None:
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise DeviceError(f"device {self.name!r}: memory_bytes must be > 0 (got {self.memory_bytes})")

    @property
    def kind(self) -> str:
        """``cpu`` or ``gpu``."""
        return self.profile.kind

    def __str__(self) -> str:
        where = self.torch_device if self.present else "estimated"
        return f"{self.name} ({self.profile.name}, {where}, {format_bytes(self.memory_bytes)})"


# --------------------------------------------------------------------------- validation


class FieldError(Exception):
    """A schema violation at one key: `detail` reads ``key 'k' must be ... (got v)``.

    The checks raise it without knowing where the figures came from; the caller adds that
    (`DeviceProfile` its name, `profile_from_dict` and the cluster loader their file).
    """

    def __init__(self, key: str, problem: str, value: object) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        self.detail = f"key {key!r} {problem} (got {shown})"
        super().__init__(self.detail)


class InvalidProfileError(ProfileError):
    """The ProfileError `DeviceProfile` raises; `detail` is the message without the profile's
    name, so that a loader can name its file instead."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _check_number(key: str, value: object, upper: float, lower: float = 0.0) -> None:
    """`value` must be a finite number in (0, upper], or in [lower, upper] when lower > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(key, "must be a number", value)
    try:
        in_range = math.isfinite(value) and (lower <= value if lower > 0 else 0 < value) and value <= upper
    except OverflowError:  # an int past float's range
        in_range = False
    if not in_range:
        interval = f"[{lower:g}, {upper:g}]" if lower > 0 else f"(0, {upper:g}]"
        raise FieldError(key, f"must be finite and in {interval}", value)


def _check_int(key: str, value: object, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(key, "must be an integer", value)
    _check_number(key, value, upper)


def check_link(key: str, link: object) -> None:
    """Check one `Link`'s figures against the profile schema's bounds.

    Args:
        key: The link's key path, named in the error (``host_link``, ``nodes[0].links[1]``).
        link: What should be a `Link`.

    Raises:
        FieldError: Not a `Link`, or a field of the wrong type or out of range.
    """
    if not isinstance(link, Link):
        raise FieldError(key, "must be a Link or null", link)
    if not isinstance(link.interface, str) or not PROFILE_NAME_RE.fullmatch(link.interface):
        raise FieldError(f"{key}.interface", "must be a short name such as 'pcie' or 'nvlink'", link.interface)
    if link.generation is not None:
        _check_int(f"{key}.generation", link.generation, 32)
    _check_number(f"{key}.bandwidth_Bps", link.bandwidth_Bps, MAX_BANDWIDTH_BPS, MIN_BANDWIDTH_BPS)
    _check_number(f"{key}.latency_s", link.latency_s, MAX_LATENCY_S)
    _check_number(f"{key}.efficiency", link.efficiency, 1.0, _MIN_EFFICIENCY)


def _validate_profile(p: DeviceProfile) -> None:
    for key in ("name", "description", "source"):
        value = getattr(p, key)
        if not isinstance(value, str) or not value.strip():
            raise FieldError(key, "must be a non-empty string", value)
    if not PROFILE_NAME_RE.fullmatch(p.name):
        raise FieldError("name", "must be 1-64 letters, digits, '.', '_' or '-', starting alnum", p.name)
    if p.kind not in ("cpu", "gpu"):
        raise FieldError("kind", "must be 'cpu' or 'gpu'", p.kind)
    _check_int("memory_bytes", p.memory_bytes, MAX_MEMORY_BYTES)
    _check_number("memory_bandwidth_Bps", p.memory_bandwidth_Bps, MAX_BANDWIDTH_BPS, MIN_BANDWIDTH_BPS)
    if not isinstance(p.peak_flops, PeakFlops):
        raise FieldError("peak_flops", "must be a PeakFlops", p.peak_flops)
    for dtype in DTYPES:
        value = getattr(p.peak_flops, dtype)
        if dtype == "float32" or value is not None:
            _check_number(f"peak_flops.{dtype}", value, _MAX_FLOPS, _MIN_FLOPS)
    _check_number("compute_efficiency", p.compute_efficiency, 1.0, _MIN_EFFICIENCY)
    _check_number("memory_efficiency", p.memory_efficiency, 1.0, _MIN_EFFICIENCY)
    for key in ("host_link", "peer_link"):
        link = getattr(p, key)
        if link is not None:
            check_link(key, link)
        if p.kind == "cpu" and link is not None:
            raise FieldError(key, "must be null for a CPU (it is the host)", link)
    if p.kind == "gpu" and p.host_link is None:
        raise FieldError("host_link", "is needed for a GPU (how it reaches the CPU)", None)
    if isinstance(p.launch_s, bool) or not isinstance(p.launch_s, (int, float)):
        raise FieldError("launch_s", "must be a number", p.launch_s)
    if not (math.isfinite(p.launch_s) and 0 <= p.launch_s <= _MAX_LAUNCH_S):
        raise FieldError("launch_s", f"must be finite and in [0, {_MAX_LAUNCH_S:g}]", p.launch_s)
    if isinstance(p.module_call_s, bool) or not isinstance(p.module_call_s, (int, float)):
        raise FieldError("module_call_s", "must be a number", p.module_call_s)
    if not (math.isfinite(p.module_call_s) and 0 <= p.module_call_s <= _MAX_LAUNCH_S):
        raise FieldError("module_call_s", f"must be finite and in [0, {_MAX_LAUNCH_S:g}]", p.module_call_s)
    _check_gemm_curve(p.gemm_efficiency)
    _check_narrow_curves(p.gemm_narrow)
    _check_memory_curve(p.memory_curve)
    _check_curve("conv_efficiency", p.conv_efficiency, ("flops", "efficiency"), _MAX_FLOPS, 1.0)
    _check_curve("attention_efficiency", p.attention_efficiency, ("flops", "efficiency"), _MAX_FLOPS, 1.0)
    _check_curve("causal_attention_efficiency", p.causal_attention_efficiency, ("flops", "efficiency"), _MAX_FLOPS, 2.0)
    _check_op_rates(p.op_rates)
    if not isinstance(p.calibrated, bool):
        raise FieldError("calibrated", "must be true or false", p.calibrated)


def _check_gemm_curve(points: object) -> None:
    """`points` must be at most 64 (FLOPs, efficiency) pairs, FLOPs strictly increasing."""
    _check_curve("gemm_efficiency", points, ("flops", "efficiency"), _MAX_FLOPS, 1.0)


_MAX_MEMORY_FRACTION = 100.0
_MAX_PASS_BYTES = 1e15


def _check_memory_curve(points: object) -> None:
    """`points` must be at most 64 (bytes, fraction) pairs, bytes strictly increasing."""
    _check_curve("memory_curve", points, ("bytes", "fraction"), _MAX_PASS_BYTES, _MAX_MEMORY_FRACTION)


OP_KINDS = ("batch_norm", "norm", "max_pool", "avg_pool",
            "tanh", "exp", "sigmoid", "silu", "gelu", "gelu_tanh", "softmax", "log_softmax")
"""Kinds of ops without FLOPs a profile may price apart (`DeviceProfile.op_rates`):
``batch_norm`` (a batch norm computing batch statistics: training mode), ``norm`` (layer,
group and RMS norms), ``max_pool`` and ``avg_pool`` (pooling windows); then the
transcendental functions of activations and attention, each its ATen op: ``tanh``,
``exp``, ``sigmoid``, ``silu``, ``gelu`` (the erf form), ``gelu_tanh`` (``approximate="tanh"``),
``softmax`` and ``log_softmax``. A CPU computes these element by element in polynomial
approximations, 5-20x slower than a copy of their bytes (a GPU keeps up with its memory).
New kinds go at the end: a layer stores its nodes' kinds by position (`Layer.passes`)."""


def _check_op_rates(triples: object) -> None:
    """`triples` must be (kind, forward rate, backward rate) triples, kinds of `OP_KINDS` in its
    order, each at most once, rates within the bandwidth bounds."""
    if not isinstance(triples, tuple):
        raise FieldError("op_rates", f"must map op kinds ({', '.join(OP_KINDS)}) to bytes per second", triples)
    kinds = [t[0] if isinstance(t, tuple) and t else t for t in triples]
    if kinds != [k for k in OP_KINDS if k in kinds]:
        raise FieldError("op_rates", f"must name each of {', '.join(OP_KINDS)} at most once, in that order", kinds)
    for i, triple in enumerate(triples):
        if len(triple) != 3:
            raise FieldError(f"op_rates[{i}]", "must be [kind, forward bytes/s, backward bytes/s]", triple)
        for j, way in ((1, "forward"), (2, "backward")):
            _check_number(f"op_rates.{triple[0]}.{way}", triple[j], MAX_BANDWIDTH_BPS, MIN_BANDWIDTH_BPS)


def _check_curve(key: str, points: object, names: tuple[str, str], x_max: float, y_max: float) -> None:
    """`points` must be at most 64 (x in [1, x_max], y in [0.001, y_max]) pairs, x strictly increasing."""
    if not isinstance(points, tuple) or len(points) > _MAX_GEMM_POINTS:
        problem = f"must be a list of at most {_MAX_GEMM_POINTS} [{names[0]}, {names[1]}] pairs"
        raise FieldError(key, problem, points)
    previous = 0.0
    for i, point in enumerate(points):
        where = f"{key}[{i}]"
        if not isinstance(point, tuple) or len(point) != 2:
            raise FieldError(where, f"must be a pair [{names[0]}, {names[1]}]", point)
        _check_number(f"{where}[0]", point[0], x_max, 1.0)
        _check_number(f"{where}[1]", point[1], y_max, _MIN_EFFICIENCY)
        if point[0] <= previous:
            unit = "FLOPs" if names[0] == "flops" else names[0]
            raise FieldError(f"{where}[0]", f"must be larger than the point before ({previous:g} {unit})", point[0])
        previous = point[0]


GEMM_AXES = ("m", "n", "k")
"""The sides of a matmul ``(m x k) @ (k x n)`` (`DeviceProfile.gemm_narrow`)."""
_MAX_SIDE = 1e9


def _check_narrow_curves(points: object) -> None:
    """`points` must be at most 64 (axis, size, efficiency) triples, sizes increasing per axis."""
    if not isinstance(points, tuple) or len(points) > _MAX_GEMM_POINTS:
        problem = f"must be a list of at most {_MAX_GEMM_POINTS} [axis, size, efficiency] triples"
        raise FieldError("gemm_narrow", problem, points)
    previous: dict[str, float] = {}
    for i, point in enumerate(points):
        key = f"gemm_narrow[{i}]"
        if not isinstance(point, tuple) or len(point) != 3:
            raise FieldError(key, "must be a triple [axis, size, efficiency]", point)
        if point[0] not in GEMM_AXES:
            raise FieldError(f"{key}[0]", f"must be one of {', '.join(GEMM_AXES)}", point[0])
        _check_number(f"{key}[1]", point[1], _MAX_SIDE, 1.0)
        _check_number(f"{key}[2]", point[2], 1.0, _MIN_EFFICIENCY)
        if point[1] <= previous.get(point[0], 0.0):
            raise FieldError(f"{key}[1]", f"must be larger than the {point[0]} point before", point[1])
        previous[point[0]] = point[1]


# --------------------------------------------------------------------------- links


def link_cost(a: Device, b: Device) -> tuple[float, float]:
    """(seconds per byte, latency in seconds) of one transfer from `a` to `b`.

    - the same device: (0, 0);
    - two GPUs whose profiles (the same one) have a `peer_link`: NVLink;
    - a GPU and a CPU device: the GPU's host link (PCIe), one hop;
    - two GPUs without a peer link: two PCIe hops through host memory (the sum of both
      hops). This is the staged copy CUDA makes when peer-to-peer access is off, as on
      most cloud VMs; where PCIe P2P works it is faster, and a calibrated profile's
      measured `peer_link` then says so;
    - two logical CPU devices: a host memory copy, which reads and writes every byte:
      2 / (memory bandwidth x efficiency) seconds per byte.
    """
    if a.name == b.name:
        return 0.0, 0.0
    pa, pb = a.profile, b.profile
    if pa.kind == "cpu" and pb.kind == "cpu":
        bandwidth = min(p.memory_bandwidth_Bps * p.memory_efficiency for p in (pa, pb))
        return 2.0 / bandwidth, _HOST_COPY_LATENCY_S
    if pa.kind == "gpu" and pb.kind == "gpu":
        if pa.peer_link is not None and pb.peer_link is not None and pa.name == pb.name:
            return _link_seconds_per_byte(pa.peer_link), pa.peer_link.latency_s
        hops = [p.host_link for p in (pa, pb) if p.host_link is not None]
        return sum(_link_seconds_per_byte(h) for h in hops), sum(h.latency_s for h in hops)
    gpu = pa if pa.kind == "gpu" else pb
    assert gpu.host_link is not None  # DeviceProfile validation: a GPU has a host link
    return _link_seconds_per_byte(gpu.host_link), gpu.host_link.latency_s


def _link_seconds_per_byte(link: Link) -> float:
    return 1.0 / (link.bandwidth_Bps * link.efficiency)


# --------------------------------------------------------------------------- re-exports

# Names that moved to their own modules, importable from here as before (PEP 562). Those
# modules import this one for the types, so they load on first use, not at import.
_MOVED = {
    "PROFILE_PATH_ENV": "partitioner.profile_files",
    "profile_search_path": "partitioner.profile_files",
    "available_profiles": "partitioner.profile_files",
    "load_profile": "partitioner.profile_files",
    "profile_from_dict": "partitioner.profile_files",
    "profile_to_json": "partitioner.profile_files",
    "match_cuda_profile": "partitioner.device_detection",
    "system_memory_bytes": "partitioner.device_detection",
    "MaxMemory": "partitioner.device_resolution",
    "resolve_devices": "partitioner.device_resolution",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MOVED[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED})
