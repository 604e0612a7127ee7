"""The one runner: ``python -m benchmarks.run --suite quick``.

Runs every job of the suite (`benchmarks.suites.jobs`), each in its own worker process
(``--in-process`` runs them here instead: faster, but peak memory is then the runner's),
and writes under ``--out`` (default ``benchmarks/results/<suite>/``):

- ``result.json``: hardware, versions, options, every job's figures and the targets,
  checked against `benchmarks.schema` before it is written;
- ``summary.md``: the tables (`benchmarks.report`);
- ``*.png``: speedup over each baseline, planner time against graph size and devices,
  predicted against measured step times (needs matplotlib).

Writing to the default place also regenerates ``benchmarks/RESULTS.md`` from every suite's
summary there. A job that fails or runs past the suite's time limit is recorded as an error
(with its output's tail) and named in the summary; the runner exits 1 if any job failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import report, schema, targets
from benchmarks.suites import SUITES, Job, Selection, Suite, jobs, subset, suite_data

__all__ = ["main", "run_suite", "render", "write_results_md", "write_summary", "RESULTS_DIR"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
_SUBSET_DIR = ROOT / "benchmarks" / "out"
"""Where a run of selected cases goes by default (git ignores it): never over a suite's result."""
_PACKAGES = ("torch", "transformers", "accelerate", "pulp", "highspy", "numpy", "networkx", "matplotlib")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("partitioner", *_PACKAGES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["partitioner_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "partitioner")
    out["partitioner_uncommitted_files"] = str(len(status.splitlines())) if status is not None else None
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _hardware() -> dict[str, Any]:
    from partitioner.calibrate import _cpu_model_name
    from partitioner.device_detection import system_memory_bytes

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model_name(),
        "cpu_count": os.cpu_count() or 0,
        "usable_cpus": usable,
        "memory_bytes": system_memory_bytes(),
        "gpus": _gpus(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else [],
    }


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _run_isolated(job: Job, timeout_s: float, workdir: Path, selection: Selection = Selection()) -> dict[str, Any]:
    out = workdir / f"job-{job.index}.json"
    log = workdir / f"job-{job.index}.log"
    command = [sys.executable, "-m", "benchmarks.worker", "--suite", job.suite, "--job", str(job.index),
               "--out", str(out), *selection.args()]
    start = time.perf_counter()
    with open(log, "w") as sink:
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s)
            code: int | None = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    if code == 0 and out.exists():
        record: dict[str, Any] = json.loads(out.read_text())
        return record
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    why = f"ran past the suite's limit of {timeout_s:.0f} s" if code is None else f"worker exited with {code}"
    return {"job": job.index, "kind": job.kind, "label": job.label, "status": "error", "error": why,
            "traceback": tail, "wall_s": time.perf_counter() - start, "peak_rss_bytes": 0, "rss_start_bytes": 0}


def _run_here(job: Job, suite: Suite) -> dict[str, Any]:
    import traceback

    from benchmarks.cases import peak_rss_bytes, rss_bytes, run_job

    record: dict[str, Any] = {"job": job.index, "kind": job.kind, "label": job.label, "rss_start_bytes": rss_bytes()}
    start = time.perf_counter()
    try:
        record["result"] = run_job(job, suite.repeats)
        record["status"] = "ok"
    except Exception as e:
        record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    record["wall_s"] = time.perf_counter() - start
    record["peak_rss_bytes"] = peak_rss_bytes()
    return record


def _assemble(suite: Suite, records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The result file: job records regrouped by kind, then the targets."""
    ok = [r for r in records if r["status"] == "ok"]
    comparisons = [run for r in ok if r["kind"] == "compare" for run in r["result"]["runs"]]
    traces = [
        {k: r["result"][k] for k in ("model", "training", "build_s", "trace_s", "profile_s", "graph_nodes", "layers")}
        | {"job": r["job"], "peak_rss_bytes": r["peak_rss_bytes"]}
        for r in ok if r["kind"] == "compare"
    ]
    scaling = [r["result"] | {"job": r["job"], "peak_rss_bytes": r["peak_rss_bytes"]}
               for r in ok if r["kind"] == "scaling"]
    accuracy_jobs = [r["result"] for r in ok if r["kind"] == "accuracy"]
    split = next((r["result"] for r in ok if r["kind"] == "mlp_split"), None)
    result: dict[str, Any] = {
        "schema_version": schema.SCHEMA_VERSION,
        **meta,
        "jobs": [
            {k: r.get(k) for k in ("job", "kind", "label", "status", "wall_s", "peak_rss_bytes", "rss_start_bytes")}
            | {"error": r.get("error", ""), "traceback": r.get("traceback", "")}
            for r in records
        ],
        "comparisons": comparisons,
        "traces": traces,
        "scaling": scaling,
        "accuracy": {
            "profiles": [{k: j[k] for k in ("model", "calibrated_profile", "builtin_profile")} for j in accuracy_jobs],
            "cases": [case for j in accuracy_jobs for case in j["cases"]],
        },
        "mlp_split": split,
    }
    result["targets"] = targets.evaluate_targets(result)
    return result


def run_suite(
    suite: Suite, out_dir: Path, *, in_process: bool = False, plots: bool = True, command: str = "",
    selection: Selection = Selection(),
) -> dict[str, Any]:
    """Run `suite` (its comparison cases in `selection` alone, when that selects), write its
    result, summary and plots into `out_dir`, and return the result."""
    if selection != Selection():
        suite = subset(suite, selection)
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "suite": suite.name,
        "description": suite.description,
        "command": command or f"python -m benchmarks.run --suite {suite.name}",
        "started_utc": started.isoformat(timespec="seconds"),
        "hardware": _hardware(),
        "versions": _versions(),
        "options": suite_data(suite) | {"in_process": in_process, "torch_threads_for_timing": 1},
    }
    todo = jobs(suite)
    records = []
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="partitioner-bench-") as tmp:
        for job in todo:
            _say(f"[{job.index + 1}/{len(todo)}] {job.label} ...")
            record = (_run_here(job, suite) if in_process
                      else _run_isolated(job, suite.job_timeout_s, Path(tmp), selection))
            mark = "ok" if record["status"] == "ok" else f"ERROR: {record.get('error', '')}"
            _say(f"    {record['wall_s']:.1f} s, peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB: {mark}")
            records.append(record)
    meta["wall_s"] = time.perf_counter() - begin
    meta["hardware"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    result = _assemble(suite, records, meta)
    schema.validate(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    images = report.plot_all(result, out_dir) if plots else []
    (out_dir / "summary.md").write_text(report.markdown(result, images))
    return result


def render(out_dir: Path, plots: bool = True) -> dict[str, Any]:
    """Targets, summary and plots again from `out_dir`/result.json (the figures are not re-measured)."""
    result: dict[str, Any] = json.loads((out_dir / "result.json").read_text())
    result["targets"] = targets.evaluate_targets(result)
    schema.validate(result)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    images = report.plot_all(result, out_dir) if plots else []
    (out_dir / "summary.md").write_text(report.markdown(result, images))
    return result


def write_results_md(results_dir: Path = RESULTS_DIR, path: Path | None = None) -> Path:
    """``benchmarks/RESULTS.md``: every suite's latest result under `results_dir`, in suite order."""
    path = path or results_dir.parent / "RESULTS.md"
    parts = [
        "# Benchmark results\n",
        "The latest run of each suite, as `python -m benchmarks.run --suite NAME` wrote it into "
        "`benchmarks/results/NAME/` (`result.json` holds every figure; benchmarks/README.md says what each "
        "one means).\n",
    ]
    for name in SUITES:
        folder = results_dir / name
        if (folder / "result.json").exists():
            result = json.loads((folder / "result.json").read_text())
            images = sorted(p.name for p in folder.glob("*.png"))
            parts.append(report.markdown(result, images, prefix=f"results/{name}/"))
    space = results_dir / "training_space" / "summary.md"
    if space.exists():
        parts.append(
            "# Training space: Megatron-LM's Table 1 and experts' set-ups\n\n"
            "`python -m benchmarks.training_space` (benchmarks/training_space.py says what each figure is).\n\n"
            + space.read_text()
        )
    balance = results_dir / "balance" / "summary.md"
    if balance.exists():
        parts.append("# Pipeline balance at the default granularity\n\n" + balance.read_text())
    path.write_text("\n".join(parts))
    return path


def write_summary(out: Path, text: str) -> None:
    """Write a benchmark's `text` as ``out/summary.md``, print it, and regenerate RESULTS.md
    when `out` is that benchmark's folder under `RESULTS_DIR` (``benchmarks/results/NAME``)."""
    (out / "summary.md").write_text(text + "\n")
    if out.resolve().parent == RESULTS_DIR.resolve():
        write_results_md()
    print(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description="Run a benchmark suite.")
    parser.add_argument("--suite", required=True, choices=sorted(SUITES), help="which suite (benchmarks/suites.py)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/SUITE)")
    parser.add_argument("--in-process", action="store_true", help="run jobs in this process (peak RSS not per job)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: re-derive the targets, summary and plots from OUT/result.json")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="run only this model's comparison cases (repeatable; no growth, accuracy or MLP split); "
                             f"writes to {_SUBSET_DIR.relative_to(ROOT)}/SUITE unless --out says otherwise")
    parser.add_argument("--devices", action="append", default=[], metavar="SET",
                        help="only this device set's cases (repeatable), e.g. 'a100-80gb x8'")
    parser.add_argument("--mode", action="append", default=[], metavar="MODE",
                        help="only this mode's cases (repeatable): inference-latency, inference-throughput, training")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    selection = Selection(models=tuple(args.model), device_sets=tuple(args.devices), modes=tuple(args.mode))
    if selection != Selection():
        try:
            subset(suite, selection)
        except ValueError as e:
            parser.error(str(e))
    out_dir = args.out or (RESULTS_DIR if selection == Selection() else _SUBSET_DIR) / suite.name
    if selection != Selection() and out_dir.resolve().parent == RESULTS_DIR.resolve():
        parser.error(f"--out {out_dir}: a run of selected cases must not replace a suite's result; "
                     f"leave --out out (it writes to {_SUBSET_DIR.relative_to(ROOT)}/{suite.name}) or name another folder")
    if args.render_only:
        render(out_dir, plots=not args.no_plots)
        if out_dir.resolve().parent == RESULTS_DIR.resolve():
            _say(f"wrote {write_results_md()}")
        return 0
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = run_suite(suite, out_dir, in_process=args.in_process, plots=not args.no_plots, command=command,
                       selection=selection)
    if out_dir.resolve().parent == RESULTS_DIR.resolve():
        _say(f"wrote {write_results_md()}")
    _say(f"wrote {out_dir / 'result.json'} and {out_dir / 'summary.md'} in {result['wall_s']:.0f} s")
    for t in result["targets"]:
        _say(f"  {t['status'].upper():4s} {t['name']}: {t['detail']}")
    return 1 if any(j["status"] != "ok" for j in result["jobs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
