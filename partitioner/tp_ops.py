"""The op vocabulary tensor-parallel detection reads a traced graph with (torch side).

One name per node (`op_name`) for both front ends: an ATen overload by its packet
(``aten.add.Tensor`` -> ``add``), a Python function by its ``__name__`` (``F.linear`` ->
``linear``, ``operator.getitem`` -> ``getitem``), a method by its name; in-place variants
read as their out-of-place op (``add_`` -> ``add``). `partitioner.tp_detect` sorts nodes by
these names into weight matmuls, embeddings, and the ops a column's output may pass
through on its way to a row (`PASS_THROUGH`); `column_parts` and `heads_of` read a fused
projection's parts and an attention operand's heads off the splits and reshapes.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "PASS_THROUGH",
    "RESHAPES",
    "SPLITS",
    "ACTIVATION_MATMULS",
    "ATTENTION",
    "NORMS",
    "DROPOUTS",
    "STATELESS_MODULES",
    "WeightOp",
    "op_name",
    "module_path",
    "module_class",
    "weight_op",
    "embedding_op",
    "is_conv",
    "shape_of",
    "tensor_at",
    "submodule",
    "column_parts",
    "heads_of",
]

RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "unflatten", "view_as", "reshape_as"})
"""Ops that may split a width into (heads, head size)."""

SPLITS = frozenset({"split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split"})
"""Ops that cut a fused projection (query, key, value) into parts."""

ACTIVATION_MATMULS = frozenset({"matmul", "bmm", "mm", "baddbmm", "einsum"})
"""Products of two activations (attention scores, the weighted sum of values)."""

ATTENTION = frozenset(
    {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    }
)
"""Fused attention cores."""

DROPOUTS = frozenset({"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"})

NORMS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"})
"""Norm ops; the ``x * rsqrt(mean(x^2) + eps)`` pattern of hand-written RMSNorms is found by its ``rsqrt``."""

_VIEWS = RESHAPES | SPLITS | {
    "transpose", "t", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "contiguous", "clone",
    "to", "_to_copy", "type", "type_as", "float", "half", "bfloat16", "double", "alias", "detach", "unbind",
    "getitem", "slice", "select", "narrow", "cat", "concat", "stack", "repeat", "repeat_interleave", "movedim",
    "swapaxes", "lift_fresh_copy",
}  # fmt: skip
_ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "pow", "sqrt", "rsqrt", "exp", "log", "tanh",
    "sigmoid", "relu", "gelu", "silu", "erf", "where", "masked_fill", "clamp", "clamp_min", "clamp_max", "abs",
    "sin", "cos", "reciprocal", "leaky_relu", "mish", "softplus", "hardtanh", "hardswish", "elu", "square",
    "softmax", "_softmax", "_safe_softmax",
}  # fmt: skip
PASS_THROUGH = frozenset(_VIEWS | _ELEMENTWISE | DROPOUTS | ATTENTION | ACTIVATION_MATMULS)
"""Ops a column's output may pass through and still be split by the heads or features: views,
reshapes, splits, element-wise ops, softmax, dropout and attention. Reductions (a norm's
mean) and anything else end the walk."""

STATELESS_MODULES = frozenset(
    {
        "ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Dropout", "Softmax", "Identity", "LeakyReLU", "Mish",
        "Softplus", "ELU", "Hardswish", "Hardtanh", "GELUActivation", "NewGELUActivation",
    }
)  # fmt: skip
"""Classes of parameterless leaf modules (torch.fx ``call_module``) that act element-wise."""

_TRANSPOSES = frozenset({"t", "transpose", "permute"})
_WEIGHT_CASTS = frozenset({"to", "_to_copy", "contiguous", "type", "float", "half", "bfloat16", "alias", "detach"})


def op_name(n: fx.Node) -> str:
    """The node's op by name (module docstring); ``call_module`` nodes read ``module``."""
    if n.op == "call_function":
        packet = getattr(n.target, "_overloadpacket", None)
        name = packet.__name__ if packet is not None else getattr(n.target, "__name__", str(n.target))
    elif n.op == "call_method":
        name = str(n.target)
    elif n.op == "call_module":
        return "module"
    else:
        return n.op
    if n.target is operator.getitem:
        return "getitem"
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def module_path(n: fx.Node) -> str:
    """The innermost module the node runs in (``nn_module_stack``; a ``call_module``'s target)."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    for key in reversed(list(stack)):
        path = stack[key][0]
        if path and not key.startswith("_empty_nn_module_stack"):
            return str(path)
    return ""


def module_class(n: fx.Node, gm: fx.GraphModule) -> str:
    """The class name of the innermost module the node runs in ('' at the root)."""
    if n.op == "call_module":
        return type(submodule(gm, n)).__name__
    stack = n.meta.get("nn_module_stack") or {}
    for key in reversed(list(stack)):
        path, cls = stack[key]
        if path and not key.startswith("_empty_nn_module_stack"):
            name = cls if isinstance(cls, str) else cls.__qualname__
            return str(name).rsplit(".", 1)[-1]
    return ""


def submodule(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (None if the graph holds none by that name)."""
    try:
        return gm.get_submodule(str(n.target))
    except AttributeError:
        return None


