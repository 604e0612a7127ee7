"""Device profiles (schema, sources, hostile files), device resolution, links and byte sizes."""

from __future__ import annotations

import ast
import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner import device_detection, device_resolution, profile_files, units
from partitioner import devices as devmod
from partitioner.devices import (
    DeviceProfile,
    Link,
    PeakFlops,
    available_profiles,
    format_bytes,
    link_cost,
    load_profile,
    match_cuda_profile,
    parse_bytes,
    profile_from_dict,
    profile_to_json,
    resolve_devices,
    system_memory_bytes,
)
from partitioner.device_resolution import MAX_DEVICES
from partitioner.errors import DeviceError, ProfileError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
REQUIRED = ("cpu", "v100", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "l4")
GiB = 2**30


@pytest.fixture(autouse=True)
def _builtin_profiles_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's $PARTITIONER_PROFILE_PATH must not change what these tests see."""
    monkeypatch.delenv(devmod.PROFILE_PATH_ENV, raising=False)


# --------------------------------------------------------------------------- built-in profiles


@pytest.mark.parametrize("name", REQUIRED)
def test_required_profile_loads_and_file_is_canonical(name: str) -> None:
    path = PROFILES_DIR / f"{name}.json"
    profile = load_profile(name)
    assert profile.name == name
    assert profile == load_profile(path) == load_profile(str(path))
    assert path.read_text() == profile_to_json(profile)  # the files are what write_profile writes
    assert "datasheet" in profile.source.lower() or name == "cpu"
    assert set(available_profiles()) >= set(REQUIRED)


def test_cpu_profile_says_it_is_a_rough_default() -> None:
    cpu = load_profile("cpu")
    assert cpu.kind == "cpu" and cpu.host_link is None and cpu.peer_link is None
    assert "rough default" in cpu.description.lower()
    assert "partitioner profile --device cpu" in cpu.description


@pytest.mark.parametrize(
    ("name", "memory", "bandwidth", "fp32", "bf16", "host_Bps", "peer_Bps"),
    [
        ("v100", 32 * GiB, 900e9, 15.7e12, None, 16e9, 150e9),
        ("a100-40gb", 40 * GiB, 1555e9, 19.5e12, 312e12, 32e9, 300e9),
        ("a100-80gb", 80 * GiB, 2039e9, 19.5e12, 312e12, 32e9, 300e9),
        ("h100-80gb", 80 * GiB, 3.35e12, 67e12, 1979e12 / 2, 64e9, 450e9),
        ("h200", 141 * GiB, 4.8e12, 67e12, 1979e12 / 2, 64e9, 450e9),
        ("l4", 24 * GiB, 300e9, 30.3e12, 242e12 / 2, 32e9, None),
    ],
)
def test_gpu_profiles_hold_dense_one_way_datasheet_figures(
    name: str, memory: int, bandwidth: float, fp32: float, bf16: float | None, host_Bps: float, peer_Bps: float | None
) -> None:
    p = load_profile(name)
    assert (p.kind, p.memory_bytes, p.memory_bandwidth_Bps, p.peak_flops.float32) == ("gpu", memory, bandwidth, fp32)
    assert p.peak_flops.bfloat16 == pytest.approx(bf16) if bf16 else p.peak_flops.bfloat16 is None
    assert p.host_link is not None and p.host_link.bandwidth_Bps == host_Bps and p.host_link.interface == "pcie"
    assert (p.peer_link.bandwidth_Bps if p.peer_link else None) == peer_Bps


def test_missing_dtype_falls_back_to_float32_rate() -> None:
    v100 = load_profile("v100")
    assert v100.peak_flops_for("bfloat16") == v100.peak_flops_for("tf32") == 15.7e12
    assert v100.peak_flops_for("float16") == 125e12
    with pytest.raises(ValueError, match="int8"):
        v100.peak_flops_for("int8")


def test_modules_stay_free_of_torch_at_import() -> None:
    """The device modules import torch only inside functions; the cost model never."""

    def torch_imports(path: Path, top_level_only: bool) -> list[int]:
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        return [
            n.lineno
            for n in nodes
            if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "torch" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "torch")
        ]

    package = Path(devmod.__file__).parent
    for module in (devmod, profile_files, device_detection, device_resolution):
        assert torch_imports(Path(module.__file__ or ""), top_level_only=True) == [], module.__name__
    assert torch_imports(package / "cost_model.py", top_level_only=False) == []


