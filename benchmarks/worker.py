"""Run one job of a suite in this process and write its record as JSON.

    python -m benchmarks.worker --suite quick --job 3 --out record.json

The runner starts one worker per job, so that each job's peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True)
    parser.add_argument("--job", type=int, required=True)
    parser.add_argument("--out", required=True, help="where to write the job's record (JSON)")
    parser.add_argument("--model", action="append", default=[], help="the runner's selection (benchmarks.run)")
    parser.add_argument("--devices", action="append", default=[])
    parser.add_argument("--mode", action="append", default=[])
    args = parser.parse_args(argv)

    from benchmarks.cases import peak_rss_bytes, rss_bytes, run_job
    from benchmarks.suites import SUITES, Selection, jobs, subset

    suite = SUITES[args.suite]
    selection = Selection(models=tuple(args.model), device_sets=tuple(args.devices), modes=tuple(args.mode))
    if selection != Selection():
        suite = subset(suite, selection)
    job = jobs(suite)[args.job]
    record: dict[str, Any] = {"job": job.index, "kind": job.kind, "label": job.label, "rss_start_bytes": rss_bytes()}
    start = time.perf_counter()
    try:
        record["result"] = run_job(job, suite.repeats)
        record["status"] = "ok"
    except Exception as e:  # recorded, never dropped: the runner reports it
        record["status"] = "error"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()[-4000:]
    record["wall_s"] = time.perf_counter() - start
    record["peak_rss_bytes"] = peak_rss_bytes()
    with open(args.out, "w") as f:
        json.dump(record, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
