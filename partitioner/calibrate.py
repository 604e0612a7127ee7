"""Calibration: measure a present device's sustained FLOP/s and bandwidths into a `DeviceProfile`.

What is measured, and how (each figure is the median of repeated timings after warm-up):

- FLOP/s per dtype: square matmuls ``C = A @ B`` of ``2 n^3`` FLOPs, ``n`` doubled until
  one call is long enough to time well (or a size cap);
- memory bandwidth: ``dst.copy_(src)`` of a buffer larger than any cache, counting the
  bytes read and written (``2 x size``);
- host link (CUDA): copies between pinned host memory and the device, each direction; the
  slower direction is kept. Latency: a 4-byte copy;
- peer link (two or more GPUs): copies from this GPU to the next one;
- launch floor (`DeviceProfile.launch_s`): back-to-back in-place adds on a one-element
  tensor, unsynchronised, so the time per call is the rate at which eager PyTorch issues
  kernels (CUDA) or dispatches ops (CPU);
- module call (`DeviceProfile.module_call_s`): the same adds called through an ``nn.Module``,
  less the bare adds: the host's cost of a module call;
- matmul efficiency by size (`DeviceProfile.gemm_efficiency`): square matmuls of a few
  sizes in the fastest measured dtype, each as a fraction of the rate at the largest size
  measured (the peak); on a CPU the dispatch floor is taken off each time first, since the
  cost model adds it back;
- matmul efficiency by a narrow side (`DeviceProfile.gemm_narrow`): matmuls of the peak's
  size with one side (m, n or k) cut to 1 .. 256 (powers of two and the halves between, up
  to 64), as fractions of the peak the same way;
- element-wise bandwidth by size (`DeviceProfile.memory_curve`): out-of-place ReLUs of
  16 KiB and up, timed as layers are (fresh inputs, outputs allocated), as fractions of the
  memory bandwidth (above 1 from caches; far below where large outputs map fresh pages);
- convolution and attention efficiency by size and the rates of batch norms, layer norms,
  pooling, activations and softmax (`DeviceProfile.conv_efficiency`,
  `DeviceProfile.attention_efficiency`, `DeviceProfile.causal_attention_efficiency`,
  `DeviceProfile.op_rates`): `partitioner.calibrate_ops`.

The figures are sustained rates, so the profile's efficiency factors are 1.0. On CPU the
measurement runs with ``threads`` torch threads (1 by default, as layer profiling does) and
restores the caller's setting afterwards.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from partitioner.calibrate_ops import (
    ATTENTION_SHAPES_NOTE,
    CONV_SHAPES_NOTE,
    attention_curves,
    conv_curve,
    fp32_precision,
    op_rates,
    without_floor,
)
from partitioner.device_detection import system_memory_bytes
from partitioner.devices import DTYPES, PROFILE_NAME_RE, DeviceProfile, Link, PeakFlops
from partitioner.dtypes import torch_dtype
from partitioner.errors import DeviceError
from partitioner.files import staged
from partitioner.measure.timing import MAX_CALLS, TIMING_S
from partitioner.progress import Progress
from partitioner.profile_files import profile_to_json

__all__ = ["measure_device", "write_profile", "default_profile_name", "check_profile_name"]




@dataclass(frozen=True, slots=True)
class _Budget:
    """How long each measurement may take, by device type and mode."""

    min_matmul: int
    """Smallest matmul side tried."""
    max_matmul: int
    """Largest matmul side tried (caps memory and time)."""
    call_s: float
    """A matmul call this long is long enough to time; stop growing n."""
    sample_s: float
    """Keep repeating a timing until this much time has passed (at least 3 repeats)."""
    batch_s: float
    """Back-to-back calls per timing last about this long (see `_median_seconds`)."""
    copy_bytes: int
    """Size of the on-device copy (larger than the last-level cache)."""
    host_bytes: int
    """Size of the host <-> device copies."""
    curve_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    """Matmul sides of the efficiency curve (those below `max_matmul`; the peak's size is added)."""


_BUDGETS = {
    # CPU: L3 caches reach 256 MiB on server parts; the full run's 512 MiB copy is past
    # them, the quick one's 64 MiB past a laptop's. Under ~1 s per dtype in quick mode.
    ("cpu", True): _Budget(256, 512, 0.02, 0.1, 0.0, 64 << 20, 0),
    ("cpu", False): _Budget(256, 2048, 0.1, 0.5, 0.0, 512 << 20, 0),
    # GPU: n = 8192 keeps an H100's bf16 tensor cores busy (~1.6 ms a call); L2 is at most
    # ~100 MiB, so 1 GiB copies measure HBM. Timings batch 5-20 ms of back-to-back calls.
    ("cuda", True): _Budget(1024, 4096, 0.001, 0.1, 0.005, 256 << 20, 64 << 20),
    ("cuda", False): _Budget(1024, 8192, 0.002, 0.5, 0.02, 1 << 30, 256 << 20),
}


def _median_seconds(fn: Callable[[], object], sync: Callable[[], None], sample_s: float, batch_s: float = 0.0) -> float:
    """Median seconds of one call of `fn`, after a warm-up call; at least three timings.

    With `batch_s` > 0, each timing runs enough calls back to back to last about that long
    and divides: a GPU kernel of microseconds is then not drowned by the cost of
    synchronising after it. With 0, every call is synchronised (a latency).

    Not `torch.utils.benchmark.Timer`: its autoranges batch calls until the clock's cost
    is under 0.01% of a timing, so a latency (each call synchronised) cannot be measured,
    and a millisecond matmul gets a few timings of 10-100 calls in `sample_s` instead of
    dozens, whose median varied more from run to run here.
    """
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    calls = max(1, min(1000, int(batch_s / max(time.perf_counter() - t0, 1e-9))))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < sample_s and len(times) < 100):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return max(statistics.median(times), 1e-9)


