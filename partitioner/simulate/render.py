"""A `Timeline` as people draw pipelines: text rows, or a Gantt chart (matplotlib, lazily).

Rows are ranks, time runs left to right; forward and backward boxes carry their
microbatch (``F3``, ``B3``; ``4F3`` for stage 4 when ranks hold several stages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from partitioner.simulate.data import Event, EventKind, Timeline

__all__ = ["ascii_timeline", "render_timeline", "gantt_figure", "time_unit"]

_MAX_AUTO_WIDTH = 160
"""Columns at most when `ascii_timeline` picks its own scale (a wide terminal)."""
_COMPUTE = (EventKind.FORWARD, EventKind.BACKWARD)


def _label(timeline: Timeline, event: Event) -> str:
    if event.kind is EventKind.OPTIMIZER:
        return "opt"
    letter = "F" if event.kind is EventKind.FORWARD else "B"
    prefix = str(event.stage) if timeline.virtual_stages > 1 else ""
    return f"{prefix}{letter}{event.microbatch}"


def _summary(timeline: Timeline) -> str:
    p, v = len(timeline.ranks), timeline.virtual_stages
    shape = f"{p} ranks x {v} stages" if v > 1 else f"{p} stages"
    overlap = ", all-reduce overlapped" if timeline.overlap_allreduce else ""
    return (
        f"{timeline.schedule.value}: {shape}, {timeline.microbatches} microbatches{overlap}; "
        f"step {timeline.step_time_s:.6g} s, bubble {timeline.bubble_fraction:.1%}"
    )


def ascii_timeline(timeline: Timeline, width: int | None = None) -> str:
    """The timeline as text: a compute row per rank, and a link row where anything is sent.

    Compute rows show ``|F0|F1|`` boxes, ``|opt|`` for the optimizer step and ``.`` where
    the rank idles; link rows show ``>`` for activations sent on, ``<`` for gradients sent
    back and ``=`` for all-reduce.

    Args:
        timeline: What `simulate` returned.
        width: Columns for the whole step; None picks a scale at which the shortest
            forward or backward still shows its label (at most 160 columns).

    Raises:
        ValueError: `width` below 1.
    """
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be an integer >= 1 columns (got {width!r})")
    step = timeline.step_time_s
    if step <= 0:
        return _summary(timeline)
    compute = [e for r in timeline.ranks for e in r.events if e.kind in _COMPUTE and e.duration_s > 0]
    if width is None:
        label = max((len(_label(timeline, e)) for e in compute), default=1)
        shortest = min((e.duration_s for e in compute), default=step)
        width = min(_MAX_AUTO_WIDTH, max(1, round(step * (label + 1) / shortest)))
    scale = width / step

    def columns(event: Event) -> tuple[int, int]:
        return round(event.start_s * scale), round(event.end_s * scale)

    prefix = "r" if timeline.virtual_stages > 1 else "s"
    names = [f"{prefix}{r.rank}" for r in timeline.ranks]
    pad = max(len(n) for n in names)
    lines = [_summary(timeline)]
    for name, rank in zip(names, timeline.ranks):
        row = [" "] * (width + 1)
        for e in rank.of_kind(EventKind.IDLE):
            a, b = columns(e)
            row[a:b] = "." * (b - a)
        for e in rank.of_kind(*_COMPUTE, EventKind.OPTIMIZER):
            a, b = columns(e)
            if b == a:
                continue
            text = _label(timeline, e)[: max(0, b - a - 1)]
            row[a] = row[b] = "|"
            row[a + 1 : a + 1 + len(text)] = text
            row[a + 1 + len(text) : b] = " " * (b - a - 1 - len(text))
        lines.append(f"{name:>{pad}} {''.join(row).rstrip()}")
        link = [" "] * (width + 1)
        for e in rank.of_kind(EventKind.SEND, EventKind.ALLREDUCE, EventKind.COLLECTIVE):
            a, b = columns(e)
            mark = (
                "=" if e.kind is EventKind.ALLREDUCE
                else "~" if e.kind is EventKind.COLLECTIVE
                else ">" if e.peer == (e.stage or 0) + 1
                else "<"
            )
            link[a:b] = mark * (b - a)
        if "".join(link).strip():
            lines.append(f"{'':>{pad}} {''.join(link).rstrip()}")
    axis = f"0 s{'':{max(0, width - 3 - len(f'{step:.6g} s'))}}{step:.6g} s"
    lines.append(f"{'':>{pad}} {axis}")
    return "\n".join(lines)


_COLOURS = {
    EventKind.FORWARD: "#4C72B0",
    EventKind.BACKWARD: "#DD8452",
    EventKind.SEND: "#8C8C8C",
    EventKind.ALLREDUCE: "#8172B3",
    EventKind.COLLECTIVE: "#55A868",
    EventKind.OPTIMIZER: "#C44E52",
    EventKind.IDLE: "#F2F2F2",
}
_SUFFIXES = (".png", ".svg", ".pdf")


_MAX_ROW_LABELS = 32
"""Rank labels at most on the chart's axis (every k-th rank beyond that)."""
_MAX_HEIGHT_IN = 18.0
"""Tallest figure in inches; a deep pipeline's rows get thinner instead."""
_DENSE_BOXES = 160
"""Boxes per rank above which they are drawn merged where under a pixel apart, with idle
time as the rows' background and no send band (each box would be a sliver)."""


