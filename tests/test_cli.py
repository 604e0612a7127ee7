"""The ``partitioner`` command, run in-process: reports, JSON, options, listings and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from partitioner import Objective, Plan, Strategy
from partitioner.cli import main
from partitioner.devices import available_profiles
from partitioner.models import available_models

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
        (["plan", "mlp", *TWO_GPUS, "--batch-size", "0"], "batch_size must be at least 1"),
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


def test_unwritable_out_file_exits_2_after_the_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "missing" / "plan.json"
    status, out, err = run(capsys, "plan", "mlp", *TWO_GPUS, "--out", str(target))
    assert status == 2
    assert out.startswith("partitioner plan for Sequential")
    assert f"cannot write --out '{target}': No such file or directory" in err


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
