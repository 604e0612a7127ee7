"""A plan as JSON: dump it, and load it back checking every key, its type, range and meaning.

`Plan.to_json` / `Plan.from_json` are the front doors; this module does the work. Errors name
the key path as a reader writes it (``layers[0].device``, ``pipeline.stages[1].devices[0]``).
Pure Python: no torch.

Why not a schema library: pydantic and jsonschema would check types and keys, but not the
limits a plan needs (integers below 2**62, finite floats, no lone surrogates) without a
second copy of every field's type beside the dataclasses, nor the meaning checks (indices
name devices, stages cover the layers in order); and neither is a dependency of the package.
"""

from __future__ import annotations

import enum
import json
import math
from collections import Counter
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from partitioner.errors import PlanFormatError
from partitioner.ir import TIME_SOURCES
from partitioner.options import Objective, Sharding, SplitLayer, Strategy
from partitioner.plan import (
    PLAN_VERSION,
    PipelinePlan,
    Plan,
    PlanCandidate,
    PlanDevice,
    PlanLayer,
    PlanStage,
    PlanTransfer,
    SolverInfo,
)

__all__ = ["plan_to_dict", "plan_from_json", "plan_from_dict"]

_INT_LIMIT = 2**62
_FLOAT_LIMIT = 1e30
_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
_SHARDINGS = tuple(s.value for s in Sharding)
"""`partitioner.options.Sharding` values (plan data names them as strings)."""
# A list field's annotation -> (its items' annotation, the items in words).
_LISTS = {"tuple[int, ...]": ("int", "integers"), "tuple[str, ...]": ("str", "strings")}


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """`plan` as plain data (see `Plan.to_dict`)."""
    return {"version": PLAN_VERSION, **_plain(plan)}


def plan_from_json(text: str) -> Plan:
    """Parse and validate a plan written by `Plan.to_json` (see `Plan.from_json`).

    Raises:
        PlanFormatError: Not JSON (or nested too deeply), or a key is missing, unknown,
            repeated, of the wrong type or out of range, or an index names no device.
    """
    try:
        data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_JSONObject.of)
    except PlanFormatError:
        raise
    except RecursionError:
        raise PlanFormatError("a plan must be JSON written by Plan.to_json: nested too deeply") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise PlanFormatError(f"a plan must be JSON written by Plan.to_json: {e}") from None
    return plan_from_dict(data)


def plan_from_dict(data: Any) -> Plan:
    """Validate plain data and build a plan (see `Plan.from_dict`).

    Raises:
        PlanFormatError: As `plan_from_json`, naming the key path.
    """
    d = _record(data, "", Plan, extra={"version"})
    version = d.pop("version")
    if type(version) is not int or version != PLAN_VERSION:
        raise PlanFormatError(f"version must be {PLAN_VERSION} (got {version!r}); this release reads plans of version 1")
    for key, choice in (("strategy", Strategy), ("objective", Objective)):
        try:
            d[key] = choice(d[key])
        except ValueError as e:
            raise PlanFormatError(f"{key}: {e}") from None
    d["devices"] = _records(PlanDevice, d["devices"], "devices")
    d["layers"] = _records(PlanLayer, d["layers"], "layers")
    d["transfers"] = _records(PlanTransfer, d["transfers"], "transfers")
    d["split"] = _records(SplitLayer, d["split"], "split")
    d["solver"] = _build(SolverInfo, _record(d["solver"], "solver", SolverInfo), "solver")
    if d["pipeline"] is not None:
        p = _record(d["pipeline"], "pipeline", PipelinePlan)
        p["stages"] = _records(PlanStage, p["stages"], "pipeline.stages")
        p["runner_ups"] = _records(PlanCandidate, p["runner_ups"], "pipeline.runner_ups")
        d["pipeline"] = _build(PipelinePlan, p, "pipeline")
    plan: Plan = _build(Plan, d, "")
    _check_meaning(plan)
    return plan


