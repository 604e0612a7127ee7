"""The training space beyond replicated pipelines: tensor parallelism, ZeRO / FSDP sharding,
selective recomputation, on hand-built tables (no torch, as tests/test_pipeline_plan.py).

Layers here carry the tensor-parallel fields a traced transformer block would: most of
its FLOPs, parameters and activations in column -> row pairs (`ChainLayer.tp_flops`, ...),
an all-reduce of its output per sample (`tp_comm_bytes`), attention cores (`core_*`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import replace
from fractions import Fraction

import pytest

from partitioner.cluster import Cluster, load_cluster
from partitioner.errors import InfeasibleError
from partitioner.options import Optimizer, Precision, Recompute, Sharding, TrainingOptions
from partitioner.pipeline_plan import Configuration, Group, StageModel, configurations, microbatch_sizes, plan_pipeline
from partitioner.pipeline_plan.search import _dominated
from partitioner.pipeline_plan.space import tensor_parallel_degrees
from partitioner.pipeline_plan.terms import FULL, NONE, SELECTIVE, update_bytes
from partitioner.plan import Plan
from partitioner.simulate import PipelineSchedule
from partitioner.training_costs import ChainLayer, LayerTimes, TrainingCosts, training_state_bytes
from tests.test_pipeline_plan import assert_dp_exact, assert_plan_valid, hand_cluster, hand_costs
from tests.test_plan import hand_pipeline_plan


def tp_costs(
    cluster: Cluster,
    batch: int,
    options: TrainingOptions,
    *,
    comm: int = 10**4,
    divisor: int = 8,
    x: float = 0.9,
    core: float = 0.1,
    speed: float = 1e-3,
    **table: int,
) -> TrainingCosts:
    """`hand_costs`' layers (`table`: n, params, act, cut; forward ``speed x b`` seconds,
    backward twice that; float32, SGD) with a share `x` of their FLOPs, parameters and
    activations in tensor-parallel pairs (splitting for degrees dividing `divisor`); `comm`
    bytes per sample all-reduced per pass; attention cores of a share `core` of the FLOPs
    and activations."""
    base = hand_costs(cluster, batch, options, speed={k: speed for k in cluster.kinds}, **table)
    first = base.layers[0]
    split = dict(
        tp_flops=x * first.flops, tp_params=int(x * first.params), tp_activation_bytes=int(x * first.activation_bytes),
        tp_comm_bytes=comm, tp_divisor=divisor, core_flops=core * first.flops,
        core_activation_bytes=int(core * first.activation_bytes),
    )
    return replace(base, layers=tuple(replace(layer, **split) for layer in base.layers))


def one_stage(devices: int, tp: int, sharding: Sharding, microbatches: int = 1) -> Configuration:
    return Configuration(
        groups=(Group(tuple(range(devices))),), layout="one group", microbatches=microbatches,
        schedule=PipelineSchedule.GPIPE, tp=tp, sharding=sharding,
    )


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("sharding", list(Sharding))
def test_memory_per_zero_stage_is_the_formula(sharding: Sharding) -> None:
    # 4 devices, tp 2: d = 2 replicas; 8 layers of 10^6 parameters, 90% of them split.
    options = TrainingOptions(max_microbatches=1)
    cluster = hand_cluster(["a100-80gb x4"])
    costs = tp_costs(cluster, 8, options)
    model = StageModel(costs, cluster, 8, options)
    config = one_stage(4, 2, sharding)
    (spec,) = model.specs(config)
    t = model.stage(spec, 0, 8, 1)
    per_layer = 10**6 - 900_000 + 450_000  # (params - tp_params) + tp_params / tp
    state = training_state_bytes(8 * per_layer, Precision.FP32, Optimizer.SGD)
    w, g, o, d = state.weights, state.grads, state.optimizer, 2
    expected = {
        Sharding.NONE: (w, g, o, 0),
        # FSDP2 keeps each shard beside the gathered copy; zero1 accumulates whole gradients.
        Sharding.ZERO1: (w / d, g, o / d, w),
        Sharding.ZERO2: (w / d, g / d, o / d, w),
        Sharding.ZERO3: (w / d, g / d, o / d, 2 * w / 8),  # the two largest (equal) layers, unsharded
        Sharding.ZERO3_KEEP: (w / d, g / d, o / d, w),
    }[sharding]
    assert (t.weights, t.grads, t.optimizer, t.gathered) == pytest.approx(expected)
    # Priced as DeepSpeed holds ZeRO-1 (no weight shard beside the whole weights); the others alike.
    deepspeed = StageModel(costs, cluster, 8, replace(options, zero1_weight_shard=False))
    (ds_spec,) = deepspeed.specs(config)
    ds = deepspeed.stage(ds_spec, 0, 8, 1)
    ds_expected = (w, g, o / d, 0) if sharding is Sharding.ZERO1 else expected
    assert (ds.weights, ds.grads, ds.optimizer, ds.gathered) == pytest.approx(ds_expected)
    assert ds.allreduce == pytest.approx(t.allreduce)  # the same collectives
    # Activations: with sequence parallelism all of a split layer's divide by tp; without, the pairs' only.
    b = spec.samples
    assert b == 4 and t.act == pytest.approx(8 * b * 10**5 / 2)
    no_sp = StageModel(costs, cluster, 8, replace(options, sequence_parallel=False))
    (spec_no_sp,) = no_sp.specs(config)
    assert no_sp.stage(spec_no_sp, 0, 8, 1).act == pytest.approx(8 * b * (10**4 + 90_000 / 2))


def test_compute_and_tp_all_reduce_per_layer_are_the_formula() -> None:
    # f_t = f (1 - x + x / t) plus a ring all-reduce of b x comm bytes per layer, each pass.
    options = TrainingOptions(max_microbatches=1)
    spb, latency = 1e-11, 2e-6
    cluster = hand_cluster(["a100-80gb x4"], spb=spb)
    cluster = replace(cluster, latency_s=tuple(tuple(0.0 if a == c else latency for c in range(4)) for a in range(4)))
    costs = tp_costs(cluster, 4, options, comm=10**6)
    model = StageModel(costs, cluster, 4, options)
    (spec,) = model.specs(one_stage(4, 4, Sharding.NONE))
    t = model.stage(spec, 0, 8, 1)
    b = spec.samples
    assert b == 4
    allreduce = 8 * (2 * 3 / 4 * b * 10**6 * spb + 2 * 3 * latency)
    assert t.tp_comm == pytest.approx(allreduce)
    assert t.fwd == pytest.approx(8 * 1e-3 * b * (1 - 0.9 + 0.9 / 4) + allreduce)
    assert t.bwd == pytest.approx(8 * 2e-3 * b * (1 - 0.9 + 0.9 / 4) + allreduce)
    # Selective recomputation re-runs the cores' forward (a tenth of the FLOPs, split by tp);
    # full re-runs the forward and its all-reduces.
    assert t.bwd_sel - t.bwd == pytest.approx(8 * 1e-3 * b * 0.1 / 4)
    assert t.bwd_rc - t.bwd == pytest.approx(t.fwd)
    assert t.core == pytest.approx(8 * b * 10**4 / 4)


def test_a_degree_not_dividing_the_layers_divisor_leaves_it_replicated() -> None:
    # tp_divisor 2: degree 2 splits the layers, degree 4 cannot (no compute saved, no all-reduce).
    options = TrainingOptions(max_microbatches=1)
    cluster = hand_cluster(["a100-80gb x4"])
    costs = tp_costs(cluster, 4, options, divisor=2)
    model = StageModel(costs, cluster, 4, options)
    (two,) = model.specs(one_stage(2, 2, Sharding.NONE))
    (four,) = model.specs(one_stage(4, 4, Sharding.NONE))
    split, whole = model.stage(two, 0, 8, 1), model.stage(four, 0, 8, 1)
    state = training_state_bytes(10**6, Precision.FP32, Optimizer.SGD)
    assert whole.weights == 8 * state.weights and whole.tp_comm == 0
    assert whole.fwd == pytest.approx(8 * 1e-3 * four.samples)
    assert split.weights < whole.weights and split.tp_comm > 0
    assert model.useful_degrees() == (1, 2)  # degree 4 (and 8) split nothing: out of the space


def test_a_vocabulary_splits_at_any_degree_the_busiest_rank_holding_ceil_rows() -> None:
    # Layers of one vocabulary shard of 101 rows (no pair): degree 2 splits them 51 / 50, degree
    # 4 26 / 26 / 26 / 23; the busiest rank's share ceil(101 / t) / 101 of the split part is priced.
    options = TrainingOptions(max_microbatches=1)
    cluster = hand_cluster(["a100-80gb x4"])
    costs = tp_costs(cluster, 4, options, divisor=0)
    costs = replace(costs, layers=tuple(replace(layer, tp_vocab=(101,)) for layer in costs.layers))
    model = StageModel(costs, cluster, 4, options)
    assert model.useful_degrees() == (1, 2, 4, 8)
    for t, rows in ((2, 51), (4, 26)):
        (spec,) = model.specs(one_stage(t, t, Sharding.NONE))
        stage = model.stage(spec, 0, 8, 1)
        per_layer = 10**6 - 900_000 + math.ceil(900_000 * rows / 101)
        assert stage.weights == 8 * training_state_bytes(per_layer, Precision.FP32, Optimizer.SGD).weights
        assert stage.fwd - stage.tp_comm == pytest.approx(8 * 1e-3 * spec.samples * (1 - 0.9 + 0.9 * rows / 101))
        assert stage.tp_comm > 0  # an embedding's output is all-reduced, as the pairs' rows'
    # A layer with pairs as well stays whole at a degree its pairs' divisor (2) does not split.
    mixed = replace(costs.layers[0], tp_divisor=2)
    assert mixed.tp_splits(2) and not mixed.tp_splits(4) and mixed.tp_share(4) == 1
    assert mixed.tp_share(2) == Fraction(51, 101)  # the busier of the pairs' 1/2 and the vocabulary's 51/101


@pytest.mark.parametrize(
    ("precision", "optimizer", "per_param"),
    [
        (Precision.FP32, Optimizer.ADAM, 28),  # grads 4 + state 2 x 8 + weights read and written 2 x 4
        (Precision.FP16, Optimizer.ADAM, 28),  # grads 2 + (master 4 + moments 8) x 2 + weights written 2
        (Precision.BF16, Optimizer.ADAM, 28),
        (Precision.FP32, Optimizer.SGD, 12),  # grads 4 + weights read and written 2 x 4
        (Precision.BF16, Optimizer.SGD, 12),  # grads 2 + master 4 x 2 + weights written 2
    ],
)
def test_an_optimizer_step_moves_the_formulas_bytes_per_parameter(
    precision: Precision, optimizer: Optimizer, per_param: int
) -> None:
    state = training_state_bytes(1000, precision, optimizer)
    assert update_bytes(state.weights, state.grads, state.optimizer, precision) == 1000 * per_param


@pytest.mark.parametrize("sharding", list(Sharding))
def test_the_optimizer_step_is_its_shards_bytes_over_the_slowest_memory(sharding: Sharding) -> None:
    """4 devices, tp 2 (d = 2 replicas), 8 layers of 460,000 parameters per device (SGD in
    float32: 12 bytes each a step) over the A100's 2.039 TB/s x 0.85; half of them under any
    sharding. The DP's objective carries it once per step, as the all-reduce (/ m)."""
    options = TrainingOptions(max_microbatches=1)
    cluster = hand_cluster(["a100-80gb x4"])
    model = StageModel(tp_costs(cluster, 8, options), cluster, 8, options)
    (spec,) = model.specs(one_stage(4, 2, sharding))
    t = model.stage(spec, 0, 8, 1)
    stepped = 12 * 8 * (10**6 - 900_000 + 450_000) / (1 if sharding is Sharding.NONE else 2)
    assert spec.update_per_byte == 1 / (2.039e12 * 0.85)
    assert t.update == pytest.approx(stepped / (2.039e12 * 0.85))
    assert t.cost == pytest.approx(t.fwd + t.bwd + t.allreduce + t.update)  # m = 1, sends free
    four = model.stage(spec, 0, 8, 4)
    assert four.cost == pytest.approx(four.fwd + four.bwd + (four.allreduce + four.update) / 4)
    # Processes sharing cores step as much slower; a group of two kinds at the slower memory's pace.
    assert model.terms(replace(spec, slowdown=3.0), 0, 8, 1).update == pytest.approx(3 * t.update)
    mixed = hand_cluster(["a100-80gb", "a100-40gb"])
    assert StageModel(tp_costs(mixed, 8, options), mixed, 8, options).update_per_byte(Group((0, 1))) == 1 / (
        1.555e12 * 0.85)


