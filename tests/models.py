"""The small test zoo: tiny seeded models, their example inputs and what to compare.

Every trace and rewrite test draws from `ZOO`. Each case builds a fresh model from a
fixed seed (the caller's RNG state is left alone), so two builds hold equal weights;
each model is small enough that a forward takes milliseconds on one CPU core.

Plain cases (`PLAIN_CASES`) trace with `torch.fx.symbolic_trace` and with
`torch.export.export(strict=False)`; the Hugging Face cases (`HF_CASES`, built from
configs with random init, eager attention, no dropout) trace only with torch.export.
`transformers` is imported only when an HF case is built.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from partitioner.models import build_model

__all__ = [
    "HF_CASES",
    "ODD_VOCAB",
    "ODD_VOCAB_CASES",
    "PLAIN_CASES",
    "ZOO",
    "BranchyModel",
    "HandSplitMLP",
    "KwargsDictModel",
    "SmallResNet",
    "TiedLM",
    "ReadTiedLM",
    "TwiceModel",
    "ZooCase",
    "tensor_leaves",
    "zoo_case",
]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def tensor_leaves(output: Any) -> tuple[Tensor, ...]:
    """The tensors of a model output, in pytree order (a ModelOutput's set fields, a dict's values)."""
    return tuple(leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor))


@dataclass(frozen=True, slots=True, kw_only=True)
class ZooCase:
    """One model of the zoo, how to feed it and what of its output to check."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    """A fresh model with seeded weights, in train mode when `training` else eval mode."""
    make_inputs: Callable[[], Inputs]
    """Fresh seeded example inputs: (positional args, keyword args)."""
    fx_traceable: bool
    """Whether `torch.fx.symbolic_trace(model)` succeeds and the graph equals eager."""
    training: bool = False
    """Mode `make_model` returns; outputs are deterministic in both (no dropout)."""
    outputs: Callable[[Any], tuple[Tensor, ...]] = tensor_leaves
    """Picks the tensors to compare and backpropagate from the model's output."""

    def build(self) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        """A fresh model and fresh inputs: ``model, args, kwargs = case.build()``."""
        args, kwargs = self.make_inputs()
        return self.make_model(), args, kwargs


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the body under `torch.manual_seed(seed)`, then restore the caller's CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- mlp: the seed example of every model-parallelism tutorial --------------------------------


def _make_mlp() -> nn.Module:
    """The seed MLP (a Sequential of fc1, relu1, ..., fc4), seeded, in eval mode, on CPU."""
    return build_model("mlp", device="cpu").model


class HandSplitMLP(nn.Module):
    """The MLP split by hand as the tutorials do: fc1, fc2 on `dev0`; fc3, fc4 on `dev1`.

    One activation crosses devices per forward (fc2's output, ``x.to(dev1)``), besides
    moving the input onto `dev0`; the output stays on `dev1`. Weights are copies of
    `source`'s (by default the zoo's seeded `mlp`), so outputs equal the unsplit model's.
    """

    def __init__(
        self, dev0: torch.device | str, dev1: torch.device | str, source: nn.Module | None = None
    ) -> None:
        super().__init__()
        source = source if source is not None else _make_mlp()
        self.dev0 = torch.device(dev0)
        self.dev1 = torch.device(dev1)
        self.fc1 = copy.deepcopy(source.fc1).to(self.dev0)
        self.fc2 = copy.deepcopy(source.fc2).to(self.dev0)
        self.fc3 = copy.deepcopy(source.fc3).to(self.dev1)
        self.fc4 = copy.deepcopy(source.fc4).to(self.dev1)
        self.train(source.training)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.dev0)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = x.to(self.dev1)
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


# --- cnn: ResNet-style, residual branches and a downsampling shortcut -------------------------


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs, plus a 1x1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + identity)


class SmallResNet(nn.Module):
    """Stem, an identity-shortcut block, a stride-2 block with a downsample, pool, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = _BasicBlock(8, 8, stride=1)
        self.layer2 = _BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- tied: one parameter read by two distant modules -------------------------------------------


class TiedLM(nn.Module):
    """A toy language model whose output projection reuses the embedding matrix.

    ``head.weight is embed.weight``: `named_parameters()` lists it once (as
    ``embed.weight``), ``named_parameters(remove_duplicate=False)`` twice.
    """

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
            )
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


class ReadTiedLM(nn.Module):
    """A toy language model whose head reads the embedding's weight directly
    (``F.linear(h, self.embed.weight)``): one parameter, a module call in one layer and a
    plain read in another, with no second module holding it."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(3))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return nn.functional.linear(self.norm(h), self.embed.weight)


