"""Trace a model into a torch.fx graph: the compiler's front end.

Two front ends: `torch.fx.symbolic_trace` keeps `call_module` granularity and works on
plain PyTorch models; `torch.export.export(strict=False)` works on Hugging Face models
(where symbolic tracing fails) and yields ATen ops tagged with ``nn_module_stack``.
`partitioner.layers` groups the graph's nodes into layers.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import logging
import operator
import os
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, cast

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from partitioner.errors import TraceError
from partitioner.snapshot import preserved

__all__ = [
    "Frontend",
    "Granularity",
    "TracedModel",
    "trace_model",
    "block_classes",
    "named_tensors",
    "read_after",
    "thread_mutations",
    "quiet_fake_tensor_log",
    "PIN",
    "TRACE_LOCK",
]

Frontend = Literal["auto", "fx", "export"]
Granularity = Literal["block", "leaf"]

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
    with TRACE_LOCK, _recording_modes():
        # Inputs made under the caller's inference_mode cannot enter autograd: normal copies.
        args, kwargs = tree_map(
            lambda x: x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x, (example_args, kwargs)
        )
        gm, used = _trace(model, args, kwargs, frontend)
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


def _trace(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], frontend: Frontend
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
                gm = _trace_fx(model, args, kwargs)
            _check_grad_modes(gm)
            differs = _differs_from_eager(model, gm, args, kwargs)
            if differs:
                raise _Unfaithful(
                    f"{differs}: forward decides something on a module's output that a symbolic trace "
                    "cannot see (`w is None`, isinstance); use frontend='export'"
                )
        except _InferenceMode as e:
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
            with preserved(model), _InferenceWatch() as watch:
                gm = _trace_export(model, args, kwargs)
            watch.check()
            _constants_out_of_state(gm, state)
            return gm, "export"
        except _InferenceMode as e:
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
        gm._register_deepcopy_hook(_RootState(gm, {}))


def _shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm`'s graph and modules that shares its tensors (the caller's stays as it is)."""
    memo: dict[int, Any] = {id(t): t for _, t in named_tensors(gm)}
    return copy.deepcopy(gm, memo)


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of `module` by qualified name: parameters, buffers, and plain tensor
    attributes (the constants torch.export lifts from ``forward``); aliases listed under each name."""
    named: list[tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False))
    named += list(module.named_buffers(remove_duplicate=False))
    for name, sub in module.named_modules(remove_duplicate=False):
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and attr not in sub._buffers:
                named.append((f"{name}.{attr}" if name else attr, value))
    return named


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


_GRAD_MODE = "partitioner_grad_mode"
"""Node meta key (torch.fx graphs): ``(grad enabled, inference mode on)`` when the node was recorded."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with two changes.

    - A buffer read in ``forward`` is a graph value (a ``get_attr``), not the tensor: an
      op on it alone (``self.c.clone()``) then runs each call on the buffer as it is,
      instead of once at trace time into a constant that fx would store on the model.
    - Each node records the grad mode it was made under (`_GRAD_MODE`): a symbolic trace
      runs ``with torch.no_grad():`` for real but records no trace of it in the graph.
    """

    proxy_buffer_attributes = True

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[_GRAD_MODE] = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        return node


def _trace_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = set(kwargs) - set(placeholders)
    if unknown or len(args) > len(placeholders):
        raise TypeError(f"the traced forward takes {placeholders}, got {len(args)} positional and {sorted(kwargs)}")
    if thread_mutations(gm):
        gm.recompile()
    _mirror_state(model, gm)
    return gm


@contextlib.contextmanager
def _recording_modes() -> Iterator[None]:
    """Trace with autograd on, as a training forward runs: a ``torch.no_grad()`` region in
    ``forward`` is then a change the trace can see (torch.export records it), also when the
    caller plans under ``no_grad`` or ``inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class _Unfaithful(Exception):
    """The trace ran but its graph would compute something else than the model."""

    fix = "trace with frontend='export' (or 'auto', which falls back to it)."


class _InferenceMode(_Unfaithful):
    """``forward`` runs ops under ``torch.inference_mode()``, which no front end records."""

    fix = (
        "write `with torch.no_grad():` for `with torch.inference_mode():` inside forward "
        "(the graph keeps no_grad regions; both stop gradients there), or plan the model "
        "with inference_mode in the caller instead."
    )


