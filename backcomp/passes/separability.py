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
from backcomp.ops.elementwise import arg_symbol, dim_symbol, ew_from_expr, node_expr
from backcomp.ops.random import draws as _draws
from backcomp.ops.registry import get_op
from backcomp.ops.structural import _count, parse_einsum

#: the per-chunk function's arguments, as they appear in its expressions
TOTAL_ROWS = dim_symbol("total_rows")
PARAM_TERMS = sp.Symbol("param_terms", nonnegative=True)


@dataclass(frozen=True)
class Kind:
    """What a node is with respect to the batch (see the module docstring)."""
    tag: str                       # "free", "row", "lin" or "mixed"
    axis: int | None = None        # the batch axis of a "row" node
    why: str | None = None         # why a "mixed" node is not separable
    source: Node | None = None     # "lin": a batch reduction it is built on


FREE = Kind("free")
LIN_TAG, ROW_TAG, MIXED_TAG = "lin", "row", "mixed"


def row(axis: int) -> Kind:
    return Kind(ROW_TAG, axis=axis)


@dataclass
class Separability:
    """The analysis of one model: recorded in its module by the code generator."""
    batch_dim: str | None
    separable: bool
    refusal: str | None
    #: input and output names -> their batch axis (inputs without it are broadcast)
    axes: dict[str, int] = field(default_factory=dict)
    kinds: dict[Node, Kind] = field(default_factory=dict, repr=False)


class _Mixed(Exception):
    def __init__(self, node: Node, why: str):
        self.node, self.why = node, why


# ----- naming nodes in messages ----------------------------------------------------------
def _what(node: Node) -> str:
    """A few words for a node: 'mean over axis 0', 'max_pool2d', 'x[::-1]'."""
    if node.op in ("sum", "mean", "max"):
        axes = node.attrs["axes"]
        return f"{node.op} over axis {axes[0] if len(axes) == 1 else axes}"
    if node.op == "ew":
        return node.attrs.get("label", "elementwise")
    return node.op


def _label(node: Node, users: dict[Node, list[Node]]) -> str:
    """The user's name for where a node comes from: its own name, the named node it
    was built for (spec nodes), or the first named node that uses it (builder code)."""
    if node.name or node.scope:
        shown = "" if get_op(node.op).elementwise else f" ({_what(node)})"
        return f"node '{node.name or node.scope}'{shown}"
    seen, todo = set(), list(users.get(node, ()))
    while todo:
        n = todo.pop(0)
        if n.name or n.scope:
            return f"a {_what(node)} inside node '{n.name or n.scope}'"
        if n not in seen:
            seen.add(n)
            todo.extend(users.get(n, ()))
    return f"an unnamed {_what(node)} (node %{node.id})"


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


# ----- the rules, one per kind of op -----------------------------------------------------
def _elementwise(node: Node, kinds: list[Kind], dim: str) -> Kind:
    lin = [i for i, k in enumerate(kinds) if k.tag == LIN_TAG]
    rows = [i for i, k in enumerate(kinds) if k.tag == ROW_TAG]
    if lin and rows:
        src = kinds[lin[0]].source
        raise _Mixed(node, f"combines rows of the batch with a {_what(src)} of them")
    if lin:
        if node.dtype != "float":
            raise _Mixed(node, "compares a sum or mean over the batch")
        expr, syms = node_expr(node), [arg_symbol(i) for i in lin]
        try:
            linear = all(sp.simplify(sp.diff(expr, a, b)) == 0 for a in syms for b in syms)
        except Exception:   # noqa: BLE001  (a function SymPy cannot differentiate: refuse)
            linear = False
        if not linear:
            raise _Mixed(node, f"is a nonlinear function of a sum or mean over the batch "
                               f"({_what(kinds[lin[0]].source)}), not a weighted sum of per-row terms")
        return Kind(LIN_TAG, source=kinds[lin[0]].source)
    if not rows:
        return FREE
    axes = {node.ndim - node.inputs[i].ndim + kinds[i].axis for i in rows}
    if len(axes) > 1:
        raise _Mixed(node, "lines up the batch axes of its operands differently")
    return row(axes.pop())


