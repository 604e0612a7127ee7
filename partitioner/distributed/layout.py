"""Pure: a plan -> which process runs what (`Layout`). No torch here.

A launch runs one process per device the plan uses. Process (global rank) ``g`` runs the
``g``-th of those devices in plan order: plan devices are listed node by node, as
``torchrun`` numbers ranks (``node_rank x nproc_per_node + local_rank``), so every process
lands on the node whose device the planner priced. For stages on groups of consecutive
devices ("replicas in a node") this is stage 0's replicas, then stage 1's, and so on.

A *pipeline rank* is the device group that runs one stage (``v`` stages when interleaved:
stage ``j`` on pipeline rank ``j % p``); each of its devices holds a replica. Replica
``i`` of every pipeline rank forms pipeline ``i`` (the ``i``-th device of each group, in
the group's ring order): its processes pass activations and gradients to each other, and
the ``R`` replicas of a pipeline rank all-reduce their gradients. So every pipeline rank
needs the same number of replicas ``R``: `torch.distributed.pipelining` sends each
microbatch from one process to one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.errors import PlanMismatchError
from partitioner.options import Strategy
from partitioner.plan import Plan
from partitioner.tp_layout import TensorParallelError

__all__ = ["SCHEDULES", "StageSpec", "Layout", "plan_layout", "stage_layers", "check_launch", "check_degree"]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
"""Schedules that lower to `torch.distributed.pipelining` (`ScheduleGPipe`, `Schedule1F1B`,
`ScheduleInterleaved1F1B`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StageSpec:
    """One pipeline stage: its layers and the pipeline rank that runs it."""

    index: int
    rank: int
    """Pipeline rank (``index % p``)."""
    layers: tuple[int, ...]
    """Indices into `Plan.layers`, ascending."""
    recompute: bool = False
    """Whether it recomputes its forward during backward (activation checkpointing)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """What each process of a launch runs: stages, replica groups, schedule and batch split."""

    stages: tuple[StageSpec, ...]
    groups: tuple[tuple[int, ...], ...]
    """``groups[r]``: plan device indices of pipeline rank ``r``'s replicas, in ring order."""
    devices: tuple[int, ...]
    """``devices[g]``: the plan device index process ``g`` runs (ascending)."""
    schedule: str
    """One of `SCHEDULES`."""
    microbatches: int
    global_batch: int
    """Samples per step over all replicas."""
    tensor_parallel: int = 1
    """Consecutive replicas of a pipeline rank that split its stages' tensors and share one
    batch slice (the ``tp`` of a ``dp x tp`` grid); only the ``replicas / tensor_parallel``
    data-parallel replicas split the batch."""

    def __post_init__(self) -> None:
        p, m, tp = len(self.groups), self.microbatches, self.tensor_parallel
        check_degree(tp, self.replicas, f"{len(self.devices)} processes, {len(self.stages)} stage(s)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if m < 1:
            raise ValueError(f"microbatches must be >= 1 (got {m})")
        if len(self.stages) % p:
            raise ValueError(f"{len(self.stages)} stages do not split evenly over {p} pipeline ranks")
        v = self.virtual_stages
        if self.schedule == "interleaved_1f1b" and v < 2:
            raise ValueError(
                f"interleaved_1f1b needs several stages per pipeline rank (the plan has {len(self.stages)} stages "
                f"on {p} ranks); use 1f1b or gpipe"
            )
        if self.schedule != "interleaved_1f1b" and v > 1:
            raise ValueError(
                f"the plan puts {v} stages on each of its {p} pipeline ranks; only interleaved_1f1b runs that"
            )
        if self.schedule == "1f1b" and m < len(self.stages):
            raise ValueError(
                f"1f1b needs at least one microbatch per stage (microbatches: {m}, stages: {len(self.stages)}); "
                f"use {len(self.stages)} or more microbatches, or gpipe"
            )
        if self.schedule == "interleaved_1f1b" and m % max(1, m // p):
            # torch's interleaved schedule runs rounds of m // p microbatches, m a multiple of them.
            raise ValueError(
                f"interleaved_1f1b on {p} ranks takes a multiple of {max(1, m // p)} microbatches (got {m})"
            )
        if self.global_batch % (self.data_parallel * m):
            split = f" ({self.replicas} replicas / tensor-parallel {tp})" if tp > 1 else ""
            raise ValueError(
                f"a step's {self.global_batch} samples do not split into {self.data_parallel} data-parallel "
                f"replica(s){split} x {m} microbatches; use a global batch that is a multiple of "
                f"{self.data_parallel * m}"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def pipeline_ranks(self) -> int:
        """``p``: device groups along the pipeline."""
        return len(self.groups)

    @property
    def virtual_stages(self) -> int:
        """``v``: stages per pipeline rank."""
        return len(self.stages) // len(self.groups)

    @property
    def replicas(self) -> int:
        """``R``: devices per group (every group has as many)."""
        return len(self.groups[0])

    @property
    def data_parallel(self) -> int:
        """Replicas that take their own slice of the batch (``replicas / tensor_parallel``)."""
        return len(self.groups[0]) // self.tensor_parallel

    @property
    def world_size(self) -> int:
        """Processes of the launch: one per device used."""
        return len(self.devices)

    @property
    def replica_batch(self) -> int:
        """Samples per step on each data-parallel replica (its tensor-parallel ranks share them)."""
        return self.global_batch // self.data_parallel

    @property
    def microbatch_size(self) -> int:
        """Samples of one microbatch on one data-parallel replica."""
        return self.global_batch // (self.data_parallel * self.microbatches)

    # ------------------------------------------------------------------ who is where
    def position(self, rank: int) -> tuple[int, int]:
        """(pipeline rank, replica index) of process `rank`."""
        device = self.devices[rank]
        for r, group in enumerate(self.groups):
            if device in group:
                return r, group.index(device)
        raise AssertionError(f"device {device} is in no group")  # unreachable: `plan_layout` checks it

    def process(self, pipeline_rank: int, replica: int) -> int:
        """Global rank of replica `replica` of pipeline rank `pipeline_rank`."""
        return self.devices.index(self.groups[pipeline_rank][replica])

    def pipeline_group(self, replica: int) -> tuple[int, ...]:
        """Global ranks of pipeline `replica`, in pipeline order (they exchange activations)."""
        return tuple(self.process(r, replica) for r in range(self.pipeline_ranks))

    def replica_group(self, pipeline_rank: int) -> tuple[int, ...]:
        """Global ranks holding replicas of `pipeline_rank`'s stages (they all-reduce gradients)."""
        return tuple(self.process(pipeline_rank, i) for i in range(self.replicas))

    def stages_of(self, pipeline_rank: int) -> tuple[StageSpec, ...]:
        """The stages `pipeline_rank` runs, in order."""
        return tuple(s for s in self.stages if s.rank == pipeline_rank)

    def describe(self) -> str:
        """``2 stages x 2 replicas, 1f1b, 4 microbatches of 2 samples (4 processes)`` and the like."""
        shape = f"{len(self.stages)} stage{'s' * (len(self.stages) > 1)}"
        if self.virtual_stages > 1:
            shape += f" on {self.pipeline_ranks} ranks"
        if self.replicas > 1:
            shape += f" x {self.replicas} replicas"
        if self.tensor_parallel > 1:
            shape += f" (tp {self.tensor_parallel} x dp {self.data_parallel})"
        return (
            f"{shape}, {self.schedule}, {self.microbatches} microbatch{'es' * (self.microbatches > 1)} "
            f"of {self.microbatch_size} sample{'s' * (self.microbatch_size > 1)} "
            f"({self.world_size} process{'es' * (self.world_size > 1)})"
        )


def check_degree(tensor_parallel: int, replicas: int, launch: str) -> None:
    """Check that `tensor_parallel` is a degree that splits a pipeline rank's `replicas` into
    tensor-parallel groups (`launch`: the launch in words, for the message).

    Raises:
        TensorParallelError: It is not an integer >= 1, or does not divide `replicas`.
    """
    tp = tensor_parallel
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TensorParallelError(f"tensor-parallel degree must be an integer >= 1 (got {tp!r})")
    if replicas % tp:
        raise TensorParallelError(
            f"the mesh does not match the launch: each pipeline rank has {replicas} replica(s) ({launch}), "
            f"which tensor-parallel degree {tp} does not divide; use a degree dividing {replicas}, or plan "
            f"{tp} x (data-parallel degree) replicas per stage"
        )


def plan_layout(
    plan: Plan,
    *,
    schedule: str | None = None,
    microbatches: int | None = None,
    global_batch: int | None = None,
    tensor_parallel: int | None = None,
) -> Layout:
    """The launch layout of `plan`.

    A plan with a pipeline (`partitioner.training`) gives its stages, groups, schedule,
    microbatches and global batch; the arguments override the last three. A plan without
    one (`partitioner.plan`) runs one stage per device it uses (ordered by device index,
    along which its layers never flow back), replicated over the plan's copies
    (`Plan.replicas`); a data-parallel plan one stage on every device that holds a replica. Their schedule defaults to 1F1B, their microbatches to one per stage,
    their global batch to the plan's batch. `tensor_parallel` (default the pipeline's
    ``tensor_parallel``, else 1) groups each rank's replicas into tensor-parallel ranks that
    share a batch slice.

    Raises:
        PlanMismatchError: The pipeline's ranks have different replica counts (which
            `torch.distributed.pipelining` cannot run).
        TensorParallelError: The tensor-parallel degree does not divide the replicas.
        ValueError: The schedule, microbatches or batch do not fit the stages
            (`Layout` says which).
    """
    p = plan.pipeline
    if p is not None:
        ranks = p.num_ranks
        groups = tuple(p.stages[r].devices for r in range(ranks))
        counts = [len(g) for g in groups]
        if len(set(counts)) > 1:
            raise PlanMismatchError(
                f"the plan's pipeline ranks hold {'/'.join(map(str, counts))} replicas; torch.distributed.pipelining "
                "passes each microbatch from one process to one process, so every rank needs the same number of "
                "replicas. Plan again with TrainingOptions(equal_replicas=True) (partitioner plan --train "
                "--equal-replicas), or with devices that split evenly"
            )
        stages = tuple(
            StageSpec(
                index=s.index, rank=s.rank, layers=tuple(range(s.first_layer, s.last_layer + 1)), recompute=s.recompute
            )
            for s in p.stages
        )
        chosen_schedule = schedule or p.schedule
        chosen_microbatches = microbatches or p.microbatches
        batch = global_batch or p.global_batch
    else:
        copies = plan.replica_groups
        if plan.strategy is Strategy.DATA_PARALLEL:
            groups = (tuple(g[0] for g in copies),)
        else:  # rank r: the r-th device of every copy (one device per rank without copies)
            groups = tuple(tuple(c[copies[0].index(d)] for c in copies) for d in sorted(set(plan.assignment)))
        stages = tuple(StageSpec(index=k, rank=k, layers=layers) for k, layers in enumerate(stage_layers(plan)))
        chosen_schedule = schedule or "1f1b"
        chosen_microbatches = microbatches or len(stages)
        batch = global_batch or plan.batch_size
    devices = tuple(sorted(d for g in groups for d in g))
    if len(set(devices)) != len(devices):
        raise PlanMismatchError(f"a device serves two pipeline ranks in the plan (groups {list(map(list, groups))})")
    return Layout(
        stages=stages,
        groups=groups,
        devices=devices,
        schedule=chosen_schedule,
        microbatches=chosen_microbatches,
        global_batch=batch,
        tensor_parallel=tensor_parallel if tensor_parallel is not None else (p.tensor_parallel if p is not None else 1),
    )


def stage_layers(plan: Plan) -> tuple[tuple[int, ...], ...]:
    """The layers of each stage of `plan` (indices into `Plan.layers`), stage by stage, as `plan_layout` runs them.

    A plan with a pipeline: its stages' layer ranges. Without one: one stage per device
    the plan uses, by device index; a data-parallel plan: one stage of every layer.
    """
    if plan.pipeline is not None:
        return tuple(tuple(range(s.first_layer, s.last_layer + 1)) for s in plan.pipeline.stages)
    if plan.strategy is Strategy.DATA_PARALLEL:
        return (tuple(range(len(plan.layers))),)
    return tuple(
        tuple(i for i, d in enumerate(plan.assignment) if d == device) for device in sorted(set(plan.assignment))
    )


def check_launch(layout: Layout, world_size: int, rank: int, device_names: Sequence[str]) -> None:
    """Check a launch of `world_size` processes against the layout.

    Raises:
        PlanMismatchError: The launch has another number of processes, or `rank` is out of range.
    """
    need = layout.world_size
    if world_size != need:
        names = ", ".join(device_names[d] for d in layout.devices)
        raise PlanMismatchError(
            f"the plan runs on {need} device(s) ({layout.describe()}: {names}) but {world_size} process(es) "
            f"were launched; launch {need}: torchrun --nproc-per-node {need} your_script.py "
            f"(or --nnodes N --nproc-per-node {need}/N across N machines)"
        )
    if not 0 <= rank < world_size:
        raise PlanMismatchError(f"process rank {rank} is outside 0..{world_size - 1}; check RANK and WORLD_SIZE")
