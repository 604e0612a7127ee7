"""Play one training step of a pipeline schedule, event by event. Pure: no torch.

The model (times in seconds, sizes in bytes; ``p`` ranks, ``m`` microbatches):

- Each rank has one **compute lane** that runs its forwards and backwards one at a time,
  in the order the schedule fixes (`rank_actions`). An action starts when the lane is
  free and its input has arrived: forward ``(s, i)`` needs forward ``(s-1, i)`` sent to it
  (stage 0's inputs are there at time 0); backward ``(s, i)`` needs backward ``(s+1, i)``
  sent back to it (the last stage's needs its own forward, which comes earlier).
- Each rank has one **outgoing link** (its "comm" lane). When forward ``(s, i)`` ends its
  activations leave for stage ``s+1`` (``send_fwd_s``); when backward ``(s, i)`` ends its
  input gradients leave for ``s-1`` (``send_bwd_s``). Sends do not hold the compute lane
  (but a CPU stage's do, ``host_sends``: its cores move the bytes, and the action ends when
  its send has left); a rank's sends share its link and leave one at a time, in the order
  they were made.
  Links are full duplex and receivers always ready: a receive occupies nothing, and its
  ``RECV`` event is the send's interval seen from the receiver.
- **Gradient all-reduce** (``allreduce_s``: replicated stages, tied weights) runs on a third lane per
  rank, one collective at a time. Serial: every all-reduce of a rank starts after the
  rank's last backward. Overlapped: the stage's gradients become ready at an even rate
  during its last backward (bucketing in the limit of small buckets), so its all-reduce
  starts with that backward and ends at ``max(start + allreduce_s, end of the backward)``.
- **Optimizer step** (``optimizer_s``, summed over the rank's stages): one event per rank on
  its compute lane, once its last backward and its last all-reduce have ended; nothing
  overlaps it, and the step ends with it.
- **Collectives inside a pass** (``collective_fwd_s`` / ``collective_bwd_s``: tensor-parallel
  all-reduces, ZeRO-3 gathers compute does not hide) are part of the pass's time on the
  compute lane; the timeline shows them as `COLLECTIVE` events at the pass's end.
- **Memory**, per device: ``static_bytes`` throughout, plus ``activation_bytes`` of
  microbatch ``i`` at stage ``s`` from the start of forward ``(s, i)`` to the end of
  backward ``(s, i)`` (at an instant, frees count before allocations).

Since every lane's order is fixed, each event's time is ``max(lane free, inputs ready)``,
resolved as soon as its inputs are known: exactly what a time-ordered event queue gives.
"""

from __future__ import annotations

from collections.abc import Sequence

from partitioner.simulate.data import Event, EventKind, PipelineSchedule, RankTimeline, StageCost, Timeline
from partitioner.simulate.schedules import Action, _check_positive, _schedule, rank_actions

__all__ = ["simulate"]


def simulate(
    stages: Sequence[StageCost],
    microbatches: int,
    schedule: PipelineSchedule | str,
    *,
    overlap_allreduce: bool = False,
    virtual_stages: int = 1,
) -> Timeline:
    """Simulate one training step of a pipeline (see the module docstring for the model).

    Args:
        stages: Cost of each stage, in model order; stage ``j`` runs on rank
            ``j % (len(stages) // virtual_stages)``.
        microbatches: Microbatches per step ``m`` (>= 1).
        schedule: The order each rank runs its forwards and backwards in (or its value, ``"1f1b"``).
        overlap_allreduce: Start each stage's gradient all-reduce with its last backward
            (bucketed) instead of after the rank's last backward.
        virtual_stages: Stages per rank ``v``; > 1 only with ``INTERLEAVED_1F1B``.

    Returns:
        The timeline: events per rank, step time, bubble fraction and memory.

    Raises:
        ValueError: An unknown schedule, no stages, a count below 1, stage count not a multiple of
            ``virtual_stages``, a send off the ends of the pipeline, devices shared between
            ranks (or differing between the stages of one rank), or a microbatch count
            the schedule does not take.
    """
    schedule = _schedule(schedule)
    stages = tuple(stages)
    if not stages:
        raise ValueError("simulate needs at least one stage")
    if not all(isinstance(s, StageCost) for s in stages):
        raise ValueError("simulate takes a sequence of StageCost")
    _check_positive(virtual_stages=virtual_stages)
    if len(stages) % virtual_stages:
        raise ValueError(
            f"{len(stages)} stages do not split evenly over ranks holding {virtual_stages} stages each"
        )
    ranks = len(stages) // virtual_stages
    orders = rank_actions(schedule, ranks, microbatches, virtual_stages)
    _check_pipeline(stages, ranks)
    return _Run(stages, ranks, microbatches, overlap_allreduce).play(schedule, orders, virtual_stages)


