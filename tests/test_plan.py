"""Plan data: JSON round trips, determinism, hostile JSON, and the Accelerate device_map."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch
from torch import nn

import partitioner
from partitioner import Objective, PlanOptions, Strategy
from partitioner.errors import PlanFormatError
from partitioner.models import build_model
from partitioner.plan import PipelinePlan, Plan, PlanDevice, PlanLayer, PlanStage, PlanTransfer, SolverInfo
from tests.models import ZOO
from tests.helpers import split_plan

NO_DP = PlanOptions(allow_data_parallel=False, memory_reserve=0.0)
GPUS = ["a100-80gb", "a100-80gb"]


def hand_plan(
    devices: tuple[PlanDevice, ...] | None = None,
    layers: tuple[PlanLayer, ...] | None = None,
    strategy: Strategy = Strategy.MODEL_PARALLEL,
) -> Plan:
    """A small plan written out by hand: two absent GPUs, three layers, one transfer."""
    if devices is None:
        devices = tuple(
            PlanDevice(
                name=f"a100-80gb:{i}",
                profile="a100-80gb",
                kind="gpu",
                torch_device=None,
                capacity_bytes=80 * 2**30,
                memory_bytes=(i + 1) * 2**20,
                param_bytes=2**20,
                compute_s=0.25 * (i + 1),
                transfer_in_s=0.001 * i,
                transfer_out_s=0.001 * (1 - i),
            )
            for i in range(2)
        )
    if layers is None:
        layers = tuple(
            PlanLayer(name=n, modules=(n,), params=(f"{n}.weight",), device=d, compute_s=0.125, memory_bytes=2**19)
            for n, d in [("embed", 0), ("block", 0), ("head", 1)]
        )
    return Plan(
        model_name="Toy",
        fingerprint="0123456789abcdef",
        frontend="fx",
        granularity="block",
        strategy=strategy,
        objective=Objective.LATENCY,
        training=False,
        batch_size=4,
        devices=devices,
        layers=layers,
        transfers=(PlanTransfer(value="block", src=0, dst=1, bytes=4096, seconds=0.001),),
        output_device=1,
        predicted_s=0.751,
        bound_s=0.375,
        solver=SolverInfo(method="dp", optimal=True, gap=0.0),
    )


def _layer(name: str, device: int, modules: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> PlanLayer:
    return PlanLayer(name=name, modules=modules, params=params, device=device, compute_s=0.0, memory_bytes=0)


@pytest.fixture(scope="module")
def gpt2_split() -> tuple[nn.Module, Plan]:
    model, args, kwargs = ZOO["gpt2"].build()
    return model, split_plan(model, args, kwargs)


@pytest.fixture(scope="module")
def data_parallel_plan() -> Plan:
    built = build_model("mlp", batch_size=8192)  # on meta: compute-heavy enough for replicas to pay off
    plan = partitioner.plan(built.model, GPUS, built.example_args)
    assert plan.strategy is Strategy.DATA_PARALLEL, plan
    return plan


# --------------------------------------------------------------------------- JSON round trips


def _assert_round_trips(plan: Plan) -> None:
    text = plan.to_json()
    loaded = Plan.from_json(text)
    assert loaded == plan
    assert loaded.to_json() == text
    assert Plan.from_dict(plan.to_dict()) == plan
    assert json.loads(text) == plan.to_dict()


def test_hand_made_plan_round_trips() -> None:
    _assert_round_trips(hand_plan())


def test_refined_modules_round_trip_and_a_plan_saved_without_them_loads() -> None:
    refined = replace(hand_plan(), granularity="auto", refined=("transformer.h.3", "transformer.h.3.attn"))
    _assert_round_trips(refined)
    older = hand_plan().to_dict()
    assert "refined" not in older  # as plans were saved before the field existed
    assert Plan.from_dict(older).refined == ()
    with pytest.raises(PlanFormatError, match="refined must be a list of strings"):
        Plan.from_dict({**older, "refined": "transformer.h.3"})


def test_int_in_a_float_field_dumps_the_same_after_loading() -> None:
    plan = replace(hand_plan(), predicted_s=2, bound_s=1)
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    assert '"predicted_s": 2.0' in plan.to_json()


_names = st.text(min_size=1, max_size=8)
_sizes = st.integers(min_value=0, max_value=2**62 - 1)
_seconds = st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.integers(0, 10**6))


@given(
    layers=st.lists(st.tuples(_names, st.integers(0, 1), _seconds, _sizes), min_size=1, max_size=6),
    capacity=_sizes,
    predicted=_seconds,
    gap=st.floats(min_value=0, max_value=1),
    optimal=st.booleans(),
    torch_device=st.one_of(st.none(), _names),
)
def test_any_valid_plan_round_trips(
    layers: list[tuple[str, int, float, int]],
    capacity: int,
    predicted: float,
    gap: float,
    optimal: bool,
    torch_device: str | None,
) -> None:
    base = hand_plan()
    plan = replace(
        base,
        devices=(replace(base.devices[0], capacity_bytes=capacity, torch_device=torch_device), base.devices[1]),
        layers=tuple(
            PlanLayer(name=n, modules=(n,), params=(), device=d, compute_s=s, memory_bytes=m) for n, d, s, m in layers
        ),
        predicted_s=predicted,
        solver=SolverInfo(method="highs", optimal=optimal, gap=gap),
    )
    _assert_round_trips(plan)


@pytest.mark.parametrize("name", ["tied", "branchy"])
def test_real_split_plan_round_trips_and_planning_is_deterministic(name: str) -> None:
    model, args, kwargs = ZOO[name].build()
    first = split_plan(model, args, kwargs)
    assert len(set(first.assignment)) == 2 and first.transfers, first
    _assert_round_trips(first)
    again_model, again_args, again_kwargs = ZOO[name].build()
    again = split_plan(again_model, again_args, again_kwargs)
    assert again.to_json() == first.to_json()


def test_data_parallel_plan_round_trips(data_parallel_plan: Plan) -> None:
    _assert_round_trips(data_parallel_plan)


# --------------------------------------------------------------------------- hostile JSON


def _edit(change: Callable[[dict[str, Any]], object]) -> str:
    data = hand_plan().to_dict()
    change(data)
    return json.dumps(data)


def _set(*path: Any) -> Callable[[dict[str, Any]], None]:
    """A change that sets ``data[path[0]]...[path[-2]] = path[-1]``."""

    def change(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path[:-2]:
            target = target[key]
        target[path[-2]] = path[-1]

    return change


VALID = hand_plan().to_json()
HOSTILE: dict[str, tuple[str, str]] = {
    "not JSON": ("plan: fc1 on cuda:0", "must be JSON"),
    "empty": ("", "must be JSON"),
    "truncated": (VALID[: len(VALID) // 2], "must be JSON"),
    "a list": ("[]", "JSON object"),
    "NaN": (VALID.replace('"predicted_s": 0.751', '"predicted_s": NaN'), "NaN"),
    "Infinity": (VALID.replace('"bound_s": 0.375', '"bound_s": Infinity'), "Infinity"),
    "-Infinity": (VALID.replace('"bound_s": 0.375', '"bound_s": -Infinity'), "Infinity"),
    "overflowing float": (VALID.replace('"bound_s": 0.375', '"bound_s": 1e999'), "bound_s"),
    "huge float": (_edit(_set("devices", 0, "compute_s", 1e300)), "devices[0].compute_s"),
    "huge int": (_edit(_set("devices", 0, "capacity_bytes", 2**80)), "devices[0].capacity_bytes"),
    "5000-digit int": (VALID.replace('"batch_size": 4', '"batch_size": ' + "9" * 5000), "digits"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "string for int": (_edit(_set("batch_size", "4")), "batch_size"),
    "float for int": (_edit(_set("layers", 0, "device", 0.0)), "layers[0].device"),
    "bool for int": (_edit(_set("output_device", True)), "output_device"),
    "int for bool": (_edit(_set("training", 0)), "training"),
    "string for float": (_edit(_set("predicted_s", "0.751")), "predicted_s"),
    "string for list": (_edit(_set("layers", 0, "modules", "embed")), "layers[0].modules"),
    "object for list": (_edit(_set("transfers", {})), "transfers"),
    "list for object": (_edit(_set("solver", [])), "solver"),
    "number in names": (_edit(_set("layers", 1, "params", ["block.weight", 7])), "layers[1].params[1] must be a string"),
    "negative int": (_edit(_set("transfers", 0, "bytes", -1)), "transfers[0].bytes"),
    "negative float": (_edit(_set("devices", 1, "transfer_in_s", -0.5)), "devices[1].transfer_in_s"),
    "unknown key": (_edit(_set("pickle", "cos\nsystem\n")), "unknown keys ['pickle']"),
    "unknown nested key": (_edit(_set("layers", 0, "device_map", 0)), "layers[0] has unknown keys"),
    "missing key": (_edit(lambda d: d.pop("fingerprint")), "misses keys ['fingerprint']"),
    "missing nested key": (_edit(lambda d: d["devices"][1].pop("kind")), "devices[1] misses keys ['kind']"),
    "repeated key": (VALID.replace('"batch_size": 4', '"batch_size": 4, "batch_size": 5'), "the plan repeats keys ['batch_size']"),
    "layer on absent device": (_edit(_set("layers", 2, "device", 2)), "layers[2].device is 2, beyond the plan's 2 devices"),
    "transfer to absent device": (_edit(_set("transfers", 0, "dst", 9)), "transfers[0].dst is 9, beyond the plan's 2"),
    "output on absent device": (_edit(_set("output_device", 2)), "output_device is 2, beyond the plan's 2 devices"),
    "no devices": (_edit(_set("devices", [])), "no devices"),
    "unknown kind": (_edit(_set("devices", 0, "kind", "tpu")), "devices[0].kind must be 'cpu' or 'gpu'"),
    "gap above 1": (_edit(_set("solver", "gap", 3.0)), "gap"),
    "unknown strategy": (_edit(_set("strategy", "pipeline")), "strategy: unknown Strategy 'pipeline'"),
    "unhashable strategy": (_edit(_set("strategy", ["single"])), "Strategy"),
    "unknown objective": (_edit(_set("objective", "energy")), "objective: unknown Objective 'energy'"),
    "version 2": (_edit(_set("version", 2)), "version must be 1"),
    "version true": (_edit(_set("version", True)), "version must be 1"),
    "version 1.0": (_edit(_set("version", 1.0)), "version must be 1"),
    "version missing": (_edit(lambda d: d.pop("version")), "misses keys ['version']"),
    "lone surrogate": (_edit(_set("model_name", "\ud800")), "model_name"),
}


@pytest.mark.parametrize("text, message", list(HOSTILE.values()), ids=list(HOSTILE))
def test_from_json_rejects_malformed_input(text: str, message: str) -> None:
    with pytest.raises(PlanFormatError, match=re.escape(message)):
        Plan.from_json(text)


def test_the_valid_plan_the_hostile_cases_start_from_loads() -> None:
    assert Plan.from_json(VALID) == hand_plan()


def hand_pipeline_plan() -> Plan:
    """`hand_plan` with a two-stage pipeline: layers 0-1 on device 0, layer 2 on device 1."""
    stages = tuple(
        PlanStage(
            index=j, rank=j, first_layer=first, last_layer=last, devices=(j,), profile="a100-80gb", samples=2,
            recompute=False, fwd_s=0.1, bwd_s=0.2, send_fwd_s=0.01, send_bwd_s=0.01, allreduce_s=0.0,
            weight_bytes=2**20, grad_bytes=2**20, optimizer_bytes=2**21, buffer_bytes=0, recompute_bytes=0,
            microbatch_activation_bytes=2**10, inflight_microbatches=2, peak_memory_bytes=2**23,
            capacity_bytes=80 * 2**30,
        )
        for j, (first, last) in enumerate([(0, 1), (2, 2)])
    )
    pipeline = PipelinePlan(
        family="pipeline", description="2 stages", schedule="1f1b", microbatches=2, virtual_stages=1,
        global_batch=4, precision="float32", optimizer="adam", overlap_allreduce=True, layout="one node",
        split="dp", stages=stages, step_time_s=0.9, bubble_fraction=0.25, samples_per_s=4.4, model_flops=1e12,
        peak_flops=6e14, mfu=0.01, bound_s=0.5, lower_bound_s=0.6, runner_ups=(), space="2 devices",
        configurations=4, solved=2, simulated=2,
    )
    return replace(hand_plan(), pipeline=pipeline)


def _edit_pipeline(change: Callable[[dict[str, Any]], object]) -> str:
    data = hand_pipeline_plan().to_dict()
    change(data)
    return json.dumps(data)


# One case per kind of error: the message starts with the key path, as a reader writes it.
KEY_PATHS: dict[str, tuple[str, str]] = {
    "wrong type": (_edit(_set("layers", 0, "device", "x")), "layers[0].device must be an integer"),
    "wrong type of a record": (_edit(_set("layers", 1, 3)), "layers[1] must be a JSON object"),
    "missing key": (_edit(lambda d: d["devices"][1].pop("kind")), "devices[1] misses keys ['kind']"),
    "unknown key": (_edit(_set("layers", 0, "device_map", 0)), "layers[0] has unknown keys ['device_map']"),
    "repeated key": (VALID.replace('"device": 0', '"device": 0, "device": 1', 1), "layers[0] repeats keys ['device']"),
    "out of range": (_edit(_set("transfers", 0, "bytes", -1)), "transfers[0].bytes must be an integer in [0, 2**62)"),
    "index beyond the devices": (_edit(_set("layers", 2, "device", 5)), "layers[2].device is 5"),
    "nested list element": (_edit(_set("layers", 1, "modules", ["block", 7])), "layers[1].modules[1] must be a string"),
    "unknown choice": (_edit(_set("devices", 1, "kind", "tpu")), "devices[1].kind must be 'cpu' or 'gpu'"),
    "pipeline count": (_edit_pipeline(_set("pipeline", "microbatches", 0)), "pipeline.microbatches must be >= 1"),
    "stage device beyond the devices": (
        _edit_pipeline(_set("pipeline", "stages", 1, "devices", [99])),
        "pipeline.stages[1].devices[0] is 99, beyond the plan's 2 devices",
    ),
    "stage device repeated": (
        _edit_pipeline(_set("pipeline", "stages", 1, "devices", [1, 1])),
        "pipeline.stages[1].devices[1] repeats device 1",
    ),
    "stage rank": (_edit_pipeline(_set("pipeline", "stages", 1, "rank", 0)), "pipeline.stages[1].rank must be 1"),
    "stage element type": (
        _edit_pipeline(_set("pipeline", "stages", 0, "devices", ["0"])),
        "pipeline.stages[0].devices[0] must be an integer",
    ),
    "unknown sharding": (_edit_pipeline(_set("pipeline", "sharding", "zero4")), "pipeline.sharding must be one of"),
    "stage devices and tensor parallelism": (
        _edit_pipeline(_set("pipeline", "tensor_parallel", 2)),
        "pipeline.stages[0].devices holds 1 devices, not a multiple of pipeline.tensor_parallel (2)",
    ),
}


@pytest.mark.parametrize("text, path", list(KEY_PATHS.values()), ids=list(KEY_PATHS))
def test_from_json_error_starts_with_the_key_path(text: str, path: str) -> None:
    with pytest.raises(PlanFormatError, match="^" + re.escape(path)):
        Plan.from_json(text)


def test_hand_made_pipeline_plan_round_trips() -> None:
    _assert_round_trips(hand_pipeline_plan())


def test_a_stages_optimizer_step_round_trips_and_a_plan_saved_without_it_loads_with_0() -> None:
    plan = hand_pipeline_plan()
    assert plan.pipeline is not None
    stepped = replace(plan, pipeline=replace(plan.pipeline, stages=tuple(
        replace(s, optimizer_s=0.004 * (s.index + 1)) for s in plan.pipeline.stages)))
    _assert_round_trips(stepped)
    assert [s["optimizer_s"] for s in stepped.to_dict()["pipeline"]["stages"]] == [0.004, 0.008]
    older = plan.to_dict()  # as plans were saved before the optimizer step was priced
    assert "optimizer_s" not in older["pipeline"]["stages"][0]
    loaded = Plan.from_dict(older)
    assert loaded.pipeline is not None and [s.optimizer_s for s in loaded.pipeline.stages] == [0.0, 0.0]
    assert loaded.to_json() == plan.to_json()
    costs = stepped.pipeline.stage_costs([d.name for d in stepped.devices])  # type: ignore[union-attr]
    assert [c.optimizer_s for c in costs] == [0.004, 0.008]


# --------------------------------------------------------------------------- device_map


def _lookup(device_map: dict[str, int | str], name: str) -> int | str:
    """Where Accelerate puts tensor `name`: the value of its longest prefix in the map."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in device_map:
            return device_map[prefix]
    raise AssertionError(f"{name} has no device_map key that is a prefix of it: {sorted(device_map)}")


