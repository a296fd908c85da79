"""Array constants: ``zeros``, ``ones``, ``full``, ``eye``, ``arange``, and ``tril``/``triu``.

Shapes may hold symbolic dims (``zeros((B, 64))``, ``arange(T)``): the generated code
reads them from the variables ``_validate`` binds.  A float constant takes the model's
float dtype from its *anchor*, the graph's first param (or float input), which it
reads as its one input: ``np.zeros((B, 64), dtype=W.dtype)`` computes in float32 for
float32 params and float64 for float64 ones, as every other value does.  ``arange``
is integer (ids for ``take``, operands of mask comparisons).  A constant has no
gradient; ``tril``/``triu`` are linear, their VJP is themselves.
"""
from __future__ import annotations

from backcomp import notation
from backcomp.graph import Graph, GraphError, Node, ShapeError, check_shape, format_shape
from backcomp.ops.batch_axis import ROW_TAG, Kind, Mixed, free_or_refuse
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import Param, X, spec_function
from backcomp.ops.common import linear_jvp


def dtype_anchor(graph: Graph, op: str) -> Node:
    """The node whose dtype float constants take: the first param, else the first float input."""
    for node in list(graph.params.values()) + list(graph.inputs.values()):
        if node.dtype == "float":
            return node
    raise GraphError(f"{op}: the model has no float param or input to take the dtype from")


def _graph(graph: Graph | None, op: str) -> Graph:
    if not isinstance(graph, Graph):
        raise GraphError(f"{op}() makes a new array: pass the graph it belongs to, e.g. {op}(..., graph=g)")
    return graph


def _shape(shape, op: str) -> tuple:
    if isinstance(shape, (int, str)) and not isinstance(shape, bool):
        shape = (shape,)
    return check_shape(tuple(shape), f"{op}: shape", products=True)


