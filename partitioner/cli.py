"""The ``partitioner`` command: a thin layer over the library.

    partitioner plan gpt2-xl --devices "a100-80gb x4"          plan and print the report
    partitioner plan llama-70b --devices "a100-80gb x8" --json  the plan as JSON
    partitioner plan gpt2-xl --cluster mixed-8 --train --global-batch 64 --timeline step.png
                                                                a training step: pipeline x data parallel
    partitioner plan gpt2-xl --cluster mixed-8 --train --global-batch 64 --trace step.json
                                                                its step for ui.perfetto.dev, chrome://tracing
    partitioner profile --device cpu --out my-cpu.json          measure a device's profile
    partitioner profile --links gloo --processes 4              measure gloo between 4 local processes
    partitioner models | profiles | clusters                    what can be named
    partitioner --version                                       the versions planning depends on

Output paths are checked before any work and written whole or not at all. Ctrl-C stops
any phase, the solver included, within seconds: one line, exit status 130, nothing written.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner.errors import PartitionerError
from partitioner.files import staged
from partitioner.options import Precision, Recompute, Sharding
from partitioner.parallel_config import ParallelConfig, parse_config
from partitioner.simulate.data import PipelineSchedule

if TYPE_CHECKING:
    from partitioner.options import TrainingOptions

__all__ = ["main", "build_parser"]

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _version() -> str:
    """``partitioner 0.1.0 (torch 2.13.0, pulp 3.3.2, highspy 1.16.0)``: what plans depend on."""
    from partitioner import __version__

    parts = []
    for package in ("torch", "pulp", "highspy"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"partitioner {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and the tests)."""
    parser = argparse.ArgumentParser(prog="partitioner", description="Automatic model partitioning for PyTorch.")
    parser.add_argument("--version", action="version", version=_version())
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
    p.add_argument("--batch-size", type=_positive_int, default=1, help="examples per batch (built-in models)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence (built-in models)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--train", action="store_true", help="plan a training step (forward, backward, optimizer state)")
    p.add_argument("--optimizer", default="adam", choices=["none", "sgd", "momentum", "adam"])
    p.add_argument("--no-data-parallel", action="store_true",
                   help="never copy the model: no data parallelism, no copies of a split")
    p.add_argument("--granularity", default="auto", choices=["auto", "block", "leaf"],
                   help="layer size: auto (blocks, split beside the cuts when that balances the pipeline), block or leaf")
    p.add_argument("--max-memory", nargs="*", default=[], metavar="DEVICE=SIZE",
                   help="caps, e.g. cuda:0=20GB, or 0=20GiB for the first GPU (as in Accelerate)")
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of memory kept free (default 0.1)")
    p.add_argument("--time-limit", type=_positive_seconds, default=60.0, help="ILP time limit in seconds")
    p.add_argument("--solver", default="auto", choices=["auto", "highs", "cbc", "dp"])
    p.add_argument("--keep-device-order", action="store_true",
                   help="place layers along the devices in the order listed (default: the solver orders unlike devices)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    p.add_argument("--out", default=None, help="also write the plan's JSON to this file")
    t = p.add_argument_group(
        "training plans (--train with --cluster or --global-batch): pipeline x tensor x (sharded) data parallel"
    )
    t.add_argument("--global-batch", type=_positive_int, default=None, help="samples per optimizer step (default: --batch-size)")
    t.add_argument("--precision", default="auto", choices=[x.value for x in Precision])
    t.add_argument("--schedules", nargs="+", default=None, metavar="SCHEDULE",
                   help=f"{', '.join(x.value for x in PipelineSchedule)}, or torch's names "
                        "(GPipe, 1F1B, Interleaved1F1B)")
    t.add_argument("--max-stages", type=_positive_int, default=None, help="most pipeline stages (default: one per layer)")
    t.add_argument("--max-virtual-stages", type=_positive_int, default=4, help="most stages per rank when interleaved")
    t.add_argument("--min-microbatches", type=_positive_int, default=1)
    t.add_argument("--max-microbatches", type=_positive_int, default=128)
    t.add_argument("--recompute", default="auto", choices=[x.value for x in Recompute])
    t.add_argument("--tensor-parallel", nargs="+", type=_positive_int, default=None, metavar="DEGREE",
                   help="tensor-parallel degrees to consider (default 1 2 4 8)")
    t.add_argument("--shardings", nargs="+", default=None, choices=[x.value for x in Sharding],
                   help="data-parallel sharding to consider: none (DDP), zero1, zero2, zero3 (FSDP), zero3-keep "
                        "(FSDP without resharding after forward); default all")
    t.add_argument("--no-sequence-parallel", action="store_true",
                   help="with tensor parallelism, keep norms and dropouts whole on every rank")
    t.add_argument("--config", type=_parallel_config, default=None, metavar="SPEC",
                   help="price the configuration you name, e.g. tp=8,pp=4,dp=2,shard=zero3,microbatches=16,"
                        "recompute=full (also vp, schedule, split=equal|dp); name a few keys to search a grid")
    t.add_argument("--overlap-allreduce", action="store_true", help="all-reduce gradients during the last backward")
    t.add_argument("--equal-replicas", action="store_true",
                   help="only plans partitioner.distributed can run (the same replica count on every pipeline rank)")
    t.add_argument("--timeline", default=None, metavar="PATH", help="draw the step as a Gantt chart (.png, .svg, .pdf)")
    t.add_argument("--trace", default=None, metavar="PATH",
                   help="write the step as a Chrome trace (.json, or .json.gz gzipped) to open in ui.perfetto.dev "
                        "or chrome://tracing: a process per pipeline rank, compute, send, recv and all-reduce lanes")

    q = sub.add_parser("profile", help="measure a present device (or the links between local processes) into a profile")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--device", help="cpu, cuda or cuda:N")
    what.add_argument(
        "--links", choices=["gloo"],
        help="measure gloo send/recv and all-reduce between --processes local processes; writes a cluster profile",
    )
    q.add_argument("--processes", type=_positive_int, default=None,
                   help="with --links: how many local processes (default 2)")
    q.add_argument(
        "--out", default=None,
        help="file to write (default: NAME.json; put its folder on PARTITIONER_PROFILE_PATH, "
        "or use a cluster profile as --cluster FILE)",
    )
    q.add_argument(
        "--name", default=None,
        help="profile name, the file's stem (default: --out's stem, else from the CPU or GPU model, "
        "e.g. cpu-intel-xeon-platinum-8375c); name it cpu, or a built-in GPU profile's name, to replace that one",
    )
    q.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    q.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])

    sub.add_parser("models", help="list the built-in models")
    sub.add_parser("profiles", help="list the device profiles found")
    sub.add_parser("clusters", help="list the cluster profiles found")
    return parser


