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
from tests.models import ZOO


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
            assert f"tensor-parallel {case.get('tensor_parallel', 1)}" in result["repr"], result["repr"]


_Q = "model.layers.0.self_attn.q_proj.weight"  # Llama's (32, 32) query projection: a column
_O = "model.layers.1.self_attn.o_proj.weight"  # its (32, 32) output projection: a row


@pytest.mark.distributed
def test_fsdp_and_tensor_parallel_train_as_one_process_and_checkpoint_across_plans(tmp_path: Path) -> None:
    """FSDP 4 (ZeRO-3) on Llama; TP 2 x FSDP 2 on GPT-2, whose checkpoint then resumes GPT-2 under FSDP 4
    and loads into the original model."""
    llama, gpt2 = (write_plan(tmp_path, m, _data_parallel(m, 4)) for m in ("llama", "gpt2"))
    checkpoint = tmp_path / "gpt2-tp2-fsdp2-checkpoint"
    cases = [
        _case("llama-fsdp4", "llama", llama, sharding="zero3"),
        _case("gpt2-tp2-fsdp2", "gpt2", gpt2, tensor_parallel=2, sharding="zero3", checkpoint=str(checkpoint)),
        _case("gpt2-fsdp4-resumed", "gpt2", gpt2, sharding="zero3", resume=str(checkpoint)),
    ]
    launch(4, cases, tmp_path)
    _checked(tmp_path, cases, 4)
    assert _local(tmp_path, "llama-fsdp4", _Q, 4) == {(8, 32)}  # a quarter of the rows each
    # c_fc (Conv1D, stored (32, 128)): 64 output features per tensor-parallel rank, then half the rows each.
    assert _local(tmp_path, "gpt2-tp2-fsdp2", "transformer.h.0.mlp.c_fc.weight", 4) == {(16, 64)}
    original = ZOO["gpt2"].make_model()
    restored = ZOO["gpt2"].make_model()
    with torch.no_grad():
        for p in restored.parameters():
            p.mul_(-1.0)
    pd.load_into_original(restored, checkpoint)
    for k, v in original.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k


@pytest.mark.distributed
def test_pipeline_of_tensor_parallel_stages_trains_as_one_process(tmp_path: Path) -> None:
    """PP 2 x TP 2 on Llama: each stage split over a pair of processes, whole activations between stages."""
    cases = [_case("llama-pp2-tp2", "llama", write_plan(tmp_path, "llama-pp", _pipeline("llama")), tensor_parallel=2)]
    launch(4, cases, tmp_path)
    _checked(tmp_path, cases, 4)
    assert _local(tmp_path, "llama-pp2-tp2", _Q, 4) == {(16, 32)}
    assert _local(tmp_path, "llama-pp2-tp2", _O, 4) == {(32, 16)}
    stages = [_result(tmp_path, "llama-pp2-tp2", r)["stages"] for r in range(4)]
    assert stages == [(0,), (0,), (1,), (1,)]


@pytest.mark.distributed
def test_tensor_and_sequence_parallel_and_fx_traces_train_as_one_process(tmp_path: Path) -> None:
    """TP 2 with sequence parallelism on Llama: row outputs reduce-scattered over the sequence; TP 2 on
    the MLP, whose symbolic fx trace calls its Linears as modules."""
    plan = write_plan(tmp_path, "llama-dp", _data_parallel("llama", 2))
    case = _case("llama-tp2-sp", "llama", plan, tensor_parallel=2, sequence_parallel=True)
    mlp = _case("mlp-tp2", "mlp", write_plan(tmp_path, "mlp-dp", _data_parallel("mlp", 2)), tensor_parallel=2)
    launch(2, [case, mlp], tmp_path)
    _checked(tmp_path, [case, mlp], 2)
    assert _local(tmp_path, "mlp-tp2", "fc1.weight", 2) == {(256, 1024)}
    assert _local(tmp_path, "mlp-tp2", "fc2.weight", 2) == {(256, 256)}
    assert _local(tmp_path, "llama-tp2-sp", _Q, 2) == {(16, 32)}
    assert _result(tmp_path, "llama-tp2-sp", 0)["pinned"] == ["Replicate()", "Shard(dim=1)"]


