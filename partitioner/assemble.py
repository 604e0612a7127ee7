"""Plan assembly: a solver's answer -> the `Plan` users read, save and apply.

Pure (no torch): `make_plan` prices the solution with `solve.evaluate` and lays it out as
plan data; `annotate_plan` adds what only the traced model knows (every name of each
layer's tensors, the module that produces each transfer, why one device was kept), read
from its graph without running anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from partitioner.cost_model import layer_time_source, working_set_bytes
from partitioner.devices import Device
from partitioner.ir import OUTPUT, LayerGraph, Problem, Solution
from partitioner.options import PlanOptions, Strategy
from partitioner.plan import Plan, PlanDevice, PlanLayer, PlanTransfer, SolverInfo
from partitioner.solve import Evaluation, evaluate
from partitioner.solve.explain import why_single_device
from partitioner.solve.replicas import copy_evaluations

if TYPE_CHECKING:
    import torch.fx as fx

    from partitioner.layers import LayeredModel

__all__ = ["make_plan", "annotate_plan"]


def make_plan(
    graph: LayerGraph,
    devices: Sequence[Device],
    problem: Problem,
    solution: Solution,
    options: PlanOptions,
    granularity: str,
    refined: tuple[str, ...] = (),
) -> Plan:
    """The plan of `solution`: per-device and per-layer figures from `evaluate` (of one copy's
    tables on each copy's devices where the solution copies the model); `granularity` and
    `refined` say how the layers were grouped (`partitioner.analysis.Analysis`).

    `devices` and `problem` are in the order `solution.assignment` places on
    (``reorder(problem, solution.device_order)``), the order `Plan.devices` keeps.
    """
    if solution.replicas:
        return _copied_plan(graph, devices, problem, solution, options, granularity, refined)
    data_parallel = solution.strategy is Strategy.DATA_PARALLEL
    ev = evaluate(problem, solution.assignment)
    # The solver's capacities leave room for the inference working set; the plan shows it as used.
    working = working_set_bytes(graph, options)
    used = [data_parallel or d in solution.assignment for d in range(len(devices))]
    plan_devices = []
    for d, dev in enumerate(devices):
        params = sum(
            l.param_bytes + l.buffer_bytes for l, a in zip(graph.layers, solution.assignment) if a == d or data_parallel
        )
        replica = problem.replica
        plan_devices.append(
            _device(
                dev,
                capacity=problem.capacity[d] + working,
                memory=replica.memory[d] if data_parallel and replica else ev.memory[d] + working * used[d],
                params=params,
                compute_s=replica.time_s if data_parallel and replica else ev.compute_s[d],
                transfer_in_s=0.0 if data_parallel else ev.transfer_in_s[d],
                transfer_out_s=0.0 if data_parallel else ev.transfer_out_s[d],
            )
        )
    output_device = solution.assignment[-1] if solution.assignment and not data_parallel else 0
    transfers = () if data_parallel else _plan_transfers(problem, ev, output_device)
    return _plan(
        graph, devices, problem, solution, options, granularity, refined, plan_devices, transfers, output_device
    )


def _device(
    dev: Device,
    *,
    capacity: int,
    memory: int,
    params: int,
    compute_s: float,
    transfer_in_s: float = 0.0,
    transfer_out_s: float = 0.0,
) -> PlanDevice:
    return PlanDevice(
        name=dev.name,
        profile=dev.profile.name,
        kind=dev.profile.kind,
        torch_device=dev.torch_device,
        capacity_bytes=capacity,
        memory_bytes=memory,
        param_bytes=params,
        compute_s=compute_s,
        transfer_in_s=transfer_in_s,
        transfer_out_s=transfer_out_s,
    )


def _plan(
    graph: LayerGraph,
    devices: Sequence[Device],
    problem: Problem,
    solution: Solution,
    options: PlanOptions,
    granularity: str,
    refined: tuple[str, ...],
    plan_devices: Sequence[PlanDevice],
    transfers: tuple[PlanTransfer, ...],
    output_device: int,
) -> Plan:
    fastest = [min(row) for row in problem.compute_s]
    # A placement of whole layers finishes no sooner than its largest layer; copies split every
    # layer's batch, so only perfect balance binds them (`Plan.bound_s`).
    balanced = sum(fastest) / len(plan_devices)
    copies = solution.strategy in (Strategy.DATA_PARALLEL, Strategy.HYBRID)
    bound = balanced if copies else max(max(fastest, default=0.0), balanced)
    layers = tuple(
        PlanLayer(
            name=l.name,
            modules=l.modules,
            params=l.params,
            device=a,
            compute_s=problem.compute_s[l.index][a],
            memory_bytes=problem.memory[l.index],
            time_source=layer_time_source(l, devices[a].profile, options.training),
        )
        for l, a in zip(graph.layers, solution.assignment)
    )
    return Plan(
        model_name=graph.model_name,
        fingerprint=graph.fingerprint,
        frontend=graph.frontend,
        granularity=granularity,
        refined=refined,
        strategy=solution.strategy,
        objective=options.objective,
        training=options.training,
        batch_size=graph.batch_size,
        devices=tuple(plan_devices),
        layers=layers,
        transfers=transfers,
        output_device=output_device,
        predicted_s=solution.objective_s,
        bound_s=bound,
        solver=_solver_info(solution),
        replicas=solution.replicas,
    )


def _copied_plan(
    graph: LayerGraph,
    devices: Sequence[Device],
    problem: Problem,
    solution: Solution,
    options: PlanOptions,
    granularity: str,
    refined: tuple[str, ...],
) -> Plan:
    """The plan of copies of the model on groups of devices (`Solution.replicas`), each device's
    figures those of its copy: data parallelism over some devices as the cost model priced it
    (`Problem.data_parallel`), copies of a placement from their `BatchShare`'s tables."""
    groups = solution.replicas
    flat = tuple(d for g in groups for d in g)
    working = working_set_bytes(graph, options)
    state = sum(l.param_bytes + l.buffer_bytes for l in graph.layers)
    idle = {d: _device(dev, capacity=problem.capacity[d] + working, memory=0, params=0, compute_s=0.0)
            for d, dev in enumerate(devices)}
    rows = dict(idle)
    priced = next((r for r in problem.data_parallel if r.devices == flat and r.time_s == solution.objective_s), None)
    transfers: list[PlanTransfer] = []
    if priced is not None:
        for d in flat:
            rows[d] = replace(idle[d], memory_bytes=priced.memory[d], param_bytes=state, compute_s=priced.time_s)
        output_device = flat[0]
    else:
        share = next(s for s in problem.batch_shares if s.replicas == len(groups))
        inner = tuple(groups[0].index(a) for a in solution.assignment)
        output_device = solution.assignment[-1] if solution.assignment else groups[0][0]
        shared_working = math.ceil(working * share.samples / graph.batch_size)
        for group, ev in zip(groups, copy_evaluations(problem, solution), strict=True):
            for k, d in enumerate(group):
                params = sum(l.param_bytes + l.buffer_bytes for l, a in zip(graph.layers, inner) if a == k)
                rows[d] = replace(
                    idle[d],
                    memory_bytes=ev.memory[k] + shared_working,
                    param_bytes=params,
                    compute_s=ev.compute_s[k],
                    transfer_in_s=ev.transfer_in_s[k],
                    transfer_out_s=ev.transfer_out_s[k],
                )
            # Each copy's transfers, and its outputs gathered on the plan's output device.
            transfers += [
                PlanTransfer(value=problem.values[t.value].name, src=group[t.src], dst=group[t.dst], bytes=t.bytes,
                             seconds=t.seconds)
                for t in ev.transfers
            ]
            for v, nbytes in zip(problem.values, share.value_bytes, strict=True):
                src = group[inner[v.producer]] if v.producer >= 0 else output_device
                if OUTPUT in v.consumers and src != output_device:
                    seconds = problem.transfer_s(replace(v, bytes=nbytes), src, output_device)
                    transfers.append(PlanTransfer(value=v.name, src=src, dst=output_device, bytes=nbytes, seconds=seconds))
    plan_devices = [rows[d] for d in range(len(devices))]
    plan = _plan(
        graph, devices, problem, solution, options, granularity, refined, plan_devices, tuple(transfers), output_device
    )
    return replace(plan, why=_why_idle(plan))


def _why_idle(plan: Plan) -> str:
    """Why a plan of copies leaves devices idle, in one line (empty when it uses them all)."""
    idle = plan.idle_devices
    if not idle:
        return ""
    copies = len(plan.replica_groups)
    names = ", ".join(plan.devices[d].name for d in idle)
    reason = (
        f"a batch of {plan.batch_size} feeds at most {plan.batch_size} copies, and "
        if plan.batch_size < len(plan.devices)
        else ""
    )
    return (
        f"{len(idle)} of {len(plan.devices)} devices stay idle ({names}): {reason}no plan weighed that "
        f"uses more of them is predicted faster than these {copies} copies"
    )


def _solver_info(solution: Solution) -> SolverInfo:
    """How `solution` was found, with the search over device orders when there was one."""
    info = SolverInfo(method=solution.solver, optimal=solution.optimal, gap=solution.gap)
    search = solution.orders
    if search is None:
        return info
    return dataclasses.replace(
        info, orders=search.orders, orders_solved=search.solved, orders_exhaustive=search.exhaustive
    )


def annotate_plan(plan: Plan, layered: LayeredModel, problem: Problem | None = None) -> Plan:
    """`plan` with what only the traced model knows: each layer's tensors under all their
    names (a tied weight's aliases, which a ``device_map`` must cover), the module that
    produces each transfer (`PlanTransfer.module`), and, given the `problem` it was solved
    on, why a single-device plan on several devices keeps one (`Plan.why`)."""
    gm = layered.traced.gm
    by_id: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    names = {n: group for group in by_id.values() for n in group}
    layers = tuple(
        dataclasses.replace(layer, params=tuple(dict.fromkeys(a for p in layer.params for a in names.get(p, [p]))))
        for layer in plan.layers
    )
    nodes = {n.name: n for n in gm.graph.nodes}
    transfers = tuple(
        dataclasses.replace(t, module=_producer(nodes[t.value], plan.model_name)) if t.value in nodes else t
        for t in plan.transfers
    )
    why = plan.why
    if problem is not None and plan.strategy is Strategy.SINGLE:

        def describe(value: str) -> str:
            node = nodes.get(value)
            if node is None:
                return value
            if node.op == "get_attr":
                tied = len(names.get(str(node.target), ())) > 1
                return f"the {'tied ' if tied else ''}weight {node.target}"
            return f"the output of {_producer(node, plan.model_name)}"

        why = why_single_device(problem, plan.assignment, plan.predicted_s, describe)
    return dataclasses.replace(plan, layers=layers, transfers=transfers, why=why)


def _producer(node: fx.Node, model_name: str) -> str:
    """The module whose code computes `node`, as `PlanTransfer.module` names it."""
    if node.op == "placeholder":
        return f"input {node.target}"
    if node.op in ("get_attr", "call_module"):
        return str(node.target)
    paths = [path for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items() if path]
    return paths[-1] if paths else model_name


def _plan_transfers(problem: Problem, ev: Evaluation, output_device: int) -> tuple[PlanTransfer, ...]:
    """The solver's transfers, plus outputs gathered onto `output_device` (which cost no step time
    in the objective, since every placement pays them alike, but do move bytes)."""
    out = [
        PlanTransfer(value=problem.values[t.value].name, src=t.src, dst=t.dst, bytes=t.bytes, seconds=t.seconds)
        for t in ev.transfers
    ]
    moved = {(t.value, t.dst) for t in out}
    for v in problem.values:
        if v.producer < 0 or OUTPUT not in v.consumers:
            continue
        src = ev.assignment[v.producer]
        if src != output_device and (v.name, output_device) not in moved:
            seconds = problem.transfer_s(v, src, output_device)
            out.append(PlanTransfer(value=v.name, src=src, dst=output_device, bytes=v.bytes, seconds=seconds))
    return tuple(out)
