"""A result as Markdown tables and matplotlib plots (PNG)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.targets import best_baseline, best_baseline_ratio, layer_errors, weighted_layer_error

__all__ = ["markdown", "plot_all", "BASELINES"]

BASELINES = ("accelerate-sequential", "accelerate-balanced", "accelerate-pipelined", "accelerate-balanced-pipelined",
             "equal-layers", "equal-blocks", "parameters", "time-balanced", "data-parallel", "replicated-split")


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(b: dict[str, Any]) -> str:
    if b["status"] == "n/a":
        return "n/a"
    ratio = f"{b['ratio']:.2f}x" if b["ratio"] is not None else ""
    return ratio if b["status"] == "ok" else f"infeasible {ratio}".strip()


def _geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _ratio_cells(ratios: Sequence[float]) -> list[str]:
    if not ratios:
        return ["-", "-", "-"]
    return [f"{_geomean(ratios):.2f}x", f"{min(ratios):.2f}x", f"{max(ratios):.2f}x"]


def _best_headline(runs: Sequence[dict[str, Any]]) -> str:
    """Per mode: the plan against the best feasible baseline of each case, which baselines
    were best, and every case where the plan is slower than its best baseline."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_mode[r["mode"]].append(r)
    rows, slower = [], []
    for mode, group in by_mode.items():
        judged = [(r, ratio) for r in group if (ratio := best_baseline_ratio(r)) is not None]
        winners: dict[str, int] = defaultdict(int)
        for r, ratio in judged:
            best = best_baseline(r)
            assert best is not None
            winners[best["name"]] += 1
            if ratio < 1 - 1e-9:
                slower.append(f"- {r['model']} / {r['devices']} / {mode}: {best['name']} "
                              f"{_s(best['step_s'])} against partitioner's {_s(r['partitioner']['step_s'])} "
                              f"({ratio:.2f}x){': ' + best['reason'] if best['reason'] else ''}")
        rows.append([mode, len(judged), len(group) - len(judged), *_ratio_cells([v for _, v in judged]),
                     sum(v < 1 - 1e-9 for _, v in judged),
                     ", ".join(f"{name} {count}" for name, count in sorted(winners.items(), key=lambda kv: -kv[1]))])
    text = _table(["mode", "cases", "not judged", "geomean speedup", "min", "max", "plan slower", "best baseline (cases)"],
                  rows)
    if slower:
        text += "\nCases where partitioner's plan is slower than a baseline:\n\n" + "\n".join(slower) + "\n"
    return text


def _headline(runs: Sequence[dict[str, Any]]) -> str:
    rows = []
    for name in BASELINES:
        found = [b for r in runs for b in r["baselines"] if b["name"] == name]
        ok = [b["ratio"] for b in found if b["status"] == "ok" and b["ratio"] is not None]
        infeasible = sum(b["status"] == "infeasible" for b in found)
        na = sum(b["status"] == "n/a" for b in found)
        rows.append([name, len(ok), infeasible, na, *_ratio_cells(ok)])
    return _table(["baseline", "feasible", "infeasible", "n/a", "geomean speedup", "min", "max"], rows)


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _comparison_tables(runs: Sequence[dict[str, Any]]) -> str:
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_mode[r["mode"]].append(r)
    out = []
    for mode, group in by_mode.items():
        rows = []
        for r in group:
            p = r["partitioner"]
            plan = f"{p['strategy']} ({p['solver']})" if p["status"] == "ok" else "infeasible"
            cells = {b["name"]: _cell(b) for b in r["baselines"]}
            best, ratio = best_baseline(r), best_baseline_ratio(r)
            b = r["bound"]
            rows.append([
                r["model"], r["devices"], plan, _s(p.get("step_s")),
                f"{best['name']} {ratio:.2f}x" if best is not None and ratio is not None else "-",
                *(cells.get(name, "-") for name in BASELINES),
                _ratio(b.get("pipeline_even_ratio")), _ratio(b["pipeline_ratio"]),
                _ratio(b.get("granularity_even_ratio")),
            ])
        out.append(f"#### {mode}\n\n" + _table(
            ["model", "devices", "partitioner plan", "step", "best baseline", *BASELINES, "busiest / even share",
             "busiest / max(even, largest layer)", "layers allow / even share"], rows))
    return "\n".join(out)


