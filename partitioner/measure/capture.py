"""Record every layer's real inputs as units: the graph split by layer (or node by node) and run once.

The traced graph is split by layer with `torch.fx.passes.split_module` (one submodule per
layer; nodes no layer holds, such as torch.export's ``_guards_fn``, go with the latest
layer they read from, else the first). One run of the split module on the example inputs
(on the CPU, with autograd on), through an `fx.Interpreter` (`_Recorder`), records each
submodule's inputs. Where the split is impossible (split_module reports a cycle between
partitions, or a grad or autocast region that would need monotone labels) or the split
graph does not run, every graph node is a unit, recorded the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_leaves, tree_map

from partitioner.errors import ProfileError
from partitioner.layers import LayeredModel
from partitioner.measure.units import HOST, Unit, clones, detach, differentiable, leaf, unit_bytes, working_copy
from partitioner.progress import Progress

__all__ = ["capture_units"]


def _call_method(name: str, self: Any, *args: Any, **kwargs: Any) -> Any:
    return getattr(self, name)(*args, **kwargs)


class _Recorder(fx.Interpreter):
    """Runs a graph once, recording the inputs of the nodes in `unit_layer` as `Unit`s.

    Each recorded node runs with autograd on and its outputs are detached (keeping
    ``requires_grad``), so no autograd graph outlives one unit. It runs on clones of its
    inputs: a clone's version counter tells whether the call writes an input in place
    (torch.export's training IR keeps ``add_`` and friends; ``ReLU(inplace=True)`` may
    open a layer). Such a unit records its inputs as they were before the call and is
    timed on fresh clones, so repeated calls neither compound the write nor trip
    autograd's check against writing a leaf; the write is then applied to the originals,
    as the program would see it.
    """

    def __init__(self, gm: fx.GraphModule, unit_layer: Mapping[str, int]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.unit_layer = unit_layer
        self.units: list[Unit] = []

    def run_node(self, n: fx.Node) -> Any:
        layer = self.unit_layer.get(n.name)
        if layer is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_module":
            fn: Callable[..., Any] = self.fetch_attr(str(n.target))
        elif n.op == "call_method":
            fn = partial(_call_method, str(n.target))
        else:
            fn = n.target  # type: ignore[assignment]
        unit = Unit(layer=layer, name=n.name, fn=fn, args=tuple(args), kwargs=dict(kwargs))
        try:
            with torch.enable_grad():
                call_args, call_kwargs = clones((unit.args, unit.kwargs))
                out = unit.fn(*call_args, **call_kwargs)
        except Exception as e:
            raise ProfileError(
                f"running layer {layer} (node {n.name!r}, {n.op} {n.target}) on the example inputs failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        written = [
            (original, used)
            for original, used in zip(tree_leaves((unit.args, unit.kwargs)), tree_leaves((call_args, call_kwargs)))
            if isinstance(used, torch.Tensor) and used is not original and used._version > 0
        ]
        if written:
            before = {id(original): leaf(original, copy=True) for original, _ in written}
            unit.args, unit.kwargs = tree_map(lambda x: before.get(id(x), x), (unit.args, unit.kwargs))
            unit.clone_inputs = True
            with torch.no_grad():
                for original, used in written:
                    original.copy_(used)
        unit.differentiable = bool(differentiable(out))
        unit.nbytes = unit_bytes(unit)
        self.units.append(unit)
        return detach(out)


def _labels(gm: fx.GraphModule, node_layer: Mapping[str, int]) -> dict[str, int]:
    """Layer of every call node; one no layer holds joins the latest layer it reads from, else 0."""
    labels: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op.startswith("call_"):
            inputs = [labels[a.name] for a in n.all_input_nodes if a.name in labels]
            labels[n.name] = node_layer.get(n.name, max(inputs, default=0))
    return labels


def capture_units(
    layered: LayeredModel, flat_inputs: Sequence[Any], written: frozenset[str], say: Progress
) -> list[Unit]:
    """Split a working copy of the graph by layer and record every layer's inputs.

    Where split_module fails, or its split graph does not run, every node is a unit.

    Args:
        layered: The traced model and its layers.
        flat_inputs: The graph's flat example inputs (copied before the run).
        written: Parameters the forward writes in place (copied, not shared).
        say: Told when the split fails and the nodes are timed one by one.

    Raises:
        ProfileError: A node failed on the example inputs (the message names it).
    """
    work = working_copy(layered.traced.gm, written)
    labels = _labels(work, layered.node_layer)

    def record(gm: fx.GraphModule, unit_layer: Mapping[str, int]) -> list[Unit]:
        recorder = _Recorder(gm, unit_layer)
        recorder.run(*[leaf(x, HOST, copy=True) if isinstance(x, torch.Tensor) else x for x in flat_inputs])
        return recorder.units

    try:
        split = split_module(work, work, lambda n: labels[n.name])
    except Exception as e:  # noqa: BLE001 - e.g. a cycle between layers, or non-monotone grad regions
        say(f"split_module could not split the graph by layer ({type(e).__name__}: {e}); timing node by node")
    else:
        submodules = {n.name: int(str(n.target).rpartition("_")[2]) for n in split.graph.nodes if n.op == "call_module"}
        try:
            return record(split, submodules)
        except ProfileError as e:
            say(f"the graph split by layer did not run ({e}); timing node by node")
    return record(work, labels)

