"""A plan's stages for torch's `pipeline()` and DeepSpeed's `PipelineModule`.

`split_spec` is checked against the real `torch.distributed.pipelining.pipeline()` on CPU
(building a `Pipe` needs no process group): as many stages as the plan, each holding the
plan's tensors. DeepSpeed is not installed here: its `parts` list is checked for content.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from torch import nn
from torch.distributed.pipelining import SplitPoint, pipeline

import partitioner
import partitioner.distributed as pd
from partitioner.plan import Plan
from tests.models import ZOO
from tests.helpers import base_plan, hand_pipeline, placed


def _staged(model: str, ranges: list[tuple[int, int]]) -> Plan:
    """A training plan of the zoo model with these stages (layer ranges), one device each."""
    return hand_pipeline(base_plan(model, 3), ranges, [(i,) for i in range(len(ranges))], "gpipe", 4, 8)


def _canonical(model: nn.Module) -> dict[str, str]:
    """Every tensor name of `model` -> the first name of its tensor (a tied weight has several)."""
    first: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {name: first.setdefault(id(t), name) for name, t in named}


def _names(canonical: dict[str, str], names: Iterable[str]) -> set[str]:
    return {canonical[n] for n in names if n in canonical}


@pytest.mark.parametrize(
    ("model", "ranges"),
    [
        ("mlp", [(0, 3), (4, 6)]),
        ("mlp", [(0, 2), (3, 4), (5, 6)]),  # cuts before ReLU modules
        ("gpt2", [(0, 2), (3, 5)]),  # between the blocks of transformer.h (a ModuleList)
        ("gpt2", [(0, 1), (2, 3), (4, 5)]),  # the tied wte/lm_head weight read in stages 0 and 2
    ],
)
def test_split_spec_gives_pipeline_the_plans_stages(model: str, ranges: list[tuple[int, int]]) -> None:
    plan = _staged(model, ranges)
    spec = pd.split_spec(plan)
    assert len(spec) == len(ranges) - 1 and set(spec.values()) == {SplitPoint.BEGINNING}
    for (first, _), module in zip(ranges[1:], spec):
        assert module == plan.layers[first].modules[0]
    m, args, kwargs = ZOO[model].build()
    canonical = _canonical(m)
    tied = {c for c in canonical.values() if list(canonical.values()).count(c) > 1}
    pipe = pipeline(m, mb_args=args, mb_kwargs=kwargs or None, split_spec=spec)
    assert pipe.num_stages == len(ranges)
    for k, (first, last) in enumerate(ranges):
        expected = _names(canonical, (p for layer in plan.layers[first : last + 1] for p in layer.params))
        held = _names(canonical, (n for n, _ in pipe.get_stage_module(k).named_parameters()))
        assert expected <= held, f"stage {k} lacks {expected - held}"
        assert held - expected <= tied, f"stage {k} holds {held - expected - tied} of another stage"


def test_split_spec_cuts_inside_a_block_of_a_leaf_plan() -> None:
    """Leaf layers: the cut falls between GPT-2's attention and MLP inside block 0 (the residual crosses it)."""
    m, args, kwargs = ZOO["gpt2"].build()
    leaf = partitioner.plan(m, ["cpu:0", "cpu:1"], args, kwargs, measure=False, granularity="leaf")
    cut = [layer.name for layer in leaf.layers].index("transformer.h.0.mlp.c_fc")
    spec = pd.split_spec(placed(leaf, [0] * cut + [1] * (len(leaf.layers) - cut)))
    assert spec == {"transformer.h.0.mlp.c_fc": SplitPoint.BEGINNING}
    m, args, kwargs = ZOO["gpt2"].build()
    pipe = pipeline(m, mb_args=args, mb_kwargs=kwargs, split_spec=spec)
    assert pipe.num_stages == 2
    second = {n for n, _ in pipe.get_stage_module(1).named_parameters()}
    assert "transformer.h.0.mlp.c_fc.weight" in second and "transformer.h.0.attn.c_attn.weight" not in second


def test_split_spec_of_one_stage_is_empty() -> None:
    assert pd.split_spec(placed(base_plan("mlp", 2), [1] * 7)) == {}


