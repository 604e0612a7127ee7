"""The ``partitioner`` command, run in-process: reports, JSON, options, listings and bad input."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import partitioner
from partitioner import Objective, Plan, Strategy, calibrate
from partitioner.calibrate import default_profile_name
from partitioner.cli import main
from partitioner.devices import DeviceProfile, available_profiles, load_profile
from partitioner.solve import ilp as ilp_module
from partitioner.models import available_models
from tests.models import T5_FACTORY

TWO_GPUS = ["--devices", "a100-80gb x2"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``partitioner *argv``."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def plan_of(capsys: pytest.CaptureFixture[str], *argv: str) -> Plan:
    status, out, err = run(capsys, "plan", *argv, "--json")
    assert status == 0, err
    return Plan.from_json(out)


def test_plan_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "plan", "mlp", *TWO_GPUS)
    assert status == 0, err
    assert out.startswith("partitioner plan for Sequential (7 layers, fx graph, batch 1, ")
    assert "strategy: single on 2 device(s); objective: latency of one inference" in out
    assert "\na100-80gb:0 " in out and "\na100-80gb:1 " in out
    assert "traced in" in err  # progress goes to stderr, the report alone to stdout


def test_json_goes_to_stdout_and_out_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    status, out, err = run(capsys, "plan", "mlp", *TWO_GPUS, "--json", "--out", str(path))
    assert status == 0, err
    plan = Plan.from_json(out)
    assert path.read_text() == out == plan.to_json() + "\n"
    assert [d.name for d in plan.devices] == ["a100-80gb:0", "a100-80gb:1"]
    assert plan.model_name == "Sequential" and plan.batch_size == 1


def test_out_file_with_the_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    status, out, _ = run(capsys, "plan", "mlp", *TWO_GPUS, "--out", str(path))
    assert status == 0
    assert out.startswith("partitioner plan for Sequential")
    assert Plan.from_json(path.read_text()).devices[0].name == "a100-80gb:0"


@pytest.mark.parametrize(
    "flags, training, objective, strategy",
    [
        ([], False, Objective.LATENCY, Strategy.DATA_PARALLEL),
        (["--train"], True, Objective.LATENCY, Strategy.DATA_PARALLEL),
        (["--objective", "throughput"], False, Objective.THROUGHPUT, Strategy.DATA_PARALLEL),
        (["--train", "--objective", "throughput", "--no-data-parallel"], True, Objective.THROUGHPUT, None),
    ],
)
def test_options_reach_the_plan(
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    training: bool,
    objective: Objective,
    strategy: Strategy | None,
) -> None:
    # A batch of 8192 makes replicas the fastest plan, unless --no-data-parallel forbids them.
    plan = plan_of(capsys, "mlp", *TWO_GPUS, "--batch-size", "8192", *flags)
    assert (plan.training, plan.objective, plan.batch_size) == (training, objective, 8192)
    if strategy is None:
        assert plan.strategy is not Strategy.DATA_PARALLEL
    else:
        assert plan.strategy is strategy


def test_max_memory_and_reserve_set_the_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_of(capsys, "mlp", *TWO_GPUS, "--max-memory", "a100-80gb:0=3MB", "--reserve", "0")
    assert [d.capacity_bytes for d in plan.devices] == [3_000_000, 80 * 2**30]
    reserved = plan_of(capsys, "mlp", *TWO_GPUS, "--max-memory", "a100-80gb=1GB")
    assert [d.capacity_bytes for d in reserved.devices] == [900_000_000, 900_000_000]  # --reserve 0.1


def test_max_memory_takes_accelerates_gpu_index(capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_of(capsys, "mlp", *TWO_GPUS, "--max-memory", "0=20GiB", "1=3MB", "--reserve", "0")
    assert [d.capacity_bytes for d in plan.devices] == [20 * 2**30, 3_000_000]


def test_max_memory_above_the_devices_memory_warns(capsys: pytest.CaptureFixture[str]) -> None:
    message = "caps a100-80gb:0, a100-80gb:1 at 186.26 GiB, but its profile 'a100-80gb' gives 80 GiB"
    with pytest.warns(UserWarning, match=message):
        plan_of(capsys, "mlp", *TWO_GPUS, "--max-memory", "a100-80gb=200GB")


def test_leaf_granularity_splits_a_built_in_models_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI passed the model's block classes as split_modules, which kept the blocks whole."""
    plan = plan_of(capsys, "gpt2", *TWO_GPUS, "--seq-len", "8", "--granularity", "leaf")
    names = [layer.name for layer in plan.layers]
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0" not in names


