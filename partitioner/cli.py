"""The ``partitioner`` command: a thin layer over the library.

    partitioner plan gpt2-xl --devices "a100-80gb x4"          plan and print the report
    partitioner plan llama-70b --devices "a100-80gb x8" --json  the plan as JSON
    partitioner profile --device cpu --out my-cpu.json          measure a device's profile
    partitioner models | partitioner profiles                   what can be named
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from partitioner.errors import PartitionerError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    parser = argparse.ArgumentParser(prog="partitioner", description="Automatic model partitioning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a model onto devices and print the report")
    p.add_argument("model", help="a built-in model name (see `partitioner models`) or path/to/file.py:factory")
    p.add_argument(
        "--devices",
        nargs="+",
        required=True,
        help='device strings: "a100-80gb x4", "cuda:0", "cpu", "v100,v100", a profile file...',
    )
    p.add_argument("--batch-size", type=int, default=1, help="examples per batch (built-in models)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (built-in models)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--train", action="store_true", help="plan a training step (forward, backward, optimizer state)")
    p.add_argument("--optimizer", default="adam", choices=["none", "sgd", "momentum", "adam"])
    p.add_argument("--no-data-parallel", action="store_true", help="never replicate the whole model")
    p.add_argument("--granularity", default="block", choices=["block", "leaf"])
    p.add_argument("--max-memory", nargs="*", default=[], metavar="DEVICE=SIZE", help='caps, e.g. cuda:0=20GB')
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of memory kept free (default 0.1)")
    p.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit in seconds")
    p.add_argument("--solver", default="auto", choices=["auto", "highs", "cbc", "dp"])
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    p.add_argument("--out", default=None, help="also write the plan's JSON to this file")

    q = sub.add_parser("profile", help="measure a present device and write its profile JSON")
    q.add_argument("--device", required=True, help="cpu, cuda or cuda:N")
    q.add_argument("--out", required=True, help="file to write (put its folder on PARTITIONER_PROFILE_PATH)")
    q.add_argument("--name", default=None, help="profile name (default: cpu, or the matching GPU profile's)")
    q.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    q.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])

    sub.add_parser("models", help="list the built-in models")
    sub.add_parser("profiles", help="list the device profiles found")
    return parser


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from partitioner.api import compile_plan
    from partitioner.devices import parse_bytes
    from partitioner.models import build_model
    from partitioner.options import Objective, Optimizer, PlanOptions, SolverBackend, SolverOptions

    max_memory: dict[str | int, int | str] = {}
    for item in args.max_memory:
        key, sep, size = item.partition("=")
        if not sep:
            raise PartitionerError(f"--max-memory takes DEVICE=SIZE (e.g. cuda:0=20GB), got {item!r}")
        max_memory[key] = parse_bytes(size)
    options = PlanOptions(
        objective=Objective(args.objective),
        training=args.train,
        optimizer=Optimizer(args.optimizer),
        allow_data_parallel=not args.no_data_parallel,
        memory_reserve=args.reserve,
        solver=SolverOptions(backend=SolverBackend(args.solver), time_limit_s=args.time_limit),
    )
    err = Console(stderr=True)
    with err.status(f"building {args.model}") as status:
        # A file's factory makes its own inputs: build_model refuses sizes for it rather than ignore them.
        built = build_model(args.model, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len)
        compiled = compile_plan(
            built.model,
            args.devices,
            built.example_args,
            built.example_kwargs,
            options=options,
            max_memory=max_memory or None,
            granularity=args.granularity,
            split_modules=built.no_split_module_classes,
            progress=status.update,
        )
    t = compiled.timings_s
    err.print(
        f"traced in {t['trace_s']:.1f} s, profiled in {t['profile_s']:.1f} s, solved in {t['solve_s']:.1f} s",
        style="dim",
    )
    text = compiled.plan.to_json()
    print(text if args.json else str(compiled.plan))
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            raise PartitionerError(f"cannot write --out {args.out!r}: {e.strerror or e}") from None
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
        from partitioner.devices import available_profiles

        print("\n".join(available_profiles()))
        return 0
    except (PartitionerError, ValueError) as e:
        print(f"partitioner: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
