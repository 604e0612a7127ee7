"""Typed options for planning: objective, training set-up, granularity and solver."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Objective", "Strategy", "Optimizer", "SolverBackend", "PlanOptions", "SolverOptions"]


class Objective(str, enum.Enum):
    """What the solver minimises."""

    LATENCY = "latency"
    """One batch through the model: compute on the assigned devices plus transfers."""
    THROUGHPUT = "throughput"
    """The slowest device's compute plus its transfers (what pipelining overlaps)."""


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