def _owner_device(model: nn.Module, plan: Plan) -> dict[int, int]:
    """id of each tensor the plan's layers own -> that layer's device (names may be aliases)."""
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    return {id(state[name]): layer.device for layer in plan.layers for name in layer.params}


@pytest.mark.parametrize("name", ["mlp", "branchy", "tied"])
def test_device_map_sends_each_tensor_to_its_layers_gpu(name: str) -> None:
    model, args, kwargs = ZOO[name].build()
    plan = split_plan(model, args, kwargs)
    device_map = plan.device_map()
    assert "" not in device_map  # the whole model on one device is what a split plan is not
    owner = _owner_device(model, plan)
    named = list(model.named_parameters()) + list(model.named_buffers())
    assert {_lookup(device_map, n) for n, _ in named} == {0, 1}
    for n, t in named:
        assert _lookup(device_map, n) == owner[id(t)], n


def test_device_map_of_gpt2_covers_every_parameter(gpt2_split: tuple[nn.Module, Plan]) -> None:
    model, plan = gpt2_split
    assert set(plan.assignment) == {0, 1}
    device_map = plan.device_map()
    assert all(type(v) is int for v in device_map.values()), device_map
    owner = _owner_device(model, plan)
    for n, p in model.named_parameters():
        assert _lookup(device_map, n) == owner[id(p)], n
    block = next(layer for layer in plan.layers if layer.name == "transformer.h.0")
    assert _lookup(device_map, "transformer.h.0.attn.c_attn.weight") == block.device


