"""GPU truth: calibrate a device, then hold the cost model's predictions against measured layers and a step.

One run on an H100 or H200 (under 8 minutes with the default sizes) does issue 16's item 4:

    python -m benchmarks.gpu_truth --device cuda:0 --out benchmarks/results/gpu_truth

1. calibrates the device (`partitioner.calibrate.measure_device`: matmul peaks, the
   efficiency of matmuls by size, memory bandwidth, the launch floor) and writes the profile
   with the date, the driver and torch's version;
2. times every layer of a GPT-2 and a Llama stack of blocks at several batch sizes
   (`partitioner.measure.measure_layers`, forward and backward) and sets each against the
   cost model's prediction from the calibrated profile and from the datasheet profile torch's
   device name matches (`partitioner.cost_model.layer_fwd_bwd_time`);
3. times a GPT-2 medium forward and backward (`partitioner.measure.whole_step_time`) against
   the sum of its predicted layers;
4. writes ``result.json`` (every figure) and ``summary.md`` (the tables) into ``--out``.

The same code runs on ``--device cpu`` with ``--sizes tiny`` in seconds: that is what
``tests/test_benchmarks.py`` runs, so the script cannot rot without a GPU. A budget of
seconds (``--budget-s``) skips the cases that would start after it, and says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from partitioner.analysis import analyze
from partitioner.calibrate import default_profile_name, measure_device, write_profile
from partitioner.cost_model import layer_fwd_bwd_time
from partitioner.devices import DeviceProfile
from partitioner.measure import whole_step_time
from partitioner.options import PlanOptions

__all__ = ["Sizes", "SIZES", "run", "main"]


@dataclass(frozen=True, slots=True)
class Sizes:
    """The models and batches of one run."""

    gpt2: dict[str, int]
    """GPT2Config fields of the GPT-2 stack."""
    llama: dict[str, int]
    """LlamaConfig fields of the Llama stack."""
    seq_len: int
    batches: tuple[int, ...]
    step_model: dict[str, int]
    """GPT2Config fields of the model whose whole step is timed (GPT-2 medium on a GPU)."""
    step_batch: int
    dtype: str
    """Parameter dtype of every model."""
    quick_calibration: bool
    measure_budget_s: float
    """Seconds each case's layer timing may take."""


