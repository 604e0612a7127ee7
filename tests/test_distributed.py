"""Plans lowered to torch.distributed: one training step equals single-process training.

Pure layout checks and the stage split run in this process. Two launches (marked
``distributed``) start gloo processes the way torchrun would (its environment variables,
one thread each) on tests/dist_worker.py: 2 processes for 2-stage pipelines (GPipe, 1F1B,
interleaved 1F1B, a plan without a pipeline section, a checkpoint saved under 2 stages
and resumed under 2 replicas, one refused), 4 for 2 stages x 2 replicas; every case runs
inside the same processes, since a start costs 15-20 s here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import partitioner.distributed as pd
from partitioner.distributed.stages import flat_batch
from partitioner.errors import PlanMismatchError
from partitioner.options import Strategy
from partitioner.plan import Plan
from partitioner.training import plan_training
from tests import dist_worker
from tests.models import ZOO
from tests.dist_launch import write_plan, check_case, launch, reference
from tests.helpers import base_plan, hand_pipeline, placed

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- plans by hand


# --------------------------------------------------------------------------- layout (pure)


def test_layout_of_a_hybrid_plan() -> None:
    plan = hand_pipeline(base_plan("mlp", 4), [(0, 3), (4, 6)], [(0, 1), (2, 3)], "1f1b", 2, 8)
    layout = pd.plan_layout(plan)
    assert (layout.world_size, layout.pipeline_ranks, layout.replicas) == (4, 2, 2)
    assert [layout.position(g) for g in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.pipeline_group(1) == (1, 3) and layout.replica_group(1) == (2, 3)
    assert layout.stages[1].layers == (4, 5, 6)
    assert (layout.replica_batch, layout.microbatch_size) == (4, 2)


def test_layout_keeps_each_process_on_its_planned_device() -> None:
    """Replicas across nodes ("stages in a node"): process g runs plan device g, as torchrun places it."""
    plan = hand_pipeline(base_plan("mlp", 4), [(0, 3), (4, 6)], [(0, 2), (1, 3)], "gpipe", 2, 8)
    layout = pd.plan_layout(plan)
    assert layout.devices == (0, 1, 2, 3)
    assert [layout.position(g) for g in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert layout.pipeline_group(0) == (0, 1) and layout.replica_group(0) == (0, 2)


def test_layout_of_plans_without_a_pipeline() -> None:
    mp = pd.plan_layout(placed(base_plan("mlp", 3), [0, 0, 2, 2, 2, 2, 2]), microbatches=4)
    assert mp.devices == (0, 2) and mp.groups == ((0,), (2,)) and mp.schedule == "1f1b"
    assert [s.layers for s in mp.stages] == [(0, 1), (2, 3, 4, 5, 6)]
    data_parallel = dataclasses.replace(placed(base_plan("mlp", 2), [0] * 7), strategy=Strategy.DATA_PARALLEL)
    dp = pd.plan_layout(data_parallel, global_batch=8)
    assert dp.groups == ((0, 1),) and len(dp.stages) == 1 and dp.microbatches == 1


def test_layout_of_plans_that_copy_the_model_over_some_devices() -> None:
    # partitioner.plan's copies (issue 15): each copy's k-th device serves pipeline rank k.
    hybrid = dataclasses.replace(
        placed(base_plan("mlp", 6), [0, 0, 1, 1, 1, 1, 1]), strategy=Strategy.HYBRID, replicas=((0, 1), (2, 3), (4, 5))
    )
    layout = pd.plan_layout(hybrid, global_batch=6)
    assert layout.groups == ((0, 2, 4), (1, 3, 5)) and layout.replicas == 3 and layout.pipeline_ranks == 2
    some = dataclasses.replace(
        placed(base_plan("mlp", 3), [1] * 7), strategy=Strategy.DATA_PARALLEL, replicas=((1,), (2,))
    )
    dp = pd.plan_layout(some, global_batch=4)
    assert dp.groups == ((1, 2),) and dp.devices == (1, 2)  # device 0 idle: no process for it


def test_layout_errors_carry_the_numbers() -> None:
    base = base_plan("mlp", 3)
    uneven = hand_pipeline(base, [(0, 3), (4, 6)], [(0, 1), (2,)], "1f1b", 2, 8)
    with pytest.raises(PlanMismatchError, match="2/1 replicas"):
        pd.plan_layout(uneven)
    two = hand_pipeline(base_plan("mlp", 2), [(0, 3), (4, 6)], [(0,), (1,)], "1f1b", 2, 8)
    with pytest.raises(ValueError, match="do not split into 1 data-parallel replica"):
        pd.plan_layout(two, global_batch=7)
    with pytest.raises(ValueError, match="at least one microbatch per stage"):
        pd.plan_layout(two, microbatches=1)
    with pytest.raises(ValueError, match="only interleaved_1f1b"):
        pd.plan_layout(hand_pipeline(base_plan("mlp", 2), [(0, 1), (2, 3), (4, 5), (6, 6)], [(0,), (1,)], "gpipe", 4, 8))
    layout = pd.plan_layout(two)
    with pytest.raises(PlanMismatchError, match=r"2 device\(s\).*but 3 process.*--nproc-per-node 2"):
        pd.check_launch(layout, 3, 0, ["cpu:0", "cpu:1"])


def test_layout_under_tensor_parallelism_splits_the_batch_over_data_parallel_replicas_only() -> None:
    """Two stages of 4 replicas each at TP 2: 2 data-parallel replicas x 2 microbatches must divide the
    batch (4 x 2 need not), and a microbatch holds a data-parallel replica's share."""
    from partitioner.tp_layout import TensorParallelError

    plan = hand_pipeline(base_plan("mlp", 8), [(0, 3), (4, 6)], [(0, 1, 2, 3), (4, 5, 6, 7)], "1f1b", 2, 8)
    layout = pd.plan_layout(plan, global_batch=4, tensor_parallel=2)
    assert (layout.data_parallel, layout.replica_batch, layout.microbatch_size) == (2, 2, 1)
    assert "4 replicas (tp 2 x dp 2)" in layout.describe()
    with pytest.raises(ValueError, match=r"do not split into 4 data-parallel replica\(s\) x 2 microbatches"):
        pd.plan_layout(plan, global_batch=4)  # without TP every replica takes its own samples
    with pytest.raises(ValueError, match=r"6 samples do not split into 2 data-parallel replica\(s\) \(4 replicas / "
                                         r"tensor-parallel 2\) x 2 microbatches; use .* multiple of 4"):
        pd.plan_layout(plan, global_batch=6, tensor_parallel=2)
    with pytest.raises(TensorParallelError, match=r"each pipeline rank has 4 replica\(s\).*degree 3 does not divide"):
        pd.plan_layout(plan, tensor_parallel=3)
    planned = dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline, tensor_parallel=2))
    assert pd.plan_layout(planned, global_batch=4).tensor_parallel == 2  # the plan's degree by default