@pytest.mark.slow
@pytest.mark.distributed
def test_the_rest_of_the_grid_trains_as_one_process(tmp_path: Path) -> None:
    """TP 2 x FSDP 2 Llama (parameters kept from forward to backward), FSDP 4 GPT-2 (ZeRO-2 and ZeRO-1
    lower to the same), TP 2 x DP 2 GPT-2 (replicated, gradients all-reduced), PP 2 x TP 2 GPT-2 (its tied
    embedding and head split in both stages), TP 2 + SP x FSDP 2 Llama, TP 2 + SP x DP 2 GPT-2 (its rows
    flattened to tokens), TP 2 x FSDP 2 Llama recomputing."""
    llama, gpt2 = (write_plan(tmp_path, m, _data_parallel(m, 4)) for m in ("llama", "gpt2"))
    one_stage = hand_pipeline(base_plan("llama", 4), [(0, 4)], [(0, 1, 2, 3)], "gpipe", 1, 8, recompute=True)
    recomputed = write_plan(tmp_path, "llama-recompute", one_stage)
    cases = [
        _case("llama-tp2-fsdp2-keep", "llama", llama, tensor_parallel=2, sharding="zero3-keep"),
        _case("gpt2-fsdp4-zero2", "gpt2", gpt2, sharding="zero2"),
        _case("gpt2-fsdp4-zero1", "gpt2", gpt2, sharding="zero1"),
        _case("gpt2-tp2-dp2", "gpt2", gpt2, tensor_parallel=2),
        _case("gpt2-pp2-tp2", "gpt2", write_plan(tmp_path, "gpt2-pp", _pipeline("gpt2")), tensor_parallel=2),
        _case("llama-tp2-sp-fsdp2", "llama", llama, tensor_parallel=2, sequence_parallel=True, sharding="zero3"),
        _case("gpt2-tp2-sp-dp2", "gpt2", gpt2, tensor_parallel=2, sequence_parallel=True),
        _case("llama-tp2-fsdp2-recompute", "llama", recomputed, tensor_parallel=2, sharding="zero3"),
    ]
    launch(4, cases, tmp_path)
    _checked(tmp_path, cases, 4)


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
        pd.build(_data_parallel("llama", 4), model, args, kwargs, loss_fn=dist_worker.loss_fn("llama"),
                 tensor_parallel=tensor_parallel, tp_layout=dist_worker.tp_layout("llama"))
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
    with pytest.raises(TensorParallelError, match=r"degree 2 but no layout says which modules split"):
        pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("llama"), tensor_parallel=2)
    with pytest.raises(TensorParallelError, match=r"sequence parallelism .* needs a degree > 1"):
        pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("llama"), sequence_parallel=True)
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


def test_vocabulary_the_degree_does_not_split_is_refused() -> None:
    from partitioner.distributed.spmd import ParallelSpec, check_parallel
    from partitioner.tp_layout import VocabShard

    model = ZOO["llama"].make_model()
    model.lm_head = torch.nn.Linear(32, 127, bias=False)  # an odd vocabulary
    layout = dataclasses.replace(dist_worker.tp_layout("llama"), vocab=(VocabShard(module="lm_head", kind="head", vocab=127),))
    launch = pd.plan_layout(_data_parallel("llama", 2))
    with pytest.raises(TensorParallelError, match=r"degree 2 does not divide the vocabulary of head 'lm_head' \(127\).*pad"):
        check_parallel(ParallelSpec(tensor_parallel=2, layout=layout), launch, model)
    with pytest.raises(TensorParallelError, match=r"'lm_head' holds 128 rows but the layout says a vocabulary of 127"):
        check_parallel(ParallelSpec(tensor_parallel=2, layout=layout), launch, ZOO["llama"].make_model())