def _bart() -> nn.Module:
    """A small BART from a config (random weights): ``model.shared`` tied to both embeddings and the head."""
    from tests.models import _hf_model

    return _hf_model(
        "BartForConditionalGeneration",
        "BartConfig",
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        use_cache=False,
    )


def _tied_encoder_decoder(name: str) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], str]:
    """(model, args, kwargs, the tied module no layer calls) for T5 and BART."""
    if name == "t5":
        model, args, kwargs = ZOO["t5"].build()
        return model, args, kwargs, "shared"
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    return _bart(), (ids,), {"decoder_input_ids": ids}, "model.shared"


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_device_map_of_tied_encoder_decoder_is_accepted_by_accelerate(name: str) -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import check_device_map

    model, args, kwargs, shared = _tied_encoder_decoder(name)
    plan = split_plan(model, args, kwargs, measure=False)
    assert set(plan.assignment) == {0, 1}
    device_map = plan.device_map()
    check_device_map(model, device_map)  # raised: shared.weight has no device
    owner = _owner_device(model, plan)
    for n, p in model.named_parameters(remove_duplicate=False):
        if n.startswith(shared + "."):
            assert _lookup(device_map, n) == owner[id(p)], n
    # dispatch_model on this machine: the same keys, every one on the CPU.
    with torch.no_grad():
        expected = model(*args, **kwargs).logits
        dispatched = accelerate.dispatch_model(model, {k: "cpu" for k in device_map})
        torch.testing.assert_close(dispatched(*args, **kwargs).logits, expected)


