"""Find what tensor parallelism can split on a traced graph, from its ops, not from class names (torch side).

A *column* is a weight matmul (a Linear, an HF ``Conv1D``, ``x @ w`` with a parameter)
whose output reaches one other weight matmul, the *row*, only through ops that keep a
slice of its features a slice (`partitioner.tp_ops.PASS_THROUGH`: element-wise ops,
views, head reshapes, splits, softmax, dropout, attention); several columns meeting on
their way (query, key, value; gate and up) feed one row together. The graph is cut into
*regions*: the nodes downstream of the model's data (the residual stream, not masks or
rotary tables) that pass features through, joined where one reads another, each with the
weight matmuls whose outputs enter it. A region is a pair when

* every way out of it is the activation input of one weight matmul, the row (not a norm,
  a reduction, the model's output, nor a second matmul), and
* nothing else of the stream enters it: a residual added to a column's output, or the
  row's own output fed back, keeps the column whole.

Pairs are taken in the order of their rows, a module at most once (in an MLP of four
Linears, 0->1 and 2->3, not 1->2). A weight matmul whose region leads only to the model's
output is the vocabulary *head*; an embedding whose indices come from the inputs is a
vocabulary *embedding* (a position embedding's indices are computed, and stay whole).
Norms and dropouts outside the pairs are what sequence parallelism splits. The rest with
parameters is replicated, each with the reason.

Cost is linear in the graph's nodes (one pass each, a union-find over the regions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from partitioner.profiling import NodeStats
from partitioner.tp_layout import Column, Pair, TensorParallelLayout, VocabShard
from partitioner.tp_ops import (
    ACTIVATION_MATMULS,
    ATTENTION,
    DROPOUTS,
    NORMS,
    PASS_THROUGH,
    STATELESS_MODULES,
    WeightOp,
    column_parts,
    embedding_op,
    heads_of,
    is_conv,
    module_class,
    module_path,
    op_name,
    shape_of,
    submodule,
    weight_op,
)

__all__ = ["TensorParallelNodes", "detect_tensor_parallel"]


@dataclass(frozen=True, slots=True)
class TensorParallelNodes:
    """A `TensorParallelLayout` and the graph nodes behind it, by node name, for pricing layers."""

    layout: TensorParallelLayout = field(default_factory=TensorParallelLayout)
    pair_of: Mapping[str, int] = field(default_factory=dict)
    """Node -> index in ``layout.pairs``: its columns, the nodes between, its row."""
    split: frozenset[str] = frozenset()
    """Nodes whose compute TP divides: the pairs' nodes and the vocabulary shards."""
    split_saved: frozenset[str] = frozenset()
    """Nodes whose saved outputs TP divides: columns and the nodes between (not rows, whose
    outputs are summed whole), heads' logits."""
    reduced: frozenset[str] = frozenset()
    """Nodes whose outputs are all-reduced over the group: rows, vocabulary embeddings."""
    core: frozenset[str] = frozenset()
    """Attention cores: the scores' matmul through the weighted sum of values, or a fused sdpa."""
    core_saved: frozenset[str] = frozenset()
    """Of `core`, the nodes whose saved outputs selective recomputation frees (all but the
    last, whose output the row reads)."""
    split_tensors: frozenset[int] = frozenset()
    """``id()`` of the parameters TP splits (weights and biases of columns, rows, vocabulary shards)."""
    vocab_of: Mapping[str, int] = field(default_factory=dict)
    """Node -> the vocabulary size of the shard it belongs to (an embedding's lookup, a head's nodes)."""


