"""The training planner on hand-built tables: strategies, heterogeneous devices, memory, bounds, the simulator.

No torch and no tracing: layers are `ChainLayer` rows with linear times (forward ``s x b``
seconds for a microbatch of ``b`` samples, backward twice that), on clusters whose links
cost what each test says.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.cluster import Cluster, load_cluster
from partitioner.training_costs import ChainLayer, LayerTimes, TiedParameter, TrainingCosts, resolve_precision, training_costs, training_state_bytes
from partitioner.devices import load_profile, resolve_devices
from partitioner.errors import InfeasibleError
from partitioner.ir import INPUT, OUTPUT, Layer, LayerGraph, Value
from partitioner.options import Optimizer, Precision, Recompute, TrainingOptions
from partitioner.pipeline_plan import (
    Configuration,
    Group,
    Partition,
    PipelineResult,
    StageModel,
    configurations,
    microbatch_sizes,
    plan_pipeline,
)
from partitioner.pipeline_plan.space import interleaving_takes
from partitioner.simulate import PipelineSchedule, StageCost, peak_inflight_microbatches, simulate

NO_INTERLEAVING = (PipelineSchedule.GPIPE, PipelineSchedule.ONE_F_ONE_B)


def hand_cluster(specs: Sequence[str], memory: dict[str, str] | None = None, spb: float = 1e-12) -> Cluster:
    """Devices from profile names (``"a100-80gb x4"``), every link `spb` seconds per byte, no latency."""
    devices = resolve_devices(list(specs), memory)
    n = len(devices)
    return Cluster(
        name="hand",
        description="hand-made",
        devices=devices,
        node_of=(0,) * n,
        node_names=("node",),
        seconds_per_byte=tuple(tuple(0.0 if a == b else spb for b in range(n)) for a in range(n)),
        latency_s=((0.0,) * n,) * n,
    )


def hand_costs(
    cluster: Cluster,
    batch: int,
    options: TrainingOptions,
    *,
    n: int = 8,
    params: int = 10**6,
    act: int = 10**5,
    cut: int = 10**4,
    speed: dict[str, float] | None = None,
) -> TrainingCosts:
    """`n` equal layers; forward ``speed[kind] x b`` seconds per layer, backward twice that;
    float32 and SGD, so state is 8 bytes per parameter."""
    speed = speed or {k: 1e-3 for k in cluster.kinds}
    sizes = microbatch_sizes(cluster, batch, options)
    return TrainingCosts(
        layers=tuple(ChainLayer(name=f"l{i}", params=params, activation_bytes=act, flops=1e9) for i in range(n)),
        cut_bytes=(0,) + (cut,) * (n - 1) + (0,),
        times=tuple(
            LayerTimes(kind=k, samples=b, fwd_s=(s * b,) * n, bwd_s=(2 * s * b,) * n)
            for k, s in speed.items()
            for b in sizes
        ),
        precision=Precision.FP32,
        optimizer=Optimizer.SGD,
    )


def plan(
    specs: Sequence[str],
    batch: int,
    *,
    memory: dict[str, str] | None = None,
    spb: float = 1e-12,
    options: TrainingOptions | None = None,
    **table: object,
) -> tuple[PipelineResult, Cluster, TrainingCosts, TrainingOptions]:
    options = options or TrainingOptions()
    cluster = hand_cluster(specs, memory, spb)
    costs = hand_costs(cluster, batch, options, **table)  # type: ignore[arg-type]
    return plan_pipeline(costs, cluster, batch, options), cluster, costs, options


def assert_plan_valid(result: PipelineResult, cluster: Cluster, costs: TrainingCosts, options: TrainingOptions) -> None:
    """Every layer in one stage, stages in order, ranks on disjoint devices, memory within
    capacity (per stage and per simulated rank), the batch accounted for, and the plan's
    step time the simulator's."""
    p = result.pipeline
    assert [s.first_layer for s in p.stages] == [0] + [s.last_layer + 1 for s in p.stages[:-1]]
    assert p.stages[-1].last_layer == len(costs.layers) - 1
    ranks = len(p.stages) // p.virtual_stages
    owner: dict[int, int] = {}
    for s in p.stages:
        assert s.rank == s.index % ranks and s.devices == p.stages[s.rank].devices
        assert all(owner.setdefault(d, s.rank) == s.rank for d in s.devices)
        assert s.samples * len(s.devices) // p.tensor_parallel * p.microbatches == p.global_batch
        assert s.peak_memory_bytes <= s.capacity_bytes
        assert s.peak_memory_bytes == s.static_bytes + s.inflight_microbatches * s.microbatch_activation_bytes
    names = [d.name for d in cluster.devices]
    timeline = simulate(
        p.stage_costs(names), p.microbatches, p.schedule, overlap_allreduce=p.overlap_allreduce,
        virtual_stages=p.virtual_stages,
    )
    assert timeline.step_time_s == p.step_time_s == result.timeline.step_time_s
    for rank in timeline.ranks:
        capacity = min(int(cluster.devices[names.index(d)].memory_bytes * (1 - options.memory_reserve)) for d in rank.devices)
        assert rank.peak_memory_bytes <= capacity
    assert p.lower_bound_s <= p.step_time_s
    assert 0 < p.mfu <= 1


