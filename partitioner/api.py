"""The front door: `plan` a model onto devices, or `auto_parallelize` it (plan, then rewrite).

analyze (trace -> profile -> layers -> timing) -> cost model -> solve -> plan -> rewrite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from partitioner.analysis import (
    Analysis,
    AnalysisArgs,
    analyze,
    check_plan_applies,
    devices_for_plan,
    plan_trace,
    refine_analysis,
    trace_layers,
)
from partitioner.assemble import annotate_plan, make_plan
from partitioner.cost_model import build_problem
from partitioner.devices import Device
from partitioner.dtypes import dtype_of
from partitioner.errors import DeviceError, PlanMismatchError
from partitioner.ir import Problem, Solution
from partitioner.layers import LayeredModel, refinable_modules
from partitioner.options import Granularity, Objective, PlanOptions, SplitLayer, Strategy
from partitioner.partitioned import PartitionedModule, plain_model
from partitioner.plan import Plan
from partitioner.progress import Progress, listening, reporting
from partitioner.replicate import replicate, replicate_split, replication_hazards
from partitioner.rewrite import InsertedTransfer, split_model
from partitioner.simdevice import SimulatedDevices
from partitioner.solve import reorder, solve
from partitioner.split_layers import heavy_splits

__all__ = [
    "analyze",
    "Analysis",
    "solve_analysis",
    "refine_and_solve",
    "even_share",
    "plan",
    "auto_parallelize",
    "PartitionedModule",
    "Compiled",
    "compile_plan",
    "PlanningArgs",
    "trace_layers",
    "make_plan",
    "annotate_plan",
    "dtype_of",
    "replication_hazards",
]


class PlanningArgs(AnalysisArgs, total=False):
    """The keyword arguments `plan` and `auto_parallelize` pass to `compile_plan`."""

    options: PlanOptions | None


@dataclass(frozen=True, slots=True)
class Compiled:
    """Everything one planning run produced (for tools that want more than the plan)."""

    layered: LayeredModel
    devices: tuple[Device, ...]
    """The devices in the plan's order (the solver's choice; `Plan.devices`)."""
    problem: Problem
    """The cost tables, devices in the plan's order (``solution.assignment`` places on them)."""
    solution: Solution
    plan: Plan
    timings_s: Mapping[str, float]
    """Seconds spent tracing, profiling and solving."""


def compile_plan(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    options: PlanOptions | None = None,
    **kw: Unpack[AnalysisArgs],
) -> Compiled:
    """Analyse (`analyze`) and solve (`solve_analysis`), refining the layers beside the cuts
    under ``auto`` granularity (`refine_and_solve`); see `plan` for the arguments."""
    analysis = analyze(model, devices, example_inputs, example_kwargs, options=options, **kw)
    if analysis.trace.granularity is not Granularity.AUTO:
        return solve_analysis(analysis, kw.get("progress"))

    def refine(current: Analysis, modules: frozenset[str], split: tuple[SplitLayer, ...] = ()) -> Analysis:
        return refine_analysis(
            current, modules, example_inputs, example_kwargs, split=split, measure=kw.get("measure", True),
            measure_budget_s=kw.get("measure_budget_s", 10.0), progress=kw.get("progress"),
        )

    return refine_and_solve(analysis, refine, kw.get("progress"))


