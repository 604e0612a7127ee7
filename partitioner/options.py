"""Typed options for planning: tracing, objective, training set-up and solver.

Every options dataclass checks its fields on construction and takes an enum's value as a
string (``PlanOptions(objective="throughput")``); a wrong value raises ValueError naming
the field, the choices and the closest one.
"""

from __future__ import annotations

import difflib
import enum
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from partitioner.simulate.data import PipelineSchedule

if TYPE_CHECKING:
    from partitioner.parallel_config import ParallelConfig

__all__ = [
    "Objective",
    "Strategy",
    "Optimizer",
    "SolverBackend",
    "PlanOptions",
    "SolverOptions",
    "Precision",
    "Recompute",
    "Sharding",
    "TrainingOptions",
    "Frontend",
    "Granularity",
    "TraceOptions",
    "SplitLayer",
    "trace_options",
    "check_split_modules",
]


class _Choice(str, enum.Enum):
    """An enum whose members are also read from their value or name in any case."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            for member in cls:
                if value.lower() in (member.value.lower(), member.name.lower()):
                    return member
        choices = [m.value for m in cls]
        close = difflib.get_close_matches(value.lower(), choices, n=1) if isinstance(value, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {cls.__name__} {value!r}: choose one of {', '.join(map(repr, choices))}{hint}")


_E = TypeVar("_E", bound=enum.Enum)


def _set_choice(obj: object, name: str, cls: type[_E]) -> None:
    """Coerce field `name` of `obj` to `cls` (a string names a member), naming the field on error."""
    value = getattr(obj, name)
    try:
        member = cls(value)
    except ValueError as e:
        raise ValueError(f"{type(obj).__name__}.{name}: {e}") from None
    object.__setattr__(obj, name, member)


def _set_choices(obj: object, name: str, cls: type[_E], empty: str, plural: str) -> None:
    """Coerce field `name` of `obj` to a non-empty tuple of `cls` members; one value named
    alone (``"1f1b"``) is a one-member tuple, not a tuple of characters.

    Raises:
        ValueError: Not a tuple of members (naming the field and the choices), or empty (`empty`).
    """
    value = getattr(obj, name)
    named = (value,) if isinstance(value, (str, type)) else value
    try:
        members = tuple(cls(v) for v in named)
    except TypeError:
        raise ValueError(f"{type(obj).__name__}.{name} must be a tuple of {plural} (got {named!r})") from None
    except ValueError as e:
        raise ValueError(f"{type(obj).__name__}.{name}: {e}") from None
    if not members:
        raise ValueError(empty)
    object.__setattr__(obj, name, members)


def _check_flag(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ValueError(f"{type(obj).__name__}.{name} must be True or False (got {value!r})")


def _check_int(obj: object, name: str, lowest: int, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lowest:
        none = " or None" if optional else ""
        raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= {lowest}{none} (got {value!r})")


def _check_fraction(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ValueError(f"{type(obj).__name__}.{name} must be in [0, 1) (got {value!r})")


class Objective(_Choice):
    """What the solver minimises."""

    LATENCY = "latency"
    """One batch through the model: compute on the assigned devices plus transfers."""
    THROUGHPUT = "throughput"
    """A pipeline's period: the busiest device's compute or its transfers in or out, which
    overlap compute in the steady state (see `partitioner.solve.evaluate`)."""


class Strategy(_Choice):
    """How a plan uses its devices."""

    SINGLE = "single"
    """Every layer on one device."""
    MODEL_PARALLEL = "model_parallel"
    """Layers split over devices, transfers where the graph crosses devices."""
    DATA_PARALLEL = "data_parallel"
    """The whole model replicated on every device, or on some of them, the batch split between them."""
    HYBRID = "hybrid"
    """Layers split over a group of devices, that split copied onto other groups of alike
    devices, the batch split between the copies (inference)."""


class Optimizer(_Choice):
    """Training optimizer, for its state's memory (bytes per parameter byte)."""

    NONE = "none"
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"

    @property
    def state_factor(self) -> int:
        """Optimizer state bytes per parameter byte (Adam keeps two moments)."""
        return {"none": 0, "sgd": 0, "momentum": 1, "adam": 2}[self.value]