# --------------------------------------------------------------------------- stages (one process)


@pytest.mark.parametrize(
    ("model", "stage_of_layer"),
    [("mlp", [0, 0, 1, 1, 1, 2, 2]), ("gpt2", [0, 0, 1, 1, 2, 2]), ("tied_read", [0, 0, 0, 1, 1, 1, 2, 2])],
)
def test_stages_in_a_row_compute_the_model(model: str, stage_of_layer: list[int]) -> None:
    """Outputs and gradients of the chained stages equal the model's (GPT-2: a tied weight crosses two stages)."""
    from partitioner.distributed.retrace import retrace

    m, args, kwargs = ZOO[model].build()
    layered = retrace(base_plan(model, 3), m, args, kwargs, ())
    inputs, keywords, target = dist_worker.batch(model, 4)
    graphs = pd.build_stages(layered, stage_of_layer, args, kwargs, 4, torch.device("cpu"))
    assert len(graphs.modules) == 3 and all(graphs.boundaries)
    flat = flat_batch(layered, inputs, keywords)
    values: tuple[Any, ...] = tuple(flat[i] for i in graphs.inputs)
    for stage in graphs.modules:  # the stages share the parameters of `m`
        values = stage(*values)
    loss = dist_worker.loss_fn(model)(graphs.model_output(values), target)
    original = ZOO[model].make_model()
    expected = dist_worker.loss_fn(model)(original(*inputs, **keywords), target)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    grads = dict(original.named_parameters())
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    if model == "gpt2":
        # The tied embedding and head weight: a copy in stages 0 and 2, never sent between stages.
        ((first, last),) = graphs.tied
        assert (first[0], last[0]) == (0, 2) and first[1] == last[1]
        target = first[1]
        assert target not in dict(graphs.modules[1].named_parameters())
        sent = {n for boundary in graphs.boundaries for n in boundary}
        weight = next(n for n in layered.traced.gm.graph.nodes if n.op == "get_attr" and n.target == target)
        assert weight.name not in sent
    elif model == "tied_read":
        # The embedding module in stage 0, its weight read directly by the head in stage 2.
        assert graphs.tied == (((0, "embed.weight"), (2, "embed.weight")),)
    else:
        assert graphs.tied == ()