def _scaling_table(points: Sequence[dict[str, Any]]) -> str:
    rows = [[
        p["series"], p["model"], p["devices"], p["graph_nodes"], p["layers"], _s(p["timings_s"].get("trace_s")),
        _s(p["timings_s"].get("profile_s")), _s(p["timings_s"].get("solve_s")), _s(p["compile_s"]),
        f"{p['solver']}{'' if p['optimal'] else ' (not proved optimal)'}", _mib(p["peak_rss_bytes"]),
        _mib(p["rss_before_bytes"]),
    ] for p in points]
    return _table(["series", "model", "devices", "graph nodes", "layers", "trace", "profile", "solve",
                   "compile_plan", "solver", "peak RSS", "RSS before"], rows)


def _accuracy_table(result: dict[str, Any]) -> str:
    cases = result["accuracy"]["cases"]
    if not cases:
        return "No accuracy cases in this suite.\n"

    def simulated(c: dict[str, Any]) -> tuple[str, str]:
        if c.get("simulated_s") is None:
            return "-", "-"
        return _s(c["simulated_s"]), f"{c['simulation_cost']:.2f}x"

    rows = [[
        c["model"], ", ".join(c["devices"]), "fwd+bwd" if c["training"] else "fwd", _s(c["measured_s"]),
        *simulated(c), _s(c["predicted_s"]["planner"]), f"{c['error']['planner']:+.0%}",
        f"{c['error']['roofline-builtin']:+.0%}", f"{c['error']['roofline-calibrated']:+.0%}",
        _s(c["eager_s"]), f"{c['overhead']:.2f}x",
    ] for c in cases]
    text = (
        "`measured`: the rewritten module's step without the simulation layer (on `cpu:0, cpu:1`, the same "
        "graph and placement on plain CPU tensors, each transfer between the devices a real copy of its bytes, "
        "forward and backward: compute plus copies, what two devices sharing this memory would cost, and what "
        "the cost model predicts); the errors are computed against it. `simulated`: the same plan run on the "
        "simulated devices, interleaved in the same rounds; `simulation`: simulated / measured, the "
        "simulation's own per-op cost, which no real device pays.\n\n"
    )
    text += _table(["model", "devices", "step", "measured", "simulated", "simulation", "predicted", "error",
                    "error (roofline, built-in cpu)", "error (roofline, calibrated)", "eager", "rewritten / eager"],
                   rows)
    medians = {k: statistics.median(abs(c["error"][k]) for c in cases) for k in cases[0]["error"]}
    text += "\nMedian absolute error: " + ", ".join(f"{k} {v:.1%}" for k, v in medians.items()) + ".\n"
    with_sim = [c for c in cases if c.get("simulated_s") is not None]
    if with_sim:
        timed_with_sim = statistics.median(
            abs(c["predicted_s"]["planner"] / (c.get("simulated_s") or c["measured_s"]) - 1) for c in cases
        )
        text += (f"The planner's median absolute error against the simulated runs instead (the simulation's cost "
                 f"counted as the plan's): {timed_with_sim:.1%}.\n")
    single = [c["overhead"] for c in cases if c["devices"] == ["cpu"]]
    sim = [c["overhead"] for c in cases if c["devices"] != ["cpu"]]
    if single:
        text += (f"Rewritten module on one device against the original eager model (same run, interleaved): "
                 f"median {statistics.median(single):.2f}x over {len(single)} case(s).\n")
    if sim and with_sim:
        text += (f"On `cpu:0`, `cpu:1` without the simulation (compute plus copies) against the original: median "
                 f"{statistics.median(sim):.2f}x over {len(sim)} case(s); with it: median "
                 f"{statistics.median(c['simulated_s'] / c['eager_s'] for c in with_sim):.2f}x, the simulation "
                 f"alone {statistics.median(c['simulation_cost'] for c in with_sim):.2f}x.\n")
    elif sim:
        text += (f"On simulated devices `cpu:0`, `cpu:1` (the simulation's own cost included): median "
                 f"{statistics.median(sim):.2f}x over {len(sim)} case(s).\n")
    for p in result["accuracy"]["profiles"]:
        cal, builtin = p["calibrated_profile"], p["builtin_profile"]
        text += (f"- {p['model']}: calibrated CPU {cal['float32_flops'] / 1e9:.1f} GFLOP/s, "
                 f"{cal['memory_bandwidth_Bps'] / 1e9:.1f} GB/s (built-in profile: "
                 f"{builtin['float32_flops'] / 1e9:.1f} GFLOP/s, {builtin['memory_bandwidth_Bps'] / 1e9:.1f} GB/s)\n")
    return text


