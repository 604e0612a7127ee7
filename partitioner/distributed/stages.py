"""Split a traced graph into pipeline stage modules, one `fx.GraphModule` per stage.

Mechanism only: the stage of every layer comes from the plan. The invariant: running the
stages one after the other, each on the tuple the previous one returned, computes what
the traced graph computes, outputs and gradients.

How. Every node takes its layer's stage (`LayeredModel.node_layer`); a node no layer
holds takes the latest stage it reads from (torch.export's ``_guards_fn`` input check is
dropped: the stages see microbatches, not the inputs it was traced for). Stage ``k``
is a new graph of its nodes, built with ``fx.GraphModule(traced, graph)``, which copies
exactly the parameters, buffers and submodules the stage's nodes name, under their
original qualified names. Its inputs are the values *live* at its start: produced by an
earlier stage (or a model input) and read by this stage or a later one; it returns the
values live at its end, passing through those it does not read (a skip connection
crossing a stage, a model input a later stage reads), and the last stage returns the
model's output tensors. A tied weight (a parameter read by layers of several stages, such
as GPT-2's embedding and head) is held by every stage that reads it, each its own copy
under the same name (`StageGraphs.tied`); the runtime sums its gradients over the copies
once per step before the optimizer runs (as DeepSpeed's tied layers and Megatron's
embedding group do), so it is never sent with the microbatches. The planner prices it so:
a copy's weights, gradients and optimizer state on each stage that reads it.

Why not `torch.fx.passes.split_module`: it lifts ``get_attr`` nodes into the parent graph
and passes parameters to each partition as arguments, so a partition owns no parameters
(DDP and optimizers would see none). Why not `torch.distributed.pipelining.pipeline`: it
traces the model again and cuts only at module calls (``SplitPoint`` on a qualified
name), so ops outside blocks (GPT-2's mask construction) and merged layers land where the
planner did not put them, and the graph it splits is not the one the plan's fingerprint
names.

Shapes. `torch.distributed.pipelining` sends tensors only, and every microbatch has the
same shape. So the graph is specialised to one microbatch first: it runs once on fake
tensors of the microbatch's shape, and every value that is not a tensor (``sym_size``
of a batch-dynamic export graph, ``x.size(0)`` of a symbolic trace, keyword flags such as
``use_cache``) becomes the constant it takes there. A graph that holds its batch as a
constant (a model branching on its batch size, traced at that batch) does not run at
another size; `build_stages` is then given a trace at the microbatch's size.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils import stateless
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from partitioner.errors import PartitionerError, PlanMismatchError, ProfileError
from partitioner.layers import SKIP_TARGETS, LayeredModel
from partitioner.profiling import _flat_inputs

__all__ = ["StageGraphs", "TensorSpec", "MicrobatchShapeError", "build_stages", "flat_batch"]

_CONSTANT_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape, strides, dtype and ``requires_grad`` of a tensor crossing a stage boundary."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @property
    def contiguous(self) -> bool:
        expected, size = [], 1
        for dim in reversed(self.shape):
            expected.append(size)
            size *= dim
        return all(d == 1 or st == e for d, st, e in zip(self.shape, self.stride, reversed(expected)))

    def made_contiguous(self) -> TensorSpec:
        """The spec of ``.contiguous()`` of such a tensor (what is sent: receive buffers are dense)."""
        stride, size = [], 1
        for dim in reversed(self.shape):
            stride.append(size)
            size *= max(dim, 1)
        return TensorSpec(self.shape, tuple(reversed(stride)), self.dtype, self.requires_grad)

    def example(self) -> torch.Tensor:
        """A tensor on ``meta`` with these properties (what `PipelineStage` reads its metadata from)."""
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        return t.requires_grad_(self.requires_grad) if t.is_floating_point() or t.is_complex() else t


class MicrobatchShapeError(PartitionerError):
    """The traced graph does not run at the microbatch's shape (it was traced at a fixed batch)."""


