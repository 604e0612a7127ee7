"""Checkpoints of a partitioned model under the original model's names, resharded on load.

A checkpoint is a directory written by `torch.distributed.checkpoint` (DCP): every process
of the launch saves its stages' tensors under the original model's ``state_dict`` names (a
tied weight under one of its names; process 0 adds the entries no stage holds), and DCP's
planner writes each name once, however many replicas or stages hold it; a tensor split by
tensor parallelism or sharded by FSDP2 (a DTensor) is written as its processes' slices and
read back whole, or as the slices of another plan. DCP's
``.metadata`` records every name's shape and dtype and the file and bytes that hold it;
``partitioner-<save>.json`` beside it records the format, the save's id, the step, the
model and plan it was saved from, and the other names of each tied weight. So a checkpoint loads under any plan of the same model
(`load_into_part`: each process reads only the names its stages hold), into the
unpartitioned model (`load_into_original`) or as one state dict (`load_checkpoint`); the
last two need no process group.

Every save names its data files after its id and removes the files of earlier saves only
after its ``.metadata`` is in place: a crash mid-save leaves the previous checkpoint whole,
and a file copied in from another save is never read. Loading checks the whole checkpoint
before it reads any tensor data (``.metadata`` and the record of the same save, only
tensors, every data file a regular file inside the directory and as long as the metadata
says) and every tensor against the target (name, shape, dtype). Tensors are read into new
buffers and copied into the target only once every read succeeded (on every process, for
`load_into_part`): a refused load leaves the target as it was. ``.metadata`` is unpickled
with only DCP's metadata classes allowed, and tensors are read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor

from partitioner.distributed.fused_columns import contiguous_shards
from partitioner.distributed.runtime import PipelineRank
from partitioner.errors import PlanMismatchError
from partitioner.files import read_capped, staged

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_into_part",
    "load_into_original",
    "load_from_original",
]

CHECKPOINT_FORMAT = 3
"""3: written by torch.distributed.checkpoint, one record per save (2: ``torch.save`` per
pipeline rank, with ``index.json``; 1: plain tensor dicts)."""
_METADATA = ".metadata"  # DCP's name for it
# A few thousand names and their chunks; anything far larger is not a checkpoint's.
_METADATA_LIMIT = 256 * 2**20
_RECORD_LIMIT = 2**20
_FORMAT_2 = "index.json"


def _tag(save_id: str) -> str:
    """12 hex digits naming a save's files (DCP's save ids are UUIDs; hashed, any string fits a file name)."""
    return hashlib.sha256(save_id.encode()).hexdigest()[:12]


def _record_name(save_id: str) -> str:
    return f"partitioner-{_tag(save_id)}.json"


# The files a save replaces: DCP data files (ours carry the save's tag), records, format 2's files.
_EARLIER = re.compile(
    r"__\d+_(?:[0-9a-f]{12}_)?\d+\.distcp|partitioner-[0-9a-f]{12}\.json"  # DCP's data files, records
    r"|index\.json|unused\.pt|part-\d+-of-\d+\.pt"  # format 2
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without DCP's warnings about what is meant here: one process reading alone, a checkpoint replaced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        yield


class _Writer(FileSystemWriter):
    """DCP's file writer, with the save's tag in its data files' names, the save's record
    written before DCP's ``.metadata``, and the files of earlier saves removed after it."""

    def __init__(self, root: Path, record: Mapping[str, Any]) -> None:
        super().__init__(root, overwrite=True)
        self._root = root
        self._record = dict(record)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # DCP gives process i the file prefix "__{i}_" (its plan's storage_data); with the
        # save's tag in it, no save ever writes over a file that another save's metadata names.
        tag, tagged = _tag(self.save_id), []
        for plan in super().prepare_global_plan(plans):
            prefix = plan.storage_data
            tagged_prefix = dataclasses.replace(prefix, prefix=f"{prefix.prefix}{tag}_")
            tagged.append(dataclasses.replace(plan, storage_data=tagged_prefix))
        return tagged

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        record = {**self._record, "save_id": self.save_id}
        with staged(self._root / _record_name(self.save_id)) as temporary:
            temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        super().finish(metadata, results)  # renames .metadata into place: from here on, this save is the checkpoint
        keep = {_record_name(self.save_id), *(info.relative_path for info in metadata.storage_data.values())}
        for entry in os.scandir(self._root):
            if entry.name not in keep and _EARLIER.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names of one tensor (a tied weight) -> the one it is saved under (the first in sorted order)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        if isinstance(t, DTensor):  # a slice of a split or sharded tensor: one tensor is one local slice
            t = t.to_local()
        if t.numel():  # empty tensors all sit at address 0
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            groups.setdefault(key, []).append(name)
    return {alias: min(names) for names in groups.values() for alias in names if alias != min(names)}