@pytest.mark.parametrize("sharding", list(Sharding))
def test_each_backward_but_the_first_adds_its_gradients_at_the_memorys_pace(sharding: Sharding) -> None:
    """Over m microbatches, autograd adds each backward's gradients into those held (read both,
    write one: 3 G bytes) in all but the first: (m-1)/m of it in each backward, at the
    memory's pace (the A100's 2.039 TB/s x 0.85). The gradients held are a 1/d shard under
    ZeRO-2/3 and whole under ZeRO-1 and none."""
    options = TrainingOptions(max_microbatches=4)
    cluster = hand_cluster(["a100-80gb x4"])
    model = StageModel(tp_costs(cluster, 8, options), cluster, 8, options)
    (spec,) = model.specs(one_stage(4, 2, sharding))
    one, four = model.stage(spec, 0, 8, 1), model.stage(spec, 0, 8, 4)
    whole = sharding in (Sharding.NONE, Sharding.ZERO1)
    grads = 4 * 8 * (10**6 - 900_000 + 450_000) / (1 if whole else 2)
    assert four.grads == pytest.approx(grads)
    added = 3 * grads * 3 / 4 / (2.039e12 * 0.85)
    for mode in (NONE, SELECTIVE, FULL):
        assert four.mode(mode)[0] - one.mode(mode)[0] == pytest.approx(added, rel=1e-9)
    assert model.terms(replace(spec, slowdown=2.0), 0, 8, 4).bwd - model.terms(replace(spec, slowdown=2.0), 0, 8, 1).bwd \
        == pytest.approx(2 * added, rel=1e-9)