class SolverBackend(_Choice):
    """Which solver places the layers."""

    AUTO = "auto"
    """An exact DP on chains and near-chains, else the ILP (HiGHS if installed, else CBC)."""
    HIGHS = "highs"
    CBC = "cbc"
    DP = "dp"
    """An exact dynamic program; only for chains and near-chains."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SolverOptions:
    """How hard the solver works."""

    backend: SolverBackend = SolverBackend.AUTO
    """Solver choice; see `SolverBackend`."""
    time_limit_s: float = 60.0
    """Wall-clock limit of one ILP solve, and of the search over the orders of unlike
    devices (`keep_device_order`); the best plan found by then is returned with its gap.

    Chains never reach the ILP, nor do transformers planned for LATENCY on evenly linked
    devices (near-chains, `partitioner.solve.nearchain`). Branchy DAGs of ~200 layers on 8
    unlike devices can use it all: on one, a 10 s limit returned a plan 1.6x slower than
    the 60 s one."""
    gap: float = 1e-4
    """Relative optimality gap at which the ILP stops: (objective - bound) / objective, over
    the whole objective (compute included), as `Solution.gap` reports it."""
    max_candidates: int = 256
    """The layer graph is coarsened to at most this many layers before solving."""
    keep_device_order: bool = False
    """Place layers along the devices in the order given. By default the solver chooses
    the order of unlike devices along the pipeline (`partitioner.solve.order`)."""

    def __post_init__(self) -> None:
        _set_choice(self, "backend", SolverBackend)
        limit = self.time_limit_s
        if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not limit > 0:
            raise ValueError(f"SolverOptions.time_limit_s must be a number of seconds > 0 (got {limit!r})")
        _check_fraction(self, "gap")
        _check_int(self, "max_candidates", 1)
        _check_flag(self, "keep_device_order")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """What is planned for."""

    objective: Objective = Objective.LATENCY
    """What the solver minimises."""
    training: bool = False
    """Plan a training step (forward + backward, gradients, optimizer state) rather than inference."""
    optimizer: Optimizer = Optimizer.ADAM
    """Optimizer whose state counts towards memory when training."""
    allow_data_parallel: bool = True
    """Consider replicating the model, the batch split between the copies: whole on every device or
    on some of them, or (inference) a split of it on each of several groups of alike devices."""
    memory_reserve: float = 0.1
    """Fraction of each device's memory kept free (allocator fragmentation, workspace)."""
    solver: SolverOptions = SolverOptions()
    """Solver settings."""

    def __post_init__(self) -> None:
        _set_choice(self, "objective", Objective)
        _check_flag(self, "training")
        _set_choice(self, "optimizer", Optimizer)
        _check_flag(self, "allow_data_parallel")
        _check_fraction(self, "memory_reserve")
        if not isinstance(self.solver, SolverOptions):
            raise ValueError(f"PlanOptions.solver must be a SolverOptions (got {self.solver!r})")


def check_split_modules(
    split_modules: str | type | Iterable[str | type],
    model_classes: Iterable[str],
    model_name: str = "the model",
    *,
    no_split_module_classes: str | type | Iterable[str | type] = (),
) -> tuple[str, ...]:
    """The class names to keep whole (one layer each), checked against the model's classes.

    Args:
        split_modules: Class names, plain (``GPT2Block``) or qualified
            (``transformers.models.gpt2.modeling_gpt2.GPT2Block``), or the classes
            themselves; one name alone is taken as a list of one.
        model_classes: Qualified class names (``module.QualName``) of the model's modules.
        model_name: What to call the model in messages.
        no_split_module_classes: More of them, in Accelerate's spelling (joined to the first).

    Returns:
        The names, qualified where a class was given.

    Raises:
        ValueError: A name that no module of the model has (a typo would otherwise group
            nothing, silently); the message names the close matches and the model's classes.
    """
    names = [
        *_class_names(split_modules, "split_modules"),
        *_class_names(no_split_module_classes, "no_split_module_classes"),
    ]
    qualified = set(model_classes)
    plain = {q.rsplit(".", 1)[-1]: q for q in sorted(qualified)}
    for name in names:
        if name in qualified or name in plain:
            continue
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(plain), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        # The model's own classes first: torch.nn's leaves (Linear, Dropout) rarely are what is meant.
        ordered = sorted(plain, key=lambda c: (plain[c].startswith("torch.nn."), c))
        shown = ", ".join(ordered[:20]) + (f", ... ({len(ordered)} in all)" if len(ordered) > 20 else "")
        raise ValueError(
            f"split_modules names {name!r}, but no module of {model_name} has that class{hint} "
            f"(its classes: {shown})"
        )
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------- tracing


