"""Build what one process runs from a plan: its stages, their schedule, DDP over its replicas.

The lowering, step by step (on every process, from the same plan and model):

1. `plan_layout`: stages, device groups, schedule, microbatches, tensor-parallel degree
   (`parallel_spec`: the arguments, else the plan's); the launch is checked against it
   (world size, rank).
2. The model is traced again as the plan was (front end, granularity) and its
   fingerprint checked against the plan's; layers are grouped as they were. Without a
   tensor-parallel layout from the arguments or the plan, the one `partitioner.tp_detect`
   finds on this trace is taken (`LayeredModel.tensor_parallel`) and checked
   (`check_parallel`), all before anything is copied or a process group starts.
3. `build_stages` cuts the graph into one `fx.GraphModule` per stage, specialised to the
   microbatch's shape.
4. The process group starts (gloo on CPU, NCCL on CUDA) unless it runs already, with one
   subgroup per pipeline (replica ``i`` of every rank) and per replica group.
5. The process copies its own stages onto its device, lowers each under tensor
   parallelism or sharding (`parallelize_stage`: DTensors, FSDP2 one unit per layer),
   else wraps it in `DistributedDataParallel` over its replica group (when the plan
   replicates it), then in a
   `torch.distributed.pipelining.PipelineStage` on its pipeline's group, and hands them
   to the plan's schedule (`ScheduleGPipe`, `Schedule1F1B`, `ScheduleInterleaved1F1B`).

`PipelineRank.step` then runs one training step: the pipeline's microbatches, gradients
scaled by ``1 / microbatches`` (torch's ``scale_grads``) and averaged over replicas (DDP),
so a loss that averages over its microbatch gives the gradients of the whole batch's mean.
A tied weight (`StageGraphs.tied`) has a copy in every stage that reads it; DDP leaves
those alone, and after the schedule each copy's gradient becomes the sum over the
stages' copies (added up within a process, all-reduced across processes) averaged over
replicas, so every copy takes the same optimizer step and the copies stay equal.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from partitioner.replicate import replication_hazards
from partitioner.distributed.launch import launch_rank, process_device, process_groups, start_process_group, tie_groups
from partitioner.distributed.layout import Layout, StageSpec, check_launch, plan_layout
from partitioner.distributed.names import named_tensors, original_names
from partitioner.distributed.retrace import resized, retrace
from partitioner.distributed.spmd import (
    ParallelSpec,
    Recomputed,
    average_gradients,
    check_parallel,
    full_tensors,
    parallel_mesh,
    parallel_spec,
    parallelize_stage,
    reshard_after_step,
)
from partitioner.distributed.stages import MicrobatchShapeError, StageGraphs, build_stages, flat_batch
from partitioner.errors import PlanMismatchError
from partitioner.options import Sharding
from partitioner.tp_layout import TensorParallelLayout
from partitioner.layers import LayeredModel
from partitioner.plan import Plan
from partitioner.rewrite import place_tensors

if TYPE_CHECKING:
    from torch.distributed.pipelining.stage import _PipelineStageBase

__all__ = ["PipelineRank", "build", "LossFn"]

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss_fn(output, target)``: the model's output for one microbatch (as the model returns
it) and that microbatch's target -> a scalar loss, averaged over the microbatch."""


