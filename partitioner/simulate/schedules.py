"""The order in which each rank runs its forwards and backwards, per `PipelineSchedule`.

The orders are those of torch.distributed.pipelining (``ScheduleGPipe``,
``Schedule1F1B``, ``ScheduleInterleaved1F1B``) without their timing padding: the
simulator finds the timing; the schedule only fixes the order.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.simulate.data import PipelineSchedule

__all__ = ["Action", "rank_actions", "peak_inflight_microbatches"]


@dataclass(frozen=True, slots=True)
class Action:
    """Forward or backward of one microbatch on one stage; prints as torch's actions do (``2F0``)."""

    stage: int
    forward: bool
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{'F' if self.forward else 'B'}{self.microbatch}"


def _check_positive(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")


def _schedule(value: PipelineSchedule | str) -> PipelineSchedule:
    """`value` as a `PipelineSchedule` (its name or value as a string is fine)."""
    if isinstance(value, PipelineSchedule):
        return value
    for schedule in PipelineSchedule:
        if value in (schedule.value, schedule.name):
            return schedule
    known = ", ".join(s.value for s in PipelineSchedule)
    raise ValueError(f"schedule must be one of {known} (got {value!r})")


def _check_counts(schedule: PipelineSchedule, ranks: int, microbatches: int, virtual_stages: int) -> None:
    _check_positive(ranks=ranks, microbatches=microbatches, virtual_stages=virtual_stages)
    if schedule is PipelineSchedule.INTERLEAVED_1F1B:
        if virtual_stages < 2:
            raise ValueError(
                f"INTERLEAVED_1F1B needs virtual_stages >= 2 stages per rank (got {virtual_stages}); "
                "use ONE_F_ONE_B for one stage per rank"
            )
        rounds = max(1, microbatches // ranks)
        if microbatches % rounds:
            raise ValueError(
                f"INTERLEAVED_1F1B runs microbatches in rounds of about {ranks} (one per rank): "
                f"{microbatches} microbatches is not a multiple of {rounds} rounds; "
                f"use a multiple of {ranks} or fewer than {2 * ranks}"
            )
    elif virtual_stages != 1:
        raise ValueError(f"{schedule.name} runs one stage per rank (got virtual_stages={virtual_stages})")


def rank_actions(
    schedule: PipelineSchedule | str, ranks: int, microbatches: int, virtual_stages: int = 1
) -> tuple[tuple[Action, ...], ...]:
    """Each rank's forwards and backwards, in the order it runs them.

    Args:
        schedule: Which order (or its value, ``"1f1b"``).
        ranks: Pipeline ranks ``p``.
        microbatches: Microbatches ``m`` per step.
        virtual_stages: Stages per rank ``v`` (``INTERLEAVED_1F1B`` only; stage ``j`` is on
            rank ``j % p``).

    Returns:
        ``actions[r]``: rank ``r``'s actions; every (stage, microbatch) appears once as a
        forward and once, later, as a backward.

    Raises:
        ValueError: An unknown schedule, a count below 1, ``virtual_stages`` unsuited to the schedule,
            or interleaving gets a microbatch count torch's schedule refuses.
    """
    schedule = _schedule(schedule)
    _check_counts(schedule, ranks, microbatches, virtual_stages)
    p, m = ranks, microbatches
    if schedule is PipelineSchedule.GPIPE:
        return tuple(
            tuple(Action(r, True, i) for i in range(m)) + tuple(Action(r, False, i) for i in range(m))
            for r in range(p)
        )
    if schedule is PipelineSchedule.ONE_F_ONE_B:
        return tuple(_one_f_one_b(r, min(p - r, m), m) for r in range(p))
    return tuple(_interleaved(r, p, m, virtual_stages) for r in range(p))


def _one_f_one_b(stage: int, warmup: int, m: int) -> tuple[Action, ...]:
    """``warmup`` forwards, then backward/forward pairs, then the backwards left."""
    order = [Action(stage, True, i) for i in range(warmup)]
    for i in range(m):
        order.append(Action(stage, False, i))
        if warmup + i < m:
            order.append(Action(stage, True, warmup + i))
    return tuple(order)


def _interleaved(rank: int, p: int, m: int, v: int) -> tuple[Action, ...]:
    """torch's ``ScheduleInterleaved1F1B`` order for one rank (Megatron-LM's when ``p`` divides ``m``).

    Microbatches go in rounds of ``k = m / max(1, m // p)``: ``k`` forwards on the rank's
    first stage, ``k`` on its second, ...; backwards likewise from its last stage. The
    warm-up is ``(v - 1) * k + 2 * (p - 1 - rank)`` forwards, then one forward and one
    backward at a time, then the backwards left.
    """
    per_round = m // max(1, m // p)
    total = m * v
    warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), total)
    next_mb: dict[tuple[bool, int], int] = {}

    def take(forward: bool, step: int) -> Action:
        local = (step // per_round) % v
        stage = (local if forward else v - 1 - local) * p + rank
        i = next_mb.get((forward, stage), 0)
        next_mb[(forward, stage)] = i + 1
        return Action(stage, forward, i)

    order = [take(True, step) for step in range(warmup)]
    for step in range(total):
        if warmup + step < total:
            order.append(take(True, warmup + step))
        order.append(take(False, step))
    return tuple(order)


def peak_inflight_microbatches(
    schedule: PipelineSchedule | str, ranks: int, microbatches: int, virtual_stages: int = 1
) -> tuple[int, ...]:
    """Per rank, the most (stage, microbatch) pairs between forward start and backward end.

    It depends on the order alone, not on timing: GPipe keeps all ``m``; 1F1B keeps
    ``min(p - s, m)`` at stage ``s``. Peak activation bytes per device are this count
    times the stage's `StageCost.activation_bytes` when the rank holds one stage.

    Args and Raises: as `rank_actions`.
    """
    schedule = _schedule(schedule)
    _check_counts(schedule, ranks, microbatches, virtual_stages)
    p, m, v = ranks, microbatches, virtual_stages
    if schedule is PipelineSchedule.GPIPE:
        return (m,) * p
    if schedule is PipelineSchedule.ONE_F_ONE_B:
        return tuple(min(p - r, m) for r in range(p))
    # `_interleaved`: the warm-up's forwards, then one more before each backward while any are left.
    per_round, total = m // max(1, m // p), m * v
    return tuple(min((v - 1) * per_round + 2 * (p - 1 - r) + 1, total) for r in range(p))
