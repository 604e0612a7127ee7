"""Bad input gets a typed error that names the cause, the numbers and a fix, and leaves the
user's model as it was; plans are deterministic; the rewritten module is an ordinary module.

docs/robustness.md lists each bad input, its error and the test here (or in test_plan.py,
test_devices.py) that shows it.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import partitioner
from partitioner import PlanOptions, SolverOptions, Strategy, to_plain
from partitioner.errors import (
    DeviceError,
    InfeasibleError,
    PartitionerError,
    PlanFormatError,
    PlanMismatchError,
    ProfileError,
    TraceError,
)
from partitioner.options import Objective
from partitioner.units import format_bytes
from tests.models import ZOO, BranchyModel
from tests.helpers import assert_unchanged, forcing_caps, layer_memory, snapshot

NO_DP = PlanOptions(training=True, memory_reserve=0.0, allow_data_parallel=False)
TWO = ["cpu:0", "cpu:1"]
REPO = Path(__file__).resolve().parents[1]


def split(name: str, devices: list[str] = TWO, **kw: Any) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], Any]:
    """Zoo model `name`, its inputs, and its partitioned module, split by memory caps."""
    model, args, kwargs = ZOO[name].build()
    cap = forcing_caps(name, len(devices))
    kw = {"options": NO_DP, "max_memory": {d: cap for d in devices}, "measure": False, **kw}
    pm = partitioner.auto_parallelize(model, devices, args, kwargs, **kw)
    return model, args, kwargs, pm


def assert_same(got: Any, expected: Any) -> None:
    torch.testing.assert_close(to_plain(got), expected, rtol=1e-5, atol=1e-6)


# =========================================================================== bad input


class DataDependent(nn.Module):
    """Branches on a tensor's value: neither torch.fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:
            return h
        return -h


def test_untraceable_model_raises_trace_error_naming_file_and_line() -> None:
    model = DataDependent()
    before = snapshot(model)
    lines, start = inspect.getsourcelines(DataDependent.forward)
    branch = start + next(i for i, line in enumerate(lines) if "if h.sum() > 0" in line)
    with pytest.raises(TraceError) as raised:
        partitioner.auto_parallelize(model, TWO, (torch.randn(2, 4),), measure=False)
    message = str(raised.value)
    assert f"{__file__}:{branch} in forward: if h.sum() > 0:" in message
    assert "torch.fx.symbolic_trace" in message and "torch.export.export" in message  # both front ends tried
    assert "Fix:" in message and "torch.where" in message and "torch.cond" in message
    assert_unchanged(model, before)


