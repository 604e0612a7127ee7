"""The schema of ``result.json`` and its validator.

The schema is data: a record is a dict of key -> spec (a key ending in ``?`` may be
absent), ``[spec]`` a list, `MapOf` a dict with free keys, `Nullable` allows ``null``,
`OneOf` a fixed set of strings, ``float`` any finite number, `ANY` anything JSON holds.
`validate` also checks that the figures agree with each other (every ratio is the
baseline's step over the plan's; the targets are the known ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from benchmarks.targets import TARGETS

__all__ = ["SCHEMA_VERSION", "ResultFormatError", "RESULT", "validate"]

SCHEMA_VERSION = 1


class ResultFormatError(ValueError):
    """A result file does not follow the schema; the message says where and why."""


@dataclass(frozen=True)
class MapOf:
    value: Any


@dataclass(frozen=True)
class Nullable:
    inner: Any


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]


ANY = object()

_PLANNER = {
    "status": OneOf(("ok", "infeasible")),
    "reason?": str,
    "strategy?": OneOf(("single", "model_parallel", "data_parallel", "hybrid")),
    "solver?": str,
    "optimal?": bool,
    "gap?": float,
    "lower_bound_s?": float,
    "solve_s": float,
    "step_s?": float,
    "evaluate_agrees?": bool,
    "assignment?": [int],
    "device_order?": [int],
    "slowest_stage_s?": float,
    "slowest_compute_s?": float,
    "build_problem_s?": float,
}

_BASELINE = {
    "name": OneOf(("accelerate-sequential", "accelerate-balanced", "accelerate-pipelined",
                   "accelerate-balanced-pipelined", "equal-layers", "equal-blocks", "parameters", "time-balanced",
                   "data-parallel", "replicated-split")),
    "implementation": str,
    "status": OneOf(("ok", "infeasible", "n/a")),
    "step_s": Nullable(float),
    "ratio": Nullable(float),
    "reason": str,
    "assignment": Nullable([int]),
    "devices_used": int,
    "device_map?": MapOf(ANY),
    "replicas?": int,
}

_RUN = {
    "model": str,
    "devices": str,
    "mode": str,
    "device_names": [str],
    "capacity_bytes": [int],
    "layers": int,
    "partitioner": _PLANNER,
    "pipeline_only": Nullable(_PLANNER),
    "baselines": [_BASELINE],
    # bound_s = max(even share, largest layer); the *_ratio figures are against it and the
    # *_even_ratio ones against the even share (total / devices). Results written before the
    # even-share figures existed lack the keys marked ?.
    "bound": {
        "bound_s": float,
        "even_share_s?": float,
        "largest_layer_s?": float,
        "granularity_ratio": Nullable(float),
        "granularity_even_ratio?": Nullable(float),
        "pipeline_ratio": Nullable(float),
        "pipeline_even_ratio?": Nullable(float),
        "pipeline_compute_ratio": Nullable(float),
        "pipeline_compute_even_ratio?": Nullable(float),
    },
}

_TRACE = {
    "model": str, "training": bool, "build_s": float, "trace_s": float, "profile_s": float, "graph_nodes": int,
    "layers": int, "job": int, "peak_rss_bytes": int,
}

_POINT = {
    "series": OneOf(("layers-chain", "layers-dag", "devices-chain", "devices-dag", "end-to-end")),
    "model": str, "devices": str, "num_devices": int, "mode": str, "graph_nodes": int, "layers": int,
    "chain": bool, "build_s": float, "compile_s": float, "timings_s": MapOf(float), "solver": str,
    "optimal": bool, "gap": float, "strategy": str, "rss_before_bytes": int, "job": int, "peak_rss_bytes": int,
}

_CASE = {
    "model": str, "devices": [str], "training": bool, "assignment": [int], "transfers": int,
    "predicted_s": {"planner": float, "roofline-builtin": float, "roofline-calibrated": float},
    # measured_s: the rewritten module's step without the simulation (on simulated devices:
    # `cases.without_simulation`), which `error` compares with; simulated_s: the same plan on
    # the simulated devices, simulation_cost = simulated_s / measured_s (both null on one
    # device). Results written before these two keys existed timed simulated devices only.
    "measured_s": float, "simulated_s?": Nullable(float), "simulation_cost?": Nullable(float), "eager_s": float,
    "error": {"planner": float, "roofline-builtin": float, "roofline-calibrated": float},
    # layers: every layer `compile_plan` timed, its measured step against the roofline's.
    "layers?": [{"name": str, "measured_s": float,
                 "predicted_s": {"roofline-builtin": float, "roofline-calibrated": float}}],
    "overhead": float, "planner_timings_s": MapOf(float), "samples_s": MapOf([float]),
}

_SPLIT = {
    "layers": [str], "auto_assignment": [int], "hand_assignment": [int],
    "predicted": MapOf({"throughput_s": float, "latency_s": float, "feasible": bool}),
    "throughput_ratio": float, "measured_s": MapOf(float), "measured_latency_ratio": float,
    "samples_s": MapOf([float]),
}

_TARGET = {
    "id": str, "name": str, "threshold": Nullable(float), "status": OneOf(("pass", "fail", "n/a", "info")),
    "measured": Nullable(float), "checked": int, "detail": str, "failures": [str], "skipped": [str],
}

RESULT = {
    "schema_version": int,
    "suite": str,
    "description": str,
    "command": str,
    "started_utc": str,
    "wall_s": float,
    "hardware": {
        "platform": str, "machine": str, "cpu": str, "cpu_count": int, "usable_cpus": int, "memory_bytes": int,
        "gpus": [str], "load_average_start": [float], "load_average_end": [float],
    },
    "versions": MapOf(Nullable(str)),
    "options": MapOf(ANY),
    "jobs": [{
        "job": int, "kind": OneOf(("compare", "scaling", "accuracy", "mlp_split")), "label": str,
        "status": OneOf(("ok", "error")), "wall_s": float, "peak_rss_bytes": int, "rss_start_bytes": int,
        "error": str, "traceback": str,
    }],
    "comparisons": [_RUN],
    "traces": [_TRACE],
    "scaling": [_POINT],
    "accuracy": {"profiles": [{"model": str, "calibrated_profile": MapOf(float), "builtin_profile": MapOf(float)}],
                 "cases": [_CASE]},
    "mlp_split": Nullable(_SPLIT),
    "targets": [_TARGET],
}
"""The result file's schema (`benchmarks.run` writes it)."""