@pytest.mark.parametrize(("tp", "sharding"), [(2, Sharding.NONE), (4, Sharding.ZERO3), (1, Sharding.ZERO2)])
def test_the_last_stage_all_reduces_the_loss_over_all_its_devices(tp: int, sharding: Sharding) -> None:
    """partitioner.distributed's step all-reduces the loss over the last stage's processes,
    tensor-parallel ranks included: 2 (r-1) latencies on 4 devices, whatever the sharding;
    a stage that is not the last does not."""
    options = TrainingOptions(max_microbatches=1)
    cluster = replace(hand_cluster(["a100-80gb x4"], spb=0.0),
                      latency_s=tuple(tuple(0.0 if a == b else 1e-3 for b in range(4)) for a in range(4)))
    model = StageModel(tp_costs(cluster, 4, options), cluster, 4, options)
    (spec,) = model.specs(one_stage(4, tp, sharding))
    assert spec.last and spec.replicas == 4
    last, inner = model.stage(spec, 0, 8, 1), model.stage(replace(spec, last=False), 0, 8, 1)
    assert last.allreduce - inner.allreduce == pytest.approx(2 * 3 * 1e-3)


def test_zero3_exposes_what_compute_cannot_hide() -> None:
    # A slow ring: each pass's gathers exceed its compute; the exposed part is the rest plus
    # the gathers (and the last reduce-scatter) that nothing hides.
    options = TrainingOptions(max_microbatches=1)
    spb = 1e-9
    cluster = hand_cluster(["a100-80gb x2"], spb=spb)
    costs = tp_costs(cluster, 2, options)
    model = StageModel(costs, cluster, 2, options)
    (spec,) = model.specs(one_stage(2, 1, Sharding.ZERO3))
    t = model.stage(spec, 0, 8, 1)
    layer = 4 * 10**6  # float32 weights (and grads) of a layer
    gather = 0.5 * layer * spb  # (d - 1) / d x bytes x s/B, no latency
    fc, bc = 8 * 1e-3, 8 * 2e-3
    assert t.dp_fwd == pytest.approx(max(0.0, 8 * gather - fc) + gather)
    assert t.dp_bwd == pytest.approx(max(0.0, 16 * gather - bc) + 2 * gather)
    assert t.fwd == pytest.approx(fc + t.dp_fwd) and t.allreduce == 0
    (keep,) = model.specs(one_stage(2, 1, Sharding.ZERO3_KEEP))
    assert model.stage(keep, 0, 8, 1).dp_bwd == pytest.approx(max(0.0, 8 * gather - bc) + gather)