class NoneDecides(nn.Module):
    """Decides on nn.MultiheadAttention's None weights: a symbolic trace sees a proxy, not None."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, weights = self.attn(x, x, x, need_weights=False)
        return self.fc(h) * (1.0 if weights is None else 0.5)


def test_a_symbolic_trace_that_computes_something_else_is_not_used() -> None:
    """Regression: torch.fx traced ``0.5 if weights is None`` as 0.5; the plan computed half the output."""
    model = NoneDecides()
    x = torch.randn(2, 3, 4)
    with pytest.raises(TraceError, match=r"output 0 of the graph differs from the model's.*frontend='export'"):
        partitioner.plan(model, ["cpu"], (x,), frontend="fx", measure=False)
    pm = partitioner.auto_parallelize(model, TWO, (x,), options=NO_DP, measure=False)
    assert pm.plan.frontend == "export"
    assert_same(pm(x), model(x))


def test_a_layer_larger_than_every_device_is_infeasible_naming_it_and_the_numbers() -> None:
    model, args, kwargs = ZOO["mlp"].build()
    before = snapshot(model)
    need = max(layer_memory(model, args, {}, NO_DP))
    cap = need // 2
    with pytest.raises(InfeasibleError) as raised:
        partitioner.auto_parallelize(model, TWO, args, options=NO_DP, max_memory={"cpu": cap}, measure=False)
    message = str(raised.value)
    assert "layer 'fc1'" in message  # the 1024x512 Linear is the largest layer
    assert f"needs {format_bytes(need)}" in message and f"has {format_bytes(cap)}" in message
    assert "give it more memory or split the layer finer" in message
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        pytest.param([], r"no devices given; name at least one, e\.g\. \['cpu'\]", id="empty"),
        pytest.param(["gpu:0"], r"unknown device 'gpu:0': not 'cpu', 'cpu:N', 'cuda'.*profiles: .*a100-80gb", id="unknown"),
        pytest.param(["cpu:0", "cpu:0"], r"'cpu:0' is listed twice \(positions 0 and 1\).*'cpu x2'", id="duplicate"),
        pytest.param(["cpu:0", "cpu x2"], r"'cpu:0' is listed twice \(positions 0 and 1\)", id="duplicate-expanded"),
        pytest.param(["a100-90gb x2"], r"unknown device 'a100-90gb x2'.*profiles: .*a100-80gb.*h200", id="unknown-profile"),
        pytest.param(["a100-80gb x0"], r"device count in 'a100-80gb x0' must be >= 1 \(got 0\)", id="zero-count"),
        pytest.param(
            ["cpu:200"], r"cannot address device 'cpu:200' \(indices go up to 127\); number the devices from 0", id="index-beyond-torch"
        ),
        pytest.param([None], r"device specs must be strings \(got None", id="not-a-string"),
    ],
)
def test_bad_devices_raise_device_error_and_leave_the_model(devices: list[Any], expected: str) -> None:
    model, args, _ = ZOO["mlp"].build()
    before = snapshot(model)
    with pytest.raises(DeviceError, match=expected):
        partitioner.auto_parallelize(model, devices, args, measure=False)
    assert_unchanged(model, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_cuda_device_says_how_many_there_are_and_suggests_a_profile() -> None:
    model, args, _ = ZOO["mlp"].build()
    with pytest.raises(DeviceError, match=r"'cuda:7' is not available: this machine has 0 CUDA device.*'a100-80gb x4'"):
        partitioner.auto_parallelize(model, ["cuda:7"], args, measure=False)


def test_absent_hardware_needs_simulate_to_run() -> None:
    model, args, _ = ZOO["mlp"].build()
    before = snapshot(model)
    with pytest.raises(DeviceError, match=r"a100-80gb:0, a100-80gb:1 are not present here.*simulate=True"):
        partitioner.auto_parallelize(model, ["a100-80gb x2"], args, measure=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("devices", [["cpu:1"], ["cpu:3", "cpu:7"], ["cpu:1", "cpu:0"]])
def test_simulated_devices_need_not_start_at_zero(devices: list[str]) -> None:
    """Regression: ``["cpu:1"]`` raised "cpu:1 is not a simulated device: SimulatedDevices(1)"."""
    model, args, _ = ZOO["mlp"].build()
    pm = partitioner.auto_parallelize(model, devices, args, measure=False)
    assert pm.simulator is not None
    assert_same(pm(*args), model(*args))


def test_hostile_profile_file_raises_profile_error_naming_file_and_key(tmp_path: Path) -> None:
    """The front door passes profile errors through; test_devices.py covers the file format case by case."""
    data = json.loads((REPO / "profiles" / "a100-80gb.json").read_text())
    data["memory_bytes"] = -1
    path = tmp_path / "lab-gpu.json"
    path.write_text(json.dumps(dict(data, name="lab-gpu")))
    model, args, _ = ZOO["mlp"].build()
    before = snapshot(model)
    with pytest.raises(ProfileError, match=rf"{path}.*'memory_bytes' must be finite and in \(0"):
        partitioner.plan(model, [str(path)], args, measure=False)
    assert_unchanged(model, before)


def test_truncated_plan_file_raises_plan_format_error(tmp_path: Path) -> None:
    """Loading a damaged file; test_plan.py::test_from_json_rejects_malformed_input covers the rest."""
    model, args, _ = ZOO["mlp"].build()
    path = tmp_path / "plan.json"
    path.write_text(partitioner.plan(model, TWO, args, measure=False).to_json()[:-40])
    with pytest.raises(PlanFormatError, match="a plan must be JSON written by Plan.to_json"):
        partitioner.Plan.from_json(path.read_text())


@pytest.fixture(scope="module")
def mlp_plan() -> partitioner.Plan:
    model, args, _ = ZOO["mlp"].build()
    return partitioner.plan(model, TWO, args, options=NO_DP, max_memory={"cpu": forcing_caps("mlp", 2)}, measure=False)


def test_a_plan_for_another_model_raises_plan_mismatch(mlp_plan: partitioner.Plan) -> None:
    other, args, kwargs = ZOO["branchy"].build()
    before = snapshot(other)
    expected = r"made for Sequential \(fingerprint \w+\) but this model traces to BranchyModel"
    with pytest.raises(PlanMismatchError, match=expected):
        partitioner.auto_parallelize(other, TWO, args, kwargs, plan=mlp_plan, measure=False)
    assert_unchanged(other, before)


def test_a_plan_for_other_shapes_raises_plan_mismatch(mlp_plan: partitioner.Plan) -> None:
    wider = ZOO["mlp"].make_model()
    wider.fc4 = nn.Linear(128, 11)  # same graph, another shape
    with pytest.raises(PlanMismatchError, match="plan this model again"):
        partitioner.auto_parallelize(wider, TWO, (torch.randn(4, 1024),), plan=mlp_plan, measure=False)


def test_a_plan_for_more_devices_than_given_raises_plan_mismatch(mlp_plan: partitioner.Plan) -> None:
    """Regression: the plan's device 1 indexed past the one device given (IndexError)."""
    model, args, _ = ZOO["mlp"].build()
    expected = r"places layers on 2 device\(s\) \(cpu:0, cpu:1\) but 1 were given \(cpu:0\)"
    with pytest.raises(PlanMismatchError, match=expected):
        partitioner.auto_parallelize(model, ["cpu:0"], args, plan=mlp_plan, measure=False)