@pytest.mark.parametrize("name", sorted(devmod.__all__))
def test_every_public_name_stays_importable_from_devices(name: str) -> None:
    """Names that moved to profile_files, device_detection, device_resolution and units are
    re-exported: ``from partitioner.devices import load_profile`` works as before."""
    value = getattr(devmod, name)
    homes = [m for m in (devmod, profile_files, device_detection, device_resolution, units) if name in m.__all__]
    assert all(getattr(m, name) is value for m in homes) and name in dir(devmod)


# --------------------------------------------------------------------------- hostile files


def _valid() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PROFILES_DIR / "a100-80gb.json").read_text())
    return data


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        d[last] = value

    return mutate


def _delete(path: str) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        del d[last]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("memory_bytes", "80GB"), "'memory_bytes' must be an integer"),
        (_set("memory_bytes", 8.5e10), "'memory_bytes' must be an integer"),
        (_set("memory_bytes", -1), "'memory_bytes' must be finite and in (0"),
        (_set("memory_bytes", 0), "'memory_bytes' must be finite and in (0"),
        (_set("memory_bytes", 10**400), "'memory_bytes' must be finite"),
        (_set("memory_bandwidth_Bps", 1e30), "'memory_bandwidth_Bps' must be finite and in [1e+06, 1e+15]"),
        (_set("peak_flops.float32", 1e300), "'peak_flops.float32' must be finite"),
        (_set("peak_flops.bfloat16", "fast"), "'peak_flops.bfloat16' must be a number"),
        (_set("compute_efficiency", True), "'compute_efficiency' must be a number"),
        (_set("compute_efficiency", 1.5), "'compute_efficiency' must be finite and in [0.001, 1]"),
        (_set("host_link.efficiency", 0), "'host_link.efficiency'"),
        (_set("host_link.latency_s", -1e-5), "'host_link.latency_s'"),
        (_set("peer_link.generation", 2.5), "'peer_link.generation' must be an integer"),
        (_set("peer_link.interface", ""), "'peer_link.interface'"),
        (_set("host_link", None), "'host_link' is needed for a GPU"),
        (_set("peer_link", [1, 2]), "key 'peer_link' must be a JSON object"),
        (_set("kind", "tpu"), "'kind' must be 'cpu' or 'gpu'"),
        (_set("name", "a100 80gb!"), "'name' must be 1-64 letters"),
        (_set("description", ""), "'description' must be a non-empty string"),
        (_set("source", None), "'source' must be a non-empty string"),
        (_set("memroy_bytes", 1), "unknown key 'memroy_bytes'"),
        (_set("peak_flops.fp8", 1e15), "unknown key 'peak_flops.fp8'"),
        (_set("host_link.lanes", 16), "unknown key 'host_link.lanes'"),
        (_delete("source"), "missing key 'source'"),
        (_delete("peak_flops.float32"), "missing key 'peak_flops.float32'"),
        (_delete("peer_link.latency_s"), "missing key 'peer_link.latency_s'"),
        (_set("launch_s", "5us"), "'launch_s' must be a number"),
        (_set("launch_s", -5e-6), "'launch_s' must be finite and in [0, 0.01]"),
        (_set("launch_s", 5.0), "'launch_s' must be finite and in [0, 0.01]"),
        (_set("module_call_s", "1us"), "'module_call_s' must be a number"),
        (_set("module_call_s", -1e-6), "'module_call_s' must be finite and in [0, 0.01]"),
        (_set("gemm_efficiency", "steep"), "'gemm_efficiency' must be a list of [flops, efficiency] pairs"),
        (_set("gemm_efficiency", [[1e9]]), "'gemm_efficiency[0]' must be a pair"),
        (_set("gemm_efficiency", [[1e9, 2.0]]), "'gemm_efficiency[0][1]' must be finite and in [0.001, 1]"),
        (_set("gemm_efficiency", [[1e9, 0.5], [1e8, 0.6]]), "'gemm_efficiency[1][0]' must be larger than the point"),
        (_set("gemm_efficiency", [[1e9, 0.5]] * 65), "at most 64"),
        (_set("calibrated", "yes"), "'calibrated' must be true or false"),
        (_set("gemm_narrow", {"n": [[8, 0.1]]}), "'gemm_narrow' must be a list of [axis, size, efficiency] triples"),
        (_set("gemm_narrow", [["n", 8]]), "'gemm_narrow[0]' must be a triple"),
        (_set("gemm_narrow", [["x", 8, 0.1]]), "'gemm_narrow[0][0]' must be one of m, n, k"),
        (_set("gemm_narrow", [["n", 0.5, 0.1]]), "'gemm_narrow[0][1]'"),
        (_set("gemm_narrow", [["n", 8, 1.5]]), "'gemm_narrow[0][2]' must be finite and in [0.001, 1]"),
        (_set("gemm_narrow", [["n", 8, 0.1], ["m", 4, 0.2], ["n", 8, 0.3]]), "'gemm_narrow[2][1]' must be larger"),
        (_set("memory_curve", {"1e6": 1.5}), "'memory_curve' must be a list of [bytes, fraction] pairs"),
        (_set("memory_curve", [[1e6]]), "'memory_curve[0]' must be a pair"),
        (_set("memory_curve", [[1e6, 0.0]]), "'memory_curve[0][1]' must be finite and in [0.001, 100]"),
        (_set("memory_curve", [[1e6, 150.0]]), "'memory_curve[0][1]' must be finite and in [0.001, 100]"),
        (_set("memory_curve", [[1e6, 2.0], [1e6, 1.0]]), "'memory_curve[1][0]' must be larger than the point"),
        (_set("conv_efficiency", [[1e9, 1.5]]), "'conv_efficiency[0][1]' must be finite and in [0.001, 1]"),
        (_set("conv_efficiency", {"1e9": 0.5}), "'conv_efficiency' must be a list of [flops, efficiency] pairs"),
        (_set("attention_efficiency", [[1e9, 1.5]]), "'attention_efficiency[0][1]' must be finite and in [0.001, 1]"),
        (_set("causal_attention_efficiency", [[1e9, 2.5]]),
         "'causal_attention_efficiency[0][1]' must be finite and in [0.001, 2]"),
        (_set("attention_efficiency", 0.5), "'attention_efficiency' must be a list of [flops, efficiency] pairs"),
        (_set("op_rates", [["norm", 1e9, 1e9]]), "'op_rates' must map op kinds"),
        (_set("op_rates", {"norm": 1e9}), "'op_rates.norm' must be [forward, backward] bytes per second"),
        (_set("op_rates", {"softmin": [1e9, 1e9]}), "'op_rates' must name each of batch_norm, norm, max_pool"),
        (_set("op_rates", {"norm": [1e9, 0.0]}), "'op_rates.norm.backward' must be finite"),
    ],
)
def test_hostile_profile_is_rejected_naming_file_and_key(tmp_path: Path, mutate: Any, expected: str) -> None:
    data = _valid()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_profile_without_the_later_keys_loads_with_their_defaults(tmp_path: Path) -> None:
    """Files written before launch_s, gemm_efficiency and calibrated: no floor, the flat
    efficiency, and calibrated exactly when `partitioner profile` wrote them (their source says so)."""
    data = _valid()
    data.pop("launch_s")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = load_profile(path)
    assert (old.launch_s, old.module_call_s, old.gemm_efficiency, old.calibrated) == (0.0, 0.0, (), False)
    data["source"] = "partitioner.calibrate.measure_device, torch 2.5: medians of square matmuls"
    path.write_text(json.dumps(data))
    assert load_profile(path).calibrated