def test_device_map_refuses_a_data_parallel_plan(data_parallel_plan: Plan) -> None:
    with pytest.raises(ValueError, match="data-parallel"):
        data_parallel_plan.device_map()


def test_device_map_keeps_a_nested_module_that_returns_to_the_outer_device() -> None:
    layers = (_layer("a", 0, ("a",)), _layer("a.b", 1, ("a.b",)), _layer("a.b.c", 0, ("a.b.c",)))
    device_map = hand_plan(layers=layers).device_map()
    assert device_map == {"a": 0, "a.b": 1, "a.b.c": 0}
    assert _lookup(device_map, "a.b.c.weight") == 0


def test_device_map_prunes_modules_their_parent_already_places() -> None:
    layers = (_layer("a", 0, ("a", "a.x")), _layer("b", 1, ("b", "b.y", "b.y.z")))
    assert hand_plan(layers=layers).device_map() == {"a": 0, "b": 1}


def test_device_map_keys_root_tensors_by_name() -> None:
    layers = (_layer("scale", 0, (), ("scale",)), _layer("head", 1, ("head",), ("head.weight",)))
    assert hand_plan(layers=layers).device_map() == {"scale": 0, "head": 1}


def test_device_map_of_present_gpus_uses_their_cuda_index() -> None:
    base = hand_plan()
    on_cuda = tuple(replace(d, name=f"cuda:{k}", torch_device=f"cuda:{k}") for d, k in zip(base.devices, (3, 1)))
    assert replace(base, devices=on_cuda).device_map() == {"embed": 3, "block": 3, "head": 1}


