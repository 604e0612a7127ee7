"""Group a traced graph's nodes into layers and build the `LayerGraph` the planner sees.

Grouping rule. A node's layer is the outermost *block* module on its module stack
(blocks: the classes held in `nn.ModuleList`/`nn.Sequential` containers, such as
``GPT2Block``, or classes the caller names), else its innermost module when that module
is a leaf or holds parameters of its own (``leaf`` granularity skips the blocks). Other
ops (mask construction, residual adds at the root, a container's glue) join the layer of
their first user, or their producer's when only the output reads them. A parameter
belongs to the layer of its first user; other users read it as a value, so tied weights
are transferred, never duplicated. Layers that depend on each other both ways are merged
(the condensation of the layer graph), so the layer graph is a DAG. Edges that carry no
tensor (SymInts, shapes) cost nothing to cross and do not order layers.

Refinement (``auto`` granularity). A block named in `TracedModel.refined` is no layer of its
own: each of its children is (a transformer block's attention and MLP; a refined child's
children in turn), and its ops outside any child follow the leaf rule above; consecutive
pieces of refined modules that no tensor joins (query, key and value projections side by
side) stay one layer, so a chain of blocks stays a chain. `refine_layers` regroups an
already profiled graph so, without tracing it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Mapping
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
import torch.fx as fx

from partitioner.devices import OP_KINDS
from partitioner.ir import INPUT, OUTPUT, Layer, LayerGraph, Value
from partitioner.mutations import PIN
from partitioner.profiling import BACKWARD_KERNEL_FACTOR, NodeStats
from partitioner.split_layers import WEIGHT_SLICE
from partitioner.tp_detect import TensorParallelNodes, detect_tensor_parallel
from partitioner.tp_layout import TensorParallelLayout
from partitioner.trace import TracedModel

__all__ = ["LayeredModel", "build_layers", "refine_layers", "refinable_modules", "SKIP_TARGETS"]

SKIP_TARGETS = ("_guards_fn",)
"""Call targets that are never placed: torch.export's input-guard check does no compute."""


@dataclass(frozen=True, slots=True)
class LayeredModel:
    """A traced model with its layers: what the rewrite needs besides a placement."""

    traced: TracedModel
    graph: LayerGraph
    node_layer: Mapping[str, int]
    """Node name -> layer index, for every placed node (get_attr and call nodes)."""
    stats: Mapping[str, NodeStats] = field(default_factory=dict)
    """The profile the layers were costed with (`profile_nodes`), kept to regroup them."""
    tensor_parallel: TensorParallelLayout = field(default_factory=TensorParallelLayout)
    """What tensor parallelism splits (`partitioner.tp_detect`); the layers carry its costs."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(layer key, class name) from outermost to innermost, root excluded.

    The key is the module's qualified name, with export's ``@k`` suffix for its k-th
    repeated call (fx merges repeated calls, since a call_module node reads the module's
    own parameters and cannot be split from them).
    """
    stack = node.meta.get("nn_module_stack") or {}
    out: list[tuple[str, str]] = []
    for key, (path, cls) in stack.items():
        if not path or key.startswith("_empty_nn_module_stack"):
            continue
        suffix = key[key.rindex("@") :] if "@" in key else ""
        cls_name = cls if isinstance(cls, str) else _qualname(cls)
        out.append((path + suffix, cls_name))
    if node.op == "call_module" and (not out or out[-1][0] != node.target):
        out.append((str(node.target), ""))
    return out


def _is_block(cls_name: str, blocks: frozenset[str]) -> bool:
    return cls_name in blocks or cls_name.rsplit(".", 1)[-1] in blocks


def _own_key(node: fx.Node, traced: TracedModel) -> str | None:
    """The node's layer key, or None for an op that belongs to no layer of its own.

    Ops of a container module (e.g. ``GPT2Model`` building masks between its blocks)
    count as root ops: grouping them by their container would tie every block together.
    So do modules without tensors (an activation called at several places), which can
    run on any device.
    """
    stack = _module_stack(node)
    for depth, (key, cls_name) in enumerate(stack):
        if _is_block(cls_name, traced.blocks):
            return _refined_key(node, stack[depth:], traced)
    if not stack:
        return None
    return _leaf_key(node, stack, traced)


