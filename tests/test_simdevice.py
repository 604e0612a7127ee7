"""Simulated devices: numerics equal plain CPU, missing transfers raise, transfers are counted."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from partitioner.errors import DeviceError, DeviceMismatchError, PartitionerError
from partitioner.simdevice import (
    LogicalTensor,
    SimulatedDevices,
    CopyRecord,
    is_logical,
    logical_device,
    place,
    to_plain,
)

CPU0 = torch.device("cpu", 0)
CPU1 = torch.device("cpu", 1)


def exact(actual: Any, expected: Any) -> None:
    """Bit-identical: same kernels on the same data must give the same bits."""
    torch.testing.assert_close(to_plain(actual), expected, rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


class TwoLayerMLP(nn.Module):
    """fc1 on `dev0`, fc2 on `dev1`, one explicit transfer between them (if `transfer`)."""

    def __init__(self, source: nn.Sequential, dev0: Any, dev1: Any, transfer: bool = True):
        super().__init__()
        self.fc1 = copy.deepcopy(source[0]).to(dev0)
        self.fc2 = copy.deepcopy(source[2]).to(dev1)
        self.dev0, self.dev1, self.transfer = dev0, dev1, transfer

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x.to(self.dev0)))
        return self.fc2(h.to(self.dev1) if self.transfer else h)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def loss_of(out: Tensor) -> Tensor:
    return (out * out).mean()


# --- the hand-split MLP: numerics, the missing transfer, the byte counts ---------------------


def test_hand_split_mlp_matches_plain_outputs_and_gradients() -> None:
    plain, x = mlp(), torch.randn(8, 16, requires_grad=True)
    ref = plain(x)
    loss_of(ref).backward()
    ref_x_grad, x.grad = x.grad, None
    with SimulatedDevices(2):
        split = TwoLayerMLP(plain, "cpu:0", "cpu:1")
        out = split(x)
        assert out.device == CPU1 and split.fc1.weight.device == CPU0
        loss_of(out).backward()
    exact(out, ref)
    exact(x.grad, ref_x_grad)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        grad = split.get_parameter(name).grad
        assert grad is not None and grad.device == split.get_parameter(name).device
        exact(grad, plain.get_parameter(name.replace("fc1", "0").replace("fc2", "2")).grad)


def test_missing_transfer_raises_and_names_op_and_devices() -> None:
    with SimulatedDevices(2):
        split = TwoLayerMLP(mlp(), "cpu:0", "cpu:1", transfer=False)
        with pytest.raises(DeviceMismatchError) as info:
            split(torch.randn(8, 16))
    message = str(info.value)
    assert "aten.addmm.default" in message
    assert "cpu:0 (mat1, shape [8, 32])" in message and "cpu:1 (self, shape [4])" in message
    assert ".to('cpu:1')" in message
    assert isinstance(info.value, PartitionerError)
    # The process survived and the mode was left cleanly: plain ops work again.
    assert torch.ones(2).add(1).sum().item() == 4.0


def test_forward_transfer_bytes_equal_activation_size() -> None:
    x = torch.randn(8, 16)
    with SimulatedDevices(2) as sim:
        split = TwoLayerMLP(mlp(), "cpu:0", "cpu:1")
        sim.reset()
        split(x)
    activation = 8 * 32 * 4  # fc1's output, float32
    assert sim.bytes_moved(backward=False, host=False) == activation
    assert sim.bytes_moved(backward=False) == activation + x.numel() * 4  # plus placing x
    crossing = [t for t in sim.transfers if not t.host]
    assert crossing == [
        CopyRecord(
            src=CPU0,
            dst=CPU1,
            nbytes=activation,
            shape=(8, 32),
            dtype=torch.float32,
            backward=False,
            op="aten._to_copy.default",
        )
    ]
    assert str(crossing[0]) == (
        "cpu:0 -> cpu:1: 1024 B (float32[8, 32], forward, aten._to_copy.default)"
    )


def test_backward_gradient_transfer_is_logged() -> None:
    with SimulatedDevices(2) as sim:
        split = TwoLayerMLP(mlp(), "cpu:0", "cpu:1")
        out = split(torch.randn(8, 16))
        sim.reset()
        loss_of(out).backward()
    # x does not require grad, so the only gradient copy is the activation's, back to cpu:0.
    assert [(t.src, t.dst, t.nbytes, t.backward) for t in sim.transfers] == [
        (CPU1, CPU0, 8 * 32 * 4, True)
    ]
    assert sim.bytes_moved(backward=True) == 1024 and sim.bytes_moved(backward=False) == 0


def test_reset_and_host_filter() -> None:
    with SimulatedDevices(3) as sim:
        a = torch.ones(10).to("cpu:2")  # host -> cpu:2, 40 B
        b = a.to("cpu:0")  # cpu:2 -> cpu:0, 40 B
        b.to("cpu")  # cpu:0 -> host, 40 B
    assert len(sim.transfers) == 3 and sim.bytes_moved() == 120
    assert sim.bytes_moved(host=False) == 40
    assert [t.host for t in sim.transfers] == [True, False, True]
    sim.reset()
    assert sim.transfers == () and sim.bytes_moved() == 0


# --- transfers and creation --------------------------------------------------------------------


def test_to_between_host_and_logical_devices() -> None:
    x = torch.randn(3, 4)
    with SimulatedDevices(2) as sim:
        a = x.to("cpu:1")
        b = x.to(torch.device("cpu", 1))
        assert is_logical(a) and a.device == CPU1 and b.device == CPU1
        assert a.to("cpu:1") is a  # same device: no copy, nothing logged
        c = a.to("cpu:0")
        back, back_cpu = c.to("cpu"), c.cpu()
        d = a.to(torch.float64)  # a dtype change stays on the device
    assert type(back) is Tensor and back.device == torch.device("cpu")
    assert type(back_cpu) is Tensor
    assert d.device == CPU1 and d.dtype == torch.float64
    exact(c, x)
    assert torch.equal(back, x)
    assert [(t.src, t.dst) for t in sim.transfers] == [
        (torch.device("cpu"), CPU1),
        (torch.device("cpu"), CPU1),
        (CPU1, CPU0),
        (CPU0, torch.device("cpu")),
        (CPU0, torch.device("cpu")),
    ]


def test_copy_between_devices_is_a_logged_transfer() -> None:
    with SimulatedDevices(2) as sim:
        dst = torch.zeros(5, device="cpu:0")
        src = torch.arange(5.0, device="cpu:1")
        assert dst.copy_(src) is dst
    exact(dst, torch.arange(5.0))
    assert dst.device == CPU0
    assert [(t.src, t.dst, t.nbytes, t.op) for t in sim.transfers] == [
        (CPU1, CPU0, 20, "aten.copy_.default")
    ]


CREATORS: dict[str, Callable[[Any], Tensor]] = {
    "zeros": lambda device: torch.zeros(2, 3, device=device),
    "ones": lambda device: torch.ones(2, 3, device=device, dtype=torch.float16),
    "empty": lambda device: torch.empty(2, 3, device=device).fill_(7),
    "full": lambda device: torch.full((2, 3), 1.5, device=device),
    "arange": lambda device: torch.arange(0, 10, 2, device=device),
    "randn": lambda device: torch.randn(2, 3, device=device),
    "rand_like": lambda device: torch.rand_like(torch.zeros(4, device=device)),
    "eye": lambda device: torch.eye(3, device=device),
    "tensor": lambda device: torch.tensor([[1.0, 2.0]], device=device),
    "as_tensor": lambda device: torch.as_tensor([1, 2, 3], device=device),
    "asarray": lambda device: torch.asarray([[1.5], [2.5]], device=device),
    "new_tensor": lambda device: torch.zeros(1, device=device).new_tensor([4.0, 5.0]),
    "new_zeros": lambda device: torch.zeros(1, device=device).new_zeros(2, 2),
}


@pytest.mark.parametrize("name", sorted(CREATORS))
def test_creation_ops_make_tensors_on_the_logical_device(name: str) -> None:
    with torch.random.fork_rng():
        expected = CREATORS[name]("cpu")
    with SimulatedDevices(2):
        made = CREATORS[name]("cpu:1")
    assert is_logical(made) and made.device == CPU1
    exact(made, expected)  # the same values, random ones included: the same generator runs


def test_tensor_constructor_requires_grad_makes_a_logical_leaf() -> None:
    with SimulatedDevices(2):
        leaf = torch.tensor([1.0, 2.0], device="cpu:1", requires_grad=True)
        (leaf * leaf).sum().backward()
    assert leaf.is_leaf and leaf.requires_grad and leaf.grad is not None
    assert leaf.grad.device == CPU1
    exact(leaf.grad, torch.tensor([2.0, 4.0]))


def test_a_device_beyond_the_simulated_ones_raises() -> None:
    with SimulatedDevices(2):
        with pytest.raises(DeviceError, match=r"cpu:2 is not a simulated device.*cpu:0 \.\. cpu:1"):
            torch.zeros(3, device="cpu:2")
        with pytest.raises(DeviceError):
            torch.ones(3).to("cpu:5")
    with pytest.raises(DeviceError):
        SimulatedDevices(0)


# --- what may meet in one op -------------------------------------------------------------------


def test_cpu_scalar_mixes_but_a_plain_tensor_raises() -> None:
    with SimulatedDevices(2):
        x = torch.arange(4.0, device="cpu:1")
        scaled = x * torch.tensor(3.0)  # a 0-dim CPU tensor, as CUDA kernels accept
        assert scaled.device == CPU1
        with pytest.raises(DeviceMismatchError, match=r"plain CPU tensor \(other, shape \[4\]\)"):
            x + torch.ones(4)
        with pytest.raises(DeviceMismatchError, match="cpu:0 .* and cpu:1"):
            x + torch.ones(4, device="cpu:0")
        with pytest.raises(DeviceMismatchError):
            x * torch.tensor(3.0, device="cpu:0")  # a 0-dim tensor on another device does not
    exact(scaled, torch.arange(4.0) * 3)


def test_host_index_tensors_are_allowed_like_cuda() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    with SimulatedDevices(2):
        x = base.to("cpu:1")
        picked = x[[0, 2]]  # torch builds the index tensor on the host
        masked = x[torch.tensor([True, False, True])]
        x[torch.tensor([1])] = torch.tensor(-1.0)
        x[torch.tensor([False, False, True])] = torch.tensor(5.0)
        with pytest.raises(DeviceMismatchError):
            x.index_select(0, torch.tensor([0, 1]))  # not advanced indexing: CUDA refuses too
    exact(picked, base[[0, 2]])
    exact(masked, base[[0, 2]])
    assert to_plain(x)[1].eq(-1).all() and to_plain(x)[2].eq(5).all()


# --- autograd, parameters, optimizers, buffers -------------------------------------------------


def test_nn_parameter_of_a_logical_tensor() -> None:
    with SimulatedDevices(2):
        p = nn.Parameter(torch.ones(3, device="cpu:1"))
        (p * torch.arange(3.0, device="cpu:1")).sum().backward()
        module = nn.Module()
        module.p = p
    assert isinstance(p, nn.Parameter) and is_logical(p)
    assert p.requires_grad and p.is_leaf and p.device == CPU1
    assert [name for name, _ in module.named_parameters()] == ["p"]
    assert p.grad is not None
    exact(p.grad, torch.arange(3.0))


def test_module_to_swaps_parameters_and_back() -> None:
    lin = nn.Linear(3, 2)
    weight = lin.weight.detach().clone()
    with SimulatedDevices(2):
        lin.to("cpu:1")
        assert isinstance(lin.weight, nn.Parameter) and lin.weight.device == CPU1
        assert lin.weight.requires_grad and lin.weight.is_leaf
        lin.to("cpu:0")
        assert lin.weight.device == CPU0
        lin.to("cpu")
    assert type(lin.weight) is nn.Parameter and lin.weight.device == torch.device("cpu")
    assert torch.equal(lin.weight.detach(), weight)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_optimizer_steps_update_logical_params_like_plain(make: Callable[..., Any]) -> None:
    plain, xs = mlp(), [torch.randn(8, 16) for _ in range(3)]
    with SimulatedDevices(2):
        split = TwoLayerMLP(plain, "cpu:0", "cpu:1")
        opt = make(split.parameters())
        for x in xs:
            opt.zero_grad()
            loss_of(split(x)).backward()
            opt.step()
    ref_opt = make(plain.parameters())
    for x in xs:
        ref_opt.zero_grad()
        loss_of(plain(x)).backward()
        ref_opt.step()
    for (name, p), q in zip(split.named_parameters(), plain.parameters(), strict=True):
        assert p.device == (CPU0 if name.startswith("fc1") else CPU1)
        exact(p, q.detach())
        state = opt.state[p]
        assert state.get("exp_avg", state.get("momentum_buffer")).device == p.device


def test_batchnorm_updates_buffers_in_train_mode() -> None:
    plain = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    xs = [torch.randn(5, 4) for _ in range(2)]
    with SimulatedDevices(2):
        logical = copy.deepcopy(plain).to("cpu:1")
        outs = [logical(x.to("cpu:1")) for x in xs]
        outs[-1].sum().backward()
    refs = [plain(x) for x in xs]
    refs[-1].sum().backward()
    for out, ref in zip(outs, refs, strict=True):
        exact(out, ref)
    for (name, buf), ref_buf in zip(logical.named_buffers(), plain.buffers(), strict=True):
        assert buf.device == CPU1, name
        exact(buf, ref_buf)
    assert to_plain(logical[1].num_batches_tracked).item() == 2
    exact(logical[1].weight.grad, plain[1].weight.grad)


def test_inplace_ops_and_views_share_memory_and_keep_autograd() -> None:
    base = torch.randn(4, 3, requires_grad=True)
    with SimulatedDevices(2):
        x = base.to("cpu:1") * 1.0
        view = x.view(12)
        view.mul_(2)  # in place through a view: the base changes, autograd records it
        col = x[:, 1]  # a strided view
        col.add_(1)
        assert x.add_(0) is x  # in-place ops hand back the caller's tensor
        x.sum().backward()
        with pytest.raises(NotImplementedError, match="unsqueeze_"):
            torch.zeros(3, device="cpu:1").unsqueeze_(0)
    expected = base.detach() * 2
    expected[:, 1] += 1
    exact(x, expected)
    assert view.device == CPU1 and view._base is x
    exact(base.grad, torch.full((4, 3), 2.0))


def test_data_assignment_replaces_the_held_tensor() -> None:
    with SimulatedDevices(2):
        lin = nn.Linear(2, 3).to("cpu:0")
        lin.weight.data = torch.ones(3, 2, device="cpu:1")
        lin.weight.data.mul_(4)
        lin.bias.data = torch.zeros(3)  # a plain value makes a plain tensor (Module.to("cpu"))
    assert lin.weight.device == CPU1 and isinstance(lin.weight, nn.Parameter)
    assert lin.weight.requires_grad and lin.weight.is_leaf
    exact(lin.weight.detach(), torch.full((3, 2), 4.0))
    assert type(lin.bias) is nn.Parameter and lin.bias.requires_grad
    assert torch.equal(lin.bias.detach(), torch.zeros(3))


def test_module_to_fails_on_weakly_held_parameters_but_place_moves_them() -> None:
    plain = Block()
    gm = _exported_block(plain, torch.randn(2, 5, 16))
    with SimulatedDevices(2) as sim:
        with pytest.raises(RuntimeError, match="Couldn't swap"):
            gm.to("cpu:1")  # torch.utils.swap_tensors refuses: export's fake-tensor memo
        sim.reset()  # the failed attempt copied one parameter before giving up
        assert place(gm, "cpu:1") is gm
    assert {p.device for p in gm.parameters()} == {CPU1}
    assert all(type(p) is nn.Parameter for p in plain.parameters())  # the original is untouched
    assert sim.bytes_moved() == sum(p.numel() * 4 for p in plain.parameters())
    with pytest.raises(DeviceError, match="needs an active"):
        place(nn.Linear(2, 2), "cpu:0")


def test_no_grad_item_printing_and_format() -> None:
    with SimulatedDevices(2):
        w = torch.ones(2, 2, device="cpu:1", requires_grad=True)
        with torch.no_grad():
            y = w * 2
        z = (w * 3).sum()
        text, param = repr(z), repr(nn.Parameter(torch.zeros(2, device="cpu:0")))
    assert not y.requires_grad and z.requires_grad
    assert z.item() == 12.0 and f"{z:.1f}" == "12.0" and y.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert text == "tensor(12., device='cpu:1', grad_fn=<SumBackward0>)"
    assert param == "Parameter containing:\ntensor([0., 0.], device='cpu:0', requires_grad=True)"


def test_deepcopy_keeps_devices_values_grads_and_independence() -> None:
    with SimulatedDevices(2):
        split = TwoLayerMLP(mlp(), "cpu:0", "cpu:1")
        loss_of(split(torch.randn(2, 16))).backward()
        twin = copy.deepcopy(split)
        twin.fc2.weight.data.zero_()
    for (name, p), q in zip(split.named_parameters(), twin.parameters(), strict=True):
        assert q.device == p.device and isinstance(q, nn.Parameter) and q is not p, name
        assert q.grad is not None and p.grad is not None
        exact(q.grad, to_plain(p.grad))
        if name != "fc2.weight":
            exact(q, to_plain(p))
    assert to_plain(split.fc2.weight).abs().sum() > 0  # the copy owns its memory


def _renamed(state: dict[str, Tensor], prefixes: dict[str, str]) -> dict[str, Tensor]:
    """`state` with each key's first component renamed (``0.weight`` -> ``fc1.weight``)."""
    return {prefixes[k.split(".")[0]] + k[k.index(".") :]: v for k, v in state.items()}


