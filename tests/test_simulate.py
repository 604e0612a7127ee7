"""The pipeline simulator on hand cases and textbook figures: GPipe, 1F1B, interleaved 1F1B."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.simulate import (
    EventKind,
    PipelineSchedule,
    StageCost,
    Timeline,
    chrome_trace,
    gpipe_step_time,
    ideal_bubble_fraction,
    peak_inflight_microbatches,
    gantt_figure,
    rank_actions,
    render_timeline,
    simulate,
    uniform_step_time,
    write_chrome_trace,
)
from partitioner.simulate.render import ascii_timeline, time_unit

GPIPE, ONE_F_ONE_B = PipelineSchedule.GPIPE, PipelineSchedule.ONE_F_ONE_B
INTERLEAVED = PipelineSchedule.INTERLEAVED_1F1B


def uniform(p: int, f: float = 1.0, b: float = 2.0, *, v: int = 1, **extra: int) -> list[StageCost]:
    """``p * v`` equal stages; stage ``j`` on device ``d{j % p}``."""
    return [StageCost(fwd_s=f, bwd_s=b, devices=(f"d{j % p}",), **extra) for j in range(p * v)]


def spans(timeline: Timeline, rank: int, *kinds: EventKind) -> list[tuple[str, float, float]]:
    """``(label, start, end)`` of a rank's events of the given kinds, like ``("F0", 0, 1)``."""
    letter = {EventKind.FORWARD: "F", EventKind.BACKWARD: "B", EventKind.SEND: "S", EventKind.ALLREDUCE: "AR",
              EventKind.OPTIMIZER: "OPT"}
    return [
        (f"{letter[e.kind]}{'' if e.microbatch is None else e.microbatch}", e.start_s, e.end_s)
        for e in timeline.ranks[rank].of_kind(*kinds)
    ]


def assert_timeline_valid(timeline: Timeline, stages: Sequence[StageCost]) -> None:
    """The invariants of every simulated step: dependencies, lanes, accounting, memory."""
    m, p = timeline.microbatches, len(timeline.ranks)
    tol = 1e-9 * max(1.0, timeline.step_time_s)
    compute: dict[tuple[bool, int, int], tuple[float, float]] = {}
    for row in timeline.ranks:
        working = (EventKind.FORWARD, EventKind.BACKWARD, EventKind.OPTIMIZER)  # the compute lane, but idle
        held = [e for e in row.of_kind(EventKind.SEND) if stages[e.stage].host_sends]  # they hold it too
        on_lane = sorted([*row.of_kind(*working, EventKind.IDLE), *held], key=lambda e: (e.start_s, e.end_s))
        lanes = [on_lane, row.of_kind(EventKind.SEND)]
        for lane in lanes:  # one thing at a time on the compute lane and on the link
            for a, b in itertools.pairwise(lane):
                assert b.start_s >= a.end_s - tol, (a, b)
        for e in row.of_kind(EventKind.FORWARD, EventKind.BACKWARD):
            assert e.stage is not None and e.microbatch is not None and e.stage % p == row.rank
            cost = stages[e.stage]
            assert math.isclose(e.duration_s, cost.fwd_s if e.kind is EventKind.FORWARD else cost.bwd_s, abs_tol=tol)
            compute[(e.kind is EventKind.FORWARD, e.stage, e.microbatch)] = (e.start_s, e.end_s)
        # One optimizer step for the rank's stages together, after its backwards and all-reduces.
        owed = sum(stages[s].optimizer_s for s in row.stages)
        steps = row.of_kind(EventKind.OPTIMIZER)
        assert len(steps) == (1 if owed else 0) and all(math.isclose(e.duration_s, owed, abs_tol=tol) for e in steps)
        before = row.of_kind(EventKind.FORWARD, EventKind.BACKWARD, EventKind.ALLREDUCE)
        assert all(e.start_s >= max(b.end_s for b in before) - tol for e in steps)
        busy = sum(e.duration_s for e in row.of_kind(*working)) + sum(e.duration_s for e in held)
        idle = sum(e.duration_s for e in row.of_kind(EventKind.IDLE))
        assert math.isclose(busy, row.busy_s, abs_tol=tol)
        assert math.isclose(busy + idle, timeline.step_time_s, abs_tol=10 * tol)
        assert row.memory[0][0] == 0 and row.memory[-1][1] == row.static_bytes  # all freed at the end
        assert all(b >= row.static_bytes for _, b in row.memory)
        assert max(b for _, b in row.memory) == row.peak_memory_bytes
    assert len(compute) == 2 * m * len(stages)
    last = len(stages) - 1
    for (forward, s, i), (start, end) in compute.items():
        if forward and s > 0:
            assert start >= compute[(True, s - 1, i)][1] + stages[s - 1].send_fwd_s - tol
        if not forward:
            assert start >= compute[(True, s, i)][1] - tol
            if s < last:
                assert start >= compute[(False, s + 1, i)][1] + stages[s + 1].send_bwd_s - tol
    lost = sum(timeline.step_time_s - r.busy_s for r in timeline.ranks)
    assert math.isclose(timeline.bubble_fraction, lost / (p * timeline.step_time_s) if lost else 0)


