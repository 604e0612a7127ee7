"""Replica counts per stage inside one device kind (PipeDream-style), and any first devices of
a node: on hand-built tables with known optima (no torch, as tests/test_training_space.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from partitioner.cluster import Cluster, load_cluster
from partitioner.options import Optimizer, Precision, Recompute, TrainingOptions
from partitioner.pipeline_plan import configurations, microbatch_sizes, plan_pipeline
from partitioner.pipeline_plan.space import shapes, unequal_replicas
from partitioner.training_costs import ChainLayer, LayerTimes, TrainingCosts
from tests.test_pipeline_plan import assert_plan_valid, hand_cluster


def weighted_costs(cluster: Cluster, batch: int, options: TrainingOptions, weights: list[int]) -> TrainingCosts:
    """One layer per weight ``w``: forward ``w`` ms per sample, backward twice that; 10^8
    parameters each (0.8 GB of float32 weights and gradients, SGD), 1 kB of activations per
    sample, nothing crossing the cuts."""
    n = len(weights)
    return TrainingCosts(
        layers=tuple(
            ChainLayer(name=f"l{i}", params=10**8, activation_bytes=1000, flops=1e9 * w) for i, w in enumerate(weights)
        ),
        cut_bytes=(0,) * (n + 1),
        times=tuple(
            LayerTimes(kind=k, samples=b, fwd_s=tuple(1e-3 * w * b for w in weights),
                       bwd_s=tuple(2e-3 * w * b for w in weights))
            for k in cluster.kinds
            for b in microbatch_sizes(cluster, batch, options)
        ),
        precision=Precision.FP32,
        optimizer=Optimizer.SGD,
    )


# 6 devices of 2 GB (1.8 GB usable: two layers' state, not three), free links; GPipe over 4
# microbatches of a batch of 16, replicated state, no recomputation.
HEAVY = TrainingOptions(
    schedules=("gpipe",), min_microbatches=4, max_microbatches=4, shardings=("none",), tensor_parallel=(1,),
    recompute=Recompute.NEVER,
)


def heavy_case(options: TrainingOptions) -> tuple[Cluster, TrainingCosts]:
    cluster = hand_cluster(["a100-80gb x6"], {"a100-80gb": "2GB"}, spb=0.0)
    return cluster, weighted_costs(cluster, 16, options, [1, 1, 4])


def test_a_heavy_last_layer_takes_twice_the_replicas() -> None:
    """Layers of weight 1, 1, 4 on 6 devices. A stage of weight ``W`` on ``r`` replicas takes
    ``3 x 1 ms x W x 16 / (4 r) = 12 W / r`` ms per microbatch (forward a third of it), and
    GPipe with two alike stages and free links steps ``(m + 1)`` times that.

    Unequal: layers 0-1 on 2 devices, layer 2 on 4: 12 ms a stage, step 5 x 12 = 60 ms (the
    least: 6 devices' work is 48 ms each, and 1+1+4's three stages step 6 x 12 = 72 ms).
    Equal: a group of three devices cannot split a microbatch of 4 samples, so the heavy
    layer gets 2 devices at most (one stage, or 6 replicas, does not fit): 24 ms a
    microbatch (forward 8). Behind 2 + 2 (2 of 6 idle; stages of 12 and 24 ms) or 2 + 2 + 2
    (6, 6 and 24 ms) its forwards end at 4 + 4 x 8 = 36 ms, its backwards at 36 + 4 x 16 =
    100, the first stage's last backward at 108 ms, either way.

    Then each stage's optimizer step: SGD in float32 moves 12 bytes per parameter, 1.2 GB a
    layer, at 2.039 TB/s x 0.85 (a100-80gb): ``u`` = 0.692 ms a layer, after the last
    backward. Unequal: 60 ms + the first stage's 2u. Equal: 2 + 2 + 2 now wins, its first
    stage ending at 108 ms + u (2 + 2 ends at 108 + 2u).

    And each backward but a microbatch's first adds its gradients into those held: 3 x 0.4 GB
    a layer at the same pace, 3/4 of it in each backward (``a`` a layer). The first stage's
    backwards are the slowest (two layers), so they pace the end: unequal 60 ms + 9a (the
    last stage's first backward with a, then the first stage's four with 2a each), equal
    108 ms + 6a (the last stage's four backwards, then one of each stage before it).
    """
    u = 12 * 10**8 / (2.039e12 * 0.85)
    a = 3 * 4 * 10**8 * 3 / 4 / (2.039e12 * 0.85)
    cluster, costs = heavy_case(HEAVY)
    result = plan_pipeline(costs, cluster, 16, HEAVY)
    p = result.pipeline
    assert [(s.first_layer, s.last_layer, len(s.devices)) for s in p.stages] == [(0, 1, 2), (2, 2, 4)]
    assert p.step_time_s == pytest.approx(0.060 + 9 * a + 2 * u, rel=1e-12)
    assert p.description == "2 stages (1 on 2 x a100-80gb, 1 on 4 x a100-80gb); gpipe, 4 microbatches"
    assert_plan_valid(result, cluster, costs, HEAVY)

    equal = replace(HEAVY, equal_replicas=True)
    launchable = plan_pipeline(costs, cluster, 16, equal)
    q = launchable.pipeline
    assert {len(s.devices) for s in q.stages} == {2} and (q.stages[-1].first_layer, q.stages[-1].last_layer) == (2, 2)
    assert q.step_time_s == pytest.approx(0.108 + 6 * a + u, rel=1e-12)
    assert [(s.first_layer, s.last_layer) for s in q.stages] == [(0, 0), (1, 1), (2, 2)]
    assert_plan_valid(launchable, cluster, costs, equal)


def test_unequal_replicas_are_r_and_twice_r_in_monotone_order() -> None:
    assert unequal_replicas(6) == [(1, 1, 1, 1, 2), (2, 1, 1, 1, 1), (1, 1, 2, 2), (2, 2, 1, 1), (2, 4), (4, 2)]
    assert unequal_replicas(1) == unequal_replicas(2) == []
    for devices in range(1, 17):
        found = unequal_replicas(devices)
        assert len(set(found)) == len(found)
        for sizes in found:
            r = min(sizes)
            assert sum(sizes) == devices and set(sizes) == {r, 2 * r}
            assert list(sizes) in (sorted(sizes), sorted(sizes, reverse=True))


CLUSTERS = ("a100-2x4-ib", "a100-4x8-ib", "h100-8x8-ib", "mixed-8", "dgx-a100-8")


@pytest.mark.parametrize("name", CLUSTERS)
def test_every_group_lies_in_a_node_or_is_whole_nodes(name: str) -> None:
    """Consecutive groups lie in one node or are whole nodes (of their kind); a strided group
    of *stages in a node* holds as many devices of every node it uses; a shape's devices of
    one kind lie in one node or are whole nodes (torchrun starts as many processes on every
    node)."""
    cluster = load_cluster(name)
    kind_of = [d.profile.name for d in cluster.devices]
    on_node: dict[tuple[int, str], set[int]] = {}
    for d, node in enumerate(cluster.node_of):
        on_node.setdefault((node, kind_of[d]), set()).add(d)

    def whole(devices: set[int]) -> bool:
        return all(on_node[cluster.node_of[d], kind_of[d]] <= devices for d in devices)

    unequal = 0
    for groups, layout in shapes(cluster):
        used = {d for g in groups for d in g.devices}
        nodes = {cluster.node_of[d] for d in used}
        assert len(nodes) == 1 or whole(used) or len({kind_of[d] for d in used}) > 1, (layout, groups)
        for g in groups:
            in_one = len({cluster.node_of[d] for d in g.devices}) == 1
            if layout == "stages in a node":
                counts = [sum(cluster.node_of[d] == n for d in g.devices) for n in {cluster.node_of[d] for d in g.devices}]
                assert len(set(counts)) == 1, groups
            else:
                assert in_one or whole(set(g.devices)), (layout, groups)
        if len({g.replicas for g in groups}) > 1 and len({kind_of[d] for d in used}) == 1:
            unequal += 1
            assert len(nodes) == 1  # unequal groups of one kind: inside one node only
    assert unequal > 0


@pytest.mark.parametrize("cluster", [hand_cluster(["a100-80gb x8"]), load_cluster("a100-2x4-ib"), load_cluster("mixed-8")],
                         ids=["8 in a node", "2 nodes of 4", "mixed-8"])
def test_equal_replicas_never_yields_unequal_groups(cluster: Cluster) -> None:
    options = TrainingOptions(max_microbatches=16, tensor_parallel=(1, 2, 4))
    free = configurations(cluster, 48, 12, options)
    equal = configurations(cluster, 48, 12, replace(options, equal_replicas=True))
    assert any(len({g.replicas for g in c.groups}) > 1 for c in free)
    assert equal and all(len({g.replicas for g in c.groups}) == 1 for c in equal)
    assert set(equal) == {c for c in free if len({g.replicas for g in c.groups}) == 1}


def test_tensor_parallelism_counts_only_the_devices_used_in_a_node() -> None:
    # A node of 7: its first 6 devices in groups of 2 take tp 2 (the idle seventh does not
    # count), all 7 in a group do not.
    cluster = hand_cluster(["a100-80gb x7"])
    options = TrainingOptions(max_microbatches=4, tensor_parallel=(1, 2))
    configs = configurations(cluster, 8, 8, options)
    six = [c for c in configs if c.tp == 2]
    assert six and all(sum(g.replicas for g in c.groups) <= 6 for c in six)
    assert any(sum(g.replicas for g in c.groups) == 6 and c.ranks == 3 for c in six)
