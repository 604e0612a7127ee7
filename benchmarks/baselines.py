"""What users do instead of partitioner: the splits of the tools they use. Pure (no torch).

Each function returns an *assignment* (device index per layer, layers in topological order)
so that `partitioner.solve.evaluate` prices it against the same cost tables as the plan.

Where the tool is installed it is called for real (Accelerate: `benchmarks.cases`); the
pipeline splitters below are re-implementations of the documented algorithms, labelled so
in every result (`IMPLEMENTATIONS`), because DeepSpeed and torchgpipe are not dependencies
of this project and their splitters need a distributed job (DeepSpeed's ``PipelineModule``)
or a real device and an ``nn.Sequential`` (torchgpipe's ``balance_by_time``):

- `partition_uniform`: DeepSpeed ``deepspeed.runtime.utils.partition_uniform``, what
  ``PipelineModule(partition_method="uniform")`` uses: equal numbers of layers per stage, the
  remainder one each to the first stages. Hand-written ``torch.distributed.pipelining``
  splits (``split_spec`` every ``n // stages`` blocks) are `equal_blocks`.
- `partition_balanced`: DeepSpeed ``partition_balanced`` (``partition_method="parameters"``,
  DeepSpeed's default): the linear-partition dynamic program minimising the spread
  (largest minus smallest part) of the per-stage parameter counts.
- `block_partition`: torchgpipe ``balance.blockpartition.solve`` (Bárány et al., "Block
  partitions of sequences", Israel J. Math. 2015), which ``balance_by_time`` runs on
  per-layer forward times (integer microseconds summed over one second of repeats).
- `device_map_to_assignment`: an Accelerate ``device_map`` (module prefix -> device), read
  the way Accelerate's hooks execute it: a layer runs where its modules are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "IMPLEMENTATIONS",
    "partition_uniform",
    "partition_balanced",
    "block_partition",
    "profiled_microseconds",
    "parts_to_assignment",
    "sizes_to_assignment",
    "equal_blocks",
    "min_max_parts",
    "min_max_contiguous",
    "device_map_to_assignment",
]

IMPLEMENTATIONS = {
    "accelerate-sequential": "accelerate.infer_auto_device_map (the installed library, called for real)",
    "accelerate-balanced": "accelerate.utils.get_balanced_memory + infer_auto_device_map (installed, called for real)",
    "accelerate-pipelined": "accelerate-sequential's device map run as a torch.distributed.pipelining pipeline "
                            "(a stage per device's layers), priced by its period",
    "accelerate-balanced-pipelined": "accelerate-balanced's device map run as a torch.distributed.pipelining "
                                     "pipeline, priced by its period",
    "equal-layers": "re-implementation of deepspeed.runtime.utils.partition_uniform (partition_method='uniform')",
    "equal-blocks": "re-implementation of a hand-written torch.distributed.pipelining split_spec (n // stages blocks)",
    "parameters": "re-implementation of deepspeed.runtime.utils.partition_balanced (partition_method='parameters')",
    "time-balanced": "re-implementation of torchgpipe.balance.balance_by_time (blockpartition.solve on forward times)",
    "data-parallel": "the whole model on every device, batch split (DDP), priced by partitioner's replica cost",
    "replicated-split": "an expert's inference layout: the best of r replicas (r dividing the devices) of an "
                        "equal-bytes or equal-time split over n / r devices, batch split among the replicas",
}
"""Baseline name -> what produced it (each result records this)."""


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Stage boundaries for equal layer counts: stage p holds items ``parts[p]:parts[p+1]``.

    DeepSpeed's rule: ``num_items // num_parts`` each, the remainder one each to the first
    stages; with no more items than stages, one item per stage and the rest empty.

    >>> partition_uniform(8, 4)
    [0, 2, 4, 6, 8]
    >>> partition_uniform(10, 4)
    [0, 3, 6, 8, 10]
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1 (got {num_parts})")
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Stage boundaries minimising (heaviest stage - lightest stage), as DeepSpeed computes them.

    The linear-partition dynamic program over prefix sums (Skiena, The Algorithm Design
    Manual, 8.5): ``cost[i][j]`` is the best spread of the first i items in j stages; a
    tie goes to the later split point (DeepSpeed compares with ``>=``). O(n^2 m).

    >>> partition_balanced([1, 1, 1, 1, 4], 2)
    [0, 4, 5]
    """
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    best_max = [[inf] * (m + 1) for _ in range(n + 1)]
    best_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    split = [[0] * (m + 1) for _ in range(n + 1)]
    best_max[0][0] = 0.0
    cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                high = max(best_max[k][j - 1], part)
                low = min(best_min[k][j - 1], part)
                if cost[i][j] >= high - low:
                    cost[i][j] = high - low
                    best_max[i][j], best_min[i][j], split[i][j] = high, low, k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(split[parts[-1]][j])
    return parts[::-1]