def save_checkpoint(part: PipelineRank, directory: str | os.PathLike[str], *, step: int | None = None) -> Path:
    """Save the partitioned model's state; call it on every process (it returns once the save is complete).

    Args:
        part: This process's part (from `partitioner.distributed.build`).
        directory: Where to write (created if missing; a shared file system when the
            processes run on several machines). A checkpoint there is replaced: its files
            are removed once this save is complete.
        step: The training step, recorded with the save (for your records).

    Returns:
        The directory.

    Raises:
        OSError: Writing failed on some process (raised on every process); the previous
            checkpoint in `directory`, if any, is still whole.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = part.state_dict()
    # A tied weight is saved once, under one of its names; the record names the others.
    found = [_aliases(state)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [{}] * dist.get_world_size()
        dist.all_gather_object(found, _aliases(state))
    aliases = {alias: name for each in found for alias, name in each.items()}
    record = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model_name": part.plan.model_name,
        "fingerprint": part.plan.fingerprint,
        "layout": part.layout.describe(),
        "aliases": aliases,
    }
    saved = {name: contiguous_shards(t) for name, t in state.items() if name not in aliases}
    try:
        with _quiet():
            dcp.save(saved, storage_writer=_Writer(out, record), no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: raised on every process when one failed
        raise OSError(f"saving the checkpoint in {out} failed on process(es) {sorted(e.failures)} ({_cause(e)})") from e
    return out


# ---------------------------------------------------------------------- loading


def _refuse(root: Path, what: str) -> PlanMismatchError:
    return PlanMismatchError(f"the checkpoint in {root} cannot be loaded: {what}")


def _regular_file(root: Path, name: str, what: str) -> Path:
    """``root / name``, checked to be a regular file directly inside `root` (links resolved)."""
    try:
        resolved = (root / name).resolve(strict=True)
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


# What DCP's .metadata is made of (torch 2.13); DCP itself reads it with `pickle.load`,
# which would run whatever a crafted file names.
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size")]
    + [("torch.serialization", "_get_layout")]
    + [(module, name) for module in ("pathlib", "pathlib._local")
       for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")]
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata, refusing any global but its classes and torch's dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    """A checked checkpoint: its directory, DCP's metadata and the save's record."""

    root: Path
    metadata: Metadata
    record: Mapping[str, Any]

    @property
    def aliases(self) -> Mapping[str, str]:
        """Other names of a tied weight -> the name it is saved under."""
        aliases: Mapping[str, str] = self.record["aliases"]  # a map of str to str: checked by _open
        return aliases

    @property
    def names(self) -> set[str]:
        """Every name of the original model's state the checkpoint holds."""
        return set(self.metadata.state_dict_metadata) | set(self.aliases)

    def entry(self, name: str) -> TensorStorageMetadata:
        """DCP's record of tensor `name` (shape, dtype, chunks); only tensors: checked by `_open`."""
        return self.metadata.state_dict_metadata[self.aliases.get(name, name)]  # type: ignore[return-value]

    def describe(self) -> str:
        r = self.record
        step = f", step {r['step']}" if r.get("step") is not None else ""
        return f"{r['model_name']} (fingerprint {r['fingerprint']}, saved under {r.get('layout', '?')}{step})"


def _format_2(root: Path) -> PlanMismatchError:
    try:
        found = json.loads(read_capped(root / _FORMAT_2, _RECORD_LIMIT)).get("format")
    except (OSError, ValueError, AttributeError):
        found = "?"
    return PlanMismatchError(
        f"{root} holds a checkpoint of format {found} ({_FORMAT_2}, part-<r>-of-<p>.pt), written by an earlier "
        f"partitioner; this one reads format {CHECKPOINT_FORMAT} (torch.distributed.checkpoint). Save again from your "
        "run, or convert it: with the version that wrote it, torch.save(pd.load_checkpoint(DIR), 'state.pt'); with "
        "this one, pd.load_from_original(part, torch.load('state.pt')) into a part of any plan of the model, then "
        "pd.save_checkpoint(part, DIR)"
    )