def _reduction(node: Node, k: Kind) -> Kind:
    axes, keep = node.attrs["axes"], node.attrs["keepdims"]
    if k.tag == LIN_TAG:
        if node.op == "max":
            raise _Mixed(node, f"takes the max of a sum or mean over the batch ({_what(k.source)})")
        return k
    if k.tag != ROW_TAG:
        return k
    if k.axis not in axes:
        return row(k.axis if keep else k.axis - len([a for a in axes if a < k.axis]))
    if node.op == "max":
        raise _Mixed(node, "mixes rows of the batch")
    return Kind(LIN_TAG, source=node)


def _matmul_subscripts(a: Node, b: Node) -> tuple[list[str], str]:
    """matmul as einsum letters (batch dims right-aligned, as NumPy broadcasts them)."""
    if a.ndim == 1 and b.ndim == 1:
        return ["k", "k"], ""
    if a.ndim == 1:
        lead = "abcdefgh"[:b.ndim - 2]
        return ["k", lead + "kn"], lead + "n"
    if b.ndim == 1:
        lead = "abcdefgh"[:a.ndim - 2]
        return [lead + "mk", "k"], lead + "m"
    rank = max(a.ndim, b.ndim) - 2
    lead = "abcdefgh"[:rank]
    return [lead[rank - (a.ndim - 2):] + "mk", lead[rank - (b.ndim - 2):] + "kn"], lead + "mn"


def _contraction(node: Node, ins: list[str], out: str, kinds: list[Kind]) -> Kind:
    """einsum and matmul: multilinear in their operands."""
    lin = [i for i, k in enumerate(kinds) if k.tag == LIN_TAG]
    rows = [i for i, k in enumerate(kinds) if k.tag == ROW_TAG]
    if lin and rows:
        raise _Mixed(node, f"combines rows of the batch with a {_what(kinds[lin[0]].source)} of them")
    if len(lin) > 1:
        raise _Mixed(node, "multiplies two sums or means over the batch, not a weighted sum of per-row terms")
    if lin:
        return kinds[lin[0]]
    if not rows:
        return FREE
    letters = {ins[i][kinds[i].axis] for i in rows}
    if len(letters) > 1:
        raise _Mixed(node, "pairs each row of the batch with every other row")
    (letter,) = letters
    if letter in out:
        return row(out.index(letter))
    return Kind(LIN_TAG, source=node)   # a sum over the batch of per-row products (x.T @ r)


def _index_axis(node: Node, axis: int) -> int:
    """Where input axis ``axis`` goes through basic indexing, if it is taken whole."""
    index, x = node.attrs["index"], node.inputs[0]
    consumed = len([i for i in index if i is not None and i is not Ellipsis])
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (x.ndim - consumed) + index[k + 1:]
    else:
        index = index + (slice(None),) * (x.ndim - consumed)
    src = out = 0
    for item in index:
        if item is None:
            out += 1
            continue
        if src == axis:
            if isinstance(item, slice) and item.start is None and item.stop is None and item.step in (None, 1):
                return out
            raise _Mixed(node, "selects or reorders rows of the batch")
        src += 1
        out += 0 if isinstance(item, int) else 1
    raise AssertionError("unreachable: the batch axis is within the index")


