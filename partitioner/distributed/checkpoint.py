"""Checkpoints of a partitioned model under the original model's names, to move between layouts.

A checkpoint is a directory: ``part-<r>-of-<p>.pt`` per pipeline rank ``r`` (its stages'
tensors, written by its first replica: the others hold the same values), ``unused.pt``
(state entries the graph never reads, as they were at `build`), and ``index.json``
naming the files, the keys in each, the plan's model and fingerprint, and the save's id
and step. Every key is a name of the original model's ``state_dict`` (a tied weight under
each of its names), so `load_into_original` loads it into the unpartitioned model, and
`load_from_original` loads an ordinary state dict into the stages of any plan.

Every file carries the save's id (one per `save_checkpoint` call, shared by its
processes) and the plan's fingerprint, so a part left from another save, of the same plan
at another step or of another plan, is refused rather than mixed in. Loading validates
the whole checkpoint (every file present, a regular file inside the directory, readable,
of this save, with the keys its index lists) and every tensor against the target (name,
shape, dtype) before it copies anything: a refused load leaves the target as it was.
Tensors are saved with `torch.save` and read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from partitioner.distributed.runtime import PipelineRank
from partitioner.errors import PlanMismatchError
from partitioner.files import read_capped, staged

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_into_original",
    "load_from_original",
]

CHECKPOINT_FORMAT = 2
"""2: every file records the save's id and the plan's fingerprint (1 had plain tensor dicts)."""
_INDEX = "index.json"
_UNUSED = "unused.pt"
_PART = re.compile(r"part-(\d+)-of-(\d+)\.pt")
# An index lists a few thousand keys; anything far larger is not one of ours.
_INDEX_LIMIT = 64 * 2**20


def _part_file(pipeline_rank: int, ranks: int) -> str:
    return f"part-{pipeline_rank}-of-{ranks}.pt"


def _save_id(part: PipelineRank) -> str:
    """A fresh id for this save, the same on every process (process 0 draws it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return uuid.uuid4().hex
    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=part.device if part.device.type == "cuda" else None)
    return str(box[0])