def time_unit(step_s: float) -> tuple[float, str]:
    """(factor, name) of the unit an axis of `step_s` seconds reads best in: s, ms or us."""
    if step_s >= 1:
        return 1.0, "s"
    if step_s >= 1e-3:
        return 1e3, "ms"
    return 1e6, "us"


_PIXELS = 1000
"""About the pixels across a chart's time axis (11 inches at 120 dpi, less the margins)."""
_MIXED = "#9A7B94"
"""Forwards and backwards merged into one span (between their colours)."""


def _merged(events: Sequence[Event], gap_s: float) -> dict[str, list[tuple[float, float]]]:
    """Compute events joined into spans wherever less than `gap_s` (about a pixel) lies between
    them, by colour: all forwards, all backwards, or both (`_MIXED`). (start, duration) each."""
    out: dict[str, list[tuple[float, float]]] = {}
    start = end = 0.0
    kinds: set[EventKind] = set()

    def flush() -> None:
        if kinds:
            colour = _COLOURS[next(iter(kinds))] if len(kinds) == 1 else _MIXED
            out.setdefault(colour, []).append((start, end - start))

    for e in events:
        if kinds and e.start_s - end <= gap_s:
            end, kinds = max(end, e.end_s), kinds | {e.kind}
            continue
        flush()
        start, end, kinds = e.start_s, e.end_s, {e.kind}
    flush()
    return out


def _ordinal_stages(k: int, ranks: int) -> str:
    return f"stages {k * ranks}-{(k + 1) * ranks - 1}" if ranks > 1 else f"stage {k}"


