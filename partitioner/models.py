"""Built-in models for the CLI and benchmarks: published shapes, built without weights.

``build_model("llama-70b")`` returns a Llama-3-70B-shaped model on the meta device (shapes
and dtypes, no storage) with example inputs, ready for tracing; ``device="cpu"`` builds
real, seeded weights instead. The shapes are the published ``config.json`` numbers,
written out below with the model id they come from, so nothing is downloaded.

torch is imported when a model is built and `transformers` (the ``hf`` extra) when a
Hugging Face model is built, so listing the names costs neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    import torch
    from torch import nn

from partitioner.errors import ModelError

__all__ = ["BuiltModel", "available_models", "build_model", "MEGATRON_GPTS"]

DEFAULT_SEQ_LEN = 128
"""Tokens per sequence when `seq_len` is not given, for every sequence model. Exporting on
meta takes no longer at full context (gpt3-175b: the same time at 128 and 2048 tokens);
the default keeps real CPU runs of the small models quick. Benchmarks name their own."""

_SEED = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltModel:
    """A model ready to trace, with inputs that fit it."""

    model: nn.Module
    """The model in eval mode on the requested device (on ``meta``: no storage, no values)."""
    example_args: tuple[Any, ...]
    """Positional example inputs, on the model's device (on ``meta``: shapes and dtypes only)."""
    example_kwargs: dict[str, Any]
    """Keyword example inputs, e.g. ``{"use_cache": False}`` or an attention mask."""
    description: str
    """One line for people: what the model is, where its shape comes from, its size."""
    no_split_module_classes: tuple[str, ...]
    """Class names of the repeated blocks, never to be split across devices (as accelerate
    takes them: ``list(built.no_split_module_classes)``)."""


_Inputs = Literal["vector", "causal", "masked", "seq2seq", "image"]


@dataclass(frozen=True, slots=True)
class _Spec:
    """How to build one named model."""

    summary: str
    source: str
    """Where the numbers come from: a Hugging Face model id or a paper."""
    model_class: str
    """A `transformers` class name, or ``"mlp"`` for the seed MLP."""
    config: Mapping[str, Any]
    """Keyword arguments of the model's config class (published values)."""
    inputs: _Inputs
    no_split: tuple[str, ...] = ()


def _gpt2(n_embd: int, n_layer: int, n_head: int, **extra: Any) -> dict[str, Any]:
    """The GPT-2 family's config: only width, depth and heads vary between sizes."""
    return {
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": n_embd,
        "n_layer": n_layer,
        "n_head": n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        **extra,
    }


