"""Plan assembly: a solver's answer -> the `Plan` users read, save and apply.

Pure (no torch): `make_plan` prices the solution with `solve.evaluate` and lays it out as
plan data; `annotate_plan` adds what only the traced model knows (every name of each
layer's tensors, the module that produces each transfer, why one device was kept), read
from its graph without running anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from partitioner.cost_model import working_set_bytes
from partitioner.devices import Device
from partitioner.ir import OUTPUT, LayerGraph, Problem, Solution
from partitioner.options import PlanOptions, Strategy
from partitioner.plan import Plan, PlanDevice, PlanLayer, PlanTransfer, SolverInfo
from partitioner.solve import Evaluation, evaluate
from partitioner.solve.explain import why_single_device

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
    """The plan of `solution`: per-device and per-layer figures from `evaluate`; `granularity`
    and `refined` say how the layers were grouped (`partitioner.analysis.Analysis`)."""
    data_parallel = solution.strategy is Strategy.DATA_PARALLEL
    ev = evaluate(problem, solution.assignment)
    fastest = [min(row) for row in problem.compute_s]
    # A placement of whole layers finishes no sooner than its largest layer; replicas split
    # every layer's batch, so only perfect balance binds them (`Plan.bound_s`).
    balanced = sum(fastest) / len(devices)
    bound = balanced if data_parallel else max(max(fastest, default=0.0), balanced)
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
            PlanDevice(
                name=dev.name,
                profile=dev.profile.name,
                kind=dev.profile.kind,
                torch_device=dev.torch_device,
                capacity_bytes=problem.capacity[d] + working,
                memory_bytes=replica.memory[d] if data_parallel and replica else ev.memory[d] + working * used[d],
                param_bytes=params,
                compute_s=replica.time_s if data_parallel and replica else ev.compute_s[d],
                transfer_in_s=0.0 if data_parallel else ev.transfer_in_s[d],
                transfer_out_s=0.0 if data_parallel else ev.transfer_out_s[d],
            )
        )
    layers = tuple(
        PlanLayer(
            name=l.name,
            modules=l.modules,
            params=l.params,
            device=a,
            compute_s=problem.compute_s[l.index][a],
            memory_bytes=problem.memory[l.index],
        )
        for l, a in zip(graph.layers, solution.assignment)
    )
    output_device = solution.assignment[-1] if solution.assignment and not data_parallel else 0
    transfers = () if data_parallel else _plan_transfers(problem, ev, output_device)
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
        solver=SolverInfo(
            method=solution.solver, optimal=solution.optimal, gap=solution.gap
        ),
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
