"""Trace a model into a torch.fx graph: the compiler's front end.

Two front ends: `torch.fx.symbolic_trace` keeps `call_module` granularity and works on
plain PyTorch models; `torch.export.export(strict=False)` works on Hugging Face models
(where symbolic tracing fails) and yields ATen ops tagged with ``nn_module_stack``.
`partitioner.layers` groups the graph's nodes into layers.
"""

from __future__ import annotations

import inspect
import linecache
import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from partitioner.errors import TraceError

__all__ = ["Frontend", "Granularity", "TracedModel", "trace_model", "block_classes"]

Frontend = Literal["auto", "fx", "export"]
Granularity = Literal["block", "leaf"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclass(frozen=True, slots=True)
class TracedModel:
    """A traced model, with what the layer grouping needs to know of its modules.

    The graph module shares parameters with the user's model; nothing here mutates it.
    """

    gm: fx.GraphModule
    frontend: Literal["fx", "export"]
    model_name: str
    """Class name of the traced model."""
    blocks: frozenset[str]
    """Qualified class names grouped as one layer each (empty for leaf granularity)."""
    owners: frozenset[str]
    """Qualified names of modules that can be a layer: leaves and modules with direct parameters."""
    stateless: frozenset[str]
    """Qualified names of modules without any parameter or buffer (they can run anywhere)."""


def block_classes(model: nn.Module, extra: Sequence[str] = ()) -> frozenset[str]:
    """Qualified class names treated as blocks: the elements of module containers, plus `extra`."""
    names = {_qualname(type(child)) for m in model.modules() if isinstance(m, _CONTAINERS) for child in m.children()}
    names = {n for n in names if not n.startswith("torch.nn.modules.container.")}
    return frozenset(names) | frozenset(extra)


def trace_model(
    model: nn.Module,
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    frontend: Frontend = "auto",
    granularity: Granularity = "block",
    split_modules: Sequence[str] = (),
) -> TracedModel:
    """Trace `model` into an fx graph.

    Args:
        model: The model; it is not modified.
        example_args: Positional example inputs.
        example_kwargs: Keyword example inputs.
        frontend: ``fx``, ``export``, or ``auto`` (fx where it works, else export).
        granularity: ``block`` (group by block modules) or ``leaf`` (innermost modules).
        split_modules: Extra class names (plain or qualified) to treat as blocks.

    Returns:
        The traced model.

    Raises:
        TraceError: No front end could trace the model; the message names the failing
            line and suggests a fix.
    """
    if granularity not in ("block", "leaf"):
        raise ValueError(f"granularity must be 'block' or 'leaf' (got {granularity!r})")
    if frontend not in ("auto", "fx", "export"):
        raise ValueError(f"frontend must be 'auto', 'fx' or 'export' (got {frontend!r})")
    kwargs = dict(example_kwargs or {})
    failures: list[tuple[str, BaseException]] = []
    gm: fx.GraphModule | None = None
    used: Literal["fx", "export"] = "fx"
    if frontend in ("auto", "fx"):
        try:
            gm = _trace_fx(model, example_args, kwargs)
        except Exception as e:  # noqa: BLE001 - any tracing failure falls through to export
            failures.append(("torch.fx.symbolic_trace", e))
        if gm is not None and frontend == "auto" and _ties_modules(gm):
            gm = None  # export lifts a tied weight into the graph, where it can be moved between layers
    if gm is None and frontend in ("auto", "export"):
        try:
            gm, used = _trace_export(model, example_args, kwargs), "export"
        except Exception as e:  # noqa: BLE001
            failures.append(("torch.export.export", e))
    if gm is None:
        raise TraceError(_trace_failure_message(model, failures)) from failures[-1][1]
    return TracedModel(
        gm=gm,
        frontend=used,
        model_name=type(model).__name__,
        blocks=block_classes(model, split_modules) if granularity == "block" else frozenset(split_modules),
        owners=_owner_paths(model),
        stateless=frozenset(
            name
            for name, m in model.named_modules(remove_duplicate=False)
            if next(m.parameters(), None) is None and next(m.buffers(), None) is None
        ),
    )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _owner_paths(model: nn.Module) -> frozenset[str]:
    """Modules that can hold a layer of their own: leaves, and modules with direct parameters."""
    return frozenset(
        name
        for name, m in model.named_modules(remove_duplicate=False)
        if name
        and (
            next(m.children(), None) is None
            or next(m.parameters(recurse=False), None) is not None
            or next(m.buffers(recurse=False), None) is not None
        )
    )


def _trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = set(kwargs) - set(placeholders)
    if unknown or len(args) > len(placeholders):
        raise TypeError(f"the traced forward takes {placeholders}, got {len(args)} positional and {sorted(kwargs)}")
    return gm


def _ties_modules(gm: fx.GraphModule) -> bool:
    """Whether two call_module targets share a parameter or buffer (tied weights)."""
    owner: dict[int, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sub = gm.get_submodule(str(n.target))
            for t in list(sub.parameters()) + list(sub.buffers()):
                if owner.setdefault(id(t), str(n.target)) != n.target:
                    return True
    return False


def _trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    try:
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_batch_dynamic(model, args, kwargs))
    except Exception:  # noqa: BLE001 - a dynamic batch is a convenience; fall back to static shapes
        ep = torch.export.export(model, args, kwargs, strict=False)
    return ep.module()


def _batch_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Mark dimension 0 of every tensor input dynamic, so the graph accepts other batch sizes."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def spec(x: Any) -> Any:
        # A batch of 1 would be specialised anyway (export treats sizes 0 and 1 as constants).
        return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] > 1 else None

    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


def _trace_failure_message(model: nn.Module, failures: list[tuple[str, BaseException]]) -> str:
    lines = [f"could not trace {type(model).__name__} into a graph:"]
    for name, err in failures:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines.append(f"  {name}: {type(err).__name__}: {first}")
        where = _user_frame(err)
        if where:
            lines.append(f"    at {where}")
    lines.append(
        "Fix: Python control flow on tensor values cannot be traced. Rewrite the branch with "
        "torch.where (both sides computed) or torch.cond (one side run), or take the decision "
        "outside forward and pass it in as an argument."
    )
    return "\n".join(lines)


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch and partitioner: where the user's code failed."""
    skipped = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    frames = [
        f
        for e in _chain(err)
        for f in traceback.extract_tb(e.__traceback__)
        if not os.path.abspath(f.filename).startswith(skipped)
    ]
    if not frames:
        return ""
    f = frames[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno or 0)).strip()
    return f"{f.filename}:{f.lineno} in {f.name}: {code}"


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out
