"""What a pipeline stage costs, and the exact DP that splits the layers into stages.

For stage ``j`` of a `Configuration` on layers ``[i, e)``, with ``b`` samples per
data-parallel replica per microbatch (bytes per device, seconds per microbatch; tensor
parallelism, sharding and the data-parallel collectives as `partitioner.pipeline_plan.terms`
prices them)::

    state       weights + grads + optimizer of its layers (+ copies of tied weights it
                reads), split by TP and sharded as configured, + ZeRO-3 working copies
    buffers     model buffers + 2 x b x (cut bytes at i and at e, where it receives and sends)
    act         b x saved activations per sample
    memory      state + buffers + inflight x act                  <= capacity (/ v, interleaved)
    selective   state + buffers + core + inflight x (act - core)  (rebuilds the attention cores)
    recomputed  state + buffers + act + inflight x b x cut(i)     (keeps its input, rebuilds act)
    f, b        forward and backward (+ the re-run), the slowest kind of its group, with
                TP all-reduces and exposed ZeRO-3 gathers
    send_fwd    b x cut(e) x s/B + latency, to the next stage's group (0 for the last)
    send_bwd    b x cut(i) x s/B + latency, to the previous one (0 for the first)
    allreduce   gradient all-reduce (or ZeRO-1/2's collectives) over its d replicas, once
                per step, and of a tied weight's gradients between its copies (a stage
                that reads it without owning it, and its owner)
    update      the optimizer step over the parameters a device updates (its shard under
                ZeRO), once per step after the all-reduce, on the slowest kind's memory
    T           max(f + b + (exposed all-reduce + update) / m,  send_fwd + send_bwd)
                CPUs (`StageSpec.host_sends`: their cores move the bytes, so a send holds
                the compute lane): f + b + send_fwd + send_bwd + (exposed all-reduce + update) / m

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
from partitioner.collectives import group_links, ring_equivalent
from partitioner.training_costs import TrainingCosts, training_state_bytes
from partitioner.options import Recompute, Sharding, TrainingOptions
from partitioner.pipeline_plan import bounds
from partitioner.pipeline_plan.space import Configuration, Group
from partitioner.pipeline_plan.terms import (
    FULL,
    NONE,
    SELECTIVE,
    LayerTables,
    StageSpec,
    StageTerms,
    stage_terms,
    with_memory,
)
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
_Spec = StageSpec
_Terms = StageTerms
_RANGES_KEPT = 64
"""Stage matrices kept (each ~30 (n+1)^2 arrays: ~2 MB for 96 layers): the schedules and
interleavings of one rank layout and microbatch count share theirs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    """A configuration with its layers split: the stages as the simulator sees them."""

    configuration: Configuration
    ranges: Split
    """Layers ``[first, end)`` of each stage."""
    recompute: tuple[int, ...]
    """Per stage: `terms.NONE`, `terms.FULL` or `terms.SELECTIVE` (a bool reads as none / full)."""
    origin: str
    """``dp`` (the least-bottleneck split) or ``equal`` (equal layer counts)."""
    stages: tuple[StageCost, ...]
    plan_stages: tuple[PlanStage, ...]
    """The same stages as plan data, memory broken down."""
    step_time_s: float = _INF
    """Simulated step time (GPipe: its exact closed form); inf until played."""
    timeline: Timeline | None = None
    """The simulation, when one was played (GPipe's closed form plays none)."""


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
        self._times: dict[tuple[str, int, int, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._tables: dict[int, LayerTables] = {}
        self._timed: dict[tuple[Configuration, Split, tuple[int, ...]], Partition] = {}
        self._specs: dict[Configuration, list[_Spec]] = {}
        self._splits: dict[Configuration, tuple[float, Split, tuple[int, ...]] | None] = {}
        self._stage: dict[tuple[_Spec, int, int, int], _Terms] = {}
        self._free: set[Configuration] = set()
        self._ranges: dict[tuple[_Spec, int], _Terms] = {}
        self._links: dict[tuple[Group, Group, int, int, int], tuple[float, float]] = {}
        self._rings: dict[tuple[Group, int, bool], tuple[float, float]] = {}
        self._kinds: dict[Group, tuple[str, ...]] = {}
        self._update_per_byte: dict[Group, float] = {}
        self._slowdowns: dict[tuple[tuple[Group, ...], Group], float] = {}
        self._inflight: dict[tuple[PipelineSchedule, int, int, int], tuple[int, ...]] = {}
        self.solved = self.simulated = 0

    @property
    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state of the whole model."""
        return int(self.weights[-1] + self.grads[-1] + self.optimizer[-1])

    # ------------------------------------------------------------------ tables
    def tables(self, tp: int) -> LayerTables:
        """The layer tables under tensor-parallel degree `tp` (`terms.LayerTables`)."""
        if tp not in self._tables:
            self._tables[tp] = LayerTables(self.costs, tp, self.options.sequence_parallel)
        return self._tables[tp]

    def useful_degrees(self) -> tuple[int, ...]:
        """The options' tensor-parallel degrees that split some layer (1 always): a degree
        that splits none would run every layer on each of its devices alike."""
        return tuple(t for t in self.options.tensor_parallel if t == 1 or self.tables(t).splits_any) or (1,)

    def times(
        self, kind: str, samples: int, tp: int = 1, slowdown: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums of forward, backward and selective re-run seconds of `kind` at
        `samples` per microbatch, per device of a tensor-parallel degree `tp`, each
        `slowdown` times its time alone (`slowdown`)."""
        key = (kind, samples, tp, slowdown)
        if key not in self._times:
            t = self.costs.times_for(kind, samples)
            tab = self.tables(tp)
            fwd = np.asarray(t.fwd_s, dtype=float) * slowdown
            self._times[key] = (
                _prefix(fwd * tab.scale, float),
                _prefix(np.asarray(t.bwd_s, dtype=float) * slowdown * tab.scale, float),
                _prefix(fwd * tab.core_share, float),
            )
        return self._times[key]

    def slowdown(self, config: Configuration, group: Group) -> float:
        """How much slower `group`'s devices compute than alone: the configuration runs a
        process on each device it uses, and those on one node may share its cores
        (`Cluster.slowdown`, 1 without ``compute_sharing``); the group's slowest device's."""
        if not self.cluster.compute_sharing:
            return 1.0
        key = (config.groups, group)
        found = self._slowdowns.get(key)
        if found is None:
            used = (d for g in config.groups for d in g.devices)
            found = self._slowdowns[key] = self.cluster.group_slowdown(used, group.devices)
        return found

    def kinds(self, group: Group) -> tuple[str, ...]:
        """The device kinds of `group`, in order of first appearance."""
        found = self._kinds.get(group)
        if found is None:
            found = self._kinds[group] = tuple(dict.fromkeys(self.cluster.devices[d].profile.name for d in group.devices))
        return found

    def update_per_byte(self, group: Group) -> float:
        """Seconds per byte of an optimizer step on `group`: its slowest device's memory,
        ``1 / (memory_bandwidth_Bps x memory_efficiency)`` (the step is memory-bound)."""
        found = self._update_per_byte.get(group)
        if found is None:
            profiles = (self.cluster.devices[d].profile for d in group.devices)
            found = self._update_per_byte[group] = max(
                1 / (p.memory_bandwidth_Bps * p.memory_efficiency) for p in profiles
            )
        return found

    def samples(self, config: Configuration, group: Group) -> int:
        """Samples per data-parallel replica of `group` per microbatch."""
        return self.batch // (config.microbatches * config.data_parallel(group))

    def link(self, src: Group, dst: Group, src_samples: int, dst_samples: int, tp: int = 1) -> tuple[float, float]:
        """(seconds per byte, latency) of a replica of `src` sending its samples on to `dst`.

        Replica ``k`` (devices ``[k tp, (k+1) tp)``) holds samples ``[k b, (k+1) b)`` of the
        microbatch; each of its devices sends its part of them to the device of the same
        tensor-parallel rank in the replica of `dst` that holds them: the slowest pair's
        seconds per byte, and the latencies of the messages one sender makes one after another.
        """
        key = (src, dst, src_samples, dst_samples, tp)
        if key in self._links:
            return self._links[key]
        c = self.cluster
        spb, lat = 0.0, 0.0
        for k, sender in enumerate(src.devices):
            replica, rank = divmod(k, tp)
            first = replica * src_samples // dst_samples
            last = ((replica + 1) * src_samples - 1) // dst_samples
            receivers = [dst.devices[q * tp + rank] for q in range(first, last + 1)]
            spb = max([spb] + [c.seconds_per_byte[sender][r] for r in receivers])
            lat = max(lat, sum(c.latency_s[sender][r] for r in receivers))
        self._links[key] = spb, lat
        return spb, lat

    def ring(self, group: Group, tp: int = 1, inner: bool = False) -> tuple[float, float]:
        """(seconds per byte, latency) of one hop of the rings over `group`, for the ring
        formula ``2 (n-1)/n x bytes x s + 2 (n-1) x latency``: the data-parallel rings
        (devices strided by `tp`), or with `inner` the tensor-parallel ones (each run of
        `tp` consecutive devices, inside a node). A ring across nodes is priced as the
        per-level hierarchy (`partitioner.collectives.ring_equivalent`: inside each node,
        then a slice per device over the network), the slowest of the rings."""
        key = (group, tp, inner)
        if key in self._rings:
            return self._rings[key]
        rings = (
            [group.devices[k : k + tp] for k in range(0, group.replicas, tp)]
            if inner
            else [group.devices[k::tp] for k in range(tp)]
        )
        hops = [ring_equivalent(group_links(self.cluster, d)) for d in rings if len(d) > 1]
        self._rings[key] = max((h[0] for h in hops), default=0.0), max((h[1] for h in hops), default=0.0)
        return self._rings[key]

    def specs(self, config: Configuration) -> list[_Spec]:
        """The `_Spec` of every stage of `config`, in order."""
        if config not in self._specs:
            self._specs[config] = self._make_specs(config)
        return self._specs[config]

    def _make_specs(self, config: Configuration) -> list[_Spec]:
        p, count, v, t = config.ranks, config.stages, config.virtual_stages, config.tp
        key = (config.schedule, p, config.microbatches, v)
        if key not in self._inflight:
            self._inflight[key] = tuple(peak_inflight_microbatches(config.schedule, p, config.microbatches, v))
        inflight = self._inflight[key]
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
                    send_out=self.link(g, nxt, b, self.samples(config, nxt), t) if j < count - 1 else (0.0, 0.0),
                    send_in=self.link(g, prv, b, self.samples(config, prv), t) if j > 0 else (0.0, 0.0),
                    ring=self.ring(g, t),
                    tp=t,
                    tp_ring=self.ring(g, t, inner=True),
                    sharding=config.sharding if config.data_parallel(g) > 1 else Sharding.NONE,
                    slowdown=self.slowdown(config, g),
                    update_per_byte=self.update_per_byte(g),
                    host_sends=all(self.cluster.devices[d].profile.kind == "cpu" for d in g.devices),
                )
            )
        return out

    def _tied_sum(self, spec: _Spec, i: Any, e: Any) -> Any:
        """Seconds of summing tied weights' gradients between this stage and another holding a
        copy, once per step (`partitioner.distributed` does it after the schedule).

        A stage joins when it owns a tied weight that a layer past it reads, or reads one it
        does not own: a ring all-reduce over the copies' ``2 d`` devices (two stages of ``d``
        data-parallel replicas, as an embedding and its head), each hop on the slower of the
        replica ring and the link between stages.
        """
        total: Any = 0.0
        if not self.tied:
            return total
        members = 2 * spec.data_parallel
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
        """Every figure of a stage on layers ``[i, e)`` (`partitioner.pipeline_plan.terms`).

        `i`, `e` are ints, or index arrays broadcasting to every range at once; the
        arithmetic is the same, so the DP's matrices and the chosen stages agree.
        """
        fwd: Any = None
        bwd: Any = None
        sel: Any = None
        for kind in spec.kinds:  # a group of several kinds runs at its slowest replica's pace
            fp, bp, sp = self.times(kind, spec.samples, spec.tp, spec.slowdown)
            fwd = fp[e] - fp[i] if fwd is None else np.maximum(fwd, fp[e] - fp[i])
            bwd = bp[e] - bp[i] if bwd is None else np.maximum(bwd, bp[e] - bp[i])
            sel = sp[e] - sp[i] if sel is None else np.maximum(sel, sp[e] - sp[i])
        weights: Any = 0
        grads: Any = 0
        optimizer: Any = 0
        for owner, users, state in self.tied:  # a copy where a reader is and the owner is not
            reads = np.zeros(np.broadcast(i, e).shape, dtype=bool)
            for u in users:
                reads = reads | ((i <= u) & (u < e))
            copy = reads & ~((i <= owner) & (owner < e))
            weights = weights + copy * state.weights
            grads = grads + copy * state.grads
            optimizer = optimizer + copy * state.optimizer
        return stage_terms(
            self.tables(spec.tp),
            spec,
            i,
            e,
            m,
            times=(fwd, bwd, sel),
            cut=self.cut,
            buffers=self.buffers,
            tied=(weights, grads, optimizer, self._tied_sum(spec, i, e)),
            overlap_allreduce=self.options.overlap_allreduce,
            zero1_weight_shard=self.options.zero1_weight_shard,
        )

    def modes(self) -> tuple[int, ...]:
        """The recomputation modes the options allow a stage, the cheapest first."""
        return {
            Recompute.NEVER: (NONE,),
            Recompute.AUTO: (NONE, SELECTIVE, FULL),
            Recompute.SELECTIVE: (SELECTIVE, FULL),
            Recompute.ALWAYS: (FULL,),
        }[self.options.recompute]

    def _all_ranges(self, spec: _Spec, m: int, memory: bool = True) -> _Terms:
        """`terms` of every range at once; stages alike but for their memory limits (ranks of
        a 1F1B pipeline keep different microbatch counts in flight) share the arithmetic
        (what fits is left as for another stage unless `memory`)."""
        key = (replace(spec, inflight=0, capacity=0), m)
        base = self._ranges.pop(key, None)
        if base is None:
            base = self.terms(key[0], self.rows, self.cols, m)
            if len(self._ranges) >= _RANGES_KEPT:
                del self._ranges[next(iter(self._ranges))]  # the least recently used
        self._ranges[key] = base
        return with_memory(base, spec) if memory else base

    def _matrices(self, spec: _Spec, m: int, relaxed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(T, tie-break, recomputation mode) over every range ``[i, e)``: the cheapest mode
        the options allow that fits; T is inf where none fits (memory ignored when
        `relaxed`: the cheapest mode)."""
        t = self._all_ranges(spec, m, memory=not relaxed)
        modes = self.modes()
        cost = np.full(self.valid.shape, _INF)
        total = np.full(self.valid.shape, _INF)
        mode = np.zeros(self.valid.shape, dtype=np.int64)
        free = self.valid.copy()
        for k in modes[:1] if relaxed else modes:
            _, fits, c, tie, _ = t.mode(k)
            take = free if relaxed else free & fits
            cost = np.where(take, c, cost)
            total = np.where(take, tie, total)
            mode = np.where(take, k, mode)
            free = free & ~take
        return cost, total, mode

    # ------------------------------------------------------------------ the DP
    def split(self, config: Configuration) -> tuple[float, Split, tuple[int, ...]] | None:
        """The least bottleneck ``T*`` of `config`, a split reaching it with the least sum of
        ``f + b + sends``, and its recomputation flags; None when no split fits.

        The memory-free DP runs first; its split is kept when it fits (no split can then
        do better), else the DP runs again with memory. Each configuration is solved once."""
        if config not in self._splits:
            self.solved += 1
            self._splits[config] = self._split(config)
        return self._splits[config]

    def _split(self, config: Configuration) -> tuple[float, Split, tuple[int, ...]] | None:
        specs = self.specs(config)
        m = config.microbatches
        free = self._dp(specs, m, relaxed=True)
        if free is None:
            return None
        _, ranges, flags = free
        if all(self._fits(spec, i, e, m, rc) for spec, (i, e), rc in zip(specs, ranges, flags)):
            self._free.add(config)
            return free
        return self._dp(specs, m, relaxed=False)

    def unconstrained(self, config: Configuration) -> bool:
        """Whether `config` was solved and memory did not bind: its split is the memory-free
        DP's, at the cheapest recomputation (a configuration that differs only in holding
        less and communicating no less cannot beat it)."""
        return config in self._free

    def stage(self, spec: _Spec, i: int, e: int, m: int) -> _Terms:
        """`terms` of one range, remembered."""
        key = (spec, i, e, m)
        if key not in self._stage:
            self._stage[key] = self.terms(spec, i, e, m)
        return self._stage[key]

    def _fits(self, spec: _Spec, i: int, e: int, m: int, recompute: int) -> bool:
        return bool(self.stage(spec, i, e, m).mode(recompute)[1])

    def _dp(self, specs: list[_Spec], m: int, relaxed: bool) -> tuple[float, Split, tuple[int, ...]] | None:
        cache: dict[_Spec, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        mats = []
        for spec in specs:
            # Without memory, stages that differ only in what they may hold share matrices.
            key = replace(spec, inflight=0, capacity=0) if relaxed else spec
            if key not in cache:
                cache[key] = self._matrices(spec, m, relaxed)
            mats.append(cache[key])
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
        flags = tuple(int(rc[i, e]) for (_, _, rc), (i, e) in zip(mats, ranges))
        return t_star, tuple(ranges), flags

    # ------------------------------------------------------------------ splits
    def partition(self, config: Configuration, ranges: Split, recompute: Sequence[int], origin: str) -> Partition | None:
        """The stages of a split, or None when a stage does not fit."""
        stages, plan_stages = [], []
        for j, (spec, (i, e), rc) in enumerate(zip(self.specs(config), ranges, recompute)):
            if not self._fits(spec, i, e, config.microbatches, rc):
                return None
            t = self.stage(spec, i, e, config.microbatches)
            group = config.groups[j % config.ranks]
            kept = int(t.keep if rc == FULL else t.act - t.core if rc == SELECTIVE else t.act)
            rebuilt = int(t.act if rc == FULL else t.core if rc == SELECTIVE else 0)
            static = int(t.weights) + int(t.grads) + int(t.optimizer) + int(t.gathered) + int(t.buffers) + rebuilt
            times = {
                "fwd_s": float(t.fwd),
                "bwd_s": float(t.mode(rc)[0]),
                "send_fwd_s": float(t.send_fwd),
                "send_bwd_s": float(t.send_bwd),
                "allreduce_s": float(t.allreduce),
                "optimizer_s": float(t.update),
            }
            plan_stages.append(
                PlanStage(
                    index=j,
                    rank=j % config.ranks,
                    first_layer=i,
                    last_layer=e - 1,
                    devices=group.devices,
                    profile="+".join(spec.kinds),
                    samples=spec.samples,
                    recompute=rc == FULL,
                    selective=rc == SELECTIVE,
                    **times,
                    host_sends=spec.host_sends,
                    tp_comm_s=float(t.tp_comm),
                    dp_comm_fwd_s=float(t.dp_fwd),
                    dp_comm_bwd_s=float(t.mode(rc)[4]),
                    weight_bytes=int(t.weights),
                    grad_bytes=int(t.grads),
                    optimizer_bytes=int(t.optimizer),
                    gathered_bytes=int(t.gathered),
                    buffer_bytes=int(t.buffers),
                    recompute_bytes=rebuilt,
                    microbatch_activation_bytes=kept,
                    inflight_microbatches=spec.inflight,
                    peak_memory_bytes=static + spec.inflight * kept,
                    capacity_bytes=spec.capacity,
                )
            )
            stage = plan_stages[-1]
            stages.append(
                StageCost(
                    **times,
                    host_sends=spec.host_sends,
                    collective_fwd_s=stage.collective_fwd_s,
                    collective_bwd_s=stage.collective_bwd_s,
                    activation_bytes=kept,
                    static_bytes=static,
                    devices=tuple(self.cluster.devices[d].name for d in group.devices),
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
        modes = self.modes()
        flags = [
            next((k for k in modes if self._fits(spec, i, e, config.microbatches, k)), modes[-1])
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
        """`bounds.work`: no split of `config` steps faster."""
        return bounds.work(self, config)

    def may_fit(self, config: Configuration) -> bool:
        """`bounds.may_fit`: False when no split of `config` can hold the model's state."""
        return bounds.may_fit(self, config)

    def split_bound(self, part: Partition) -> float:
        """`bounds.split_bound`: `part` steps no faster."""
        return bounds.split_bound(self, part)


def _prefix(values: Sequence[int | float] | np.ndarray, dtype: Any = np.int64) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(np.asarray(values, dtype=dtype))))