def _matmul_flops(dtype: str, device: torch.device, sync: Callable[[], None], budget: _Budget) -> tuple[float, int]:
    """(sustained FLOP/s, matmul side used) for square matmuls in `dtype`."""
    precision = fp32_precision(torch.backends.cuda.matmul, dtype == "tf32") if device.type == "cuda" else nullcontext()
    with precision:
        n = budget.min_matmul
        while True:
            a = torch.randn(n, n, device=device).to(torch_dtype(dtype))
            b = torch.randn(n, n, device=device).to(torch_dtype(dtype))
            matmul = partial(torch.mm, a, b)
            seconds = _median_seconds(matmul, sync, budget.call_s, budget.batch_s)
            if seconds >= budget.call_s or n >= budget.max_matmul:
                seconds = _median_seconds(matmul, sync, budget.sample_s, budget.batch_s)
                return _rounded(2 * n**3 / seconds), n
            n *= 2


def _launch_seconds(device: torch.device, sync: Callable[[], None], budget: _Budget) -> float:
    """Seconds per kernel when eager PyTorch issues one-element in-place adds back to back."""
    x = torch.zeros(1, device=device)
    calls = 200

    def burst() -> None:
        for _ in range(calls):
            x.add_(1.0)

    return min(1e-2, _rounded(_median_seconds(burst, sync, budget.sample_s) / calls))


class _AddOne(torch.nn.Module):
    """One in-place add: what a module call costs beyond its op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1.0)


def _module_call_seconds(device: torch.device, sync: Callable[[], None], budget: _Budget) -> float:
    """Host seconds an ``nn.Module`` call adds to its op: back-to-back calls of `_AddOne`
    less the same adds called bare (0 where the difference is lost in noise)."""
    x = torch.zeros(1, device=device)
    module = _AddOne()
    calls = 200

    def bare() -> None:
        for _ in range(calls):
            x.add_(1.0)

    def wrapped() -> None:
        for _ in range(calls):
            module(x)

    with torch.no_grad():
        seconds = [(_median_seconds(wrapped, sync, budget.sample_s) - _median_seconds(bare, sync, budget.sample_s))
                   / calls for _ in range(3)]
    return min(1e-2, max(0.0, _rounded(statistics.median(seconds))))


@dataclass(frozen=True, slots=True)
class _MatmulTimer:
    """Times matmuls on a device as fractions of a peak rate (the efficiency curves)."""

    dtype: str
    device: torch.device
    sync: Callable[[], None]
    budget: _Budget
    rate: float
    """The peak: FLOP/s of the largest square matmul measured."""
    launch_s: float
    """Taken off each time on a CPU (at most half of it), since the cost model adds the
    dispatch floor to a CPU's kernels; on a GPU the floor is a max, and stays in."""

    def efficiency(self, m: int, k: int, n: int) -> float:
        """Achieved fraction of the peak of ``(m x k) @ (k x n)``, in [0.001, 1]."""
        precision = fp32_precision(torch.backends.cuda.matmul, self.dtype == "tf32") if self.device.type == "cuda" else nullcontext()
        with precision:
            a = torch.randn(m, k, device=self.device).to(torch_dtype(self.dtype))
            b = torch.randn(k, n, device=self.device).to(torch_dtype(self.dtype))
            seconds = _median_seconds(partial(torch.mm, a, b), self.sync, self.budget.sample_s, self.budget.batch_s)
        seconds = without_floor(seconds, self.device, self.launch_s)
        return min(1.0, max(1e-3, round(2 * m * k * n / seconds / self.rate, 4)))


