"""A distributed training step on this machine against the simulator's prediction for the same plan.

    python -m benchmarks.distributed_step                    # the suite below (5-10 minutes on 2 cores)
    python -m benchmarks.distributed_step --json out.json --only gpt2 --rounds 9

For each case of `SUITE`, `partitioner.training.plan_training` plans the model on two CPU
devices with its layers timed here (one thread, ``measure=True``): the plan's simulated
step (`PipelinePlan.step_time_s`) is the prediction from CPU profiles. The plan is saved
as JSON and run by ``torchrun --nproc-per-node 2`` on this file in worker mode: each
process builds its part (`partitioner.distributed.build`), warms up, and times rounds of
steps (``part.step`` then ``zero_grad``) between barriers; the measured step is the median
round over its steps (the slower process's). The figure of merit is measured / predicted.

On a small shared machine more than the prediction moves that ratio, so each run also
measures, at the same moment as its steps:

- ``sharing``: the two processes share the machine's cores. A one-thread matmul loop runs
  in process 0 alone, then in both at once; ``sharing`` is how much slower it runs together
  (1 with a core each, 2 when the two take turns on one core). The simulator gives every
  device its own core, so ``measured / (predicted x sharing)`` is the ratio left to the
  prediction and to the lowering's overhead (`torch.distributed.pipelining`'s
  per-microbatch bookkeeping, gloo, DDP hooks);
- ``link``: gloo's mean one-way time for a 256 KiB message (back-to-back ping-pong over
  the loopback), where the planner prices two CPU devices of one machine as a memory copy.

``one process`` is the plain model's forward and backward on the whole batch in one
process with one thread, for scale. Pipeline cases cap each device's memory below a
replica's peak (90% of it, then less until a pipeline fits), so that the planner must
split the model instead of replicating it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("cpu:0", "cpu:1")
SEQUENCE = 32
"""Tokens per sample of gpt2-tiny."""


@dataclass(frozen=True, slots=True)
class Case:
    """One plan to run: a model, a batch and what the planner may choose."""

    name: str
    model: str
    """``mlp`` (the seed MLP) or ``gpt2-tiny`` (transformers GPT-2: 4 blocks of width 256)."""
    global_batch: int
    schedules: tuple[str, ...] = ("gpipe", "1f1b")
    microbatches: int | None = None
    """Fixed microbatch count, or None for the planner's choice."""
    pipeline: bool = False
    """Cap each device's memory so that a whole replica does not fit (a pipeline must be planned)."""


SUITE: tuple[Case, ...] = (
    Case("mlp, planner's choice", "mlp", 256),
    Case("mlp, 2 stages, gpipe x4", "mlp", 256, ("gpipe",), 4, pipeline=True),
    Case("mlp, 2 stages, 1f1b x4", "mlp", 256, ("1f1b",), 4, pipeline=True),
    Case("gpt2-tiny, planner's choice", "gpt2-tiny", 16),
    Case("gpt2-tiny, 2 stages, gpipe x4", "gpt2-tiny", 16, ("gpipe",), 4, pipeline=True),
    Case("gpt2-tiny, 2 stages, 1f1b x8", "gpt2-tiny", 16, ("1f1b",), 8, pipeline=True),
)


# --------------------------------------------------------------------------- models and data


def make_model(name: str) -> nn.Module:
    """A fresh model from a fixed seed (the same in every process)."""
    if name == "mlp":
        from partitioner.models import build_model

        return build_model("mlp", device="cpu").model.train()
    import transformers

    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=SEQUENCE,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).train()


