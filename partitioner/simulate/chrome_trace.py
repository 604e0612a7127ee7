"""A `Timeline` as a Chrome trace (Trace Event Format JSON): open it in ui.perfetto.dev or chrome://tracing.

The layout, in the format's terms: a *process* per rank (``stage 3``, or ``rank 1`` when
ranks hold several stages), named with its devices; in each, a *thread* per lane of the
simulator: ``compute`` (forwards, backwards, the optimizer step and idle gaps), ``send`` (the rank's outgoing
link), ``recv from stage k`` (what arrives over rank ``k``'s link) and ``all-reduce``.
Every interval is a complete event (``"ph": "X"``) with ``ts`` and ``dur`` in microseconds,
its kind as the category and its stage and microbatch in ``args``; a ``memory`` counter
(``"ph": "C"``) per rank follows the bytes alive per device. Flow arrows (``bind_id``)
follow each microbatch from its first forward through the sends to its last backward.

Times are rounded to whole nanoseconds, the resolution Perfetto stores, at the ends of
each interval: intervals that touch in the timeline touch in the trace, and no two events
of one thread overlap (Perfetto draws only events that nest). Pure: no torch.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from partitioner.simulate.data import Event, EventKind, RankTimeline, Timeline

__all__ = ["chrome_trace", "write_chrome_trace"]

_LANES = ("compute", "collectives", "send", "recv", "all-reduce")
"""Thread order within a rank (``recv`` is one thread per sending rank)."""
_LANE_OF = {
    EventKind.FORWARD: "compute",
    EventKind.BACKWARD: "compute",
    EventKind.IDLE: "compute",
    EventKind.OPTIMIZER: "compute",
    EventKind.SEND: "send",
    EventKind.RECV: "recv",
    EventKind.ALLREDUCE: "all-reduce",
    EventKind.COLLECTIVE: "collectives",
}
_SUFFIXES = (".json", ".gz")


def _ns(seconds: float) -> int:
    """Whole nanoseconds (exact for `fractions.Fraction` times)."""
    return round(seconds * 1_000_000_000)


def _us(ns: int) -> float:
    """`ns` as microseconds, the float nearest ``ns / 1000`` that reads back as `ns`.

    Perfetto reads a JSON time as ``int64(us * 1000)``, truncating: ``1.001 * 1000`` is
    ``1000.9999999999999`` and would lose a nanosecond, so take the next float up then.
    """
    us = ns / 1000
    while int(us * 1000) < ns:
        us = math.nextafter(us, math.inf)
    return us


def _prefix(timeline: Timeline) -> str:
    """How ranks are named: ``stage`` when each holds one stage, else ``rank``."""
    return "stage" if timeline.virtual_stages == 1 else "rank"


def _name(timeline: Timeline, event: Event) -> str:
    """``F3``, ``B3`` (``4F3`` for stage 4 when ranks hold several), ``F3 to 2``, ``B3 from 1``,
    ``all-reduce``, ``optimizer``, ``idle``. Perfetto colours a slice by its name without
    digits, so each kind (and sends of activations apart from sends of gradients) gets one
    colour."""
    kind = event.kind
    if kind in (EventKind.IDLE, EventKind.OPTIMIZER):
        return kind.value
    if kind is EventKind.ALLREDUCE:
        return "all-reduce" if timeline.virtual_stages == 1 else f"all-reduce {event.stage}"
    if kind is EventKind.COLLECTIVE:
        stage = str(event.stage) if timeline.virtual_stages > 1 else ""
        return f"{stage}{'F' if event.forward else 'B'}{event.microbatch} collectives"
    if kind in (EventKind.SEND, EventKind.RECV):
        assert event.stage is not None and event.peer is not None
        forward = event.peer > event.stage if kind is EventKind.SEND else event.peer < event.stage
        return f"{'F' if forward else 'B'}{event.microbatch} {'to' if kind is EventKind.SEND else 'from'} {event.peer}"
    stage = str(event.stage) if timeline.virtual_stages > 1 else ""
    return f"{stage}{'F' if kind is EventKind.FORWARD else 'B'}{event.microbatch}"


def _args(event: Event) -> dict[str, Any]:
    """What a viewer shows on selecting the event: stage, microbatch, the other end of a transfer."""
    args: dict[str, Any] = {}
    if event.stage is not None:
        args["stage"] = event.stage
    if event.microbatch is not None:
        args["microbatch"] = event.microbatch
    if event.kind is EventKind.SEND and event.peer is not None and event.stage is not None:
        args["to_stage"] = event.peer
        args["carries"] = "activations" if event.peer > event.stage else "gradients"
    if event.kind is EventKind.RECV and event.peer is not None and event.stage is not None:
        args["from_stage"] = event.peer
        args["carries"] = "activations" if event.peer < event.stage else "gradients"
    return args


def _threads(rank: RankTimeline, ranks: int) -> dict[tuple[str, int], list[Event]]:
    """The rank's events by thread, ``(lane, sending rank or -1)``, in lane order, each by start."""
    threads: dict[tuple[str, int], list[Event]] = {("compute", -1): []}
    for event in rank.events:
        lane = _LANE_OF[event.kind]
        sender = event.peer % ranks if lane == "recv" and event.peer is not None else -1
        threads.setdefault((lane, sender), []).append(event)
    ordered = sorted(threads.items(), key=lambda kv: (_LANES.index(kv[0][0]), kv[0][1]))
    return {key: sorted(events, key=lambda e: (e.start_s, e.end_s)) for key, events in ordered}


