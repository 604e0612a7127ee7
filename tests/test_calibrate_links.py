"""Link calibration: the fit on synthetic timings, the cluster profile it writes, and one tiny gloo measurement."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from partitioner.calibrate_links import (
    LinkFit,
    LinkTimings,
    fit_link,
    gloo_cluster_document,
    measure_gloo,
    ring_hop,
    write_cluster_document,
)
from partitioner.cli import main
from partitioner.cluster import cluster_from_dict, load_cluster
from partitioner.cost_model import ring_allreduce_s
from partitioner.errors import DeviceError, ProfileError

SIZES = tuple(4 << (10 + 2 * k) for k in range(8))  # 4 KiB ... 64 MiB


@pytest.mark.parametrize("latency, bandwidth", [(30e-6, 2e9), (2e-3, 5e8), (5e-6, 2e10)])
def test_the_fit_recovers_a_known_latency_and_bandwidth(latency: float, bandwidth: float) -> None:
    seconds = [latency + n / bandwidth for n in SIZES]
    fit = fit_link(SIZES, seconds)
    assert fit.latency_s == pytest.approx(latency, rel=0.01)
    assert 1 / fit.seconds_per_byte == pytest.approx(bandwidth, rel=0.01)


def test_the_fit_holds_under_noise_that_is_the_same_in_both_directions() -> None:
    rng = np.random.default_rng(0)
    noise = np.exp(rng.normal(0.0, 0.1, len(SIZES)))  # +-10% by ratio
    fit = fit_link(SIZES, [(100e-6 + n / 1e9) * k for n, k in zip(SIZES, noise, strict=True)])
    assert fit.latency_s == pytest.approx(100e-6, rel=0.2)
    assert 1 / fit.seconds_per_byte == pytest.approx(1e9, rel=0.2)


def test_the_fit_minimises_squared_log_ratios_where_no_line_fits() -> None:
    # Mid-size messages that wait 2 ms for a core (gloo on a loaded 2-core machine): no
    # line fits; the fit is the one whose ratios predicted / measured are least off in log.
    seconds = np.array([112e-6, 116e-6, 1.9e-3, 2.0e-3, 2.0e-3, 4.0e-3, 20.9e-3, 72.9e-3])
    n = np.array(SIZES, dtype=float)

    def loss(latency: float, spb: float) -> float:
        return float((np.log((latency + n * spb) / seconds) ** 2).sum())

    fit = fit_link(SIZES, seconds.tolist())
    best = loss(fit.latency_s, fit.seconds_per_byte)
    for a in (0.9, 0.99, 1.0, 1.01, 1.1):
        for b in (0.9, 0.99, 1.0, 1.01, 1.1):
            assert best <= loss(fit.latency_s * a, fit.seconds_per_byte * b) + 1e-9
    assert best < loss(108.5e-6, 1 / 0.8558e9)  # what least squares on relative errors gave


@pytest.mark.parametrize(
    "sizes, seconds, message",
    [
        ((4096,), (1e-4,), "two distinct sizes"),
        ((4096, 4096), (1e-4, 2e-4), "two distinct sizes"),
        ((4096, 8192), (1e-4,), "two distinct sizes"),
        ((4096, 8192), (1e-4, 0.0), "above 0"),
        ((4096, 8192), (1e-4, math.nan), "above 0"),
    ],
)
def test_the_fit_refuses_what_it_cannot_fit(sizes: tuple[int, ...], seconds: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_link(sizes, seconds)


@pytest.mark.parametrize("processes", [2, 3, 4, 8])
def test_a_ring_hop_gives_back_the_measured_all_reduce(processes: int) -> None:
    measured = LinkFit(latency_s=400e-6, seconds_per_byte=1e-9)
    hop = ring_hop(measured, processes)
    for n in (4096, 1 << 20, 64 << 20):
        priced = ring_allreduce_s(n, [(hop.seconds_per_byte, hop.latency_s)] * processes)
        assert priced == pytest.approx(measured.seconds(n))


def test_a_ring_needs_two_processes() -> None:
    with pytest.raises(ValueError, match="two processes"):
        ring_hop(LinkFit(latency_s=1e-4, seconds_per_byte=1e-9), 1)


def _timings(processes: int, sharing: tuple[tuple[int, float], ...] = ()) -> LinkTimings:
    """Exact timings of a 50 us + 1 GB/s send and a 300 us + 0.5 GB/s all-reduce."""
    send = tuple(50e-6 + n / 1e9 for n in SIZES)
    allreduce = tuple(300e-6 + n / 5e8 for n in SIZES)
    return LinkTimings(processes=processes, sizes=SIZES, send_median_s=send, send_mean_s=send,
                       allreduce_median_s=allreduce, allreduce_mean_s=allreduce, repeats=(5,) * len(SIZES), seconds=1.0,
                       sharing=sharing)


def test_measured_compute_sharing_reaches_the_cluster_and_its_slowdown() -> None:
    document = gloo_cluster_document(_timings(4, ((2, 1.25), (3, 1.75), (4, 2.5))), "gloo-4")
    assert document["nodes"][0]["compute_sharing"] == [[2, 1.25], [3, 1.75], [4, 2.5]]
    cluster = cluster_from_dict(document)
    assert "4 processes 2.5x slower each" in " ".join(cluster.links) and "2 processes 1.25x" in cluster.source
    assert [cluster.slowdown(0, k) for k in (1, 2, 3, 4)] == [1.0, 1.25, 1.75, 2.5]
    # Timings from before sharing was measured write no key, and the devices compute alone.
    older = cluster_from_dict(gloo_cluster_document(_timings(4), "gloo-4"))
    assert "compute_sharing" not in gloo_cluster_document(_timings(4), "gloo-4")["nodes"][0]
    assert older.compute_sharing == () and older.slowdown(0, 4) == 1.0


def test_the_profile_round_trips_and_loads_as_a_cluster(tmp_path: Path) -> None:
    document = gloo_cluster_document(_timings(4), "gloo-4", date="2026-12-07")
    path = tmp_path / "gloo-4.json"
    written = write_cluster_document(document, path)
    assert json.loads(path.read_text()) == document
    cluster = load_cluster(path)
    assert cluster == written
    assert cluster.num_devices == 4 and cluster.kinds == ("cpu",)
    assert "2026-12-07" in cluster.source and "torch" in cluster.source
    assert cluster.transfer_s(1 << 20, 0, 3) == pytest.approx(50e-6 + (1 << 20) / 1e9, rel=0.01)
    hops = [cluster.allreduce_hop(k, (k + 1) % 4) for k in range(4)]
    assert ring_allreduce_s(1 << 24, hops) == pytest.approx(300e-6 + (1 << 24) / 5e8, rel=0.01)


def test_the_profile_prices_the_means_a_step_pays_not_the_medians() -> None:
    # A shared machine's tail: the medians of the same timings are half the means. A step
    # pays the sum of its messages, tails and all; the link is fitted to the means.
    exact = _timings(2)
    tailless = replace(exact, send_median_s=tuple(t / 2 for t in exact.send_mean_s),
                       allreduce_median_s=tuple(t / 2 for t in exact.allreduce_mean_s))
    cluster = cluster_from_dict(gloo_cluster_document(tailless, "gloo-2"))
    assert cluster.transfer_s(1 << 20, 0, 1) == pytest.approx(50e-6 + (1 << 20) / 1e9, rel=0.01)
    assert ring_allreduce_s(1 << 24, [cluster.allreduce_hop(0, 1), cluster.allreduce_hop(1, 0)]) == pytest.approx(
        300e-6 + (1 << 24) / 5e8, rel=0.01)
    assert "Means of" in cluster.source


def test_a_broken_document_is_not_written(tmp_path: Path) -> None:
    document = gloo_cluster_document(_timings(2), "gloo-2")
    document["nodes"][0]["links"][0]["allreduce"]["latency_s"] = -1.0
    with pytest.raises(ProfileError, match="allreduce.latency_s"):
        write_cluster_document(document, tmp_path / "gloo-2.json")
    assert not (tmp_path / "gloo-2.json").exists()


@pytest.mark.parametrize("processes, sizes", [(1, (4096, 8192)), (65, (4096, 8192)), (2, (4096,)), (2, (2, 4096))])
def test_a_measurement_that_cannot_be_made_is_refused_before_starting(processes: int, sizes: tuple[int, ...]) -> None:
    with pytest.raises(DeviceError):
        measure_gloo(processes, sizes)


def test_times_that_do_not_grow_with_size_fit_a_bandwidth_a_profile_may_carry() -> None:
    # Regression: on a loaded machine 64 KiB came back no slower than 4 KiB; the fitted slope
    # went to 0 and the written profile held 1.7e25 B/s, which loading refused.
    fit = fit_link([4096, 65536], [2e-3, 1.9e-3])
    assert 1 / fit.seconds_per_byte <= 1e15 and 0 < fit.latency_s <= 1.0


def test_two_processes_measure_a_valid_profile(tmp_path: Path) -> None:
    lines: list[str] = []
    timings = measure_gloo(2, (4 << 10, 64 << 10), repeat_scale=0.05, progress=lines.append)
    assert timings.processes == 2 and len(timings.send_median_s) == len(timings.allreduce_median_s) == 2
    assert all(t > 0 for t in (*timings.send_median_s, *timings.allreduce_median_s))
    assert [k for k, _ in timings.sharing] == [2] and timings.sharing[0][1] >= 1.0
    cluster = write_cluster_document(gloo_cluster_document(timings, "gloo-2"), tmp_path / "gloo-2.json")
    assert load_cluster(tmp_path / "gloo-2.json") == cluster and cluster.num_devices == 2
    assert cluster.transfer_s(4096, 0, 1) > 0 and lines


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--links", "gloo", "--processes", "1"], "--processes 1"),
        (["--device", "cpu", "--processes", "2"], "--processes counts the processes of --links gloo"),
        (["--links", "gloo", "--out", "gloo.txt"], "a profile is a .json file"),
    ],
)
def test_the_cli_refuses_a_bad_links_request_before_measuring(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profile", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_writes_a_cluster_profile_that_plans_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import partitioner.calibrate_links as calibrate_links

    asked: list[int] = []

    def measured(processes: int, sizes: tuple[int, ...], **_: object) -> LinkTimings:
        asked.append(processes)
        return _timings(processes)

    monkeypatch.setattr(calibrate_links, "measure_gloo", measured)
    out = tmp_path / "local.json"
    assert main(["profile", "--links", "gloo", "--processes", "3", "--out", str(out)]) == 0
    assert asked == [3] and "local: 3 devices" in capsys.readouterr().out
    cluster = load_cluster(out)
    assert cluster.name == "local" and cluster.transfer_s(1 << 20, 0, 2) == pytest.approx(50e-6 + (1 << 20) / 1e9, rel=0.01)
