"""Profile files: ``profiles/*.json`` <-> `DeviceProfile`, strictly, and where profiles are looked up.

The schema is in ``profiles/README.md``. Reading is strict (unknown keys, duplicate keys,
NaN, oversized or special files are refused, naming the file and the key), and writing
gives the canonical text the shipped files hold. Cluster profiles
(`partitioner.cluster`) are read with the same helpers.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from partitioner.devices import DTYPES, OP_KINDS, PROFILE_NAME_RE, DeviceProfile, InvalidProfileError, Link, PeakFlops
from partitioner.errors import ProfileError
from partitioner.files import FileTooLarge, NotRegularFile, read_capped
from partitioner.units import format_bytes

__all__ = [
    "PROFILE_PATH_ENV",
    "profile_search_path",
    "available_profiles",
    "find_profile",
    "find_on_search_path",
    "looks_like_path",
    "load_profile",
    "read_strict_json",
    "json_object",
    "profile_from_dict",
    "profile_to_json",
]

PROFILE_PATH_ENV = "PARTITIONER_PROFILE_PATH"
"""Environment variable: directories searched for ``<name>.json`` before the built-in ones."""

_BUILTIN_PROFILES = Path(__file__).resolve().parents[1] / "profiles"
_MAX_PROFILE_FILE_BYTES = 1 << 20


def json_object(where: str, key: str, value: object, required: set[str], optional: set[str]) -> dict[str, Any]:
    """`value`, checked to be a JSON object with every `required` key and no key outside `optional`.

    Args:
        where: What to name in the error (usually the file path).
        key: The object's key path (``peak_flops``, ``nodes[0]``), or ``""`` for the document.
        value: The parsed JSON value.
        required: Keys that must be present.
        optional: Keys that may be present.

    Raises:
        ProfileError: Not an object, a required key missing, or an unknown key (the first in
            sorted order, with the allowed ones).
    """
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
_CURVES = {
    "gemm_efficiency": "[flops, efficiency] pairs",
    "gemm_narrow": "[axis, size, efficiency] triples",
    "memory_curve": "[bytes, fraction] pairs",
    "conv_efficiency": "[flops, efficiency] pairs",
    "attention_efficiency": "[flops, efficiency] pairs",
    "causal_attention_efficiency": "[flops, efficiency] pairs",
}
"""The profile's keys that are lists of points, and what each point is."""


_OPTIONAL_PROFILE_KEYS = {"launch_s", "module_call_s", "op_rates", "calibrated"} | set(_CURVES)
"""Keys added after the first schema: a profile without them still loads (their defaults)."""
_PROFILE_KEYS = {f.name for f in fields(DeviceProfile)} - _OPTIONAL_PROFILE_KEYS
_CALIBRATE_SOURCE = "partitioner.calibrate.measure_device"


def _points(top: dict[str, Any], key: str, what: str, where: str) -> tuple[Any, ...]:
    """The list under `key` (empty when absent) as a tuple of tuples; the profile checks the points."""
    points = top.get(key, [])
    if not isinstance(points, list):
        raise ProfileError(f"{where}: key {key!r} must be a list of {what} (got {points!r:.80})")
    return tuple(tuple(p) if isinstance(p, list) else p for p in points)


