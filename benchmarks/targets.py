"""The targets a suite reports against, each pass, fail or n/a, computed from the result.

A target that no case of the suite exercises is ``n/a`` (never a silent pass); a miss lists
the cases that missed. ``info`` lines give related figures that are not targets.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import Any

from benchmarks.suites import DEVICE_SETS, MODELS, MODES

__all__ = ["evaluate_targets", "TARGETS", "best_baseline", "best_baseline_ratio"]

_SLACK = 1e-9
"""Two prices of the same tables may differ in the last bits (summation order)."""

TARGETS = {
    "never-worse": "partitioner's plan is never slower than a feasible baseline (ratio >= 1.00)",
    "never-infeasible": "partitioner never fails to plan where a baseline fits",
    "bound": "busiest pipeline stage within 1.10x of the even share (total / devices) on every transformer stack "
             "on identical devices in throughput modes, a layer heavier than the share included, on the block-level "
             "tables the suite shares (the default auto granularity: python -m benchmarks.balance)",
    "training-vs-accelerate": "training on 4+ GPUs at least 2x faster than Accelerate's sequential execution, "
                              "where some plan of partitioner's space could be (its proven lower bound)",
    "unbalanced-vs-equal": "at least 1.15x faster than the equal-layer (and equal-block) split on models with "
                           "unbalanced layers, throughput modes, where some plan of partitioner's space could be",
    "gpt2-xl-8-devices": "planning GPT-2 XL onto 8 devices takes at most 10 s end to end (compile_plan)",
    "1000-layer-solve": "graphs of 1,000 layers or more solved in at most 5 s",
    "cost-model": "cost model median absolute error at most 15% on the CPU cases (the planner's prediction)",
    "monotone": "more devices of one kind never predict a slower plan (same model, mode and batch; "
                "step with n devices over the best step with fewer)",
}


def _case(run: dict[str, Any]) -> str:
    return f"{run['model']} / {run['devices']} / {run['mode']}"


def _target(
    key: str, threshold: float | None, checked: Iterable[tuple[str, float]], ok: Callable[[float], bool],
    worst: Callable[[Iterable[float]], float], unit: str = "x", skipped: Iterable[str] = (),
) -> dict[str, Any]:
    rows = list(checked)
    shown = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{v:.3g}{unit}")
    failures = [f"{label}: {shown(value)}" for label, value in rows if not ok(value)]
    measured = worst(v for _, v in rows) if rows else None
    if not rows:
        status, detail = "n/a", "no case of this suite exercises it"
    else:
        status = "fail" if failures else "pass"
        detail = f"worst {shown(measured)} over {len(rows)} case(s)" + (f"; {len(failures)} miss(es)" if failures else "")
    skipped = list(skipped)
    if skipped:
        detail += f"; not checked: {len(skipped)} case(s)"
    return {"id": key, "name": TARGETS[key], "threshold": threshold, "status": status, "measured": measured,
            "checked": len(rows), "detail": detail, "failures": failures[:20], "skipped": skipped[:20]}


def _baseline(run: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((b for b in run["baselines"] if b["name"] == name), None)


def best_baseline(run: dict[str, Any]) -> dict[str, Any] | None:
    """The feasible baseline with the least step of a case (the first of equals), or None."""
    rows = [b for b in run["baselines"] if b["status"] == "ok" and b["step_s"] is not None]
    return min(rows, key=lambda b: b["step_s"]) if rows else None


def best_baseline_ratio(run: dict[str, Any]) -> float | None:
    """The best baseline's step over partitioner's (< 1: the plan is slower), or None when
    partitioner did not plan the case or no baseline is feasible."""
    b = best_baseline(run)
    step = run["partitioner"].get("step_s") if run["partitioner"]["status"] == "ok" else None
    return b["step_s"] / step if b is not None and step else None


def _out_of_reach(run: dict[str, Any], baseline: dict[str, Any], threshold: float) -> str:
    """Why no plan of partitioner's space can be `threshold` x faster than `baseline`, or "".

    The planner proves a lower bound on every plan of its space (the solver's bound, or the
    training planner's least bound over all its configurations): when the baseline's step is
    less than `threshold` x that bound, the target is out of reach on this case.
    """
    bound = run["partitioner"].get("lower_bound_s")
    if not bound or baseline["step_s"] is None or baseline["step_s"] >= threshold * bound * (1 - _SLACK):
        return ""
    return (f"{_case(run)} vs {baseline['name']}: no plan of the space beats {baseline['step_s'] / bound:.2f}x "
            f"(lower bound {bound:.3g} s); partitioner's plan {baseline['ratio']:.2f}x")


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of `TARGETS`, in that order, then ``info`` lines."""
    runs = result["comparisons"]
    planned = [r for r in runs if r["partitioner"]["status"] == "ok"]
    out = []

    ratios = [
        (f"{_case(r)} vs {b['name']}", b["ratio"])
        for r in planned for b in r["baselines"] if b["status"] == "ok" and b["ratio"] is not None
    ]
    out.append(_target("never-worse", 1.0, ratios, lambda v: v >= 1 - _SLACK, min))

    def fits_only_baseline(r: dict[str, Any]) -> bool:
        return r["partitioner"]["status"] != "ok" and any(b["status"] == "ok" for b in r["baselines"])

    target = _target("never-infeasible", None, [(_case(r), 0.0 if fits_only_baseline(r) else 1.0) for r in runs],
                     lambda v: v > 0, min, unit="")
    if runs:
        missed = sum(fits_only_baseline(r) for r in runs)
        target["measured"] = float(missed)
        target["detail"] = f"{missed} of {len(runs)} case(s) where a baseline fits and partitioner did not"
    out.append(target)

    bound_rows: list[tuple[str, float]] = []
    bound_skipped: list[str] = []
    bound_max: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for r in runs:
        if not (MODELS[r["model"]].transformer and MODES[r["mode"]].objective == "throughput"
                and DEVICE_SETS[r["devices"]].identical):
            continue
        b = r["bound"]
        if b["pipeline_ratio"] is None:
            bound_skipped.append(f"{_case(r)}: no placement of whole layers fits memory with the full batch at once"
                                 + (" (the training planner's microbatches fit)" if MODES[r["mode"]].training else ""))
        elif b.get("pipeline_even_ratio") is None:
            bound_skipped.append(f"{_case(r)}: the result predates the even-share figures (run the case again)")
        else:
            bound_rows.append((_case(r), b["pipeline_even_ratio"]))
            bound_max.append((r, b))
    out.append(_target("bound", 1.10, bound_rows, lambda v: v <= 1.10 + _SLACK, max, skipped=bound_skipped))
    info: list[dict[str, Any]] = []
    if bound_max:
        whole = [b["pipeline_ratio"] for _, b in bound_max]
        layer_bound = [_case(r) for r, b in bound_max if b["largest_layer_s"] > b["even_share_s"]]
        info.append(_info("bound-largest-layer", "the bound target's cases, busiest stage against max(total / devices, "
                          "largest layer): what whole layers could reach", max(whole),
                          f"worst {max(whole):.3g}x over {len(whole)} case(s); {sum(v > 1.10 + _SLACK for v in whole)}"
                          f" above 1.10x; a layer heavier than the even share in {len(layer_bound)}"
                          + (f" ({', '.join(layer_bound[:6])}{', ...' if len(layer_bound) > 6 else ''})"
                             if layer_bound else "")))
        compute = [b["pipeline_compute_even_ratio"] for _, b in bound_max]
        info.append(_info("bound-compute-only", "the bound target's cases, busiest stage's compute alone (transfers "
                          "left out) against the even share", max(compute),
                          f"worst {max(compute):.3g}x over {len(compute)} case(s); "
                          f"{sum(v > 1.10 + _SLACK for v in compute)} above 1.10x"))
    best = [(r, ratio) for r in planned if (ratio := best_baseline_ratio(r)) is not None]
    if best:
        slower = [f"{_case(r)} ({(best_baseline(r) or {}).get('name')} {ratio:.2f}x)"
                  for r, ratio in best if ratio < 1 - _SLACK]
        info.append(_info("best-baseline", "partitioner's plan against the best feasible baseline of each case",
                          statistics.geometric_mean(v for _, v in best),
                          f"geomean {statistics.geometric_mean(v for _, v in best):.2f}x, worst "
                          f"{min(v for _, v in best):.2f}x over {len(best)} case(s); slower than the best baseline in "
                          f"{len(slower)}" + (f": {'; '.join(slower[:8])}" if slower else "")))

    acc_rows, acc_skipped = [], []
    for r in planned:
        if not (MODES[r["mode"]].training and DEVICE_SETS[r["devices"]].gpus >= 4):
            continue
        b = _baseline(r, "accelerate-sequential")
        if b is None or b["status"] != "ok":
            acc_skipped.append(f"{_case(r)}: Accelerate's map: {b['reason'] if b else 'missing'}")
        elif reach := _out_of_reach(r, b, 2.0):
            acc_skipped.append(reach)
        else:
            acc_rows.append((_case(r), b["ratio"]))
    out.append(_target("training-vs-accelerate", 2.0, acc_rows, lambda v: v >= 2.0, min, skipped=acc_skipped))

    eq_rows, eq_skipped = [], []
    for r in planned:
        if not (MODELS[r["model"]].unbalanced and MODES[r["mode"]].objective == "throughput"):
            continue
        for name in ("equal-layers", "equal-blocks"):
            b = _baseline(r, name)
            if b is not None and b["status"] == "ok":
                if reach := _out_of_reach(r, b, 1.15):
                    eq_skipped.append(reach)
                else:
                    eq_rows.append((f"{_case(r)} vs {name}", b["ratio"]))
            elif b is not None and b["status"] == "infeasible":
                eq_skipped.append(f"{_case(r)} vs {name}: the split does not fit memory")
    out.append(_target("unbalanced-vs-equal", 1.15, eq_rows, lambda v: v >= 1.15, min, skipped=eq_skipped))

    e2e = [(f"{p['model']} on {p['devices']}", p["compile_s"]) for p in result["scaling"]
           if p["series"] == "end-to-end" and p["model"] == "gpt2-xl" and p["num_devices"] == 8]
    out.append(_target("gpt2-xl-8-devices", 10.0, e2e, lambda v: v <= 10.0, max, unit=" s"))

    big = [(f"{p['model']} ({p['layers']} layers, {p['series']}) on {p['devices']}", p["timings_s"]["solve_s"])
           for p in result["scaling"] if p["layers"] >= 1000]
    out.append(_target("1000-layer-solve", 5.0, big, lambda v: v <= 5.0, max, unit=" s"))

    cases = result["accuracy"]["cases"]
    errors = [abs(c["error"]["planner"]) for c in cases]
    target = _target("cost-model", 0.15, [("median over CPU cases", statistics.median(errors))] if errors else [],
                     lambda v: v <= 0.15, max, unit="")
    if errors:
        target["detail"] = f"median abs error {statistics.median(errors):.1%} over {len(errors)} case(s)"
        if any(c.get("simulated_s") is not None for c in cases):
            target["detail"] += " (simulated devices timed without the simulation: compute plus real copies)"
    out.append(target)
    out.append(_monotone(planned))

    for label, subset in (("one device (cpu)", [c for c in cases if c["devices"] == ["cpu"]]),
                          ("simulated cpu:0, cpu:1", [c for c in cases if c["devices"] != ["cpu"]])):
        errs = [abs(c["error"]["planner"]) for c in subset]
        if errs:
            info.append(_info(f"cost-model-{label.split()[0]}", f"cost model on {label}: median abs error",
                              statistics.median(errs), f"{statistics.median(errs):.1%} over {len(errs)} case(s)"))
    simulated = [c for c in cases if c.get("simulated_s") is not None]
    if simulated:
        errs = [abs(c["predicted_s"]["planner"] / c["simulated_s"] - 1) for c in simulated]
        info.append(_info("cost-model-with-simulation",
                          "cost model on simulated cpu:0, cpu:1 timed with the simulation: median abs error",
                          statistics.median(errs), f"{statistics.median(errs):.1%} over {len(errs)} case(s)"))
        costs = [c["simulation_cost"] for c in simulated]
        info.append(_info("simulation-cost", "the simulation's own cost: simulated step / step without it, median",
                          statistics.median(costs),
                          f"{statistics.median(costs):.2f}x over {len(costs)} case(s) "
                          f"({min(costs):.2f}x to {max(costs):.2f}x)"))
    for key in ("roofline-builtin", "roofline-calibrated"):
        errs = [abs(c["error"][key]) for c in cases]
        if errs:
            info.append(_info(key, f"cost model without layer timings ({key}): median abs error",
                              statistics.median(errs), f"{statistics.median(errs):.1%} over {len(errs)} case(s)"))
    single = [c for c in cases if c["devices"] == ["cpu"]]
    for key in ("roofline-builtin", "roofline-calibrated"):
        errs = [abs(e) for c in single for e in layer_errors(c, key)]
        if errs:
            info.append(_info(f"layers-{key}", f"per layer, {key} against each layer's measured step: "
                              "median abs error", statistics.median(errs),
                              f"{statistics.median(errs):.1%} over {len(errs)} layer(s) of {len(single)} case(s); "
                              f"time-weighted {statistics.fmean(weighted_layer_error(c, key) for c in single):.1%}"))
    return out + info


def _monotone(planned: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, mode, device kind) over the one-node sets of that kind (``a100-80gb x2``,
    ``x4``, ...): each plan's step over the best step of fewer devices (at most 1.00)."""
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for r in planned:
        ds = DEVICE_SETS[r["devices"]]
        step = r["partitioner"].get("step_s")
        if ds.cluster is not None or len(ds.specs) != 1 or not ds.identical or step is None:
            continue
        kind, _, count = ds.specs[0].partition(" x")
        if count.isdigit():
            series.setdefault((r["model"], r["mode"], kind), []).append((int(count), step))
    rows = []
    for (model, mode, kind), points in sorted(series.items()):
        points.sort()
        for i in range(1, len(points)):
            fewer = min(points[:i], key=lambda p: p[1])
            rows.append((f"{model} / {kind} x{points[i][0]} (vs x{fewer[0]}) / {mode}", points[i][1] / fewer[1]))
    return _target("monotone", 1.0, rows, lambda v: v <= 1 + 1e-6, max)


def layer_errors(case: dict[str, Any], key: str) -> list[float]:
    """(predicted - measured) / measured per layer of an accuracy case (none in older results)."""
    return [(layer["predicted_s"][key] - layer["measured_s"]) / layer["measured_s"]
            for layer in case.get("layers", []) if layer["measured_s"] > 0]


def weighted_layer_error(case: dict[str, Any], key: str) -> float:
    """Sum of |predicted - measured| over the sum of measured, over a case's layers: the
    error where the time is."""
    layers = [layer for layer in case.get("layers", []) if layer["measured_s"] > 0]
    total = sum(layer["measured_s"] for layer in layers)
    return sum(abs(layer["predicted_s"][key] - layer["measured_s"]) for layer in layers) / total if total else 0.0


def _info(key: str, name: str, measured: float, detail: str) -> dict[str, Any]:
    return {"id": f"info-{key}", "name": name, "threshold": None, "status": "info", "measured": measured,
            "checked": 0, "detail": detail, "failures": [], "skipped": []}
