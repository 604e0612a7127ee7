"""A distributed training step on this machine against the simulator's prediction for the same plan.

    python -m benchmarks.distributed_step                    # the suite below, 2 and 4 processes (about 5 minutes on 2 cores)
    python -m benchmarks.distributed_step --json out.json --only gpt2 --processes 2 --rounds 9
    python -m benchmarks.distributed_step --cluster gloo-2.json --cluster gloo-4.json

For each case of `SUITE` and each process count N, `partitioner.training.compile_training`
times the model's layers here (one thread, ``measure=True``) on N CPU devices, and
`partitioner.training.replan_training` plans the case's configuration (data parallel over
N processes, or 2 stages of N/2 replicas) twice from those same layer times:

- **memory copy**: the devices as a device list (``cpu:0``, ``cpu:1``, ...), whose link the
  planner prices as a host memory copy (what it did before link profiles);
- **gloo profile**: the cluster profile of N local processes that ``partitioner profile
  --links gloo --processes N`` writes (send/recv and all-reduce latency and bandwidth,
  measured): ``--cluster FILE``, else ``benchmarks/out/gloo-N.json``, measured first when
  absent and kept there.

Each distinct plan is saved as JSON and run by ``torchrun --nproc-per-node N`` on this file
in worker mode: each process builds its part (`partitioner.distributed.build`), warms up,
and times rounds of steps (``part.step``, an SGD step over ``part.parameters()``,
``zero_grad``) between barriers; the measured step is the median round over its steps
(the slowest process's). The figure of merit is measured / predicted
(`PipelinePlan.step_time_s`). Both plans run the same configuration; when their layer
splits agree one run measures both.

Both plans price this machine's CPU with a profile measured here (``partitioner profile
--device cpu``: its matmul peak, GEMM efficiency by size and by narrow side, element-wise
bandwidth, launch floor): ``--cpu-profile FILE``, else ``benchmarks/out/profiles/cpu.json``,
measured first when absent and kept there; it takes the built-in ``cpu`` profile's place
(``PARTITIONER_PROFILE_PATH``). Layers are timed at the global batch; a plan's microbatches
are smaller, and their times are scaled by the profile's roofline from the measured ones,
so the built-in profile (one efficiency for every matmul) prices a microbatch of one
GPT-2 sample 1.5x too fast, the measured one within 6% (one process, 16 microbatches).

The gloo profile also holds the machine's **compute sharing** (measured with the links):
how much slower a one-thread matmul loop runs in N processes at once than in one alone.
The planner multiplies each stage's compute by it (`partitioner.cluster.Cluster.slowdown`);
the memory-copy plan, a device list, has none (each device a core of its own).

On a small shared machine more than the prediction moves the ratio, so each run also
measures, at the same moment as its steps:

- ``sharing``: the same matmul loop in process 0 alone, then in all at once, beside the
  profile's figure (`priced sharing`): the host's load moves it between runs;
- ``link``: gloo's mean one-way time for a 256 KiB message (ping-pong between processes 0
  and 1), beside what each prediction prices it at.

Each case's configuration is named (`partitioner.parallel_config.ParallelConfig`: tp 1,
pp 1 or 2, dp, no sharding, the case's microbatches and schedule, the planner's layer
split), so the planner prices exactly what runs.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
"""Where measured gloo profiles are kept between runs (git ignores it)."""
PROCESSES = (2, 4)
SEQUENCE = 32
"""Tokens per sample of gpt2-tiny."""


@dataclass(frozen=True, slots=True)
class Case:
    """One configuration to run: a model, a batch, and the shape of the plan."""

    name: str
    model: str
    """``mlp`` (the seed MLP) or ``gpt2-tiny`` (transformers GPT-2: 4 blocks of width 256)."""
    global_batch: int
    shape: str
    """``data parallel`` (one stage on every process) or ``pipeline`` (2 stages, N/2 replicas each)."""
    schedule: str = "gpipe"
    microbatches: int = 1


SUITE: tuple[Case, ...] = (
    Case("mlp, data parallel", "mlp", 256, "data parallel"),
    Case("mlp, 2 stages, gpipe x4", "mlp", 256, "pipeline", "gpipe", 4),
    Case("gpt2-tiny, data parallel", "gpt2-tiny", 16, "data parallel"),
    Case("gpt2-tiny, 2 stages, 1f1b x8", "gpt2-tiny", 16, "pipeline", "1f1b", 8),
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


def _options(case: Case | None, processes: int = 0) -> Any:
    """Training options: the tables' space (None: every case's), or one case's configuration
    on `processes` processes, named (`partitioner.parallel_config.ParallelConfig`)."""
    from partitioner.options import Optimizer, Recompute, Sharding, TrainingOptions
    from partitioner.parallel_config import ParallelConfig
    from partitioner.simulate import PipelineSchedule

    if case is None:  # microbatch sizes of every case, both schedules
        return TrainingOptions(optimizer=Optimizer.SGD, schedules=(PipelineSchedule.GPIPE, PipelineSchedule.ONE_F_ONE_B),
                               min_microbatches=1, max_microbatches=max(c.microbatches for c in SUITE),
                               recompute=Recompute.NEVER, memory_reserve=0.0, equal_replicas=True)
    pp = 1 if case.shape == "data parallel" else 2
    config = ParallelConfig(tp=1, pp=pp, dp=processes // pp, shard=Sharding.NONE, microbatches=case.microbatches,
                            schedule=PipelineSchedule(case.schedule), recompute=Recompute.NEVER, split="dp")
    return replace(_options(None), schedules=(PipelineSchedule(case.schedule),), config=config)


def plan_case(compiled: Any, cluster: Any, case: Case, processes: int) -> Any:
    """The plan of `case`'s configuration on `processes` devices of `cluster`, from
    `compiled`'s layer times (its layer split is the planner's)."""
    from partitioner.training import replan_training

    return replan_training(compiled, cluster, _options(case, processes), global_batch=case.global_batch).plan


def _signature(plan: Any) -> tuple[Any, ...]:
    """What a run of `plan` depends on: its stages' layers and replica counts, schedule, microbatches."""
    p = plan.pipeline
    return (p.schedule, p.microbatches, tuple((s.first_layer, s.last_layer, len(s.devices)) for s in p.stages))


