"""Devices: profiles (``profiles/*.json``) -> typed `DeviceProfile`, device strings -> `Device`.

A profile holds the few figures the cost model's roofline needs (peak FLOP/s per dtype,
memory bandwidth, links); ``profiles/README.md`` documents the schema and every figure's
source. A `Device` is one placement target of a plan: present hardware (``cuda:0``, the
host ``cpu``), a logical CPU device for dry runs (``cpu:1``), or a profile that is only
estimated (``a100-80gb:3``). torch is imported only inside the functions that must ask
it which hardware is present.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from partitioner.errors import DeviceError, ProfileError
from partitioner.files import FileTooLarge, NotRegularFile, read_capped
from partitioner.units import format_bytes

__all__ = [
    "PROFILE_PATH_ENV",
    "DTYPES",
    "PeakFlops",
    "Link",
    "DeviceProfile",
    "Device",
    "profile_search_path",
    "available_profiles",
    "load_profile",
    "profile_from_dict",
    "profile_to_json",
    "match_cuda_profile",
    "system_memory_bytes",
    "MaxMemory",
    "resolve_devices",
    "link_cost",
    "parse_bytes",
    "format_bytes",
]

PROFILE_PATH_ENV = "PARTITIONER_PROFILE_PATH"
"""Environment variable: directories searched for ``<name>.json`` before the built-in ones."""

DTYPES = ("float32", "tf32", "bfloat16", "float16")
"""The dtypes a profile may give a peak for; `DeviceProfile.peak_flops_for` accepts these."""

_BUILTIN_PROFILES = Path(__file__).resolve().parents[1] / "profiles"

# Upper bounds that no single device comes near (the largest figures in profiles/ are
# 141 GiB, 4.8 TB/s, 1e15 FLOP/s, 450 GB/s): a value past them is a typo in units.
_MAX_MEMORY_BYTES = 2**50  # 1 PiB
_MAX_BANDWIDTH_BPS = 1e15  # 1 PB/s
_MAX_FLOPS = 1e18  # 1 EFLOP/s
_MAX_LATENCY_S = 1.0
# Lower bounds as far below every real device (a 1990s PC moved 1 MB/s and did 1 MFLOP/s;
# no link or roofline reaches only 0.1% of its nominal rate). They also keep every
# seconds = amount / (rate x efficiency) finite: with 1e-200 x 1e-200 the product
# underflows to 0 and the division fails; a time of 1e300 s breaks the plan's JSON.
_MIN_BANDWIDTH_BPS = 1e6  # 1 MB/s
_MIN_FLOPS = 1e6  # 1 MFLOP/s
_MIN_EFFICIENCY = 1e-3
_MAX_PROFILE_FILE_BYTES = 1 << 20
_MAX_DEVICES = 1024
"""Most devices one device list may name (as many as a cluster profile may hold)."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

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

    def __post_init__(self) -> None:
        try:
            _validate_profile(self)
        except _FieldError as e:
            raise _InvalidProfile(f"profile {self.name!r}: {e.detail}", e.detail) from None

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


class _FieldError(Exception):
    """A schema violation; `profile_from_dict` and `DeviceProfile` add where it happened."""

    def __init__(self, key: str, problem: str, value: object) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        self.detail = f"key {key!r} {problem} (got {shown})"
        super().__init__(self.detail)


class _InvalidProfile(ProfileError):
    """Raised by `DeviceProfile`; carries the detail so that a loader can name its file instead."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _check_number(key: str, value: object, upper: float, lower: float = 0.0) -> None:
    """`value` must be a finite number in (0, upper], or in [lower, upper] when lower > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _FieldError(key, "must be a number", value)
    try:
        in_range = math.isfinite(value) and (lower <= value if lower > 0 else 0 < value) and value <= upper
    except OverflowError:  # an int past float's range
        in_range = False
    if not in_range:
        interval = f"[{lower:g}, {upper:g}]" if lower > 0 else f"(0, {upper:g}]"
        raise _FieldError(key, f"must be finite and in {interval}", value)


