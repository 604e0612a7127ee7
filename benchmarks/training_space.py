"""The training space against a published table and experts' set-ups, on the same simulator.

    python -m benchmarks.training_space                      # both parts (about 15 minutes on 2 cores)
    python -m benchmarks.training_space --part megatron      # Megatron-LM Table 1 only
    python -m benchmarks.training_space --part experts --only gpt3-175b
    python -m benchmarks.training_space --out benchmarks/out/training_space   # elsewhere (RESULTS.md untouched)

**Megatron-LM Table 1** (Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", SC'21): ten GPT models (1.7B to 1T, sequence
2048, vocabulary 51,200) trained on 32 to 3,072 A100-80GB (DGX A100 nodes of 8, HDR
InfiniBand: the ``a100-4x8-ib`` profile with as many nodes as the row needs) with fp16
mixed precision, Adam and full activation recomputation, at the row's tensor-, pipeline-
and data-parallel degrees. Each row is priced at exactly that configuration
(`partitioner.parallel_config`: ``tp, pp, dp, recompute=full, shard=none``; the planner
picks the microbatches and schedule within it, as the paper tuned them). Its data
parallelism all-reduces whole gradients: the paper's PTD-P holds no ZeRO sharding (it
compares itself with ZeRO-3 apart, its section 5.2), and Megatron-LM's own data-parallel
module of that time all-reduced the gradients after the backward
(``DistributedDataParallel.allreduce_gradients`` in ``megatron/model/distributed.py``),
which the planner's default (`TrainingOptions.overlap_allreduce` False) prices. Its per-GPU TFLOP/s
is computed the paper's way (its equation 3, recomputation counted)::

    FLOPs per step = 96 B s l h^2 (1 + s / 6h + V / 16 l h)

next to the published figure. Beside it, the planner's own best plan for the same model
on the same GPUs.

**Expert baselines** (issue 14, item 7): what an expert configures by hand, each the best
plan of its sub-space (`TrainingOptions.config` and the options named below), against the
planner's plan of the whole space:

- *Megatron grid*: TP in {1, 2, 4, 8} inside a node x PP x DP x microbatches, full
  recompute, equal layers per stage, no sharding (Megatron-LM's hand-tuned search);
- *FSDP only*: one stage, ZeRO-3 (``fully_shard``, reshard after forward), selective
  recompute (torchtitan's 1-D default);
- *DeepSpeed PP x DP*: pipeline stages x replicas with ZeRO-1 or none, no TP, 1F1B, the best
  data-parallel degree; its ZeRO-1 holds what DeepSpeed's does (whole weights and
  gradients, 1/d of the optimizer state: ``TrainingOptions(zero1_weight_shard=False)``),
  not the 1/d weight shard FSDP2 keeps beside them as partitioner.distributed runs it;
- *ZeRO-3*: one stage, parameters sharded, no TP, the cheapest recompute that fits;
- *SPMD (AutoParallel's space)*: one stage on the whole mesh, any TP degree and sharding.
  PyTorch's AutoParallel (meta-pytorch/autoparallel) picks a DTensor placement per op on
  one homogeneous mesh with no pipeline stages; on transformer blocks its choices are
  FSDP's and Megatron's placements (batch and parameters sharded on the data-parallel
  mesh dimension, column/row pairs on the tensor-parallel one), which is this sub-space.
  It is not installable here (git-only, nightly torch), so its space is priced, not run.

Nothing runs on a GPU: models are built on the meta device and priced from the device
profiles (roofline), so the figures compare configurations on one cost model and test that
cost model against a published measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from partitioner.cluster import Cluster, cluster_from_dict
from partitioner.errors import InfeasibleError
from partitioner.models import MEGATRON_GPTS, build_model
from partitioner.options import Optimizer, Precision, Recompute, Sharding, TrainingOptions
from partitioner.parallel_config import ParallelConfig
from partitioner.plan import PipelinePlan
from partitioner.simulate import PipelineSchedule
from partitioner.training import TrainingCompiled, compile_training, replan_training

__all__ = ["MegatronRow", "MEGATRON_TABLE_1", "megatron_flops", "a100_cluster", "EXPERTS", "ExpertCase", "CASES", "main"]

_ROOT = Path(__file__).resolve().parents[1]
_VOCAB = 51200
_SEQ = 2048


@dataclass(frozen=True, slots=True)
class MegatronRow:
    """One row of Narayanan et al. 2021, Table 1."""

    size: str
    """Key of `partitioner.models.MEGATRON_GPTS` (model ``megatron-gpt-<size>``)."""
    tp: int
    pp: int
    dp: int
    batch: int
    tflops: float
    """Published achieved TFLOP/s per GPU."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