def profile_from_dict(data: object, where: str = "<profile>") -> DeviceProfile:
    """Build a `DeviceProfile` from parsed JSON, strictly (the schema is in profiles/README.md).

    Args:
        data: The parsed JSON document.
        where: What to name in error messages (usually the file path).

    Raises:
        ProfileError: Missing or unknown keys, wrong types, or numbers out of range;
            the message names `where`, the key and the problem.
    """
    top = json_object(where, "", data, _PROFILE_KEYS, _OPTIONAL_PROFILE_KEYS)
    peaks = json_object(where, "peak_flops", top["peak_flops"], {"float32"}, set(DTYPES) - {"float32"})
    links: dict[str, Link | None] = {}
    for key in ("host_link", "peer_link"):
        raw = top[key]
        if raw is None:
            links[key] = None
            continue
        link = json_object(where, key, raw, _LINK_KEYS, set())
        links[key] = Link(**link)
    curves = {key: _points(top, key, what, where) for key, what in _CURVES.items()}
    rates = top.get("op_rates", {})
    if not isinstance(rates, dict):
        raise ProfileError(
            f"{where}: key 'op_rates' must map op kinds ({', '.join(OP_KINDS)}) to [forward, backward] "
            f"bytes per second (got {rates!r:.80})"
        )
    for kind, pair in rates.items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise ProfileError(f"{where}: key 'op_rates.{kind}' must be [forward, backward] bytes per second "
                               f"(got {pair!r:.80})")
    # A file measured before `calibrated` existed says so in its source.
    calibrated = top.get("calibrated", isinstance(top["source"], str) and top["source"].startswith(_CALIBRATE_SOURCE))
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
            launch_s=top.get("launch_s", 0.0),
            module_call_s=top.get("module_call_s", 0.0),
            **curves,
            # Kinds in OP_KINDS order (a file may list them in any); an unknown kind is kept
            # last, for the profile's check to name it.
            op_rates=tuple(
                (kind, *pair) for kind, pair in sorted(rates.items(), key=lambda kv: (OP_KINDS + (kv[0],)).index(kv[0]))
            ),
            calibrated=calibrated,
        )
    except InvalidProfileError as e:
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
    if isinstance(value, list):
        return "[" + ", ".join(_to_json(v, inner) for v in value) + "]"
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
    # Keys added after the first schema are written only where they say something.
    if profile.launch_s:
        data["launch_s"] = profile.launch_s
    if profile.module_call_s:
        data["module_call_s"] = profile.module_call_s
    for key in _CURVES:
        if points := getattr(profile, key):
            data[key] = [list(p) for p in points]
    if profile.op_rates:
        data["op_rates"] = {kind: [forward, backward] for kind, forward, backward in profile.op_rates}
    if profile.calibrated:
        data["calibrated"] = True
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
            names.update(p.stem for p in directory.glob("*.json") if PROFILE_NAME_RE.fullmatch(p.stem))
    return tuple(sorted(names))


def find_on_search_path(relative: str) -> Path | None:
    """The first file ``<directory>/<relative>`` for the directories of `profile_search_path`, or None."""
    for directory in profile_search_path():
        candidate = directory / relative
        if candidate.is_file():
            return candidate
    return None


def find_profile(name: str) -> Path | None:
    """The file of the profile named `name`: the first ``<name>.json`` on `profile_search_path`, or None."""
    return find_on_search_path(f"{name}.json") if PROFILE_NAME_RE.fullmatch(name) else None


def looks_like_path(text: str) -> bool:
    """Whether a device or profile string is a file path (ends in ``.json`` or holds a separator)."""
    return text.endswith(".json") or "/" in text or os.sep in text or bool(os.altsep and os.altsep in text)


def read_strict_json(path: Path, cap: int, what: str) -> object:
    """Parse `path` as strict JSON: a regular UTF-8 file of at most `cap` bytes, no duplicate keys, no NaN or Infinity.

    Only regular files (after following links): a FIFO would block until a writer comes,
    and ``/dev/zero`` or ``/dev/urandom`` never end. At most ``cap + 1`` bytes are read
    (`partitioner.files.read_capped`), so a file that grows while read cannot exhaust memory.

    Args:
        path: The file.
        cap: Most bytes the file may hold.
        what: What the file is, for messages (``device profile``, ``cluster profile``).

    Raises:
        ProfileError: Not a regular file, larger than `cap`, unreadable, not UTF-8, not
            JSON, nested too deeply, a key twice in one object, or NaN or Infinity; the
            message names the file.
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
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    def reject_constant(token: str) -> None:
        raise ProfileError(f"{where}: {token} is not a number a profile may hold")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        for k in keys:
            if keys.count(k) > 1:
                raise ProfileError(f"{where}: key {k!r} appears {keys.count(k)} times")
        return dict(pairs)

    try:
        return json.loads(text, parse_constant=reject_constant, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{where}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ProfileError(f"{where}: JSON nested too deeply") from None


def _read_profile_file(path: Path) -> DeviceProfile:
    return profile_from_dict(read_strict_json(path, _MAX_PROFILE_FILE_BYTES, "device profile"), str(path))


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
    if isinstance(name_or_path, os.PathLike) or looks_like_path(name_or_path):
        return _read_profile_file(Path(name_or_path))
    path = find_profile(name_or_path)
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