# --------------------------------------------------------------------------- which strategy


def test_data_parallel_when_the_model_fits_and_links_are_fast() -> None:
    result, cluster, costs, options = plan(["a100-80gb x4"], 64, memory={"a100-80gb": "10GB"})
    # Replicated or sharded (FSDP hides its gathers under compute where DDP's all-reduce waits).
    assert result.pipeline.family in ("data parallel", "FSDP")
    assert len(result.pipeline.stages) == 1 and len(result.pipeline.stages[0].devices) == 4
    assert_plan_valid(result, cluster, costs, options)


def test_one_device_when_more_only_add_communication() -> None:
    # Dear links: any split or replica waits longer on its sends or all-reduce than it saves.
    result, cluster, costs, options = plan(["a100-80gb x4"], 8, spb=1e-6, speed={"a100-80gb": 1e-4}, cut=10**6)
    p = result.pipeline
    assert p.family == "single device"
    assert len(p.stages) == 1 and len(p.stages[0].devices) == 1
    assert_plan_valid(result, cluster, costs, options)


def test_a_pipeline_when_the_model_does_not_fit_on_one_device() -> None:
    # 8 layers x 10^8 parameters x 8 bytes = 6.4 GB; each device may use 90% of 2.2 GB.
    result, cluster, costs, options = plan(["a100-80gb x4"], 64, memory={"a100-80gb": "2.2GB"}, params=10**8)
    p = result.pipeline
    assert p.family == "pipeline" and p.num_ranks == 4
    out = {c.label: c for c in p.runner_ups}
    assert out["data parallel"].step_time_s is None and out["data parallel"].note == "does not fit in memory"
    assert_plan_valid(result, cluster, costs, options)


def test_a_hybrid_when_it_is_faster_than_both() -> None:
    # Slow links make the whole model's all-reduce dear; few microbatches make 8 stages' bubble dear.
    options = TrainingOptions(max_microbatches=4, schedules=NO_INTERLEAVING, equal_replicas=True)
    result, cluster, costs, _ = plan(["a100-80gb x8"], 32, spb=1e-9, options=options, params=10**7, cut=10**5)
    p = result.pipeline
    assert p.family == "hybrid" and p.num_ranks == 4 and all(len(s.devices) == 2 for s in p.stages)
    times = {c.label: c.step_time_s for c in p.runner_ups}
    assert times["chosen"] == p.step_time_s < times["pipeline"] < times["data parallel"]
    assert_plan_valid(result, cluster, costs, options)
    # Replicas only on the last ranks: their all-reduces (0.08 s each) run while the single
    # ranks before them still work through their last backwards (GPipe: 236 against 250 ms).
    free = replace(options, equal_replicas=False)
    unequal, cluster, costs, _ = plan(["a100-80gb x8"], 32, spb=1e-9, options=free, params=10**7, cut=10**5)
    q = unequal.pipeline
    assert [len(s.devices) for s in q.stages] == [1, 1, 1, 1, 2, 2] and q.family == "hybrid"
    assert q.step_time_s < p.step_time_s
    assert_plan_valid(unequal, cluster, costs, free)


def test_faster_devices_get_proportionally_more_layers() -> None:
    # An A100 three times as fast as the V100: 12 of 16 layers on it, whatever the schedule.
    result, cluster, costs, options = plan(
        ["a100-80gb", "v100"], 32, n=16, speed={"a100-80gb": 1e-3, "v100": 3e-3},
        options=TrainingOptions(schedules=NO_INTERLEAVING),
    )
    held = {s.profile: s.last_layer - s.first_layer + 1 for s in result.pipeline.stages}
    assert held == {"a100-80gb": 12, "v100": 4}
    assert_plan_valid(result, cluster, costs, options)


def test_a_smaller_device_gets_fewer_layers() -> None:
    # Equal speed, but the second device holds 4 GiB of the 12 GiB the layers need (1 GiB each).
    gib = 2**30 // 8
    result, cluster, costs, options = plan(
        ["a100-80gb:0", "a100-80gb:1"], 8, memory={"a100-80gb:0": "12GiB", "a100-80gb:1": "5GiB"},
        n=12, params=gib, act=1, cut=1, options=TrainingOptions(schedules=NO_INTERLEAVING),
    )
    held = [(s.devices, s.last_layer - s.first_layer + 1) for s in result.pipeline.stages]
    assert sorted(held) == [((0,), 8), ((1,), 4)]
    assert_plan_valid(result, cluster, costs, options)