def test_build_rejects_a_launch_of_another_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    model, args, kwargs = ZOO["mlp"].build()
    plan = hand_pipeline(base_plan("mlp", 2), [(0, 3), (4, 6)], [(0,), (1,)], "1f1b", 2, 8)
    with pytest.raises(PlanMismatchError, match=r"runs on 2 device\(s\).*3 process\(es\) were launched"):
        pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("mlp"))


def test_build_rejects_another_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    model, args, kwargs = ZOO["twice"].build()
    plan = hand_pipeline(base_plan("mlp", 2), [(0, 3), (4, 6)], [(0,), (1,)], "1f1b", 2, 8)
    with pytest.raises(PlanMismatchError, match="made for Sequential"):
        pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("mlp"))


def test_one_process_plan_steps_and_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-device plan runs without a launcher; checkpoints load both ways, exactly."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    model, args, kwargs = ZOO["mlp"].build()
    plan = placed(base_plan("mlp", 2), [1] * 7)
    part = pd.build(plan, model, args, kwargs, loss_fn=dist_worker.loss_fn("mlp"), schedule="gpipe",
                    microbatches=2, global_batch=8)
    try:
        assert (part.world_size, part.stage_indices, part.is_first, part.is_last) == (1, (0,), True, True)
        pd.save_checkpoint(part, tmp_path / "before")
        restored = ZOO["mlp"].make_model()
        with torch.no_grad():
            for p in restored.parameters():
                p.add_(1.0)
        pd.load_into_original(restored, tmp_path / "before")
        for k, v in model.state_dict().items():
            assert torch.equal(restored.state_dict()[k], v), k
        shifted = dist_worker.perturbed(model.state_dict())
        pd.load_from_original(part, shifted)
        assert all(torch.equal(v, shifted[k]) for k, v in part.state_dict().items())
        pd.load_from_original(part, model.state_dict())
        with pytest.raises(PlanMismatchError, match="has no 'fc1.weight'"):
            pd.load_from_original(part, {})
        inputs, _, target = dist_worker.batch("mlp", 8)
        optimizer = torch.optim.SGD(part.parameters(), lr=dist_worker.LR)
        loss = part.step(inputs[0], target)
        optimizer.step()
        (expected,), state = reference("mlp", 8)
        torch.testing.assert_close(loss, expected)
        for k, v in part.state_dict().items():
            torch.testing.assert_close(v, state[k], msg=k)
        with pytest.raises(PlanMismatchError, match="input 'input' holds 6 samples, but the plan's step takes 8"):
            part.step(inputs[0][:6], target[:6])
    finally:
        part.close()


# --------------------------------------------------------------------------- checkpoints (one process)


@pytest.fixture(scope="module")
def one_process_part() -> Iterator[pd.PipelineRank]:
    """The seed MLP on one device, built without a launcher."""
    with pytest.MonkeyPatch.context() as env:
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            env.delenv(var, raising=False)
        model, args, kwargs = ZOO["mlp"].build()
        part = pd.build(placed(base_plan("mlp", 2), [1] * 7), model, args, kwargs, loss_fn=dist_worker.loss_fn("mlp"),
                        schedule="gpipe", microbatches=2, global_batch=8)
        try:
            yield part
        finally:
            part.close()


