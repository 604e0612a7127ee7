"""Units as people read them: bytes (``1.5 GiB``) and seconds (``45.60 ms``).

Pure (no torch): the solver, the simulator and the reports format their figures alike.
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_seconds"]


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