def _layer_accuracy_table(result: dict[str, Any]) -> str:
    cases = [c for c in result["accuracy"]["cases"] if c.get("layers")]
    if not cases:
        return ""
    keys = ("roofline-builtin", "roofline-calibrated")
    rows = []
    for c in cases:
        errors = {k: [abs(e) for e in layer_errors(c, k)] for k in keys}
        worst = max(c["layers"], key=lambda layer: layer["measured_s"])
        rows.append([
            c["model"], ", ".join(c["devices"]), "fwd+bwd" if c["training"] else "fwd", len(c["layers"]),
            _s(sum(layer["measured_s"] for layer in c["layers"])), _s(c["measured_s"]),
            *(f"{statistics.median(errors[k]):.0%}" for k in keys),
            *(f"{weighted_layer_error(c, k):.0%}" for k in keys),
            f"{worst['name']} {(worst['predicted_s']['roofline-calibrated'] / worst['measured_s'] - 1):+.0%}",
        ])
    text = (
        "\nPer layer: every layer `compile_plan` timed on this CPU (what the planner prices it at when the "
        "device is present) against the roofline estimate it would use for a device that is not "
        "(`max(flops / peak, bytes / bandwidth)`, with the built-in and the calibrated `cpu` profile); "
        "`time-weighted`: the sum of the absolute errors over the sum of the measured times.\n\n"
    )
    text += _table(["model", "devices", "step", "layers", "sum of layers", "measured step",
                    "median error (built-in)", "median error (calibrated)", "time-weighted (built-in)",
                    "time-weighted (calibrated)", "heaviest layer (calibrated)"], rows)
    return text


def _split_text(split: dict[str, Any] | None) -> str:
    if split is None:
        return "Not in this suite.\n"
    auto, hand = split["predicted"]["auto"], split["predicted"]["hand"]
    rows = [
        ["automatic (throughput objective)", " ".join(map(str, split["auto_assignment"])), _s(auto["throughput_s"]),
         _s(auto["latency_s"]), _s(split["measured_s"]["auto"])],
        ["hand-written (HandSplitMLP)", " ".join(map(str, split["hand_assignment"])), _s(hand["throughput_s"]),
         _s(hand["latency_s"]), _s(split["measured_s"]["hand"])],
        ["original, one device", "-", "-", "-", _s(split["measured_s"]["eager"])],
    ]
    text = _table(["split", f"device per layer ({', '.join(split['layers'])})", "predicted pipelined step",
                   "predicted latency", "measured fwd+bwd (simulated devices)"], rows)
    return text + (f"\nPredicted pipelined speedup of the automatic split over the hand split: "
                   f"{split['throughput_ratio']:.2f}x; measured latency hand / automatic on one CPU: "
                   f"{split['measured_latency_ratio']:.2f}x (simulated devices run one after another, so only "
                   f"latency can be measured here).\n")


