"""The ``partitioner`` command: a thin layer over the library.

    partitioner plan gpt2-xl --devices "a100-80gb x4"          plan and print the report
    partitioner plan llama-70b --devices "a100-80gb x8" --json  the plan as JSON
    partitioner plan gpt2-xl --cluster mixed-8 --train --global-batch 64 --timeline step.png
                                                                a training step: pipeline x data parallel
    partitioner profile --device cpu --out my-cpu.json          measure a device's profile
    partitioner models | profiles | clusters                    what can be named
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from partitioner.errors import PartitionerError
from partitioner.options import Precision, Recompute
from partitioner.simulate.data import PipelineSchedule

if TYPE_CHECKING:
    from partitioner.options import TrainingOptions

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    parser = argparse.ArgumentParser(prog="partitioner", description="Automatic model partitioning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a model onto devices and print the report")
    p.add_argument("model", help="a built-in model name (see `partitioner models`) or path/to/file.py:factory")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--devices",
        nargs="+",
        help='device strings: "a100-80gb x4", "cuda:0", "cpu", "v100,v100", a profile file...',
    )
    where.add_argument(
        "--cluster",
        help="a cluster profile's name (see `partitioner clusters`) or .json file; plans a training step (--train)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="examples per batch (built-in models)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (built-in models)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--train", action="store_true", help="plan a training step (forward, backward, optimizer state)")
    p.add_argument("--optimizer", default="adam", choices=["none", "sgd", "momentum", "adam"])
    p.add_argument("--no-data-parallel", action="store_true", help="never replicate the whole model")
    p.add_argument("--granularity", default="block", choices=["block", "leaf"])
    p.add_argument("--max-memory", nargs="*", default=[], metavar="DEVICE=SIZE",
                   help="caps, e.g. cuda:0=20GB, or 0=20GiB for the first GPU (as in Accelerate)")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of memory kept free (default 0.1)")
    p.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit in seconds")
    p.add_argument("--solver", default="auto", choices=["auto", "highs", "cbc", "dp"])
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    p.add_argument("--out", default=None, help="also write the plan's JSON to this file")
    t = p.add_argument_group("training plans (--train with --cluster or --global-batch): pipeline x data parallel")
    t.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (default: --batch-size)")
    t.add_argument("--precision", default="auto", choices=[x.value for x in Precision])
    t.add_argument("--schedules", nargs="+", default=None, metavar="SCHEDULE",
                   help=f"{', '.join(x.value for x in PipelineSchedule)}, or torch's names "
                        "(GPipe, 1F1B, Interleaved1F1B)")
    t.add_argument("--max-stages", type=int, default=None, help="most pipeline stages (default: one per layer)")
    t.add_argument("--max-virtual-stages", type=int, default=4, help="most stages per rank when interleaved")
    t.add_argument("--min-microbatches", type=int, default=1)
    t.add_argument("--max-microbatches", type=int, default=128)
    t.add_argument("--recompute", default="auto", choices=[x.value for x in Recompute])
    t.add_argument("--overlap-allreduce", action="store_true", help="all-reduce gradients during the last backward")
    t.add_argument("--equal-replicas", action="store_true",
                   help="only plans partitioner.distributed can run (the same replica count on every pipeline rank)")
    t.add_argument("--timeline", default=None, metavar="PATH", help="draw the step as a Gantt chart (.png, .svg, .pdf)")

    q = sub.add_parser("profile", help="measure a present device and write its profile JSON")
    q.add_argument("--device", required=True, help="cpu, cuda or cuda:N")
    q.add_argument("--out", required=True, help="file to write (put its folder on PARTITIONER_PROFILE_PATH)")
    q.add_argument("--name", default=None, help="profile name (default: cpu, or the matching GPU profile's)")
    q.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    q.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])

    sub.add_parser("models", help="list the built-in models")
    sub.add_parser("profiles", help="list the device profiles found")
    sub.add_parser("clusters", help="list the cluster profiles found")
    return parser


def _training_options(args: argparse.Namespace) -> TrainingOptions:
    from partitioner.options import Optimizer, TrainingOptions

    schedules = {"schedules": tuple(PipelineSchedule(x) for x in args.schedules)} if args.schedules else {}
    return TrainingOptions(
        global_batch=args.global_batch or args.batch_size,
        optimizer=Optimizer(args.optimizer),
        precision=Precision(args.precision),
        max_stages=args.max_stages,
        max_virtual_stages=args.max_virtual_stages,
        min_microbatches=args.min_microbatches,
        max_microbatches=args.max_microbatches,
        recompute=Recompute(args.recompute),
        overlap_allreduce=args.overlap_allreduce,
        memory_reserve=args.reserve,
        equal_replicas=args.equal_replicas,
        **schedules,
    )


def _write_out(path: str | None, text: str) -> None:
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise PartitionerError(f"cannot write --out {path!r}: {e.strerror or e}") from None


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from partitioner.api import compile_plan
    from partitioner.cluster import load_cluster
    from partitioner.devices import parse_bytes
    from partitioner.models import build_model
    from partitioner.options import Objective, Optimizer, PlanOptions, SolverBackend, SolverOptions
    from partitioner.report import render_plan_timeline
    from partitioner.training import compile_training

    max_memory: dict[str | int, int | str] = {}
    for item in args.max_memory:
        key, sep, size = item.partition("=")
        if not sep:
            raise PartitionerError(f"--max-memory takes DEVICE=SIZE (e.g. cuda:0=20GB), got {item!r}")
        max_memory[key] = parse_bytes(size)
    training = bool(args.cluster or args.global_batch)
    if training and not args.train:
        raise PartitionerError("--cluster and --global-batch plan a training step: add --train")
    if args.timeline and not training:
        raise PartitionerError("--timeline draws a training plan: add --train and --cluster or --global-batch")
    compile_fn: Callable[..., Any]
    if training:
        compile_fn = functools.partial(compile_training, options=_training_options(args))
        devices: Any = load_cluster(args.cluster) if args.cluster else args.devices
    else:
        options = PlanOptions(
            objective=Objective(args.objective),
            training=args.train,
            optimizer=Optimizer(args.optimizer),
            allow_data_parallel=not args.no_data_parallel,
            memory_reserve=args.reserve,
            solver=SolverOptions(backend=SolverBackend(args.solver), time_limit_s=args.time_limit),
        )
        compile_fn, devices = functools.partial(compile_plan, options=options), args.devices
    err = Console(stderr=True)
    with err.status(f"building {args.model}") as status:
        # A file's factory makes its own inputs: build_model refuses sizes for it rather than ignore them.
        built = build_model(args.model, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len)
        compiled = compile_fn(
            built.model,
            devices,
            built.example_args,
            built.example_kwargs,
            max_memory=max_memory or None,
            granularity=args.granularity,
            split_modules=built.no_split_module_classes if args.granularity == "block" else (),
            progress=status.update,
        )
    t = compiled.timings_s
    solved = f"planned in {t['tables_s'] + t['solve_s']:.1f} s" if training else f"solved in {t['solve_s']:.1f} s"
    err.print(f"traced in {t['trace_s']:.1f} s, profiled in {t['profile_s']:.1f} s, {solved}", style="dim")
    text = compiled.plan.to_json()
    print(text if args.json else str(compiled.plan))
    if args.timeline:
        err.print(f"timeline written to {render_plan_timeline(compiled.plan, args.timeline)}", style="dim")
    _write_out(args.out, text)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from partitioner.calibrate import measure_device, write_profile

    profile = measure_device(args.device, args.dtypes, quick=args.quick, name=args.name)
    path = write_profile(profile, args.out)
    print(f"wrote {path}: {profile.name}, float32 {profile.peak_flops.float32 / 1e9:.1f} GFLOP/s, "
          f"memory bandwidth {profile.memory_bandwidth_Bps / 1e9:.1f} GB/s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a partitioner error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "models":
            from partitioner.models import available_models

            print("\n".join(available_models()))
            return 0
        if args.command == "clusters":
            from partitioner.cluster import available_clusters

            print("\n".join(available_clusters()))
            return 0
        from partitioner.devices import available_profiles

        print("\n".join(available_profiles()))
        return 0
    except (PartitionerError, ValueError) as e:
        print(f"partitioner: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
