"""A `Timeline` as people draw pipelines: text rows, or a Gantt chart (matplotlib, lazily).

Rows are ranks, time runs left to right; forward and backward boxes carry their
microbatch (``F3``, ``B3``; ``4F3`` for stage 4 when ranks hold several stages).
"""

from __future__ import annotations

from pathlib import Path

from partitioner.simulate.data import Event, EventKind, Timeline

__all__ = ["ascii_timeline", "render_timeline"]

_MAX_AUTO_WIDTH = 160
"""Columns at most when `ascii_timeline` picks its own scale (a wide terminal)."""
_COMPUTE = (EventKind.FORWARD, EventKind.BACKWARD)


def _label(timeline: Timeline, event: Event) -> str:
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

    Compute rows show ``|F0|F1|`` boxes and ``.`` where the rank idles; link rows show
    ``>`` for activations sent on, ``<`` for gradients sent back and ``=`` for all-reduce.

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
        for e in rank.of_kind(*_COMPUTE):
            a, b = columns(e)
            if b == a:
                continue
            text = _label(timeline, e)[: max(0, b - a - 1)]
            row[a] = row[b] = "|"
            row[a + 1 : a + 1 + len(text)] = text
            row[a + 1 + len(text) : b] = " " * (b - a - 1 - len(text))
        lines.append(f"{name:>{pad}} {''.join(row).rstrip()}")
        link = [" "] * (width + 1)
        for e in rank.of_kind(EventKind.SEND, EventKind.ALLREDUCE):
            a, b = columns(e)
            mark = "=" if e.kind is EventKind.ALLREDUCE else ">" if e.peer == (e.stage or 0) + 1 else "<"
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
    EventKind.IDLE: "#F2F2F2",
}
_SUFFIXES = (".png", ".svg", ".pdf")


def render_timeline(timeline: Timeline, path: str | Path, *, title: str | None = None, dpi: int = 120) -> Path:
    """Draw the timeline as a Gantt chart and write it to `path` (PNG, SVG or PDF by suffix).

    One row per rank: forward and backward boxes labelled with the microbatch (stages of
    an interleaved rank in lighter shades), hatched idle time, and beneath them a thin
    band for sends and one for gradient all-reduce. Needs matplotlib (the ``plot`` extra).

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
    try:
        from matplotlib.colors import to_rgb
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as missing:
        raise ImportError("render_timeline needs matplotlib: pip install 'partitioner[plot]'") from missing

    step = timeline.step_time_s or 1.0
    n = len(timeline.ranks)
    fig_width, height = 11.0, 1.3 + 0.62 * n
    fig = Figure(figsize=(fig_width, height))
    ax = fig.add_subplot()
    points_per_second = fig_width * 0.8 * 72 / step
    v = timeline.virtual_stages

    def shade(colour: str, stage: int | None) -> tuple[float, ...]:
        """Stage ``r + k*p`` of rank ``r`` in the ``k``-th lighter shade (interleaving)."""
        lighten = 0.45 * ((stage or 0) // n) / max(1, v - 1)
        return tuple(c + (1 - c) * lighten for c in to_rgb(colour))

    for y, rank in enumerate(timeline.ranks):
        for e in rank.events:
            if e.kind is EventKind.IDLE:
                ax.broken_barh([(e.start_s, e.duration_s)], (y - 0.3, 0.5), facecolors=_COLOURS[e.kind],
                               edgecolor="#C8C8C8", hatch="///", linewidth=0.3)
            elif e.kind in _COMPUTE:
                ax.broken_barh([(e.start_s, e.duration_s)], (y - 0.3, 0.5), facecolors=shade(_COLOURS[e.kind], e.stage),
                               edgecolor="white", linewidth=0.6)
                text = str(e.microbatch)
                size = min(9.0, e.duration_s * points_per_second / (0.62 * len(text) + 0.4))
                if size >= 4:
                    ax.text(e.start_s + e.duration_s / 2, y - 0.05, text, ha="center", va="center",
                            fontsize=size, color="white")
            elif e.kind in (EventKind.SEND, EventKind.ALLREDUCE) and e.duration_s > 0:
                band = y + 0.23 if e.kind is EventKind.SEND else y + 0.36
                ax.broken_barh([(e.start_s, e.duration_s)], (band, 0.11), facecolors=_COLOURS[e.kind],
                               edgecolor="white", linewidth=0.3)
    prefix = "stage" if v == 1 else "rank"
    labels = []
    for rank in timeline.ranks:
        devices = ", ".join(rank.devices)
        labels.append(f"{prefix} {rank.rank}\n{devices if len(devices) <= 24 else devices[:21] + '...'}")
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, step)
    ax.set_xlabel("time (s)")
    ax.set_title(title if title is not None else _summary(timeline), fontsize=10)
    ax.grid(axis="x", color="#E0E0E0", linewidth=0.5)
    ax.set_axisbelow(True)
    shown = {e.kind for rank in timeline.ranks for e in rank.events if e.duration_s > 0}
    legend = [
        Patch(facecolor=_COLOURS[kind], label=label)
        for kind, label in ((EventKind.FORWARD, "forward"), (EventKind.BACKWARD, "backward"),
                            (EventKind.SEND, "send"), (EventKind.ALLREDUCE, "all-reduce"))
        if kind in shown
    ]
    if EventKind.IDLE in shown:
        legend.append(Patch(facecolor=_COLOURS[EventKind.IDLE], edgecolor="#C8C8C8", hatch="///", label="idle"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(path, dpi=dpi)
    return path