def refine_and_solve(
    analysis: Analysis,
    refine: Callable[[Analysis, frozenset[str], tuple[SplitLayer, ...]], Analysis],
    progress: Progress | None = None,
) -> Compiled:
    """Solve `analysis` at block granularity, then, while the busiest device carries more than
    its even share, split the layers beside each cut into their children and solve again.

    A pipeline's period is its busiest device's; with whole blocks, eight devices cannot take
    52 blocks in equal shares. Refining only where the stages meet (a block into attention
    and MLP, those into leaves) lets a cut fall between finer pieces and keeps the layer
    count near the block count, so every solve stays small enough to prove. Each round
    solves the whole model again from scratch, so the plan returned is optimal (within the
    solver's gap) among all placements of its own layers. Finer layers contain every coarser
    placement, though a finer profile may price replicas a little higher: the coarsest round
    that reached the best period is returned, and a round the solver could not prove
    optimal that comes out slower (a time limit) ends the search.

    Only the THROUGHPUT objective is refined: a LATENCY plan adds every device's compute,
    whatever the split. Where copies win (data parallelism, or copies of a split), the cuts
    are the best pipeline's (solved without them), as long as its even share is below the
    copies' period. The search ends when the
    period is within the solver's gap of total compute / devices (`even_share`), when that
    share is no better than the best plan's, or when no layer beside a cut is finer inside.

    A layer heavier than the even share binds every placement of whole layers: where it is
    one linear (a vocabulary head), it is cut into column pieces first
    (`partitioner.split_layers.heavy_splits`), each at most half a share, and solved again.

    Args:
        analysis: Analysed at ``auto`` granularity (block layers, nothing refined yet).
        refine: ``refine(analysis, modules, split)``: `analysis` with `modules` split into
            their children and the linear layers of `split` cut into column pieces
            (`partitioner.analysis.refine_analysis`).
        progress: Called with a status line per round.

    Returns:
        The last round's `Compiled`, its timings adding every round's solve.
    """
    say = progress or (lambda _: None)
    best = last = solve_analysis(analysis, progress)
    solve_s, current, gap = best.timings_s["solve_s"], analysis, analysis.options.solver.gap
    while analysis.options.objective is Objective.THROUGHPUT:
        pipeline = last
        if last.solution.strategy in (Strategy.DATA_PARALLEL, Strategy.HYBRID):
            # Copies won: the cuts are those of the best pipeline, which finer layers may make faster.
            if even_share(last.problem) >= best.solution.objective_s:
                break  # no pipeline of these layers beats the replicas, however fine
            only_pipelines = dataclasses.replace(current.options, allow_data_parallel=False)
            pipeline = solve_analysis(dataclasses.replace(current, options=only_pipelines), progress)
            solve_s += pipeline.timings_s["solve_s"]
        if pipeline.solution.strategy is not Strategy.MODEL_PARALLEL:
            break
        even = even_share(pipeline.problem)
        if pipeline.solution.objective_s <= even * (1 + gap) or even >= best.solution.objective_s:
            break  # balanced, or no balance of these layers would beat the best plan
        if _link_bound(pipeline.plan):
            say("the busiest device is busy moving data, not computing: finer layers would not help")
            break
        problem = pipeline.problem
        fastest = [(layer.modules, min(problem.compute_s[layer.index])) for layer in pipeline.layered.graph.layers]
        splits = heavy_splits(pipeline.layered.traced, fastest, even, problem.num_devices)
        if splits:
            say(f"busiest device {pipeline.solution.objective_s / even:.3f}x its even share: cutting "
                + ", ".join(f"{s.module} into {s.pieces} column pieces" for s in splits))
            current = refine(current, frozenset(), splits)
        else:
            assignment = pipeline.solution.assignment
            beside = {i + k for i in range(len(assignment) - 1) if assignment[i] != assignment[i + 1] for k in (0, 1)}
            modules = refinable_modules(pipeline.layered, beside)
            if not modules:
                break
            say(f"busiest device {pipeline.solution.objective_s / even:.3f}x its even share: "
                f"splitting {len(modules)} layer(s) beside the cuts")
            current = refine(current, modules, ())
        last = solve_analysis(current, progress)
        solve_s += last.timings_s["solve_s"]
        if not last.solution.optimal and last.solution.objective_s > best.solution.objective_s:
            break  # the solver ran out of time on these layers: finer ones would fare no better
        if last.solution.objective_s < best.solution.objective_s * (1 - gap):
            best = last  # finer layers that gain nothing are kept for the next round only
    timings = {**best.timings_s, "solve_s": solve_s, "profile_s": current.timings_s.get("profile_s", 0.0)}
    return dataclasses.replace(best, timings_s=timings)


def _link_bound(plan: Plan) -> bool:
    """Whether the busiest device's period is its link traffic (in or out), not its compute:
    finer layers divide compute, so refining cannot lower that period."""
    busiest = max(plan.devices, key=lambda d: max(d.compute_s, d.transfer_in_s, d.transfer_out_s), default=None)
    return busiest is not None and max(busiest.transfer_in_s, busiest.transfer_out_s) > busiest.compute_s


