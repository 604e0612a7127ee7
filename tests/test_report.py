"""The plan as text: header, one row per device, layer ranges, memory against capacity, transfers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len

import partitioner
from partitioner import Plan, PlanOptions, Strategy
from partitioner.models import build_model
from partitioner.plan import PlanLayer, PlanTransfer
from partitioner.report import format_seconds, layer_ranges, render_text, transfer_names
from partitioner.solve.explain import best_split
from partitioner.units import format_bytes
from tests.models import ZOO


@pytest.fixture(scope="module")
def split() -> Plan:
    """The tutorials' MLP on two absent A100s; a 2.1 MiB cap leaves fc1 (2.01 MiB) alone on the first."""
    model, args, _ = ZOO["mlp"].build()
    options = PlanOptions(allow_data_parallel=False, memory_reserve=0.0)
    plan = partitioner.plan(model, ["a100-80gb x2"], args, options=options, max_memory={"a100-80gb": "2.1MiB"})
    assert plan.assignment == (0, 1, 1, 1, 1, 1, 1), plan.assignment
    return plan


def _layers(*devices: int) -> tuple[PlanLayer, ...]:
    return tuple(
        PlanLayer(name=f"l{i}", modules=(), params=(), device=d, compute_s=0.0, memory_bytes=0)
        for i, d in enumerate(devices)
    )


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.0, "0.0 us"),
        (7.84e-6, "7.8 us"),
        (999.94e-6, "999.9 us"),
        (999.96e-6, "1.00 ms"),  # 1000.0 us would be the same figure in the wrong unit
        (1e-3, "1.00 ms"),
        (0.0456, "45.60 ms"),
        (0.999994, "999.99 ms"),
        (0.999996, "1.00 s"),
        (1.0, "1.00 s"),
        (1234.5, "1234.50 s"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    "devices, on, ranges",
    [
        ((0, 0, 1, 0, 0, 0), 0, ["l0 .. l1 (2 layers)", "l3 .. l5 (3 layers)"]),
        ((0, 0, 1, 0, 0, 0), 1, ["l2"]),
        ((0, 1, 0, 1), 1, ["l1", "l3"]),
        ((0, 0), 1, []),
        ((), 0, []),
        ((2, 2, 2, 2), 2, ["l0 .. l3 (4 layers)"]),
    ],
)
def test_layer_ranges(devices: tuple[int, ...], on: int, ranges: list[str]) -> None:
    assert layer_ranges(_layers(*devices), on) == ranges


# --------------------------------------------------------------------------- the table


def _row(text: str, device: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(device + " "))


def test_report_names_devices_strategy_times_and_bound(split: Plan) -> None:
    text = str(split)
    assert text == render_text(split)
    assert text.splitlines()[0].startswith("partitioner plan for Sequential (7 layers, fx graph, batch 4, ")
    assert "strategy: model_parallel on 2 device(s); objective: latency of one inference" in text
    ratio = split.predicted_s / split.bound_s
    assert (
        f"predicted: {format_seconds(split.predicted_s)}   bound max(total/devices, largest layer): "
        f"{format_seconds(split.bound_s)}   predicted/bound: {ratio:.2f}"
    ) in text
    assert "solver: dp, optimal" in text
    assert text.splitlines()[-1] == "outputs gathered on a100-80gb:1"


def test_report_rows_hold_layer_ranges_and_memory_against_capacity(split: Plan) -> None:
    text = str(split)
    for device, layers in zip(split.devices, ["fc1", "relu1 .. fc4 (6 layers)"]):
        row = _row(text, device.name)
        assert row.endswith(layers)
        used = f"{format_bytes(device.memory_bytes)} / {format_bytes(device.capacity_bytes)}"
        assert f"{used} ({device.memory_bytes / device.capacity_bytes:.0%})" in row
        assert format_bytes(device.param_bytes) in row
    assert "(96%)" in _row(text, "a100-80gb:0")  # 2.01 MiB of the 2.1 MiB cap


def test_report_columns_align_by_display_width_and_keep_brackets(split: Plan) -> None:
    # A wide character takes two terminal cells (a CJK module or profile name is valid);
    # padding by len() shifted every later column of its row. Brackets are text, not markup.
    devices = (replace(split.devices[0], profile="a100-層"), split.devices[1])
    layers = (replace(split.layers[0], name="[b]fc1[/b]"), *split.layers[1:])
    text = str(replace(split, devices=devices, layers=layers))
    header = next(line for line in text.splitlines() if line.startswith("device"))
    for device, held in zip(split.devices, ["[b]fc1[/b]", "relu1 .. fc4 (6 layers)"]):
        row = _row(text, device.name)
        assert row.endswith(held)
        assert cell_len(row[: row.index(held)]) == header.index("layers")


