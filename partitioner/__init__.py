"""partitioner: automatic model partitioning for PyTorch.

The compiler's phases, one module each:

1. `trace`      model -> torch.fx graph (torch.fx.symbolic_trace, or torch.export)
2. `profiling`  per-node FLOPs and bytes on fake tensors; `layers` groups nodes into layers
3. `cost_model` layers x devices (`devices`, ``profiles/*.json``) -> seconds and bytes
4. `solve`      placement by exact DP (chains) or ILP (pulp: HiGHS, CBC), or data parallelism
5. `rewrite`    a runnable module: parameters placed, transfers inserted (`replicate` for DP)
6. `report`     the plan as a table; `plan` holds it as data (JSON in and out)

Training plans (`training`, `pipeline_plan`, `simulate`, `cluster`) add pipelining with
microbatches, replicated stages and heterogeneous clusters, judged by a schedule simulator;
`distributed` runs plans on torch.distributed.

Front doors: `auto_parallelize` and `plan` (`api`), `plan_training` (`training`), and the
``partitioner`` command (`cli`). `simdevice` provides simulated devices ``cpu:0``,
``cpu:1``, ... to dry-run plans on a CPU.
"""

from partitioner.api import PartitionedModule, auto_parallelize, compile_plan, plan, trace_layers
from partitioner.training import plan_training
from partitioner.errors import (
    DeviceError,
    DeviceMismatchError,
    InfeasibleError,
    ModelError,
    PartitionerError,
    PlanFormatError,
    PlanMismatchError,
    ProfileError,
    SolverError,
    TraceError,
)
from partitioner.options import (
    Objective,
    Optimizer,
    PlanOptions,
    SolverBackend,
    SolverOptions,
    Strategy,
    TrainingOptions,
)
from partitioner.plan import Plan
from partitioner.simdevice import SimulatedDevices, to_plain

__all__ = [
    "auto_parallelize",
    "plan",
    "compile_plan",
    "trace_layers",
    "plan_training",
    "PartitionedModule",
    "Plan",
    "PlanOptions",
    "TrainingOptions",
    "SolverOptions",
    "Objective",
    "Optimizer",
    "SolverBackend",
    "Strategy",
    "SimulatedDevices",
    "to_plain",
    "PartitionerError",
    "TraceError",
    "ProfileError",
    "DeviceError",
    "DeviceMismatchError",
    "InfeasibleError",
    "SolverError",
    "PlanFormatError",
    "PlanMismatchError",
    "ModelError",
]

__version__ = "0.1.0"