# --- Textbook figures -----------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("schedule", [GPIPE, ONE_F_ONE_B])
def test_equal_stages_reach_the_textbook_step_and_bubble(p: int, m: int, schedule: PipelineSchedule) -> None:
    f, b = 1.0, 2.0
    t = simulate(uniform(p, f, b), m, schedule)
    assert math.isclose(t.step_time_s, (m + p - 1) * (f + b))
    assert math.isclose(t.bubble_fraction, (p - 1) / (m + p - 1))
    assert math.isclose(t.step_time_s, uniform_step_time(schedule, p, m, f, b))
    assert math.isclose(t.bubble_fraction, ideal_bubble_fraction(p, m))
    assert_timeline_valid(t, uniform(p, f, b))


def test_exact_fractions_give_the_exact_bubble() -> None:
    third = Fraction(1, 3)  # any numbers.Real is taken; arithmetic stays in Fractions
    stages = [StageCost(fwd_s=third, bwd_s=2 * third, devices=(f"d{s}",)) for s in range(4)]  # type: ignore[arg-type]
    t = simulate(stages, 6, ONE_F_ONE_B)
    assert t.step_time_s == 9 and t.bubble_fraction == Fraction(1, 3)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_one_f_one_b_keeps_p_minus_s_microbatches_in_flight_where_gpipe_keeps_m(p: int, m: int) -> None:
    act, static = 1000, 5
    stages = uniform(p, activation_bytes=act, static_bytes=static)
    gpipe, ofob = simulate(stages, m, GPIPE), simulate(stages, m, ONE_F_ONE_B)
    assert [r.peak_inflight_microbatches for r in gpipe.ranks] == [m] * p
    assert [r.peak_inflight_microbatches for r in ofob.ranks] == [min(p - s, m) for s in range(p)]
    assert peak_inflight_microbatches(ONE_F_ONE_B, p, m) == tuple(min(p - s, m) for s in range(p))
    assert peak_inflight_microbatches(GPIPE, p, m) == (m,) * p
    assert gpipe.peak_memory_bytes == (static + m * act,) * p
    assert ofob.peak_memory_bytes == tuple(static + min(p - s, m) * act for s in range(p))
    assert [r.peak_activation_bytes for r in ofob.ranks] == [min(p - s, m) * act for s in range(p)]


@pytest.mark.parametrize(("p", "v"), [(2, 2), (3, 2), (4, 2), (4, 3), (2, 4)])
@pytest.mark.parametrize("m_over_p", [1, 1.5, 2, 3])
def test_interleaving_shrinks_the_bubble_to_p_minus_1_over_vm_plus_p_minus_1(p: int, v: int, m_over_p: float) -> None:
    """Narayanan et al. 2021 (arXiv:2104.04473) section 2.2, with the rank's f, b split over v stages.

    ``m = 1.5 p`` is one uneven round in torch's schedule (``m`` not a multiple of ``p``).
    """
    m, f, b = round(m_over_p * p), 1.0, 2.0
    stages = uniform(p, f / v, b / v, v=v)
    t = simulate(stages, m, INTERLEAVED, virtual_stages=v)
    assert math.isclose(t.bubble_fraction, (p - 1) / (v * m + p - 1))
    assert math.isclose(t.step_time_s, (m + (p - 1) / v) * (f + b))
    assert math.isclose(t.step_time_s, uniform_step_time(INTERLEAVED, p, m, f / v, b / v, v))
    assert math.isclose(t.bubble_fraction, ideal_bubble_fraction(p, m, v))
    assert t.bubble_fraction < simulate(uniform(p, f, b), m, ONE_F_ONE_B).bubble_fraction
    assert_timeline_valid(t, stages)


def test_interleaving_fewer_microbatches_than_ranks_misses_the_figure() -> None:
    p, v, m = 4, 2, 3  # a rank waits for microbatch 0 to come round before its second stage
    t = simulate(uniform(p, 0.5, 1.0, v=v), m, INTERLEAVED, virtual_stages=v)
    assert_timeline_valid(t, uniform(p, 0.5, 1.0, v=v))
    assert t.bubble_fraction == 0.4 > ideal_bubble_fraction(p, m, v)
    with pytest.raises(ValueError, match="at least as many microbatches as ranks"):
        uniform_step_time(INTERLEAVED, p, m, 0.5, 1.0, v)


# --- Orders ---------------------------------------------------------------------------------


def test_orders_are_torch_pipelining_orders() -> None:
    def text(schedule: PipelineSchedule | str, p: int, m: int, v: int = 1) -> list[str]:
        return [" ".join(map(str, order)) for order in rank_actions(schedule, p, m, v)]

    assert text(GPIPE, 2, 3) == ["0F0 0F1 0F2 0B0 0B1 0B2", "1F0 1F1 1F2 1B0 1B1 1B2"]
    assert text("gpipe", 2, 3) == text("GPIPE", 2, 3) == text(GPIPE, 2, 3)
    assert text(ONE_F_ONE_B, 4, 6) == [
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",
        "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1B4 1B5",
        "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2B5",
        "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5",
    ]
    # ScheduleInterleaved1F1B(...).pipeline_order in torch 2.x, None padding dropped.
    assert text(INTERLEAVED, 2, 4, 2) == [
        "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
        "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
    ]