def _structural(node: Node, kinds: list[Kind]) -> Kind:
    """Ops that move values around: the batch axis must stay one whole axis."""
    op, (k, *rest) = node.op, kinds
    x = node.inputs[0]
    if op in ("identity", "stop_gradient"):
        return k
    if op in ("ones_like", "zeros_like"):
        return k if k.tag == ROW_TAG else FREE
    if k.tag != ROW_TAG:
        if op in ("transpose", "reshape", "broadcast_to", "getitem") or (
                op == "concatenate" and all(j.tag == k.tag for j in kinds)):
            return k
        if all(j.tag == "free" for j in kinds):
            return FREE
        if any(j.tag == LIN_TAG for j in kinds):
            raise _Mixed(node, f"applies {op} to a sum or mean over the batch")
        raise _Mixed(node, "takes the batch in an operand it does not keep apart")
    if op == "transpose":
        return row(node.attrs["axes"].index(k.axis))
    if op == "reshape":
        if x.shape[:k.axis + 1] != node.shape[:k.axis + 1]:
            raise _Mixed(node, "reshapes across the batch axis")
        return row(k.axis)
    if op == "broadcast_to":
        return row(node.ndim - x.ndim + k.axis)
    if op == "getitem":
        return row(_index_axis(node, k.axis))
    if op == "concatenate":
        if any(j != k for j in kinds) or node.attrs["axis"] == k.axis:
            raise _Mixed(node, "joins the batch with other values")
        return k
    if op == "take_label":
        if kinds[1].tag == ROW_TAG and kinds[1].axis == k.axis and k.axis < x.ndim - 1:
            return k
        raise _Mixed(node, "picks labels across rows of the batch")
    if op == "im2col" and k.axis == 0:     # conv2d's columns: the batch is axis 3 channels-first
        return row(3 if node.attrs.get("channels_first") else 0)
    if op in ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d"):
        weights, cols = rest[:1], rest[1:]      # conv2d's third input: the im2col of x
        if k.axis == 0 and all(j.tag == "free" for j in weights) and all(j.tag == ROW_TAG for j in cols):
            return k
        raise _Mixed(node, "convolves or pools along the batch axis")
    raise _Mixed(node, f"applies '{op}', which backcomp does not know to keep rows of the batch apart")


def _gather(node: Node, kinds: list[Kind]) -> Kind:
    """take(table, ids): per-row ids into a table of params keep rows apart; one_hot of
    per-row ids too; tril/triu keep them apart when the batch is not a matrix axis."""
    k = kinds[0]
    if node.op == "one_hot":
        return k if k.tag == ROW_TAG else FREE
    if node.op in ("tril", "triu"):
        if k.tag != ROW_TAG:
            return k
        if k.axis < node.ndim - 2:
            return k
        raise _Mixed(node, f"takes a triangle across the batch axis ({node.op})")
    ids = kinds[1]
    if k.tag == "free" and ids.tag != LIN_TAG:
        return FREE if ids.tag == "free" else row(node.attrs["axis"] + ids.axis)
    raise _Mixed(node, "gathers across rows of the batch")


def _kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    for k in kinds:
        if k.tag == MIXED_TAG:
            return k
    if node.op == "input":
        where = _axis_of(node.shape, dim)
        if where == "twice":
            raise _Mixed(node, f"has the batch dim '{dim}' on two axes")
        return FREE if where is None else row(where)
    if node.op == "param":
        return FREE
    opdef = get_op(node.op)
    if node.op in ("arange", "eye") and dim in node.shape:
        raise _Mixed(node, f"numbers the rows of the batch ({node.op} over '{dim}')")
    if node.op == "getitem" and any(isinstance(i, slice) and i.stop == dim for i in node.attrs["index"]):
        raise _Mixed(node, f"takes the first {dim} entries of a value: a chunk would take the first rows again")
    if opdef.random or node.op == "scan" and _draws(node):
        raise _Mixed(node, f"draws random numbers ({node.op}): chunks would not draw what the whole batch draws")
    if node.op in ("scan", "scan_out") and any(k.tag != "free" for k in kinds):
        raise _Mixed(node, "runs a loop (scan) over batch values; loops are not analysed for separability")
    if not node.inputs:
        kind = FREE
    elif node.op in ("take", "one_hot", "tril", "triu"):
        kind = _gather(node, kinds)
    elif opdef.elementwise:
        kind = _elementwise(node, kinds, dim)
    elif node.op in ("sum", "mean", "max"):
        kind = _reduction(node, kinds[0])
    elif node.op == "matmul":
        ins, out = _matmul_subscripts(*node.inputs)
        kind = _contraction(node, ins, out, kinds)
    elif node.op == "einsum":
        kind = _contraction(node, *parse_einsum(node.attrs["subscripts"], len(node.inputs)), kinds)
    else:
        kind = _structural(node, kinds)
    where = _axis_of(node.shape, dim)
    if kind.tag == LIN_TAG and where is not None:
        raise _Mixed(node, f"spreads a sum or mean over the batch ({_what(kind.source)}) back over its rows")
    if kind.tag == "free":   # params broadcast to the batch's shape: the same in every row
        if where == "twice":
            raise _Mixed(node, f"has the batch dim '{dim}' on two axes")
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
        except _Mixed as e:
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