class _Regions:
    """Union-find over node indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(slots=True)
class _Region:
    members: list[fx.Node] = field(default_factory=list)
    weights: list[fx.Node] = field(default_factory=list)
    rows: dict[fx.Node, None] = field(default_factory=dict)
    escapes: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def _describe(n: fx.Node, gm: fx.GraphModule) -> str:
    """A node for a reason: ``layer_norm in transformer.ln_f``, ``the model output``."""
    if n.op == "output":
        return "the model output"
    if n.op == "call_module":
        return f"{module_class(n, gm)} {n.target}"
    where = module_path(n)
    return f"{op_name(n)} in {where}" if where else f"{op_name(n)} at the root"


def detect_tensor_parallel(gm: fx.GraphModule, stats: Mapping[str, NodeStats]) -> TensorParallelNodes:
    """The column->row pairs, vocabulary shards, sequence-parallel and replicated modules of a traced graph.

    Args:
        gm: The traced graph (torch.fx or torch.export); module names are read from its
            ``call_module`` targets and ``nn_module_stack``, so they are the model's.
        stats: Its profile (`partitioner.profiling.profile_nodes`): result shapes and bytes.

    Returns:
        The layout and the nodes of each part, for `partitioner.layers` to price per layer.
    """
    found = _Detector(gm, stats)
    found.classify()
    found.cut_regions()
    found.take_pairs()
    found.take_vocabulary()
    return found.result()


class _Detector:
    """The phases of `detect_tensor_parallel`, in order, and what each found."""

    def __init__(self, gm: fx.GraphModule, stats: Mapping[str, NodeStats]) -> None:
        self.gm, self.stats = gm, stats
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.weights: dict[fx.Node, WeightOp] = {}
        self.embeddings: dict[fx.Node, tuple[str, torch.Tensor, fx.Node]] = {}
        self.stream: set[fx.Node] = set()
        """Downstream of the model's data through weights (not masks, positions, rotary tables)."""
        self.from_inputs: set[fx.Node] = set()
        """Downstream of an input's values (token ids)."""
        self.passes: set[fx.Node] = set()
        """Stream nodes that pass a slice of features through (`PASS_THROUGH`)."""
        self.regions: dict[int, _Region] = {}
        self.pairs: list[Pair] = []
        self.vocab: list[VocabShard] = []
        self.pair_of: dict[str, int] = {}
        self.split: set[str] = set()
        self.vocab_of: dict[str, int] = {}
        self.split_saved: set[str] = set()
        self.reduced: set[str] = set()
        self.core: set[str] = set()
        self.core_saved: set[str] = set()
        self.tensors: set[int] = set()
        self.used: set[str] = set()
        """Modules taken by a pair or a vocabulary shard."""
        self.paired: set[str] = set()
        self.why: dict[str, str] = {}
        """Why a module stays replicated, first reason first."""

    def is_tensor(self, n: fx.Node) -> bool:
        s = self.stats.get(n.name)
        if s is not None:
            return s.is_tensor
        return n.op == "placeholder" and isinstance(n.meta.get("val", torch.empty(0)), torch.Tensor)

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if self.is_tensor(a)]

    def classify(self) -> None:
        """Weight matmuls, embeddings, the stream, and the nodes that pass features through."""
        gm = self.gm
        for n in self.nodes:
            if n.op == "placeholder":
                self.from_inputs.add(n)
                val = n.meta.get("val")  # torch.export knows the dtype; a torch.fx input may be data
                if not isinstance(val, torch.Tensor) or val.is_floating_point():
                    self.stream.add(n)
                continue
            if n.op not in ("call_function", "call_method", "call_module") or not self.is_tensor(n):
                continue
            ins = self.inputs(n)
            if any(a in self.from_inputs for a in ins):
                self.from_inputs.add(n)
            op = weight_op(n, gm)
            emb = embedding_op(n, gm) if op is None else None
            if op is not None:
                self.weights[n] = op
                self.stream.add(n)
            elif emb is not None:
                self.embeddings[n] = emb
                if emb[2] in self.from_inputs:
                    self.stream.add(n)
            elif is_conv(n, gm) or any(a in self.stream for a in ins):
                self.stream.add(n)
            if op is None and emb is None and n in self.stream and _passes(n, gm):
                self.passes.add(n)

    def cut_regions(self) -> None:
        """Regions: nodes that pass features through, joined with what they read, with the
        weight matmuls whose outputs they read; and each region's ways in and out."""
        uf = _Regions(len(self.nodes))
        for n in self.passes:
            for a in self.inputs(n):
                if a in self.passes or a in self.weights:
                    uf.union(self.index[a], self.index[n])
        for n in self.nodes:
            if n in self.passes or n in self.weights:
                r = self.regions.setdefault(uf.find(self.index[n]), _Region())
                r.members.append(n)
                if n in self.weights:
                    r.weights.append(n)
        region_of = {n: root for root, r in self.regions.items() for n in r.members}
        for root, r in self.regions.items():
            for m in r.members:
                if m in self.passes:
                    for a in self.inputs(m):
                        if a in self.stream and region_of.get(a) != root:
                            r.foreign.append(_describe(a, self.gm))
                for u in m.users:
                    if region_of.get(u) == root or (u.op != "output" and not self.is_tensor(u)):
                        continue
                    if u in self.weights and self.weights[u].activation is m:
                        r.rows[u] = None
                    else:
                        r.escapes.append(_describe(u, self.gm))

    def reject(self, r: _Region, reason: str) -> None:
        for w in r.weights:
            self.why.setdefault(self.weights[w].module, reason)

    def take_pairs(self) -> None:
        """Regions that make pairs, in the order of their rows, each module in one pair at most."""
        weights = self.weights
        candidates = []
        for root, r in self.regions.items():
            reason = _region_problem(r, weights) if r.weights else "-"
            if not reason:
                candidates.append((self.index[next(iter(r.rows))], root))
            elif r.weights:
                self.reject(r, reason)
        calls: dict[str, int] = {}
        for op in weights.values():
            calls[op.module] = calls.get(op.module, 0) + 1
        for _, root in sorted(candidates):
            r = self.regions[root]
            row = next(iter(r.rows))
            modules = [weights[w].module for w in r.weights] + [weights[row].module]
            again = [m for m in modules if calls[m] > 1]
            if again:  # each call would be split as one of them is: the others are no pair's
                self.reject(r, f"{again[0]} is called {calls[again[0]]} times (a split module is split at every call)")
                continue
            if any(m in self.used for m in modules) or len(set(modules)) < len(modules):
                self.reject(r, f"its row {weights[row].module} or a column is in another pair")
                continue
            pair, problem, cores = _pair(r, row, weights, self.stats)
            if pair is None:
                self.reject(r, problem)
                continue
            for n in [*r.members, row]:
                self.pair_of[n.name] = len(self.pairs)
                self.split.add(n.name)
                if n is not row:
                    self.split_saved.add(n.name)
            self.pairs.append(pair)
            self.used.update(modules)
            self.paired.update(modules)
            self.reduced.add(row.name)
            for w in [*r.weights, row]:
                self.tensors.update(id(t) for t in weights[w].tensors)
            self.core.update(c.name for c in cores)
            self.core_saved.update(c.name for c in cores[:-1])

    def take_vocabulary(self) -> None:
        """Embeddings of the inputs' indices, and weight matmuls that lead only to the output."""
        for n, (module, weight, ids) in self.embeddings.items():
            rows, width = (int(d) for d in weight.shape[:2]) if weight.ndim == 2 else (0, 0)
            if ids not in self.from_inputs:
                self.why.setdefault(
                    module, "an embedding of indices the model computes (positions, buckets), not of the inputs"
                )
            elif rows <= width:  # token types (2 rows): split into nothing
                self.why.setdefault(module, f"an embedding of {rows} rows, fewer than its width ({width}): too small to split")
            else:
                self.vocab.append(VocabShard(module=module, kind="embedding", vocab=rows))
                self.used.add(module)
                self.split.add(n.name)
                self.vocab_of[n.name] = rows
                self.reduced.add(n.name)
                self.tensors.add(id(weight))
        for r in self.regions.values():
            if len(r.weights) != 1 or r.rows or r.foreign or set(r.escapes) != {"the model output"}:
                continue
            head = self.weights[r.weights[0]]
            # A head reading the embedding's weight (``F.linear(h, embed.weight)``) is named by
            # the embedding: both split the one weight on its rows.
            if head.module not in self.paired:
                self.vocab.append(VocabShard(module=head.module, kind="head", vocab=head.out_features))
                self.used.add(head.module)
                self.why.pop(head.module, None)
                self.split.update(m.name for m in r.members)
                self.split_saved.update(m.name for m in r.members)
                self.tensors.update(id(t) for t in head.tensors)
                self.vocab_of.update((m.name, head.out_features) for m in r.members)

    def sequence(self) -> tuple[str, ...]:
        """Norms, and dropouts outside the pairs, in graph order (none without pairs: then
        the norms are replicated)."""
        norms: dict[str, None] = {}
        dropouts: dict[str, None] = {}
        for n in self.nodes:
            name, cls, path = op_name(n), module_class(n, self.gm), module_path(n)
            if not path:
                continue
            if name in NORMS or name == "rsqrt" or (n.op == "call_module" and cls.endswith(("LayerNorm", "RMSNorm"))):
                norms[path] = None
            elif (name in DROPOUTS or n.op == "call_module") and "Dropout" in cls and n.name not in self.pair_of:
                dropouts[path] = None
        if not self.pairs:
            for p in norms:
                self.why.setdefault(p, "a norm with no tensor-parallel pair around it")
            return ()
        return tuple(p for p in _first_seen(self.nodes) if p in norms or p in dropouts)

    def result(self) -> TensorParallelNodes:
        sequence = self.sequence()
        replicated = _replicated(self.gm, self.nodes, self.weights, self.used | set(sequence), self.tensors, self.why)
        layout = TensorParallelLayout(
            pairs=tuple(self.pairs), vocab=tuple(self.vocab), sequence=sequence, replicated=replicated
        )
        return TensorParallelNodes(
            layout=layout,
            pair_of=self.pair_of,
            split=frozenset(self.split),
            vocab_of=dict(self.vocab_of),
            split_saved=frozenset(self.split_saved),
            reduced=frozenset(self.reduced),
            core=frozenset(self.core),
            core_saved=frozenset(self.core_saved),
            split_tensors=frozenset(self.tensors),
        )