def test_auto_granularity_is_the_default_and_block_keeps_a_built_in_models_blocks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three GPUs cannot share GPT-2's 12 blocks evenly: auto (the default) splits the
    blocks beside the cuts and plans a shorter period; block keeps them whole."""
    args = ["gpt2", "--devices", "a100-80gb x3", "--seq-len", "1024", "--batch-size", "8",
            "--objective", "throughput", "--no-data-parallel"]  # fmt: skip
    block = plan_of(capsys, *args, "--granularity", "block")
    assert block.granularity == "block" and not block.refined
    assert "transformer.h.4" in [layer.name for layer in block.layers]
    auto = plan_of(capsys, *args)
    assert auto.granularity == "auto" and auto.refined and auto.predicted_s < block.predicted_s
    assert len(auto.layers) > len(block.layers) and auto.solver.optimal


def test_schedules_take_torchs_names(capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_of(capsys, "mlp", *TWO_GPUS, "--train", "--global-batch", "8", "--max-microbatches", "2",
                   "--schedules", "ScheduleGPipe")  # fmt: skip
    assert plan.pipeline is not None and plan.pipeline.schedule == "gpipe"


def test_a_model_from_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = tmp_path / "tiny.py"
    source.write_text(
        "import torch\n"
        "class Tiny(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)\n"
        "    def forward(self, x):\n"
        "        return self.b(torch.relu(self.a(x)))\n"
        "def factory():\n"
        "    return Tiny(), (torch.randn(3, 8),)\n"
    )
    plan = plan_of(capsys, f"{source}:factory", "--devices", "cpu")
    assert (plan.model_name, plan.batch_size) == ("Tiny", 3)
    assert [layer.name for layer in plan.layers] == ["a", "b"]


def test_models_lists_the_built_in_models(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "models")
    assert status == 0
    assert out.split() == available_models()
    assert {"mlp", "gpt2", "llama-70b"} <= set(out.split())


def test_profiles_lists_the_device_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "profiles")
    assert status == 0
    assert out.split() == list(available_profiles())
    assert {"cpu", "a100-80gb", "h100-80gb"} <= set(out.split())


FILE_MODEL = "model.py:factory"  # refused before the file is read


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "gpt5", *TWO_GPUS], "unknown model 'gpt5'; available: mlp, gpt2"),
        (["plan", "mlp", "--devices", "z100"], "unknown device 'z100'"),
        (["plan", "mlp", "--devices", "cpu:0", "cpu:0"], "listed twice"),
        (["plan", "mlp", *TWO_GPUS, "--max-memory", "a100-80gb:0"], "DEVICE=SIZE (e.g. cuda:0=20GB), got 'a100-"),
        (["plan", "mlp", *TWO_GPUS, "--max-memory", "a100-80gb:0=lots"], "cannot read 'lots' as a size"),
        (["plan", "mlp", *TWO_GPUS, "--max-memory", "h100-80gb=1GB"], "max_memory key 'h100-80gb' matches no device"),
        (["plan", "mlp", *TWO_GPUS, "--max-memory", "a100-80gb=1kB"], "layer 'fc1' needs"),
        (["plan", "mlp", *TWO_GPUS, "--reserve", "1"], "memory_reserve must be in [0, 1)"),
        (["plan", "mlp", *TWO_GPUS, "--seq-len", "16"], "has no sequence axis"),
        (["plan", FILE_MODEL, *TWO_GPUS, "--batch-size", "4"], "apply to built-in names only"),
        (["plan", "mlp", "--devices", "/dev/zero"], "/dev/zero: is a special file, not a regular file"),
        (["plan", "mlp", "--devices", "a100-80gb x100000000"], "a device list may name at most 1024"),
        (["plan", "mlp", *TWO_GPUS, "--max-memory", "0=20Gb"], "Accelerate reads a lowercase 'b' as bits"),
        (["plan", "mlp", *TWO_GPUS, "--max-memory", "2=20GB"], "the plan has 2 GPU(s)"),
        (["plan", "mlp", *TWO_GPUS, "--train", "--global-batch", "8", "--schedules", "ZBVZeroBubble"],
         "torch has that schedule, but partitioner cannot simulate it"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.startswith("partitioner: error: ")
    assert message in err


TRAIN = ["--train", "--global-batch", "8"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", "{tmp}/missing/plan.json"], "cannot write --out '{tmp}/missing/plan.json': the folder '{tmp}/missing' "
         "does not exist; create it first"),
        (["--out", "{tmp}"], "--out '{tmp}' is a folder; give a file name, e.g. {tmp}/plan.json"),
        ([*TRAIN, "--timeline", "{tmp}/missing/step.png"], "cannot write --timeline '{tmp}/missing/step.png': the "
         "folder '{tmp}/missing' does not exist; create it first"),
        ([*TRAIN, "--timeline", "{tmp}/step.gif"], "--timeline writes .png, .svg or .pdf files, got '{tmp}/step.gif'"),
        ([*TRAIN, "--trace", "{tmp}/step.png"], "--trace writes .json or .json.gz files (Chrome trace JSON), got "
         "'{tmp}/step.png'"),
        ([*TRAIN, "--trace", "{tmp}/missing/step.json"], "cannot write --trace '{tmp}/missing/step.json': the "
         "folder '{tmp}/missing' does not exist; create it first"),
        ([*TRAIN, "--trace", "{tmp}/step.json", "--out", "{tmp}/step.json"], "--out and --trace both name "
         "'{tmp}/step.json'; give each its own file"),
    ],
)
def test_output_paths_are_refused_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], message: str
) -> None:
    status, out, err = run(capsys, "plan", "mlp", *TWO_GPUS, "--json", *(f.format(tmp=tmp_path) for f in flags))
    assert status == 2
    assert out == ""  # no JSON printed before the refusal
    assert err == f"partitioner: error: {message.format(tmp=tmp_path)}\n"  # nothing traced either
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["render_plan_timeline", "write_plan_trace"])
def test_ctrl_c_while_writing_leaves_no_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    def interrupted(plan: Plan, path: Path) -> Path:
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(f"partitioner.report.{writer}", interrupted)
    status, out, err = run(
        capsys, "plan", "mlp", *TWO_GPUS, *TRAIN, "--timeline", str(tmp_path / "step.png"),
        "--trace", str(tmp_path / "step.json"), "--out", str(tmp_path / "plan.json"),
    )
    assert status == 130
    assert out == ""
    assert err.splitlines()[-1] == (
        "partitioner: interrupted; nothing written (--time-limit SECONDS stops the solver early with its best plan)"
    )
    assert list(tmp_path.iterdir()) == []


def test_timeline_and_out_are_written_together(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(
        capsys, "plan", "mlp", *TWO_GPUS, *TRAIN, "--json", "--timeline", str(tmp_path / "step.svg"),
        "--out", str(tmp_path / "plan.json"),
    )
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "step.svg"]
    assert (tmp_path / "plan.json").read_text() == out
    assert (tmp_path / "step.svg").read_text().lstrip().startswith("<?xml")
    assert f"timeline written to {tmp_path / 'step.svg'}" in err


@pytest.mark.parametrize("name", ["step.json", "step.json.gz"])
def test_trace_is_written_beside_the_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str) -> None:
    status, out, err = run(
        capsys, "plan", "mlp", *TWO_GPUS, *TRAIN, "--json", "--trace", str(tmp_path / name),
        "--out", str(tmp_path / "plan.json"),
    )
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plan.json", name])  # no temporary file left
    data = (tmp_path / name).read_bytes()
    trace = json.loads(gzip.decompress(data) if name.endswith(".gz") else data)
    pipeline = Plan.from_json(out).pipeline
    assert pipeline is not None and trace["otherData"]["step_time_s"] == pytest.approx(pipeline.step_time_s)
    assert sum(e["name"] == "process_name" for e in trace["traceEvents"]) == pipeline.num_ranks
    assert f"trace written to {tmp_path / name}: open it in ui.perfetto.dev or chrome://tracing" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--global-batch", "0", "--train"], "argument --global-batch: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--batch-size", "two"], "argument --batch-size: expected a whole number, got 'two'"),
        (["--seq-len", "-8"], "argument --seq-len: must be at least 1, got -8"),
        (["--time-limit", "0"], "argument --time-limit: must be a number of seconds above 0, got '0'"),
        (["--time-limit", "nan"], "argument --time-limit: must be a number of seconds above 0, got 'nan'"),
        (["--time-limit", "inf"], "argument --time-limit: must be a number of seconds above 0, got 'inf'"),
        (["--max-stages", "0"], "argument --max-stages: must be at least 1, got 0"),
        (["--max-virtual-stages", "0"], "argument --max-virtual-stages: must be at least 1, got 0"),
        (["--min-microbatches", "0"], "argument --min-microbatches: must be at least 1, got 0"),
        (["--max-microbatches", "-1"], "argument --max-microbatches: must be at least 1, got -1"),
    ],
)
def test_argparse_refuses_counts_and_limits_below_one(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "mlp", *TWO_GPUS, *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"partitioner plan: error: {message}"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "pulp", "highspy"))
    assert capsys.readouterr().out == f"partitioner {partitioner.__version__} ({versions})\n"


def test_argparse_rejects_an_unknown_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "mlp", *TWO_GPUS, "--objective", "fastest"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_gpt2_small_on_two_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    """The published GPT-2 small, built on meta and traced with torch.export: one layer per block."""
    plan = plan_of(capsys, "gpt2", *TWO_GPUS)
    assert (plan.model_name, plan.frontend, plan.batch_size) == ("GPT2LMHeadModel", "export", 1)
    names = [layer.name for layer in plan.layers]
    assert [n for n in names if n.startswith("transformer.h.")] == [f"transformer.h.{i}" for i in range(12)]
    params = sum(d.param_bytes for d in plan.devices)
    assert params == 4 * 124_439_808  # GPT-2 small's float32 parameters, the tied embedding counted once


# --- partitioner profile ----------------------------------------------------------------------


@pytest.fixture
def measured_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The measurement replaced by the built-in cpu profile under the name asked for; the
    names measured are listed."""
    names: list[str] = []

    def measure(dev: object, dtypes: list[str], quick: bool, name: str, say: object) -> DeviceProfile:
        names.append(name)
        return dataclasses.replace(load_profile("cpu"), name=name)

    monkeypatch.setattr(calibrate, "_measure", measure)
    return names


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", "{tmp}/missing/my-cpu.json"],
         "cannot write --out '{tmp}/missing/my-cpu.json': the folder '{tmp}/missing' does not exist; create it first"),
        (["--out", "{tmp}/a.json", "--name", "b"],
         "--out '{tmp}/a.json' would hold the profile 'b', which is looked up as b.json: write it to {tmp}/b.json "
         "or pass --name a"),
        (["--out", "{tmp}/a.txt"], "--out '{tmp}/a.txt': a profile is a .json file (it is looked up as NAME.json)"),
        (["--name", "my cpu"], "profile name 'my cpu' is not 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"),
        (["--out", "{tmp}/my cpu.json"], "profile name 'my cpu' is not 1-64 of"),
    ],
)
def test_profile_refuses_a_bad_name_or_out_before_measuring(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, measured_names: list[str], flags: list[str], message: str
) -> None:
    status, out, err = run(capsys, "profile", "--device", "cpu", "--quick", *(f.format(tmp=tmp_path) for f in flags))
    assert status == 2
    assert out == ""
    assert err.startswith(f"partitioner: error: {message.format(tmp=tmp_path)}")
    assert measured_names == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", [None, "my-cpu.json"])
