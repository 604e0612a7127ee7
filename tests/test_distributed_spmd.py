"""Tensor parallelism, sequence parallelism and FSDP2 lowered onto gloo processes: training equals one process.

Every launch (marked ``distributed``) runs the tiny GPT-2 and Llama of tests/models.py
(Llama with grouped-query attention: 4 heads, 2 key/value heads) for two Adam steps under
a plan and compares each rank's losses and its whole state dict (split and sharded
tensors gathered) with single-process training, and each process's slice of a weight
with the split the plan asks for. The tensor-parallel layouts are written by hand
(`tests.dist_worker.tp_layout`). The bad-input checks run in this process: they fail
before any process group starts or any copy of the model is made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import partitioner.distributed as pd
from partitioner.options import Strategy
from partitioner.plan import Plan
from partitioner.tp_layout import TensorParallelError
from tests import dist_worker
from tests.dist_launch import check_case, launch, write_plan
from tests.helpers import base_plan, hand_pipeline, placed
from tests.models import ZOO, zoo_case


def _data_parallel(model: str, devices: int) -> Plan:
    """One stage of every layer on `devices` replicas (they split into data x tensor parallel)."""
    plan = base_plan(model, devices)
    return dataclasses.replace(placed(plan, [0] * len(plan.layers)), strategy=Strategy.DATA_PARALLEL)


def _pipeline(model: str) -> Plan:
    """Two stages, each on 2 processes (one tensor-parallel pair), 1F1B over 2 microbatches."""
    plan = base_plan(model, 4)
    cut = len(plan.layers) // 2
    return hand_pipeline(plan, [(0, cut - 1), (cut, len(plan.layers) - 1)], [(0, 1), (2, 3)], "1f1b", 2, 8)


def _case(name: str, model: str, plan: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "plan": plan, "global_batch": 8, "optimizer": "adam", **extra}


def _result(tmp_path: Path, case: str, rank: int) -> dict[str, Any]:
    out: dict[str, Any] = torch.load(tmp_path / f"{case}-rank{rank}.pt", weights_only=False)
    return out


def _local(tmp_path: Path, case: str, name: str, world: int) -> set[tuple[int, ...]]:
    """The shapes of `name`'s slices over the processes that hold it."""
    return {_result(tmp_path, case, r)["local"][name] for r in range(world) if name in _result(tmp_path, case, r)["local"]}


def _checked(tmp_path: Path, cases: list[dict[str, Any]], world: int) -> None:
    """`check_case` for each case, and the user's model untouched by `build` and training on every process."""
    for case in cases:
        check_case(case, world, tmp_path)
        for rank in range(world):
            result = _result(tmp_path, case["name"], rank)
            assert result["untouched"], f"{case['name']}: rank {rank} changed the user's model"
            degree = case.get("tensor_parallel") or case.get("planned_tp", 1)
            assert f"tensor-parallel {degree}" in result["repr"], result["repr"]


_Q = "model.layers.0.self_attn.q_proj.weight"  # Llama's (32, 32) query projection: a column
_O = "model.layers.1.self_attn.o_proj.weight"  # its (32, 32) output projection: a row
_LLAMA_UNITS = [f"_layer_{i}" for i in range(5)]  # every layer of the tiny Llama holds parameters


def _loads_into_original(model: str, checkpoint: Path) -> None:
    """The checkpoint loads into a fresh copy of the zoo model (its weights negated first) as the model's own weights."""
    original = zoo_case(model).make_model()
    restored = zoo_case(model).make_model()
    with torch.no_grad():
        for p in restored.parameters():
            p.mul_(-1.0)
    pd.load_into_original(restored, checkpoint)
    for k, v in original.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k


def _planned(tmp_path: Path, model: str, config: str, devices: int = 4) -> str:
    """`plan_training` of the zoo model on `devices` CPU devices at a fixed configuration, saved as JSON."""
    from partitioner.options import TrainingOptions
    from partitioner.training import plan_training

    m, args, kwargs = zoo_case(model).build()
    plan = plan_training(m, [f"cpu:{i}" for i in range(devices)], args, kwargs, global_batch=8, measure=False,
                         options=TrainingOptions(config=config))
    return write_plan(tmp_path, f"{model}-{config.replace(',', '-').replace('=', '')}", plan)


