"""Per-node FLOPs and bytes from one run of the graph on fake tensors.

The graph runs under `FakeTensorMode`, so nothing is allocated: a Llama-70B-shaped model
built on ``meta`` is profiled in seconds. FLOPs come from `FlopCounterMode`, read node by
node (counting the ops a node dispatches to, so ``aten.linear`` counts as its ``addmm``).

Backward FLOPs are estimated as twice the forward's (gradient with respect to the input
and to the weight, each as costly as the forward matmul: Kaplan et al. 2020, "Scaling
Laws for Neural Language Models", section 2.1), op by op, for the operands that need a
gradient: a FLOP-counting op's multiplied operands (`_MULTIPLIED`: a matmul's two, an
attention's query, key and value; an added bias or mask is summed, not multiplied) each
cost an equal share of the two, and one that requires no grad costs none; ops inside a
``no_grad`` region cost none. So the first layer of a model, whose input requires no grad,
does half the backward of the same layer further in (only its weight's gradient), and a
frozen weight's layer likewise (only its input's).

Traffic. A node's ops read its inputs and write its outputs; a called module's own
parameters and buffers are read too (a ``call_module`` node of an fx graph holds its
weights inside, where no input edge shows them). A lookup (``embedding``,
``index_select``, ``gather``, ``index``) reads only the rows it picks, not its table:
the rest of a parameter's or buffer's table is `NodeStats.unread_bytes`, which a forward
does not move (a backward writes a trained table's whole gradient: `table_grad_bytes`). A
lookup into an activation (token dispatch, pooling) is priced on the whole of it, as before.

Kernels. The ATen ops a node dispatches to are counted as they run (below autograd, so
``aten.linear`` counts as its ``addmm``): every op but views (an op whose schema says
its output aliases an input: ``view``, ``t``, ``expand``, ``permute``, ``_unsafe_view``,
``detach``, ``alias``, getitem-like ``select``), allocations that write nothing
(``empty``), and ops that return no tensor (``sym_size``, ``_assert_tensor_metadata``).
The rule is torch's own runtime estimator's (``torch.utils._runtime_estimation``: its
view ops run no kernel). The FLOPs of each op that counts any (matmuls, convolutions,
attention: the ops `FlopCounterMode` knows) are kept one by one, so that the cost model
can price each at its own size's efficiency; a node that calls
``scaled_dot_product_attention`` itself keeps one entry of all its FLOPs, whichever kernel
ran it here (`NodeStats.attention_flops`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils import stateless
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from partitioner.errors import ProfileError
from partitioner.mutations import read_after
from partitioner.snapshot import named_tensors
from partitioner.trace import TRACE_LOCK
from partitioner.trace_export import quiet_fake_tensor_log

__all__ = [
    "NodeStats",
    "op_kind",
    "profile_nodes",
    "written_parameters",
    "tensor_bytes",
    "BACKWARD_FLOP_FACTOR",
    "BACKWARD_KERNEL_FACTOR",
]

BACKWARD_FLOP_FACTOR = 2
"""Backward FLOPs per forward FLOP (see the module docstring)."""

BACKWARD_KERNEL_FACTOR = 2
"""Backward kernels per forward kernel: a matmul's backward is two (input and weight
gradients, three with a bias), an element-wise op's one or two (its derivative, and the
sum that accumulates a gradient read twice); two is the middle of that range."""

# Lookups: their first argument is a table of which they read only the rows they return.
_LOOKUPS = frozenset({"embedding", "index_select", "gather", "index", "take_along_dim"})

# Ops a device profile may price apart (`DeviceProfile.op_rates`): norms by a part of their
# ATen name (``batch_norm`` covers ``native_batch_norm``, ``_native_batch_norm_legit``...),
# transcendental functions by the whole name, in-place or not (``tanh``, ``tanh_``).
_NORMS = ("layer_norm", "group_norm", "rms_norm", "instance_norm")
_FUNCTIONS = {"tanh": "tanh", "exp": "exp", "sigmoid": "sigmoid", "silu": "silu", "gelu": "gelu",
              "_softmax": "softmax", "_safe_softmax": "softmax", "softmax": "softmax",
              "_masked_softmax": "softmax", "_log_softmax": "log_softmax", "log_softmax": "log_softmax"}


def op_kind(name: str, args: Any = (), kwargs: Any = None) -> str:
    """The kind (`partitioner.devices.OP_KINDS`) of the ATen op named `name` (its overload
    packet's name, as ``native_layer_norm``) called with `args` and `kwargs`; ``""`` for any
    other op. A batch norm is ``batch_norm`` when it computes batch statistics (its one bool
    argument, ``training``, is true), else a plain element-wise op (a scale and a shift); a
    GELU is ``gelu_tanh`` when it approximates with ``tanh`` (``approximate="tanh"``)."""
    if "batch_norm" in name:
        if "with_update" in name:  # _batch_norm_with_update: training, no bool argument
            return "batch_norm"
        training = any(a is True for a in args) or bool((kwargs or {}).get("training"))
        return "batch_norm" if training and "no_training" not in name and "no_update" not in name else ""
    if any(part in name for part in _NORMS):
        return "norm"
    if "max_pool" in name:
        return "max_pool"
    if "avg_pool" in name:
        return "avg_pool"
    kind = _FUNCTIONS.get(name.removesuffix("_"), "")
    if kind == "gelu" and (kwargs or {}).get("approximate", args[1] if len(args) > 1 else "none") == "tanh":
        return "gelu_tanh"
    return kind


# Ops that allocate without writing: no kernel runs (``empty`` hands out allocator memory).
_NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh"})


@dataclass(frozen=True, slots=True)
class NodeStats:
    """What one graph node costs in one forward."""

    flops: int
    """Forward floating-point operations."""
    output_bytes: int
    """Bytes of the tensors it returns (0 for views, which share their input's storage)."""
    value_bytes: int
    """Bytes that move if its result crosses devices (views included)."""
    traffic_bytes: int
    """Bytes its ops read and write (roofline memory term)."""
    is_tensor: bool
    """Whether its result holds at least one tensor (SymInts and ints cost nothing to move)."""
    requires_grad: bool
    """Whether any output tensor requires grad (it is kept for backward when training)."""
    kernels: int = 0
    """Device kernels its forward launches (ATen ops other than views and bare allocations)."""
    gemm_flops: tuple[int, ...] = ()
    """FLOPs of each op of its forward that counts FLOPs (matmuls, convolutions, attention),
    in the order they ran; they sum to `flops`."""
    gemm_shapes: tuple[tuple[int, int, int], ...] = ()
    """``(m, n, k)`` of each op of `gemm_flops`, as a matmul ``(m x k) @ (k x n)``: a 2-D one's
    m is its rows at the traced batch; a batched one's per batch, m 0 (its rows do not
    scale with the batch); ``(0, 0, 0)`` for an op that is none (attention, convolution)."""
    bwd_flops: int = 0
    """Backward floating-point operations: `BACKWARD_FLOP_FACTOR` x each op's FLOPs, times the
    share of its matrix operands that require grad (module docstring)."""
    unread_bytes: int = 0
    """Of `traffic_bytes`, the bytes of parameter and buffer tables its lookups do not read
    (module docstring)."""
    table_grad_bytes: int = 0
    """Of `unread_bytes`, those of tables that require grad: a backward writes their gradient."""
    conv_flops: tuple[int, ...] = ()
    """Of `gemm_flops`, those of convolutions (priced by `DeviceProfile.conv_efficiency`)."""
    attention_flops: tuple[tuple[int, bool, int], ...] = ()
    """Of `gemm_flops`, those of attention (``scaled_dot_product_attention``): a node that
    calls it itself (an fx or exported function node) keeps one side-less entry of all its
    FLOPs, whichever kernel ran it; inside a module called as one node (fx's leaf
    ``nn.MultiheadAttention``) only a fused kernel is seen as attention (on ``meta``, or
    with dropout, its math path's matmuls stay matmuls). Each with
    whether it is causal (``is_causal``: a fused kernel skips the masked half) and its FLOPs
    per sample and head (``4 x query length x key length x head size``: what its kernel's
    efficiency goes by)."""
    kind: str = ""
    """The kind of the first op it ran that a profile prices apart (`op_kind`: ``batch_norm``,
    ``norm``, ``tanh``, ``softmax``, ...); ``""`` for none."""
    shape: tuple[int, ...] = ()
    """Shape of its result when that is one tensor (else empty): what `partitioner.tp_detect`
    reads widths and heads from."""


def tensor_bytes(value: Any) -> int:
    """Bytes of all tensors in a pytree value."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _launches_kernel(func: Any, out: Any) -> bool:
    """Whether the ATen op `func`, which returned `out`, ran a device kernel (module docstring)."""
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not tensors or func._overloadpacket.__name__ in _NO_KERNEL:
        return False
    return not _is_view(func)


class _OpCounter(TorchDispatchMode):
    """Counts the kernels of the ops dispatched under it and records each FLOP-counting op's FLOPs.

    Pushed inside a `FlopCounterMode`, so the counter's total before and after an op is
    that op's FLOPs.
    """

    def __init__(self, counter: FlopCounterMode, tables: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.counter = counter
        self.tables = tables
        """ids of the run's parameters and buffers: the tables a lookup may skip rows of."""
        self.kernels = 0
        self.gemm_flops: list[int] = []
        self.gemm_shapes: list[tuple[int, int, int]] = []
        self.bwd_flops = 0
        self.grads = torch.is_grad_enabled()
        """Whether the run records gradients; without, no activation requires grad to tell by."""
        self.unread = 0
        self.table_grad = 0
        self.conv_flops: list[int] = []
        self.attention_flops: list[tuple[int, bool, int]] = []
        self.kind = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._overloadpacket.__name__
        before = self.counter.get_total_flops()
        out = func(*args, **(kwargs or {}))
        flops = self.counter.get_total_flops() - before
        if flops > 0:
            self.gemm_flops.append(int(flops))
            self.gemm_shapes.append(_gemm_shape(func, args, out))
            self.bwd_flops += _backward_flops(func, int(flops), args) if self.grads else BACKWARD_FLOP_FACTOR * int(flops)
            if "conv" in name:
                self.conv_flops.append(int(flops))
            elif "attention" in name:
                self.attention_flops.append(_attention_entry(func, int(flops), args, kwargs))
        self.kind = self.kind or op_kind(name, args, kwargs)
        if _launches_kernel(func, out):
            self.kernels += 1
        table = args[0] if args else None
        if name in _LOOKUPS and isinstance(table, torch.Tensor) and id(table) in self.tables:
            unread = max(0, tensor_bytes(table) - tensor_bytes(out))
            self.unread += unread
            self.table_grad += unread if table.requires_grad and torch.is_grad_enabled() else 0
        return out


_MULTIPLIED = {
    "mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2),
    "convolution": (0, 1), "_convolution": (0, 1), "conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1),
    "scaled_dot_product_attention": (0, 1, 2), "_scaled_dot_product_flash_attention": (0, 1, 2),
    "_scaled_dot_product_efficient_attention": (0, 1, 2), "_scaled_dot_product_cudnn_attention": (0, 1, 2),
    "_scaled_dot_product_flash_attention_for_cpu": (0, 1, 2), "_efficient_attention_forward": (0, 1, 2),
    "_flash_attention_forward": (0, 1, 2),
}
"""Positions of the multiplied operands of the FLOP-counting ops (an added bias or mask is
summed in a backward, not multiplied)."""


def _is_causal(func: Any, args: Any, kwargs: Any) -> bool:
    """Whether the attention op `func` (an ATen overload, or torch's
    ``scaled_dot_product_attention`` function) was called causal: its ``is_causal`` argument,
    found by name in the schema (the position differs between the fused kernels), or
    ``custom_mask_type`` 1 or 2 (``_efficient_attention_forward``'s causal masks)."""
    schema = getattr(func, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else list(_SDPA_ARGUMENTS)
    for name in ("is_causal", "custom_mask_type"):
        if name in names:
            i = names.index(name)
            value = args[i] if i < len(args) else (kwargs or {}).get(name, 0)
            return value is True if name == "is_causal" else value in (1, 2)
    return False


_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
"""``torch.nn.functional.scaled_dot_product_attention``'s arguments, in order."""


_BTHD = frozenset({"_flash_attention_forward", "_efficient_attention_forward"})
"""Attention kernels whose query is (batch, tokens, heads, head size), not (batch, heads, tokens, head size)."""


def _head_flops(flops: int, args: Any, bthd: bool = False) -> int:
    """`flops` of an attention whose query is ``args[0]`` per sample and head: over the
    query's batch and heads (its leading dimensions; the first and third where the layout
    is `bthd`: batch, tokens, heads, head size)."""
    query = args[0] if args else None
    if not isinstance(query, torch.Tensor) or query.dim() < 3:
        return flops
    shape = [int(d) for d in query.shape]
    groups = shape[0] * shape[2] if bthd and len(shape) == 4 else math.prod(shape[:-2])
    return max(1, flops // max(1, groups))


def _name(target: Any) -> str:
    """The name of an ATen op (its overload packet's) or of a function."""
    packet = getattr(target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(target, "__name__", "")


def _attention_entry(target: Any, flops: int, args: Any, kwargs: Any) -> tuple[int, bool, int]:
    """(FLOPs, causal, FLOPs per sample and head) of an attention call (`NodeStats.attention_flops`)."""
    return flops, _is_causal(target, args, kwargs), _head_flops(flops, args, _name(target) in _BTHD)


def _calls_attention(n: fx.Node) -> bool:
    """Whether node `n` calls ``scaled_dot_product_attention`` itself (torch's function, or
    its ATen op or one of its kernels in an exported graph)."""
    return n.op == "call_function" and ("scaled_dot_product" in _name(n.target) or _name(n.target) in _BTHD)


def _gemm_shape(func: Any, args: Any, out: Any) -> tuple[int, int, int]:
    """``(m, n, k)`` of a FLOP-counting op as one matmul ``(m x k) @ (k x n)`` (see
    `NodeStats.gemm_shapes`); ``(0, 0, 0)`` where it is not one."""
    name = func._overloadpacket.__name__
    where = _MULTIPLIED.get(name)
    if where is None or len(where) != 2 or len(args) <= where[1]:
        return (0, 0, 0)
    a, b = args[where[0]], args[where[1]]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(out, torch.Tensor)):
        return (0, 0, 0)
    if "conv" in name or a.dim() < 2 or b.dim() < 2:
        # A convolution runs its own kernels (direct, Winograd, implicit GEMM), not the
        # matmul whose narrow sides the profile measures.
        return (0, 0, 0)
    # A 2-D matmul's rows are the batch's (times tokens): they scale with it. A batched one's
    # batch is its first dimension, and its rows (a sequence) do not: m unknown.
    rows = int(a.shape[-2]) if a.dim() == 2 else 0
    return (rows, int(b.shape[-1]), int(a.shape[-1]))


def _backward_flops(func: Any, flops: int, args: Any) -> int:
    """Backward FLOPs of op `func` of `flops` forward FLOPs: `BACKWARD_FLOP_FACTOR` x `flops`
    shared equally by its multiplied operands, counting those that require grad; 0 where
    gradients are off (a ``no_grad`` region of the graph); an op whose operands are not
    known keeps the whole factor."""
    if not torch.is_grad_enabled():
        return 0
    where = _MULTIPLIED.get(func._overloadpacket.__name__)
    operands = [args[i] for i in where or () if i < len(args) and isinstance(args[i], torch.Tensor)]
    if not operands:
        return BACKWARD_FLOP_FACTOR * flops
    needs = sum(1 for t in operands if t.requires_grad)
    return BACKWARD_FLOP_FACTOR * flops * needs // len(operands)


def _is_view(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    return target in (getattr, read_after, "view", "reshape", "transpose", "permute", "expand", "squeeze", "unsqueeze")


class _StatsInterpreter(fx.Interpreter):
    def __init__(
        self,
        gm: fx.GraphModule,
        counter: FlopCounterMode,
        home: torch.device | None = None,
        tables: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.counter = counter
        self.home = home
        self.tables = tables
        """ids of the (fake) parameters and buffers of the run."""
        self.stats: dict[str, NodeStats] = {}

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.home is not None:  # ``arange(device=meta)``, ``_assert_tensor_metadata(device=meta)``
            args, kwargs = tree_map(self._rehome, (args, kwargs))
        return super().call_function(target, args, kwargs)

    def _rehome(self, x: Any) -> Any:
        return self.home if isinstance(x, torch.device) and x.type == "meta" else x

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        ops = _OpCounter(self.counter, self.tables)
        try:
            with ops:
                out = super().run_node(n)
        except Exception as e:
            raise ProfileError(
                f"profiling node {n.name!r} ({n.op} {n.target}) on fake tensors failed: "
                f"{type(e).__name__}: {e}{_where(n)}"
            ) from e
        if n.op in ("placeholder", "output"):
            return out
        flops = self.counter.get_total_flops() - before
        if _calls_attention(n) and flops > 0:
            # Whichever kernel ran it here (a fused one, or the math path's matmuls on meta or
            # with dropout), the device's may differ: one attention entry of all its FLOPs.
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            entry = _attention_entry(n.target, int(flops), args, kwargs)
            ops.gemm_flops, ops.gemm_shapes, ops.attention_flops = [int(flops)], [(0, 0, 0)], [entry]
        value_bytes = tensor_bytes(out)
        inputs = [self.env[a] for a in n.all_input_nodes if a in self.env]
        in_bytes = sum(tensor_bytes(x) for x in inputs)
        if n.op == "call_module":
            module = self.fetch_attr(str(n.target))
            in_bytes += sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))
        view = n.op in ("call_function", "call_method") and _is_view(n.target)
        traffic = 0 if view else in_bytes + value_bytes
        self.stats[n.name] = NodeStats(
            flops=int(flops),
            output_bytes=0 if view or n.op == "get_attr" else value_bytes,
            value_bytes=value_bytes,
            traffic_bytes=traffic,
            is_tensor=any(isinstance(t, torch.Tensor) for t in tree_leaves(out)),
            requires_grad=any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)),
            kernels=ops.kernels,
            gemm_flops=tuple(ops.gemm_flops),
            gemm_shapes=tuple(ops.gemm_shapes),
            bwd_flops=ops.bwd_flops,
            unread_bytes=min(ops.unread, max(0, traffic - value_bytes)),
            table_grad_bytes=min(ops.table_grad, ops.unread, max(0, traffic - value_bytes)),
            conv_flops=tuple(ops.conv_flops),
            attention_flops=tuple(ops.attention_flops),
            kind=ops.kind,
            shape=tuple(int(d) for d in out.shape) if isinstance(out, torch.Tensor) else (),
        )
        return out


def _where(n: fx.Node) -> str:
    """Where `n` comes from: its source line if the trace kept one, else its module."""
    lines = (n.meta.get("stack_trace") or "").strip().splitlines()
    if lines:
        return f" {lines[-1].strip()}"
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        name = cls if isinstance(cls, str) else cls.__qualname__
        return f" (in module {path or 'the model'}, {name.rsplit('.', 1)[-1]})"
    return ""


def profile_nodes(
    gm: fx.GraphModule,
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    training: bool = True,
) -> dict[str, NodeStats]:
    """Run `gm` once on fake tensors and return each node's `NodeStats`, by node name.

    Tensors on ``meta`` are supported, also beside tensors on one other device (the
    Accelerate habit: parameters on meta from ``init_empty_weights()``, buffers and
    inputs on CPU): the fake run holds them all on that device, where the meta ones
    would be, and reads ``device=meta`` in the graph as that device. Beside several
    other devices, everything is run on ``meta``.

    Raises:
        ProfileError: a node failed on fake tensors; the message names it.
    """
    mode, fake_state, args, kwargs, home = _faked(gm, example_args, example_kwargs)
    counter = _flop_counter()
    interp = _StatsInterpreter(gm, counter, home, frozenset(id(t) for t in fake_state.values()))
    # Under the lock: the fx graph's submodules are the user's, and the fake tensors are swapped into them.
    with (
        TRACE_LOCK,
        quiet_fake_tensor_log(),
        torch.set_grad_enabled(training),
        mode,
        counter,
        stateless._reparametrize_module(gm, fake_state),
    ):
        interp.run(*_flat_inputs(gm, args, kwargs))
    return interp.stats


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


def _cpu_attention_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return int(sdpa_backward_flop_count(grad_out, query, key, value))


def _flop_counter() -> FlopCounterMode:
    """`FlopCounterMode`, also counting the CPU kernel of ``scaled_dot_product_attention``
    (torch 2.13 counts the CUDA ones only: attention on CPU was 0 FLOPs), with torch's own
    formulas (``4 b h s_q s_k d`` forward)."""
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def written_parameters(
    gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: Mapping[str, Any] | None = None
) -> frozenset[str]:
    """Names of the parameters a forward of `gm` writes in place (``self.w.mul_(0.5)`` under
    ``no_grad``, ``self.w.data.mul_(0.5)``), from one run on fake tensors: an op whose schema
    writes an argument sharing a parameter's storage tells (``.data`` is another tensor, with
    a version counter of its own, over the same storage).

    Raises:
        ProfileError: a node failed on fake tensors; the message names it.
    """
    mode, fake_state, args, kwargs, home = _faked(gm, example_args, example_kwargs)
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    interp = _StatsInterpreter(gm, FlopCounterMode(display=False), home)
    writes = _StorageWrites()
    with TRACE_LOCK, quiet_fake_tensor_log(), torch.no_grad(), mode, writes:
        with stateless._reparametrize_module(gm, fake_state):
            interp.run(*_flat_inputs(gm, args, kwargs))
    return frozenset(name for name in params if StorageWeakRef(fake_state[name].untyped_storage()) in writes.storages)


class _StorageWrites(TorchDispatchMode):
    """Records the storages of the arguments each op writes (its schema's mutable arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for t in tree_leaves(value):
                    if isinstance(t, torch.Tensor):
                        self.storages.add(StorageWeakRef(t.untyped_storage()))
        return func(*args, **kwargs)


def _faked(
    gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: Mapping[str, Any] | None
) -> tuple[FakeTensorMode, dict[str, torch.Tensor], tuple[Any, ...], dict[str, Any], torch.device | None]:
    """A fake tensor mode, fakes of `gm`'s tensors (by name) and of the inputs, and the
    device that stands for ``meta`` in the run (None: every tensor stays where it is)."""
    # Plain tensor attributes too (constants an export graph reads): an in-place op on a
    # real tensor would change it for real.
    state: dict[str, torch.Tensor] = dict(named_tensors(gm))
    kwargs = dict(example_kwargs or {})
    home = _home_device([*state.values(), *tree_leaves((tuple(example_args), kwargs))])
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        f: torch.Tensor
        if home is not None and x.device != home:
            if home.type == "meta" or not x.is_meta:
                f = mode.from_tensor(x.to(home))
            else:  # a meta tensor stands for one on `home`: make it there, without storage
                with mode:
                    f = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=home)
        else:
            f = mode.from_tensor(x)
        return f.requires_grad_(x.requires_grad) if f.is_floating_point() else f

    fake_state = {k: fake(v) for k, v in state.items()}
    rehome = home if home is not None and home.type != "meta" else None
    return mode, fake_state, tree_map(fake, tuple(example_args)), tree_map(fake, kwargs), rehome


def _home_device(values: list[Any]) -> torch.device | None:
    """The one device a fake run holds every tensor on, or None to keep each on its own.

    None without meta tensors. With them: the other device if there is exactly one (a
    meta tensor has no storage, so it can stand for one anywhere), else ``meta``.
    """
    devices = {x.device for x in values if isinstance(x, torch.Tensor)}
    if not any(d.type == "meta" for d in devices):
        return None
    real = [d for d in devices if d.type != "meta"]
    return real[0] if len(real) == 1 else torch.device("meta")


def _flat_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The values of the graph's placeholders for a call ``gm(*args, **kwargs)``.

    Graphs from torch.export flatten their inputs (pytree codegen); fx graphs take the
    forward's own signature, with defaults for missing keyword arguments.
    """
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        names = list(bound.arguments)
        n_pos = in_spec.child(0).num_children
        positional = [bound.arguments[k] for k in names[:n_pos]]
        keywords = {k: bound.arguments[k] for k in names[n_pos:]}
        return list(fx_pytree.tree_flatten_spec((positional, keywords), in_spec))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: list[Any] = list(args)
    for p in placeholders[len(args) :]:
        if p.target in kwargs:
            values.append(kwargs[p.target])
        elif p.args:
            values.append(p.args[0])
        else:
            raise ProfileError(f"no example value for input {p.target!r}; pass it in example_kwargs")
    return values
