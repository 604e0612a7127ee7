"""Cut a stage graph into one submodule per planner layer: the units FSDP2 gathers one at a time.

A stage graph (`partitioner.distributed.stages`) reads every parameter with ``get_attr``
at the stage's root, never through its blocks' ``forward``, so ``fully_shard`` of a block
would never see a call and the stage is one FSDP unit: all its parameters gathered at
once. The planner prices ZeRO-3 otherwise (`partitioner.pipeline_plan.terms`): the
working copy of two layers, the one in use and the one prefetched. `cut_layers` makes
that true: each planner layer of the stage becomes a submodule ``_layer_<i>`` (``i``
its index in `Plan.layers`) whose graph holds the layer's nodes and reads the
parameters only it reads, and the stage's root graph calls the submodules in order.
``fully_shard`` of each submodule, then of the root, gathers a layer's parameters at its
call, and FSDP2 prefetches the next layer's while one runs.

The invariant (as for ``torch.fx.passes.split_module``, which cannot be used here: it
passes parameters to its partitions as arguments, so they own none): the cut module
computes what the stage computes, outputs and gradients. Every node takes its layer
(`LayeredModel.node_layer`) or, if no layer holds it (a pinned redistribution of tensor
parallelism, a mask built at the root), the latest layer it reads from; a node whose
input comes from a later layer moves to that layer, so values only flow forward. A
parameter read by several layers (a weight tied within the stage) or returned by the
stage stays at the root and is passed to the layers reading it (the root's FSDP unit
gathers it).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.fx as fx

from partitioner.distributed.names import named_tensors

__all__ = ["CutStage", "cut_layers"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CutStage:
    """A stage cut into layer submodules, and the names its tensors had before the cut."""

    module: fx.GraphModule
    """The stage's root: its graph calls the layer submodules in order."""
    units: tuple[str, ...]
    """Names of the layer submodules (``_layer_<i>``), in call order."""
    names: Mapping[str, str]
    """Each tensor name of `module` (``_layer_3.model.layers.1.mlp.up_proj.weight``) -> its
    name in the uncut stage (``model.layers.1.mlp.up_proj.weight``)."""


def _labels(stage: fx.GraphModule, layer_of: Mapping[str, int]) -> dict[fx.Node, int]:
    """Layer of every call node: its own, raised to the latest layer it reads (values flow forward)."""
    label: dict[fx.Node, int] = {}
    calls = [n for n in stage.graph.nodes if n.op.startswith("call_")]
    first = min((layer_of[n.name] for n in calls if n.name in layer_of), default=0)
    for n in calls:
        inputs = [label[a] for a in n.all_input_nodes if a in label]
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in label:
            label[n] = label[n.args[0]]  # the items of a multi-output op stay with it
        else:
            label[n] = max(inputs + [layer_of.get(n.name, first)])
    return label


def cut_layers(stage: fx.GraphModule, layer_of: Mapping[str, int]) -> CutStage:
    """Cut `stage` into one submodule per layer its nodes belong to (not modified: the cut shares its tensors).

    Args:
        stage: A stage graph (`StageGraphs.modules`), tensor parallelism applied or not.
        layer_of: Node name -> index of its layer in `Plan.layers` (`LayeredModel.node_layer`).

    Returns:
        The cut stage; its `CutStage.names` map its tensor names back to `stage`'s.
    """
    label = _labels(stage, layer_of)
    units = sorted(set(label.values()))
    readers: dict[fx.Node, set[int]] = {}  # get_attr -> the units reading it
    at_root: set[fx.Node] = set()  # a tensor several units read: the root holds it and passes it
    for n in stage.graph.nodes:
        if n.op == "get_attr":
            readers[n] = {label[u] for u in n.users if u in label}
            returned = any(u.op == "output" for u in n.users)
            if (len(readers[n]) > 1 or returned) and isinstance(attrgetter(str(n.target))(stage), torch.Tensor):
                at_root.add(n)
    root = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}
    for n in stage.graph.nodes:
        if n.op == "placeholder":
            env[n] = root.node_copy(n)
        elif n in at_root:
            env[n] = root.node_copy(n)
            attrs[str(n.target)] = attrgetter(str(n.target))(stage)
    output = next(n for n in stage.graph.nodes if n.op == "output")
    names: dict[str, str] = {}
    for k in units:
        members = [n for n in stage.graph.nodes if label.get(n) == k or (n not in at_root and k in readers.get(n, ()))]
        inside = set(members)
        inputs = list(dict.fromkeys(a for n in members for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in members if any(u not in inside for u in n.users)]
        graph = fx.Graph()
        local: dict[fx.Node, fx.Node] = {}
        for a in inputs:
            local[a] = graph.placeholder(a.name)
            local[a].meta = dict(a.meta)
        for n in members:
            local[n] = graph.node_copy(n, local.__getitem__)
        graph.output(tuple(local[n] for n in outputs))
        graph.lint()
        unit = fx.GraphModule(stage, graph, class_name=f"Layer{k}")
        name = f"_layer_{k}"
        attrs[name] = unit
        call = root.call_module(name, tuple(env[a] for a in inputs))
        for i, n in enumerate(outputs):
            env[n] = root.call_function(operator.getitem, (call, i))
        for tensor_name, _ in named_tensors(unit):
            names[f"{name}.{tensor_name}"] = tensor_name
    root.output(fx.map_arg(output.args[0], env.__getitem__))
    root.lint()
    module = fx.GraphModule(attrs, root, class_name=type(stage).__name__)
    for tensor_name, _ in named_tensors(module):
        names.setdefault(tensor_name, tensor_name)
    return CutStage(module=module, units=tuple(f"_layer_{k}" for k in units), names=names)