def solve_analysis(analysis: Analysis, progress: Progress | None = None) -> Compiled:
    """Price `analysis`'s layers on its devices, solve, and assemble the plan."""
    say = progress or (lambda _: None)
    start = time.perf_counter()
    graph, resolved, options = analysis.layered.graph, analysis.devices, analysis.options
    if not options.solver.keep_device_order:
        resolved = _fastest_first(resolved, analysis.dtype)
    say(f"solving: {len(graph.layers)} layers on {len(resolved)} device(s)")
    problem = build_problem(graph, resolved, options, analysis.dtype)
    # The solver's progress (incumbent, bound, gap) goes where the caller's progress goes.
    with reporting(say) if progress is not None and not listening() else contextlib.nullcontext():
        solution = solve(problem, options.solver)
    # The plan lists the devices in the order the solver chose; its assignment indexes that order.
    problem = reorder(problem, solution.device_order)
    resolved = tuple(resolved[d] for d in solution.device_order) or resolved
    timings = {**analysis.timings_s, "solve_s": time.perf_counter() - start}
    made = make_plan(graph, resolved, problem, solution, options, analysis.granularity, analysis.refined)
    result = annotate_plan(dataclasses.replace(made, split=analysis.split), analysis.layered, problem)
    return Compiled(analysis.layered, resolved, problem, solution, result, timings)


def even_share(problem: Problem) -> float:
    """Total compute / devices, each layer on its fastest device: the period of a perfectly
    balanced pipeline, which whole layers may not allow."""
    return sum(min(row) for row in problem.compute_s) / problem.num_devices if problem.compute_s else 0.0


def plan(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    **kw: Unpack[PlanningArgs],
) -> Plan:
    """Plan `model` onto `devices` without running anything on them.

    Works for absent hardware named by a profile (``"a100-80gb x4"``) and for models
    built on ``meta`` (nothing is allocated).

    Args:
        model: The model (not modified).
        devices: Device strings (``cpu``, ``cuda:1``, ``cpu:0`` simulated, profile names).
        example_inputs: Positional example inputs (their shapes are planned for).
        example_kwargs: Keyword example inputs.
        **kw: (`PlanningArgs`) ``options`` (`PlanOptions`), ``max_memory``
            (Accelerate-style caps), ``trace`` (`TraceOptions`), or its fields one by one:
            ``frontend`` (``auto``, ``fx``, ``export``), ``granularity`` (``auto``, the
            default: blocks, split beside the cuts where that balances a THROUGHPUT
            pipeline, see `refine_and_solve`; ``block``; ``leaf``), ``split_modules`` (class names kept whole, one layer each; also
            spelt ``no_split_module_classes``, as in Accelerate),
            ``measure`` (time each layer on the present devices, default True; models on
            ``meta`` are never timed; timings vary from run to run, so pass False for
            reproducible plans), ``measure_budget_s``, ``progress`` (a callable taking a
            status line).

    Returns:
        The plan.

    The model is left as it was, also when its forward changes it (a counter, a buffer
    updated in place): tracing runs forward, and puts back whatever it changed.

    Thread safety: threads may plan at once (other models, or the same one). Tracing,
    profiling and timing hold a process-wide lock (`partitioner.trace.TRACE_LOCK`:
    torch.fx patches ``nn.Module`` for every thread while it traces, and torch.export
    keeps global tracing state), so those phases run one at a time; solving runs in
    parallel. Do not run a model eagerly in one thread while another plans with the
    torch.fx front end: fx's patch of ``nn.Module.__call__`` would see its calls.
    """
    return compile_plan(model, devices, example_inputs, example_kwargs, **kw).plan