@dataclass(frozen=True, slots=True)
class StageGraphs:
    """The traced graph cut into stages, and how to feed and read them."""

    modules: tuple[fx.GraphModule, ...]
    """Stage ``k`` takes the tensors live at its start and returns those live at its end
    (the last: the model's output tensors), as a tuple. They share tensors with the trace."""
    inputs: tuple[int, ...]
    """Which flat model inputs (`flat_batch` order) stage 0 takes, in its order."""
    constants: Mapping[int, Any]
    """Flat model inputs that are not tensors, by position: the values the stages were specialised to."""
    input_names: tuple[str, ...]
    """Name of each flat model input (the graph's placeholders), for messages."""
    output_spec: TreeSpec
    """Pytree of the graph's output, with the last stage's tensors as leaves."""
    output_constants: Mapping[int, Any]
    """Leaves of `output_spec` that are not tensors, by position."""
    output_tree_spec: TreeSpec | None
    """torch.export's output spec (graphs with pytree code), applied after `output_spec`."""
    boundaries: tuple[tuple[str, ...], ...]
    """Names of the values each stage returns (for messages and tests)."""
    input_specs: tuple[tuple[TensorSpec, ...], ...]
    """What each stage takes, for one microbatch."""
    output_specs: tuple[tuple[TensorSpec, ...], ...]
    """What each stage returns, for one microbatch."""
    tied: tuple[tuple[tuple[int, str], ...], ...] = ()
    """Each parameter held by several stages: ``(stage, its name in that stage's module)``
    per copy, in stage order. Their gradients are to be summed once per step."""

    def model_output(self, last_stage_output: Any) -> Any:
        """The model's output (as the original returns it) from the last stage's tuple."""
        tensors = list(last_stage_output if isinstance(last_stage_output, (tuple, list)) else (last_stage_output,))
        leaves: list[Any] = []
        for k in range(self.output_spec.num_leaves):
            leaves.append(self.output_constants[k] if k in self.output_constants else tensors.pop(0))
        out = tree_unflatten(leaves, self.output_spec)
        if self.output_tree_spec is not None:
            out = tree_unflatten(list(out), self.output_tree_spec)
        return out


def flat_batch(layered: LayeredModel, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    """The model inputs ``model(*args, **kwargs)`` as the traced graph's flat placeholders."""
    return _flat_inputs(layered.traced.gm, tuple(args), dict(kwargs))


def build_stages(
    layered: LayeredModel,
    stage_of_layer: Sequence[int],
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any],
    microbatch: int,
    device: torch.device,
) -> StageGraphs:
    """Cut `layered`'s graph into stages, specialised to microbatches of `microbatch` samples.

    Args:
        layered: The traced model and its layers.
        stage_of_layer: Stage of each layer; a stage's layers need not be contiguous, but
            no value may flow from a later stage to an earlier one.
        example_args: Example positional inputs (their shapes past dimension 0 are kept).
        example_kwargs: Example keyword inputs.
        microbatch: Samples per microbatch (dimension 0 of every tensor input).
        device: Where the stages will run (device constants in the graph are retargeted).

    Raises:
        PlanMismatchError: A value flows from a later stage to an earlier one.
        PartitionerError: A value that is not a tensor crosses stages, or the graph does
            not run at the microbatch's shape.
    """
    gm = layered.traced.gm
    flat = flat_batch(layered, example_args, example_kwargs)
    values = _specialise(gm, flat, microbatch)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    work = fx.GraphModule(gm, graph)  # shares gm's tensors; a graph of its own to rewrite
    if [n.name for n in work.graph.nodes] != [n.name for n in gm.graph.nodes]:
        raise AssertionError("copying the graph renamed nodes; layers are keyed by node name")
    placeholders = [n for n in work.graph.nodes if n.op == "placeholder"]
    constants = _fold_constants(work, values, placeholders, flat)
    order = {n: i for i, n in enumerate(work.graph.nodes)}
    label = _labels(work, layered.node_layer, stage_of_layer)
    num_stages = max(stage_of_layer, default=0) + 1
    output_node = next(n for n in work.graph.nodes if n.op == "output")
    leaves, output_spec = tree_flatten(output_node.args[0])
    output_constants = {k: leaf for k, leaf in enumerate(leaves) if not isinstance(leaf, fx.Node)}
    output_tensors = [leaf for leaf in leaves if isinstance(leaf, fx.Node)]
    for leaf in output_tensors:
        if not _is_tensor(values, leaf):
            raise PartitionerError(f"output value {leaf.name!r} is not a tensor; the last stage returns tensors only")
    tied = _tied_parameters(work, label)
    live = _liveness(work, label, num_stages, output_tensors, values, tied)
    ins = [sorted(live[k][0], key=order.__getitem__) for k in range(num_stages)]
    outs = [sorted(live[k][1], key=order.__getitem__) for k in range(num_stages - 1)] + [output_tensors]
    modules = tuple(
        _stage_module(work, k, label, ins[k], outs[k], device, {n for n in outs[k] if not _spec(values, n).contiguous}, tied)
        for k in range(num_stages)
    )
    return StageGraphs(
        modules=modules,
        inputs=tuple(placeholders.index(n) for n in ins[0]),
        constants=constants,
        input_names=tuple(str(p.target) for p in placeholders),
        output_spec=output_spec,
        output_constants=output_constants,
        output_tree_spec=getattr(gm, "_out_spec", None),
        boundaries=tuple(tuple(n.name for n in out) for out in outs),
        input_specs=tuple(tuple(_spec(values, n).made_contiguous() for n in group) for group in ins),
        output_specs=tuple(tuple(_spec(values, n).made_contiguous() for n in group) for group in outs),
        tied=shared_parameters(modules),
    )