def _check_grad_modes(gm: fx.GraphModule) -> None:
    """Raise if a node of the symbolic trace was recorded with autograd off.

    The trace runs with autograd on (`_recording_modes`), so such a node ran in a
    ``torch.no_grad()``, ``torch.set_grad_enabled(False)`` or ``torch.inference_mode()``
    region of ``forward`` (or of a ``@torch.no_grad`` function it calls), which the fx
    graph drops: the graph would compute gradients the model does not.
    """
    for n in gm.graph.nodes:
        grad, inference = n.meta.get(_GRAD_MODE, (True, False))
        if n.op not in ("call_function", "call_method", "call_module") or (grad and not inference):
            continue
        if n.op == "call_module":
            target = f"module {n.target}"
        else:
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if inference:
            raise _InferenceMode(
                f"node {n.name!r} ({target}) runs under torch.inference_mode(), which a graph does not record: "
                "split, it would compute gradients the model does not"
            )
        raise _Unfaithful(
            f"node {n.name!r} ({target}) runs with autograd off (torch.no_grad(), set_grad_enabled(False) "
            "or a @torch.no_grad function), which a torch.fx graph does not record: split, it would "
            "compute gradients the model does not"
        )


class _InferenceWatch(TorchFunctionMode):
    """Notes the first torch function ``forward`` calls under ``torch.inference_mode()``.

    torch.export records ``no_grad`` regions (``wrap_with_set_grad_enabled``) but drops
    inference-mode ones, so their ops would compute gradients in the graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first: tuple[str, str] | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.first is None and torch.is_inference_mode_enabled():
            where = next(
                (f for f in reversed(traceback.extract_stack()) if not _internal(f.filename)),
                None,
            )
            at = f" at {where.filename}:{where.lineno}: {(where.line or '').strip()}" if where else ""
            self.first = (getattr(func, "__name__", str(func)), at)
        return func(*args, **(kwargs or {}))

    def check(self) -> None:
        if self.first is not None:
            name, at = self.first
            raise _InferenceMode(
                f"forward calls {name} under torch.inference_mode(){at}, which torch.export does not "
                "record: split, the graph would compute gradients the model does not"
            )


def _internal(filename: str) -> bool:
    """Whether `filename` belongs to torch or partitioner (not to the user's code)."""
    path = os.path.abspath(filename)
    return path.startswith((os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))) or (
        filename.startswith("<frozen ")
    )


def _mirror_state(model: nn.Module, gm: fx.GraphModule) -> None:
    """Give `gm` every parameter and buffer of `model`, under the same names and persistence.

    A symbolic trace copies only what the graph reads, and copies buffers read by
    ``get_attr`` as persistent ones; the rewritten module's ``state_dict`` must load
    into the original model (``strict=True``), so unused tensors (a module never called)
    are added and non-persistent buffers stay out of the state dict. The tensors are the
    model's own, as the trace's are. A tensor the root holds under two names
    (``self.p1 = self.p0 = nn.Parameter(...)``) keeps both, as the original's state dict
    does, also in deep copies (`GraphModule.__deepcopy__` copies the root's tensors by
    their first name only).
    """
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        path, _, attr = name.rpartition(".")
        src, dst = model.get_submodule(path), cast(nn.Module, gm)
        for part in path.split(".") if path else ():
            child = dst._modules.get(part)
            if child is None:
                child = nn.Module()
                dst.add_module(part, child)
            dst = child
        if dst is src:
            continue  # the trace holds this module itself
        if attr in src._parameters:
            if attr not in dst._parameters:
                dst.register_parameter(attr, src._parameters[attr])
        elif attr not in dst._buffers:
            dst.register_buffer(attr, tensor, persistent=attr not in src._non_persistent_buffers_set)
        elif attr in src._non_persistent_buffers_set:
            dst._non_persistent_buffers_set.add(attr)
    for path, original in model.named_modules(remove_duplicate=False):
        made = _submodule(gm, path)
        if made is not None and made is not original:  # a module the trace made: the original's order
            _reorder(made, tuple(original._parameters), tuple(original._buffers))
    first: dict[int, str] = {}
    aliases = {
        name: first[id(t)]
        for name, t in named_tensors(gm)
        if first.setdefault(id(t), name) != name and "." not in name and (name in gm._parameters or name in gm._buffers)
    }
    if gm._non_persistent_buffers_set or aliases:
        gm._register_deepcopy_hook(_RootState(gm, aliases))