def test_split_spec_refuses_a_boundary_before_a_module_called_twice() -> None:
    """TwiceModel calls `shared` (Linear, Tanh) at two sites: a cut before one call would also cut the other."""
    base = base_plan("twice", 2)
    names = [layer.name for layer in base.layers]
    assert names == ["inp", "shared.0..shared.0@1", "shared.1@1", "out"]
    with pytest.raises(ValueError, match=r"stage 1 starts at layer 'shared.1@1', whose first module 'shared.1' is "
                                         r"also called in layer 'shared.0..shared.0@1'"):
        pd.split_spec(placed(base, [0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"layer 'shared.0..shared.0@1', whose first module 'shared.0' is called "
                                         r"twice in that layer"):
        pd.split_spec(placed(base, [0, 1, 1, 1]))
    spec = pd.split_spec(placed(base, [0, 0, 0, 1]))
    assert spec == {"out": SplitPoint.BEGINNING}
    m, args, _ = ZOO["twice"].build()
    assert pipeline(m, mb_args=args, split_spec=spec).num_stages == 2
    m, args, _ = ZOO["twice"].build()  # what the refused boundary would have done: 3 stages for a plan of 2
    assert pipeline(m, mb_args=args, split_spec={"shared.1": SplitPoint.BEGINNING}).num_stages == 3


def test_split_spec_refuses_stages_out_of_graph_order() -> None:
    with pytest.raises(ValueError, match=r"stage 0 of the plan holds layer 'fc2' \(layer 2\) where a pipeline needs "
                                         r"layer 'fc1' \(layer 0\)"):
        pd.split_spec(placed(base_plan("mlp", 2), [1, 1, 0, 0, 0, 0, 0]))


class _Embedding(nn.Module):
    """What a DeepSpeed port of GPT-2 writes as its first pipeline layer: token and position embeddings."""

    def __init__(self, wte: nn.Module, wpe: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))


def test_deepspeed_parts_are_the_plans_stage_boundaries() -> None:
    mlp = ZOO["mlp"].make_model()
    plan = _staged("mlp", [(0, 2), (3, 4), (5, 6)])
    assert pd.deepspeed_parts(plan, list(mlp), mlp) == [0, 3, 5, 7]
    assert pd.deepspeed_parts(plan, [name for name, _ in mlp.named_children()]) == [0, 3, 5, 7]

    gpt2 = ZOO["gpt2"].make_model()
    t = gpt2.transformer
    layers = [_Embedding(t.wte, t.wpe), *t.h, t.ln_f, lambda h: h.float(), gpt2.lm_head]
    assert pd.deepspeed_parts(_staged("gpt2", [(0, 1), (2, 3), (4, 5)]), layers, gpt2) == [0, 1, 3, 6]
    assert pd.deepspeed_parts(_staged("gpt2", [(0, 2), (3, 5)]), layers, gpt2) == [0, 2, 6]
    paths = ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f", "lm_head"]
    assert pd.deepspeed_parts(_staged("gpt2", [(0, 3), (4, 5)]), paths) == [0, 4, 6]


def test_deepspeed_parts_name_the_entry_that_does_not_fit() -> None:
    gpt2 = ZOO["gpt2"].make_model()
    t = gpt2.transformer
    plan = _staged("gpt2", [(0, 2), (3, 5)])
    with pytest.raises(ValueError, match=r"entry 0 \(transformer\) spans stages 0..1: the plan cuts inside it"):
        pd.deepspeed_parts(plan, [t, gpt2.lm_head], gpt2)
    with pytest.raises(ValueError, match=r"entry 1 \(transformer.h.0\) belongs to stage 0 but comes after an entry "
                                         r"of stage 1"):
        pd.deepspeed_parts(plan, [t.h[1], t.h[0]], gpt2)
    with pytest.raises(ValueError, match=r"no entry of the list falls in stage 1 \(layers transformer.h.1, "
                                         r"transformer.ln_f, lm_head\)"):
        pd.deepspeed_parts(plan, [_Embedding(t.wte, t.wpe), t.h[0]], gpt2)
    with pytest.raises(ValueError, match=r"entry 0 \(Linear\) holds parameters but no module of the model"):
        pd.deepspeed_parts(plan, [nn.Linear(2, 2)], gpt2)
    with pytest.raises(ValueError, match=r"entry 0 is a GPT2Block module: pass the model too"):
        pd.deepspeed_parts(plan, [t.h[0]])
    with pytest.raises(ValueError, match=r"entry 0 \(encoder.layer.0\) is in no layer of the plan"):
        pd.deepspeed_parts(plan, ["encoder.layer.0"])
