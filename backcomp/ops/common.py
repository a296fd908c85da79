"""What the tensor-level op modules share: shapes and axes as code, and rules of many ops.

The tensor-level ops (``contractions``, ``reductions``, ``layout``, ``slicing``,
``identity_like``, and ``shape``, ``indexing``, ``conv``, ``pool`` beside them) have
shape rules, NumPy emission and VJP and JVP rules written by hand at the tensor level
(the elementwise ops' derivatives are derived by SymPy).  Each rule builds IR nodes
from other registered ops.  Cotangents may come back with a broadcast shape; the VJP pass sums
them down to the input's shape (``sum_to``), so rules never unbroadcast by hand.
Tangents always have their value's exact shape.  Most of these ops are linear, so
their JVP is the op itself applied to the tangent (``linear_jvp``); the bilinear ones
(matmul, einsum, the convolutions) follow the product rule (``multilinear_jvp``).
Beside them, each op declares what the passes need to know of it (the ``OpDef``
fields after ``no_derivative``, ``backcomp.ops.registry``); the batching rules that
many ops share are here.  This module registers no op, so any op module may import
it without changing the order ops are registered in.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from backcomp.graph import Graph, Node, Shape, ShapeError


def shape_code(shape: Shape) -> str:
    """A shape as Python source; symbolic dims are local variables in generated code."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def axes_code(axes: tuple[int, ...]) -> str:
    return str(axes[0]) if len(axes) == 1 else shape_code(axes)


def normalize_axes(axis, ndim: int, op: str) -> tuple[int, ...]:
    """``axis`` (None, int or tuple) as sorted non-negative axes; None means all."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ShapeError(f"{op}: axis {a!r} is out of range for an array of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"{op}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def keepdims_shape(shape: Shape, axes: tuple[int, ...]) -> Shape:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def reduced_shape(shape: Shape, axes: tuple[int, ...], keepdims: bool) -> Shape:
    if keepdims:
        return keepdims_shape(shape, axes)
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _one(expr: str):
    """Emission for ops that are a single NumPy expression of their args."""
    def emit(node: Node, args: Sequence[str], out: str) -> list[str]:
        return [f"{out} = {expr.format(*args, **_fmt_attrs(node))}"]
    return emit


def _fmt_attrs(node: Node) -> dict:
    attrs = dict(node.attrs)
    if "axes" in attrs:
        attrs["axes_code"] = axes_code(attrs["axes"]) if attrs["axes"] else "()"
    attrs["shape_code"] = shape_code(node.shape)
    return attrs


def _apply(op: str, inputs: Sequence[Node], **attrs) -> Node:
    return inputs[0].graph.apply(op, inputs, **attrs)


# ----- JVP rules shared by many ops -------------------------------------------------
def linear_jvp(node: Node, tangents) -> Node | None:
    """A linear op's tangent is the op applied to its input's tangent; further inputs
    (labels, window indices) are read as they are."""
    t = tangents[0]
    if t is None:
        return None
    return node.graph.apply(node.op, (t,) + tuple(node.inputs[1:]), **node.attrs)


def multilinear_jvp(node: Node, tangents) -> Node | None:
    """Product rule for an op linear in each input: Σ_i op(x_1, .., ṫ_i, .., x_n)."""
    terms = [node.graph.apply(node.op, node.inputs[:i] + (t,) + node.inputs[i + 1:], **node.attrs)
             for i, t in enumerate(tangents) if t is not None]
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


# ----- rules of the passes shared by many ops ---------------------------------------
def _batched_as_is(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
    """An op whose attrs name no axis: the same op over the steps' leading axis."""
    return g.apply(node.op, ins, **node.attrs)


def _batched_with(shift: Callable[[dict, Any], dict]):
    """The batching rule of a one-operand op whose attrs name axes: ``shift(attrs, length)``
    moves them past the steps' leading axis; an operand without it is read as it is."""
    def batched(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
        return g.apply(node.op, ins, **(shift(node.attrs, length) if stacked[0] else node.attrs))
    return batched


# ----- explain rules shared by many ops ---------------------------------------------
def _same(node, args, scalars):
    return args[0]
