"""Run plans on torch.distributed: pipeline stages and replica groups across processes and machines.

No runtime of its own: a plan lowers to `torch.distributed.pipelining` (one `PipelineStage`
per stage, the plan's `ScheduleGPipe` / `Schedule1F1B` / `ScheduleInterleaved1F1B`),
`DistributedDataParallel` or FSDP2 ``fully_shard`` over each stage's replicas, and DTensor
tensor parallelism over groups of them, launched with ``torchrun``.

- `layout`     pure: plan -> stages, device groups, process ranks, schedule, batch split
- `stages`     the traced graph -> one `fx.GraphModule` per stage (tensors in, tensors out)
- `launch`     rank and world size, process group and subgroups, each process's device
- `spmd`       tensor and sequence parallelism (DTensor on the stage graph), FSDP2 sharding, recompute
- `names`      a stage's tensors under the original model's names
- `runtime`    `build`: this process's stages, DDP or FSDP2 and schedule; `PipelineRank.step`
- `checkpoint` state under the original model's names (torch.distributed.checkpoint): load under any plan
- `interop`    a plan's stages for torch's `pipeline()` (`split_spec`) and DeepSpeed (`deepspeed_parts`)

See docs/distributed.md.
"""

from partitioner.distributed.checkpoint import (
    load_checkpoint,
    load_from_original,
    load_into_original,
    load_into_part,
    save_checkpoint,
)
from partitioner.distributed.interop import deepspeed_parts, split_spec
from partitioner.distributed.layout import SCHEDULES, Layout, StageSpec, check_launch, plan_layout, stage_layers
from partitioner.distributed.runtime import LossFn, PipelineRank, build
from partitioner.distributed.spmd import ParallelSpec
from partitioner.distributed.stages import StageGraphs, build_stages

__all__ = [
    "build",
    "PipelineRank",
    "LossFn",
    "ParallelSpec",
    "save_checkpoint",
    "load_checkpoint",
    "load_into_original",
    "load_into_part",
    "load_from_original",
    "split_spec",
    "deepspeed_parts",
    "plan_layout",
    "stage_layers",
    "check_launch",
    "Layout",
    "StageSpec",
    "SCHEDULES",
    "build_stages",
    "StageGraphs",
]
