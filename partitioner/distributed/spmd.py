"""Lower tensor parallelism, sequence parallelism, sharded data parallelism and recompute onto one stage.

Mechanism only: which modules split, how many ways, and what the replicas shard come from
the caller (`ParallelSpec`: a `TensorParallelLayout`, the degree, a `Sharding`); this
module applies them, in torchtitan's order (``parallelize.py`` of its Llama): tensor
parallelism, then recompute, then FSDP2.

Processes. A pipeline rank's ``R`` replicas (`Layout.replica_group`) form a ``dp x tp``
grid, ``tp`` consecutive replicas per tensor-parallel group (they share one batch slice,
so they sit on the fastest links, as torchrun numbers ranks node by node). All pipeline
ranks together give the `DeviceMesh` ``("pp", "dp", "tp")``; a stage takes its
``("dp", "tp")`` slice.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) on a traced stage graph. The stage
is an `fx.GraphModule` of ATen ops whose shape constants are the full model's (a
``view(b, s, 4, 8)`` of four heads, GPT-2's ``split(32)`` of its fused q/k/v). Rather than
rewrite those constants, the graph runs on DTensors (``torch.distributed.tensor``): a
column's weight is ``Shard(out)``, a row's ``Shard(in)``, an embedding or output head's
``Shard(vocab)`` (uneven where the degree does not divide the vocabulary: ``torch.chunk``'s
cut, ``ceil(V / t)`` rows a rank, the last fewer; DTensor's vocabulary-parallel lookup masks
the ids outside a rank's rows, and the head's logits gather at the stage's end, so nothing
is padded and the outputs, state dict and checkpoints keep the true vocabulary), everything
else ``Replicate``. DTensor's operators keep *global*
semantics, so every literal shape stays right while each rank holds and computes its
slice: the head reshape of a ``Shard(-1)`` projection becomes ``Shard(heads)``, attention
runs on the local heads, and the row's output is ``Partial`` (summed on demand). Two
redistributions are pinned in the graph, as ``ColwiseParallel`` / ``RowwiseParallel``
pin them on module inputs and outputs: every column reads a ``Replicate`` input (the
all-gather of sequence parallelism), every row's output becomes ``Replicate`` (an
all-reduce) or, with sequence parallelism, ``Shard(1)`` (a reduce-scatter: norms,
dropouts and residual adds between pairs then run on a slice of the sequence, as
``SequenceParallel`` does). Stage inputs enter as ``Replicate``; stage outputs leave as
whole tensors (``full_tensor``), so pipeline stages send and the loss reads plain tensors.

A column whose output is cut into parts downstream (`Column.parts`: GPT-2's ``c_attn``
holding q, k and v) is sharded part by part, each rank holding its heads of every part,
and its ``split`` hands each part on sharded (`partitioner.distributed.fused_columns`).

Sharded data parallelism, as the planner prices it (`partitioner.pipeline_plan.terms`).
torch's pipelining schedules drive a stage that is an FSDP2 module their own way: its
gradients are kept whole over the microbatches and reduce-scattered once, after the last
backward. That is ZeRO-1, so `Sharding.ZERO1` lowers to exactly that (``fully_shard`` with
``reshard_after_forward=False``: weights gathered once per step). The others hide the
FSDP2 module from the schedule (`EveryMicrobatch`), so FSDP2 reduce-scatters every
microbatch in backward and keeps a gradient shard, as ZeRO-2/3 do: ``ZERO3`` with
``reshard_after_forward=True`` (weights gathered in forward and again in backward),
``ZERO3_KEEP`` with ``False`` (one gather per microbatch), ``ZERO2`` also without
resharding after backward, so the weights gathered by the step's first forward stay until
`reshard_after_step` (the runtime calls it before the optimizer steps on the shards).
A stage graph reads its parameters
with ``get_attr``, not through its blocks' ``forward``, so it is first cut into one
submodule per planner layer (`partitioner.distributed.units`), after tensor parallelism;
each layer holding parameters is an FSDP unit, then the stage's root (torchtitan shards
each block, then the model): a layer's parameters are gathered at its call and the next
layer's prefetched, the two working copies the planner prices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from partitioner.distributed.fused_columns import fused_placement, split_by_parts
from partitioner.distributed.layout import Layout, check_degree
from partitioner.distributed.units import cut_layers
from partitioner.options import Sharding
from partitioner.plan import Plan
from partitioner.tp_layout import Column, TensorParallelError, TensorParallelLayout

__all__ = [
    "ParallelSpec",
    "parallel_spec",
    "Recomputed",
    "check_parallel",
    "parallel_mesh",
    "LoweredStage",
    "parallelize_stage",
    "EveryMicrobatch",
    "reshard_after_step",
    "average_gradients",
    "full_tensors",
]

_aten = torch.ops.aten
# The op that multiplies by a column's or row's weight, and which of its arguments is the activation.
_MATMUL_INPUT = {_aten.linear.default: 0, _aten.addmm.default: 1, _aten.mm.default: 0, _aten.matmul.default: 0}
# Views of the weight on its way to that op (a Linear lowered to ``mm(x, t(w))``).
_WEIGHT_VIEWS = (_aten.t.default, _aten.permute.default, _aten.transpose.int)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelSpec:
    """What a stage's replicas do besides copying it: split it (tensor parallel) and shard it."""

    tensor_parallel: int = 1
    """Ranks each stage's columns and rows are split over (consecutive replicas)."""
    sequence_parallel: bool = False
    """Between pairs, activations split on the sequence (dimension 1) instead of replicated."""
    sharding: Sharding = Sharding.NONE
    """What the data-parallel replicas (``replicas / tensor_parallel`` of them) shard."""
    layout: TensorParallelLayout | None = None
    """The modules tensor parallelism splits (`partitioner.tp_detect`, or written by hand)."""

    @property
    def active(self) -> bool:
        """Whether anything besides plain replication (DDP) is asked for."""
        return self.tensor_parallel > 1 or self.sharding is not Sharding.NONE