def block_partition(sequence: Sequence[float], partitions: int) -> list[int]:
    """Stage sizes from torchgpipe's block partition heuristic (not always optimal).

    Normalise the costs to [0, 1], start from equal counts, then repeatedly move one
    element from the block next to a lightest block (on the side of a heaviest one) into
    it, until the heaviest block exceeds the lightest by at most 1 (normalised units).

    Raises:
        ValueError: Fewer elements than partitions, or partitions < 1 (as torchgpipe).

    >>> block_partition([1, 1, 1, 1], 2)
    [2, 2]
    """
    if partitions < 1:
        raise ValueError(f"partitions must be a positive integer ({partitions} < 1)")
    n = len(sequence)
    if n < partitions:
        raise ValueError(f"sequence is shorter than intended partitions ({n} < {partitions})")
    low = min(sequence)
    spread = max(sequence) - low
    normal = [0.0 if spread == 0 else (x - low) / spread for x in sequence]
    splits = [n // partitions * (x + 1) for x in range(partitions - 1)] + [n]

    def block_size(i: int) -> float:
        return sum(normal[(splits[i - 1] if i > 0 else 0) : splits[i]])

    def leaderboard() -> list[tuple[float, int]]:
        return [(block_size(i), i) for i in range(partitions)]

    while True:
        max_size, p = max(leaderboard())
        while True:
            min_size, q = min(leaderboard())
            if max_size <= min_size + 1:
                starts = [0] + splits[:-1]
                return [stop - start for start, stop in zip(starts, splits)]
            if p < q:
                h = q - 1
                splits[h] -= 1
            else:
                h = q + 1
                splits[q] += 1
            if p == h:
                break


def profiled_microseconds(seconds: Sequence[float], timeout_s: float = 1.0) -> list[int]:
    """Per-layer costs as torchgpipe's ``profile_times`` reports them.

    It runs the whole model forward again and again until `timeout_s` has passed and sums,
    per layer, each run's elapsed time truncated to whole microseconds.
    """
    step = sum(seconds)
    runs = max(1, math.ceil(timeout_s / step)) if step > 0 else 1
    return [runs * int(s * 1_000_000) for s in seconds]


def parts_to_assignment(parts: Sequence[int]) -> tuple[int, ...]:
    """Boundaries ``[0, b1, ..., n]`` (stage p holds ``parts[p]:parts[p+1]``) -> device per item."""
    return tuple(p for p in range(len(parts) - 1) for _ in range(parts[p], parts[p + 1]))


def sizes_to_assignment(sizes: Sequence[int]) -> tuple[int, ...]:
    """Stage sizes ``[n0, n1, ...]`` -> device per item."""
    return tuple(p for p, size in enumerate(sizes) for _ in range(size))


def equal_blocks(is_block: Sequence[bool], num_stages: int) -> tuple[int, ...]:
    """A hand-written pipeline split: stage boundaries at the start of every k-th block.

    The blocks (the repeated transformer layers) are divided as `partition_uniform`
    divides items; layers before the first block stay on stage 0 and layers after a
    boundary block go with it, so the embeddings lead stage 0 and the head closes the last.

    >>> equal_blocks([False, True, True, True, True, False], 2)
    (0, 0, 0, 1, 1, 1)
    """
    blocks = [i for i, b in enumerate(is_block) if b]
    if not blocks:
        raise ValueError("the model has no blocks to split between")
    bounds = partition_uniform(len(blocks), num_stages)
    starts = {blocks[bounds[p]]: p for p in range(1, num_stages) if bounds[p] < len(blocks)}
    stage, out = 0, []
    for i in range(len(is_block)):
        stage = starts.get(i, stage)
        out.append(stage)
    return tuple(out)


def min_max_parts(costs: Sequence[float], num_parts: int) -> list[int]:
    """Stage boundaries ``[0, b1, ..., n]`` of the contiguous split of `costs` into
    `num_parts` stages (some may be empty) whose heaviest stage is least: the equal split an
    expert computes from a profile (by time) or from the weights (by bytes). The linear
    partition dynamic program over prefix sums, O(n^2 m); a tie goes to the latest cut, so
    that empty stages come last.

    >>> min_max_parts([3, 1, 1, 1], 2)
    [0, 1, 4]
    >>> min_max_parts([2, 2], 4)
    [0, 1, 2, 2, 2]
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1 (got {num_parts})")
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[j][i]: least heaviest stage of the first i items in j stages; cut[j][i]: where the last begins.
    best = [list(prefix)]
    cut = [[0] * (n + 1)]
    for _ in range(1, num_parts):
        row, where = [0.0] * (n + 1), [0] * (n + 1)
        for i in range(n + 1):
            value, latest = min((max(best[-1][k], prefix[i] - prefix[k]), -k) for k in range(i + 1))
            row[i], where[i] = value, -latest
        best.append(row)
        cut.append(where)
    parts = [n]
    for j in range(num_parts - 1, 0, -1):
        parts.append(cut[j][parts[-1]])
    parts.append(0)
    return parts[::-1]


def min_max_contiguous(costs: Sequence[float], num_parts: int) -> float:
    """The least possible heaviest stage when `costs` are cut into at most `num_parts`
    contiguous stages (the bound layer granularity allows on identical devices).

    >>> min_max_contiguous([3, 1, 1, 1], 2)
    3.0
    """
    parts = min_max_parts(costs, num_parts)
    return max((float(sum(costs[a:b])) for a, b in zip(parts, parts[1:])), default=0.0)


def _lookup(name: str, device_map: Mapping[str, int | str]) -> int | str | None:
    """Accelerate's rule: a tensor or module goes where its longest mapped prefix says."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        key = ".".join(parts[:k])
        if key in device_map:
            return device_map[key]
    return device_map.get("")


def device_map_to_assignment(
    device_map: Mapping[str, int | str],
    layers: Sequence[tuple[Sequence[str], Sequence[str]]],
    producers: Sequence[Sequence[int]],
) -> tuple[tuple[int, ...], list[str], list[str]]:
    """Read an Accelerate ``device_map`` as a layer assignment.

    A layer goes where its modules go (its first module's device when a map splits it;
    those layers are returned as `split`); one with neither modules nor tensors of its own
    (ops between modules) runs where its first input was made, and one fed only by model
    inputs where the first layer after it runs.

    Args:
        device_map: Module prefix -> device index, ``"cpu"`` or ``"disk"``.
        layers: ``(modules, tensors)`` qualified names per layer, in topological order.
        producers: Layers whose values each layer reads, per layer.

    Returns:
        ``(assignment, offloaded, split)``: the device index per layer (an offloaded layer
        gets its neighbour's), the layers Accelerate put on ``cpu`` or ``disk`` (off the
        devices: the map does not fit them), and the layers the map spreads over devices.
    """
    placed: list[int | None] = []
    offloaded: list[str] = []
    split: list[str] = []
    for index, (modules, tensors) in enumerate(layers):
        targets = [_lookup(name, device_map) for name in list(modules) or list(tensors)]
        targets = [t for t in targets if t is not None]
        if not targets:
            placed.append(None)
            continue
        if len(set(targets)) > 1:
            split.append(str(index))
        first = targets[0]
        if isinstance(first, str):
            offloaded.append(str(index))
            placed.append(None)
        else:
            placed.append(int(first))
    out: list[int | None] = list(placed)
    for index, device in enumerate(out):
        if device is None and producers[index]:
            out[index] = out[producers[index][0]]
    for index in range(len(out) - 1, -1, -1):
        if out[index] is None:
            out[index] = out[index + 1] if index + 1 < len(out) and out[index + 1] is not None else 0
    return tuple(d if d is not None else 0 for d in out), offloaded, split
