"""Common-subexpression elimination across forward and backward.

Two nodes with the same op, the same inputs and the same attributes compute the
same value; the later one is replaced by the earlier.  The VJP pass rebuilds
things the forward already has (reshapes of the loss, transposes, exp(x − lse)),
and this is where they meet again.
"""
from __future__ import annotations

from backcomp.graph import Graph, Node
from backcomp.passes.dce import eliminate_dead_code


def _key(node: Node, index: dict[Node, int]) -> tuple:
    attrs = tuple(sorted((k, repr(v)) for k, v in node.attrs.items() if k != "label"))
    return node.op, tuple(index[x] for x in node.inputs), attrs


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Graph -> Graph where each distinct computation appears once."""
    g, _ = graph.clone()
    seen: dict[tuple, Node] = {}
    replace: dict[Node, Node] = {}
    index: dict[Node, int] = {}
    for node in g.nodes:
        node.inputs = tuple(replace.get(x, x) for x in node.inputs)
        index[node] = len(index)
        if node.op in ("input", "param"):
            continue
        key = _key(node, index)
        first = seen.setdefault(key, node)
        if first is not node:
            replace[node] = first
            index[node] = index[first]
            if first.name is None and node.name is not None:
                first.name = node.name
    g.replace_uses(replace)
    for node in g.nodes:
        if node.op == "ew" and len(set(node.inputs)) < len(node.inputs):
            _read_once(node)
    return eliminate_dead_code(g)


def _read_once(node: Node) -> None:
    """A fused node whose operands CSE made one value reads it under one symbol: as
    ``%0 − %1`` of one array it neither cancelled, nor was safe to compute in place (the
    chain wrote the buffer the other symbol still had to read)."""
    from backcomp.ops.elementwise import arg_symbol
    inputs = list(dict.fromkeys(node.inputs))
    expr = node.attrs["expr"].xreplace({arg_symbol(i): arg_symbol(inputs.index(x)) for i, x in enumerate(node.inputs)})
    node.inputs, node.attrs = tuple(inputs), {**node.attrs, "expr": expr}