def _bert(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    return {
        "vocab_size": 30522,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    }


def _llama2(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    return {
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _llama3(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    """Llama 3's config (8 key/value heads, 128k vocabulary, untied head)."""
    return {
        **_llama2(hidden, layers, heads, intermediate),
        "vocab_size": 128256,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }


def _llama_spec(summary: str, source: str, config: dict[str, Any]) -> _Spec:
    return _Spec(summary, source, "LlamaForCausalLM", config, "causal", ("LlamaDecoderLayer",))


def _gpt2_spec(summary: str, source: str, config: dict[str, Any]) -> _Spec:
    return _Spec(summary, source, "GPT2LMHeadModel", config, "causal", ("GPT2Block",))


_SPECS: dict[str, _Spec] = {
    "mlp": _Spec(
        "the seed MLP 1024-512-256-128-10 (Linear+ReLU, fc1..fc4)",
        "model-parallelism tutorials",
        "mlp",
        {},
        "vector",
    ),
    "gpt2": _gpt2_spec("GPT-2 small", "openai-community/gpt2", _gpt2(768, 12, 12)),
    "gpt2-medium": _gpt2_spec("GPT-2 medium", "openai-community/gpt2-medium", _gpt2(1024, 24, 16)),
    "gpt2-large": _gpt2_spec("GPT-2 large", "openai-community/gpt2-large", _gpt2(1280, 36, 20)),
    "gpt2-xl": _gpt2_spec("GPT-2 XL", "openai-community/gpt2-xl", _gpt2(1600, 48, 25)),
    # GPT-3 175B is GPT-2's architecture scaled up (Brown et al. 2020, "Language Models are
    # Few-Shot Learners", Table 2.1: 96 layers, d_model 12288, 96 heads of 128, context 2048,
    # GPT-2's 50257-token vocabulary). Its alternating locally banded sparse attention is
    # not modelled: every layer here is dense, as in GPT-2.
    "gpt3-175b": _gpt2_spec(
        "GPT-3 175B (GPT-2 architecture)",
        "Brown et al. 2020, Table 2.1",
        _gpt2(12288, 96, 96, n_positions=2048),
    ),
    "bert-base": _Spec(
        "BERT base, masked-LM head",
        "google-bert/bert-base-uncased",
        "BertForMaskedLM",
        _bert(768, 12, 12, 3072),
        "masked",
        ("BertLayer",),
    ),
    "bert-large": _Spec(
        "BERT large, masked-LM head",
        "google-bert/bert-large-uncased",
        "BertForMaskedLM",
        _bert(1024, 24, 16, 4096),
        "masked",
        ("BertLayer",),
    ),
    "llama-7b": _llama_spec("Llama 2 7B", "meta-llama/Llama-2-7b-hf", _llama2(4096, 32, 32, 11008)),
    "llama-13b": _llama_spec("Llama 2 13B", "meta-llama/Llama-2-13b-hf", _llama2(5120, 40, 40, 13824)),
    "llama2-70b": _llama_spec(
        "Llama 2 70B (grouped-query attention, 8 KV heads)",
        "meta-llama/Llama-2-70b-hf",
        {**_llama2(8192, 80, 64, 28672), "num_key_value_heads": 8},
    ),
    "llama3-8b": _llama_spec(
        "Llama 3 8B (grouped-query attention, 8 KV heads)", "meta-llama/Meta-Llama-3-8B", _llama3(4096, 32, 32, 14336)
    ),
    "llama-70b": _llama_spec(
        "Llama 3 70B (grouped-query attention, 8 KV heads)", "meta-llama/Meta-Llama-3-70B", _llama3(8192, 80, 64, 28672)
    ),
    "t5-base": _Spec(
        "T5 base, encoder-decoder",
        "google-t5/t5-base",
        "T5ForConditionalGeneration",
        {
            "vocab_size": 32128,
            "d_model": 768,
            "d_kv": 64,
            "d_ff": 3072,
            "num_layers": 12,
            "num_decoder_layers": 12,
            "num_heads": 12,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": "relu",
            "layer_norm_epsilon": 1e-6,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        },
        "seq2seq",
        ("T5Block",),
    ),
    "vit-base": _Spec(
        "ViT base, 16x16 patches, 224x224 images, 1000 classes",
        "google/vit-base-patch16-224",
        "ViTForImageClassification",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "hidden_act": "gelu",
            "image_size": 224,
            "patch_size": 16,
            "num_channels": 3,
            "qkv_bias": True,
            "layer_norm_eps": 1e-12,
            "num_labels": 1000,
        },
        "image",
        ("ViTLayer",),
    ),
    # Synthetic: GPT-2 small blocks under a 256k vocabulary (Gemma's size) with an untied
    # head. The embedding and the head are 196.6M parameters each against 7.1M per block,
    # so one unsplittable module outweighs a device's fair share: balancing bytes fails.
    "big-head": _gpt2_spec(
        "GPT-2 small blocks (6) with a 256k-token vocabulary and an untied output head",
        "synthetic",
        _gpt2(768, 6, 12, vocab_size=256000, tie_word_embeddings=False),
    ),
}

# Megatron-LM's weak-scaling GPTs (Narayanan et al. 2021, "Efficient Large-Scale Language
# Model Training on GPU Clusters Using Megatron-LM", SC'21, Table 1): GPT-2's architecture
# with a 51,200-token vocabulary and 2048-token sequences; size -> (hidden, layers, heads).
MEGATRON_GPTS = {
    "1.7b": (2304, 24, 24),
    "3.6b": (3072, 30, 32),
    "7.5b": (4096, 36, 32),
    "18b": (6144, 40, 48),
    "39b": (8192, 48, 64),
    "76b": (10240, 60, 80),
    "146b": (12288, 80, 96),
    "310b": (16384, 96, 128),
    "530b": (20480, 105, 128),
    "1t": (25600, 128, 160),
}
for _size, (_hidden, _layers, _heads) in MEGATRON_GPTS.items():
    _SPECS[f"megatron-gpt-{_size}"] = _gpt2_spec(
        f"Megatron-LM GPT {_size.upper()} ({_layers} layers, hidden {_hidden}, {_heads} heads)",
        "Narayanan et al. 2021, Table 1",
        _gpt2(_hidden, _layers, _heads, vocab_size=51200, n_positions=2048),
    )


def available_models() -> list[str]:
    """The names `build_model` accepts (besides ``path/to/file.py:factory``)."""
    return list(_SPECS)


def build_model(
    name: str,
    *,
    device: str = "meta",
    batch_size: int = 1,
    seq_len: int | None = None,
    dtype: str | None = None,
) -> BuiltModel:
    """Build a named model with example inputs, without allocating weights by default.

    Args:
        name: One of `available_models()`, or ``"path/to/file.py:factory"``: the file is
            imported and run (it executes arbitrary code: only name files you trust), then
            ``factory()`` must return a model, ``(model, args)`` or ``(model, args, kwargs)``.
        device: Where the model and its example inputs live. ``"meta"`` allocates nothing
            (shapes and dtypes only: trace it, count it, don't run it eagerly); ``"cpu"``
            builds real weights from a fixed seed.
        batch_size: Examples per batch in the example inputs (built-in models only).
        seq_len: Tokens per sequence (default 128; built-in sequence models only). Must
            not exceed the model's position table.
        dtype: Floating dtype of parameters, buffers and float inputs (``"float32"``,
            ``"bfloat16"``, ``"float16"``); token ids stay int64. None: float32 for
            built-in names, the factory's own dtypes for a file.

    Returns:
        The model in eval mode with its example inputs, a description and its block classes.

    Raises:
        ValueError: Unknown name (the message lists the available ones), a bad file spec,
            an argument the model does not take, or a sequence longer than its positions.
        ModelError: A file's factory is not callable, takes arguments, raises, or returned
            something else (also a TypeError); importing the file raised.
        ImportError: A Hugging Face model was asked for without `transformers` installed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if _is_file_spec(name):
        if batch_size != 1 or seq_len is not None:
            raise ValueError(
                f"{name!r} is a file:factory model, whose inputs are the factory's own: "
                f"batch_size ({batch_size}) and seq_len ({seq_len}) apply to built-in names only"
            )
        return _load_file_model(name, device=device, dtype=dtype)
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(available_models())}, "
            "or 'path/to/file.py:factory'"
        )
    return _build_spec(
        name, spec, device=device, batch_size=batch_size, seq_len=seq_len, dtype=dtype or "float32"
    )


def _build_spec(
    name: str, spec: _Spec, *, device: str, batch_size: int, seq_len: int | None, dtype: str
) -> BuiltModel:
    import torch

    torch_dtype = _model_dtype(dtype)
    model_class: Any = None
    config: Any = None
    if spec.model_class != "mlp":
        try:
            import transformers
        except ImportError as e:
            raise ImportError(
                f"model {name!r} needs transformers: pip install 'partitioner[hf]'"
            ) from e
        # sdpa, Hugging Face's default, exports as one fused node; on meta and fake tensors
        # it runs as matmuls, so FLOP counts equal eager attention's.
        model_class = getattr(transformers, spec.model_class)
        config = model_class.config_class(attn_implementation="sdpa", **spec.config)
    seq = _check_seq_len(name, spec, config, seq_len)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        with torch.device(device):
            model: nn.Module = _seed_mlp() if model_class is None else model_class(config)
        model = model.to(torch_dtype).eval()
        args, kwargs = _example_inputs(spec, config, batch_size, seq, torch_dtype)
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    params = sum(p.numel() for p in model.parameters())
    shape = f"batch {batch_size}" + (f" x seq {seq}" if seq is not None else "")
    description = (
        f"{name}: {spec.summary} [{spec.source}]; {params / 1e6:,.1f}M parameters, "
        f"{dtype}; inputs {shape}"
    )
    return BuiltModel(
        model=model,
        example_args=args,
        example_kwargs=kwargs,
        description=description,
        no_split_module_classes=spec.no_split,
    )


def _seed_mlp() -> nn.Module:
    """The MLP every model-parallelism introduction starts from, as a named Sequential."""
    from collections import OrderedDict
    from itertools import pairwise

    from torch import nn

    widths = (1024, 512, 256, 128, 10)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (din, dout) in enumerate(pairwise(widths), start=1):
        layers[f"fc{i}"] = nn.Linear(din, dout)
        if i < len(widths) - 1:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


def _check_seq_len(name: str, spec: _Spec, config: Any, seq_len: int | None) -> int | None:
    """The sequence length to use, or None for models without a sequence axis."""
    if spec.inputs in ("vector", "image"):
        if seq_len is not None:
            raise ValueError(f"model {name!r} has no sequence axis; drop seq_len ({seq_len})")
        return None
    seq = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq}")
    # T5's relative position buckets take any length; the others have a position table
    # (GPT-2's n_positions answers to max_position_embeddings too).
    limit = None if spec.inputs == "seq2seq" else config.max_position_embeddings
    if limit is not None and seq > limit:
        raise ValueError(f"model {name!r} takes at most {limit} positions, got seq_len {seq}")
    return seq


def _example_inputs(
    spec: _Spec, config: Any, batch: int, seq: int | None, dtype: torch.dtype
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Seeded CPU example inputs (token ids drawn from the vocabulary)."""
    import torch

    if spec.inputs == "vector":
        return (torch.randn(batch, 1024, dtype=dtype),), {}
    if spec.inputs == "image":
        size = (batch, config.num_channels, config.image_size, config.image_size)
        return (torch.randn(size, dtype=dtype),), {}
    assert seq is not None
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    if spec.inputs == "masked":
        return (ids,), {"attention_mask": torch.ones_like(ids)}
    if spec.inputs == "seq2seq":
        decoder_ids = torch.randint(0, config.vocab_size, (batch, seq))
        return (ids,), {"decoder_input_ids": decoder_ids, "use_cache": False}
    # A DynamicCache output is no registered pytree type: export wants use_cache=False.
    return (ids,), {"use_cache": False}


def _model_dtype(dtype: str) -> Any:
    from partitioner.dtypes import torch_dtype

    return torch_dtype(dtype, allowed=("float32", "float16", "bfloat16", "float64"))


def _is_file_spec(name: str) -> bool:
    path, sep, factory = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and factory.isidentifier()


def _load_file_model(spec: str, *, device: str, dtype: str | None) -> BuiltModel:
    """Import ``path.py``, call its factory, move what it returns to `device` and `dtype`."""
    import torch
    from torch.utils._pytree import tree_map

    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"model file {path_text!r} does not exist (from {spec!r})")
    module_name = "_partitioner_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module (from {spec!r})")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up here
    sys.path.insert(0, str(path.parent))  # so the file imports its neighbours
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ModelError(f"{spec}: importing {path.name} raised {_failure(e)}") from e
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    factory = getattr(module, factory_name, None)
    if factory is None:
        found = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module_name and not n.startswith("_")
        )
        raise ValueError(f"{path} defines no {factory_name!r}; its functions: {', '.join(found)}")
    model, args, kwargs = _call_factory(spec, factory_name, factory)

    torch_dtype = None if dtype is None else _model_dtype(dtype)

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if torch_dtype is not None and x.is_floating_point():
            return x.to(device, dtype=torch_dtype)
        return x.to(device)

    _move_state(model, device, torch_dtype)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return BuiltModel(
        model=model,
        example_args=tree_map(move, args),
        example_kwargs=tree_map(move, kwargs),
        description=f"{type(model).__name__} from {spec}; {params / 1e6:,.1f}M parameters",
        no_split_module_classes=(),
    )