def _complete(timeline: Timeline, event: Event, pid: int, tid: int) -> dict[str, Any]:
    """The event as a complete event (``"ph": "X"``), bound to its microbatch's flow."""
    start, end = _ns(event.start_s), _ns(event.end_s)
    span: dict[str, Any] = {
        "ph": "X", "name": _name(timeline, event), "cat": event.kind.value,
        "ts": _us(start), "dur": _us(end - start), "pid": pid, "tid": tid, "args": _args(event),
    }
    if event.microbatch is not None and event.kind is not EventKind.RECV:
        # One flow (v2: bind_id) per microbatch, through its forwards, sends and backwards in time order.
        first = event.kind is EventKind.FORWARD and event.stage == 0
        last = event.kind is EventKind.BACKWARD and event.stage == 0
        span.update(bind_id=event.microbatch + 1, flow_in=not first, flow_out=not last)
    return span


def _summary(timeline: Timeline) -> dict[str, Any]:
    return {
        "schedule": timeline.schedule.value,
        "ranks": len(timeline.ranks),
        "virtual_stages": timeline.virtual_stages,
        "microbatches": timeline.microbatches,
        "overlap_allreduce": timeline.overlap_allreduce,
        "step_time_s": float(timeline.step_time_s),
        "bubble_fraction": float(timeline.bubble_fraction),
        "peak_memory_bytes": list(timeline.peak_memory_bytes),
    }


def chrome_trace(timeline: Timeline, *, title: str | None = None) -> dict[str, Any]:
    """The timeline in the Trace Event Format (the JSON chrome://tracing, Perfetto and
    ``torch.profiler``'s ``export_chrome_trace`` use); see the module docstring for the layout.

    Args:
        timeline: What `simulate` returned.
        title: Kept under ``otherData`` with the schedule, step time and bubble;
            None says the schedule and sizes.

    Returns:
        ``{"traceEvents": [...], "otherData": {...}}``, plain JSON data: ``json.dumps``
        writes it as it is.
    """
    p = len(timeline.ranks)
    prefix = _prefix(timeline)
    meta: list[dict[str, Any]] = []
    spans: list[dict[str, Any]] = []
    counters: list[dict[str, Any]] = []
    # Ids from 1 (Perfetto keeps 0 for the idle task); tids unique in the trace and apart from
    # every pid (Perfetto looks a thread up by its tid alone, and a tid equal to a pid is that
    # process's main thread).
    next_tid = p + 1
    for rank in timeline.ranks:
        pid = rank.rank + 1
        stages = f"stages {', '.join(map(str, rank.stages))} on " if timeline.virtual_stages > 1 else ""
        meta.append({"ph": "M", "name": "process_name", "pid": pid, "ts": 0,
                     "args": {"name": f"{prefix} {rank.rank}: {stages}{', '.join(rank.devices)}"}})
        meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "ts": 0, "args": {"sort_index": rank.rank}})
        compute_tid = next_tid
        for order, ((lane, sender), events) in enumerate(_threads(rank, p).items()):
            tid, next_tid = next_tid, next_tid + 1
            thread = f"recv from {prefix} {sender}" if lane == "recv" else lane
            meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "ts": 0, "args": {"name": thread}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "ts": 0,
                         "args": {"sort_index": order}})
            spans += (_complete(timeline, event, pid, tid) for event in events)
        for time_s, used in rank.memory:
            counters.append({"ph": "C", "name": "memory", "pid": pid, "tid": compute_tid,
                             "ts": _us(_ns(time_s)), "args": {"bytes": used}})
    summary = _summary(timeline)
    default = f"{timeline.schedule.value}: {p} {prefix}s, {timeline.microbatches} microbatches"
    # No "displayTimeUnit": older trace processors scaled every time by it (``"ns"``
    # read microseconds as nanoseconds); without it, every reader takes microseconds.
    return {
        "traceEvents": meta + spans + counters,
        "otherData": {"title": title if title is not None else default, "generator": "partitioner", **summary},
    }


def write_chrome_trace(timeline: Timeline, path: str | Path, *, title: str | None = None) -> Path:
    """Write `chrome_trace` of the timeline to `path`: JSON, gzipped when the suffix is ``.gz``
    (``step.json.gz``; Perfetto and chrome://tracing open both).

    Returns:
        `path`, as a Path.

    Raises:
        ValueError: The suffix is not ``.json`` or ``.gz``.
    """
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"write_chrome_trace writes .json or .json.gz files (got {path.name!r})")
    # UTF-8 as it is: Perfetto's JSON tokenizer stops at a \uXXXX escape (json.dumps' default).
    data = json.dumps(chrome_trace(timeline, title=title), separators=(",", ":"), ensure_ascii=False).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix.lower() == ".gz" else data)
    return path
