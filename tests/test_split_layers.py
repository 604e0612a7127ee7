"""Column-split linear layers (`partitioner.split_layers`): the rewrite equals the original,
and a head heavier than its share stops capping a pipeline's balance."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import partitioner
from partitioner import to_plain
from partitioner.analysis import trace_layers
from partitioner.api import compile_plan, even_share
from partitioner.models import build_model
from partitioner.options import PlanOptions, SplitLayer, TraceOptions
from partitioner.plan import Plan
from partitioner.split_layers import heavy_splits, pieces_for, split_graph
from tests.helpers import NO_DP, assert_unchanged, placed, snapshot, weighted_loss
from tests.models import ZOO


def _split_plan(name: str, n: int) -> tuple[Any, tuple[Any, ...], dict[str, Any], Plan]:
    """The zoo model `name` planned with its head cut into `n` pieces, piece j on ``cpu:j``
    and every other layer on ``cpu:0`` (the last, the concatenation's, on ``cpu:n-1``)."""
    model, args, kwargs = ZOO[name].build()
    devices = [f"cpu:{k}" for k in range(n)]
    trace = TraceOptions(split=(SplitLayer("lm_head", n),))
    plan = partitioner.plan(model, devices, args, kwargs, options=NO_DP, trace=trace, measure=False)
    where = [int(layer.name.split("@")[1].split("/")[0]) if layer.name.startswith("lm_head@") else 0
             for layer in plan.layers]
    return model, args, kwargs, placed(plan, where)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_split_head_matches_original(name: str, n: int) -> None:
    """Outputs and gradients equal the original's, the tied ones (GPT-2, T5: one weight for
    the embedding and the head) summed in the one parameter; the model is left as it was."""
    model, args, kwargs, plan = _split_plan(name, n)
    assert plan.split == (SplitLayer("lm_head", n),)
    assert [plan.split_devices(s) for s in plan.split] == [tuple(range(n))]
    before = snapshot(model)
    pm = partitioner.auto_parallelize(model, [f"cpu:{k}" for k in range(n)], args, kwargs, plan=plan)
    assert_unchanged(model, before)
    with pm.simulator:
        out = ZOO[name].outputs(pm(*args, **kwargs))
        plain = [to_plain(o.detach()) for o in out]
        weighted_loss(out).backward()
    moved = {(t.src, t.dst) for t in pm.transfers}
    assert {("cpu:0", f"cpu:{k}") for k in range(1, n)} <= moved  # x and the rows went to each piece
    ref = ZOO[name].outputs(model(*args, **kwargs))
    weighted_loss(ref).backward()
    for a, b in zip(plain, ref, strict=True):
        torch.testing.assert_close(a, b.detach())
    grads = {k: to_plain(p.grad) for k, p in pm.module.named_parameters() if p.grad is not None}
    ref_grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    # x's gradient is now a sum over the pieces: float32 rounding in another order.
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-4, msg=lambda m: f"grad of {k}: {m}")


def test_split_graph_shares_tensors_and_names_pieces() -> None:
    """The split graph is a copy that shares the trace's tensors; each piece is a layer of
    its own, its rows sliced in the layer that owns the weight, moved as a weight."""
    model, args, kwargs = ZOO["llama"].build()
    layered, _ = trace_layers(model, args, kwargs)
    split = split_graph(layered.traced, [SplitLayer("lm_head", 3)])
    assert split.gm is not layered.traced.gm
    assert split.gm.get_parameter("lm_head.weight") is layered.traced.gm.get_parameter("lm_head.weight")
    assert sum(1 for n in layered.traced.gm.graph.nodes if n.op == "call_function" and "cat.default" in str(n.target)) \
        < sum(1 for n in split.gm.graph.nodes if n.op == "call_function" and "cat.default" in str(n.target))
    regrouped, _ = trace_layers(model, args, kwargs, trace=TraceOptions(split=(SplitLayer("lm_head", 3),)))
    names = [layer.name for layer in regrouped.graph.layers]
    assert names[-3:] == ["lm_head@0/3", "lm_head@1/3", "lm_head@2/3"]
    rows = [v for v in regrouped.graph.values if v.consumers and regrouped.graph.layers[v.consumers[0]].name
            in names[-2:] and not v.batched]
    assert len(rows) == 2 and all(v.bytes == 43 * 32 * 4 or v.bytes == 42 * 32 * 4 for v in rows)
    with pytest.raises(ValueError, match="no nn.Linear called once"):
        split_graph(layered.traced, [SplitLayer("model.norm", 2)])


def test_pieces_for() -> None:
    assert pieces_for(1.0, 1.0, 8) == 1  # within its share: whole
    assert pieces_for(2.2, 1.0, 8) == 5  # each piece at most half a share
    assert pieces_for(20.0, 1.0, 8) == 8  # at most one per device
    with pytest.raises(ValueError, match="pieces >= 2"):
        SplitLayer("lm_head", 1)


def test_plan_round_trips_split() -> None:
    *_, plan = _split_plan("gpt2", 2)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.split == (SplitLayer("lm_head", 2),)
    assert "split: lm_head in 2 column pieces (outputs concatenated) on cpu:0, cpu:1" in str(plan)


