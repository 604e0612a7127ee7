"""Training plans of traced models: the front door, the plan's JSON, the report, the picture and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import partitioner
from partitioner.cli import main
from partitioner.cluster import load_cluster
from partitioner.errors import PlanFormatError
from partitioner.models import build_model
from partitioner.options import Strategy, TrainingOptions
from partitioner.plan import Plan
from partitioner.report import device_list, render_plan_timeline, write_plan_trace
from partitioner.simulate import PipelineSchedule
from partitioner.training import TrainingCompiled, compile_training, plan_training
from tests.models import ZOO


@pytest.fixture(scope="module")
def gpt2_mixed() -> TrainingCompiled:
    """GPT-2 small (meta, 64 tokens) on the mixed A100/V100 node, a step of 32 samples."""
    built = build_model("gpt2", seq_len=64)
    return compile_training(
        built.model,
        load_cluster("mixed-8"),
        built.example_args,
        built.example_kwargs,
        global_batch=32,
        options=TrainingOptions(max_microbatches=16),
        split_modules=built.no_split_module_classes,
    )


def test_a_traced_model_gets_a_pipeline_plan(gpt2_mixed: TrainingCompiled) -> None:
    plan, p = gpt2_mixed.plan, gpt2_mixed.plan.pipeline
    assert p is not None and plan.training and plan.batch_size == p.global_batch == 32
    assert p.precision == "fp16"  # the V100s have no bfloat16 path
    assert [s.first_layer for s in p.stages][0] == 0 and p.stages[-1].last_layer == len(plan.layers) - 1
    assert len(plan.devices) == 8 and plan.predicted_s == p.step_time_s
    assert plan.strategy is (Strategy.MODEL_PARALLEL if len(p.stages) > 1 else Strategy.DATA_PARALLEL)
    # Every family is weighed; the chosen one is the fastest (with the tied embedding's
    # gradient sum priced, data parallelism beats the split on these links).
    labels = {c.label for c in p.runner_ups}
    assert labels >= {"chosen", "pipeline"} and labels & {"data parallel", "hybrid"}
    assert all(c.step_time_s >= p.step_time_s for c in p.runner_ups)
    for s in p.stages:
        assert s.peak_memory_bytes <= s.capacity_bytes
        assert all(plan.layers[i].device == s.devices[0] for i in range(s.first_layer, s.last_layer + 1))
    used = {d for s in p.stages for d in s.devices}
    assert all((plan.devices[d].memory_bytes > 0) == (d in used) for d in range(8))
    # GPT-2 ties its head to the token embedding: the weight is a tied parameter, not an activation.
    assert [(plan.layers[t.owner].name, [plan.layers[u].name for u in t.users]) for t in gpt2_mixed.costs.tied] == [
        ("transformer.wte", ["lm_head"])
    ]


def test_the_plan_round_trips_and_its_step_is_the_simulators(gpt2_mixed: TrainingCompiled) -> None:
    plan = gpt2_mixed.plan
    loaded = Plan.from_json(plan.to_json())
    assert loaded == plan and loaded.to_json() == plan.to_json()
    assert loaded.simulate_pipeline().step_time_s == plan.pipeline.step_time_s == gpt2_mixed.timeline.step_time_s


def test_a_plan_without_pipeline_keeps_its_json(gpt2_mixed: TrainingCompiled) -> None:
    from dataclasses import replace

    bare = replace(gpt2_mixed.plan, pipeline=None)
    assert "pipeline" not in bare.to_dict()
    assert Plan.from_json(bare.to_json()) == bare
    with pytest.raises(ValueError, match="has no pipeline"):
        bare.simulate_pipeline()


def test_a_broken_pipeline_section_is_refused(gpt2_mixed: TrainingCompiled) -> None:
    import json

    data = gpt2_mixed.plan.to_dict()
    data["pipeline"]["stages"][0]["first_layer"] = 1
    with pytest.raises(PlanFormatError, match="stages must cover the layers in order"):
        Plan.from_json(json.dumps(data))
    data = gpt2_mixed.plan.to_dict()
    data["pipeline"]["schedule"] = "zero_bubble"
    with pytest.raises(PlanFormatError, match="pipeline.schedule must be one of"):
        Plan.from_json(json.dumps(data))


def test_the_report_explains_the_plan(gpt2_mixed: TrainingCompiled) -> None:
    text = str(gpt2_mixed.plan)
    p = gpt2_mixed.plan.pipeline
    assert text.startswith("partitioner training plan for GPT2LMHeadModel (")
    assert f"strategy: {p.family}: {p.description}" in text
    for needle in ("  why: the fastest simulated step; ", "MFU: ", "bound: total compute / total device speed",
                   "no plan in the space steps faster than", "weights", "optimizer", "activations",
                   "memory / capacity", "strategies compared", "space: "):
        assert needle in text, needle
    assert text.count("\n0 ") == 1  # one row per stage, numbered


def test_device_lists_read_by_node() -> None:
    assert device_list([f"dgx0/{i}" for i in range(8)]) == "dgx0/0-7"
    assert device_list(["mixed/4", "mixed/6"]) == "mixed/4,6"
    assert device_list([f"dgx{n}/3" for n in range(8)]) == "dgx0/3, dgx1/3, dgx2/3 +5 more"
    assert device_list(["a100-80gb:0", "cuda:1"]) == "a100-80gb:0, cuda:1"


def test_the_timeline_picture(gpt2_mixed: TrainingCompiled, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = render_plan_timeline(gpt2_mixed.plan, tmp_path / "step.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    short = render_plan_timeline(gpt2_mixed.plan, tmp_path / "short.svg", max_actions=8)
    assert "microbatches" in short.read_text()


def test_the_trace_of_a_plan(gpt2_mixed: TrainingCompiled, tmp_path: Path) -> None:
    from dataclasses import replace

    plan, p = gpt2_mixed.plan, gpt2_mixed.plan.pipeline
    assert p is not None
    trace = json.loads(write_plan_trace(plan, tmp_path / "step.json").read_text())
    assert trace["otherData"]["step_time_s"] == pytest.approx(p.step_time_s)
    assert trace["otherData"]["microbatches"] == p.microbatches and "bubble" in trace["otherData"]["title"]
    processes = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert len(processes) == p.num_ranks and all(plan.devices[d].name in " ".join(processes)
                                                 for s in p.stages for d in s.devices)
    long = replace(plan, pipeline=replace(p, microbatches=64))  # 128 forwards and backwards a stage
    short = json.loads(gzip.decompress(write_plan_trace(long, tmp_path / "short.json.gz", max_actions=8).read_bytes()))
    assert short["otherData"]["microbatches"] == 8 // (2 * len(p.stages))
    assert f"played with {short['otherData']['microbatches']} of its 64 microbatches" in short["otherData"]["title"]


def test_a_plan_without_a_pipeline_has_no_trace(tmp_path: Path) -> None:
    model, args, _ = ZOO["mlp"].build()
    plan = partitioner.plan(model, ["a100-80gb x2"], args, measure=False)
    with pytest.raises(ValueError, match="write_plan_trace needs a plan with a pipeline"):
        write_plan_trace(plan, tmp_path / "step.json")
    assert list(tmp_path.iterdir()) == []


def test_device_strings_and_options() -> None:
    model, args, _ = ZOO["mlp"].build()
    options = TrainingOptions(global_batch=8, schedules=(PipelineSchedule.ONE_F_ONE_B,), max_microbatches=4)
    plan = plan_training(model, ["a100-80gb x2"], args, options=options, measure=False)
    assert plan.pipeline is not None and plan.pipeline.global_batch == 8
    assert plan.pipeline.schedule == "1f1b" and plan.pipeline.microbatches <= 4
    assert plan.pipeline.precision == "bf16"
    override = plan_training(model, ["a100-80gb x2"], args, global_batch=4, options=options, measure=False)
    assert override.pipeline.global_batch == 4


# --------------------------------------------------------------------------- the command line


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_plans_a_training_step_and_draws_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "step.png"
    status, out, err = _run(
        capsys, "plan", "gpt2", "--cluster", "mixed-8", "--train", "--global-batch", "16", "--seq-len", "64",
        "--timeline", str(picture),
    )
    assert status == 0, err
    assert out.startswith("partitioner training plan for GPT2LMHeadModel")
    assert "\nstrategy: " in out and "strategies compared" in out
    assert "planned in" in err and picture.read_bytes()[:4] == b"\x89PNG"


def test_cli_json_of_a_training_plan_on_devices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    status, out, err = _run(
        capsys, "plan", "mlp", "--devices", "a100-80gb x2", "--train", "--global-batch", "8",
        "--schedules", "gpipe", "--max-microbatches", "2", "--recompute", "never", "--precision", "fp32",
        "--json", "--out", str(out_file),
    )
    assert status == 0, err
    plan = Plan.from_json(out)
    assert out_file.read_text() == out
    assert plan.pipeline is not None and plan.pipeline.schedule == "gpipe" and plan.pipeline.microbatches <= 2
    assert plan.pipeline.precision == "fp32" and not any(s.recompute for s in plan.pipeline.stages)


def test_cli_plans_what_the_runtime_launches_with_equal_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from partitioner.distributed.layout import plan_layout
    from partitioner.report import render_training

    status, out, err = _run(
        capsys, "plan", "gpt2", "--cluster", "mixed-8", "--train", "--global-batch", "16", "--seq-len", "64",
        "--equal-replicas", "--json",
    )
    assert status == 0, err
    plan = Plan.from_json(out)
    assert plan.pipeline is not None
    assert len({len(s.devices) for s in plan.pipeline.stages}) == 1
    plan_layout(plan)  # partitioner.distributed takes it
    assert "runs on:" not in render_training(plan)
    # A plan whose ranks hold unequal groups says it runs in the simulator only, and how to get one that runs.
    p, first = plan.pipeline, plan.pipeline.stages[0]
    uneven = replace(p, virtual_stages=1, stages=(
        replace(first, index=0, rank=0, devices=(0,)), replace(first, index=1, rank=1, devices=(1, 2)),
    ))
    text = render_training(replace(plan, pipeline=uneven))
    assert "runs on: the simulator only: its ranks hold 1/2 replicas" in text and "--equal-replicas" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "mlp", "--cluster", "mixed-8"], "plan a training step: add --train"),
        (["plan", "mlp", "--devices", "a100-80gb", "--timeline", "x.png"], "--timeline draws a training plan"),
        (["plan", "mlp", "--devices", "a100-80gb", "--trace", "x.json"],
         "--trace writes a training plan's step: add --train and --cluster or --global-batch"),
        (["plan", "mlp", "--cluster", "nowhere-8", "--train"], "no cluster profile named 'nowhere-8'"),
    ],
)
def test_cli_refuses_training_flags_that_do_not_fit(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = _run(capsys, *argv)
    assert status == 2 and out == "" and message in err


def test_cli_lists_the_clusters(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "clusters")
    assert status == 0 and {"dgx-a100-8", "mixed-8", "a100-4x8-ib", "h100-8x8-ib"} <= set(out.split())


def test_replanning_on_the_same_cluster_gives_the_same_plan_and_other_links_reprice_it(
    gpt2_mixed: TrainingCompiled,
) -> None:
    from dataclasses import replace

    from partitioner.training import replan_training

    options = TrainingOptions(max_microbatches=16)
    again = replan_training(gpt2_mixed, gpt2_mixed.cluster, options)
    assert again.plan.to_json() == gpt2_mixed.plan.to_json()
    cluster = gpt2_mixed.cluster
    slower = replace(cluster, seconds_per_byte=tuple(tuple(100 * x for x in row) for row in cluster.seconds_per_byte))
    assert replan_training(gpt2_mixed, slower, options).plan.pipeline.step_time_s > gpt2_mixed.plan.pipeline.step_time_s


def test_replanning_refuses_a_device_kind_without_layer_times(gpt2_mixed: TrainingCompiled) -> None:
    from partitioner.errors import DeviceError
    from partitioner.training import replan_training

    with pytest.raises(DeviceError, match="no layer times for h100-80gb"):
        replan_training(gpt2_mixed, load_cluster("h100-8x8-ib"), TrainingOptions(max_microbatches=16))


def test_a_tensor_parallel_degree_that_does_not_divide_the_heads_names_the_numbers() -> None:
    from partitioner.tp_layout import Column, Pair, TensorParallelError, TensorParallelLayout

    attention = Pair(
        columns=(Column(module="q", out_features=768), Column(module="k", out_features=256), Column(module="v", out_features=256)),
        row="o",
        kind="attention",
        heads=12,
        kv_heads=4,
        width=768,
    )
    layout = TensorParallelLayout(pairs=(attention,))
    layout.check_degree(4)
    with pytest.raises(TensorParallelError, match=r"degree 8 does not divide attention 'o' \(12 heads, 4 key/value heads.*\[1, 2, 4\]"):
        layout.check_degree(8)


def test_training_options_read_shardings_and_tensor_parallel_degrees() -> None:
    from partitioner.options import Sharding, TrainingOptions

    options = TrainingOptions(shardings=("zero3", "NONE"), tensor_parallel=(4, 1, 4))
    assert options.shardings == (Sharding.ZERO3, Sharding.NONE) and options.tensor_parallel == (1, 4)
    with pytest.raises(ValueError, match="shardings.*did you mean 'zero3'"):
        TrainingOptions(shardings=("zero4",))
    with pytest.raises(ValueError, match="tensor_parallel must be"):
        TrainingOptions(tensor_parallel=(0,))


def test_vocab_rows_is_the_busiest_slice_torch_chunk_cuts() -> None:
    """The planner prices the busiest rank's ``ceil(V / t)`` rows; DTensor's ``Shard(0)`` cuts as
    ``torch.chunk`` does (GPT-3's 50,257 rows at 8: 6,283 on every rank but the last)."""
    import torch

    from partitioner.tp_layout import vocab_rows

    for vocab, degree in ((50257, 8), (101, 2), (101, 4), (128, 8), (3, 8)):
        slices = torch.arange(vocab).chunk(degree)
        assert vocab_rows(vocab, degree) == max(len(c) for c in slices)
    assert vocab_rows(50257, 8) == 6283