def parallel_spec(
    plan: Plan,
    tensor_parallel: int | None,
    sequence_parallel: bool | None,
    sharding: Sharding | str | None,
    tp_layout: TensorParallelLayout | None,
) -> ParallelSpec:
    """The arguments, else the plan's fields (``tensor_parallel``, ``sequence_parallel``, ``sharding``,
    ``tp_layout`` when the plan has them), else no tensor parallelism and no sharding."""
    source = plan.pipeline if plan.pipeline is not None else plan
    chosen = sharding if sharding is not None else getattr(source, "sharding", None)
    return ParallelSpec(
        tensor_parallel=tensor_parallel if tensor_parallel is not None else getattr(source, "tensor_parallel", 1) or 1,
        sequence_parallel=bool(
            sequence_parallel if sequence_parallel is not None else getattr(source, "sequence_parallel", False)
        ),
        sharding=Sharding(chosen) if chosen is not None else Sharding.NONE,
        layout=tp_layout if tp_layout is not None else getattr(source, "tp_layout", None),
    )


class Recomputed(nn.Module):
    """A stage that keeps only its inputs for backward and runs its forward again there
    (`torch.utils.checkpoint`, non-reentrant), as the plan's `PlanStage.recompute` says."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args: torch.Tensor) -> Any:
        return checkpoint(self.stage, *args, use_reentrant=False)


def check_parallel(spec: ParallelSpec, layout: Layout, model: nn.Module) -> None:
    """Check `spec` against the launch layout and the model, before anything is built or changed.

    Raises:
        TensorParallelError: The degree does not split the replicas of a stage, the heads or
            the widths; tensor or sequence parallelism without a layout; a module the
            layout names is not in the model, or not a Linear/Conv1D-like module.
    """
    tp = spec.tensor_parallel
    check_degree(tp, layout.replicas, f"{layout.world_size} processes, {layout.describe()}")
    if spec.sequence_parallel and tp == 1:
        raise TensorParallelError("sequence parallelism splits activations over tensor-parallel ranks: it needs a degree > 1")
    if tp == 1:
        return
    if spec.layout is None or not spec.layout.pairs:
        raise TensorParallelError(
            f"tensor-parallel degree {tp} but no layout says which modules split (none was passed, the plan "
            "names none, and partitioner.tp_detect found no column/row pair in the traced model): pass a "
            "TensorParallelLayout naming the model's pairs, or plan without tensor parallelism"
        )
    spec.layout.check_degree(tp)
    modules = dict(model.named_modules())
    named = [c.module for p in spec.layout.pairs for c in p.columns] + [p.row for p in spec.layout.pairs]
    named += [v.module for v in spec.layout.vocab]
    for name in named:
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TensorParallelError(
                f"the tensor-parallel layout names {name!r}, which is not a module with a weight in "
                f"{type(model).__name__}; it is a layout of another model"
            )
    for shard in spec.layout.vocab:
        weight = modules[shard.module].weight
        if weight.shape[0] != shard.vocab:
            raise TensorParallelError(
                f"{shard.kind} {shard.module!r} holds {weight.shape[0]} rows but the layout says a vocabulary of "
                f"{shard.vocab}; it is a layout of another model"
            )


def parallel_mesh(layout: Layout, rank: int, tensor_parallel: int, device_type: str) -> DeviceMesh:
    """This process's ``("dp", "tp")`` mesh: its pipeline rank's replicas, ``tp`` consecutive ones per row.

    Collective: every process of the launch calls it (the ``("pp", "dp", "tp")`` mesh
    creates one process group per mesh dimension slice).
    """
    tp = tensor_parallel
    dp = layout.replicas // tp
    ranks = torch.tensor(
        [[[layout.process(r, d * tp + t) for t in range(tp)] for d in range(dp)] for r in range(layout.pipeline_ranks)]
    )
    mesh = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "dp", "tp"))
    return mesh["dp", "tp"]


def _by_parts(column: Column, sharded: bool) -> int:
    """The parts `column` is sharded by (`fused_columns`): 1 (its output cut as a whole) for
    an unfused column, and for a fused ``(out, in)`` weight that FSDP2 also shards on dim 0
    (FSDP2 over a strided dim-0 shard is not exact in torch 2.13; DTensor gathers at its split)."""
    return column.parts if column.transposed or not sharded else 1


def _placements(spec: ParallelSpec, sharded: bool) -> dict[str, Placement]:
    """Parameter name -> its placement on the ``tp`` mesh dimension (absent: replicated)."""
    out: dict[str, Placement] = {}
    assert spec.layout is not None
    for pair in spec.layout.pairs:
        transposed = any(c.transposed for c in pair.columns)
        for c in pair.columns:  # split on the output features: weight (out, in), or (in, out) transposed
            parts = _by_parts(c, sharded)
            out[f"{c.module}.weight"] = fused_placement(1 if c.transposed else 0, parts)
            if parts == 1:  # a fused column's bias stays whole: FSDP2 shards its dim 0 too
                out[f"{c.module}.bias"] = Shard(0)
        out[f"{pair.row}.weight"] = Shard(0 if transposed else 1)  # its bias: replicated, added once
    for v in spec.layout.vocab:  # embedding (vocab, dim) rows; head (vocab, dim) output features
        out[f"{v.module}.weight"] = Shard(0)
        out[f"{v.module}.bias"] = Shard(0)
    return out


class _Redistribute(nn.Module):
    """A pinned redistribution inside a stage graph (a no-op on a tensor that is not a DTensor)."""

    def __init__(self, placement: Placement) -> None:
        super().__init__()
        self.placement = placement

    def forward(self, x: Any) -> Any:
        if not isinstance(x, DTensor):
            return x
        placement = self.placement
        if placement == Shard(1) and x.ndim <= 2:  # the sequence: tokens flattened into rows (HF Conv1D's addmm)
            placement = Shard(0) if x.ndim == 2 else Replicate()
        return x.redistribute(x.device_mesh, [placement])


def _weight_users(gm: fx.GraphModule, target: str) -> list[tuple[fx.Node, int]]:
    """(matmul node, index of its activation argument) for each op multiplying by parameter `target`."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target != target:
            continue
        frontier = list(node.users)
        while frontier:
            user = frontier.pop()
            if user.op == "call_function" and user.target in _WEIGHT_VIEWS:
                frontier.extend(user.users)
            elif user.op == "call_function" and user.target in _MATMUL_INPUT:
                found.append((user, _MATMUL_INPUT[user.target]))
    return found