class _RootState:
    """Deep-copy hook: `GraphModule.__deepcopy__` registers the root's tensors again, by
    their first name and as persistent buffers; this puts back the second names of tied
    root tensors and marks the non-persistent buffers again."""

    def __init__(self, gm: fx.GraphModule, aliases: dict[str, str]) -> None:
        self.non_persistent = frozenset(gm._non_persistent_buffers_set)
        self.aliases = dict(aliases)
        """Root attribute -> qualified name of the tensor it aliases."""
        self.order = (tuple(gm._parameters), tuple(gm._buffers))
        """The root's parameter and buffer names in the original's order (the state dict's)."""

    def __call__(self, gm: fx.GraphModule) -> None:
        for name, target in self.aliases.items():
            path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(path)
            if attr in owner._parameters and name not in gm._parameters:
                gm._parameters[name] = owner._parameters[attr]
            elif attr in owner._buffers and name not in gm._buffers:
                gm._buffers[name] = owner._buffers[attr]
        _reorder(gm, *self.order)
        gm._non_persistent_buffers_set |= {n for n in self.non_persistent if n in gm._buffers}


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or None where `root` has no such module."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _reorder(module: nn.Module, parameters: tuple[str, ...], buffers: tuple[str, ...]) -> None:
    """Put `module`'s parameters and buffers in these orders (the state dict's); others after them."""
    tables: tuple[tuple[dict[str, Any], tuple[str, ...]], ...] = (
        (module._parameters, parameters),
        (module._buffers, buffers),
    )
    for table, order in tables:
        rank = {name: k for k, name in enumerate(order)}
        ordered = sorted(table.items(), key=lambda item: rank.get(item[0], len(rank)))
        table.clear()
        table.update(ordered)


def _differs_from_eager(model: nn.Module, gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """How the fx graph's output, or the buffers it leaves, differ from the model's ("" if not).

    Symbolic tracing runs ``forward`` on proxies, and Python cannot hand a proxy every
    question: ``w is None`` or ``isinstance(w, Tensor)`` on a leaf module's output is
    answered about the proxy, so the graph silently takes a branch the model does not
    (nn.MultiheadAttention returns None weights; ``1.0 if w is None else 0.5`` becomes
    ``0.5``). Running both once catches that. Nothing is compared for models with
    tensors on ``meta`` (no values), or when the model itself fails on the inputs; the
    model is put back as it was after each run (`preserved`: BatchNorm statistics, counters),
    and both runs see the same random numbers.
    """
    inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    tensors = [*model.parameters(), *model.buffers(), *inputs]
    if any(t.is_meta for t in tensors):
        return ""
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    seed = torch.initial_seed() % 2**32

    def run(fn: Any) -> tuple[Any, list[torch.Tensor]]:
        """`fn`'s output on the inputs, and the buffers as it left them (the model is then put back)."""
        torch.manual_seed(seed)
        fresh = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
        with preserved(model):  # outputs copied first: one may be a buffer that is put back
            out = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, fn(*fresh[0], **fresh[1]))
            return out, [b.detach().clone() for b in model.buffers()]

    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        try:
            expected, expected_state = run(model)
        except Exception:  # noqa: BLE001 - the model fails on its own: nothing to compare
            return ""
        got, got_state = run(gm)
    flat_expected, spec_expected = tree_flatten(expected)
    flat_got, spec_got = tree_flatten(got)
    if spec_expected != spec_got:
        return f"the graph returns {spec_got} but the model returns {spec_expected}"
    for k, (e, g) in enumerate(zip(flat_expected, flat_got)):
        if not _same_value(e, g):
            return f"output {k} of the graph differs from the model's on the example inputs"
    names = [name for name, _ in model.named_buffers()]
    for name, e, g in zip(names, expected_state, got_state):
        if not _same_value(e, g):
            return f"buffer {name} differs after a forward of the graph and of the model"
    return ""


