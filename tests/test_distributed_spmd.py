"""Tensor parallelism, sequence parallelism and FSDP2 lowered onto gloo processes: training equals one process.

Every launch (marked ``distributed``) runs the tiny GPT-2 and Llama of tests/models.py
for two Adam steps under a plan and compares each rank's losses and its whole state dict
(split and sharded tensors gathered) with single-process training. The tensor-parallel
layouts are written by hand (`tests.dist_worker.tp_layout`). The bad-input checks run in
this process: they fail before any process group or model copy is made.
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


def _case(name: str, model: str, plan: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "plan": plan, "global_batch": 8, "optimizer": "adam", **extra}


@pytest.mark.distributed
def test_four_processes_fsdp_and_tensor_parallel_train_as_one_process(tmp_path: Path) -> None:
    """FSDP 4 (ZeRO-3) on Llama, TP 2 x FSDP 2 on GPT-2 and Llama, PP 2 x TP 2 on Llama."""
    files = {
        "llama-dp": write_plan(tmp_path, "llama-dp", _data_parallel("llama", 4)),
        "gpt2-dp": write_plan(tmp_path, "gpt2-dp", _data_parallel("gpt2", 4)),
        "llama-pp": write_plan(
            tmp_path, "llama-pp", hand_pipeline(base_plan("llama", 4), [(0, 1), (2, 4)], [(0, 1), (2, 3)], "1f1b", 2, 8)
        ),
    }
    cases = [
        _case("llama-fsdp4", "llama", files["llama-dp"], sharding="zero3"),
        _case("gpt2-tp2-fsdp2", "gpt2", files["gpt2-dp"], tensor_parallel=2, sharding="zero3"),
        _case("llama-tp2-fsdp2", "llama", files["llama-dp"], tensor_parallel=2, sharding="zero3-keep"),
        _case("llama-pp2-tp2", "llama", files["llama-pp"], tensor_parallel=2),
    ]
    launch(4, cases, tmp_path)
    for case in cases:
        check_case(case, 4, tmp_path)


@pytest.mark.distributed
def test_two_processes_tensor_and_sequence_parallel_train_as_one_process(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, "llama-dp", _data_parallel("llama", 2))
    cases = [_case("llama-tp2-sp", "llama", plan, tensor_parallel=2, sequence_parallel=True)]
    launch(2, cases, tmp_path)
    for case in cases:
        check_case(case, 2, tmp_path)
