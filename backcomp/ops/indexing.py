"""Gathering by integer ids: ``take``, ``embedding`` and ``one_hot``.

``take(a, ids, axis)`` is ``np.take``: any integer shape of ids, the result
``a.shape[:axis] + ids.shape + a.shape[axis+1:]``.  Its VJP scatter-adds the
cotangent back (``take_grad``, so repeated ids accumulate), and the VJP of that is a
``take`` again: the pair is closed under differentiation.  Ids that come from an
input are range-checked when the module runs (``index_range``): [-n, n) as
``np.take``, [0, n) for ``one_hot`` as ``torch.nn.functional.one_hot``.
"""
from __future__ import annotations

from backcomp import notation
from backcomp.graph import GraphError, Node, ShapeError, format_shape
from backcomp.ops.batch_axis import FREE, LIN_TAG, Kind, Mixed, row, rows_or_free
from backcomp.ops.constants import dtype_anchor
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import Param, spec_function
from backcomp.ops.common import linear_jvp, normalize_axes, shape_code
from backcomp.printer import use_helper


def _check_ids(ids: Node, op: str) -> None:
    if not isinstance(ids, Node) or ids.dtype != "int":
        raise ShapeError(f"{op}: ids must be an integer input (dtype int64) or an integer op such as arange")


# ----- take ---------------------------------------------------------------------------
def _take_infer(inputs, attrs):
    a, ids = inputs
    axis = attrs["axis"]
    return a.shape[:axis] + ids.shape + a.shape[axis + 1:], a.dtype


def _take_emit(node, args, out):
    if node.attrs["axis"] == 0:
        return [f"{out} = {args[0]}[{args[1]}]"]   # fancy indexing: faster than np.take on axis 0
    return [f"{out} = np.take({args[0]}, {args[1]}, axis={node.attrs['axis']})"]


def _take_vjp(node, ct):
    a, ids = node.inputs
    return [_apply("take_grad", (ct, ids), axis=node.attrs["axis"], shape=a.shape), None]


def _take_explain(node, args, scalars):
    axis = node.attrs["axis"]
    if axis == 0:
        return notation.opaque("take", "{0}[{1}]", r"{0}_{{[{1}]}}", True)(*args)
    return notation.opaque(f"take{axis}", f"take({{0}}, {{1}}, axis={axis})",
                           notation.lit(rf"\operatorname{{take}}_{{{axis}}}") + r"\left({0}, {1}\right)", True)(*args)


def _take_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """Per-row ids into a table of params keep rows apart."""
    table, ids = kinds
    if table.tag == "free" and ids.tag != LIN_TAG:
        return FREE if ids.tag == "free" else row(node.attrs["axis"] + ids.axis)
    raise Mixed(node, "gathers across rows of the batch")


register_op(OpDef(
    "take", _take_infer, _take_emit, _take_vjp, jvp=linear_jvp, explain=_take_explain, separability=_take_kind,
    doc="np.take(a, ids, axis): gather along an axis by integer ids of any shape",
    signature="take(a, ids, axis=0)",
    index_range=lambda node: {1: (-_size(node.inputs[0], node.attrs["axis"]), _size(node.inputs[0], node.attrs["axis"]))}))


def _size(a: Node, axis: int):
    return a.shape[axis]


def _product(dims) -> str:
    return "*".join(str(d) for d in dims) or "1"


def _take_grad_emit(node, args, out):
    """Rows of the cotangent gathered per id, summed into zeros of a's shape."""
    use_helper("scatter_add")
    ct, ids = args
    axis, shape = node.attrs["axis"], node.attrs["shape"]
    m = node.inputs[1].ndim
    rest = shape[:axis] + shape[axis + 1:]
    rows = ct if axis == 0 else f"np.moveaxis({ct}, {tuple(range(axis, axis + m))}, {tuple(range(m))})"
    flat = f"_scatter_add({ids}.reshape(-1), {rows}.reshape({ids}.size, {_product(rest)}), {shape[axis]})"
    if axis == 0:
        return [f"{out} = {flat}.reshape({shape_code(shape)})"]
    return [f"{out} = np.moveaxis({flat}.reshape({shape_code((shape[axis],) + rest)}), 0, {axis})"]


register_op(OpDef(
    "take_grad", lambda ins, attrs: (attrs["shape"], ins[0].dtype), _take_grad_emit,
    lambda node, ct: [take(ct, node.inputs[1], node.attrs["axis"]), None], jvp=linear_jvp,
    explain=lambda node, args, scalars: notation.opaque(
        "scatter_add", "scatter_add({0}, {1})", r"\operatorname{{scatter\_add}}\left({0}, {1}\right)", True)(*args),
    doc="zeros of a's shape with ḡ's rows added at the ids: the VJP of take (compiler-internal)"))


def _apply(op: str, inputs, **attrs) -> Node:
    return inputs[0].graph.apply(op, tuple(inputs), **attrs)


@spec_function(Param("a", "array"), Param("ids", "label"), Param("axis", "int", False, 0))
def take(a: Node, ids: Node, axis: int = 0) -> Node:
    """``np.take(a, ids, axis)``; repeated ids accumulate in the gradient."""
    _check_ids(ids, "take")
    if not isinstance(a, Node) or a.dtype != "float":
        raise ShapeError("take: the gathered array must be a float array")
    (axis,) = normalize_axes(axis, a.ndim, "take")
    return _apply("take", (a, ids), axis=axis)


@spec_function(Param("ids", "label"), Param("E", "array"))
def embedding(ids: Node, E: Node) -> Node:
    """Rows of the table E (V, D) for integer ids of any shape: ``take(E, ids, axis=0)``."""
    if not isinstance(E, Node) or E.ndim != 2:
        raise ShapeError(f"embedding: the table must be 2-D (V, D), got {format_shape(E.shape) if isinstance(E, Node) else E!r}")
    return take(E, ids, axis=0)


# ----- one_hot ------------------------------------------------------------------------
def _one_hot_emit(node, args, out):
    ids, anchor = args
    n = node.attrs["n"]
    return [f"{out} = ({ids}[..., None] == np.arange({n})).astype({anchor}.dtype)"]


register_op(OpDef(
    "one_hot", lambda ins, attrs: (ins[0].shape + (attrs["n"],), "float"), _one_hot_emit, None,
    no_derivative="a function of integer ids (its float input only gives the dtype)", separability=rows_or_free,
    explain=lambda node, args, scalars: notation.opaque(
        f"one_hot{node.attrs['n']}", f"one_hot({{0}}, {node.attrs['n']})",
        notation.lit(rf"\operatorname{{one\_hot}}_{{{node.attrs['n']}}}") + r"\left({0}\right)", True)(args[0]),
    doc="one_hot(ids, n): a float array ids.shape + (n,), 1 at each id (ids in [0, n))",
    signature="one_hot(ids, n)",
    index_range=lambda node: {0: (0, node.attrs["n"])}))


@spec_function(Param("ids", "label"), Param("n", "int", minimum=1))
def one_hot(ids: Node, n: int) -> Node:
    """A float array ``ids.shape + (n,)``: 1 at each id, 0 elsewhere, in the model's float dtype."""
    _check_ids(ids, "one_hot")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GraphError(f"one_hot: n must be a positive integer, got {n!r}")
    return _apply("one_hot", (ids, dtype_anchor(ids.graph, "one_hot")), n=n)


__all__ = ["take", "embedding", "one_hot"]