def test_gpt2_head_no_longer_caps_balance() -> None:
    """GPT-2 small on 8 A100s, throughput (the benchmark's batch, 8 x 1024): the vocabulary
    head alone was 1.97x the even share; cut into pieces, the busiest stage is within 1.30x."""
    built = build_model("gpt2", batch_size=8, seq_len=1024)
    options = PlanOptions(objective="throughput", allow_data_parallel=False)
    kw: dict[str, Any] = {"options": options, "split_modules": built.no_split_module_classes}
    whole = compile_plan(built.model, ["a100-80gb x8"], built.example_args, built.example_kwargs,
                         granularity="block", **kw)
    assert whole.solution.objective_s / even_share(whole.problem) > 1.9  # the head binds it
    compiled = compile_plan(built.model, ["a100-80gb x8"], built.example_args, built.example_kwargs, **kw)
    assert compiled.plan.split and compiled.plan.split[0].module == "lm_head"
    assert len(set(compiled.plan.split_devices(compiled.plan.split[0]))) >= 2
    assert compiled.solution.objective_s / even_share(compiled.problem) < 1.30
    # The pieces are placed, their head no layer of its own.
    assert "lm_head" not in [layer.name for layer in compiled.plan.layers]
    assert heavy_splits(compiled.layered.traced, [(("lm_head",), 1.0)], 0.1, 8) == ()  # cut once only


def test_split_fx_linear_matches_original() -> None:
    """A plain model traced with torch.fx (a ``call_module`` head) splits too; its untied
    weight lives with the first piece, which sends the others their rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 64))
    x = torch.randn(4, 8)
    devices = ["cpu:0", "cpu:1", "cpu:2"]
    trace = TraceOptions(split=(SplitLayer("2", 3),))
    plan = partitioner.plan(model, devices, (x,), options=NO_DP, trace=trace, measure=False)
    assert plan.frontend == "fx" and [layer.name for layer in plan.layers][-3:] == ["2@0/3", "2@1/3", "2@2/3"]
    plan = placed(plan, [0, 0, 0, 1, 2])
    pm = partitioner.auto_parallelize(model, devices, (x,), plan=plan)
    weights = torch.arange(64.0)
    with pm.simulator:
        out = pm(x)
        (out.to("cpu") * weights).sum().backward()
    assert ("cpu:0", "cpu:2") in {(t.src, t.dst) for t in pm.transfers}
    (model(x) * weights).sum().backward()
    torch.testing.assert_close(to_plain(out.detach()), model(x))
    for k, p in pm.module.named_parameters():
        torch.testing.assert_close(to_plain(p.grad), model.get_parameter(k).grad, rtol=1e-5, atol=1e-5)


def test_copies_do_not_stop_the_search_for_a_balanced_pipeline() -> None:
    """GPT-2 small, 8 A100s, 8 x 1024, data parallelism allowed: two copies of a 4-device
    split of whole layers win at block granularity; cutting the head gives a single
    pipeline that beats them, and ``auto`` finds it."""
    built = build_model("gpt2", batch_size=8, seq_len=1024)
    options = PlanOptions(objective="throughput")
    kw: dict[str, Any] = {"options": options, "split_modules": built.no_split_module_classes}
    blocks = compile_plan(built.model, ["a100-80gb x8"], built.example_args, built.example_kwargs,
                          granularity="block", **kw)
    assert blocks.plan.strategy.value == "hybrid"
    auto = compile_plan(built.model, ["a100-80gb x8"], built.example_args, built.example_kwargs, **kw)
    assert auto.plan.split and auto.plan.predicted_s < blocks.plan.predicted_s


def test_search_stops_where_the_busiest_device_is_link_bound() -> None:
    """GPT-2 small at one 128-token sequence: once the head is cut, the device holding the
    tied weight is busiest sending the pieces their rows, which finer layers cannot change;
    the search stops there rather than refining blocks round after round."""
    built = build_model("gpt2", batch_size=1, seq_len=128)
    said: list[str] = []
    compiled = compile_plan(built.model, ["a100-80gb x8"], built.example_args, built.example_kwargs,
                            options=PlanOptions(objective="throughput", allow_data_parallel=False),
                            split_modules=built.no_split_module_classes, progress=said.append)
    assert compiled.plan.split
    assert any("busy moving data" in line for line in said)
    assert not any("beside the cuts" in line for line in said), said


def test_pipeline_stages_of_a_split_head_compute_the_model() -> None:
    """`partitioner.distributed`'s stages (one process): the pieces in two stages after the
    blocks' stage, the rows of the tied weight sent along with x; loss and gradients equal."""
    import partitioner.distributed as pd
    from partitioner.distributed.stages import flat_batch
    from tests import dist_worker

    model, args, kwargs = ZOO["gpt2"].build()
    trace = TraceOptions(granularity="block", split=(SplitLayer("lm_head", 2),))
    layered, _ = trace_layers(model, args, kwargs, training=True, trace=trace)
    names = [layer.name for layer in layered.graph.layers]
    assert names[-2:] == ["lm_head@0/2", "lm_head@1/2"]
    graphs = pd.build_stages(layered, [0] * (len(names) - 2) + [1, 2], args, kwargs, 4, torch.device("cpu"))
    inputs, keywords, target = dist_worker.batch("gpt2", 4)
    flat = flat_batch(layered, inputs, keywords)
    values: tuple[Any, ...] = tuple(flat[i] for i in graphs.inputs)
    for stage in graphs.modules:
        values = stage(*values)
    loss = dist_worker.loss_fn("gpt2")(graphs.model_output(values), target)
    original = ZOO["gpt2"].make_model()
    expected = dist_worker.loss_fn("gpt2")(original(*inputs, **keywords), target)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    grads = dict(original.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-4, msg=name)