def test_a_measured_profile_is_usable_by_the_name_profiles_lists(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    measured_names: list[str],
    out: str | None,
) -> None:
    monkeypatch.chdir(tmp_path)
    status, stdout, err = run(capsys, "profile", "--device", "cpu", "--quick", *(["--out", out] if out else []))
    assert status == 0, err
    # Named after the file, else after the CPU model: never the built-in "cpu" it would replace.
    name = "my-cpu" if out else default_profile_name("cpu")
    assert name != "cpu" and measured_names == [name]
    assert stdout.startswith(f"wrote {name}.json: {name}, float32 ")
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.json"]
    monkeypatch.setenv("PARTITIONER_PROFILE_PATH", str(tmp_path))
    assert name in run(capsys, "profiles")[1].split()
    plan = plan_of(capsys, "mlp", "--devices", f"{name} x2")
    assert [d.name for d in plan.devices] == [f"{name}:0", f"{name}:1"]


def test_a_profile_under_a_built_in_name_replaces_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured_names: list[str]
) -> None:
    status, _, err = run(capsys, "profile", "--device", "cpu", "--quick", "--out", str(tmp_path / "cpu.json"))
    assert status == 0, err
    assert err.splitlines()[0] == (
        "a profile named 'cpu' exists: the new one replaces it where its folder comes first on PARTITIONER_PROFILE_PATH"
    )
    monkeypatch.setenv("PARTITIONER_PROFILE_PATH", str(tmp_path))
    assert load_profile("cpu") == load_profile(tmp_path / "cpu.json")


