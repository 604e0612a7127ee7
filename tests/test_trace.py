"""The front end: which tracer runs, that its graph computes what the model does, and its errors."""

from __future__ import annotations

import copy
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
    traced = trace_model(model, args, kwargs, frontend=frontend)
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
    with pytest.raises(ValueError, match="unknown Granularity 'layer': choose one of 'block', 'leaf'"):
        trace_model(model, args, granularity="layer")
    with pytest.raises(ValueError, match="unknown Frontend 'jit': choose one of 'auto', 'fx', 'export'"):
        trace_model(model, args, frontend="jit")


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


class _NoGradFirst(nn.Module):
    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.region == "no_grad" else torch.inference_mode():
            h = self.a(x)
        return self.b(h.clone())


def test_fx_refuses_a_no_grad_region_it_would_drop_and_names_the_fix() -> None:
    model, x = _NoGradFirst("no_grad"), torch.randn(2, 8)
    with pytest.raises(TraceError) as raised:
        trace_model(model, (x,), frontend="fx")
    message = str(raised.value)
    assert "node 'a' (module a) runs with autograd off" in message
    assert "Fix: trace with frontend='export'" in message
    traced = trace_model(model, (x,))  # auto: torch.export keeps the region
    assert traced.frontend == "export"
    traced.gm(x).sum().backward()
    assert model.a.weight.grad is None and model.b.weight.grad is not None


@pytest.mark.parametrize("frontend", ["auto", "fx", "export"])
def test_inference_mode_region_is_refused_by_every_front_end(frontend: str) -> None:
    """torch.export drops inference-mode regions too (its graph would compute their gradients)."""
    model, x = _NoGradFirst("inference_mode"), torch.randn(2, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TraceError, match=r"torch\.inference_mode\(\)") as raised:
        trace_model(model, (x,), frontend=frontend)  # type: ignore[arg-type]
    assert "Fix: write `with torch.no_grad():` for `with torch.inference_mode():` inside forward" in str(raised.value)
    if frontend == "export":
        assert f"{__file__}:" in str(raised.value)  # the line of forward that entered the region
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.shift = torch.ones(3)  # a plain tensor attribute: no state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale.clone() + self.shift + torch.tensor([0.5, 1.0, 1.5])


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_trace_constants_stay_off_the_model_and_out_of_the_state_dict(frontend: str) -> None:
    model, x = _Constants(), torch.randn(2, 3)
    attrs = set(vars(model))
    traced = trace_model(model, (x,), frontend=frontend)  # type: ignore[arg-type]
    assert set(vars(model)) == attrs  # fx stored `_tensor_constant0` on the model
    assert list(traced.gm.state_dict()) == list(model.state_dict())
    copied = copy.deepcopy(traced.gm)  # a deep copy registers constants as buffers again
    assert list(copied.state_dict()) == list(model.state_dict())
    if frontend == "fx":  # the buffer is read each call, not cloned once into a constant
        assert any(n.op == "get_attr" and n.target == "scale" for n in traced.gm.graph.nodes)
    with torch.no_grad():
        model.scale.fill_(3.0)
        torch.testing.assert_close(traced.gm(x), model(x))


def test_tracing_a_forward_that_counts_its_calls_traces_the_model_as_it_is() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.lin(x) * self.calls

    model, x = Counting(), torch.randn(2, 2)
    for frontend in ("fx", "export", "auto"):
        traced = trace_model(model, (x,), frontend=frontend)  # type: ignore[arg-type]
        assert model.calls == 0
        with torch.no_grad():
            torch.testing.assert_close(traced.gm(x), model.lin(x))  # the first call's factor, 1


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_planning_under_the_callers_inference_mode_traces(frontend: str) -> None:
    """Tracing runs with autograd on (to see no_grad regions); inputs made under the caller's
    inference_mode cannot enter autograd, so they are traced as normal copies."""
    model, args, _ = ZOO["mlp"].build()
    with torch.inference_mode():
        inputs = tuple(a.clone() for a in args)
        traced = trace_model(model, inputs, frontend=frontend)  # type: ignore[arg-type]
    assert traced.frontend == frontend
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(*args), model(*args))