def _parallel_config(text: str) -> ParallelConfig:
    try:
        return parse_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _training_options(args: argparse.Namespace) -> TrainingOptions:
    from partitioner.options import Optimizer, TrainingOptions

    default = TrainingOptions()
    schedules = tuple(PipelineSchedule(x) for x in args.schedules) if args.schedules else default.schedules
    degrees = tuple(args.tensor_parallel) if args.tensor_parallel else default.tensor_parallel
    shardings = tuple(Sharding(x) for x in args.shardings) if args.shardings else default.shardings
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
        schedules=schedules,
        sequence_parallel=not args.no_sequence_parallel,
        config=args.config,
        tensor_parallel=degrees,
        shardings=shardings,
    )


def _check_output(flag: str, path: str) -> None:
    """Refuse an output path before any work is done: its folder must exist and take files."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise PartitionerError(f"{flag} {path!r} is a folder; give a file name, e.g. {target / 'plan.json'}")
    if not folder.is_dir():
        raise PartitionerError(
            f"cannot write {flag} {path!r}: the folder {str(folder)!r} does not exist; create it first"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PartitionerError(f"cannot write {flag} {path!r}: the folder {str(folder)!r} is not writable")


_TRACE_SUFFIXES = (".json", ".json.gz")


@contextmanager
def _staged(flag: str, path: str) -> Iterator[Path]:
    """`files.staged`, its failures as `PartitionerError` naming the flag."""
    try:
        with staged(path) as temporary:
            yield temporary
    except OSError as e:
        raise PartitionerError(f"cannot write {flag} {path!r}: {e.strerror or e}") from None


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from partitioner.api import compile_plan
    from partitioner.cluster import load_cluster
    from partitioner.units import parse_bytes
    from partitioner.models import build_model
    from partitioner.options import Objective, Optimizer, PlanOptions, SolverBackend, SolverOptions
    from partitioner.report import render_plan_timeline, render_tensor_parallel, write_plan_trace
    from partitioner.progress import reporting
    from partitioner.training import TrainingCompiled, compile_training

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
    if args.timeline:
        if Path(args.timeline).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise PartitionerError(f"--timeline writes .png, .svg or .pdf files, got {args.timeline!r}")
        if importlib.util.find_spec("matplotlib") is None:
            raise PartitionerError("--timeline needs matplotlib: pip install 'partitioner[plot]'")
        _check_output("--timeline", args.timeline)
    if args.trace and not training:
        raise PartitionerError("--trace writes a training plan's step: add --train and --cluster or --global-batch")
    if args.trace:
        if not args.trace.lower().endswith(_TRACE_SUFFIXES):
            raise PartitionerError(f"--trace writes .json or .json.gz files (Chrome trace JSON), got {args.trace!r}")
        _check_output("--trace", args.trace)
    if args.out:
        _check_output("--out", args.out)
    if args.out and args.trace and Path(args.out).resolve() == Path(args.trace).resolve():
        raise PartitionerError(f"--out and --trace both name {args.out!r}; give each its own file")
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
            solver=SolverOptions(
                backend=SolverBackend(args.solver), time_limit_s=args.time_limit, keep_device_order=args.keep_device_order
            ),
        )
        compile_fn, devices = functools.partial(compile_plan, options=options), args.devices
    err = Console(stderr=True)
    keep = functools.partial(err.print, soft_wrap=True)  # A solver's note stays above the status line.
    with err.status(f"building {args.model}") as status, reporting(status.update, note=keep):
        # A file's factory makes its own inputs: build_model refuses sizes for it rather than ignore them.
        built = build_model(args.model, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len)
        compiled = compile_fn(
            built.model,
            devices,
            built.example_args,
            built.example_kwargs,
            max_memory=max_memory or None,
            granularity=args.granularity,
            split_modules=built.no_split_module_classes if args.granularity != "leaf" else (),
            progress=status.update,
        )
    t = compiled.timings_s
    solved = f"planned in {t['tables_s'] + t['solve_s']:.1f} s" if training else f"solved in {t['solve_s']:.1f} s"
    err.print(f"traced in {t['trace_s']:.1f} s, profiled in {t['profile_s']:.1f} s, {solved}", style="dim")
    text = compiled.plan.to_json()
    with ExitStack() as files:  # Every file or none.
        if args.timeline:
            render_plan_timeline(compiled.plan, files.enter_context(_staged("--timeline", args.timeline)))
        if args.trace:  # staged as .gz for .json.gz: the suffix that says gzip
            write_plan_trace(compiled.plan, files.enter_context(_staged("--trace", args.trace)))
        if args.out:
            files.enter_context(_staged("--out", args.out)).write_text(text + "\n", encoding="utf-8")
    print(text if args.json else str(compiled.plan))
    if isinstance(compiled, TrainingCompiled) and compiled.analysis is not None and not args.json:
        print("\n" + render_tensor_parallel(compiled.analysis.layered.tensor_parallel))
    if args.timeline:
        err.print(f"timeline written to {args.timeline}", style="dim", soft_wrap=True)
    if args.trace:
        err.print(f"trace written to {args.trace}: open it in ui.perfetto.dev or chrome://tracing", style="dim",
                  soft_wrap=True)
    return 0


def _profile_out(name: str, out: str | None) -> str:
    """The file a profile named `name` goes to: `out`, refused unless it is ``NAME.json``."""
    out = out or f"{name}.json"
    if Path(out).suffix != ".json":
        raise PartitionerError(f"--out {out!r}: a profile is a .json file (it is looked up as NAME.json)")
    if Path(out).stem != name:
        raise PartitionerError(
            f"--out {out!r} would hold the profile {name!r}, which is looked up as {name}.json: "
            f"write it to {Path(out).with_name(f'{name}.json')} or pass --name {Path(out).stem}"
        )
    _check_output("--out", out)
    return out


def _profile_links(args: argparse.Namespace) -> int:
    from rich.console import Console

    from partitioner.calibrate import check_profile_name
    from partitioner.calibrate_links import DEFAULT_SIZES, QUICK_SIZES, gloo_cluster_document, measure_gloo
    from partitioner.calibrate_links import write_cluster_document

    processes = args.processes or 2
    if processes < 2:
        raise PartitionerError(f"--processes {processes}: a link joins two processes or more; pass --processes 2 or more")
    name = args.name or (Path(args.out).stem if args.out else f"{args.links}-{processes}")
    check_profile_name(name)
    out = _profile_out(name, args.out)
    err = Console(stderr=True)
    with err.status(f"measuring {args.links} between {processes} processes") as status:
        timings = measure_gloo(processes, QUICK_SIZES if args.quick else DEFAULT_SIZES, progress=status.update)
    cluster = write_cluster_document(gloo_cluster_document(timings, name), out)
    send = cluster.transfer_s(256 << 10, 0, 1)
    print(f"wrote {out}: {cluster}; {cluster.links[0]}; a 256 KiB send {send * 1e6:.0f} us")
    err.print(f"use it as --cluster {out}, or put it in clusters/ of a folder on PARTITIONER_PROFILE_PATH",
              style="dim", soft_wrap=True)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from partitioner.calibrate import check_profile_name, default_profile_name, measure_device, write_profile
    from partitioner.profile_files import PROFILE_PATH_ENV, available_profiles

    # Everything that can be refused is refused before the measurement: a profile is found
    # by its file's name, so the name and the file agree, and the file can be written.
    if args.links:
        return _profile_links(args)
    if args.processes is not None:
        raise PartitionerError("--processes counts the processes of --links gloo; it does not apply to --device")
    name = args.name or (Path(args.out).stem if args.out else default_profile_name(args.device))
    check_profile_name(name)
    out = _profile_out(name, args.out)
    err = Console(stderr=True)
    if name in available_profiles():
        err.print(
            f"a profile named {name!r} exists: the new one replaces it where its folder comes first "
            f"on {PROFILE_PATH_ENV}",
            style="dim",
            soft_wrap=True,
        )
    with err.status(f"measuring {args.device}") as status:
        profile = measure_device(args.device, args.dtypes, quick=args.quick, name=name, progress=status.update)
    path = write_profile(profile, out)
    print(f"wrote {path}: {profile.name}, float32 {profile.peak_flops.float32 / 1e9:.1f} GFLOP/s, "
          f"memory bandwidth {profile.memory_bandwidth_Bps / 1e9:.1f} GB/s, "
          f"launch floor {profile.launch_s * 1e6:.2g} us")
    err.print(
        f"use it as --devices {profile.name} with {PROFILE_PATH_ENV}={path.parent.resolve()}",
        style="dim",
        soft_wrap=True,
    )
    return 0


BROKEN_PIPE = 141
"""Exit status when stdout's reader has gone (128 + SIGPIPE, as a shell reports it)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a partitioner error, 130 after Ctrl-C)."""
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
        from partitioner.profile_files import available_profiles

        print("\n".join(available_profiles()))
        return 0
    except (PartitionerError, ValueError) as e:
        print(f"partitioner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (--time-limit SECONDS stops the solver early with its best plan)" if args.command == "plan" else ""
        print(f"partitioner: interrupted; nothing written{hint}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`partitioner profiles | head -1`): stop quietly, as Unix tools do,
        # and keep Python's own flush at exit from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