def test_launch_floor_and_gemm_curve_round_trip(tmp_path: Path) -> None:
    data = _valid() | {"gemm_efficiency": [[1e6, 0.05], [1e9, 0.5], [1e12, 0.9]], "calibrated": True}
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(data))
    profile = load_profile(path)
    assert profile.gemm_efficiency == ((1e6, 0.05), (1e9, 0.5), (1e12, 0.9)) and profile.calibrated
    path.write_text(profile_to_json(profile))
    assert load_profile(path) == profile
    narrow = data | {"gemm_narrow": [["n", 1, 0.3], ["n", 8, 0.1], ["m", 4, 0.4], ["n", 64, 1.0]]}
    path.write_text(json.dumps(narrow))
    profile = load_profile(path)
    assert profile.gemm_narrow == (("n", 1, 0.3), ("n", 8, 0.1), ("m", 4, 0.4), ("n", 64, 1.0))
    path.write_text(profile_to_json(profile))
    assert load_profile(path) == profile
    memory = data | {"memory_curve": [[32768, 1.8], [524288, 2.5], [1.3e8, 0.15]]}
    path.write_text(json.dumps(memory))
    profile = load_profile(path)
    assert profile.memory_curve == ((32768, 1.8), (524288, 2.5), (1.3e8, 0.15))
    path.write_text(profile_to_json(profile))
    assert load_profile(path) == profile
    # Op rates in any order in the file, in OP_KINDS order in the profile.
    kernels = data | {"conv_efficiency": [[2e6, 0.3], [6e8, 1.0]],
                      "attention_efficiency": [[2e6, 0.45], [5e8, 0.6]],
                      "causal_attention_efficiency": [[2e6, 0.4], [5e8, 1.3]],
                      "op_rates": {"max_pool": [6e8, 1e10], "batch_norm": [4e9, 9e9]}}
    path.write_text(json.dumps(kernels))
    profile = load_profile(path)
    assert profile.conv_efficiency == ((2e6, 0.3), (6e8, 1.0))
    assert profile.attention_efficiency == ((2e6, 0.45), (5e8, 0.6))
    assert profile.causal_attention_efficiency == ((2e6, 0.4), (5e8, 1.3))
    assert profile.op_rates == (("batch_norm", 4e9, 9e9), ("max_pool", 6e8, 1e10))
    path.write_text(profile_to_json(profile))
    assert load_profile(path) == profile


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_profiles_carry_a_sourced_launch_floor(name: str) -> None:
    p = load_profile(name)
    assert 1e-6 <= p.launch_s <= 2e-5
    assert "launch_s" in p.source