def test_state_dict_round_trip() -> None:
    plain = mlp()
    with SimulatedDevices(2) as sim:
        split = TwoLayerMLP(mlp(), "cpu:0", "cpu:1")
        assert split.state_dict()["fc2.weight"].device == CPU1
        sim.reset()
        split.load_state_dict(_renamed(plain.state_dict(), {"0": "fc1", "2": "fc2"}))
        loaded = sim.transfers
        assert split.fc1.weight.device == CPU0 and split.fc2.bias.device == CPU1
        fresh = mlp()
        fresh.load_state_dict(_renamed(split.state_dict(), {"fc1": "0", "fc2": "2"}))
    for p, q in zip(split.parameters(), plain.parameters(), strict=True):
        exact(p, q.detach())
    for p, q in zip(fresh.parameters(), plain.parameters(), strict=True):
        assert type(p) is nn.Parameter and torch.equal(p.detach(), q.detach())
    host = torch.device("cpu")
    assert {(t.src, t.dst) for t in loaded} == {(host, CPU0), (host, CPU1)}


# --- a transformer-ish block, and graphs from torch.export and torch.fx --------------------------


class Block(nn.Module):
    """Pre-norm attention then pre-norm MLP, with residuals; `attn` and `mlp` may be split."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attend(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, s, d))

    def forward(self, x: Tensor) -> Tensor:
        h = self.attend(x)
        return h + self.mlp(self.ln2(h))


class SplitBlock(Block):
    """`Block` with attention on cpu:0 and the MLP on cpu:1."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.attend(x.to("cpu:0")).to("cpu:1")
        return h + self.mlp(self.ln2(h))