def _open(directory: str | os.PathLike[str]) -> _Checkpoint:
    """The checkpoint in `directory`, checked whole before any tensor data is read.

    Raises:
        PlanMismatchError: See `load_checkpoint`.
    """
    root = Path(directory)
    if not os.path.lexists(root / _METADATA) and os.path.lexists(root / _FORMAT_2):
        raise _format_2(root)
    path = _regular_file(root, _METADATA, "written by torch.distributed.checkpoint; is this a checkpoint?")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(read_capped(path, _METADATA_LIMIT))).load()
    except Exception as e:  # unpickling a damaged file raises many types (EOFError, UnpicklingError, TypeError, ...)
        raise _refuse(
            root, f"{_METADATA} is damaged or not torch.distributed.checkpoint's ({type(e).__name__}: {e})"
        ) from None
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    if not (isinstance(metadata, Metadata) and isinstance(metadata.storage_data, dict) and isinstance(save_id, str)):
        raise _refuse(root, f"{_METADATA} is not the metadata of a save by torch.distributed.checkpoint's file writer")
    name = _record_name(save_id)
    if not os.path.lexists(root / name):
        raise _refuse(
            root,
            f"{name}, the record of the save that {_METADATA} describes, is missing: {_METADATA} comes from another "
            "save (copied from another checkpoint; loading it would mix the files of two saves), or a save that "
            "did not write it. Copy the whole directory of one save, or save again",
        )
    try:
        record = json.loads(read_capped(_regular_file(root, name, "the save's record"), _RECORD_LIMIT))
    except (OSError, ValueError) as e:
        raise _refuse(root, f"{name} is not a save's record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise _refuse(root, f"{name} is of checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
    named = all(isinstance(record.get(k), str) for k in ("model_name", "fingerprint"))
    if record.get("save_id") != save_id or not named:
        raise _refuse(root, f"{name} lacks model_name or fingerprint, or is of another save than {_METADATA}")
    aliases = record.get("aliases")
    if not isinstance(aliases, dict) or not all(
        isinstance(a, str) and a not in metadata.state_dict_metadata and n in metadata.state_dict_metadata
        for a, n in aliases.items()
    ):
        raise _refuse(root, f"{name}'s aliases are not a map of other names to names {_METADATA} holds")
    others = sorted(k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata))
    if others:
        raise _refuse(
            root, f"it holds {len(others)} entries that are no tensors (e.g. {others[0]!r}); save_checkpoint writes "
            "tensors only"
        )
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        file = getattr(info, "relative_path", None)
        if not isinstance(file, str) or os.path.basename(file) != file or file in ("", ".", ".."):
            raise _refuse(
                root, f"{_METADATA} names a data file {file!r}; a checkpoint's data files lie in its directory"
            )
        ends[file] = max(ends.get(file, 0), int(info.offset) + int(info.length))
    for file, end in sorted(ends.items()):
        size = _regular_file(root, file, f"a data file {_METADATA} names").stat().st_size
        if size < end:
            raise _refuse(
                root, f"{file} is truncated ({size:,} bytes, the metadata reads up to byte {end:,}); restore it from a "
                "copy, or load an earlier checkpoint"
            )
    return _Checkpoint(root, metadata, record)


class _Reader(FileSystemReader):
    """DCP's file reader, handed the metadata `_open` checked instead of unpickling it again."""

    def __init__(self, checkpoint: _Checkpoint) -> None:
        super().__init__(checkpoint.root)
        self._metadata = checkpoint.metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


def _cause(e: BaseException) -> str:
    """``Type: first line`` of what failed; for DCP's `CheckpointException`, of the first process's failure."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _read(checkpoint: _Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of the checkpoint, read into new CPU tensors (the target untouched); the
    names of one tied weight share one tensor."""
    saved = sorted({checkpoint.aliases.get(n, n) for n in names})
    buffers = {n: torch.empty(checkpoint.entry(n).size, dtype=checkpoint.entry(n).properties.dtype) for n in saved}
    try:
        with _quiet():
            dcp.load(buffers, storage_reader=_Reader(checkpoint), no_dist=True)
    except (Exception, CheckpointException) as e:  # a damaged file fails in DCP's torch.load with many types
        raise _refuse(
            checkpoint.root,
            f"a data file is damaged ({_cause(e)}); restore it from a copy, or load an earlier checkpoint",
        ) from None
    return {n: buffers[checkpoint.aliases.get(n, n)] for n in names}