def _passes(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op == "call_module":
        sub = submodule(gm, n)
        return type(sub).__name__ in STATELESS_MODULES and sub is not None and next(sub.parameters(), None) is None
    return op_name(n) in PASS_THROUGH


def _region_problem(r: _Region, weights: Mapping[fx.Node, WeightOp]) -> str:
    """Why region `r`'s weight matmuls are no columns ('' when they may be)."""
    if r.foreign:
        return f"its output meets {r.foreign[0]} (not a column's output) before any row"
    if r.escapes:
        return f"its output reaches {r.escapes[0]}"
    if len(r.rows) != 1:
        names = ", ".join(weights[w].module for w in r.rows)
        return f"its output reaches {len(r.rows)} matmuls ({names})" if r.rows else "its output reaches no matmul"
    if next(iter(r.rows)) in r.members:
        return "the row's output is mixed back with the columns'"
    return ""


def _pair(
    r: _Region, row: fx.Node, weights: Mapping[fx.Node, WeightOp], stats: Mapping[str, NodeStats]
) -> tuple[Pair | None, str, list[fx.Node]]:
    """The `Pair` of region `r` and its row, or None and why; and its attention core, in order."""
    columns = []
    for w in r.weights:
        op = weights[w]
        parts = column_parts(w, op.out_features, stats)
        if parts == 0:
            return None, f"its output is cut into unequal parts ({op.module})", []
        columns.append(Column(module=op.module, out_features=op.out_features, parts=parts, transposed=op.transposed))
    members = set(r.members)
    fused = [m for m in r.members if op_name(m) in ATTENTION]
    products = [m for m in r.members if m not in weights and op_name(m) in ACTIVATION_MATMULS]
    width = weights[row].in_features
    if not fused and len(products) < 2:
        return Pair(columns=tuple(columns), row=weights[row].module, kind="mlp", width=width), "", []
    if fused:
        first = last = fused[0]
        q, k = first.args[0], first.args[1]
        cores = [first]
    else:
        first, last = products[0], products[-1]
        shift = 1 if op_name(first) == "baddbmm" else 0
        q, k = first.args[shift], first.args[shift + 1]
        after = _reach(first, members, lambda n: list(n.users))
        before = _reach(last, members, lambda n: n.all_input_nodes)
        cores = [m for m in r.members if m in after and m in before]
    heads, kv_heads = heads_of(q, members, weights, stats), heads_of(k, members, weights, stats)
    if not heads or not kv_heads:
        return None, "attention whose heads were not found (no reshape splits its width into heads)", []
    pair = Pair(columns=tuple(columns), row=weights[row].module, kind="attention", heads=heads, kv_heads=kv_heads,
                width=width)  # fmt: skip
    return pair, "", cores


def _reach(start: fx.Node, members: set[fx.Node], step: object) -> set[fx.Node]:
    seen = {start}
    todo = [start]
    while todo:
        for m in step(todo.pop()):  # type: ignore[operator]
            if m in members and m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def _first_seen(nodes: list[fx.Node]) -> list[str]:
    return list(dict.fromkeys(module_path(n) for n in nodes))


def _replicated(
    gm: fx.GraphModule,
    nodes: list[fx.Node],
    weights: Mapping[fx.Node, WeightOp],
    taken: set[str],
    split_tensors: set[int],
    why: dict[str, str],
) -> tuple[tuple[str, str], ...]:
    """(module, why) for every module holding parameters that no pair, shard or norm takes."""
    owners: dict[str, list[int]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        owners.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(id(p))
    for w in weights.values():
        owners.setdefault(w.module, []).extend(id(t) for t in w.tensors)
    convs = {module_path(n) for n in nodes if n.op != "placeholder" and is_conv(n, gm)}
    readers: dict[str, dict[str, None]] = {}  # module -> the ops that read its parameters
    for n in nodes:
        if n.op == "get_attr":
            module = str(n.target).rsplit(".", 1)[0] if "." in str(n.target) else ""
            readers.setdefault(module, {}).update((op_name(u), None) for u in n.users)
        elif n.op == "call_module":
            readers.setdefault(str(n.target), {})[f"a {module_class(n, gm)} call"] = None
    out = []
    order = {p: i for i, p in enumerate(_first_seen(nodes))}
    for module in sorted(owners, key=lambda m: (order.get(m, len(order)), m)):
        if module in taken or all(i in split_tensors for i in owners[module]):
            continue
        reason = why.get(module) or ("a convolution (not split)" if module in convs else "")
        if not reason:
            ops = ", ".join(readers.get(module, {})) or "nothing"
            reason = f"its parameters are read by {ops}: no matmul or embedding splits them"
        out.append((module, reason))
    return tuple(out)