def test_an_edited_plan_with_other_layers_raises_plan_mismatch(mlp_plan: partitioner.Plan) -> None:
    model, args, _ = ZOO["mlp"].build()
    edited = partitioner.Plan.from_json(mlp_plan.to_json())
    edited = dataclasses.replace(edited, layers=edited.layers[:-1])
    expected = r"the plan has 6 layers but this model has 7 \(first difference: \(None, 'fc4'\)\)"
    with pytest.raises(PlanMismatchError, match=expected):
        partitioner.auto_parallelize(model, TWO, args, plan=edited, measure=False)


def test_a_replicating_plan_for_a_model_with_batch_statistics_raises_plan_mismatch() -> None:
    model, args, kwargs = ZOO["cnn"].build()  # BatchNorm in training mode
    fresh = partitioner.plan(model, TWO, args, kwargs, options=NO_DP, measure=False)
    replicated = dataclasses.replace(
        fresh, strategy=Strategy.DATA_PARALLEL, layers=tuple(dataclasses.replace(l, device=0) for l in fresh.layers)
    )
    before = snapshot(model)
    expected = r"replicates the model, but bn1 \(BatchNorm2d, training\) normalises by batch statistics"
    with pytest.raises(PlanMismatchError, match=expected):
        partitioner.auto_parallelize(model, TWO, args, kwargs, plan=replicated, measure=False)
    assert_unchanged(model, before)


def test_the_planner_does_not_replicate_a_model_with_batch_statistics() -> None:
    """Regression: the CNN (BatchNorm in training mode) was replicated, and each replica
    normalised its half batch by its own statistics: outputs off by 0.1, running statistics lost."""
    model, args, kwargs = ZOO["cnn"].build()
    said: list[str] = []
    options = PlanOptions(training=True, memory_reserve=0.0)
    pm = partitioner.auto_parallelize(model, TWO, args, kwargs, options=options, measure=False, progress=said.append)
    assert pm.plan.strategy is not Strategy.DATA_PARALLEL
    assert any("not considering data parallelism: bn1 (BatchNorm2d, training)" in s for s in said), said
    expected = model(*args)
    assert_same(pm(*args), expected)
    for name, buffer in model.named_buffers():  # the running statistics moved as the original's did
        assert_same(pm.module.get_buffer(name), buffer)