def test_interleaving_only_when_allowed_and_only_if_it_pays() -> None:
    base, *_ = plan(["a100-80gb x4"], 64, memory={"a100-80gb": "2.2GB"}, params=10**8,
                    options=TrainingOptions(schedules=NO_INTERLEAVING))
    assert base.pipeline.virtual_stages == 1
    free, *_ = plan(["a100-80gb x4"], 64, memory={"a100-80gb": "2.2GB"}, params=10**8)
    assert free.pipeline.step_time_s <= base.pipeline.step_time_s
    if free.pipeline.virtual_stages > 1:
        assert free.pipeline.schedule == "interleaved_1f1b" and free.pipeline.step_time_s < base.pipeline.step_time_s


# --------------------------------------------------------------------------- memory


def test_recomputation_lets_a_plan_fit_and_is_reported() -> None:
    # 100 MB of activations per sample per layer: 4 layers keep 400 MB per microbatch in flight,
    # next to 320 MB of state, in 900 MB; recomputing keeps 10 kB per microbatch instead.
    table = dict(n=8, params=10**7, act=10**8, cut=10**4)
    memory = {"a100-80gb": "1GB"}
    result, cluster, costs, options = plan(["a100-80gb x2"], 64, memory=memory, **table)
    assert any(s.recompute for s in result.pipeline.stages)
    assert_plan_valid(result, cluster, costs, options)
    never = TrainingOptions(recompute=Recompute.NEVER)
    with pytest.raises(InfeasibleError, match="no training plan fits hand"):
        plan(["a100-80gb x2"], 64, memory=memory, options=never, **table)


@pytest.mark.parametrize("layers", [3, 8, 20])
@pytest.mark.parametrize("devices", [1, 2, 4])
@pytest.mark.parametrize("memory", ["300MB", "1GB", "40GB"])
def test_stages_never_exceed_memory(layers: int, devices: int, memory: str) -> None:
    options = TrainingOptions(max_microbatches=16)
    cluster = hand_cluster([f"a100-80gb x{devices}"], {"a100-80gb": memory})
    costs = hand_costs(cluster, 16, options, n=layers, params=10**7, act=10**7, cut=10**6)
    try:
        result = plan_pipeline(costs, cluster, 16, options)
    except InfeasibleError as e:
        # Some stage holds ceil(layers / devices) layers: 80 MB of state and at least one
        # sample's 10 MB of activations each (kept, or rebuilt when recomputing).
        assert 9 * 10**7 * math.ceil(layers / devices) >= cluster.devices[0].memory_bytes * 0.9
        assert "weights, gradients and optimizer state take" in str(e)
        return
    assert_plan_valid(result, cluster, costs, options)


def test_state_bytes_per_parameter_by_precision_and_optimizer() -> None:
    per_param = {
        (p, o): training_state_bytes(1, p, o).total
        for p in (Precision.FP32, Precision.BF16, Precision.FP16)
        for o in (Optimizer.SGD, Optimizer.MOMENTUM, Optimizer.ADAM)
    }
    assert per_param == {
        (Precision.FP32, Optimizer.SGD): 8, (Precision.FP32, Optimizer.MOMENTUM): 12, (Precision.FP32, Optimizer.ADAM): 16,
        (Precision.BF16, Optimizer.SGD): 8, (Precision.BF16, Optimizer.MOMENTUM): 12, (Precision.BF16, Optimizer.ADAM): 16,
        (Precision.FP16, Optimizer.SGD): 8, (Precision.FP16, Optimizer.MOMENTUM): 12, (Precision.FP16, Optimizer.ADAM): 16,
    }
    mixed = training_state_bytes(10, Precision.BF16, Optimizer.ADAM)
    assert (mixed.weights, mixed.grads, mixed.optimizer) == (20, 20, 120)  # 2 + 2 + (4 master + 8 moments)
    with pytest.raises(ValueError, match="resolve"):
        training_state_bytes(1, Precision.AUTO, Optimizer.SGD)


def test_auto_precision_follows_the_devices() -> None:
    a100, v100, cpu = (load_profile(n) for n in ("a100-80gb", "v100", "cpu"))
    assert resolve_precision(Precision.AUTO, [a100]) is Precision.BF16
    assert resolve_precision(Precision.AUTO, [a100, v100]) is Precision.FP16
    assert resolve_precision(Precision.AUTO, [a100, cpu]) is Precision.FP32
    assert resolve_precision(Precision.FP32, [a100]) is Precision.FP32


# --------------------------------------------------------------------------- the DP and the bounds


