"""Layer grouping: blocks and leaves, a DAG in topological order, each tensor owned once, fingerprints."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner.ir import INPUT, OUTPUT
from partitioner.layers import LayeredModel, build_layers, refinable_modules, refine_layers
from partitioner.devices import OP_KINDS
from partitioner.profiling import NodeStats, _head_flops, _is_causal, op_kind, profile_nodes
from partitioner.trace import trace_model
from tests.models import PLAIN_CASES, ZOO, TwiceModel


@dataclass(frozen=True)
class Grouped:
    model: nn.Module
    layered: LayeredModel
    stats: dict[str, NodeStats]

    def names(self) -> list[str]:
        return [layer.name for layer in self.layered.graph.layers]

    def layer(self, name: str) -> int:
        return self.names().index(name)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor a layer's parameter name stands for, read from the graph module."""
        t = operator.attrgetter(name)(self.layered.traced.gm)
        assert isinstance(t, torch.Tensor)
        return t


def group(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], **trace_kw: Any) -> Grouped:
    traced = trace_model(model, args, kwargs, **trace_kw)
    stats = profile_nodes(traced.gm, args, kwargs, training=False)
    return Grouped(model, build_layers(traced, stats), stats)


def group_case(name: str, **trace_kw: Any) -> Grouped:
    model, args, kwargs = ZOO[name].build()
    return group(model, args, kwargs, **trace_kw)


@pytest.fixture(scope="module")
def gpt2_blocks() -> Grouped:
    return group_case("gpt2")


@pytest.fixture(scope="module")
def gpt2_leaves() -> Grouped:
    return group_case("gpt2", granularity="leaf")


@pytest.fixture(params=[*PLAIN_CASES, "gpt2"])
def any_model(request: pytest.FixtureRequest, gpt2_blocks: Grouped) -> Grouped:
    return gpt2_blocks if request.param == "gpt2" else group_case(request.param)


# --------------------------------------------------------------------------- granularity

GPT2_BLOCKS = [
    "transformer.wpe",
    "transformer.wte",
    "transformer.h.0",
    "transformer.h.1",
    "transformer.ln_f",
    "lm_head",
]


def test_gpt2_blocks_are_layers(gpt2_blocks: Grouped) -> None:
    assert gpt2_blocks.names() == GPT2_BLOCKS
    for i in (0, 1):
        layer = gpt2_blocks.layered.graph.layers[gpt2_blocks.layer(f"transformer.h.{i}")]
        assert layer.modules == (f"transformer.h.{i}",)
        block = gpt2_blocks.model.transformer.h[i]
        assert {id(gpt2_blocks.tensor(p)) for p in layer.params} == {id(p) for p in block.parameters()}
        assert layer.fwd_flops > 0 and layer.num_nodes > 10