def _gemm_curve(timer: _MatmulTimer, n_peak: int) -> tuple[tuple[float, float], ...]:
    """(FLOPs, fraction of the peak) of square matmuls of the budget's curve sizes below the
    peak's size `n_peak`, and the peak's own point."""
    points = [(float(2 * n**3), timer.efficiency(n, n, n)) for n in timer.budget.curve_sizes if n < n_peak]
    return tuple(points) + ((float(2 * n_peak**3), 1.0),)


_NARROW_SIDES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
"""Sizes of the narrow side of `_narrow_curves` (those below the peak's side)."""


def _narrow_curves(timer: _MatmulTimer, s: int) -> tuple[tuple[str, float, float], ...]:
    """(axis, size, fraction of the peak) of matmuls of the peak's side `s` with one side cut
    to each of `_NARROW_SIDES` below it: ``(d x s) @ (s x s)`` (m), ``(s x s) @ (s x d)`` (n),
    ``(s x d) @ (d x s)`` (k)."""
    sides = [d for d in _NARROW_SIDES if d < s]
    return (
        tuple(("m", float(d), timer.efficiency(d, s, s)) for d in sides)
        + tuple(("n", float(d), timer.efficiency(s, s, d)) for d in sides)
        + tuple(("k", float(d), timer.efficiency(s, d, s)) for d in sides)
    )


_PASS_SIZES = tuple(16 << (10 + 2 * i) for i in range(12))
"""Input sizes of `_memory_curve`'s element-wise op: 16 KiB, 64 KiB, ... (those up to the copy's)."""
_PASS_TRIALS = 3
"""Trials of each size `_memory_curve` takes the median of."""


def _memory_curve(
    device: torch.device, sync: Callable[[], None], budget: _Budget, bandwidth: float, launch_s: float
) -> tuple[tuple[float, float], ...]:
    """(bytes read and written, fraction of `bandwidth`) of an out-of-place ReLU by its size.

    Timed as layers are (`partitioner.measure.timing`): each timing runs as many calls as a
    warm-up timing of one call says fill `TIMING_S` (at most `MAX_CALLS`), each on a fresh
    copy of the input made before the clock starts, and allocates its output as a layer
    does: the copies' working set decides which cache serves them, as it does for a layer.
    Where that count or the allocator's state tips a size between caches and memory, one
    trial differs from the next: the median of `_PASS_TRIALS` trials, sizes in turn. On a
    CPU the dispatch floor is taken off (at most half of each time), since the cost model
    adds it.
    """
    sizes = [s for s in _PASS_SIZES if s <= budget.copy_bytes]
    trials: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(_PASS_TRIALS):
        for size in sizes:
            trials[size].append(_pass_seconds(size, device, sync, budget.sample_s / _PASS_TRIALS))
    points = []
    for size in sizes:
        seconds = without_floor(statistics.median(trials[size]), device, launch_s)
        points.append((float(2 * size), min(100.0, max(1e-3, round(2 * size / seconds / bandwidth, 4)))))
    return tuple(points)


def _pass_seconds(size: int, device: torch.device, sync: Callable[[], None], sample_s: float) -> float:
    """Median seconds of one out-of-place ReLU of `size` bytes, timed as `_memory_curve` says."""
    source = torch.ones(size // 4, device=device)

    def timed(calls: int) -> float:
        inputs = [source.clone() for _ in range(calls)]
        sync()
        t0 = time.perf_counter()
        for x in inputs:
            torch.relu(x)
        sync()
        return (time.perf_counter() - t0) / calls

    timed(1)
    calls = max(1, min(MAX_CALLS, math.ceil(TIMING_S / max(timed(1), 1e-9))))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < sample_s and len(times) < 100):
        times.append(timed(calls))
    return statistics.median(times)