def _brute(model: StageModel, config: Configuration) -> tuple[float, float]:
    """(least bottleneck, least simulated step) over every split of `config`, recomputing as
    the options' policy says (the cheapest mode that fits)."""
    n, stages = model.n, config.stages
    best_t, best_step = math.inf, math.inf
    for cuts in itertools.combinations(range(1, n), stages - 1):
        ranges = tuple(zip((0, *cuts), (*cuts, n)))
        part = model.policy_partition(config, ranges, "brute")
        if part is None:
            continue
        worst = max(
            float(model.stage(spec, i, e, config.microbatches).mode(rc)[2])
            for spec, (i, e), rc in zip(model.specs(config), ranges, part.recompute)
        )
        best_t = min(best_t, worst)
        best_step = min(best_step, model.timed(part).step_time_s)
    return best_t, best_step


@pytest.mark.parametrize("schedule", list(PipelineSchedule))
def test_the_dp_is_exact_and_its_bound_holds_for_every_split(schedule: PipelineSchedule) -> None:
    """Brute force over every split: the DP reaches the least bottleneck T*, and no split
    simulates faster than m x T* (the bound the reported gap rests on)."""
    options = TrainingOptions(schedules=(schedule,), max_microbatches=4)
    cluster = hand_cluster(["a100-80gb x2", "v100 x2"], {"a100-80gb": "3GB", "v100": "2GB"}, spb=1e-10)
    costs = hand_costs(cluster, 8, options, n=7, params=3 * 10**7, act=2 * 10**7, cut=10**6,
                       speed={"a100-80gb": 1e-3, "v100": 2.5e-3})
    assert assert_dp_exact(StageModel(costs, cluster, 8, options)) >= 5


@pytest.mark.parametrize("schedule", list(PipelineSchedule))
def test_the_dp_is_exact_on_cpus_whose_sends_hold_their_compute(schedule: PipelineSchedule) -> None:
    """As above on four CPUs with slow links: every stage's sends hold its compute lane, and
    the DP's T* and the bounds still hold against every split."""
    options = TrainingOptions(schedules=(schedule,), max_microbatches=4)
    cluster = hand_cluster(["cpu x4"], spb=1e-9)
    costs = hand_costs(cluster, 8, options, n=7, cut=10**6)
    model = StageModel(costs, cluster, 8, options)
    assert all(spec.host_sends for config in configurations(cluster, 8, 7, options) for spec in model.specs(config))
    assert assert_dp_exact(model) >= 5


def assert_dp_exact(model: StageModel) -> int:
    """Against brute force on every pipeline configuration of `model`'s space: the DP reaches
    the least bottleneck ``T*``, and no split simulates faster than ``m x T*`` nor than the
    configuration's bound (`StageModel.work`). Returns how many configurations fit."""
    checked = 0
    for config in configurations(model.cluster, model.batch, model.n, model.options):
        if config.stages == 1 or not model.may_fit(config):
            continue
        found = model.split(config)
        brute_t, brute_step = _brute(model, config)
        if found is None:
            assert brute_t == math.inf
            continue
        assert found[0] == pytest.approx(brute_t, rel=1e-12)
        assert config.microbatches * found[0] <= brute_step * (1 + 1e-12)
        assert model.work(config) <= brute_step * (1 + 1e-12)
        checked += 1
    return checked


_stage = st.tuples(
    st.floats(0, 2), st.floats(0, 4), st.floats(0, 1), st.floats(0, 1), st.floats(0, 3), st.floats(0, 1), st.booleans()
)


@settings(max_examples=300, deadline=None)
@given(
    stages=st.lists(_stage, min_size=1, max_size=6),
    microbatches=st.integers(1, 10),
    schedule=st.sampled_from(list(PipelineSchedule)),
    virtual=st.integers(2, 3),
    overlap=st.booleans(),
    held=st.booleans(),
)
def test_a_splits_bound_never_exceeds_its_simulated_step(
    stages: list[tuple[float, float, float, float, float, float, bool]],
    microbatches: int,
    schedule: PipelineSchedule,
    virtual: int,
    overlap: bool,
    held: bool,
) -> None:
    v = virtual if schedule is PipelineSchedule.INTERLEAVED_1F1B else 1
    ranks = len(stages)
    if v > 1 and (ranks < 2 or not interleaving_takes(ranks, microbatches)):
        return
    costs = []
    for j in range(ranks * v):
        f, b, sf, sb, ar, opt, replicated = stages[j % ranks]
        devices = (f"d{j % ranks}a", f"d{j % ranks}b") if replicated else (f"d{j % ranks}a",)
        costs.append(StageCost(fwd_s=f, bwd_s=b, send_fwd_s=sf if j < ranks * v - 1 else 0,
                               send_bwd_s=sb if j else 0, allreduce_s=ar if replicated else 0, optimizer_s=opt,
                               host_sends=held, devices=devices))
    config = Configuration(groups=tuple(Group((r,)) for r in range(ranks)), layout="hand",
                           microbatches=microbatches, schedule=schedule, virtual_stages=v)
    part = Partition(configuration=config, ranges=(), recompute=(), origin="dp", stages=tuple(costs), plan_stages=())
    model = StageModel(hand_costs(hand_cluster(["a100-80gb"]), 1, TrainingOptions()), hand_cluster(["a100-80gb"]), 1,
                       TrainingOptions(overlap_allreduce=overlap))
    step = simulate(costs, microbatches, schedule, overlap_allreduce=overlap, virtual_stages=v).step_time_s
    assert model.split_bound(part) <= step * (1 + 1e-12) + 1e-12


