"""Calibration on the CPU in quick mode: a valid profile that survives write and load."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from partitioner import calibrate
from partitioner.calibrate import default_profile_name, measure_device, write_profile
from partitioner.calibrate_ops import attention_curves, conv_curve, fp32_precision, op_rates
from partitioner.devices import OP_KINDS, DeviceProfile, load_profile, resolve_devices
from partitioner.errors import DeviceError


PROGRESS: list[str] = []
"""The lines the module's measurement reported."""


@pytest.fixture(scope="module")
def measured() -> tuple[DeviceProfile, float]:
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        start = time.perf_counter()
        profile = measure_device(
            "cpu", dtypes=("float32", "bfloat16", "tf32"), quick=True, progress=PROGRESS.append
        )
        elapsed = time.perf_counter() - start
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(saved)
    return profile, elapsed


def test_quick_cpu_profile_is_measured_and_quick(measured: tuple[DeviceProfile, float]) -> None:
    profile, elapsed = measured
    assert elapsed < 10.0
    assert profile.name == default_profile_name("cpu") != "cpu" and profile.kind == "cpu"
    assert profile.compute_efficiency == profile.memory_efficiency == 1.0
    assert profile.host_link is None and profile.peer_link is None
    # Any CPU of this century: more than 100 MFLOP/s and 100 MB/s, less than the caps.
    assert profile.peak_flops.float32 > 1e8 and profile.memory_bandwidth_Bps > 1e8
    assert profile.peak_flops.tf32 is None and "tf32 (no TF32 tensor cores)" in profile.source
    assert profile.memory_bytes == resolve_devices(["cpu"])[0].memory_bytes
    assert "1 torch thread" in profile.description


def test_launch_floor_and_matmul_curve_are_measured(measured: tuple[DeviceProfile, float]) -> None:
    """`partitioner profile` fits the cost model's launch floor and its matmul efficiency by size."""
    profile, _ = measured
    assert profile.calibrated
    assert 1e-8 < profile.launch_s < 1e-3  # an op dispatch: microseconds
    assert 1e-8 < profile.module_call_s < 1e-3 and "module call" in profile.source  # Python's __call__
    curve = profile.gemm_efficiency
    assert len(curve) >= 2 and curve[-1][1] == 1.0  # the largest size is the peak
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))
    assert curve[0][0] == 2 * 64**3 and all(0 < y <= 1 for _, y in curve)
    assert "launch floor" in profile.source and "matmul efficiency by size" in profile.source
    # Each side of a matmul cut narrow, 1 to 256 below the peak's side, as fractions of the peak.
    sides = {a: [d for b, d, _ in profile.gemm_narrow if b == a] for a in ("m", "n", "k")}
    assert all(v == sorted(v) and v[0] == 1 and len(v) >= 6 for v in sides.values()), sides
    assert all(0 < y <= 1 for _, _, y in profile.gemm_narrow) and "narrow side" in profile.source
    # Element-wise bandwidth by size: 16 KiB inputs (32 KiB moved) up to the 64 MiB copy's.
    sizes = [x for x, _ in profile.memory_curve]
    assert sizes[0] == 2 * 16 * 1024 and sizes[-1] == 2 * 64 * 2**20 and sizes == sorted(sizes)
    assert all(0 < y <= 100 for _, y in profile.memory_curve) and "element-wise bandwidth" in profile.source
    # 3x3 convolutions of 8 to 128 channels, as fractions of the peak; each kind's rates.
    flops = [x for x, _ in profile.conv_efficiency]
    assert flops == [2 * 8 * 16 * 16 * c * c * 9 for c in (8, 16, 32, 64, 128)]
    assert all(0 < y <= 1 for _, y in profile.conv_efficiency) and "convolution efficiency" in profile.source
    # Attention of 32 to 512 tokens, by its FLOPs per sample and head, full and causal.
    heads = [4 * t * t * 64 for t in (32, 64, 128, 256, 512)]
    assert [x for x, _ in profile.attention_efficiency] == [x for x, _ in profile.causal_attention_efficiency] == heads
    assert all(0 < y <= 1 for _, y in profile.attention_efficiency) and "attention efficiency" in profile.source
    assert [kind for kind, *_ in profile.op_rates] == list(OP_KINDS) and "op rates" in profile.source
    assert all(1e6 <= rate < 1e13 for _, *rates in profile.op_rates for rate in rates)


