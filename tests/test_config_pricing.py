"""Pricing a configuration the user names (`TrainingOptions.config`, ``--config``)."""

from __future__ import annotations

import pytest

from partitioner.cli import main
from partitioner.errors import InfeasibleError
from partitioner.options import Recompute, Sharding, TrainingOptions
from partitioner.parallel_config import ParallelConfig
from partitioner.pipeline_plan import plan_pipeline
from partitioner.plan import PipelinePlan, PlanStage
from partitioner.simulate import simulate
from tests.test_pipeline_plan import hand_cluster, hand_costs
from tests.test_training_space import tp_costs


def _plan(config: ParallelConfig | None) -> PipelinePlan:
    opts = TrainingOptions(max_microbatches=4, config=config)
    cluster = hand_cluster(["a100-80gb x8"])
    costs = tp_costs(cluster, 32, opts)
    return plan_pipeline(costs, cluster, 32, opts).pipeline


def test_a_named_configuration_is_priced_exactly_and_never_beats_the_plan() -> None:
    free = _plan(None)
    named = ParallelConfig(tp=2, pp=2, dp=2, shard=Sharding.ZERO1, microbatches=4, recompute=Recompute.ALWAYS)
    priced = _plan(named)
    assert (priced.tensor_parallel, priced.num_ranks, priced.data_parallel) == (2, 2, 2)
    assert (priced.sharding, priced.microbatches) == ("zero1", 4)
    assert all(s.recompute for s in priced.stages)
    assert priced.step_time_s >= free.step_time_s
    assert "only the configuration tp=2,pp=2,dp=2,shard=zero1,microbatches=4,recompute=full" in priced.space


def test_a_grid_is_searched_within() -> None:
    grid = _plan(ParallelConfig(pp=1, shard=Sharding.ZERO3))
    assert grid.num_ranks == 1 and grid.sharding == "zero3"
    equal = _plan(ParallelConfig(pp=2, split="equal"))
    assert equal.split == "equal"


def test_degrees_beyond_the_devices_are_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"tp=2 x pp=2 x dp=4 = 16 devices, but the cluster has 8"):
        _plan(ParallelConfig(tp=2, pp=2, dp=4))


def test_degrees_on_fewer_devices_price_the_subset_and_say_which_stay_idle() -> None:
    # 3 stages of tp 2 on 6 of the node's 8 devices (the space's first 6).
    priced = _plan(ParallelConfig(tp=2, pp=3, dp=1))
    assert (priced.tensor_parallel, priced.num_ranks, priced.data_parallel) == (2, 3, 1)
    assert sorted({d for s in priced.stages for d in s.devices}) == list(range(6))
    assert "2 of 8 devices idle" in priced.description


def test_a_configuration_outside_the_options_is_infeasible_saying_why() -> None:
    with pytest.raises(InfeasibleError, match="no configuration of the space is tp=2,microbatches=3"):
        _plan(ParallelConfig(tp=2, microbatches=3))


def test_the_cli_prices_a_config_and_refuses_a_misspelt_one(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "gpt2", "--cluster", "dgx-a100-8", "--train", "--global-batch", "16",
                 "--config", "tp=2,pp=2,dp=2,shard=zero1,recompute=selective"])
    out = capsys.readouterr().out
    assert code == 0 and "tp 2 x dp 2, zero1" in out and "only the configuration" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "gpt2", "--cluster", "dgx-a100-8", "--train", "--config", "tq=2"])
    assert exit_info.value.code == 2 and "did you mean 'tp'" in capsys.readouterr().err


def test_a_tensor_parallel_plan_shows_its_all_reduces_on_the_collectives_lane() -> None:
    from partitioner.simulate import EventKind

    opts = TrainingOptions(max_microbatches=4, config=ParallelConfig(tp=2, pp=2, dp=2, schedule="1f1b"))
    cluster = hand_cluster(["a100-80gb x8"])
    result = plan_pipeline(tp_costs(cluster, 32, opts), cluster, 32, opts)
    stage = result.pipeline.stages[0]
    assert stage.tp_comm_s > 0 and stage.collective_fwd_s == pytest.approx(stage.tp_comm_s + stage.dp_comm_fwd_s)
    collectives = [e for rank in result.timeline.ranks for e in rank.of_kind(EventKind.COLLECTIVE)]
    assert len(collectives) == 2 * 2 * result.pipeline.microbatches  # a forward and a backward per stage and microbatch
    assert all(e.duration_s > 0 for e in collectives)


@pytest.mark.parametrize("shard", [Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3])
def test_a_named_sharding_is_priced_though_another_would_dominate_it(shard: Sharding) -> None:
    """Memory to spare: the planner skips ZeRO-1/2/3 where replicated (or zero3-keep) is as
    fast, but a user who names one gets it priced, not an infeasible error."""
    priced = _plan(ParallelConfig(tp=1, pp=1, shard=shard))
    assert priced.sharding == shard.value and priced.num_ranks == 1