def _write(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary name, then rename: a crash never leaves a torn file under `path`."""
    with staged(path) as temporary:
        torch.save(obj, temporary)


def save_checkpoint(part: PipelineRank, directory: str | os.PathLike[str], *, step: int | None = None) -> Path:
    """Save the partitioned model's state; call it on every process (it ends with a barrier).

    Args:
        part: This process's part (from `partitioner.distributed.build`).
        directory: Where to write (created if missing; a shared file system when the
            processes run on several machines). A checkpoint there is replaced.
        step: The training step, recorded in every file (for your records; the save's id,
            not the step, is what ties the files together).

    Returns:
        The directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_id = _save_id(part)
    layout = part.layout
    header = {"format": CHECKPOINT_FORMAT, "save_id": save_id, "step": step, "fingerprint": part.plan.fingerprint}
    state = part.state_dict()
    if part.replica == 0:
        name = _part_file(part.pipeline_rank, layout.pipeline_ranks)
        held = {k: t.cpu() for k, t in state.items() if k not in part.unused_state}
        _write({**header, "file": name, "tensors": held}, out / name)
    if part.rank == 0:
        _write({**header, "file": _UNUSED, "tensors": dict(part.unused_state)}, out / _UNUSED)
        files = {
            _part_file(r, layout.pipeline_ranks): sorted({n for s in layout.stages_of(r) for n in part.held_names(s.index)})
            for r in range(layout.pipeline_ranks)
        }
        files[_UNUSED] = sorted(part.unused_state)
        index = {
            **header,
            "model_name": part.plan.model_name,
            "layout": layout.describe(),
            "files": files,
        }
        with staged(out / _INDEX) as temporary:
            temporary.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out


# ---------------------------------------------------------------------- loading


def _refuse(root: Path, what: str) -> PlanMismatchError:
    return PlanMismatchError(f"the checkpoint in {root} cannot be loaded: {what}")


def _regular_file(root: Path, name: str, what: str) -> Path:
    """``root / name``, checked to be a regular file directly inside `root` (links resolved)."""
    path = root / name
    try:
        resolved = path.resolve(strict=True)
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise _refuse(
            root, f"{name} ({what}) is missing; the save did not finish, or files were removed: save again"
        ) from None
    except OSError as e:
        raise _refuse(root, f"{name} ({what}) cannot be read ({e.strerror or e})") from None
    if resolved.parent != root.resolve():
        raise _refuse(root, f"{name} ({what}) leads to {resolved}, outside the checkpoint's directory")
    if not stat.S_ISREG(mode):
        raise _refuse(root, f"{name} ({what}) is not a regular file")
    return resolved


def _read_index(root: Path) -> dict[str, Any]:
    path = _regular_file(root, _INDEX, "the index; is this a partitioner checkpoint?")
    try:
        index = json.loads(read_capped(path, _INDEX_LIMIT))
    except (OSError, ValueError) as e:
        raise PlanMismatchError(f"{root} is not a partitioner checkpoint ({_INDEX}: {e})") from None
    if not isinstance(index, dict):
        raise PlanMismatchError(f"{root} is not a partitioner checkpoint ({_INDEX} holds no JSON object)")
    if index.get("format") != CHECKPOINT_FORMAT:
        raise PlanMismatchError(
            f"{root}: checkpoint format {index.get('format')!r}, expected {CHECKPOINT_FORMAT} "
            "(format 1 was written by an earlier partitioner: load it with that version, then save again)"
        )
    files = index.get("files")
    if (
        not isinstance(index.get("save_id"), str)
        or not isinstance(index.get("fingerprint"), str)
        or not isinstance(files, dict)
        or not all(isinstance(keys, list) and all(isinstance(k, str) for k in keys) for keys in files.values())
    ):
        raise _refuse(root, f"{_INDEX} lacks save_id, fingerprint or files, or one is of the wrong type")
    _check_file_names(root, sorted(files))
    return index


def _check_file_names(root: Path, names: list[str]) -> None:
    """The index names exactly ``part-0-of-p.pt`` .. ``part-(p-1)-of-p.pt`` and ``unused.pt``."""
    parts = [_PART.fullmatch(n) for n in names if n != _UNUSED]
    odd = [n for n, m in zip((n for n in names if n != _UNUSED), parts) if m is None]
    if odd or _UNUSED not in names:
        what = f"an unexpected file {odd[0]!r}" if odd else f"no {_UNUSED}"
        raise _refuse(
            root, f"{_INDEX} names {what}; a checkpoint holds part-<r>-of-<p>.pt files and {_UNUSED}, in its directory"
        )
    ranks = {int(m.group(2)) for m in parts if m}
    found = sorted(int(m.group(1)) for m in parts if m)
    if len(ranks) != 1 or found != list(range(next(iter(ranks)))):
        raise _refuse(root, f"{_INDEX} names parts {', '.join(n for n in names if n != _UNUSED)}, not one per rank")


def _read_file(root: Path, name: str, keys: list[str], index: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One file's tensors, checked against the index: same save, same plan, the listed keys."""
    path = _regular_file(root, name, "listed in the index")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a torn file (RuntimeError, EOFError, UnpicklingError)
        raise _refuse(
            root, f"{name} is damaged or truncated ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "restore it from a copy, or load an earlier checkpoint"
        ) from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("tensors"), dict):
        raise _refuse(root, f"{name} is not a file of checkpoint format {CHECKPOINT_FORMAT}")
    if loaded.get("fingerprint") != index["fingerprint"]:
        raise _refuse(
            root,
            f"{name} was saved for another plan (fingerprint {str(loaded.get('fingerprint'))[:12]}, the index's "
            f"{index['fingerprint'][:12]}); it comes from another checkpoint",
        )
    if loaded.get("save_id") != index["save_id"] or loaded.get("file") != name:
        steps = f" (step {loaded.get('step')}; the index's: step {index.get('step')})"
        raise _refuse(
            root,
            f"{name} comes from another save of the plan{steps}; loading it would mix the weights of two "
            "saves. Copy the whole directory of one save, or save again",
        )
    tensors: dict[str, torch.Tensor] = loaded["tensors"]
    missing, extra = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    if missing or extra or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise _refuse(
            root,
            f"{name} holds other tensors than its index lists ({len(missing)} missing, e.g. {missing[:1]}; "
            f"{len(extra)} unlisted, e.g. {extra[:1]})",
        )
    return tensors


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint as one state dict of the original model (on the CPU).

    Raises:
        PlanMismatchError: The directory is not a checkpoint of this format; a file its
            index names is missing, outside the directory, not a regular file, damaged
            or truncated, from another save (another step) or another plan, or holds
            other keys than the index lists.
    """
    root = Path(directory)
    index = _read_index(root)
    state: dict[str, torch.Tensor] = {}
    for name, keys in sorted(index["files"].items()):
        state.update(_read_file(root, name, keys, index))
    return state


def _check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    """Check `state` against the target's tensors `expected` (names, shapes, dtypes) before any copy.

    Raises:
        PlanMismatchError: A name of `expected` is missing from `state`, one of `state` is
            unknown, or a tensor has another shape or dtype; `where` names the target.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PlanMismatchError(
            f"the checkpoint is not of {where}: {len(missing)} name(s) missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unknown (e.g. {unexpected[:2]}); nothing was loaded"
        )
    for name, target in expected.items():
        source = state[name]
        if tuple(source.shape) != tuple(target.shape):
            raise PlanMismatchError(
                f"{name!r} has shape {tuple(source.shape)} in the checkpoint but {tuple(target.shape)} in {where}; "
                "it is a checkpoint of another model (nothing was loaded)"
            )
        if source.dtype != target.dtype:
            raise PlanMismatchError(
                f"{name!r} is {source.dtype} in the checkpoint but {target.dtype} in {where} (nothing was "
                f"loaded); cast the model to the checkpoint's dtype first, e.g. model.to({source.dtype})"
            )


def load_into_original(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint saved by `save_checkpoint` into the unpartitioned model (strictly).

    Everything is checked before the first tensor is copied: a refused load leaves the
    model as it was.

    Returns:
        `model`, its tensors overwritten in place.

    Raises:
        PlanMismatchError: The checkpoint is incomplete, damaged or mixed (see
            `load_checkpoint`), lacks some of the model's state, holds names the model does
            not have, or a tensor of another shape or dtype (it is of another model).
    """
    state = load_checkpoint(directory)
    _check_state(model.state_dict(), state, f"this {type(model).__name__} (checkpoint {directory})")
    model.load_state_dict(state)
    return model


def load_from_original(part: PipelineRank, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict of the original model (``model.state_dict()``) into this process's stages.

    Call it on every process with the same state dict (replicas then agree).

    Raises:
        PlanMismatchError: A tensor of this process's stages is missing, or of another
            shape or dtype; then nothing is copied.
    """
    part.load_state_dict(state_dict)
