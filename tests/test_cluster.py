"""Cluster profiles: the shipped ones, their link tables, strict validation, and device lists as clusters."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from partitioner.cluster import Cluster, available_clusters, cluster_from_dict, load_cluster, resolve_cluster
from partitioner.devices import link_cost, resolve_devices
from partitioner.errors import DeviceError, ProfileError

SHIPPED = {
    # name: (devices, nodes, {profile: count})
    "dgx-a100-8": (8, 1, {"a100-80gb": 8}),
    "mixed-8": (8, 1, {"a100-40gb": 4, "v100": 4}),
    "a100-2x4-ib": (8, 2, {"a100-80gb": 8}),
    "a100-4x8-ib": (32, 4, {"a100-80gb": 32}),
    "h100-8x8-ib": (64, 8, {"h100-80gb": 64}),
}


def _spb(bandwidth: float, efficiency: float) -> float:
    return 1 / (bandwidth * efficiency)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_clusters_load(name: str) -> None:
    cluster = load_cluster(name)
    devices, nodes, kinds = SHIPPED[name]
    assert (cluster.name, cluster.num_devices, len(cluster.node_names)) == (name, devices, nodes)
    counts: dict[str, int] = {}
    for d in cluster.devices:
        counts[d.profile.name] = counts.get(d.profile.name, 0) + 1
        assert not d.present and d.memory_bytes == d.profile.memory_bytes
    assert counts == kinds
    assert all(cluster.seconds_per_byte[d][d] == cluster.latency_s[d][d] == 0 for d in range(devices))
    assert cluster.source and cluster.links and str(cluster).startswith(f"{name}: {devices} devices")
    assert name in available_clusters()


def test_links_inside_a_node_and_between_nodes() -> None:
    h100 = load_cluster("h100-8x8-ib")
    assert h100.devices[9].name == "dgx1/1" and h100.node_of[9] == 1
    assert h100.seconds_per_byte[0][7] == _spb(4.5e11, 0.85)  # NVLink 4 inside dgx0
    assert h100.seconds_per_byte[0][8] == _spb(5e10, 0.85)  # 400 Gb/s InfiniBand to dgx1
    assert (h100.latency_s[0][7], h100.latency_s[0][8]) == (5e-6, 1e-5)
    mixed = load_cluster("mixed-8")
    a100, v100 = [d for d in range(8) if mixed.devices[d].profile.name == "a100-40gb"], list(range(4, 8))
    assert a100 == [0, 1, 2, 3]
    assert mixed.seconds_per_byte[0][1] == _spb(3e11, 0.85)  # NVLink 3 between the A100s
    assert mixed.seconds_per_byte[4][5] == _spb(1.5e11, 0.85)  # NVLink 2 between the V100s
    assert mixed.seconds_per_byte[0][4] == mixed.seconds_per_byte[v100[0]][a100[0]] == _spb(1.6e10, 0.8)  # PCIe
    assert mixed.transfer_s(1e9, 0, 4) == 1e9 * _spb(1.6e10, 0.8) + 1e-5
    assert mixed.transfer_s(1e9, 3, 3) == 0


def test_a_device_list_is_a_one_node_cluster_with_the_profiles_links() -> None:
    devices = resolve_devices(["a100-80gb x2", "v100"])
    cluster = resolve_cluster(["a100-80gb x2", "v100"])
    assert cluster == Cluster.from_devices(devices)
    assert cluster.node_of == (0, 0, 0) and cluster.kinds == ("a100-80gb", "v100")
    for a in range(3):
        for b in range(3):
            assert (cluster.seconds_per_byte[a][b], cluster.latency_s[a][b]) == link_cost(devices[a], devices[b])


def test_resolve_cluster_takes_names_clusters_and_device_strings() -> None:
    dgx = load_cluster("dgx-a100-8")
    assert resolve_cluster(dgx) is dgx
    assert resolve_cluster("dgx-a100-8") == dgx
    capped = resolve_cluster("a100-80gb x2", {"a100-80gb": "10GB"})
    assert [d.memory_bytes for d in capped.devices] == [10**10, 10**10]
    with pytest.raises(DeviceError, match="max_memory applies to device lists"):
        resolve_cluster("dgx-a100-8", {"a100-80gb": "10GB"})
    with pytest.raises(DeviceError, match="unknown device 'dgx-z100'"):
        resolve_cluster("dgx-z100")


# --------------------------------------------------------------------------- validation

TWO_NODES: dict[str, Any] = {
    "name": "pair",
    "description": "two nodes of two kinds",
    "nodes": [
        {
            "name": "n",
            "count": 2,
            "devices": [{"profile": "a100-40gb", "count": 2}, {"profile": "v100", "count": 1}],
            "links": [
                {"between": ["a100-40gb", "a100-40gb"], "interface": "nvlink", "generation": 3,
                 "bandwidth_Bps": 3e11, "latency_s": 5e-6, "efficiency": 0.85},
                {"between": ["v100", "a100-40gb"], "interface": "pcie", "generation": 3,
                 "bandwidth_Bps": 1.6e10, "latency_s": 1e-5, "efficiency": 0.8},
            ],
        }
    ],
    "network": {"interface": "ethernet", "generation": None, "bandwidth_Bps": 1.25e10, "latency_s": 2e-5,
                "efficiency": 0.7},
    "source": "a test",
}


def test_a_hand_written_cluster_builds() -> None:
    cluster = cluster_from_dict(TWO_NODES)
    assert [d.name for d in cluster.devices] == ["n0/0", "n0/1", "n0/2", "n1/0", "n1/1", "n1/2"]
    assert cluster.node_of == (0, 0, 0, 1, 1, 1)
    assert cluster.seconds_per_byte[2][0] == _spb(1.6e10, 0.8)  # a V100 needs no link to another V100
    assert cluster.seconds_per_byte[0][3] == _spb(1.25e10, 0.7)


def test_a_link_may_price_an_all_reduce_hop_apart_from_a_send() -> None:
    plain = cluster_from_dict(TWO_NODES)
    assert plain.allreduce_seconds_per_byte is None and plain.allreduce_latency_s is None
    assert plain.allreduce_hop(0, 3) == (plain.seconds_per_byte[0][3], plain.latency_s[0][3])
    data = copy.deepcopy(TWO_NODES)
    data["nodes"][0]["links"][0]["allreduce"] = {"bandwidth_Bps": 1e9, "latency_s": 2e-4}
    measured = cluster_from_dict(data)
    assert measured.seconds_per_byte == plain.seconds_per_byte and measured.latency_s == plain.latency_s
    assert measured.allreduce_hop(0, 1) == (1e-9, 2e-4)  # the two A100s of a node: the measured hop
    assert measured.allreduce_hop(0, 2) == (plain.seconds_per_byte[0][2], plain.latency_s[0][2])  # others: a send
    assert measured.allreduce_hop(1, 1) == (0.0, 0.0)


def test_a_node_may_say_how_much_slower_its_devices_compute_together() -> None:
    # Three devices per node: 2 at once 1.5x slower each, 3 at once 3x; between the points and
    # from (1, 1.0) linearly; a node without the key (or one process) computes alone.
    data = _edit(("nodes", 0, "compute_sharing"), [[2, 1.5], [3, 3]])
    cluster = cluster_from_dict(data)
    assert cluster.compute_sharing == (((2, 1.5), (3, 3.0)), ((2, 1.5), (3, 3.0)))
    assert [cluster.slowdown(1, k) for k in (1, 2, 3)] == [1.0, 1.5, 3.0]
    assert any("3 processes 3x slower each" in line for line in cluster.links)
    sparse = cluster_from_dict(_edit(("nodes", 0, "compute_sharing"), [[3, 3.0]]))
    assert sparse.slowdown(0, 2) == pytest.approx(2.0)
    plain = cluster_from_dict(TWO_NODES)
    assert plain.compute_sharing == () and plain.slowdown(0, 3) == 1.0


def _edit(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(TWO_NODES)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()
_LINKS = ("nodes", 0, "links")
HOSTILE = {
    "unknown key": (_edit(("nodes", 0, "gpus"), 8), "unknown key 'nodes[0].gpus'"),
    "missing key": (_edit(("network",), _DELETE), "missing key 'network'"),
    "no nodes": (_edit(("nodes",), []), "non-empty list of node types"),
    "zero count": (_edit(("nodes", 0, "count"), 0), "'nodes[0].count' must be an integer in [1,"),
    "bool count": (_edit(("nodes", 0, "devices", 0, "count"), True), "must be an integer"),
    "unknown profile": (_edit(("nodes", 0, "devices", 1, "profile"), "v200"), "names device profile 'v200'"),
    "a kind twice": (_edit(("nodes", 0, "devices", 1, "profile"), "a100-40gb"), "lists device profile 'a100-40gb' twice"),
    "missing link": (_edit(_LINKS, TWO_NODES["nodes"][0]["links"][:1]), "no link between a100-40gb and v100"),
    "two links": (_edit(_LINKS, TWO_NODES["nodes"][0]["links"] * 2), "two links between a100-40gb and a100-40gb"),
    "link to a stranger": (_edit((*_LINKS, 1, "between"), ["a100-40gb", "h100-80gb"]), "must name two device profiles"),
    "negative bandwidth": (_edit((*_LINKS, 0, "bandwidth_Bps"), -1), "bandwidth_Bps"),
    "efficiency above 1": (_edit(("network", "efficiency"), 1.5), "efficiency"),
    "no network": (_edit(("network",), None), "the cluster has 2 nodes"),
    "string for link": (_edit(("network",), "ib"), "must be a JSON object"),
    "empty name": (_edit(("name",), " "), "key 'name' must be a non-empty string"),
    # Lists in "between" were a TypeError (unhashable), tiny figures a ZeroDivisionError.
    "lists in between": (_edit((*_LINKS, 1, "between"), [["x"], ["y"]]), "must name two device profiles"),
    "unknown all-reduce key": (
        _edit((*_LINKS, 0, "allreduce"), {"bandwidth_Bps": 1e9, "latency_s": 1e-4, "efficiency": 1}),
        "unknown key 'nodes[0].links[0].allreduce.efficiency'",
    ),
    "all-reduce without latency": (
        _edit((*_LINKS, 0, "allreduce"), {"bandwidth_Bps": 1e9}), "missing key 'nodes[0].links[0].allreduce.latency_s'"
    ),
    "all-reduce latency 0": (
        _edit(("network", "allreduce"), {"bandwidth_Bps": 1e9, "latency_s": 0}), "network.allreduce.latency_s"
    ),
    "sharing not a list": (_edit(("nodes", 0, "compute_sharing"), 2.0), "'nodes[0].compute_sharing' must be a list"),
    "sharing of one process": (_edit(("nodes", 0, "compute_sharing"), [[1, 1.0]]), "(got [1, 1.0])"),
    "sharing past the node": (_edit(("nodes", 0, "compute_sharing"), [[4, 2.0]]), "in [2, 3] (the node's devices)"),
    "sharing faster": (_edit(("nodes", 0, "compute_sharing"), [[2, 0.5]]), "slowdown in [1, 64]"),
    "sharing not increasing": (_edit(("nodes", 0, "compute_sharing"), [[3, 2.0], [2, 1.5]]), "(got [2, 1.5])"),
    "sharing count a bool": (_edit(("nodes", 0, "compute_sharing"), [[True, 1.5]]), "(got [True, 1.5])"),
    "underflowing link": (
        _edit(("network",), dict(TWO_NODES["network"], bandwidth_Bps=1e-200, efficiency=1e-200)),
        "key 'network.bandwidth_Bps' must be finite and in [1e+06, 1e+15] (got 1e-200)",
    ),
}


@pytest.mark.parametrize("data, message", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_bad_cluster_is_refused_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=re.escape(message)):
        cluster_from_dict(data, "pair.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"name": "a", "name": "b"}', "key 'name' appears 2 times"),
        ('{"name": NaN}', "NaN is not a number"),
        ("{", "not valid JSON"),
    ],
)
def test_a_bad_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        load_cluster(path)


def test_special_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    """/dev/zero never ends and a FIFO blocks until written: neither may be read."""
    paths = [tmp_path]
    if Path("/dev/zero").exists():
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        paths.append(tmp_path / "zero.json")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.json")
        paths.append(tmp_path / "fifo.json")
    for path in paths:
        with pytest.raises(ProfileError, match=re.escape(f"{path}: is a ") + ".* not a regular file"):
            load_cluster(path)


def test_a_device_list_of_1024_devices_is_one_cluster() -> None:
    cluster = resolve_cluster(["a100-80gb x1000", "v100 x24"])
    devices = cluster.devices
    assert cluster.num_devices == 1024 and cluster.kinds == ("a100-80gb", "v100")
    for a, b in [(0, 1), (999, 0), (0, 1000), (1023, 5), (1000, 1001), (7, 7)]:
        assert (cluster.seconds_per_byte[a][b], cluster.latency_s[a][b]) == link_cost(devices[a], devices[b])


def test_a_cluster_file_found_by_name_must_carry_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / "mine.json").write_text(json.dumps(TWO_NODES))
    monkeypatch.setenv("PARTITIONER_PROFILE_PATH", str(tmp_path))
    assert "mine" in available_clusters()
    with pytest.raises(ProfileError, match="key 'name' is 'pair' but the file is mine.json"):
        load_cluster("mine")
    (tmp_path / "clusters" / "pair.json").write_text(json.dumps(TWO_NODES))
    assert load_cluster("pair").num_devices == 6
    with pytest.raises(ProfileError, match="no cluster profile named 'nowhere'"):
        load_cluster("nowhere")


def test_a_cluster_of_3072_gpus_builds_with_its_links() -> None:
    """Megatron-LM's largest run (384 DGX A100 nodes): clusters may hold more devices than a
    device list, and the link tables still say NVLink inside a node, the network between."""
    data = json.loads(_cluster_file("a100-4x8-ib").read_text())
    data["nodes"][0]["count"] = 384
    cluster = cluster_from_dict(data)
    assert cluster.num_devices == 3072 and len(cluster.node_names) == 384
    small = load_cluster("a100-4x8-ib")
    inside, between = small.seconds_per_byte[0][1], small.seconds_per_byte[0][8]
    assert cluster.seconds_per_byte[3064][3071] == inside and cluster.seconds_per_byte[5][3071] == between
    assert cluster.seconds_per_byte[3071][3071] == 0.0 and cluster.latency_s[17][16] == small.latency_s[1][0]
    data["nodes"][0]["count"] = 513
    with pytest.raises(ProfileError, match="more than 4096 devices"):
        cluster_from_dict(data)


def _cluster_file(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "profiles" / "clusters" / f"{name}.json"
