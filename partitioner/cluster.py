"""Clusters: nodes of devices and the links between them (``profiles/clusters/*.json``) -> `Cluster`.

A cluster profile lists node types (how many nodes of each, which devices each holds, the
links inside a node between device kinds) and the network between nodes; the schema is in
``profiles/README.md``. `Cluster` is what the training planner reads: the devices in order
(node by node), the node of each, and a table of seconds per byte and latency for every
ordered pair of devices. A plain device list (``["a100-80gb x4"]``) is a one-node cluster
whose links are `partitioner.devices.link_cost`'s.

A link may also say what one hop of a ring all-reduce costs over it (``allreduce``), when
that differs from a send: measured gloo all-reduces on CPU also pay for the reduction and
for processes sharing cores (``partitioner profile --links gloo``). Without it a hop is
priced as a send.

A node may also say how much slower each of its devices computes when several compute at
once (``compute_sharing``): processes on one machine's CPU cores, each a "device", share
the cores, caches and memory bandwidth. `Cluster.slowdown` reads it; the training planner
multiplies a stage's compute by it for the number of processes its configuration runs on
the node. Without it (every GPU node) devices compute independently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from partitioner.device_resolution import MAX_DEVICES, MaxMemory, resolve_devices
from partitioner.devices import Device, DeviceProfile, FieldError, Link, check_link, link_cost
from partitioner.errors import DeviceError, ProfileError
from partitioner.profile_files import (
    find_on_search_path,
    json_object,
    load_profile,
    profile_search_path,
    read_strict_json,
)

__all__ = [
    "CLUSTER_DIR",
    "Cluster",
    "cluster_from_dict",
    "load_cluster",
    "available_clusters",
    "resolve_cluster",
]

CLUSTER_DIR = "clusters"
"""Cluster profiles live in this subdirectory of every profile directory (`profile_search_path`)."""

# Past these a cluster is a typo or too large for the dense link table (devices squared:
# 4096 devices are four tables of 16.8M shared floats, ~130 MB each); `MAX_DEVICES` (1024)
# is the most a device list may name.
MAX_CLUSTER_DEVICES = 4096
_MAX_DEVICES_PER_NODE = 64
_MAX_FILE_BYTES = 1 << 20
_LINK_KEYS = {f.name for f in fields(Link)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """Devices grouped in nodes, with the cost of a transfer between any two of them.

    Moving ``n`` bytes from device ``a`` to device ``b`` takes
    ``n * seconds_per_byte[a][b] + latency_s[a][b]`` seconds (0 when ``a == b``).
    """

    name: str
    description: str
    devices: tuple[Device, ...]
    """Every device, node by node, in the order the profile lists them."""
    node_of: tuple[int, ...]
    """node_of[d]: index into `node_names` of the node holding device d."""
    node_names: tuple[str, ...]
    seconds_per_byte: tuple[tuple[float, ...], ...]
    """seconds_per_byte[a][b]: inverse bandwidth of one transfer a -> b."""
    latency_s: tuple[tuple[float, ...], ...]
    """latency_s[a][b]: fixed cost of one transfer a -> b."""
    links: tuple[str, ...] = ()
    """One line per kind of link, for people (``nvlink 300 GB/s inside a node``)."""
    source: str = ""
    allreduce_seconds_per_byte: tuple[tuple[float, ...], ...] | None = None
    """allreduce_seconds_per_byte[a][b]: inverse bandwidth of one ring all-reduce hop a -> b;
    None: as `seconds_per_byte` (a hop costs what a send does)."""
    allreduce_latency_s: tuple[tuple[float, ...], ...] | None = None
    """allreduce_latency_s[a][b]: fixed cost of one ring all-reduce hop a -> b; None: as `latency_s`."""
    compute_sharing: tuple[tuple[tuple[int, float], ...], ...] = ()
    """compute_sharing[k]: node k's ``(processes, slowdown)`` points, processes increasing from
    2 (empty: its devices compute independently); () when no node has any."""

    def __post_init__(self) -> None:
        n = len(self.devices)
        if n == 0:
            raise DeviceError(f"cluster {self.name!r} has no devices")
        if len(self.node_of) != n or any(not 0 <= k < len(self.node_names) for k in self.node_of):
            raise DeviceError(f"cluster {self.name!r}: node_of needs one node index per device")
        for table in (self.seconds_per_byte, self.latency_s, self.allreduce_seconds_per_byte, self.allreduce_latency_s):
            if table is None:
                continue
            if len(table) != n or any(len(row) != n for row in table):
                raise DeviceError(f"cluster {self.name!r}: link tables must be {n} x {n}")
        if self.compute_sharing and len(self.compute_sharing) != len(self.node_names):
            raise DeviceError(f"cluster {self.name!r}: compute_sharing needs one entry per node")
        names = [d.name for d in self.devices]
        if len(set(names)) != n:
            raise DeviceError(f"cluster {self.name!r} names a device twice")

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Device profile names, in order of first appearance."""
        return tuple(dict.fromkeys(d.profile.name for d in self.devices))

    def transfer_s(self, nbytes: float, a: int, b: int) -> float:
        """Seconds to move `nbytes` bytes from device `a` to device `b` (0 on the same device)."""
        if a == b:
            return 0.0
        return nbytes * self.seconds_per_byte[a][b] + self.latency_s[a][b]

    def allreduce_hop(self, a: int, b: int) -> tuple[float, float]:
        """(seconds per byte, latency) of one hop a -> b of a ring all-reduce (0 on the same device).

        A ring all-reduce of ``n`` bytes over ``k`` devices takes ``2 (k-1)/k x n x s/B +
        2 (k-1) x latency`` of its slowest hop (`partitioner.cost_model.ring_allreduce_s`).
        """
        spb = self.allreduce_seconds_per_byte or self.seconds_per_byte
        lat = self.allreduce_latency_s or self.latency_s
        return spb[a][b], lat[a][b]

    def slowdown(self, node: int, processes: int) -> float:
        """How much slower each device of `node` computes while `processes` of its devices compute at once.

        1 with one process, or where the node has no ``compute_sharing``; between its
        points linear in the process count (from ``(1, 1.0)``); past the last, that point's.
        """
        points = self.compute_sharing[node] if self.compute_sharing else ()
        if processes <= 1 or not points:
            return 1.0
        previous = (1, 1.0)
        for point in points:
            if processes <= point[0]:
                t = (processes - previous[0]) / (point[0] - previous[0])
                return previous[1] + t * (point[1] - previous[1])
            previous = point
        return points[-1][1]

    def group_slowdown(self, used: Iterable[int], group: Iterable[int]) -> float:
        """`slowdown` of the slowest device of `group` when a launch runs a process on each
        device of `used` (idle devices run none): each node's processes counted apart."""
        if not self.compute_sharing:
            return 1.0
        processes: dict[int, int] = {}
        for d in set(used):
            processes[self.node_of[d]] = processes.get(self.node_of[d], 0) + 1
        return max(self.slowdown(self.node_of[d], processes.get(self.node_of[d], 1)) for d in group)

    @classmethod
    def from_devices(cls, devices: Sequence[Device], name: str = "devices") -> Cluster:
        """A one-node cluster of `devices`, linked as `partitioner.devices.link_cost` says."""
        devices = tuple(devices)
        costs = [[link_cost(a, b) for b in devices] for a in devices]
        return cls(
            name=name,
            description=", ".join(d.name for d in devices),
            devices=devices,
            node_of=(0,) * len(devices),
            node_names=("node",),
            seconds_per_byte=tuple(tuple(c[0] for c in row) for row in costs),
            latency_s=tuple(tuple(c[1] for c in row) for row in costs),
            links=("links from the device profiles (partitioner.devices.link_cost)",),
            source="device list",
        )

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for d in self.devices:
            counts[d.profile.name] = counts.get(d.profile.name, 0) + 1
        what = ", ".join(f"{n} x {kind}" for kind, n in counts.items())
        nodes = len(self.node_names)
        return f"{self.name}: {self.num_devices} devices ({what}) in {nodes} node{'s' if nodes > 1 else ''}"


