"""The training planner's search space: ranks of devices, tensor parallelism, sharding, microbatches, schedules.

A `Configuration` fixes everything but the layer split; `configurations` lists the space
for a cluster and a global batch (see the package docstring for its rules).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from partitioner.cluster import Cluster
from partitioner.options import Sharding, TrainingOptions
from partitioner.simulate import PipelineSchedule

__all__ = [
    "FAMILIES",
    "Group",
    "Configuration",
    "shapes",
    "tensor_parallel_degrees",
    "microbatch_counts",
    "microbatch_sizes",
    "interleaving_takes",
    "configurations",
]

FAMILIES = ("data parallel", "FSDP", "TP x DP", "pipeline", "hybrid", "TP x PP x DP", "single device")
"""Kinds of configuration, compared in the report (tp: the tensor-parallel degree):

- ``data parallel``: one stage on several devices, tp 1, replicated or ZeRO-1/2;
- ``FSDP``: one stage, tp 1, parameters sharded too (ZeRO-3, either FSDP2 reshard mode);
- ``TP x DP``: one stage, tp > 1 (any sharding; one TP group alone too);
- ``pipeline``: several stages, one device each;
- ``hybrid``: several stages on groups of devices, tp 1 (pipeline x data parallel);
- ``TP x PP x DP``: several stages, tp > 1;
- ``single device``: one device."""


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
    """Everything but the layer split: ranks, tensor parallelism, sharding, microbatches, schedule.

    A rank's group of ``r`` devices is ``r / tp`` data-parallel replicas of ``tp`` devices
    each: devices ``[k tp, (k + 1) tp)`` of the group (in one node) split every layer's
    tensor-parallel pairs between them, and the ``r / tp`` replicas (devices strided by
    ``tp``) split the rank's samples and keep or shard its state as `sharding` says.
    """

    groups: tuple[Group, ...]
    """The ranks, in pipeline order."""
    layout: str
    """``one group``, ``one device per stage``, ``replicas in a node`` or ``stages in a node``."""
    microbatches: int
    schedule: PipelineSchedule
    virtual_stages: int = 1
    tp: int = 1
    """Tensor-parallel degree: devices per replica (consecutive, in one node)."""
    sharding: Sharding = Sharding.NONE
    """What the data-parallel replicas of each rank shard among themselves."""

    def data_parallel(self, group: Group) -> int:
        """Data-parallel replicas of `group`: its devices over the tensor-parallel degree."""
        return group.replicas // self.tp

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
            if self.tp > 1:
                return "TP x DP"
            if self.groups[0].replicas == 1:
                return "single device"
            return "FSDP" if self.sharding in (Sharding.ZERO3, Sharding.ZERO3_KEEP) else "data parallel"
        if self.tp > 1:
            return "TP x PP x DP"
        return "pipeline" if all(g.replicas == 1 for g in self.groups) else "hybrid"

    def _parallelism(self) -> str:
        """``, tp 4 x dp 2, zero3`` (empty for tp 1 and no sharding)."""
        dps = sorted({self.data_parallel(g) for g in self.groups})
        out = ""
        if self.tp > 1:
            out += f", tp {self.tp} x dp {'/'.join(map(str, dps))}"
        if self.sharding is not Sharding.NONE:
            out += f", {self.sharding.value}"
        return out

    def describe(self, cluster: Cluster) -> str:
        """``4 stages x 2 replicas (2 on a100-40gb, 2 on v100); 1f1b, 16 microbatches`` and the like."""
        kinds = ["+".join(dict.fromkeys(cluster.devices[d].profile.name for d in g.devices)) for g in self.groups]
        timing = f"{self.schedule.value}, {self.microbatches} microbatch{'es' if self.microbatches > 1 else ''}"
        idle = cluster.num_devices - sum(g.replicas for g in self.groups)
        if idle:
            timing += f"; {idle} of {cluster.num_devices} devices idle"
        if self.stages == 1:
            counts: dict[str, int] = {}
            for d in self.groups[0].devices:
                name = cluster.devices[d].profile.name
                counts[name] = counts.get(name, 0) + 1
            return f"1 stage on {' + '.join(f'{n} x {k}' for k, n in counts.items())}{self._parallelism()}; {timing}"
        uniform = len({g.replicas for g in self.groups}) == 1
        runs = [
            f"{len(list(run))} on {kind if uniform or r == 1 else f'{r} x {kind}'}"
            for (kind, r), run in itertools.groupby(zip(kinds, (g.replicas for g in self.groups)))
        ]
        head = f"{self.stages} stages"
        if uniform and self.groups[0].replicas > 1:
            head += f" x {self.groups[0].replicas} {'devices' if self.tp > 1 else 'replicas'}"
        if self.virtual_stages > 1:
            head += f" on {self.ranks} ranks, {self.virtual_stages} per rank"
        if self.layout == "stages in a node":
            head += ", stages in a node"
        what = "ranks: " if self.virtual_stages > 1 else ""
        return f"{head} ({what}{', '.join(runs)}){self._parallelism()}; {timing}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _halves(n: int) -> list[int]:
    """``n / 2, n / 4, ...`` while whole and above 1."""
    out = []
    while n % 2 == 0 and n // 2 > 1:
        n //= 2
        out.append(n)
    return out


def _consecutive(groups: tuple[Group, ...], largest: int) -> str:
    """The layout of groups of consecutive devices, the largest of `largest` devices."""
    return "one group" if len(groups) == 1 else "one device per stage" if largest == 1 else "replicas in a node"


def unequal_replicas(devices: int) -> list[tuple[int, ...]]:
    """Replica counts along the pipeline, not all equal, for `devices` devices in one node:
    ``a`` ranks of ``r`` devices then ``k`` of ``2r`` (``a, k >= 1``, ``a r + 2 k r =
    devices``), and the same the other way round (``6``: ``1+1+1+1+2``, ``1+1+2+2``,
    ``2+4`` and their reverses).

    The bound: two sizes, ``r`` and ``2r``, in monotone order. A stage whose layers the
    split cannot lighten (a head, an embedding: at an end of the chain) takes twice the
    replicas and the layer split does the rest; replicas late in the pipeline also hide
    their all-reduce under the earlier stages' last backwards. A node of 8 gets 8 such
    shapes, against 35 for every order of ``r`` and ``2r`` and 124 for any unequal
    composition: on GPT-2, GPT-2 XL, BERT-large and Llama-7B on 8 A100s every order took
    2.2-2.9x as long to plan as monotone ones and found no faster plan. A heavy layer in the
    middle of the chain gets no such shape.
    """
    out: list[tuple[int, ...]] = []
    for r in range(1, devices // 3 + 1):
        for k in range(1, devices // (2 * r) + 1):
            a, rest = divmod(devices - 2 * k * r, r)
            if a >= 1 and not rest:
                rising = (r,) * a + (2 * r,) * k
                out += [rising, rising[::-1]]
    return out


def _cut(devices: Sequence[int], sizes: Sequence[int]) -> tuple[Group, ...]:
    """`devices` in consecutive groups of `sizes` devices, in order."""
    ends = list(itertools.accumulate(sizes))
    return tuple(Group(tuple(devices[e - s : e])) for s, e in zip(sizes, ends))


def shapes(cluster: Cluster) -> list[tuple[tuple[Group, ...], str]]:
    """Every (ranks in pipeline order, layout) of the space.

    One device of each kind alone (a model too small to gain from more). For each
    non-empty subset of device kinds: one group of all their devices (data
    parallelism, kinds mixed); and for each order of the kinds along the pipeline and
    each replica count ``r_k`` dividing each kind's count, that kind's devices (node by
    node) cut into groups of ``r_k`` consecutive ones. For one kind spread over several
    nodes, also *stages in a node*: with ``p`` ranks, rank ``j`` holds devices
    ``j, j + p, ...``, so each replica's pipeline stays inside a node.

    For one kind alone, all of this over the first half, quarter, ... of its devices too
    where they are whole nodes; and over its first ``c`` devices for every ``c`` up to a
    node's (the rest idle), in equal groups and in the unequal ones of `unequal_replicas`
    (``r`` and ``2r`` devices, in monotone order along the pipeline). So a plan on ``n + 1``
    devices of a kind is never slower than the plan on ``n`` of them inside a node, and on
    ``2n`` never slower than on ``n`` in whole nodes.

    The bound on the space: unequal groups of one kind only inside one node. Across nodes
    every composition of the nodes would multiply the shapes of the large clusters, where
    the configurations count most (GPT-3 on 64 H100s, 1T on 3,072 A100s) and hundreds of
    layers balance by the split; inside a node a group's all-reduce stays on the node's
    links, and the configurations on a few devices of a large cluster cost a bound each
    (their bounds exceed the plan on all of them: none is solved).
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
            if size == 1:
                everything = by_kind[subset[0]]
                per_node = sum(1 for d in everything if cluster.node_of[d] == cluster.node_of[everything[0]])
                # All the kind's devices; and its first half, quarter, ... (the rest idle) where they
                # are whole nodes or lie in one (torchrun starts as many processes on every node).
                for devices in [everything] + [everything[:c] for c in _halves(len(everything))
                                               if c % per_node == 0 or per_node % c == 0]:
                    for r in _divisors(len(devices)):
                        groups = _cut(devices, (r,) * (len(devices) // r))
                        add(groups, _consecutive(groups, r))
                    if len({cluster.node_of[d] for d in devices}) > 1:
                        for r in _divisors(len(devices))[1:-1]:
                            p = len(devices) // r
                            add(tuple(Group(tuple(devices[j::p])) for j in range(p)), "stages in a node")
                # Then its first c devices for every c that lies in its first node, cut into equal
                # groups and into unequal ones (`unequal_replicas`), the rest idle.
                for c in range(min(per_node, len(everything)), 0, -1):
                    devices = everything[:c]
                    for sizes in [(r,) * (c // r) for r in _divisors(c)] + unequal_replicas(c):
                        groups = _cut(devices, sizes)
                        add(groups, _consecutive(groups, max(sizes)))
                continue
            add((Group(tuple(d for k in subset for d in by_kind[k])),), "one group")
            for order in itertools.permutations(subset):
                for counts in itertools.product(*(_divisors(len(by_kind[k])) for k in order)):
                    groups = tuple(
                        g for k, r in zip(order, counts) for g in _cut(by_kind[k], (r,) * (len(by_kind[k]) // r))
                    )
                    add(groups, _consecutive(groups, max(counts)))
    return out


def tensor_parallel_degrees(cluster: Cluster, groups: Sequence[Group], options: TrainingOptions) -> list[int]:
    """The degrees of `options.tensor_parallel` that every group of `groups` takes.

    A degree ``t`` must divide each group's devices, and each run of ``t`` consecutive
    devices of a group (a replica) must be of one kind and lie in one node, whose devices
    of that kind in `groups` ``t`` divides (so every replica of a node is whole; devices
    left idle do not count: 6 of a node of 7 take ``t = 2``).
    """
    per_node: dict[tuple[int, str], int] = {}
    for d in (d for g in groups for d in g.devices):
        key = (cluster.node_of[d], cluster.devices[d].profile.name)
        per_node[key] = per_node.get(key, 0) + 1
    out = []
    for t in options.tensor_parallel:
        ok = True
        for g in groups:
            if g.replicas % t:
                ok = False
                break
            for k in range(0, g.replicas, t):
                keys = {(cluster.node_of[d], cluster.devices[d].profile.name) for d in g.devices[k : k + t]}
                if len(keys) > 1 or per_node[next(iter(keys))] % t:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            out.append(t)
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
        for t in tensor_parallel_degrees(cluster, groups, options):
            replicas = [g.replicas // t for g in groups]
            for m in microbatch_counts(global_batch, replicas, options):
                sizes.update(global_batch // (m * r) for r in replicas)
    return tuple(sorted(sizes))


def interleaving_takes(ranks: int, microbatches: int) -> bool:
    """Whether interleaved 1F1B runs `microbatches` on `ranks`: torch's schedule (and so
    `partitioner.simulate`) runs them in ``max(1, m // p)`` equal rounds."""
    return microbatches % max(1, microbatches // ranks) == 0


def configurations(cluster: Cluster, global_batch: int, layers: int, options: TrainingOptions) -> list[Configuration]:
    """The space: every shape x tensor-parallel degree x sharding x microbatch count x
    schedule (x stages per rank, interleaved).

    At most one stage per layer and `TrainingOptions.max_stages`; interleaving needs two
    ranks or more and a microbatch count torch's schedule takes; with
    `TrainingOptions.equal_replicas`, the same replica count on every rank. Degrees as
    `tensor_parallel_degrees` takes them; a sharding other than none only where some rank
    has two data-parallel replicas or more (none alone otherwise: nothing to shard). With
    `TrainingOptions.config`, only the configurations it admits.
    """
    out = []
    max_stages = min(layers, options.max_stages or layers)
    for groups, layout in shapes(cluster):
        p = len(groups)
        if p > max_stages or (options.equal_replicas and len({g.replicas for g in groups}) > 1):
            continue
        for t in tensor_parallel_degrees(cluster, groups, options):
            replicas = [g.replicas // t for g in groups]
            shardings = options.shardings if max(replicas) > 1 else (Sharding.NONE,)
            for m in microbatch_counts(global_batch, replicas, options):
                for schedule in options.schedules:
                    if schedule is PipelineSchedule.ONE_F_ONE_B and m < p:
                        continue  # torch's Schedule1F1B needs a microbatch per stage (fewer: GPipe's order)
                    if schedule is not PipelineSchedule.INTERLEAVED_1F1B:
                        vs = [1]
                    else:
                        vs = []
                        for v in range(2, options.max_virtual_stages + 1):
                            if p < 2 or p * v > max_stages or not interleaving_takes(p, m):
                                break
                            vs.append(v)
                    out += [
                        Configuration(
                            groups=groups, layout=layout, microbatches=m, schedule=schedule, virtual_stages=v, tp=t,
                            sharding=sharding,
                        )
                        for v in vs
                        for sharding in shardings
                    ]
    return out if options.config is None else [c for c in out if options.config.admits(c)]