def test_device_map_sends_cpu_layers_to_cpu_and_numbers_gpus_in_plan_order() -> None:
    cpu = replace(hand_plan().devices[0], name="cpu", profile="cpu", kind="cpu", torch_device="cpu")
    gpu = hand_plan().devices[0]
    layers = (_layer("a", 0, ("a",)), _layer("b", 1, ("b",)), _layer("c", 2, ("c",)))
    plan = hand_plan(devices=(gpu, cpu, replace(gpu, name="a100-80gb:1")), layers=layers)
    assert plan.device_map() == {"a": 0, "b": "cpu", "c": 1}


def test_device_map_refuses_a_module_split_over_two_devices() -> None:
    layers = (_layer("shared", 0, ("shared",)), _layer("shared@1", 1, ("shared",)))
    with pytest.raises(ValueError, match="'shared' is split between a100-80gb:1"):
        hand_plan(layers=layers).device_map()


# --------------------------------------------------------------------------- views


def test_assignment_and_transfer_bytes() -> None:
    plan = hand_plan()
    assert plan.assignment == (0, 0, 1)
    assert plan.transfer_bytes == 4096


# --------------------------------------------------------------------------- fields added after version 1


def test_plan_of_version_1_without_later_fields_loads_and_dumps_the_same() -> None:
    old = hand_plan().to_json()  # no transfer module, no why: the JSON plans had before them
    data = json.loads(old)
    assert "module" not in data["transfers"][0] and "why" not in data
    loaded = Plan.from_json(old)
    assert loaded.transfers[0].module == "" and loaded.why == ""
    assert loaded.to_json() == old


