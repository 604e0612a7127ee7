"""Pure: seconds of the collectives a plan runs (all-reduce, all-gather, reduce-scatter) on a cluster.

A collective over a group of devices is priced per link level. Inside one node it is a
ring paced by its slowest hop (Patarasuk and Yuan 2009)::

    all-reduce       2 (g-1)/g x bytes x s/B + 2 (g-1) x latency
    all-gather       (g-1)/g x bytes x s/B + (g-1) x latency      (bytes: the gathered whole)
    reduce-scatter   (g-1)/g x bytes x s/B + (g-1) x latency      (bytes: the input whole)

A group spanning ``k`` nodes with ``g`` of its devices in each runs hierarchically, as
NCCL's rings across rail-connected nodes do (each GPU with its own network port): a
reduce-scatter inside every node, then the ``g`` slices cross the network at once, each
``bytes / g`` over its own port, then an all-gather inside the node::

    all-reduce  = 2 (g-1)/g x bytes x s_node + 2 (k-1)/k x bytes / g x s_net
                  + 2 (g-1) x lat_node + 2 (k-1) x lat_net

(all-gather and reduce-scatter: half of each term). With ``g = 1`` (a data-parallel group
of one device per node, as beside tensor parallelism) this is the flat ring over the
network; with ``k = 1`` the ring inside the node. A group with unequal counts per node is
priced with its fewest devices in a node (the slowest rail carries the most bytes).
Hops come from `partitioner.cluster.Cluster.allreduce_hop` (a measured ring hop where the
cluster profile has one, else a send).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.cluster import Cluster

__all__ = ["GroupLinks", "group_links", "allreduce_s", "allgather_s", "reduce_scatter_s", "ring_equivalent"]


@dataclass(frozen=True, slots=True)
class GroupLinks:
    """A device group's shape on the cluster: what its collectives cost depends on only this."""

    size: int
    """Devices in the group."""
    nodes: int
    """Nodes it spans (``k``)."""
    per_node: int
    """Its fewest devices in one of those nodes (``g``)."""
    node_hop: tuple[float, float]
    """(seconds per byte, latency) of the slowest hop between its devices inside a node."""
    net_hop: tuple[float, float]
    """(seconds per byte, latency) of the slowest hop between its nodes ((0, 0) in one node)."""

    def phases(self, nbytes: float, passes: int) -> float:
        """Seconds of `passes` ring passes (1: all-gather or reduce-scatter, 2: all-reduce) of `nbytes`."""
        if self.size < 2:
            return 0.0
        g, k = self.per_node, self.nodes
        inside = passes * ((g - 1) / g * nbytes * self.node_hop[0] + (g - 1) * self.node_hop[1])
        if k < 2:
            return inside
        across = passes * ((k - 1) / k * nbytes / g * self.net_hop[0] + (k - 1) * self.net_hop[1])
        return inside + across


def group_links(cluster: Cluster, devices: Sequence[int]) -> GroupLinks:
    """The shape of `devices` (indices into `cluster.devices`) for `GroupLinks.phases`."""
    by_node: dict[int, list[int]] = {}
    for d in devices:
        by_node.setdefault(cluster.node_of[d], []).append(d)
    node_hop = (0.0, 0.0)
    for members in by_node.values():
        for j, d in enumerate(members):
            if len(members) > 1:
                hop = cluster.allreduce_hop(d, members[(j + 1) % len(members)])
                node_hop = (max(node_hop[0], hop[0]), max(node_hop[1], hop[1]))
    net_hop = (0.0, 0.0)
    leaders = [members[0] for members in by_node.values()]
    for j, d in enumerate(leaders):
        if len(leaders) > 1:
            hop = cluster.allreduce_hop(d, leaders[(j + 1) % len(leaders)])
            net_hop = (max(net_hop[0], hop[0]), max(net_hop[1], hop[1]))
    return GroupLinks(
        size=len(devices),
        nodes=len(by_node),
        per_node=min(len(m) for m in by_node.values()) if by_node else 0,
        node_hop=node_hop,
        net_hop=net_hop,
    )


def allreduce_s(links: GroupLinks, nbytes: float) -> float:
    """Seconds to all-reduce `nbytes` bytes (every device ends with the sum)."""
    return links.phases(nbytes, 2)


def allgather_s(links: GroupLinks, nbytes: float) -> float:
    """Seconds to all-gather a tensor of `nbytes` bytes in all (each device holds 1/size of it)."""
    return links.phases(nbytes, 1)


def reduce_scatter_s(links: GroupLinks, nbytes: float) -> float:
    """Seconds to reduce-scatter `nbytes` bytes (each device ends with 1/size of the sum)."""
    return links.phases(nbytes, 1)


def ring_equivalent(links: GroupLinks) -> tuple[float, float]:
    """The (seconds per byte, latency) of one hop of a flat ring over ``n = links.size``
    devices that costs what `links` does: ``2 (n-1)/n x bytes x s + 2 (n-1) x latency`` equals
    `allreduce_s` (and half of it `allgather_s`) for every byte count. For planners written
    with the flat ring formula."""
    n = links.size
    if n < 2:
        return 0.0, 0.0
    g, k = links.per_node, links.nodes
    per_byte = (g - 1) / g * links.node_hop[0]
    latency = (g - 1) * links.node_hop[1]
    if k > 1:
        per_byte += (k - 1) / (k * g) * links.net_hop[0]
        latency += (k - 1) * links.net_hop[1]
    return per_byte * n / (n - 1), latency / (n - 1)
