"""Launch gloo processes on tests/dist_worker.py as torchrun would, and compare them with one process.

Shared by the distributed test modules (test modules never import each other).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from partitioner.plan import Plan
from tests import dist_worker
from tests.models import zoo_case

__all__ = ["reference", "launch", "check_case", "write_plan"]

ROOT = Path(__file__).resolve().parents[1]


def reference(
    model: str, samples: int, state: dict[str, torch.Tensor] | None = None, steps: int = 1, optimizer: str = "sgd"
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(losses, state dict after the optimizer's steps) of single-process training from `state` (default: the zoo's)."""
    m = zoo_case(model).make_model()
    if state is not None:
        m.load_state_dict(state)
    inputs, keywords, target = dist_worker.batch(model, samples)
    step = dist_worker.optimizer(optimizer, m.parameters())
    losses = []
    for _ in range(steps):
        loss = dist_worker.loss_fn(model)(m(*inputs, **keywords), target)
        loss.backward()
        step.step()
        step.zero_grad()
        losses.append(loss.detach())
    return losses, {k: v.detach() for k, v in m.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, cases: list[dict[str, Any]], tmp_path: Path, timeout_s: float = 300) -> None:
    """Run the cases in `world` processes with torchrun's environment; raise with their output if one fails."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path), "cases": cases}))
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(spec)], env=env,
                                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        code: int | str
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(f"rank {rank} exited with {code}:\n" + (tmp_path / f"rank{rank}.log").read_text()[-3000:])
    if failed:
        pytest.fail("\n".join(failed))


def check_case(case: dict[str, Any], world: int, tmp_path: Path, start: dict[str, torch.Tensor] | None = None) -> None:
    """Every rank's losses and the union of their state dicts equal single-process training's."""
    expected_losses, expected_state = reference(
        case["model"], case["global_batch"], start, dist_worker.STEPS, case.get("optimizer", "sgd")
    )
    merged: dict[str, torch.Tensor] = {}
    losses = []
    for rank in range(world):
        result = torch.load(tmp_path / f"{case['name']}-rank{rank}.pt", weights_only=False)
        if result["losses"][0] is not None:
            losses.append(torch.stack(result["losses"]))
        for k, v in result["state"].items():
            if k in merged:  # a replica: the same values as the other replicas of its stage
                torch.testing.assert_close(v, merged[k], rtol=0, atol=0, msg=f"{case['name']}: replicas differ at {k}")
            merged[k] = v
    assert losses, f"{case['name']}: no rank returned the loss"
    for loss in losses:
        torch.testing.assert_close(loss, torch.stack(expected_losses), msg=f"{case['name']}: losses")
    assert set(merged) == set(expected_state), case["name"]
    for k, v in expected_state.items():
        torch.testing.assert_close(merged[k], v, msg=f"{case['name']}: {k} after the SGD steps")


def write_plan(tmp_path: Path, name: str, plan: Plan) -> str:
    path = tmp_path / f"{name}.plan.json"
    path.write_text(plan.to_json())
    return str(path)