def test_cpu_profile_with_links_is_rejected(tmp_path: Path) -> None:
    data = json.loads((PROFILES_DIR / "cpu.json").read_text())
    data["peer_link"] = _valid()["peer_link"]
    with pytest.raises(ProfileError, match="'peer_link' must be null for a CPU"):
        profile_from_dict(data, "cpu-test")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "x", "memory_bytes": ', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2, 3]", "the document must be a JSON object"),
        ('{"name": "a", "name": "b"}', "key 'name' appears 2 times"),
        ('{"memory_bandwidth_Bps": NaN}', "NaN is not a number a profile may hold"),
        ('{"memory_bandwidth_Bps": -Infinity}', "-Infinity is not a number a profile may hold"),
        pytest.param("[" * 100_000 + "]" * 100_000, "JSON", id="nested-100000-deep"),
    ],
)
def test_malformed_json_is_rejected(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=expected.replace("(", r"\(")):
        load_profile(path)


def test_unreadable_oversized_and_binary_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read device profile"):
        load_profile(tmp_path / "absent.json")
    big = tmp_path / "big.json"
    big.write_text(" " * (2 << 20))
    with pytest.raises(ProfileError, match="a device profile is at most 1 MiB"):
        load_profile(big)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(binary)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        # 1e-200 x 1e-200 underflows to 0: seconds per byte was a ZeroDivisionError.
        (lambda d: d["host_link"].update(bandwidth_Bps=1e-200, efficiency=1e-200), "'host_link.bandwidth_Bps'"),
        (_set("peer_link.efficiency", 1e-200), "'peer_link.efficiency' must be finite and in [0.001, 1]"),
        # A denormal peak: every layer took "infinite" time and the plan said it did not fit.
        (_set("peak_flops.float32", 5e-324), "'peak_flops.float32' must be finite and in [1e+06, 1e+18]"),
        # 1e-300 FLOP/s: times of 1e300 s, a plan whose JSON from_json refused.
        (_set("peak_flops.bfloat16", 1e-300), "'peak_flops.bfloat16' must be finite and in [1e+06"),
        (_set("memory_bandwidth_Bps", 1e-300), "'memory_bandwidth_Bps' must be finite and in [1e+06"),
        (_set("compute_efficiency", 1e-200), "'compute_efficiency' must be finite and in [0.001, 1]"),
    ],
)
def test_figures_that_underflow_are_refused(tmp_path: Path, mutate: Any, expected: str) -> None:
    data = _valid()
    mutate(data)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=re.escape(expected)):
        resolve_devices([str(path), "cpu"])


def _special_files(tmp_path: Path) -> list[tuple[Path, str]]:
    files = [(tmp_path, "is a directory, not a regular file")]
    if Path("/dev/zero").exists():
        files.append((Path("/dev/zero"), "is a special file, not a regular file"))
        link = tmp_path / "random.json"
        link.symlink_to("/dev/urandom")
        files.append((link, "is a special file, not a regular file"))
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.json"
        os.mkfifo(fifo)
        files.append((fifo, "is a FIFO, not a regular file"))
    return files


def test_special_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    """/dev/zero never ends and a FIFO blocks until written: neither may be read."""
    for path, expected in _special_files(tmp_path):
        with pytest.raises(ProfileError, match=re.escape(f"{path}: {expected}")):
            load_profile(path)
        with pytest.raises(ProfileError, match=re.escape(expected)):
            resolve_devices([str(path)])


def test_a_file_read_is_capped_whatever_its_size_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps(_valid()) + " " * 100)
    monkeypatch.setattr(profile_files, "_MAX_PROFILE_FILE_BYTES", 64)
    with pytest.raises(ProfileError, match="larger than 64 B"):
        load_profile(big)