def place_block(block: nn.Module, move: Callable[[nn.Module, str], Any] = nn.Module.to) -> None:
    for name in ("ln1", "qkv", "proj"):
        move(block.get_submodule(name), "cpu:0")
    for name in ("ln2", "mlp"):
        move(block.get_submodule(name), "cpu:1")


def test_transformer_block_split_over_two_devices_with_autograd() -> None:
    plain, x = Block(), torch.randn(2, 5, 16, requires_grad=True)
    ref = plain(x)
    loss_of(ref).backward()
    ref_x_grad, x.grad = x.grad, None
    split = SplitBlock()
    split.load_state_dict(plain.state_dict())
    with SimulatedDevices(2) as sim:
        place_block(split)
        sim.reset()
        out = split(x)
        loss_of(out).backward()
    exact(out, ref)
    exact(x.grad, ref_x_grad)
    for p, q in zip(split.parameters(), plain.parameters(), strict=True):
        exact(p.grad, q.grad)
    crossing = [(t.src, t.dst, t.nbytes, t.backward) for t in sim.transfers if not t.host]
    assert crossing == [(CPU0, CPU1, 2 * 5 * 16 * 4, False), (CPU1, CPU0, 2 * 5 * 16 * 4, True)]


def _exported_block(plain: Block, x: Tensor) -> torch.fx.GraphModule:
    gm = torch.export.export(plain, (x,), strict=False).module()
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


