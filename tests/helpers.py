"""Helpers the test modules share: plans that must split, snapshots of a model, hand-made plans.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

import partitioner
from partitioner.api import compile_plan
from partitioner.options import PlanOptions, Strategy
from partitioner.plan import Plan
from partitioner.training import plan_training
from tests.models import ZOO, ZooCase, zoo_case

__all__ = [
    "NO_DP",
    "forcing_caps",
    "fits_in_order",
    "weighted_loss",
    "snapshot",
    "assert_unchanged",
    "layer_memory",
    "hand_pipeline",
    "placed",
    "base_plan",
    "split_plan",
]

# --------------------------------------------------------------------------- caps that force a split

NO_DP = PlanOptions(training=True, memory_reserve=0.0, allow_data_parallel=False)
_MEMORY: dict[str, tuple[int, ...]] = {}


def _layer_memory(name: str, case: ZooCase | None = None, **kw: Any) -> tuple[int, ...]:
    """What each layer of a zoo model (or of `case`) needs, as the planner counts it (cached per model)."""
    if name not in _MEMORY:
        model, args, kwargs = (case or ZOO[name]).build()
        _MEMORY[name] = compile_plan(model, ["cpu:0"], args, kwargs, options=NO_DP, **kw).problem.memory
    return _MEMORY[name]


def fits_in_order(memory: tuple[int, ...], cap: int, n: int) -> bool:
    """Whether consecutive runs of layers fill at most `n` devices of `cap` bytes."""
    bins, room = 1, cap
    for m in memory:
        if m > cap:
            return False
        if m > room:
            bins, room = bins + 1, cap
        room -= m
    return bins <= n


def forcing_caps(name: str, n: int, case: ZooCase | None = None, **kw: Any) -> int:
    """A per-device cap below the whole model's need, so the plan must use several devices."""
    memory = _layer_memory(name, case, **kw)
    cap = max(max(memory), math.ceil(sum(memory) / n))
    while not fits_in_order(memory, cap, n):
        cap = math.ceil(cap * 1.05)
    return min(math.ceil(cap * 1.05), sum(memory) - 1)


def weighted_loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(())
    for o in outputs:
        if o.is_floating_point():
            o = o.to("cpu")  # from a simulated device back to the host: a logged, differentiable copy
            total = total + (o * torch.randn(o.shape, generator=gen)).sum()
    return total


# --------------------------------------------------------------------------- what planning must not change


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What must not change when the model is planned: tensors, devices, flags, modes, ties."""
    tensors = {
        name: (t.detach().clone(), t.device, t.requires_grad, t.grad is None, id(t))
        for name, t in model.state_dict(keep_vars=True).items()
    }
    tensors |= {
        f"{name} (param)": (p.detach().clone(), p.device, p.requires_grad, p.grad is None, id(p))
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    modes = {name: m.training for name, m in model.named_modules()}
    return {"tensors": tensors, "modes": modes}


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modes"] == before["modes"], "planning changed a module's train/eval mode"
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (value, device, requires_grad, no_grad, ident) in before["tensors"].items():
        v2, d2, r2, n2, i2 = after["tensors"][name]
        assert (d2, r2, n2, i2) == (device, requires_grad, no_grad, ident), f"{name} changed"
        assert torch.equal(v2, value), f"planning changed the values of {name}"


def layer_memory(model: nn.Module, args: Any, kwargs: Any, options: PlanOptions) -> list[int]:
    """What each layer needs on its device, as the planner counts it (one device, no caps)."""
    plan = partitioner.plan(model, ["cpu:0"], args, kwargs, options=options, measure=False)
    return [layer.memory_bytes for layer in plan.layers]


# --------------------------------------------------------------------------- plans by hand


def hand_pipeline(
    plan: Plan,
    ranges: list[tuple[int, int]],
    groups: list[tuple[int, ...]],
    schedule: str,
    microbatches: int,
    global_batch: int,
    recompute: bool = False,
) -> Plan:
    """`plan` (a training plan) with other stages: stage ``j`` holds layers ``ranges[j]`` on ``groups[j % p]``,
    replicated (no tensor parallelism, no sharding).

    The planner's own stage records are the template (their costs no longer fit, and the
    lowering reads none); the JSON round trip validates the result as a saved plan.
    """
    assert plan.pipeline is not None
    template = plan.pipeline.stages[0]
    ranks = len(groups)
    stages = tuple(
        dataclasses.replace(
            template, index=j, rank=j % ranks, first_layer=first, last_layer=last, devices=groups[j % ranks],
            samples=global_batch // (microbatches * len(groups[j % ranks])), recompute=recompute,
        )
        for j, (first, last) in enumerate(ranges)
    )
    pipeline = dataclasses.replace(
        plan.pipeline, schedule=schedule, microbatches=microbatches, virtual_stages=len(ranges) // ranks,
        global_batch=global_batch, stages=stages, tensor_parallel=1, data_parallel=len(groups[0]), sharding="none",
        sequence_parallel=False,
    )
    return Plan.from_json(dataclasses.replace(plan, pipeline=pipeline).to_json())


def placed(plan: Plan, devices: list[int]) -> Plan:
    """`plan` as a model-parallel plan (no pipeline section) with layer ``i`` on ``devices[i]``."""
    layers = tuple(dataclasses.replace(layer, device=d) for layer, d in zip(plan.layers, devices))
    return dataclasses.replace(
        plan, strategy=Strategy.MODEL_PARALLEL, layers=layers, output_device=devices[-1], pipeline=None
    )


_BASE: dict[tuple[str, int], Plan] = {}


def base_plan(model: str, devices: int) -> Plan:
    """A training plan of the zoo model on ``cpu:0..`` (its layers, fingerprint, devices, records), cached."""
    if (model, devices) not in _BASE:
        m, args, kwargs = zoo_case(model).build()
        _BASE[model, devices] = plan_training(
            m, [f"cpu:{i}" for i in range(devices)], args, kwargs, global_batch=8, measure=False
        )
    return _BASE[model, devices]


_SPLIT_GPUS = ["a100-80gb", "a100-80gb"]
_INFERENCE_NO_DP = PlanOptions(allow_data_parallel=False, memory_reserve=0.0)


def split_plan(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], **kw: Any) -> Plan:
    """`model` planned on two absent A100s whose memory caps force a split.

    Memory per device is the sum of its layers' (see `partitioner.solve.evaluate`), so the
    cap of the most even cut of the layer order fits two devices and not one.
    """
    whole = partitioner.plan(model, _SPLIT_GPUS[:1], args, kwargs, options=_INFERENCE_NO_DP)
    memory = [layer.memory_bytes for layer in whole.layers]
    # Every device also keeps room for the largest layer's outputs (inference working set).
    working = whole.devices[0].memory_bytes - sum(memory)
    cap = working + min(max(sum(memory[:k]), sum(memory[k:])) for k in range(1, len(memory)))
    return partitioner.plan(model, _SPLIT_GPUS, args, kwargs, options=_INFERENCE_NO_DP, max_memory={"a100-80gb": cap}, **kw)