def _check_pipeline(stages: tuple[StageCost, ...], ranks: int) -> None:
    if stages[-1].send_fwd_s:
        raise ValueError(f"the last stage sends nothing forward: send_fwd_s must be 0 (got {stages[-1].send_fwd_s})")
    if stages[0].send_bwd_s:
        raise ValueError(f"the first stage sends nothing back: send_bwd_s must be 0 (got {stages[0].send_bwd_s})")
    owner: dict[str, int] = {}
    for j, stage in enumerate(stages):
        r = j % ranks
        if stage.devices != stages[r].devices:
            raise ValueError(
                f"stages {r} and {j} run on rank {r}, so they need the same devices "
                f"(got {stages[r].devices} and {stage.devices})"
            )
        for device in stage.devices:
            if owner.setdefault(device, r) != r:
                raise ValueError(
                    f"device {device!r} is in stages {owner[device]} and {j}, which run at the same time; "
                    "give each rank its own devices"
                )


class _Run:
    """The state of one simulation: lane clocks and the events so far."""

    def __init__(self, stages: tuple[StageCost, ...], ranks: int, microbatches: int, overlap: bool) -> None:
        self.stages, self.ranks, self.m, self.overlap = stages, ranks, microbatches, overlap
        self.events: list[list[Event]] = [[] for _ in range(ranks)]
        # Clocks start at the integer 0, so Fraction costs give exact Fraction times.
        self.link_free: list[float] = [0] * ranks
        self.arrival: dict[Action, float] = {}
        """When the input of an action is on its rank."""
        self.span: dict[Action, tuple[float, float]] = {}
        """(start, end) of every action done."""

    def play(
        self, schedule: PipelineSchedule, orders: tuple[tuple[Action, ...], ...], virtual_stages: int
    ) -> Timeline:
        self._compute(orders)
        self._allreduce(orders)
        self._optimizer(orders)
        step = max((e.end_s for events in self.events for e in events), default=0.0)
        rows = tuple(self._rank(r, orders[r], step) for r in range(self.ranks))
        lost = sum(step - row.busy_s for row in rows)
        return Timeline(
            schedule=schedule,
            microbatches=self.m,
            virtual_stages=virtual_stages,
            overlap_allreduce=self.overlap,
            ranks=rows,
            step_time_s=step,
            bubble_fraction=lost / (self.ranks * step) if step > 0 else 0.0,
        )

    def _ready(self, action: Action) -> float | None:
        """When `action`'s input is there, or None while it is not known yet."""
        if action.forward and action.stage == 0:
            return 0
        if not action.forward and action.stage == len(self.stages) - 1:
            return self.span[Action(action.stage, True, action.microbatch)][1]  # earlier on this lane
        return self.arrival.get(action)

    def _compute(self, orders: tuple[tuple[Action, ...], ...]) -> None:
        """Run each compute lane until it waits for an input; resume it when the input is sent."""
        head = [0] * self.ranks
        free: list[float] = [0] * self.ranks
        waiting: dict[Action, int] = {}
        """Action whose input a rank waits for -> the rank."""
        runnable = list(range(self.ranks))
        while runnable:
            r = runnable.pop()
            order = orders[r]
            while head[r] < len(order):
                action = order[head[r]]
                ready = self._ready(action)
                if ready is None:
                    waiting[action] = r
                    break
                cost = self.stages[action.stage]
                start = max(free[r], ready)
                free[r] = end = start + (cost.fwd_s if action.forward else cost.bwd_s)
                self.span[action] = (start, end)
                kind = EventKind.FORWARD if action.forward else EventKind.BACKWARD
                self.events[r].append(Event(kind=kind, stage=action.stage, microbatch=action.microbatch,
                                            start_s=start, end_s=end))
                collective = cost.collective_fwd_s if action.forward else cost.collective_bwd_s
                if collective > 0:
                    self.events[r].append(Event(kind=EventKind.COLLECTIVE, stage=action.stage,
                                                microbatch=action.microbatch, start_s=end - collective, end_s=end,
                                                forward=action.forward))
                receiver = self._send(r, action, end)
                if cost.host_sends and self.link_free[r] > end:
                    # The send holds the lane: the rank is done with the action when it has left.
                    free[r] = self.link_free[r]
                    self.span[action] = (start, free[r])
                if receiver in waiting:
                    runnable.append(waiting.pop(receiver))
                head[r] += 1
        if waiting:
            stuck = ", ".join(f"rank {r} at {action}" for action, r in sorted(waiting.items(), key=lambda kv: kv[1]))
            raise RuntimeError(f"the schedule deadlocks: {stuck} wait for inputs that never come")

    def _send(self, rank: int, action: Action, made: float) -> Action | None:
        """Put the output of `action` (made at time `made`) on the rank's link.

        Returns:
            The action that reads it, or None at the ends of the pipeline.
        """
        last = len(self.stages) - 1
        if action.forward and action.stage == last or not action.forward and action.stage == 0:
            return None
        dst = action.stage + 1 if action.forward else action.stage - 1
        receiver = Action(dst, action.forward, action.microbatch)
        cost = self.stages[action.stage]
        start = max(self.link_free[rank], made)
        self.link_free[rank] = end = start + (cost.send_fwd_s if action.forward else cost.send_bwd_s)
        self.arrival[receiver] = end
        if end > start:
            mb = action.microbatch
            self.events[rank].append(Event(kind=EventKind.SEND, stage=action.stage, microbatch=mb,
                                           start_s=start, end_s=end, peer=dst))
            self.events[dst % self.ranks].append(Event(kind=EventKind.RECV, stage=dst, microbatch=mb,
                                                       start_s=start, end_s=end, peer=action.stage))
        return receiver

    def _allreduce(self, orders: tuple[tuple[Action, ...], ...]) -> None:
        """Each rank all-reduces its replicated stages' gradients, one stage at a time."""
        for r, order in enumerate(orders):
            last_backward = {a.stage: self.span[a] for a in order if not a.forward}
            rank_done = max((end for _, end in last_backward.values()), default=0)
            free: float = 0
            # Stages in the order their last backwards end (the order their gradients are ready).
            for stage, (bwd_start, bwd_end) in sorted(last_backward.items(), key=lambda kv: kv[1][1]):
                seconds = self.stages[stage].allreduce_s
                if seconds == 0:
                    continue
                if self.overlap:
                    start = max(free, bwd_start)
                    end = max(start + seconds, bwd_end)
                else:
                    start = max(free, rank_done)
                    end = start + seconds
                free = end
                self.events[r].append(Event(kind=EventKind.ALLREDUCE, stage=stage, microbatch=None,
                                            start_s=start, end_s=end))

    def _optimizer(self, orders: tuple[tuple[Action, ...], ...]) -> None:
        """Each rank steps its stages' optimizers once its backwards and all-reduces are done."""
        for r, order in enumerate(orders):
            seconds = sum(self.stages[s].optimizer_s for s in sorted({a.stage for a in order}))
            if seconds == 0:
                continue
            done = max((self.span[a][1] for a in order if not a.forward), default=0)
            start = max([done] + [e.end_s for e in self.events[r] if e.kind is EventKind.ALLREDUCE])
            self.events[r].append(Event(kind=EventKind.OPTIMIZER, stage=None, microbatch=None,
                                        start_s=start, end_s=start + seconds))

    def _rank(self, r: int, order: tuple[Action, ...], step: float) -> RankTimeline:
        """Idle gaps, busy time and memory of rank `r` from its events."""
        lane = (EventKind.FORWARD, EventKind.BACKWARD, EventKind.OPTIMIZER)
        # A send that holds the lane (`StageCost.host_sends`) keeps the rank busy, not idle.
        compute = sorted((e for e in self.events[r] if e.kind in lane
                          or e.kind is EventKind.SEND and e.stage is not None and self.stages[e.stage].host_sends),
                         key=lambda e: e.start_s)
        idle: list[Event] = []
        clock: float = 0
        tolerance = 1e-12 * step  # gaps of float rounding are no bubble
        for start, end in [(e.start_s, e.end_s) for e in compute] + [(step, step)]:
            if start - clock > tolerance:
                idle.append(Event(kind=EventKind.IDLE, stage=None, microbatch=None, start_s=clock, end_s=start))
            clock = max(clock, end)
        events = sorted(self.events[r] + idle, key=lambda e: (e.start_s, e.end_s, e.kind is not EventKind.IDLE))
        rank_stages = tuple(sorted({a.stage for a in order}))
        static = sum(self.stages[s].static_bytes for s in rank_stages)
        # Memory steps, in lane order (so in time order, a backward's free before the next
        # forward's allocation): +activation at a forward's start, -activation at a backward's end.
        live = inflight = peak_bytes = peak_count = 0
        series: list[tuple[float, int]] = [(0, static)]
        for a in order:
            time, sign = (self.span[a][0], 1) if a.forward else (self.span[a][1], -1)
            live += sign * self.stages[a.stage].activation_bytes
            inflight += sign
            peak_bytes, peak_count = max(peak_bytes, live), max(peak_count, inflight)
            series.append((time, static + live))
        return RankTimeline(
            rank=r,
            stages=rank_stages,
            devices=self.stages[r].devices,
            events=tuple(events),
            busy_s=sum(e.duration_s for e in compute),
            static_bytes=static,
            peak_activation_bytes=peak_bytes,
            peak_inflight_microbatches=peak_count,
            memory=tuple(series),
        )
