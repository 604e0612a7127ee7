"""What a pipeline stage costs, and the exact DP that splits the layers into stages.

For stage ``j`` of a `Configuration` on layers ``[i, e)``, with ``b`` samples per replica
per microbatch (bytes per device, seconds per microbatch)::

    state       weights + grads + optimizer of its layers (+ copies of tied weights it reads)
    buffers     model buffers + 2 x b x (cut bytes at i and at e, where it receives and sends)
    act         b x saved activations per sample
    memory      state + buffers + inflight x act                  <= capacity (/ v, interleaved)
    recomputed  state + buffers + act + inflight x b x cut(i)     (keeps its input, rebuilds act)
    f, b        forward and backward (+ f when recomputed), the slowest kind of its group
    send_fwd    b x cut(e) x s/B + latency, to the next stage's group (0 for the last)
    send_bwd    b x cut(i) x s/B + latency, to the previous one (0 for the first)
    allreduce   ring all-reduce of its gradients over its r replicas, once per step, and of
                a tied weight's gradients between its copies (a stage that reads it
                without owning it, and its owner)
    T           max(f + b + exposed all-reduce / m,  send_fwd + send_bwd)

The DP minimises the largest ``T``, then the sum of ``f + b + sends`` among the splits
reaching it. `StageModel.terms` computes every figure for one range or, given index
arrays, for all ranges at once with the same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from partitioner.cluster import Cluster
from partitioner.training_costs import TrainingCosts, training_state_bytes
from partitioner.options import Recompute, TrainingOptions
from partitioner.pipeline_plan.space import Configuration, Group
from partitioner.plan import PlanStage
from partitioner.simulate import (
    PipelineSchedule,
    StageCost,
    Timeline,
    gpipe_step_time,
    peak_inflight_microbatches,
    simulate,
)

__all__ = ["Partition", "StageModel"]

_INF = math.inf
Split = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    """A configuration with its layers split: the stages as the simulator sees them."""

    configuration: Configuration
    ranges: Split
    """Layers ``[first, end)`` of each stage."""
    recompute: tuple[bool, ...]
    origin: str
    """``dp`` (the least-bottleneck split) or ``equal`` (equal layer counts)."""
    stages: tuple[StageCost, ...]
    plan_stages: tuple[PlanStage, ...]
    """The same stages as plan data, memory broken down."""
    step_time_s: float = _INF
    """Simulated step time (GPipe: its exact closed form); inf until played."""
    timeline: Timeline | None = None
    """The simulation, when one was played (GPipe's closed form plays none)."""


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a stage's costs depend on besides its layers (hashable: equal stages share matrices)."""

    kinds: tuple[str, ...]
    samples: int
    replicas: int
    inflight: int
    capacity: int
    first: bool
    last: bool
    send_out: tuple[float, float]
    """(seconds per byte, latency) to the next stage's group."""
    send_in: tuple[float, float]
    """(seconds per byte, latency) to the previous stage's group (where gradients go)."""
    ring: tuple[float, float]
    """(slowest hop's seconds per byte, its latency) of the replicas' ring."""


@dataclass(frozen=True, slots=True)
class _Terms:
    """Every figure of a stage (scalars for one range, matrices for all: rows i, columns e)."""

    fwd: Any
    bwd: Any
    bwd_rc: Any
    send_fwd: Any
    send_bwd: Any
    allreduce: Any
    weights: Any
    grads: Any
    optimizer: Any
    buffers: Any
    act: Any
    keep: Any
    """Bytes a recomputing stage keeps per microbatch: its input."""
    fits: Any
    fits_rc: Any
    cost: Any
    """T, the DP's objective."""
    cost_rc: Any
    total: Any
    """f + b + sends, the DP's tie-break."""
    total_rc: Any


class StageModel:
    """The tables of one planning problem: stage costs, the DP, splits and their step times."""

    def __init__(self, costs: TrainingCosts, cluster: Cluster, batch: int, options: TrainingOptions) -> None:
        self.costs, self.cluster, self.batch, self.options = costs, cluster, batch, options
        self.n = n = len(costs.layers)
        states = [training_state_bytes(layer.params, costs.precision, costs.optimizer) for layer in costs.layers]
        self.weights = _prefix([s.weights for s in states])
        self.grads = _prefix([s.grads for s in states])
        self.optimizer = _prefix([s.optimizer for s in states])
        self.buffers = _prefix([layer.buffer_bytes for layer in costs.layers])
        self.activations = _prefix([layer.activation_bytes for layer in costs.layers])
        self.cut = np.asarray(costs.cut_bytes, dtype=np.int64)
        self.tied = [(t.owner, t.users, training_state_bytes(t.params, costs.precision, costs.optimizer)) for t in costs.tied]
        self.capacity = [int(d.memory_bytes * (1 - options.memory_reserve)) for d in cluster.devices]
        self.rows = np.arange(n + 1)[:, None]
        self.cols = np.arange(n + 1)[None, :]
        self.valid = self.cols > self.rows
        self._times: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._timed: dict[tuple[Configuration, Split, tuple[bool, ...]], Partition] = {}
        self._specs: dict[Configuration, list[_Spec]] = {}
        self._splits: dict[Configuration, tuple[float, Split, tuple[bool, ...]] | None] = {}
        self._stage: dict[tuple[_Spec, int, int, int], _Terms] = {}
        self.solved = self.simulated = 0

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state of the whole model."""
        return int(self.weights[-1] + self.grads[-1] + self.optimizer[-1])

    # ------------------------------------------------------------------ tables
    def times(self, kind: str, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums of forward and backward seconds of `kind` at `samples` per microbatch."""
        key = (kind, samples)
        if key not in self._times:
            t = self.costs.times_for(kind, samples)
            self._times[key] = (_prefix(t.fwd_s, float), _prefix(t.bwd_s, float))
        return self._times[key]

    def kinds(self, group: Group) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.cluster.devices[d].profile.name for d in group.devices))

    def samples(self, config: Configuration, group: Group) -> int:
        return self.batch // (config.microbatches * group.replicas)

    def link(self, src: Group, dst: Group, src_samples: int, dst_samples: int) -> tuple[float, float]:
        """(seconds per byte, latency) of a replica of `src` sending its samples on to `dst`.

        Replica ``k`` holds samples ``[k b, (k+1) b)`` of the microbatch and sends each to
        the replica of `dst` that holds it: the slowest pair's seconds per byte, and the
        latencies of the messages one sender makes one after another.
        """
        c = self.cluster
        spb, lat = 0.0, 0.0
        for k, sender in enumerate(src.devices):
            first = k * src_samples // dst_samples
            last = ((k + 1) * src_samples - 1) // dst_samples
            receivers = [dst.devices[q] for q in range(first, last + 1)]
            spb = max([spb] + [c.seconds_per_byte[sender][r] for r in receivers])
            lat = max(lat, sum(c.latency_s[sender][r] for r in receivers))
        return spb, lat

    def ring(self, group: Group) -> tuple[float, float]:
        """(slowest hop's seconds per byte, slowest hop's latency) of a ring all-reduce over `group`."""
        d = group.devices
        hops = [self.cluster.allreduce_hop(d[k], d[(k + 1) % len(d)]) for k in range(len(d))] if len(d) > 1 else []
        return max((h[0] for h in hops), default=0.0), max((h[1] for h in hops), default=0.0)

    def specs(self, config: Configuration) -> list[_Spec]:
        """The `_Spec` of every stage of `config`, in order."""
        if config not in self._specs:
            self._specs[config] = self._make_specs(config)
        return self._specs[config]

    def _make_specs(self, config: Configuration) -> list[_Spec]:
        p, count, v = config.ranks, config.stages, config.virtual_stages
        inflight = peak_inflight_microbatches(config.schedule, p, config.microbatches, v)
        out = []
        for j in range(count):
            g, nxt, prv = config.groups[j % p], config.groups[(j + 1) % p], config.groups[(j - 1) % p]
            b = self.samples(config, g)
            out.append(
                _Spec(
                    kinds=self.kinds(g),
                    samples=b,
                    replicas=g.replicas,
                    inflight=inflight[j % p],
                    capacity=min(self.capacity[d] for d in g.devices) // v,
                    first=j == 0,
                    last=j == count - 1,
                    send_out=self.link(g, nxt, b, self.samples(config, nxt)) if j < count - 1 else (0.0, 0.0),
                    send_in=self.link(g, prv, b, self.samples(config, prv)) if j > 0 else (0.0, 0.0),
                    ring=self.ring(g),
                )
            )
        return out

    def _tied_sum(self, spec: _Spec, i: Any, e: Any) -> Any:
        """Seconds of summing tied weights' gradients between this stage and another holding a
        copy, once per step (`partitioner.distributed` does it after the schedule).

        A stage joins when it owns a tied weight that a layer past it reads, or reads one it
        does not own: a ring all-reduce over the copies' ``2 r`` devices (two stages, as an
        embedding and its head), each hop on the slower of the replica ring and the link
        between stages.
        """
        total: Any = 0.0
        if not self.tied:
            return total
        members = 2 * spec.replicas
        per_byte = max(spec.ring[0], spec.send_in[0], spec.send_out[0])
        latency = max(spec.ring[1], spec.send_in[1], spec.send_out[1])
        one = 2 * (members - 1) / members * per_byte, 2 * (members - 1) * latency
        for owner, users, state in self.tied:
            owns = (i <= owner) & (owner < e)
            reads = np.zeros(np.broadcast(i, e).shape, dtype=bool)
            past = np.zeros(np.broadcast(i, e).shape, dtype=bool)
            for u in users:
                reads = reads | ((i <= u) & (u < e))
                past = past | (u >= e)
            joins = (owns & past) | (reads & ~owns)
            total = total + joins * (state.grads * one[0] + one[1])
        return total

    def terms(self, spec: _Spec, i: Any, e: Any, m: int) -> _Terms:
        """Every figure of a stage on layers ``[i, e)`` (the module docstring's model).

        `i`, `e` are ints, or index arrays broadcasting to every range at once; the
        arithmetic is the same, so the DP's matrices and the chosen stages agree.
        """
        b = spec.samples
        fwd: Any = None
        bwd: Any = None
        for kind in spec.kinds:  # a group of several kinds runs at its slowest replica's pace
            fp, bp = self.times(kind, b)
            fwd = fp[e] - fp[i] if fwd is None else np.maximum(fwd, fp[e] - fp[i])
            bwd = bp[e] - bp[i] if bwd is None else np.maximum(bwd, bp[e] - bp[i])
        weights = self.weights[e] - self.weights[i]
        grads = self.grads[e] - self.grads[i]
        optimizer = self.optimizer[e] - self.optimizer[i]
        for owner, users, state in self.tied:  # a copy where a reader is and the owner is not
            reads = np.zeros(np.broadcast(i, e).shape, dtype=bool)
            for u in users:
                reads = reads | ((i <= u) & (u < e))
            copy = reads & ~((i <= owner) & (owner < e))
            weights = weights + copy * state.weights
            grads = grads + copy * state.grads
            optimizer = optimizer + copy * state.optimizer
        cut_in, cut_out = self.cut[i] * b, self.cut[e] * b
        boundary = (0 if spec.first else cut_in) + (0 if spec.last else cut_out)
        buffers = self.buffers[e] - self.buffers[i] + 2 * boundary  # a send and a receive buffer each way
        act = (self.activations[e] - self.activations[i]) * b
        state_bytes = weights + grads + optimizer + buffers
        send_fwd = 0.0 if spec.last else cut_out * spec.send_out[0] + spec.send_out[1]
        send_bwd = 0.0 if spec.first else cut_in * spec.send_in[0] + spec.send_in[1]
        r = spec.replicas
        allreduce = 0.0 if r < 2 else 2 * (r - 1) / r * grads * spec.ring[0] + 2 * (r - 1) * spec.ring[1]
        allreduce = allreduce + self._tied_sum(spec, i, e)
        bwd_rc = bwd + fwd

        def exposed(backward: Any) -> Any:
            return np.maximum(0.0, allreduce - backward) if self.options.overlap_allreduce else allreduce

        link = send_fwd + send_bwd
        return _Terms(
            fwd=fwd,
            bwd=bwd,
            bwd_rc=bwd_rc,
            send_fwd=send_fwd,
            send_bwd=send_bwd,
            allreduce=allreduce,
            weights=weights,
            grads=grads,
            optimizer=optimizer,
            buffers=buffers,
            act=act,
            keep=cut_in,
            fits=state_bytes + spec.inflight * act <= spec.capacity,
            fits_rc=state_bytes + act + spec.inflight * cut_in <= spec.capacity,
            cost=np.maximum(fwd + bwd + exposed(bwd) / m, link),
            cost_rc=np.maximum(fwd + bwd_rc + exposed(bwd_rc) / m, link),
            total=fwd + bwd + link,
            total_rc=fwd + bwd_rc + link,
        )

    def _matrices(self, spec: _Spec, m: int, relaxed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(T, tie-break, recomputes) over every range ``[i, e)``; T is inf where the stage
        does not fit (ignoring memory when `relaxed`)."""
        t = self.terms(spec, self.rows, self.cols, m)
        policy = self.options.recompute
        if policy is Recompute.ALWAYS:
            rc = np.ones_like(self.valid)
            ok = self.valid if relaxed else self.valid & t.fits_rc
        elif relaxed:
            rc = np.zeros_like(self.valid)
            ok = self.valid
        else:
            rc = ~t.fits if policy is Recompute.AUTO else np.zeros_like(self.valid)
            ok = self.valid & (t.fits | (rc & t.fits_rc))
        cost = np.where(ok, np.where(rc, t.cost_rc, t.cost), _INF)
        total = np.where(ok, np.where(rc, t.total_rc, t.total), _INF)
        return cost, total, rc

    # ------------------------------------------------------------------ the DP
    def split(self, config: Configuration) -> tuple[float, Split, tuple[bool, ...]] | None:
        """The least bottleneck ``T*`` of `config`, a split reaching it with the least sum of
        ``f + b + sends``, and its recomputation flags; None when no split fits.

        The memory-free DP runs first; its split is kept when it fits (no split can then
        do better), else the DP runs again with memory. Each configuration is solved once."""
        if config not in self._splits:
            self.solved += 1
            self._splits[config] = self._split(config)
        return self._splits[config]

    def _split(self, config: Configuration) -> tuple[float, Split, tuple[bool, ...]] | None:
        specs = self.specs(config)
        m = config.microbatches
        free = self._dp(specs, m, relaxed=True)
        if free is None:
            return None
        _, ranges, flags = free
        if all(self._fits(spec, i, e, m, rc) for spec, (i, e), rc in zip(specs, ranges, flags)):
            return free
        return self._dp(specs, m, relaxed=False)

    def stage(self, spec: _Spec, i: int, e: int, m: int) -> _Terms:
        """`terms` of one range, remembered."""
        key = (spec, i, e, m)
        if key not in self._stage:
            self._stage[key] = self.terms(spec, i, e, m)
        return self._stage[key]

    def _fits(self, spec: _Spec, i: int, e: int, m: int, recompute: bool) -> bool:
        t = self.stage(spec, i, e, m)
        return bool(t.fits_rc if recompute else t.fits)

    def _dp(self, specs: list[_Spec], m: int, relaxed: bool) -> tuple[float, Split, tuple[bool, ...]] | None:
        cache: dict[_Spec, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        mats = []
        for spec in specs:
            if spec not in cache:
                cache[spec] = self._matrices(spec, m, relaxed)
            mats.append(cache[spec])
        n = self.n
        # Phase 1: best[e] is the least bottleneck of the stages so far on layers [0, e).
        best = np.full(n + 1, _INF)
        best[0] = 0.0
        for cost, _, _ in mats:
            best = np.maximum(best[:, None], cost).min(axis=0)
        t_star = float(best[n])
        if not math.isfinite(t_star):
            return None
        # Phase 2: among splits with every stage within T*, the least sum of f + b + sends.
        within = t_star * (1 + 1e-12)
        total = np.full(n + 1, _INF)
        total[0] = 0.0
        parents = []
        for cost, tie, _ in mats:
            candidates = total[:, None] + np.where(cost <= within, tie, _INF)
            parent = candidates.argmin(axis=0)
            parents.append(parent)
            total = candidates[parent, np.arange(n + 1)]
        ranges: list[tuple[int, int]] = []
        e = n
        for parent in reversed(parents):
            ranges.append((int(parent[e]), e))
            e = ranges[-1][0]
        ranges.reverse()
        flags = tuple(bool(rc[i, e]) for (_, _, rc), (i, e) in zip(mats, ranges))
        return t_star, tuple(ranges), flags

    # ------------------------------------------------------------------ splits
    def partition(self, config: Configuration, ranges: Split, recompute: Sequence[bool], origin: str) -> Partition | None:
        """The stages of a split, or None when a stage does not fit."""
        stages, plan_stages = [], []
        for j, (spec, (i, e), rc) in enumerate(zip(self.specs(config), ranges, recompute)):
            if not self._fits(spec, i, e, config.microbatches, rc):
                return None
            t = self.stage(spec, i, e, config.microbatches)
            group = config.groups[j % config.ranks]
            kept = int(t.keep if rc else t.act)
            rebuilt = int(t.act) if rc else 0
            static = int(t.weights + t.grads + t.optimizer + t.buffers) + rebuilt
            bwd = float(t.bwd_rc if rc else t.bwd)
            times = {
                "fwd_s": float(t.fwd),
                "bwd_s": bwd,
                "send_fwd_s": float(t.send_fwd),
                "send_bwd_s": float(t.send_bwd),
                "allreduce_s": float(t.allreduce),
            }
            names = tuple(self.cluster.devices[d].name for d in group.devices)
            stages.append(StageCost(**times, activation_bytes=kept, static_bytes=static, devices=names))
            plan_stages.append(
                PlanStage(
                    index=j,
                    rank=j % config.ranks,
                    first_layer=i,
                    last_layer=e - 1,
                    devices=group.devices,
                    profile="+".join(spec.kinds),
                    samples=spec.samples,
                    recompute=bool(rc),
                    **times,
                    weight_bytes=int(t.weights),
                    grad_bytes=int(t.grads),
                    optimizer_bytes=int(t.optimizer),
                    buffer_bytes=int(t.buffers),
                    recompute_bytes=rebuilt,
                    microbatch_activation_bytes=kept,
                    inflight_microbatches=spec.inflight,
                    peak_memory_bytes=static + spec.inflight * kept,
                    capacity_bytes=spec.capacity,
                )
            )
        return Partition(
            configuration=config,
            ranges=tuple(ranges),
            recompute=tuple(recompute),
            origin=origin,
            stages=tuple(stages),
            plan_stages=tuple(plan_stages),
        )

    def equal_partition(self, config: Configuration) -> Partition | None:
        """The split into equal layer counts (the longer stages first), recomputing where the
        policy allows and a stage must; None when it does not fit."""
        sizes = [self.n // config.stages + (k < self.n % config.stages) for k in range(config.stages)]
        ends = np.cumsum(sizes).tolist()
        return self.policy_partition(config, tuple(zip([0, *ends[:-1]], ends)), "equal")

    def policy_partition(self, config: Configuration, ranges: Split, origin: str) -> Partition | None:
        """The stages of a given split, recomputing where the options' policy allows and a
        stage does not fit otherwise; None when it does not fit."""
        policy = self.options.recompute
        flags = [
            policy is Recompute.ALWAYS
            or (policy is Recompute.AUTO and not self._fits(spec, i, e, config.microbatches, False))
            for spec, (i, e) in zip(self.specs(config), ranges)
        ]
        return self.partition(config, ranges, flags, origin)

    def timed(self, part: Partition) -> Partition:
        """`part` with its step time: simulated, or GPipe's closed form (which equals the
        simulation). Each split is played once."""
        key = (part.configuration, part.ranges, part.recompute)
        if key not in self._timed:
            self.simulated += 1
            c = part.configuration
            overlap = self.options.overlap_allreduce
            if c.schedule is PipelineSchedule.GPIPE:
                played = replace(part, step_time_s=gpipe_step_time(part.stages, c.microbatches, overlap_allreduce=overlap))
            else:
                timeline = simulate(
                    part.stages, c.microbatches, c.schedule, overlap_allreduce=overlap, virtual_stages=c.virtual_stages
                )
                played = replace(part, step_time_s=timeline.step_time_s, timeline=timeline)
            self._timed[key] = played
        return self._timed[key]

    # ------------------------------------------------------------------ bounds
    def work(self, config: Configuration) -> float:
        """``m / sum over ranks g of 1 / W_g``, ``W_g`` the whole model's forward and backward
        per microbatch on rank ``g``: the busiest rank's compute under perfect balance, a
        lower bound on the step of every split of `config`."""
        speed = 0.0
        for g in config.groups:
            b = self.samples(config, g)
            w = 0.0
            for kind in self.kinds(g):
                fp, bp = self.times(kind, b)
                extra = fp[-1] if self.options.recompute is Recompute.ALWAYS else 0.0
                w = max(w, float(fp[-1] + bp[-1] + extra))
            speed += 1 / w if w > 0 else _INF
        return config.microbatches / speed if speed > 0 else 0.0

    def may_fit(self, config: Configuration) -> bool:
        """False when the ranks cannot hold the model's state even spread perfectly (every
        replica of a rank holds its stages' weights, gradients and optimizer state)."""
        return sum(min(self.capacity[d] for d in g.devices) for g in config.groups) >= self.state_bytes

    def split_bound(self, part: Partition) -> float:
        """A lower bound on the step of this split, from its stages alone.

        One stage per rank: stage ``k`` (``f, b`` per microbatch) cannot start before
        microbatch 0 has passed the stages before it (``pre_k``: forwards and sends), nor
        its first backward before microbatch 0 has been to the last stage and back
        (``f + rt_k``); until then it runs at most the ``w`` forwards its schedule allows
        (1F1B: ``min(p - k, m)``, GPipe: ``m``). After its last backward the gradient still
        goes back through the stages before it (``post_k``) while its all-reduce runs::

            pre_k + max(w f, f + rt_k) + (m - w) f + m b + max(post_k, exposed all-reduce_k)

        Interleaved: rank ``r`` starts after ``pre_r`` and computes ``m`` times the sum of
        its stages' ``f + b``, then (serial) all-reduces them one after another. Either
        way, the step is also at least ``m`` times a rank's sends (one link per rank).
        """
        c = part.configuration
        m, stages = c.microbatches, part.stages
        pre = [0.0] * len(stages)
        for k in range(1, len(stages)):
            pre[k] = pre[k - 1] + stages[k - 1].fwd_s + stages[k - 1].send_fwd_s
        if c.virtual_stages > 1:
            bound = 0.0
            for r in range(c.ranks):
                own = stages[r :: c.ranks]
                allreduce = 0.0 if self.options.overlap_allreduce else sum(s.allreduce_s for s in own)
                busy = m * sum(s.fwd_s + s.bwd_s for s in own)
                bound = max(bound, pre[r] + busy + allreduce, m * sum(s.send_fwd_s + s.send_bwd_s for s in own))
            return bound
        p = len(stages)
        rt = [0.0] * p
        for k in range(p - 2, -1, -1):
            nxt = stages[k + 1]
            rt[k] = rt[k + 1] + stages[k].send_fwd_s + nxt.fwd_s + nxt.bwd_s + nxt.send_bwd_s
        bound, post = 0.0, 0.0
        for k, s in enumerate(stages):
            if k:
                post += stages[k - 1].bwd_s + s.send_bwd_s
            w = min(p - k, m) if c.schedule is PipelineSchedule.ONE_F_ONE_B else m
            exposed = max(0.0, s.allreduce_s - s.bwd_s) if self.options.overlap_allreduce else s.allreduce_s
            busy = max(w * s.fwd_s, s.fwd_s + rt[k]) + (m - w) * s.fwd_s + m * s.bwd_s
            bound = max(bound, pre[k] + busy + max(post, exposed), m * (s.send_fwd_s + s.send_bwd_s))
        return bound


def _prefix(values: Sequence[int | float], dtype: Any = np.int64) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(np.asarray(values, dtype=dtype))))