def markdown(result: dict[str, Any], images: Sequence[str] = (), prefix: str = "") -> str:
    """The summary: targets first, then every table; `images` are linked with `prefix`."""
    hw, v = result["hardware"], result["versions"]
    runs = result["comparisons"]
    errors = [j for j in result["jobs"] if j["status"] != "ok"]
    dirty = v.get("partitioner_uncommitted_files")
    parts = [
        f"## Suite `{result['suite']}`\n",
        f"{result['description']}\n",
        f"Command: `{result['command']}` (started {result['started_utc']}, {result['wall_s']:.0f} s in all, "
        f"{len(result['jobs'])} jobs, {len(errors)} failed).\n",
        f"Hardware: {hw['cpu']}, {hw['usable_cpus']} usable CPUs, {hw['memory_bytes'] / 2**30:.0f} GiB, "
        f"GPUs: {', '.join(hw['gpus']) or 'none'}; load average {hw['load_average_start'][:1]} at the start, "
        f"{hw['load_average_end'][:1]} at the end. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("partitioner_commit",
                                                                     "partitioner_uncommitted_files"))
        + f"; partitioner commit `{(v.get('partitioner_commit') or 'unknown')[:12]}`"
        + (f" with {dirty} uncommitted file(s) under partitioner/" if dirty not in (None, "0") else "") + ".\n",
        "### Targets\n",
        _table(["target", "status", "measured", "detail"], [
            [t["name"], t["status"].upper(), "-" if t["measured"] is None else f"{t['measured']:.3g}",
             t["detail"] + ("; misses: " + "; ".join(t["failures"][:5]) if t["failures"] else "")]
            for t in result["targets"]
        ]),
    ]
    unchecked = [(t["name"], reason) for t in result["targets"] if t["status"] != "info" for reason in t["skipped"]]
    if unchecked:
        parts.append("Cases a target does not judge, and why (at most 20 per target):\n\n"
                     + "\n".join(f"- {reason}" for _, reason in unchecked) + "\n")
    if errors:
        parts.append("### Failed jobs\n\n" + "\n".join(f"- {j['label']}: {j['error']}" for j in errors) + "\n")
    parts += [
        "### Speedup of partitioner's plan over the best baseline of each case\n",
        "Every placement priced by `partitioner.solve.evaluate` on the planner's own cost tables (training: every "
        "split played by the training planner's pipeline simulator, `benchmarks/training_runs.py`); "
        "ratio = baseline step / partitioner step (higher is better for partitioner; below 1.00x the plan is "
        "slower). The best baseline of a case is its fastest feasible one: in throughput modes Accelerate's maps "
        "count also as pipelines (`accelerate-pipelined`: the same per-device layer sets under "
        "`torch.distributed.pipelining`, priced by the period), and at inference an expert's replicated split "
        "(`replicated-split`: the best of r replicas of an equal split over n / r devices) counts too. "
        f"Planner infeasible in {sum(r['partitioner']['status'] != 'ok' for r in runs)} of {len(runs)} case(s).\n",
        _best_headline(runs) if runs else "No comparisons in this suite.\n",
        "### Speedup of partitioner's plan over each baseline\n",
        "`accelerate-sequential` and `accelerate-balanced` run one device at a time (`dispatch_model`), priced by "
        "latency in every mode; the other splits by the mode's objective.\n",
        _headline(runs) if runs else "",
    ]
    if runs:
        parts += ["### Every case\n",
                  "`best baseline`: the fastest feasible baseline and the plan's speedup over it. Balance, in "
                  "throughput modes, of the planner's best pipeline (data parallelism off): `busiest / even share` "
                  "is its busiest stage (compute or link traffic, the period) against total / devices, each layer "
                  "on its fastest device, on every case; `busiest / max(even, largest layer)` against the least "
                  "that whole layers could reach (a layer heavier than the even share binds it); `layers allow / "
                  "even share`: the best contiguous split of whole layers, compute only (identical devices).\n",
                  _comparison_tables(runs)]
    if result["traces"]:
        parts += ["### Tracing and profiling, per model (one process each)\n", _table(
            ["model", "step", "graph nodes", "layers", "build", "trace", "profile", "peak RSS"],
            [[t["model"], "training" if t["training"] else "inference", t["graph_nodes"], t["layers"],
              _s(t["build_s"]), _s(t["trace_s"]), _s(t["profile_s"]), _mib(t["peak_rss_bytes"])]
             for t in result["traces"]])]
    if result["scaling"]:
        parts += ["### Planner time and memory as graphs and device sets grow (one process each)\n",
                  _scaling_table(result["scaling"])]
    parts += ["### Cost model against this CPU\n", _accuracy_table(result) + _layer_accuracy_table(result),
              "### The seed MLP: automatic against hand-written split\n", _split_text(result["mlp_split"])]
    if images:
        parts.append("### Plots\n\n" + "\n".join(f"![{Path(i).stem}]({prefix}{i})" for i in images) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- plots


def plot_all(result: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the plots this result has data for; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, draw in (("speedup.png", _speedup), ("planner_time_vs_nodes.png", _time_vs_nodes),
                       ("planner_time_vs_devices.png", _time_vs_devices), ("accuracy.png", _accuracy),
                       ("accuracy_layers.png", _layer_accuracy)):
        fig = draw(plt, result)
        if fig is not None:
            fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


def _speedup(plt: Any, result: dict[str, Any]) -> Any:
    """One column per baseline, the best baseline of each case first."""
    runs = result["comparisons"]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(12, 4.5))
    modes = sorted({r["mode"] for r in runs})
    columns: list[tuple[str, list[tuple[str, float]], int]] = [(
        "best\nbaseline", [(r["mode"], v) for r in runs if (v := best_baseline_ratio(r)) is not None], 0)]
    for name in BASELINES:
        found = [(r["mode"], b) for r in runs for b in r["baselines"] if b["name"] == name]
        points = [(m, b["ratio"]) for m, b in found if b["status"] == "ok" and b["ratio"] is not None]
        columns.append((name.replace("-", chr(10), 1), points, sum(b["status"] == "infeasible" for _, b in found)))
    labels = []
    for x, (label, points, infeasible) in enumerate(columns):
        for k, mode in enumerate(modes):
            ys = [v for m, v in points if m == mode]
            xs = [x + (k - (len(modes) - 1) / 2) * 0.22 for _ in ys]
            ax.scatter(xs, ys, s=14, alpha=0.7, label=mode if x == 0 else None, color=f"C{k}")
        labels.append(f"{label}\n({infeasible} infeasible)" if x else label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    times = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(times)
    ax.yaxis.set_minor_formatter(times)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(columns)), labels, fontsize=7)
    ax.set_ylabel("baseline step / partitioner step")
    ax.set_title(f"Speedup of partitioner's plan over the best baseline and each baseline (suite {result['suite']}, "
                 "feasible baselines)")
    ax.legend(fontsize=8)
    return fig


