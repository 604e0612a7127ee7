"""Cut a linear layer too heavy for one device's share into column pieces, in the traced graph.

A pipeline's period is its busiest device's, so one layer heavier than total / devices
(GPT-2 small's vocabulary head on 8 GPUs: 2.2x the even share) caps it however the rest
is placed. Cut along its output features (vocabulary parallelism with the outputs
gathered: the column-parallel linear of Megatron-LM, Shoeybi et al. 2019),

    y = cat([linear(x, W[a_0:a_1], b[a_0:a_1]), ..., linear(x, W[a_{k-1}:a_k], b[...])], -1)

it becomes k layers (``lm_head@0/4`` .. ``lm_head@3/4``) that the solver places as it
places any other, and that the rewrite runs where they are placed, moving ``x`` to each
piece and each piece's output to the concatenation, as it does for any edge.

The weight stays one parameter: the user's model is never changed, and a weight tied to
an embedding (GPT-2, T5) keeps one gradient, the sum of the pieces' and the embedding's.
Each piece's rows are sliced where the weight lives (`partitioner.layers` keeps a
`WEIGHT_SLICE` node with the weight's owner) and moved to the piece: a value of ``rows x
in_features`` elements per step, priced as any weight read on another device is
(`partitioner.ir.Value.batched` is False).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from partitioner.options import SplitLayer
from partitioner.snapshot import named_tensors
from partitioner.trace import TracedModel

__all__ = ["WEIGHT_SLICE", "split_graph", "linear_node", "splittable", "heavy_splits", "pieces_for", "split_bounds"]

WEIGHT_SLICE = "partitioner_weight_slice"
"""``node.meta`` key of a slice of a weight (or bias) for one column piece."""

_LINEAR = torch.ops.aten.linear.default


def split_graph(traced: TracedModel, splits: Iterable[SplitLayer]) -> TracedModel:
    """`traced` with each linear of `splits` computed in column pieces (see the module docstring).

    The graph module is a copy sharing its tensors with `traced.gm` (nothing is allocated,
    nothing of `traced` changes).

    Raises:
        ValueError: A split names no linear layer computed once, or more pieces than it has
            output features.
    """
    splits = tuple(splits)
    if not splits:
        return traced
    gm = copy.deepcopy(traced.gm, {id(t): t for _, t in named_tensors(traced.gm)})
    for split in splits:
        node = linear_node(gm, split.module)
        if node is None:
            raise ValueError(
                f"cannot split {split.module!r} into {split.pieces} pieces: it is no nn.Linear called once in the "
                "traced graph; name a linear layer (a vocabulary head such as 'lm_head'), or plan without split"
            )
        _split_node(gm, node, split)
    gm.graph.lint()
    gm.recompile()
    return replace(traced, gm=gm, split=traced.split + splits)


def linear_node(gm: fx.GraphModule, module: str) -> fx.Node | None:
    """The one node computing the ``nn.Linear`` at `module` (an ``aten.linear`` of the export
    graph or a ``call_module`` of torch.fx), or None where there is none or more than one."""
    found = [n for n in gm.graph.nodes if _computes(gm, n, module)]
    return found[0] if len(found) == 1 else None


def pieces_for(layer_s: float, share_s: float, devices: int) -> int:
    """Column pieces for a layer of `layer_s` seconds where each device's share is `share_s`:
    enough for each piece to take at most half a share (so that the pieces pack beside other
    layers), and at most one per device; 1 (no split) for a layer within its share."""
    if share_s <= 0 or layer_s <= share_s or devices < 2:
        return 1
    return min(devices, math.ceil(2 * layer_s / share_s))


def split_bounds(rows: int, pieces: int) -> list[int]:
    """Row bounds ``a_0 = 0 < a_1 < ... < a_k = rows`` of `pieces` near-equal pieces."""
    return [rows * j // pieces for j in range(pieces + 1)]


def _computes(gm: fx.GraphModule, n: fx.Node, module: str) -> bool:
    if n.op == "call_module":
        return n.target == module and isinstance(gm.get_submodule(module), nn.Linear)
    if n.op != "call_function" or n.target is not _LINEAR:
        return False
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    return bool(stack) and stack[-1][0] == module and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"


def _split_node(gm: fx.GraphModule, node: fx.Node, split: SplitLayer) -> None:
    """Replace `node` (a linear) by `split.pieces` column pieces and their concatenation."""
    graph = gm.graph
    stack = dict(node.meta.get("nn_module_stack") or {})
    with graph.inserting_before(node):
        if node.op == "call_module":
            linear = gm.get_submodule(split.module)
            x: fx.Node = node.args[0]  # type: ignore[assignment]
            weight = graph.get_attr(f"{split.module}.weight")
            bias = graph.get_attr(f"{split.module}.bias") if linear.bias is not None else None
            stack = stack or {split.module: (split.module, f"{type(linear).__module__}.{type(linear).__qualname__}")}
        else:
            x, weight = node.args[0], node.args[1]  # type: ignore[assignment]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")  # type: ignore[assignment]
        rows = _out_features(gm, node)
        if split.pieces > rows:
            raise ValueError(f"cannot split {split.module!r} into {split.pieces} pieces: it has {rows} output features")
        *outer, (own_key, own) = stack.items()
        bounds = split_bounds(rows, split.pieces)
        pieces: list[fx.Node] = []
        for j in range(split.pieces):
            lo, hi = bounds[j], bounds[j + 1]
            # A layer key of its own: `partitioner.layers` reads ``module@suffix`` as module's.
            stack_j = {**dict(outer), f"{own_key}@{j}/{split.pieces}": own}
            if pieces:
                # Each piece hands x on to the next (an alias, no copy): consecutive pieces are
                # joined, so the layers stay a near-chain that the exact DP solves.
                x = graph.call_function(torch.ops.aten.alias.default, (x,))
                x.meta["nn_module_stack"] = pieces[-1].meta["nn_module_stack"]
            w = _weight_slice(graph, weight, lo, hi, dict(outer))
            b = _weight_slice(graph, bias, lo, hi, dict(outer)) if isinstance(bias, fx.Node) else None
            piece = graph.call_function(_LINEAR, (x, w, b))
            piece.meta["nn_module_stack"] = stack_j
            pieces.append(piece)
        cat = graph.call_function(torch.ops.aten.cat.default, (pieces, -1))
        cat.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        cat.meta["nn_module_stack"] = dict(outer)
    node.replace_all_uses_with(cat)
    graph.erase_node(node)


def _weight_slice(graph: fx.Graph, tensor: fx.Node, lo: int, hi: int, stack: dict[str, object]) -> fx.Node:
    sliced = graph.call_function(torch.ops.aten.slice.Tensor, (tensor, 0, lo, hi))
    sliced.meta[WEIGHT_SLICE] = True
    sliced.meta["nn_module_stack"] = stack
    return sliced


def _out_features(gm: fx.GraphModule, node: fx.Node) -> int:
    """Output features of the linear `node` computes (`linear_node`)."""
    if node.op == "call_module":
        return int(gm.get_submodule(str(node.target)).get_parameter("weight").shape[0])
    assert isinstance(node.args[1], fx.Node)
    return int(_tensor(gm, node.args[1]).shape[0])


def _tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def splittable(gm: fx.GraphModule, modules: Sequence[str]) -> str | None:
    """The one module of `modules` (a layer's) that is a linear computed once, else None."""
    found = [m for m in modules if "@" not in m and linear_node(gm, m) is not None]
    return found[0] if len(modules) == 1 and found else None


def heavy_splits(
    traced: TracedModel, layers: Sequence[tuple[tuple[str, ...], float]], share_s: float, devices: int
) -> tuple[SplitLayer, ...]:
    """The splits that bring each layer heavier than `share_s` under it, where the layer is
    one linear computed once (`splittable`) and not cut already.

    Args:
        traced: The traced model the layers group.
        layers: Each layer's modules and its time on its fastest device.
        share_s: Total time / devices.
        devices: How many devices share the layers (the most pieces).
    """
    done = {s.module for s in traced.split}
    found: list[SplitLayer] = []
    for modules, seconds in layers:
        pieces = pieces_for(seconds, share_s, devices)
        module = splittable(traced.gm, modules) if pieces > 1 else None
        node = linear_node(traced.gm, module) if module is not None and module not in done else None
        if module is None or node is None:
            continue
        rows = _out_features(traced.gm, node)
        if rows >= 2:
            found.append(SplitLayer(module, min(pieces, rows)))
    return tuple(found)