@pytest.mark.distributed
def test_plans_with_tensor_parallelism_and_fsdp_train_as_one_process(tmp_path: Path) -> None:
    """One launch of 4 processes:

    - planned TP 2 x FSDP 2 (ZeRO-3, sequence parallel) and PP 2 x TP 2 Llama, saved and loaded, built
      with no layout or degree argument: the plan's fields and the layout `tp_detect` finds;
    - FSDP 4 Llama: one FSDP unit per layer (each holds parameters), parameters a quarter each;
    - TP 2 x FSDP 2 GPT-2 (hand layout: a Conv1D fused q/k/v), whose checkpoint then resumes
      GPT-2 under FSDP 4 and loads into the original model;
    - TP 2 x DP 2 on the MLP, whose symbolic fx trace calls its Linears as modules.
    """
    llama, gpt2, mlp = (write_plan(tmp_path, m, _data_parallel(m, 4)) for m in ("llama", "gpt2", "mlp"))
    checkpoint = tmp_path / "gpt2-tp2-fsdp2-checkpoint"
    cases = [
        _case("llama-planned-tp2-fsdp2", "llama", _planned(tmp_path, "llama", "tp=2,pp=1,dp=2,shard=zero3"),
              detect=True, planned_tp=2),
        _case("llama-planned-pp2-tp2", "llama", _planned(tmp_path, "llama", "tp=2,pp=2,dp=1"), detect=True, planned_tp=2),
        _case("llama-fsdp4", "llama", llama, sharding="zero3"),
        _case("gpt2-tp2-fsdp2", "gpt2", gpt2, tensor_parallel=2, sharding="zero3", checkpoint=str(checkpoint)),
        _case("gpt2-fsdp4-resumed", "gpt2", gpt2, sharding="zero3", resume=str(checkpoint)),
        _case("mlp-tp2-dp2", "mlp", mlp, tensor_parallel=2),
        # A fused (out, in) nn.Linear that FSDP2 also shards keeps the fused-output shard (exact).
        _case("nanogpt-tp2-fsdp2", "nanogpt", write_plan(tmp_path, "nanogpt", _data_parallel("nanogpt", 4)),
              tensor_parallel=2, sharding="zero3", detect=True),
    ]
    launch(4, cases, tmp_path)
    _checked(tmp_path, cases, 4)
    planned = [_result(tmp_path, "llama-planned-tp2-fsdp2", r) for r in range(4)]
    assert all("tensor-parallel 2 (sequence parallel) x data-parallel 2, sharding zero3" in r["repr"] for r in planned)
    assert [r["units"] for r in planned] == [[_LLAMA_UNITS]] * 4
    assert planned[0]["pinned"] == ["Replicate()", "Shard(dim=1)"]  # sequence parallel between pairs
    assert _local(tmp_path, "llama-planned-tp2-fsdp2", _Q, 4) == {(8, 32)}  # 16 rows per TP rank, halved by FSDP
    assert _local(tmp_path, "llama-planned-pp2-tp2", _Q, 4) == {(16, 32)}
    assert _local(tmp_path, "llama-planned-pp2-tp2", _O, 4) == {(32, 16)}
    assert [_result(tmp_path, "llama-planned-pp2-tp2", r)["stages"] for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert [_result(tmp_path, "llama-fsdp4", r)["units"] for r in range(4)] == [[_LLAMA_UNITS]] * 4
    assert _local(tmp_path, "llama-fsdp4", _Q, 4) == {(8, 32)}  # a quarter of the rows each
    # c_fc (Conv1D, stored (32, 128)): 64 output features per tensor-parallel rank, then half the rows each.
    assert _local(tmp_path, "gpt2-tp2-fsdp2", "transformer.h.0.mlp.c_fc.weight", 4) == {(16, 64)}
    assert _local(tmp_path, "mlp-tp2-dp2", "fc1.weight", 4) == {(256, 1024)}
    assert _local(tmp_path, "mlp-tp2-dp2", "fc2.weight", 4) == {(256, 256)}
    _loads_into_original("gpt2", checkpoint)


@pytest.mark.distributed
def test_an_odd_vocabulary_splits_unevenly_and_trains_as_one_process(tmp_path: Path) -> None:
    """One launch of 2 processes, vocabulary 101 (no degree divides it), layouts `tp_detect` finds:

    - planned TP 2 Llama (sequence parallel): its embedding and head split 51 / 50 rows;
    - TP 2 GPT-2 (its head reads the tied embedding), whose checkpoint then resumes GPT-2 as
      FSDP 2 and loads into the original model with its 101 rows (no padding row leaks out).
    """
    plain = write_plan(tmp_path, "gpt2-v101", _data_parallel("gpt2-v101", 2))
    checkpoint = tmp_path / "gpt2-v101-tp2-checkpoint"
    cases = [
        _case("llama-v101-planned-tp2", "llama-v101", _planned(tmp_path, "llama-v101", "tp=2,pp=1,dp=1", devices=2),
              detect=True, planned_tp=2, sequence_parallel=True),
        _case("gpt2-v101-tp2", "gpt2-v101", plain, tensor_parallel=2, detect=True, checkpoint=str(checkpoint)),
        _case("gpt2-v101-fsdp2-resumed", "gpt2-v101", plain, sharding="zero3", resume=str(checkpoint)),
    ]
    launch(2, cases, tmp_path)
    _checked(tmp_path, cases, 2)
    uneven = {(51, 32), (50, 32)}  # torch.chunk's cut of 101 rows: ceil(101 / 2) on rank 0, the rest on rank 1
    assert _local(tmp_path, "llama-v101-planned-tp2", "model.embed_tokens.weight", 2) == uneven
    assert _local(tmp_path, "llama-v101-planned-tp2", "lm_head.weight", 2) == uneven
    assert _local(tmp_path, "gpt2-v101-tp2", "transformer.wte.weight", 2) == uneven
    assert _local(tmp_path, "gpt2-v101-fsdp2-resumed", "transformer.wte.weight", 2) == uneven  # FSDP2 cuts dim 0 alike
    _loads_into_original("gpt2-v101", checkpoint)


@pytest.mark.distributed
def test_each_sharding_runs_the_collectives_it_is_priced_with(tmp_path: Path) -> None:
    """FSDP 2 over the tiny Llama's 5 layer units, 4 microbatches per step: the all-gathers
    and reduce-scatters per unit and step are those partitioner.pipeline_plan.terms prices
    (zero1: one each; zero2: one gather, a reduce-scatter per microbatch; zero3-keep: both
    per microbatch; zero3: two gathers per microbatch), and each trains as one process."""
    llama = write_plan(tmp_path, "llama", _data_parallel("llama", 2))
    per_microbatch = {"zero1": (1 / 4, 1 / 4), "zero2": (1 / 4, 1), "zero3-keep": (1, 1), "zero3": (2, 1)}
    cases = [_case(f"llama-{s}-m4", "llama", llama, sharding=s, microbatches=4) for s in per_microbatch]
    launch(2, cases, tmp_path)
    for case in cases:
        check_case(case, 2, tmp_path)
        gathers, scatters = per_microbatch[case["sharding"]]
        for rank in range(2):
            for count in _result(tmp_path, case["name"], rank)["collectives"]:
                assert count.get("all_gather_single", 0) == 5 * 4 * gathers, (case["name"], count)
                assert count.get("reduce_scatter_single", 0) == 5 * 4 * scatters, (case["name"], count)


@pytest.mark.distributed
def test_a_fused_query_key_value_column_runs_attention_on_each_ranks_heads(tmp_path: Path) -> None:
    """GPT-2's ``c_attn`` (one Conv1D for q, k and v) and nanoGPT's (one nn.Linear, its
    layout found by `tp_detect`) at TP 2: each rank holds its heads of every part, so the
    split needs no gather (the only DTensor all-gather of a step is the head's logits), and
    training equals one process; nanoGPT with sequence parallelism too."""
    gpt2, nano = (write_plan(tmp_path, m, _data_parallel(m, 2)) for m in ("gpt2", "nanogpt"))
    cases = [
        _case("gpt2-tp2", "gpt2", gpt2, tensor_parallel=2, sequence_parallel=False, count_dtensor=True),
        _case("nanogpt-tp2", "nanogpt", nano, tensor_parallel=2, sequence_parallel=False, detect=True, count_dtensor=True),
    ]
    sequence = _case("nanogpt-tp2-sp", "nanogpt", nano, tensor_parallel=2, sequence_parallel=True, detect=True)
    launch(2, [*cases, sequence], tmp_path)
    for case in [*cases, sequence]:
        check_case(case, 2, tmp_path)
    # c_attn, a Conv1D stored (32, 96) and an nn.Linear (96, 32): 16 of each part's 32 output features per rank.
    assert _local(tmp_path, "gpt2-tp2", "transformer.h.0.attn.c_attn.weight", 2) == {(32, 48)}
    assert _local(tmp_path, "nanogpt-tp2", "h.0.c_attn.weight", 2) == {(48, 32)}
    for case in cases:
        for rank in range(2):
            for count in _result(tmp_path, case["name"], rank)["collectives"]:
                # Sharded on the fused output instead, q, k and v of both blocks were gathered too (7).
                assert count["dtensor.all_gather_into_tensor"] == 1, (case["name"], count)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_rest_of_the_grid_trains_as_one_process(tmp_path: Path) -> None:
    """TP 2 x FSDP 2 Llama (parameters kept from forward to backward), FSDP 4 GPT-2 under ZeRO-2 and
    under ZeRO-1, TP 2 x DP 2 GPT-2 (replicated, gradients all-reduced), PP 2 x TP 2 GPT-2 (its tied
    embedding and head split in both stages), TP 2 + SP x FSDP 2 Llama, TP 2 + SP x DP 2 GPT-2 (its rows
    flattened to tokens), TP 2 x FSDP 2 Llama recomputing; GPT-2 and Llama (sequence parallel) of 101 tokens as
    TP 2 x FSDP 2 (FSDP2 cuts the uneven 51 / 50 vocabulary slices again: 26 / 25 rows)."""
    llama, gpt2 = (write_plan(tmp_path, m, _data_parallel(m, 4)) for m in ("llama", "gpt2"))
    odd_gpt2, odd_llama = (write_plan(tmp_path, m, _data_parallel(m, 4)) for m in ("gpt2-v101", "llama-v101"))
    one_stage = hand_pipeline(base_plan("llama", 4), [(0, 4)], [(0, 1, 2, 3)], "gpipe", 1, 8, recompute=True)
    recomputed = write_plan(tmp_path, "llama-recompute", one_stage)
    cases = [
        _case("llama-tp2-fsdp2-keep", "llama", llama, tensor_parallel=2, sharding="zero3-keep"),
        _case("gpt2-fsdp4-zero2", "gpt2", gpt2, sharding="zero2"),
        _case("gpt2-fsdp4-zero1", "gpt2", gpt2, sharding="zero1"),
        _case("gpt2-tp2-dp2", "gpt2", gpt2, tensor_parallel=2),
        _case("gpt2-pp2-tp2", "gpt2", write_plan(tmp_path, "gpt2-pp", _pipeline("gpt2")), tensor_parallel=2),
        _case("llama-pp2-tp2", "llama", write_plan(tmp_path, "llama-pp", _pipeline("llama")), tensor_parallel=2),
        _case("llama-tp2-sp-dp2", "llama", llama, tensor_parallel=2, sequence_parallel=True),
        _case("llama-tp2-sp-fsdp2", "llama", llama, tensor_parallel=2, sequence_parallel=True, sharding="zero3"),
        _case("gpt2-tp2-sp-dp2", "gpt2", gpt2, tensor_parallel=2, sequence_parallel=True),
        _case("llama-tp2-fsdp2-recompute", "llama", recomputed, tensor_parallel=2, sharding="zero3"),
        _case("gpt2-v101-tp2-fsdp2", "gpt2-v101", odd_gpt2, tensor_parallel=2, sharding="zero3", detect=True),
        _case("llama-v101-tp2-sp-fsdp2", "llama-v101", odd_llama, tensor_parallel=2, sequence_parallel=True,
              sharding="zero3", detect=True),
    ]
    launch(4, cases, tmp_path)
    _checked(tmp_path, cases, 4)
    assert _local(tmp_path, "gpt2-v101-tp2-fsdp2", "transformer.wte.weight", 4) == {(26, 32), (25, 32)}
    assert _local(tmp_path, "llama-v101-tp2-sp-fsdp2", "lm_head.weight", 4) == {(26, 32), (25, 32)}


# --------------------------------------------------------------------------- bad input (one process)


def _launched_as(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)


@pytest.mark.parametrize(
    ("tensor_parallel", "message"),
    [
        (4, r"degree 4 does not divide attention 'model.layers.0.self_attn.o_proj' \(4 heads, 2 key/value heads.*"
            r"use a degree among \[1, 2\]"),
        (3, r"each pipeline rank has 4 replica\(s\) \(4 processes.*degree 3 does not divide.*dividing 4"),
    ],
)
def test_bad_tensor_parallel_degree_is_refused_before_anything_changes(
    monkeypatch: pytest.MonkeyPatch, tensor_parallel: int, message: str
) -> None:
    _launched_as(monkeypatch, 4)
    model, args, kwargs = ZOO["llama"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TensorParallelError, match=message):
        # No layout passed: the one tp_detect finds on the traced model is checked.
        pd.build(_data_parallel("llama", 4), model, args, kwargs, loss_fn=dist_worker.loss_fn("llama"),
                 tensor_parallel=tensor_parallel)
    assert not torch.distributed.is_initialized()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and type(v) is torch.Tensor, k


def test_tensor_parallel_layout_of_another_model_or_none_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _launched_as(monkeypatch, 2)
    model, args, kwargs = ZOO["llama"].build()
    plan = _data_parallel("llama", 2)
    with pytest.raises(TensorParallelError, match=r"names 'transformer.h.0.attn.c_attn', which is not a module"):
        pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("llama"), tensor_parallel=2,
                 tp_layout=dist_worker.tp_layout("gpt2"))
    with pytest.raises(TensorParallelError, match=r"sequence parallelism .* needs a degree > 1"):
        pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("llama"), sequence_parallel=True)
    # No layout passed, none in the plan, and tp_detect finds no column/row pair in this model.
    bare, bare_args, bare_kwargs = ZOO["twice"].build()
    with pytest.raises(TensorParallelError, match=r"degree 2 but no layout says which modules split \(none was passed"):
        pd.build(_data_parallel("twice", 2), bare, bare_args, bare_kwargs, loss_fn=torch.nn.functional.mse_loss,
                 tensor_parallel=2)
    assert not torch.distributed.is_initialized()