def test_search_path_and_name_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = dict(_valid(), name="cpu", kind="cpu", host_link=None, peer_link=None, memory_bytes=123 * GiB)
    (tmp_path / "cpu.json").write_text(json.dumps(mine))
    (tmp_path / "tpu-v9.json").write_text(json.dumps(dict(_valid(), name="not-tpu")))
    monkeypatch.setenv(devmod.PROFILE_PATH_ENV, f"{tmp_path / 'missing-dir'}{os.pathsep}{tmp_path}")
    assert load_profile("cpu").memory_bytes == 123 * GiB  # the path shadows the built-in profile
    assert "tpu-v9" in available_profiles() and "h200" in available_profiles()
    with pytest.raises(ProfileError, match="key 'name' is 'not-tpu' but the file is tpu-v9.json"):
        load_profile("tpu-v9")
    with pytest.raises(ProfileError, match=r"no device profile named 'b200'.*available: .*a100-80gb"):
        load_profile("b200")


def test_profile_constructed_in_code_is_validated() -> None:
    good = load_profile("l4")
    with pytest.raises(ProfileError, match=r"profile 'l4': key 'memory_efficiency' must be finite"):
        DeviceProfile(**{**{f: getattr(good, f) for f in good.__dataclass_fields__}, "memory_efficiency": 0.0})


# --------------------------------------------------------------------------- resolve_devices


def test_resolve_cpu_forms() -> None:
    host, a, b = resolve_devices(["cpu", "cpu:0", "cpu:1"])
    assert (host.name, host.torch_device, host.present) == ("cpu", "cpu", True)
    assert (a.name, a.torch_device, b.name, b.torch_device) == ("cpu:0", "cpu:0", "cpu:1", "cpu:1")
    assert all(d.profile.name == "cpu" and d.memory_bytes == system_memory_bytes() for d in (host, a, b))
    assert [d.name for d in resolve_devices(["cpu x3"])] == ["cpu:0", "cpu:1", "cpu:2"]


@pytest.mark.parametrize(
    ("specs", "names"),
    [
        (["a100-80gb"], ["a100-80gb"]),
        (["a100-80gb", "a100-80gb"], ["a100-80gb:0", "a100-80gb:1"]),
        (["a100-80gb x4"], [f"a100-80gb:{i}" for i in range(4)]),
        (["a100-80gb*2"], ["a100-80gb:0", "a100-80gb:1"]),
        (["h200 * 2", "l4"], ["h200:0", "h200:1", "l4"]),
        (["a100-80gb,a100-80gb, cpu:0"], ["a100-80gb:0", "a100-80gb:1", "cpu:0"]),
        (["a100-80gb:3", "a100-80gb x2"], ["a100-80gb:3", "a100-80gb:0", "a100-80gb:1"]),
        (["a100-80gb:0", "a100-80gb"], ["a100-80gb:0", "a100-80gb:1"]),
        (["cpu:0", "v100", "cpu:1"], ["cpu:0", "v100", "cpu:1"]),
    ],
)
def test_resolve_profile_names(specs: list[str], names: list[str]) -> None:
    got = resolve_devices(specs)
    assert [d.name for d in got] == names
    for d in got:
        if d.profile.kind == "gpu":
            assert d.torch_device is None and not d.present and d.memory_bytes == d.profile.memory_bytes


