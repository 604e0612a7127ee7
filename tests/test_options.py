"""Options: every dataclass checks its fields on construction and reads enum values from strings."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import partitioner
from partitioner.options import (
    Objective,
    Optimizer,
    PlanOptions,
    Precision,
    Recompute,
    SolverBackend,
    SolverOptions,
    Frontend,
    Granularity,
    TraceOptions,
    TrainingOptions,
    check_split_modules,
    trace_options,
)
from partitioner.simulate.data import PipelineSchedule
from tests.models import SmallResNet


def test_plan_options_read_enum_values_from_strings() -> None:
    options = PlanOptions(objective="Throughput", optimizer="sgd", solver=SolverOptions(backend="HIGHS"))
    assert options.objective is Objective.THROUGHPUT
    assert options.optimizer is Optimizer.SGD
    assert options.solver.backend is SolverBackend.HIGHS
    training = TrainingOptions(precision="bf16", recompute="ALWAYS", optimizer="momentum")
    assert (training.precision, training.recompute, training.optimizer) == (
        Precision.BF16, Recompute.ALWAYS, Optimizer.MOMENTUM,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PlanOptions(objective="througput"), "PlanOptions.objective: unknown Objective 'througput'.*"
         "'latency', 'throughput'; did you mean 'throughput'"),
        (lambda: PlanOptions(optimizer="adamw"), "PlanOptions.optimizer: .*'adam'"),
        (lambda: PlanOptions(training="yes"), "PlanOptions.training must be True or False"),
        (lambda: PlanOptions(allow_data_parallel=None), "allow_data_parallel must be True or False"),
        (lambda: PlanOptions(memory_reserve="0.1"), r"memory_reserve must be in \[0, 1\)"),
        (lambda: PlanOptions(solver="highs"), "PlanOptions.solver must be a SolverOptions"),
        (lambda: SolverOptions(backend="higs"), "SolverOptions.backend: .*did you mean 'highs'"),
        (lambda: SolverOptions(time_limit_s="60"), "time_limit_s must be a number of seconds > 0"),
        (lambda: SolverOptions(max_candidates=2.5), "max_candidates must be an integer >= 1"),
        (lambda: TrainingOptions(precision="fp8"), "TrainingOptions.precision: unknown Precision 'fp8'"),
        (lambda: TrainingOptions(recompute="sometimes"), "TrainingOptions.recompute: .*'never', 'auto', 'selective', 'always'"),
        (lambda: TrainingOptions(global_batch=8.0), "global_batch must be an integer >= 1 or None"),
        (lambda: TrainingOptions(max_microbatches="4"), "max_microbatches must be an integer >= 1"),
        (lambda: TrainingOptions(equal_replicas=1), "equal_replicas must be True or False"),
        (lambda: TrainingOptions(schedules=3), "schedules must be a tuple of schedules"),
        (lambda: TraceOptions(frontend="jit"), "TraceOptions.frontend: unknown Frontend 'jit'.*'auto', 'fx', 'export'"),
        (lambda: TraceOptions(granularity="layer"), "TraceOptions.granularity: .*'block', 'leaf'"),
        (lambda: TraceOptions(split_modules=[3]), "TraceOptions.split_modules must hold class names .*got 3"),
        (lambda: TraceOptions(split_modules=5), "TraceOptions.split_modules must hold class names .*got 5"),
        (lambda: TraceOptions(refine=[3]), "TraceOptions.refine must hold module paths .*got \\[3\\]"),
        (lambda: TraceOptions(granularity="leaf", refine="h.0"), "refine splits blocks, but granularity 'leaf' has none"),
    ],
)
def test_bad_option_value_raises_naming_field_and_choices(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_misspelt_objective_raises_at_construction_not_in_the_report() -> None:
    """Before, the string was kept and the report failed later with AttributeError."""
    with pytest.raises(ValueError, match="did you mean 'throughput'"):
        PlanOptions(objective="througput")
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4)
    plan = partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), options=PlanOptions(objective="throughput"),
                            measure=False)  # fmt: skip
    assert plan.objective is Objective.THROUGHPUT
    assert "objective: throughput" in str(plan)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("GPipe", PipelineSchedule.GPIPE),
        ("ScheduleGPipe", PipelineSchedule.GPIPE),
        ("gpipe", PipelineSchedule.GPIPE),
        ("1F1B", PipelineSchedule.ONE_F_ONE_B),
        ("Schedule1F1B", PipelineSchedule.ONE_F_ONE_B),
        ("Interleaved1F1B", PipelineSchedule.INTERLEAVED_1F1B),
        ("ScheduleInterleaved1F1B", PipelineSchedule.INTERLEAVED_1F1B),
        ("interleaved_1f1b", PipelineSchedule.INTERLEAVED_1F1B),
    ],
)
def test_training_options_read_torch_schedule_names(name: str, schedule: PipelineSchedule) -> None:
    assert PipelineSchedule(name) is schedule
    assert TrainingOptions(schedules=(name,)).schedules == (schedule,)


def test_torch_schedule_classes_are_read_as_their_names() -> None:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    options = TrainingOptions(schedules=(ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B))
    assert options.schedules == tuple(PipelineSchedule)


def test_one_schedule_named_alone_is_one_schedule() -> None:
    assert TrainingOptions(schedules="1F1B").schedules == (PipelineSchedule.ONE_F_ONE_B,)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ZBVZeroBubble", "torch has that schedule, but partitioner cannot simulate it"),
        ("pipedream", "unknown pipeline schedule 'pipedream'; accepted: 'gpipe' .*Interleaved1F1B"),
    ],
)
def test_unknown_schedule_lists_the_accepted_names(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingOptions(schedules=(name,))


# --------------------------------------------------------------------------- split_modules

CLASSES = ("tests.models.Block", "tests.models.Residual", "torch.nn.modules.linear.Linear")


def test_split_modules_accept_plain_qualified_names_and_classes() -> None:
    assert check_split_modules(["Block", "tests.models.Residual"], CLASSES) == ("Block", "tests.models.Residual")
    assert check_split_modules(nn.Linear, CLASSES) == ("torch.nn.modules.linear.Linear",)
    assert check_split_modules("Block", CLASSES, no_split_module_classes=["Block", "Linear"]) == ("Block", "Linear")


def test_misspelt_split_module_raises_naming_close_matches_and_classes() -> None:
    with pytest.raises(ValueError, match=r"split_modules names 'Blok', but no module of M has that class; "
                       r"did you mean 'Block'\? \(its classes: Block, Residual, Linear\)"):  # fmt: skip
        check_split_modules(["Blok"], CLASSES, "M")


def test_plan_refuses_a_misspelt_split_module_and_leaves_the_model_alone() -> None:
    model, x = SmallResNet(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no module of SmallResNet has that class; did you mean '_BasicBlock'\? "
                       r"\(its classes: SmallResNet, _BasicBlock, "):  # fmt: skip
        partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), split_modules=["BasicBlok"], measure=False)
    with pytest.raises(ValueError, match="'BasicBlok'"):
        partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), no_split_module_classes=["BasicBlok"], measure=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_split_module_classes_is_accelerates_spelling_of_split_modules() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    x = torch.randn(2, 4)
    leaf = partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), granularity="leaf", measure=False)
    ours = partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), granularity="leaf", split_modules=["Sequential"],
                            measure=False)  # fmt: skip
    theirs = partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), granularity="leaf",
                              no_split_module_classes=["Sequential"], measure=False)  # fmt: skip
    assert [layer.name for layer in leaf.layers] == ["0.0", "1.0"]
    assert [layer.name for layer in theirs.layers] == [layer.name for layer in ours.layers] == ["0", "1"]


def test_trace_options_read_strings_and_classes() -> None:
    trace = TraceOptions(frontend="FX", granularity="leaf", split_modules=nn.Linear)
    assert (trace.frontend, trace.granularity) == (Frontend.FX, Granularity.LEAF)
    assert trace.split_modules == ("torch.nn.modules.linear.Linear",)
    assert TraceOptions(split_modules="Block").split_modules == ("Block",)  # one name, not its letters


def test_trace_keywords_and_trace_options_name_the_same_trace() -> None:
    assert trace_options(frontend="export", split_modules=["A"], no_split_module_classes="B") == TraceOptions(
        frontend="export", split_modules=("A", "B")
    )
    given = TraceOptions(granularity="leaf")
    assert trace_options(given) is given
    with pytest.raises(ValueError, match="give either trace=TraceOptions\\(...\\) or granularity=, not both"):
        trace_options(given, granularity="block")


def test_plan_takes_trace_options_as_it_takes_their_keywords() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    x = torch.randn(2, 4)
    by_keywords = partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), granularity="leaf", measure=False)
    by_options = partitioner.plan(
        model, ["cpu:0", "cpu:1"], (x,), trace=partitioner.TraceOptions(granularity="leaf"), measure=False
    )
    assert by_options.to_json() == by_keywords.to_json()
    assert [layer.name for layer in by_options.layers] == ["0.0", "1.0"]
    assert by_options.granularity == "leaf"
    with pytest.raises(ValueError, match="TraceOptions.granularity: unknown Granularity 'layers'"):
        partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), granularity="layers", measure=False)


@pytest.mark.parametrize("front_door", ["plan", "auto_parallelize", "plan_training"])
def test_a_misspelt_planning_keyword_is_a_type_error_naming_the_close_one(front_door: str) -> None:
    # ``**kw`` would otherwise take ``granularty="leaf"`` and plan at block granularity.
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4)
    call = getattr(partitioner, front_door)
    with pytest.raises(TypeError, match="unexpected keyword argument 'granularty'; did you mean 'granularity'"):
        call(model, ["cpu:0", "cpu:1"], (x,), granularty="leaf", measure=False)


def test_auto_is_the_default_granularity_and_refine_reads_one_path() -> None:
    assert TraceOptions().granularity is Granularity.AUTO and trace_options().granularity is Granularity.AUTO
    assert TraceOptions(refine="transformer.h.0").refine == ("transformer.h.0",)  # one path, not its letters


def test_refining_a_module_the_model_lacks_raises_naming_the_close_ones() -> None:
    model, x = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)), torch.randn(2, 4)
    with pytest.raises(ValueError, match="TraceOptions.refine names '00', but Sequential has no such module; did you mean '0.0' or '0'"):
        partitioner.plan(model, ["cpu:0", "cpu:1"], (x,), trace=TraceOptions(refine="00"), measure=False)
