"""Pure: a training configuration a user names (``tp=8,pp=4,dp=2,shard=zero3``), to price it.

A Megatron-LM, torchtitan or DeepSpeed set-up fixes tensor, pipeline and data-parallel
degrees, the sharding, microbatches, schedule and recomputation by hand. `ParallelConfig`
holds such a choice, each field free (None) or fixed; `ParallelConfig.admits` tells the
training planner which of its configurations match, so a fully named configuration is
priced on the same simulator as the plan, and a partly named one (a *grid*: Megatron's
"TP inside a node, full recompute, equal layers per stage") is searched within.

Spelling (`parse_config`), comma-separated ``key=value``::

    tp=8           tensor-parallel degree            (alias: tensor)
    pp=4           pipeline ranks                    (alias: pipeline)
    dp=2           data-parallel degree per stage    (alias: data)
    vp=2           stages per rank (interleaved)     (alias: virtual)
    shard=zero3    none, zero1, zero2, zero3 (fsdp), zero3-keep
    microbatches=16                                  (alias: mb)
    schedule=1f1b  gpipe, 1f1b, interleaved_1f1b
    recompute=full none, selective, full
    split=equal    equal layers per stage, or dp (the planner's least-bottleneck split)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from collections.abc import Sequence
from typing import Any, Protocol

from partitioner.options import Recompute, Sharding
from partitioner.simulate import PipelineSchedule

__all__ = ["ParallelConfig", "parse_config", "ConfigurationLike"]

_ALIASES = {
    "tp": "tp",
    "tensor": "tp",
    "pp": "pp",
    "pipeline": "pp",
    "dp": "dp",
    "data": "dp",
    "vp": "vp",
    "virtual": "vp",
    "shard": "shard",
    "sharding": "shard",
    "zero": "shard",
    "microbatches": "microbatches",
    "mb": "microbatches",
    "schedule": "schedule",
    "recompute": "recompute",
    "split": "split",
}
_SHARD_ALIASES = {"fsdp": "zero3", "ddp": "none", "zero0": "none", "0": "none", "1": "zero1", "2": "zero2", "3": "zero3"}
_RECOMPUTE = {"none": Recompute.NEVER, "selective": Recompute.SELECTIVE, "full": Recompute.ALWAYS}
_SPLITS = ("equal", "dp")


class ConfigurationLike(Protocol):
    """What `ParallelConfig.admits` reads of a training configuration."""

    @property
    def tp(self) -> int: ...
    @property
    def sharding(self) -> Sharding: ...
    @property
    def ranks(self) -> int: ...
    @property
    def virtual_stages(self) -> int: ...
    @property
    def microbatches(self) -> int: ...
    @property
    def schedule(self) -> PipelineSchedule: ...
    @property
    def groups(self) -> Sequence[Any]:
        """The pipeline ranks' device groups."""
        ...
    def data_parallel(self, group: Any) -> int:
        """Data-parallel degree of a rank's group."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelConfig:
    """A training configuration, each field fixed or free (None)."""

    tp: int | None = None
    """Tensor-parallel degree."""
    pp: int | None = None
    """Pipeline ranks (devices along one pipeline; interleaved stages count once)."""
    dp: int | None = None
    """Data-parallel replicas of every stage (each of ``tp`` devices)."""
    vp: int | None = None
    """Stages per pipeline rank (interleaved 1F1B; 1 otherwise)."""
    shard: Sharding | None = None
    microbatches: int | None = None
    schedule: PipelineSchedule | None = None
    recompute: Recompute | None = None
    """`Recompute.NEVER` (none), `Recompute.SELECTIVE` or `Recompute.ALWAYS` (full)."""
    split: str | None = None
    """``equal`` (equal layer counts per stage) or ``dp`` (the planner's split)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "vp", "microbatches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ParallelConfig.{name} must be an integer >= 1 (got {value!r})")
        if self.shard is not None:
            object.__setattr__(self, "shard", Sharding(self.shard))
        if self.schedule is not None:
            object.__setattr__(self, "schedule", PipelineSchedule(self.schedule))
        if self.recompute is not None:
            recompute = Recompute(self.recompute)
            if recompute is Recompute.AUTO:
                raise ValueError("ParallelConfig.recompute names one: none, selective or full (auto is the planner's)")
            object.__setattr__(self, "recompute", recompute)
        if self.split is not None and self.split not in _SPLITS:
            raise ValueError(f"ParallelConfig.split must be one of {', '.join(_SPLITS)} (got {self.split!r})")
        if self.vp is not None and self.vp > 1 and self.schedule not in (None, PipelineSchedule.INTERLEAVED_1F1B):
            raise ValueError(f"vp={self.vp} stages per rank needs the interleaved_1f1b schedule (got {self.schedule.value})")

    @property
    def world(self) -> int | None:
        """``tp x pp x dp`` devices, when all three are fixed."""
        if self.tp is None or self.pp is None or self.dp is None:
            return None
        return self.tp * self.pp * self.dp

    def check_devices(self, devices: int) -> None:
        """Raise unless the fixed degrees fit in `devices` devices.

        Fewer is allowed: the training space holds the first devices of a node and halves
        of whole nodes of one kind, the rest idle (the plan says so), and the planner
        answers with `partitioner.errors.InfeasibleError` where no subset takes them.

        Raises:
            ValueError: The fixed degrees' product is more than `devices`.
        """
        fixed = {k: v for k, v in (("tp", self.tp), ("pp", self.pp), ("dp", self.dp)) if v is not None}
        product = 1
        for v in fixed.values():
            product *= v
        spelled = " x ".join(f"{k}={v}" for k, v in fixed.items())
        if product > devices:
            raise ValueError(
                f"{spelled} = {product} devices, but the cluster has {devices}: choose degrees whose product is "
                f"at most {devices}"
            )

    def admits(self, config: ConfigurationLike) -> bool:
        """Whether the planner's `config` has every fixed field of this one (``split`` and
        ``recompute`` are the splitter's: see `partitioner.pipeline_plan`)."""
        checks = (
            (self.tp, config.tp),
            (self.pp, config.ranks),
            (self.vp, config.virtual_stages),
            (self.shard, config.sharding),
            (self.microbatches, config.microbatches),
            (self.schedule, config.schedule),
        )
        if any(want is not None and want != have for want, have in checks):
            return False
        return self.dp is None or all(config.data_parallel(g) == self.dp for g in config.groups)

    def __str__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "recompute":
                value = next(k for k, v in _RECOMPUTE.items() if v is value)
            elif hasattr(value, "value"):
                value = value.value
            parts.append(f"{f.name}={value}")
        return ",".join(parts) or "(any)"


def parse_config(text: str) -> ParallelConfig:
    """``tp=8,pp=4,dp=2,shard=zero3,microbatches=16,recompute=full`` -> `ParallelConfig`.

    Raises:
        ValueError: An unknown key (naming the close one), a repeated key, or a bad value.
    """
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not eq or not value:
            raise ValueError(f"config item {item!r} must be key=value (as in tp=8,pp=4,dp=2)")
        name = _ALIASES.get(key)
        if name is None:
            close = difflib.get_close_matches(key, list(_ALIASES), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r}: use {', '.join(sorted(set(_ALIASES.values())))}{hint}")
        if name in values:
            raise ValueError(f"config key {name!r} given twice in {text!r}")
        values[name] = _value(name, value)
    if not values:
        raise ValueError(f"empty config {text!r}: name at least one of tp, pp, dp, shard, microbatches, recompute")
    return ParallelConfig(**values)


def _value(name: str, value: str) -> Any:
    if name in ("tp", "pp", "dp", "vp", "microbatches"):
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"config {name}={value}: must be an integer >= 1")
        return int(value)
    if name == "shard":
        return Sharding(_SHARD_ALIASES.get(value, value))
    if name == "schedule":
        return PipelineSchedule(value)
    if name == "recompute":
        if value not in _RECOMPUTE:
            raise ValueError(f"config recompute={value}: choose one of {', '.join(_RECOMPUTE)}")
        return _RECOMPUTE[value]
    return value