def gloo_cluster(processes: int, given: dict[int, Path], say: Any) -> tuple[Any, Path]:
    """The gloo cluster profile of `processes` processes: given, else cached under benchmarks/out/, else measured."""
    from partitioner.calibrate_links import gloo_cluster_document, measure_gloo, write_cluster_document
    from partitioner.cluster import load_cluster

    path = given.get(processes) or OUT / f"gloo-{processes}.json"
    if path.exists():
        return load_cluster(path), path
    say(f"measuring gloo between {processes} processes into {path} (partitioner profile --links gloo)")
    OUT.mkdir(parents=True, exist_ok=True)
    timings = measure_gloo(processes, progress=say)
    return write_cluster_document(gloo_cluster_document(timings, path.stem), path), path


def use_cpu_profile(given: Path | None, say: Any) -> Path:
    """Make the planner price ``cpu`` devices with `given`, else with ``benchmarks/out/profiles/cpu.json``
    (measured first when absent): its folder goes first on ``PARTITIONER_PROFILE_PATH``."""
    from partitioner.calibrate import measure_device, write_profile
    from partitioner.profile_files import PROFILE_PATH_ENV, load_profile

    path = given or OUT / "profiles" / "cpu.json"
    if path.name != "cpu.json":
        raise ValueError(f"{path}: the CPU profile must be a file named cpu.json (it replaces the built-in cpu profile)")
    if not path.exists():
        say(f"measuring this CPU into {path} (partitioner profile --device cpu)")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_profile(measure_device("cpu", name="cpu"), path)
    if (name := load_profile(path).name) != "cpu":
        raise ValueError(f"{path}: a profile named {name!r}, not 'cpu'")
    os.environ[PROFILE_PATH_ENV] = os.pathsep.join(filter(None, (str(path.parent), os.environ.get(PROFILE_PATH_ENV))))
    return path