def tensor_at(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    """The tensor a ``get_attr`` target names, or None."""
    try:
        value = operator.attrgetter(target)(gm)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


@dataclass(frozen=True, slots=True)
class WeightOp:
    """A matmul of an activation with a parameter: a Linear, an HF ``Conv1D``, ``x @ w``."""

    module: str
    activation: fx.Node
    """The input it multiplies (the other operand is the weight)."""
    in_features: int
    out_features: int
    transposed: bool
    """Weight stored ``(in, out)``."""
    tensors: tuple[torch.Tensor, ...]
    """Its weight and bias."""


def _param(gm: fx.GraphModule, n: Any) -> tuple[torch.Tensor | None, int]:
    """The 2-D parameter `n` reads through casts and transposes, and how many transposes."""
    flips = 0
    while isinstance(n, fx.Node) and op_name(n) in _TRANSPOSES | _WEIGHT_CASTS:
        flips += op_name(n) in _TRANSPOSES
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op != "get_attr":
        return None, 0
    t = tensor_at(gm, str(n.target))
    return (t, flips) if isinstance(t, nn.Parameter) and t.ndim == 2 else (None, 0)


def weight_op(n: fx.Node, gm: fx.GraphModule) -> WeightOp | None:
    """`n` as a `WeightOp`, or None when it multiplies no parameter."""
    if n.op == "call_module":
        sub = submodule(gm, n)
        w = getattr(sub, "weight", None)
        if sub is None or not n.args or not isinstance(n.args[0], fx.Node) or not isinstance(w, torch.Tensor) or w.ndim != 2:
            return None
        held = tuple(sub.parameters())
        if isinstance(sub, nn.Linear):
            return WeightOp(str(n.target), n.args[0], w.shape[1], w.shape[0], False, held)
        if type(sub).__name__ == "Conv1D":  # Hugging Face's GPT-2 projection: x @ w + b, w (in, out)
            return WeightOp(str(n.target), n.args[0], w.shape[0], w.shape[1], True, held)
        return None
    name = op_name(n)
    args = list(n.args)
    if name == "linear":  # x, w (out, in), bias
        act, w, bias = args[0], args[1] if len(args) > 1 else n.kwargs.get("weight"), (args + [None] * 3)[2]
        stored_in_out = False
    elif name == "addmm":  # bias, x, w (in, out)
        bias, act, w = (args + [None] * 3)[:3]
        stored_in_out = True
    elif name in ("mm", "matmul") and len(args) == 2:
        act, w, bias = args[0], args[1], None
        stored_in_out = True
    else:
        return None
    weight, flips = _param(gm, w)
    if weight is None or not isinstance(act, fx.Node):
        return None
    transposed = stored_in_out != bool(flips % 2)
    fan_in, fan_out = weight.shape if transposed else weight.shape[::-1]
    tensors: tuple[torch.Tensor, ...] = (weight,)
    if isinstance(bias, fx.Node) and bias.op == "get_attr":
        b = tensor_at(gm, str(bias.target))
        if b is not None:
            tensors = (weight, b)
    module = module_path(n) or _owner(str(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else "")
    return WeightOp(module, act, int(fan_in), int(fan_out), transposed, tensors)


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def embedding_op(n: fx.Node, gm: fx.GraphModule) -> tuple[str, torch.Tensor, fx.Node] | None:
    """(module, weight, indices) of an embedding lookup, or None."""
    if n.op == "call_module":
        sub = submodule(gm, n)
        if isinstance(sub, nn.Embedding) and n.args and isinstance(n.args[0], fx.Node):
            return str(n.target), sub.weight, n.args[0]
        return None
    if op_name(n) != "embedding" or len(n.args) < 2:
        return None
    a, b = n.args[0], n.args[1]
    aten = getattr(n.target, "_overloadpacket", None) is not None  # aten: (weight, indices); F: (input, weight)
    w, ids = (a, b) if aten else (b, a)
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not isinstance(ids, fx.Node):
        return None
    t = tensor_at(gm, str(w.target))
    if t is None:
        return None
    return module_path(n) or _owner(str(w.target)), t, ids


def is_conv(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op == "call_module":
        return isinstance(submodule(gm, n), nn.modules.conv._ConvNd)
    return op_name(n) in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose2d")


def shape_of(stats: Mapping[str, Any], n: Any) -> tuple[int, ...]:
    s = stats.get(n.name) if isinstance(n, fx.Node) else None
    return tuple(s.shape) if s is not None else ()


def column_parts(column: fx.Node, out: int, stats: Mapping[str, Any]) -> int:
    """Equal parts a column's output is cut into on its features before any heads reshape
    (1: not cut; 0: cut unequally)."""
    todo = [column]
    while todo:
        x = todo.pop()
        rank = len(shape_of(stats, x))
        for u in x.users:
            name = op_name(u)
            if name in SPLITS and rank:
                dim = u.kwargs.get("dim", u.args[2] if len(u.args) > 2 else 0)
                if not isinstance(dim, int) or dim % rank != rank - 1:
                    continue
                size = u.args[1] if len(u.args) > 1 else u.kwargs.get("split_size_or_sections", u.kwargs.get("chunks"))
                if name in ("chunk", "tensor_split") and isinstance(size, int):  # a count of pieces, not a size
                    return size if out % size == 0 else 0
                if isinstance(size, int):
                    return out // size if out % size == 0 else 0
                if isinstance(size, (list, tuple)) and size:
                    return len(size) if len(set(size)) == 1 else 0
            elif name in RESHAPES and shape_of(stats, u)[-1:] == (out,):
                todo.append(u)
    return 1


def heads_of(
    start: object, members: set[fx.Node], weights: Mapping[fx.Node, WeightOp], stats: Mapping[str, Any]
) -> int:
    """Heads of an attention operand: the reshape upstream of it that splits the width into
    (heads, head size); 0 if none."""
    if not isinstance(start, fx.Node):
        return 0
    seen = {start}
    todo = [start]
    while todo:
        x = todo.pop(0)
        if op_name(x) in RESHAPES and x.args and isinstance(x.args[0], fx.Node):
            out, inp = shape_of(stats, x), shape_of(stats, x.args[0])
            if len(out) >= 3 and inp and out[:-2] == inp[:-1] and out[-2] * out[-1] == inp[-1]:
                return out[-2]
        if x in weights:
            continue
        for a in x.all_input_nodes:
            if a in members and a not in seen:
                seen.add(a)
                todo.append(a)
    return 0
