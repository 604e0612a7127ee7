"""benchmarks/gpu_truth.py on the CPU with tiny sizes: the code path a GPU run takes, so it cannot rot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.gpu_truth import SIZES, main, run
from partitioner.devices import load_profile


def test_gpu_truth_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    result = run("cpu", SIZES["tiny"], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written == json.loads(json.dumps(result))
    env = written["environment"]
    assert env["torch"] and env["date"] and env["device"] == "cpu"
    profile = load_profile(tmp_path / "out" / written["profile"])
    assert profile.calibrated and profile.launch_s > 0 and profile.gemm_efficiency
    assert "torch" in profile.description and "driver" in profile.description
    # Every model at every batch, each layer measured and predicted twice.
    assert [(c["model"], c["batch"]) for c in written["layer_cases"]] == [
        ("gpt2", 1), ("gpt2", 2), ("llama", 1), ("llama", 2)
    ]
    for case in written["layer_cases"]:
        assert case["layers"], case["model"]
        for row in case["layers"]:
            assert sum(row["measured_s"]) > 0 and row["kernels"] > 0
            assert math.isclose(row["calibrated_error"], sum(row["calibrated_s"]) / sum(row["measured_s"]) - 1)
    step = written["step"]
    assert step["measured_s"] > 0 and step["calibrated_s"] > 0
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| gpt2 | 1 |" in text and "| llama | 2 |" in text and "Step (GPT-2 2 x 32, batch 2" in text
    assert written["skipped"] == []


def test_gpu_truth_budget_skips_the_cases_and_says_so(tmp_path: Path) -> None:
    assert main(["--device", "cpu", "--sizes", "tiny", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["layer_cases"] == [] and written["step"] is None
    assert written["skipped"] == ["gpt2 batch 1", "gpt2 batch 2", "llama batch 1", "llama batch 2", "step"]
    assert "Skipped for the time budget: gpt2 batch 1" in (tmp_path / "summary.md").read_text()