def _insert_transfer(gm: torch.fx.GraphModule) -> None:
    """Move the attention half's output (the first residual sum) to cpu:1, as a rewrite would."""
    norm2 = next(
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and any(path == "ln2" for path, _ in n.meta.get("nn_module_stack", {}).values())
    )
    boundary = norm2.args[0]
    with gm.graph.inserting_after(boundary):
        moved = gm.graph.call_function(
            torch.ops.aten._to_copy.default, (boundary,), {"device": CPU1}
        )
    boundary.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
    gm.graph.lint()
    gm.recompile()


def test_export_graph_module_runs_on_logical_devices() -> None:
    plain, x = Block(), torch.randn(2, 5, 16)
    gm = _exported_block(plain, x)
    _insert_transfer(gm)
    with SimulatedDevices(2) as sim:
        place_block(gm, place)  # the export module keeps the submodule hierarchy
        sim.reset()
        out = gm(x.to("cpu:0"))
        loss_of(out).backward()
    ref = plain(x)
    loss_of(ref).backward()
    exact(out, ref)
    for (name, p), q in zip(gm.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is not None, name
        exact(p.grad, q.grad)
    assert sim.bytes_moved(backward=False, host=False) == 2 * 5 * 16 * 4


def test_export_graph_module_without_the_transfer_raises() -> None:
    plain, x = Block(), torch.randn(2, 5, 16)
    gm = _exported_block(plain, x)
    with SimulatedDevices(2):
        place_block(gm, place)
        with pytest.raises(DeviceMismatchError, match="cpu:0 .* and cpu:1"):
            gm(x.to("cpu:0"))


def test_export_lifted_tensor_constants_stay_on_the_host() -> None:
    """A tensor literal in forward becomes a plain attribute of the export module: Module.to
    does not move it, so running on another device fails, on a GPU as here."""

    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x) + torch.tensor([1.0, 2.0, 3.0])

    gm = torch.export.export(WithConstant(), (torch.randn(2, 3),), strict=False).module()
    with SimulatedDevices(2):
        place(gm, "cpu:1")
        with pytest.raises(DeviceMismatchError, match="plain CPU tensor .*never placed"):
            gm(torch.randn(2, 3).to("cpu:1"))