def _refined_key(node: fx.Node, stack: list[tuple[str, str]], traced: TracedModel) -> str | None:
    """The layer key of a node inside the block ``stack[0]``: the block, or where it is
    refined, the first module below it that is not refined (a stateless one is no layer)."""
    for depth, (key, _) in enumerate(stack):
        path = key.split("@")[0]
        if path not in traced.refined:
            return None if depth and path in traced.stateless else key
    return _leaf_key(node, stack, traced)  # an op of a refined module itself, in no child


def _leaf_key(node: fx.Node, stack: list[tuple[str, str]], traced: TracedModel) -> str | None:
    """The innermost module of `stack` where it can be a layer (a leaf, or a module with
    parameters of its own), else None."""
    path = stack[-1][0].split("@")[0]
    if path in traced.stateless or (node.op != "call_module" and path not in traced.owners):
        return None
    return stack[-1][0]


def _assign_keys(gm: fx.GraphModule, traced: TracedModel, stats: Mapping[str, NodeStats]) -> dict[fx.Node, str]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    placed = [n for n in nodes if n.op.startswith("call_") and n.target not in SKIP_TARGETS]
    key: dict[fx.Node, str | None] = {n: _own_key(n, traced) for n in placed}
    # An in-place change through a view, and the reads after it, run where the changed
    # tensor lives (mutations.thread_mutations pins them); before the rules below, so that
    # the ops feeding them follow them there.
    by_name = {n.name: n for n in nodes}
    pinned = {n: by_name[n.meta[PIN]] for n in placed if n.meta.get(PIN) in by_name}

    def pin(keys: dict[fx.Node, str | None]) -> None:
        for n, base in pinned.items():
            if keys.get(base) is not None:
                keys[n] = keys[base]

    pin(key)

    def first_keyed(candidates: list[fx.Node]) -> str | None:
        keyed = sorted((c for c in candidates if key.get(c)), key=order.__getitem__)
        return key[keyed[0]] if keyed else None

    # Root ops join their first user's layer (walking backwards resolves chains of them) ...
    for n in reversed(placed):
        if key[n] is None:
            key[n] = first_keyed(list(n.users))
    # ... or their last producer's when only the output reads them ...
    for n in placed:
        if key[n] is None:
            producers = [a for a in n.all_input_nodes if key.get(a)]
            key[n] = key[max(producers, key=order.__getitem__)] if producers else None
    # ... or, with no data edge to any layer (dead code), the layer before them in program order.
    previous: str | None = None
    for n in placed:
        previous = key[n] = key[n] or previous
    following: str | None = None
    for n in reversed(placed):
        following = key[n] = key[n] or following or "<root>"
    # A tensor attribute belongs to the layer of its first user.
    for n in nodes:
        if n.op == "get_attr":
            owner = first_keyed(list(n.users))
            if owner is not None:
                key[n] = owner
    # A column piece's rows of a weight are sliced where the weight lives (`split_layers`).
    for n in placed:
        if n.meta.get(WEIGHT_SLICE) and isinstance(n.args[0], fx.Node) and key.get(n.args[0]) is not None:
            key[n] = key[n.args[0]]
    pin(key)  # again, for tensors whose layer is known only now
    return {n: k for n, k in key.items() if k is not None}


