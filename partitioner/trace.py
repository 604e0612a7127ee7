"""Trace a model into a torch.fx graph: the compiler's front end.

Two front ends: `torch.fx.symbolic_trace` keeps `call_module` granularity and works on
plain PyTorch models; `torch.export.export(strict=False)` works on Hugging Face models
(where symbolic tracing fails) and yields ATen ops tagged with ``nn_module_stack``.
`partitioner.layers` groups the graph's nodes into layers.

This module chooses the front end and explains failures; `trace_fx` and `trace_export`
hold the two front ends, `trace_checks` what makes a trace faithful to the model, and
`mutations` the graph pass that turns in-place changes into data flow.
"""

from __future__ import annotations

import copy
import linecache
import operator
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from partitioner.errors import TraceError
from partitioner.options import Frontend, Granularity, SplitLayer
from partitioner.snapshot import named_tensors, preserved
from partitioner.trace_checks import (
    InferenceMode,
    InferenceWatch,
    Unfaithful,
    differs_from_eager,
    internal_file,
    recording_modes,
)
from partitioner.trace_export import trace_export
from partitioner.trace_fx import RootState, check_grad_modes, trace_fx

__all__ = [
    "Frontend",
    "Granularity",
    "TracedModel",
    "trace_model",
    "block_classes",
    "TRACE_LOCK",
]


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)

TRACE_LOCK = threading.RLock()
"""Held while a model is traced or its graph is profiled or timed: one at a time per process.

These phases touch process-wide state. torch.fx patches ``nn.Module.__call__`` and
``__getattr__`` for every thread while it traces (two traces at once can leave the patch
in place); torch.export keeps its tracing state (mode stacks, the proxy slot of each
tensor) where another export overwrites it; the fx graph shares submodules with the
user's model, and profiling swaps fake tensors into them; timing sets torch's thread
count. Threads that plan at once therefore wait for each other here and solve in
parallel. A thread that runs a model eagerly while another traces with torch.fx may
still hit fx's patched ``nn.Module.__call__``: plan before serving the model."""


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
    refined: frozenset[str] = frozenset()
    """Qualified names of blocks (and of their modules) split into their children
    (`partitioner.layers.refine_layers`); empty unless granularity is ``auto``."""
    split: tuple[SplitLayer, ...] = ()
    """Linear layers `gm` computes in column pieces (`partitioner.split_layers`)."""


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
    frontend: Frontend | str = Frontend.AUTO,
    granularity: Granularity | str = Granularity.BLOCK,
    split_modules: Sequence[str] = (),
) -> TracedModel:
    """Trace `model` into an fx graph.

    Args:
        model: The model; it is not modified.
        example_args: Positional example inputs.
        example_kwargs: Keyword example inputs.
        frontend: ``fx``, ``export``, or ``auto`` (fx where it works, else export).
        granularity: ``block`` (group by block modules) or ``leaf`` (innermost modules);
            ``auto`` groups as ``block`` (the planner refines the layers later).
        split_modules: Extra class names (plain or qualified) to treat as blocks.

    Returns:
        The traced model.

    Raises:
        TraceError: No front end could trace the model; the message names the failing
            line and suggests a fix.
    """
    frontend, granularity = Frontend(frontend), Granularity(granularity)  # ValueError listing the choices
    kwargs = dict(example_kwargs or {})
    with TRACE_LOCK, recording_modes():
        # Inputs made under the caller's inference_mode cannot enter autograd: normal copies.
        args, kwargs = tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x, (example_args, kwargs)
        )
        gm, used = _trace(model, args, kwargs, frontend.value)
    return TracedModel(
        gm=gm,
        frontend=used,
        model_name=type(model).__name__,
        blocks=frozenset(split_modules) if granularity is Granularity.LEAF else block_classes(model, split_modules),
        owners=_owner_paths(model),
        stateless=frozenset(
            name
            for name, m in model.named_modules(remove_duplicate=False)
            if next(m.parameters(), None) is None and next(m.buffers(), None) is None
        ),
    )


def _trace(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], frontend: Literal["auto", "fx", "export"]
) -> tuple[fx.GraphModule, Literal["fx", "export"]]:
    """The graph of the front end that traces `model` faithfully, and its name.

    Each attempt starts from the model as the user left it, and leaves it so (`preserved`):
    a forward that counts its calls or updates a buffer is traced as it stood, not as an
    earlier attempt left it.
    """
    failures: list[tuple[str, BaseException]] = []
    if frontend in ("auto", "export") and _exported(model):
        return _shallow_copy(model), "export"  # already a torch.export graph: its nodes know their modules
    state = set(model.state_dict(keep_vars=True))
    if frontend in ("auto", "fx"):
        gm: fx.GraphModule | None = None
        try:
            with preserved(model):
                gm = trace_fx(model, args, kwargs)
            check_grad_modes(gm)
            differs = differs_from_eager(model, gm, args, kwargs)
            if differs:
                raise Unfaithful(
                    f"{differs}: forward decides something on a module's output that a symbolic trace "
                    "cannot see (`w is None`, isinstance); use frontend='export'"
                )
        except InferenceMode as e:
            raise TraceError(_trace_failure_message(model, [("torch.fx.symbolic_trace", e)])) from e
        except Exception as e:  # noqa: BLE001 - any tracing failure falls through to export
            gm = None
            failures.append(("torch.fx.symbolic_trace", e))
        # With ties, auto prefers export: it lifts a tied weight into the graph, where it can
        # be moved between layers.
        if gm is not None and not (frontend == "auto" and _ties_modules(gm)):
            _constants_out_of_state(gm, state)
            return gm, "fx"
    if frontend in ("auto", "export"):
        try:
            with preserved(model), InferenceWatch() as watch:
                gm = trace_export(model, args, kwargs)
            watch.check()
            _constants_out_of_state(gm, state)
            return gm, "export"
        except InferenceMode as e:
            raise TraceError(_trace_failure_message(model, [("torch.export.export", e)])) from e
        except Exception as e:  # noqa: BLE001
            failures.append(("torch.export.export", e))
    raise TraceError(_trace_failure_message(model, failures)) from failures[-1][1]