# --------------------------------------------------------------------------- the space


def test_tp_groups_lie_in_a_node_and_divide_it() -> None:
    cluster = load_cluster("h100-8x8-ib")  # 8 nodes of 8
    options = TrainingOptions(tensor_parallel=(1, 2, 4, 8, 16))
    whole = (Group(tuple(range(64))),)
    assert tensor_parallel_degrees(cluster, whole, options) == [1, 2, 4, 8]  # 16 spans two nodes
    strided = tuple(Group(tuple(range(j, 64, 8))) for j in range(8))  # stages in a node: a group per node slot
    assert tensor_parallel_degrees(cluster, strided, options) == [1]
    configs = configurations(cluster, 64, 96, replace(options, max_microbatches=1, schedules=("1f1b",)))
    assert {c.tp for c in configs} == {1, 2, 4, 8}
    assert all(c.sharding is Sharding.NONE for c in configs if max(c.data_parallel(g) for g in c.groups) == 1)
    described = next(c for c in configs if c.tp == 8 and c.stages == 1 and c.sharding is Sharding.ZERO3)
    assert described.describe(cluster) == "1 stage on 64 x h100-80gb, tp 8 x dp 8, zero3; 1f1b, 1 microbatch"
    assert described.family == "TP x DP"


def test_a_model_whose_replicated_state_does_not_fit_gets_fsdp() -> None:
    # 8 layers x 10^8 parameters x 8 bytes = 6.4 GB; 4 devices of 3 GB (2.7 usable): a
    # quarter of the state and two whole layers' weights (0.8 GB) fit.
    options = TrainingOptions(max_stages=1, tensor_parallel=(1,), max_microbatches=4)
    cluster = hand_cluster(["a100-80gb x4"], {"a100-80gb": "3GB"})
    costs = tp_costs(cluster, 16, options, params=10**8, act=10**5)
    with pytest.raises(InfeasibleError):
        plan_pipeline(costs, cluster, 16, replace(options, shardings=("none", "zero1", "zero2")))
    result = plan_pipeline(costs, cluster, 16, options)
    p = result.pipeline
    assert p.family == "FSDP" and p.sharding in ("zero3", "zero3-keep") and p.data_parallel == 4
    (stage,) = p.stages
    assert stage.weight_bytes == 8 * 4 * 10**8 // 4
    assert_plan_valid(result, cluster, costs, options)