def _tensor_of(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _owned_tensors(gm: fx.GraphModule, n: fx.Node) -> list[tuple[str, torch.Tensor]]:
    if n.op == "get_attr":
        t = _tensor_of(gm, str(n.target))
        return [(str(n.target), t)] if t is not None else []
    if n.op == "call_module":
        sub = gm.get_submodule(str(n.target))
        named = list(sub.named_parameters(remove_duplicate=False)) + list(sub.named_buffers(remove_duplicate=False))
        return [(f"{n.target}.{name}", t) for name, t in named]
    return []


def build_layers(traced: TracedModel, stats: Mapping[str, NodeStats], *, batch_size: int = 1) -> LayeredModel:
    """Group `traced`'s nodes into layers and cost them with `stats` (from `profile_nodes`)."""
    gm = traced.gm
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    key = _assign_keys(gm, traced, stats)

    def carries_tensor(n: fx.Node) -> bool:
        s = stats.get(n.name)
        return s.is_tensor if s is not None else True

    g = nx.DiGraph()
    first_seen: dict[str, int] = {}
    for n, k in key.items():
        first_seen[k] = min(first_seen.get(k, order[n]), order[n])
    g.add_nodes_from(first_seen)
    for n, k in key.items():
        for a in n.all_input_nodes:
            if a in key and key[a] != k and carries_tensor(a):
                g.add_edge(key[a], k)
    # A tensor that several call_module nodes read inside their modules cannot be moved
    # between them: their layers are tied together (a 2-cycle, merged below).
    tensor_owner: dict[int, str] = {}
    for n in sorted((n for n in key if n.op == "call_module"), key=order.__getitem__):
        for _, t in _owned_tensors(gm, n):
            owner = tensor_owner.setdefault(id(t), key[n])
            if owner != key[n]:
                g.add_edge(owner, key[n])
                g.add_edge(key[n], owner)
    # So is a tensor a called module holds and a get_attr reads elsewhere (fx, when asked
    # for: `frontend="auto"` traces such models with export, where the weight is a value).
    for n in key:
        if n.op == "get_attr":
            holder = tensor_owner.get(id(operator.attrgetter(str(n.target))(gm)))
            if holder is not None and holder != key[n]:
                g.add_edge(holder, key[n])
                g.add_edge(key[n], holder)

    layer_of, members = _condense(g, first_seen)
    while traced.refined:
        # Refined siblings that run side by side (query, key and value projections) are
        # tied: a cut between them saves nothing, and a chain of layers stays one.
        unjoined = [
            (a[0], b[0])
            for a, b in zip(members, members[1:])
            if _in_refined(a[0], traced) and _in_refined(b[0], traced) and not any(g.has_edge(x, y) for x in a for y in b)
        ]
        if not unjoined:
            break
        for a_key, b_key in unjoined:
            g.add_edge(a_key, b_key)
            g.add_edge(b_key, a_key)
        layer_of, members = _condense(g, first_seen)
    node_layer = {n.name: layer_of[k] for n, k in key.items()}

    tp = detect_tensor_parallel(gm, stats)
    layers = _layer_records(gm, traced, stats, key, node_layer, members, order, tp)
    values = _values(gm, stats, node_layer, carries_tensor)
    graph = LayerGraph(
        layers=tuple(layers),
        values=tuple(values),
        fingerprint=_fingerprint(gm, node_layer),
        model_name=traced.model_name,
        frontend=traced.frontend,
        batch_size=batch_size,
    )
    return LayeredModel(traced=traced, graph=graph, node_layer=node_layer, stats=stats, tensor_parallel=tp.layout)


def refine_layers(layered: LayeredModel, modules: Iterable[str]) -> LayeredModel:
    """`layered` regrouped with `modules` (paths of blocks or of refined blocks' children)
    split into their children, on the same trace and profile (nothing runs again)."""
    traced = replace(layered.traced, refined=layered.traced.refined | frozenset(modules))
    return build_layers(traced, layered.stats, batch_size=layered.graph.batch_size)


def refinable_modules(layered: LayeredModel, layers: Iterable[int]) -> frozenset[str]:
    """The modules that layers `layers` are, where splitting them makes finer layers.

    A layer is refinable when it is one block (or a refined block's child) and some of its
    nodes run inside a module below it that would be a layer of its own.
    """
    wanted = set(layers)
    found: set[str] = set()
    traced = layered.traced
    for n in layered.traced.gm.graph.nodes:
        if layered.node_layer.get(n.name) not in wanted or n.op == "get_attr":
            continue
        key = _own_key(n, traced)
        if key is None:
            continue
        stack = [k for k, _ in _module_stack(n)]
        below = stack[stack.index(key) + 1 :] if key in stack else []
        path = key.split("@")[0]
        if path in found:
            continue
        # A child of its own with parameters or buffers (stateless children are no layers).
        if any(k.split("@")[0] not in traced.stateless for k in below):
            found.add(path)
    return frozenset(found)


def _condense(g: nx.DiGraph, first_seen: Mapping[str, int]) -> tuple[dict[str, int], list[list[str]]]:
    """Layers of the key graph `g`: its strongly connected components in topological order
    (the first seen first among the ready ones); each key's layer, and each layer's keys."""
    cond = nx.condensation(g)
    comp_of = cond.graph["mapping"]
    comp_first = {c: min(first_seen[k] for k in cond.nodes[c]["members"]) for c in cond.nodes}
    comp_order = list(nx.lexicographical_topological_sort(cond, key=comp_first.__getitem__))
    comp_index = {c: i for i, c in enumerate(comp_order)}
    members = [sorted(cond.nodes[c]["members"], key=first_seen.__getitem__) for c in comp_order]
    return {k: comp_index[c] for k, c in comp_of.items()}, members


def _in_refined(key: str, traced: TracedModel) -> bool:
    """Whether layer key `key` is a refined module or lies inside one."""
    path = key.split("@")[0]
    return any(path == r or path.startswith(r + ".") for r in traced.refined)


@dataclass(slots=True)
class _Totals:
    """Running sums of one layer while its nodes are visited."""

    modules: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    param_bytes: int = 0
    buffer_bytes: int = 0
    flops: int = 0
    bwd_flops: int = 0
    out: int = 0
    saved: int = 0
    traffic: int = 0
    elementwise: int = 0
    unread: int = 0
    table_grad: int = 0
    nodes: int = 0
    kernels: int = 0
    module_calls: int = 0
    gemms: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    """(FLOPs, m, n, k) of one op -> how many."""
    passes: dict[tuple[int, int], int] = field(default_factory=dict)
    """(bytes one node without FLOPs moves, its kind: `OP_KINDS` index + 1, 0 for none) -> how many."""
    convs: dict[int, int] = field(default_factory=dict)
    """FLOPs of one convolution -> how many."""
    attention: dict[tuple[int, int, int], int] = field(default_factory=dict)
    """(FLOPs of one attention, 1 if causal, its FLOPs per sample and head) -> how many."""
    tp_flops: int = 0
    tp_params: int = 0
    tp_saved: int = 0
    tp_comm: int = 0
    tp_pairs: set[int] = field(default_factory=set)
    tp_traffic: int = 0
    tp_vocab: set[int] = field(default_factory=set)
    """Vocabulary sizes of the shards among its nodes."""
    core_flops: int = 0
    core_saved: int = 0

    def own(self, name: str, tensor: torch.Tensor, is_param: bool, split: bool = False) -> None:
        """Count `tensor` (reachable as `name`) as placed with this layer (`split`: by tensor parallelism)."""
        self.params.append(name)
        size = tensor.numel() * tensor.element_size()
        if is_param:
            self.param_bytes += size
            self.tp_params += tensor.numel() if split else 0
        else:
            self.buffer_bytes += size

    def count_tensor_parallel(self, name: str, s: NodeStats, tp: TensorParallelNodes) -> None:
        """Add node `name`'s share in `tp`'s pairs, shards and attention cores."""
        saved = s.output_bytes if s.requires_grad else 0
        if name in tp.split:
            self.tp_flops += s.flops + s.bwd_flops
            if name in tp.vocab_of:
                self.tp_vocab.add(tp.vocab_of[name])
        if name in tp.split_saved:
            self.tp_saved += saved
        if name in tp.reduced:
            self.tp_comm += s.value_bytes
        if name in tp.pair_of:
            self.tp_pairs.add(tp.pair_of[name])
        if name in tp.core:
            self.core_flops += s.flops + s.bwd_flops
        if name in tp.core_saved:
            self.core_saved += saved


def _layer_records(
    gm: fx.GraphModule,
    traced: TracedModel,
    stats: Mapping[str, NodeStats],
    key: Mapping[fx.Node, str],
    node_layer: Mapping[str, int],
    members: list[list[str]],
    order: Mapping[fx.Node, int],
    tp: TensorParallelNodes,
) -> list[Layer]:
    param_ids = {id(p) for p in gm.parameters()}
    seen: set[int] = set()
    called: set[str] = set()
    acc = [_Totals() for _ in members]
    for n in sorted(key, key=order.__getitem__):
        a = acc[node_layer[n.name]]
        a.nodes += 1
        calls = [k for k, _ in _module_stack(n) if k not in called]
        called.update(calls)
        a.module_calls += len(calls)
        for name, t in _owned_tensors(gm, n):
            if id(t) in seen:
                continue
            seen.add(id(t))
            a.own(name, t, id(t) in param_ids, id(t) in tp.split_tensors)
        if n.op != "get_attr" and _own_key(n, traced) is not None:
            a.modules.append(key[n].split("@")[0])
        s = stats.get(n.name)
        if s is not None and n.op != "get_attr":
            a.flops += s.flops
            a.bwd_flops += s.bwd_flops
            a.out += s.output_bytes
            a.saved += s.output_bytes if s.requires_grad else 0
            a.traffic += s.traffic_bytes
            a.elementwise += s.traffic_bytes if s.flops == 0 else 0
            if s.flops == 0 and s.traffic_bytes > s.unread_bytes:
                moved = (s.traffic_bytes - s.unread_bytes, OP_KINDS.index(s.kind) + 1 if s.kind else 0)
                a.passes[moved] = a.passes.get(moved, 0) + 1
            for g in s.conv_flops:
                a.convs[g] = a.convs.get(g, 0) + 1
            for g, causal, head in s.attention_flops:
                a.attention[(g, int(causal), head)] = a.attention.get((g, int(causal), head), 0) + 1
            a.unread += s.unread_bytes
            a.table_grad += s.table_grad_bytes
            a.kernels += s.kernels
            for g, shape in zip(s.gemm_flops, s.gemm_shapes or [(0, 0, 0)] * len(s.gemm_flops), strict=True):
                a.gemms[(g, *shape)] = a.gemms.get((g, *shape), 0) + 1
            a.count_tensor_parallel(n.name, s, tp)
            if n.name in tp.split:
                a.tp_traffic += _split_bytes_read(gm, n, tp)
    # Tensors no node reads (unused parameters) still take memory somewhere: the first layer.
    unused = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in unused:
        if id(t) not in seen and acc:
            seen.add(id(t))
            acc[0].own(name, t, id(t) in param_ids)
    layers = []
    for i, (keys, a) in enumerate(zip(members, acc)):
        name = keys[0] if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"
        layers.append(
            Layer(
                index=i,
                name=name,
                modules=tuple(dict.fromkeys(a.modules)),
                params=tuple(a.params),
                param_bytes=a.param_bytes,
                buffer_bytes=a.buffer_bytes,
                output_bytes=a.out,
                saved_bytes=a.saved,
                fwd_flops=a.flops,
                bwd_flops=a.bwd_flops,
                traffic_bytes=a.traffic,
                num_nodes=a.nodes,
                fwd_kernels=a.kernels,
                module_calls=a.module_calls,
                bwd_kernels=BACKWARD_KERNEL_FACTOR * a.kernels,
                gemms=tuple(sorted(((g, count, *shape) for (g, *shape), count in a.gemms.items()), reverse=True)),
                elementwise_bytes=a.elementwise,
                passes=tuple(sorted(((b, count, kind) if kind else (b, count) for (b, kind), count in a.passes.items()),
                                    reverse=True)),
                convs=tuple(sorted(a.convs.items(), reverse=True)),
                attention=tuple(sorted(((g, count, causal, head) for (g, causal, head), count in a.attention.items()),
                                       reverse=True)),
                unread_bytes=a.unread,
                table_grad_bytes=a.table_grad,
                tp_flops=a.tp_flops,
                tp_params=a.tp_params,
                tp_activation_bytes=a.tp_saved,
                tp_comm_bytes=a.tp_comm,
                tp_traffic_bytes=a.tp_traffic,
                tp_divisor=math.gcd(*(tp.layout.pairs[k].divisor for k in a.tp_pairs)),
                tp_vocab=tuple(sorted(a.tp_vocab)),
                core_flops=a.core_flops,
                core_activation_bytes=a.core_saved,
            )
        )
    return layers


def _split_bytes_read(gm: fx.GraphModule, n: fx.Node, tp: TensorParallelNodes) -> int:
    """Bytes of the tensors tensor parallelism splits that node `n` reads (its parameter inputs, or
    a called module's own), counted in its traffic as the profiler counts every input."""
    read = [t for a in n.all_input_nodes if a.op == "get_attr" for _, t in _owned_tensors(gm, a)]
    if n.op == "call_module":
        read += [t for _, t in _owned_tensors(gm, n)]
    return sum(t.numel() * t.element_size() for t in read if id(t) in tp.split_tensors)


def _values(
    gm: fx.GraphModule,
    stats: Mapping[str, NodeStats],
    node_layer: Mapping[str, int],
    carries_tensor: object,
) -> list[Value]:
    out: list[Value] = []
    for n in gm.graph.nodes:
        if n.op == "output" or (n.op != "placeholder" and n.name not in node_layer):
            continue
        producer = INPUT if n.op == "placeholder" else node_layer[n.name]
        consumers: set[int] = set()
        for u in n.users:
            if u.op == "output":
                consumers.add(OUTPUT)
            elif u.name in node_layer and node_layer[u.name] != producer:
                consumers.add(node_layer[u.name])
        s = stats.get(n.name)
        if not consumers or (s is not None and not s.is_tensor):
            continue
        ordered = tuple(sorted(c for c in consumers if c != OUTPUT)) + ((OUTPUT,) if OUTPUT in consumers else ())
        out.append(
            Value(
                name=n.name,
                producer=producer,
                consumers=ordered,
                bytes=s.value_bytes if s else 0,
                # A weight (or a piece's rows of one) read by another layer moves whole, whatever the batch.
                batched=n.op != "get_attr" and not n.meta.get(WEIGHT_SLICE),
            )
        )
    return out


def _target_name(target: object) -> str:
    """A node's target by qualified name: ``str(torch.cat)`` holds a memory address, which
    differs from process to process, and the fingerprint must not."""
    if isinstance(target, str):
        return target
    try:
        return fx.node._get_qualified_name(target)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - an unnamed callable: its type is what is stable about it
        return f"{type(target).__module__}.{type(target).__qualname__}"


# Ops that change a tensor's memory layout, never its values: whether torch.export records
# one depends on the strides of the device the model was traced on (an sdpa output is
# contiguous on CPU but not on meta, so every sdpa model gains two ``aten.contiguous``
# nodes on meta), not on what the model computes.
_LAYOUT_ONLY = frozenset({"torch.ops.aten.contiguous.default"})


def _fingerprint(gm: fx.GraphModule, node_layer: Mapping[str, int]) -> str:
    """Hash of the graph's ops, their inputs and layers, and the tensors' names, shapes and dtypes.

    It names what the model computes, wherever its tensors are: a model planned on
    ``meta`` and its real weights on CPU agree. So nodes are named by their place in the
    graph, not by export's names (its counters run on over nodes it drops, and those
    differ by device); layout-only ops are left out; and so is the placeholder of an
    export input that is no tensor (a constant folded into the ops), so that a graph
    given ``use_cache=False`` and one traced with the flag off in the config agree.
    """
    index: dict[fx.Node, int] = {}
    parts: list[list[object]] = []
    for n in gm.graph.nodes:
        name = _target_name(n.target)
        if name in _LAYOUT_ONLY and n.all_input_nodes:
            index[n] = index.get(n.all_input_nodes[0], -1)  # its readers read its input
            continue
        if n.op == "placeholder" and "val" in n.meta and not isinstance(n.meta["val"], torch.Tensor):
            continue
        index[n] = len(parts)
        parts.append([n.op, name, node_layer.get(n.name, -1), [index[a] for a in n.all_input_nodes if a in index]])
    tensors = [[k, list(t.shape), str(t.dtype)] for k, t in gm.state_dict(keep_vars=True).items()]
    blob = json.dumps([parts, tensors], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