def test_simulated_memory_is_the_stage_tables_memory() -> None:
    result, *_ = plan(["a100-80gb x4"], 64, memory={"a100-80gb": "2.2GB"}, params=10**8,
                      options=TrainingOptions(schedules=NO_INTERLEAVING))
    p = result.pipeline
    assert [r.peak_memory_bytes for r in result.timeline.ranks] == [s.peak_memory_bytes for s in p.stages]
    assert [r.peak_inflight_microbatches for r in result.timeline.ranks] == list(
        peak_inflight_microbatches(p.schedule, len(p.stages), p.microbatches)
    )


def test_the_interleaving_rule_is_the_simulators() -> None:
    for ranks in range(2, 7):
        for m in range(1, 40):
            try:
                peak_inflight_microbatches(PipelineSchedule.INTERLEAVED_1F1B, ranks, m, 2)
                takes = True
            except ValueError:
                takes = False
            assert interleaving_takes(ranks, m) is takes


# --------------------------------------------------------------------------- tables and space


def test_training_costs_from_a_layer_graph() -> None:
    """Cuts count every value crossing them (a skip crosses two), per sample; a parameter
    read by a later layer becomes a tied copy; bytes traced in float32 count in bf16."""
    layers = tuple(
        Layer(index=i, name=f"l{i}", param_bytes=4000, saved_bytes=800, fwd_flops=100, bwd_flops=200,
              traffic_bytes=8000)
        for i in range(3)
    )
    values = (
        Value(name="x", producer=INPUT, consumers=(0,), bytes=400),
        Value(name="a", producer=0, consumers=(1, 2), bytes=4000),  # skips to layer 2
        Value(name="b", producer=1, consumers=(2,), bytes=400),
        Value(name="w", producer=0, consumers=(2,), bytes=4000),  # a tied weight
        Value(name="y", producer=2, consumers=(OUTPUT,), bytes=40),
    )
    graph = LayerGraph(layers=layers, values=values, fingerprint="f", batch_size=4)
    a100 = load_profile("a100-80gb")
    costs = training_costs(graph, [a100], [1, 2], precision=Precision.BF16, optimizer=Optimizer.ADAM,
                           element_size=4, parameter_values={"w"})
    assert costs.cut_bytes == (50, 500, 550, 0)  # per sample, halved from float32
    assert [c.params for c in costs.layers] == [1000] * 3
    assert [c.activation_bytes for c in costs.layers] == [100] * 3
    assert costs.flops_per_sample == 3 * 300 / 4
    assert [(t.owner, t.users, t.params) for t in costs.tied] == [(0, (2,), 1000)]
    assert {(t.kind, t.samples) for t in costs.times} == {("a100-80gb", 1), ("a100-80gb", 2)}
    with pytest.raises(KeyError, match="no layer times for v100"):
        costs.times_for("v100", 1)


def test_a_tied_weight_is_copied_to_the_stage_that_reads_it() -> None:
    """Layer 3 (a head without parameters of its own) reads layer 0's weight: split over two
    devices (360 MB each; the model's state is 480 MB), the head's stage holds a copy."""
    options = TrainingOptions(schedules=NO_INTERLEAVING)
    cluster = hand_cluster(["a100-80gb x2"], {"a100-80gb": "400MB"})
    base = hand_costs(cluster, 8, options, n=4, params=2 * 10**7)
    costs = TrainingCosts(
        layers=base.layers[:3] + (ChainLayer(name="head", params=0, activation_bytes=10, flops=1e9),),
        cut_bytes=base.cut_bytes,
        tied=(TiedParameter(owner=0, users=(3,), params=2 * 10**7),),
        times=base.times,
        precision=base.precision,
        optimizer=base.optimizer,
    )
    result = plan_pipeline(costs, cluster, 8, options)
    first, head = result.pipeline.stages
    assert first.first_layer == 0 and head.last_layer == 3
    owned = sum(costs.layers[i].params for i in range(head.first_layer, 4))
    assert head.weight_bytes == 4 * (owned + 2 * 10**7)  # its layers' float32 weights and the copy
    assert first.weight_bytes == 4 * sum(costs.layers[i].params for i in range(0, first.last_layer + 1))
    assert_plan_valid(result, cluster, costs, options)
    # Both copies sum their gradients once per step: a ring of two devices moves the tied
    # weight's float32 gradients once, 1e-12 s per byte (no latency), and nothing else
    # all-reduces (one replica each).
    tied_grads = 4 * 2 * 10**7
    assert first.allreduce_s == head.allreduce_s == pytest.approx(tied_grads * 1e-12)
    untied = plan_pipeline(replace(costs, tied=()), cluster, 8, options)
    assert all(s.allreduce_s == 0 for s in untied.pipeline.stages)