def test_1f1b_needs_a_microbatch_per_rank_as_torch_runs_it() -> None:
    """Schedule1F1B refuses fewer microbatches than stages; the space then offers GPipe."""
    from partitioner.pipeline_plan import configurations
    from partitioner.simulate import PipelineSchedule

    cluster = hand_cluster(["a100-80gb x4"])
    configs = configurations(cluster, 8, 8, TrainingOptions(max_microbatches=8, tensor_parallel=(1,)))
    one_f_one_b = [c for c in configs if c.schedule is PipelineSchedule.ONE_F_ONE_B]
    assert one_f_one_b and all(c.microbatches >= c.ranks for c in one_f_one_b)
    assert any(c.schedule is PipelineSchedule.GPIPE and c.microbatches < c.ranks for c in configs)


def test_a_data_parallel_ring_across_nodes_is_priced_per_link_level() -> None:
    """32 A100s in 4 nodes, one stage replicated: the all-reduce is NVLink inside each node and
    1/8 of the gradients per GPU port over InfiniBand (partitioner.collectives), not every
    byte through the slowest hop (8x dearer). Its latency is paid once per DDP bucket and
    once more for the loss the step all-reduces."""
    from partitioner.cluster import load_cluster
    from partitioner.collectives import allreduce_s, group_links
    from partitioner.cost_model import ring_allreduce_s
    from partitioner.pipeline_plan.terms import LayerTables

    cluster = load_cluster("a100-4x8-ib")
    opts = TrainingOptions(max_microbatches=1, config=ParallelConfig(tp=1, pp=1, dp=32, shard=Sharding.NONE))
    costs = tp_costs(cluster, 64, opts)
    result = plan_pipeline(costs, cluster, 64, opts)
    (stage,) = result.pipeline.stages
    links = group_links(cluster, range(32))
    buckets = int(LayerTables(costs, 1, False).buckets()[0, len(costs.layers)])
    assert buckets >= 2
    want = allreduce_s(links, stage.grad_bytes) + buckets * allreduce_s(links, 0)
    assert stage.allreduce_s == pytest.approx(want)
    flat = ring_allreduce_s(stage.grad_bytes, [cluster.allreduce_hop(j, (j + 1) % 32) for j in range(32)])
    assert allreduce_s(links, stage.grad_bytes) < flat / 4


def test_zero1_and_zero2_are_priced_as_partitioner_distributed_runs_them() -> None:
    """As FSDP2 under torch's pipelining schedules runs them (partitioner.distributed.spmd):
    zero1 reduces the whole gradients once per step and gathers the weights once (exposed);
    zero2 gathers the weights once per step but reduce-scatters every microbatch in
    backward (its gradient shard accumulates), so its backward carries that
    communication and its memory holds gradient shards only."""
    cluster = hand_cluster(["a100-80gb x8"], spb=1e-9)

    def stage(shard: Sharding, microbatches: int) -> PlanStage:
        opts = TrainingOptions(max_microbatches=microbatches,
                               config=ParallelConfig(tp=1, pp=1, shard=shard, microbatches=microbatches))
        (only,) = plan_pipeline(tp_costs(cluster, 32, opts), cluster, 32, opts).pipeline.stages
        return only

    one, two = stage(Sharding.ZERO1, 4), stage(Sharding.ZERO2, 4)
    d = 8
    w, g = one.gathered_bytes, one.grad_bytes  # zero1's gradients stay whole
    assert w == two.gathered_bytes and one.weight_bytes == two.weight_bytes == pytest.approx(w / d, abs=1)
    assert two.grad_bytes == pytest.approx(g / d, abs=1)
    ring = one.allreduce_s / ((d - 1) / d * (g + w))  # seconds per byte (with latency folded in)
    assert two.allreduce_s == pytest.approx((d - 1) / d * w * ring, rel=0.05)  # the weights' gather only
    assert one.dp_comm_bwd_s == 0 and one.dp_comm_fwd_s == 0
    assert two.dp_comm_bwd_s > 0 and two.dp_comm_fwd_s == 0  # the reduce-scatter every microbatch


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_cpu_stage_s_sends_hold_its_compute(schedule: str) -> None:
    """The same 2-stage configuration on two CPUs and on two GPUs, every layer and link alike
    (the CPU's layers priced at the GPU's speed): the CPU stages' sends hold their compute
    lane (`PlanStage.host_sends`), so their step is longer by sends the GPUs overlap; the
    plan's step is what the simulator plays for its stages."""
    opts = TrainingOptions(max_microbatches=4, config=ParallelConfig(tp=1, pp=2, dp=1, microbatches=4,
                                                                    schedule=schedule, split="equal"))
    steps = {}
    for kind in ("cpu x2", "a100-80gb x2"):
        cluster = hand_cluster([kind], spb=1e-8)
        costs = hand_costs(cluster, 16, opts, speed={k: 1e-3 for k in cluster.kinds})
        plan = plan_pipeline(costs, cluster, 16, opts)
        p = plan.pipeline
        assert all(s.host_sends == (kind == "cpu x2") for s in p.stages)
        assert all(s.send_fwd_s > 0 for s in p.stages[:-1]) and all(s.send_bwd_s > 0 for s in p.stages[1:])
        played = simulate(p.stage_costs([d.name for d in cluster.devices]), p.microbatches, p.schedule,
                          overlap_allreduce=p.overlap_allreduce)
        assert p.step_time_s == pytest.approx(played.step_time_s)
        steps[kind] = p.step_time_s
    assert steps["cpu x2"] > steps["a100-80gb x2"]