class PipelineRank:
    """What one process runs: its stages of the plan, their schedule, its replica group.

    Make one with `build`. ``parameters()`` are this process's own (for its optimizer);
    ``state_dict()`` holds its stages' tensors under the original model's names.
    """

    def __init__(
        self,
        *,
        plan: Plan,
        layout: Layout,
        rank: int,
        device: torch.device,
        layered: LayeredModel,
        graphs: StageGraphs,
        aliases: Sequence[Mapping[str, tuple[str, ...]]],
        extra: Mapping[str, torch.Tensor],
        loss_fn: LossFn,
        owns_process_group: bool,
        parallel: ParallelSpec = ParallelSpec(),
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.rank = rank
        self.device = device
        self.pipeline_rank, self.replica = layout.position(rank)
        self.parallel = parallel
        self.data_parallel = layout.data_parallel
        """Replicas of each stage that take their own slice of the batch (``replicas / tensor_parallel``)."""
        self.data_index = self.replica // parallel.tensor_parallel
        """Which batch slice this process takes (the tensor-parallel ranks of a replica share one)."""
        self._layered = layered
        self._graphs = graphs
        self._extra = extra
        self._owns_process_group = owns_process_group
        specs = layout.stages_of(self.pipeline_rank)
        self.stage_indices = tuple(s.index for s in specs)
        """Indices of the stages this process runs."""
        copies = [_to_device(graphs.modules[k], device) for k in self.stage_indices]
        self._pipeline_group, self._replica_group = process_groups(layout, rank)
        self._ties = tie_groups(layout, graphs.tied, rank, parallel.tensor_parallel)
        self._mesh = parallel_mesh(layout, rank, parallel.tensor_parallel, device.type) if parallel.active else None
        self._aliases = list(aliases)
        lowered = [self._lower(m, s) for m, s in zip(copies, specs)]
        self.modules = tuple(module for module, _ in lowered)
        """Its stage modules (`fx.GraphModule`; under FSDP cut into one submodule per layer), on its device."""
        self._wrapped = tuple(run for _, run in lowered)
        num_stages = len(layout.stages)
        # Shapes given up front: torch then skips its first-step shape inference, which would
        # run a forward through DDP outside `no_sync` and leave DDP waiting for that backward.
        stages: list[_PipelineStageBase] = [
            PipelineStage(
                w, k, num_stages, device, group=self._pipeline_group,
                input_args=tuple(spec.example() for spec in graphs.input_specs[k]),
                output_args=tuple(spec.example() for spec in graphs.output_specs[k]),
            )
            for k, w in zip(self.stage_indices, self._wrapped)
        ]
        self._stages = stages

        def loss(output: Any, target: Any) -> torch.Tensor:
            return loss_fn(graphs.model_output(output), target)

        m = layout.microbatches
        if layout.schedule == "gpipe":
            self._schedule: Any = ScheduleGPipe(stages[0], m, loss_fn=loss, scale_grads=False)
        elif layout.schedule == "1f1b":
            self._schedule = Schedule1F1B(stages[0], m, loss_fn=loss, scale_grads=False)
        else:
            self._schedule = ScheduleInterleaved1F1B(stages, m, loss_fn=loss, scale_grads=False)

    # ------------------------------------------------------------------ who
    @property
    def is_first(self) -> bool:
        """Whether this process runs stage 0 (it needs the inputs)."""
        return 0 in self.stage_indices

    @property
    def is_last(self) -> bool:
        """Whether this process runs the last stage (it needs the target and returns the loss)."""
        return len(self.layout.stages) - 1 in self.stage_indices

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def __repr__(self) -> str:
        return (
            f"PipelineRank(rank {self.rank} of {self.world_size} on {self.device}: stage(s) "
            f"{', '.join(map(str, self.stage_indices))}, replica {self.replica} of {self.layout.replicas}; "
            f"{self.layout.describe()}{self._parallel_words()})"
        )

    def _parallel_words(self) -> str:
        """``; tensor-parallel 2 (sequence parallel) x data-parallel 2, sharding zero3`` or nothing."""
        spec = self.parallel
        if not spec.active:
            return ""
        words = f"; tensor-parallel {spec.tensor_parallel}" + (" (sequence parallel)" * spec.sequence_parallel)
        return f"{words} x data-parallel {self.data_parallel}, sharding {spec.sharding.value}"

    # ------------------------------------------------------------------ training
    def step(self, batch: Any, target: Any = None, *, shard: bool = True, **kwargs: Any) -> torch.Tensor | None:
        """Run one training step (forward, backward; gradients reduced, not applied).

        Call it on every process with the same arguments; then step your optimizer over
        `parameters` and zero the gradients, as for any model.

        Args:
            batch: The model's positional inputs: a tensor, or a tuple of them. Every tensor
                input carries the batch in dimension 0.
            target: The loss function's target, batch in dimension 0 (read by the
                processes of the last stage).
            shard: The batch is the whole step's (``global_batch`` samples, the same on every
                process), and each replica takes its share in order. False: the batch is this
                replica's share already (``global_batch / data_parallel`` samples, e.g. from a
                ``DistributedSampler(num_replicas=part.data_parallel, rank=part.data_index)``;
                without tensor parallelism these are ``layout.replicas`` and ``replica``).
            **kwargs: The model's keyword inputs.

        Returns:
            On the processes of the last stage, the step's loss: the mean of the
            microbatches' losses over every replica (the whole batch's loss for a loss that
            averages); None elsewhere.

        Raises:
            PlanMismatchError: The batch has another size than the plan's, or a non-tensor
                input differs from the example the stages were specialised to.
        """
        args = batch if isinstance(batch, tuple) else (batch,)
        inputs = self._stage_inputs(args, kwargs, shard) if self.is_first else ()
        if self.is_last:
            if target is None:
                raise ValueError("the last stage computes the loss: pass step(batch, target)")
            target = self._share(target, shard, "target")
        losses: list[torch.Tensor] = []
        self._schedule.step(
            *inputs, target=target if self.is_last else None, losses=losses if self.is_last else None,
            return_outputs=False,
        )
        if self.parallel.sharding is Sharding.ZERO2:
            for run in self._wrapped:
                reshard_after_step(run)
        self._divide_gradients(self.layout.microbatches)
        if self._mesh is not None and self.parallel.sharding is Sharding.NONE and self.data_parallel > 1:
            average_gradients(self.parameters(), self._mesh)  # DDP takes no DTensors
        self._sum_tied_gradients()
        if not self.is_last:
            return None
        loss = torch.stack([x.detach() for x in losses]).mean()
        if self.layout.replicas > 1:
            dist.all_reduce(loss, group=self._replica_group)
            loss = loss / self.layout.replicas
        return loss

    def _stage_inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], shard: bool) -> tuple[torch.Tensor, ...]:
        graphs = self._graphs
        flat = flat_batch(self._layered, args, kwargs)
        for i, value in graphs.constants.items():
            if type(flat[i]) is not type(value) or flat[i] != value:
                raise PlanMismatchError(
                    f"input {graphs.input_names[i]!r} is {flat[i]!r} but the stages were built for {value!r} "
                    "(the example inputs'); pass that, or build with example inputs holding this value"
                )
        return tuple(self._share(flat[i], shard, f"input {graphs.input_names[i]!r}") for i in graphs.inputs)

    def _share(self, value: Any, shard: bool, what: str) -> Any:
        """This replica's rows of `value` (every tensor in it), on this process's device."""
        layout = self.layout
        share = layout.global_batch // self.data_parallel
        expected = layout.global_batch if shard else share

        def take(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if x.ndim == 0 or x.shape[0] != expected:
                got = "a scalar" if x.ndim == 0 else f"{x.shape[0]} samples"
                raise PlanMismatchError(
                    f"{what} holds {got}, but the plan's step takes {expected} per "
                    f"{'step' if shard else 'replica'} ({layout.describe()}); pass that many, or build with "
                    "global_batch=... to match your data"
                )
            if shard and self.data_parallel > 1:
                x = x.narrow(0, self.data_index * share, share)
            return x.to(self.device)

        return tree_map(take, value)

    def parameters(self) -> Iterator[nn.Parameter]:
        """This process's parameters (its stages'), for its optimizer.

        A tied weight appears once per stage of this process that holds a copy, each copy a
        tensor of its own with the same gradient after `step`: give them all to the
        optimizer (not ``dict(named_parameters())``, which keeps one name's), and mind that
        a gradient norm over them counts the weight once per copy.
        """
        for m in self.modules:
            yield from m.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This process's parameters under their names in the original model (a tied one under its first)."""
        for m, names in zip(self.modules, self._stage_aliases()):
            for name, p in m.named_parameters():
                yield (names[name][0] if names.get(name) else name), p

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """`state_dict` with split and sharded tensors (DTensors) gathered whole; call it on every process."""
        return full_tensors(self.state_dict())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self.modules:
            m.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state
    def _stage_aliases(self) -> list[Mapping[str, tuple[str, ...]]]:
        return [self._aliases[k] for k in self.stage_indices]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process's tensors under every name the original model's ``state_dict`` gives them.

        Tensors the graph never reads (unused parameters) are not held by any stage; process 0
        returns them too, as they were at `build`.
        """
        out: dict[str, torch.Tensor] = {}
        for m, names in zip(self.modules, self._stage_aliases()):
            for name, t in named_tensors(m):
                for original in names.get(name, ()):
                    out[original] = t.detach()
        if self.rank == 0:
            out.update(self._extra)
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy this process's tensors from a state dict of the original model (its names).

        Every tensor is checked before the first is copied: a refused state dict leaves the
        stages as they were.

        Raises:
            PlanMismatchError: A tensor of these stages is missing from `state_dict`, or has
                another shape or dtype (the state dict is of another model).
        """
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k, m, names in zip(self.stage_indices, self.modules, self._stage_aliases()):
            for name, t in named_tensors(m):
                originals = names.get(name, ())
                if not originals:
                    continue
                found = next((o for o in originals if o in state_dict), None)
                if found is None:
                    raise PlanMismatchError(
                        f"the state dict has no {originals[0]!r}, which stage {k} holds; "
                        "it is not a state dict of the model the plan was made for (nothing was loaded)"
                    )
                source = state_dict[found]
                if tuple(source.shape) != tuple(t.shape):
                    raise PlanMismatchError(
                        f"{found!r} has shape {tuple(source.shape)} in the state dict but {tuple(t.shape)} "
                        f"in stage {k}; it is not a state dict of the model the plan was made for "
                        "(nothing was loaded)"
                    )
                if source.dtype != t.dtype:
                    raise PlanMismatchError(
                        f"{found!r} is {source.dtype} in the state dict but {t.dtype} in stage {k} (nothing was "
                        "loaded); cast the state dict's tensors, or build from a model of that dtype"
                    )
                pairs.append((t, source))
        with torch.no_grad():
            for t, source in pairs:
                if isinstance(t, DTensor):  # this process's slice of the whole tensor, no communication
                    source = distribute_tensor(source.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
                t.copy_(source)

    def held_names(self, stage: int) -> tuple[str, ...]:
        """The original model's state names of the tensors stage `stage` holds (any stage of the plan)."""
        return tuple(sorted({o for names in self._aliases[stage].values() for o in names}))

    @property
    def unused_state(self) -> Mapping[str, torch.Tensor]:
        """State entries of the original model that no stage holds (the graph never reads
        them), as they were at `build`."""
        return self._extra

    def close(self) -> None:
        """End the process group if `build` started it (call once, at the end of the script)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    # ------------------------------------------------------------------ internals
    def _lower(self, module: nn.Module, spec: StageSpec) -> tuple[nn.Module, nn.Module]:
        """(the module holding the stage's tensors, the module to run): `parallelize_stage` under
        tensor parallelism or sharding (a stage cut into layers takes its tensors' new names),
        else `_wrap`."""
        if self._mesh is None:
            return module, self._wrap(module, spec)
        assert isinstance(module, torch.fx.GraphModule)
        lowered = parallelize_stage(
            module, self.parallel, self._mesh, recompute=spec.recompute, layer_of=self._layered.node_layer
        )
        if lowered.names is not None:
            before = self._aliases[spec.index]
            self._aliases[spec.index] = {name: before[old] for name, old in lowered.names.items()}
        return lowered.module, lowered.run

    def _wrap(self, module: nn.Module, spec: StageSpec) -> nn.Module:
        """Activation checkpointing if the plan recomputes the stage; DDP over the replica group,
        when there are replicas and something to train (tied weights left to `_sum_tied_gradients`)."""
        tied = {id(module.get_parameter(name)) for copies, _ in self._ties for s, name in copies if s == spec.index}
        if spec.recompute:
            module = Recomputed(module)
        trained = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in tied]
        if self.layout.replicas == 1 or not trained:
            return module
        ignored = [n for n, p in module.named_parameters() if id(p) in tied]
        if ignored:
            # DDP's own switch for parameters it must not all-reduce (private, but what torch's
            # tests and FSDP use; tests/test_distributed.py's replicated tied case fails without it).
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, process_group=self._replica_group)

    def _divide_gradients(self, divisor: int) -> None:
        """Each gradient divided by `divisor` once: the mean over the microbatches (torch's
        schedules would divide before a ZeRO-2 stage registers its gradient shards again)."""
        if divisor == 1:
            return
        seen: set[int] = set()
        for p in self.parameters():
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                p.grad.div_(divisor)

    def _sum_tied_gradients(self) -> None:
        """Each tied weight's gradient, summed over its copies and averaged over replicas, on every copy."""
        for held, group in self._ties:
            local = {s: m for s, m in zip(self.stage_indices, self.modules)}
            copies = [local[s].get_parameter(name) for s, name in held if s in local]
            copies = [p for p in copies if p.requires_grad]
            if not copies:
                continue
            total = torch.zeros_like(copies[0])
            for p in copies:
                if p.grad is not None:
                    total += p.grad
            if group is not None:
                dist.all_reduce(total.to_local() if isinstance(total, DTensor) else total, group=group)
            if self.data_parallel > 1:
                total /= self.data_parallel
            for p in copies:
                p.grad = total.clone()


def build(
    plan: Plan,
    model: nn.Module,
    example_inputs: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    loss_fn: LossFn,
    schedule: str | None = None,
    microbatches: int | None = None,
    global_batch: int | None = None,
    device: str | torch.device | None = None,
    split_modules: Sequence[str] = (),
    tensor_parallel: int | None = None,
    sequence_parallel: bool | None = None,
    sharding: Sharding | str | None = None,
    tp_layout: TensorParallelLayout | None = None,
) -> PipelineRank:
    """Build this process's part of `plan`: its stages, schedule and replica group.

    Run it on every process of a launch (``torchrun --nproc-per-node N script.py``): the
    rank and world size come from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``), or from a process group already started. A plan on
    one device also runs without a launcher.

    Example (``torchrun --nproc-per-node 2 train.py``)::

        plan = partitioner.Plan.from_json(open("plan.json").read())
        part = partitioner.distributed.build(plan, model, (x,), loss_fn=F.cross_entropy)
        opt = torch.optim.SGD(part.parameters(), lr=0.1)
        for x, y in batches:
            loss = part.step(x, y)     # the loss on the last stage's processes, else None
            opt.step()
            opt.zero_grad()

    Args:
        plan: The plan (from `partitioner.training.plan_training`, `partitioner.plan`, or
            `Plan.from_json`), the same on every process.
        model: The model the plan was made for, with its weights (the same on every
            process). It is not modified: the stages hold copies.
        example_inputs: The example inputs the plan was made with (the fingerprint is
            checked on them; shapes past the batch dimension are fixed by them).
        example_kwargs: Keyword example inputs, likewise.
        loss_fn: ``loss_fn(output, target)`` on one microbatch, averaged over it.
        schedule: ``gpipe``, ``1f1b`` or ``interleaved_1f1b``; default the plan's (1F1B
            for a plan without a pipeline).
        microbatches: Microbatches per step; default the plan's (one per stage without a pipeline).
        global_batch: Samples per step over all replicas; default the plan's (its batch
            without a pipeline).
        device: This process's device; default: ``cpu`` for a CPU plan device, else
            ``cuda:LOCAL_RANK`` (``cuda:N`` when the plan device is a present ``cuda:N``).
        split_modules: As given to the planner (they change the layers).
        tensor_parallel: Tensor-parallel degree: each stage's replicas form groups of this
            many consecutive processes that split its columns and rows (`tp_layout`); the
            groups are the data-parallel replicas. Default: the plan's, else 1.
        sequence_parallel: Split activations between tensor-parallel pairs on the sequence;
            default the plan's, else False.
        sharding: What the data-parallel replicas shard (`Sharding`: ZeRO-3 is FSDP2);
            default the plan's, else none (DDP, or a gradient all-reduce under tensor parallelism).
        tp_layout: The modules tensor parallelism splits; default the plan's, else the
            pairs `partitioner.tp_detect` finds on the model traced again here
            (`LayeredModel.tensor_parallel`), so a plan with tensor parallelism runs with
            no layout written by hand.

    Returns:
        This process's `PipelineRank`.

    Raises:
        PlanMismatchError: The launch's world size is not the number of devices the plan
            uses, the model's fingerprint is not the plan's, the plan's ranks hold unequal
            replica counts, or the model has BatchNorm layers in training mode while the
            plan splits batches.
        DeviceError: The plan device is a GPU and this process has no such GPU.
        ValueError: The schedule, microbatches and batch do not fit the stages.
        TensorParallelError: The tensor-parallel degree does not divide a stage's replicas,
            or a pair's heads or widths; or the layout is of another model.
    """
    parallel = parallel_spec(plan, tensor_parallel, sequence_parallel, sharding, tp_layout)
    layout = plan_layout(
        plan, schedule=schedule, microbatches=microbatches, global_batch=global_batch,
        tensor_parallel=parallel.tensor_parallel,
    )
    rank, world_size = launch_rank()
    check_launch(layout, world_size, rank, [d.name for d in plan.devices])
    hazards = replication_hazards(model)
    if hazards and (layout.replicas > 1 or layout.microbatches > 1):
        raise PlanMismatchError(
            f"{hazards[0]}, but the step splits its batch ({layout.describe()}), so it would normalise "
            "each microbatch alone; put those modules in eval mode, or run one microbatch on one replica"
        )
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    layered = retrace(plan, model, args, kwargs, split_modules)  # tracing leaves the model as it is
    if parallel.tensor_parallel > 1 and parallel.layout is None:  # the pairs partitioner.tp_detect found
        parallel = dataclasses.replace(parallel, layout=layered.tensor_parallel)
    check_parallel(parallel, layout, model)
    target = process_device(plan, layout, rank, device)
    stage_of_layer = [0] * len(plan.layers)
    microbatch = layout.microbatch_size
    for s in layout.stages:
        for i in s.layers:
            stage_of_layer[i] = s.index
    try:
        graphs = build_stages(layered, stage_of_layer, args, kwargs, microbatch, target)
    except MicrobatchShapeError:
        # Traced at a fixed batch (the model branches on its batch size): trace at the microbatch's.
        args, kwargs = resized((args, kwargs), microbatch)
        layered = retrace(plan, model, args, kwargs, split_modules, check_fingerprint=False)
        graphs = build_stages(layered, stage_of_layer, args, kwargs, microbatch, target)
    if parallel.sharding is not Sharding.NONE and graphs.tied and len(layout.stages) > 1:
        raise PlanMismatchError(
            f"sharding {parallel.sharding.value} with a weight tied across pipeline stages "
            f"({graphs.tied[0][0][1]!r}) is not supported; use sharding none, or a plan keeping it in one stage"
        )
    aliases, extra = original_names(model, layered, graphs)
    owns = start_process_group(target, rank, world_size)
    return PipelineRank(
        plan=plan,
        layout=layout,
        rank=rank,
        device=target,
        layered=layered,
        graphs=graphs,
        aliases=aliases,
        extra=extra,
        loss_fn=loss_fn,
        owns_process_group=owns,
        parallel=parallel,
    )


# --------------------------------------------------------------------------- helpers


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a stage module on `device` (the user's tensors are never trained in place)."""
    return copy.deepcopy(module, place_tensors(module, {}, str(device)))
