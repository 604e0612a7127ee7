"""The package's surface: the pure core imports without torch; the front doors load on use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import partitioner

PURE = [
    "partitioner",
    "partitioner.solve",
    "partitioner.simulate",
    "partitioner.simulate.chrome_trace",
    "partitioner.pipeline_plan",
    "partitioner.plan",
    "partitioner.plan_json",
    "partitioner.report",
    "partitioner.cluster",
    "partitioner.options",
    "partitioner.cost_model",
    "partitioner.training_costs",
    "partitioner.tp_layout",
    "partitioner.collectives",
    "partitioner.parallel_config",
    "partitioner.devices",
    "partitioner.profile_files",
    "partitioner.device_detection",
    "partitioner.device_resolution",
    "partitioner.units",
    "partitioner.progress",
    "partitioner.files",
    "partitioner.assemble",
]

_BLOCK_TORCH = """
import importlib, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed (blocked by the test)")

sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    importlib.import_module(name)
print("imported")
"""


def test_the_pure_core_imports_without_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *PURE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]


def test_the_block_would_notice_torch() -> None:
    """The check above can fail: a module that imports torch is refused under the block."""
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, "partitioner.api"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "torch is not installed" in proc.stderr


@pytest.mark.parametrize("name", sorted(partitioner.__all__))
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(partitioner, name) is not None
    assert name in dir(partitioner)


def test_plan_is_the_front_door_not_the_module() -> None:
    from partitioner.plan import PlanLayer  # the module stays importable by its path

    plan_module = sys.modules["partitioner.plan"]
    assert plan_module.PlanLayer is PlanLayer
    assert callable(partitioner.plan) and partitioner.plan is not plan_module
    assert partitioner.Plan is plan_module.Plan


def test_an_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'auto_parallelise'"):
        partitioner.auto_parallelise  # noqa: B018


def test_submodules_resolve_as_attributes() -> None:
    """`import partitioner` then `partitioner.cost_model.build_problem`, as the eager package allowed."""
    proc = subprocess.run(
        [sys.executable, "-c", "import partitioner; print(partitioner.cost_model.build_problem.__name__)"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.strip() == "build_problem", proc.stderr[-2000:]
