"""Step times without playing the schedule, where a formula is exact (tests check it is).

GPipe is a flow shop: microbatches are identical jobs that visit the same "machines" in
the same order, and for ``m`` identical jobs on machines ``t_1..t_k`` the last job leaves
machine ``k`` at ``sum(t_1..t_k) + (m - 1) * max(t_1..t_k)`` (the longest path through the
jobs x machines grid stays on the slowest machine for its ``m - 1`` extra cells). 1F1B
has no such form when stages differ or send (simulate it); for equal stages without
sends GPipe and 1F1B both reach the textbook figure.
"""

from __future__ import annotations

from collections.abc import Sequence

from partitioner.simulate.data import PipelineSchedule, StageCost, _check_seconds
from partitioner.simulate.schedules import _check_counts, _check_positive, _schedule

__all__ = ["gpipe_step_time", "uniform_step_time", "ideal_bubble_fraction"]


def _flow_shop(machines: Sequence[float], jobs: int) -> float:
    """When the last of `jobs` identical jobs leaves the last of `machines` (seconds each)."""
    return sum(machines) + (jobs - 1) * max(machines)


def gpipe_step_time(stages: Sequence[StageCost], microbatches: int, *, overlap_allreduce: bool = False) -> float:
    """The step time `simulate` gives for `PipelineSchedule.GPIPE`, in closed form.

    Exact for any stage costs, sends, all-reduce and optimizer steps, by two flow shops::

        forward machines   f_0, sf_0, f_1, sf_1, ..., f_{p-1}      (sf: send_fwd_s)
        T_F                = flow(forward machines, m)   the last stage's last forward ends
        backward machines  b_{p-1}, sb_{p-1}, ..., b_s   for stage s  (sb: send_bwd_s)
        E_s                = T_F + flow(backward machines down to b_s, m)
        step               = max over s of E_s + allreduce_s + optimizer_s                (serial)
                             max over s of E_s + max(0, allreduce_s - b_s) + optimizer_s  (overlapped)

    The backward phase starts afresh at ``T_F``: the last stage begins backward 0 when
    its forwards are done, and every other compute lane and link is idle by then. A stage
    whose sends hold its compute lane (``host_sends``) is one machine ``f_s + sf_s`` (and
    ``b_s + sb_s``, which the overlapped all-reduce's ``b_s`` then is): its send leaves
    when that machine is done.

    Args:
        stages: Cost of each stage, in model order (one stage per rank).
        microbatches: Microbatches ``m`` per step (>= 1).
        overlap_allreduce: As in `simulate`.

    Raises:
        ValueError: No stages, or ``microbatches`` below 1.
    """
    if not stages:
        raise ValueError("gpipe_step_time needs at least one stage")
    _check_counts(PipelineSchedule.GPIPE, len(stages), microbatches, 1)
    p, m = len(stages), microbatches
    # A stage whose sends hold its compute lane (`StageCost.host_sends`) is one machine of
    # pass and send: the send leaves at the same time, and the lane is busy until then.
    held = [s.host_sends for s in stages]
    forward: list[float] = []
    for s, stage in enumerate(stages):
        send = [stage.send_fwd_s] if s < p - 1 else []
        forward += [stage.fwd_s + sum(send)] if held[s] else [stage.fwd_s, *send]
    forwards_done = _flow_shop(forward, m)
    step, backward = forwards_done, []
    for s in reversed(range(p)):
        stage = stages[s]
        bwd = stage.bwd_s + (stage.send_bwd_s if held[s] else 0.0)
        backward.append(bwd)
        last_backward_end = forwards_done + _flow_shop(backward, m)
        exposed = max(0, stage.allreduce_s - bwd) if overlap_allreduce else stage.allreduce_s
        step = max(step, last_backward_end + exposed + stage.optimizer_s)
        if not held[s]:
            backward.append(stage.send_bwd_s)
    return step


def uniform_step_time(
    schedule: PipelineSchedule | str,
    ranks: int,
    microbatches: int,
    fwd_s: float,
    bwd_s: float,
    virtual_stages: int = 1,
) -> float:
    """The textbook step time ``(v*m + p - 1) * (fwd_s + bwd_s)`` of equal stages.

    For ``p`` ranks of ``v`` stages, every stage taking `fwd_s` and `bwd_s` per
    microbatch, with no sends, no all-reduce and no optimizer step. It is
    ``(m + p - 1) * (f + b)`` for GPipe and 1F1B (any ``m``), and ``(m + (p - 1) / v) * (f + b)``
    for interleaved 1F1B with ``f = v * fwd_s`` the time of a rank's whole share (Narayanan
    et al. 2021, arXiv:2104.04473, section 2.2). For interleaving it is exact when
    ``m >= p``, in torch's uneven rounds too; with fewer microbatches than ranks a rank
    idles between its stages and `simulate` gives a longer step.

    Raises:
        ValueError: An unknown schedule, a count below 1, a negative time, or
            interleaving with ``m < p``.
    """
    schedule = _schedule(schedule)
    _check_counts(schedule, ranks, microbatches, virtual_stages)
    _check_seconds("uniform_step_time", "fwd_s", fwd_s)
    _check_seconds("uniform_step_time", "bwd_s", bwd_s)
    if schedule is PipelineSchedule.INTERLEAVED_1F1B and microbatches < ranks:
        raise ValueError(
            f"the interleaved figure is exact only with at least as many microbatches as ranks "
            f"(got {microbatches} for {ranks}); simulate() gives the step time"
        )
    return (virtual_stages * microbatches + ranks - 1) * (fwd_s + bwd_s)


def ideal_bubble_fraction(ranks: int, microbatches: int, virtual_stages: int = 1) -> float:
    """``(p - 1) / (v*m + p - 1)``: the bubble of `uniform_step_time` (idle / (p * step)).

    Raises:
        ValueError: A count below 1.
    """
    _check_positive(ranks=ranks, microbatches=microbatches, virtual_stages=virtual_stages)
    return (ranks - 1) / (virtual_stages * microbatches + ranks - 1)