def test_ctrl_c_while_measuring_exits_130_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object) -> DeviceProfile:
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "_measure", interrupted)
    status, out, err = run(capsys, "profile", "--device", "cpu", "--quick", "--out", str(tmp_path / "my-cpu.json"))
    assert (status, out, err) == (130, "", "partitioner: interrupted; nothing written\n")
    assert list(tmp_path.iterdir()) == []


# --- The solver's phase ------------------------------------------------------------------------


BRANCHY = '''
import random
import torch


class Branchy(torch.nn.Module):
    """Layers that read the previous one and often one further back: a DAG, not a chain."""

    def __init__(self):
        super().__init__()
        rng = random.Random(7)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range({layers}))
        self.skips = [rng.randrange(0, i) if i > 1 and rng.random() < 0.5 else None for i in range({layers})]

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self.layers):
            h = outs[-1] if outs else x
            if self.skips[i] is not None:
                h = h + outs[self.skips[i]]
            outs.append(torch.relu(layer(h)))
        return outs[-1]


def factory():
    return Branchy(), (torch.randn(64, 256),)
'''


def branchy(folder: Path, layers: int) -> str:
    """``file.py:factory`` of a `BRANCHY` model with this many layers of 256 KiB."""
    path = folder / "branchy.py"
    path.write_text(BRANCHY.format(layers=layers))
    return f"{path}:factory"