def test_fx_alone_failing_suggests_the_export_front_end() -> None:
    class Stepping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("step", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.step = self.step + 1  # a buffer read in forward is a graph value: fx cannot assign it
            return self.lin(x) + self.step

    model, x = Stepping(), torch.randn(2, 2)
    with pytest.raises(TraceError, match="Or trace with frontend='export'"):
        trace_model(model, (x,), frontend="fx")
    assert model.step.item() == 0
    traced = trace_model(model, (x,))
    assert traced.frontend == "export" and model.step.item() == 0

# --- meta models, the cache flag, the batch size, quiet failures (issue 12, items 4, 12, 14) ---

# The built-in models' families, small, with sdpa attention (as `partitioner.models` builds them).
_SMALL_HF: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2LMHeadModel", {"vocab_size": 128, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
                                 "bos_token_id": 1, "eos_token_id": 2}),
    "bert": ("BertForMaskedLM", {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}),
    "llama": ("LlamaForCausalLM", {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2}),
    "t5": ("T5ForConditionalGeneration", {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                                          "num_decoder_layers": 2, "num_heads": 4,
                                          "relative_attention_num_buckets": 8, "decoder_start_token_id": 0}),
    "vit": ("ViTForImageClassification", {"image_size": 16, "patch_size": 4, "num_channels": 3, "hidden_size": 32,
                                          "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "intermediate_size": 64, "num_labels": 10}),
}  # fmt: skip


def _small_hf(family: str, device: str, empty: str = "") -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A small `family` model built on `device` (``empty``: under accelerate's init_empty_weights,
    ``"params"`` or ``"all"`` with buffers), and CPU inputs of batch 2."""
    import accelerate
    import transformers

    class_name, config = _SMALL_HF[family]
    model_class = getattr(transformers, class_name)
    hf_config = model_class.config_class(attn_implementation="sdpa", **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if empty:
            with accelerate.init_empty_weights(include_buffers=empty == "all"):
                model = model_class(hf_config)
        else:
            with torch.device(device):
                model = model_class(hf_config)
        if family == "vit":
            return model.eval(), (torch.randn(2, 3, 16, 16),), {}
        ids = torch.randint(0, 128, (2, 8))
    if family == "bert":
        return model.eval(), (ids,), {"attention_mask": torch.ones_like(ids)}
    if family == "t5":
        return model.eval(), (ids,), {"decoder_input_ids": ids[:, :6].clone(), "use_cache": False}
    return model.eval(), (ids,), {"use_cache": False}


@pytest.mark.parametrize("family", list(_SMALL_HF))
def test_a_model_on_meta_has_the_fingerprint_of_its_weights_on_cpu(family: str) -> None:
    import partitioner

    real, args, kwargs = _small_hf(family, "cpu")
    on_cpu = partitioner.plan(real, ["cpu:0", "cpu:1"], args, kwargs, measure=False)
    meta, _, _ = _small_hf(family, "meta")
    meta_inputs = tuple(a.to("meta") for a in args)
    # On meta, sdpa returns other strides, so export records aten.contiguous where CPU needs none.
    for inputs in (args, meta_inputs):  # a meta model with CPU inputs (a meta convolution takes no CPU image)
        on_meta = partitioner.plan(meta, ["cpu:0", "cpu:1"], inputs, kwargs, measure=False)
        assert on_meta.fingerprint == on_cpu.fingerprint, family
        assert [layer.name for layer in on_meta.layers] == [layer.name for layer in on_cpu.layers]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_init_empty_weights_without_buffers_plans_as_with_them(family: str) -> None:
    # Parameters on meta, buffers (Llama's rotary inv_freq, BERT's position ids) on CPU.
    import partitioner

    model, args, kwargs = _small_hf(family, "", empty="params")
    model.tie_weights()  # init_empty_weights(include_buffers=False) unties BERT's decoder (accelerate 1.15)
    assert {b.device.type for b in model.buffers()} == {"cpu"} and next(model.parameters()).is_meta
    mixed = partitioner.plan(model, ["cpu:0", "cpu:1"], args, kwargs, measure=False)
    real, _, _ = _small_hf(family, "cpu")
    assert mixed.fingerprint == partitioner.plan(real, ["cpu:0", "cpu:1"], args, kwargs, measure=False).fingerprint
    assert {b.device.type for b in model.buffers()} == {"cpu"}  # the model is left as it was


def test_a_cache_model_traces_without_use_cache_and_the_split_takes_the_original_call() -> None:
    import partitioner
    from partitioner.options import PlanOptions

    model, args, kwargs = ZOO["llama"].build()
    single = PlanOptions(allow_data_parallel=False)  # a split graph, not a replica of the model
    pm = partitioner.auto_parallelize(model, ["cpu:0", "cpu:1"], args, options=single)  # no use_cache given
    assert model.config.use_cache is True  # turned off while tracing only
    with torch.no_grad():
        expected = model(*args, use_cache=False).logits
        torch.testing.assert_close(partitioner.to_plain(pm(*args).logits), expected, rtol=0, atol=0)
        torch.testing.assert_close(partitioner.to_plain(pm(*args, **kwargs).logits), expected, rtol=0, atol=0)
        # Traced with use_cache=False, as the docs said to: the call without it works too.
        given = partitioner.auto_parallelize(model, ["cpu:0", "cpu:1"], args, kwargs, options=single)
        torch.testing.assert_close(partitioner.to_plain(given(*args).logits), expected, rtol=0, atol=0)
        torch.testing.assert_close(partitioner.to_plain(given(*args, **kwargs).logits), expected, rtol=0, atol=0)
    assert given.plan.fingerprint == pm.plan.fingerprint  # one model, one fingerprint, flag or not
    for split in (pm, given):
        with pytest.raises(ValueError, match="use_cache=True: this module was traced with the cache off"):
            split(*args, use_cache=True)


class _Cache:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _ReturnsObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, _Cache]:
        h = self.lin(x)
        return h, _Cache(h)


def test_an_unknown_output_type_is_named_with_its_fix() -> None:
    with pytest.raises(TraceError) as raised:
        trace_model(_ReturnsObject(), (torch.randn(2, 4),), frontend="export")
    message = str(raised.value)
    assert "register_pytree_node" in message and "use_cache=False" in message
    assert "control flow" not in message  # the old hint, wrong here


def test_a_wrong_input_shape_is_named_with_its_fix_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(TraceError) as raised:
        trace_model(model, (torch.randn(2, 5),), frontend="export")
    message = str(raised.value)
    assert "[2, 5] X [8, 8]" in message  # the inputs' shapes, not export's symbols for them
    assert "check their shapes, dtypes, devices" in message and "control flow" not in message
    assert not [r for r in caplog.records if r.name.startswith("torch._subclasses.fake_tensor")]


@pytest.mark.parametrize("name", ["llama", "vit", "mlp"])
def test_a_graph_exported_at_batch_1_takes_other_batches(name: str) -> None:
    model, args, kwargs = ZOO[name].build()
    one = tuple(a[:1] for a in args)
    traced = trace_model(model, one, kwargs, frontend="export")
    five = tuple(torch.cat([a, a, a[:1]])[:5] if a.shape[0] < 5 else a[:5] for a in args)
    with torch.no_grad():
        for inputs in (one, five):
            got, expected = traced.gm(*inputs, **kwargs), model(*inputs, **kwargs)
            got_t = got if isinstance(got, torch.Tensor) else got["logits"]
            expected_t = expected if isinstance(expected, torch.Tensor) else expected["logits"]
            assert got_t.shape[0] == inputs[0].shape[0]
            torch.testing.assert_close(got_t, expected_t, rtol=1e-5, atol=1e-5)


class _BatchOfOne(nn.Module):
    """Decides on the batch size: a graph traced at another batch would take the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (2.0 if x.shape[0] == 1 else 3.0)


def test_a_model_that_branches_on_batch_1_keeps_its_batch() -> None:
    model, x = _BatchOfOne(), torch.randn(1, 4)
    traced = trace_model(model, (x,), frontend="export")
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(x), model(x))


def test_a_split_planned_at_batch_1_runs_at_batch_5() -> None:
    # The README's promise: only non-batch dimensions are fixed by the example inputs.
    import partitioner
    from partitioner.options import PlanOptions

    model, args, kwargs = ZOO["gpt2"].build()
    one, five = args[0][:1], torch.cat([args[0], args[0], args[0]])[:5]
    pm = partitioner.auto_parallelize(
        model, ["cpu:0", "cpu:1"], (one,), kwargs, options=PlanOptions(allow_data_parallel=False), measure=False
    )
    with torch.no_grad():
        got = partitioner.to_plain(pm(five, **kwargs).logits)
        torch.testing.assert_close(got, model(five, **kwargs).logits)