def test_transfer_module_and_why_round_trip() -> None:
    base = hand_plan()
    plan = replace(
        base,
        transfers=(replace(base.transfers[0], module="encoder.block.1"),),
        why="one device is fastest",
    )
    data = json.loads(plan.to_json())
    assert data["transfers"][0]["module"] == "encoder.block.1" and data["transfers"][0]["value"] == "block"
    assert Plan.from_json(plan.to_json()) == plan
    data["transfers"][0]["module"] = 3
    with pytest.raises(PlanFormatError, match=r"transfers\[0\].module must be a string"):
        Plan.from_dict(data)


def test_split_plan_names_each_transfer_by_its_module(gpt2_split: tuple[nn.Module, Plan]) -> None:
    model, plan = gpt2_split
    modules = dict(model.named_modules())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    assert plan.transfers
    for t in plan.transfers:
        assert t.module in modules or t.module in tensors or t.module == plan.model_name, t


# --------------------------------------------------------------------------- copies (issue 15)


def _copied_plan() -> Plan:
    """`hand_plan`'s split on devices 0 and 1, copied onto devices 2 and 3 of four; 4 and 5 idle."""
    base = hand_plan()
    devices = tuple(replace(base.devices[i % 2], name=f"a100-80gb:{i}") for i in range(6))
    return replace(base, devices=devices, strategy=Strategy.HYBRID, replicas=((0, 1), (2, 3)))


