"""The torch.export front end: a dynamic batch where it can be, a Hugging Face cache left out."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from partitioner.mutations import thread_mutations
from partitioner.trace_checks import differs_from_eager

__all__ = ["quiet_fake_tensor_log", "trace_export"]


def trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
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
        if gm is not None and batched is not None and differs_from_eager(model, gm, args, kwargs):
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
