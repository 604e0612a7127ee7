"""The suites, as data: which models, device sets and modes each one runs.

A suite lists comparison cases (every model x device set x mode of each `Comparison`),
planner-scaling series, cost-model accuracy cases on this CPU and the seed-MLP split.
`jobs(suite)` turns it into the units the runner executes, one process each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from itertools import product
from typing import Any, Literal

__all__ = [
    "ModelSpec",
    "DeviceSet",
    "Mode",
    "Comparison",
    "ScalingPoint",
    "AccuracyCase",
    "Suite",
    "Job",
    "MODELS",
    "DEVICE_SETS",
    "MODES",
    "SUITES",
    "Selection",
    "jobs",
    "subset",
    "suite_data",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A model and the inputs it is planned for."""

    name: str
    """Key in results; for built-in models also the `partitioner.models.build_model` name."""
    source: Literal["builtin", "bench"]
    """``builtin``: `partitioner.models`; ``bench``: `benchmarks.models`."""
    batch_size: int
    seq_len: int | None = None
    """Tokens per sequence (sequence models only)."""
    dtype: str = "float32"
    granularity: Literal["block", "leaf"] = "block"
    transformer: bool = False
    """A stack of identical transformer blocks (the bound target applies)."""
    unbalanced: bool = False
    """Layers of very unequal cost, e.g. an oversized embedding or head (the equal-split target applies)."""
    depth: int = 0
    """Number of layers of a synthetic bench model (deep MLPs); 0 for the others."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSet:
    """Devices as `partitioner.plan` takes them."""

    name: str
    specs: tuple[str, ...]
    """Device strings (`partitioner.devices.resolve_devices`); for a cluster, its devices."""
    cluster: str | None = None
    """A cluster profile (`profiles/clusters/`) whose devices and links (several nodes) replace
    the one-node links of `specs`."""

    @property
    def identical(self) -> bool:
        """Whether every device has the same profile (the balance bound is reachable only then)."""
        return len({s.split(" x")[0].split(":")[0] for s in self.specs}) == 1

    @property
    def gpus(self) -> int:
        """Number of GPUs (0 for CPU-only sets)."""
        total = 0
        for s in self.specs:
            base, _, count = s.partition(" x")
            if not base.startswith("cpu"):
                total += int(count or 1)
        return total


@dataclass(frozen=True, slots=True, kw_only=True)
class Mode:
    """Inference or training, and what the planner minimises."""

    name: str
    training: bool
    objective: Literal["latency", "throughput"]
    optimizer: str = "adam"
    """Optimizer whose state counts towards memory when training."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """Every model x device set x mode: partitioner's plan against each baseline."""

    models: tuple[str, ...]
    device_sets: tuple[str, ...]
    modes: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalingPoint:
    """One planner run for the growth series (time and peak memory of trace, profile, solve)."""

    series: str
    """``layers-chain``, ``layers-dag``, ``devices-chain``, ``devices-dag`` or ``end-to-end``."""
    model: str
    devices: str
    """A device set name."""
    mode: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AccuracyCase:
    """A CPU-executable model, planned and run for real on this machine."""

    model: str
    devices: tuple[str, ...]
    """``("cpu",)`` or simulated ``("cpu:0", "cpu:1")``."""
    training: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Suite:
    name: str
    description: str
    comparisons: tuple[Comparison, ...] = ()
    scaling: tuple[ScalingPoint, ...] = ()
    accuracy: tuple[AccuracyCase, ...] = ()
    mlp_split: bool = False
    """Run the seed MLP's automatic split against the hand-written one."""
    repeats: int = 7
    """Timed rounds per measured module (medians of interleaved rounds)."""
    job_timeout_s: float = 900.0
    """A job still running after this long is stopped and recorded as an error."""


def _models(*specs: ModelSpec) -> dict[str, ModelSpec]:
    return {m.name: m for m in specs}


def _deep(kind: str, depth: int, batch_size: int = 64) -> ModelSpec:
    return ModelSpec(name=f"{kind}-{depth}", source="bench", batch_size=batch_size, depth=depth)


