"""The training planner's search space: ranks of replicated devices, microbatches, schedules.

A `Configuration` fixes everything but the layer split; `configurations` lists the space
for a cluster and a global batch (see the package docstring for its rules).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.cluster import Cluster
from partitioner.options import TrainingOptions
from partitioner.simulate import PipelineSchedule

__all__ = [
    "FAMILIES",
    "Group",
    "Configuration",
    "shapes",
    "microbatch_counts",
    "microbatch_sizes",
    "interleaving_takes",
    "configurations",
]

FAMILIES = ("data parallel", "pipeline", "hybrid", "single device")
"""Kinds of configuration, compared in the report: one stage on several devices; one device
per stage; stages on groups of devices; one device."""


@dataclass(frozen=True, slots=True)
class Group:
    """The devices of one pipeline rank; each holds a replica of the rank's stages."""

    devices: tuple[int, ...]
    """Indices into `Cluster.devices`, in ring order."""

    @property
    def replicas(self) -> int:
        return len(self.devices)


@dataclass(frozen=True, slots=True, kw_only=True)
class Configuration:
    """Everything but the layer split: ranks, microbatches, schedule."""

    groups: tuple[Group, ...]
    """The ranks, in pipeline order."""
    layout: str
    """``one group``, ``one device per stage``, ``replicas in a node`` or ``stages in a node``."""
    microbatches: int
    schedule: PipelineSchedule
    virtual_stages: int = 1

    @property
    def ranks(self) -> int:
        return len(self.groups)

    @property
    def stages(self) -> int:
        return len(self.groups) * self.virtual_stages

    @property
    def family(self) -> str:
        """One of `FAMILIES`."""
        if self.stages == 1:
            return "single device" if self.groups[0].replicas == 1 else "data parallel"
        return "pipeline" if all(g.replicas == 1 for g in self.groups) else "hybrid"

    def describe(self, cluster: Cluster) -> str:
        """``4 stages x 2 replicas (2 on a100-40gb, 2 on v100); 1f1b, 16 microbatches`` and the like."""
        kinds = ["+".join(dict.fromkeys(cluster.devices[d].profile.name for d in g.devices)) for g in self.groups]
        timing = f"{self.schedule.value}, {self.microbatches} microbatch{'es' if self.microbatches > 1 else ''}"
        if self.stages == 1:
            counts: dict[str, int] = {}
            for d in self.groups[0].devices:
                name = cluster.devices[d].profile.name
                counts[name] = counts.get(name, 0) + 1
            return f"1 stage on {' + '.join(f'{n} x {k}' for k, n in counts.items())}; {timing}"
        uniform = len({g.replicas for g in self.groups}) == 1
        runs = [
            f"{len(list(run))} on {kind if uniform or r == 1 else f'{r} x {kind}'}"
            for (kind, r), run in itertools.groupby(zip(kinds, (g.replicas for g in self.groups)))
        ]
        head = f"{self.stages} stages"
        if uniform and self.groups[0].replicas > 1:
            head += f" x {self.groups[0].replicas} replicas"
        if self.virtual_stages > 1:
            head += f" on {self.ranks} ranks, {self.virtual_stages} per rank"
        if self.layout == "stages in a node":
            head += ", stages in a node"
        what = "ranks: " if self.virtual_stages > 1 else ""
        return f"{head} ({what}{', '.join(runs)}); {timing}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shapes(cluster: Cluster) -> list[tuple[tuple[Group, ...], str]]:
    """Every (ranks in pipeline order, layout) of the space.

    One device of each kind alone (a model too small to gain from more). For each
    non-empty subset of device kinds: one group of all their devices (data
    parallelism, kinds mixed); and for each order of the kinds along the pipeline and
    each replica count ``r_k`` dividing each kind's count, that kind's devices (node by
    node) cut into groups of ``r_k`` consecutive ones. For one kind spread over several
    nodes, also *stages in a node*: with ``p`` ranks, rank ``j`` holds devices
    ``j, j + p, ...``, so each replica's pipeline stays inside a node.
    """
    by_kind = {k: [d for d, dev in enumerate(cluster.devices) if dev.profile.name == k] for k in cluster.kinds}
    out: list[tuple[tuple[Group, ...], str]] = []
    seen: set[tuple[Group, ...]] = set()

    def add(groups: tuple[Group, ...], layout: str) -> None:
        if groups not in seen:
            seen.add(groups)
            out.append((groups, layout))

    for devices in by_kind.values():
        add((Group((devices[0],)),), "one group")
    for size in range(1, len(by_kind) + 1):
        for subset in itertools.combinations(cluster.kinds, size):
            if size > 1:
                add((Group(tuple(d for k in subset for d in by_kind[k])),), "one group")
            for order in itertools.permutations(subset):
                for counts in itertools.product(*(_divisors(len(by_kind[k])) for k in order)):
                    groups = tuple(
                        Group(tuple(by_kind[k][j : j + r]))
                        for k, r in zip(order, counts)
                        for j in range(0, len(by_kind[k]), r)
                    )
                    if len(groups) == 1:
                        add(groups, "one group")
                    else:
                        add(groups, "one device per stage" if max(counts) == 1 else "replicas in a node")
            devices = by_kind[subset[0]]
            if size == 1 and len({cluster.node_of[d] for d in devices}) > 1:
                for r in _divisors(len(devices))[1:-1]:
                    p = len(devices) // r
                    add(tuple(Group(tuple(devices[j::p])) for j in range(p)), "stages in a node")
    return out


