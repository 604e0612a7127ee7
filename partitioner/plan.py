"""A plan: what goes where, what it costs, and how sure the solver is. Pure data.

A plan prints as a readable table (`partitioner.report`), saves as JSON and loads back
(`Plan.to_json` / `Plan.from_json`, validated, never pickle), and exports an
Accelerate-style ``device_map``.
"""

from __future__ import annotations

import enum
import json
import math
from collections import Counter
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from partitioner.errors import PlanFormatError
from partitioner.options import Objective, Strategy

__all__ = ["PLAN_VERSION", "PlanDevice", "PlanLayer", "PlanTransfer", "SolverInfo", "Plan"]

PLAN_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanDevice:
    """One device of the plan and what it carries."""

    name: str
    """As the user named it (``cuda:0``, ``cpu:1``, ``a100-80gb:2``)."""
    profile: str
    """Device profile the estimates used."""
    kind: str
    """``cpu`` or ``gpu``."""
    torch_device: str | None
    """Device string for torch, None when the device is absent (estimated only)."""
    capacity_bytes: int
    """Memory the plan may use on it (after the reserve)."""
    memory_bytes: int
    """Memory the plan needs on it."""
    param_bytes: int
    """Parameter and buffer bytes on it."""
    compute_s: float
    """Seconds of compute per step."""
    transfer_in_s: float
    """Seconds of transfers into it per step."""
    transfer_out_s: float
    """Seconds of transfers out of it per step."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanLayer:
    """One layer and where it goes."""

    name: str
    modules: tuple[str, ...]
    """Qualified names of the modules it holds."""
    params: tuple[str, ...]
    """Qualified names of the tensors it owns."""
    device: int
    """Index into `Plan.devices` (0 for every layer under data parallelism)."""
    compute_s: float
    """Seconds on its device per step."""
    memory_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanTransfer:
    """A value moved between devices once per step."""

    value: str
    """Graph node whose result moves."""
    src: int
    dst: int
    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SolverInfo:
    """How the placement was found."""

    method: str
    """``dp``, ``highs``, ``cbc``, ``brute`` or ``replicate``."""
    optimal: bool
    """Whether optimality was proved (within the requested gap)."""
    gap: float
    """Relative gap between the plan and the best proved bound."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A placement of a model's layers on devices, with its predicted costs."""

    model_name: str
    fingerprint: str
    """Graph fingerprint of the model it was made for (checked when it is applied)."""
    frontend: str
    granularity: str
    strategy: Strategy
    objective: Objective
    training: bool
    batch_size: int
    devices: tuple[PlanDevice, ...]
    layers: tuple[PlanLayer, ...]
    transfers: tuple[PlanTransfer, ...]
    output_device: int
    """Index of the device that receives the outputs."""
    predicted_s: float
    """Predicted objective: one step's latency, or the busiest device's time."""
    bound_s: float
    """Perfect balance: ``max(total compute / devices, largest layer)``, each layer on its fastest device."""
    solver: SolverInfo

    # ------------------------------------------------------------------ views
    @property
    def assignment(self) -> tuple[int, ...]:
        """Device index of each layer."""
        return tuple(layer.device for layer in self.layers)

    @property
    def transfer_bytes(self) -> int:
        """Bytes moved between devices per forward."""
        return sum(t.bytes for t in self.transfers)

    def device_map(self) -> dict[str, int | str]:
        """An Accelerate-style device map (module name -> GPU ordinal or ``"cpu"``).

        Usable as ``from_pretrained(..., device_map=plan.device_map())`` and with
        ``accelerate.dispatch_model``. A present GPU keeps its CUDA index (``cuda:2`` -> 2);
        absent GPUs (planned from a profile) take the lowest ordinals left, in plan order.
        A key covers the tensors under it unless a longer key does (Accelerate's lookup);
        a tensor of the root module is keyed by its own name (``""`` would be the whole model).

        Raises:
            ValueError: The plan is data parallel, or a module's tensors are split over
                two devices (the cut falls inside a module; plan with ``granularity="block"``).
        """
        if self.strategy is Strategy.DATA_PARALLEL:
            raise ValueError("a data-parallel plan replicates the model; it has no device_map")
        gpu_ordinal = _gpu_ordinals(self.devices)

        def target(i: int) -> int | str:
            return gpu_ordinal[i] if i in gpu_ordinal else "cpu"

        called = {m for layer in self.layers for m in layer.modules}

        def covered(module: str) -> bool:
            parts = module.split(".")
            return any(".".join(parts[:k]) in called for k in range(1, len(parts) + 1))

        out: dict[str, int | str] = {}
        owner: dict[str, str] = {}
        for layer in self.layers:
            # A module goes where its calls run; a tensor read by no module call of its own
            # (used directly by an op) where its owning layer runs. A tied weight follows the
            # module that calls it first; Accelerate moves it to its other users.
            loose = [p.rpartition(".")[0] or p for p in layer.params if not covered(p.rpartition(".")[0])]
            for module in dict.fromkeys(list(layer.modules) + loose):
                dev = target(layer.device)
                if module in out and out[module] != dev:
                    raise ValueError(
                        f"module {module!r} is split between {self.devices[layer.device].name} (layer "
                        f"{layer.name!r}) and layer {owner[module]!r}; a device_map needs cuts on module boundaries"
                    )
                out[module], owner[module] = dev, layer.name
        return _prune_covered(out)

    def __str__(self) -> str:
        from partitioner.report import render_text

        return render_text(self)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain data, as `from_json` reads it: lists for tuples, enums as strings, float fields as floats."""
        return {"version": PLAN_VERSION, **_plain(self)}

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON, byte-for-byte the same for the same plan."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Load a plan written by `to_json`.

        Raises:
            PlanFormatError: Not JSON (or nested too deeply), or a key is missing, unknown,
                repeated, of the wrong type or out of range, or an index names no device.
        """
        try:
            data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
        except PlanFormatError:
            raise
        except RecursionError:
            raise PlanFormatError("a plan must be JSON written by Plan.to_json: nested too deeply") from None
        except (json.JSONDecodeError, ValueError) as e:
            raise PlanFormatError(f"a plan must be JSON written by Plan.to_json: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Validate plain data and build a plan (see `from_json`)."""
        d = _record(data, "plan", {f.name for f in fields(cls)} | {"version"})
        version = d.pop("version")
        if type(version) is not int or version != PLAN_VERSION:
            raise PlanFormatError(f"plan version must be {PLAN_VERSION} (got {version!r})")
        try:
            d["strategy"] = Strategy(d["strategy"])
            d["objective"] = Objective(d["objective"])
        except ValueError as e:
            raise PlanFormatError(f"plan: {e}") from None
        d["devices"] = tuple(_build(PlanDevice, x, f"devices[{i}]") for i, x in enumerate(_list(d["devices"], "devices")))
        d["layers"] = tuple(_build(PlanLayer, x, f"layers[{i}]") for i, x in enumerate(_list(d["layers"], "layers")))
        d["transfers"] = tuple(
            _build(PlanTransfer, x, f"transfers[{i}]") for i, x in enumerate(_list(d["transfers"], "transfers"))
        )
        d["solver"] = _build(SolverInfo, d["solver"], "solver")
        plan = _build(Plan, d, "plan", nested=True)
        _check_meaning(plan)
        return plan


# ---------------------------------------------------------------------- validation
_INT_LIMIT = 2**62
_FLOAT_LIMIT = 1e30


def _reject_constant(token: str) -> None:
    raise PlanFormatError(f"plan contains {token}; plans hold finite numbers only")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise PlanFormatError(f"plan JSON repeats keys {twice[:3]}; each key may appear once per object")
    return out


def _plain(value: Any) -> Any:
    """`value` as JSON-shaped data; a float field holds a float even when given an int (so
    a loaded plan dumps to the same bytes)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(x) for x in value]
    if is_dataclass(value):
        return {
            f.name: float(getattr(value, f.name)) if f.type == "float" else _plain(getattr(value, f.name))
            for f in fields(value)
        }
    return value


def _record(data: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where} must be a JSON object (got {type(data).__name__})")
    unknown, missing = set(data) - allowed, allowed - set(data)
    if unknown:
        raise PlanFormatError(f"{where} has unknown keys {sorted(unknown)}")
    if missing:
        raise PlanFormatError(f"{where} misses keys {sorted(missing)}")
    return dict(data)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PlanFormatError(f"{where} must be a list (got {type(value).__name__})")
    return value


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
    elif annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 <= value < _FLOAT_LIMIT
        ):
            raise PlanFormatError(f"{where} must be a finite number in [0, 1e30) (got {value!r})")
        return float(value)
    elif annotation == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(x, str) and _is_utf8(x) for x in value):
            raise PlanFormatError(f"{where} must be a list of strings")
        return tuple(value)
    return value


def _is_utf8(text: str) -> bool:
    """False for lone surrogates (``"\\ud800"`` in JSON), which no stream can print."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _build(cls: type, data: Any, where: str, nested: bool = False) -> Any:
    d = data if nested else _record(data, where, {f.name for f in fields(cls)})
    kwargs = {f.name: _check_value(d[f.name], str(f.type), f"{where}.{f.name}") for f in fields(cls)}
    return cls(**kwargs)


def _check_meaning(plan: Plan) -> None:
    n = len(plan.devices)
    if n == 0:
        raise PlanFormatError("plan has no devices")
    kinds = [d.kind for d in plan.devices if d.kind not in ("cpu", "gpu")]
    if kinds:
        raise PlanFormatError(f"a device kind is 'cpu' or 'gpu' (got {kinds[0]!r})")
    if plan.solver.gap > 1:
        raise PlanFormatError(f"solver.gap is a relative gap in [0, 1] (got {plan.solver.gap})")
    bad = [l.name for l in plan.layers if l.device >= n] + [t.value for t in plan.transfers if max(t.src, t.dst) >= n]
    if bad or plan.output_device >= n:
        raise PlanFormatError(f"plan refers to devices beyond its {n} devices ({bad[:3] or 'output_device'})")


def _gpu_ordinals(devices: tuple[PlanDevice, ...]) -> dict[int, int]:
    """Device index -> GPU ordinal: a present GPU's CUDA index, else the next free ordinal."""
    taken = {
        i: int(d.torch_device.rpartition(":")[2])
        for i, d in enumerate(devices)
        if d.kind == "gpu" and d.torch_device is not None and d.torch_device.rpartition(":")[2].isdigit()
    }
    used = set(taken.values())
    ordinals = dict(taken)
    free = (k for k in range(len(devices) + len(used)) if k not in used)
    for i, d in enumerate(devices):
        if d.kind == "gpu" and i not in ordinals:
            ordinals[i] = next(free)
    return ordinals


def _prune_covered(device_map: dict[str, int | str]) -> dict[str, int | str]:
    """Drop entries whose nearest mapped ancestor module maps them to the same device
    (Accelerate looks a tensor up by its longest mapped prefix)."""
    out: dict[str, int | str] = {}
    for module in sorted(device_map, key=lambda m: (m.count("."), m)):
        parts = module.split(".")
        ancestors = (".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1))
        nearest = next((a for a in ancestors if a in device_map), None)
        if nearest is None or device_map[nearest] != device_map[module]:
            out[module] = device_map[module]
    return out