SIZES = {
    # GPT-2 small's and a 1B Llama's blocks (4 of each), GPT-2 medium (24 x 1024) for the step.
    "gpu": Sizes(
        gpt2={"n_embd": 768, "n_layer": 4, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
        llama={"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16,
               "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 1024},
        seq_len=512,
        batches=(1, 4, 16),
        step_model={"n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
        step_batch=8,
        dtype="bfloat16",
        quick_calibration=False,
        measure_budget_s=30.0,
    ),
    "tiny": Sizes(
        gpt2={"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 100},
        llama={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64},
        seq_len=16,
        batches=(1, 2),
        step_model={"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 100},
        step_batch=2,
        dtype="float32",
        quick_calibration=True,
        measure_budget_s=2.0,
    ),
}  # fmt: skip


def _model(kind: str, config: dict[str, int], dtype: str) -> nn.Module:
    import transformers

    names = {"gpt2": ("GPT2LMHeadModel", "GPT2Config"), "llama": ("LlamaForCausalLM", "LlamaConfig")}
    model_class, config_class = names[kind]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(attn_implementation="sdpa", use_cache=False, **config)
    model: nn.Module = getattr(transformers, model_class)(hf_config)
    return model.to(getattr(torch, dtype)).eval()


def _inputs(vocab: int, batch: int, seq_len: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, vocab, (batch, seq_len), generator=generator),), {"use_cache": False}


def _error(predicted: float, measured: float) -> float:
    """Relative error of a prediction: predicted / measured - 1 (negative: optimistic)."""
    return predicted / measured - 1.0


def _median_abs(errors: Sequence[float]) -> float | None:
    return statistics.median(abs(e) for e in errors) if errors else None


def _layer_case(
    kind: str, config: dict[str, int], batch: int, sizes: Sizes, device: str, calibrated: DeviceProfile
) -> dict[str, Any]:
    """Every layer of one model at one batch: measured, predicted (calibrated), predicted (datasheet)."""
    model = _model(kind, config, sizes.dtype)
    args, kwargs = _inputs(config["vocab_size"], batch, sizes.seq_len)
    options = PlanOptions(training=True, allow_data_parallel=False)
    analysis = analyze(model, [device], args, kwargs, options=options, measure_budget_s=sizes.measure_budget_s)
    datasheet = analysis.devices[0].profile
    rows = []
    for layer in analysis.layered.graph.layers:
        fwd_m, bwd_m = layer.fwd_time_s.get(datasheet.name), layer.bwd_time_s.get(datasheet.name)
        if fwd_m is None or bwd_m is None or fwd_m + bwd_m <= 0:
            continue  # not timed (budget) or nothing to time
        estimate = replace(layer, fwd_time_s={}, bwd_time_s={})
        cal = layer_fwd_bwd_time(estimate, calibrated, analysis.dtype)
        sheet = layer_fwd_bwd_time(estimate, datasheet, analysis.dtype)
        rows.append({
            "layer": layer.name, "kernels": layer.fwd_kernels, "measured_s": [fwd_m, bwd_m],
            "calibrated_s": list(cal), "datasheet_s": list(sheet),
            "calibrated_error": _error(sum(cal), fwd_m + bwd_m), "datasheet_error": _error(sum(sheet), fwd_m + bwd_m),
        })  # fmt: skip
    return {
        "model": kind, "batch": batch, "seq_len": sizes.seq_len, "datasheet_profile": datasheet.name,
        "layers": rows,
        "median_calibrated_error": _median_abs([r["calibrated_error"] for r in rows]),
        "median_datasheet_error": _median_abs([r["datasheet_error"] for r in rows]),
    }  # fmt: skip


def _step_case(sizes: Sizes, device: str, calibrated: DeviceProfile) -> dict[str, Any]:
    """A whole forward and backward of the step model, against the sum of its predicted layers."""
    model = _model("gpt2", sizes.step_model, sizes.dtype)
    args, kwargs = _inputs(sizes.step_model["vocab_size"], sizes.step_batch, sizes.seq_len)
    options = PlanOptions(training=True, allow_data_parallel=False)
    analysis = analyze(model, [device], args, kwargs, options=options, measure=False)
    layers = analysis.layered.graph.layers
    predicted = sum(sum(layer_fwd_bwd_time(layer, calibrated, analysis.dtype)) for layer in layers)
    datasheet = sum(sum(layer_fwd_bwd_time(layer, analysis.devices[0].profile, analysis.dtype)) for layer in layers)
    on_device = model.to(device)
    args = tuple(a.to(device) for a in args)
    _, measured = whole_step_time(on_device, args, kwargs)
    del on_device
    return {
        "model": "gpt2", "config": sizes.step_model, "batch": sizes.step_batch, "seq_len": sizes.seq_len,
        "measured_s": measured, "calibrated_s": predicted, "datasheet_s": datasheet,
        "calibrated_error": _error(predicted, measured), "datasheet_error": _error(datasheet, measured),
    }  # fmt: skip


def _environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "driver": None,
        "cuda": torch.version.cuda,
    }
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            env["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown (nvidia-smi failed)"
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def run(device: str, sizes: Sizes, out: Path, budget_s: float = 420.0) -> dict[str, Any]:
    """Calibrate `device`, compare layers and a step, write ``result.json``, ``summary.md`` and the profile into `out`.

    Returns:
        The result, as written to ``result.json``.
    """
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(device)
    profile = measure_device(
        device, dtypes=("float32", "tf32", "bfloat16"), quick=sizes.quick_calibration,
        name=f"{default_profile_name(device)}-measured", progress=print,
    )  # fmt: skip
    profile = replace(profile, description=f"{profile.description}; torch {env['torch']}, driver {env['driver']}")
    profile_path = write_profile(profile, out / f"{profile.name}.json")
    cases: list[dict[str, Any]] = []
    skipped: list[str] = []
    for kind, config in (("gpt2", sizes.gpt2), ("llama", sizes.llama)):
        for batch in sizes.batches:
            if time.perf_counter() - start > budget_s:
                skipped.append(f"{kind} batch {batch}")
                continue
            print(f"layers: {kind} batch {batch}")
            cases.append(_layer_case(kind, config, batch, sizes, device, profile))
    step = None
    if time.perf_counter() - start > budget_s:
        skipped.append("step")
    else:
        print("step: gpt2 forward and backward")
        step = _step_case(sizes, device, profile)
    all_errors = [r["calibrated_error"] for c in cases for r in c["layers"]]
    result = {
        "environment": env,
        "profile": profile_path.name,
        "launch_s": profile.launch_s,
        "gemm_efficiency": [list(p) for p in profile.gemm_efficiency],
        "layer_cases": cases,
        "median_layer_error_calibrated": _median_abs(all_errors),
        "median_layer_error_datasheet": _median_abs([r["datasheet_error"] for c in cases for r in c["layers"]]),
        "step": step,
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - start,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "summary.md").write_text(summary(result))
    return result


def _pct(x: float | None) -> str:
    """A signed error (``+12%``, ``-27%``)."""
    return "-" if x is None else f"{x:+.0%}"


def _abs_pct(x: float | None) -> str:
    """A median of absolute errors (``12%``)."""
    return "-" if x is None else f"{x:.0%}"


def summary(result: dict[str, Any]) -> str:
    """The result as Markdown: environment, per-case layer errors, the step."""
    env = result["environment"]
    lines = [
        "# GPU truth: predicted against measured",
        "",
        f"{env['date']}: {env['device_name']} ({env['device']}), driver {env['driver']}, CUDA {env['cuda']}, "
        f"torch {env['torch']}. Profile `{result['profile']}`: launch floor {result['launch_s'] * 1e6:.3g} us.",
        "",
        "Errors are predicted / measured - 1 (negative: optimistic), forward plus backward of each layer;",
        "medians of their absolute values. *calibrated*: the roofline on the measured profile; *datasheet*:",
        "on the built-in profile the device's name matches.",
        "",
        "| model | batch | layers timed | median error, calibrated | median error, datasheet |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in result["layer_cases"]:
        lines.append(
            f"| {c['model']} | {c['batch']} | {len(c['layers'])} | {_abs_pct(c['median_calibrated_error'])} | "
            f"{_abs_pct(c['median_datasheet_error'])} |"
        )
    lines += [
        f"| all | | | {_abs_pct(result['median_layer_error_calibrated'])} | "
        f"{_abs_pct(result['median_layer_error_datasheet'])} |",
        "",
    ]
    step = result["step"]
    if step is not None:
        lines += [
            f"Step (GPT-2 {step['config']['n_layer']} x {step['config']['n_embd']}, batch {step['batch']}, "
            f"sequence {step['seq_len']}, forward + backward): measured {step['measured_s'] * 1e3:.3f} ms, "
            f"calibrated {step['calibrated_s'] * 1e3:.3f} ms ({_pct(step['calibrated_error'])}), "
            f"datasheet {step['datasheet_s'] * 1e3:.3f} ms ({_pct(step['datasheet_error'])}).",
            "",
        ]
    if result["skipped"]:
        lines += [f"Skipped for the time budget: {', '.join(result['skipped'])}.", ""]
    lines.append(f"Run took {result['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    parser.add_argument("--sizes", default=None, choices=sorted(SIZES), help="default: gpu on CUDA, tiny on cpu")
    parser.add_argument(
        "--out", default="benchmarks/out/gpu_truth", help="folder for result.json, summary.md and the profile"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    args = parser.parse_args(argv)
    sizes = SIZES[args.sizes or ("gpu" if args.device.startswith("cuda") else "tiny")]
    result = run(args.device, sizes, Path(args.out), args.budget_s)
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