def test_resolve_profile_path(tmp_path: Path) -> None:
    path = tmp_path / "lab-gpu.json"
    path.write_text(json.dumps(dict(_valid(), name="lab-gpu")))
    (d,) = resolve_devices([str(path)])
    assert (d.name, d.present, d.profile.name) == ("lab-gpu", False, "lab-gpu")


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([], "no devices given"),
        (["cpu", " "], "empty device name"),
        (["cpu:1", "cpu:1"], r"'cpu:1' is listed twice \(positions 0 and 1\)"),
        (["cpu", "cpu"], "'cpu' is listed twice"),
        (["cpu x2", "cpu:1"], r"'cpu:1' is listed twice \(positions 1 and 2\)"),
        (["a100-80gb:1", "a100-80gb:1"], "'a100-80gb:1' is listed twice"),
        (["a100-90gb"], r"unknown device 'a100-90gb'.*available profiles: .*a100-80gb.*h200"),
        (["a100-80gb x0"], r"device count in 'a100-80gb x0' must be >= 1 \(got 0\)"),
        ([7], "device specs must be strings"),
    ],
)
def test_resolve_errors(specs: list[Any], expected: str) -> None:
    with pytest.raises(DeviceError, match=expected):
        resolve_devices(specs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_says_how_many_and_suggests_a_profile() -> None:
    with pytest.raises(DeviceError, match=r"'cuda:1' is not available: this machine has 0 CUDA device.*'a100-80gb'"):
        resolve_devices(["cpu", "cuda:1"])


@pytest.fixture
def two_h100(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """torch.cuda as it looks on a machine with two H100 SXM GPUs."""
    props = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, total_memory=85_045_166_080
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    return props


def test_resolve_present_cuda(two_h100: SimpleNamespace) -> None:
    a, b = resolve_devices(["cuda:0", "cuda"])  # plain "cuda" is the current device
    assert (a.name, a.torch_device, a.present, a.profile.name) == ("cuda:0", "cuda:0", True, "h100-80gb")
    assert b.name == "cuda:1" and b.memory_bytes == two_h100.total_memory  # the hardware's, not the datasheet's
    assert [d.name for d in resolve_devices(["cuda x2"])] == ["cuda:0", "cuda:1"]
    with pytest.raises(DeviceError, match="this machine has 2 CUDA device"):
        resolve_devices(["cuda:2"])
    with pytest.raises(DeviceError, match="'cuda:1' is listed twice"):
        resolve_devices(["cuda", "cuda:1"])


def test_max_memory_names_beat_kinds(two_h100: SimpleNamespace) -> None:
    caps: dict[str | int, int | str] = {
        "cpu": "1GiB", "cpu:1": "200MB", "a100-80gb": "40GB", "a100-80gb:1": 1000, 0: "1.5GiB", "gpu": "2GB"
    }  # fmt: skip
    devs = resolve_devices(["cpu:0", "cpu:1", "a100-80gb x2", "cuda:0", "cuda:1"], caps)
    assert [d.memory_bytes for d in devs] == [GiB, 200_000_000, 40 * 10**9, 1000, 1610612736, 2 * 10**9]


@pytest.mark.parametrize(
    ("max_memory", "expected"),
    [
        ({"cpu:0": "lots"}, "cannot read 'lots' as a size"),
        ({"cpu:0": 0}, r"max_memory\['cpu:0'\] must be > 0"),
        ({"cuda:0": "1GB"}, r"max_memory key 'cuda:0' matches no device; devices: cpu:0, l4"),
        ({"cpu:0": -5}, "must be >= 0"),
    ],
)
def test_max_memory_errors(max_memory: dict[str, Any], expected: str) -> None:
    with pytest.raises(DeviceError, match=expected):
        resolve_devices(["cpu:0", "l4"], max_memory)


def test_device_count_is_capped_before_the_list_is_built() -> None:
    """'x100000000' was a MemoryError; the cap is checked before any device is made."""
    with pytest.raises(DeviceError, match=f"'a100-80gb x100000000' asks for 100000000; .*at most {MAX_DEVICES}"):
        resolve_devices(["a100-80gb x100000000"])
    with pytest.raises(DeviceError, match=f"'a100-80gb x30' asks for 30 after 1000 others; .*at most {MAX_DEVICES}"):
        resolve_devices(["cpu x1000", "a100-80gb x30"])
    many = resolve_devices([f"a100-80gb x{MAX_DEVICES}"])
    assert len(many) == MAX_DEVICES and many[-1].name == f"a100-80gb:{MAX_DEVICES - 1}"
    assert len({id(d.profile) for d in many}) == 1  # one profile read for all of them


def test_integer_max_memory_keys_are_the_plans_gpus_as_in_accelerate() -> None:
    caps: dict[str | int, int | str] = {0: "20GiB", 1: "30GiB", "cpu": "4GiB"}
    gpu0, gpu1, cpu = resolve_devices(["a100-80gb x2", "cpu"], caps)
    assert (gpu0.memory_bytes, gpu1.memory_bytes, cpu.memory_bytes) == (20 * GiB, 30 * GiB, 4 * GiB)
    # The CLI's "--max-memory 0=20GiB" gives the key as text.
    assert [d.memory_bytes for d in resolve_devices(["v100", "l4"], {"1": "1GB"})] == [32 * GiB, 10**9]
    # Accelerate's dicts always cap "cpu" (its offload target): no CPU planned, nothing to cap.
    assert [d.memory_bytes for d in resolve_devices(["a100-80gb x2"], caps)] == [20 * GiB, 30 * GiB]


def test_integer_max_memory_key_past_the_gpus_raises() -> None:
    with pytest.raises(DeviceError, match=r"max_memory key 2: .*the plan has 2 GPU\(s\) \(a100-80gb:0, a100-80gb:1\)"):
        resolve_devices(["a100-80gb x2", "cpu"], {2: "1GB"})


def test_integer_max_memory_key_is_the_cuda_index_with_present_gpus(two_h100: SimpleNamespace) -> None:
    a, b = resolve_devices(["cuda:1", "cuda:0"], {0: "1GB", "1": "2GB"})
    assert (a.name, a.memory_bytes, b.name, b.memory_bytes) == ("cuda:1", 2 * 10**9, "cuda:0", 10**9)


def test_cap_above_the_devices_memory_warns() -> None:
    with pytest.warns(UserWarning, match=r"caps a100-80gb at 186.26 GiB, but its profile 'a100-80gb' gives 80 GiB"):
        resolve_devices(["a100-80gb", "cpu"], {"a100-80gb": "200GB"})
    host = system_memory_bytes()
    with pytest.warns(UserWarning, match=f"caps cpu at .*, but this machine has {re.escape(format_bytes(host))}"):
        resolve_devices(["cpu"], {"cpu": 2 * host})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_devices(["a100-80gb", "cpu"], {"a100-80gb": "80GiB", "cpu": 2**50})  # 1 PiB: no limit


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA H100 PCIe", "nvidia-h100-pcie"),
        ("NVIDIA GH200 480GB", "nvidia-gh200-480gb"),
        ("NVIDIA L40S", "nvidia-l40s"),
    ],
)
def test_cuda_names_match_profiles(name: str, profile: str) -> None:
    props = SimpleNamespace(name=name, major=9, minor=0, multi_processor_count=114, total_memory=80 * GiB)
    assert match_cuda_profile(props).name == profile