def _same_value(e: Any, g: Any) -> bool:
    if isinstance(e, torch.Tensor) and isinstance(g, torch.Tensor):
        return e.shape == g.shape and e.dtype == g.dtype and torch.allclose(e, g, rtol=1e-5, atol=1e-6, equal_nan=True)
    return type(e) is type(g) and e == g


PIN = "partitioner_pin"
"""Node meta key: the name of the node whose layer this node must join (see `thread_mutations`)."""

# Tensor methods and torch functions whose result shares its input's storage (a view), or
# may (reshape, contiguous): an in-place change through one changes the input too.
_VIEWS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "permute", "movedim",
        "expand", "expand_as", "squeeze", "unsqueeze", "narrow", "select", "t", "flatten", "unflatten",
        "split", "chunk", "unbind", "diagonal", "as_strided", "contiguous", "detach", "getitem", "T", "mT",
    }
)  # fmt: skip


def read_after(value: Any, *writes: Any) -> Any:
    """`value`, read after the in-place changes `writes` made to it through views.

    An identity that `thread_mutations` puts in the graph so that the order of a write
    through a view and a later read of the base becomes data flow, which transfers follow.
    """
    return value


# Ops that update their running statistics in place, though their schema does not say so:
# (index of the mode argument, indices of the statistics).
_STATISTICS = {
    torch.ops.aten.batch_norm.default: (5, (3, 4)),
    torch.ops.aten.instance_norm.default: (5, (3, 4)),
}


def _writes(gm: fx.GraphModule, n: fx.Node) -> tuple[list[fx.Node], bool]:
    """The nodes whose tensors `n` changes in place, and whether `n` returns the (first) one.

    Covers ``h.relu_()``, ``torch.relu_(h)``, ``F.relu(h, inplace=True)``, ``inplace``
    modules, ``out=h``, ATen ops whose schema marks an argument written (``aten.fill_``,
    ``aten.add_``), and batch norm's running statistics in training mode.
    """
    if n.op not in ("call_method", "call_function", "call_module"):
        return [], False
    schema = getattr(n.target, "_schema", None)
    if n.op == "call_function" and schema is not None:
        if n.target in _STATISTICS:
            mode, stats = _STATISTICS[n.target]
            if len(n.args) > mode and n.args[mode] is True:
                return [a for i in stats if isinstance(a := n.args[i], fx.Node)], False
            return [], False
        written: list[fx.Node] = []
        returned = False
        returned_sets = [r.alias_info.before_set for r in schema.returns if r.alias_info is not None]
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
                if isinstance(value, fx.Node):
                    returned = returned or (not written and arg.alias_info.before_set in returned_sets)
                    written.append(value)
        return written, returned
    out = n.kwargs.get("out")
    if isinstance(out, fx.Node):
        return [out], True
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if first is None:
        return [], False
    if n.op == "call_module":
        inplace = getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    elif n.op == "call_function" and n.kwargs.get("inplace") is True:
        inplace = True
    else:
        name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
        inplace = name.endswith("_") and not name.startswith("_")
    return ([first], True) if inplace else ([], False)


def _view_of(n: fx.Node) -> fx.Node | None:
    """The node whose storage `n`'s result shares (it is a view of it), or None."""
    source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if source is None or n.op not in ("call_method", "call_function"):
        return None
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        return source if returns_alias else None
    if n.target is getattr:
        return source if len(n.args) > 1 and n.args[1] in _VIEWS else None
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    return source if name in _VIEWS else None