# --- kwargs_dict: keyword inputs, a dict output and non-tensor values between modules ---------


class _Encoder(nn.Module):
    def __init__(self, din: int, dh: int) -> None:
        super().__init__()
        self.proj = nn.Linear(din, dh)

    def forward(self, x: Tensor, scale: float) -> tuple[Tensor, int]:
        h = torch.tanh(self.proj(x) * scale)
        return h, h.shape[-1]  # the width is a Python int the pool reads


class _MaskedMean(nn.Module):
    def forward(self, h: Tensor, mask: Tensor | None, width: int) -> Tensor:
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            weights = mask.unsqueeze(-1)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return pooled * width**-0.5


class NanoGPT(nn.Module):
    """nanoGPT's shape in small: one ``nn.Linear`` computes q, k and v (``c_attn``), cut by
    ``split(n_embd, dim=2)``; vocabulary 128, 2 blocks of width 32 and 2 heads, causal attention."""

    def __init__(self, vocab: int = 128, width: int = 32, heads: int = 2, blocks: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.h = nn.ModuleList(_NanoBlock(width) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            b, t, c = x.shape
            q, k, v = block.c_attn(block.ln_1(x)).split(c, dim=2)
            q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
            # nanoGPT's path without flash attention (DTensor has no strategy for sdpa's CPU kernel).
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            y = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).contiguous().view(b, t, c)
            x = x + block.attn_proj(y)
            x = x + block.mlp_proj(F.gelu(block.c_fc(block.ln_2(x))))
        return self.lm_head(self.ln_f(x))


class _NanoBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.attn_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.c_fc, self.mlp_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)


class KwargsDictModel(nn.Module):
    """Keyword-only inputs (a mask and a float), a dict output, ints and floats between modules.

    Under symbolic tracing `scale` and the width become graph values (placeholders and
    ``getattr``/``getitem`` nodes) read by later modules; torch.export bakes them in as
    constants. A traced graph takes the mask branch, so callers pass a mask.
    """

    def __init__(self, din: int = 12, dh: int = 16) -> None:
        super().__init__()
        self.encoder = _Encoder(din, dh)
        self.pool = _MaskedMean()
        self.classifier = nn.Linear(dh, 4)
        self.scorer = nn.Linear(dh, 1)

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, scale: float = 1.0
    ) -> dict[str, Tensor]:
        h, width = self.encoder(x, scale)
        pooled = self.pool(h, mask, width)
        return {
            "logits": self.classifier(pooled),
            "score": self.scorer(pooled).squeeze(-1) * scale,
            "hidden": h,
        }


# --- twice: one submodule at two call sites ----------------------------------------------------


