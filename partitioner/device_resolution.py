"""Device strings -> `Device` objects: ``"cpu:0"``, ``"cuda:1"``, ``"a100-80gb x4"``, capped by ``max_memory``."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

from partitioner.device_detection import cuda_device, system_memory_bytes
from partitioner.devices import MAX_MEMORY_BYTES, Device, DeviceProfile
from partitioner.errors import DeviceError, ProfileError
from partitioner.profile_files import available_profiles, find_profile, load_profile, looks_like_path
from partitioner.units import format_bytes, parse_bytes

__all__ = ["MaxMemory", "MAX_DEVICES", "resolve_devices"]

MaxMemory = Mapping[str, int | str] | Mapping[int, int | str] | Mapping[str | int, int | str]
"""Capacity overrides by device name or kind (an int ``N`` means ``cuda:N``), as in Accelerate."""

MAX_DEVICES = 1024
"""Most devices one device list may name (as many as a cluster profile may hold)."""

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
                if len(out) >= MAX_DEVICES:
                    raise DeviceError(f"too many devices: a device list may name at most {MAX_DEVICES}")
                out.append((spec, spec))
                continue
            base, count = m["base"].strip(), int(m["count"])
            if count < 1:
                raise DeviceError(f"device count in {spec!r} must be >= 1 (got {count})")
            if len(out) + count > MAX_DEVICES:  # checked before the list grows: 'x100000000' is a typo
                raise DeviceError(
                    f"too many devices: {spec!r} asks for {count}"
                    + (f" after {len(out)} others" if out else "")
                    + f"; a device list may name at most {MAX_DEVICES} (a cluster profile as many)"
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
        if looks_like_path(base) or find_profile(base) is not None:
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
            devices.append(cuda_device(index, spec))
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
        if cap is not None and d.memory_bytes < cap < MAX_MEMORY_BYTES:
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