_TARGET_IDS = tuple(TARGETS)


def _check(value: Any, spec: Any, where: str) -> None:
    if spec is ANY:
        return
    if isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.inner, where)
        return
    if isinstance(spec, OneOf):
        if value not in spec.choices:
            raise ResultFormatError(f"{where} must be one of {', '.join(spec.choices)} (got {value!r})")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise ResultFormatError(f"{where} must be a list (got {type(value).__name__})")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]")
        return
    if isinstance(spec, MapOf):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ResultFormatError(f"{where} must be an object with string keys")
        for k, v in value.items():
            _check(v, spec.value, f"{where}.{k}")
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ResultFormatError(f"{where} must be an object (got {type(value).__name__})")
        required = {k for k in spec if not k.endswith("?")}
        allowed = required | {k[:-1] for k in spec if k.endswith("?")}
        missing, unknown = required - value.keys(), value.keys() - allowed
        if missing:
            raise ResultFormatError(f"{where} misses keys {sorted(missing)}")
        if unknown:
            raise ResultFormatError(f"{where} has unknown keys {sorted(unknown)}")
        for k, sub in spec.items():
            key = k.rstrip("?")
            if key in value:
                _check(value[key], sub, f"{where}.{key}")
        return
    if spec is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif spec is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, spec)
    if not ok:
        raise ResultFormatError(f"{where} must be {getattr(spec, '__name__', spec)} (got {value!r})")


def _check_meaning(result: dict[str, Any]) -> None:
    if result["schema_version"] != SCHEMA_VERSION:
        raise ResultFormatError(f"schema_version is {result['schema_version']}, this validator reads {SCHEMA_VERSION}")
    for i, run in enumerate(result["comparisons"]):
        step = run["partitioner"].get("step_s")
        if run["partitioner"]["status"] == "ok" and step is None:
            raise ResultFormatError(f"comparisons[{i}].partitioner has status ok but no step_s")
        for j, b in enumerate(run["baselines"]):
            expected = b["step_s"] / step if b["step_s"] is not None and step else None
            if (expected is None) != (b["ratio"] is None) or (
                expected is not None and not math.isclose(expected, b["ratio"], rel_tol=1e-9)
            ):
                raise ResultFormatError(
                    f"comparisons[{i}].baselines[{j}].ratio is {b['ratio']}, but step_s / partitioner step_s "
                    f"is {expected}"
                )
            if b["status"] == "ok" and b["step_s"] is None:
                raise ResultFormatError(f"comparisons[{i}].baselines[{j}] has status ok but no step_s")
    ids = tuple(t["id"] for t in result["targets"] if t["status"] != "info")
    if ids not in (_TARGET_IDS, tuple(i for i in _TARGET_IDS if i != "monotone")):  # results written before it
        raise ResultFormatError(f"targets must be {', '.join(_TARGET_IDS)} in order (got {', '.join(ids)})")
    jobs = {j["job"] for j in result["jobs"]}
    referenced = {t["job"] for t in result["traces"]} | {p["job"] for p in result["scaling"]}
    if not referenced <= jobs:
        raise ResultFormatError(f"records refer to jobs {sorted(referenced - jobs)} that the jobs list lacks")


def validate(result: Any) -> None:
    """Check a result (parsed JSON) against `RESULT` and its internal consistency.

    Raises:
        ResultFormatError: The first violation, with where it is.
    """
    _check(result, RESULT, "result")
    _check_meaning(result)