def _phase_lines(ax: Any, points: Sequence[dict[str, Any]], x_key: str, style: str, tag: str) -> None:
    points = sorted(points, key=lambda p: p[x_key])
    xs = [p[x_key] for p in points]
    for k, (key, label) in enumerate((("trace_s", "trace"), ("profile_s", "profile"), ("solve_s", "solve"))):
        ax.plot(xs, [p["timings_s"].get(key, 0.0) for p in points], style, color=f"C{k}", marker="o",
                label=f"{label} ({tag})")
    ax.plot(xs, [p["compile_s"] for p in points], style, color="black", marker="s", label=f"compile_plan ({tag})")


def _time_vs(plt: Any, result: dict[str, Any], series: tuple[str, str], x_key: str, xlabel: str, title: str) -> Any:
    chain = [p for p in result["scaling"] if p["series"] == series[0]]
    dag = [p for p in result["scaling"] if p["series"] == series[1]]
    if not chain and not dag:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if chain:
        _phase_lines(ax, chain, x_key, "-", "chain MLP")
    if dag:
        _phase_lines(ax, dag, x_key, "--", "skip MLP (DAG)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Plain numbers at the measured points (log ticks would read 2x10^0, 3x10^0, ...), one
    # of two points closer than 10% (1,001 and 1,002 nodes).
    ticks: list[float] = []
    for x in sorted({p[x_key] for p in chain + dag}):
        if not ticks or x > ticks[-1] * 1.1:
            ticks.append(x)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def _time_vs_nodes(plt: Any, result: dict[str, Any]) -> Any:
    return _time_vs(plt, result, ("layers-chain", "layers-dag"), "graph_nodes", "graph nodes",
                    "Planner time against graph size (a100-80gb x4)")


def _time_vs_devices(plt: Any, result: dict[str, Any]) -> Any:
    return _time_vs(plt, result, ("devices-chain", "devices-dag"), "num_devices", "devices",
                    "Planner time against the number of devices")


def _accuracy(plt: Any, result: dict[str, Any]) -> Any:
    cases = result["accuracy"]["cases"]
    if not cases:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, key in enumerate(("planner", "roofline-builtin", "roofline-calibrated")):
        ax.scatter([c["measured_s"] for c in cases], [c["predicted_s"][key] for c in cases], s=18, color=f"C{k}",
                   label=key)
    low = min(min(c["measured_s"], *c["predicted_s"].values()) for c in cases) / 1.5
    high = max(max(c["measured_s"], *c["predicted_s"].values()) for c in cases) * 1.5
    ax.fill_between([low, high], [low * 0.85, high * 0.85], [low * 1.15, high * 1.15], color="grey", alpha=0.2,
                    label="±15%")
    _against_measured(ax, low, high, "measured step (s)", "predicted step (s)", "Cost model against this CPU")
    return fig


def _against_measured(ax: Any, low: float, high: float, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes from `low` to `high` with the line predicted = measured."""
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _layer_accuracy(plt: Any, result: dict[str, Any]) -> Any:
    layers = [layer for c in result["accuracy"]["cases"] for layer in c.get("layers", []) if layer["measured_s"] > 0]
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, key in enumerate(("roofline-builtin", "roofline-calibrated")):
        ax.scatter([layer["measured_s"] for layer in layers], [layer["predicted_s"][key] for layer in layers],
                   s=10, color=f"C{k + 1}", label=key, alpha=0.7)
    values = [v for layer in layers for v in (layer["measured_s"], *layer["predicted_s"].values()) if v > 0]
    low, high = min(values) / 1.5, max(values) * 1.5
    _against_measured(ax, low, high, "measured layer step (s)", "roofline estimate (s)",
                      "Per-layer roofline against this CPU")
    return fig