def test_each_stage_steps_its_optimizer_on_its_memory_and_the_step_ends_with_it() -> None:
    """Two stages of 4 layers of 10^6 parameters on an A100 and a V100, GPipe: SGD in float32
    moves 12 bytes a parameter, 48 MB a stage, at its device's bandwidth x 0.85 (2.039 and
    0.9 TB/s). The first stage's last backward ends last, so the step ends with its optimizer
    step: the plan's step is the same stages' without optimizer steps plus the first's."""
    from partitioner.parallel_config import ParallelConfig

    options = TrainingOptions(config=ParallelConfig(tp=1, pp=2, dp=1, microbatches=4, schedule="gpipe", split="equal"))
    cluster = hand_cluster(["a100-80gb", "v100"])
    costs = hand_costs(cluster, 8, options)
    result = plan_pipeline(costs, cluster, 8, options)
    assert_plan_valid(result, cluster, costs, options)
    p = result.pipeline
    bandwidth = {"a100-80gb": 2.039e12, "v100": 9e11}
    assert sorted(s.profile for s in p.stages) == sorted(bandwidth)
    for s in p.stages:
        assert s.optimizer_s == pytest.approx(12 * 4 * 10**6 / (bandwidth[s.profile] * 0.85))
    stages = p.stage_costs([d.name for d in cluster.devices])
    bare = simulate([replace(s, optimizer_s=0) for s in stages], 4, "gpipe")
    assert p.step_time_s == pytest.approx(bare.step_time_s + p.stages[0].optimizer_s, rel=1e-12)
    assert bare.step_time_s < p.step_time_s


