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
    return eliminate_dead_code(g)
