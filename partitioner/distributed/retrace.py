"""Trace the model again as its plan was traced, on every process of a launch (`build`'s step 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from partitioner.analysis import check_plan_applies, trace_layers
from partitioner.errors import PlanMismatchError
from partitioner.layers import LayeredModel
from partitioner.options import Frontend, Granularity, TraceOptions
from partitioner.plan import Plan

__all__ = ["retrace", "resized"]


def retrace(
    plan: Plan,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    split_modules: Sequence[str],
    *,
    check_fingerprint: bool = True,
) -> LayeredModel:
    """Trace and group `model` as the planner did (`trace_layers`), and check it is the plan's model."""
    trace = TraceOptions(
        frontend=Frontend(plan.frontend) if plan.frontend in ("fx", "export") else Frontend.AUTO,
        granularity=Granularity(plan.granularity) if plan.granularity in {g.value for g in Granularity} else Granularity.BLOCK,
        refine=plan.refined,
        split=plan.split,
        split_modules=tuple(split_modules),
    )
    layered, _ = trace_layers(model, args, kwargs, training=plan.training, trace=trace)
    if check_fingerprint:
        check_plan_applies(plan, layered)
    else:  # traced at another batch: the fingerprint differs, the layers must not
        names, planned = [layer.name for layer in layered.graph.layers], [layer.name for layer in plan.layers]
        if names != planned:
            raise PlanMismatchError(
                f"the model traces to {len(names)} layers ({', '.join(names[:3])}, ...) but the plan has "
                f"{len(planned)} ({', '.join(planned[:3])}, ...); plan this model again"
            )
    return layered


def resized(value: Any, batch: int) -> Any:
    """Every tensor of `value` with `batch` rows (its first rows, repeated as needed)."""

    def resize(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            return x
        reps = math.ceil(batch / x.shape[0])
        return x.repeat(reps, *([1] * (x.ndim - 1)))[:batch].clone()

    return tree_map(resize, value)
