"""A plan's stages for the pipeline runners users already have: torch's `pipeline()` and DeepSpeed's.

- `split_spec(plan)`: ``{module path: SplitPoint.BEGINNING}`` for
  ``torch.distributed.pipelining.pipeline(model, mb_args, split_spec=...)``, one split
  before the first module each stage after the first calls.
- `deepspeed_parts(plan, layers, model)`: the stage boundaries of the list of layers a
  ``deepspeed.pipe.PipelineModule`` runs, as its ``parts`` (``[0, b1, ..., len(layers)]``:
  stage ``k`` runs ``layers[parts[k]:parts[k+1]]``).

Both take the stages `partitioner.distributed.build` runs (`stage_layers`), in order:
stage ``k`` belongs on the plan's ``k``-th device group (``plan_layout(plan).groups[k]``).
A stage boundary is a layer boundary of the plan; it maps to a module path only where the
first layer of the next stage starts with a module called nowhere else, which is what
both runners cut at. Where it does not, the error names the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from partitioner.distributed.layout import stage_layers
from partitioner.plan import Plan, PlanLayer

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed.pipelining import SplitPoint

__all__ = ["split_spec", "deepspeed_parts"]


def _stages(plan: Plan) -> tuple[tuple[int, ...], ...]:
    """`stage_layers`, checked to be consecutive runs of layers in graph order (what both runners cut)."""
    stages = stage_layers(plan)
    expected = 0
    for k, layers in enumerate(stages):
        if list(layers) != list(range(expected, expected + len(layers))):
            gap = next(i for i, j in zip(layers, range(expected, expected + len(layers))) if i != j)
            raise ValueError(
                f"stage {k} of the plan holds layer {plan.layers[gap].name!r} (layer {gap}) where a pipeline needs "
                f"layer {plan.layers[expected].name!r} (layer {expected}): a pipeline runs the layers in graph "
                "order, each stage a consecutive run of them, and this plan's layers go back to an earlier "
                "device. Plan again, or place the layers that way"
            )
        expected += len(layers)
    return stages


def _related(a: str, b: str) -> bool:
    """Whether module `a` is `b`, inside it, or holds it (their calls overlap)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _calls_elsewhere(plan: Plan, module: str, layer: PlanLayer) -> str | None:
    """A layer other than `layer` that calls `module` (or a module around or inside it), or
    `layer` itself when it calls `module` twice; None when `module` runs only in `layer`."""
    for other in plan.layers:
        if other is not layer and any(_related(m, module) for m in other.modules):
            return other.name
    # A layer's name is its first and last module call (``a..b``); ``m@1`` is m's second call.
    if any(key.split("@")[0] == module and "@" in key for key in layer.name.split("..")):
        return layer.name
    return None


def split_spec(plan: Plan) -> dict[str, SplitPoint]:
    """Where ``torch.distributed.pipelining.pipeline()`` should cut the model to run `plan`'s stages.

    Example::

        from torch.distributed.pipelining import pipeline
        pipe = pipeline(model, mb_args=(x_microbatch,), split_spec=pd.split_spec(plan))
        stage = pipe.build_stage(rank, device)   # rank k runs stage k

    Returns:
        ``{module path: SplitPoint.BEGINNING}``, one entry per stage after the first (none
        for a plan of one stage): the first module the stage's first layer calls.
        `pipeline()` then gives ``len(stage_layers(plan))`` stages. It traces the model
        with torch.export and cuts before each call of these modules, so ops outside
        modules (a mask built at the root) go with the stage that runs before the cut.

    Raises:
        ValueError: A stage's first layer calls no module, or its first module is also
            called in another layer (a module called twice, or a block the plan cut in
            two) so that a cut before it would cut twice; or the stages are not consecutive
            runs of layers. The message names the layer.
    """
    from torch.distributed.pipelining import SplitPoint

    spec: dict[str, SplitPoint] = {}
    for k, layers in enumerate(_stages(plan)[1:], start=1):
        layer = plan.layers[layers[0]]
        if not layer.modules:
            raise ValueError(
                f"stage {k} starts at layer {layer.name!r}, which calls no module; pipeline() cuts only "
                "before a module call: plan with granularity='block', or put pipe_split() in the forward there"
            )
        module = layer.modules[0]
        other = _calls_elsewhere(plan, module, layer)
        if other is not None:
            where = "called twice in that layer" if other == layer.name else f"also called in layer {other!r}"
            raise ValueError(
                f"stage {k} starts at layer {layer.name!r}, whose first module {module!r} is {where}; pipeline() "
                "would cut before every call of it, making more stages than the plan's. Move that boundary, or "
                "put pipe_split() in the forward there"
            )
        spec[module] = SplitPoint.BEGINNING
    return spec


