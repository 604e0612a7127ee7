"""Whether a traced graph computes what the model does: grad-mode regions and a run beside eager."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from partitioner.snapshot import preserved

__all__ = [
    "InferenceMode",
    "InferenceWatch",
    "Unfaithful",
    "differs_from_eager",
    "internal_file",
    "recording_modes",
]


@contextlib.contextmanager
def recording_modes() -> Iterator[None]:
    """Trace with autograd on, as a training forward runs: a ``torch.no_grad()`` region in
    ``forward`` is then a change the trace can see (torch.export records it), also when the
    caller plans under ``no_grad`` or ``inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class Unfaithful(Exception):
    """The trace ran but its graph would compute something else than the model."""

    fix = "trace with frontend='export' (or 'auto', which falls back to it)."


class InferenceMode(Unfaithful):
    """``forward`` runs ops under ``torch.inference_mode()``, which no front end records."""

    fix = (
        "write `with torch.no_grad():` for `with torch.inference_mode():` inside forward "
        "(the graph keeps no_grad regions; both stop gradients there), or plan the model "
        "with inference_mode in the caller instead."
    )


class InferenceWatch(TorchFunctionMode):
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
                (f for f in reversed(traceback.extract_stack()) if not internal_file(f.filename)),
                None,
            )
            at = f" at {where.filename}:{where.lineno}: {(where.line or '').strip()}" if where else ""
            self.first = (getattr(func, "__name__", str(func)), at)
        return func(*args, **(kwargs or {}))

    def check(self) -> None:
        """Raise `InferenceMode` naming the first such call, if there was one."""
        if self.first is not None:
            name, at = self.first
            raise InferenceMode(
                f"forward calls {name} under torch.inference_mode(){at}, which torch.export does not "
                "record: split, the graph would compute gradients the model does not"
            )


def internal_file(filename: str) -> bool:
    """Whether `filename` belongs to torch or partitioner (not to the user's code)."""
    path = os.path.abspath(filename)
    return path.startswith((os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))) or (
        filename.startswith("<frozen ")
    )


def differs_from_eager(model: nn.Module, gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
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