def test_the_fallback_to_cbc_is_said(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ilp_module, "highs_available", lambda: False)
    # 30 layers (7.5 MiB) in 4 MB per device: in the order listed, the DPs' placements are not
    # proved optimal, the ILP runs (in another order a DP's is, and beats it).
    status, out, err = run(
        capsys, "plan", branchy(tmp_path, 30), "--devices", "a100-80gb", "v100", "l4", "--no-data-parallel",
        "--reserve", "0", "--max-memory", "a100-80gb=4MB", "v100=4MB", "l4=4MB", "--keep-device-order",
    )
    assert status == 0, err
    assert "solver: cbc" in out
    assert err.splitlines()[0] == (
        "HiGHS (highspy) is not installed: solving the placement ILP with CBC, which is slower; pip install highspy"
    )


def test_ctrl_c_during_the_solve_exits_130_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C while HiGHS runs (here for 20 s, with a 600 s limit) stops it: one line, 130, no file."""
    command = [
        sys.executable, "-m", "partitioner.cli", "plan", branchy(tmp_path, 120),
        "--devices", "a100-80gb x2", "v100 x2", "l4 x2", "--objective", "throughput", "--no-data-parallel",
        "--solver", "highs", "--time-limit", "600", "--out", str(tmp_path / "plan.json"),
    ]
    root = Path(__file__).resolve().parents[1]
    # A terminal as far as rich knows, so that the status line (the solver's progress) is drawn.
    env = {**os.environ, "PYTHONPATH": str(root), "TTY_COMPATIBLE": "1", "COLUMNS": "200"}
    cli = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stderr is not None and cli.stdout is not None
    err = bytearray()
    solving = threading.Event()

    def read_stderr() -> None:
        assert cli.stderr is not None
        while chunk := cli.stderr.read1(4096):
            err.extend(chunk)
            if b"HiGHS: " in err:
                solving.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert solving.wait(timeout=300), err.decode(errors="replace")[-2000:]
        cli.send_signal(signal.SIGINT)
        out = cli.stdout.read()
        status = cli.wait(timeout=120)
    finally:
        cli.kill()
    reader.join()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.decode(errors="replace"))  # rich's control sequences
    lines = [line for line in re.split(r"[\r\n]", text) if line.startswith("partitioner")]
    assert status == 130, text[-2000:]
    assert "Traceback" not in text and "terminate called" not in text
    assert lines == [
        "partitioner: interrupted; nothing written (--time-limit SECONDS stops the solver early with its best plan)"
    ]
    assert out == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branchy.py"]

# --- file factories: typed errors, one clear line, plans that apply (issue 12, items 4 and 12) --

_FACTORIES = """
import torch
import transformers