def _saved(part: pd.PipelineRank, directory: Path, step: int, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint of `part` holding `state` at `step`; the part is then back at the zoo's weights."""
    pd.load_from_original(part, state)
    pd.save_checkpoint(part, directory, step=step)
    pd.load_from_original(part, ZOO["mlp"].make_model().state_dict())
    return directory


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was overwritten by a refused load"


def _only(directory: Path, suffix: str) -> Path:
    """The one file of `directory` whose name ends in `suffix` (a save's data file or record)."""
    (found,) = [p for p in directory.iterdir() if p.name.endswith(suffix)]
    return found


def test_checkpoint_file_of_another_save_is_never_mixed_in(one_process_part: pd.PipelineRank, tmp_path: Path) -> None:
    """Files copied in from another save of the same plan (another step) are ignored or refused, never mixed."""
    state = ZOO["mlp"].make_model().state_dict()
    early = _saved(one_process_part, tmp_path / "step10", 10, state)
    late = _saved(one_process_part, tmp_path / "step20", 20, dist_worker.perturbed(state))
    shutil.copy(_only(late, ".distcp"), early)  # another save's data file: named after its save, never read
    loaded = pd.load_checkpoint(early)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    shutil.copy(late / ".metadata", early / ".metadata")  # another save's metadata: its record is not here
    restored = ZOO["mlp"].make_model()
    before = _state(restored)
    with pytest.raises(PlanMismatchError, match=r"partitioner-\w+.json, the record of .*missing.*another save.*mix"):
        pd.load_into_original(restored, early)
    _unchanged(restored, before)
    assert json.loads(_only(late, ".json").read_text())["step"] == 20
    assert set(pd.load_checkpoint(late)) == set(state)  # each save alone loads


def test_checkpoint_saved_again_replaces_the_earlier_save(one_process_part: pd.PipelineRank, tmp_path: Path) -> None:
    """A second save into a directory leaves only its own files (those of a format-2 save too) and its values."""
    state = ZOO["mlp"].make_model().state_dict()
    directory = _saved(one_process_part, tmp_path / "ckpt", 10, state)
    (directory / "index.json").write_text("{}")
    (directory / "part-0-of-2.pt").write_bytes(b"")
    first = {p.name for p in directory.iterdir()}
    shifted = dist_worker.perturbed(state)
    _saved(one_process_part, directory, 20, shifted)
    names = {p.name for p in directory.iterdir()}
    assert len(names) == 3 and not names & (first - {".metadata"}), names
    loaded = pd.load_checkpoint(directory)
    assert all(torch.equal(loaded[k], v) for k, v in shifted.items())


def test_checkpoint_save_that_fails_leaves_the_earlier_save_whole(
    one_process_part: pd.PipelineRank, tmp_path: Path
) -> None:
    """A save that fails before its metadata is in place (here: DCP cannot write it) loses nothing."""
    state = ZOO["mlp"].make_model().state_dict()
    directory = _saved(one_process_part, tmp_path / "ckpt", 10, state)
    (directory / ".metadata.tmp").mkdir()  # where DCP writes the metadata before renaming it
    with pytest.raises(OSError, match=r"saving the checkpoint in .* failed on process\(es\) \[0\] \(IsADirectoryError"):
        _saved(one_process_part, directory, 20, dist_worker.perturbed(state))
    pd.load_from_original(one_process_part, state)
    loaded = pd.load_checkpoint(directory)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_checkpoint_loads_into_the_stages_of_a_part(one_process_part: pd.PipelineRank, tmp_path: Path) -> None:
    state = dist_worker.perturbed(ZOO["mlp"].make_model().state_dict())
    saved = _saved(one_process_part, tmp_path / "ckpt", 1, state)
    assert pd.load_into_part(one_process_part, saved) is one_process_part
    assert all(torch.equal(v, state[k]) for k, v in one_process_part.state_dict().items())
    pd.load_from_original(one_process_part, ZOO["mlp"].make_model().state_dict())


def test_checkpoint_of_another_model_is_refused_naming_both(one_process_part: pd.PipelineRank, tmp_path: Path) -> None:
    saved = _saved(one_process_part, tmp_path / "ckpt", 7, ZOO["mlp"].make_model().state_dict())
    gpt2 = ZOO["gpt2"].make_model()
    before = _state(gpt2)
    fingerprint = one_process_part.plan.fingerprint
    with pytest.raises(PlanMismatchError, match=rf"holds Sequential \(fingerprint {fingerprint}, saved under 1 stage.*"
                                                r"step 7\), not this GPT2LMHeadModel: 29 name\(s\) missing"):
        pd.load_into_original(gpt2, saved)
    _unchanged(gpt2, before)


def test_checkpoint_of_another_shape_leaves_every_tensor_unchanged(
    one_process_part: pd.PipelineRank, tmp_path: Path
) -> None:
    """A mismatch found at the last tensor used to raise after the others were copied (model half-loaded)."""
    saved = _saved(one_process_part, tmp_path / "ckpt", 1, dist_worker.perturbed(ZOO["mlp"].make_model().state_dict()))
    other = ZOO["mlp"].make_model()
    other.fc4 = torch.nn.Linear(128, 12)  # same names, fc4 of another shape
    before = _state(other)
    with pytest.raises(PlanMismatchError, match=r"'fc4.weight' has shape \(10, 128\) in the checkpoint but \(12, 128"):
        pd.load_into_original(other, saved)
    _unchanged(other, before)
    half = ZOO["mlp"].make_model().half()
    before = _state(half)
    with pytest.raises(PlanMismatchError, match=r"torch.float32 in the checkpoint but torch.float16.*model.to"):
        pd.load_into_original(half, saved)
    _unchanged(half, before)
    # Into the stages: the same, whichever tensor is wrong.
    part_before = {k: v.clone() for k, v in one_process_part.state_dict().items()}
    wrong = dist_worker.perturbed(ZOO["mlp"].make_model().state_dict())
    wrong["fc4.bias"] = torch.zeros(12)
    with pytest.raises(PlanMismatchError, match=r"'fc4.bias' has shape \(12,\) in the state dict but \(10,\)"):
        pd.load_from_original(one_process_part, wrong)
    for k, v in one_process_part.state_dict().items():
        assert torch.equal(v, part_before[k]), f"stage tensor {k} was overwritten by a refused load"


def _rewrite_metadata(directory: Path, change: Any) -> None:
    """Unpickle DCP's metadata, apply `change` to it, and write it back (a crafted checkpoint)."""
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    change(metadata)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))


