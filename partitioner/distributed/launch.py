"""Processes: rank and world size, the process group and its subgroups, each process's device.

torchrun starts one process per device the plan uses and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``; a process group started by the user is
used as it is. The backend follows the device: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from partitioner.distributed.layout import Layout
from partitioner.errors import DeviceError, PlanMismatchError
from partitioner.plan import Plan

__all__ = ["launch_rank", "start_process_group", "process_groups", "tie_groups", "process_device"]


def launch_rank() -> tuple[int, int]:
    """(rank, world size): from the running process group, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group(device: torch.device, rank: int, world_size: int) -> bool:
    """Start the default process group unless one runs; whether this call started it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    elif world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        raise PlanMismatchError(
            f"WORLD_SIZE is {world_size} but MASTER_ADDR is not set: start the processes with torchrun"
        )
    return True


def process_groups(layout: Layout, rank: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """(this process's pipeline group, its replica group); both None (the default group) without replicas.

    Every process creates every group, in the same order (`dist.new_group` is collective).
    """
    if layout.replicas == 1:
        return None, None
    pipeline_rank, replica = layout.position(rank)
    pipelines = [dist.new_group(list(layout.pipeline_group(i))) for i in range(layout.replicas)]
    replicas = [dist.new_group(list(layout.replica_group(r))) for r in range(layout.pipeline_ranks)]
    return pipelines[replica], replicas[pipeline_rank]


def tie_groups(
    layout: Layout, tied: Sequence[tuple[tuple[int, str], ...]], rank: int, tensor_parallel: int = 1
) -> list[tuple[tuple[tuple[int, str], ...], dist.ProcessGroup | None]]:
    """For each tied parameter this process holds (`StageGraphs.tied`: its copies), the
    group of every process holding a copy of the same slice: each replica of each stage
    that holds one (under tensor parallelism, the replicas of this process's
    tensor-parallel index: replica ``i`` holds slice ``i % tensor_parallel``). None when
    this process holds every copy (one process, its stages, one replica).

    Every process creates every group, in the same order (`dist.new_group` is collective).
    """
    mine: list[tuple[tuple[tuple[int, str], ...], dist.ProcessGroup | None]] = []
    for copies in tied:
        stages = {s for s, _ in copies}
        for t in range(tensor_parallel):
            replicas = range(t, layout.replicas, tensor_parallel)
            ranks = sorted({layout.process(layout.stages[s].rank, i) for s in stages for i in replicas})
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine.append((copies, group))
    return mine


def process_device(plan: Plan, layout: Layout, rank: int, override: str | torch.device | None) -> torch.device:
    """Process `rank`'s device: `override`, else ``cpu`` for a CPU plan device, else its
    present ``cuda:N``, else ``cuda:LOCAL_RANK``.

    Raises:
        DeviceError: A GPU plan device and no CUDA, or no GPU of that index.
    """
    if override is not None:
        return torch.device(override)
    planned = plan.devices[layout.devices[rank]]
    if planned.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"process {rank} runs plan device {planned.name} (a GPU) but sees no CUDA device; "
            "pass device='cpu' to run the plan on the CPU"
        )
    count = torch.cuda.device_count()
    named = re.fullmatch(r"cuda:(\d+)", planned.torch_device or "")
    index = int(named.group(1)) if named else int(os.environ.get("LOCAL_RANK", str(rank)))
    if index >= count:
        raise DeviceError(
            f"process {rank} runs plan device {planned.name} on cuda:{index}, but this machine has {count} GPU(s); "
            f"launch at most {count} processes per node (torchrun --nproc-per-node {count})"
        )
    return torch.device("cuda", index)