def one_process_step(case: Case, repeats: int) -> float:
    """Median seconds of the plain model's training step on the whole batch, one thread:
    forward, backward and an SGD step, as the plans price it."""
    model = make_model(case.model)
    x, kwargs, target = make_batch(case.model, case.global_batch)
    loss = loss_fn(case.model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        loss(model(x, **kwargs), target).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


# --------------------------------------------------------------------------- calibration (worker)


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
        elif rank == 1:
            dist.recv(t, 0)
            dist.send(t, 0)

    dist.barrier()
    for _ in range(3):
        exchange()
    start = time.perf_counter()
    for _ in range(repeats):
        exchange()
    seconds = (time.perf_counter() - start) / (2 * repeats)
    dist.barrier()
    return seconds


# --------------------------------------------------------------------------- worker (under torchrun)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import partitioner.distributed as pd
    from partitioner.calibrate_links import compute_sharing
    from partitioner.plan import Plan

    torch.set_num_threads(1)
    plan = Plan.from_json(Path(args.worker).read_text())
    assert plan.pipeline is not None, "the suite's plans come from plan_training"
    model = make_model(args.model)
    x, kwargs, target = make_batch(args.model, plan.pipeline.global_batch)
    part = pd.build(plan, model, (x,), kwargs, loss_fn=loss_fn(args.model))
    opt = torch.optim.SGD(part.parameters(), lr=1e-3)  # the plans price an SGD step (Optimizer.SGD)
    for _ in range(3):  # allocator and caches settle
        part.step(x, target, **kwargs)
        opt.step()
        part.zero_grad()
    sharing = compute_sharing(dist.get_rank(), dist.get_world_size(), 1.0)[-1][1] if dist.get_world_size() > 1 else 1.0
    one_way = _one_way()
    rounds = []
    for _ in range(args.rounds):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps_per_round):
            part.step(x, target, **kwargs)
            opt.step()
            part.zero_grad()
        dist.barrier()
        elapsed = torch.tensor([(time.perf_counter() - start) / args.steps_per_round])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        rounds.append(elapsed.item())
    if part.rank == 0:
        record = {"rounds_s": rounds, "layout": part.layout.describe(), "sharing": sharing, "one_way_s": one_way}
        Path(args.out).write_text(json.dumps(record))
    part.close()