def test_report_lists_the_transfers(split: Plan) -> None:
    text = str(split)
    (crossing,) = split.transfers
    assert f"transfers per step: 1, {format_bytes(crossing.bytes)} forward" in text
    assert f"  {crossing.value}: a100-80gb:0 -> a100-80gb:1, {format_bytes(crossing.bytes)}" in text
    trained = replace(split, training=True)
    assert "forward (and their gradients back)" in str(trained)
    assert "of one training step" in str(trained)


def test_report_cuts_a_long_transfer_list(split: Plan) -> None:
    many = tuple(PlanTransfer(value=f"v{i}", src=0, dst=1, bytes=1024, seconds=1e-5) for i in range(15))
    text = str(replace(split, transfers=many))
    assert "transfers per step: 15, 15 KiB forward" in text
    assert "  v11: " in text and "  v12: " not in text
    assert text.splitlines()[-2] == "  ... 3 more"


def test_report_shows_a_solver_that_stopped_short(split: Plan) -> None:
    stopped = replace(split, solver=replace(split.solver, method="highs", optimal=False, gap=0.0525))
    assert "solver: highs, not proved optimal (gap 5.25%)" in str(stopped)


def test_report_says_how_the_device_order_was_chosen(split: Plan) -> None:
    assert "device order" not in render_text(split)  # identical devices: no order to choose
    searched = replace(split, solver=replace(split.solver, orders=70, orders_solved=2))
    assert "device order: best of 70 (2 solved, the rest cut by bounds)" in render_text(searched)
    short = replace(split, solver=replace(split.solver, orders=2520, orders_solved=32, orders_exhaustive=False))
    assert "device order: best of 32 solved of 2520 (the rest unsolved" in render_text(short)


def test_report_of_a_device_without_capacity(split: Plan) -> None:
    empty = replace(split.devices[1], capacity_bytes=0, memory_bytes=0)
    text = str(replace(split, devices=(split.devices[0], empty)))
    assert "0 B / 0 B (no capacity)" in _row(text, "a100-80gb:1")


def test_report_of_an_idle_device_shows_a_dash(split: Plan) -> None:
    single = replace(split, layers=tuple(replace(layer, device=0) for layer in split.layers), transfers=())
    text = str(single)
    assert _row(text, "a100-80gb:0").endswith("fc1 .. fc4 (7 layers)")
    assert _row(text, "a100-80gb:1").endswith("-")
    assert "transfers per step" not in text


def test_report_of_a_data_parallel_plan() -> None:
    built = build_model("mlp", batch_size=8192)
    plan = partitioner.plan(built.model, ["a100-80gb x2"], built.example_args)
    assert plan.strategy is Strategy.DATA_PARALLEL
    text = str(plan)
    assert "strategy: data_parallel on 2 device(s)" in text
    for device in plan.devices:
        assert _row(text, device.name).endswith("all layers (replica)")
    assert "transfers per step" not in text


# --------------------------------------------------------------------------- names, why, bound


def test_report_names_transfers_by_module_not_graph_node() -> None:
    from tests.helpers import split_plan

    model, args, kwargs = ZOO["gpt2"].build()
    plan = split_plan(model, args, kwargs, measure=False)
    text = str(plan)
    lines = text[text.index("transfers per step") :].splitlines()[1:-1]
    assert len(lines) == len(plan.transfers) > 0
    for t, line in zip(plan.transfers, lines):
        assert t.module and line.startswith(f"  {t.module}"), line
        assert t.value not in line.split(":")[0] or t.value == t.module  # the graph name only to tell two apart
    assert all(f'"value": "{t.value}"' in plan.to_json() for t in plan.transfers)  # kept for tools


def test_transfer_names_tell_apart_two_values_of_one_module() -> None:
    transfers = [
        PlanTransfer(value="add_3", src=0, dst=1, bytes=1, seconds=0.0, module="h.0"),
        PlanTransfer(value="add_4", src=0, dst=1, bytes=1, seconds=0.0, module="h.0"),
        PlanTransfer(value="x", src=0, dst=1, bytes=1, seconds=0.0, module="input x"),
        PlanTransfer(value="old_9", src=0, dst=1, bytes=1, seconds=0.0),  # a plan written before modules
    ]
    assert transfer_names(transfers) == ["h.0 [add_3]", "h.0 [add_4]", "input x", "old_9"]