def test_the_measurement_reports_each_step(measured: tuple[DeviceProfile, float]) -> None:
    profile, _ = measured
    figures = [line for line in PROGRESS
               if "GFLOP/s" in line or " us per kernel" in line or " us per call" in line or "FLOPs" in line
               or line.startswith(("narrow sides", "element-wise bandwidth: ", "convolution efficiency: ",
                                   "op rates, forward"))]
    assert [line for line in PROGRESS if line not in figures] == [
        "1/3: float32 matmuls",
        "2/3: tf32 matmuls",  # then skipped on a CPU
        "3/3: bfloat16 matmuls",
        "memory bandwidth: copying 64 MiB",
        "launch floor: back-to-back one-element adds",
        "module call: a module's one add against the add alone",
        f"matmul efficiency by size: {max(('float32', 'bfloat16'), key=profile.peak_flops_for)}",
        f"matmul efficiency by a narrow side: {max(('float32', 'bfloat16'), key=profile.peak_flops_for)}",
        "element-wise bandwidth by size: out-of-place ReLUs",
        f"convolution efficiency by size: {max(('float32', 'bfloat16'), key=profile.peak_flops_for)} 3x3 convolutions",
        f"attention efficiency by size: {max(('float32', 'bfloat16'), key=profile.peak_flops_for)} "
        "scaled_dot_product_attention, full and causal",
        "op rates: batch norm, layer norm, pooling, activations, softmax",
    ]
    assert [line.split(" GFLOP/s")[0] for line in figures] == [
        f"float32: {profile.peak_flops.float32 / 1e9:.4g}",
        f"bfloat16: {profile.peak_flops.bfloat16 / 1e9:.4g}",
        f"launch floor: {profile.launch_s * 1e6:.3g} us per kernel",
        f"module call: {profile.module_call_s * 1e6:.3g} us per call",
        "matmul efficiency: " + ", ".join(f"{x:.3g} FLOPs {y:.0%}" for x, y in profile.gemm_efficiency),
        "narrow sides: " + ", ".join(f"{a}={d:g} {y:.0%}" for a, d, y in profile.gemm_narrow),
        "element-wise bandwidth: " + ", ".join(f"{x / 2**20:.3g} MiB {y:.0%}" for x, y in profile.memory_curve),
        "convolution efficiency: " + ", ".join(f"{x:.3g} FLOPs {y:.0%}" for x, y in profile.conv_efficiency),
        "attention efficiency: " + ", ".join(f"{x:.3g} FLOPs {y:.0%} / {c:.0%}" for (x, y), (_, c)
                                             in zip(profile.attention_efficiency, profile.causal_attention_efficiency)),
        "op rates, forward / backward: " + ", ".join(f"{k} {f / 1e9:.3g} / {b / 1e9:.3g} GB/s"
                                                     for k, f, b in profile.op_rates),
    ]


@pytest.mark.parametrize(
    "model, name",
    [
        ("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu-intel-xeon-platinum-8375c"),
        ("AMD EPYC 7R13 Processor", "cpu-amd-epyc-7r13"),
        ("Apple M2 Pro", "cpu-apple-m2-pro"),
        ("arm64", "cpu-arm64"),
    ],
)
def test_the_default_name_is_the_cpu_model(monkeypatch: pytest.MonkeyPatch, model: str, name: str) -> None:
    monkeypatch.setattr(calibrate, "_cpu_model_name", lambda: model)
    assert default_profile_name("cpu") == name
    load_profile("cpu")  # the built-in one, which the default name leaves alone


def test_the_default_name_of_a_gpu_is_its_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate, "_parse_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(name="NVIDIA H100 80GB HBM3"))
    assert default_profile_name("cuda:0") == "nvidia-h100-80gb-hbm3"  # not the built-in h100-80gb


def test_a_bad_name_is_refused_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate, "_measure", lambda *args: pytest.fail("measured"))
    with pytest.raises(DeviceError, match="profile name 'my cpu' is not 1-64 of"):
        measure_device("cpu", quick=True, name="my cpu")