def test_zero1_over_replicas_when_it_only_saves_its_optimizer_step() -> None:
    # Float32 SGD: weights and gradients 4 bytes a parameter, so ZeRO-1's reduce-scatter of
    # the gradients and gather of the weights move what none's all-reduce does; each of the 4
    # replicas steps a quarter of the parameters (12 bytes each a step): ZeRO-1 is faster by
    # 3/4 of the step, and no rule of the search may skip it for being dominated.
    options = TrainingOptions(max_stages=1, tensor_parallel=(1,), shardings=("none", "zero1"), max_microbatches=1)
    cluster = hand_cluster(["a100-80gb x4"])
    costs = tp_costs(cluster, 16, options, params=10**8)
    p = plan_pipeline(costs, cluster, 16, options).pipeline
    (stage,) = p.stages
    assert p.sharding == "zero1" and stage.optimizer_s == pytest.approx(8 * 12 * 10**8 / 4 / (2.039e12 * 0.85))
    replicated = plan_pipeline(costs, cluster, 16, replace(options, shardings=("none",))).pipeline
    (whole,) = replicated.stages
    assert whole.allreduce_s == pytest.approx(stage.allreduce_s) and whole.optimizer_s == pytest.approx(4 * stage.optimizer_s)
    assert p.step_time_s == pytest.approx(replicated.step_time_s - 3 * stage.optimizer_s)
    # Whatever order the search meets them in: a solved, unconstrained replicated
    # configuration does not make ZeRO-1 pointless (it did before optimizer steps were priced).
    model = StageModel(costs, cluster, 16, options)
    none, zero1 = one_stage(4, 1, Sharding.NONE), one_stage(4, 1, Sharding.ZERO1)
    assert model.split(none) is not None and model.unconstrained(none)
    assert not _dominated(model, zero1, {none, zero1})