def test_symbolic_trace_graph_module_runs_on_logical_devices() -> None:
    plain, x = mlp(), torch.randn(8, 16)
    ref = plain(x)
    loss_of(ref).backward()
    with SimulatedDevices(2) as sim:
        gm = torch.fx.symbolic_trace(TwoLayerMLP(plain, "cpu:0", "cpu:1"))
        assert gm.fc1.weight.device == CPU0
        sim.reset()
        out = gm(x)
        loss_of(out).backward()
    exact(out, ref)
    exact(gm.fc1.weight.grad, plain[0].weight.grad)
    assert sim.bytes_moved(backward=False, host=False) == 8 * 32 * 4


# --- outside the mode, and the helpers ----------------------------------------------------------


def test_logical_tensors_outside_the_mode_compute_check_and_log_nothing() -> None:
    with SimulatedDevices(2) as sim:
        a = torch.ones(3, device="cpu:0")
        b = torch.ones(3, device="cpu:1")
    sim.reset()
    c = a + a
    moved = a.to("cpu:1")
    assert c.device == CPU0 and moved.device == CPU1 and repr(c).endswith("device='cpu:0')")
    assert sim.transfers == ()
    with pytest.raises(DeviceMismatchError, match="No SimulatedDevices is active"):
        a + b


def test_backward_outside_the_mode_says_so() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    with SimulatedDevices(2):
        first, _, _ = x.to("cpu:1").unbind(1)
    # unbind's backward stacks the gradient with zeros autograd makes by device: without the
    # mode they land on the host.
    with pytest.raises(DeviceMismatchError, match=r"around backward\(\)"):
        first.sum().backward()


def test_helpers() -> None:
    assert logical_device(3) == torch.device("cpu", 3)
    for bad in (-1, 1.0, True):
        with pytest.raises(DeviceError):
            logical_device(bad)  # type: ignore[arg-type]
    with SimulatedDevices(2) as sim:
        t = torch.arange(3.0, device="cpu:1", requires_grad=True)
        tree = {"out": (t * 2, [t]), "n": 1, "plain": torch.ones(1)}
    assert sim.devices == (CPU0, CPU1)
    assert is_logical(t) and isinstance(t, LogicalTensor) and not is_logical(torch.ones(1))
    plain = to_plain(tree)
    assert plain["n"] == 1 and plain["plain"] is tree["plain"]
    doubled, (same,) = plain["out"]
    assert type(doubled) is Tensor and not doubled.requires_grad
    assert torch.equal(doubled, torch.arange(3.0) * 2)
    same[0] = 9.0  # shares memory with the logical tensor
    assert t.detach()[0].item() == 9.0
    assert sim.transfers == ()
