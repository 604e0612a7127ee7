"""Present hardware: which CUDA GPUs and how much host memory this process has, as device profiles.

torch is imported only inside the functions that must ask it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from partitioner.devices import Device, DeviceProfile, Link, PeakFlops
from partitioner.errors import DeviceError
from partitioner.profile_files import available_profiles, load_profile

__all__ = ["match_cuda_profile", "system_memory_bytes", "cuda_device"]


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


def cuda_device(index: int | None, spec: str) -> Device:
    """The present CUDA device ``cuda:<index>`` (the current one when `index` is None).

    Its profile is `match_cuda_profile`'s and its memory the card's own.

    Args:
        index: The CUDA device index, or None for torch's current device.
        spec: The device string the user gave, named in the error.

    Raises:
        DeviceError: No such CUDA device here (the message suggests naming a profile instead).
    """
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