def test_single_device_plan_on_two_devices_says_why() -> None:
    model, args, kwargs = ZOO["tied"].build()
    options = PlanOptions(allow_data_parallel=False, memory_reserve=0.0)
    plan = partitioner.plan(model, ["a100-80gb x2"], args, kwargs, options=options, measure=False)
    assert plan.strategy is Strategy.SINGLE
    why = next(line for line in str(plan).splitlines() if line.startswith("why: "))
    assert why.startswith(f"why: one device is fastest ({format_seconds(plan.predicted_s)}): the best split over ")
    assert "its transfers add" in why and "would be sent every step" in why
    assert plan.why and json.loads(plan.to_json())["why"] == plan.why


def test_why_names_a_tied_weight_the_split_would_send() -> None:
    from partitioner.api import compile_plan

    model, args, kwargs = ZOO["tied"].build()
    options = PlanOptions(allow_data_parallel=False, memory_reserve=0.0)
    compiled = compile_plan(model, ["a100-80gb x2"], args, kwargs, options=options, measure=False)
    split = best_split(compiled.problem, 0)
    assert split is not None
    largest = max(split.transfers, key=lambda t: t.seconds)
    assert compiled.problem.values[largest.value].name == "head_weight"  # the tied head crosses every cut
    assert f"takes {format_seconds(split.objective_s)}" in compiled.plan.why
    assert f"the tied weight head.weight ({format_bytes(largest.bytes)}, " in compiled.plan.why


def test_data_parallel_report_bound_is_below_the_prediction() -> None:
    built = build_model("mlp", batch_size=8192)
    plan = partitioner.plan(built.model, ["a100-80gb x2"], built.example_args)
    assert plan.strategy is Strategy.DATA_PARALLEL
    assert plan.predicted_s >= plan.bound_s
    assert f"bound total/devices (replicas share every layer): {format_seconds(plan.bound_s)}" in str(plan)


def test_report_sets_the_busiest_device_against_the_even_share_beside_the_largest_layer(tmp_path: Path) -> None:
    # fc1 (the largest layer) alone on the first device: the bound line, max(total/devices,
    # largest layer), hides how far the busiest device is from total/devices; this line does not.
    # Without the launch floor, which prices every layer of this small MLP alike on an A100.
    from partitioner.devices import load_profile
    from partitioner.profile_files import profile_to_json

    path = tmp_path / "a100-80gb.json"
    path.write_text(profile_to_json(replace(load_profile("a100-80gb"), launch_s=0.0)))
    model, args, _ = ZOO["mlp"].build()
    options = PlanOptions(allow_data_parallel=False, memory_reserve=0.0)
    split = partitioner.plan(model, [f"{path} x2"], args, options=options, max_memory={"a100-80gb": "2.1MiB"})
    assert split.assignment == (0, 1, 1, 1, 1, 1, 1), split.assignment
    periods = [max(d.compute_s, d.transfer_in_s, d.transfer_out_s) for d in split.devices]
    even = sum(layer.compute_s for layer in split.layers) / 2
    busiest = max(range(2), key=periods.__getitem__)
    largest = max(split.layers, key=lambda layer: layer.compute_s)
    assert largest.name == "fc1" and largest.compute_s > even  # the one-piece layer binds the old bound
    line = next(line for line in str(split).splitlines() if line.startswith("balance: "))
    assert line == (
        f"balance: busiest device {split.devices[busiest].name} {format_seconds(periods[busiest])} = "
        f"{periods[busiest] / even:.2f}x the even share (total/devices of this placement's compute: "
        f"{format_seconds(even)}); largest layer fc1 {format_seconds(largest.compute_s)} = {largest.compute_s / even:.2f}x"
    )
    assert periods[busiest] / even > 1.0 and f"predicted/bound: {split.predicted_s / split.bound_s:.2f}" in str(split)


def test_documented_cluster_example_plans_what_distributed_launches() -> None:
    # docs/training.md's first example: its plan must be one partitioner.distributed runs.
    from pathlib import Path

    from partitioner.distributed.layout import plan_layout

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, object] = {}
    exec(compile(code.replace("print(plan)", "report = str(plan)"), "docs/training.md", "exec"), scope)
    plan = scope["plan"]
    assert isinstance(plan, Plan) and plan.pipeline is not None
    assert "runs on: the simulator only" not in str(scope["report"])
    plan_layout(plan)  # raised PlanMismatchError: ranks of 1 and 2 replicas