def test_measured_profile_round_trips(measured: tuple[DeviceProfile, float], tmp_path: Path) -> None:
    profile, _ = measured
    path = write_profile(profile, tmp_path / "my-cpu.json")
    assert load_profile(path) == profile
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_measured_profile_replaces_the_builtin_one_on_the_path(
    measured: tuple[DeviceProfile, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named_cpu = dataclasses.replace(measured[0], name="cpu")  # measure_device(..., name="cpu")
    write_profile(named_cpu, tmp_path / "cpu.json")
    monkeypatch.setenv("PARTITIONER_PROFILE_PATH", str(tmp_path))
    assert resolve_devices(["cpu:0"])[0].profile == named_cpu


def test_threads_are_restored_when_measuring_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> DeviceProfile:
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")

    monkeypatch.setattr(calibrate, "_measure", broken)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            measure_device("cpu", quick=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize(
    ("device", "dtypes", "expected"),
    [
        ("tpu", ("float32",), "measure 'cpu', 'cuda' or 'cuda:N'"),
        ("cpu:1", ("float32",), "measure 'cpu', 'cuda' or 'cuda:N'"),
        ("a100-80gb", ("float32",), "present hardware only"),
        ("cpu", ("int8",), "cannot measure dtype 'int8'"),
    ],
)
def test_bad_requests(device: str, dtypes: tuple[str, ...], expected: str) -> None:
    with pytest.raises(DeviceError, match=expected):
        measure_device(device, dtypes=dtypes, quick=True)


def test_a_device_without_attention_in_its_dtype_gets_no_curve() -> None:
    """Where ``scaled_dot_product_attention`` raises for the dtype, both curves are empty
    (attention priced as matmuls), as a convolution curve is."""

    def clock(fn: object) -> float:
        raise RuntimeError("no kernel for this dtype")

    assert attention_curves(torch.device("cpu"), "float32", 1e12, 0.0, clock) == ((), ())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_absent_cuda_is_refused() -> None:
    with pytest.raises(DeviceError, match="this machine has 0 CUDA device"):
        measure_device("cuda:0", quick=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_cuda_profile() -> None:
    profile = measure_device("cuda", dtypes=("float32", "tf32", "bfloat16", "float16"), quick=True)
    assert profile.kind == "gpu" and profile.host_link is not None
    assert profile.memory_bytes == torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if torch.cuda.get_device_capability() >= (8, 0):
        assert profile.peak_flops.bfloat16 is not None and profile.peak_flops.bfloat16 > profile.peak_flops.float32
    assert (profile.peer_link is not None) == (torch.cuda.device_count() >= 2)


def test_convolution_curve_and_op_rates_divide_what_they_time() -> None:
    """`calibrate_ops` on a clock that says 1 ms a call: each convolution's FLOPs over 1 ms
    as a fraction of the peak, each attention's over its time (full, causal); each op's forward bytes (input and output) per millisecond,
    and per the backward's time (timed with autograd, less the forward with it)."""
    seconds = iter(())

    def clock(fn: object) -> float:
        fn()  # type: ignore[operator]
        return next(seconds, 1e-3)

    curve = conv_curve(torch.device("cpu"), "float32", 1e12, 0.0, clock)
    assert curve == tuple((float(f), round(f / 1e-3 / 1e12, 4)) for f in (2 * 8 * 256 * c * c * 9 for c in (8, 16, 32, 64, 128)))
    # Attention: full 1 ms, causal 0.5 ms at each length (the causal one at twice the rate);
    # the points by FLOPs per sample and head, the efficiency of all 2 x 4 heads' FLOPs.
    seconds = iter([1e-3, 5e-4] * 5)
    full, causal = attention_curves(torch.device("cpu"), "float32", 1e12, 0.0, clock)
    heads = [float(4 * t * t * 64) for t in (32, 64, 128, 256, 512)]
    assert full == tuple((h, round(8 * h / 1e-3 / 1e12, 4)) for h in heads)
    assert causal == tuple((h, round(8 * h / 5e-4 / 1e12, 4)) for h in heads)
    # Forward 1 ms, forward with autograd 1 ms, forward and backward 3 ms: the backward took 2 ms.
    seconds = iter([1e-3, 1e-3, 3e-3] * len(OP_KINDS))
    rates = op_rates(torch.device("cpu"), 4 * 32**4, 0.0, clock)
    moved = {"batch_norm": 2 * 32**4 * 4, "norm": 2 * 32**4 * 4, "max_pool": (32**4 + 32**4 // 4) * 4,
             "avg_pool": (32**4 + 32**4 // 4) * 4}
    moved |= {k: 2 * 32**4 * 4 for k in OP_KINDS[4:]}  # activations and softmax: as many out as in
    assert rates == tuple((k, float(f"{moved[k] / 1e-3:.4g}"), float(f"{moved[k] / 2e-3:.4g}")) for k in OP_KINDS)
    # On a CPU the dispatch floor comes off each time (at most half of it).
    floored = op_rates(torch.device("cpu"), 4 * 32**4, 4e-4, clock)
    assert floored[0][1] == float(f"{moved['batch_norm'] / 6e-4:.4g}")


@pytest.mark.parametrize("backend", [torch.backends.cuda.matmul, torch.backends.cudnn])
@pytest.mark.parametrize("tf32", [True, False])
def test_fp32_precision_sets_and_restores_tf32(backend: object, tf32: bool) -> None:
    """Calibration lets float32 matmuls and convolutions use TF32 exactly when it measures
    tf32, and puts the caller's setting back (torch >= 2.9: ``fp32_precision``)."""
    target = getattr(backend, "conv", backend)
    key = "fp32_precision" if hasattr(target, "fp32_precision") else "allow_tf32"
    before = getattr(target, key)
    with fp32_precision(backend, tf32):
        assert getattr(target, key) == ({True: "tf32", False: "ieee"}[tf32] if key == "fp32_precision" else tf32)
    assert getattr(target, key) == before