class Ladder(nn.Module):
    """Two towers, the right one twice as heavy, crossing every third block: a DAG whose
    placement ILP takes a while to prove (no path holds all the work, so the path bound
    of `partitioner.solve.bounds` cannot settle it, as it does when every block reads both)."""

    def __init__(self, depth: int = 60, width: int = 32, cross_every: int = 3) -> None:
        super().__init__()
        self.cross_every = cross_every
        self.left = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.right = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.Linear(2 * width, width)) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x, x
        for i, (f, g) in enumerate(zip(self.left, self.right)):
            if i % self.cross_every == 0:
                a, b = torch.relu(f(a)) + b, torch.tanh(g(b)) + a
            else:
                a, b = torch.relu(f(a)), torch.tanh(g(b))
        return a + b


def test_a_solver_time_out_returns_the_best_plan_with_an_honest_gap() -> None:
    torch.manual_seed(0)
    model, x = Ladder(), torch.randn(64, 32)
    devices = [f"cpu:{k}" for k in range(4)]
    total = sum(layer_memory(model, (x,), {}, NO_DP))

    def plan(time_limit_s: float) -> partitioner.Plan:
        solver = SolverOptions(time_limit_s=time_limit_s)
        options = dataclasses.replace(NO_DP, objective=Objective.THROUGHPUT, solver=solver)
        caps = {"cpu": int(total / 3.3)}
        return partitioner.plan(model, devices, (x,), options=options, max_memory=caps, measure=False)

    start = time.perf_counter()
    hurried = plan(0.01)
    assert time.perf_counter() - start < 300  # a sanity bound only: it returns, it does not hang
    assert not hurried.solver.optimal and 0 < hurried.solver.gap <= 1, hurried.solver
    best = plan(600.0)
    assert best.solver.optimal
    # The gap is a proved bound: no plan is better than predicted * (1 - gap).
    assert hurried.predicted_s * (1 - hurried.solver.gap) <= best.predicted_s * (1 + 1e-6)
    assert hurried.predicted_s >= best.predicted_s * (1 - 1e-6)
    pm = partitioner.auto_parallelize(model, devices, (x,), plan=hurried, measure=False)
    assert_same(pm(x), model(x))


# =========================================================================== determinism

DETERMINISM_SCRIPT = """
import torch, partitioner
from partitioner import PlanOptions
from tests.models import ZOO
from tests.helpers import forcing_caps
for name in ("branchy", "tied"):
    model, args, kwargs = ZOO[name].build()
    options = PlanOptions(training=True, memory_reserve=0.0)
    print(partitioner.plan(model, ["cpu:0", "cpu:1", "cpu:2"], args, kwargs, options=options,
                           max_memory={"cpu": forcing_caps(name, 3)}, measure=False).to_json())
"""


def test_the_same_inputs_give_the_same_plan_byte_for_byte() -> None:
    for name in ("branchy", "tied"):
        model, args, kwargs = ZOO[name].build()
        cap = forcing_caps(name, 2)
        plans = [
            partitioner.plan(model, TWO, args, kwargs, options=NO_DP, max_memory={"cpu": cap}, measure=False)
            for _ in range(2)
        ]
        assert plans[0].to_json() == plans[1].to_json()