def _check(checkpoint: _Checkpoint, expected: Mapping[str, torch.Tensor], where: str, *, strict: bool) -> None:
    """Check the checkpoint against the target's tensors `expected` (names, shapes, dtypes) before any read.

    Raises:
        PlanMismatchError: A name of `expected` is missing from the checkpoint, one of the
            checkpoint is unknown (when `strict`), or a tensor has another shape or dtype;
            the message names the checkpoint's model and the target (`where`).
    """
    names = checkpoint.names
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected)) if strict else []
    if missing or unexpected:
        raise PlanMismatchError(
            f"the checkpoint in {checkpoint.root} holds {checkpoint.describe()}, not {where}: {len(missing)} name(s) "
            f"missing (e.g. {missing[:2]}), {len(unexpected)} unknown (e.g. {unexpected[:2]}); nothing was loaded"
        )
    for name, target in expected.items():
        shape, dtype = tuple(checkpoint.entry(name).size), checkpoint.entry(name).properties.dtype
        if shape != tuple(target.shape):
            raise PlanMismatchError(
                f"{name!r} has shape {shape} in the checkpoint but {tuple(target.shape)} in {where}; the checkpoint "
                f"holds {checkpoint.describe()}, another model (nothing was loaded)"
            )
        if dtype != target.dtype:
            raise PlanMismatchError(
                f"{name!r} is {dtype} in the checkpoint but {target.dtype} in {where} (nothing was loaded); cast the "
                f"model to the checkpoint's dtype first, e.g. model.to({dtype})"
            )


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The checkpoint as one state dict of the original model (on the CPU; no process group needed).

    Raises:
        PlanMismatchError: The directory holds no checkpoint of this format (a format-2
            one: the message says how to convert it); ``.metadata`` is damaged, or of
            another save than the record beside it; a data file it names is missing,
            outside the directory, not a regular file, truncated or damaged.
    """
    checkpoint = _open(directory)
    return _read(checkpoint, sorted(checkpoint.names))


def load_into_original(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint saved by `save_checkpoint` (under any plan) into the unpartitioned model, strictly.

    Everything is checked before the first tensor is copied: a refused load leaves the
    model as it was.

    Returns:
        `model`, its tensors overwritten in place.

    Raises:
        PlanMismatchError: The checkpoint is incomplete, damaged or mixed (see
            `load_checkpoint`), lacks some of the model's state, holds names the model does
            not have, or a tensor of another shape or dtype (it is of another model).
    """
    checkpoint = _open(directory)
    expected = model.state_dict()
    _check(checkpoint, expected, f"this {type(model).__name__}", strict=True)
    model.load_state_dict(_read(checkpoint, sorted(expected)))
    return model


def load_into_part(part: PipelineRank, directory: str | os.PathLike[str]) -> PipelineRank:
    """Load a checkpoint saved under any plan of the model into this process's stages; call it on every process.

    Each process reads only the tensors its stages hold (and the state entries no stage
    holds), so a run saved under one plan (stages, replicas, world size) resumes under
    another. Nothing is copied unless every process checked and read its share.

    Returns:
        `part`, its tensors overwritten in place.

    Raises:
        PlanMismatchError: On every process, when one process finds the checkpoint
            incomplete, damaged or mixed (see `load_checkpoint`), or of another model (a
            tensor of its stages missing, or of another shape or dtype).
    """
    error: str | None = None
    state: dict[str, torch.Tensor] = {}
    targets = {**part.state_dict(), **part.unused_state}
    where = f"this part of {part.plan.model_name} (fingerprint {part.plan.fingerprint}, {part.layout.describe()})"
    try:
        checkpoint = _open(directory)
        _check(checkpoint, targets, where, strict=False)
        state = _read(checkpoint, sorted(targets))
    except PlanMismatchError as e:
        error = str(e)
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if error is not None:
        raise PlanMismatchError(error)
    if failed:
        rank, message = failed[0]
        raise PlanMismatchError(f"process {rank} could not load the checkpoint, so no process loaded it: {message}")
    part.load_state_dict(state)
    with torch.no_grad():
        for name, t in part.unused_state.items():
            t.copy_(state[name])
    return part


def load_from_original(part: PipelineRank, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a state dict of the original model (``model.state_dict()``) into this process's stages.

    Call it on every process with the same state dict (replicas then agree).

    Raises:
        PlanMismatchError: A tensor of this process's stages is missing, or of another
            shape or dtype; then nothing is copied.
    """
    part.load_state_dict(state_dict)