def test_ascii_shows_the_order_of_a_two_by_two_pipeline() -> None:
    gpipe, ofob = simulate(uniform(2), 2, GPIPE), simulate(uniform(2), 2, ONE_F_ONE_B)
    rows = {name: str(t).splitlines()[1:3] for name, t in (("gpipe", gpipe), ("1f1b", ofob))}
    order = {name: [re.findall(r"[FB]\d", row) for row in r] for name, r in rows.items()}
    assert order["gpipe"] == [["F0", "F1", "B0", "B1"], ["F0", "F1", "B0", "B1"]]
    assert order["1f1b"] == [["F0", "F1", "B0", "B1"], ["F0", "B0", "F1", "B1"]]
    assert rows["gpipe"][0].startswith("s0 |F0|F1|.") and rows["gpipe"][1].startswith("s1 ...|F0|")
    assert str(gpipe).splitlines()[0] == "gpipe: 2 stages, 2 microbatches; step 9 s, bubble 33.3%"
    assert len(gpipe.ascii(width=60).splitlines()[1]) <= len("s0 ") + 61


# --- Sends, unequal stages, all-reduce ----------------------------------------------------------


def two_stages() -> list[StageCost]:
    """f = 1, b = 2; activations take 0.5 s to go on, gradients 0.25 s to come back."""
    return [
        StageCost(fwd_s=1, bwd_s=2, send_fwd_s=0.5, devices=("a0", "a1")),
        StageCost(fwd_s=1, bwd_s=2, send_bwd_s=0.25, devices=("b0", "b1")),
    ]


def test_sends_lie_on_the_critical_path_of_a_two_stage_gpipe() -> None:
    t = simulate(two_stages(), 2, GPIPE)
    f, c = EventKind.FORWARD, EventKind.BACKWARD
    assert spans(t, 0, f, c) == [("F0", 0, 1), ("F1", 1, 2), ("B0", 5.75, 7.75), ("B1", 7.75, 9.75)]
    assert spans(t, 0, EventKind.SEND) == [("S0", 1, 1.5), ("S1", 2, 2.5)]
    assert spans(t, 1, f, c) == [("F0", 1.5, 2.5), ("F1", 2.5, 3.5), ("B0", 3.5, 5.5), ("B1", 5.5, 7.5)]
    assert spans(t, 1, EventKind.SEND) == [("S0", 5.5, 5.75), ("S1", 7.5, 7.75)]
    assert t.step_time_s == 9 + 0.5 + 0.25  # one send each way on the critical path
    recv = t.ranks[1].of_kind(EventKind.RECV)[0]
    assert (recv.stage, recv.peer, recv.start_s, recv.end_s) == (1, 0, 1, 1.5)
    assert t.step_time_s == gpipe_step_time(two_stages(), 2)
    assert_timeline_valid(t, two_stages())


def test_a_cpu_stage_s_sends_hold_its_compute_lane() -> None:
    """The two stages above on CPUs (`host_sends`): each send is made as before, but its
    rank computes nothing else until it has left (forward 1 of stage 0 waits for send 0);
    each stage's period holds its sends, and the step grows by them."""
    held = [replace(s, host_sends=True) for s in two_stages()]
    t = simulate(held, 2, GPIPE)
    f, c = EventKind.FORWARD, EventKind.BACKWARD
    assert spans(t, 0, f) == [("F0", 0, 1), ("F1", 1.5, 2.5)]
    assert spans(t, 0, EventKind.SEND) == [("S0", 1, 1.5), ("S1", 2.5, 3.0)]
    assert spans(t, 1, f, c) == [("F0", 1.5, 2.5), ("F1", 3.0, 4.0), ("B0", 4.0, 6.0), ("B1", 6.25, 8.25)]
    assert spans(t, 1, EventKind.SEND) == [("S0", 6.0, 6.25), ("S1", 8.25, 8.5)]
    assert spans(t, 0, c) == [("B0", 6.25, 8.25), ("B1", 8.5, 10.5)]
    assert t.step_time_s == 10.5 == gpipe_step_time(held, 2) > simulate(two_stages(), 2, GPIPE).step_time_s
    # The held sends are busy time, not bubble: rank 0 idles only between its passes.
    assert t.ranks[0].busy_s == 7.0
    assert [(e.start_s, e.end_s) for e in t.ranks[0].of_kind(EventKind.IDLE)] == [(3.0, 6.25), (8.25, 8.5)]
    assert_timeline_valid(t, held)


def test_a_rank_sends_one_microbatch_at_a_time() -> None:
    slow_link = [StageCost(fwd_s=1, bwd_s=0, send_fwd_s=2, devices=("a",)), StageCost(fwd_s=1, bwd_s=0, devices=("b",))]
    t = simulate(slow_link, 3, GPIPE)
    assert spans(t, 0, EventKind.SEND) == [("S0", 1, 3), ("S1", 3, 5), ("S2", 5, 7)]
    assert [s for _, s, _ in spans(t, 1, EventKind.FORWARD)] == [3, 5, 7]
    assert t.step_time_s == 8 == gpipe_step_time(slow_link, 3)


def test_the_slowest_stage_sets_the_pace_of_an_unequal_gpipe() -> None:
    f, b, m = [1.0, 3.0, 2.0], [2.0, 6.0, 4.0], 4
    stages = [StageCost(fwd_s=f[s], bwd_s=b[s], devices=(f"d{s}",)) for s in range(3)]
    t = simulate(stages, m, GPIPE)
    # Forward: sum 6 + 3 x 3 = 15; backward: sum 12 + 3 x 6 = 30.
    assert t.step_time_s == 45 == (m - 1) * max(f) + sum(f) + (m - 1) * max(b) + sum(b)
    assert t.step_time_s == gpipe_step_time(stages, m)
    assert simulate(stages, m, ONE_F_ONE_B).step_time_s <= t.step_time_s
    assert_timeline_valid(t, stages)