# --------------------------------------------------------------------------- reading profiles


def _link_line(link: Link, where: str) -> str:
    generation = f" {link.generation}" if link.generation is not None else ""
    return (
        f"{link.interface}{generation} {link.bandwidth_Bps / 1e9:g} GB/s x {link.efficiency:g}, "
        f"{link.latency_s * 1e6:g} us {where}"
    )


_Hop = tuple[float, float]
"""(seconds per byte, latency in seconds) of one transfer."""


def _link(where: str, key: str, raw: object, extra: frozenset[str] = frozenset()) -> tuple[Link, dict[str, Any]]:
    data = json_object(where, key, raw, _LINK_KEYS | extra, {"allreduce"})
    link = Link(**{k: data[k] for k in _LINK_KEYS})
    try:
        check_link(key, link)
    except FieldError as e:
        raise ProfileError(f"{where}: {e.detail}") from None
    return link, data


def _hops(where: str, key: str, link: Link, data: dict[str, Any]) -> tuple[_Hop, _Hop | None]:
    """(a send's hop, a ring all-reduce's hop or None) of a checked link and its JSON object.

    ``allreduce`` holds ``bandwidth_Bps`` and ``latency_s`` of one ring hop, in the link's
    ranges (efficiency 1: the figures are what was measured).
    """
    send = (1.0 / (link.bandwidth_Bps * link.efficiency), link.latency_s)
    if "allreduce" not in data:
        return send, None
    raw = json_object(where, f"{key}.allreduce", data["allreduce"], {"bandwidth_Bps", "latency_s"}, set())
    hop = Link(interface=link.interface, generation=None, bandwidth_Bps=raw["bandwidth_Bps"],
               latency_s=raw["latency_s"], efficiency=1.0)
    try:
        check_link(f"{key}.allreduce", hop)
    except FieldError as e:
        raise ProfileError(f"{where}: {e.detail}") from None
    return send, (1.0 / hop.bandwidth_Bps, hop.latency_s)