def test_unknown_cuda_gpu_gets_profile_derived_from_properties() -> None:
    # An A100 PCIe: 108 SMs at 1.41 GHz, HBM2 at 1215 MHz on a 5120-bit bus.
    props = SimpleNamespace(
        name="NVIDIA A100-PCIE-40GB", major=8, minor=0, multi_processor_count=108, total_memory=42_505_273_344,
        clock_rate=1_410_000, memory_clock_rate=1_215_000, memory_bus_width=5120,
    )  # fmt: skip
    p = match_cuda_profile(props)
    assert p.name == "nvidia-a100-pcie-40gb" and p.peer_link is None and p.memory_bytes == props.total_memory
    assert p.peak_flops.float32 == pytest.approx(19.5e12, rel=0.01)  # datasheet: 19.5 TF
    assert p.peak_flops.bfloat16 == pytest.approx(312e12, rel=0.01)  # datasheet: 312 TF
    assert p.peak_flops.tf32 == pytest.approx(156e12, rel=0.01)
    assert p.memory_bandwidth_Bps == pytest.approx(1555e9, rel=0.001)  # datasheet: 1,555 GB/s
    volta = match_cuda_profile(SimpleNamespace(name="Tesla V100-PCIE-16GB", major=7, minor=0,
                                               multi_processor_count=80, total_memory=16 * GiB))  # fmt: skip
    assert volta.peak_flops.bfloat16 is None and volta.peak_flops.tf32 is None and volta.peak_flops.float16


# --------------------------------------------------------------------------- links


def test_link_cost_picks_the_path() -> None:
    cpu0, cpu1, a0, a1, h, l0, l1 = resolve_devices(["cpu:0", "cpu:1", "a100-80gb x2", "h100-80gb", "l4 x2"])
    assert link_cost(a0, a0) == (0.0, 0.0)
    assert link_cost(a0, a1) == (pytest.approx(1 / (300e9 * 0.85)), 5e-6)  # NVLink
    assert link_cost(a0, cpu0) == link_cost(cpu0, a0) == (pytest.approx(1 / (32e9 * 0.8)), 1e-5)  # PCIe 4
    assert link_cost(h, cpu1) == (pytest.approx(1 / (64e9 * 0.8)), 1e-5)  # PCIe 5
    assert link_cost(l0, l1) == (pytest.approx(2 / (32e9 * 0.8)), pytest.approx(2e-5))  # two hops via host
    assert link_cost(a0, h) == (pytest.approx(1 / (32e9 * 0.8) + 1 / (64e9 * 0.8)), pytest.approx(2e-5))
    assert link_cost(cpu0, cpu1) == (pytest.approx(2 / (20e9 * 0.7)), 5e-6)  # host memcpy reads and writes