def test_tp_when_its_all_reduce_is_cheap_and_not_when_the_link_is_slow() -> None:
    # Big layers (0.4 GB of float32 gradients each) make data parallelism's all-reduce dear;
    # tensor parallelism moves b x 10 kB per layer instead. On a slow link even that loses.
    options = TrainingOptions(shardings=("none",), max_microbatches=4, schedules=("gpipe", "1f1b"))
    fast = hand_cluster(["a100-80gb x4"], spb=1e-11)
    costs = tp_costs(fast, 8, options, params=10**8, x=0.99, speed=1e-2)
    chosen = plan_pipeline(costs, fast, 8, options)
    assert chosen.pipeline.tensor_parallel == 4 and chosen.pipeline.family == "TP x DP"
    assert chosen.pipeline.sequence_parallel
    assert chosen.pipeline.stages[0].tp_comm_s > 0
    assert_plan_valid(chosen, fast, costs, options)
    tp_rows = [c for c in chosen.pipeline.runner_ups if c.label in ("data parallel", "pipeline")]
    assert all(c.step_time_s is None or c.step_time_s > chosen.pipeline.step_time_s for c in tp_rows)
    slow = hand_cluster(["a100-80gb x4"], spb=1e-6)
    costs = tp_costs(slow, 8, options, params=10**8, x=0.99, comm=10**6, speed=1e-2)
    avoided = plan_pipeline(costs, slow, 8, options)
    assert avoided.pipeline.tensor_parallel == 1
    assert_plan_valid(avoided, slow, costs, options)


def test_selective_recomputation_when_the_cores_are_what_does_not_fit() -> None:
    # One device, GPipe, 4 microbatches of 2 samples in flight: 640 MB of state in 900 MB.
    # Keeping every activation takes 4 x 80 MB; the attention cores hold 60% of them and
    # cost 5% of the FLOPs: rebuilding them (one microbatch's 48 MB at a time) fits, and
    # is cheaper than recomputing the whole forward.
    options = TrainingOptions(max_stages=1, tensor_parallel=(1,), shardings=("none",), min_microbatches=4,
                              max_microbatches=4, schedules=("gpipe",))
    cluster = hand_cluster(["a100-80gb"], {"a100-80gb": "1GB"})
    costs = tp_costs(cluster, 8, options, params=10**7, act=5 * 10**6, core=0.6)
    costs = replace(costs, layers=tuple(replace(layer, core_flops=0.05 * layer.flops) for layer in costs.layers))
    (stage,) = plan_pipeline(costs, cluster, 8, options).pipeline.stages
    assert stage.selective and not stage.recompute and stage.recompute_bytes == 2 * 8 * 3 * 10**6
    assert stage.microbatch_activation_bytes == 2 * 8 * 2 * 10**6
    always = plan_pipeline(costs, cluster, 8, replace(options, recompute=Recompute.ALWAYS)).pipeline.stages[0]
    assert always.recompute and always.bwd_s > stage.bwd_s
    with pytest.raises(InfeasibleError):
        plan_pipeline(costs, cluster, 8, replace(options, recompute=Recompute.NEVER))