def returns_dict():
    return {"model": torch.nn.Linear(2, 2)}


def needs_args(width):
    return torch.nn.Linear(width, width)


NOT_CALLABLE = 3


def wrong_shape():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), (torch.randn(2, 5),)


""" + T5_FACTORY


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(_FACTORIES)
    return path


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("returns_dict", "returns_dict() returned dict; expected an nn.Module"),
        ("needs_args", "needs_args() takes 1 required argument(s) (width) but is called with none"),
        ("NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
    ],
)
def test_a_bad_factory_exits_2_in_one_line(
    capsys: pytest.CaptureFixture[str], factories: Path, factory: str, message: str
) -> None:
    status, out, err = run(capsys, "plan", f"{factories}:{factory}", "--devices", "cpu")
    assert (status, out) == (2, "")
    assert err.startswith("partitioner: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_a_wrong_input_shape_exits_2_without_torch_logs(capfd: pytest.CaptureFixture[str], factories: Path) -> None:
    status = main(["plan", f"{factories}:wrong_shape", "--devices", "cpu:0", "cpu:1"])
    out, err = capfd.readouterr()
    assert (status, out) == (2, "")
    assert "fake_tensor" not in err and "Traceback" not in err  # torch logged 504 lines here
    assert "a and b must have same reduction dim, but got [2, 5] X [8, 8]" in err and "check their shapes" in err
    assert "<string>" not in err  # torch's generated code is no place to look
    assert len(err.splitlines()) == 3


def test_a_plan_of_a_file_model_on_meta_applies_to_its_real_weights(
    capsys: pytest.CaptureFixture[str], factories: Path
) -> None:
    # The CLI builds the factory's model on meta; T5 ties its embedding and runs sdpa: the plan
    # used to count the embedding four times and to carry another fingerprint.
    import partitioner
    from partitioner.models import build_model

    plan = plan_of(capsys, f"{factories}:t5", "--devices", "cpu:0", "cpu:1")
    module = build_model(f"{factories}:t5", device="cpu")
    pm = partitioner.auto_parallelize(
        module.model, ["cpu:0", "cpu:1"], module.example_args, module.example_kwargs, plan=plan, measure=False
    )
    with torch.no_grad():
        expected = module.model(*module.example_args, **module.example_kwargs).logits
        got = partitioner.to_plain(pm(*module.example_args, **module.example_kwargs).logits)
    torch.testing.assert_close(got, expected)
    assert pm.plan.fingerprint == plan.fingerprint


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`partitioner models | head -0`: stdout closed before the list is written gives exit 141, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "partitioner.cli", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
