"""The ``partitioner`` command, run in-process: reports, JSON, options, listings and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


def t5():
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, (ids,), {"decoder_input_ids": ids[:, :6].clone(), "use_cache": False}
"""


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
