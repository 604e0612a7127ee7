"""Typed options for planning: objective, training set-up, granularity and solver."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from partitioner.simulate.data import PipelineSchedule

__all__ = [
    "Objective",
    "Strategy",
    "Optimizer",
    "SolverBackend",
    "PlanOptions",
    "SolverOptions",
    "Precision",
    "Recompute",
    "TrainingOptions",
]


class Objective(str, enum.Enum):
    """What the solver minimises."""

    LATENCY = "latency"
    """One batch through the model: compute on the assigned devices plus transfers."""
    THROUGHPUT = "throughput"
    """A pipeline's period: the busiest device's compute or its transfers in or out, which
    overlap compute in the steady state (see `partitioner.solve.evaluate`)."""


class Strategy(str, enum.Enum):
    """How a plan uses its devices."""

    SINGLE = "single"
    """Every layer on one device."""
    MODEL_PARALLEL = "model_parallel"
    """Layers split over devices, transfers where the graph crosses devices."""
    DATA_PARALLEL = "data_parallel"
    """The whole model replicated on every device, the batch split between them."""


class Optimizer(str, enum.Enum):
    """Training optimizer, for its state's memory (bytes per parameter byte)."""

    NONE = "none"
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"

    @property
    def state_factor(self) -> int:
        """Optimizer state bytes per parameter byte (Adam keeps two moments)."""
        return {"none": 0, "sgd": 0, "momentum": 1, "adam": 2}[self.value]


class SolverBackend(str, enum.Enum):
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
    """Wall-clock limit of one ILP solve; the best plan found by then is returned with its gap.

    Chains never reach the ILP, nor do transformers planned for LATENCY on evenly linked
    devices (near-chains, `partitioner.solve.nearchain`). Branchy DAGs of ~200 layers on 8
    unlike devices can use it all: on one, a 10 s limit returned a plan 1.6x slower than
    the 60 s one."""
    gap: float = 1e-4
    """Relative optimality gap at which the ILP stops: (objective - bound) / objective, over
    the whole objective (compute included), as `Solution.gap` reports it."""
    max_candidates: int = 256
    """The layer graph is coarsened to at most this many layers before solving."""

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 (got {self.time_limit_s})")
        if not 0 <= self.gap < 1:
            raise ValueError(f"gap must be in [0, 1) (got {self.gap})")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1 (got {self.max_candidates})")


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
    """Consider replicating the whole model on every device."""
    memory_reserve: float = 0.1
    """Fraction of each device's memory kept free (allocator fragmentation, workspace)."""
    solver: SolverOptions = SolverOptions()
    """Solver settings."""

    def __post_init__(self) -> None:
        if not 0 <= self.memory_reserve < 1:
            raise ValueError(f"memory_reserve must be in [0, 1) (got {self.memory_reserve})")


# --------------------------------------------------------------------------- training plans


class Precision(str, enum.Enum):
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


class Recompute(str, enum.Enum):
    """Activation recomputation (checkpointing) per pipeline stage."""

    NEVER = "never"
    AUTO = "auto"
    """A stage recomputes only where its layers would not fit otherwise."""
    ALWAYS = "always"


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
    overlap_allreduce: bool = False
    """Start each stage's gradient all-reduce during its last backward (DDP's bucketing)
    instead of after it (as torch.distributed.pipelining does by default)."""
    memory_reserve: float = 0.1
    """Fraction of each device's memory kept free (allocator, workspace, communicator buffers)."""
    equal_replicas: bool = False
    """Only plans whose pipeline ranks hold the same number of replicas each: what
    `partitioner.distributed` (on `torch.distributed.pipelining`) can run. Without it a mixed
    cluster may get ranks of unequal groups (say one A100 per rank and pairs of V100s),
    which the simulator prices but no pipelining runtime here launches."""

    def __post_init__(self) -> None:
        if self.global_batch is not None and (isinstance(self.global_batch, bool) or self.global_batch < 1):
            raise ValueError(f"global_batch must be >= 1 samples (got {self.global_batch})")
        object.__setattr__(self, "schedules", tuple(PipelineSchedule(s) for s in self.schedules))
        if not self.schedules:
            raise ValueError("schedules must name at least one pipeline schedule")
        if self.max_stages is not None and self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1 (got {self.max_stages})")
        if self.max_virtual_stages < 2 and PipelineSchedule.INTERLEAVED_1F1B in self.schedules:
            raise ValueError(f"max_virtual_stages must be >= 2 for interleaved 1F1B (got {self.max_virtual_stages})")
        if not 1 <= self.min_microbatches <= self.max_microbatches:
            raise ValueError(
                f"need 1 <= min_microbatches <= max_microbatches (got {self.min_microbatches}, {self.max_microbatches})"
            )
        if not 0 <= self.memory_reserve < 1:
            raise ValueError(f"memory_reserve must be in [0, 1) (got {self.memory_reserve})")