MEGATRON_TABLE_1 = (
    MegatronRow("1.7b", 1, 1, 32, 512, 137),
    MegatronRow("3.6b", 2, 1, 32, 512, 138),
    MegatronRow("7.5b", 4, 1, 32, 512, 142),
    MegatronRow("18b", 8, 1, 32, 1024, 135),
    MegatronRow("39b", 8, 2, 32, 1536, 138),
    MegatronRow("76b", 8, 4, 32, 1792, 140),
    MegatronRow("146b", 8, 8, 24, 2304, 148),
    MegatronRow("310b", 8, 16, 15, 2160, 155),
    MegatronRow("530b", 8, 35, 9, 2520, 163),
    MegatronRow("1t", 8, 64, 6, 3072, 163),
)
"""Narayanan et al. 2021, Table 1: size, tensor-, pipeline-, data-parallel degrees, global
batch, achieved TFLOP/s per GPU (sequence 2048, vocabulary 51,200, fp16, full recompute)."""


def megatron_flops(size: str, batch: int, seq: int = _SEQ, vocab: int = _VOCAB) -> float:
    """FLOPs of one step as Megatron-LM counts them (its equation 3: forward, backward and
    the recomputed forward): ``96 B s l h^2 (1 + s / 6h + V / 16 l h)``."""
    hidden, layers, _ = MEGATRON_GPTS[size]
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def a100_cluster(gpus: int) -> Cluster:
    """``a100-4x8-ib`` (DGX A100 80GB nodes, NVLink inside, 200 Gb/s HDR per GPU between)
    with ``gpus / 8`` nodes (Selene's layout)."""
    return _nodes_of("a100-4x8-ib", "a100", gpus)


def _nodes_of(profile: str, kind: str, gpus: int) -> Cluster:
    """Cluster profile `profile` (nodes of 8 GPUs) with ``gpus / 8`` nodes."""
    if gpus % 8:
        raise ValueError(f"{gpus} GPUs is not a whole number of 8-GPU nodes")
    data = json.loads((_ROOT / "profiles" / "clusters" / f"{profile}.json").read_text())
    data["nodes"][0]["count"] = gpus // 8
    data["name"] = f"{kind}-{gpus // 8}x8-ib"
    return cluster_from_dict(data, where=data["name"])


def _compile(model: str, cluster: Cluster, batch: int, seq: int, options: TrainingOptions) -> TrainingCompiled:
    built = build_model(model, batch_size=1, seq_len=seq)
    return compile_training(
        built.model,
        cluster,
        built.example_args,
        built.example_kwargs,
        global_batch=batch,
        options=options,
        split_modules=built.no_split_module_classes,
        measure=False,
    )


def _plan_record(plan: PipelinePlan | None, why: str, solve_s: float) -> dict[str, Any]:
    if plan is None:
        return {"status": "infeasible", "reason": why, "solve_s": solve_s}
    return {
        "status": "ok",
        "description": plan.description,
        "family": plan.family,
        "step_s": plan.step_time_s,
        "mfu": plan.mfu,
        "bound_s": plan.bound_s,
        "solve_s": solve_s,
    }


