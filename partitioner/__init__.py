"""partitioner: automatic model partitioning for PyTorch.

The compiler's phases, one module each:

1. `trace`      model -> torch.fx graph (torch.fx.symbolic_trace, or torch.export)
2. `profiling`  per-node FLOPs and bytes on fake tensors; `layers` groups nodes into layers;
                `measure` times them on the devices present (`analysis` runs 1-2 for every planner)
3. `cost_model` layers x devices (`devices`, ``profiles/*.json``) -> seconds and bytes
                (`training_costs`: the training planner's per-layer tables)
4. `solve`      placement by exact DP (chains) or ILP (pulp: HiGHS, CBC), or data parallelism
5. `rewrite`    a runnable module: parameters placed, transfers inserted (`replicate` for DP),
                wrapped as a `PartitionedModule` (`partitioned`)
6. `report`     the plan as a table; `plan` holds it as data (JSON in and out)

Training plans (`training`, `pipeline_plan`, `simulate`, `cluster`) add pipelining with
microbatches, replicated stages and heterogeneous clusters, judged by a schedule simulator;
`distributed` runs plans on torch.distributed.

Front doors: `auto_parallelize` and `plan` (`api`), `plan_training` (`training`), and the
``partitioner`` command (`cli`). `simdevice` provides simulated devices ``cpu:0``,
``cpu:1``, ... to dry-run plans on a CPU.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Errors, options and the plan are torch-free and cheap: imported now. The front doors
# import torch (4 s), so they load on first use (PEP 562): `import partitioner.solve`,
# `partitioner.simulate`, `partitioner.pipeline_plan`, `partitioner.plan` and the report
# work without torch installed.
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
    TraceOptions,
    TrainingOptions,
)
from partitioner.plan import Plan

# `partitioner.plan` is the front door, the function; importing `Plan` above bound the
# module `partitioner/plan.py` to that name: unbind it, so that `__getattr__` gives the function.
del globals()["plan"]

if TYPE_CHECKING:
    from partitioner.analysis import analyze, trace_layers
    from partitioner.api import auto_parallelize, compile_plan, plan
    from partitioner.partitioned import PartitionedModule
    from partitioner.simdevice import SimulatedDevices, to_plain
    from partitioner.training import plan_training

_LAZY = {
    "auto_parallelize": "partitioner.api",
    "plan": "partitioner.api",
    "compile_plan": "partitioner.api",
    "analyze": "partitioner.analysis",
    "trace_layers": "partitioner.analysis",
    "PartitionedModule": "partitioner.partitioned",
    "plan_training": "partitioner.training",
    "SimulatedDevices": "partitioner.simdevice",
    "to_plain": "partitioner.simdevice",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule, as `import partitioner; partitioner.api` always gave
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'partitioner' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "auto_parallelize",
    "plan",
    "compile_plan",
    "analyze",
    "trace_layers",
    "plan_training",
    "PartitionedModule",
    "Plan",
    "PlanOptions",
    "TraceOptions",
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
