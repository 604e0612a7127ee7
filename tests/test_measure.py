"""measure_layers and whole_step_time on the zoo: what gets measured, and that nothing else changes.

Timings on a shared 2-core host swing by several times, so no test compares seconds:
they check which layers get a time, under which profile, and the caller's state.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from partitioner.cost_model import layer_time
from partitioner.devices import resolve_devices
from partitioner.ir import LayerGraph
from partitioner.layers import LayeredModel, build_layers
from partitioner.measure import capture, measure_layers, units, whole_step_time
from partitioner.measure.capture import capture_units
from partitioner.measure.timing import Samples, layer_times, time_rounds
from partitioner.measure.units import Unit
from partitioner.options import PlanOptions
from partitioner.profiling import _flat_inputs, profile_nodes
from partitioner.simdevice import SimulatedDevices
from partitioner.trace import trace_model
from tests.models import ZOO

CPU = resolve_devices(["cpu"])
QUICK: dict[str, Any] = {"repeats": 2, "budget_s": 30.0}

Case = tuple[nn.Module, tuple[Any, ...], dict[str, Any], LayeredModel]
_CASES: dict[str, Case] = {}


def _layered(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LayeredModel:
    """Trace, profile and group, as `partitioner.api.compile_plan` does."""
    traced = trace_model(model, args, kwargs)
    return build_layers(traced, profile_nodes(traced.gm, args, kwargs))


def zoo_case(name: str) -> Case:
    """A zoo model, its inputs and its layers (built once per test session)."""
    if name not in _CASES:
        model, args, kwargs = ZOO[name].build()
        _CASES[name] = (model, args, kwargs, _layered(model, args, kwargs))
    return _CASES[name]


def _without_times(graph: LayerGraph) -> LayerGraph:
    return replace(graph, layers=tuple(replace(l, fwd_time_s={}, bwd_time_s={}) for l in graph.layers))


@pytest.mark.parametrize("name", ["mlp", "branchy", "cnn", "gpt2"])
def test_every_layer_gets_a_forward_time_and_layers_with_flops_a_backward_time(name: str) -> None:
    _, args, kwargs, layered = zoo_case(name)
    graph = measure_layers(layered, args, kwargs, CPU, **QUICK)
    assert _without_times(graph) == layered.graph  # only the times were added
    for layer in graph.layers:
        assert set(layer.fwd_time_s) == set(layer.bwd_time_s) == {"cpu"}
        assert layer.fwd_time_s["cpu"] > 0, layer.name
        assert layer.bwd_time_s["cpu"] >= 0, layer.name
        if layer.fwd_flops:
            assert layer.bwd_time_s["cpu"] > 0, layer.name
    assert sum(layer.fwd_time_s["cpu"] for layer in graph.layers) > 0


def test_the_cost_model_takes_the_measured_times() -> None:
    _, args, kwargs, layered = zoo_case("mlp")
    graph = measure_layers(layered, args, kwargs, CPU, **QUICK)
    cpu = CPU[0].profile
    for layer in graph.layers:
        assert layer_time(layer, cpu, PlanOptions()) == pytest.approx(layer.fwd_time_s["cpu"])
        both = layer.fwd_time_s["cpu"] + layer.bwd_time_s["cpu"]
        assert layer_time(layer, cpu, PlanOptions(training=True)) == pytest.approx(both)


def test_logical_devices_share_one_measurement() -> None:
    _, args, kwargs, layered = zoo_case("mlp")
    lines: list[str] = []
    graph = measure_layers(layered, args, kwargs, resolve_devices(["cpu:0", "cpu:1"]), progress=lines.append, **QUICK)
    assert all(set(layer.fwd_time_s) == {"cpu"} for layer in graph.layers)
    assert sum("warm-up" in line for line in lines) == 1  # timed once, not once per device
    assert len(lines) == 1 + QUICK["repeats"]  # one line per round


def test_absent_devices_are_skipped() -> None:
    _, args, kwargs, layered = zoo_case("mlp")
    assert measure_layers(layered, args, kwargs, resolve_devices(["a100-80gb"]), **QUICK) is layered.graph
    graph = measure_layers(layered, args, kwargs, resolve_devices(["cpu", "a100-80gb x2"]), **QUICK)
    assert all(set(layer.fwd_time_s) == set(layer.bwd_time_s) == {"cpu"} for layer in graph.layers)


def test_a_model_on_meta_is_returned_unchanged() -> None:
    model = ZOO["mlp"].make_model().to("meta")
    args = (torch.empty(4, 1024, device="meta"),)
    layered = _layered(model, args, {})
    assert measure_layers(layered, args, {}, CPU, **QUICK) is layered.graph


def _snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.device, bool]]:
    state = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    return {k: (t.detach().clone(), t.device, t.requires_grad) for k, t in state.items()}


def _assert_same(before: dict[str, tuple[torch.Tensor, torch.device, bool]], module: nn.Module) -> None:
    after = _snapshot(module)
    assert after.keys() == before.keys()
    for k, (value, device, requires_grad) in before.items():
        torch.testing.assert_close(after[k][0], value, rtol=0, atol=0, msg=k)
        assert after[k][1:] == (device, requires_grad), k
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_the_callers_model_graph_inputs_and_global_state_are_unchanged(name: str) -> None:
    # cnn: BatchNorm in train mode, whose running statistics would advance if its modules ran;
    # gpt2: a torch.export graph with a tied weight.
    model, args, kwargs, layered = zoo_case(name)
    gm = layered.traced.gm
    model_before, gm_before = _snapshot(model), _snapshot(gm)
    code, nodes = gm.code, [(n.name, n.op, str(n.target), n.args, n.kwargs) for n in gm.graph.nodes]
    inputs = [x.clone() for x in args]
    threads, rng = torch.get_num_threads(), torch.get_rng_state()

    measure_layers(layered, args, kwargs, CPU, **QUICK)

    _assert_same(model_before, model)
    _assert_same(gm_before, gm)
    assert gm.code == code and [(n.name, n.op, str(n.target), n.args, n.kwargs) for n in gm.graph.nodes] == nodes
    assert not any(hasattr(n, "_fx_partition") for n in gm.graph.nodes)  # split_module marks the graph it splits
    for x, y in zip(args, inputs, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_budget_spent_before_the_first_round_stops_without_error() -> None:
    _, args, kwargs, layered = zoo_case("gpt2")
    lines: list[str] = []
    graph = measure_layers(layered, args, kwargs, CPU, budget_s=0.0, progress=lines.append)
    assert graph is layered.graph
    assert any("stopped by the time budget" in line for line in lines)


def test_layer_times_keep_the_rounds_every_unit_of_a_layer_completed() -> None:
    # Layer 0 was timed node by node (two units), layer 1 not at all before the budget ran out,
    # layer 2 produces nothing that requires grad.
    def unit(layer: int, differentiable: bool = True) -> Any:
        return Unit(layer=layer, name="n", fn=torch.relu, args=(), kwargs={}, differentiable=differentiable)

    recorded = [unit(0), unit(0), unit(1), unit(2, differentiable=False)]
    samples = [
        Samples(fwd=[1.0, 2.0, 9.0], fwd_grad=[2.0, 3.0, 9.0], bwd=[4.0, 4.0, 9.0]),
        Samples(fwd=[1.0, 2.0], fwd_grad=[1.0, 2.0], bwd=[2.0, 4.0]),
        Samples(),
        Samples(fwd=[1.0], fwd_grad=[5.0], bwd=[0.0]),
    ]
    times = layer_times(recorded, samples)
    # Layer 0, per round: fwd 2, 4; fwd_grad 3, 5; bwd 6, 8. bwd = 7 + (4 - 3).
    assert times == {0: (3.0, 8.0), 2: (1.0, 0.0)}


def test_a_frozen_model_has_no_backward() -> None:
    model, args, kwargs = ZOO["branchy"].build()
    model.requires_grad_(False)
    graph = measure_layers(_layered(model, args, kwargs), args, kwargs, CPU, **QUICK)
    assert all(layer.fwd_time_s["cpu"] > 0 and layer.bwd_time_s["cpu"] == 0.0 for layer in graph.layers)


def test_a_layer_that_writes_its_input_in_place_is_timed_on_copies() -> None:
    # The in-place ReLU joins the second Linear's layer and so writes that layer's input: a
    # leaf that requires grad, which autograd refuses to see written.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    args = (torch.randn(3, 8),)
    layered = _layered(model, args, {})
    before = _snapshot(model)
    graph = measure_layers(layered, args, {}, CPU, **QUICK)
    assert all(layer.fwd_time_s["cpu"] > 0 and layer.bwd_time_s["cpu"] > 0 for layer in graph.layers)
    _assert_same(before, model)


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_without_split_module_nodes_are_timed_one_by_one(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def cycle(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cycle exists between partitions!")

    monkeypatch.setattr(capture, "split_module", cycle)
    model, args, kwargs, layered = zoo_case(name)
    before = _snapshot(model)
    lines: list[str] = []
    graph = measure_layers(layered, args, kwargs, CPU, progress=lines.append, **QUICK)
    assert any("timing node by node" in line for line in lines)
    for layer in graph.layers:
        assert layer.fwd_time_s["cpu"] > 0, layer.name
        if layer.fwd_flops:
            assert layer.bwd_time_s["cpu"] > 0, layer.name
    _assert_same(before, model)


def _time_on_simulated_device(name: str, say: Any = lambda _: None) -> dict[int, tuple[float, float]]:
    """The CUDA path (each layer copied to the device for its visit) on a simulated device,
    which raises on any tensor or device constant left on the host."""
    _, args, kwargs, layered = zoo_case(name)
    recorded = capture_units(layered, _flat_inputs(layered.traced.gm, args, kwargs), frozenset(), say)
    with SimulatedDevices(2):
        samples = time_rounds(
            recorded,
            torch.device("cpu", 1),
            copy_to_device=True,
            repeats=1,
            deadline=time.perf_counter() + 60,
            say=say,
            label="simulated",
        )
    return layer_times(recorded, samples)


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_device_copies_hold_every_tensor_on_the_device(name: str) -> None:
    times = _time_on_simulated_device(name)
    assert set(times) == set(range(len(zoo_case(name)[3].graph.layers)))


def test_a_layer_that_fails_on_the_device_keeps_its_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without retargeting, GPT-2's position ids stay on the host (``arange(..., device=cpu)``).
    monkeypatch.setattr(units, "_retarget", lambda module, device: None)
    lines: list[str] = []
    times = _time_on_simulated_device("gpt2", lines.append)
    failed = [line for line in lines if "DeviceMismatchError" in line]
    assert failed and all("it keeps its estimate" in line for line in failed)
    assert 0 < len(times) == len(zoo_case("gpt2")[3].graph.layers) - len(failed)  # the others were timed


def test_whole_step_time_is_positive_and_stores_no_gradients() -> None:
    model, args, kwargs, _ = zoo_case("gpt2")
    threads = torch.get_num_threads()
    forward_s, step_s = whole_step_time(model, args, kwargs, repeats=2)
    assert forward_s > 0 and step_s > 0
    assert all(p.grad is None for p in model.parameters())
    assert torch.get_num_threads() == threads


def test_bad_arguments_are_refused() -> None:
    model, args, kwargs, layered = zoo_case("mlp")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_layers(layered, args, kwargs, CPU, repeats=0)
    with pytest.raises(ValueError, match="budget_s must be >= 0"):
        measure_layers(layered, args, kwargs, CPU, budget_s=-1.0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        whole_step_time(model, args, kwargs, repeats=0)