_SCALING_CHAIN = (50, 250, 500, 1000, 2500)
"""Depths of the chain MLP: 2 graph nodes a layer, so about 100 to 5,000 nodes."""
_SCALING_DAG = (33, 100, 333, 1000, 1666)
"""Depths of the skip MLP: 3 graph nodes a layer, so about 100 to 5,000 nodes."""

MODELS: dict[str, ModelSpec] = _models(
    ModelSpec(name="mlp", source="builtin", batch_size=256),
    ModelSpec(name="resnet", source="bench", batch_size=32),
    ModelSpec(name="gpt2", source="builtin", batch_size=8, seq_len=1024, transformer=True),
    ModelSpec(name="gpt2-medium", source="builtin", batch_size=8, seq_len=1024, transformer=True),
    ModelSpec(name="gpt2-large", source="builtin", batch_size=8, seq_len=1024, transformer=True),
    ModelSpec(name="gpt2-xl", source="builtin", batch_size=8, seq_len=1024, transformer=True),
    ModelSpec(name="bert-base", source="builtin", batch_size=16, seq_len=512, transformer=True),
    ModelSpec(name="bert-large", source="builtin", batch_size=16, seq_len=512, transformer=True),
    ModelSpec(name="llama-7b", source="builtin", batch_size=4, seq_len=2048, dtype="bfloat16", transformer=True),
    ModelSpec(name="llama-13b", source="builtin", batch_size=4, seq_len=2048, dtype="bfloat16", transformer=True),
    ModelSpec(name="llama-70b", source="builtin", batch_size=4, seq_len=2048, dtype="bfloat16", transformer=True),
    ModelSpec(name="t5-base", source="builtin", batch_size=16, seq_len=512, transformer=True),
    ModelSpec(name="vit-base", source="builtin", batch_size=64, transformer=True),
    ModelSpec(name="big-head", source="builtin", batch_size=8, seq_len=1024, transformer=True, unbalanced=True),
    # CPU-sized models for the accuracy cases (real weights, run on this machine).
    ModelSpec(name="resnet-small", source="bench", batch_size=8),
    ModelSpec(name="gpt2-mini", source="bench", batch_size=4, seq_len=128, transformer=True),
    _deep("deep-mlp", 8, batch_size=128),
    *(_deep("deep-mlp", n) for n in _SCALING_CHAIN),
    *(_deep("skip-mlp", n) for n in (10, *_SCALING_DAG)),
)

DEVICE_SETS: dict[str, DeviceSet] = {
    d.name: d
    for d in (
        *(DeviceSet(name=f"a100-80gb x{n}", specs=(f"a100-80gb x{n}",)) for n in (2, 4, 8, 16, 32, 64)),
        *(DeviceSet(name=f"l4 x{n}", specs=(f"l4 x{n}",)) for n in (2, 4, 8)),
        DeviceSet(name="a100-40gb x4 + v100 x4", specs=("a100-40gb x4", "v100 x4")),
        DeviceSet(name="a100-80gb 2 nodes x 4", specs=("a100-80gb x8",), cluster="a100-2x4-ib"),
        DeviceSet(name="cpu x2", specs=("cpu:0", "cpu:1")),
    )
}

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(name="inference-latency", training=False, objective="latency"),
        Mode(name="inference-throughput", training=False, objective="throughput"),
        Mode(name="training", training=True, objective="throughput", optimizer="adam"),
    )
}

_ALL_MODES = tuple(MODES)
_GPU_SETS = ("a100-80gb x2", "a100-80gb x4", "a100-80gb x8", "l4 x2", "l4 x4", "l4 x8")
_MIXED_AND_CPU = ("a100-40gb x4 + v100 x4", "a100-80gb 2 nodes x 4", "cpu x2")
_ACCURACY_MODELS = ("mlp", "deep-mlp-8", "resnet-small", "gpt2-mini")


def _accuracy(models: tuple[str, ...]) -> tuple[AccuracyCase, ...]:
    return tuple(
        AccuracyCase(model=m, devices=d, training=t)
        for m, d, t in product(models, (("cpu",), ("cpu:0", "cpu:1")), (False, True))
    )