# --------------------------------------------------------------------------- specialisation


class _Recorder(fx.Interpreter):
    """Runs the graph on fake tensors, keeping each node's value if it holds no tensor, its
    `TensorSpec` if it is one tensor, else `_TENSOR`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.target in SKIP_TARGETS:
            return None  # export's check of the traced inputs: the stages drop it
        try:
            out = super().run_node(n)
        except Exception as e:
            raise ProfileError(f"node {n.name!r} ({n.op} {n.target}) failed at the microbatch's shape: {e}") from e
        leaves, _ = tree_flatten(out)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = TensorSpec(tuple(out.shape), tuple(out.stride()), out.dtype, out.requires_grad)
        elif not any(isinstance(x, torch.Tensor) for x in leaves):
            self.values[n.name] = out
        else:
            self.values[n.name] = _TENSOR
        return out


class _Tensor:
    """Marks a node whose value holds a tensor."""


_TENSOR = _Tensor()


def _specialise(gm: fx.GraphModule, flat: Sequence[Any], microbatch: int) -> dict[str, Any]:
    """Node name -> its value at the microbatch's shape if it holds no tensor, its `TensorSpec`
    if it is one tensor, else `_TENSOR` (autograd on, so that ``requires_grad`` is a training step's)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x: Any, batch: int | None) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        shape = tuple(x.shape) if batch is None else (batch, *x.shape[1:])
        with mode:
            f = torch.empty(shape, dtype=x.dtype, device="meta" if x.is_meta else x.device)
        return f.requires_grad_(x.requires_grad) if f.is_floating_point() else f

    for x in flat:
        if isinstance(x, torch.Tensor) and x.ndim == 0:
            raise PartitionerError(
                "a tensor input has no dimension 0 to split into microbatches; pass every tensor input with "
                "the batch as its first dimension"
            )
    state: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
    state.update(gm.named_buffers(remove_duplicate=False))
    fake_state = {k: fake(v, None) for k, v in state.items()}
    inputs = [fake(x, microbatch) for x in flat]
    recorder = _Recorder(gm)
    with torch.enable_grad(), mode, stateless._reparametrize_module(gm, fake_state):
        try:
            recorder.run(*inputs)
        except ProfileError as e:
            raise MicrobatchShapeError(
                f"the traced graph does not run on microbatches of {microbatch} sample(s): {e}"
            ) from e
    return recorder.values


def _is_constant(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(x) for x in value)
    if isinstance(value, slice):
        return all(_is_constant(x) for x in (value.start, value.stop, value.step))
    return isinstance(value, _CONSTANT_TYPES)


def _fold_constants(
    gm: fx.GraphModule, values: Mapping[str, Any], placeholders: Sequence[fx.Node], flat: Sequence[Any]
) -> dict[int, Any]:
    """Replace every use of a non-tensor value by the constant it takes; return the folded inputs."""
    constants: dict[int, Any] = {}
    for i, p in enumerate(placeholders):
        if not isinstance(flat[i], torch.Tensor):
            constants[i] = flat[i]
            _replace_uses(p, flat[i])
    for n in list(gm.graph.nodes):
        if n.op in ("call_function", "call_method", "call_module") and n.users and not _is_tensor(values, n):
            value = values.get(n.name)
            if _is_constant(value):
                _replace_uses(n, value)
    for n in reversed(list(gm.graph.nodes)):
        if n.op in ("call_function", "call_method") and not n.users and not _is_tensor(values, n):
            if not n.is_impure():
                gm.graph.erase_node(n)
        elif n.op == "call_module" and n.target in SKIP_TARGETS:
            gm.graph.erase_node(n)
    return constants


def _replace_uses(node: fx.Node, value: Any) -> None:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


# --------------------------------------------------------------------------- stages


def _labels(gm: fx.GraphModule, node_layer: Mapping[str, int], stage_of_layer: Sequence[int]) -> dict[fx.Node, int]:
    """Stage of every call node and tensor attribute.

    A node no layer holds takes the latest stage it reads from (else 0); the items of a
    multi-output op stay with the op, so only tensors cross stages.
    """
    label: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            if n.name in node_layer and isinstance(_attr(gm, str(n.target)), torch.Tensor):
                label[n] = stage_of_layer[node_layer[n.name]]
            continue
        if not n.op.startswith("call_"):
            continue
        inputs = [label[a] for a in n.all_input_nodes if a in label]
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in label:
            label[n] = label[n.args[0]]
        elif n.name in node_layer:
            label[n] = stage_of_layer[node_layer[n.name]]
        else:
            label[n] = max(inputs, default=0)
    return label


def _attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_tensor(values: Mapping[str, Any], node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    return isinstance(values.get(node.name, _TENSOR), (TensorSpec, _Tensor))


def _spec(values: Mapping[str, Any], node: fx.Node) -> TensorSpec:
    spec = values.get(node.name)
    if not isinstance(spec, TensorSpec):
        raise PartitionerError(f"value {node.name!r} crosses stages but is not one tensor; stages exchange tensors")
    return spec


def shared_parameters(modules: Sequence[torch.nn.Module]) -> tuple[tuple[tuple[int, str], ...], ...]:
    """The parameters several of `modules` hold (the same tensor), as `StageGraphs.tied` lists them.

    By identity, so that every way a model reads a weight in two stages counts: a
    ``get_attr`` in each (`_tied_parameters`), or a module called in one stage whose
    weight another reads directly (``F.linear(h, self.embed.weight)``).
    """
    holders: dict[int, list[tuple[int, str]]] = {}
    for k, module in enumerate(modules):
        seen: set[int] = set()
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in seen:  # one name per stage for a weight it holds twice
                seen.add(id(p))
                holders.setdefault(id(p), []).append((k, name))
    return tuple(tuple(copies) for copies in holders.values() if len(copies) > 1)


def _tied_parameters(gm: fx.GraphModule, label: Mapping[fx.Node, int]) -> dict[fx.Node, tuple[int, ...]]:
    """Parameters (``get_attr`` nodes of an ``nn.Parameter``) read by stages other than the
    one of the layer that owns them -> every stage that reads or owns them, in order.

    Buffers are left to travel with the microbatches: a stage may update one in place
    (batch norm statistics), which a copy elsewhere would not see.
    """
    tied: dict[fx.Node, tuple[int, ...]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n not in label or not isinstance(_attr(gm, str(n.target)), torch.nn.Parameter):
            continue
        stages = {label[n], *(label[u] for u in n.users if u in label)}
        if len(stages) > 1:
            tied[n] = tuple(sorted(stages))
    return tied


def _liveness(
    gm: fx.GraphModule,
    label: Mapping[fx.Node, int],
    num_stages: int,
    outputs: Sequence[fx.Node],
    values: Mapping[str, Any],
    tied: Mapping[fx.Node, tuple[int, ...]],
) -> list[tuple[set[fx.Node], set[fx.Node]]]:
    """Per stage, (values live at its start, values live at its end)."""
    live: list[tuple[set[fx.Node], set[fx.Node]]] = [(set(), set()) for _ in range(num_stages)]
    output_set = set(outputs)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            producer = -1
        elif n in tied and n not in output_set:
            continue  # every stage that reads it holds a copy
        elif n in label:
            producer = label[n]
        else:
            continue  # a submodule or constant attribute: copied into every stage that reads it
        readers = [label[u] for u in n.users if u in label]
        if n in output_set:
            readers.append(num_stages - 1)
        if not readers:
            continue
        early = [r for r in readers if r < producer]
        if early:
            user = next(u for u in n.users if u in label and label[u] < producer)
            raise PlanMismatchError(
                f"value {n.name!r} is made in stage {producer} but read by {user.name!r} in stage {label[user]}; "
                "stages must follow the graph (a plan's layers never flow back to an earlier device)"
            )
        last = max(readers)
        if last == producer:
            continue
        if not _is_tensor(values, n):
            raise PartitionerError(
                f"value {n.name!r} ({type(values.get(n.name)).__name__}) crosses from stage {max(producer, 0)} to "
                f"stage {last}; pipeline stages exchange tensors only"
            )
        for k in range(max(producer, 0), last + 1):
            if k > producer:
                live[k][0].add(n)
            if k < last:
                live[k][1].add(n)
    return live


def _stage_module(
    gm: fx.GraphModule,
    k: int,
    label: Mapping[fx.Node, int],
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    device: torch.device,
    strided: set[fx.Node],
    tied: Mapping[fx.Node, tuple[int, ...]],
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
    for n in gm.graph.nodes:
        if n in env or label.get(n) != k:
            continue
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr" and (a not in label or k in tied.get(a, ())):
                # A submodule or non-tensor attribute the stage calls, or its copy of a tied weight.
                env[a] = graph.node_copy(a)
        missing = [a.name for a in n.all_input_nodes if a not in env]
        if missing:
            raise AssertionError(f"stage {k}: {n.name} reads {missing}, which the stage does not receive")
        copied = graph.node_copy(n, env.__getitem__)
        copied.args, copied.kwargs = _retarget(copied.args, device), _retarget(copied.kwargs, device)
        env[n] = copied
    sent = [graph.call_method("contiguous", (env[n],)) if n in strided else env[n] for n in outputs]
    graph.output(tuple(sent))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"Stage{k}")


def _retarget(value: Any, device: torch.device) -> Any:
    """Device constants baked into the graph (``arange(..., device=cpu)``) -> the stage's device."""
    return tree_map(lambda x: device if isinstance(x, torch.device) else x, value)
