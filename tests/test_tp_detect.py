"""Tensor-parallel detection on traced graphs: pairs, vocabulary shards, norms, per-layer costs."""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from torch import nn

from partitioner.analysis import trace_layers
from partitioner.layers import LayeredModel
from partitioner.options import Frontend, Optimizer, Precision, TraceOptions
from partitioner.tp_layout import TensorParallelError
from partitioner.training_costs import training_costs
from tests.models import ZOO, _hf_model, _token_ids, zoo_case

_DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64)
_EXTRA = {
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DECODER, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DECODER, num_attention_heads=4, num_key_value_heads=2)),
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_DECODER, num_attention_heads=4)),
}


def _build(name: str) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    if name in _EXTRA:
        model_class, config_class, config = _EXTRA[name]
        return _hf_model(model_class, config_class, **config), (_token_ids(1),), {"use_cache": False}
    return ZOO[name].build()


@functools.cache
def _layered(name: str) -> LayeredModel:
    model, args, kwargs = _build(name)
    layered, _ = trace_layers(model, args, kwargs, training=True)
    return layered


def _pairs(layered: LayeredModel) -> list[tuple[Any, ...]]:
    """(kind, row, heads, kv_heads, width, ((column, out_features, parts, transposed), ...)) per pair."""
    return [
        (p.kind, p.row, p.heads, p.kv_heads, p.width, tuple((c.module, c.out_features, c.parts, c.transposed) for c in p.columns))
        for p in layered.tensor_parallel.pairs
    ]


Columns = list[tuple[str, int, int, bool]]
"""(module under the prefix, out_features, parts, transposed)."""


def _blocks(
    attn: str, row: str, columns: Columns, heads: int, kv_heads: int, mlp: str, mlp_row: str, mlp_columns: Columns,
    hidden: int,
) -> list[tuple[Any, ...]]:
    """The expected pairs of two blocks of width 32: attention, then MLP; ``{}`` in the prefixes is the block."""

    def pair(kind: str, prefix: str, row: str, heads: int, kv_heads: int, width: int, columns: Columns) -> tuple[Any, ...]:
        return (kind, f"{prefix}.{row}", heads, kv_heads, width, tuple((f"{prefix}.{c}", *rest) for c, *rest in columns))

    return [
        p
        for i in range(2)
        for p in (
            pair("attention", attn.format(i), row, heads, kv_heads, 32, columns),
            pair("mlp", mlp.format(i), mlp_row, 0, 0, hidden, mlp_columns),
        )
    ]


_LLAMA = _blocks(
    "model.layers.{}.self_attn", "o_proj", [("q_proj", 32, 1, False), ("k_proj", 16, 1, False), ("v_proj", 16, 1, False)],
    4, 2, "model.layers.{}.mlp", "down_proj", [("gate_proj", 64, 1, False), ("up_proj", 64, 1, False)], 64,
)  # fmt: skip
_QKV = [("q_proj", 32, 1, False), ("k_proj", 32, 1, False), ("v_proj", 32, 1, False)]