# ---------------------------------------------------------------------- dumping
def _plain(value: Any) -> Any:
    """`value` as JSON-shaped data; a float field holds a float even when given an int (so
    a loaded plan dumps to the same bytes)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(x) for x in value]
    if is_dataclass(value):
        out = {}
        for f in fields(value):
            x = getattr(value, f.name)
            if f.default is not MISSING and x == f.default:
                continue  # a field added later, at its default: the JSON of version 1
            out[f.name] = float(x) if f.type in ("float", "float | None") and x is not None else _plain(x)
        return out
    return value


# ---------------------------------------------------------------------- types and keys
class _JSONObject(dict[str, Any]):
    """A JSON object as parsed, with the keys it repeats: `_record` refuses them, naming the path."""

    repeated: list[str]

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _JSONObject:
        out = cls(pairs)
        out.repeated = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1) if len(out) != len(pairs) else []
        return out


def _reject_constant(token: str) -> None:
    raise PlanFormatError(f"plan contains {token}; plans hold finite numbers only")


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _record(data: Any, where: str, cls: type, extra: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """`data` checked to be an object with exactly the keys of `cls` (and `extra`); a field
    added after version 1 may be missing (it takes its default)."""
    what = where or "the plan"
    if not isinstance(data, dict):
        raise PlanFormatError(f"{what} must be a JSON object (got {type(data).__name__})")
    repeated = getattr(data, "repeated", [])
    if repeated:
        raise PlanFormatError(f"{what} repeats keys {repeated[:3]}; each key may appear once per object")
    allowed = {f.name for f in fields(cls)} | set(extra)
    # A default is read as JSON would hold it (a tuple as a list), so that it is checked alike.
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(cls)}
    d = {**{k: v for k, v in defaults.items() if v is not MISSING}, **data}
    unknown, missing = set(d) - allowed, allowed - set(d)
    if unknown:
        raise PlanFormatError(f"{what} has unknown keys {sorted(unknown)}")
    if missing:
        raise PlanFormatError(f"{what} misses keys {sorted(missing)}")
    return d


def _records(cls: type, value: Any, where: str) -> tuple[Any, ...]:
    """A list of records of `cls`, each checked and built."""
    if not isinstance(value, list):
        raise PlanFormatError(f"{where} must be a list (got {type(value).__name__})")
    return tuple(_build(cls, _record(x, f"{where}[{i}]", cls), f"{where}[{i}]") for i, x in enumerate(value))


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    """An instance of `cls` from a checked record, each field's value checked against its type."""
    return cls(**{f.name: _check_value(d[f.name], str(f.type), _path(where, f.name)) for f in fields(cls)})


def _check_value(value: Any, annotation: str, where: str) -> Any:
    if annotation == "str":
        if not isinstance(value, str) or not _is_utf8(value):
            raise PlanFormatError(f"{where} must be a string (got {value!r})")
    elif annotation == "str | None":
        if value is not None and not (isinstance(value, str) and _is_utf8(value)):
            raise PlanFormatError(f"{where} must be a string or null (got {value!r})")
    elif annotation == "bool":
        if not isinstance(value, bool):
            raise PlanFormatError(f"{where} must be true or false (got {value!r})")
    elif annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _INT_LIMIT:
            raise PlanFormatError(f"{where} must be an integer in [0, 2**62) (got {value!r})")
    elif annotation in ("float", "float | None"):
        if value is None and annotation == "float | None":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 <= value < _FLOAT_LIMIT
        ):
            raise PlanFormatError(f"{where} must be a finite number in [0, 1e30) (got {value!r})")
        return float(value)
    elif annotation == "tuple[tuple[int, ...], ...]":
        if value == ():  # the default of a field a plan leaves out
            return ()
        if not isinstance(value, list):
            raise PlanFormatError(f"{where} must be a list of lists of integers (got {type(value).__name__})")
        return tuple(_check_value(x, "tuple[int, ...]", f"{where}[{k}]") for k, x in enumerate(value))
    elif annotation in _LISTS:
        item, items = _LISTS[annotation]
        if not isinstance(value, list):
            raise PlanFormatError(f"{where} must be a list of {items} (got {type(value).__name__})")
        return tuple(_check_value(x, item, f"{where}[{k}]") for k, x in enumerate(value))
    return value


def _is_utf8(text: str) -> bool:
    """False for lone surrogates (``"\\ud800"`` in JSON), which no stream can print."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------- meaning
def _check_device(index: int, where: str, num_devices: int) -> None:
    if index >= num_devices:
        raise PlanFormatError(
            f"{where} is {index}, beyond the plan's {num_devices} devices (indices 0 to {num_devices - 1})"
        )


def _check_meaning(plan: Plan) -> None:
    """Indices name devices of the plan, kinds and the gap are in range, the pipeline is sound."""
    n = len(plan.devices)
    if n == 0:
        raise PlanFormatError("devices is empty: the plan has no devices; it needs at least one")
    for i, device in enumerate(plan.devices):
        if device.kind not in ("cpu", "gpu"):
            raise PlanFormatError(f"devices[{i}].kind must be 'cpu' or 'gpu' (got {device.kind!r})")
    if plan.solver.gap > 1:
        raise PlanFormatError(f"solver.gap is a relative gap in [0, 1] (got {plan.solver.gap})")
    if not 1 <= plan.solver.orders or plan.solver.orders_solved > plan.solver.orders:
        raise PlanFormatError(
            f"solver.orders counts the device orders weighed (at least 1) and solver.orders_solved those "
            f"solved among them (got {plan.solver.orders} and {plan.solver.orders_solved})"
        )
    for i, layer in enumerate(plan.layers):
        _check_device(layer.device, f"layers[{i}].device", n)
        if layer.time_source not in ("", *TIME_SOURCES):
            raise PlanFormatError(
                f"layers[{i}].time_source must be one of {', '.join(TIME_SOURCES)} (got {layer.time_source!r})"
            )
    for i, transfer in enumerate(plan.transfers):
        _check_device(transfer.src, f"transfers[{i}].src", n)
        _check_device(transfer.dst, f"transfers[{i}].dst", n)
    _check_device(plan.output_device, "output_device", n)
    if plan.pipeline is not None:
        _check_pipeline(plan.pipeline, n, len(plan.layers))
    if plan.replicas:
        _check_replicas(plan, n)


def _check_replicas(plan: Plan, num_devices: int) -> None:
    """Copies on disjoint groups of one size, copy 0's devices those its layers use."""
    seen: set[int] = set()
    for g, group in enumerate(plan.replicas):
        if not group or len(group) != len(plan.replicas[0]):
            raise PlanFormatError(
                f"replicas[{g}] holds {len(group)} devices; every copy needs {len(plan.replicas[0]) or 'at least 1'}"
            )
        for k, d in enumerate(group):
            _check_device(d, f"replicas[{g}][{k}]", num_devices)
            if d in seen:
                raise PlanFormatError(f"replicas[{g}][{k}] is device {d}, which another copy already runs on")
            seen.add(d)
    stray = sorted({layer.device for layer in plan.layers} - set(plan.replicas[0]))
    if stray:
        raise PlanFormatError(f"layers run on device {stray[0]}, which is not in replicas[0] {list(plan.replicas[0])}")


