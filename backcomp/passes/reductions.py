"""Rewrites of reductions: fewer passes over the data.

``merge_reductions``: mean(sum(x, 1)) -> sum(x) / B; losses are typically a per-row
reduction followed by a batch mean.  ``hoist_constant_factors``: Σ(c·A) -> c·Σ(A).
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, Node, consumers, toposort
from backcomp.ops.elementwise import CT, arg_symbol, ew_from_expr, node_expr
from backcomp.ops.reductions import _count
from backcomp.passes.dce import eliminate_dead_code, roots
from backcomp.passes.fuse import is_elementwise

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
        g.nodes = toposort(g.nodes)   # the merged nodes were appended after their users
    return eliminate_dead_code(g)


def _constant_along(node: Node, axes: tuple[int, ...], out_ndim: int) -> bool:
    """Whether ``node`` (broadcast against a result of rank ``out_ndim``) has size 1 on ``axes``."""
    lead = out_ndim - node.ndim
    return all(i < lead or node.shape[i - lead] == 1 for i in axes)


def hoist_constant_factors(graph: Graph) -> Graph:
    """Σ(c·A) -> c·Σ(A) when c is constant along the summed axes.

    The VJP of a loss writes the seed's 1/B and friends into every element before
    a reduction sums them (``Σ_j y_ij / (B s_i)``); taken outside, they cost one
    operation on the small result instead of one on the whole array.
    """
    g, _ = graph.clone()
    users = consumers(g.nodes)
    protected = set(roots(g))
    replace: dict[Node, Node] = {}
    for node in list(g.nodes):
        if node.op not in ("sum", "sum_to") or not node.inputs:
            continue
        inner = node.inputs[0]
        if node.op == "sum":
            if not node.attrs["keepdims"]:
                continue
            axes = node.attrs["axes"]
        else:
            if inner.ndim != node.ndim:
                continue
            axes = tuple(i for i, (a, b) in enumerate(zip(inner.shape, node.shape)) if a != b)
        if not is_elementwise(inner) or inner in protected or len(users[inner]) != 1:
            continue
        expr = node_expr(inner)
        if not expr.is_Mul:
            continue
        symbols = {arg_symbol(i): x for i, x in enumerate(inner.inputs)}
        const, rest = [], []
        for f in expr.args:
            args = [symbols[s] for s in f.free_symbols if s in symbols]
            (const if all(_constant_along(x, axes, inner.ndim) for x in args) else rest).append(f)
        if not const or not rest:
            continue
        with g.scoped(node.scope or node.name, node.origin):
            bindings = dict(symbols)
            body = ew_from_expr(sp.Mul(*rest), bindings, label=inner.attrs.get("label", inner.op))
            if body.shape != inner.shape:
                continue   # what is left does not span the summed array by itself
            reduced = g.apply(node.op, (body,), **node.attrs)
            out = ew_from_expr(sp.Mul(*const) * CT, {**bindings, CT: reduced}, label="hoisted")
        if out.shape != node.shape:
            continue   # the constant factor would broadcast the result: leave it
        replace[node] = out
        if node.name is not None:
            out.name = node.name
    if replace:
        g.replace_uses(replace)
        g.nodes = toposort(g.nodes)
    return eliminate_dead_code(g)
