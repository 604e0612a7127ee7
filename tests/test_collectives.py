"""Collectives priced per link level: a ring inside a node, hierarchical across nodes."""

from __future__ import annotations

import math

import pytest

from partitioner.cluster import Cluster, load_cluster
from partitioner.collectives import allgather_s, allreduce_s, group_links, reduce_scatter_s, ring_equivalent
from partitioner.cost_model import ring_allreduce_s

_GB = 1e9


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return load_cluster("a100-4x8-ib")  # 4 nodes of 8 A100, NVLink inside, one IB port per GPU


def _ring(cluster: Cluster, devices: list[int]) -> list[tuple[float, float]]:
    return [cluster.allreduce_hop(devices[j], devices[(j + 1) % len(devices)]) for j in range(len(devices))]


def test_inside_a_node_it_is_the_ring_over_nvlink(cluster: Cluster) -> None:
    devices = list(range(8))
    links = group_links(cluster, devices)
    assert (links.nodes, links.per_node) == (1, 8)
    assert math.isclose(allreduce_s(links, _GB), ring_allreduce_s(_GB, _ring(cluster, devices)))


def test_one_device_per_node_is_the_ring_over_the_network(cluster: Cluster) -> None:
    devices = [0, 8, 16, 24]
    links = group_links(cluster, devices)
    assert (links.nodes, links.per_node) == (4, 1)
    assert math.isclose(allreduce_s(links, _GB), ring_allreduce_s(_GB, _ring(cluster, devices)))


def test_a_group_across_nodes_sends_a_slice_per_port(cluster: Cluster) -> None:
    """All 32 GPUs: NVLink phases plus 1/8 of the bytes across the network per port, not all
    of them through the slowest hop as a flat ring would price it."""
    links = group_links(cluster, range(32))
    nv, net = cluster.allreduce_hop(0, 1), cluster.allreduce_hop(0, 8)
    want = 2 * 7 / 8 * _GB * nv[0] + 2 * 3 / 4 * _GB / 8 * net[0] + 2 * 7 * nv[1] + 2 * 3 * net[1]
    assert math.isclose(allreduce_s(links, _GB), want)
    flat = ring_allreduce_s(_GB, _ring(cluster, list(range(32))))
    assert allreduce_s(links, _GB) < flat / 3


def test_gather_and_scatter_are_half_an_all_reduce(cluster: Cluster) -> None:
    links = group_links(cluster, [0, 1, 8, 9])
    assert math.isclose(allgather_s(links, _GB), allreduce_s(links, _GB) / 2)
    assert math.isclose(reduce_scatter_s(links, _GB), allreduce_s(links, _GB) / 2)


def test_one_device_moves_nothing(cluster: Cluster) -> None:
    assert allreduce_s(group_links(cluster, [5]), _GB) == 0.0


@pytest.mark.parametrize("devices", [[0, 1, 2], [0, 8, 16], list(range(32)), [0, 1, 8, 9, 16, 17]])
def test_the_ring_equivalent_prices_as_the_hierarchy(cluster: Cluster, devices: list[int]) -> None:
    links = group_links(cluster, devices)
    hop = ring_equivalent(links)
    flat = ring_allreduce_s(_GB, [hop] * len(devices))
    assert math.isclose(flat, allreduce_s(links, _GB))
    assert math.isclose(ring_allreduce_s(0.0, [hop] * len(devices)), allreduce_s(links, 0.0))