def _check_pipeline(p: PipelinePlan, num_devices: int, num_layers: int) -> None:
    """Stages cover the layers in order, ranks own disjoint devices, counts make sense."""
    if p.schedule not in _SCHEDULES:
        raise PlanFormatError(f"pipeline.schedule must be one of {', '.join(_SCHEDULES)} (got {p.schedule!r})")
    for key in ("microbatches", "virtual_stages", "global_batch", "tensor_parallel", "data_parallel"):
        if getattr(p, key) < 1:
            raise PlanFormatError(f"pipeline.{key} must be >= 1 (got {getattr(p, key)})")
    if p.sharding not in _SHARDINGS:
        raise PlanFormatError(f"pipeline.sharding must be one of {', '.join(_SHARDINGS)} (got {p.sharding!r})")
    if not p.stages or len(p.stages) % p.virtual_stages:
        raise PlanFormatError(
            f"pipeline.stages holds {len(p.stages)} stages; it needs a positive multiple of "
            f"pipeline.virtual_stages ({p.virtual_stages})"
        )
    if p.bubble_fraction > 1:
        raise PlanFormatError(f"pipeline.bubble_fraction is a fraction in [0, 1] (got {p.bubble_fraction})")
    ranks = p.num_ranks
    expected = 0
    owner: dict[int, int] = {}
    for j, s in enumerate(p.stages):
        where = f"pipeline.stages[{j}]"
        if s.index != j:
            raise PlanFormatError(f"{where}.index must be {j} (got {s.index})")
        if s.rank != j % ranks:
            raise PlanFormatError(f"{where}.rank must be {j % ranks} ({ranks} ranks, stage {j}) (got {s.rank})")
        if s.first_layer != expected:
            raise PlanFormatError(
                f"{where}.first_layer is {s.first_layer}; stages must cover the layers in order "
                f"(this one starting at layer {expected})"
            )
        if s.last_layer < s.first_layer:
            raise PlanFormatError(
                f"{where}.last_layer is {s.last_layer}, before its first_layer {s.first_layer}; "
                "stages must cover the layers in order"
            )
        expected = s.last_layer + 1
        if not s.devices:
            raise PlanFormatError(f"{where}.devices is empty; a stage runs on at least one device")
        if len(s.devices) % p.tensor_parallel:
            raise PlanFormatError(
                f"{where}.devices holds {len(s.devices)} devices, not a multiple of pipeline.tensor_parallel "
                f"({p.tensor_parallel}): each data-parallel replica is that many devices"
            )
        for k, d in enumerate(s.devices):
            _check_device(d, f"{where}.devices[{k}]", num_devices)
            if d in s.devices[:k]:
                raise PlanFormatError(f"{where}.devices[{k}] repeats device {d}; a stage's devices are distinct")
        if s.devices != p.stages[j % ranks].devices:
            raise PlanFormatError(
                f"{where}.devices must be those of rank {s.rank}, pipeline.stages[{j % ranks}].devices "
                f"{list(p.stages[j % ranks].devices)} (got {list(s.devices)})"
            )
        for d in s.devices:
            if owner.setdefault(d, s.rank) != s.rank:
                raise PlanFormatError(
                    f"{where}.devices holds device {d} of rank {owner[d]}, but the stage is rank {s.rank}; "
                    "a device belongs to one rank"
                )
    if expected != num_layers:
        raise PlanFormatError(f"pipeline.stages cover {expected} layers of {num_layers}")
