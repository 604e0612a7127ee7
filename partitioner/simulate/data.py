"""What the pipeline simulator reads (`StageCost`, `PipelineSchedule`) and writes (`Timeline`).

Units are named once, here: times in seconds (``_s``), sizes in bytes (``_bytes``).
Stages are numbered ``0..S-1`` in model order; a *rank* is the group of devices that runs
one stage, or, under `PipelineSchedule.INTERLEAVED_1F1B`, ``v`` stages (stage ``j`` runs
on rank ``j % p`` of ``p = S / v``, as in Megatron-LM and torch.distributed.pipelining).
"""

from __future__ import annotations

import enum
import math
import numbers
import re
from dataclasses import dataclass

__all__ = ["StageCost", "PipelineSchedule", "EventKind", "Event", "RankTimeline", "Timeline"]


def _check_seconds(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite number of seconds >= 0 (got {value!r})")


def _check_bytes(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: {name} must be an integer number of bytes >= 0 (got {value!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCost:
    """The cost of one pipeline stage for one microbatch, and what it keeps in memory.

    A stage may be replicated over several devices (data parallel inside the stage): each
    replica runs every microbatch on its share of the batch, and the replicas all-reduce
    their gradients at the end of the step.
    """

    fwd_s: float
    """Forward of one microbatch on the slowest replica."""
    bwd_s: float
    """Backward of one microbatch on the slowest replica (0 for inference)."""
    send_fwd_s: float = 0
    """Moving one microbatch's activations to the next stage (0 for the last stage)."""
    send_bwd_s: float = 0
    """Moving one microbatch's input gradients to the previous stage (0 for the first stage)."""
    activation_bytes: int = 0
    """Bytes one microbatch keeps alive from its forward until its backward ends, per device."""
    static_bytes: int = 0
    """Parameters, gradients, optimizer state and buffers, per device of the stage."""
    allreduce_s: float = 0
    """All-reduces of the stage's gradients, once per step: over its replicas, and of a tied
    weight's gradients with the other stages holding a copy (0 when neither)."""
    optimizer_s: float = 0
    """The optimizer step over the parameters each device updates, once per step, after the
    rank's last backward and its all-reduces, on the compute lane (0 for inference)."""
    collective_fwd_s: float = 0
    """Of `fwd_s`, collectives on the critical path (tensor-parallel all-reduces, ZeRO-3
    all-gathers compute does not hide): they hold the compute lane, so they are inside
    `fwd_s`; the timeline shows them as `EventKind.COLLECTIVE`."""
    collective_bwd_s: float = 0
    """Of `bwd_s`, the same in the backward (all-reduces, gathers and reduce-scatters)."""
    host_sends: bool = False
    """Whether its sends hold its compute lane until they have left: a CPU's, whose cores both
    compute and move the bytes (gloo's threads, or the copy itself). A GPU's sends run
    beside its kernels (False)."""
    devices: tuple[str, ...]
    """Names of the devices that hold a replica of the stage (one or more, distinct)."""

    def __post_init__(self) -> None:
        if isinstance(self.devices, str) or not all(isinstance(d, str) and d for d in self.devices):
            raise ValueError(f"StageCost: devices must be a tuple of device names (got {self.devices!r})")
        object.__setattr__(self, "devices", tuple(self.devices))
        owner = f"stage on {', '.join(self.devices) or 'no devices'}"
        if not self.devices:
            raise ValueError("StageCost: devices must name at least one device (got an empty tuple)")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"{owner}: a device appears twice in devices {self.devices}")
        for name in ("fwd_s", "bwd_s", "send_fwd_s", "send_bwd_s", "allreduce_s", "optimizer_s", "collective_fwd_s",
                     "collective_bwd_s"):
            _check_seconds(owner, name, getattr(self, name))
        for part, whole in (("collective_fwd_s", "fwd_s"), ("collective_bwd_s", "bwd_s")):
            if getattr(self, part) > getattr(self, whole) * (1 + 1e-9):
                raise ValueError(f"{owner}: {part} {getattr(self, part)} exceeds {whole} {getattr(self, whole)} (it is part of it)")
        for name in ("activation_bytes", "static_bytes"):
            _check_bytes(owner, name, getattr(self, name))

    @property
    def replicas(self) -> int:
        """How many devices hold a copy of the stage."""
        return len(self.devices)


class PipelineSchedule(str, enum.Enum):
    """The order in which each rank runs its forwards and backwards."""

    GPIPE = "gpipe"
    """Every forward (microbatches ``0..m-1``), then every backward (``0..m-1``), as
    torch's ``ScheduleGPipe`` runs them (Huang et al. 2019, arXiv:1811.06965)."""
    ONE_F_ONE_B = "1f1b"
    """Stage ``s`` runs ``min(p - s, m)`` forwards, then alternates one backward and one
    forward, then the remaining backwards: PipeDream-Flush (Narayanan et al. 2021,
    arXiv:2006.09503), Megatron-LM and torch's ``Schedule1F1B`` run this order."""
    INTERLEAVED_1F1B = "interleaved_1f1b"
    """Each rank holds ``v`` stages (``r, r + p, ...``) and runs 1F1B over them, a round of
    microbatches per stage at a time (Narayanan et al. 2021, arXiv:2104.04473, as torch's
    ``ScheduleInterleaved1F1B`` orders it)."""

    @classmethod
    def _missing_(cls, value: object) -> PipelineSchedule:
        """Also read torch's spellings: ``GPipe``, ``1F1B``, ``Interleaved1F1B`` (the names
        ``torch.distributed.pipelining.schedules.get_schedule_class`` takes, any case) and
        the class names or classes ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``.

        Raises:
            ValueError: Another name; the message lists the names accepted.
        """
        text = value.__name__ if isinstance(value, type) else value
        key = _schedule_key(text) if isinstance(text, str) else None
        for member in cls:
            if key == _schedule_key(member.value):
                return member
        accepted = ", ".join(f"{m.value!r} ({_TORCH_SCHEDULE_NAMES[m]})" for m in cls)
        known_to_torch = "; torch has that schedule, but partitioner cannot simulate it" if key in _TORCH_ONLY else ""
        raise ValueError(f"unknown pipeline schedule {value!r}{known_to_torch}; accepted: {accepted}")


def _schedule_key(name: str) -> str:
    """``ScheduleInterleaved1F1B``, ``Interleaved1F1B``, ``interleaved_1f1b`` -> ``interleaved1f1b``."""
    return re.sub(r"[\s_-]", "", name).lower().removeprefix("schedule")


# torch's names (`get_schedule_class`) for each schedule, and those partitioner does not simulate.
_TORCH_SCHEDULE_NAMES = {
    PipelineSchedule.GPIPE: "torch: GPipe, ScheduleGPipe",
    PipelineSchedule.ONE_F_ONE_B: "torch: 1F1B, Schedule1F1B",
    PipelineSchedule.INTERLEAVED_1F1B: "torch: Interleaved1F1B, ScheduleInterleaved1F1B",
}
_TORCH_ONLY = frozenset({"loopedbfs", "interleavedzerobubble", "zbvzerobubble", "dualpipev"})


class EventKind(str, enum.Enum):
    """What a rank is doing during an `Event`."""

    FORWARD = "forward"
    BACKWARD = "backward"
    SEND = "send"
    """The rank's outgoing link carries a microbatch's activations or gradients."""
    RECV = "recv"
    """A microbatch arrives over the sender's link (the same interval as its `SEND`)."""
    ALLREDUCE = "allreduce"
    """The stage's replicas all-reduce their gradients."""
    COLLECTIVE = "collective"
    """Collectives inside a forward or backward that hold the compute lane (tensor-parallel
    all-reduces, ZeRO-3 gathers compute does not hide): drawn at the pass's end, the
    pass's ``collective_*_s`` of its duration."""
    OPTIMIZER = "optimizer"
    """The optimizer step of the rank's stages, on the compute lane after its all-reduces."""
    IDLE = "idle"
    """The rank computes nothing (a bubble)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One interval of a rank's timeline."""

    kind: EventKind
    stage: int | None
    """Stage whose work it is: the sender for `SEND`, the receiver for `RECV`; None for `IDLE`
    and `OPTIMIZER` (the rank's stages together)."""
    microbatch: int | None
    """Microbatch index; None for `ALLREDUCE`, `OPTIMIZER` and `IDLE`."""
    forward: bool | None = None
    """For `COLLECTIVE`: whether it is inside a forward (else a backward); else None."""
    start_s: float
    end_s: float
    peer: int | None = None
    """For `SEND` the stage it goes to, for `RECV` the stage it comes from; else None."""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    def __str__(self) -> str:
        letter = {"forward": "F", "backward": "B", "send": "S", "recv": "R", "allreduce": "AR", "optimizer": "OPT",
                  "idle": "idle", "collective": "CF" if self.forward else "CB"}
        text = letter[self.kind.value]
        if self.microbatch is not None:
            text += str(self.microbatch)
        if self.stage is not None:
            text = f"{self.stage}{text}"
        if self.peer is not None:
            text += f"{'->' if self.kind is EventKind.SEND else '<-'}{self.peer}"
        return f"{text} [{self.start_s:.6g}, {self.end_s:.6g}]"


@dataclass(frozen=True, slots=True, kw_only=True)
class RankTimeline:
    """What one rank (the devices of its stages) did during the step."""

    rank: int
    stages: tuple[int, ...]
    """The stages it runs: ``(rank,)``, or ``(rank, rank + p, ...)`` when interleaved."""
    devices: tuple[str, ...]
    """The replica devices (every device of the rank holds the same stages)."""
    events: tuple[Event, ...]
    """Compute, optimizer, idle, send, recv and all-reduce intervals, by start time."""
    busy_s: float
    """Seconds of forward, backward and the optimizer step."""
    static_bytes: int
    """Sum of `StageCost.static_bytes` over its stages, per device."""
    peak_activation_bytes: int
    """Most activation bytes alive at once, per device."""
    peak_inflight_microbatches: int
    """Most (stage, microbatch) pairs whose forward has started and backward not ended."""
    memory: tuple[tuple[float, int], ...]
    """``(time_s, bytes)`` per device: static plus live activations, from ``(0, static)``
    then after each allocation and free, in order (two at one instant when an action takes
    no time, so the maximum is always the peak)."""

    @property
    def peak_memory_bytes(self) -> int:
        """`static_bytes` plus `peak_activation_bytes`."""
        return self.static_bytes + self.peak_activation_bytes

    def of_kind(self, *kinds: EventKind) -> tuple[Event, ...]:
        """The events of the given kinds, by start time."""
        return tuple(e for e in self.events if e.kind in kinds)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    """One training step of a pipeline, played event by event (see `simulate`)."""

    schedule: PipelineSchedule
    microbatches: int
    virtual_stages: int
    """Stages per rank (1 unless interleaved)."""
    overlap_allreduce: bool
    ranks: tuple[RankTimeline, ...]
    step_time_s: float
    """Makespan: from the first forward's start (time 0) to the end of the last event."""
    bubble_fraction: float
    """``sum over ranks of (step_time_s - busy_s) / (ranks * step_time_s)``: the share of
    compute time lost, counting exposed sends and all-reduce as lost (0 for a zero step)."""

    @property
    def num_stages(self) -> int:
        return len(self.ranks) * self.virtual_stages

    @property
    def peak_memory_bytes(self) -> tuple[int, ...]:
        """Per rank: static bytes plus peak activation bytes, per device."""
        return tuple(r.peak_memory_bytes for r in self.ranks)

    def ascii(self, width: int | None = None) -> str:
        """A text Gantt chart: one row per rank, ``F3``/``B3`` boxes scaled to `width` columns.

        Args:
            width: Columns for the whole step; None picks a scale at which the shortest
                forward or backward still shows its label (at most 160 columns).
        """
        from partitioner.simulate.render import ascii_timeline

        return ascii_timeline(self, width)

    def __str__(self) -> str:
        return self.ascii()
