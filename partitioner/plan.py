"""A plan: what goes where, what it costs, and how sure the solver is. Pure data.

A plan prints as a readable table (`partitioner.report`), saves as JSON and loads back
(`Plan.to_json` / `Plan.from_json`, validated by `partitioner.plan_json`, never pickle), and exports an
Accelerate-style ``device_map``. A training plan from `partitioner.training` also holds a
`PipelinePlan`: its stages (layer ranges on replicated device groups, per-stage times and
memory), microbatches, schedule, runner-up strategies and throughput.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from partitioner.options import Objective, SplitLayer, Strategy

if TYPE_CHECKING:
    from partitioner.simulate import StageCost, Timeline

__all__ = [
    "PLAN_VERSION",
    "PlanDevice",
    "PlanLayer",
    "PlanTransfer",
    "SolverInfo",
    "PlanStage",
    "PlanCandidate",
    "PipelinePlan",
    "Plan",
]

PLAN_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanDevice:
    """One device of the plan and what it carries."""

    name: str
    """As the user named it (``cuda:0``, ``cpu:1``, ``a100-80gb:2``)."""
    profile: str
    """Device profile the estimates used."""
    kind: str
    """``cpu`` or ``gpu``."""
    torch_device: str | None
    """Device string for torch, None when the device is absent (estimated only)."""
    capacity_bytes: int
    """Memory the plan may use on it (after the reserve)."""
    memory_bytes: int
    """Memory the plan needs on it."""
    param_bytes: int
    """Parameter and buffer bytes on it."""
    compute_s: float
    """Seconds of compute per step."""
    transfer_in_s: float
    """Seconds of transfers into it per step."""
    transfer_out_s: float
    """Seconds of transfers out of it per step."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanLayer:
    """One layer and where it goes."""

    name: str
    modules: tuple[str, ...]
    """Qualified names of the modules it holds."""
    params: tuple[str, ...]
    """Qualified names of the tensors it owns; a tied tensor under each of its names
    (T5's ``shared.weight`` and ``encoder.embed_tokens.weight``)."""
    device: int
    """Index into `Plan.devices` (0 for every layer under data parallelism)."""
    compute_s: float
    """Seconds on its device per step."""
    memory_bytes: int
    time_source: str = ""
    """Where `compute_s` comes from: ``measured``, ``calibrated`` or ``roofline``
    (`partitioner.ir.TIME_SOURCES`; the least sure of a stage's device kinds); empty in
    plans written before this field existed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanTransfer:
    """A value moved between devices once per step."""

    value: str
    """Graph node whose result moves (``add_32``; the fx or export graph's name)."""
    src: int
    dst: int
    bytes: int
    seconds: float
    module: str = ""
    """The module that produces it, as a person names it: its qualified name (``encoder.block.1``),
    ``input <name>`` for a model input, the tensor's name for a weight, the model's class for
    an op of its own ``forward``; empty in plans written before this field existed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SolverInfo:
    """How the placement was found."""

    method: str
    """``dp``, ``highs``, ``cbc``, ``brute`` or ``replicate``; ``dp+replicate`` (and the like) for
    copies of a placement the named method found."""
    optimal: bool
    """Whether optimality was proved (within the requested gap)."""
    gap: float
    """Relative gap between the plan and the best proved bound."""
    orders: int = 1
    """Distinct orders of the devices along the pipeline the placement was chosen among
    (1: identical devices, data parallelism, or the order kept as given); `Plan.devices`
    lists the devices in the order chosen."""
    orders_solved: int = 1
    """Of those, the orders placed by a solver; the others were cut by a lower bound."""
    orders_exhaustive: bool = True
    """Whether every order was solved or cut by a bound; False: some were left unsolved
    (out of time, or too many to weigh one by one). Either way ``optimal`` and ``gap``
    hold over every order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanStage:
    """One pipeline stage of a training plan: contiguous layers, replicated over a device group.

    Times are seconds per microbatch (all-reduce and optimizer step: per step), sizes bytes per device.
    Peak memory is ``weight + grad + optimizer + buffer + recompute bytes`` plus
    ``inflight_microbatches x microbatch_activation_bytes``.
    """

    index: int
    rank: int
    """The pipeline rank running it (its index, unless ranks hold several stages when interleaved)."""
    first_layer: int
    """Index into `Plan.layers` of its first layer."""
    last_layer: int
    """Index into `Plan.layers` of its last layer (inclusive)."""
    devices: tuple[int, ...]
    """Indices into `Plan.devices` of its replicas (data parallel inside the stage)."""
    profile: str
    """Device profile of its replicas (``a+b`` for a group of two kinds, run at the slower's pace)."""
    samples: int
    """Samples of one microbatch on each data-parallel replica (its `tensor_parallel` devices share them)."""
    recompute: bool
    """Whether it recomputes its forward in backward, keeping only its input per microbatch (full)."""
    fwd_s: float
    """Forward of one microbatch, its tensor-parallel all-reduces and exposed ZeRO-3 gathers included."""
    bwd_s: float
    """Backward of one microbatch, the recomputed forward (or attention cores) and the
    exposed communication included."""
    send_fwd_s: float
    """Activations of one microbatch to the next stage."""
    send_bwd_s: float
    """Input gradients of one microbatch to the previous stage."""
    allreduce_s: float
    """Ring all-reduce of its gradients over its data-parallel replicas (ZeRO-1: and the
    updated weights' all-gather; ZeRO-2: a reduce-scatter and the all-gather; ZeRO-3:
    none), and of a tied weight's gradients with the other stages holding a copy, once per step."""
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    """Optimizer state, and the float32 master weights under mixed precision."""
    buffer_bytes: int
    """Model buffers, and send and receive buffers for one microbatch at each boundary."""
    recompute_bytes: int
    """Activations of one microbatch rebuilt during its backward (0 without recomputation)."""
    microbatch_activation_bytes: int
    """Kept per microbatch in flight: saved activations, or the stage's input when recomputing."""
    inflight_microbatches: int
    """Most microbatches between forward and backward at once, under the schedule."""
    peak_memory_bytes: int
    capacity_bytes: int
    """Memory each device of the stage may use (after the reserve; a share of it when interleaved)."""
    selective: bool = False
    """Whether it recomputes its attention cores in backward (selective recomputation;
    `recompute` is then False); `recompute_bytes` are the cores' activations."""
    tp_comm_s: float = 0.0
    """Tensor-parallel all-reduces of one microbatch's forward, on the critical path; in
    `fwd_s`, and again in `bwd_s` (twice when it recomputes its forward)."""
    dp_comm_fwd_s: float = 0.0
    """ZeRO-3 all-gathers of one microbatch's forward that compute does not hide (in `fwd_s`)."""
    dp_comm_bwd_s: float = 0.0
    """ZeRO-2/3 all-gathers and reduce-scatters of one microbatch's backward that compute does not hide (in `bwd_s`)."""
    optimizer_s: float = 0.0
    """The optimizer step over the parameters each device updates (its shard under ZeRO), once
    per step, after its last backward and all-reduce (0 in plans from before it was priced)."""
    host_sends: bool = False
    """Whether its sends hold its compute lane until they have left: a CPU's, whose cores both
    compute and move the bytes (gloo's threads, or the copy itself). A GPU's sends run
    beside its kernels (False)."""
    gathered_bytes: int = 0
    """Unsharded working weights under ZeRO-3 (the two largest layers: in use and
    prefetched); all its weights under zero3-keep (between forward and backward), zero2
    and zero1 (over the step). The weight, grad and optimizer bytes are the device's
    shards (zero1's gradients are whole)."""

    @property
    def collective_fwd_s(self) -> float:
        """Of `fwd_s`, collectives on the critical path (tensor-parallel all-reduces, exposed ZeRO-3 gathers)."""
        return min(self.fwd_s, self.tp_comm_s + self.dp_comm_fwd_s)

    @property
    def collective_bwd_s(self) -> float:
        """Of `bwd_s`, the same in the backward (the recomputed forward's all-reduces too)."""
        return min(self.bwd_s, self.tp_comm_s * (2 if self.recompute else 1) + self.dp_comm_bwd_s)

    @property
    def static_bytes(self) -> int:
        """What the stage holds throughout the step (the simulator's ``static_bytes``)."""
        return (
            self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.gathered_bytes + self.buffer_bytes
            + self.recompute_bytes
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanCandidate:
    """A strategy the planner weighed, for the report's comparison."""

    label: str
    """``chosen``, ``data parallel``, ``pipeline``, ``hybrid``, ``equal layers`` or ``DP split``."""
    description: str
    """Its configuration in words (stages, replicas, schedule, microbatches)."""
    step_time_s: float | None
    """Simulated step time; None when nothing of its kind fits or exists."""
    samples_per_s: float | None
    note: str
    """Why it is not the plan (or what binds)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelinePlan:
    """How a training step runs: stages, microbatches, schedule, and what it costs."""

    family: str
    """One of `partitioner.pipeline_plan.FAMILIES`: ``data parallel``, ``FSDP``, ``TP x DP``,
    ``pipeline``, ``hybrid`` (stages on groups of devices), ``TP x PP x DP`` or ``single device``."""
    description: str
    """The configuration in words (stages, replicas, kinds, schedule, microbatches)."""
    schedule: str
    """``gpipe``, ``1f1b`` or ``interleaved_1f1b`` (`partitioner.simulate.PipelineSchedule`)."""
    microbatches: int
    virtual_stages: int
    """Stages per rank (1 unless interleaved)."""
    global_batch: int
    precision: str
    optimizer: str
    overlap_allreduce: bool
    layout: str
    """How replicas and stages lie on the nodes, in words."""
    split: str
    """How the layers were cut: ``dp`` (the least-bottleneck split) or ``equal`` (equal layer
    counts, which the simulator found faster)."""
    stages: tuple[PlanStage, ...]
    step_time_s: float
    """Makespan of one step, simulated (`partitioner.simulate.simulate` of `stages`)."""
    bubble_fraction: float
    samples_per_s: float
    model_flops: float
    """Forward and backward FLOPs of one step, without recomputation."""
    peak_flops: float
    """Sum over every device of the cluster of its peak FLOP/s at the compute dtype."""
    mfu: float
    """Model FLOPs utilisation: ``model_flops / (step_time_s x peak_flops)``."""
    bound_s: float
    """Total compute / total device speed: every device busy, no bubble, no communication."""
    lower_bound_s: float
    """No plan in the search space steps faster: the bottleneck rank's busy time plus its
    exposed all-reduce, minimised over the space by the DP."""
    runner_ups: tuple[PlanCandidate, ...]
    space: str
    """The search space, in words."""
    configurations: int
    """Configurations (device groups x microbatches x schedule) in the space."""
    solved: int
    """Configurations whose stages the DP placed (the others were pruned by their bound)."""
    simulated: int
    """Partitions whose step was played out."""
    tensor_parallel: int = 1
    """Devices per data-parallel replica that split each layer's tensor-parallel pairs."""
    data_parallel: int = 1
    """Data-parallel replicas of the first rank (each rank's devices / `tensor_parallel`)."""
    sharding: str = "none"
    """What the replicas shard (`partitioner.options.Sharding`: none, zero1, zero2, zero3, zero3-keep)."""
    sequence_parallel: bool = False
    """Whether the norms and dropouts between tensor-parallel pairs are split on the sequence."""

    @property
    def num_ranks(self) -> int:
        return len(self.stages) // self.virtual_stages

    def stage_costs(self, device_names: Sequence[str]) -> tuple[StageCost, ...]:
        """The simulator's input for these stages (`device_names`: the plan's device names)."""
        from partitioner.simulate import StageCost

        return tuple(
            StageCost(
                fwd_s=s.fwd_s,
                bwd_s=s.bwd_s,
                send_fwd_s=s.send_fwd_s,
                send_bwd_s=s.send_bwd_s,
                activation_bytes=s.microbatch_activation_bytes,
                static_bytes=s.static_bytes,
                allreduce_s=s.allreduce_s,
                optimizer_s=s.optimizer_s,
                collective_fwd_s=s.collective_fwd_s,
                collective_bwd_s=s.collective_bwd_s,
                host_sends=s.host_sends,
                devices=tuple(device_names[d] for d in s.devices),
            )
            for s in self.stages
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A placement of a model's layers on devices, with its predicted costs."""

    model_name: str
    fingerprint: str
    """Graph fingerprint of the model it was made for (checked when it is applied)."""
    frontend: str
    granularity: str
    """What one layer is: ``block``, ``leaf``, or ``auto`` (blocks, those in `refined` split)."""
    strategy: Strategy
    objective: Objective
    training: bool
    batch_size: int
    devices: tuple[PlanDevice, ...]
    layers: tuple[PlanLayer, ...]
    transfers: tuple[PlanTransfer, ...]
    output_device: int
    """Index of the device that receives the outputs."""
    predicted_s: float
    """Predicted objective: one step's latency, or the pipeline's period (busiest device)."""
    bound_s: float
    """No plan of its strategy runs faster (compute only, each layer on its fastest device):
    ``max(total compute / devices, largest layer)`` for whole layers placed on devices,
    ``total compute / devices`` for data parallelism (each replica computes its share of
    every layer)."""
    solver: SolverInfo
    why: str = ""
    """Why this strategy, in one line, where a reader would ask (every layer on one device of
    several: what the best split would add and save); empty otherwise."""
    pipeline: PipelinePlan | None = None
    """The training pipeline (stages, microbatches, schedule), for plans of `partitioner.training`.
    Each layer's `PlanLayer.device` is then its stage's first replica."""
    replicas: tuple[tuple[int, ...], ...] = ()
    """Device groups that each run a copy of the model, the batch split between them in this
    order (as `torch.tensor_split` splits it: the first ``batch % copies`` take a sample more):
    copy ``g`` runs on ``replicas[g][k]`` what `layers` put on ``replicas[0][k]``
    (`Strategy.HYBRID`; one device per group for `Strategy.DATA_PARALLEL`). Empty: one copy,
    or for `Strategy.DATA_PARALLEL` one replica on every device. See `replica_groups`."""
    refined: tuple[str, ...] = ()
    """Modules split into their children by ``auto`` granularity (a block into attention and
    MLP, those into leaves); applying the plan groups the layers so again."""
    split: tuple[SplitLayer, ...] = ()
    """Linear layers cut into column pieces by ``auto`` granularity (a layer heavier than
    total / devices: the layers ``module@j/k``, their outputs concatenated); applying the
    plan cuts them so again (`partitioner.split_layers`)."""

    def split_devices(self, split: SplitLayer) -> tuple[int, ...]:
        """The device of each of `split`'s pieces, in order."""
        names = [f"{split.module}@{j}/{split.pieces}" for j in range(split.pieces)]
        at = {layer.name: layer.device for layer in self.layers}
        return tuple(at[n] for n in names if n in at)

    # ------------------------------------------------------------------ views
    @property
    def assignment(self) -> tuple[int, ...]:
        """Device index of each layer."""
        return tuple(layer.device for layer in self.layers)

    @property
    def replica_groups(self) -> tuple[tuple[int, ...], ...]:
        """The devices of each copy of the model (`replicas`, made explicit): one group per copy,
        one device per group for data parallelism, the used devices for a single copy."""
        if self.replicas:
            return self.replicas
        if self.strategy is Strategy.DATA_PARALLEL and self.pipeline is None:
            return tuple((d,) for d in range(len(self.devices)))
        return (tuple(sorted(set(self.assignment))),)

    @property
    def idle_devices(self) -> tuple[int, ...]:
        """Devices the plan leaves without work (its copies use the others)."""
        if self.pipeline is not None:
            return tuple(sorted(set(range(len(self.devices))) - {d for s in self.pipeline.stages for d in s.devices}))
        busy = {d for group in self.replica_groups for d in group}
        return tuple(d for d in range(len(self.devices)) if d not in busy)

    @property
    def transfer_bytes(self) -> int:
        """Bytes moved between devices per forward."""
        return sum(t.bytes for t in self.transfers)

    def device_map(self) -> dict[str, int | str]:
        """An Accelerate-style device map (module name -> GPU ordinal or ``"cpu"``).

        Usable as ``from_pretrained(..., device_map=plan.device_map())`` and with
        ``accelerate.dispatch_model``. A present GPU keeps its CUDA index (``cuda:2`` -> 2);
        absent GPUs (planned from a profile) take the lowest ordinals left, in plan order.
        A key covers the tensors under it unless a longer key does (Accelerate's lookup);
        a tensor of the root module is keyed by its own name (``""`` would be the whole model).

        Raises:
            ValueError: The plan is data parallel, or a module's tensors are split over
                two devices (the cut falls inside a module; plan with ``granularity="block"``).
        """
        if self.strategy is Strategy.DATA_PARALLEL:
            raise ValueError("a data-parallel plan replicates the model; it has no device_map")
        if len(self.replica_groups) > 1:
            raise ValueError(
                f"the plan runs {len(self.replica_groups)} copies of the model on groups of devices; "
                "a device_map places one copy"
            )
        if self.pipeline is not None and any(len(s.devices) > 1 for s in self.pipeline.stages):
            raise ValueError("the plan replicates its stages over device groups; a device_map places one copy")
        gpu_ordinal = _gpu_ordinals(self.devices)

        def target(i: int) -> int | str:
            return gpu_ordinal[i] if i in gpu_ordinal else "cpu"

        called = {m for layer in self.layers for m in layer.modules}

        def covered(module: str) -> bool:
            parts = module.split(".")
            return any(".".join(parts[:k]) in called for k in range(1, len(parts) + 1))

        out: dict[str, int | str] = {}
        owner: dict[str, str] = {}
        for layer in self.layers:
            # A module goes where its calls run; a tensor read by no module call of its own
            # (used directly by an op) where its owning layer runs. A tied weight follows the
            # module that calls it first; Accelerate moves it to its other users.
            loose = [p.rpartition(".")[0] or p for p in layer.params if not covered(p.rpartition(".")[0])]
            for module in dict.fromkeys(list(layer.modules) + loose):
                dev = target(layer.device)
                if module in out and out[module] != dev:
                    raise ValueError(
                        f"module {module!r} is split between {self.devices[layer.device].name} (layer "
                        f"{layer.name!r}) and layer {owner[module]!r}; a device_map needs cuts on module boundaries"
                    )
                out[module], owner[module] = dev, layer.name
        return _prune_covered(out)

    def __str__(self) -> str:
        from partitioner.report import render_text

        return render_text(self)

    def simulate_pipeline(self) -> Timeline:
        """Play the training plan's step in the simulator (its `PipelinePlan.step_time_s` comes from this).

        Raises:
            ValueError: The plan has no pipeline (it was not made by `partitioner.training`).
        """
        from partitioner.simulate import simulate

        if self.pipeline is None:
            raise ValueError("this plan has no pipeline; plan it with partitioner.training.plan_training")
        p = self.pipeline
        stages = p.stage_costs([d.name for d in self.devices])
        return simulate(
            stages, p.microbatches, p.schedule, overlap_allreduce=p.overlap_allreduce, virtual_stages=p.virtual_stages
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain data, as `from_json` reads it: lists for tuples, enums as strings, float fields as floats.

        A field added after version 1 (``pipeline``, a transfer's ``module``) is left out while
        it holds its default, so such plans read as they always did, also by older releases."""
        from partitioner.plan_json import plan_to_dict

        return plan_to_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON, byte-for-byte the same for the same plan."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Load a plan written by `to_json` (checked by `partitioner.plan_json`).

        Raises:
            PlanFormatError: Not JSON (or nested too deeply), or a key is missing, unknown,
                repeated, of the wrong type or out of range, or an index names no device;
                the message names the key path (``layers[0].device``).
        """
        from partitioner.plan_json import plan_from_json

        return plan_from_json(text)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Validate plain data and build a plan (see `from_json`); a field added after version 1
        may be missing (it takes its default)."""
        from partitioner.plan_json import plan_from_dict

        return plan_from_dict(data)


def _gpu_ordinals(devices: tuple[PlanDevice, ...]) -> dict[int, int]:
    """Device index -> GPU ordinal: a present GPU's CUDA index, else the next free ordinal."""
    taken = {
        i: int(d.torch_device.rpartition(":")[2])
        for i, d in enumerate(devices)
        if d.kind == "gpu" and d.torch_device is not None and d.torch_device.rpartition(":")[2].isdigit()
    }
    used = set(taken.values())
    ordinals = dict(taken)
    free = (k for k in range(len(devices) + len(used)) if k not in used)
    for i, d in enumerate(devices):
        if d.kind == "gpu" and i not in ordinals:
            ordinals[i] = next(free)
    return ordinals


def _prune_covered(device_map: dict[str, int | str]) -> dict[str, int | str]:
    """Drop entries whose nearest mapped ancestor module maps them to the same device
    (Accelerate looks a tensor up by its longest mapped prefix)."""
    out: dict[str, int | str] = {}
    for module in sorted(device_map, key=lambda m: (m.count("."), m)):
        parts = module.split(".")
        ancestors = (".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1))
        nearest = next((a for a in ancestors if a in device_map), None)
        if nearest is None or device_map[nearest] != device_map[module]:
            out[module] = device_map[module]
    return out