def test_parallel_spec_takes_the_arguments_then_the_plans_fields() -> None:
    """`build`'s keywords win; else a plan's pipeline carrying ``tensor_parallel`` & co. (the fields
    the plan will grow) is read; else nothing is split or sharded."""
    from types import SimpleNamespace

    from partitioner.distributed.spmd import parallel_spec
    from partitioner.options import Sharding

    layout = dist_worker.tp_layout("llama")
    fields = SimpleNamespace(tensor_parallel=2, sequence_parallel=True, sharding="zero3-keep", tp_layout=layout)
    planned = parallel_spec(SimpleNamespace(pipeline=fields), None, None, None, None)  # type: ignore[arg-type]
    assert (planned.tensor_parallel, planned.sequence_parallel, planned.sharding, planned.layout) == (
        2, True, Sharding.ZERO3_KEEP, layout)
    overridden = parallel_spec(SimpleNamespace(pipeline=fields), 1, False, "none", None)  # type: ignore[arg-type]
    assert (overridden.tensor_parallel, overridden.sequence_parallel, overridden.sharding) == (1, False, Sharding.NONE)
    assert not overridden.active and planned.active
    bare = parallel_spec(_data_parallel("llama", 2), None, None, None, None)
    assert not bare.active and bare.layout is None


def test_vocabulary_of_another_size_is_refused_an_odd_one_is_not() -> None:
    from partitioner.distributed.spmd import ParallelSpec, check_parallel
    from partitioner.tp_layout import VocabShard

    model = ZOO["llama"].make_model()
    model.lm_head = torch.nn.Linear(32, 127, bias=False)  # an odd vocabulary: split 64 / 63
    layout = dataclasses.replace(dist_worker.tp_layout("llama"), vocab=(VocabShard(module="lm_head", kind="head", vocab=127),))
    launch = pd.plan_layout(_data_parallel("llama", 2))
    check_parallel(ParallelSpec(tensor_parallel=2, layout=layout), launch, model)
    with pytest.raises(TensorParallelError, match=r"'lm_head' holds 128 rows but the layout says a vocabulary of 127"):
        check_parallel(ParallelSpec(tensor_parallel=2, layout=layout), launch, ZOO["llama"].make_model())


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_stage_cut_into_layers_computes_what_the_stage_computes(model: str) -> None:
    """`cut_layers`: one submodule per layer, each owning the parameters only it reads (GPT-2's tied
    embedding and head, read by two layers of one stage, stay at the root); outputs and gradients equal."""
    from partitioner.analysis import trace_layers
    from partitioner.distributed.names import named_tensors
    from partitioner.distributed.stages import build_stages, flat_batch
    from partitioner.distributed.units import cut_layers

    m, args, kwargs = ZOO[model].build()
    layered, _ = trace_layers(m, args, kwargs, training=True)
    layers = len(layered.graph.layers)
    for stage_of_layer in ([0] * layers, [0] * (layers // 2) + [1] * (layers - layers // 2)):
        graphs = build_stages(layered, stage_of_layer, args, kwargs, args[0].shape[0], torch.device("cpu"))
        flat = flat_batch(layered, args, kwargs)
        inputs: tuple[torch.Tensor, ...] = tuple(flat[i] for i in graphs.inputs)
        for k, stage in enumerate(graphs.modules):
            cut = cut_layers(stage, layered.node_layer)
            calls = [n for n in stage.graph.nodes if n.op.startswith("call_") and n.name in layered.node_layer]
            held = sorted({layered.node_layer[n.name] for n in calls})
            assert cut.units == tuple(f"_layer_{i}" for i in held)
            assert sorted(cut.names.values()) == sorted(name for name, _ in named_tensors(stage))
            tensors = dict(named_tensors(stage))
            assert all(t is tensors[cut.names[name]] for name, t in named_tensors(cut.module))  # shared, not copied
            floats = tuple(x.detach().float().requires_grad_() if x.is_floating_point() else x for x in inputs)
            expected, got = stage(*floats), cut.module(*floats)
            torch.testing.assert_close(got, expected)
            loss = sum(o.float().sum() for o in expected)
            want = torch.autograd.grad(loss, list(stage.parameters()), allow_unused=True)
            have = torch.autograd.grad(sum(o.float().sum() for o in got), list(stage.parameters()), allow_unused=True)
            for a, b in zip(have, want):
                torch.testing.assert_close(a, b)
            if model == "gpt2" and k == 0 and len(graphs.modules) == 1:
                assert [name for name, _ in cut.module.named_parameters() if not name.startswith("_layer_")] == [
                    "lm_head.weight"]  # tied with transformer.wte.weight, read by the first and last layer
            inputs = tuple(o.detach() for o in expected)


def test_cut_keeps_a_weight_two_layers_read_or_the_stage_returns_at_the_root() -> None:
    """A hand-made stage: layer 0 reads ``w`` and ``a``, layer 1 reads ``w`` and ``b``, and the stage
    returns ``b`` itself: ``w`` and ``b`` stay at the root, ``a`` goes to layer 0; the values are equal."""
    import torch.fx as fx

    from partitioner.distributed.units import cut_layers

    root = torch.nn.Module()
    for name in ("w", "a", "b"):
        root.register_parameter(name, torch.nn.Parameter(torch.randn(3, 3)))
    graph = fx.Graph()
    x = graph.placeholder("x")
    w, a, b = (graph.get_attr(name) for name in ("w", "a", "b"))
    h = graph.call_function(torch.mm, (graph.call_function(torch.mm, (x, w)), a))
    y = graph.call_function(torch.mm, (graph.call_function(torch.mm, (h, w)), b))
    graph.output((y, b))
    stage = fx.GraphModule(root, graph)
    layer_of = {n.name: 0 if n.name in ("mm", "mm_1") else 1 for n in graph.nodes if n.op == "call_function"}
    cut = cut_layers(stage, layer_of)
    assert cut.units == ("_layer_0", "_layer_1")
    assert sorted(cut.names) == ["_layer_0.a", "b", "w"]
    assert cut.names["_layer_0.a"] == "a" and cut.module.get_parameter("_layer_0.a") is root.a
    x0 = torch.randn(2, 3)
    torch.testing.assert_close(cut.module(x0), stage(x0))
