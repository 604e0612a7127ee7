"""Train a model with a partitioner plan on torch.distributed (pipeline stages x data parallel).

Plan once, then launch one process per device the plan uses::

    python examples/train_pipeline.py --save-plan plan.json            # plans for 2 devices
    torchrun --nproc-per-node 2 examples/train_pipeline.py --plan plan.json

Across machines, the same command on each, with torchrun's rendezvous flags::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_pipeline.py --plan plan.json

``--checkpoint DIR`` saves the trained model (torch.distributed.checkpoint), and
``--resume DIR`` starts from such a checkpoint, saved under this plan or any other.

Without ``--plan`` every process plans for itself (layer timing off, so they all find the
same plan) and process 0 prints it. The model is the seed MLP (1024-512-256-128-10), or
``--model gpt2-tiny``: a 4-layer GPT-2 from ``transformers`` trained on random tokens. On
GPUs the plan is made for ``cuda:0..`` and each process uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import partitioner
import partitioner.distributed as pd
from partitioner.models import build_model
from partitioner.training import plan_training


def make_model(name: str, batch: int) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], Any]:
    """(model, example inputs, example keyword inputs, loss function)."""
    if name == "mlp":
        built = build_model("mlp", device="cpu", batch_size=batch)
        return built.model.train(), built.example_args, built.example_kwargs, F.cross_entropy
    import transformers

    config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()

    def next_token(output: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = output.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    ids = torch.randint(0, 512, (batch, 32))
    return model, (ids,), {"use_cache": False}, next_token


def data(name: str, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (inputs, target) on every process: a seeded synthetic batch with something to learn."""
    if name == "mlp":
        g = torch.Generator().manual_seed(step % 4)  # four batches, seen again and again
        return torch.randn(batch, 1024, generator=g), torch.randint(0, 10, (batch,), generator=g)
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 512, (batch, 1), generator=g)
    stride = torch.randint(1, 8, (batch, 1), generator=g)
    ids = (start + stride * torch.arange(32)) % 512  # arithmetic sequences: the next token follows from two
    return ids, ids


def make_plan(args: argparse.Namespace, model: nn.Module, example: tuple[Any, ...], kwargs: dict[str, Any]) -> partitioner.Plan:
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    devices = [f"{kind}:{i}" for i in range(args.devices)]
    return plan_training(model, devices, example, kwargs, global_batch=args.global_batch, measure=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt2-tiny"], default="mlp")
    parser.add_argument("--plan", type=Path, help="a plan saved with --save-plan (Plan.to_json)")
    parser.add_argument("--save-plan", type=Path, help="plan, write the JSON here and exit")
    parser.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", "2")))
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint", type=Path, help="save the trained stages here (original names)")
    parser.add_argument("--resume", type=Path, help="start from this checkpoint (saved under any plan of the model)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # processes share the machine's cores

    model, example, kwargs, loss_fn = make_model(args.model, args.global_batch)
    if args.save_plan:
        plan = make_plan(args, model, example, kwargs)
        args.save_plan.write_text(plan.to_json())
        print(plan)
        return
    plan = partitioner.Plan.from_json(args.plan.read_text()) if args.plan else make_plan(args, model, example, kwargs)

    part = pd.build(plan, model, example, kwargs, loss_fn=loss_fn)
    if args.resume:
        pd.load_into_part(part, args.resume)  # each process reads what its stages hold
    if part.rank == 0:
        print(f"{part.layout.describe()}\n{part!r}", flush=True)
    optimizer = torch.optim.AdamW(part.parameters(), lr=args.lr)  # this process's parameters only
    start = time.perf_counter()
    for step in range(args.steps):
        inputs, target = data(args.model, args.global_batch, step)
        loss = part.step(inputs, target, **kwargs)
        optimizer.step()
        optimizer.zero_grad()
        if loss is not None and part.replica == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    if args.checkpoint:
        pd.save_checkpoint(part, args.checkpoint)
        if part.rank == 0:
            restored = pd.load_into_original(make_model(args.model, args.global_batch)[0], args.checkpoint)
            print(f"checkpoint in {args.checkpoint}: {len(restored.state_dict())} tensors load into the original model")
    part.close()


if __name__ == "__main__":
    main()