def _copy_seconds(
    dst: torch.Tensor, src: torch.Tensor, sync: Callable[[], None], sample_s: float, batch_s: float = 0.0
) -> float:
    return _median_seconds(partial(dst.copy_, src, non_blocking=True), sync, sample_s, batch_s)


_Alloc = Callable[[int], torch.Tensor]


def _measured_link(
    nbytes: int, make_src: _Alloc, make_dst: _Alloc, sync: Callable[[], None], budget: _Budget
) -> tuple[float, float]:
    """(bytes per second, latency s) of copies from `make_src(n)` to `make_dst(n)`.

    The latency is a synchronised 4-byte copy: what one transfer between stages costs.
    """
    seconds = _copy_seconds(make_dst(nbytes), make_src(nbytes), sync, budget.sample_s, budget.batch_s)
    latency = _copy_seconds(make_dst(4), make_src(4), sync, budget.sample_s)
    return _rounded(nbytes / seconds), _rounded(latency)


def _rounded(x: float) -> float:
    """Four significant digits: timing noise is larger than the rest."""
    return float(f"{x:.4g}")


def default_profile_name(device: str) -> str:
    """The name a measured profile of `device` gets: its hardware's model, which no built-in
    profile has (``cpu-amd-epyc-7r13``, ``nvidia-a100-sxm4-80gb``).

    Raises:
        DeviceError: `device` is not ``cpu`` or a present CUDA device.
    """
    dev = _parse_device(device)
    if dev.type == "cuda":
        return _slug(torch.cuda.get_device_properties(dev).name)
    # "AMD EPYC 7R13 Processor", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz": the clock
    # and the trademarks add nothing to the model.
    model = re.sub(r"\((r|tm)\)|\b(cpu|processor)\b|@.*", " ", _cpu_model_name(), flags=re.IGNORECASE)
    return _slug(f"cpu {model}")


def _slug(text: str) -> str:
    """``Intel Xeon 8375C`` -> ``intel-xeon-8375c``: a valid profile name (64 characters at most)."""
    slug = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")[:64].rstrip("-.")
    return slug or "measured"


