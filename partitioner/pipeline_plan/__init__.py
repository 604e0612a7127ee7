"""Pure training planner: a chain of layers -> pipeline stages on device groups, tensor-parallel and (sharded) data-parallel inside.

No torch: it reads `partitioner.training_costs.TrainingCosts` (per-layer seconds, bytes and
parameters), a `partitioner.cluster.Cluster` (devices and links) and
`partitioner.options.TrainingOptions`, and answers with a `partitioner.plan.PipelinePlan`
whose step time is what `partitioner.simulate.simulate` gives for its stages.

**Search space** (`space`). A *configuration* fixes everything but the layer split:

- which device kinds take part (every non-empty subset, in every order along the
  pipeline), every device of a chosen kind (of one kind alone, also its first half,
  quarter, ... where they are whole nodes, and its first ``c`` devices for every ``c`` up
  to a node's, the rest idle); or one device alone (one per kind);
- the ranks: each kind's devices cut into groups of ``r_k`` replicas (``r_k`` divides the
  kind's count; groups never mix kinds), laid out *replicas in a node* (a group is
  consecutive devices, node by node, so replicas share a node and so do consecutive
  stages) or, for one kind across nodes, *stages in a node* (each replica's pipeline
  inside a node, the all-reduce across nodes); or one group of every chosen device (data
  parallelism; kinds may mix, at the slowest replica's pace). Of one kind inside a node,
  also unequal counts per rank (PipeDream's, Narayanan et al. SOSP'19): ``r`` and ``2r``
  devices in monotone order along the pipeline (`space.unequal_replicas`: ``1+1+2+2``,
  ``4+2+2``), so a stage the split cannot lighten (a head, an embedding) takes twice the
  replicas, or late stages hide their all-reduce under the earlier ones' last backwards.
  The bound keeps the space small: every order of ``r`` and ``2r``, or compositions across
  nodes, would multiply the configurations (35 and 8 unequal shapes on a node of 8, every
  order against monotone; see `space.shapes`). Unequal plans, as those mixing kinds,
  run in the simulator only (`TrainingOptions.equal_replicas` leaves them out);
- the tensor-parallel degree ``tp``: a group is ``d = r / tp`` data-parallel replicas of
  ``tp`` consecutive devices of one kind in one node (``tp`` divides the group and the
  node's devices of that kind; degrees that split no layer are left out);
- the sharding over the ``d`` replicas (none, ZeRO-1, ZeRO-2, ZeRO-3 / FSDP with or
  without resharding after forward), where some rank has ``d > 1``;
- ``m`` microbatches (``m x d`` divides the global batch for every group, within the
  options' limits) and the schedule: GPipe, 1F1B (with a microbatch per rank at least, as torch's
  `Schedule1F1B` needs), or interleaved 1F1B with ``v = 2..``
  stages per rank (microbatch counts torch's schedule takes);
- per stage, its recomputation: none, selective (attention cores) or full
  (`partitioner.options.Recompute`).

What each stage then costs and holds is `terms` (tensor-parallel compute and all-reduces,
sharded state, ZeRO collectives, activations under sequence parallelism).

Stages hold contiguous layers, at least one each: ``ranks x v`` of them, at most one per
layer and `TrainingOptions.max_stages`. Interleaved stages get ``1/v`` of their rank's
memory each (a sufficient condition; the simulator reports the rank's true peak).

**Algorithm** (`stages`, `search`). For each configuration an exact DP over the stages in
order splits the layers: it minimises the largest per-microbatch stage cost
``T = max(f + b + exposed all-reduce / m, send_fwd + send_bwd)`` (a rank's compute lane
and its link; on CPUs, whose cores move the bytes, the sends hold the compute lane:
``T = f + b + send_fwd + send_bwd + ...``) subject to every stage's memory under the schedule, then, among the splits
reaching that, the sum of ``f + b + sends`` (fill and drain). A rank is busy at least
``m (f + b)`` (CPUs: and their sends) and then all-reduces, so ``m x T*`` bounds the step of *every* split of the
configuration from below. Configurations go least bound first; one whose bound cannot
beat the best step so far is skipped, and so is one another sharding dominates;
otherwise its DP split and its equal split join the same best-first frontier, keyed by
their own bounds (`bounds`), and are simulated (GPipe by its exact closed form) when their
bound is the least left. The plan is the fastest simulated. `PipelinePlan.lower_bound_s` is the least bound over the whole
space, so ``step / lower_bound - 1`` bounds how far any plan of the space could beat it;
the DP itself is exact for its objective (gap 0).
"""

from partitioner.pipeline_plan.search import PipelineResult, plan_pipeline
from partitioner.pipeline_plan.space import FAMILIES, Configuration, Group, configurations, microbatch_sizes
from partitioner.pipeline_plan.stages import Partition, StageModel

__all__ = [
    "plan_pipeline",
    "PipelineResult",
    "microbatch_sizes",
    "configurations",
    "Configuration",
    "Group",
    "Partition",
    "StageModel",
    "FAMILIES",
]