def test_the_space_has_every_family_and_the_tables_cover_it() -> None:
    options = TrainingOptions(max_microbatches=8)
    cluster = hand_cluster(["a100-80gb x2", "v100"])  # the V100 alone is a single-device configuration
    configs = configurations(cluster, 16, 8, options)
    assert {c.family for c in configs} == {"data parallel", "FSDP", "TP x DP", "pipeline", "hybrid", "single device"}
    sizes = set(microbatch_sizes(cluster, 16, options))
    assert all(16 // (c.microbatches * c.data_parallel(g)) in sizes for c in configs for g in c.groups)
    assert all(c.stages <= 8 for c in configs)
    hetero = next(c for c in configs if c.family == "hybrid" and len(c.groups) == 2 and c.virtual_stages == 1)
    assert hetero.describe(cluster) == "2 stages (1 on 2 x a100-80gb, 1 on v100); gpipe, 1 microbatch"


def test_equal_replicas_keeps_only_plans_the_runtime_launches() -> None:
    # Two A100s and four V100s: ranks of 1 A100 and 2 V100s are in the space, and out of it
    # when every rank must hold as many replicas.
    cluster = hand_cluster(["a100-80gb x2", "v100 x4"])
    free = configurations(cluster, 16, 8, TrainingOptions(max_microbatches=8))
    assert any(len({g.replicas for g in c.groups}) > 1 for c in free)
    options = TrainingOptions(max_microbatches=8, equal_replicas=True)
    equal = configurations(cluster, 16, 8, options)
    assert equal and all(len({g.replicas for g in c.groups}) == 1 for c in equal)
    assert {c.family for c in equal} == {c.family for c in free}
    result = plan_pipeline(hand_costs(cluster, 16, options), cluster, 16, options)
    assert len({len(s.devices) for s in result.pipeline.stages}) == 1


def test_a_missing_table_is_named() -> None:
    options = TrainingOptions()
    cluster = hand_cluster(["a100-80gb x2"])
    costs = hand_costs(cluster, 4, options)
    short = TrainingCosts(layers=costs.layers, cut_bytes=costs.cut_bytes, times=costs.times[:1],
                          precision=costs.precision, optimizer=costs.optimizer)
    with pytest.raises(KeyError, match="no layer times for a100-80gb"):
        plan_pipeline(short, cluster, 4, options)


# --------------------------------------------------------------------------- GPT-3 sized


def _gpt3_graph() -> LayerGraph:
    """GPT-3 175B's shape as torch.export and the profiler see it in bfloat16, batch 1, 2048
    tokens: embeddings, 96 blocks of 12 h^2 + 13 h parameters, the final norm, the tied head."""
    h, seq, vocab = 12288, 2048, 50257
    act = seq * h * 2
    block = Layer(index=0, name="block", param_bytes=2 * (12 * h * h + 13 * h), saved_bytes=2_566_914_048,
                  output_bytes=act, fwd_flops=7_627_861_917_696, bwd_flops=15_255_723_835_392,
                  traffic_bytes=9_567_526_912)
    layers = [
        Layer(index=0, name="wpe", param_bytes=2 * seq * h, saved_bytes=act, traffic_bytes=3 * seq * h * 2),
        Layer(index=1, name="wte", param_bytes=2 * vocab * h, saved_bytes=act, traffic_bytes=2 * vocab * h + act),
        *(Layer(**{**{f: getattr(block, f) for f in Layer.__dataclass_fields__}, "index": 2 + i, "name": f"h.{i}"})
          for i in range(96)),
        Layer(index=98, name="ln_f", param_bytes=4 * h, saved_bytes=act, traffic_bytes=2 * act),
        Layer(index=99, name="lm_head", saved_bytes=seq * vocab * 2, fwd_flops=2 * seq * h * vocab,
              bwd_flops=4 * seq * h * vocab, traffic_bytes=2 * vocab * h + act + seq * vocab * 2),
    ]
    values = [
        Value(name="pos", producer=0, consumers=(2,), bytes=act),
        Value(name="tok", producer=1, consumers=(2,), bytes=act),
        *(Value(name=f"x{i}", producer=i, consumers=(i + 1,), bytes=act) for i in range(2, 99)),
        Value(name="lm_head_weight", producer=1, consumers=(99,), bytes=2 * vocab * h),
        Value(name="logits", producer=99, consumers=(OUTPUT,), bytes=seq * vocab * 2),
    ]
    return LayerGraph(layers=tuple(layers), values=tuple(values), fingerprint="gpt3", model_name="GPT-3 175B")


def test_gpt3_175b_shaped_tables_on_64_h100s() -> None:
    """175B parameters x 16 bytes need 2.5 TiB; 64 H100s hold 4.5 TiB: replicated, only a
    64-stage pipeline fits, recomputing where two blocks share a GPU. Planned from tables of
    the traced model's size (tracing it takes ~20 s; `partitioner plan gpt3-175b` does
    that), in the space of replicated state (tests/test_training_space.py plans the whole)."""
    cluster = load_cluster("h100-8x8-ib")
    options = TrainingOptions(max_microbatches=256, shardings=("none",))
    batch = 256
    graph = _gpt3_graph()
    start = time.perf_counter()
    costs = training_costs(graph, [cluster.devices[0].profile], microbatch_sizes(cluster, batch, options),
                           precision=Precision.BF16, optimizer=Optimizer.ADAM, element_size=2,
                           parameter_values={"lm_head_weight"})
    result = plan_pipeline(costs, cluster, batch, options)
    seconds = time.perf_counter() - start
    p = result.pipeline
    assert p.family == "pipeline" and p.num_ranks == 64 and p.virtual_stages == 1
    assert any(s.recompute for s in p.stages)
    assert_plan_valid(result, cluster, costs, options)
    head = p.stages[-1]
    assert head.weight_bytes >= 2 * 50257 * 12288  # the tied embedding's copy
    # The bound is the least over configurations: fewer microbatches add fewer gradients
    # (5.5 GB a stage, 3x that moved a microbatch) but fill the pipeline worse.
    assert p.lower_bound_s <= p.step_time_s < 1.25 * p.lower_bound_s
    print(f"GPT-3 175B shaped, 64 x H100, batch {batch}: planned in {seconds:.1f} s, {p.description}")


def test_ddp_buckets_counts_the_all_reduces_ddp_makes() -> None:
    # DDP fills buckets with the parameters in the order their gradients arrive (the last
    # layer's first), its first bucket 1 MiB, then 25 MiB; the planner counts them per layer,
    # for every range of layers, from the layers' gradient bytes.
    import torch
    import torch.distributed as dist

    from partitioner.pipeline_plan.terms import DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES, ddp_buckets

    assert DDP_FIRST_BUCKET_BYTES == dist._DEFAULT_FIRST_BUCKET_BYTES
    mlp = [4 * (1024 * 512 + 512), 0, 4 * (512 * 256 + 256), 0, 4 * (256 * 128 + 128), 0, 4 * (128 * 10 + 10)]
    assert ddp_buckets(mlp)[0, 7] == 1  # the seed MLP's 2.76 MB: one bucket (its first closes last)
    rng = random.Random(0)
    sizes = [0, 40, 1 << 18, 1 << 20, 3 << 20, 7 << 20, 30 << 20]
    for _ in range(60):
        grads = [rng.choice(sizes) for _ in range(rng.randint(1, 9))]
        table = ddp_buckets(grads)
        for i in range(len(grads)):
            for e in range(i + 1, len(grads) + 1):
                params = [torch.empty(g // 4) for g in reversed(grads[i:e]) if g > 0]
                limits = [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES]
                made = len(dist._compute_bucket_assignment_by_size(params, limits)[0]) if params else 0
                assert table[i, e] == made, (grads, i, e)


def test_a_replicas_all_reduce_is_priced_on_the_clusters_allreduce_hops() -> None:
    # A measured link prices a ring all-reduce hop apart from a send (gloo on a CPU also
    # reduces and shares cores): 2 (r-1)/r x grads x s/B + 2 (r-1) x latency, of the hop,
    # the latency once per DDP bucket (eight 4 MB layers: the last alone, then the other
    # seven) and once more for the loss the step all-reduces.
    options = TrainingOptions(schedules=(PipelineSchedule.GPIPE,), max_stages=1, max_microbatches=1, shardings=("none",))
    cluster = hand_cluster(["a100-80gb x2"], spb=1e-12)
    hop = ((0.0, 2e-10), (2e-10, 0.0))
    latency = ((0.0, 3e-4), (3e-4, 0.0))
    measured = replace(cluster, allreduce_seconds_per_byte=hop, allreduce_latency_s=latency)
    costs = hand_costs(measured, 8, options)
    grads = 8 * 10**6 * 4  # 8 layers of 10^6 float32 parameters
    (stage,) = plan_pipeline(costs, measured, 8, options).pipeline.stages
    assert len(stage.devices) == 2
    assert stage.allreduce_s == pytest.approx(grads * 2e-10 + 3 * 2 * 3e-4)
    (plain,) = plan_pipeline(costs, cluster, 8, options).pipeline.stages  # without: a hop is a send
    assert plain.allreduce_s == pytest.approx(grads * 1e-12)


# --------------------------------------------------------------------------- processes sharing cores


@pytest.mark.parametrize("devices", [2, 4])
def test_processes_sharing_a_nodes_cores_compute_as_much_slower_as_the_cluster_says(devices: int) -> None:
    from partitioner.parallel_config import ParallelConfig

    base = hand_cluster([f"a100-80gb x{devices}"])
    shared = replace(base, compute_sharing=(((2, 1.5), (4, 2.5)),))
    options = TrainingOptions(config=ParallelConfig(tp=1, pp=1, dp=devices, microbatches=1))
    costs = hand_costs(base, 8, options)
    alone, together = (plan_pipeline(costs, c, 8, options) for c in (base, shared))
    for result, cluster in ((alone, base), (together, shared)):
        assert_plan_valid(result, cluster, costs, options)
    slowdown = shared.slowdown(0, devices)
    assert slowdown == {2: 1.5, 4: 2.5}[devices]
    for a, b in zip(alone.pipeline.stages, together.pipeline.stages, strict=True):
        # Compute scales; the little communication inside a stage's times does not.
        assert b.fwd_s == pytest.approx(a.fwd_s * slowdown, rel=1e-3) and b.bwd_s == pytest.approx(a.bwd_s * slowdown, rel=1e-3)
        assert a.optimizer_s > 0 and b.optimizer_s == pytest.approx(a.optimizer_s * slowdown)
    assert together.pipeline.step_time_s > alone.pipeline.step_time_s
    assert together.pipeline.lower_bound_s <= together.pipeline.step_time_s * (1 + 1e-9)


def test_processes_that_take_turns_on_one_core_gain_nothing_and_the_plan_keeps_to_one() -> None:
    # k processes at once each k times slower: data parallelism over them computes no faster
    # and adds its all-reduce, so the plan leaves the others idle.
    base = hand_cluster(["a100-80gb x4"], spb=1e-9)
    one_core = replace(base, compute_sharing=(((2, 2.0), (3, 3.0), (4, 4.0)),))
    options = TrainingOptions(max_microbatches=4)
    costs = hand_costs(base, 8, options)
    free, turns = (plan_pipeline(costs, c, 8, options) for c in (base, one_core))
    used = [sum(len(s.devices) for s in r.pipeline.stages[: len({s.rank for s in r.pipeline.stages})]) for r in (free, turns)]
    assert used == [4, 1], (free.pipeline.description, turns.pipeline.description)
    assert_plan_valid(turns, one_core, costs, options)