_EXPECTED_PAIRS: dict[str, list[tuple[Any, ...]]] = {
    "gpt2": _blocks(
        "transformer.h.{}.attn", "c_proj", [("c_attn", 96, 3, True)], 2, 2,
        "transformer.h.{}.mlp", "c_proj", [("c_fc", 128, 1, True)], 128,
    ),
    "bert": _blocks(
        "bert.encoder.layer.{}.attention", "output.dense",
        [("self.query", 32, 1, False), ("self.key", 32, 1, False), ("self.value", 32, 1, False)], 2, 2,
        "bert.encoder.layer.{}", "output.dense", [("intermediate.dense", 64, 1, False)], 64,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "neox": _blocks(
        "gpt_neox.layers.{}.attention", "dense", [("query_key_value", 96, 1, False)], 4, 4,
        "gpt_neox.layers.{}.mlp", "dense_4h_to_h", [("dense_h_to_4h", 64, 1, False)], 64,
    ),
    "vit": _blocks(
        "vit.layers.{}.attention", "o_proj", _QKV, 2, 2, "vit.layers.{}.mlp", "fc2", [("fc1", 64, 1, False)], 64
    ),
}  # fmt: skip

_EXPECTED_VOCAB = {
    "gpt2": [("transformer.wte", "embedding", 128), ("lm_head", "head", 128)],
    "bert": [("bert.embeddings.word_embeddings", "embedding", 128), ("cls.predictions.decoder", "head", 128)],
    "llama": [("model.embed_tokens", "embedding", 128), ("lm_head", "head", 128)],
    "mistral": [("model.embed_tokens", "embedding", 128), ("lm_head", "head", 128)],
    "qwen2": [("model.embed_tokens", "embedding", 128), ("lm_head", "head", 128)],
    "neox": [("gpt_neox.embed_in", "embedding", 128), ("lm_head", "head", 128)],
    "vit": [("classifier", "head", 10)],
}

_NORMS = {
    "gpt2": ["transformer.h.0.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"],
    "bert": ["bert.embeddings.LayerNorm", "bert.encoder.layer.1.output.LayerNorm"],
    "llama": ["model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"],
    "mistral": ["model.layers.0.input_layernorm", "model.norm"],
    "qwen2": ["model.layers.0.input_layernorm", "model.norm"],
    "neox": ["gpt_neox.layers.0.input_layernorm", "gpt_neox.final_layer_norm"],
    "vit": ["vit.layers.0.layernorm_before", "vit.layernorm"],
}


@pytest.mark.parametrize("name", sorted(_EXPECTED_PAIRS))
def test_transformer_pairs_vocab_and_norms(name: str) -> None:
    layered = _layered(name)
    layout = layered.tensor_parallel
    assert _pairs(layered) == _EXPECTED_PAIRS[name]
    assert [(v.module, v.kind, v.vocab) for v in layout.vocab] == _EXPECTED_VOCAB[name]
    assert set(_NORMS[name]) <= set(layout.sequence)
    model, _, _ = _build(name)
    for module in [c.module for p in layout.pairs for c in p.columns] + [p.row for p in layout.pairs]:
        model.get_submodule(module)  # the model's own names, for DTensor's parallelize_module
    split = {c.module for p in layout.pairs for c in p.columns} | {p.row for p in layout.pairs}
    assert not split & {m for m, _ in layout.replicated}


def test_t5_pairs_encoder_decoder_and_cross_attention() -> None:
    layout = _layered("t5").tensor_parallel
    rows = [p.row for p in layout.pairs]
    assert rows == [
        "encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense.wo",
        "encoder.block.1.layer.0.SelfAttention.o", "encoder.block.1.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.1.EncDecAttention.o",
        "decoder.block.0.layer.2.DenseReluDense.wo", "decoder.block.1.layer.0.SelfAttention.o",
        "decoder.block.1.layer.1.EncDecAttention.o", "decoder.block.1.layer.2.DenseReluDense.wo",
    ]  # fmt: skip
    cross = layout.pairs[5]
    assert [c.module for c in cross.columns] == [f"decoder.block.0.layer.1.EncDecAttention.{x}" for x in "qkv"]
    assert (cross.heads, cross.kv_heads, cross.width) == (4, 4, 32)
    assert [(v.module, v.kind) for v in layout.vocab] == [
        ("encoder.embed_tokens", "embedding"), ("decoder.embed_tokens", "embedding"), ("lm_head", "head")
    ]  # fmt: skip
    replicated = dict(layout.replicated)
    assert "positions" in replicated["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    assert "shared" not in replicated  # the embeddings' own weight: split with them
    assert "encoder.final_layer_norm" in layout.sequence


def test_position_embeddings_stay_replicated_with_a_reason() -> None:
    replicated = dict(_layered("gpt2").tensor_parallel.replicated)
    assert list(replicated) == ["transformer.wpe"]
    assert "positions" in replicated["transformer.wpe"]
    vit = dict(_layered("vit").tensor_parallel.replicated)
    assert "convolution" in vit["vit.embeddings.patch_embeddings.projection"]
    assert "read by" in vit["vit.embeddings"]  # the class token and position table: added, not multiplied
    cnn = _layered("cnn").tensor_parallel
    assert cnn.pairs == () and [(v.module, v.kind) for v in cnn.vocab] == [("fc", "head")]  # the classifier
    assert "BatchNorm2d" in dict(cnn.replicated)["bn1"] and "convolution" in dict(cnn.replicated)["conv1"]


def _seq_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(),
    )  # fmt: skip


@pytest.mark.parametrize("frontend", [Frontend.FX, Frontend.EXPORT])
def test_plain_mlp_pairs_alternate(frontend: Frontend) -> None:
    model = _seq_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layered, _ = trace_layers(model, (torch.randn(4, 16),), training=True, trace=TraceOptions(frontend=frontend))
    layout = layered.tensor_parallel
    assert [(p.kind, [c.module for c in p.columns], p.row, p.width) for p in layout.pairs] == [
        ("mlp", ["0"], "2", 32), ("mlp", ["4"], "6", 64)
    ]  # fmt: skip
    assert layout.vocab == () and layout.replicated == () and layout.sequence == ()
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


class _Escaping(nn.Module):
    """``h = up(x); y = down(relu(h)) + h``: the column's output is also a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.down = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 32)
        self.proj = nn.Linear(32, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        y = self.down(torch.relu(h)) + h
        return self.norm(y + self.proj(torch.nn.functional.gelu(self.fc(y))))


@pytest.mark.parametrize("frontend", [Frontend.FX, Frontend.EXPORT])
def test_column_whose_output_escapes_is_replicated(frontend: Frontend) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Escaping()
    layered, _ = trace_layers(model, (torch.randn(2, 8),), training=True, trace=TraceOptions(frontend=frontend))
    layout = layered.tensor_parallel
    assert [([c.module for c in p.columns], p.row) for p in layout.pairs] == [(["fc"], "proj")]
    replicated = dict(layout.replicated)
    assert set(replicated) == {"up", "down"}
    # Its output is added to `down`'s, and that sum reaches the norm before any row.
    assert "reaches" in replicated["up"] and "norm" in replicated["up"]
    assert layout.sequence == ("norm",)


def test_tied_heads_are_heads() -> None:
    tied = _layered("tied").tensor_parallel
    assert [(v.module, v.kind, v.vocab) for v in tied.vocab] == [("embed", "embedding", 64), ("head", "head", 64)]
    assert [p.row for p in tied.pairs] == ["blocks.0.3", "blocks.1.3"]
    # ``F.linear(h, embed.weight)``: no head module; the head is named by the embedding it reads.
    read = _layered("tied_read").tensor_parallel
    assert [(v.module, v.kind) for v in read.vocab] == [("embed", "embedding"), ("embed", "head")]
    assert read.pairs == ()  # each block's Linear output is added to the residual
    assert "blocks.0.0" in dict(read.replicated)


def _layer(layered: LayeredModel, name: str) -> Any:
    return next(layer for layer in layered.graph.layers if layer.name == name)


def test_gpt2_block_costs() -> None:
    layered = _layered("gpt2")
    model, _, _ = _build("gpt2")
    block = model.get_submodule("transformer.h.0")
    split = sum(p.numel() for m in ("attn", "mlp") for p in block.get_submodule(m).parameters())
    layer = _layer(layered, "transformer.h.0")
    assert layer.tp_params == split
    assert layer.tp_divisor == 2
    # The four matmuls and the attention core are split; norms and residuals are not.
    assert 0 < layer.tp_flops <= layer.fwd_flops + layer.bwd_flops
    assert 0 < layer.core_flops < layer.tp_flops
    assert 0 < layer.core_activation_bytes < layer.tp_activation_bytes < layer.saved_bytes
    # Two rows all-reduce a (batch, seq, hidden) float32 output each.
    assert layer.tp_comm_bytes == 2 * 2 * 8 * 32 * 4
    wte, wpe = _layer(layered, "transformer.wte"), _layer(layered, "transformer.wpe")
    assert wte.tp_params == 128 * 32 and wte.tp_comm_bytes == 2 * 8 * 32 * 4  # the tied head's weight too
    assert wpe.tp_params == 0 and wpe.tp_comm_bytes == 0 and wpe.tp_divisor == 0 and wpe.tp_vocab == ()
    # A vocabulary is no pair: it splits at any degree (`ChainLayer.tp_splits`), unevenly where
    # the degree does not divide it.
    assert wte.tp_divisor == _layer(layered, "lm_head").tp_divisor == 0
    assert wte.tp_vocab == _layer(layered, "lm_head").tp_vocab == (128,)
    assert layer.tp_vocab == ()
    total = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    assert sum(layer.tp_params for layer in layered.graph.layers) == total - norms - 64 * 32  # all but norms, wpe


def test_llama_divisor_and_degree() -> None:
    layered = _layered("llama")
    divisors = {layer.tp_divisor for layer in layered.graph.layers if layer.tp_divisor}
    assert divisors == {2}  # 4 heads, 2 key/value heads
    layout = layered.tensor_parallel
    layout.check_degree(2)
    with pytest.raises(TensorParallelError, match="2 key/value heads"):
        layout.check_degree(4)


def test_training_costs_carry_the_fields_per_sample() -> None:
    layered = _layered("gpt2")
    graph = layered.graph
    costs = training_costs(graph, [], [1], precision=Precision.BF16, optimizer=Optimizer.ADAM, element_size=4)
    b0 = graph.batch_size
    for layer, chain in zip(graph.layers, costs.layers):
        assert chain.tp_flops == pytest.approx(layer.tp_flops / b0)
        assert chain.core_flops == pytest.approx(layer.core_flops / b0)
        assert chain.tp_params == layer.tp_params and chain.tp_divisor == layer.tp_divisor
        assert chain.tp_vocab == layer.tp_vocab
        assert chain.tp_activation_bytes == math.ceil(layer.tp_activation_bytes / 2 / b0)  # bf16 of float32
        assert chain.tp_comm_bytes == math.ceil(layer.tp_comm_bytes / 2 / b0)
        assert chain.core_activation_bytes == math.ceil(layer.core_activation_bytes / 2 / b0)
        assert chain.tp_activation_bytes <= chain.activation_bytes and chain.tp_flops <= chain.flops
    assert any(chain.tp_comm_bytes for chain in costs.layers)


def test_an_odd_vocabulary_lowers_the_busiest_ranks_share_at_degree_2() -> None:
    """GPT-2 with 101 tokens at TP 2: its embedding (which owns the tied head's weight) and the
    head split 51 / 50 rows; the busiest rank holds and computes 51/101 of them, and reads
    51/101 of the lookup's table (before, a vocabulary the degree did not divide stayed whole,
    and a lookup's time, having no FLOPs to split, stayed whole at every degree)."""
    from partitioner.pipeline_plan.terms import LayerTables

    model, args, kwargs = zoo_case("gpt2-v101").build()
    graph = trace_layers(model, args, kwargs, training=True)[0].graph
    costs = training_costs(graph, [], [1], precision=Precision.FP32, optimizer=Optimizer.SGD, element_size=4)
    names = [layer.name for layer in costs.layers]
    wte, head = costs.layers[names.index("transformer.wte")], costs.layers[names.index("lm_head")]
    assert wte.tp_vocab == head.tp_vocab == (101,) and wte.tp_splits(2) and head.tp_splits(2)
    assert wte.tp_share(2) == Fraction(51, 101) and head.tp_share(3) == Fraction(34, 101)
    whole, two = LayerTables(costs, 1, False), LayerTables(costs, 2, False)
    i, k = names.index("transformer.wte"), names.index("lm_head")
    per_rank = wte.params - wte.tp_params + math.ceil(wte.tp_params * 51 / 101)
    assert wte.tp_params == 101 * 32 and two.layer_weights[i] == 4 * per_rank < whole.layer_weights[i]
    x = head.tp_flops / head.flops
    assert 0 < x <= 1 and two.scale[k] == pytest.approx(1 - x + x * 51 / 101) and two.scale[k] < whole.scale[k] == 1
    assert two.split[i] and two.split[k]
    # The lookup has no FLOPs: its time is the bytes it moves. Forward it reads the (float32)
    # table's rows it picks, backward it also writes the table's gradient: both split.
    lookup = graph.layers[i]
    table = 101 * 32 * 4
    assert wte.flops == 0 and lookup.tp_traffic_bytes == table < lookup.traffic_bytes
    assert 0 < lookup.unread_bytes == lookup.table_grad_bytes < table
    forward, rows = lookup.traffic_bytes - lookup.unread_bytes, table - lookup.unread_bytes
    y = wte.tp_time_share
    assert y == pytest.approx((3 * rows + lookup.table_grad_bytes) / (3 * forward + lookup.table_grad_bytes))
    assert two.scale[i] == pytest.approx(1 - y + y * 51 / 101) and whole.scale[i] == 1


def test_detection_is_deterministic_and_leaves_the_fingerprint() -> None:
    from partitioner.layers import build_layers

    layered = _layered("llama")
    again = build_layers(layered.traced, layered.stats, batch_size=layered.graph.batch_size)
    assert again.graph.fingerprint == layered.graph.fingerprint
    assert again.tensor_parallel == layered.tensor_parallel


def test_state_dict_unchanged() -> None:
    model, args, kwargs = _build("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_layers(model, args, kwargs, training=True)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


class _Mixed(nn.Module):
    """``down(relu(up(x)) + norm(x))``: the residual stream enters between column and row."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.down = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)) + self.norm(x))


def test_stream_entering_a_region_keeps_the_column_whole() -> None:
    layered, _ = trace_layers(_Mixed(), (torch.randn(2, 8),), training=True, trace=TraceOptions(frontend=Frontend.FX))
    layout = layered.tensor_parallel
    assert layout.pairs == ()
    replicated = dict(layout.replicated)
    assert "meets LayerNorm norm" in replicated["up"] and "before any row" in replicated["up"]
    assert replicated["norm"] == "a norm with no tensor-parallel pair around it"


def test_report_says_what_splits_and_what_stays_whole() -> None:
    from partitioner.report import render_tensor_parallel
    from partitioner.tp_layout import Column, Pair, TensorParallelLayout, VocabShard

    def attention(i: int) -> Pair:
        column = Column(module=f"h.{i}.attn.c_attn", out_features=96, parts=3, transposed=True)
        return Pair(columns=(column,), row=f"h.{i}.attn.c_proj", kind="attention", heads=4, kv_heads=4, width=32)

    layout = TensorParallelLayout(
        pairs=tuple(attention(i) for i in range(5)),
        vocab=(VocabShard(module="wte", kind="embedding", vocab=100),),
        sequence=("h.0.ln_1", "h.0.ln_2"),
        replicated=(("wpe", "positions"), ("h.0.x", "odd"), ("h.1.x", "odd")),
    )
    assert render_tensor_parallel(layout, examples=2).splitlines() == [
        "tensor parallel (found on the traced graph):",
        "  attention x 5: c_attn (3 parts) -> c_proj, 4 heads / 4 key-value heads, width 32 (h.0.attn.c_proj, "
        "h.1.attn.c_proj, ... (5))",
        "  degrees that split every pair evenly: 1, 2, 4",
        "  vocabulary: wte (embedding, 100)",
        "  sequence parallel (norms, dropouts): h.0.ln_1, h.0.ln_2",
        "  replicated: wpe: positions",
        "  replicated: h.0.x, h.1.x: odd",
    ]
    assert "no column->row pairs" in render_tensor_parallel(TensorParallelLayout())


def test_training_plan_output_has_the_tensor_parallel_section(capsys: pytest.CaptureFixture[str]) -> None:
    from partitioner.cli import main

    argv = ["plan", "mlp", "--devices", "a100-80gb x2", "--train", "--global-batch", "8", "--max-microbatches", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "\ntensor parallel (found on the traced graph):\n  mlp x 1: fc1 -> fc2, width 512 (fc2)\n" in out


def test_token_type_embedding_is_too_small_to_split() -> None:
    model, (ids,), kwargs = _build("bert")
    kwargs = {**kwargs, "token_type_ids": torch.zeros_like(ids)}  # now read from the inputs
    layered, _ = trace_layers(model, (ids,), kwargs, training=True)
    layout = layered.tensor_parallel
    assert [v.module for v in layout.vocab] == ["bert.embeddings.word_embeddings", "cls.predictions.decoder"]
    assert "2 rows, fewer than its width (32)" in dict(layout.replicated)["bert.embeddings.token_type_embeddings"]


def test_built_in_models_on_meta_get_the_fields() -> None:
    from partitioner.models import build_model

    built = build_model("gpt2", seq_len=16)  # on meta, sdpa attention, traced with torch.export
    layered, _ = trace_layers(built.model, built.example_args, built.example_kwargs, training=True)
    layout = layered.tensor_parallel
    assert len(layout.pairs) == 24 and {(p.heads, p.kv_heads) for p in layout.pairs if p.kind == "attention"} == {(12, 12)}
    assert {c.parts for p in layout.pairs if p.kind == "attention" for c in p.columns} == {3}
    blocks = [layer for layer in layered.graph.layers if layer.name.startswith("transformer.h.")]
    assert len(blocks) == 12 and {layer.tp_divisor for layer in blocks} == {12}
    for layer in blocks:
        assert 0 < layer.core_flops < layer.tp_flops <= layer.fwd_flops + layer.bwd_flops
        assert layer.core_activation_bytes == 0  # a fused sdpa keeps no scores; its output is the row's input
        assert layer.tp_params == 7_084_800  # 4 x 768^2 + 4 x 768 (attention) + 8 x 768^2 + 3072 + 768 (MLP)


def test_a_module_called_twice_is_no_pair() -> None:
    layout = _layered("twice").tensor_parallel  # `shared` runs before and after `mid`
    assert layout.pairs == ()
    replicated = dict(layout.replicated)
    assert set(replicated) == {"inp", "shared.0", "mid"}
    assert "shared.0 is called 2 times" in replicated["inp"]