def test_gpt2_leaves_split_the_blocks(gpt2_leaves: Grouped) -> None:
    names = gpt2_leaves.names()
    assert len(names) > len(GPT2_BLOCKS)
    assert not set(names) & {"transformer.h.0", "transformer.h.1"}
    inside = [n for n in names if n.startswith("transformer.h.0.")]
    assert {"transformer.h.0.ln_1", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= set(inside)


def test_split_modules_make_a_class_one_layer() -> None:
    plain = group_case("cnn").names()
    assert "layer1.conv1" in plain and "layer1" not in plain
    for split in (["_BasicBlock"], ["tests.models._BasicBlock"]):
        grouped = group_case("cnn", split_modules=split)
        assert grouped.names() == ["conv1", "bn1", "layer1", "layer2", "fc"]
        block = grouped.layered.graph.layers[grouped.layer("layer2")]
        assert {id(grouped.tensor(p)) for p in block.params} == {
            id(t) for t in [*grouped.model.layer2.parameters(), *grouped.model.layer2.buffers()]
        }
    leaf = group_case("cnn", granularity="leaf", split_modules=["_BasicBlock"]).names()
    assert leaf == ["conv1", "bn1", "layer1", "layer2", "fc"]


# --------------------------------------------------------------------------- refinement (auto granularity)


def _refined_to_the_end(layered: LayeredModel) -> LayeredModel:
    while modules := refinable_modules(layered, range(len(layered.graph.layers))):
        layered = refine_layers(layered, modules)
    return layered


def test_refining_a_block_splits_it_into_its_children_only(gpt2_blocks: Grouped) -> None:
    refined = refine_layers(gpt2_blocks.layered, ["transformer.h.0"])
    names = [layer.name for layer in refined.graph.layers]
    children = ["transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.h.0.ln_2", "transformer.h.0.mlp"]
    assert names == [*GPT2_BLOCKS[:2], *children, *GPT2_BLOCKS[3:]]
    params = [p for layer in refined.graph.layers if layer.name in children for p in layer.params]
    assert len(params) == len(set(params))
    assert {id(gpt2_blocks.tensor(p)) for p in params} == {id(p) for p in gpt2_blocks.model.transformer.h[0].parameters()}
    total = sum(layer.fwd_flops for layer in gpt2_blocks.layered.graph.layers)
    assert sum(layer.fwd_flops for layer in refined.graph.layers) == total
    assert refined.graph.fingerprint != gpt2_blocks.layered.graph.fingerprint


def test_refinable_modules_are_the_layers_with_finer_pieces(gpt2_blocks: Grouped) -> None:
    index = gpt2_blocks.layer
    assert refinable_modules(gpt2_blocks.layered, [index("transformer.h.1"), index("lm_head")]) == {"transformer.h.1"}
    refined = refine_layers(gpt2_blocks.layered, ["transformer.h.1"])
    names = [layer.name for layer in refined.graph.layers]
    inside = [names.index(n) for n in ("transformer.h.1.ln_1", "transformer.h.1.attn", "transformer.h.1.mlp")]
    assert refinable_modules(refined, inside) == {"transformer.h.1.attn", "transformer.h.1.mlp"}


def test_refining_gpt2_to_the_end_groups_as_leaf_granularity(gpt2_blocks: Grouped, gpt2_leaves: Grouped) -> None:
    """The same layers and fingerprint as tracing at leaf granularity: one profile serves both."""
    finest = _refined_to_the_end(gpt2_blocks.layered)
    assert [layer.name for layer in finest.graph.layers] == gpt2_leaves.names()
    assert finest.graph.fingerprint == gpt2_leaves.layered.graph.fingerprint


def test_refined_projections_side_by_side_stay_one_layer_and_the_layers_a_chain() -> None:
    """Llama's q/k/v (and gate/up) projections read the same input: split, they would make
    the blocks' chain a branchy graph that only the ILP solves."""
    grouped = group_case("llama")
    finest = _refined_to_the_end(grouped.layered)
    names = [layer.name for layer in finest.graph.layers]
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    assert f"{attn}.q_proj..{attn}.v_proj" in names and f"{attn}.o_proj" in names
    assert f"{mlp}.gate_proj..{mlp}.up_proj" in names and f"{mlp}.down_proj" in names
    joined = {(v.producer, c) for v in finest.graph.values for c in v.consumers}
    assert all((i, i + 1) in joined for i in range(len(names) - 1))


# --------------------------------------------------------------------------- invariants


def test_values_flow_forward_and_every_crossing_edge_is_a_value(any_model: Grouped) -> None:
    gm = any_model.layered.traced.gm
    layer_of = any_model.layered.node_layer
    values = {v.name: v for v in any_model.layered.graph.values}
    crossings = 0
    for n in gm.graph.nodes:
        if n.op == "output":
            for a in n.all_input_nodes:
                if any_model.stats.get(a.name) is None or any_model.stats[a.name].is_tensor:
                    assert OUTPUT in values[a.name].consumers, a.name
        if n.name not in layer_of:
            continue
        for a in n.all_input_nodes:
            if a.op == "placeholder":
                assert layer_of[n.name] in values[a.name].consumers and values[a.name].producer == INPUT
            elif layer_of[a.name] != layer_of[n.name] and any_model.stats[a.name].is_tensor:
                crossings += 1
                assert layer_of[a.name] < layer_of[n.name], f"{a.name} -> {n.name} goes backwards"
                assert values[a.name].producer == layer_of[a.name]
                assert layer_of[n.name] in values[a.name].consumers
    assert crossings >= len(any_model.layered.graph.layers) - 1  # the layers are connected
    for v in any_model.layered.graph.values:
        assert list(v.consumers) == sorted(set(v.consumers), key=lambda c: (c == OUTPUT, c))
        assert v.producer == INPUT or v.bytes > 0  # ints and shapes between layers are no values


def test_each_tensor_is_owned_by_exactly_one_layer(any_model: Grouped) -> None:
    owned = Counter(id(any_model.tensor(p)) for layer in any_model.layered.graph.layers for p in layer.params)
    assert set(owned.values()) == {1}
    model = any_model.model
    assert set(owned) == {id(t) for t in [*model.parameters(), *model.buffers()]}  # shared, not copied
    for layer in any_model.layered.graph.layers:
        expected = sum(any_model.tensor(p).nbytes for p in layer.params)
        assert layer.param_bytes + layer.buffer_bytes == expected


def test_tied_weight_lives_in_one_layer_and_moves_as_a_value() -> None:
    grouped = group_case("tied")
    weight = grouped.model.embed.weight
    (owner,) = [
        layer for layer in grouped.layered.graph.layers if any(grouped.tensor(p) is weight for p in layer.params)
    ]
    assert owner.name == "embed"
    (value,) = [v for v in grouped.layered.graph.values if v.producer == owner.index and v.bytes == weight.nbytes]
    assert value.consumers == (grouped.layer("head"),)
    assert grouped.layered.graph.layers[grouped.layer("head")].param_bytes == 0


@pytest.mark.parametrize("frontend", ["fx", "auto"])
def test_a_weight_read_directly_and_inside_a_module_has_one_owner(frontend: str) -> None:
    # tied_read: `F.linear(h, self.embed.weight)` beside `self.embed(ids)`. Forced fx cannot
    # move a weight a called module reads inside: the two layers become one. auto traces
    # with export, where the weight is a value the head's layer receives.
    grouped = group_case("tied_read", frontend=frontend)
    weight = grouped.model.embed.weight
    owners = [layer for layer in grouped.layered.graph.layers if any(grouped.tensor(p) is weight for p in layer.params)]
    assert len(owners) == 1
    if frontend == "fx":
        assert len(grouped.layered.graph.layers) == 1
    else:
        assert grouped.layered.traced.frontend == "export" and len(grouped.layered.graph.layers) > 1
        assert any(v.producer == owners[0].index and v.bytes == weight.nbytes for v in grouped.layered.graph.values)


def test_module_called_twice_with_fx_keeps_both_calls_with_its_weights() -> None:
    grouped = group_case("twice", frontend="fx")
    calls = [n.name for n in grouped.layered.traced.gm.graph.nodes if n.target == "shared.0"]
    assert len(calls) == 2
    assert len({grouped.layered.node_layer[c] for c in calls}) == 1  # call_module nodes read the weight inside


def test_module_called_twice_with_export_moves_its_weights_to_the_second_call() -> None:
    grouped = group_case("twice", frontend="export")
    assert grouped.names() == ["inp", "shared.0", "shared.1", "mid", "shared.0@1", "shared.1@1", "out"]
    first, second = grouped.layer("shared.0"), grouped.layer("shared.0@1")
    assert grouped.layered.graph.layers[second].params == ()
    moved = {v.bytes for v in grouped.layered.graph.values if v.producer == first and second in v.consumers}
    assert moved >= {16 * 16 * 4, 16 * 4}  # shared.0's weight and bias


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_keyword_inputs_and_dict_outputs_group(frontend: str) -> None:
    grouped = group_case("kwargs_dict", frontend=frontend)
    assert grouped.names() == ["encoder.proj", "classifier", "scorer"]
    outputs = [v for v in grouped.layered.graph.values if OUTPUT in v.consumers]
    assert len(outputs) == 3  # hidden, logits, score


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_for_equal_models(gpt2_blocks: Grouped) -> None:
    assert group_case("gpt2").layered.graph.fingerprint == gpt2_blocks.layered.graph.fingerprint
    assert group_case("mlp").layered.graph.fingerprint == group_case("mlp").layered.graph.fingerprint


def test_fingerprint_differs_for_other_models_and_groupings(gpt2_blocks: Grouped, gpt2_leaves: Grouped) -> None:
    x = torch.randn(4, 8)
    narrow, wide = (group(TwiceModel(dh=dh), (x,), {}).layered.graph.fingerprint for dh in (16, 17))
    assert narrow != wide
    assert narrow == group(TwiceModel(dh=16), (x,), {}).layered.graph.fingerprint  # weights do not count
    assert gpt2_blocks.layered.graph.fingerprint != gpt2_leaves.layered.graph.fingerprint


# --------------------------------------------------------------------------- kernels and matmul sizes


def test_kernels_count_launching_ops_and_skip_views() -> None:
    """Linear -> ReLU -> Linear: two ``addmm`` and a ``relu`` launch; the weights' ``t`` views do not."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    for frontend in ("fx", "export"):
        g = group(model, (x,), {}, frontend=frontend, granularity="leaf")
        layers = g.layered.graph.layers
        assert sum(layer.fwd_kernels for layer in layers) == 3, frontend
        assert all(layer.bwd_kernels == 2 * layer.fwd_kernels for layer in layers)
        # Each addmm's FLOPs itemised (2 x rows x in x out), the ReLU's bytes element-wise (the stateless
        # ReLU joins a neighbour's layer).
        # with their sides as (m x k) @ (k x n): 2 rows, 8 -> 16 and 16 -> 4.
        assert sorted(gm for layer in layers for gm in layer.gemms) == [
            (2 * 2 * 16 * 4, 1, 2, 4, 16), (2 * 2 * 8 * 16, 1, 2, 16, 8)
        ]
        relu = g.stats[next(n for n in g.stats if "relu" in n or n == "_1")]
        assert sum(layer.elementwise_bytes for layer in layers) == relu.traffic_bytes > 0
        # Three module calls (Linear, ReLU, Linear); the Sequential is the root, called by the user.
        assert sum(layer.module_calls for layer in layers) == 3, frontend
        # One pass of the ReLU's bytes (2 x 16 floats read, as many written), for the size curve.
        assert [p for layer in layers for p in layer.passes] == [(relu.traffic_bytes, 1)] == [(2 * 2 * 16 * 4, 1)]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_convolutions_and_the_kinds_of_memory_bound_ops_are_kept(frontend: str) -> None:
    """A conv net in training mode: the convolution's FLOPs apart (`Layer.convs`), the batch
    norm's and the pooling's passes marked with their kinds (`OP_KINDS` index + 1), the ReLU's
    plain; in eval mode the batch norm is a plain scale and shift."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(2, 3, 16, 16)
    layers = group(model, (x,), {}, frontend=frontend, granularity="leaf").layered.graph.layers
    conv = 2 * 2 * 16 * 16 * 8 * 3 * 9
    assert [c for layer in layers for c in layer.convs] == [(conv, 1)]
    assert (conv, 1) in [g[:2] for layer in layers for g in layer.gemms]  # and among the FLOP-counting ops
    kinds = sorted(p[2] if len(p) == 3 else 0 for layer in layers for p in layer.passes)
    ids = {k: OP_KINDS.index(k) + 1 for k in OP_KINDS}
    assert [k for k in kinds if k] == sorted([ids["batch_norm"], ids["max_pool"], ids["avg_pool"]]), kinds
    evaluated = group(model.eval(), (x,), {}, frontend=frontend, granularity="leaf").layered.graph.layers
    assert sorted(p[2] for layer in evaluated for p in layer.passes if len(p) == 3) == sorted(
        [ids["max_pool"], ids["avg_pool"]])
    model.train()


@pytest.mark.parametrize(
    "name, args, kind",
    [
        ("native_batch_norm", (None, None, None, None, None, True, 0.1, 1e-5), "batch_norm"),
        ("native_batch_norm", (None, None, None, None, None, False, 0.1, 1e-5), ""),
        ("_native_batch_norm_legit_no_training", (None, None, None, None, None, 0.1, 1e-5), ""),
        ("native_layer_norm", (), "norm"),
        ("native_group_norm", (), "norm"),
        ("_fused_rms_norm", (), "norm"),
        ("max_pool2d_with_indices", (), "max_pool"),
        ("adaptive_max_pool2d", (), "max_pool"),
        ("avg_pool2d", (), "avg_pool"),
        ("_adaptive_avg_pool2d", (), "avg_pool"),
        ("_batch_norm_with_update", (None, None, None, None, None, 0.1, 1e-5), "batch_norm"),
        ("_batch_norm_no_update", (None, None, None, None, None, 0.1, 1e-5), ""),
        ("relu", (), ""),
        ("tanh", (), "tanh"),
        ("tanh_", (), "tanh"),
        ("exp", (), "exp"),
        ("expand", (), ""),
        ("exponential_", (), ""),
        ("sigmoid_", (), "sigmoid"),
        ("silu", (), "silu"),
        ("gelu", (), "gelu"),
        ("_softmax", (None, -1, False), "softmax"),
        ("_safe_softmax", (), "softmax"),
        ("_masked_softmax", (), "softmax"),
        ("_log_softmax", (), "log_softmax"),
        ("tanh_backward", (), ""),
    ],
)
def test_op_kinds_by_name(name: str, args: tuple[Any, ...], kind: str) -> None:
    assert op_kind(name, args) == kind


def test_causal_attention_is_read_from_each_kernels_own_argument() -> None:
    """``is_causal`` sits at another position in each fused kernel (found by name), the
    memory-efficient kernel says it with ``custom_mask_type``, torch's function by keyword."""
    aten = torch.ops.aten
    flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert _is_causal(flash, (None, None, None, 0.0, True), {}) and not _is_causal(flash, (None, None, None), {})
    efficient = aten._efficient_attention_forward.default
    names = [a.name for a in efficient._schema.arguments]
    args = [None] * len(names)
    for mask, causal in ((0, False), (1, True), (2, True)):
        args[names.index("custom_mask_type")] = mask
        assert _is_causal(efficient, tuple(args), {}) is causal
    assert _is_causal(F.scaled_dot_product_attention, (None, None, None), {"is_causal": True})
    assert not _is_causal(F.scaled_dot_product_attention, (None, None, None, None, 0.0, False), {})


def test_a_node_of_the_memory_efficient_kernel_reads_its_heads_from_its_layout() -> None:
    """An exported graph may hold a fused kernel as a node: ``_efficient_attention_forward``
    takes (batch, tokens, heads, head size), so 2 samples x 4 heads, causal by its mask type."""

    class Kernel(nn.Module):
        def forward(self, q: torch.Tensor) -> Any:
            return torch.ops.aten._efficient_attention_forward.default(
                q, q, q, None, None, None, None, None, 0.0, 1, False)

    q = torch.randn(2, 16, 4, 8)
    gm = torch.fx.symbolic_trace(Kernel())
    stats = profile_nodes(gm, (q,), {}, training=False)
    (flops, causal, head), = [e for s in stats.values() for e in s.attention_flops]
    assert flops > 0 and causal and head == flops // (2 * 4)  # not over 2 x 16 tokens


def test_flops_per_head_follow_each_kernels_layout() -> None:
    """Most attention kernels take (batch, heads, tokens, head size); flash's and the
    memory-efficient forward (batch, tokens, heads, head size): either way 2 x 4 heads."""
    flops = 2 * 4 * (4 * 16 * 16 * 8)
    assert _head_flops(flops, (torch.empty(2, 4, 16, 8),)) == _head_flops(flops, (torch.empty(2, 16, 4, 8),), True) == 4 * 16 * 16 * 8
    assert _head_flops(flops, ()) == flops  # no query to read: the whole


def test_a_gelu_approximated_with_tanh_is_its_own_kind() -> None:
    """``gelu``'s ``approximate`` is keyword-only in ATen; either way it decides the kind."""
    assert op_kind("gelu", (None,), {"approximate": "tanh"}) == op_kind("gelu_", (None, "tanh")) == "gelu_tanh"
    assert op_kind("gelu", (None,), {"approximate": "none"}) == op_kind("gelu", (None,)) == "gelu"


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_is_kept_with_its_mask_whichever_kernel_runs_it(frontend: str, device: str) -> None:
    """Four attentions of 2 samples x 4 heads x 16 tokens x 8: causal, full, with a mask
    tensor (full work: the kernel computes every block) and with dropout (on a CPU, and on
    ``meta`` for all four, the math path's matmuls run, not a fused kernel): each is one
    side-less FLOP-counting entry, kept in `Layer.attention` with whether it is causal and
    its FLOPs per sample and head."""

    class Attentions(nn.Module):
        def forward(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            x = F.scaled_dot_product_attention(x, x, x)
            x = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
            return F.scaled_dot_product_attention(x, x, x, dropout_p=0.1)

    q = torch.randn(2, 4, 16, 8, device=device)
    mask = torch.ones(16, 16, dtype=torch.bool, device=device).tril()
    layers = group(Attentions(), (q, mask), {}, frontend=frontend, granularity="leaf").layered.graph.layers
    head = 4 * 16 * 16 * 8
    flops = 2 * 4 * head
    kept: Counter[tuple[int, int, int]] = Counter()
    for layer in layers:
        for g, count, causal, per_head in layer.attention:
            kept[(g, causal, per_head)] += count
    assert kept == {(flops, 1, head): 1, (flops, 0, head): 3}
    entries = Counter((g[0], tuple(g[2:])) for layer in layers for g in layer.gemms for _ in range(g[1]))
    assert entries == {(flops, (0, 0, 0)): 4}, entries


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_activations_and_softmax_are_marked_with_their_kinds(frontend: str) -> None:
    """GPT-2's GELU written out (``tanh`` among multiplies and a power), a SiLU, a GELU of
    each form and a softmax: each of those nodes' passes carries its kind, the multiplies,
    adds and the power none."""

    class Activations(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = 0.5 * x * (1.0 + torch.tanh(0.79788 * (x + 0.044715 * torch.pow(x, 3.0))))
            x = F.gelu(F.gelu(F.silu(x)), approximate="tanh")
            return torch.softmax(x, dim=-1)

    layers = group(Activations(), (torch.randn(4, 8),), {}, frontend=frontend, granularity="leaf").layered.graph.layers
    kinds = [OP_KINDS[p[2] - 1] for layer in layers for p in layer.passes if len(p) == 3 and p[2]]
    assert sorted(kinds) == sorted(["tanh", "silu", "gelu", "gelu_tanh", "softmax"]), kinds
    assert sum(count for layer in layers for _, count, *kind in layer.passes if not kind or not kind[0]) >= 5


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_module_calls_count_each_call_of_each_module(frontend: str) -> None:
    # inp, mid, out once; shared (a Sequential) and its Linear and Tanh twice each: 9 calls.
    g = group(TwiceModel(), (torch.randn(2, 8),), {}, frontend=frontend, granularity="leaf")
    layers = g.layered.graph.layers
    assert sum(layer.module_calls for layer in layers) == 9
    assert layers[0].name == "inp" and layers[0].module_calls == 1


def test_block_kernels_sum_their_ops(gpt2_blocks: Grouped) -> None:
    """A block's kernels are its nodes' launching ops; views (``view``, ``permute``, ``t``) count none."""
    layers = gpt2_blocks.layered.graph.layers
    block = layers[gpt2_blocks.layer("transformer.h.0")]
    gm = gpt2_blocks.layered.traced.gm
    nodes = [n for n in gm.graph.nodes if gpt2_blocks.layered.node_layer.get(n.name) == block.index]
    assert block.fwd_kernels == sum(gpt2_blocks.stats[n.name].kernels for n in nodes if n.op != "get_attr")
    views = [n for n in nodes if getattr(n.target, "__name__", "").split(".")[0] in ("view", "permute", "t", "transpose")]
    assert views and all(gpt2_blocks.stats[n.name].kernels == 0 for n in views)
    assert 0 < block.fwd_kernels < block.num_nodes
    assert sum(f * c for f, c, *_ in block.gemms) == block.fwd_flops


@pytest.mark.parametrize("training", [False, True])
def test_tiny_model_gpu_step_is_at_least_its_kernels_times_the_launch_floor(gpt2_blocks: Grouped, training: bool) -> None:
    """Issue 16's criterion: a 2-block GPT-2 of width 32 was predicted at about a microsecond
    on an A100 (no floor), below what launching its kernels alone takes."""
    from partitioner.cost_model import build_problem
    from partitioner.devices import Device, load_profile
    from partitioner.options import PlanOptions

    a100 = load_profile("a100-80gb")
    assert a100.launch_s > 0
    graph = gpt2_blocks.layered.graph
    problem = build_problem(
        graph, [Device(name="a100", torch_device=None, profile=a100, present=False, memory_bytes=a100.memory_bytes)],
        PlanOptions(training=training, allow_data_parallel=False),
    )
    kernels = sum(layer.fwd_kernels + (layer.bwd_kernels if training else 0) for layer in graph.layers)
    assert kernels > 50
    assert sum(row[0] for row in problem.compute_s) >= kernels * a100.launch_s * (1 - 1e-9)


class _Attention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(q, q, q)


def test_attention_on_cpu_counts_its_flops() -> None:
    """torch's counter knows the CUDA attention kernels only; the CPU one counted 0 FLOPs, so
    a model profiled here priced its attention as free."""
    from torch.utils.flop_counter import sdpa_flop_count

    q = torch.randn(2, 4, 16, 8)
    traced = trace_model(_Attention(), (q,), {})
    stats = profile_nodes(traced.gm, (q,), {}, training=False)
    assert sum(s.flops for s in stats.values()) == sdpa_flop_count(q.shape, q.shape, q.shape) > 0


# --------------------------------------------------------------------------- backward FLOPs


class _ThreeLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 32)
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.last = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.frozen(torch.relu(self.first(x)))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_backward_flops_count_only_the_gradients_a_backward_computes(frontend: str) -> None:
    # The input requires no grad: the first Linear computes its weight's gradient only; the
    # frozen one its input's only; the last both (twice its forward, as every layer before).
    model, x = _ThreeLinears(), torch.randn(4, 16)
    traced = trace_model(model, (x,), {}, frontend=frontend)
    layers = {layer.name: layer for layer in build_layers(traced, profile_nodes(traced.gm, (x,), {})).graph.layers}
    ratios = {name: layers[name].bwd_flops / layers[name].fwd_flops for name in ("first", "frozen", "last")}
    assert ratios == {"first": 1.0, "frozen": 1.0, "last": 2.0}
    # Without gradients recorded (an inference profile) nothing tells, and backward stays twice.
    plain = build_layers(traced, profile_nodes(traced.gm, (x,), {}, training=False)).graph.layers
    assert all(layer.bwd_flops == 2 * layer.fwd_flops for layer in plain)


# --------------------------------------------------------------------------- traffic


class _LookupThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(1000, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_traffic_counts_a_modules_weights_and_only_the_rows_a_lookup_reads(frontend: str) -> None:
    # fx keeps nn.Linear and nn.Embedding as call_module nodes, export as aten ops on get_attr
    # weights: the weights a node reads count either way, and a lookup reads 4 rows of its
    # 1000-row table, not the table.
    model, ids = _LookupThenLinear(), torch.tensor([[1, 2, 3, 4]])
    g = group(model, (ids,), {}, frontend=frontend, granularity="leaf")
    layers = {layer.name: layer for layer in g.layered.graph.layers}
    table, rows, out = 1000 * 16 * 4, 4 * 16 * 4, 4 * 8 * 4
    lookup, proj = layers["table"], layers["proj"]
    assert lookup.unread_bytes == table - rows
    assert lookup.traffic_bytes - lookup.unread_bytes == ids.numel() * 8 + 2 * rows
    assert lookup.passes == ((ids.numel() * 8 + 2 * rows, 1),)  # its pass is the rows it moves, not the table
    assert proj.unread_bytes == 0 and proj.traffic_bytes == rows + (16 * 8 + 8) * 4 + out


def test_a_lookup_forward_moves_its_rows_and_its_backward_the_tables_gradient() -> None:
    from partitioner.cost_model import layer_fwd_bwd_time
    from partitioner.devices import load_profile

    profile = load_profile("a100-80gb")
    bandwidth = profile.memory_bandwidth_Bps * profile.memory_efficiency
    model, ids = _LookupThenLinear(), torch.randint(0, 1000, (2, 8))
    lookup = group(model, (ids,), {}, frontend="export", granularity="leaf").layered.graph.layers[0]
    fwd, bwd = layer_fwd_bwd_time(lookup, profile)
    moved = lookup.traffic_bytes - lookup.unread_bytes
    # A GPU: the larger of the bytes' time and the launches' (partitioner.cost_model).
    assert fwd == pytest.approx(max(moved / bandwidth, lookup.fwd_kernels * profile.launch_s))
    assert bwd == pytest.approx(max((2 * moved + lookup.unread_bytes) / bandwidth, lookup.bwd_kernels * profile.launch_s))
    assert lookup.unread_bytes > 25 * moved  # the 1000-row table, of which 16 rows are read


class _AddedOperands(nn.Module):
    """Attention with a float mask and a baddbmm onto a bias: the added operands are summed
    in a backward, not multiplied."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("bias", torch.zeros(2, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        mask = torch.zeros(4, 4)
        a = nn.functional.scaled_dot_product_attention(h, h, h, attn_mask=mask)
        return torch.baddbmm(self.bias, a, a.transpose(1, 2)).sum(-1)


class _NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.teacher = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        with torch.no_grad():
            target = self.teacher(x)
        return h - target


def test_added_operands_and_no_grad_regions_take_no_backward_flops() -> None:
    x = torch.randn(2, 4, 8)
    traced = trace_model(_AddedOperands(), (x,), {}, frontend="export")
    layers = build_layers(traced, profile_nodes(traced.gm, (x,), {})).graph.layers
    flops = sum(layer.fwd_flops for layer in layers)
    # Twice the forward, but for the Linear, whose input needs no grad (its weight's only: 2 x 8 rows x 8 x 8).
    assert flops > 0 and sum(layer.bwd_flops for layer in layers) == 2 * flops - 2 * 8 * 8 * 8
    traced = trace_model(_NoGradInside(), (x,), {}, frontend="export")
    layers = {layer.name: layer for layer in build_layers(traced, profile_nodes(traced.gm, (x,), {})).graph.layers}
    assert layers["teacher"].fwd_flops > 0 and layers["teacher"].bwd_flops == 0
    assert layers["first"].bwd_flops == layers["first"].fwd_flops


class _Lookups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Embedding(1000, 16)
        self.frozen = nn.Embedding(1000, 16).requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.trained(ids) + self.frozen(ids)
        return torch.gather(h, 1, ids[..., None].expand(-1, -1, 16) % 4)  # from an activation


def test_only_parameter_tables_skip_rows_and_only_trained_ones_write_a_gradient() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    g = group(_Lookups(), (ids,), {}, frontend="export", granularity="leaf")
    traced = g.layered.traced
    stats = profile_nodes(traced.gm, (ids,), {})
    layers = {layer.name: layer for layer in build_layers(traced, stats).graph.layers}
    table, rows = 1000 * 16 * 4, 4 * 16 * 4
    assert layers["trained"].unread_bytes == layers["trained"].table_grad_bytes == table - rows
    assert layers["frozen"].unread_bytes == table - rows and layers["frozen"].table_grad_bytes == 0
    gathers = [s for name, s in stats.items() if "gather" in name]
    assert gathers and all(s.unread_bytes == 0 for s in gathers)
