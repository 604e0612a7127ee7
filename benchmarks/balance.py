"""How even a pipeline's stages are at the planner's default granularity, as users get it.

    python -m benchmarks.balance                       # every case (about 5 minutes on 2 cores)
    python -m benchmarks.balance --only gpt2 llama-7b
    python -m benchmarks.balance --out benchmarks/out/balance   # elsewhere (RESULTS.md untouched)

The suites judge balance on block-level tables, one trace shared by every device set
(benchmarks/README.md, the ``bound`` target). A user's ``compile_plan`` runs at ``auto``
granularity instead: blocks first, then the layers beside the cuts refined, and a linear
layer heavier than total / devices cut into column pieces
(`partitioner.api.refine_and_solve`, `partitioner.split_layers`). Here each case is planned
that way, data parallelism off (a pipeline: what balance is about), and at block
granularity beside it, on 8 A100-80GB, in inference throughput and training (Adam), with
the suites' batch sizes, built on the meta device and priced from the profiles (nothing
is measured). Per case: the busiest device's period (its compute or link traffic) over
total compute / devices of the plan's layers (the even share), the largest layer or
piece over that share, the layers solved, what was cut, and the seconds taken.

Targets (issue "Placement that never gets worse with more devices", done-when): the
busiest stage within 1.05x of the even share on GPT-2 XL, Llama-7B and BERT-large, within
1.30x on GPT-2 small (its vocabulary head alone is 2.2x the share at block granularity).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from partitioner.api import compile_plan
from partitioner.options import Granularity, Objective, Optimizer, PlanOptions
from partitioner.plan import Plan

from benchmarks.models import build
from benchmarks.suites import MODELS

__all__ = ["CASES", "TARGETS", "DEVICES", "balance_record", "run_case", "render", "main"]

_ROOT = Path(__file__).resolve().parents[1]

DEVICES = "a100-80gb x8"
TARGETS = {"gpt2": 1.30, "gpt2-xl": 1.05, "bert-large": 1.05, "llama-7b": 1.05}
"""Model -> the most the busiest stage may be over the even share at the default granularity."""
CASES = tuple((model, mode) for model in TARGETS for mode in ("inference-throughput", "training"))


def _options(mode: str) -> PlanOptions:
    training = mode == "training"
    return PlanOptions(objective=Objective.THROUGHPUT, training=training, allow_data_parallel=False,
                       optimizer=Optimizer.ADAM if training else Optimizer.SGD)


def balance_record(plan: Plan) -> dict[str, float]:
    """The busiest device's period and the largest layer, each over the even share of `plan`'s layers."""
    periods = [max(d.compute_s, d.transfer_in_s, d.transfer_out_s) for d in plan.devices]
    even = sum(layer.compute_s for layer in plan.layers) / len(plan.devices)
    largest = max(layer.compute_s for layer in plan.layers)
    return {"even_share_s": even, "busiest_s": max(periods), "busiest_over_even": max(periods) / even,
            "largest_over_even": largest / even}


def run_case(model: str, mode: str, granularity: Granularity) -> dict[str, Any]:
    """Plan one case at `granularity` and measure its balance."""
    built = build(MODELS[model])
    start = time.perf_counter()
    compiled = compile_plan(built.model, [DEVICES], built.example_args, built.example_kwargs,
                            options=_options(mode), granularity=granularity, measure=False,
                            no_split_module_classes=built.no_split_module_classes)
    seconds = time.perf_counter() - start
    plan = compiled.plan
    return {
        "model": model, "mode": mode, "granularity": granularity.value, "layers": len(plan.layers),
        "refined": len(plan.refined), "split": [f"{s.module} in {s.pieces}" for s in plan.split],
        "period_s": plan.predicted_s, "optimal": compiled.solution.optimal, "seconds": seconds,
        "solve_s": compiled.timings_s.get("solve_s", 0.0), **balance_record(plan),
    }


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"## Balance at the default granularity ({DEVICES}, data parallelism off)\n",
        "`python -m benchmarks.balance` (benchmarks/balance.py says what each figure is). "
        "busiest / even: the busiest device's period over total compute / devices of the plan's layers.\n",
        "| model | mode | granularity | layers | refined | split | period | busiest / even | largest / even "
        "| target | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    for r in rows:
        target = TARGETS[r["model"]] if r["granularity"] == "auto" else None
        verdict = "" if target is None else (f"<= {target:.2f}: " + ("PASS" if r["busiest_over_even"] <= target + 1e-9
                                                                     else "FAIL"))
        if target is not None and r["busiest_over_even"] > target + 1e-9:
            misses.append(f"{r['model']} / {r['mode']}: {r['busiest_over_even']:.3f}x")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['granularity']} | {r['layers']} | {r['refined']} | "
            f"{', '.join(r['split']) or '-'} | {r['period_s'] * 1e3:.2f} ms | {r['busiest_over_even']:.3f}x | "
            f"{r['largest_over_even']:.3f}x | {verdict or '-'} | {r['seconds']:.1f} |"
        )
    auto = [r for r in rows if r["granularity"] == "auto"]
    lines.append("")
    lines.append(f"{len(auto) - len(misses)} of {len(auto)} case(s) at auto granularity within target"
                 + (f"; misses: {'; '.join(misses)}" if misses else "") + ".")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.run import write_summary

    parser = argparse.ArgumentParser(prog="python -m benchmarks.balance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="model names to run")
    parser.add_argument("--render-only", action="store_true", help="run nothing: rewrite summary.md from OUT/result.json")
    parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "balance"),
                        help="folder for result.json and summary.md (the default also regenerates benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.render_only:
        rows = json.loads((out / "result.json").read_text())["rows"]
    else:
        rows = []
        for model, mode in CASES:
            if args.only and model not in args.only:
                continue
            for granularity in (Granularity.BLOCK, Granularity.AUTO):
                rows.append(run_case(model, mode, granularity))
                r = rows[-1]
                say(f"{model} / {mode} / {granularity.value}: busiest {r['busiest_over_even']:.3f}x the even share, "
                    f"{r['layers']} layers, {r['seconds']:.1f} s")
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"devices": DEVICES, "rows": rows}, indent=1) + "\n")
    write_summary(out, render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