def microbatch_counts(batch: int, replicas: Sequence[int], options: TrainingOptions) -> list[int]:
    """Microbatch counts ``m`` within the options' limits such that ``m x r`` divides `batch` for every ``r``."""
    return [
        m
        for m in range(options.min_microbatches, min(options.max_microbatches, batch) + 1)
        if all(batch % (m * r) == 0 for r in replicas)
    ]


def microbatch_sizes(cluster: Cluster, global_batch: int, options: TrainingOptions) -> tuple[int, ...]:
    """Samples per device per microbatch that some configuration of the space uses.

    `partitioner.training_costs.TrainingCosts.times` needs a table for every device kind at
    each of these sizes.
    """
    sizes: set[int] = set()
    for groups, _ in shapes(cluster):
        replicas = [g.replicas for g in groups]
        for m in microbatch_counts(global_batch, replicas, options):
            sizes.update(global_batch // (m * r) for r in replicas)
    return tuple(sorted(sizes))


def interleaving_takes(ranks: int, microbatches: int) -> bool:
    """Whether interleaved 1F1B runs `microbatches` on `ranks`: torch's schedule (and so
    `partitioner.simulate`) runs them in ``max(1, m // p)`` equal rounds."""
    return microbatches % max(1, microbatches // ranks) == 0


def configurations(cluster: Cluster, global_batch: int, layers: int, options: TrainingOptions) -> list[Configuration]:
    """The space: every shape x microbatch count x schedule (x stages per rank, interleaved).

    At most one stage per layer and `TrainingOptions.max_stages`; interleaving needs two
    ranks or more and a microbatch count torch's schedule takes; with
    `TrainingOptions.equal_replicas`, the same replica count on every rank.
    """
    out = []
    max_stages = min(layers, options.max_stages or layers)
    for groups, layout in shapes(cluster):
        p = len(groups)
        if p > max_stages or (options.equal_replicas and len({g.replicas for g in groups}) > 1):
            continue
        for m in microbatch_counts(global_batch, [g.replicas for g in groups], options):
            for schedule in options.schedules:
                if schedule is not PipelineSchedule.INTERLEAVED_1F1B:
                    out.append(Configuration(groups=groups, layout=layout, microbatches=m, schedule=schedule))
                    continue
                for v in range(2, options.max_virtual_stages + 1):
                    if p < 2 or p * v > max_stages or not interleaving_takes(p, m):
                        break
                    out.append(
                        Configuration(groups=groups, layout=layout, microbatches=m, schedule=schedule, virtual_stages=v)
                    )
    return out
