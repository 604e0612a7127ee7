"""The test zoo (tests/models.py) and the built-in models (partitioner.models) are what they claim."""

from __future__ import annotations

import resource
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from partitioner.models import DEFAULT_SEQ_LEN, available_models, build_model
from tests.models import HF_CASES, PLAIN_CASES, T5_FACTORY, ZOO, HandSplitMLP, ZooCase


def _assert_same(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def _eager(case: ZooCase) -> tuple[torch.Tensor, ...]:
    model, args, kwargs = case.build()
    with torch.no_grad():
        return case.outputs(model(*args, **kwargs))


# --- the zoo ------------------------------------------------------------------------------------


def test_zoo_lists_every_case_once() -> None:
    assert sorted(HF_CASES + PLAIN_CASES) == sorted(ZOO)
    assert set(HF_CASES).isdisjoint(PLAIN_CASES)
    assert {"mlp", "cnn", "tied", "kwargs_dict", "twice", "branchy"} <= set(PLAIN_CASES)
    assert set(HF_CASES) == {"gpt2", "bert", "llama", "t5", "vit"}


@pytest.mark.parametrize("name", list(ZOO))
def test_case_runs_forward_and_backward(name: str) -> None:
    case = ZOO[name]
    rng_before = torch.get_rng_state()
    model, args, kwargs = case.build()
    assert torch.equal(torch.get_rng_state(), rng_before), "building must leave the RNG alone"
    assert model.training == case.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    outputs = case.outputs(model(*args, **kwargs))
    assert outputs and all(o.is_floating_point() and o.isfinite().all() for o in outputs)
    sum(o.sum() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without a gradient: {missing}"
    assert all(p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("name", list(ZOO))
def test_case_is_seeded(name: str) -> None:
    case = ZOO[name]
    first, second = case.make_model(), case.make_model()
    assert first.state_dict().keys() == second.state_dict().keys()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    (args1, kwargs1), (args2, kwargs2) = case.make_inputs(), case.make_inputs()
    assert all(torch.equal(a, b) for a, b in zip(args1, args2, strict=True))
    assert kwargs1.keys() == kwargs2.keys()


@pytest.mark.parametrize("name", list(ZOO))
def test_export_matches_eager(name: str) -> None:
    case = ZOO[name]
    model, args, kwargs = case.build()
    exported = torch.export.export(model, args, kwargs, strict=False)
    with torch.no_grad():
        got = case.outputs(exported.module()(*args, **kwargs))
    _assert_same(got, _eager(case))


@pytest.mark.parametrize("name", list(ZOO))
def test_symbolic_trace_flag_is_true(name: str) -> None:
    case = ZOO[name]
    if not case.fx_traceable:
        with pytest.raises(Exception):  # noqa: B017 - any tracer failure counts
            torch.fx.symbolic_trace(case.make_model())
        return
    gm = torch.fx.symbolic_trace(case.make_model())
    _, args, kwargs = case.build()
    with torch.no_grad():
        got = case.outputs(gm(*args, **kwargs))
    _assert_same(got, _eager(case))


@pytest.mark.parametrize(
    ("name", "user", "owner"),
    [
        ("tied", "head.weight", "embed.weight"),
        ("gpt2", "lm_head.weight", "transformer.wte.weight"),
        ("bert", "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        ("t5", "lm_head.weight", "shared.weight"),
    ],
)
def test_tied_weights_are_one_parameter(name: str, user: str, owner: str) -> None:
    model = ZOO[name].make_model()
    assert model.get_parameter(user) is model.get_parameter(owner)
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert user in all_names and user not in dict(model.named_parameters())


def test_llama_head_is_untied() -> None:
    model = ZOO["llama"].make_model()
    assert model.get_parameter("lm_head.weight") is not model.get_parameter(
        "model.embed_tokens.weight"
    )


def test_twice_calls_its_shared_module_twice() -> None:
    model, args, kwargs = ZOO["twice"].build()
    calls: list[str] = []
    model.shared.register_forward_hook(lambda *_: calls.append("shared"))
    model(*args, **kwargs)
    assert calls == ["shared", "shared"]


def test_branchy_buffers() -> None:
    model = ZOO["branchy"].make_model()
    assert {n for n, _ in model.named_buffers()} == {"center", "gate"}
    assert "center" in model.state_dict() and "gate" not in model.state_dict()


def test_kwargs_dict_keywords_change_the_outputs() -> None:
    model, args, kwargs = ZOO["kwargs_dict"].build()
    with torch.no_grad():
        base = model(*args, **kwargs)
        no_mask = model(*args, scale=kwargs["scale"])
        other_scale = model(*args, mask=kwargs["mask"], scale=2.0)
    assert set(base) == {"logits", "score", "hidden"}
    assert not torch.equal(base["logits"], no_mask["logits"])
    assert not torch.equal(base["score"], other_scale["score"])


def test_kwargs_dict_passes_an_int_between_modules_under_fx() -> None:
    case = ZOO["kwargs_dict"]
    gm = torch.fx.symbolic_trace(case.make_model())
    values: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            values[n.name] = super().run_node(n)
            return values[n.name]

    _, args, kwargs = case.build()
    Recorder(gm).run(*args, *kwargs.values())

    def module(n: torch.fx.Node) -> str:
        return next(reversed(n.meta.get("nn_module_stack", {"": None})))

    crossing = [
        n
        for n in gm.graph.nodes
        if module(n) == "encoder" and any(module(u) == "pool" for u in n.users)
    ]
    # The encoder hands the pool its hidden states and their width, a Python int.
    assert sorted(type(values[n.name]).__name__ for n in crossing) == ["Tensor", "int"]


def test_hand_split_mlp_equals_mlp_and_copies_weights() -> None:
    source, args, _ = ZOO["mlp"].build()
    split = HandSplitMLP("cpu", "cpu", source=source)
    with torch.no_grad():
        torch.testing.assert_close(split(*args), source(*args), rtol=0, atol=0)
        torch.testing.assert_close(HandSplitMLP("cpu", "cpu")(*args), source(*args), rtol=0, atol=0)
    assert [n for n, _ in split.named_parameters()] == [n for n, _ in source.named_parameters()]
    assert all(p is not q for p, q in zip(split.parameters(), source.parameters(), strict=True))
    assert split.training == source.training


# --- built-in models -----------------------------------------------------------------------------

# Parameter counts of the published checkpoints (Hugging Face model cards and configs).
_PUBLISHED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "bert-base": 109_514_298,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-70b": 70_553_706_496,
    "llama3-8b": 8_030_261_248,
    "llama2-70b": 68_976_648_192,
    "t5-base": 222_903_552,
    "vit-base": 86_567_656,
}


def test_available_models_names_the_required_ones() -> None:
    required = {"mlp", "big-head", "gpt3-175b", "bert-large", *_PUBLISHED_PARAMS}
    assert required <= set(available_models())


@pytest.mark.parametrize("name", available_models())
def test_builds_on_meta_with_fitting_inputs(name: str) -> None:
    built = build_model(name)
    tensors = [*built.model.parameters(), *built.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    inputs = [*built.example_args, *built.example_kwargs.values()]
    assert all(t.device.type == "meta" for t in inputs if isinstance(t, torch.Tensor))
    assert not built.model.training
    assert all(p.dtype == torch.float32 for p in built.model.parameters())
    params = sum(p.numel() for p in built.model.parameters())
    if name in _PUBLISHED_PARAMS:
        assert params == _PUBLISHED_PARAMS[name]
    assert name in built.description and f"{params / 1e6:,.1f}M" in built.description
    classes = {type(m).__name__ for m in built.model.modules()}
    assert set(built.no_split_module_classes) <= classes


def test_big_head_outweighs_its_blocks() -> None:
    model = build_model("big-head").model
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.numel() > 20 * block


@pytest.mark.parametrize(("name", "vocab"), [("gpt2", 50257), ("llama-7b", 32000)])
def test_meta_model_exports_without_allocating(name: str, vocab: int) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    built = build_model(name, batch_size=2, seq_len=16)
    exported = torch.export.export(
        built.model, built.example_args, built.example_kwargs, strict=False
    )
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < 1e9, f"peak RSS grew by {grown / 1e9:.1f} GB: weights were allocated"
    (out,) = [n for n in exported.graph.nodes if n.op == "output"]
    logits = out.args[0][0].meta["val"]
    assert tuple(logits.shape) == (2, 16, vocab) and logits.device.type == "meta"


def test_default_shapes_and_dtype() -> None:
    built = build_model("t5-base", dtype="bfloat16")
    (ids,) = built.example_args
    assert ids.shape == (1, DEFAULT_SEQ_LEN) and ids.dtype == torch.int64
    assert built.example_kwargs["decoder_input_ids"].shape == (1, DEFAULT_SEQ_LEN)
    assert all(p.dtype == torch.bfloat16 for p in built.model.parameters())
    (pixels,) = build_model("vit-base", batch_size=3, dtype="float16").example_args
    assert pixels.shape == (3, 3, 224, 224) and pixels.dtype == torch.float16


def test_mlp_on_cpu_has_real_seeded_weights() -> None:
    first, second = build_model("mlp", device="cpu"), build_model("mlp", device="cpu", batch_size=4)
    assert [n for n, _ in first.model.named_children()][::2] == ["fc1", "fc2", "fc3", "fc4"]
    for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert p.device.type == "cpu" and torch.equal(p, q)
    (x,) = second.example_args
    assert second.model(x).shape == (4, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gpt2", "seq_len": 1025}, "at most 1024 positions"),
        ({"name": "vit-base", "seq_len": 16}, "no sequence axis"),
        ({"name": "mlp", "batch_size": 0}, "batch_size must be at least 1"),
        ({"name": "gpt2", "dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)  # type: ignore[arg-type]


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt5'") as info:
        build_model("gpt5")
    assert all(name in str(info.value) for name in available_models())


# --- path/to/file.py:factory ---------------------------------------------------------------------

_USER_FILE = """
from dataclasses import dataclass

import torch
from torch import nn

from helper_mod import WIDTH  # a neighbour of this file


@dataclass
class Sizes:
    width: int = WIDTH


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(Sizes().width, 3)

    def forward(self, x, *, shift=0.0):
        return self.a(x) + shift


def make():
    torch.manual_seed(0)
    return Net(), (torch.ones(2, WIDTH),), {"shift": torch.tensor(1.0)}


def bare():
    return Net()


def wrong():
    return "not a model"


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    (tmp_path / "helper_mod.py").write_text("WIDTH = 5\n")
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(_USER_FILE))
    return path


def test_file_factory_with_inputs(user_file: Path) -> None:
    built = build_model(f"{user_file}:make", device="cpu")
    assert type(built.model).__name__ == "Net" and not built.model.training
    assert "Net" in built.description and str(user_file) in built.description
    out = built.model(*built.example_args, **built.example_kwargs)
    assert out.shape == (2, 3)

    on_meta = build_model(f"{user_file}:make")
    assert on_meta.model.a.weight.device.type == "meta"
    assert on_meta.example_kwargs["shift"].device.type == "meta"
    torch.export.export(on_meta.model, on_meta.example_args, on_meta.example_kwargs, strict=False)


def test_file_factory_returning_a_bare_model(user_file: Path) -> None:
    built = build_model(f"{user_file}:bare", device="cpu", dtype="float64")
    assert isinstance(built.model, nn.Module) and built.example_args == ()
    assert built.model.a.weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        ("missing", ValueError, "defines no 'missing'; its functions: bare, make, wrong$"),
        ("NOT_CALLABLE", TypeError, "not callable"),
        ("wrong", TypeError, "returned str"),
    ],
)
def test_file_factory_errors(user_file: Path, factory: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build_model(f"{user_file}:{factory}")


def test_file_factory_refuses_shape_arguments_and_missing_files(user_file: Path) -> None:
    with pytest.raises(ValueError, match="apply to built-in names only"):
        build_model(f"{user_file}:make", seq_len=64)
    with pytest.raises(ValueError, match="does not exist"):
        build_model(f"{user_file.parent / 'nope.py'}:make")


# --- file factories: ties kept on meta, typed errors (issue 12, items 4 and 12) -------------------

_TIED_FILE = """
import torch
import transformers


""" + T5_FACTORY


def test_file_factory_on_meta_keeps_tied_weights(tmp_path: Path) -> None:
    # Module.to("meta") makes a new parameter per holder: T5's shared embedding became four.
    path = tmp_path / "tied.py"
    path.write_text(textwrap.dedent(_TIED_FILE))
    on_cpu, on_meta = build_model(f"{path}:t5", device="cpu"), build_model(f"{path}:t5")
    assert next(on_meta.model.parameters()).is_meta
    names = lambda m: [n for n, _ in m.named_parameters()]  # noqa: E731 - deduplicated by identity
    assert names(on_meta.model) == names(on_cpu.model)
    model = on_meta.model
    assert model.shared.weight is model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    assert on_meta.example_kwargs["decoder_input_ids"].is_meta


_FACTORY_ERRORS_FILE = """
import torch


def needs_width(width, depth=2):
    return torch.nn.Linear(width, width)


def returns_dict():
    return {"model": torch.nn.Linear(2, 2)}


def raises():
    raise RuntimeError("no weights here")


def long_tuple():
    return torch.nn.Linear(2, 2), (), {}, None
"""


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("needs_width", r"needs_width\(\) takes 1 required argument\(s\) \(width\) but is called with none; "
                        "give them defaults"),
        ("returns_dict", r"returns_dict\(\) returned dict; expected an nn.Module, \(model, args\)"),
        ("raises", r"raises\(\) raised RuntimeError: no weights here \(at bad_factories.py:\d+\)"),
        ("long_tuple", r"returned tuple of 4; expected"),
        ("NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not callable; name a function"),
    ],
)  # fmt: skip
def test_bad_factories_raise_a_model_error(tmp_path: Path, factory: str, message: str) -> None:
    from partitioner.errors import ModelError, PartitionerError

    path = tmp_path / "bad_factories.py"
    path.write_text(textwrap.dedent(_FACTORY_ERRORS_FILE) + "\nNOT_A_FUNCTION = 3\n")
    with pytest.raises(ModelError, match=message) as raised:
        build_model(f"{path}:{factory}")
    assert isinstance(raised.value, PartitionerError) and isinstance(raised.value, TypeError)


def test_a_file_that_fails_to_import_raises_a_model_error(tmp_path: Path) -> None:
    from partitioner.errors import ModelError

    path = tmp_path / "broken.py"
    path.write_text("import torch\nraise ImportError('needs a package that is not installed')\n")
    with pytest.raises(ModelError, match=r"importing broken.py raised ImportError: needs a package .*broken.py:2"):
        build_model(f"{path}:make")


_MEGATRON_BILLIONS = {"1.7b": 1.7, "3.6b": 3.6, "7.5b": 7.5, "18b": 18.4, "39b": 39.1, "76b": 76.1,
                      "146b": 145.6, "310b": 310.1, "530b": 529.6, "1t": 1008.0}


@pytest.mark.parametrize("size", sorted(_MEGATRON_BILLIONS))
def test_megatron_gpts_have_the_published_parameter_counts(size: str) -> None:
    """Narayanan et al. 2021, Table 1, "Number of parameters (billion)", to its one decimal."""
    model = build_model(f"megatron-gpt-{size}").model
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e9, 1) == _MEGATRON_BILLIONS[size]