def test_checkpoint_file_outside_its_directory_is_refused(one_process_part: pd.PipelineRank, tmp_path: Path) -> None:
    saved = _saved(one_process_part, tmp_path / "ckpt", 1, ZOO["mlp"].make_model().state_dict())
    data = _only(saved, ".distcp").name
    shutil.copytree(saved, tmp_path / "other")

    def outside(metadata: Any) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = f"../other/{data}"

    _rewrite_metadata(saved, outside)
    with pytest.raises(PlanMismatchError, match=rf".metadata names a data file '../other/{data}'; .* in its directory"):
        pd.load_checkpoint(saved)
    # A link inside the directory that leads out of it.
    linked = _saved(one_process_part, tmp_path / "linked", 1, ZOO["mlp"].make_model().state_dict())
    data = _only(linked, ".distcp")
    data.unlink()
    data.symlink_to(tmp_path / "other" / _only(tmp_path / "other", ".distcp").name)
    with pytest.raises(PlanMismatchError, match=rf"{data.name} \(a data file .metadata names\) leads to .*outside"):
        pd.load_checkpoint(linked)


def test_checkpoint_truncated_damaged_or_missing_file_raises_a_typed_error(
    one_process_part: pd.PipelineRank, tmp_path: Path
) -> None:
    saved = _saved(one_process_part, tmp_path / "ckpt", 1, ZOO["mlp"].make_model().state_dict())
    part = _only(saved, ".distcp")
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanMismatchError, match=rf"{part.name} is truncated \([\d,]+ bytes, the metadata reads up to"):
        pd.load_checkpoint(saved)
    part.write_bytes(bytes(len(data)))  # as long as it should be, but zeros
    restored = ZOO["mlp"].make_model()
    before = _state(restored)
    with pytest.raises(PlanMismatchError, match=r"a data file is damaged"):
        pd.load_into_original(restored, saved)
    _unchanged(restored, before)
    part.unlink()
    with pytest.raises(PlanMismatchError, match=rf"{part.name} \(a data file .metadata names\) is missing"):
        pd.load_checkpoint(saved)
    part.mkdir()
    with pytest.raises(PlanMismatchError, match=rf"{part.name} \(a data file .metadata names\) is not a regular file"):
        pd.load_checkpoint(saved)
    (saved / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(PlanMismatchError, match=r".metadata is damaged"):
        pd.load_checkpoint(saved)
    (saved / ".metadata").unlink()
    with pytest.raises(PlanMismatchError, match=r".metadata \(written by torch.distributed.checkpoint.*\) is missing"):
        pd.load_checkpoint(saved)


class _RunsCode:
    """What a crafted ``.metadata`` could hold: unpickling it would call ``os.remove``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.remove, (str(self.path),))


def test_checkpoint_metadata_naming_other_code_is_refused_unrun(
    one_process_part: pd.PipelineRank, tmp_path: Path
) -> None:
    """DCP unpickles .metadata with plain pickle; a crafted one would run code on load."""
    saved = _saved(one_process_part, tmp_path / "ckpt", 1, ZOO["mlp"].make_model().state_dict())
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    _rewrite_metadata(saved, lambda metadata: setattr(metadata, "planner_data", _RunsCode(victim)))
    with pytest.raises(PlanMismatchError, match=r"\.metadata is damaged .*(posix|nt)\.remove is not part of"):
        pd.load_checkpoint(saved)
    assert victim.read_text() == "still here"


def test_checkpoint_of_format_2_is_refused_with_how_to_convert(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"format": 2, "files": {}}))
    (tmp_path / "part-0-of-1.pt").write_bytes(b"")
    model = ZOO["mlp"].make_model()
    before = _state(model)
    with pytest.raises(PlanMismatchError, match=r"checkpoint of format 2 .*reads format 3.*Save again.*convert it"):
        pd.load_into_original(model, tmp_path)
    _unchanged(model, before)


def test_one_process_pipeline_recomputes_where_the_plan_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage planned with recomputation runs its forward again in backward, with the same numbers.

    The plan is made from a one-sample example, as `plan_training` suggests: torch.export
    then fixes the batch in the graph, and `build` traces again at the microbatch's size.
    """
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    model, args, kwargs = ZOO["gpt2"].build()
    one = (args[0][:1],)
    planned = plan_training(model, ["cpu:0", "cpu:1"], one, kwargs, global_batch=4, measure=False)
    plan = hand_pipeline(planned, [(0, 5)], [(1,)], "gpipe", 2, 4, recompute=True)
    part = pd.build(plan, model, one, kwargs, loss_fn=dist_worker.loss_fn("gpt2"))
    try:
        calls = []
        part.modules[0].register_forward_pre_hook(lambda *_: calls.append(1))
        inputs, keywords, target = dist_worker.batch("gpt2", 4)
        optimizer = torch.optim.SGD(part.parameters(), lr=dist_worker.LR)
        loss = part.step(inputs[0], target, **keywords)
        optimizer.step()
        assert len(calls) == 2 * 2  # two microbatches, each run forward twice
        (expected,), state = reference("gpt2", 4)
        torch.testing.assert_close(loss, expected)
        for k, v in part.state_dict().items():
            torch.testing.assert_close(v, state[k], msg=k)
        with pytest.raises(PlanMismatchError, match="'use_cache' is True but the stages were built for False"):
            part.step(inputs[0], target, use_cache=True)
    finally:
        part.close()


# --------------------------------------------------------------------------- launches


@pytest.mark.distributed
def test_two_process_pipelines_train_as_one_process(one_process_part: pd.PipelineRank, tmp_path: Path) -> None:
    """Pipelines of 2 stages; GPT-2's checkpoint, saved under 2 stages, resumed under 2 replicas; and a
    checkpoint that only the second stage's process finds wrong, loaded by neither process."""
    mlp, gpt2 = base_plan("mlp", 2), base_plan("gpt2", 2)
    plans = {
        "mlp": hand_pipeline(mlp, [(0, 3), (4, 6)], [(0,), (1,)], "1f1b", 4, 8),
        "gpt2": hand_pipeline(gpt2, [(0, 2), (3, 5)], [(0,), (1,)], "1f1b", 4, 8),
        "tied_read": hand_pipeline(base_plan("tied_read", 2), [(0, 3), (4, 7)], [(0,), (1,)], "1f1b", 4, 8),
        "mlp-interleaved": hand_pipeline(mlp, [(0, 1), (2, 3), (4, 5), (6, 6)], [(0,), (1,)], "interleaved_1f1b", 4, 8),
        "mlp-placed": placed(mlp, [0, 0, 0, 1, 1, 1, 1]),
        "gpt2-dp": dataclasses.replace(placed(gpt2, [0] * 6), strategy=Strategy.DATA_PARALLEL),
    }
    files = {name: write_plan(tmp_path, name, plan) for name, plan in plans.items()}
    checkpoint, replicated = tmp_path / "gpt2-checkpoint", tmp_path / "gpt2-dp-checkpoint"
    cases: list[dict[str, Any]] = [
        {"name": f"{model}-{schedule}", "model": model, "plan": files[model], "schedule": schedule, "global_batch": 8}
        for model in ("mlp", "gpt2")
        for schedule in ("gpipe", "1f1b")
    ]
    cases[2]["checkpoint"] = str(checkpoint)
    # Saved from shifted weights under a one-device plan, its fc4.weight (the second stage's) then of another shape.
    shifted = dist_worker.perturbed(ZOO["mlp"].make_model().state_dict())
    wrong = _saved(one_process_part, tmp_path / "mlp-wrong", 1, shifted)
    _rewrite_metadata(wrong, lambda m: setattr(m.state_dict_metadata["fc4.weight"], "size", torch.Size([12, 128])))
    cases[1]["refused"] = str(wrong)
    cases.append({"name": "mlp-interleaved", "model": "mlp", "plan": files["mlp-interleaved"], "global_batch": 8})
    cases.append({"name": "tied_read-1f1b", "model": "tied_read", "plan": files["tied_read"], "global_batch": 8})
    cases.append({"name": "mlp-placed", "model": "mlp", "plan": files["mlp-placed"], "microbatches": 2,
                  "global_batch": 8, "load_perturbed": True})
    # Another plan of the same model (1 stage x 2 replicas) resumes from the 2-stage checkpoint, then saves.
    cases.append({"name": "gpt2-dp-resumed", "model": "gpt2", "plan": files["gpt2-dp"], "global_batch": 8,
                  "resume": str(checkpoint), "checkpoint": str(replicated)})
    launch(2, cases, tmp_path)
    for case in cases:
        start = dist_worker.perturbed(ZOO["mlp"].make_model().state_dict()) if case.get("load_perturbed") else None
        check_case(case, 2, tmp_path, start)
    # The checkpoints (saved before the steps; GPT-2's tied weight under both names; the replicated one
    # written once per name) restore the original exactly.
    original = ZOO["gpt2"].make_model()
    for saved in (checkpoint, replicated):
        restored = ZOO["gpt2"].make_model()
        with torch.no_grad():
            for p in restored.parameters():
                p.mul_(-1.0)
        pd.load_into_original(restored, saved)
        for k, v in original.state_dict().items():
            assert torch.equal(restored.state_dict()[k], v), f"{saved.name}: {k}"
    # GPT-2's tied weight (a copy in each stage) is written once, under one name; the record names the other.
    entries = pickle.loads((checkpoint / ".metadata").read_bytes()).state_dict_metadata
    (record,) = [json.loads(p.read_text()) for p in checkpoint.glob("partitioner-*.json")]
    assert record["aliases"] == {"transformer.wte.weight": "lm_head.weight"}
    assert "transformer.wte.weight" not in entries and "lm_head.weight" in entries
    state = pd.load_checkpoint(checkpoint)
    assert set(state) == set(original.state_dict()) and state["transformer.wte.weight"] is state["lm_head.weight"]
    refused = [torch.load(tmp_path / f"mlp-1f1b-rank{r}.pt", weights_only=False)["refused"] for r in range(2)]
    assert re.search(r"'fc4.weight' has shape \(12, 128\) in the checkpoint but \(10, 128\) in this part", refused[1])
    assert refused[0].startswith("process 1 could not load the checkpoint, so no process loaded it: 'fc4.weight'")
    stages = [torch.load(tmp_path / f"mlp-interleaved-rank{r}.pt", weights_only=False)["stages"] for r in range(2)]
    assert stages == [(0, 2), (1, 3)]


@pytest.mark.distributed
def test_four_process_hybrid_trains_as_one_process(tmp_path: Path) -> None:
    """2 stages x 2 replicas: pipelines over gloo, DDP over each stage's replicas."""
    plans = {
        "mlp": hand_pipeline(base_plan("mlp", 4), [(0, 3), (4, 6)], [(0, 1), (2, 3)], "1f1b", 2, 8),
        # replicas across "nodes": pipeline rank 0 on processes 0 and 2
        "gpt2": hand_pipeline(base_plan("gpt2", 4), [(0, 2), (3, 5)], [(0, 2), (1, 3)], "1f1b", 2, 8),
    }
    files = {name: write_plan(tmp_path, name, plan) for name, plan in plans.items()}
    cases = [
        {"name": f"{model}-{schedule}", "model": model, "plan": files[model], "schedule": schedule, "global_batch": 8}
        for model in ("mlp", "gpt2")
        for schedule in ("gpipe", "1f1b")
    ]
    launch(4, cases, tmp_path)
    for case in cases:
        check_case(case, 4, tmp_path)
    placement = [torch.load(tmp_path / f"gpt2-1f1b-rank{r}.pt", weights_only=False)["stages"] for r in range(4)]
    assert placement == [(0,), (1,), (0,), (1,)]
