"""A training configuration a user names: parsing, checks, and which planner configurations it admits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from partitioner.options import Recompute, Sharding
from partitioner.parallel_config import ParallelConfig, parse_config
from partitioner.simulate import PipelineSchedule


@dataclass(frozen=True)
class _Config:
    tp: int = 1
    sharding: Sharding = Sharding.NONE
    ranks: int = 1
    virtual_stages: int = 1
    microbatches: int = 1
    schedule: PipelineSchedule = PipelineSchedule.ONE_F_ONE_B
    dps: tuple[int, ...] = (1,)

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(range(len(self.dps)))

    def data_parallel(self, group: int) -> int:
        return self.dps[group]


def test_a_megatron_style_config_parses_with_its_aliases() -> None:
    config = parse_config("tp=8, pp=4,dp=2,shard=fsdp,mb=16,recompute=full,schedule=1f1b,split=equal")
    assert config == ParallelConfig(
        tp=8,
        pp=4,
        dp=2,
        shard=Sharding.ZERO3,
        microbatches=16,
        recompute=Recompute.ALWAYS,
        schedule=PipelineSchedule.ONE_F_ONE_B,
        split="equal",
    )
    assert config.world == 64
    assert parse_config(str(config)) == config
    assert str(parse_config("zero=2")) == "shard=zero2"


@pytest.mark.parametrize(
    "text, message",
    [
        ("tq=2", "unknown config key 'tq'.*did you mean 'tp'"),
        ("tp=2,tp=4", "given twice"),
        ("tp=0", "integer >= 1"),
        ("tp", "must be key=value"),
        ("shard=zero4", "did you mean 'zero3'"),
        ("recompute=auto", "choose one of none, selective, full"),
        ("split=random", "split must be one of equal, dp"),
        ("vp=2,schedule=1f1b", "needs the interleaved_1f1b schedule"),
        ("", "empty config"),
    ],
)
def test_a_bad_config_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(text)


def test_degrees_must_fit_in_the_cluster() -> None:
    # Fewer devices than the cluster's are allowed (the space holds subsets, the rest idle).
    parse_config("tp=8,pp=4,dp=2").check_devices(64)
    parse_config("tp=2,pp=3").check_devices(8)
    with pytest.raises(ValueError, match=r"tp=8 x pp=4 x dp=4 = 128 devices, but the cluster has 64"):
        parse_config("tp=8,pp=4,dp=4").check_devices(64)
    with pytest.raises(ValueError, match=r"pp=9 = 9 devices, but the cluster has 8: choose degrees whose product is at most 8"):
        parse_config("pp=9").check_devices(8)


def test_admits_only_configurations_with_every_fixed_field() -> None:
    grid = parse_config("tp=2,shard=zero3")
    assert grid.admits(_Config(tp=2, sharding=Sharding.ZERO3, ranks=4, dps=(2, 2, 2, 2)))
    assert not grid.admits(_Config(tp=4, sharding=Sharding.ZERO3))
    assert not grid.admits(_Config(tp=2, sharding=Sharding.ZERO1))
    exact = parse_config("tp=1,pp=2,dp=2,mb=8,schedule=gpipe")
    assert exact.admits(_Config(ranks=2, dps=(2, 2), microbatches=8, schedule=PipelineSchedule.GPIPE))
    assert not exact.admits(_Config(ranks=2, dps=(2, 1), microbatches=8, schedule=PipelineSchedule.GPIPE))
    assert not exact.admits(_Config(ranks=2, dps=(2, 2), microbatches=4, schedule=PipelineSchedule.GPIPE))
