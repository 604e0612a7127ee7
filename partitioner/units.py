"""Units as people read and write them: bytes (``1.5 GiB``, ``"200MB"``) and seconds (``45.60 ms``).

Pure (no torch): the solver, the simulator and the reports format their figures alike.
"""

from __future__ import annotations

import math
import re

from partitioner.errors import DeviceError

__all__ = ["format_bytes", "format_seconds", "parse_bytes"]


def format_bytes(n: int, binary: bool = True) -> str:
    """``1610612736`` -> ``"1.5 GiB"`` (or ``"1.61 GB"`` with ``binary=False``).

    Three significant decimals at most; `parse_bytes` reads the result back to within 0.5%.
    """
    base = 1024 if binary else 1000
    units = ("KiB", "MiB", "GiB", "TiB", "PiB") if binary else ("kB", "MB", "GB", "TB", "PB")
    if abs(n) < base:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in units:
        value /= base
        if abs(value) < base or unit == units[-1]:
            break
    return f"{value:.2f}".rstrip("0").rstrip(".") + f" {unit}"


def format_seconds(s: float) -> str:
    """``1.23 s``, ``45.60 ms``, ``7.8 us``: the largest unit the rounded figure reaches."""
    if round(s * 1e3, 2) >= 1000:
        return f"{s:.2f} s"
    if round(s * 1e6, 1) >= 1000:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


_UNITS = {"b": 1, "": 1}
for _i, _prefix in enumerate("kmgtp", start=1):
    _UNITS[f"{_prefix}b"] = 1000**_i
    _UNITS[f"{_prefix}ib"] = 1024**_i
# A number as Python's float() reads it (Accelerate parses with float()): a sign, digits with
# single underscores between them (``1_000``), a fraction, an exponent.
_DIGITS = r"\d(?:_?\d)*"
_BYTES_RE = re.compile(
    rf"\s*(?P<number>[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:e[+-]?{_DIGITS})?)\s*(?P<unit>[a-z]*)\s*"
)


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as ``"200MB"``, ``"1.5GiB"``, ``"4096"``.

    Decimal units (kB, MB, GB, TB, PB: powers of 1000) and binary ones (KiB ... PiB:
    powers of 1024), as Accelerate's ``convert_file_size_to_int`` reads ``max_memory``:
    ``"20GB"`` is 20 x 10^9 bytes and ``"20GiB"`` 20 x 2^30, in any case (``"20gib"``).
    Every string Accelerate reads gives the same number here: the number is read as
    Python's ``float`` reads it (``"+5GB"``, ``"1_000MB"``, ``"1e3MB"``) and a fraction
    of a byte is dropped (``"0.7KiB"`` is 716 bytes), except that a decimal unit ending
    in a lowercase ``b`` (``"20Gb"``, ``"20gb"``) is refused: Accelerate reads it as
    bits (an eighth of the bytes), so either reading would surprise someone. Beyond
    Accelerate's: TB, PB, TiB, PiB, ``B`` and a bare number (``"4096"``, ``"1e9"``).

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
        bits = format_bytes(int(float(number) * _UNITS[m["unit"]]) // 8, binary=False)
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
    # int() drops the fraction toward zero, as Accelerate's int(float(...) * unit) does:
    # "-0.1KB" is 0 bytes there too.
    if int(size) < 0:
        raise DeviceError(f"a size in bytes must be >= 0 (got {value!r})")
    return int(size)