def _literal(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _code(shape) -> str:
    from backcomp.ops.common import shape_code
    return shape_code(shape)


# ----- full, zeros, ones --------------------------------------------------------------
def _full_emit(node, args, out):
    shape, value, dtype = _code(node.shape), node.attrs["value"], f"{args[0]}.dtype"
    if value == 0:
        return [f"{out} = np.zeros({shape}, dtype={dtype})"]
    if value == 1:
        return [f"{out} = np.ones({shape}, dtype={dtype})"]
    return [f"{out} = np.full({shape}, {_literal(value)}, dtype={dtype})"]


def _full_explain(node, args, scalars):
    shape, value = format_shape(node.shape), _literal(node.attrs["value"])
    return notation.opaque(f"full{shape}={value}", f"full({shape}, {value})",
                           notation.lit(rf"\operatorname{{full}}_{{{shape}}}({value})"), True)()


register_op(OpDef(
    "full", lambda ins, attrs: (attrs["shape"], "float"), _full_emit, None,
    no_derivative="a constant (its input only gives the dtype)",
    explain=_full_explain, doc="an array of one value in the model's float dtype (zeros, ones, full)",
    signature="full(shape, value)"))


@spec_function(Param("shape", "shape"), Param("value", "number"))
def full(shape, value, graph: Graph | None = None) -> Node:
    """``np.full(shape, value)`` in the model's float dtype; shape may hold symbolic dims."""
    return _full(shape, value, graph, "full")


def _full(shape, value, graph: Graph | None, op: str) -> Node:
    g = _graph(graph, op)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GraphError(f"{op}: value must be a number, got {value!r}")
    return g.apply("full", (dtype_anchor(g, op),), shape=_shape(shape, op), value=float(value))


@spec_function(Param("shape", "shape"))
def zeros(shape, graph: Graph | None = None) -> Node:
    """Zeros of ``shape`` in the model's float dtype."""
    return _full(shape, 0.0, graph, "zeros")


@spec_function(Param("shape", "shape"))
def ones(shape, graph: Graph | None = None) -> Node:
    """Ones of ``shape`` in the model's float dtype."""
    return _full(shape, 1.0, graph, "ones")


# ----- eye, arange --------------------------------------------------------------------
def _numbering_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """eye(B) or arange(B) numbers rows: each chunk would number its own from 0."""
    if dim in node.shape:
        raise Mixed(node, f"numbers the rows of the batch ({node.op} over '{dim}')")
    return free_or_refuse(node, kinds, dim)


register_op(OpDef(
    "eye", lambda ins, attrs: ((attrs["n"], attrs["n"]), "float"),
    lambda node, args, out: [f"{out} = np.eye({node.attrs['n']}, dtype={args[0]}.dtype)"],
    None, no_derivative="a constant (its input only gives the dtype)", separability=_numbering_kind,
    explain=lambda node, args, scalars: notation.opaque(
        f"eye{node.attrs['n']}", f"I_{node.attrs['n']}", rf"I_{{{{{node.attrs['n']}}}}}", True)(),
    doc="the n×n identity in the model's float dtype", signature="eye(n)"))


@spec_function(Param("n", "dim", minimum=1))
def eye(n, graph: Graph | None = None) -> Node:
    """The ``n``×``n`` identity matrix (n an integer or a symbolic dim)."""
    g = _graph(graph, "eye")
    (n,) = _shape((n,), "eye")
    return g.apply("eye", (dtype_anchor(g, "eye"),), n=n)


register_op(OpDef(
    "arange", lambda ins, attrs: ((attrs["n"],), "int"),
    lambda node, args, out: [f"{out} = np.arange({node.attrs['n']})"],
    None, no_derivative="integers: no input, no derivative", separability=_numbering_kind,
    explain=lambda node, args, scalars: notation.opaque(
        f"arange{node.attrs['n']}", f"arange({node.attrs['n']})",
        notation.lit(rf"\operatorname{{arange}}({node.attrs['n']})"), True)(),
    doc="0, 1, …, n−1 as integers (ids for take, operands of mask comparisons)", signature="arange(n)"))


@spec_function(Param("n", "dim", minimum=1))
def arange(n, graph: Graph | None = None) -> Node:
    """The integers 0 … n−1 (``np.arange(n)``), n an integer or a symbolic dim such as T."""
    g = _graph(graph, "arange")
    (n,) = _shape((n,), "arange")
    return g.apply("arange", (), n=n)


# ----- tril, triu ---------------------------------------------------------------------
def _triangle(op: str):
    def infer(inputs, attrs):
        (x,) = inputs
        if x.ndim < 2:
            raise ShapeError(f"{op}: needs at least 2 dimensions, got shape {format_shape(x.shape)}")
        return x.shape, x.dtype

    def vjp(node, ct):
        return [_apply(op, ct, node.attrs["k"])]

    def separability(node, kinds, dim):
        k = kinds[0]
        if k.tag != ROW_TAG or k.axis < node.ndim - 2:
            return k
        raise Mixed(node, f"takes a triangle across the batch axis ({op})")

    def explain(node, args, scalars):
        k = node.attrs["k"]
        return notation.opaque(f"{op}{k}", f"{op}({{0}}{', k=' + str(k) if k else ''})",
                               notation.lit(rf"\operatorname{{{op}}}_{{{k}}}") + r"\left({0}\right)", True)(*args)

    register_op(OpDef(
        op, infer, lambda node, args, out: [f"{out} = np.{op}({args[0]}, k={node.attrs['k']})"], vjp,
        jvp=linear_jvp, explain=explain, separability=separability,
        doc=f"np.{op}: the {'lower' if op == 'tril' else 'upper'} triangle of the last two axes "
            f"(k shifts the diagonal), zeros elsewhere", signature=f"{op}(x, k=0)"))


def _apply(op: str, x: Node, k: int) -> Node:
    return x.graph.apply(op, (x,), k=k)


_triangle("tril")
_triangle("triu")


@spec_function(X, Param("k", "int", False, 0))
def tril(x: Node, k: int = 0) -> Node:
    """The lower triangle of the last two axes (``np.tril``): a causal mask is ``tril(ones((T, T)))``."""
    return _apply("tril", x, int(k))


@spec_function(X, Param("k", "int", False, 0))
def triu(x: Node, k: int = 0) -> Node:
    """The upper triangle of the last two axes (``np.triu``)."""
    return _apply("triu", x, int(k))


__all__ = ["zeros", "ones", "full", "eye", "arange", "tril", "triu", "dtype_anchor"]