def _calls(gm: fx.GraphModule, module: str) -> list[tuple[fx.Node, int]]:
    """Calls of the leaf module `module` (a symbolic ``torch.fx`` trace keeps ``nn.Linear`` whole), input first."""
    return [(n, 0) for n in gm.graph.nodes if n.op == "call_module" and n.target == module]


def _matmuls(gm: fx.GraphModule, module: str, role: str) -> list[tuple[fx.Node, int]]:
    """The ops multiplying by `module`'s weight, which must have some (`role`: ``column``, ``row``)."""
    users = _weight_users(gm, f"{module}.weight") + _calls(gm, module)
    if not users:
        raise TensorParallelError(
            f"{role} {module!r}: no matrix multiply by its weight in the stage graph (only linear/addmm/mm/matmul, "
            "through t/permute/transpose, and calls of the module are split); leave its pair out of the layout"
        )
    return users


def _pin(gm: fx.GraphModule, spec: ParallelSpec, sharded: bool) -> None:
    """Insert the column-input and row-output redistributions into the stage graph."""
    assert spec.layout is not None
    params = {name for name, _ in gm.named_parameters()}
    count = 0

    def module(placement: Placement | nn.Module) -> str:
        nonlocal count
        name = f"_tp_redistribute_{count}"
        count += 1
        gm.add_submodule(name, placement if isinstance(placement, nn.Module) else _Redistribute(placement))
        return name

    def replicated_input(users: list[tuple[fx.Node, int]]) -> None:
        for node, index in users:
            with gm.graph.inserting_before(node):
                gathered = gm.graph.call_module(module(Replicate()), (node.args[index],))
            node.update_arg(index, gathered)

    after_row: Placement = Shard(1) if spec.sequence_parallel else Replicate()
    for pair in spec.layout.pairs:
        for column in pair.columns:
            if f"{column.module}.weight" in params:
                users = _matmuls(gm, column.module, "column")
                replicated_input(users)
                if _by_parts(column, sharded) > 1:  # its parts leave the split on the rank's heads
                    split_by_parts(gm, [node for node, _ in users], column.parts, module)
        if f"{pair.row}.weight" in params:
            for node, _ in _matmuls(gm, pair.row, "row"):
                _after(gm, node, module(after_row))
    for shard in spec.layout.vocab:
        weight = f"{shard.module}.weight"
        if weight not in params:
            continue
        if shard.kind == "embedding":  # looked-up rows summed at once: a masked partial sum must not travel
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and node.target is _aten.embedding.default and _reads(node, weight):
                    _after(gm, node, module(after_row))
            for node, _ in _calls(gm, shard.module):
                _after(gm, node, module(after_row))
        else:
            replicated_input(_calls(gm, shard.module))
        replicated_input(_weight_users(gm, weight))  # the head (or a tied embedding's read as one)
    gm.graph.lint()
    gm.recompile()