class Frontend(_Choice):
    """Which tracer turns the model into a graph."""

    AUTO = "auto"
    """torch.fx, and torch.export where fx fails or would record the model unfaithfully."""
    FX = "fx"
    """torch.fx symbolic tracing only."""
    EXPORT = "export"
    """torch.export only."""


class Granularity(_Choice):
    """What one layer of the plan is."""

    BLOCK = "block"
    """A repeated block (a transformer layer, a module of a ModuleList) and the ops between blocks."""
    LEAF = "leaf"
    """Every leaf module (Linear, LayerNorm) and every op outside one."""
    AUTO = "auto"
    """Blocks, then, under the THROUGHPUT objective while the busiest device carries more
    than its even share (total compute / devices) by more than the solver's gap, the
    layers beside each cut split into their children (a transformer block into attention
    and MLP, then into leaves) and solved again (`partitioner.api.compile_plan`)."""


@dataclass(frozen=True, slots=True)
class SplitLayer:
    """A linear layer cut column-wise into `pieces` layers (``module@0/4`` .. ``module@3/4``),
    each computing its share of the output features, joined by a concatenation
    (`partitioner.split_layers`): what lets a layer heavier than total / devices spread."""

    module: str
    """Path of the ``nn.Linear`` (``lm_head``)."""
    pieces: int
    """How many column pieces (>= 2)."""

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module or isinstance(self.pieces, bool) or not (
            isinstance(self.pieces, int) and self.pieces >= 2
        ):
            raise ValueError(f"SplitLayer needs a module path and pieces >= 2 (got {self.module!r}, {self.pieces!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceOptions:
    """How the model is traced and cut into layers (what a plan's layers are)."""

    frontend: Frontend = Frontend.AUTO
    """The tracer; see `Frontend`."""
    granularity: Granularity = Granularity.AUTO
    """The layer size; see `Granularity`."""
    split_modules: tuple[str, ...] = ()
    """Classes kept whole, one layer each: plain (``GPT2Block``) or qualified class names,
    or the classes (stored as qualified names). Accelerate spells it ``no_split_module_classes``.
    Checked against the model's classes when it is traced (`check_split_modules`)."""
    refine: tuple[str, ...] = ()
    """Module paths (``transformer.h.3``, ``transformer.h.3.attn``) split into their
    children on top of block granularity: what ``auto`` chose, recorded in
    `partitioner.plan.Plan.refined` and replayed when a saved plan is applied."""
    split: tuple[SplitLayer, ...] = ()
    """Linear layers cut into column pieces (``auto`` chooses them for a layer heavier than
    the even share; `partitioner.plan.Plan.split` records them for a saved plan)."""

    def __post_init__(self) -> None:
        _set_choice(self, "frontend", Frontend)
        _set_choice(self, "granularity", Granularity)
        object.__setattr__(self, "split_modules", _class_names(self.split_modules, "TraceOptions.split_modules"))
        refine = (self.refine,) if isinstance(self.refine, str) else self.refine
        if not isinstance(refine, (tuple, list)) or not all(isinstance(r, str) and r for r in refine):
            raise ValueError(f"TraceOptions.refine must hold module paths (strings) (got {self.refine!r})")
        if refine and self.granularity is Granularity.LEAF:
            raise ValueError("TraceOptions.refine splits blocks, but granularity 'leaf' has none; use 'auto' or 'block'")
        object.__setattr__(self, "refine", tuple(dict.fromkeys(refine)))
        if not all(isinstance(x, SplitLayer) for x in self.split):
            raise ValueError(f"TraceOptions.split must hold SplitLayer records (got {self.split!r})")
        object.__setattr__(self, "split", tuple(self.split))


def trace_options(
    trace: TraceOptions | None = None,
    *,
    frontend: Frontend | str | None = None,
    granularity: Granularity | str | None = None,
    split_modules: str | type | Iterable[str | type] = (),
    no_split_module_classes: str | type | Iterable[str | type] = (),
) -> TraceOptions:
    """`trace`, or the `TraceOptions` that the keyword spellings of the front doors name.

    Raises:
        ValueError: Both `trace` and a keyword spelling are given (which one holds would be a guess).
    """
    names = (
        *_class_names(split_modules, "split_modules"),
        *_class_names(no_split_module_classes, "no_split_module_classes"),
    )
    if trace is None:
        fields: dict[str, Any] = {"frontend": frontend or "auto", "granularity": granularity or "auto"}
        return TraceOptions(**fields, split_modules=names)  # strings are read (and checked) there
    if not isinstance(trace, TraceOptions):
        raise ValueError(f"trace must be a TraceOptions (got {trace!r})")
    given = [k for k, v in (("frontend", frontend), ("granularity", granularity), ("split_modules", names)) if v]
    if given:
        raise ValueError(f"give either trace=TraceOptions(...) or {', '.join(given)}=, not both")
    return trace


def _class_names(value: object, what: str) -> tuple[str, ...]:
    """Class names (qualified for a class) from a name, a class, or an iterable of them."""
    items = [value] if isinstance(value, (str, type)) else value
    try:
        items = list(items)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{what} must hold class names (strings) or classes (got {value!r})") from None
    names: list[str] = []
    for item in items:
        if isinstance(item, type):
            item = f"{item.__module__}.{item.__qualname__}"
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what} must hold class names (strings) or classes (got {item!r})")
        names.append(item)
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------- training plans


