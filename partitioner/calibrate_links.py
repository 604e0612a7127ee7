"""Link calibration: measure gloo between local processes into a cluster profile.

``partitioner profile --links gloo --processes N`` starts N processes on this machine
(`torch.multiprocessing.spawn`, one torch thread each, a gloo process group over the
loopback) and times, for each message size (4 KiB to 64 MiB by default):

- **send/recv**: processes ``2k`` and ``2k+1`` ping-pong a tensor, every pair at once (as
  the stage boundaries of a pipeline do); a one-way time is half a round trip;
- **all-reduce**: a sum over all N processes, from a barrier; a timing is the slowest
  process's.

- **compute sharing**: a one-thread 256 x 256 matmul loop in process 0 alone, then in
  processes ``0 .. k-1`` at once for ``k = 2 .. N``; how much slower the slowest of them
  runs than process 0 alone is the node's ``compute_sharing`` at ``k`` processes (1 with
  a core each; 2 when two take turns on one), what `partitioner.cluster.Cluster.slowdown`
  gives the training planner.

Each size's figure is the **mean** of its timings. A shared machine gives heavy tails (a
process waiting for a core: on 2 cores, 2 processes' 4 KiB all-reduce had a median of
0.65 ms and a mean of 1.6 ms), and a training step pays the sum of its messages, tails
and all: the sum's expectation is the sum of the means, which medians underprice (the
medians were recorded too). `fit_link` fits ``time = latency + bytes x seconds_per_byte``
to the means by least squares on log ratios (over- and under-estimates by the same
factor cost the same), so the small sizes fix the latency and the large ones the bandwidth. A send's fit is the link; an all-reduce's fit is divided by
the ring all-reduce's factors that the planner prices it with
(`partitioner.cost_model.ring_allreduce_s`: ``2 (k-1)/k`` of the bytes and ``2 (k-1)``
latencies over k processes) to give the cost of one ring hop. Both go into a cluster
profile (`partitioner.cluster`) of one node of N ``cpu`` devices, with the date, the torch
version and the machine in its ``source``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partitioner.cluster import Cluster, cluster_from_dict
from partitioner.devices import MAX_BANDWIDTH_BPS, MAX_LATENCY_S, MIN_BANDWIDTH_BPS
from partitioner.errors import DeviceError
from partitioner.files import staged
from partitioner.progress import Progress

__all__ = [
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "LinkFit",
    "LinkTimings",
    "fit_link",
    "ring_hop",
    "compute_sharing",
    "measure_gloo",
    "gloo_cluster_document",
    "write_cluster_document",
    "timings_dict",
]

DEFAULT_SIZES: tuple[int, ...] = tuple(4 << (10 + 2 * k) for k in range(8))
"""4 KiB, 16 KiB, ..., 64 MiB: latency-bound to bandwidth-bound on a loopback."""
QUICK_SIZES: tuple[int, ...] = (4 << 10, 64 << 10, 1 << 20)
"""For tests and a first look: a few seconds with 2 processes."""
MAX_PROCESSES = 64
"""More local processes than this is a typo (the profile's node holds at most 64 devices)."""

_TRAFFIC_PER_SIZE = 64 << 20
"""Bytes each size sends in its timings: many repeats of small messages, few of large ones."""
_MIN_REPEATS, _MAX_REPEATS = 5, 50


@dataclass(frozen=True, slots=True)
class LinkFit:
    """``seconds = latency_s + bytes x seconds_per_byte``, fitted to timings by message size."""

    latency_s: float
    seconds_per_byte: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes * self.seconds_per_byte


@dataclass(frozen=True, slots=True)
class LinkTimings:
    """What `measure_gloo` measured: per message size, the median and mean seconds of each operation."""

    processes: int
    sizes: tuple[int, ...]
    send_median_s: tuple[float, ...]
    """One-way time of a send/recv (half a ping-pong round trip)."""
    send_mean_s: tuple[float, ...]
    allreduce_median_s: tuple[float, ...]
    allreduce_mean_s: tuple[float, ...]
    repeats: tuple[int, ...]
    seconds: float
    """Wall time of the whole measurement."""
    sharing: tuple[tuple[int, float], ...] = ()
    """``(k, slowdown)`` for k = 2 .. processes: a matmul loop in k processes at once against one alone."""


def fit_link(sizes: Sequence[float], seconds: Sequence[float]) -> LinkFit:
    """Least squares of ``seconds = latency + bytes x seconds_per_byte`` on log ratios.

    Minimises ``sum(log((latency + n s) / t)^2)`` over the sizes: a prediction 2x too high
    and one 2x too low cost the same, as they do in measured / predicted, and every size
    weighs the same whatever its time (an unweighted fit lets the largest sizes set the
    latency within their noise; a fit on relative errors ``(p - t) / t`` forgives
    under-estimates, so a loopback whose mid-size messages wait for a core gets a latency
    of its smallest ones). Both figures are found on a logarithmic grid, then refined by
    damped Gauss-Newton steps on their logarithms; they stay positive, and within what a
    profile may carry (bandwidth in [1e6, 1e15] B/s, latency at most 1 s).

    Raises:
        ValueError: Fewer than two distinct sizes, lengths that differ, or a time or size <= 0.
    """
    n = np.asarray(sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if n.shape != t.shape or n.ndim != 1 or len(set(n.tolist())) < 2:
        raise ValueError(f"fit_link needs two distinct sizes or more, one time each (got {len(n)} sizes, {len(t)} times)")
    if not (np.isfinite(n).all() and np.isfinite(t).all()) or (n <= 0).any() or (t <= 0).any():
        raise ValueError("fit_link needs finite sizes and times above 0")
    # The latency lies below the smallest time, the slope below the largest time per byte.
    log_lat = (np.log10(t.min()) - 6.0, np.log10(t.min()))
    log_spb = (np.log10((t / n).min()) - 6.0, np.log10((t / n).max()))
    log_t = np.log(t)
    for _ in range(2):
        lat = np.logspace(*log_lat, 241)[:, None, None]
        spb = np.logspace(*log_spb, 241)[None, :, None]
        loss = ((np.log(lat + n * spb) - log_t) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(loss)), loss.shape)
        step_lat = (log_lat[1] - log_lat[0]) / 240
        step_spb = (log_spb[1] - log_spb[0]) / 240
        best = np.log10(lat[i, 0, 0]), np.log10(spb[0, j, 0])
        log_lat = (best[0] - 2 * step_lat, best[0] + 2 * step_lat)
        log_spb = (best[1] - 2 * step_spb, best[1] + 2 * step_spb)
    # Then Gauss-Newton steps in (ln latency, ln slope), damped (Levenberg) so none goes uphill.
    u = np.array(best) * np.log(10)
    damping = 1e-3

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(np.exp(p[0]) + n * np.exp(p[1])) - log_t

    for _ in range(100):
        a, b = np.exp(u[0]), n * np.exp(u[1])
        r = residuals(u)
        jac = np.stack([a / (a + b), b / (a + b)], axis=1)
        step = np.linalg.solve(jac.T @ jac + damping * np.eye(2), -jac.T @ r)
        if (residuals(u + step) ** 2).sum() < (r**2).sum():
            u, damping = u + step, damping / 10
        else:
            damping *= 10
        if np.abs(step).max() < 1e-10 or damping > 1e10:
            break
    # Noise can make larger messages no slower than small ones (a slope of 0: an infinite
    # bandwidth): the figures are held to what a profile may carry.
    latency = min(float(np.exp(u[0])), MAX_LATENCY_S)
    per_byte = min(max(float(np.exp(u[1])), 1 / MAX_BANDWIDTH_BPS), 1 / MIN_BANDWIDTH_BPS)
    return LinkFit(latency_s=latency, seconds_per_byte=per_byte)


def ring_hop(allreduce: LinkFit, processes: int) -> LinkFit:
    """One hop of the ring all-reduce that costs `allreduce` over `processes` processes.

    The planner prices an all-reduce of ``n`` bytes over ``k`` devices as
    ``2 (k-1)/k x n x s + 2 (k-1) x latency`` of a hop (`partitioner.cost_model.ring_allreduce_s`);
    this inverts it, so that the planner gives back the measured time at ``k = processes``.

    Raises:
        ValueError: Fewer than two processes.
    """
    k = processes
    if k < 2:
        raise ValueError(f"an all-reduce needs two processes or more (got {k})")
    return LinkFit(
        latency_s=allreduce.latency_s / (2 * (k - 1)),
        seconds_per_byte=allreduce.seconds_per_byte * k / (2 * (k - 1)),
    )


# --------------------------------------------------------------------------- measuring


def _repeats(nbytes: int, scale: float) -> int:
    return max(_MIN_REPEATS, min(_MAX_REPEATS, int(scale * _TRAFFIC_PER_SIZE / nbytes)))


_SHARING_LOOP_S = 0.3
"""Seconds of each matmul loop of the sharing measurement (about ``0.3 x processes`` in all)."""


def _matmul_loop(seconds: float) -> float:
    """Seconds per one-thread 256 x 256 matmul, over about `seconds` of them (after one)."""
    a = torch.randn(256, 256)
    a @ a
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return (time.perf_counter() - start) / n


def compute_sharing(rank: int, world: int, seconds: float = _SHARING_LOOP_S) -> list[tuple[int, float]]:
    """(k, slowdown) for k = 2 .. world: processes 0 .. k-1 run `_matmul_loop` for about
    `seconds` at once, the slowest against process 0 alone. Call it on every process of
    the default process group (each gets the same list)."""
    import torch.distributed as dist

    def loop(k: int) -> float:
        dist.barrier()
        took = torch.tensor([_matmul_loop(seconds) if rank < k else 0.0])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return float(took.item())

    alone = loop(1)
    return [(k, max(1.0, loop(k) / alone)) for k in range(2, world + 1)]


def _worker(rank: int, world: int, port: int, sizes: tuple[int, ...], scale: float, out: str) -> None:
    """One process of `measure_gloo`: times every size, process 0 writes the medians and means to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        peer = rank ^ 1 if (rank ^ 1) < world else None
        record: dict[str, list[Any]] = {k: [] for k in ("send_median", "send_mean", "ar_median", "ar_mean", "repeats")}
        for nbytes in sizes:
            t = torch.ones(max(1, nbytes // 4))
            repeats = _repeats(nbytes, scale)

            def exchange() -> None:
                if peer is None:
                    return
                if rank % 2 == 0:
                    dist.send(t, peer)
                    dist.recv(t, peer)
                else:
                    dist.recv(t, peer)
                    dist.send(t, peer)

            sends, reduces = torch.zeros(repeats, dtype=torch.float64), torch.zeros(repeats, dtype=torch.float64)
            dist.barrier()
            exchange()  # warm-up: buffers and connections
            for k in range(repeats):
                start = time.perf_counter()
                exchange()
                sends[k] = (time.perf_counter() - start) / 2
            dist.all_reduce(t)  # warm-up
            for k in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(t)
                reduces[k] = time.perf_counter() - start
            dist.all_reduce(sends, op=dist.ReduceOp.MAX)  # the slowest pair, the slowest process
            dist.all_reduce(reduces, op=dist.ReduceOp.MAX)
            record["send_median"].append(statistics.median(sends.tolist()))
            record["send_mean"].append(statistics.fmean(sends.tolist()))
            record["ar_median"].append(statistics.median(reduces.tolist()))
            record["ar_mean"].append(statistics.fmean(reduces.tolist()))
            record["repeats"].append(repeats)
        record["sharing"] = compute_sharing(rank, world, _SHARING_LOOP_S)
        if rank == 0:
            Path(out).write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_gloo(
    processes: int,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    repeat_scale: float = 1.0,
    progress: Progress | None = None,
) -> LinkTimings:
    """Time gloo send/recv and all-reduce between `processes` local processes, by message size.

    Args:
        processes: How many processes (2 or more); pairs ``(0, 1), (2, 3), ...`` exchange at once.
        sizes: Message sizes in bytes (at least two distinct ones for a fit).
        repeat_scale: Scales the number of timings per size (each size sends about
            ``64 MiB x repeat_scale`` in 5-50 timings).
        progress: Called with a line before the processes start and when they are done.

    Raises:
        DeviceError: Fewer than two processes or more than 64, fewer than two distinct
            sizes, or a size below 4 bytes.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or not 2 <= processes <= MAX_PROCESSES:
        raise DeviceError(
            f"--processes must be a whole number in [2, {MAX_PROCESSES}] (got {processes!r}): "
            "a link joins two processes"
        )
    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if len(sizes) < 2 or sizes[0] < 4:
        raise DeviceError(f"measure at least two message sizes of 4 bytes or more (got {list(sizes)})")
    say = progress or (lambda _: None)
    import torch.multiprocessing as mp

    say(f"gloo: {processes} processes, {len(sizes)} sizes from {_size(sizes[0])} to {_size(sizes[-1])}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="partitioner-links-") as folder:
        out = os.path.join(folder, "timings.json")
        mp.spawn(_worker, args=(processes, _free_port(), sizes, repeat_scale, out), nprocs=processes, join=True)
        record = json.loads(Path(out).read_text())
    seconds = time.perf_counter() - start
    say(f"gloo: measured in {seconds:.1f} s")
    return LinkTimings(
        processes=processes,
        sizes=sizes,
        send_median_s=tuple(record["send_median"]),
        send_mean_s=tuple(record["send_mean"]),
        allreduce_median_s=tuple(record["ar_median"]),
        allreduce_mean_s=tuple(record["ar_mean"]),
        repeats=tuple(record["repeats"]),
        seconds=seconds,
        sharing=tuple((int(k), float(x)) for k, x in record["sharing"]),
    )


# --------------------------------------------------------------------------- the profile


def _size(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.4g} us"


def _machine() -> str:
    from partitioner.calibrate import _cpu_model_name

    return f"{_cpu_model_name()}, {os.cpu_count()} logical CPUs"


def _sig(x: float) -> float:
    """Four significant digits: timing noise is larger than the rest."""
    return float(f"{x:.4g}")


def gloo_cluster_document(timings: LinkTimings, name: str, *, date: str | None = None) -> dict[str, Any]:
    """The cluster profile (parsed JSON, as `partitioner.cluster.cluster_from_dict` reads it) of `timings`.

    One node ``local`` of ``timings.processes`` devices of the ``cpu`` profile (the name
    under which layers timed on this CPU are stored), joined by a ``gloo`` link: the
    send/recv fit, and its ``allreduce`` hop from the all-reduce fit (`ring_hop`); and
    the measured ``compute_sharing`` (timings without it, from before it was measured,
    leave it out).
    """
    send = fit_link(timings.sizes, timings.send_mean_s)
    hop = ring_hop(fit_link(timings.sizes, timings.allreduce_mean_s), timings.processes)
    k = timings.processes
    means = ", ".join(
        f"{_size(n)} {_us(s)} / {_us(a)}"
        for n, s, a in zip(timings.sizes, timings.send_mean_s, timings.allreduce_mean_s, strict=True)
    )
    source = (
        f"partitioner profile --links gloo --processes {k} on {date or time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}, {_machine()}; {k} processes of one torch thread, gloo over the loopback. "
        f"Means of {min(timings.repeats)}-{max(timings.repeats)} timings per size "
        f"(one-way send/recv, pairs exchanging at once / all-reduce over all {k}): {means}. "
        f"Least squares on log ratios: send {_us(send.latency_s)} + bytes / {1e-9 / send.seconds_per_byte:.4g} GB/s; "
        f"all-reduce divided by the ring's 2(k-1)/k bytes and 2(k-1) latencies (k = {k}) per hop: "
        f"{_us(hop.latency_s)} + bytes / {1e-9 / hop.seconds_per_byte:.4g} GB/s."
    )
    link = {
        "between": ["cpu", "cpu"],
        "interface": "gloo",
        "generation": None,
        "bandwidth_Bps": _sig(1.0 / send.seconds_per_byte),
        "latency_s": _sig(send.latency_s),
        "efficiency": 1.0,
        "allreduce": {"bandwidth_Bps": _sig(1.0 / hop.seconds_per_byte), "latency_s": _sig(hop.latency_s)},
    }
    node: dict[str, Any] = {"name": "local", "count": 1, "devices": [{"profile": "cpu", "count": k}], "links": [link]}
    if timings.sharing:
        node["compute_sharing"] = [[n, _sig(x)] for n, x in timings.sharing]
        source += (
            " Compute sharing: a one-thread 256 x 256 matmul loop in k processes at once against one alone: "
            + ", ".join(f"{n} processes {x:.3g}x" for n, x in timings.sharing)
            + "."
        )
    return {
        "name": name,
        "description": f"{k} processes on this machine joined by gloo (measured): devices of the cpu profile",
        "nodes": [node],
        "network": None,
        "source": source,
    }


def write_cluster_document(document: dict[str, Any], path: str | os.PathLike[str]) -> Cluster:
    """Check `document` as a cluster profile and write it to `path` (whole or not at all).

    Raises:
        ProfileError: The document breaks the cluster schema (nothing written).
    """
    cluster = cluster_from_dict(document, str(path))
    with staged(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return cluster


def timings_dict(timings: LinkTimings) -> dict[str, Any]:
    """`timings` as JSON-ready data (the benchmark records it beside its results)."""
    return asdict(timings)
