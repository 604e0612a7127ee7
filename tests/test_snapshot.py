"""`preserved`: whatever a forward changes in its model is put back."""

from __future__ import annotations

import torch
from torch import nn

from partitioner.snapshot import preserved


class _Changes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.calls = 0
        self.log: list[int] = []
        self.cache: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        self.calls += 1
        self.log.append(self.calls)
        self.cache["last"] = self.calls
        self.extra = "new attribute"
        with torch.no_grad():
            self.lin.weight[0].fill_(7.0)  # through a view
            self.lin.bias.data = torch.full_like(self.lin.bias, 9.0)  # a swap of storage
        self.lin.weight.requires_grad_(False)
        self.register_buffer("late", torch.ones(1))
        return self.norm(self.lin(x))  # training: running statistics advance


def test_everything_a_forward_changes_is_put_back() -> None:
    model, x = _Changes(), torch.randn(4, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    attrs = dict(vars(model))
    with preserved(model):
        model(x)
        model(x)
        assert model.calls == 2 and model.norm.num_batches_tracked.item() == 2
    assert model.calls == 0 and model.log == [] and model.cache == {} and not hasattr(model, "extra")
    assert "late" not in model.state_dict()
    assert vars(model).keys() == attrs.keys()
    assert model.lin.weight.requires_grad
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is tensors[k], k  # the same tensor objects, holding the same values
        assert torch.equal(v, state[k]), k


def test_parameters_nobody_writes_are_not_copied() -> None:
    """Copy on write: a forward that writes nothing costs no copy of the weights."""
    model, x = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)), torch.randn(2, 3)
    pointers = [p.data_ptr() for p in model.parameters()]
    with preserved(model):
        model(x).sum().backward()
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.grad is None for p in model.parameters())  # .grad is state too


def test_meta_models_are_preserved_without_values() -> None:
    with torch.device("meta"):
        model = _Changes()
        x = torch.randn(4, 3)
    with preserved(model):
        model(x)
    assert model.calls == 0 and "late" not in model.state_dict()