def _reads(node: fx.Node, target: str) -> bool:
    """Whether `node`'s first argument is parameter `target`."""
    first = node.args[0] if node.args else None
    return isinstance(first, fx.Node) and first.op == "get_attr" and first.target == target


def _after(gm: fx.GraphModule, node: fx.Node, redistribute: str) -> None:
    """Route every use of `node` through the submodule `redistribute`."""
    with gm.graph.inserting_after(node):
        moved = gm.graph.call_module(redistribute, (node,))
    node.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)


class _Replicated(nn.Module):
    """A tensor the graph makes itself (positions, masks) as a replicated DTensor."""

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self._mesh = mesh

    def forward(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
            return DTensor.from_local(x, self._mesh, [Replicate()], run_check=False)
        return x


def _lift_constants(gm: fx.GraphModule, mesh: DeviceMesh) -> None:
    """Make every tensor the graph builds from no input or parameter (``arange`` positions, masks)
    a replicated DTensor where a DTensor op reads it.

    Implicit replication would convert them in the forward only: autograd saves the plain
    tensor, and the backward (an embedding's, reading its indices) then mixes the two.
    """
    distributed: set[fx.Node] = set()
    lifted: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            distributed.add(node)
            continue
        if node.op not in ("call_function", "call_module") or not any(a in distributed for a in node.all_input_nodes):
            continue
        distributed.add(node)
        for arg in node.all_input_nodes:
            if arg in distributed or arg.op == "output":
                continue
            if arg not in lifted:
                name = f"_tp_replicated_{len(lifted)}"
                gm.add_submodule(name, _Replicated(mesh))
                with gm.graph.inserting_after(arg):
                    lifted[arg] = gm.graph.call_module(name, (arg,))
            node.replace_input_with(arg, lifted[arg])
    gm.graph.lint()
    gm.recompile()


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """Remove torch.export's ``_assert_tensor_metadata`` checks (no DTensor rule; they return nothing)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


class _TensorParallelStage(nn.Module):
    """A stage run on DTensors: inputs enter replicated, outputs leave whole."""

    def __init__(self, stage: nn.Module, mesh: DeviceMesh) -> None:
        super().__init__()
        self.stage = stage
        self._mesh = mesh

    def forward(self, *args: Any) -> Any:
        inputs = tuple(
            DTensor.from_local(a, self._mesh, [Replicate()], run_check=False) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        with implicit_replication():  # tensors the graph makes itself (positions, masks): replicated
            out = self.stage(*inputs)
        return tree_map(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, out)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoweredStage:
    """A stage after `parallelize_stage`: the module holding its tensors, the module to run."""

    module: nn.Module
    """Holds the stage's parameters and buffers (the stage, or its cut into layers)."""
    run: nn.Module
    """What `PipelineStage` runs (the tensor-parallel, recompute and FSDP wrappers around `module`)."""
    names: Mapping[str, str] | None = None
    """When the stage was cut into layers (`cut_layers`): each tensor name of `module` -> its name in the stage."""


def parallelize_stage(
    stage: fx.GraphModule,
    spec: ParallelSpec,
    mesh: DeviceMesh,
    *,
    recompute: bool = False,
    layer_of: Mapping[str, int] | None = None,
) -> LoweredStage:
    """Apply tensor parallelism, recompute and sharding to one stage module (in place; pass a copy).

    Under FSDP (a sharding over more than one data-parallel replica) with `layer_of`
    given, the stage is cut into one submodule per layer after tensor parallelism
    (`cut_layers`), and each layer holding parameters is a ``fully_shard`` unit, then the
    stage's root: parameters are gathered a layer at a time, the next one prefetched, as
    the planner prices ZeRO-3.

    Args:
        stage: The stage (a copy: its graph and parameters are replaced).
        spec: What to apply; checked by `check_parallel`.
        mesh: This process's ``("dp", "tp")`` mesh (`parallel_mesh`).
        recompute: Run the stage's forward again in backward (``torch.utils.checkpoint``).
        layer_of: Node name -> its layer's index (`LayeredModel.node_layer`); None keeps
            the stage one FSDP unit.

    Returns:
        The module holding the stage's tensors (its parameters are the DTensors to
        optimize) and the module to run.
    """
    held: nn.Module = stage
    names: Mapping[str, str] | None = None
    units: tuple[str, ...] = ()
    dp = mesh["dp"].size()
    sharded = spec.sharding is not Sharding.NONE and dp > 1
    if spec.tensor_parallel > 1:
        tp_mesh = mesh["tp"]
        placements = _placements(spec, sharded)
        _drop_metadata_asserts(stage)
        for name, param in list(stage.named_parameters()):
            owner, _, attr = name.rpartition(".")
            placement = placements.get(name, Replicate())
            shared = distribute_tensor(param.detach(), tp_mesh, [placement], src_data_rank=None)
            stage.get_submodule(owner).register_parameter(attr, nn.Parameter(shared, requires_grad=param.requires_grad))
        for name, buffer in list(stage.named_buffers()):
            owner, _, attr = name.rpartition(".")
            stage.get_submodule(owner).register_buffer(
                attr, distribute_tensor(buffer, tp_mesh, [Replicate()], src_data_rank=None)
            )
        _pin(stage, spec, sharded)
        _lift_constants(stage, tp_mesh)
    if sharded and layer_of is not None:
        cut = cut_layers(stage, layer_of)
        held, names = cut.module, cut.names
        units = tuple(u for u in cut.units if any(True for _ in cut.module.get_submodule(u).parameters()))
    run: nn.Module = _TensorParallelStage(held, mesh["tp"]) if spec.tensor_parallel > 1 else held
    if recompute:
        run = Recomputed(run)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        reshard = spec.sharding is Sharding.ZERO3
        layers = [fully_shard(held.get_submodule(unit), mesh=mesh["dp"], reshard_after_forward=reshard) for unit in units]
        for before, after in zip(layers, layers[1:]):  # the next layer's gather issued as one starts (torchtitan's option)
            before.set_modules_to_forward_prefetch([after])
            after.set_modules_to_backward_prefetch([before])
        root = fully_shard(run, mesh=mesh["dp"], reshard_after_forward=reshard)
        if spec.sharding is Sharding.ZERO2:
            root.set_reshard_after_backward(False)  # every unit's: the step's first gather serves all microbatches
        if spec.sharding is not Sharding.ZERO1:
            run = EveryMicrobatch(run)
    return LoweredStage(module=held, run=run, names=names)


class EveryMicrobatch(nn.Module):
    """An FSDP2 stage that reduce-scatters every microbatch's gradients.

    torch's pipelining schedules treat a stage that is an ``FSDPModule`` as ZeRO-1: no
    gradient reduction and no resharding until the last backward (``PipelineStage``'s
    ``backward_maybe_with_nosync`` and ``perform_reduce_grad``). Wrapped in a plain
    module, the stage runs as FSDP2 runs anywhere else: each backward reduce-scatters
    and accumulates the gradient shards.
    """

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.stage(*args, **kwargs)


def reshard_after_step(run: nn.Module) -> None:
    """Free the weights a ZeRO-2 stage keeps gathered over the step (and register its
    shards again, which the optimizer updates). Nothing for other stages."""
    from torch.distributed.fsdp import FSDPModule

    for module in run.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def average_gradients(parameters: Iterator[nn.Parameter], mesh: DeviceMesh) -> None:
    """Average each gradient over the ``dp`` mesh dimension (replicated tensor-parallel stages: no DDP for DTensors)."""
    group = mesh.get_group("dp")
    size = mesh["dp"].size()
    for p in parameters:
        if p.grad is None:
            continue
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        dist.all_reduce(grad, group=group)
        grad.div_(size)


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every DTensor gathered whole (collective over each DTensor's mesh, in `state`'s order)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}