seconds = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 3.0]) | st.floats(0, 4, allow_nan=False)


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[StageCost], int]:
    p = draw(st.integers(1, 5))
    stages = [
        StageCost(
            fwd_s=draw(seconds),
            bwd_s=draw(seconds),
            send_fwd_s=draw(seconds) if s < p - 1 else 0.0,
            send_bwd_s=draw(seconds) if s > 0 else 0.0,
            allreduce_s=draw(seconds),
            optimizer_s=draw(seconds),
            activation_bytes=draw(st.integers(0, 100)),
            static_bytes=draw(st.integers(0, 100)),
            host_sends=draw(st.booleans()),
            devices=(f"a{s}", f"b{s}"),
        )
        for s in range(p)
    ]
    return stages, draw(st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(pipelines(), st.booleans())
def test_gpipe_step_time_is_the_simulated_step_time(pipeline: tuple[list[StageCost], int], overlap: bool) -> None:
    stages, m = pipeline
    t = simulate(stages, m, GPIPE, overlap_allreduce=overlap)
    closed = gpipe_step_time(stages, m, overlap_allreduce=overlap)
    assert math.isclose(t.step_time_s, closed, rel_tol=1e-9, abs_tol=1e-12)
    assert_timeline_valid(t, stages)


@settings(max_examples=100, deadline=None)
@given(pipelines(), st.booleans())
def test_one_f_one_b_timelines_are_valid(pipeline: tuple[list[StageCost], int], overlap: bool) -> None:
    stages, m = pipeline
    t = simulate(stages, m, ONE_F_ONE_B, overlap_allreduce=overlap)
    assert_timeline_valid(t, stages)
    assert t.peak_memory_bytes == tuple(
        s.static_bytes + min(len(stages) - j, m) * s.activation_bytes for j, s in enumerate(stages)
    )


def test_allreduce_adds_to_the_step_and_overlap_hides_it() -> None:
    plain = simulate(uniform(2), 2, GPIPE).step_time_s
    assert plain == 9  # stage 1's last backward ends at 7, stage 0's at 9
    short = [StageCost(fwd_s=1, bwd_s=2, allreduce_s=1.5, devices=(f"a{s}", f"b{s}")) for s in range(2)]
    serial = simulate(short, 2, GPIPE)
    assert serial.step_time_s == plain + 1.5
    assert spans(serial, 0, EventKind.ALLREDUCE) == [("AR", 9, 10.5)]
    assert spans(serial, 1, EventKind.ALLREDUCE) == [("AR", 7, 8.5)]  # while stage 0 still computes
    overlapped = simulate(short, 2, GPIPE, overlap_allreduce=True)
    assert overlapped.step_time_s == plain  # 1.5 s of all-reduce fits under the last 2 s backward
    assert spans(overlapped, 0, EventKind.ALLREDUCE) == [("AR", 7, 9)]
    long = [StageCost(fwd_s=1, bwd_s=2, allreduce_s=3, devices=(f"a{s}", f"b{s}")) for s in range(2)]
    assert simulate(long, 2, GPIPE).step_time_s == plain + 3
    assert simulate(long, 2, GPIPE, overlap_allreduce=True).step_time_s == plain + 3 - 2
    for timeline, stages in ((serial, short), (overlapped, short)):
        assert timeline.step_time_s == gpipe_step_time(stages, 2, overlap_allreduce=timeline.overlap_allreduce)


def test_the_optimizer_step_follows_the_allreduce_and_nothing_hides_it() -> None:
    """The two stages of `test_allreduce_adds_to_the_step_and_overlap_hides_it` (f = 1, b = 2,
    a 1.5 s all-reduce), stepping their optimizers in 0.5 s (stage 0) and 0.25 s (stage 1).
    Serial: stage 0 all-reduces over [9, 10.5], then steps over [10.5, 11]; stage 1 over
    [7, 8.5], then [8.5, 8.75]. Overlapped: stage 0's all-reduce ends with its backward at
    9, its step over [9, 9.5]. Either way the step grows by stage 0's 0.5 s exactly."""
    short = [StageCost(fwd_s=1, bwd_s=2, allreduce_s=1.5, devices=(f"a{s}", f"b{s}")) for s in range(2)]
    stepped = [replace(s, optimizer_s=o) for s, o in zip(short, (0.5, 0.25))]
    for overlap, ends in ((False, (11, 8.75)), (True, (9.5, 7.25))):
        bare = simulate(short, 2, GPIPE, overlap_allreduce=overlap)
        timeline = simulate(stepped, 2, GPIPE, overlap_allreduce=overlap)
        assert bare.ranks[0].of_kind(EventKind.OPTIMIZER) == ()
        assert timeline.step_time_s == bare.step_time_s + 0.5 == ends[0]
        assert [spans(timeline, r, EventKind.OPTIMIZER) for r in (0, 1)] == [
            [("OPT", ends[0] - 0.5, ends[0])], [("OPT", ends[1] - 0.25, ends[1])]]
        assert timeline.step_time_s == gpipe_step_time(stepped, 2, overlap_allreduce=overlap)
        assert_timeline_valid(timeline, stepped)
    one_f_one_b = simulate(stepped, 2, ONE_F_ONE_B, overlap_allreduce=True)
    assert one_f_one_b.step_time_s == simulate(short, 2, ONE_F_ONE_B, overlap_allreduce=True).step_time_s + 0.5
    assert "|opt|" in ascii_timeline(timeline, width=76) and str(timeline.ranks[0].of_kind(EventKind.OPTIMIZER)[0]) == "OPT [9, 9.5]"
    names = {e["name"] for e in chrome_trace(timeline)["traceEvents"] if e.get("cat") == "optimizer"}
    assert names == {"optimizer"}
    gantt_figure(timeline)  # draws it on the compute row (matplotlib, no file)


def test_an_interleaved_rank_all_reduces_its_stages_one_after_the_other() -> None:
    p, v, m = 2, 2, 2
    stages = [StageCost(fwd_s=0.5, bwd_s=1, allreduce_s=1, devices=(f"a{j % p}", f"b{j % p}")) for j in range(p * v)]
    t = simulate(stages, m, INTERLEAVED, virtual_stages=v)
    plain = simulate(uniform(p, 0.5, 1, v=v), m, INTERLEAVED, virtual_stages=v)
    for rank, bare in zip(t.ranks, plain.ranks):
        done = max(e.end_s for e in bare.of_kind(EventKind.BACKWARD))
        reduces = rank.of_kind(EventKind.ALLREDUCE)
        assert [(e.start_s, e.end_s) for e in reduces] == [(done, done + 1), (done + 1, done + 2)]
    assert t.step_time_s == plain.step_time_s + 2
    # Then one optimizer step per rank, for its two stages together.
    stepped = simulate([replace(s, optimizer_s=0.25) for s in stages], m, INTERLEAVED, virtual_stages=v)
    assert stepped.step_time_s == plain.step_time_s + 2 + 0.5
    for rank, bare in zip(stepped.ranks, plain.ranks):
        done = max(e.end_s for e in bare.of_kind(EventKind.BACKWARD))
        assert spans(stepped, rank.rank, EventKind.OPTIMIZER) == [("OPT", done + 2, done + 2.5)]


def test_interleaved_memory_counts_every_stage_of_the_rank() -> None:
    p, v, m = 2, 2, 4
    stages = [StageCost(fwd_s=1, bwd_s=2, activation_bytes=10 * (j + 1), static_bytes=j, devices=(f"d{j % p}",))
              for j in range(p * v)]
    t = simulate(stages, m, INTERLEAVED, virtual_stages=v)
    assert [r.stages for r in t.ranks] == [(0, 2), (1, 3)]
    assert [r.static_bytes for r in t.ranks] == [0 + 2, 1 + 3]
    assert [r.peak_inflight_microbatches for r in t.ranks] == list(peak_inflight_microbatches(INTERLEAVED, p, m, v))
    assert_timeline_valid(t, stages)



@pytest.mark.parametrize("schedule", list(PipelineSchedule))
def test_peak_inflight_counts_equal_a_walk_of_each_ranks_actions(schedule: PipelineSchedule) -> None:
    for p in range(1, 7):
        for v in ([2, 3, 4] if schedule is INTERLEAVED else [1]):
            for m in range(1, 4 * p + 3):
                try:
                    orders = rank_actions(schedule, p, m, v)
                except ValueError:
                    continue  # a count interleaving refuses
                walked = []
                for order in orders:
                    live = peak = 0
                    for action in order:
                        live += 1 if action.forward else -1
                        peak = max(peak, live)
                    walked.append(peak)
                assert peak_inflight_microbatches(schedule, p, m, v) == tuple(walked), (p, m, v)

# --- Validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fwd_s": -1.0}, "fwd_s must be a finite number of seconds >= 0"),
        ({"bwd_s": math.nan}, "bwd_s must be a finite number"),
        ({"send_fwd_s": math.inf}, "send_fwd_s must be a finite number"),
        ({"fwd_s": True}, "fwd_s must be"),
        ({"activation_bytes": 1.5}, "activation_bytes must be an integer number of bytes"),
        ({"static_bytes": -1}, "static_bytes must be an integer"),
        ({"devices": ()}, "at least one device"),
        ({"devices": "cuda:0"}, "tuple of device names"),
        ({"devices": ("a", "a")}, "appears twice"),
        ({"allreduce_s": -1.0}, "allreduce_s must be a finite number of seconds >= 0"),
        ({"optimizer_s": math.inf}, "optimizer_s must be a finite number of seconds >= 0"),
    ],
)
def test_stage_cost_rejects_bad_numbers(fields: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {"fwd_s": 1.0, "bwd_s": 2.0, "devices": ("a",)} | fields
    with pytest.raises(ValueError, match=message):
        StageCost(**kwargs)  # type: ignore[arg-type]


def test_stage_cost_takes_a_list_of_devices() -> None:
    assert StageCost(fwd_s=1, bwd_s=1, devices=["a", "b"]).devices == ("a", "b")  # type: ignore[arg-type]


def one_device(name: str) -> StageCost:
    return StageCost(fwd_s=1, bwd_s=1, devices=(name,))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: simulate(uniform(2), 0, GPIPE), "microbatches must be an integer >= 1"),
        (lambda: simulate(uniform(2), 2.0, GPIPE), "microbatches must be an integer"),  # type: ignore[arg-type]
        (lambda: simulate([], 2, GPIPE), "at least one stage"),
        (lambda: simulate(uniform(2), 2, "pipedream"), "schedule must be one of gpipe, 1f1b"),
        (lambda: simulate(uniform(2), 2, GPIPE, virtual_stages=2), "one stage per rank"),
        (lambda: simulate(uniform(2, v=2), 2, INTERLEAVED), "virtual_stages >= 2"),
        (lambda: simulate(uniform(3), 3, INTERLEAVED, virtual_stages=2), "do not split evenly"),
        (lambda: simulate(uniform(4, v=2), 9, INTERLEAVED, virtual_stages=2), "not a multiple of 2 rounds"),
        (lambda: simulate(uniform(2, send_fwd_s=1), 2, GPIPE), "last stage sends nothing forward"),
        (lambda: simulate(uniform(2, send_bwd_s=1), 2, GPIPE), "first stage sends nothing back"),
        (lambda: simulate([one_device("a")] * 2, 2, GPIPE), "device 'a' is in stages 0 and 1"),
        (
            lambda: simulate([one_device(d) for d in "abac"], 2, INTERLEAVED, virtual_stages=2),
            "stages 1 and 3 run on rank 1, so they need the same devices",
        ),
        (lambda: gpipe_step_time(uniform(2), 0), "microbatches must be"),
        (lambda: ideal_bubble_fraction(0, 4), "ranks must be"),
    ],
)
def test_simulate_rejects_what_is_no_pipeline(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


# --- Rendering and purity -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_render_timeline_writes_a_gantt_chart(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    stages = [
        StageCost(fwd_s=1, bwd_s=2, send_fwd_s=0.25 if s < 2 else 0, send_bwd_s=0.25 if s else 0, allreduce_s=1,
                  devices=(f"cuda:{2 * s}", f"cuda:{2 * s + 1}"))
        for s in range(3)
    ]
    path = render_timeline(simulate(stages, 4, ONE_F_ONE_B), tmp_path / f"step{suffix}")
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data