def deepspeed_parts(plan: Plan, layers: Sequence[Any], model: nn.Module | None = None) -> list[int]:
    """The stage boundaries of `plan` in the list of layers a ``deepspeed.pipe.PipelineModule`` runs.

    DeepSpeed cuts its list where ``partition_method`` says (``"parameters"``,
    ``"uniform"``, ``"type:<regex>"``), and has no method for given boundaries: set them
    as its ``parts`` in a subclass (docs/distributed.md shows one).

    Args:
        plan: The plan.
        layers: What you pass as ``PipelineModule(layers=...)``, in order. Each entry is a
            module of `model`, a module holding modules of `model` (a wrapper such as an
            embedding stage around ``wte`` and ``wpe``), or a module path of the model
            (``"transformer.h.0"``, for a `LayerSpec` built later). Anything else (a
            function, a module without tensors of its own) runs with the entry before it.
        model: The model the plan was made for; needed for module entries.

    Returns:
        ``parts``: ``[0, b1, ..., len(layers)]``; stage ``k`` runs ``layers[parts[k]:parts[k+1]]``.

    Raises:
        ValueError: An entry holds no module of the plan, or spans two stages (the plan
            cuts inside it), the entries visit the stages out of order, or a stage gets
            no entry; the message names the entry and the layers.
    """
    stages = _stages(plan)
    stage_of_layer = {i: k for k, run in enumerate(stages) for i in run}
    paths = _module_paths(model)
    entry_stage: list[int] = []
    current = 0
    for i, entry in enumerate(layers):
        modules = _entry_modules(entry, paths, i)
        if not modules:  # a function or a module of no tensors: it runs where the entry before it runs
            entry_stage.append(current)
            continue
        touched = [
            j for j, layer in enumerate(plan.layers) if any(_related(m, p) for m in layer.modules for p in modules)
        ]
        hit = sorted({stage_of_layer[j] for j in touched})
        label = f"entry {i} ({', '.join(modules)})"
        if not hit and model is not None and not _holds_tensors(model, modules):
            entry_stage.append(current)  # a module of no tensors that the plan folded into its callers' layers
            continue
        if not hit:
            raise ValueError(
                f"{label} is in no layer of the plan (the plan's layers call "
                f"{', '.join(m for layer in plan.layers[:4] for m in layer.modules)}, ...); pass modules of the "
                "model the plan was made for, or their paths"
            )
        if len(hit) > 1:
            cut = ", ".join(plan.layers[j].name for j in touched)
            raise ValueError(
                f"{label} spans stages {hit[0]}..{hit[-1]}: the plan cuts inside it (its layers {cut}); "
                "list its parts as entries of their own, or plan with coarser layers"
            )
        if hit[0] < current:
            raise ValueError(
                f"{label} belongs to stage {hit[0]} but comes after an entry of stage {current}; DeepSpeed runs the "
                "list in order, so list the layers in the order the model calls them"
            )
        current = hit[0]
        entry_stage.append(current)
    empty = [k for k in range(len(stages)) if k not in entry_stage]
    if empty:
        names = ", ".join(plan.layers[j].name for j in stages[empty[0]])
        raise ValueError(
            f"no entry of the list falls in stage {empty[0]} (layers {names}); list those modules as entries"
        )
    return [0] + [entry_stage.index(k) for k in range(1, len(stages))] + [len(entry_stage)]


def _holds_tensors(model: nn.Module, modules: tuple[str, ...]) -> bool:
    """Whether any of these modules of `model` holds a parameter or buffer (or is not a module of it)."""
    for path in modules:
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            return True  # not a module of the model: let the caller say so
        if any(True for _ in sub.parameters()) or any(True for _ in sub.buffers()):
            return True
    return False


def _module_paths(model: nn.Module | None) -> dict[int, str]:
    """id(module) -> its first path in `model`."""
    if model is None:
        return {}
    paths: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), path)
    return paths


def _entry_modules(entry: Any, paths: dict[int, str], i: int) -> tuple[str, ...]:
    """The module paths of the model an entry of a DeepSpeed layer list runs."""
    from torch import nn

    if isinstance(entry, str):
        return (entry,)
    if not isinstance(entry, nn.Module):
        return ()
    if not paths:
        raise ValueError(f"entry {i} is a {type(entry).__name__} module: pass the model too (deepspeed_parts(plan, "
                         "layers, model)), or its path in the model instead")
    if id(entry) in paths:
        return (paths[id(entry)],)
    found: list[str] = []
    for _, sub in entry.named_modules():
        path = paths.get(id(sub))
        if path is not None and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    if not found and any(True for _ in entry.parameters()):
        raise ValueError(
            f"entry {i} ({type(entry).__name__}) holds parameters but no module of the model; build the "
            "pipeline's layers from the model's modules, or pass their paths"
        )
    return tuple(found)