def thread_mutations(gm: fx.GraphModule) -> bool:
    """Make in-place changes data flow that transfers follow, in place.

    Split over devices, a value is copied to another device once, right after it is
    made; a later in-place change must reach the readers that come after it.

    - A change to a tensor itself (``h.add_(x)``): later readers of ``h`` read the
      in-place node, which returns ``h``. torch.export writes its graphs so; a symbolic
      trace records ``h.add_(x)`` as a node nobody reads.
    - A change through a view (``h[:, 0] = 0``, ``h.transpose(0, 1).mul_(2)``), a change
      of a parameter or buffer (batch norm's running statistics), or one whose op does
      not return the changed tensor: later readers of ``h``, or of views of ``h`` taken
      before the change, read ``read_after(h, change)``; and the views, the change and
      those reads are pinned (node meta `PIN`) to the layer of ``h``, so the change is
      made to ``h`` itself, not to a copy on another device.

    Returns:
        Whether the graph changed.
    """
    nodes = list(gm.graph.nodes)
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(nodes)}
    writes = {n: _writes(gm, n) for n in nodes}
    # Each alias's base (the node that made the storage), and whether a view lies between.
    base_of: dict[fx.Node, tuple[fx.Node, bool]] = {}
    aliases: dict[fx.Node, list[fx.Node]] = {}
    for n in nodes:
        source, through_view = _view_of(n), True
        if source is None and writes[n][1]:
            source, through_view = writes[n][0][0], False  # an in-place op returns what it changed
        if source is not None:
            base, viewed = base_of.get(source, (source, False))
            base_of[n] = (base, viewed or through_view)
            aliases.setdefault(base, []).append(n)
    changed = False
    for m in nodes:
        written, returns_it = writes[m]
        for target in written:

            def later(a: fx.Node, m: fx.Node = m) -> list[fx.Node]:
                return [u for u in a.users if u is not m and u.target is not read_after and order.get(u, -1) > order[m]]

            base, through_view = base_of.get(target, (target, False))
            earlier = [v for v in aliases.get(base, []) if order[v] < order[m]]
            if returns_it and not through_view and base.op != "get_attr" and not any(later(v) for v in earlier):
                for user in later(target):
                    user.replace_input_with(target, m)
                    changed = True
                continue
            for n in (m, *earlier):
                n.meta[PIN] = base.name
            for alias in (base, *earlier):
                readers = later(alias)
                if not readers:
                    continue
                with gm.graph.inserting_after(m):
                    read = gm.graph.call_function(read_after, (alias, m))
                read.meta[PIN] = base.name
                # The read is the alias its readers now hold: a later change must reach them too.
                order[read] = order[m] + 0.5
                base_of[read] = (base, base_of.get(alias, (alias, False))[1])
                aliases.setdefault(base, []).append(read)
                for user in readers:
                    user.replace_input_with(alias, read)
                changed = True
    return changed


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


def _trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """Export `model` with a dynamic batch dimension where it can be, else with static shapes.

    Example inputs of a batch of 1 are traced as a batch of 2 (each repeated): export
    fixes sizes 0 and 1 as constants, and the graph would accept no other batch. A
    model with weights is then checked on the original inputs, as a symbolic trace is.
    A model on ``meta`` is traced with its inputs on ``meta`` too (a meta convolution
    weight does not take a CPU image), and a Hugging Face model asked for no
    ``use_cache`` is traced with its cache off (see `_cache_off`).
    """
    state = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in state):
        args, kwargs = _map_inputs(lambda x: x.to("meta"), args, kwargs)
    batched = _batch_of_two(args, kwargs)
    with _no_stack_traces(), quiet_fake_tensor_log(), _cache_off(model, kwargs) as cache_off:
        gm: fx.GraphModule | None = None
        try:
            ex_args, ex_kwargs = batched or (args, kwargs)
            dynamic = _batch_dynamic(model, ex_args, ex_kwargs)
            gm = torch.export.export(model, ex_args, ex_kwargs, strict=False, dynamic_shapes=dynamic).module()
        except Exception:  # noqa: BLE001 - a dynamic batch is a convenience; fall back to static shapes
            gm = None
        if gm is not None and batched is not None and _differs_from_eager(model, gm, args, kwargs):
            gm = None  # forward decides something on the batch size: keep the batch it was given
        if gm is None:
            # New tensor objects: export would reuse its symbolic sizes of the ones it saw (an
            # error then reads "[s31, 5] X [8, 8]" where the inputs are [2, 5]).
            fresh = _map_inputs(lambda x: x.detach().requires_grad_(x.requires_grad), args, kwargs)
            gm = torch.export.export(model, fresh[0], fresh[1], strict=False).module()
    if cache_off or kwargs.get("use_cache") is False:
        hook = _CacheOff(takes_flag=not cache_off)
        hook.attach(gm)
        gm._register_deepcopy_hook(hook.attach)  # copies (the rewrite's) keep it
    if thread_mutations(gm):
        gm.recompile()
    return gm