def torchrun(args: list[str], processes: int, timeout_s: float = 900) -> None:
    """Run this file under ``torchrun --nproc-per-node processes`` with `args`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
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


def _run_plan(plan: Any, case: Case, path: Path, rounds: int, steps_per_round: int) -> dict[str, Any]:
    path.write_text(plan.to_json())
    result = path.with_suffix(".result.json")
    processes = sum(len(s.devices) for s in plan.pipeline.stages)
    torchrun(["--worker", str(path), "--model", case.model, "--out", str(result), "--rounds", str(rounds),
              "--steps-per-round", str(steps_per_round)], processes)
    measured: dict[str, Any] = json.loads(result.read_text())
    return measured


def run(cases: tuple[Case, ...], processes: tuple[int, ...], clusters: dict[int, Path], rounds: int,
        steps_per_round: int, say: Any, cpu: Path | None = None) -> dict[str, Any]:
    from benchmarks.run import _hardware, _versions
    from partitioner.training import compile_training

    workdir = Path(tempfile.mkdtemp(prefix="distributed-step-"))
    torch.set_num_threads(1)
    cpu_profile = use_cpu_profile(cpu, say)
    records = []
    profiles = {}
    for n in processes:
        gloo, path = gloo_cluster(n, clusters, say)
        if gloo.num_devices != n:
            raise ValueError(f"{path}: a profile of {gloo.num_devices} processes, not {n}")
        profiles[n] = {"path": str(path), "links": list(gloo.links), "source": gloo.source}
        for model in dict.fromkeys(c.model for c in cases):
            say(f"{model}, {n} processes: timing layers here")
            x, kwargs, _ = make_batch(model, max(c.global_batch for c in cases if c.model == model))
            compiled = compile_training(make_model(model), [f"cpu:{k}" for k in range(n)], (x,), kwargs,
                                        global_batch=x.shape[0], options=_options(None))
            for case in (c for c in cases if c.model == model):
                plans = {"memory copy": plan_case(compiled, compiled.cluster, case, n),
                         "gloo profile": plan_case(compiled, gloo, case, n)}
                runs: dict[tuple[Any, ...], dict[str, Any]] = {}
                for links, plan in plans.items():
                    key = _signature(plan)
                    if key not in runs:
                        say(f"{case.name}, {n} processes ({links} plan): running with torchrun")
                        runs[key] = _run_plan(plan, case, workdir / f"plan-{len(records)}-{len(runs)}.json",
                                              rounds, steps_per_round)
                    measured = runs[key]
                    step = statistics.median(measured["rounds_s"])
                    predicted = plan.pipeline.step_time_s
                    cluster = gloo if links == "gloo profile" else compiled.cluster
                    records.append({
                        "case": asdict(case),
                        "processes": n,
                        "links": links,
                        "layout": measured["layout"],
                        "predicted_s": predicted,
                        "measured_s": step,
                        "rounds_s": measured["rounds_s"],
                        "ratio": step / predicted,
                        "sharing": measured["sharing"],
                        "priced_sharing": cluster.slowdown(0, n),
                        "gloo_one_way_256KiB_s": measured["one_way_s"],
                        "priced_one_way_256KiB_s": cluster.transfer_s(256 << 10, 0, 1),
                        "one_process_s": one_process_step(case, repeats=max(5, rounds)),
                    })
                    say(f"    {links}: {measured['layout']}: predicted {predicted * 1e3:.2f} ms, "
                        f"measured {step * 1e3:.2f} ms ({step / predicted:.2f}x; sharing {measured['sharing']:.2f}x)")
    return {"hardware": _hardware(), "versions": _versions(), "rounds": rounds, "steps_per_round": steps_per_round,
            "profiles": profiles, "cpu_profile": str(cpu_profile), "records": records}


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    lines = [
        "| case | processes | links priced as | plan run | predicted | measured | measured / predicted "
        "| sharing: in the run / priced | 256 KiB one way: gloo / priced | one process |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['case']['name']} | {r['processes']} | {r['links']} | {r['layout']} | {r['predicted_s'] * 1e3:.2f} ms "
            f"| {r['measured_s'] * 1e3:.2f} ms | {r['ratio']:.2f} | {r['sharing']:.2f} / {r['priced_sharing']:.2f} "
            f"| {r['gloo_one_way_256KiB_s'] * 1e3:.2f} / {r['priced_one_way_256KiB_s'] * 1e3:.2f} ms "
            f"| {r['one_process_s'] * 1e3:.2f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the result (with hardware and versions) here")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--processes", type=int, nargs="+", default=list(PROCESSES), help="process counts (2 4)")
    parser.add_argument("--cluster", type=Path, action="append", default=[],
                        help="a gloo cluster profile (partitioner profile --links gloo) for runs of its process count; "
                             "default benchmarks/out/gloo-N.json, measured when absent")
    parser.add_argument("--cpu-profile", type=Path,
                        help="a measured profile of this CPU named cpu (partitioner profile --device cpu --name cpu), "
                             "file cpu.json; default benchmarks/out/profiles/cpu.json, measured when absent")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cases = tuple(c for c in SUITE if not args.only or args.only in c.name)
    from partitioner.cluster import load_cluster

    clusters = {load_cluster(path).num_devices: path for path in args.cluster}
    result = run(cases, tuple(args.processes), clusters, args.rounds, args.steps_per_round,
                 lambda text: print(text, file=sys.stderr, flush=True), args.cpu_profile)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
