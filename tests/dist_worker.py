"""One process of a distributed test: run each case's training step, save what the test compares.

Launched by tests/test_distributed.py as torchrun would launch a training script (the
environment holds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), with
``python tests/dist_worker.py SPEC.json``. Every case of the spec runs in the same
processes, one after the other: build the plan's part, optionally resume from a
checkpoint (after shifting the part's weights, so that a load that does nothing shows) or
try one that must be refused, save a checkpoint or load a shifted state dict, `STEPS` SGD steps on one batch, and
``torch.save`` of this rank's losses and state dict to ``<out>/<case>-rank<r>.pt``.

The data and losses live here so that the test computes its single-process reference
from the same definitions.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
LR = 0.1
ADAM_LR = 1e-3
ADAM_EPS = 1e-4
"""Adam's first step moves each weight by about ``lr * g / (|g| + eps)``: with torch's ``eps=1e-8`` a
gradient near 1e-8 (a rounding difference of a split sum) moves its weight by a fraction of
``lr``, far beyond float32 tolerance. ``eps=1e-4`` bounds that to ``lr / eps`` times the gradient's
rounding difference, so the comparison stays at float32 tolerance."""
STEPS = 2
"""Steps per case: DDP rebuilds its buckets at the second, and gradients must not leak between steps."""


def batch(model: str, samples: int) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """(positional inputs, keyword inputs, target) of one step of `samples` samples."""
    g = torch.Generator().manual_seed(11)
    if model == "mlp":
        return (torch.randn(samples, 1024, generator=g),), {}, torch.randint(0, 10, (samples,), generator=g)
    if model == "tied_read":
        ids = torch.randint(0, 64, (samples, 6), generator=g)
        return (ids,), {}, ids
    from tests.models import NANOGPT, ODD_VOCAB, ODD_VOCAB_CASES

    ids = torch.randint(0, ODD_VOCAB if model in ODD_VOCAB_CASES else 128, (samples, 8), generator=g)
    return (ids,), {} if model == NANOGPT.name else {"use_cache": False}, ids


def loss_fn(model: str) -> Any:
    """The case's loss: cross entropy of the classes (mlp), of the tokens (tied_read) or of
    the next token (gpt2), averaged."""
    if model == "mlp":
        return F.cross_entropy
    if model == "tied_read":
        return lambda output, ids: F.cross_entropy(output.reshape(-1, output.shape[-1]), ids.reshape(-1))

    def next_token(output: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = (output if isinstance(output, torch.Tensor) else output.logits)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return next_token


def tp_layout(model: str) -> Any:
    """The tensor-parallel layout of a zoo model, written by hand (Megatron's pairs per block)."""
    from partitioner.tp_layout import Column, Pair, TensorParallelLayout, VocabShard

    if model == "llama":  # hidden 32, 4 heads / 2 key-value heads of 8, MLP 64, vocabulary 128
        pairs = []
        for i in range(2):
            block = f"model.layers.{i}"
            pairs.append(Pair(columns=(Column(module=f"{block}.self_attn.q_proj", out_features=32),
                                       Column(module=f"{block}.self_attn.k_proj", out_features=16),
                                       Column(module=f"{block}.self_attn.v_proj", out_features=16)),
                              row=f"{block}.self_attn.o_proj", kind="attention", heads=4, kv_heads=2, width=32))
            pairs.append(Pair(columns=(Column(module=f"{block}.mlp.gate_proj", out_features=64),
                                       Column(module=f"{block}.mlp.up_proj", out_features=64)),
                              row=f"{block}.mlp.down_proj", kind="mlp", width=64))
        vocab = (VocabShard(module="model.embed_tokens", kind="embedding", vocab=128),
                 VocabShard(module="lm_head", kind="head", vocab=128))
        norms = tuple(f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm"))
        return TensorParallelLayout(pairs=tuple(pairs), vocab=vocab, sequence=norms + ("model.norm",))
    if model == "gpt2":  # hidden 32, 2 heads, MLP 128, HF Conv1D weights stored (in, out), fused q/k/v
        pairs = []
        for i in range(2):
            block = f"transformer.h.{i}"
            pairs.append(Pair(columns=(Column(module=f"{block}.attn.c_attn", out_features=96, parts=3, transposed=True),),
                              row=f"{block}.attn.c_proj", kind="attention", heads=2, kv_heads=2, width=32))
            pairs.append(Pair(columns=(Column(module=f"{block}.mlp.c_fc", out_features=128, transposed=True),),
                              row=f"{block}.mlp.c_proj", kind="mlp", width=128))
        vocab = (VocabShard(module="transformer.wte", kind="embedding", vocab=128),
                 VocabShard(module="lm_head", kind="head", vocab=128))
        return TensorParallelLayout(pairs=tuple(pairs), vocab=vocab)
    if model == "mlp":  # a symbolic fx trace: the Linears stay call_module leaves
        return TensorParallelLayout(pairs=(
            Pair(columns=(Column(module="fc1", out_features=512),), row="fc2", kind="mlp", width=512),
            Pair(columns=(Column(module="fc3", out_features=128),), row="fc4", kind="mlp", width=128),
        ))
    raise KeyError(model)


def optimizer(name: str, parameters: Any) -> torch.optim.Optimizer:
    """SGD at `LR`, or Adam at `ADAM_LR`."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=ADAM_LR, eps=ADAM_EPS)
    return torch.optim.SGD(parameters, lr=LR)


def local_shapes(part: Any) -> dict[str, tuple[int, ...]]:
    """The shape of this process's slice of each parameter (the whole shape when it holds it whole)."""
    from torch.distributed.tensor import DTensor

    return {
        name: tuple((p.to_local() if isinstance(p, DTensor) else p).shape) for name, p in part.named_parameters()
    }


def fsdp_units(part: Any) -> list[list[str]]:
    """Per stage of this process, the names of its submodules that are FSDP units (the stage root aside)."""
    from torch.distributed.fsdp import FSDPModule

    return [[name for name, m in stage.named_children() if isinstance(m, FSDPModule)] for stage in part.modules]


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict other than the model's own: floating tensors shifted by 0.01."""
    return {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in state.items()}


@contextmanager
def counted_collectives(dtensor: bool = False) -> Iterator[Counter[str]]:
    """Count the calls of the collectives FSDP2 and DDP issue (``torch.distributed``'s
    ``all_gather_single``, ``reduce_scatter_single``, ``all_reduce``) while inside, and
    with `dtensor` DTensor's (``dtensor.all_gather_into_tensor``, ...: `CommDebugMode`'s counts)."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    count: Counter[str] = Counter()
    names = [n for n in ("all_gather_single", "reduce_scatter_single", "all_reduce") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            count[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for n in names:
        setattr(dist, n, counting(n))
    try:
        with CommDebugMode() if dtensor else nullcontext() as mode:  # DTensor's redistributions
            yield count
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    for op, calls in (mode.get_comm_counts() if mode is not None else {}).items():
        count[f"dtensor.{getattr(op, '__name__', str(op)).split('.')[0]}"] += calls


def run(spec: dict[str, Any]) -> None:
    import partitioner.distributed as pd
    from partitioner.errors import PlanMismatchError
    from partitioner.plan import Plan
    from tests.models import zoo_case

    out = Path(spec["out"])
    parts = []
    for case in spec["cases"]:
        model_name = case["model"]
        model, args, kwargs = zoo_case(model_name).build()
        plan = Plan.from_json(Path(case["plan"]).read_text())
        part = pd.build(
            plan,
            model,
            args,
            kwargs,
            loss_fn=loss_fn(model_name),
            schedule=case.get("schedule"),
            microbatches=case.get("microbatches"),
            global_batch=case.get("global_batch"),
            tensor_parallel=case.get("tensor_parallel"),
            sequence_parallel=case.get("sequence_parallel"),
            sharding=case.get("sharding"),
            tp_layout=tp_layout(model_name) if case.get("tensor_parallel", 1) > 1 and not case.get("detect") else None,
        )
        if case.get("resume"):
            pd.load_from_original(part, perturbed(model.state_dict()))
            pd.load_into_part(part, case["resume"])
        refused = None
        if case.get("refused"):  # a checkpoint that some process cannot load: none may load it
            try:
                pd.load_into_part(part, case["refused"])
            except PlanMismatchError as e:
                refused = str(e)
        if case.get("checkpoint"):
            pd.save_checkpoint(part, case["checkpoint"])
        if case.get("load_perturbed"):
            pd.load_from_original(part, perturbed(model.state_dict()))
        step = optimizer(case.get("optimizer", "sgd"), part.parameters())
        inputs, keywords, target = batch(model_name, part.layout.global_batch)
        losses = []
        counts: list[dict[str, int]] = []
        for _ in range(STEPS):
            with counted_collectives(bool(case.get("count_dtensor"))) as count:
                losses.append(part.step(inputs if len(inputs) > 1 else inputs[0], target, **keywords))
            counts.append(dict(count))
            step.step()
            step.zero_grad()
        torch.save(
            {"losses": losses, "state": part.full_state_dict(), "local": local_shapes(part),
             "untouched": all(torch.equal(v, fresh) for v, fresh in zip(model.state_dict().values(),
                                                                         zoo_case(model_name).make_model().state_dict().values())),
             "units": fsdp_units(part), "pinned": sorted({repr(m.placement) for stage in part.modules for m in stage.modules() if hasattr(m, "placement")}), "stages": part.stage_indices, "repr": repr(part),
             "refused": refused, "collectives": counts},
            out / f"{case['name']}-rank{part.rank}.pt",
        )
        parts.append(part)
    for part in parts:
        part.close()  # ends the process group on the part that started it


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    run(json.loads(Path(sys.argv[1]).read_text()))
