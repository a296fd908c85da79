"""Merge a reduction of a reduction into one: mean(sum(x, 1)) -> sum(x) / B.

Losses are typically a per-row reduction followed by a batch mean; one pass over
the data instead of two, and one reduction less to differentiate.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, Node, consumers
from backcomp.ops.elementwise import CT, ew_from_expr
from backcomp.ops.structural import _count
from backcomp.passes.dce import eliminate_dead_code, roots

LINEAR = ("sum", "mean")


def _outer_axes_in_input_frame(inner: Node, outer_axes: tuple[int, ...]) -> tuple[int, ...]:
    if inner.attrs["keepdims"]:
        return outer_axes
    kept = [i for i in range(inner.inputs[0].ndim) if i not in inner.attrs["axes"]]
    return tuple(kept[a] for a in outer_axes)


def merge_reductions(graph: Graph) -> Graph:
    """Graph -> Graph where sum/mean of a single-use sum/mean is one reduction."""
    g, _ = graph.clone()
    users = consumers(g.nodes)
    protected = set(roots(g))
    replace: dict[Node, Node] = {}
    for node in list(g.nodes):
        inner = node.inputs[0] if node.op in LINEAR and node.inputs else None
        if inner is None or inner.op not in LINEAR or inner in protected or len(users[inner]) != 1:
            continue
        if inner.attrs["keepdims"] != node.attrs["keepdims"]:
            continue
        x = inner.inputs[0]
        outer_axes = _outer_axes_in_input_frame(inner, node.attrs["axes"])
        axes = tuple(sorted(set(inner.attrs["axes"]) | set(outer_axes)))
        with g.scoped(node.scope or node.name, node.origin):
            both_mean = node.op == inner.op == "mean"
            merged = g.apply("mean" if both_mean else "sum", (x,), axes=axes, keepdims=node.attrs["keepdims"])
            if not both_mean and "mean" in (node.op, inner.op):
                n = _count(x.shape, inner.attrs["axes"] if inner.op == "mean" else outer_axes)
                merged = ew_from_expr(CT / n, {CT: merged}, label="mean")
        replace[node] = merged
        if node.name is not None:
            merged.name = node.name
    if replace:
        g.replace_uses(replace)
        g.nodes = _toposort(g.nodes)   # the merged nodes were appended after their users
    return eliminate_dead_code(g)


def _toposort(nodes: list[Node]) -> list[Node]:
    """Stable topological order (inputs before users), iteratively."""
    placed: set[Node] = set()
    order: list[Node] = []
    for root in nodes:
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in placed:
                continue
            if expanded:
                placed.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((x, False) for x in reversed(n.inputs) if x not in placed)
    return order