def _constants_out_of_state(gm: fx.GraphModule, state: set[str]) -> None:
    """Keep the tensors a trace stored on `gm`'s root out of its state dict, which must
    load into the model: constants made in ``forward`` (``torch.tensor([1.0, 2.0])``, which
    torch.fx stores as ``_tensor_constant0`` and torch.export as ``lifted_tensor_0``) and
    plain tensor attributes read there: the graph module registers them as buffers (a
    deep copy of an export graph does), but they are no part of the model's `state` (its
    state dict keys)."""
    tensors = [*gm._buffers, *(k for k, v in vars(gm).items() if isinstance(v, torch.Tensor))]
    extra = {name for name in tensors if name not in state and name not in gm._non_persistent_buffers_set}
    if extra:
        gm._non_persistent_buffers_set |= extra
        gm._register_deepcopy_hook(RootState(gm, {}))


def _shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm`'s graph and modules that shares its tensors (the caller's stays as it is)."""
    memo: dict[int, Any] = {id(t): t for _, t in named_tensors(gm)}
    return copy.deepcopy(gm, memo)


def _exported(model: nn.Module) -> TypeGuard[fx.GraphModule]:
    """Whether `model` is a graph module made by torch.export (``ExportedProgram.module()``)."""
    return (
        isinstance(model, fx.GraphModule)
        and getattr(model, "_in_spec", None) is not None  # export's pytree calling convention
        and any(n.op == "call_function" and n.meta.get("nn_module_stack") for n in model.graph.nodes)
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


def _ties_modules(gm: fx.GraphModule) -> bool:
    """Whether two call_module targets share a parameter or buffer, or a ``get_attr`` reads
    one that a called module holds (tied weights: ``F.linear(h, self.embed.weight)`` beside
    ``self.embed(ids)``), so that two layers would own one tensor."""
    owner: dict[int, str] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sub = gm.get_submodule(str(n.target))
            for t in list(sub.parameters()) + list(sub.buffers()):
                if owner.setdefault(id(t), str(n.target)) != n.target:
                    return True
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            value = operator.attrgetter(str(n.target))(gm)
            if isinstance(value, torch.Tensor) and id(value) in owner:
                return True
    return False


def _trace_failure_message(model: nn.Module, failures: list[tuple[str, BaseException]]) -> str:
    lines = [f"could not trace {type(model).__name__} into a graph:"]
    for name, err in failures:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        lines.append(f"  {name}: {type(err).__name__}: {first}")
        where = _user_frame(err)
        if where:
            lines.append(f"    at {where}")
    unfaithful = [err for _, err in failures if isinstance(err, Unfaithful)]
    if len(unfaithful) == len(failures):
        lines.append(f"Fix: {unfaithful[0].fix}")
        return "\n".join(lines)
    # The last front end tried is the one that goes furthest (export, under "auto").
    texts = [str(e) for e in _chain(failures[-1][1])]
    if any("not a known type" in t or "register a pytree" in t for t in texts):
        lines.append(
            "Fix: forward returns an object torch.export cannot take apart (named above). Return "
            "tensors, tuples, lists, dicts or dataclasses, or register the type with "
            "torch.utils._pytree.register_pytree_node; a Hugging Face cache is left out with "
            "use_cache=False."
        )
        return "\n".join(lines)
    exported = failures[-1][0] == "torch.export.export"  # it ran forward on the inputs: a shape error is theirs
    if exported and not any(marker in t for t in texts for marker in _DATA_DEPENDENT):
        lines.append(
            "Fix: the model fails on these example inputs (the error above names the op): check "
            "their shapes, dtypes, devices and keyword names against forward, e.g. by calling "
            "the model on them once."
        )
        return "\n".join(lines)
    lines.append(
        "Fix: Python control flow on tensor values cannot be traced. Rewrite the branch with "
        "torch.where (both sides computed) or torch.cond (one side run), or take the decision "
        "outside forward and pass it in as an argument."
    )
    if all(name == "torch.fx.symbolic_trace" for name, _ in failures):
        lines.append(
            "Or trace with frontend='export' (or 'auto'): torch.export also traces what torch.fx "
            "cannot, such as a buffer assigned in forward (`self.step = self.step + 1`)."
        )
    return "\n".join(lines)


# How tracers say that forward branched on a tensor's value (symbolic_trace, torch.export).
_DATA_DEPENDENT = (
    "cannot be used as inputs to control flow",
    "data-dependent",
    "data dependent",
)


# Code torch generates and runs (exec'd lambdas, fx's graph code): never the user's line.
_GENERATED = ("<string>", "<eval_with_key>")


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch and partitioner: where the user's code failed."""
    frames = [
        f
        for e in _chain(err)
        for f in traceback.extract_tb(e.__traceback__)
        if not internal_file(f.filename) and not f.filename.startswith(_GENERATED)
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