def gantt_figure(timeline: Timeline, *, title: str | None = None) -> Any:
    """The timeline as a Gantt chart, a matplotlib ``Figure`` (see `render_timeline`).

    Raises:
        ImportError: matplotlib is missing (``pip install 'partitioner[plot]'``).
    """
    try:
        from matplotlib.colors import to_rgb
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as missing:
        raise ImportError("render_timeline needs matplotlib: pip install 'partitioner[plot]'") from missing

    step = timeline.step_time_s or 1.0
    factor, unit = time_unit(step)
    n = len(timeline.ranks)
    v = timeline.virtual_stages
    fig_width, height = 11.0, min(_MAX_HEIGHT_IN, 1.3 + 0.62 * n)
    fig = Figure(figsize=(fig_width, height))
    ax = fig.add_subplot()
    points_per_unit = fig_width * 0.8 * 72 / (step * factor)
    boxes = max((sum(1 for e in r.events if e.kind in _COMPUTE) for r in timeline.ranks), default=0)
    dense = boxes > _DENSE_BOXES
    drawn: set[str] = set()  # colours of merged spans (dense charts)

    def shade(colour: str, stage: int | None) -> tuple[float, float, float]:
        """Stage ``r + k*p`` of rank ``r`` in the ``k``-th lighter shade (interleaving)."""
        lighten = 0.45 * ((stage or 0) // n) / max(1, v - 1)
        r, g, b = (c + (1 - c) * lighten for c in to_rgb(colour))
        return r, g, b

    def span(e: Event) -> tuple[float, float]:
        return e.start_s * factor, e.duration_s * factor

    for y, rank in enumerate(timeline.ranks):
        if dense:  # idle as the row's background: one box instead of thousands of hatched slivers
            ax.broken_barh([(0, step * factor)], (y - 0.3, 0.5), facecolors=_COLOURS[EventKind.IDLE], linewidth=0)
        else:
            idle = [span(e) for e in rank.of_kind(EventKind.IDLE)]
            ax.broken_barh(idle, (y - 0.3, 0.5), facecolors=_COLOURS[EventKind.IDLE],
                           edgecolor="#C8C8C8", hatch="///", linewidth=0.3)
        if dense:
            for colour, spans in _merged(rank.of_kind(*_COMPUTE), step / _PIXELS).items():
                ax.broken_barh([(a * factor, d * factor) for a, d in spans], (y - 0.3, 0.5), facecolors=colour,
                               linewidth=0)
                drawn.add(colour)
        else:
            groups: dict[tuple[EventKind, int], list[tuple[float, float]]] = {}
            for e in rank.of_kind(*_COMPUTE):
                groups.setdefault((e.kind, (e.stage or 0) // n), []).append(span(e))
                text = str(e.microbatch)
                size = min(9.0, e.duration_s * factor * points_per_unit / (0.62 * len(text) + 0.4))
                if size >= 4:
                    ax.text((e.start_s + e.duration_s / 2) * factor, y - 0.05, text, ha="center", va="center",
                            fontsize=size, color="white")
            for (kind, k), spans in groups.items():
                ax.broken_barh(spans, (y - 0.3, 0.5), facecolors=shade(_COLOURS[kind], k * n),
                               edgecolor="white", linewidth=0.6)
        optimizer = [span(e) for e in rank.of_kind(EventKind.OPTIMIZER) if e.duration_s > 0]
        if optimizer:
            ax.broken_barh(optimizer, (y - 0.3, 0.5), facecolors=_COLOURS[EventKind.OPTIMIZER], edgecolor="white",
                           linewidth=0 if dense else 0.6)
        bands = ((EventKind.SEND, y + 0.23), (EventKind.ALLREDUCE, y + 0.36), (EventKind.COLLECTIVE, y + 0.36))
        for kind, band in bands:
            if dense and kind is EventKind.SEND:
                continue  # thousands of slivers: noise at this scale
            spans = [span(e) for e in rank.of_kind(kind) if e.duration_s > 0]
            if spans:
                ax.broken_barh(spans, (band, 0.11), facecolors=_COLOURS[kind], edgecolor="white",
                               linewidth=0 if dense else 0.3)
    prefix = "stage" if v == 1 else "rank"
    every = math.ceil(n / _MAX_ROW_LABELS)
    labelled = list(range(0, n, every))
    labels = []
    for y in labelled:
        rank = timeline.ranks[y]
        devices = ", ".join(rank.devices)
        device_text = devices if len(devices) <= 24 else devices[:21] + "..."
        labels.append(f"{prefix} {rank.rank}\n{device_text}" if every == 1 else f"{prefix} {rank.rank} ({device_text})")
    ax.set_yticks(labelled, labels, fontsize=8 if every == 1 else 6)
    if every > 1:
        ax.set_ylabel(f"{n} {prefix}s, one in {every} labelled", fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, step * factor)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title if title is not None else _summary(timeline), fontsize=10)
    ax.grid(axis="x", color="#E0E0E0", linewidth=0.5)
    ax.set_axisbelow(True)
    shown = {e.kind for rank in timeline.ranks for e in rank.events if e.duration_s > 0}
    legend = []
    for kind, label in ((EventKind.FORWARD, "forward"), (EventKind.BACKWARD, "backward")):
        if kind not in shown:
            continue
        if dense:
            if _COLOURS[kind] in drawn:
                legend.append(Patch(facecolor=_COLOURS[kind], label=label))
        elif v == 1:
            legend.append(Patch(facecolor=_COLOURS[kind], label=label))
        else:  # one shade per stage of a rank: rank r runs stages r, r + p, r + 2p, ...
            legend += [
                Patch(facecolor=shade(_COLOURS[kind], k * n), label=f"{label}, {_ordinal_stages(k, n)}")
                for k in range(v)
            ]
    if _MIXED in drawn:
        legend.append(Patch(facecolor=_MIXED, label="forwards and backwards, too close to draw apart"))
    legend += [
        Patch(facecolor=_COLOURS[kind], label=label)
        for kind, label in (
            (EventKind.OPTIMIZER, "optimizer step"),
            (EventKind.SEND, "send"),
            (EventKind.ALLREDUCE, "all-reduce"),
            (EventKind.COLLECTIVE, "collectives inside a pass (TP all-reduce, ZeRO-3 gather)"),
        )
        if kind in shown and not (dense and kind is EventKind.SEND)
    ]
    if EventKind.IDLE in shown or dense:
        hatch = None if dense else "///"
        legend.append(Patch(facecolor=_COLOURS[EventKind.IDLE], edgecolor="#C8C8C8", hatch=hatch, label="idle"))
    columns = min(len(legend), 6)
    rows = math.ceil(len(legend) / max(1, columns))
    fig.legend(handles=legend, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.1 + 0.25 * rows) / height, 1, 1))
    return fig


def render_timeline(timeline: Timeline, path: str | Path, *, title: str | None = None, dpi: int = 120) -> Path:
    """Draw the timeline as a Gantt chart and write it to `path` (PNG, SVG or PDF by suffix).

    One row per rank: forward and backward boxes labelled with the microbatch (the stages
    of an interleaved rank in lighter shades, each shade in the legend), the optimizer step,
    hatched idle time, and beneath them a thin band for sends and one for gradient
    all-reduce; time in s, ms or us, whichever the step reads best in. A deep pipeline
    (more than 32 ranks) is at most 18 inches tall with every k-th rank labelled; a long
    one (more than 160 boxes a rank) is drawn for its shape: boxes under a pixel apart
    merge into one span (forwards, backwards, or both in a colour between theirs), idle
    time is the rows' background.
    Needs matplotlib (the ``plot`` extra).

    Args:
        timeline: What `simulate` returned.
        path: File to write; its suffix picks the format.
        title: Chart title; None uses the schedule, sizes, step time and bubble.
        dpi: Resolution of a PNG.

    Returns:
        `path`, as a Path.

    Raises:
        ValueError: The suffix is not ``.png``, ``.svg`` or ``.pdf``.
        ImportError: matplotlib is missing (``pip install 'partitioner[plot]'``).
    """
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"render_timeline writes {', '.join(_SUFFIXES)} files (got {path.name!r})")
    gantt_figure(timeline, title=title).savefig(path, dpi=dpi)
    return path