class TwiceModel(nn.Module):
    """`shared` (Linear + Tanh) is called twice, with `mid` between the calls."""

    def __init__(self, din: int = 8, dh: int = 16, dout: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(din, dh)
        self.shared = nn.Sequential(nn.Linear(dh, dh), nn.Tanh())
        self.mid = nn.Linear(dh, dh)
        self.out = nn.Linear(dh, dout)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        h = self.shared(h)
        h = torch.relu(self.mid(h))
        h = self.shared(h)
        return self.out(h)


# --- branchy: parallel towers merged, a long skip, persistent and non-persistent buffers ------


class BranchyModel(nn.Module):
    """Two towers over the centred input, concatenated with the input itself, then a head.

    `center` is a persistent buffer (in `state_dict`); `gate` is non-persistent (not
    saved) and scales tower B's output.
    """

    def __init__(self, din: int = 12) -> None:
        super().__init__()
        self.register_buffer("center", 0.1 * torch.randn(din))
        self.register_buffer("gate", torch.linspace(0.5, 1.5, 16), persistent=False)
        self.tower_a = nn.Sequential(nn.Linear(din, 16), nn.ReLU(), nn.Linear(16, 16))
        self.tower_b = nn.Sequential(nn.Linear(din, 24), nn.Tanh(), nn.Linear(24, 16))
        self.head = nn.Linear(16 + 16 + din, 6)

    def forward(self, x: Tensor) -> Tensor:
        x = x - self.center
        a = self.tower_a(x)
        b = self.tower_b(x) * self.gate
        return self.head(torch.cat([a, b, x], dim=-1))


# --- tiny Hugging Face models ------------------------------------------------------------------

_VOCAB = 128
_BATCH, _SEQ = 2, 8


def _token_ids(seed: int, seq: int = _SEQ) -> Tensor:
    return torch.randint(0, _VOCAB, (_BATCH, seq), generator=_generator(seed))


def _hf_model(model_class: str, config_class: str, **config: Any) -> nn.Module:
    """`transformers.<model_class>` from a config, seeded, in eval mode, with eager attention.

    Eager attention keeps attention as plain ATen ops (matmul, softmax) in the export
    graph; "sdpa" exports as well, as one fused node.
    """
    import transformers

    hf_config = getattr(transformers, config_class)(attn_implementation="eager", **config)
    with _seeded(0):
        model: nn.Module = getattr(transformers, model_class)(hf_config)
    return model.eval()


def _gpt2(vocab: int = _VOCAB) -> nn.Module:
    return _hf_model(
        "GPT2LMHeadModel",
        "GPT2Config",
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _bert() -> nn.Module:
    return _hf_model(
        "BertForMaskedLM",
        "BertConfig",
        vocab_size=_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _bert_inputs() -> Inputs:
    mask = torch.ones(_BATCH, _SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # the second sequence is padded, so the mask matters
    return (_token_ids(2),), {"attention_mask": mask}


def _llama(vocab: int = _VOCAB) -> nn.Module:
    return _hf_model(
        "LlamaForCausalLM",
        "LlamaConfig",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _t5() -> nn.Module:
    return _hf_model(
        "T5ForConditionalGeneration",
        "T5Config",
        vocab_size=_VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )


def _vit() -> nn.Module:
    return _hf_model(
        "ViTForImageClassification",
        "ViTConfig",
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


# --- the registry ------------------------------------------------------------------------------


def _plain(factory: Callable[[], nn.Module], training: bool = False) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        with _seeded(0):
            model = factory()
        return model.train(training)

    return make


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=_generator(seed))


def _kwargs_dict_inputs() -> Inputs:
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0.0
    return (_randn(4, 3, 5, 12),), {"mask": mask, "scale": 0.5}


_CASES = (
    ZooCase(
        name="mlp",
        description="The tutorials' 4-layer MLP 1024-512-256-128-10; see HandSplitMLP for the split.",
        make_model=_make_mlp,
        make_inputs=lambda: ((_randn(1, 4, 1024),), {}),
        fx_traceable=True,
    ),
    ZooCase(
        name="cnn",
        description="ResNet-style CNN (BatchNorm in train mode, a downsample shortcut), 2x3x16x16 in.",
        make_model=_plain(SmallResNet, training=True),
        make_inputs=lambda: ((_randn(2, 2, 3, 16, 16),), {}),
        fx_traceable=True,
        training=True,
    ),
    ZooCase(
        name="tied",
        description="Embedding and output projection share one weight (head.weight is embed.weight).",
        make_model=_plain(TiedLM),
        make_inputs=lambda: ((torch.randint(0, 64, (2, 6), generator=_generator(3)),), {}),
        fx_traceable=True,
    ),
    ZooCase(
        name="tied_read",
        description="The head reads the embedding's weight directly (F.linear(h, embed.weight)).",
        make_model=_plain(ReadTiedLM),
        make_inputs=lambda: ((torch.randint(0, 64, (2, 6), generator=_generator(3)),), {}),
        fx_traceable=True,
    ),
    ZooCase(
        name="kwargs_dict",
        description="Keyword-only mask and float, dict output, an int flowing between modules.",
        make_model=_plain(KwargsDictModel),
        make_inputs=_kwargs_dict_inputs,
        fx_traceable=True,
    ),
    ZooCase(
        name="twice",
        description="One submodule (Linear+Tanh) called at two sites.",
        make_model=_plain(TwiceModel),
        make_inputs=lambda: ((_randn(5, 4, 8),), {}),
        fx_traceable=True,
    ),
    ZooCase(
        name="branchy",
        description="Two towers and a skip concatenated; a persistent and a non-persistent buffer.",
        make_model=_plain(BranchyModel),
        make_inputs=lambda: ((_randn(6, 4, 12),), {}),
        fx_traceable=True,
    ),
    ZooCase(
        name="gpt2",
        description="GPT2LMHeadModel, 2 layers, hidden 32, vocab 128; lm_head tied to wte.",
        make_model=_gpt2,
        make_inputs=lambda: ((_token_ids(1),), {"use_cache": False}),
        fx_traceable=False,
    ),
    ZooCase(
        name="bert",
        description="BertForMaskedLM, 2 layers, hidden 32; decoder tied to word embeddings; padded mask.",
        make_model=_bert,
        make_inputs=_bert_inputs,
        fx_traceable=False,
    ),
    ZooCase(
        name="llama",
        description="LlamaForCausalLM, 2 layers, hidden 32, 4 heads / 2 KV heads (GQA); untied head.",
        make_model=_llama,
        make_inputs=lambda: ((_token_ids(3),), {"use_cache": False}),
        fx_traceable=False,
    ),
    ZooCase(
        name="t5",
        description="T5ForConditionalGeneration, 2+2 layers, d_model 32; output: logits, encoder state.",
        make_model=_t5,
        make_inputs=lambda: (
            (_token_ids(4),),
            {"decoder_input_ids": _token_ids(5, seq=6), "use_cache": False},
        ),
        fx_traceable=False,
    ),
    ZooCase(
        name="vit",
        description="ViTForImageClassification, 2 layers, hidden 32, 16x16 images in 4x4 patches.",
        make_model=_vit,
        make_inputs=lambda: ((_randn(6, 2, 3, 16, 16),), {}),
        fx_traceable=False,
    ),
)

ZOO: dict[str, ZooCase] = {case.name: case for case in _CASES}
HF_CASES: list[str] = ["gpt2", "bert", "llama", "t5", "vit"]
PLAIN_CASES: list[str] = [name for name in ZOO if name not in HF_CASES]

ODD_VOCAB = 101
"""A prime vocabulary: no tensor-parallel degree > 1 divides it (GPT-3's 50,257 at 8, in small)."""


def _odd_vocab(name: str, make: Callable[[int], nn.Module], seed: int, tied: str) -> ZooCase:
    """The zoo's case `name` with a vocabulary of `ODD_VOCAB` (its inputs drawn below it)."""
    return ZooCase(
        name=f"{name}-v{ODD_VOCAB}",
        description=f"The zoo's {name} with a vocabulary of {ODD_VOCAB}; {tied}.",
        make_model=lambda: make(ODD_VOCAB),
        make_inputs=lambda: ((torch.randint(0, ODD_VOCAB, (_BATCH, _SEQ), generator=_generator(seed)),), {"use_cache": False}),
        fx_traceable=False,
    )


ODD_VOCAB_CASES: dict[str, ZooCase] = {
    case.name: case for case in (_odd_vocab("gpt2", _gpt2, 1, "lm_head tied to wte"), _odd_vocab("llama", _llama, 3, "untied head"))
}
"""Variants outside `ZOO` (the zoo-wide tests skip them), for uneven vocabulary tensor parallelism."""


NANOGPT = ZooCase(
    name="nanogpt",
    description="nanoGPT in small: q, k and v from one nn.Linear, split on the features; untied head.",
    make_model=_plain(NanoGPT),
    make_inputs=lambda: ((_token_ids(5),), {}),
    fx_traceable=False,
)
"""Outside `ZOO`: a fused nn.Linear column for tensor parallelism (GPT-2's is a Conv1D)."""


def zoo_case(name: str) -> ZooCase:
    """`ZOO`'s case `name`, `ODD_VOCAB_CASES`' or `NANOGPT`."""
    if name == NANOGPT.name:
        return NANOGPT
    return ZOO[name] if name in ZOO else ODD_VOCAB_CASES[name]


T5_FACTORY = '''
def t5():
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, (ids,), {"decoder_input_ids": ids[:, :6].clone(), "use_cache": False}
'''
"""Source of a `file.py:factory` building a small T5 (tied shared embedding) from a config;
the file must import torch and transformers first."""