def _ring_line(hop: _Hop | None) -> str:
    return "" if hop is None else f"; all-reduce hop {1e-9 / hop[0]:.4g} GB/s, {hop[1] * 1e6:.4g} us"


def _count(where: str, key: str, value: object, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ProfileError(f"{where}: key {key!r} must be an integer in [1, {upper}] (got {value!r})")
    return value


def _text(where: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: key {key!r} must be a non-empty string (got {value!r})")
    return value


@dataclass(frozen=True, slots=True)
class _NodeType:
    """One entry of ``nodes``, checked: its devices' profiles and the links between their kinds."""

    name: str
    count: int
    kinds: dict[str, tuple[DeviceProfile, int]]
    """Profile name -> (profile, devices of it per node), in the order listed."""
    links: dict[frozenset[str], tuple[_Hop, _Hop | None]]
    """Two kinds -> (a send's hop, a ring all-reduce's hop or None: as a send)."""
    lines: list[str]
    sharing: tuple[tuple[int, float], ...] = ()
    """``(processes, slowdown)`` points of ``compute_sharing`` (empty: none)."""


_MAX_SLOWDOWN = 64.0


def _sharing(where: str, key: str, raw: object, devices: int) -> tuple[tuple[int, float], ...]:
    """The checked ``compute_sharing`` points of a node of `devices` devices."""
    what = (f"{where}: key {key!r} must be a list of [processes, slowdown] pairs, processes whole and "
            f"increasing in [2, {devices}] (the node's devices), slowdown in [1, {_MAX_SLOWDOWN:g}]")
    if not isinstance(raw, list) or not raw:
        raise ProfileError(f"{what} (got {raw!r:.80})")
    points: list[tuple[int, float]] = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or isinstance(pair[0], bool)
            or not isinstance(pair[0], int)
            or isinstance(pair[1], bool)
            or not isinstance(pair[1], (int, float))
            or not 2 <= pair[0] <= devices
            or not 1.0 <= pair[1] <= _MAX_SLOWDOWN
            or (points and pair[0] <= points[-1][0])
        ):
            raise ProfileError(f"{what} (got {pair!r:.80})")
        points.append((pair[0], float(pair[1])))
    return tuple(points)


def _node_type(where: str, key: str, raw: object) -> _NodeType:
    node = json_object(where, key, raw, {"name", "count", "devices", "links"}, {"compute_sharing"})
    name = _text(where, f"{key}.name", node["name"])
    count = _count(where, f"{key}.count", node["count"], MAX_CLUSTER_DEVICES)
    if not isinstance(node["devices"], list) or not node["devices"]:
        raise ProfileError(f"{where}: key '{key}.devices' must be a non-empty list")
    kinds: dict[str, tuple[DeviceProfile, int]] = {}
    for k, entry in enumerate(node["devices"]):
        item = json_object(where, f"{key}.devices[{k}]", entry, {"profile", "count"}, set())
        profile = _text(where, f"{key}.devices[{k}].profile", item["profile"])
        if profile in kinds:
            raise ProfileError(f"{where}: {key} lists device profile {profile!r} twice; give one count")
        n = _count(where, f"{key}.devices[{k}].count", item["count"], _MAX_DEVICES_PER_NODE)
        try:
            kinds[profile] = (load_profile(profile), n)
        except ProfileError as e:
            raise ProfileError(f"{where}: {key} names device profile {profile!r}: {e}") from None
    if sum(n for _, n in kinds.values()) > _MAX_DEVICES_PER_NODE:
        raise ProfileError(f"{where}: {key} holds more than {_MAX_DEVICES_PER_NODE} devices")
    if not isinstance(node["links"], list):
        raise ProfileError(f"{where}: key '{key}.links' must be a list")
    links: dict[frozenset[str], tuple[_Hop, _Hop | None]] = {}
    lines = []
    for k, entry in enumerate(node["links"]):
        link, data = _link(where, f"{key}.links[{k}]", entry, frozenset({"between"}))
        between = data["between"]
        if (
            not isinstance(between, list)
            or len(between) != 2
            or not all(isinstance(b, str) and b in kinds for b in between)
        ):
            raise ProfileError(
                f"{where}: key '{key}.links[{k}].between' must name two device profiles of the node "
                f"({', '.join(kinds)}) (got {between!r})"
            )
        if frozenset(between) in links:
            raise ProfileError(f"{where}: {key} has two links between {' and '.join(sorted(between))}")
        links[frozenset(between)] = hops = _hops(where, f"{key}.links[{k}]", link, data)
        lines.append(_link_line(link, f"between {between[0]} and {between[1]} in {name}") + _ring_line(hops[1]))
    names = list(kinds)
    for i, a in enumerate(names):
        for b in names[i:]:
            if (a != b or kinds[a][1] > 1) and frozenset((a, b)) not in links:
                raise ProfileError(
                    f"{where}: {key} has no link between {a} and {b}; add "
                    f'{{"between": ["{a}", "{b}"], "interface": ..., ...}} to its links'
                )
    sharing: tuple[tuple[int, float], ...] = ()
    if "compute_sharing" in node:
        sharing = _sharing(where, f"{key}.compute_sharing", node["compute_sharing"], sum(n for _, n in kinds.values()))
        lines.append(f"compute shared in {name}: " + ", ".join(f"{k} processes {x:.3g}x slower each" for k, x in sharing))
    return _NodeType(name, count, kinds, links, lines, sharing)


def cluster_from_dict(data: object, where: str = "<cluster>") -> Cluster:
    """Build a `Cluster` from parsed JSON, strictly (the schema is in profiles/README.md).

    Args:
        data: The parsed JSON document.
        where: What to name in error messages (usually the file path).

    Raises:
        ProfileError: Missing or unknown keys, wrong types, numbers out of range, an
            unknown device profile, a pair of device kinds in a node without a link, or
            several nodes without a network.
    """
    top = json_object(where, "", data, {"name", "description", "nodes", "network", "source"}, set())
    name = _text(where, "name", top["name"])
    if not isinstance(top["nodes"], list) or not top["nodes"]:
        raise ProfileError(f"{where}: key 'nodes' must be a non-empty list of node types")
    devices: list[Device] = []
    node_of: list[int] = []
    node_names: list[str] = []
    pair_link: list[dict[frozenset[str], tuple[_Hop, _Hop | None]]] = []  # per node: its two kinds -> hops
    sharing: list[tuple[tuple[int, float], ...]] = []  # per node
    lines: list[str] = []
    for t, raw in enumerate(top["nodes"]):
        node = _node_type(where, f"nodes[{t}]", raw)
        lines += node.lines
        for copy in range(node.count):
            node_name = f"{node.name}{copy}" if node.count > 1 else node.name
            if node_name in node_names:
                raise ProfileError(f"{where}: two nodes are named {node_name!r}; give node types distinct names")
            node_names.append(node_name)
            pair_link.append(node.links)
            sharing.append(node.sharing)
            members = [profile for profile, n in node.kinds.values() for _ in range(n)]
            if len(devices) + len(members) > MAX_CLUSTER_DEVICES:
                raise ProfileError(
                    f"{where}: more than {MAX_CLUSTER_DEVICES} devices; at most {MAX_CLUSTER_DEVICES}"
                )
            for local, profile in enumerate(members):
                devices.append(
                    Device(
                        name=f"{node_name}/{local}",
                        torch_device=None,
                        profile=profile,
                        present=False,
                        memory_bytes=profile.memory_bytes,
                    )
                )
                node_of.append(len(node_names) - 1)
    network: tuple[_Hop, _Hop | None] | None = None
    if top["network"] is not None:
        link, raw_network = _link(where, "network", top["network"])
        network = _hops(where, "network", link, raw_network)
        lines.append(_link_line(link, "between nodes (per device)") + _ring_line(network[1]))
    elif len(node_names) > 1:
        raise ProfileError(f"{where}: key 'network' must be a link: the cluster has {len(node_names)} nodes")
    send, ring = _link_tables(devices, node_of, pair_link, network)
    measured_ring = ring != send
    return Cluster(
        name=name,
        description=_text(where, "description", top["description"]),
        devices=tuple(devices),
        node_of=tuple(node_of),
        node_names=tuple(node_names),
        seconds_per_byte=tuple(tuple(h[0] for h in row) for row in send),
        latency_s=tuple(tuple(h[1] for h in row) for row in send),
        links=tuple(lines),
        source=_text(where, "source", top["source"]),
        allreduce_seconds_per_byte=tuple(tuple(h[0] for h in row) for row in ring) if measured_ring else None,
        allreduce_latency_s=tuple(tuple(h[1] for h in row) for row in ring) if measured_ring else None,
        compute_sharing=tuple(sharing) if any(sharing) else (),
    )


def _link_tables(
    devices: Sequence[Device],
    node_of: Sequence[int],
    pair_link: Sequence[dict[frozenset[str], tuple[_Hop, _Hop | None]]],
    network: tuple[_Hop, _Hop | None] | None,
) -> tuple[list[tuple[_Hop, ...]], list[tuple[_Hop, ...]]]:
    """The (send, ring-hop) tables: a node's own link between its devices, the network
    between nodes. Built a node at a time (a row is its node's block between runs of the
    network hop), so 3,072 devices take about a second."""
    zero = (0.0, 0.0)
    members: dict[int, list[int]] = {}
    for d, k in enumerate(node_of):
        members.setdefault(k, []).append(d)
    n = len(devices)
    send: list[tuple[_Hop, ...]] = []
    ring: list[tuple[_Hop, ...]] = []
    for src, dev_src in enumerate(devices):
        own = members[node_of[src]]
        first, end = own[0], own[-1] + 1  # a node's devices are consecutive
        block_send, block_ring = [], []
        for dst in own:
            if dst == src:
                block_send.append(zero)
                block_ring.append(zero)
                continue
            hops = pair_link[node_of[src]][frozenset((dev_src.profile.name, devices[dst].profile.name))]
            block_send.append(hops[0])
            block_ring.append(hops[1] or hops[0])
        if network is None:
            before_send = after_send = before_ring = after_ring = []
        else:
            before_send, after_send = [network[0]] * first, [network[0]] * (n - end)
            hop = network[1] or network[0]
            before_ring, after_ring = [hop] * first, [hop] * (n - end)
        send.append(tuple(before_send + block_send + after_send))
        ring.append(tuple(before_ring + block_ring + after_ring))
    return send, ring


def _cluster_dirs() -> tuple[Path, ...]:
    return tuple(d / CLUSTER_DIR for d in profile_search_path())


def available_clusters() -> tuple[str, ...]:
    """Names of the cluster profiles found (``clusters/`` under each profile directory), sorted."""
    names: set[str] = set()
    for directory in _cluster_dirs():
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.json"))
    return tuple(sorted(names))


def _find(name: str) -> Path | None:
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    return find_on_search_path(f"{CLUSTER_DIR}/{name}.json")


def load_cluster(name_or_path: str | os.PathLike[str]) -> Cluster:
    """Load and validate a cluster profile.

    Args:
        name_or_path: A cluster name (``dgx-a100-8``), looked up as ``clusters/<name>.json``
            under each directory of `partitioner.devices.profile_search_path`, or a path to
            a JSON file (a `PathLike`, or a string ending in ``.json``).

    Raises:
        ProfileError: No such cluster, or the file is not JSON or breaks the schema, or
            the file found for a name declares another name.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".json"):
        path = Path(text)
        return cluster_from_dict(read_strict_json(path, _MAX_FILE_BYTES, "cluster profile"), str(path))
    found = _find(text)
    if found is None:
        raise ProfileError(
            f"no cluster profile named {text!r}; available: {', '.join(available_clusters()) or 'none'} "
            f"(searched {', '.join(str(d) for d in _cluster_dirs())})"
        )
    cluster = cluster_from_dict(read_strict_json(found, _MAX_FILE_BYTES, "cluster profile"), str(found))
    if cluster.name != text:
        raise ProfileError(f"{found}: key 'name' is {cluster.name!r} but the file is {found.name}; make them agree")
    return cluster


def resolve_cluster(spec: Cluster | str | Sequence[str], max_memory: MaxMemory | None = None) -> Cluster:
    """A cluster from a `Cluster`, a cluster name, or device strings (a one-node cluster).

    Args:
        spec: A `Cluster`; the name of a cluster profile (a file of one is read with
            `load_cluster`); or device strings as `partitioner.devices.resolve_devices`
            takes them (``["a100-80gb x4"]``, a device profile's path).
        max_memory: Capacity overrides for device strings (see `resolve_devices`).

    Raises:
        DeviceError: Unknown devices, or `max_memory` given with a cluster profile.
        ProfileError: A cluster profile that does not load.
    """
    if isinstance(spec, Cluster):
        cluster = spec
    elif isinstance(spec, str) and _find(spec) is not None:
        cluster = load_cluster(spec)
    else:
        specs = [spec] if isinstance(spec, str) else list(spec)
        return Cluster.from_devices(resolve_devices(specs, max_memory))
    if max_memory:
        raise DeviceError(f"max_memory applies to device lists, not to cluster {cluster.name!r}; edit its profile")
    return cluster