class Precision(_Choice):
    """Number formats of a training step (what its memory and its compute ceiling depend on)."""

    AUTO = "auto"
    """``bf16`` where every device has a bfloat16 path, else ``fp16`` where every device
    has a float16 one (V100), else ``fp32``."""
    FP32 = "fp32"
    """Weights, gradients, optimizer state and activations in float32."""
    BF16 = "bf16"
    """Mixed precision: bfloat16 weights, gradients and activations, float32 master weights
    and optimizer state (Micikevicius et al. 2018, arXiv:1710.03740)."""
    FP16 = "fp16"
    """As `BF16` with float16 (and loss scaling, which costs no memory)."""

    @property
    def compute_dtype(self) -> str:
        """The dtype whose peak FLOP/s the roofline uses (``float32``, ``bfloat16``, ``float16``)."""
        if self is Precision.AUTO:
            raise ValueError("Precision.AUTO has no dtype until it is resolved for the devices")
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.value]

    @property
    def element_bytes(self) -> int:
        """Bytes of one weight, gradient or activation element (4, or 2 when mixed)."""
        return 4 if self is Precision.FP32 else 2

    @property
    def mixed(self) -> bool:
        """Half-precision compute with float32 master weights."""
        return self in (Precision.BF16, Precision.FP16)


class Recompute(_Choice):
    """Activation recomputation (checkpointing) per pipeline stage."""

    NEVER = "never"
    AUTO = "auto"
    """Each stage takes the cheapest of none, selective and full that fits its memory."""
    SELECTIVE = "selective"
    """Every stage recomputes at least its attention cores (scores, softmax, weighted sum:
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models"), and the whole forward where that does not fit."""
    ALWAYS = "always"
    """Every stage recomputes its whole forward, keeping only its input per microbatch."""


