"""The front end: which tracer runs, that its graph computes what the model does, and its errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from partitioner.errors import TraceError
from partitioner.trace import TracedModel, block_classes, trace_model
from tests.models import PLAIN_CASES, ZOO, TiedLM

# torch.fx.symbolic_trace handles every plain zoo model; auto picks torch.export only for ties.
FX_CASES = [name for name in PLAIN_CASES if name not in ("tied", "tied_read")]


Traced = tuple[nn.Module, tuple[Any, ...], dict[str, Any], TracedModel]


@pytest.fixture(scope="module")
def gpt2() -> Traced:
    model, args, kwargs = ZOO["gpt2"].build()
    return model, args, kwargs, trace_model(model, args, kwargs)


@pytest.mark.parametrize("name", FX_CASES)
def test_plain_models_trace_with_fx(name: str) -> None:
    model, args, kwargs = ZOO[name].build()
    traced = trace_model(model, args, kwargs)
    assert traced.frontend == "fx"
    assert any(n.op == "call_module" for n in traced.gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(*args, **kwargs), model(*args, **kwargs))


@pytest.mark.parametrize("name", ["tied", "tied_read"])
def test_tied_weights_switch_auto_to_export(name: str) -> None:
    """fx reads a tied weight inside two call_module nodes (tied), or inside one and through a
    get_attr (tied_read: the head reads the embedding's weight); export lifts it so it can move."""
    model, args, kwargs = ZOO[name].build()
    assert trace_model(model, args, kwargs, frontend="fx").frontend == "fx"
    traced = trace_model(model, args, kwargs)
    assert traced.frontend == "export"
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(*args), model(*args))


def test_hugging_face_gpt2_traces_with_export(gpt2: Traced) -> None:
    model, args, kwargs, traced = gpt2
    assert traced.frontend == "export"
    assert traced.model_name == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(*args, **kwargs).logits, model(*args, **kwargs).logits)


def test_hugging_face_gpt2_does_not_trace_with_fx_alone(gpt2: Traced) -> None:
    model, args, kwargs, _ = gpt2
    with pytest.raises(TraceError, match="could not trace GPT2LMHeadModel into a graph:\n  torch.fx.symbolic_trace: "):
        trace_model(model, args, kwargs, frontend="fx")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_keyword_inputs_and_dict_output_trace(frontend: str) -> None:
    model, args, kwargs = ZOO["kwargs_dict"].build()
    traced = trace_model(model, args, kwargs, frontend=frontend)  # type: ignore[arg-type]
    assert traced.frontend == frontend
    assert [n.target for n in traced.gm.graph.nodes if n.op == "placeholder"] == ["x", "mask", "scale"]
    with torch.no_grad():
        got = traced.gm(*args, **kwargs)
        assert sorted(got) == ["hidden", "logits", "score"]
        torch.testing.assert_close(got, model(*args, **kwargs))


GATED = """\
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inp(x))
"""


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_dependent_branch_is_named_with_the_fix(tmp_path: Path) -> None:
    # The model lives in a file of its own, as a user's would.
    path = tmp_path / "gated.py"
    path.write_text(GATED)
    branch = GATED.splitlines().index("        if x.sum() > 0:") + 1
    with pytest.raises(TraceError) as raised:
        trace_model(_import_file(path).Gated(), (torch.randn(2, 4),))
    message = str(raised.value)
    assert message.startswith("could not trace Gated into a graph:")
    assert f"{path}:{branch} in forward: if x.sum() > 0:" in message
    assert "torch.fx.symbolic_trace" in message and "torch.export.export" in message
    assert "torch.where" in message and "torch.cond" in message


def test_unknown_frontend_or_granularity_is_refused() -> None:
    model, args, _ = ZOO["mlp"].build()
    with pytest.raises(ValueError, match="granularity must be 'block' or 'leaf'"):
        trace_model(model, args, granularity="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frontend must be 'auto', 'fx' or 'export'"):
        trace_model(model, args, frontend="jit")  # type: ignore[arg-type]


def test_block_classes_are_the_elements_of_containers() -> None:
    model = TiedLM()
    # blocks = ModuleList of Sequentials: the Sequentials' elements, not the containers themselves
    assert block_classes(model) == {
        "torch.nn.modules.normalization.LayerNorm",
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.activation.GELU",
    }
    assert "Extra" in block_classes(model, ["Extra"])


def test_hugging_face_blocks_are_found(gpt2: Traced) -> None:
    assert gpt2[3].blocks == {"transformers.models.gpt2.modeling_gpt2.GPT2Block"}
    assert trace_model(nn.Sequential(nn.Linear(2, 2)), (torch.randn(1, 2),), granularity="leaf").blocks == set()


def test_tracing_leaves_the_model_as_it_was() -> None:
    model, args, kwargs = ZOO["cnn"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, args, kwargs, frontend="export")
    trace_model(model, args, kwargs, frontend="fx")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_export_records_modules_not_stacks_and_leaves_the_fx_config_alone() -> None:
    model, x = TiedLM(), torch.randint(0, 10, (4, 6))
    traced = trace_model(model, (x,), frontend="export")
    calls = [n for n in traced.gm.graph.nodes if n.op == "call_function"]
    assert calls and all(n.meta.get("nn_module_stack") is not None for n in calls)
    assert not any(n.meta.get("stack_trace") for n in calls)  # not recorded: it costs time, nothing reads it
    assert torch.fx.config.do_not_emit_stack_traces is False