def make_batch(name: str, samples: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """(input, keyword inputs, target) of `samples` samples."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        return torch.randn(samples, 1024, generator=g), {}, torch.randint(0, 10, (samples,), generator=g)
    ids = torch.randint(0, 512, (samples, SEQUENCE), generator=g)
    return ids, {"use_cache": False}, ids


def loss_fn(name: str) -> Any:
    if name == "mlp":
        return F.cross_entropy

    def next_token(output: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = output.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return next_token


# --------------------------------------------------------------------------- planning (parent)


def plan_case(case: Case) -> Any:
    """The plan of `case`, from layers timed on this CPU."""
    from partitioner.errors import InfeasibleError
    from partitioner.options import Optimizer, Recompute, TrainingOptions
    from partitioner.simulate import PipelineSchedule
    from partitioner.training import plan_training

    model = make_model(case.model)
    x, kwargs, _ = make_batch(case.model, case.global_batch)
    m = case.microbatches
    options = TrainingOptions(
        optimizer=Optimizer.SGD,
        schedules=tuple(PipelineSchedule(s) for s in case.schedules),
        min_microbatches=m or 1,
        max_microbatches=m or 128,
        recompute=Recompute.NEVER if case.pipeline else Recompute.AUTO,  # a replica may not recompute to fit
        memory_reserve=0.0,
    )

    def plan(max_memory: dict[str, int] | None = None) -> Any:
        return plan_training(model, list(DEVICES), (x,), kwargs, global_batch=case.global_batch, options=options,
                             max_memory=max_memory)

    chosen = plan()
    replica = chosen.pipeline.stages[0].peak_memory_bytes
    for share in (0.9, 0.8, 0.7, 0.6, 0.5):  # the most memory that no longer holds a replica
        if not case.pipeline or len(chosen.pipeline.stages) > 1:
            break
        try:
            chosen = plan({d: int(share * replica) for d in DEVICES})
        except InfeasibleError:
            continue
    if case.pipeline and len(chosen.pipeline.stages) == 1:
        raise RuntimeError(f"{case.name}: no memory cap leads the planner to a pipeline")
    return chosen


def one_process_step(case: Case, repeats: int) -> float:
    """Median seconds of the plain model's forward and backward on the whole batch, one thread."""
    model = make_model(case.model)
    x, kwargs, target = make_batch(case.model, case.global_batch)
    loss = loss_fn(case.model)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        loss(model(x, **kwargs), target).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


# --------------------------------------------------------------------------- calibration (worker)


def _matmul_loop(seconds: float = 1.0) -> float:
    """Seconds per 256x256 matmul, over about `seconds` of them."""
    a = torch.randn(256, 256)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return (time.perf_counter() - start) / n


def _sharing() -> float:
    """How much slower a one-thread matmul loop runs in both processes at once than in process 0 alone."""
    import torch.distributed as dist

    dist.barrier()
    alone = torch.tensor([_matmul_loop() if dist.get_rank() == 0 else 0.0])
    dist.barrier()
    together = torch.tensor([_matmul_loop()])
    dist.all_reduce(alone, op=dist.ReduceOp.MAX)
    dist.all_reduce(together, op=dist.ReduceOp.MAX)
    return together.item() / alone.item()


def _one_way(nbytes: int = 256 << 10, repeats: int = 50) -> float:
    """Mean one-way seconds of an `nbytes` message between processes 0 and 1 (gloo, back to back).

    The mean, not the median: on a shared machine most messages take tens of microseconds
    and a few take milliseconds (a process waiting for a core), and a pipeline pays both.
    """
    import torch.distributed as dist

    t = torch.zeros(nbytes // 4)
    rank = dist.get_rank()

    def exchange() -> None:
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        else:
            dist.recv(t, 0)
            dist.send(t, 0)

    dist.barrier()
    for _ in range(3):
        exchange()
    start = time.perf_counter()
    for _ in range(repeats):
        exchange()
    return (time.perf_counter() - start) / (2 * repeats)


# --------------------------------------------------------------------------- worker (under torchrun)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import partitioner.distributed as pd
    from partitioner.plan import Plan

    torch.set_num_threads(1)
    plan = Plan.from_json(Path(args.worker).read_text())
    assert plan.pipeline is not None, "the suite's plans come from plan_training"
    model = make_model(args.model)
    x, kwargs, target = make_batch(args.model, plan.pipeline.global_batch)
    part = pd.build(plan, model, (x,), kwargs, loss_fn=loss_fn(args.model))
    for _ in range(3):  # allocator and caches settle
        part.step(x, target, **kwargs)
        part.zero_grad()
    sharing = _sharing()
    one_way = _one_way()
    rounds = []
    for _ in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps_per_round):
            part.step(x, target, **kwargs)
            part.zero_grad()
        dist.barrier()
        elapsed = torch.tensor([(time.perf_counter() - start) / args.steps_per_round])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        rounds.append(elapsed.item())
    if part.rank == 0:
        record = {"rounds_s": rounds, "layout": part.layout.describe(), "sharing": sharing, "one_way_s": one_way}
        Path(args.out).write_text(json.dumps(record))
    part.close()


def torchrun(args: list[str], timeout_s: float = 900) -> None:
    """Run this file under ``torchrun --nproc-per-node 2`` with `args`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(len(DEVICES)),
               "--master-port", str(_free_port()), "-m", "benchmarks.distributed_step", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the suite


def run(cases: tuple[Case, ...], rounds: int, steps_per_round: int, say: Any) -> dict[str, Any]:
    from benchmarks.run import _hardware, _versions

    workdir = Path(tempfile.mkdtemp(prefix="distributed-step-"))
    torch.set_num_threads(1)
    records = []
    for k, case in enumerate(cases):
        say(f"[{k + 1}/{len(cases)}] {case.name}: planning with layers timed here")
        plan = plan_case(case)
        path = workdir / f"plan-{k}.json"
        path.write_text(plan.to_json())
        say(f"[{k + 1}/{len(cases)}] {case.name}: running with torchrun")
        result = workdir / f"result-{k}.json"
        torchrun(["--worker", str(path), "--model", case.model, "--out", str(result), "--rounds", str(rounds),
                  "--steps-per-round", str(steps_per_round)])
        measured = json.loads(result.read_text())
        step = statistics.median(measured["rounds_s"])
        predicted = plan.pipeline.step_time_s
        records.append({
            "case": asdict(case),
            "layout": measured["layout"],
            "predicted_s": predicted,
            "measured_s": step,
            "rounds_s": measured["rounds_s"],
            "ratio": step / predicted,
            "sharing": measured["sharing"],
            "ratio_shared": step / (predicted * measured["sharing"]),
            "gloo_one_way_256KiB_s": measured["one_way_s"],
            "one_process_s": one_process_step(case, repeats=max(5, rounds)),
        })
        say(f"    {measured['layout']}: predicted {predicted * 1e3:.2f} ms, measured {step * 1e3:.2f} ms "
            f"({step / predicted:.2f}x; sharing {measured['sharing']:.2f}x)")
    return {"hardware": _hardware(), "versions": _versions(), "rounds": rounds, "steps_per_round": steps_per_round,
            "records": records}


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    lines = [
        "| case | plan run | predicted | measured | measured / predicted | sharing "
        "| measured / (predicted x sharing) | gloo 256 KiB one way | one process |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['case']['name']} | {r['layout']} | {r['predicted_s'] * 1e3:.2f} ms | {r['measured_s'] * 1e3:.2f} ms "
            f"| {r['ratio']:.2f} | {r['sharing']:.2f} | {r['ratio_shared']:.2f} "
            f"| {r['gloo_one_way_256KiB_s'] * 1e3:.2f} ms | {r['one_process_s'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the result (with hardware and versions) here")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cases = tuple(c for c in SUITE if not args.only or args.only in c.name)
    result = run(cases, args.rounds, args.steps_per_round, lambda text: print(text, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