def test_plans_do_not_depend_on_the_hash_seed_or_the_process() -> None:
    """Regression: fingerprints hashed ``str(torch.cat)``, which holds a memory address, so a
    plan saved by one process was refused by the next as made for another model."""
    outputs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run(
            [sys.executable, "-c", DETERMINISM_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    assert '"strategy": "model_parallel"' in outputs[0]


# =========================================================================== module hygiene


@pytest.mark.parametrize("name", ["branchy", "tied"])
def test_a_partitioned_module_can_be_partitioned_again(name: str) -> None:
    model, args, kwargs, pm = split(name)
    with pm.simulator:
        pm(*args, **kwargs)
    log = pm.simulator.transfers
    before = snapshot(pm)
    three = ["cpu:0", "cpu:1", "cpu:2"]
    again = partitioner.auto_parallelize(
        pm, three, args, kwargs, options=NO_DP, max_memory={"cpu": forcing_caps(name, 3)}, measure=False
    )
    assert len(set(again.plan.assignment)) >= 2
    assert again.plan.frontend == pm.plan.frontend
    assert_same(again(*args, **kwargs), model(*args, **kwargs))
    assert_unchanged(pm, before)
    assert pm.simulator.transfers == log  # regression: planning ran pm and logged fake transfers into it
    copy.deepcopy(pm)


def test_a_replicated_module_can_be_partitioned_again() -> None:
    model, _, _ = ZOO["mlp"].build()
    x = torch.randn(64, 1024)
    fresh = partitioner.plan(model, TWO, (x,), options=NO_DP, measure=False)
    replicated = dataclasses.replace(
        fresh, strategy=Strategy.DATA_PARALLEL, layers=tuple(dataclasses.replace(l, device=0) for l in fresh.layers)
    )
    pm = partitioner.auto_parallelize(model, TWO, (x,), plan=replicated, measure=False)
    caps = {"cpu": forcing_caps("mlp", 2)}
    again = partitioner.auto_parallelize(pm, TWO, (x,), options=NO_DP, max_memory=caps, measure=False)
    assert again.plan.strategy is Strategy.MODEL_PARALLEL
    assert_same(again(x), model(x))


def test_planning_an_export_graph_again_sees_its_batch_statistics() -> None:
    """A torch.export graph holds BatchNorm as ``aten.batch_norm(..., training=True)``, not as a module."""
    torch.manual_seed(0)
    model, x = Regularised(), torch.randn(8, 6)
    pm = partitioner.auto_parallelize(model, TWO, (x,), options=NO_DP, frontend="export", measure=False)
    said: list[str] = []
    options = PlanOptions(training=True, memory_reserve=0.0)
    again = partitioner.auto_parallelize(pm, TWO, (x,), options=options, measure=False, progress=said.append)
    assert "not considering data parallelism: node batch_norm (aten.batch_norm.default, training)" in said[0]
    assert again.plan.strategy is not Strategy.DATA_PARALLEL


def test_a_deep_copy_computes_the_same_and_shares_nothing() -> None:
    model, args, kwargs, pm = split("branchy")
    twin = copy.deepcopy(pm)
    assert_same(twin(*args, **kwargs), model(*args, **kwargs))
    with twin.simulator:
        for p in twin.parameters():
            p.data.zero_()
    assert_same(pm(*args, **kwargs), model(*args, **kwargs))
    assert {id(p) for p in twin.parameters()}.isdisjoint(id(p) for p in pm.parameters())


@pytest.mark.parametrize("name", ["branchy", "gpt2"])
def test_to_gathers_onto_one_device_and_computes_the_same(name: str) -> None:
    model, args, kwargs, pm = split(name)
    case = ZOO[name]
    with pm.simulator:
        pm(*args, **kwargs)  # run on the simulated devices first
        pm.to("cpu")
    assert pm.simulator is None
    state = pm.state_dict().values()
    assert all(type(t) is torch.Tensor and t.device == torch.device("cpu") for t in state)
    for got, expected in zip(case.outputs(pm(*args, **kwargs)), case.outputs(model(*args, **kwargs))):
        assert_same(got, expected)


def test_to_gathers_a_replicated_module() -> None:
    model, _, _ = ZOO["mlp"].build()
    x = torch.randn(8, 1024)
    fresh = partitioner.plan(model, TWO, (x,), options=NO_DP, measure=False)
    replicated = dataclasses.replace(fresh, strategy=Strategy.DATA_PARALLEL)
    pm = partitioner.auto_parallelize(model, TWO, (x,), plan=replicated, measure=False).to("cpu")
    assert pm.module.devices == ("cpu",)
    assert_same(pm(x), model(x))


class Regularised(nn.Module):
    """Dropout and BatchNorm as modules: what a symbolic trace keeps as calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(torch.relu(self.fc(x)))))


def test_train_and_eval_switch_a_graph_that_can_follow() -> None:
    torch.manual_seed(0)
    model, x = Regularised(), torch.randn(8, 6)
    pm = partitioner.auto_parallelize(model, TWO, (x,), options=NO_DP, max_memory={"cpu": 1200}, measure=False)
    assert pm.plan.frontend == "fx" and len(set(pm.plan.assignment)) == 2 and pm.training
    pm.eval()
    model.eval()
    assert not pm.training and not pm.module.get_submodule("drop").training
    assert_same(pm(x), model(x))
    pm.train()
    assert pm.module.get_submodule("bn").training


def test_train_and_eval_refuse_what_the_trace_fixed() -> None:
    """torch.export writes dropout and batch norm with the mode as a constant: eval() would
    have been ignored and dropout kept on."""
    torch.manual_seed(0)
    model, x = Regularised(), torch.randn(8, 6)
    pm = partitioner.auto_parallelize(model, TWO, (x,), options=NO_DP, frontend="export", measure=False)
    assert pm.fixed_modes and pm.training
    expected = (
        r"cannot switch to eval mode: the trace fixed 2 op\(s\) to train mode \(dropout, batch norm; "
        r"first: node 'batch_norm'\); put the model in eval mode and plan it again"
    )
    with pytest.raises(PartitionerError, match=expected):
        pm.eval()
    assert pm.training and all(m.training for m in pm.modules())  # nothing changed
    pm.train()  # the planned mode is fine
    model.eval()
    evaluated = partitioner.auto_parallelize(model, TWO, (x,), options=NO_DP, frontend="export", measure=False)
    assert not evaluated.training
    assert_same(evaluated(x), model(x))


@pytest.mark.parametrize("name", ["branchy", "tied", "gpt2", "cnn"])
def test_the_state_dict_has_the_original_names_and_loads_into_the_original(name: str) -> None:
    """Regression (branchy): its non-persistent buffer came back persistent, so strict loading failed."""
    assert "gate" in dict(BranchyModel().named_buffers()) and "gate" not in BranchyModel().state_dict()
    model, args, kwargs, pm = split(name)
    case = ZOO[name]
    for module in (pm, copy.deepcopy(pm)):
        state = {k: to_plain(v) for k, v in module.module.state_dict().items()}
        assert set(state) == set(model.state_dict())
        fresh = case.make_model()
        fresh.load_state_dict(state, strict=True)
        for got, expected in zip(case.outputs(fresh(*args, **kwargs)), case.outputs(model(*args, **kwargs))):
            torch.testing.assert_close(got, expected)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_the_state_dict_keeps_tensors_no_op_reads() -> None:
    """Regression: a symbolic trace dropped modules forward never calls, and their weights with them."""
    model, x = Unused(), torch.randn(2, 4)
    pm = partitioner.auto_parallelize(model, TWO, (x,), measure=False)
    assert pm.plan.frontend == "fx"
    assert set(pm.module.state_dict()) == set(model.state_dict())
    Unused().load_state_dict({k: to_plain(v) for k, v in pm.module.state_dict().items()}, strict=True)


def test_a_replicated_module_saves_under_the_original_names() -> None:
    model, _, _ = ZOO["mlp"].build()
    x = torch.randn(8, 1024)
    fresh = partitioner.plan(model, TWO, (x,), options=NO_DP, measure=False)
    replicated = dataclasses.replace(fresh, strategy=Strategy.DATA_PARALLEL)
    pm = partitioner.auto_parallelize(model, TWO, (x,), plan=replicated, measure=False)
    state = {k: to_plain(v) for k, v in pm.module.state_dict().items()}
    assert set(state) == set(model.state_dict())
    other = ZOO["mlp"].make_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    pm.module.load_state_dict(other.state_dict(), strict=True)
    assert_same(pm(x), other(x))


def test_torch_compile_runs_a_plain_cpu_plan() -> None:
    """aot_eager traces forward and backward through AOTAutograd; inductor is left out only
    because its first C++ build takes a minute on this machine."""
    model, args, kwargs = ZOO["branchy"].build()
    pm = partitioner.auto_parallelize(model, ["cpu"], args, kwargs, measure=False)
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    got = compiled(*args, **kwargs)
    expected = model(*args, **kwargs)
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    expected.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(pm.module.get_parameter(name).grad, p.grad)

