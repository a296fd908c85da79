"""Batch separability: is the loss a sum of per-chunk losses?

A loss is *batch-separable* when it is a sum or mean over the batch dim of per-row
terms, plus terms of params alone, combined linearly: then its value and gradient
over a data set are sums of per-chunk contributions, and ``backcomp.dask`` can
compute them chunk by chunk.  ``analyse`` proves it from the graph by giving each
node one of four kinds:

- FREE: depends on no batch input (params, constants, broadcast inputs);
- ROW(a): axis ``a`` is the batch and row i depends only on row i of the inputs;
- LIN: batch-free, and linear in sums over the batch of ROW values (a ``mean``
  over the batch, ``x.T @ r``, ``sum(rows) + lam * sum(W**2)``), with FREE
  coefficients and FREE terms added;
- a refusal, naming the node that mixes rows (``x - mean(x, axis=0)``, a max or a
  softmax over the batch, a square of a mean, a reshape that moves the batch axis).

Anything not known to be safe is refused: unknown ops on batch values, dims
other than ``:`` taken from the batch axis, nonlinear functions of LIN values.
Each op declares its rule in its ``OpDef`` (``separability``, written with the kinds
of ``backcomp.ops.batch_axis``); elementwise ops share the rule for expressions here,
and an op with none is refused on batch values.

``partial_graph`` rewrites a separable model into the per-chunk loss: means over
the batch divide by ``total_rows`` (the whole data set's rows) instead of the
chunk's, reads of the batch size as a value become ``total_rows``, and terms of
params alone are multiplied by ``param_terms`` (1 in one chunk, 0 in the others),
so that the per-chunk losses and gradients sum exactly to the whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from backcomp.graph import Graph, Node, consumers
from backcomp.ops.batch_axis import (
    FREE,
    LIN_TAG,
    MIXED_TAG,
    ROW_TAG,
    Kind,
    Mixed,
    free_or_refuse,
    row,
    what,
)
from backcomp.ops.elementwise import arg_symbol, dim_symbol, ew_from_expr, node_expr
from backcomp.ops.random import draws as _draws
from backcomp.ops.registry import get_op
from backcomp.ops.reductions import _count

#: the per-chunk function's arguments, as they appear in its expressions
TOTAL_ROWS = dim_symbol("total_rows")
PARAM_TERMS = sp.Symbol("param_terms", nonnegative=True)


@dataclass
class Separability:
    """The analysis of one model: recorded in its module by the code generator."""
    batch_dim: str | None
    separable: bool
    refusal: str | None
    #: input and output names -> their batch axis (inputs without it are broadcast)
    axes: dict[str, int] = field(default_factory=dict)
    kinds: dict[Node, Kind] = field(default_factory=dict, repr=False)


# ----- naming nodes in messages ----------------------------------------------------------
def _label(node: Node, users: dict[Node, list[Node]]) -> str:
    """The user's name for where a node comes from: its own name, the named node it
    was built for (spec nodes), or the first named node that uses it (builder code)."""
    if node.name or node.scope:
        shown = "" if get_op(node.op).elementwise else f" ({what(node)})"
        return f"node '{node.name or node.scope}'{shown}"
    seen, todo = set(), list(users.get(node, ()))
    while todo:
        n = todo.pop(0)
        if n.name or n.scope:
            return f"a {what(node)} inside node '{n.name or n.scope}'"
        if n not in seen:
            seen.add(n)
            todo.extend(users.get(n, ()))
    return f"an unnamed {what(node)} (node %{node.id})"


# ----- the batch dim ---------------------------------------------------------------------
def batch_dim(graph: Graph) -> str | None:
    """The leading dim of the first input whose leading dim is symbolic ("B" by convention)."""
    for node in graph.inputs.values():
        if node.shape and isinstance(node.shape[0], str):
            return node.shape[0]
    return None


def _axis_of(shape, dim: str) -> int | None | str:
    hits = [i for i, d in enumerate(shape) if d == dim]
    return hits[0] if len(hits) == 1 else (None if not hits else "twice")


# ----- the rules: each op's own (OpDef.separability), expressions', and the traversal -----
def _elementwise(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """Elementwise ops without a rule of their own: rows line up, and LIN values enter linearly."""
    lin = [i for i, k in enumerate(kinds) if k.tag == LIN_TAG]
    rows = [i for i, k in enumerate(kinds) if k.tag == ROW_TAG]
    if lin and rows:
        src = kinds[lin[0]].source
        raise Mixed(node, f"combines rows of the batch with a {what(src)} of them")
    if lin:
        if node.dtype != "float":
            raise Mixed(node, "compares a sum or mean over the batch")
        expr, syms = node_expr(node), [arg_symbol(i) for i in lin]
        try:
            linear = all(sp.simplify(sp.diff(expr, a, b)) == 0 for a in syms for b in syms)
        except Exception:   # noqa: BLE001  (a function SymPy cannot differentiate: refuse)
            linear = False
        if not linear:
            raise Mixed(node, f"is a nonlinear function of a sum or mean over the batch "
                              f"({what(kinds[lin[0]].source)}), not a weighted sum of per-row terms")
        return Kind(LIN_TAG, source=kinds[lin[0]].source)
    if not rows:
        return FREE
    axes = {node.ndim - node.inputs[i].ndim + kinds[i].axis for i in rows}
    if len(axes) > 1:
        raise Mixed(node, "lines up the batch axes of its operands differently")
    return row(axes.pop())


def _kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    for k in kinds:
        if k.tag == MIXED_TAG:
            return k
    if node.op == "input":
        where = _axis_of(node.shape, dim)
        if where == "twice":
            raise Mixed(node, f"has the batch dim '{dim}' on two axes")
        return FREE if where is None else row(where)
    if node.op == "param":
        return FREE
    opdef = get_op(node.op)
    if opdef.random or node.op == "scan" and _draws(node):
        raise Mixed(node, f"draws random numbers ({node.op}): chunks would not draw what the whole batch draws")
    rule = opdef.separability or (_elementwise if opdef.elementwise else free_or_refuse)
    kind = rule(node, kinds, dim)
    where = _axis_of(node.shape, dim)
    if kind.tag == LIN_TAG and where is not None:
        raise Mixed(node, f"spreads a sum or mean over the batch ({what(kind.source)}) back over its rows")
    if kind.tag == "free":   # params broadcast to the batch's shape: the same in every row
        if where == "twice":
            raise Mixed(node, f"has the batch dim '{dim}' on two axes")
        if where is not None:
            return row(where)
    return kind


# ----- the analysis ----------------------------------------------------------------------
def analyse(graph: Graph) -> Separability:
    """Which nodes keep rows apart, and whether the loss is a sum of per-chunk losses."""
    dim = batch_dim(graph)
    if dim is None:
        return Separability(None, False, f"model '{graph.name}' is not batch-separable: no input has a symbolic "
                                         f"leading dim (the batch), so there is nothing to split into chunks")
    users = consumers(graph.nodes)
    kinds: dict[Node, Kind] = {}
    for node in graph.nodes:
        try:
            kinds[node] = _kind(node, [kinds[x] for x in node.inputs], dim)
        except Mixed as e:
            kinds[node] = Kind(MIXED_TAG, why=f"{_label(e.node, users)} {e.why}")
    axes = {name: kinds[n].axis for name, n in graph.inputs.items() if kinds[n].tag == ROW_TAG}
    axes |= {name: kinds[n].axis for name, n in graph.forward_outputs().items()
             if kinds[n].tag == ROW_TAG} if (graph.outputs or graph.loss_node) else {}
    head = f"model '{graph.name}' is not batch-separable"
    loss = graph.loss_node
    if loss is None:
        return Separability(dim, False, f"{head}: it has no loss", axes, kinds)
    k = kinds[loss]
    if k.tag == MIXED_TAG:
        return Separability(dim, False, f"{head}: {k.why}", axes, kinds)
    if k.tag != LIN_TAG:
        return Separability(dim, False, f"{head}: the loss '{loss.name}' does not sum or average over "
                                        f"the batch dim '{dim}'", axes, kinds)
    return Separability(dim, True, None, axes, kinds)


def check_separable(graph: Graph) -> Separability:
    """The analysis, or a ValueError naming the node that mixes rows."""
    result = analyse(graph)
    if not result.separable:
        raise ValueError(result.refusal)
    return result


# ----- the per-chunk loss ----------------------------------------------------------------
def partial_graph(graph: Graph, result: Separability) -> Graph:
    """The loss of one chunk of rows, such that summing over chunks gives the loss.

    Rebuilt node by node in the same order (so still topological), with three
    rewrites: a mean over the batch axis becomes sum / (total_rows · the other
    reduced dims); a read of the batch size as a value becomes ``total_rows``;
    the FREE part f(0) of an affine elementwise node over LIN values is
    multiplied by ``param_terms``.  Names and scopes are kept, so the per-chunk
    function reads like the module's own.
    """
    dim, kinds = result.batch_dim, result.kinds
    B = dim_symbol(dim)
    g = Graph(graph.name, wrt=graph.wrt, inits=dict(graph.inits), dims=dict(graph.dims))
    new: dict[Node, Node] = {}
    for node in graph.nodes:
        if node.op == "input":
            m = g.input(node.name, node.shape, node.dtype)
        elif node.op == "param":
            m = g.param(node.name, node.shape, graph.inits[node.name])
        else:
            inputs = [new[x] for x in node.inputs]
            with g.scoped(node.scope):
                m = _rebuilt(g, node, inputs, kinds, B)
            if node.name is not None and m.name is None:
                m.name = node.name
                g._names[node.name] = m
        new[node] = m
    g.loss_node = new[graph.loss_node]
    return g


def _rebuilt(g: Graph, node: Node, inputs: list[Node], kinds: dict[Node, Kind], B: sp.Symbol) -> Node:
    k = kinds[node]
    if node.op == "mean" and k.tag == LIN_TAG and kinds[node.inputs[0]].tag == ROW_TAG:
        x, axes = node.inputs[0], node.attrs["axes"]
        others = _count(x.shape, [a for a in axes if a != kinds[x].axis])
        total = g.apply("sum", inputs, axes=axes, keepdims=node.attrs["keepdims"])
        s = arg_symbol(0)
        return ew_from_expr(s / (TOTAL_ROWS * others), {s: total}, label="mean")
    if get_op(node.op).elementwise:
        expr = node_expr(node).xreplace({B: TOTAL_ROWS})
        lin = [arg_symbol(i) for i, x in enumerate(node.inputs) if kinds[x].tag == LIN_TAG]
        if k.tag == LIN_TAG and lin:
            free = expr.xreplace({s: 0 for s in lin})
            expr = expr - free + PARAM_TERMS * free
        if expr != node_expr(node):   # same inputs, even those the new expression drops
            return g.apply("ew", inputs, expr=expr, label=node.attrs.get("label", node.op))
    return g.apply(node.op, inputs, **node.attrs)