def auto_parallelize(
    model: nn.Module,
    devices: Sequence[str],
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    plan: Plan | None = None,
    output_device: str | None = None,
    inplace: bool = False,
    simulate: bool = False,
    **kw: Unpack[PlanningArgs],
) -> PartitionedModule:
    """Split `model` over `devices`: trace, profile, solve, and rewrite with transfers.

    Example:
        >>> import torch, partitioner
        >>> model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
        >>> x = torch.randn(8, 1024)
        >>> pm = partitioner.auto_parallelize(model, ["cpu:0", "cpu:1"], (x,), max_memory={"cpu:0": "3MB"})
        >>> torch.testing.assert_close(partitioner.to_plain(pm(x)), model(x))
        >>> pm.plan.strategy.value
        'model_parallel'

    Args:
        model: The model. It is not modified unless ``inplace=True``, which moves its own
            parameters to the planned devices (no copy).
        devices: As for `plan`; every device must be present (``cpu``, ``cuda:N``,
            simulated ``cpu:N``), unless ``simulate=True``.
        example_inputs: Positional example inputs.
        example_kwargs: Keyword example inputs.
        plan: A saved plan to apply instead of solving (its fingerprint must match).
        output_device: Where outputs are gathered (default: the last layer's device).
        inplace: Move the model's own tensors instead of copying them.
        simulate: Run on simulated CPU devices ``cpu:0..`` standing for the planned ones
            (dry-run a plan for absent GPUs on a laptop).
        **kw: Planning arguments, as for `plan`.

    Returns:
        A `PartitionedModule`.

    Raises:
        DeviceError: A device is absent and ``simulate`` is off.
        PlanMismatchError: ``plan`` was made for another model.

    Thread safety: as for `plan` (tracing, profiling and timing run one at a time across
    threads; the rest in parallel).
    """
    model = plain_model(model)
    if plan is not None:  # a saved plan: checked against the model's analysis, nothing solved or timed
        unmeasured: PlanningArgs = {**plan_trace(plan, kw), "measure": False}
        analysis = analyze(model, devices, example_inputs, example_kwargs, **unmeasured)
        check_plan_applies(plan, analysis.layered, analysis.devices)
        # The plan's devices in its own order (the solver's), matched by name, not by list position.
        layered, resolved, chosen = analysis.layered, devices_for_plan(plan, analysis.devices), plan
    else:
        compiled = compile_plan(model, devices, example_inputs, example_kwargs, **kw)
        layered, resolved, chosen = compiled.layered, compiled.devices, compiled.plan
    hazards = replication_hazards(model)
    if (chosen.strategy is Strategy.DATA_PARALLEL or len(chosen.replica_groups) > 1) and hazards:
        how = "replicates the model" if chosen.strategy is Strategy.DATA_PARALLEL else "runs copies of the model"
        raise PlanMismatchError(
            f"the plan {how}, but {hazards[0]}; "
            "put those modules in eval mode, or plan this model again (it will not replicate it)"
        )
    targets = _run_devices(resolved, simulate)
    out = targets[chosen.output_device] if output_device is None else output_device
    logical = all(t.startswith("cpu:") for t in targets)
    simulator = SimulatedDevices(1 + max(torch.device(t).index or 0 for t in targets)) if logical else None
    with simulator if simulator is not None else contextlib.nullcontext():
        groups = chosen.replica_groups
        if chosen.strategy is Strategy.DATA_PARALLEL:
            replicas = [targets[g[0]] for g in groups]
            module: nn.Module = replicate(model, replicas, out, layered.graph.batch_size, inplace=inplace)
            transfers: list[InsertedTransfer] = []
        elif len(groups) > 1:
            module, transfers = replicate_split(
                model, layered, chosen.assignment, groups, targets, out, layered.graph.batch_size, inplace=inplace
            )
        else:
            module, transfers = split_model(model, layered, chosen.assignment, targets, out, inplace=inplace)
    if simulator is not None:
        simulator.reset()
    return PartitionedModule(module, chosen, transfers, simulator, training=model.training)


def _fastest_first(devices: Sequence[Device], dtype: str) -> tuple[Device, ...]:
    """`devices` in an order that does not depend on how they were listed: fastest kind first
    (peak FLOP/s in `dtype`, then memory bandwidth, profile name), the listed order within a
    kind (devices of one profile capped apart keep the order given). The solver searches the order layers flow in (`solve.order`), but copies of
    the model and data parallelism over some devices take the devices in this order."""

    def key(item: tuple[int, Device]) -> tuple[float, float, str, int]:
        k, d = item
        p = d.profile
        flops = (getattr(p.peak_flops, dtype, None) or p.peak_flops.float32) * p.compute_efficiency
        return (-flops, -p.memory_bandwidth_Bps * p.memory_efficiency, p.name, k)

    return tuple(d for _, d in sorted(enumerate(devices), key=key))


def _run_devices(devices: Sequence[Device], simulate: bool) -> list[str]:
    if simulate:
        return [f"cpu:{k}" for k in range(len(devices))]
    absent = [d.name for d in devices if d.torch_device is None]
    if absent:
        raise DeviceError(
            f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not present here, so the plan cannot run; "
            "use partitioner.plan() to plan only, or simulate=True to dry-run on simulated CPU devices"
        )
    targets = [str(d.torch_device) for d in devices]
    for t in targets:
        try:
            ok = str(torch.device(t)) == t
        except RuntimeError:
            ok = False
        if not ok:  # torch keeps a device index in 8 bits: "cpu:200" becomes "cpu:-56", "cpu:255" the host
            raise DeviceError(f"torch cannot address device {t!r} (indices go up to 127); number the devices from 0")
    return targets