# --------------------------------------------------------------------------- byte sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("200MB", 200_000_000),
        ("1.5GiB", 1_610_612_736),
        ("1.5 gib", 1_610_612_736),
        ("2KB", 2000),
        ("2kib", 2048),
        ("4096", 4096),
        ("4096 B", 4096),
        ("1e9", 10**9),
        (".5TB", 500 * 10**9),
        ("1PiB", 2**50),
        ("+5GB", 5 * 10**9),
        ("1_000MB", 10**9),
        (123, 123),
    ],
)
def test_parse_bytes(text: str | int, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize(
    "bad", ["", "MB", "-5MB", "5 ZB", "5 mbps", "1.2.3GB", "nan", "inf GB", "1e400GB", True, 1.5, -1]
)
def test_parse_bytes_rejects(bad: Any) -> None:
    with pytest.raises(DeviceError):
        parse_bytes(bad)


ACCELERATE_SPELLINGS = [
    "200MB", "1.5GiB", "20GB", "20GiB", "20gib", "2KB", "2kB", "512MiB", "1KiB", "0.5GB", 4096, 0,
    "10GB", "10GiB", "1.5GB", "500MB", "10 GB", " 10GB", "1E3MB", "5.GB", ".5GB", "5mB", "1e-3KB", "0.29GB",
    "0.7KiB", "3.3MiB", "+5GB", "1_000MB", "-0GB",
]  # fmt: skip


@pytest.mark.parametrize(("text", "size"), [("0.7KiB", 716), ("3.3MiB", 3_460_300), ("1.0005KB", 1000)])
def test_parse_bytes_drops_a_fraction_of_a_byte_as_accelerate_does(text: str, size: int) -> None:
    """0.7 x 1024 = 716.8: Accelerate's int() gives 716; rounding would give 717."""
    assert parse_bytes(text) == size


def test_every_size_accelerate_reads_parses_to_the_same_bytes() -> None:
    """Any spelling Accelerate accepts gives its number here, or a DeviceError that says why:
    a lowercase 'b' (bits to Accelerate) or a size past 2^63 bytes."""
    convert = pytest.importorskip("accelerate.utils").convert_file_size_to_int
    number = st.from_regex(r"[+-]?(\d{1,4}(_\d{1,3})?)?(\.\d{0,4})?([eE][+-]?\d{1,2})?", fullmatch=True)
    unit = st.from_regex(r"[kKmMgG][iI]?[bB]", fullmatch=True)  # the units Accelerate knows, any case

    @given(st.sampled_from(["", " "]), number, st.sampled_from(["", " "]), unit)
    @settings(max_examples=500, deadline=None)
    def check(lead: str, num: str, gap: str, suffix: str) -> None:
        text = lead + num + gap + suffix
        try:
            expected = convert(text)
        except (ValueError, OverflowError):
            return  # Accelerate refuses it too
        if text.endswith("b") and not text.lower().endswith("ib"):
            with pytest.raises(DeviceError, match="ambiguous: Accelerate reads a lowercase 'b' as bits"):
                parse_bytes(text)
        elif expected > 2**63 - 1:
            with pytest.raises(DeviceError, match="too large"):
                parse_bytes(text)
        else:
            assert parse_bytes(text) == expected, text

    check()


@pytest.mark.parametrize("text", ACCELERATE_SPELLINGS)
def test_parse_bytes_agrees_with_accelerate(text: str | int) -> None:
    convert = pytest.importorskip("accelerate.utils").convert_file_size_to_int
    assert parse_bytes(text) == convert(text)


@pytest.mark.parametrize(("text", "bits"), [("20Gb", "2.5 GB"), ("20gb", "2.5 GB"), ("5 mb", "625 kB"), ("8b", "1 B")])
def test_lowercase_b_is_refused_as_accelerate_reads_bits(text: str, bits: str) -> None:
    message = f"{re.escape(repr(text))} is ambiguous: Accelerate reads a lowercase 'b' as bits \\({bits}\\)"
    with pytest.raises(DeviceError, match=message):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("size", "binary", "text"),
    [(0, True, "0 B"), (1023, True, "1023 B"), (1024, True, "1 KiB"), (1_610_612_736, True, "1.5 GiB"),
     (200_000_000, False, "200 MB"), (2**50 * 3000, True, "3000 PiB")],
)  # fmt: skip
def test_format_bytes(size: int, binary: bool, text: str) -> None:
    assert format_bytes(size, binary=binary) == text


@given(st.integers(min_value=0, max_value=2**62), st.booleans())
def test_format_then_parse_round_trips_within_half_a_percent(size: int, binary: bool) -> None:
    back = parse_bytes(format_bytes(size, binary=binary))
    assert abs(back - size) <= 0.005 * size


def test_link_dataclasses_are_hashable_for_caching() -> None:
    p = load_profile("a100-80gb")
    assert hash(p) == hash(load_profile("a100-80gb"))
    assert isinstance(p.peak_flops, PeakFlops) and isinstance(p.peer_link, Link)