def check_profile_name(name: str) -> None:
    """Raise `DeviceError` unless `name` is a valid profile name (what ``--devices`` takes).

    Raises:
        DeviceError: `name` breaks the schema's rule for names.
    """
    if not PROFILE_NAME_RE.fullmatch(name):
        raise DeviceError(
            f"profile name {name!r} is not 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def measure_device(
    device: str,
    dtypes: Sequence[str] = ("float32", "bfloat16", "float16"),
    quick: bool = False,
    *,
    name: str | None = None,
    threads: int | None = 1,
    progress: Progress | None = None,
) -> DeviceProfile:
    """Measure `device` and return its profile (efficiencies 1.0: the figures are sustained).

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        dtypes: Matmul dtypes to measure, from ``float32``, ``tf32`` (CUDA only),
            ``bfloat16``, ``float16``; float32 is always measured (the schema needs it). A
            dtype whose matmul the device cannot run is left out of the profile.
        quick: Smaller sizes and fewer repeats (CPU: a few seconds; for tests and a first
            look).
        name: Profile name; by default `default_profile_name`, the hardware's model, which
            no built-in profile has. Name it ``cpu``, or the built-in profile
            `match_cuda_profile` gives the GPU, to replace that one where its file comes
            first on ``$PARTITIONER_PROFILE_PATH``.
        threads: torch threads on CPU during the measurement (restored after); None keeps
            the current setting.
        progress: Called with a line before each measurement and with its result.

    Raises:
        DeviceError: `device` is not ``cpu`` or a present CUDA device, or a dtype is unknown.
    """
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise DeviceError(f"cannot measure dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    wanted = ["float32"] + [d for d in DTYPES if d in dtypes and d != "float32"]
    if name is not None:
        check_profile_name(name)
    say = progress or (lambda _: None)
    dev = _parse_device(device)
    name = name or default_profile_name(device)
    if dev.type == "cpu":
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return _measure(dev, wanted, quick, name, say)
        finally:
            torch.set_num_threads(saved)
    with torch.cuda.device(dev):
        return _measure(dev, wanted, quick, name, say)


def _parse_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = torch.cuda.current_device() if device == "cuda" and count else None
        try:
            dev = torch.device(device if index is None else f"cuda:{index}")
        except RuntimeError:
            raise DeviceError(f"cannot read device {device!r}; expected 'cuda' or 'cuda:N'") from None
        if dev.index is None or dev.index >= count:
            raise DeviceError(f"cannot measure {device!r}: this machine has {count} CUDA device(s)")
        return dev
    raise DeviceError(f"cannot measure {device!r}: measure 'cpu', 'cuda' or 'cuda:N' (present hardware only)")


def _measure(dev: torch.device, dtypes: list[str], quick: bool, name: str, say: Progress) -> DeviceProfile:
    on_cuda = dev.type == "cuda"
    budget = _BUDGETS["cuda" if on_cuda else "cpu", quick]
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize(dev)) if on_cuda else (lambda: None)

    peaks: dict[str, float] = {}
    sides: dict[str, int] = {}
    sizes: list[str] = []
    skipped: list[str] = []
    for k, dtype in enumerate(dtypes, 1):
        say(f"{k}/{len(dtypes)}: {dtype} matmuls")
        if dtype == "tf32" and not (on_cuda and torch.cuda.get_device_capability(dev) >= (8, 0)):
            skipped.append("tf32 (no TF32 tensor cores)")
            continue
        try:
            peaks[dtype], n = _matmul_flops(dtype, dev, sync, budget)
            sides[dtype] = n
            sizes.append(f"{dtype} n={n}")
            say(f"{dtype}: {peaks[dtype] / 1e9:.4g} GFLOP/s (n = {n})")
        except RuntimeError as e:  # e.g. a dtype without a matmul kernel on this device
            if dtype == "float32":
                raise
            skipped.append(f"{dtype} ({str(e).splitlines()[0][:80]})")

    say(f"memory bandwidth: copying {budget.copy_bytes >> 20} MiB")
    elements = budget.copy_bytes // 4
    src = torch.empty(elements, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    bandwidth = _rounded(2 * budget.copy_bytes / _copy_seconds(dst, src, sync, budget.sample_s, budget.batch_s))
    del src, dst

    host_link = peer_link = None
    if on_cuda:
        props = torch.cuda.get_device_properties(dev)
        memory = int(props.total_memory)
        hardware = props.name

        def pinned(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.uint8, pin_memory=True)

        def on_device(n: int) -> torch.Tensor:
            return torch.empty(n, dtype=torch.uint8, device=dev)

        say(f"host link: copying {budget.host_bytes >> 20} MiB each way")
        h2d = _measured_link(budget.host_bytes, pinned, on_device, sync, budget)
        d2h = _measured_link(budget.host_bytes, on_device, pinned, sync, budget)
        host_link = Link(
            interface="pcie",
            generation=None,
            bandwidth_Bps=min(h2d[0], d2h[0]),
            latency_s=max(h2d[1], d2h[1]),
            efficiency=1.0,
        )
        count = torch.cuda.device_count()
        if count >= 2:
            peer = torch.device("cuda", (dev.index + 1) % count)

            def on_peer(n: int) -> torch.Tensor:
                return torch.empty(n, dtype=torch.uint8, device=peer)

            def sync_both() -> None:
                torch.cuda.synchronize(dev)
                torch.cuda.synchronize(peer)

            say(f"peer link: copying {budget.host_bytes >> 20} MiB to {peer}")
            p2p = _measured_link(budget.host_bytes, on_device, on_peer, sync_both, budget)
            peer_link = Link(
                interface="measured", generation=None, bandwidth_Bps=p2p[0], latency_s=p2p[1], efficiency=1.0
            )
    else:
        memory = system_memory_bytes()
        hardware = f"{_cpu_model_name()}, {torch.get_num_threads()} torch thread(s)"

    say("launch floor: back-to-back one-element adds")
    launch = _launch_seconds(dev, sync, budget)
    say(f"launch floor: {launch * 1e6:.3g} us per kernel")
    say("module call: a module's one add against the add alone")
    module_call = _module_call_seconds(dev, sync, budget)
    say(f"module call: {module_call * 1e6:.3g} us per call")
    fastest = max(peaks, key=peaks.__getitem__)
    say(f"matmul efficiency by size: {fastest}")
    timer = _MatmulTimer(fastest, dev, sync, budget, peaks[fastest], launch)
    curve = _gemm_curve(timer, sides[fastest])
    say("matmul efficiency: " + ", ".join(f"{x:.3g} FLOPs {y:.0%}" for x, y in curve))
    say(f"matmul efficiency by a narrow side: {fastest}")
    narrow = _narrow_curves(timer, sides[fastest])
    say("narrow sides: " + ", ".join(f"{a}={d:g} {y:.0%}" for a, d, y in narrow))
    say("element-wise bandwidth by size: out-of-place ReLUs")
    memory_curve = _memory_curve(dev, sync, budget, bandwidth, launch)
    say("element-wise bandwidth: " + ", ".join(f"{x / 2**20:.3g} MiB {y:.0%}" for x, y in memory_curve))

    def time_call(fn: Callable[[], object]) -> float:
        return _median_seconds(fn, sync, budget.sample_s, budget.batch_s)

    say(f"convolution efficiency by size: {fastest} 3x3 convolutions")
    convs = conv_curve(dev, fastest, peaks[fastest], launch, time_call)
    say("convolution efficiency: " + ", ".join(f"{x:.3g} FLOPs {y:.0%}" for x, y in convs))
    say(f"attention efficiency by size: {fastest} scaled_dot_product_attention, full and causal")
    attention, causal = attention_curves(dev, fastest, peaks[fastest], launch, time_call)
    say("attention efficiency: " + ", ".join(f"{x:.3g} FLOPs {y:.0%} / {c:.0%}"
                                             for (x, y), (_, c) in zip(attention, causal, strict=True)))
    say("op rates: batch norm, layer norm, pooling, activations, softmax")
    # Twelve kinds, three timings each: half the sampling time of the other figures.
    rates = op_rates(dev, budget.copy_bytes // 16, launch,
                     lambda fn: _median_seconds(fn, sync, budget.sample_s / 2, budget.batch_s))
    say("op rates, forward / backward: " + ", ".join(f"{kind} {f / 1e9:.3g} / {b / 1e9:.3g} GB/s" for kind, f, b in rates))

    mode = "quick" if quick else "full"
    not_measured = f"; not measured: {', '.join(skipped)}" if skipped else ""
    return DeviceProfile(
        name=name,
        description=f"Measured on {hardware} ({mode} mode, {time.strftime('%Y-%m-%d')})",
        kind="gpu" if on_cuda else "cpu",
        memory_bytes=memory,
        memory_bandwidth_Bps=bandwidth,
        peak_flops=PeakFlops(**peaks),
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        host_link=host_link,
        peer_link=peer_link,
        source=(
            f"partitioner.calibrate.measure_device, torch {torch.__version__}: medians of square matmuls "
            f"({', '.join(sizes)}), a {budget.copy_bytes >> 20} MiB copy"
            + (f", {budget.host_bytes >> 20} MiB host and peer copies" if on_cuda else "")
            + "; launch floor from back-to-back one-element adds; module call from the same adds in an nn.Module"
            + f"; matmul efficiency by size from square {fastest} "
            f"matmuls (n = {', '.join(str(round((x / 2) ** (1 / 3))) for x, _ in curve)}) against the largest"
            + f"; by a narrow side from n = {sides[fastest]} matmuls with m, n or k cut to "
            + f"{', '.join(str(d) for d in _NARROW_SIDES if d < sides[fastest])}"
            + f"; element-wise bandwidth by size from out-of-place ReLUs of 16 KiB to "
            + f"{max(s for s in _PASS_SIZES if s <= budget.copy_bytes) >> 20} MiB on fresh inputs"
            + f"; convolution efficiency from 3x3 {fastest} convolutions ({CONV_SHAPES_NOTE}) against the peak"
            + f"; attention efficiency, full and causal, from {fastest} scaled_dot_product_attention "
            f"({ATTENTION_SHAPES_NOTE}) against the peak"
            + f"; op rates from one op of each kind on {budget.copy_bytes >> 24} MiB"
            + f"; sustained figures, efficiencies 1.0{not_measured}"
        ),
        launch_s=launch,
        module_call_s=module_call,
        gemm_efficiency=curve,
        gemm_narrow=narrow,
        memory_curve=memory_curve,
        conv_efficiency=convs,
        attention_efficiency=attention,
        causal_attention_efficiency=causal,
        op_rates=rates,
        calibrated=True,
    )


def write_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write `profile` as JSON in the schema `load_profile` reads; returns the path.

    The file is written whole or not at all (a temporary file renamed into place, removed
    if anything fails). `load_profile` finds it by name only when the file is
    ``<profile.name>.json``.
    """
    with staged(path) as temporary:
        temporary.write_text(profile_to_json(profile), encoding="utf-8")
    return Path(path)