@pytest.mark.parametrize("devices, memory, spb", list(itertools.product([2, 4, 8], ["1GB", "4GB", "40GB"], [1e-11, 1e-9])))
def test_step_at_least_the_lower_bound_on_grids(devices: int, memory: str, spb: float) -> None:
    options = TrainingOptions(max_microbatches=8)
    cluster = hand_cluster([f"a100-80gb x{devices}"], {"a100-80gb": memory}, spb=spb)
    costs = tp_costs(cluster, 16, options, params=3 * 10**7, act=2 * 10**7, cut=10**6)
    try:
        result = plan_pipeline(costs, cluster, 16, options)
    except InfeasibleError:
        assert memory == "1GB"
        return
    p = result.pipeline
    assert p.lower_bound_s <= p.step_time_s
    assert_plan_valid(result, cluster, costs, options)


def test_the_dp_bound_holds_for_every_split_with_tp_and_sharding() -> None:
    """Every split of a few TP / ZeRO configurations simulates no faster than m x T* nor
    than the configuration's bound, and the DP reaches the least bottleneck (brute force)."""
    options = TrainingOptions(max_microbatches=4, schedules=("1f1b", "gpipe"))
    cluster = hand_cluster(["a100-80gb x4"], {"a100-80gb": "2GB"}, spb=1e-10)
    costs = tp_costs(cluster, 8, options, n=6, params=3 * 10**7, act=2 * 10**7, cut=10**6, core=0.5)
    assert assert_dp_exact(StageModel(costs, cluster, 8, options)) >= 5


# --------------------------------------------------------------------------- plan data


def test_the_new_plan_fields_round_trip_and_old_json_loads() -> None:
    plan = hand_pipeline_plan()
    assert plan.pipeline is not None
    # One stage on both devices as one replica of tp 2.
    stage = replace(plan.pipeline.stages[0], last_layer=2, devices=(0, 1), selective=True, tp_comm_s=0.01,
                    dp_comm_fwd_s=0.002, dp_comm_bwd_s=0.003, gathered_bytes=2**20)
    sharded = replace(
        plan,
        pipeline=replace(plan.pipeline, stages=(stage,), tensor_parallel=2, data_parallel=1, sharding="zero3",
                         sequence_parallel=True),
    )
    assert Plan.from_json(sharded.to_json()) == sharded
    # A plan written before these fields existed loads with their defaults.
    old = json.loads(plan.to_json())
    assert "tensor_parallel" not in old["pipeline"] and "selective" not in old["pipeline"]["stages"][0]
    assert Plan.from_json(json.dumps(old)) == plan


# --------------------------------------------------------------------------- GPT-3 sized


def gpt3_tables(cluster: Cluster, batch: int, options: TrainingOptions) -> TrainingCosts:
    """96 blocks shaped like GPT-3 175B's on an H100 in bf16, one sample of 2048 tokens:
    1.8e9 parameters, 99% of the FLOPs in the pairs, 96 heads, two all-reduces of
    2048 x 12288 bf16 values per pass; times at 45% of the H100's peak (Adam)."""
    h, seq = 12288, 2048
    flops = 6 * 1.8e9 * seq + 3 * 4 * seq * seq * h  # dense matmuls (x3: forward and backward), attention
    block = ChainLayer(
        name="block", params=1_800_000_000, activation_bytes=34 * seq * h + 5 * 96 * seq * seq, flops=flops,
        tp_flops=0.99 * flops, tp_params=1_799_700_000, tp_activation_bytes=24 * seq * h + 5 * 96 * seq * seq,
        tp_comm_bytes=2 * seq * h * 2, tp_divisor=96, core_flops=3 * 4 * seq * seq * h,
        core_activation_bytes=5 * 96 * seq * seq,
    )
    peak = cluster.devices[0].profile.peak_flops_for("bfloat16") * 0.45
    sizes = microbatch_sizes(cluster, batch, options)
    return TrainingCosts(
        layers=tuple(replace(block, name=f"h.{i}") for i in range(96)),
        cut_bytes=(seq * h * 2,) * 96 + (0,),
        times=tuple(
            LayerTimes(kind=cluster.devices[0].profile.name, samples=b, fwd_s=(b * flops / 3 / peak,) * 96,
                       bwd_s=(b * 2 * flops / 3 / peak,) * 96)
            for b in sizes
        ),
        precision=Precision.BF16,
        optimizer=Optimizer.ADAM,
    )