def _scaling(chain: tuple[int, ...], dag: tuple[int, ...], devices_chain: tuple[int, ...],
             devices_dag: tuple[int, ...]) -> tuple[ScalingPoint, ...]:
    mode = "inference-throughput"
    return (
        *(ScalingPoint(series="layers-chain", model=f"deep-mlp-{n}", devices="a100-80gb x4", mode=mode) for n in chain),
        *(ScalingPoint(series="layers-dag", model=f"skip-mlp-{n}", devices="a100-80gb x4", mode=mode) for n in dag),
        *(
            ScalingPoint(series="devices-chain", model="deep-mlp-500", devices=f"a100-80gb x{d}", mode=mode)
            for d in devices_chain
        ),
        *(
            ScalingPoint(series="devices-dag", model="skip-mlp-100", devices=f"a100-80gb x{d}", mode=mode)
            for d in devices_dag
        ),
        ScalingPoint(series="end-to-end", model="gpt2-xl", devices="a100-80gb x8", mode="training"),
    )


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            name="tiny",
            description="The end-to-end test's suite: the seed MLP and a small skip MLP, seconds.",
            comparisons=(
                Comparison(models=("mlp",), device_sets=("a100-80gb x2", "cpu x2"),
                           modes=("inference-throughput", "training")),
            ),
            scaling=(
                ScalingPoint(series="layers-dag", model="skip-mlp-10", devices="a100-80gb x2",
                             mode="inference-throughput"),
            ),
            accuracy=(AccuracyCase(model="mlp", devices=("cpu",), training=True),),
            mlp_split=True,
            repeats=3,
            job_timeout_s=300.0,
        ),
        Suite(
            name="quick",
            description=(
                "A few minutes on 2 cores: the seed MLP, a ResNet-style CNN, GPT-2 small, BERT base and the "
                "big-head model on 2-8 GPUs of two kinds, a mixed set, two 4-GPU nodes and two CPU devices, in "
                "all modes; "
                "planner growth to 5,000 nodes and 64 devices; GPT-2 XL end to end; accuracy on this CPU."
            ),
            comparisons=(
                Comparison(models=("mlp", "resnet", "gpt2", "bert-base", "big-head"),
                           device_sets=_GPU_SETS + _MIXED_AND_CPU, modes=_ALL_MODES),
            ),
            scaling=_scaling(chain=(50, 1000, 2500), dag=(33, 1000), devices_chain=(2, 8, 64), devices_dag=()),
            accuracy=_accuracy(_ACCURACY_MODELS),
            mlp_split=True,
            repeats=7,
            job_timeout_s=600.0,
        ),
        Suite(
            name="full",
            description=(
                "Every model of the issue (GPT-2 small to XL, BERT base and large, Llama-2 7B and 13B, Llama-3 "
                "70B, T5 base, ViT base, big-head, the seed MLP and the CNN) on every device set in all modes; "
                "the full growth series; accuracy on this CPU with more repeats."
            ),
            comparisons=(
                Comparison(
                    models=("mlp", "resnet", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base",
                            "bert-large", "t5-base", "vit-base", "big-head", "llama-7b", "llama-13b", "llama-70b"),
                    device_sets=_GPU_SETS + _MIXED_AND_CPU,
                    modes=_ALL_MODES,
                ),
            ),
            scaling=_scaling(chain=_SCALING_CHAIN, dag=_SCALING_DAG, devices_chain=(2, 4, 8, 16, 32, 64),
                             devices_dag=(2, 4, 8, 16, 32, 64)),
            accuracy=_accuracy(_ACCURACY_MODELS),
            mlp_split=True,
            repeats=15,
            job_timeout_s=1800.0,
        ),
    )
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Some comparison cases of a suite (`subset`): an empty tuple keeps every name."""

    models: tuple[str, ...] = ()
    device_sets: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    def args(self) -> list[str]:
        """The selection as `benchmarks.run` and `benchmarks.worker` options."""
        return [*(a for m in self.models for a in ("--model", m)),
                *(a for d in self.device_sets for a in ("--devices", d)),
                *(a for m in self.modes for a in ("--mode", m))]


def subset(suite: Suite, selection: Selection) -> Suite:
    """`suite`'s comparison cases whose model, device set and mode are among those selected,
    and nothing else (no growth series, accuracy cases or MLP split): one case or a few, for
    checking a change without running the whole suite.

    Raises:
        ValueError: A name the suite's comparisons do not use (the message lists those they do),
            or a filter that leaves no case.
    """
    models, device_sets, modes = selection.models, selection.device_sets, selection.modes
    for kind, names, used in (
        ("model", models, {m for c in suite.comparisons for m in c.models}),
        ("device set", device_sets, {d for c in suite.comparisons for d in c.device_sets}),
        ("mode", modes, {m for c in suite.comparisons for m in c.modes}),
    ):
        unknown = [n for n in names if n not in used]
        if unknown:
            raise ValueError(f"suite {suite.name!r} has no {kind} {', '.join(map(repr, unknown))}; "
                             f"its comparisons use {', '.join(sorted(used))}")

    def keep(names: tuple[str, ...], wanted: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n for n in names if not wanted or n in wanted)

    comparisons = tuple(
        Comparison(models=keep(c.models, models), device_sets=keep(c.device_sets, device_sets),
                   modes=keep(c.modes, modes))
        for c in suite.comparisons
    )
    comparisons = tuple(c for c in comparisons if c.models and c.device_sets and c.modes)
    if not comparisons:
        raise ValueError(f"no comparison of suite {suite.name!r} has the model, device set and mode named together")
    return replace(suite, comparisons=comparisons, scaling=(), accuracy=(), mlp_split=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """What one worker process runs."""

    suite: str
    index: int
    kind: Literal["compare", "scaling", "accuracy", "mlp_split"]
    model: str = ""
    training: bool = False
    runs: tuple[tuple[str, str], ...] = ()
    """compare: (device set, mode) pairs planned on one trace of the model."""
    point: ScalingPoint | None = None
    cases: tuple[AccuracyCase, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "compare":
            return f"compare {self.model} ({'training' if self.training else 'inference'}, {len(self.runs)} plans)"
        if self.kind == "scaling" and self.point is not None:
            return f"scaling {self.point.series}: {self.point.model} on {self.point.devices}"
        if self.kind == "accuracy":
            return f"accuracy {self.model} ({len(self.cases)} cases)"
        return "seed MLP: automatic vs hand-written split"


def jobs(suite: Suite) -> list[Job]:
    """The suite's jobs in a fixed order: comparisons grouped by (model, training) so that
    each model is traced once per group, then scaling points, accuracy by model, the MLP split."""
    out: list[Job] = []
    groups: dict[tuple[str, bool], list[tuple[str, str]]] = {}
    for comparison in suite.comparisons:
        for model, devices, mode in product(comparison.models, comparison.device_sets, comparison.modes):
            groups.setdefault((model, MODES[mode].training), []).append((devices, mode))
    for (model, training), runs in groups.items():
        out.append(Job(suite=suite.name, index=len(out), kind="compare", model=model, training=training,
                       runs=tuple(dict.fromkeys(runs))))
    for point in suite.scaling:
        out.append(Job(suite=suite.name, index=len(out), kind="scaling", model=point.model, point=point))
    by_model: dict[str, list[AccuracyCase]] = {}
    for case in suite.accuracy:
        by_model.setdefault(case.model, []).append(case)
    for model, cases in by_model.items():
        out.append(Job(suite=suite.name, index=len(out), kind="accuracy", model=model, cases=tuple(cases)))
    if suite.mlp_split:
        out.append(Job(suite=suite.name, index=len(out), kind="mlp_split", model="mlp"))
    return out


def suite_data(suite: Suite) -> dict[str, Any]:
    """The suite and every model, device set and mode it names, as plain data (for the result file)."""
    names = {m for c in suite.comparisons for m in c.models} | {p.model for p in suite.scaling}
    names |= {a.model for a in suite.accuracy} | ({"mlp"} if suite.mlp_split else set())
    device_sets = {d for c in suite.comparisons for d in c.device_sets} | {p.devices for p in suite.scaling}
    modes = {m for c in suite.comparisons for m in c.modes} | {p.mode for p in suite.scaling}
    return {
        "suite": asdict(suite),
        "models": {n: asdict(MODELS[n]) for n in sorted(names)},
        "device_sets": {d: list(DEVICE_SETS[d].specs) + ([f"cluster {DEVICE_SETS[d].cluster}"]
                                                         if DEVICE_SETS[d].cluster else [])
                        for d in sorted(device_sets)},
        "modes": {m: asdict(MODES[m]) for m in sorted(modes)},
    }
