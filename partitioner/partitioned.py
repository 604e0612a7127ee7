"""`PartitionedModule`: what `auto_parallelize` returns, a model run over its planned devices."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from partitioner.errors import PartitionerError
from partitioner.plan import Plan
from partitioner.replicate import Copies, Replicated
from partitioner.rewrite import InsertedTransfer, gather_graph, mode_constants, place_tensors
from partitioner.simdevice import SimulatedDevices

__all__ = ["PartitionedModule", "plain_model"]


class PartitionedModule(nn.Module):
    """The rewritten model: layers on their devices, transfers inserted.

    ``pm(*args, **kwargs)`` computes what the original computes. ``pm.plan`` is the plan,
    ``pm.transfers`` the transfers the rewrite inserted, and, on simulated devices,
    ``pm.simulator`` the `SimulatedDevices` mode whose log counts the bytes moved.

    It is an ordinary module: ``pm.module.state_dict()`` has the original model's keys,
    ``copy.deepcopy(pm)`` works, and ``pm.to(device)`` gathers every layer onto one
    device (the transfers then stay there; ``pm.plan`` still describes the plan it was
    made with). ``pm.train()`` and ``pm.eval()`` switch the mode where the graph can
    follow; where the trace fixed dropout or BatchNorm to the model's mode at planning
    time, switching raises `PartitionerError` (plan the model again in the other mode).
    A `PartitionedModule` can be planned again: `auto_parallelize` and `plan` take it as
    a model.
    """

    def __init__(
        self,
        module: nn.Module,
        plan: Plan,
        transfers: Sequence[InsertedTransfer],
        simulator: SimulatedDevices | None,
        training: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.plan = plan
        self.transfers = tuple(transfers)
        self.simulator = simulator
        # The mode the model was traced in; only the top-level flags are set, so each
        # submodule keeps the mode it had (a frozen BatchNorm stays in eval mode).
        self.training = module.training = training
        # (node name, mode) of the graph's nodes whose train/eval behaviour the trace fixed.
        graph = module.module if isinstance(module, Copies) else module
        self.fixed_modes = tuple(mode_constants(graph)) if isinstance(graph, fx.GraphModule) else ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.simulator is None or any(isinstance(m, SimulatedDevices) for m in _get_current_dispatch_mode_stack()):
            return self.module(*args, **kwargs)
        with self.simulator:
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> PartitionedModule:
        """Set the mode, as `nn.Module.train` does.

        Raises:
            PartitionerError: `mode` is not the planned one and the graph fixed some op to
                the planned mode (``aten.dropout(x, p, True)``); nothing is changed.
        """
        fixed = [name for name, m in self.fixed_modes if m != mode]
        if mode != self.training and fixed:
            raise PartitionerError(
                f"cannot switch to {'train' if mode else 'eval'} mode: the trace fixed {len(fixed)} op(s) to "
                f"{'eval' if mode else 'train'} mode (dropout, batch norm; first: node {fixed[0]!r}); "
                f"put the model in {'train' if mode else 'eval'} mode and plan it again"
            )
        return super().train(mode)

    def to(self, *args: Any, **kwargs: Any) -> PartitionedModule:
        """`nn.Module.to`; a device gathers every layer, and every transfer, onto it."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        super().to(*args, **kwargs)
        if device is not None:
            self._gather(device)
        return self

    def cpu(self) -> PartitionedModule:
        return self.to("cpu")

    def cuda(self, device: int | torch.device | None = None) -> PartitionedModule:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def _gather(self, device: torch.device) -> None:
        target = str(device)
        if isinstance(self.module, Replicated):
            self.module.devices, self.module.output_device = (target,), target
        elif isinstance(self.module, Copies):
            self.module.gather(target)
        elif isinstance(self.module, fx.GraphModule):
            gather_graph(self.module, target)
        if self.simulator is not None and not (device.type == "cpu" and device.index is not None):
            self.simulator = None  # nothing is simulated any more


def plain_model(model: nn.Module) -> nn.Module:
    """`model`, or for a `PartitionedModule` a copy of what it computes as one plain module on
    the host (no transfers, plain CPU tensors), to be traced and planned again. The
    `PartitionedModule` itself is left as it is."""
    if not isinstance(model, PartitionedModule):
        return model
    inner = model.module.module if isinstance(model.module, (Replicated, Copies)) else model.module
    plain = copy.deepcopy(inner, place_tensors(inner, {}, "cpu"))
    if isinstance(plain, fx.GraphModule):
        gather_graph(plain, "cpu", drop_transfers=True)
        plain.__class__.__name__ = model.plan.model_name  # GraphModule gives each instance its own class
    plain.training = model.training
    return plain
