"""Lower bounds on a training step: of every split of a configuration, and of one split.

The search (`partitioner.pipeline_plan.search`) prunes with them; each must stay a true
lower bound of what `partitioner.simulate` plays (property tests check them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from partitioner.options import Sharding
from partitioner.pipeline_plan.space import Configuration
from partitioner.pipeline_plan.terms import FULL, SELECTIVE, accumulate_bytes, per_step_collectives, shards_gradients
from partitioner.simulate import PipelineSchedule

if TYPE_CHECKING:
    from partitioner.pipeline_plan.stages import Partition, StageModel

__all__ = ["work", "held_state", "may_fit", "split_bound"]

_INF = float("inf")


def work(model: StageModel, config: Configuration) -> float:
    """A lower bound on the step of every split of `config`: each rank's whole-model load
    spread over the ranks as evenly as their speeds allow.

    Rank ``g``'s load for the whole model, ``T_g``: ``m`` microbatches of forward and
    backward per device (tensor-parallel compute, the cheapest recomputation the
    options allow, the TP all-reduces without latency, the gradients each backward
    adds into those held), unless overlapped with backward
    its per-step data-parallel collectives (without latency), and its optimizer step over
    the parameters a device updates (on the compute lane, never overlapped). A split gives
    rank ``g`` layers ``L_g`` and it is busy at least ``sum over L_g`` of those per-layer
    loads; so ``step >= phi / sum_g 1 / T_g``, ``phi = sum over layers of the least share
    of its rank's whole load a layer takes on any rank`` (1 where the ranks are alike).

    And the fill: with one stage per rank, ranks alike, stage ``k`` (load ``c_k`` per
    microbatch) starts after microbatch 0's forward through the stages before it and ends
    before the last one's backward through them, so ``step >= sum_{j<k} c_j + m c_k`` for
    every ``k``; with ``sum c_k = C`` (the whole model per microbatch) the least largest of
    these is ``C / (1 - (1 - 1/m)^p)`` (each as large as the others allow).
    """
    cheapest = model.modes()[0]
    tab = model.tables(config.tp)
    m = config.microbatches
    loads: dict[tuple[object, ...], np.ndarray] = {}
    per_microbatch = 0.0
    rate = 0.0
    for g in config.groups:
        b, d = model.samples(config, g), config.data_parallel(g)
        slowdown = model.slowdown(config, g)
        key = (
            model.kinds(g), b, d, model.ring(g, config.tp), model.ring(g, config.tp, True), slowdown,
            model.update_per_byte(g),
        )
        if key not in loads:
            per_layer = np.zeros(model.n)
            for kind in key[0]:
                fp, bp, sp = model.times(kind, b, config.tp, slowdown)
                compute = np.diff(fp) + np.diff(bp)
                compute += np.diff(fp) if cheapest == FULL else np.diff(sp) if cheapest == SELECTIVE else 0.0
                per_layer = np.maximum(per_layer, compute)
            if config.tp > 1:
                t = config.tp
                passes = 3 if cheapest == FULL else 2
                per_layer = per_layer + passes * 2 * (t - 1) / t * np.diff(tab.tp_comm) * b * model.ring(g, t, True)[0]
            sharding = config.sharding if d > 1 else Sharding.NONE
            # Gradients summed over the microbatches, (m-1)/m of it in each backward.
            held = tab.layer_grads / (d if shards_gradients(sharding) else 1)
            per_layer = per_layer + accumulate_bytes(held, m) * model.update_per_byte(g) * slowdown
            per_microbatch = float(per_layer.sum())
            stepped = np.diff(tab.update) / (d if sharding is not Sharding.NONE else 1)
            per_layer = m * per_layer + stepped * model.update_per_byte(g) * slowdown
            if not model.options.overlap_allreduce:
                per_layer = per_layer + per_step_collectives(
                    sharding, d, tab.layer_weights, tab.layer_grads, (model.ring(g, config.tp)[0], 0.0)
                )
            loads[key] = per_layer
        total = float(loads[key].sum())
        rate += 1 / total if total > 0 else _INF
    if rate == 0:
        return 0.0
    if len(loads) > 1:
        shares = np.array([load / load.sum() if load.sum() > 0 else np.zeros_like(load) for load in loads.values()])
        return float(shares.min(axis=0).sum()) / rate
    fill = 0.0
    if config.virtual_stages == 1:
        fill = per_microbatch / (1 - (1 - 1 / m) ** config.ranks)
    return max(1 / rate, fill)


def held_state(model: StageModel, config: Configuration) -> int:
    """Bytes of the whole model's weights, gradients and optimizer state one device holds
    at the configuration's tensor-parallel degree and sharding over its ranks' most
    data-parallel replicas (working copies of ZeRO-3 not counted)."""
    tab = model.tables(config.tp)
    d = max(config.data_parallel(g) for g in config.groups)
    w, g, o = int(tab.weights[-1]), int(tab.grads[-1]), int(tab.optimizer[-1])
    sharding = config.sharding if d > 1 else Sharding.NONE
    if sharding is not Sharding.NONE:
        o //= d
        if sharding is not Sharding.ZERO1:
            g //= d
        if sharding in (Sharding.ZERO3, Sharding.ZERO3_KEEP):
            w //= d
    return w + g + o

def may_fit(model: StageModel, config: Configuration) -> bool:
    """False when the ranks cannot hold the model's state even spread perfectly (each
    device of a rank holds its stages' state as `held_state` counts it; more replicas
    shard more, so the ranks' most replicas bound every rank's share from below)."""
    return sum(min(model.capacity[d] for d in g.devices) for g in config.groups) >= held_state(model, config)

def split_bound(model: StageModel, part: Partition) -> float:
    """A lower bound on the step of this split, from its stages alone.

    One stage per rank: stage ``k`` (``f, b`` per microbatch) cannot start before
    microbatch 0 has passed the stages before it (``pre_k``: forwards and sends), nor
    its first backward before microbatch 0 has been to the last stage and back
    (``f + rt_k``); until then it runs at most the ``w`` forwards its schedule allows
    (1F1B: ``min(p - k, m)``, GPipe: ``m``). After its last backward the gradient still
    goes back through the stages before it (``post_k``) while its all-reduce and then its
    optimizer step run::

        pre_k + max(w f, f + rt_k) + (m - w) f + m b + max(post_k, exposed all-reduce_k + optimizer_k)

    Interleaved: rank ``r`` starts after ``pre_r`` and computes ``m`` times the sum of
    its stages' ``f + b``, then (serial) all-reduces them one after another, then steps
    their optimizers. Either way, the step is also at least ``m`` times a rank's sends
    (one link per rank).
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
            allreduce = 0.0 if model.options.overlap_allreduce else sum(s.allreduce_s for s in own)
            busy = m * sum(s.fwd_s + s.bwd_s for s in own) + sum(s.optimizer_s for s in own)
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
        exposed = max(0.0, s.allreduce_s - s.bwd_s) if model.options.overlap_allreduce else s.allreduce_s
        busy = max(w * s.fwd_s, s.fwd_s + rt[k]) + (m - w) * s.fwd_s + m * s.bwd_s
        bound = max(bound, pre[k] + busy + max(post, exposed + s.optimizer_s), m * (s.send_fwd_s + s.send_bwd_s))
    return bound
