"""Benchmark models: the built-in ones plus ResNet-style CNNs, deep MLPs and a mini GPT-2.

`build(spec, device)` returns a `partitioner.models.BuiltModel` for any `ModelSpec`: built-in
names go to `partitioner.models.build_model`, the others are defined here. On ``meta``
nothing is allocated; ``device="cpu"`` builds seeded weights for runs on this machine.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from partitioner.models import BuiltModel, build_model

from benchmarks.suites import ModelSpec

__all__ = ["Bottleneck", "ResNet", "DeepMLP", "SkipLinear", "SkipMLP", "build"]

_SEED = 0
_MLP_WIDTH = 512


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck block: 1x1 reduce, 3x3, 1x1 expand (x4), and a shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet: stem, four stages of blocks, pool, classifier.

    ``ResNet((3, 4, 6, 3))`` is ResNet-50's shape (25.6M parameters at 1000 classes);
    ``ResNet((1, 1, 1, 1), width=8)`` a small one for CPU runs.
    """

    def __init__(self, depths: tuple[int, ...], width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        blocks: list[nn.Module] = []
        cin = width
        for stage, depth in enumerate(depths):
            stage_width = width * 2**stage
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Bottleneck(cin, stage_width, stride))
                cin = stage_width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class DeepMLP(nn.Sequential):
    """`depth` Linear(width, width) + ReLU pairs in one Sequential: a chain of 2 x depth layers."""

    def __init__(self, depth: int, width: int = _MLP_WIDTH) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth):
            layers[f"fc{i}"] = nn.Linear(width, width)
            layers[f"relu{i}"] = nn.ReLU()
        super().__init__(layers)


class SkipLinear(nn.Module):
    """``relu(fc(x)) + skip``: reads the previous layer's output and the one before it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return torch.relu(self.fc(x)) + skip


class SkipMLP(nn.Module):
    """`depth` `SkipLinear` layers, each fed by the last two: a DAG (every layer has a skip edge)."""

    def __init__(self, depth: int, width: int = _MLP_WIDTH) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SkipLinear(width) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        previous, h = x, x
        for layer in self.layers:
            previous, h = h, layer(h, previous)
        return h


def _gpt2_mini() -> nn.Module:
    """GPT-2's architecture at CPU size: 4 blocks, width 256, 4 heads, 8,192 tokens."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=8192, n_positions=256, n_embd=256, n_layer=4, n_head=4, attn_implementation="sdpa",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def build(spec: ModelSpec, device: str = "meta") -> BuiltModel:
    """The model `spec` names with example inputs, on `device` (``meta``: nothing allocated).

    Raises:
        ValueError: `spec` names no model this module or `partitioner.models` knows.
    """
    if spec.source == "builtin":
        return build_model(spec.name, device=device, batch_size=spec.batch_size, seq_len=spec.seq_len,
                           dtype=spec.dtype)
    dtype = getattr(torch, spec.dtype)
    kind = spec.name.rsplit("-", 1)[0] if spec.depth else spec.name
    generator = torch.Generator().manual_seed(_SEED)
    no_split: tuple[str, ...] = ()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        with torch.device(device):
            if kind == "resnet":
                model: nn.Module = ResNet((3, 4, 6, 3))
                shape, no_split = (spec.batch_size, 3, 224, 224), ("Bottleneck",)
            elif kind == "resnet-small":
                model = ResNet((1, 1, 1, 1), width=8, num_classes=100)
                shape, no_split = (spec.batch_size, 3, 64, 64), ("Bottleneck",)
            elif kind == "deep-mlp":
                model, shape = DeepMLP(spec.depth), (spec.batch_size, _MLP_WIDTH)
            elif kind == "skip-mlp":
                model, shape = SkipMLP(spec.depth), (spec.batch_size, _MLP_WIDTH)
                no_split = ("SkipLinear",)
            elif kind == "gpt2-mini":
                model = _gpt2_mini()
                no_split = ("GPT2Block",)
            else:
                raise ValueError(f"unknown benchmark model {spec.name!r}")
    model = model.to(dtype).eval()
    if kind == "gpt2-mini":
        assert spec.seq_len is not None
        ids = torch.randint(0, 8192, (spec.batch_size, spec.seq_len), generator=generator)
        args: tuple[Tensor, ...] = (ids.to(device),)
        kwargs: dict[str, object] = {"use_cache": False}
    else:
        args, kwargs = (torch.randn(shape, generator=generator, dtype=dtype).to(device),), {}
    params = sum(p.numel() for p in model.parameters())
    return BuiltModel(
        model=model,
        example_args=args,
        example_kwargs=kwargs,
        description=f"{spec.name}: {type(model).__name__}, {params / 1e6:,.1f}M parameters, batch {spec.batch_size}",
        no_split_module_classes=no_split,
    )