class Sharding(_Choice):
    """What the data-parallel replicas of a stage shard among themselves (ZeRO, Rajbhandari et
    al. 2020; FSDP2's ``fully_shard``) instead of each holding a whole copy."""

    NONE = "none"
    """Replicated (DDP): every replica holds weights, gradients and optimizer state."""
    ZERO1 = "zero1"
    """Optimizer state (and float32 master weights) sharded; gradients all-reduced."""
    ZERO2 = "zero2"
    """Optimizer state and gradients sharded (gradients reduce-scattered)."""
    ZERO3 = "zero3"
    """Parameters too (FSDP): all-gathered before each layer's forward and again before its
    backward (FSDP2 ``reshard_after_forward=True``)."""
    ZERO3_KEEP = "zero3-keep"
    """Parameters sharded between steps but kept whole from a layer's forward to its backward
    (FSDP2 ``reshard_after_forward=False``): one all-gather fewer, more memory."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingOptions:
    """What a training plan (`partitioner.training.plan_training`) may choose from.

    The planner picks the stages, replicas per stage, microbatch count, schedule and
    recomputation inside these limits; see docs/training.md for the search space.
    """

    global_batch: int | None = None
    """Samples per optimizer step; None takes the example inputs' batch size."""
    optimizer: Optimizer = Optimizer.ADAM
    """Whose state counts towards memory (Adam and AdamW keep two moments)."""
    precision: Precision = Precision.AUTO
    """Number formats; see `Precision`."""
    schedules: tuple[PipelineSchedule, ...] = (
        PipelineSchedule.GPIPE,
        PipelineSchedule.ONE_F_ONE_B,
        PipelineSchedule.INTERLEAVED_1F1B,
    )
    """Pipeline schedules to consider."""
    max_stages: int | None = None
    """Most pipeline stages (counting every virtual stage); None: up to one per layer."""
    max_virtual_stages: int = 4
    """Most stages per rank under interleaved 1F1B (2 up to this)."""
    min_microbatches: int = 1
    """Fewest microbatches per step."""
    max_microbatches: int = 128
    """Most microbatches per step (simulation time grows with stages x microbatches)."""
    recompute: Recompute = Recompute.AUTO
    """Activation recomputation per stage."""
    tensor_parallel: tuple[int, ...] = (1, 2, 4, 8)
    """Tensor-parallel degrees to consider (Megatron-style column -> row pairs found on the
    traced graph); a degree must divide the devices of a node and every sharded width."""
    sequence_parallel: bool = True
    """With tensor parallelism, also shard the norms and dropouts between the pairs on the
    sequence (Korthikanti et al. 2022): activations divide by the degree, the same bytes move."""
    shardings: tuple[Sharding, ...] = tuple(Sharding)
    """Data-parallel sharding (ZeRO stages, FSDP) to consider."""
    config: ParallelConfig | None = None
    """Only configurations with these fixed degrees, sharding, microbatches, schedule,
    recomputation and split (`partitioner.parallel_config`: price a set-up you name, or
    search a grid); None: the whole space."""
    overlap_allreduce: bool = False
    """Start each stage's gradient all-reduce during its last backward (DDP's bucketing)
    instead of after it (as torch.distributed.pipelining does by default)."""
    memory_reserve: float = 0.1
    """Fraction of each device's memory kept free (allocator, workspace, communicator buffers)."""
    zero1_weight_shard: bool = True
    """Count the 1/d shard of the weights that ZeRO-1 keeps beside the whole weights, as
    `partitioner.distributed` runs it (FSDP2). False prices ZeRO-1 as DeepSpeed holds it
    (whole weights, gradients, 1/d of the optimizer state), to compare such a set-up; a plan
    priced so holds less than partitioner.distributed would."""
    equal_replicas: bool = False
    """Only plans whose pipeline ranks hold the same number of replicas each: what
    `partitioner.distributed` (on `torch.distributed.pipelining`) can run. Without it a mixed
    cluster may get ranks of unequal groups (say one A100 per rank and pairs of V100s),
    which the simulator prices but no pipelining runtime here launches."""

    def __post_init__(self) -> None:
        _check_int(self, "global_batch", 1, optional=True)
        _set_choice(self, "optimizer", Optimizer)
        _set_choice(self, "precision", Precision)
        _set_choice(self, "recompute", Recompute)
        _set_choices(self, "schedules", PipelineSchedule, "schedules must name at least one pipeline schedule", "schedules")
        _set_choices(
            self, "shardings", Sharding, "shardings must name at least one (Sharding.NONE: replicated)", "shardings"
        )
        degrees = (self.tensor_parallel,) if isinstance(self.tensor_parallel, int) else self.tensor_parallel
        if (
            not isinstance(degrees, tuple)
            or not degrees
            or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1 for t in degrees)
        ):
            raise ValueError(
                f"TrainingOptions.tensor_parallel must be a non-empty tuple of integers >= 1 (got {self.tensor_parallel!r})"
            )
        object.__setattr__(self, "tensor_parallel", tuple(sorted({int(t) for t in degrees})))
        _check_int(self, "max_stages", 1, optional=True)
        _check_int(self, "max_virtual_stages", 1)
        _check_int(self, "min_microbatches", 1)
        _check_int(self, "max_microbatches", 1)
        if self.config is not None:
            from partitioner.parallel_config import ParallelConfig, parse_config

            if isinstance(self.config, str):
                object.__setattr__(self, "config", parse_config(self.config))
            elif not isinstance(self.config, ParallelConfig):
                raise ValueError(
                    f"TrainingOptions.config must be a ParallelConfig or its text (tp=8,pp=4,...) (got {self.config!r})"
                )
        for flag in ("overlap_allreduce", "equal_replicas", "sequence_parallel", "zero1_weight_shard"):
            _check_flag(self, flag)
        _check_fraction(self, "memory_reserve")
        if self.max_virtual_stages < 2 and PipelineSchedule.INTERLEAVED_1F1B in self.schedules:
            raise ValueError(f"max_virtual_stages must be >= 2 for interleaved 1F1B (got {self.max_virtual_stages})")
        if not 1 <= self.min_microbatches <= self.max_microbatches:
            raise ValueError(
                f"need 1 <= min_microbatches <= max_microbatches (got {self.min_microbatches}, {self.max_microbatches})"
            )

