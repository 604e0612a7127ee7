"""In-place changes in an fx graph made data flow, so that a split's transfers follow them."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["PIN", "read_after", "thread_mutations"]


PIN = "partitioner_pin"
"""Node meta key: the name of the node whose layer this node must join (see `thread_mutations`)."""

# Tensor methods and torch functions whose result shares its input's storage (a view), or
# may (reshape, contiguous): an in-place change through one changes the input too.
_VIEWS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "permute", "movedim",
        "expand", "expand_as", "squeeze", "unsqueeze", "narrow", "select", "t", "flatten", "unflatten",
        "split", "chunk", "unbind", "diagonal", "as_strided", "contiguous", "detach", "getitem", "T", "mT",
    }
)  # fmt: skip


def read_after(value: Any, *writes: Any) -> Any:
    """`value`, read after the in-place changes `writes` made to it through views.

    An identity that `thread_mutations` puts in the graph so that the order of a write
    through a view and a later read of the base becomes data flow, which transfers follow.
    """
    return value


# Ops that update their running statistics in place, though their schema does not say so:
# (index of the mode argument, indices of the statistics).
_STATISTICS = {
    torch.ops.aten.batch_norm.default: (5, (3, 4)),
    torch.ops.aten.instance_norm.default: (5, (3, 4)),
}


def _writes(gm: fx.GraphModule, n: fx.Node) -> tuple[list[fx.Node], bool]:
    """The nodes whose tensors `n` changes in place, and whether `n` returns the (first) one.

    Covers ``h.relu_()``, ``torch.relu_(h)``, ``F.relu(h, inplace=True)``, ``inplace``
    modules, ``out=h``, ATen ops whose schema marks an argument written (``aten.fill_``,
    ``aten.add_``), and batch norm's running statistics in training mode.
    """
    if n.op not in ("call_method", "call_function", "call_module"):
        return [], False
    schema = getattr(n.target, "_schema", None)
    if n.op == "call_function" and schema is not None:
        if n.target in _STATISTICS:
            mode, stats = _STATISTICS[n.target]
            if len(n.args) > mode and n.args[mode] is True:
                return [a for i in stats if isinstance(a := n.args[i], fx.Node)], False
            return [], False
        written: list[fx.Node] = []
        returned = False
        returned_sets = [r.alias_info.before_set for r in schema.returns if r.alias_info is not None]
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
                if isinstance(value, fx.Node):
                    returned = returned or (not written and arg.alias_info.before_set in returned_sets)
                    written.append(value)
        return written, returned
    out = n.kwargs.get("out")
    if isinstance(out, fx.Node):
        return [out], True
    first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if first is None:
        return [], False
    if n.op == "call_module":
        inplace = getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    elif n.op == "call_function" and n.kwargs.get("inplace") is True:
        inplace = True
    else:
        name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
        inplace = name.endswith("_") and not name.startswith("_")
    return ([first], True) if inplace else ([], False)


def _view_of(n: fx.Node) -> fx.Node | None:
    """The node whose storage `n`'s result shares (it is a view of it), or None."""
    source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if source is None or n.op not in ("call_method", "call_function"):
        return None
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        return source if returns_alias else None
    if n.target is getattr:
        return source if len(n.args) > 1 and n.args[1] in _VIEWS else None
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    return source if name in _VIEWS else None


def thread_mutations(gm: fx.GraphModule) -> bool:
    """Make in-place changes data flow that transfers follow, in place.

    Split over devices, a value is copied to another device once, right after it is
    made; a later in-place change must reach the readers that come after it.

    - A change to a tensor itself (``h.add_(x)``): later readers of ``h`` read the
      in-place node, which returns ``h``. torch.export writes its graphs so; a symbolic
      trace records ``h.add_(x)`` as a node nobody reads.
    - A change through a view (``h[:, 0] = 0``, ``h.transpose(0, 1).mul_(2)``), a change
      of a parameter or buffer (batch norm's running statistics), or one whose op does
      not return the changed tensor: later readers of ``h``, or of views of ``h`` taken
      before the change, read ``read_after(h, change)``; and the views, the change and
      those reads are pinned (node meta `PIN`) to the layer of ``h``, so the change is
      made to ``h`` itself, not to a copy on another device.

    Returns:
        Whether the graph changed.
    """
    nodes = list(gm.graph.nodes)
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(nodes)}
    writes = {n: _writes(gm, n) for n in nodes}
    # Each alias's base (the node that made the storage), and whether a view lies between.
    base_of: dict[fx.Node, tuple[fx.Node, bool]] = {}
    aliases: dict[fx.Node, list[fx.Node]] = {}
    for n in nodes:
        source, through_view = _view_of(n), True
        if source is None and writes[n][1]:
            source, through_view = writes[n][0][0], False  # an in-place op returns what it changed
        if source is not None:
            base, viewed = base_of.get(source, (source, False))
            base_of[n] = (base, viewed or through_view)
            aliases.setdefault(base, []).append(n)
    changed = False
    for m in nodes:
        written, returns_it = writes[m]
        for target in written:

            def later(a: fx.Node, m: fx.Node = m) -> list[fx.Node]:
                return [u for u in a.users if u is not m and u.target is not read_after and order.get(u, -1) > order[m]]

            base, through_view = base_of.get(target, (target, False))
            earlier = [v for v in aliases.get(base, []) if order[v] < order[m]]
            if returns_it and not through_view and base.op != "get_attr" and not any(later(v) for v in earlier):
                for user in later(target):
                    user.replace_input_with(target, m)
                    changed = True
                continue
            for n in (m, *earlier):
                n.meta[PIN] = base.name
            for alias in (base, *earlier):
                readers = later(alias)
                if not readers:
                    continue
                with gm.graph.inserting_after(m):
                    read = gm.graph.call_function(read_after, (alias, m))
                read.meta[PIN] = base.name
                # The read is the alias its readers now hold: a later change must reach them too.
                order[read] = order[m] + 0.5
                base_of[read] = (base, base_of.get(alias, (alias, False))[1])
                aliases.setdefault(base, []).append(read)
                for user in readers:
                    user.replace_input_with(alias, read)
                changed = True
    return changed