def megatron_rows(only: Sequence[str], progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each Table 1 row priced at its configuration, and the planner's plan beside it."""
    out = []
    base = TrainingOptions(
        precision=Precision.FP16, optimizer=Optimizer.ADAM, max_microbatches=512, memory_reserve=0.1
    )
    for row in MEGATRON_TABLE_1:
        model = f"megatron-gpt-{row.size}"
        if only and model not in only and row.size not in only:
            continue
        cluster = a100_cluster(row.gpus)
        config = ParallelConfig(tp=row.tp, pp=row.pp, dp=row.dp, recompute=Recompute.ALWAYS, shard=Sharding.NONE)
        fixed = replace(base, config=config)
        record: dict[str, Any] = {"model": model, **asdict(row), "gpus": row.gpus}
        start = time.perf_counter()
        compiled: TrainingCompiled | None = None
        try:  # the tables of the whole space, so the published configuration is priced from the same
            compiled = _compile(model, cluster, row.batch, _SEQ, base)
            record["planner"] = _plan_record(compiled.plan.pipeline, "", time.perf_counter() - start)
        except InfeasibleError as e:
            record["planner"] = _plan_record(None, str(e), time.perf_counter() - start)
        start = time.perf_counter()
        try:
            configured = (
                replan_training(compiled, cluster, fixed) if compiled else _compile(model, cluster, row.batch, _SEQ, fixed)
            )
            plan = configured.plan.pipeline
            assert plan is not None
            record["configured"] = _plan_record(plan, "", time.perf_counter() - start)
            predicted = megatron_flops(row.size, row.batch) / (plan.step_time_s * row.gpus) / 1e12
            record["predicted_tflops"] = predicted
            record["error"] = predicted / row.tflops - 1
        except InfeasibleError as e:
            record["configured"] = _plan_record(None, str(e), time.perf_counter() - start)
        progress(_row_line(record))
        out.append(record)
    return out


def _row_line(r: dict[str, Any]) -> str:
    got = f"{r['predicted_tflops']:.0f} TFLOP/s ({r['error']:+.0%})" if "predicted_tflops" in r else r["configured"]["status"]
    return f"{r['model']} tp={r['tp']},pp={r['pp']},dp={r['dp']}: published {r['tflops']:.0f}, predicted {got}"


@dataclass(frozen=True, slots=True)
class ExpertCase:
    model: str
    cluster: str
    """A cluster profile name, or ``a100-<N>`` / ``h100-<N>`` for N GPUs in 8-GPU nodes."""
    batch: int
    seq: int


CASES = (
    ExpertCase("gpt3-175b", "h100-8x8-ib", 1536, 2048),
    ExpertCase("llama3-8b", "a100-8", 1024, 4096),
    ExpertCase("llama3-8b", "h100-64", 1024, 4096),
    ExpertCase("llama3-8b", "a100-256", 1024, 4096),
    ExpertCase("llama2-70b", "a100-8", 1024, 4096),
    ExpertCase("llama2-70b", "h100-64", 1024, 4096),
    ExpertCase("llama2-70b", "a100-256", 1024, 4096),
    ExpertCase("llama-70b", "h100-8", 1024, 4096),
    ExpertCase("llama-70b", "a100-64", 1024, 4096),
    ExpertCase("llama-70b", "h100-256", 1024, 4096),
)
"""GPT-3 175B on 64 H100 (the issue's headline); Llama 3 8B, Llama 2 70B and Llama 3 70B on 8, 64 and 256 GPUs."""


def _cluster(name: str) -> Cluster:
    kind, _, count = name.partition("-")
    if kind in ("a100", "h100") and count.isdigit():
        return _nodes_of("a100-4x8-ib" if kind == "a100" else "h100-8x8-ib", kind, int(count))
    from partitioner.cluster import load_cluster

    return load_cluster(name)


EXPERTS: dict[str, Callable[[TrainingOptions], TrainingOptions]] = {
    "Megatron grid": lambda o: replace(
        o,
        recompute=Recompute.ALWAYS,
        shardings=(Sharding.NONE,),
        schedules=(PipelineSchedule.ONE_F_ONE_B, PipelineSchedule.INTERLEAVED_1F1B),
        config=ParallelConfig(split="equal"),
    ),
    "FSDP only": lambda o: replace(
        o, recompute=Recompute.SELECTIVE, tensor_parallel=(1,), config=ParallelConfig(pp=1, tp=1, shard=Sharding.ZERO3)
    ),
    "DeepSpeed PP x DP": lambda o: replace(
        o,
        tensor_parallel=(1,),
        shardings=(Sharding.NONE, Sharding.ZERO1),
        schedules=(PipelineSchedule.ONE_F_ONE_B,),
        zero1_weight_shard=False,
    ),
    "ZeRO-3": lambda o: replace(o, tensor_parallel=(1,), config=ParallelConfig(pp=1, tp=1, shard=Sharding.ZERO3)),
    "SPMD (AutoParallel's space)": lambda o: replace(o, config=ParallelConfig(pp=1)),
}
"""Each expert's sub-space, as options narrowing the planner's (see the module docstring)."""


def expert_cases(only: Sequence[str], progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """The planner's plan of the whole space and each expert's best plan, per case."""
    out = []
    base = TrainingOptions(optimizer=Optimizer.ADAM, max_microbatches=512)
    for case in CASES:
        if only and case.model not in only:
            continue
        cluster = _cluster(case.cluster)
        record: dict[str, Any] = {**asdict(case), "devices": cluster.num_devices}
        start = time.perf_counter()
        try:
            compiled = _compile(case.model, cluster, case.batch, case.seq, base)
            record["planner"] = _plan_record(compiled.plan.pipeline, "", compiled.timings_s.get("plan", 0.0))
            record["plan_s"] = time.perf_counter() - start
        except InfeasibleError as e:
            record["planner"] = _plan_record(None, str(e), time.perf_counter() - start)
            compiled = None
        experts = {}
        for name, narrow in EXPERTS.items():
            start = time.perf_counter()
            try:
                if compiled is None:
                    raise InfeasibleError("the planner found no plan, so neither can a sub-space")
                got = replan_training(compiled, cluster, narrow(base))
                experts[name] = _plan_record(got.plan.pipeline, "", time.perf_counter() - start)
            except InfeasibleError as e:
                experts[name] = _plan_record(None, str(e), time.perf_counter() - start)
        record["experts"] = experts
        steps = [e["step_s"] for e in experts.values() if e["status"] == "ok"]
        if steps and record["planner"]["status"] == "ok":
            record["vs_best_expert"] = min(steps) / record["planner"]["step_s"]
        progress(f"{case.model} on {case.cluster}: " + ", ".join(
            f"{k} {v['step_s']:.3g} s" if v["status"] == "ok" else f"{k} -" for k, v in
            {"planner": record["planner"], **experts}.items()))
        out.append(record)
    return out


def render(result: dict[str, Any]) -> str:
    """The Markdown tables of a run."""
    lines = []
    rows = result.get("megatron", [])
    if rows:
        lines += [
            "## Megatron-LM Table 1, priced at its configurations",
            "",
            "Narayanan et al. 2021 (SC'21), Table 1: fp16, Adam, full recompute, sequence 2048, vocabulary 51,200, "
            "A100-80GB in DGX nodes of 8, data parallelism without ZeRO (gradients all-reduced after the backward). "
            "Predicted TFLOP/s per GPU = the paper's FLOPs per step (its equation 3) / (predicted step x GPUs).",
            "",
            "| model | GPUs | tp | pp | dp | batch | published TFLOP/s | predicted | error | planner's own plan "
            "| its step / configured | planning s (build, trace, plan) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            predicted = f"{r['predicted_tflops']:.0f}" if "predicted_tflops" in r else r["configured"]["status"]
            error = f"{r['error']:+.0%}" if "error" in r else "-"
            own = r["planner"]
            ratio = (
                f"{own['step_s'] / r['configured']['step_s']:.2f}"
                if own["status"] == "ok" and r["configured"]["status"] == "ok" else "-"
            )
            lines.append(
                f"| {r['model']} | {r['gpus']} | {r['tp']} | {r['pp']} | {r['dp']} | {r['batch']} | {r['tflops']:.0f} "
                f"| {predicted} | {error} | {own.get('description', own['status'])} | {ratio} | {own['solve_s']:.1f} |"
            )
        errors = [abs(r["error"]) for r in rows if "error" in r]
        if errors:
            lines += ["", f"Worst error {max(errors):.0%} over {len(errors)} rows (target: within 15%)."]
        lines.append("")
    cases = result.get("experts", [])
    if cases:
        names = list(EXPERTS)
        lines += [
            "## The plan against experts' set-ups",
            "",
            "Step time in seconds (MFU); each expert is the best plan of its sub-space on the same simulator. "
            "`best expert / plan` >= 1.00 means the plan is at least as fast as the best of them.",
            "",
            "| model | devices | batch x seq | plan | " + " | ".join(names) + " | best expert / plan | planning s |",
            "|---|---|---|---|" + "---|" * len(names) + "---|---|",
        ]
        for r in cases:
            def cell(p: dict[str, Any]) -> str:
                return f"{p['step_s']:.3g} ({p['mfu']:.0%})" if p["status"] == "ok" else "does not fit"

            ratio = f"{r['vs_best_expert']:.2f}" if "vs_best_expert" in r else "-"
            plan = r["planner"]
            lines.append(
                f"| {r['model']} | {r['cluster']} ({r['devices']}) | {r['batch']} x {r['seq']} | {cell(plan)}"
                f"{': ' + plan['description'] if plan['status'] == 'ok' else ''} | "
                + " | ".join(cell(r["experts"][n]) for n in names)
                + f" | {ratio} | {r.get('plan_s', math.nan):.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.run import write_summary

    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_space", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("megatron", "experts", "all"), default="all")
    parser.add_argument("--render-only", action="store_true", help="run nothing: rewrite summary.md from OUT/result.json")
    parser.add_argument("--only", nargs="*", default=[], help="model names (or Megatron sizes) to run")
    parser.add_argument(
        "--out", default=str(_ROOT / "benchmarks" / "results" / "training_space"),
        help="folder for result.json and summary.md (the default also regenerates benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out = Path(args.out)
    if args.render_only:
        result = json.loads((out / "result.json").read_text())
        write_summary(out, render(result))
        return 0
    start = time.perf_counter()
    result = {}
    if args.part in ("megatron", "all"):
        result["megatron"] = megatron_rows(args.only, say)
    if args.part in ("experts", "all"):
        result["experts"] = expert_cases(args.only, say)
    result["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    write_summary(out, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