def _call_factory(spec: str, factory_name: str, factory: object) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """Call a file's factory and check that it returned a model and its inputs.

    Raises:
        ModelError: The factory is not callable, needs arguments, fails, or returns
            something else than ``model``, ``(model, args)`` or ``(model, args, kwargs)``.
    """
    import torch

    if not callable(factory):
        raise ModelError(
            f"{spec}: {factory_name!r} is a {type(factory).__name__}, not callable; "
            f"name a function that returns the model, e.g. 'def {factory_name}(): return Net()'"
        )
    try:
        required = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    except (TypeError, ValueError):  # a builtin without a signature: find out by calling it
        required = []
    if required:
        raise ModelError(
            f"{spec}: {factory_name}() takes {len(required)} required argument(s) ({', '.join(required)}) "
            "but is called with none; give them defaults, or add a factory without arguments that calls it"
        )
    try:
        result = factory()
    except Exception as e:
        raise ModelError(f"{spec}: {factory_name}() raised {_failure(e)}") from e
    expected = "expected an nn.Module, (model, args) or (model, args, kwargs)"
    if isinstance(result, torch.nn.Module):
        return result, (), {}
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        size = f" of {len(result)}" if isinstance(result, tuple) else ""
        raise ModelError(f"{spec}: {factory_name}() returned {type(result).__name__}{size}; {expected}")
    model, args, kwargs = (*result, {}) if len(result) == 2 else result
    if not isinstance(model, torch.nn.Module) or not isinstance(args, tuple):
        raise ModelError(
            f"{spec}: {factory_name}() returned ({type(model).__name__}, {type(args).__name__}, ...); "
            "expected an nn.Module then a tuple of positional inputs"
        )
    if not isinstance(kwargs, dict):
        raise ModelError(f"{spec}: the keyword inputs {factory_name}() returned are a {type(kwargs).__name__}, not a dict")
    return model, args, kwargs


def _failure(e: BaseException) -> str:
    """``RuntimeError: boom (at model.py:12)``: an exception and the innermost line that raised it."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{where}"


def _move_state(model: nn.Module, device: str, dtype: torch.dtype | None) -> None:
    """Move `model`'s parameters and buffers to `device` (floating ones to `dtype`), in place.

    ``Module.to("meta")`` would untie shared weights: torch cannot swap a CPU tensor's
    storage for a meta one, so it makes a new parameter in each module that holds one,
    and T5's shared embedding becomes four. Moving each tensor once, by identity, keeps
    every tie (and so the graph, the layers and the plan's fingerprint) as it was.
    """
    import torch
    from torch import nn

    moved: dict[int, torch.Tensor] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            to_dtype = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
            if t.device == torch.device(device) and t.dtype == to_dtype:
                moved[id(t)] = t  # already there: the factory's own tensor
            else:
                data = t.detach().to(device=device, dtype=to_dtype)
                moved[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
        return moved[id(t)]

    with torch.no_grad():
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = cast("nn.Parameter", move(p))
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = move(b)
