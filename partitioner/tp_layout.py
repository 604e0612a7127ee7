"""Pure: which modules of a model tensor parallelism may split, and how (no torch).

Megatron-LM's scheme (Shoeybi et al. 2019, "Megatron-LM", section 3): a *column* module
(a Linear, an HF ``Conv1D``) split on its output features feeds, through element-wise
ops, head reshapes or attention, a *row* module split on its input features. Each rank
then runs its slice of both with no communication in between; the row's partial outputs
are summed (one all-reduce forward, one at the columns' inputs backward). Embeddings and
the output head split on the vocabulary. A vocabulary splits at any degree, unevenly where
the degree does not divide it (`vocab_rows`); a pair only at the degrees dividing its heads
and widths (`Pair.divisor`).

`partitioner.tp_detect` finds these on the traced graph; `partitioner.training_costs`
prices them; `partitioner.distributed` applies them with DTensor's ``parallelize_module``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from partitioner.errors import PartitionerError

__all__ = ["TensorParallelError", "Column", "Pair", "VocabShard", "TensorParallelLayout", "vocab_rows"]


class TensorParallelError(PartitionerError, ValueError):
    """A tensor-parallel degree that does not split the model's widths or heads evenly."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Column:
    """A module split on its output features."""

    module: str
    """Qualified module name (``model.layers.0.self_attn.q_proj``)."""
    out_features: int
    parts: int = 1
    """Equal parts its output is cut into downstream (3 for GPT-2's fused ``c_attn``: query,
    key, value): each rank takes its slice of every part."""
    transposed: bool = False
    """Weight stored ``(in, out)`` (HF ``Conv1D``) instead of ``(out, in)`` (``nn.Linear``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pair:
    """Columns feeding one row: an attention block or an MLP."""

    columns: tuple[Column, ...]
    row: str
    """The module split on its input features (its partial outputs are summed)."""
    kind: str
    """``attention`` or ``mlp``."""
    heads: int = 0
    """Attention heads of the queries (0 for an MLP)."""
    kv_heads: int = 0
    """Key/value heads (fewer than `heads` under grouped-query attention; 0 for an MLP)."""
    width: int
    """Features between the columns and the row (heads x head size, or the MLP's hidden width)."""

    @property
    def divisor(self) -> int:
        """Degrees ``t`` with ``divisor % t == 0`` split every head and width evenly."""
        out = self.width
        for n in (self.heads, self.kv_heads):
            if n:
                out = math.gcd(out, n)
        for c in self.columns:
            out = math.gcd(out, c.out_features // c.parts)
        return out


def vocab_rows(vocab: int, degree: int) -> int:
    """Rows of a `vocab`-row shard the busiest of `degree` ranks holds: ``ceil(vocab / degree)``.

    ``torch.chunk`` cuts them so (DTensor's ``Shard(0)``, which the lowering uses): every rank
    but the last holds that many, the last the rest (GPT-3's 50,257 rows at degree 8: 6,283 on
    seven ranks, 6,276 on the eighth). The busiest rank sets the step's time and memory.
    """
    return -(-vocab // degree)


@dataclass(frozen=True, slots=True, kw_only=True)
class VocabShard:
    """An embedding split on its rows, or an output head split on its output features, at any
    degree (`vocab_rows` on the busiest rank): the model keeps its true vocabulary, so its
    outputs, state dict and checkpoints hold exactly `vocab` rows."""

    module: str
    kind: str
    """``embedding`` (each rank looks up its rows, outputs summed) or ``head`` (each rank
    computes its slice of the logits)."""
    vocab: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorParallelLayout:
    """Everything tensor parallelism splits in one model, and what it leaves replicated."""

    pairs: tuple[Pair, ...] = ()
    vocab: tuple[VocabShard, ...] = ()
    sequence: tuple[str, ...] = ()
    """Norms and dropouts between pairs that sequence parallelism splits on the sequence."""
    replicated: tuple[tuple[str, str], ...] = ()
    """(module, why) for modules with parameters left whole on every rank."""

    def check_degree(self, degree: int) -> None:
        """Raise unless `degree` splits every pair evenly (vocabularies split at any degree).

        Raises:
            TensorParallelError: Naming the pair, its heads and widths, and the degrees that work.
        """
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise TensorParallelError(f"tensor-parallel degree must be an integer >= 1 (got {degree!r})")
        for pair in self.pairs:
            if pair.divisor % degree:
                what = f"{pair.heads} heads, {pair.kv_heads} key/value heads, " if pair.heads else ""
                ok = [t for t in range(1, pair.divisor + 1) if pair.divisor % t == 0]
                raise TensorParallelError(
                    f"tensor-parallel degree {degree} does not divide {pair.kind} {pair.row!r} "
                    f"({what}width {pair.width}, columns {', '.join(str(c.out_features) for c in pair.columns)}): "
                    f"use a degree among {ok}"
                )