def test_plan_of_copies_round_trips_and_names_its_groups() -> None:
    plan = _copied_plan()
    _assert_round_trips(plan)
    assert plan.to_dict()["replicas"] == [[0, 1], [2, 3]]
    assert plan.replica_groups == ((0, 1), (2, 3)) and plan.idle_devices == (4, 5)
    with pytest.raises(ValueError, match="runs 2 copies of the model"):
        plan.device_map()


def test_plans_without_copies_keep_their_json_and_read_as_one_copy() -> None:
    plan = hand_plan()
    assert "replicas" not in plan.to_dict()  # older releases read it as they always did
    assert Plan.from_dict(plan.to_dict()).replicas == ()
    assert plan.replica_groups == ((0, 1),) and plan.idle_devices == ()
    everywhere = replace(hand_plan(strategy=Strategy.DATA_PARALLEL), layers=hand_plan().layers[:0])
    assert everywhere.replica_groups == ((0,), (1,))


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        ([[0, 1], [2]], "replicas[1] holds 1 devices; every copy needs 2"),
        ([[0, 1], [1, 2]], "replicas[1][0] is device 1, which another copy already runs on"),
        ([[0, 1], [2, 9]], "replicas[1][1] is 9, beyond the plan's 6 devices"),
        ([[0, 2], [3, 4]], "layers run on device 1, which is not in replicas[0] [0, 2]"),
        ([[0, 1], []], "replicas[1] holds 0 devices"),
        ([[0, 1], "2"], "replicas[1] must be a list of integers"),
        ([[0, 1], [-2, 3]], "replicas[1][0] must be an integer in [0, 2**62)"),
        ({"0": [0, 1]}, "replicas must be a list of lists of integers (got dict)"),
    ],
)
def test_copies_that_do_not_make_sense_are_refused(replicas: Any, message: str) -> None:
    data = _copied_plan().to_dict()
    data["replicas"] = replicas
    with pytest.raises(PlanFormatError, match=re.escape(message)):
        Plan.from_dict(data)


def test_device_order_search_round_trips_and_plans_without_it_load() -> None:
    base = hand_plan()
    assert "orders" not in json.loads(base.to_json())["solver"]  # one order: the JSON plans had before
    plan = replace(base, solver=SolverInfo(method="dp", optimal=False, gap=0.01, orders=70, orders_solved=3,
                                           orders_exhaustive=False))
    _assert_round_trips(plan)
    data = json.loads(plan.to_json())
    assert data["solver"]["orders"] == 70 and data["solver"]["orders_exhaustive"] is False
    data["solver"]["orders_solved"] = 71
    with pytest.raises(PlanFormatError, match=r"solver.orders_solved those solved among them \(got 70 and 71\)"):
        Plan.from_dict(data)
    data["solver"]["orders_solved"] = "3"
    with pytest.raises(PlanFormatError, match=r"solver.orders_solved must be an integer"):
        Plan.from_dict(data)

