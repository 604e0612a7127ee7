"""Checkpoints of a partitioned model under the original model's names, to move between layouts.

A checkpoint is a directory: ``part-<r>-of-<p>.pt`` per pipeline rank ``r`` (its stages'
tensors, written by its first replica: the others hold the same values), ``unused.pt``
(state entries the graph never reads, as they were at `build`), and ``index.json``
naming the files, the keys in each and the plan's model and fingerprint. Every key is a
name of the original model's ``state_dict`` (a tied weight under each of its names), so
`load_into_original` loads it into the unpartitioned model with ``load_state_dict``, and
`load_from_original` loads an ordinary state dict into the stages of any plan. Tensors
are saved with `torch.save` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from partitioner.distributed.runtime import PipelineRank
from partitioner.errors import PlanMismatchError

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_into_original", "load_from_original"]

CHECKPOINT_FORMAT = 1
_INDEX = "index.json"
_UNUSED = "unused.pt"


def _part_file(pipeline_rank: int, ranks: int) -> str:
    return f"part-{pipeline_rank}-of-{ranks}.pt"


def save_checkpoint(part: PipelineRank, directory: str | os.PathLike[str]) -> Path:
    """Save the partitioned model's state; call it on every process (it ends with a barrier).

    Args:
        part: This process's part (from `partitioner.distributed.build`).
        directory: Where to write (created if missing; a shared file system when the
            processes run on several machines).

    Returns:
        The directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layout = part.layout
    state = part.state_dict()
    if part.replica == 0:
        held = {k: t for k, t in state.items() if k not in part.unused_state}
        torch.save({k: t.cpu() for k, t in held.items()}, out / _part_file(part.pipeline_rank, layout.pipeline_ranks))
    if part.rank == 0:
        torch.save(dict(part.unused_state), out / _UNUSED)
        files = {
            _part_file(r, layout.pipeline_ranks): sorted({n for s in layout.stages_of(r) for n in part.held_names(s.index)})
            for r in range(layout.pipeline_ranks)
        }
        files[_UNUSED] = sorted(part.unused_state)
        index = {
            "format": CHECKPOINT_FORMAT,
            "model_name": part.plan.model_name,
            "fingerprint": part.plan.fingerprint,
            "layout": layout.describe(),
            "files": files,
        }
        (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint as one state dict of the original model (on the CPU).

    Raises:
        PlanMismatchError: The directory is not a checkpoint of this format, or a file
            misses keys its index lists.
    """
    root = Path(directory)
    try:
        index = json.loads((root / _INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanMismatchError(f"{root} is not a partitioner checkpoint ({_INDEX}: {e})") from None
    if index.get("format") != CHECKPOINT_FORMAT:
        raise PlanMismatchError(f"{root}: checkpoint format {index.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    state: dict[str, torch.Tensor] = {}
    for name, keys in index["files"].items():
        loaded = torch.load(root / name, map_location="cpu", weights_only=True)
        missing = sorted(set(keys) - set(loaded))
        if missing:
            raise PlanMismatchError(f"{root / name} misses {len(missing)} key(s) its index lists, e.g. {missing[0]!r}")
        state.update(loaded)
    return state


def load_into_original(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint saved by `save_checkpoint` into the unpartitioned model (strictly).

    Returns:
        `model`, its tensors overwritten in place.

    Raises:
        PlanMismatchError: The checkpoint lacks some of the model's state, or holds names
            the model does not have (it is of another model).
    """
    state = load_checkpoint(directory)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise PlanMismatchError(
            f"the checkpoint in {directory} is not of this {type(model).__name__}: "
            f"{len(missing)} name(s) missing (e.g. {missing[:2]}), {len(unexpected)} unknown (e.g. {unexpected[:2]})"
        )
    model.load_state_dict(state)
    return model


def load_from_original(part: PipelineRank, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict of the original model (``model.state_dict()``) into this process's stages.

    Call it on every process with the same state dict (replicas then agree).

    Raises:
        PlanMismatchError: A tensor of this process's stages is missing or of another shape.
    """
    part.load_state_dict(state_dict)