def test_render_timeline_refuses_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png, \.svg"):
        render_timeline(simulate(uniform(2), 2, GPIPE), tmp_path / "step.jpg")


def test_the_simulator_runs_without_torch_or_matplotlib() -> None:
    # Load partitioner.simulate with torch and matplotlib unimportable, bypassing the
    # package's __init__ (the front door imports torch).
    script = f"""
import sys, types
sys.modules["torch"] = sys.modules["matplotlib"] = None
package = types.ModuleType("partitioner")
package.__path__ = [{str(Path(__file__).parents[1] / "partitioner")!r}]
sys.modules["partitioner"] = package
from partitioner.simulate import simulate, StageCost, PipelineSchedule
t = simulate([StageCost(fwd_s=1, bwd_s=2, devices=("a",))], 2, PipelineSchedule.GPIPE)
print(t.step_time_s)
print(t)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.splitlines()[0]) == 6


@pytest.mark.parametrize("step, unit", [(5.1, "s"), (1.0, "s"), (0.0584, "ms"), (1e-3, "ms"), (4e-4, "us")])
def test_time_unit_picks_what_the_step_reads_best_in(step: float, unit: str) -> None:
    factor, name = time_unit(step)
    assert name == unit and 1 <= step * factor < 1000


def test_gantt_axis_reads_in_ms_with_a_legend_for_each_stage_of_an_interleaved_rank() -> None:
    pytest.importorskip("matplotlib")
    stages = [
        StageCost(fwd_s=1e-3, bwd_s=2e-3, send_fwd_s=1e-4 if s < 7 else 0, send_bwd_s=1e-4 if s else 0,
                  devices=(f"cuda:{s % 4}",))
        for s in range(8)
    ]
    timeline = simulate(stages, 8, PipelineSchedule.INTERLEAVED_1F1B, virtual_stages=2)
    assert 1e-3 < timeline.step_time_s < 1
    fig = gantt_figure(timeline)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "time (ms)"
    assert ax.get_xlim()[1] == pytest.approx(timeline.step_time_s * 1e3)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels[:4] == ["forward, stages 0-3", "forward, stages 4-7", "backward, stages 0-3", "backward, stages 4-7"]


def test_gantt_of_a_deep_long_pipeline_shows_its_shape() -> None:
    pytest.importorskip("matplotlib")
    n, microbatches = 64, 256
    stages = [
        StageCost(fwd_s=1e-3, bwd_s=2e-3, send_fwd_s=1e-4 if s < n - 1 else 0, send_bwd_s=1e-4 if s else 0,
                  devices=(f"n{s // 8}/{s % 8}",))
        for s in range(n)
    ]
    timeline = simulate(stages, microbatches, ONE_F_ONE_B)
    fig = gantt_figure(timeline)
    (ax,) = fig.axes
    assert fig.get_figheight() <= 18
    assert len(ax.get_yticklabels()) <= 32 and ax.get_ylabel() == "64 stages, one in 2 labelled"
    boxes = sum(len(c.get_paths()) for c in ax.collections)
    events = sum(len(r.of_kind(EventKind.FORWARD, EventKind.BACKWARD, EventKind.SEND)) for r in timeline.ranks)
    assert boxes <= events // 10  # spans merged where under a pixel apart, not a sliver per event
    assert not ax.texts  # no microbatch numbers a pixel wide
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "forwards and backwards, too close to draw apart" in labels and "idle" in labels


# --- Chrome trace (Perfetto, chrome://tracing) ----------------------------------------------


def replicated(p: int = 3) -> list[StageCost]:
    """``p`` stages of two replicas each, with sends both ways and a gradient all-reduce."""
    return [
        StageCost(fwd_s=1e-3, bwd_s=2e-3, send_fwd_s=2.5e-4 if s < p - 1 else 0, send_bwd_s=2.5e-4 if s else 0,
                  allreduce_s=1e-3, activation_bytes=1000, static_bytes=500,
                  devices=(f"cuda:{2 * s}", f"cuda:{2 * s + 1}"))
        for s in range(p)
    ]


def perfetto_slices(trace: dict[str, Any]) -> dict[tuple[int, int], list[tuple[int, int, dict[str, Any]]]]:
    """``(pid, tid) -> [(start_ns, end_ns, event)]`` by start, as Perfetto's JSON importer reads
    times: ``int64(us * 1000)``, truncating."""
    threads: dict[tuple[int, int], list[tuple[int, int, dict[str, Any]]]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            start = int(e["ts"] * 1000)
            threads.setdefault((e["pid"], e["tid"]), []).append((start, start + int(e["dur"] * 1000), e))
    return {key: sorted(spans, key=lambda s: (s[0], s[1])) for key, spans in threads.items()}


def names(trace: dict[str, Any], what: str) -> dict[tuple[int, int | None], str]:
    """``(pid, tid) -> name`` of the ``process_name`` or ``thread_name`` metadata events."""
    return {(e["pid"], e.get("tid")): e["args"]["name"] for e in trace["traceEvents"] if e["name"] == what}


def test_chrome_trace_names_a_process_per_rank_and_a_thread_per_lane() -> None:
    trace = chrome_trace(simulate(replicated(), 4, ONE_F_ONE_B))
    processes = names(trace, "process_name")
    assert sorted(processes.values()) == [f"stage {s}: cuda:{2 * s}, cuda:{2 * s + 1}" for s in range(3)]
    threads = names(trace, "thread_name")
    middle = [name for (pid, _), name in sorted(threads.items()) if pid == 2]
    assert middle == ["compute", "send", "recv from stage 0", "recv from stage 2", "all-reduce"]
    assert [name for (pid, _), name in sorted(threads.items()) if pid == 1] == [
        "compute", "send", "recv from stage 1", "all-reduce"]
    pids = {pid for pid, _ in processes}
    assert len({tid for _, tid in threads}) == len(threads) and not pids & {tid for _, tid in threads}


def test_chrome_trace_of_interleaved_ranks_names_their_stages() -> None:
    stages = [StageCost(fwd_s=1, bwd_s=2, send_fwd_s=0.5 if s < 3 else 0, send_bwd_s=0.5 if s else 0,
                        devices=(f"cuda:{s % 2}",)) for s in range(4)]
    trace = chrome_trace(simulate(stages, 4, INTERLEAVED, virtual_stages=2))
    assert sorted(names(trace, "process_name").values()) == ["rank 0: stages 0, 2 on cuda:0",
                                                             "rank 1: stages 1, 3 on cuda:1"]
    assert {e["name"] for e in trace["traceEvents"] if e.get("cat") == "forward"} >= {"0F0", "2F3", "3F1"}


@pytest.mark.parametrize(
    "schedule, stages, v",
    [(GPIPE, replicated(), 1), (ONE_F_ONE_B, replicated(4), 1), (INTERLEAVED, replicated(4), 2)],
)
def test_chrome_trace_events_are_the_timelines_in_microseconds(
    schedule: PipelineSchedule, stages: list[StageCost], v: int
) -> None:
    if v > 1:  # two ranks holding stages r and r + 2
        stages = [replace(s, devices=stages[j % 2].devices) for j, s in enumerate(stages)]
    timeline = simulate(stages, 4, schedule, overlap_allreduce=True, virtual_stages=v)
    trace = chrome_trace(timeline)
    for rank in timeline.ranks:
        got = sorted(
            (e["ts"], e["dur"], e["cat"], e["args"].get("stage"), e["args"].get("microbatch"))
            for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == rank.rank + 1
        )
        want = sorted((e.start_s * 1e6, e.duration_s * 1e6, e.kind.value, e.stage, e.microbatch) for e in rank.events)
        assert len(got) == len(want)
        for (ts, dur, *what), (start, duration, *expected) in zip(got, want):
            assert what == expected
            assert ts == pytest.approx(start, abs=1e-3) and dur == pytest.approx(duration, abs=2e-3)
        memory = [e["args"]["bytes"] for e in trace["traceEvents"] if e["ph"] == "C" and e["pid"] == rank.rank + 1]
        assert max(memory) == rank.peak_memory_bytes and memory[-1] == rank.static_bytes
    ends = [end for spans in perfetto_slices(trace).values() for _, end, _ in spans]
    assert max(ends) == round(timeline.step_time_s * 1e9)  # the trace spans the step
    assert trace["otherData"]["step_time_s"] == timeline.step_time_s


@settings(max_examples=100, deadline=None)
@given(pipelines(), st.sampled_from([GPIPE, ONE_F_ONE_B]), st.sampled_from([1.0, 1.001e-3, 3.7e-6]))
def test_chrome_trace_threads_nest_as_perfetto_reads_them(
    pipeline: tuple[list[StageCost], int], schedule: PipelineSchedule, scale: float
) -> None:
    """No two events of one thread overlap, by a nanosecond even (Perfetto drops events that
    do not nest), and the trace ends where the step does."""
    stages, m = pipeline
    fields = ("fwd_s", "bwd_s", "send_fwd_s", "send_bwd_s", "allreduce_s", "optimizer_s")
    stages = [replace(s, **{f: getattr(s, f) * scale for f in fields}) for s in stages]
    timeline = simulate(stages, m, schedule)
    spans = perfetto_slices(chrome_trace(timeline))
    for thread in spans.values():
        for (_, end, a), (start, _, b) in itertools.pairwise(thread):
            assert start >= end, (a, b)
    assert max((end for thread in spans.values() for _, end, _ in thread), default=0) == round(
        timeline.step_time_s * 1e9)


def test_chrome_trace_follows_each_microbatch_with_one_flow() -> None:
    timeline = simulate(replicated(), 3, ONE_F_ONE_B)
    trace = chrome_trace(timeline)
    for i in range(3):
        chain = sorted((e for e in trace["traceEvents"] if e.get("bind_id") == i + 1), key=lambda e: e["ts"])
        assert [e["name"] for e in chain] == [f"F{i}", f"F{i} to 1", f"F{i}", f"F{i} to 2", f"F{i}", f"B{i}",
                                              f"B{i} to 1", f"B{i}", f"B{i} to 0", f"B{i}"]
        assert [(e["flow_in"], e["flow_out"]) for e in chain] == [(False, True)] + [(True, True)] * 8 + [(True, False)]


def test_chrome_trace_round_trips_through_json_with_exact_times() -> None:
    third = Fraction(1, 3)
    stages = [StageCost(fwd_s=third, bwd_s=2 * third, send_fwd_s=third if s == 0 else 0,  # type: ignore[arg-type]
                        send_bwd_s=third if s else 0, devices=(f"d{s}",)) for s in range(2)]
    trace = chrome_trace(simulate(stages, 2, GPIPE), title="two thirds")
    assert json.loads(json.dumps(trace)) == trace
    assert trace["otherData"]["title"] == "two thirds"
    assert "displayTimeUnit" not in trace  # older trace processors scaled every time by it
    f1 = next(e for e in trace["traceEvents"] if e["name"] == "F1" and e["pid"] == 1)
    assert (f1["ts"], f1["dur"]) == (333333.333, 333333.334)  # 1/3 s to 2/3 s, each end to the nanosecond


@pytest.mark.parametrize("name", ["step.json", "step.json.gz"])
def test_write_chrome_trace_writes_json_or_gzipped_json(tmp_path: Path, name: str) -> None:
    timeline = simulate(replicated(), 2, GPIPE)
    path = write_chrome_trace(timeline, tmp_path / name, title="modèle")
    data = path.read_bytes()
    text = gzip.decompress(data) if name.endswith(".gz") else data
    assert json.loads(text) == chrome_trace(timeline, title="modèle")
    assert "modèle".encode() in text and b"\\u" not in text  # no \uXXXX escapes: Perfetto's tokenizer stops at them


def test_write_chrome_trace_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"writes \.json or \.json\.gz files \(got 'step\.png'\)"):
        write_chrome_trace(simulate(uniform(2), 2, GPIPE), tmp_path / "step.png")
    assert list(tmp_path.iterdir()) == []


def test_collectives_inside_a_pass_show_on_their_lane_and_cost_nothing_extra() -> None:
    """A tensor-parallel stage: 0.25 s of each 1 s forward and 0.5 s of each 2 s backward are
    all-reduces. The step is the same as without them (they are inside the pass); the
    timeline shows each at its pass's end, the ASCII chart and the Chrome trace draw them."""
    plain = uniform(2)
    tp = [replace(s, collective_fwd_s=0.25, collective_bwd_s=0.5) for s in plain]
    timeline = simulate(tp, 3, ONE_F_ONE_B)
    assert timeline.step_time_s == simulate(plain, 3, ONE_F_ONE_B).step_time_s
    for rank in timeline.ranks:
        passes = {(e.stage, e.microbatch, e.kind is EventKind.FORWARD): e for e in rank.of_kind(*_COMPUTE_KINDS)}
        collectives = rank.of_kind(EventKind.COLLECTIVE)
        assert len(collectives) == len(passes) == 6
        for c in collectives:
            owner = passes[(c.stage, c.microbatch, c.forward)]
            assert c.end_s == owner.end_s and c.duration_s == (0.25 if c.forward else 0.5)
    assert "~" in ascii_timeline(timeline)
    gantt_figure(timeline)  # draws the lane (matplotlib, no file)
    threads = {e["args"]["name"] for e in chrome_trace(timeline)["traceEvents"] if e.get("name") == "thread_name"}
    assert "collectives" in threads
    with pytest.raises(ValueError, match="collective_fwd_s 2 exceeds fwd_s 1"):
        StageCost(fwd_s=1, bwd_s=2, collective_fwd_s=2, devices=("d0",))


_COMPUTE_KINDS = (EventKind.FORWARD, EventKind.BACKWARD)