def test_report_of_copies_names_each_copy_and_the_idle_devices() -> None:
    # The MLP's batch of 3 on eight devices that each hold half of it: three copies of a split.
    # Each sample is 16 rows, so that compute, not reading the weights (which every copy
    # does), is what copies divide.
    model, _, _ = ZOO["mlp"].build()
    x = torch.randn(3, 16, 1024)
    devices = [f"cpu:{k}" for k in range(8)]
    plan = partitioner.plan(model, devices, (x,), max_memory={d: "3MB" for d in devices}, measure=False)
    assert plan.strategy is Strategy.HYBRID and plan.replicas == ((0, 1), (2, 3), (4, 5)), plan
    text = str(plan)
    assert "strategy: hybrid on 6 of 8 devices (3 copies of 2 devices, batch split 1/1/1)" in text
    assert _row(text, "cpu:0").endswith("copy 0: fc1 .. fc2 (3 layers)")
    assert _row(text, "cpu:3").endswith("copy 1: relu2 .. fc4 (4 layers)")
    assert _row(text, "cpu:7").endswith("- (idle)")
    assert "why: 2 of 8 devices stay idle (cpu:6, cpu:7)" in text
    assert "cpu:4 -> cpu:5" in text  # the third copy's activations


def test_report_of_data_parallelism_over_some_devices() -> None:
    # Three samples of 16 rows each (copies divide compute, not the weights each one reads).
    built = build_model("mlp", batch_size=3)
    plan = partitioner.plan(built.model, ["cpu x5"], (torch.randn(3, 16, 1024),))
    assert plan.strategy is Strategy.DATA_PARALLEL
    text = str(plan)
    assert plan.idle_devices, text
    assert "of 5 devices" in text and _row(text, plan.devices[-1].name).endswith("- (idle)")


# --------------------------------------------------------------------------- how sure a time is


def test_report_marks_roofline_only_times(split: Plan) -> None:
    """Datasheet profiles and no timings: every time is the roofline on datasheet figures."""
    assert {layer.time_source for layer in split.layers} == {"roofline"}
    text = render_text(split)
    assert "layer times: roofline-only (measured: timed on the device; calibrated:" in text
    header = next(line for line in text.splitlines() if line.startswith("device"))
    row = next(line for line in text.splitlines() if line.startswith("a100-80gb:0"))
    assert row[header.index("from") :].startswith("roofline-only")


def test_report_marks_measured_and_calibrated_times(tmp_path: Path) -> None:
    """A layer timed on the device is measured; one priced from a measured profile is calibrated."""
    from partitioner.devices import load_profile
    from partitioner.profile_files import profile_to_json

    model, args, _ = ZOO["mlp"].build()
    measured_cpu = replace(load_profile("cpu"), name="my-cpu", calibrated=True)
    path = tmp_path / "my-cpu.json"
    path.write_text(profile_to_json(measured_cpu))
    options = PlanOptions(allow_data_parallel=False)
    calibrated = partitioner.plan(model, [str(path)], args, options=options)
    assert {layer.time_source for layer in calibrated.layers} == {"calibrated"}
    assert "layer times: calibrated (" in render_text(calibrated)
    timed = partitioner.plan(model, ["cpu"], args, options=options, measure=True)
    assert {layer.time_source for layer in timed.layers} == {"measured"}
    mixed = replace(timed, layers=timed.layers[:2] + tuple(replace(l, time_source="roofline") for l in timed.layers[2:]))
    n = len(timed.layers)
    assert f"layer times: 2 measured + {n - 2} roofline-only (" in render_text(mixed)
    assert Plan.from_json(mixed.to_json()) == mixed


def test_plans_without_time_sources_load_and_render_without_the_line(split: Plan) -> None:
    data = json.loads(split.to_json())
    for layer in data["layers"]:
        del layer["time_source"]
    old = Plan.from_json(json.dumps(data))
    assert {layer.time_source for layer in old.layers} == {""}
    assert "layer times:" not in render_text(old)
    data["layers"][0]["time_source"] = "guessed"
    with pytest.raises(partitioner.errors.PlanFormatError, match=r"layers\[0\].time_source must be one of measured"):
        Plan.from_json(json.dumps(data))


def test_a_training_plans_stage_table_shows_the_optimizer_step_where_it_is_priced() -> None:
    from partitioner.report import render_training
    from tests.test_plan import hand_pipeline_plan

    plan = hand_pipeline_plan()
    assert plan.pipeline is not None
    assert "opt step" not in render_training(plan)  # a plan from before the step was priced
    stages = (replace(plan.pipeline.stages[0], optimizer_s=0.0125), plan.pipeline.stages[1])
    lines = render_training(replace(plan, pipeline=replace(plan.pipeline, stages=stages))).splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("stage "))
    column = lines[head].index("opt step")
    assert [lines[k][column:].split()[0] for k in (head + 1, head + 2)] == ["12.50", "-"]