def _check_int(key: str, value: object, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError(key, "must be an integer", value)
    _check_number(key, value, upper)


def _check_link(key: str, link: object) -> None:
    if not isinstance(link, Link):
        raise _FieldError(key, "must be a Link or null", link)
    if not isinstance(link.interface, str) or not _NAME_RE.fullmatch(link.interface):
        raise _FieldError(f"{key}.interface", "must be a short name such as 'pcie' or 'nvlink'", link.interface)
    if link.generation is not None:
        _check_int(f"{key}.generation", link.generation, 32)
    _check_number(f"{key}.bandwidth_Bps", link.bandwidth_Bps, _MAX_BANDWIDTH_BPS, _MIN_BANDWIDTH_BPS)
    _check_number(f"{key}.latency_s", link.latency_s, _MAX_LATENCY_S)
    _check_number(f"{key}.efficiency", link.efficiency, 1.0, _MIN_EFFICIENCY)


def _validate_profile(p: DeviceProfile) -> None:
    for key in ("name", "description", "source"):
        value = getattr(p, key)
        if not isinstance(value, str) or not value.strip():
            raise _FieldError(key, "must be a non-empty string", value)
    if not _NAME_RE.fullmatch(p.name):
        raise _FieldError("name", "must be 1-64 letters, digits, '.', '_' or '-', starting alnum", p.name)
    if p.kind not in ("cpu", "gpu"):
        raise _FieldError("kind", "must be 'cpu' or 'gpu'", p.kind)
    _check_int("memory_bytes", p.memory_bytes, _MAX_MEMORY_BYTES)
    _check_number("memory_bandwidth_Bps", p.memory_bandwidth_Bps, _MAX_BANDWIDTH_BPS, _MIN_BANDWIDTH_BPS)
    if not isinstance(p.peak_flops, PeakFlops):
        raise _FieldError("peak_flops", "must be a PeakFlops", p.peak_flops)
    for dtype in DTYPES:
        value = getattr(p.peak_flops, dtype)
        if dtype == "float32" or value is not None:
            _check_number(f"peak_flops.{dtype}", value, _MAX_FLOPS, _MIN_FLOPS)
    _check_number("compute_efficiency", p.compute_efficiency, 1.0, _MIN_EFFICIENCY)
    _check_number("memory_efficiency", p.memory_efficiency, 1.0, _MIN_EFFICIENCY)
    for key in ("host_link", "peer_link"):
        link = getattr(p, key)
        if link is not None:
            _check_link(key, link)
        if p.kind == "cpu" and link is not None:
            raise _FieldError(key, "must be null for a CPU (it is the host)", link)
    if p.kind == "gpu" and p.host_link is None:
        raise _FieldError("host_link", "is needed for a GPU (how it reaches the CPU)", None)


def _object(where: str, key: str, value: object, required: set[str], optional: set[str]) -> dict[str, Any]:
    """Check that `value` is a JSON object with exactly the allowed keys."""
    if not isinstance(value, dict):
        what = f"key {key!r}" if key else "the document"
        raise ProfileError(f"{where}: {what} must be a JSON object (got {type(value).__name__})")
    prefix = f"{key}." if key else ""
    missing = sorted(required - value.keys())
    if missing:
        raise ProfileError(f"{where}: missing key {prefix + missing[0]!r} (required: {', '.join(sorted(required))})")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise ProfileError(f"{where}: unknown key {prefix + unknown[0]!r} (allowed: {allowed})")
    return value


_LINK_KEYS = {f.name for f in fields(Link)}
_PROFILE_KEYS = {f.name for f in fields(DeviceProfile)}


def profile_from_dict(data: object, where: str = "<profile>") -> DeviceProfile:
    """Build a `DeviceProfile` from parsed JSON, strictly (the schema is in profiles/README.md).

    Args:
        data: The parsed JSON document.
        where: What to name in error messages (usually the file path).

    Raises:
        ProfileError: Missing or unknown keys, wrong types, or numbers out of range;
            the message names `where`, the key and the problem.
    """
    top = _object(where, "", data, _PROFILE_KEYS, set())
    peaks = _object(where, "peak_flops", top["peak_flops"], {"float32"}, set(DTYPES) - {"float32"})
    links: dict[str, Link | None] = {}
    for key in ("host_link", "peer_link"):
        raw = top[key]
        if raw is None:
            links[key] = None
            continue
        link = _object(where, key, raw, _LINK_KEYS, set())
        links[key] = Link(**link)
    try:
        return DeviceProfile(
            name=top["name"],
            description=top["description"],
            kind=top["kind"],
            memory_bytes=top["memory_bytes"],
            memory_bandwidth_Bps=top["memory_bandwidth_Bps"],
            peak_flops=PeakFlops(**peaks),
            compute_efficiency=top["compute_efficiency"],
            memory_efficiency=top["memory_efficiency"],
            host_link=links["host_link"],
            peer_link=links["peer_link"],
            source=top["source"],
        )
    except _InvalidProfile as e:
        raise ProfileError(f"{where}: {e.detail}") from None


def _json_number(x: float | int) -> str:
    """The shortest text that parses back to exactly `x`, in e-notation when large or small."""
    if isinstance(x, int):
        return str(x)
    if x != 0 and not 1e-3 <= abs(x) < 1e6:
        for digits in range(17):
            text = f"{x:.{digits}e}"
            if float(text) == x:
                mantissa, exponent = text.split("e")
                return f"{mantissa}e{int(exponent)}"
    return repr(x)


def _to_json(value: object, indent: str = "") -> str:
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _json_number(value)
    return json.dumps(value)


def profile_to_json(profile: DeviceProfile) -> str:
    """The profile as the JSON text `load_profile` reads (numbers exact, readable e-notation)."""

    def link(lk: Link | None) -> dict[str, object] | None:
        return None if lk is None else {f.name: getattr(lk, f.name) for f in fields(Link)}

    peaks = {d: getattr(profile.peak_flops, d) for d in DTYPES if getattr(profile.peak_flops, d) is not None}
    data: dict[str, object] = {
        "name": profile.name,
        "description": profile.description,
        "kind": profile.kind,
        "memory_bytes": profile.memory_bytes,
        "memory_bandwidth_Bps": profile.memory_bandwidth_Bps,
        "peak_flops": peaks,
        "compute_efficiency": profile.compute_efficiency,
        "memory_efficiency": profile.memory_efficiency,
        "host_link": link(profile.host_link),
        "peer_link": link(profile.peer_link),
        "source": profile.source,
    }
    return _to_json(data) + "\n"


# --------------------------------------------------------------------------- loading


def profile_search_path() -> tuple[Path, ...]:
    """Directories searched for ``<name>.json``, first match wins.

    The directories in ``$PARTITIONER_PROFILE_PATH`` (``os.pathsep``-separated), then the
    repository's ``profiles/``. A measured profile named like a built-in one (``cpu``)
    therefore replaces it when its directory is on the path.
    """
    env = os.environ.get(PROFILE_PATH_ENV, "")
    return tuple(Path(p).expanduser() for p in env.split(os.pathsep) if p) + (_BUILTIN_PROFILES,)


def available_profiles() -> tuple[str, ...]:
    """Names of every profile on `profile_search_path`, sorted."""
    names: set[str] = set()
    for directory in profile_search_path():
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.json") if _NAME_RE.fullmatch(p.stem))
    return tuple(sorted(names))


def _find_profile(name: str) -> Path | None:
    if not _NAME_RE.fullmatch(name):
        return None
    for directory in profile_search_path():
        candidate = directory / f"{name}.json"
        if candidate.is_file():
            return candidate
    return None


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or "/" in text or os.sep in text or bool(os.altsep and os.altsep in text)


def _read_capped(path: Path, cap: int, what: str) -> str:
    """The UTF-8 text of `path`, a regular file of at most `cap` bytes.

    Only regular files (after following links): a FIFO would block until a writer comes,
    and ``/dev/zero`` or ``/dev/urandom`` never end. At most ``cap + 1`` bytes are read,
    whatever `stat` said, so a file that grows while read cannot exhaust memory.

    Raises:
        ProfileError: Not a regular file, larger than `cap`, unreadable, or not UTF-8.
    """
    where = str(path)
    try:
        data = read_capped(path, cap)
    except FileTooLarge:
        raise ProfileError(f"{where}: larger than {format_bytes(cap)}; a {what} is at most {format_bytes(cap)}") from None
    except NotRegularFile as e:
        raise ProfileError(f"{where}: {e}; a {what} is a JSON file") from None
    except OSError as e:
        raise ProfileError(f"{where}: cannot read {what}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_profile_file(path: Path) -> DeviceProfile:
    where = str(path)
    text = _read_capped(path, _MAX_PROFILE_FILE_BYTES, "device profile")

    def reject_constant(token: str) -> None:
        raise ProfileError(f"{where}: {token} is not a number a profile may hold")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        for k in keys:
            if keys.count(k) > 1:
                raise ProfileError(f"{where}: key {k!r} appears {keys.count(k)} times")
        return dict(pairs)

    try:
        data = json.loads(text, parse_constant=reject_constant, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{where}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ProfileError(f"{where}: JSON nested too deeply") from None
    return profile_from_dict(data, where)


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """Load and validate a device profile.

    Args:
        name_or_path: A profile name (``a100-80gb``), looked up as ``<name>.json`` on
            `profile_search_path`, or a path to a JSON file (a `PathLike`, or a string
            ending in ``.json`` or containing a path separator).

    Returns:
        The validated profile.

    Raises:
        ProfileError: The file is missing, is not JSON, or breaks the schema; or the file
            found for a name declares another name.
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name_or_path):
        return _read_profile_file(Path(name_or_path))
    path = _find_profile(name_or_path)
    if path is None:
        searched = ", ".join(str(d) for d in profile_search_path())
        raise ProfileError(
            f"no device profile named {name_or_path!r} (searched {searched}); "
            f"available: {', '.join(available_profiles()) or 'none'}"
        )
    profile = _read_profile_file(path)
    if profile.name != name_or_path:
        raise ProfileError(f"{path}: key 'name' is {profile.name!r} but the file is {path.name}; make them agree")
    return profile


# --------------------------------------------------------------------------- present hardware


class _CudaProperties(Protocol):
    """What `torch.cuda.get_device_properties` returns (only the fields used here)."""

    name: str
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int


# torch.cuda.get_device_name -> profile. Only the SXM parts the profiles describe: a PCIe
# card of the same chip has other clocks, bandwidth and no NVLink, so it gets a derived
# profile instead. Names seen: "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
# "Tesla V100-SXM2-32GB", "NVIDIA L4", "NVIDIA H200".
_CUDA_NAME_PROFILES = (
    (re.compile(r"\bH200\b(?!.*NVL)"), "h200"),
    (re.compile(r"\bH100\b(?!.*(PCIe|NVL))", re.IGNORECASE), "h100-80gb"),
    (re.compile(r"A100-SXM\d?-80GB"), "a100-80gb"),
    (re.compile(r"A100-SXM\d?-40GB"), "a100-40gb"),
    (re.compile(r"V100-SXM2-32GB"), "v100"),
    (re.compile(r"\bL4\b"), "l4"),
)

# Per streaming multiprocessor and clock, by compute capability (major, minor): float32
# FLOPs (2 x CUDA cores) and dense float16 tensor-core FLOPs. From NVIDIA's architecture
# whitepapers (Volta, Turing, Ampere GA100/GA102, Ada, Hopper, Blackwell); e.g. A100:
# 108 SMs x 2048 x 1.41 GHz = 312 TFLOP/s.
_SM_FLOPS_PER_CLOCK = {
    (7, 0): (128, 1024),
    (7, 5): (128, 1024),
    (8, 0): (128, 2048),
    (8, 6): (256, 1024),
    (8, 9): (256, 1024),
    (9, 0): (256, 4096),
    (10, 0): (256, 8192),
}


def match_cuda_profile(props: _CudaProperties) -> DeviceProfile:
    """The profile of a present CUDA device: a built-in one by name, else one derived from `props`.

    The derived profile is rough (peaks from SM count x clock x per-SM rates, bandwidth
    from memory clock x bus width, PCIe 4.0, no NVLink); ``partitioner profile`` measures
    a better one.
    """
    for pattern, name in _CUDA_NAME_PROFILES:
        if pattern.search(props.name):
            return load_profile(name)
    cc = (props.major, props.minor)
    known = [k for k in _SM_FLOPS_PER_CLOCK if k <= cc] or [min(_SM_FLOPS_PER_CLOCK)]
    fp32_per_clock, tensor_per_clock = _SM_FLOPS_PER_CLOCK[max(known)]
    clock_hz = (getattr(props, "clock_rate", 0) or 1_500_000) * 1e3  # kHz; 1.5 GHz if unknown
    flops = props.multi_processor_count * clock_hz
    mem_clock_hz = (getattr(props, "memory_clock_rate", 0) or 0) * 1e3
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    # Double data rate: two transfers per memory clock on every bus line. Unknown: 500 GB/s,
    # between the GDDR6 (300 GB/s) and HBM (>= 900 GB/s) parts.
    bandwidth = 2 * mem_clock_hz * bus_bits / 8 if mem_clock_hz and bus_bits else 5e11
    tensor = flops * tensor_per_clock if cc >= (7, 0) else None
    slug = re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-")[:60] or "cuda"
    return DeviceProfile(
        name=slug,
        description=f"{props.name} (compute capability {cc[0]}.{cc[1]}), derived from device properties",
        kind="gpu",
        memory_bytes=int(props.total_memory),
        memory_bandwidth_Bps=bandwidth,
        peak_flops=PeakFlops(
            float32=flops * fp32_per_clock,
            tf32=tensor / 2 if tensor and cc >= (8, 0) else None,
            bfloat16=tensor if tensor and cc >= (8, 0) else None,
            float16=tensor,
        ),
        compute_efficiency=0.6,
        memory_efficiency=0.8,
        host_link=Link(interface="pcie", generation=4, bandwidth_Bps=3.2e10, latency_s=1e-5, efficiency=0.8),
        peer_link=None,
        source="derived by partitioner.devices.match_cuda_profile from torch.cuda.get_device_properties; rough",
    )


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def system_memory_bytes() -> int:
    """Host RAM this process may use: physical memory, capped by a cgroup (container) limit.

    Falls back to the ``cpu`` profile's figure where the OS does not say (Windows).
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 0
    limit = _cgroup_memory_limit()
    if limit is not None and (total <= 0 or limit < total):
        total = limit
    return total if total > 0 else load_profile("cpu").memory_bytes


def _cuda_device(index: int | None, spec: str) -> Device:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index is None:
        index = torch.cuda.current_device() if count else 0
    if index >= count:
        built = "" if torch.version.cuda else " (this torch build has no CUDA)"
        raise DeviceError(
            f"device {spec!r} is not available: this machine has {count} CUDA device(s){built}. "
            f"To plan for GPUs you do not have, name a profile instead, e.g. 'a100-80gb' or 'a100-80gb x4' "
            f"(available profiles: {', '.join(available_profiles())})"
        )
    props = torch.cuda.get_device_properties(index)
    return Device(
        name=f"cuda:{index}",
        torch_device=f"cuda:{index}",
        profile=match_cuda_profile(props),
        present=True,
        memory_bytes=int(props.total_memory),
    )


# --------------------------------------------------------------------------- resolution

MaxMemory = Mapping[str, int | str] | Mapping[int, int | str] | Mapping[str | int, int | str]
"""Capacity overrides by device name or kind (an int ``N`` means ``cuda:N``), as in Accelerate."""

_COUNT_RE = re.compile(r"(?P<base>.+?)(?:\s+x\s*|\s*[*×]\s*)(?P<count>\d+)")
_INDEXED_RE = re.compile(r"(?P<base>[^:]+):(?P<index>\d+)")


def _expand(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(spec as given, one device's base text) for each device the specs name."""
    if isinstance(specs, str):
        specs = [specs]
    out: list[tuple[str, str]] = []
    for raw in specs:
        if not isinstance(raw, str):
            raise DeviceError(f"device specs must be strings (got {raw!r} of type {type(raw).__name__})")
        for piece in raw.split(","):
            spec = piece.strip()
            if not spec:
                raise DeviceError(f"empty device name in {raw!r}; remove the stray comma or blank")
            m = _COUNT_RE.fullmatch(spec)
            if m is None:
                if len(out) >= _MAX_DEVICES:
                    raise DeviceError(f"too many devices: a device list may name at most {_MAX_DEVICES}")
                out.append((spec, spec))
                continue
            base, count = m["base"].strip(), int(m["count"])
            if count < 1:
                raise DeviceError(f"device count in {spec!r} must be >= 1 (got {count})")
            if len(out) + count > _MAX_DEVICES:  # checked before the list grows: 'x100000000' is a typo
                raise DeviceError(
                    f"too many devices: {spec!r} asks for {count}"
                    + (f" after {len(out)} others" if out else "")
                    + f"; a device list may name at most {_MAX_DEVICES} (a cluster profile as many)"
                )
            if base in ("cpu", "cuda"):  # "cpu x2" -> cpu:0, cpu:1
                out.extend((spec, f"{base}:{i}") for i in range(count))
            else:
                out.extend((spec, base) for _ in range(count))
    if not out:
        raise DeviceError("no devices given; name at least one, e.g. ['cpu'], ['cuda:0'] or ['a100-80gb x4']")
    return out


def _profile_for_spec(spec: str, base: str) -> DeviceProfile:
    try:
        return load_profile(base)
    except ProfileError:
        if _looks_like_path(base) or _find_profile(base) is not None:
            raise  # the file exists but is broken: its own message says why
        raise DeviceError(
            f"unknown device {spec!r}: not 'cpu', 'cpu:N', 'cuda', 'cuda:N', a profile path, "
            f"nor a profile name; available profiles: {', '.join(available_profiles())}"
        ) from None


def resolve_devices(specs: Sequence[str], max_memory: MaxMemory | None = None) -> tuple[Device, ...]:
    """Turn device strings into `Device` objects, in order.

    Forms: ``cpu`` (the host); ``cpu:N`` (a logical CPU device: real CPU numerics, for
    dry runs and tests); ``cuda`` or ``cuda:N`` (must be present); a profile name such as
    ``a100-80gb`` or a path to a profile file (absent, estimated; a name given more than
    once becomes ``a100-80gb:0``, ``a100-80gb:1``, ... and ``a100-80gb:N`` picks the
    number); ``a100-80gb x4`` or ``a100-80gb*4`` for four (``cpu x2`` gives ``cpu:0``,
    ``cpu:1``). A string may list several, comma-separated.

    Args:
        specs: The device strings.
        max_memory: Capacity overrides, as in Accelerate: keys are device names as shown
            (``cpu:0``, ``cuda:1``, ``a100-80gb:0``) or kinds (``cpu``, ``gpu``,
            ``cuda``, a profile name) for every device of that kind, or integers (also
            as strings, ``"0"``): ``N`` is ``cuda:N`` where the plan has CUDA devices,
            else the N-th GPU of the plan (``{0: "20GiB", 1: "20GiB"}`` for
            ``"a100-80gb x2"``). A ``"cpu"`` key is ignored when no CPU is planned for
            (Accelerate's dicts always hold one). Values are bytes or strings such as
            ``"200MB"``, ``"1.5GiB"`` (see `parse_bytes`). A name beats a kind. A cap
            above the device's memory warns (UserWarning); one of 1 PiB or more reads as
            "no limit" and does not.

    Returns:
        The devices, in the order given.

    Raises:
        DeviceError: No devices, an unknown name, a CUDA device that is not here, the same
            concrete device twice, or a bad or unmatched max_memory entry.
        ProfileError: A profile file exists but is invalid.
    """
    entries: list[tuple[str, str, int | None]] = []  # (spec, base, index) per device
    for spec, text in _expand(specs):
        m = _INDEXED_RE.fullmatch(text)
        entries.append((spec, m["base"], int(m["index"])) if m else (spec, text, None))
    loaded: dict[str, DeviceProfile] = {}  # one load per name: "a100-80gb x1024" reads one file
    for spec, base, _ in entries:
        if base not in ("cpu", "cuda") and base not in loaded:
            loaded[base] = _profile_for_spec(spec, base)
    profiles = {i: loaded[base] for i, (_, base, _) in enumerate(entries) if base in loaded}
    labels = _estimated_names({i: (p.name, entries[i][2]) for i, p in profiles.items()})
    devices: list[Device] = []
    host: tuple[DeviceProfile, int] | None = None  # the cpu profile and this machine's memory
    for i, (spec, base, index) in enumerate(entries):
        if base == "cpu":
            name = "cpu" if index is None else f"cpu:{index}"
            host = host or (load_profile("cpu"), system_memory_bytes())  # once for "cpu x1000"
            devices.append(Device(name=name, torch_device=name, profile=host[0], present=True, memory_bytes=host[1]))
        elif base == "cuda":
            devices.append(_cuda_device(index, spec))
        else:
            p = profiles[i]
            devices.append(
                Device(name=labels[i], torch_device=None, profile=p, present=False, memory_bytes=p.memory_bytes)
            )
    _check_unique(devices)
    if max_memory:
        devices = _apply_max_memory(devices, max_memory)
    return tuple(devices)


def _estimated_names(requests: Mapping[int, tuple[str, int | None]]) -> dict[int, str]:
    """Labels of absent devices: the bare profile name if it occurs once, else ``name:N``.

    `requests` maps a position to (profile name, index the user gave or None); unnumbered
    ones get the smallest indices the user did not take.
    """
    counts: dict[str, int] = {}
    taken: dict[str, set[int]] = {}
    for name, index in requests.values():
        counts[name] = counts.get(name, 0) + 1
        if index is not None:
            taken.setdefault(name, set()).add(index)
    next_free: dict[str, int] = {}
    labels: dict[int, str] = {}
    for position, (name, index) in requests.items():
        if index is None and counts[name] > 1:
            index = next_free.get(name, 0)
            while index in taken.get(name, set()):
                index += 1
            next_free[name] = index + 1
        labels[position] = name if index is None else f"{name}:{index}"
    return labels


def _check_unique(devices: list[Device]) -> None:
    seen: dict[str, int] = {}
    for position, device in enumerate(devices):
        if device.name in seen:
            raise DeviceError(
                f"device {device.name!r} is listed twice (positions {seen[device.name]} and {position}); "
                f"each concrete device may appear once. For several simulated CPUs use 'cpu:0', 'cpu:1', ... "
                f"(or 'cpu x2'); for several estimated GPUs repeat the profile name ('a100-80gb x2')"
            )
        seen[device.name] = position


def _gpu_for_index(key: int, devices: list[Device]) -> str:
    """The device an integer max_memory key means, as Accelerate reads it.

    With CUDA devices present in the plan, ``N`` is ``cuda:N`` (torch's index). Estimated
    GPUs have no torch index: ``N`` is then the N-th GPU of the plan, in order.
    """
    gpus = [d for d in devices if d.kind == "gpu"]
    if any(d.present for d in gpus):
        return f"cuda:{key}"
    if not 0 <= key < len(gpus):
        listed = ", ".join(d.name for d in gpus) or "none"
        raise DeviceError(
            f"max_memory key {key}: an integer key is the N-th GPU of the plan (as in Accelerate), "
            f"and the plan has {len(gpus)} GPU(s) ({listed}); use 0 to {len(gpus) - 1} or a device name"
        )
    return gpus[key].name


def _apply_max_memory(devices: list[Device], max_memory: MaxMemory) -> list[Device]:
    names = {d.name for d in devices}
    by_name: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for key, value in max_memory.items():
        name: object = key
        if isinstance(key, str) and key.strip().isdigit():  # "--max-memory 0=20GiB"
            name = key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            name = _gpu_for_index(key, devices)
        if not isinstance(name, str):
            raise DeviceError(f"max_memory key {key!r} must be a device name or kind (a string) or a GPU index")
        size = parse_bytes(value)
        if size <= 0:
            raise DeviceError(f"max_memory[{key!r}] must be > 0 bytes (got {value!r})")
        if name in names:
            by_name[name] = size
        elif any(name in (d.kind, d.profile.name) or (name == "cuda" and d.kind == "gpu") for d in devices):
            by_kind[name] = size
        elif name == "cpu":
            continue  # Accelerate's dicts always cap the host (its offload target); no CPU is planned here
        else:
            raise DeviceError(
                f"max_memory key {key!r} matches no device; devices: {', '.join(d.name for d in devices)} "
                f"(a key may also be a kind: 'cpu', 'gpu', or a profile name; or an integer: the N-th GPU)"
            )
    out = []
    too_large: dict[tuple[int, int, str], list[str]] = {}  # (cap, memory, whose) -> devices: one warning each
    for d in devices:
        cap = by_name.get(d.name)
        for kind in (d.profile.name, d.kind, "cuda" if d.kind == "gpu" else ""):
            if cap is None:
                cap = by_kind.get(kind)
        if cap is not None and d.memory_bytes < cap < _MAX_MEMORY_BYTES:
            whose = "this machine has" if d.present else f"its profile {d.profile.name!r} gives"
            too_large.setdefault((cap, d.memory_bytes, whose), []).append(d.name)
        out.append(d if cap is None else replace(d, memory_bytes=cap))
    for (cap, memory, whose), capped in too_large.items():
        shown = ", ".join(capped[:4]) + (f" and {len(capped) - 4} more" if len(capped) > 4 else "")
        warnings.warn(
            f"max_memory caps {shown} at {format_bytes(cap)}, but {whose} {format_bytes(memory)}: a plan that "
            f"uses the difference will not fit the hardware. Lower the cap, or name a profile with more memory",
            UserWarning,
            stacklevel=3,
        )
    return out


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


# --------------------------------------------------------------------------- byte sizes

_UNITS = {"b": 1, "": 1}
for _i, _prefix in enumerate("kmgtp", start=1):
    _UNITS[f"{_prefix}b"] = 1000**_i
    _UNITS[f"{_prefix}ib"] = 1024**_i
_BYTES_RE = re.compile(r"\s*(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?P<unit>[a-z]*)\s*")


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as ``"200MB"``, ``"1.5GiB"``, ``"4096"``.

    Decimal units (kB, MB, GB, TB, PB: powers of 1000) and binary ones (KiB ... PiB:
    powers of 1024), as Accelerate's ``convert_file_size_to_int`` reads ``max_memory``:
    ``"20GB"`` is 20 x 10^9 bytes and ``"20GiB"`` 20 x 2^30, in any case (``"20gib"``).
    A decimal unit that ends in a lowercase ``b`` (``"20Gb"``, ``"20gb"``) is refused:
    Accelerate reads it as bits (an eighth of the bytes), so either reading would
    surprise someone.

    Raises:
        DeviceError: Not a non-negative int or a number with a known unit.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise DeviceError(f"a size in bytes must be >= 0 (got {value})")
        return value
    if not isinstance(value, str):
        raise DeviceError(f"a size must be an int or a string like '200MB' (got {value!r})")
    m = _BYTES_RE.fullmatch(value.lower())
    if m is None or m["unit"] not in _UNITS:
        raise DeviceError(
            f"cannot read {value!r} as a size: expected a number and a unit, e.g. '200MB' or '1.5GiB' "
            f"(units: B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"
        )
    unit = value.strip()[len(value.strip()) - len(m["unit"]) :]
    if unit.endswith("b") and not unit.lower().endswith("ib"):
        number, prefix = m["number"], unit[:-1].upper()
        bits = format_bytes(round(float(number) * _UNITS[m["unit"]] / 8), binary=False)
        fix = (
            f"write '{number}{prefix}B' ({number} x 10^{3 * ('KMGTP'.index(prefix) + 1)} bytes) "
            f"or '{number}{prefix}iB' ({number} x 2^{10 * ('KMGTP'.index(prefix) + 1)} bytes)"
            if prefix
            else f"write '{number}B' or '{number}' for bytes"
        )
        raise DeviceError(f"{value!r} is ambiguous: Accelerate reads a lowercase 'b' as bits ({bits}); {fix}")
    size = float(m["number"]) * _UNITS[m["unit"]]
    if not math.isfinite(size) or size > 2**63 - 1:
        raise DeviceError(f"size {value!r} is too large")
    return round(size)
