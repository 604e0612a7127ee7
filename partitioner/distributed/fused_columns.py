"""Split a fused column (GPT-2's ``c_attn``: query, key and value in one weight) by heads, not by rows.

A column whose output the model cuts into ``k`` equal parts (`Column.parts`) cannot be
``Shard(out)``: rank ``r`` would hold a contiguous slice of the fused output (all of the
query's heads and none of the value's at TP 2), and DTensor gathers the whole at the
``split``. Its weight and bias are ``_StridedShard(out, split_factor=k)`` instead
(DTensor's placement for "cut into ``k`` parts, then shard each"): rank ``r`` holds
``[q_r, k_r, v_r]``, the ``r``-th slice of every part, which is Megatron-LM's per-rank
q/k/v layout. DTensor carries that placement through the matmul, bias and reshapes; the
``split`` itself (which DTensor would gather) is replaced in the stage graph by
`SplitParts`, which cuts the local ``[q_r, k_r, v_r]`` into its parts and hands each on as
``Shard(out)``: the heads reshape and attention then run on the rank's heads, as for an
unfused projection. The parameter keeps its name and global value (``full_tensor`` is the
original weight); a checkpoint saves it redistributed to plain ``Shard`` slices
(`contiguous_shards`), so checkpoints of every plan read alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from partitioner.tp_ops import RESHAPES, SPLITS, op_name

__all__ = ["fused_placement", "SplitParts", "split_by_parts", "contiguous_shards"]


def fused_placement(dim: int, parts: int) -> Placement:
    """The placement of a column's weight (or bias) sharded on `dim`, its output cut into
    `parts`; plain ``Shard`` (gathered at the split) where `_StridedShard` is a ``Shard``
    (older torch treats it so in places, which would read ``[q_r, k_r, v_r]`` as a
    contiguous slice)."""
    if parts > 1 and not issubclass(_StridedShard, Shard):
        return _StridedShard(dim, split_factor=parts)
    return Shard(dim)


def contiguous_shards(t: torch.Tensor) -> torch.Tensor:
    """`t` with each `fused_placement` of several parts redistributed to the plain ``Shard``
    of its dimension (the same bytes per rank): what a checkpoint saves, since
    ``torch.distributed.checkpoint`` records each rank's slice as one contiguous chunk."""
    if not isinstance(t, DTensor) or not any(isinstance(p, _StridedShard) for p in t.placements):
        return t
    plain = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in t.placements]
    return t.redistribute(t.device_mesh, plain)


class SplitParts(nn.Module):
    """A fused output cut into `parts` equal pieces on `dim` (the ``split`` it replaces):
    each piece ``Shard(dim)`` where the input is the `fused_placement` of `parts`."""

    def __init__(self, parts: int, dim: int) -> None:
        super().__init__()
        self.parts, self.dim = parts, dim

    def forward(self, x: Any) -> tuple[Any, ...]:
        dim = self.dim % x.ndim
        if not (isinstance(x, DTensor) and x.placements == (_StridedShard(dim, split_factor=self.parts),)):
            return tuple(x.chunk(self.parts, dim))
        shape = list(x.shape)
        shape[dim] //= self.parts
        stride = torch.empty(shape, device="meta").stride()
        return tuple(
            DTensor.from_local(piece, x.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride)
            for piece in x.to_local().chunk(self.parts, dim)
        )


def split_by_parts(gm: fx.GraphModule, outputs: list[fx.Node], parts: int, add_module: Any) -> int:
    """Replace each equal ``split`` of `outputs` (a fused column's matmuls) on their last
    dimension, reached through reshapes that keep it, by a `SplitParts` submodule.

    Args:
        gm: The stage graph (recompiled by the caller).
        outputs: The nodes computing the column's output.
        parts: Its parts (`Column.parts`).
        add_module: ``add_module(module) -> name``: registers a submodule of `gm`.

    Returns:
        How many splits were replaced (0 leaves DTensor to gather at the split: exact, unsplit).
    """
    replaced = 0
    todo, seen = list(outputs), set(outputs)
    while todo:
        x = todo.pop()
        rank = _rank(x)
        for user in list(x.users):
            name = op_name(user)
            if name in RESHAPES and rank and _rank(user) and _last(user) == _last(x):
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
            elif name in SPLITS and rank and user.args and user.args[0] is x and _cuts_last(user, rank, parts):
                with gm.graph.inserting_before(user):
                    split = gm.graph.call_module(add_module(SplitParts(parts, rank - 1)), (x,))
                user.replace_all_uses_with(split)
                gm.graph.erase_node(user)
                replaced += 1
    return replaced


def _val(n: fx.Node) -> Any:
    return n.meta.get("val", n.meta.get("tensor_meta"))


def _rank(n: fx.Node) -> int:
    val = _val(n)
    return len(val.shape) if val is not None and hasattr(val, "shape") else 0


def _last(n: fx.Node) -> int | None:
    val = _val(n)
    return int(val.shape[-1]) if val is not None and hasattr(val, "shape") and len(val.shape) else None


def _cuts_last(split: fx.Node, rank: int, parts: int) -> bool:
    """Whether `split` cuts its input's last dimension into `parts` equal pieces."""
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    if not isinstance(dim, int) or dim % rank != rank - 1:
        return False
    pieces = _val(split)
    return isinstance(pieces, (list, tuple)) and len(pieces) == parts and len({p.shape[-1] for p in pieces}) == 1