@pytest.mark.slow
def test_gpt3_175b_shaped_with_tensor_parallelism_on_64_h100s() -> None:
    """The whole space on GPT-3-shaped tables: within 1.25x of the compute bound."""
    cluster = load_cluster("h100-8x8-ib")
    options = TrainingOptions(max_microbatches=1536)
    batch = 1536
    costs = gpt3_tables(cluster, batch, options)
    start = time.perf_counter()
    result = plan_pipeline(costs, cluster, batch, options)
    seconds = time.perf_counter() - start
    p = result.pipeline
    assert p.tensor_parallel > 1
    assert p.step_time_s <= 1.25 * p.bound_s
    assert_plan_valid(result, cluster, costs, options)
    print(f"GPT-3 175B shaped with TP, 64 x H100, batch {batch}: planned in {seconds:.1f} s, {p.description}, "
          f"step {p.step_time_s:.2f} s = {p.step_time_s / p.bound_s:.2f} x the compute bound")


def test_the_report_names_the_parallelism_and_the_new_families() -> None:
    from partitioner.plan import PlanCandidate
    from partitioner.report import render_training

    plan = hand_pipeline_plan()
    assert plan.pipeline is not None
    stages = tuple(replace(s, selective=True, tp_comm_s=0.01, gathered_bytes=2**20) for s in plan.pipeline.stages)
    fsdp = PlanCandidate(label="FSDP", description="1 stage on 2 x a100-80gb, zero3", step_time_s=1.8,
                         samples_per_s=2.2, note="2.00x the chosen step")
    sharded = replace(plan, pipeline=replace(plan.pipeline, stages=stages, tensor_parallel=2, sharding="zero3",
                                             family="TP x PP x DP", runner_ups=(fsdp,)))
    text = render_training(sharded)
    assert "parallelism: tensor parallel 2 x data parallel 1; state ZeRO-3 / FSDP" in text
    assert "FSDP alone 2.00x as long" in text
    header = next(line for line in text.splitlines() if line.startswith("stage "))
    assert "tp comm" in header and "gathered" in header
    assert "selective" in text


@pytest.mark.parametrize("spb", [1e-12, 1e-8, 1e-6])
def test_more_devices_of_a_kind_never_plan_a_slower_step(spb: float) -> None:
    # Small layers on links from fast to slow: past some count, more devices only add
    # communication, and the plan leaves the rest idle (the first c devices of a node, any c).
    # Every n from 1 to 8: 3 devices cannot split a batch of 8 three ways, 2 of them can.
    options = TrainingOptions(max_microbatches=8)
    steps = []
    for n in range(1, 9):
        cluster = hand_cluster([f"a100-80gb x{n}"], spb=spb)
        costs = tp_costs(cluster, 8, options, params=10**5, act=10**3)
        result = plan_pipeline(costs, cluster, 8, options)
        p = result.pipeline
        used = sum(len(s.devices) for s in p.stages[: len({s.rank for s in p.stages})])
        assert (f"{n - used} of {n} devices idle" in p.description) == (used < n), p.description
        steps.append(p.step_time_s)
        assert_plan_valid(result, cluster, costs, options)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in itertools.pairwise(steps)), steps


def test_subsets_of_a_kind_are_whole_nodes_or_lie_in_one() -> None:
    from benchmarks.training_space import a100_cluster
    from partitioner.pipeline_plan.space import shapes

    def used(cluster: Cluster) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for groups, layout in shapes(cluster):
            out.setdefault(sum(g.replicas for g in groups), set()).add(layout)
        return out

    # 4 nodes of 8: 16 and 8 are whole nodes (16 also with stages in a node); 1 to 7 lie in one.
    four = used(a100_cluster(32))
    assert set(four) == {1, 2, 3, 4, 5, 6, 7, 8, 16, 32} and "stages in a node" in four[16]
    # 3 nodes of 8: 12 would be a node and a half; the first 1 to 8 lie in one.
    assert set(used(a100_cluster(24))) == {*range(1, 9), 24}