class _CacheOff:
    """Forward pre-hook of a graph traced with the cache off: calls as the model takes them.

    A graph traced with ``use_cache=False`` holds the flag as a constant and its calling
    convention demands it (``pm(ids)``: "missing 'use_cache'"); one traced with the flag
    off in the config (`_cache_off`) takes no flag (``pm(ids, use_cache=False)``:
    "unexpected keyword"). The model takes both, so the graph does: the flag is filled
    in or dropped. The outputs are those of ``use_cache=False``; ``use_cache=True``,
    a cache the graph cannot return, is refused.
    """

    def __init__(self, takes_flag: bool) -> None:
        self.takes_flag = takes_flag

    def attach(self, gm: fx.GraphModule) -> None:
        """Hook `gm` (a deep copy drops forward hooks; `GraphModule` runs deepcopy hooks)."""
        gm.register_forward_pre_hook(self.fill, with_kwargs=True, prepend=True)

    def fill(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flag = kwargs.get("use_cache")
        if flag:
            raise ValueError(
                "use_cache=True: this module was traced with the cache off and returns no cache; "
                "call it with use_cache=False or without use_cache"
            )
        rest = {k: v for k, v in kwargs.items() if k != "use_cache"}
        return args, ({**rest, "use_cache": False} if self.takes_flag else rest)


def _batch_of_two(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The example inputs as a batch of 2, if they are a batch of 1 (every tensor with a
    dimension has size 1 in dimension 0); else None."""
    tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.ndim]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return None

    def double(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.detach(), x.detach()]).requires_grad_(x.requires_grad) if x.ndim else x

    return _map_inputs(double, args, kwargs)


def _map_inputs(
    fn: Callable[[torch.Tensor], torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`fn` applied to every tensor input once: one tensor passed twice stays one (export
    gives aliased inputs one set of sizes)."""
    memo: dict[int, torch.Tensor] = {}

    def apply(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in memo:
            memo[id(x)] = fn(x)
        return memo[id(x)]

    return cast(tuple[tuple[Any, ...], dict[str, Any]], tree_map(apply, (args, kwargs)))


@contextlib.contextmanager
def _cache_off(model: nn.Module, kwargs: Mapping[str, Any]) -> Iterator[bool]:
    """Trace a Hugging Face model that takes ``use_cache`` but was given none with its cache off.

    Its forward then reads ``config.use_cache``, True for decoders (Llama, GPT-2, T5), and
    returns a ``DynamicCache``, which torch.export cannot return. Turning the config's
    flag off while tracing (and back after) traces what ``use_cache=False`` computes,
    and the graph takes the inputs the call gave: ``pm(ids)`` as ``model(ids)``.
    Yields whether it turned the flag off.
    """
    try:
        takes_it = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_it = False
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    flipped = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    if not takes_it or "use_cache" in kwargs or not flipped:
        yield False
        return
    for c in flipped:
        c.use_cache = False
    try:
        yield True
    finally:
        for c in flipped:
            c.use_cache = True


class _DropFailedMetaLog(logging.Filter):
    """Drops fake_tensor's log of a failing meta kernel, in threads inside `quiet_fake_tensor_log`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "depth", 0)


_quiet = threading.local()
_fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
_fake_tensor_log.addFilter(_DropFailedMetaLog())


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """Silence `FakeTensorMode`'s error log in this thread (other threads keep theirs).

    When a kernel fails on fake tensors (a matmul of mismatched shapes), torch logs the
    whole traceback at ERROR level, some 35 lines per attempt, before raising; the error
    is raised anyway, and partitioner names it once in the TraceError or ProfileError.
    """
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        yield
    finally:
        _quiet.depth -= 1


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Export without recording each node's Python stack (``node.meta["stack_trace"]``).

    The graph is the same; the stacks cost up to a tenth of an export (GPT-2 XL: some
    2,600 stacks walked and their source lines read) and nothing here needs them: errors
    name a node's module (``nn_module_stack``), which export records anyway.
    """
    config: Any = getattr(torch.fx, "config", None)
    if not hasattr(config, "do_not_emit_stack_traces"):
        yield  # An older torch without the switch records the stacks.
        return
    previous = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = previous


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
    unfaithful = [err for _, err in failures if isinstance(err, _Unfaithful)]
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
        if not _internal(f.filename) and not f.filename.startswith(_GENERATED)
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
