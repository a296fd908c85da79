"""Shape ops and scans along an axis: argmax, cumsum, stack, expand_dims, squeeze, flip, pad.

NumPy semantics throughout, each a single NumPy call in generated code.  Each VJP is
the op's structural inverse, built from registered ops so that it can be optimised
and differentiated again:

    stack        ḡ split along the new axis (one integer index per operand)
    expand_dims  squeeze the added axes;  squeeze: expand them back
    flip         flip ḡ along the same axes
    pad          crop ḡ to the unpadded region (a slice)
    cumsum       the reversed cumsum of ḡ (Σ over the positions at or after each one)
    argmax       none: an integer result, usable as labels or ids downstream

Shape ops keep their operand's dtype; argmax's result is an integer array.  Axes of
symbolic size cannot be squeezed or padded: their size is unknown until the module
runs, and a node's shape is fixed when it is built.
"""
from __future__ import annotations

from typing import Sequence

from backcomp import notation
from backcomp.graph import GraphError, Node, ShapeError, format_shape
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import AXIS, KEEPDIMS, X, Param, spec_function
from backcomp.ops.common import axes_code, linear_jvp, normalize_axes, reduced_shape
from backcomp.ops.slicing import getitem

_ALL = slice(None)


def _apply(op: str, inputs: Sequence[Node], **attrs) -> Node:
    return inputs[0].graph.apply(op, inputs, **attrs)


def _axes_text(axes: tuple[int, ...]) -> str:
    return str(axes[0]) if len(axes) == 1 else str(axes)


def _call_explain(name: str, attr: str):
    """``name[axis=k](x)``: the op's name and its axis, around its argument."""
    def explain(node, args, scalars):
        value = node.attrs[attr]
        shown = _axes_text(value) if isinstance(value, tuple) else str(value)
        return notation.opaque(f"{name}[{shown}]", f"{name}({{0}}, axis={shown})",
                               notation.lit(rf"\operatorname{{{name}}}_{{{shown}}}") + r"\left({0}\right)",
                               True)(*args)
    return explain


def _same(node, args, scalars):
    """Axes of size 1 added or removed: the same values, as reshape is written."""
    return args[0]


# ----- argmax ---------------------------------------------------------------------
def _argmax_infer(inputs, attrs):
    (x,) = inputs
    return reduced_shape(x.shape, attrs["axes"], attrs["keepdims"]), "int"


def _argmax_emit(node, args, out):
    x = node.inputs[0]
    if node.attrs["axes"] == tuple(range(x.ndim)) and x.ndim != 1:   # the index into the flattened array
        return [f"{out} = np.argmax({args[0]}{', keepdims=True' if node.attrs['keepdims'] else ''})"]
    (axis,) = node.attrs["axes"]
    return [f"{out} = np.argmax({args[0]}, axis={axis}{', keepdims=True' if node.attrs['keepdims'] else ''})"]


def _argmax_explain(node, args, scalars):
    if len(node.attrs["axes"]) == 1:
        return _call_explain("argmax", "axes")(node, args, scalars)
    return notation.opaque("argmax", "argmax({0})", r"\operatorname{{argmax}}\left({0}\right)", True)(*args)


register_op(OpDef("argmax", _argmax_infer, _argmax_emit, None, explain=_argmax_explain,
                  no_derivative="an integer index: piecewise constant in x",
                  doc="index of the largest value along axis (None: into the flattened array), the first of ties, "
                      "as np.argmax; an integer array with no gradient",
                  signature="argmax(x, axis=None, keepdims=False)"))


@spec_function(X, Param("axis", "int", False, None), KEEPDIMS)
def argmax(x: Node, axis: int | None = None, keepdims: bool = False) -> Node:
    """np.argmax: an integer array (labels, ids), the first index among ties; no gradient flows through it."""
    if not isinstance(keepdims, bool):
        raise GraphError("argmax: keepdims must be true or false")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise ShapeError(f"argmax: axis must be an integer or None, got {axis!r}")
    if x.ndim == 0:
        raise ShapeError("argmax: needs an array of rank >= 1, got a scalar")
    return _apply("argmax", (x,), axes=normalize_axes(axis, x.ndim, "argmax"), keepdims=keepdims)


# ----- cumsum ---------------------------------------------------------------------
def _cumsum_emit(node, args, out):
    axis = node.attrs["axis"]
    if node.attrs["reverse"]:   # Σ over the positions at or after each one
        return [f"{out} = np.flip(np.cumsum(np.flip({args[0]}, axis={axis}), axis={axis}), axis={axis})"]
    return [f"{out} = np.cumsum({args[0]}, axis={axis})"]


def _cumsum_vjp(node, ct):
    """x̄ = reversed cumsum of ḡ: x_i feeds every output at or after i."""
    return [_apply("cumsum", (ct,), axis=node.attrs["axis"], reverse=not node.attrs["reverse"])]


def _cumsum_explain(node, args, scalars):
    name = "revcumsum" if node.attrs["reverse"] else "cumsum"
    return _call_explain(name, "axis")(node, args, scalars)


register_op(OpDef("cumsum", lambda ins, attrs: (ins[0].shape, ins[0].dtype), _cumsum_emit, _cumsum_vjp, jvp=linear_jvp,
                  explain=_cumsum_explain, doc="cumulative sum along axis, as np.cumsum (same shape)",
                  signature="cumsum(x, axis)"))


@spec_function(X, Param("axis", "int"))
def cumsum(x: Node, axis: int) -> Node:
    """np.cumsum along ``axis`` (required: NumPy's default flattens, PyTorch has none)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ShapeError(f"cumsum: axis must be an integer, got {axis!r}")
    if x.ndim == 0:
        raise ShapeError("cumsum: needs an array of rank >= 1, got a scalar")
    (axis,) = normalize_axes(axis, x.ndim, "cumsum")
    return _apply("cumsum", (x,), axis=axis, reverse=False)


# ----- stack ----------------------------------------------------------------------
def _stack_infer(inputs, attrs):
    first = inputs[0]
    for x in inputs[1:]:
        if x.shape != first.shape:
            raise ShapeError(f"stack: all arrays must have the same shape, got "
                             f"{' and '.join(format_shape(n.shape) for n in inputs)}")
        if x.dtype != first.dtype:
            raise ShapeError(f"stack: all arrays must have the same dtype, got {first.dtype} and {x.dtype}")
    axis = attrs["axis"]
    return first.shape[:axis] + (len(inputs),) + first.shape[axis:], first.dtype


def _stack_vjp(node, ct):
    """Operand i's cotangent is ḡ at index i of the new axis."""
    lead = (_ALL,) * node.attrs["axis"]
    return [getitem(ct, lead + (i,)) for i in range(len(node.inputs))]


def _stack_explain(node, args, scalars):
    axis = node.attrs["axis"]
    slots = ", ".join("{%d}" % i for i in range(len(args)))
    return notation.opaque(f"stack_{len(args)}[{axis}]", f"stack(({slots}), axis={axis})",
                           notation.lit(rf"\operatorname{{stack}}_{{{axis}}}") + rf"\left({slots}\right)",
                           True)(*args)


def _stack_jvp(node, tangents):
    """Linear in all operands at once: the stack of their tangents (zeros where none)."""
    if all(t is None for t in tangents):
        return None
    parts = [t if t is not None else node.graph.apply("zeros_like", (x,)) for x, t in zip(node.inputs, tangents)]
    return node.graph.apply("stack", tuple(parts), **node.attrs)


register_op(OpDef("stack", _stack_infer,
                  lambda node, args, out: [f"{out} = np.stack(({', '.join(args)},), axis={node.attrs['axis']})"],
                  _stack_vjp, jvp=_stack_jvp, explain=_stack_explain,
                  doc="join arrays of one shape along a new axis, as np.stack",
                  signature="stack(arrays, axis=0)"))


@spec_function(Param("arrays", "arrays"), Param("axis", "int", False, 0))
def stack(arrays: Sequence[Node], axis: int = 0) -> Node:
    """np.stack: ``axis`` indexes the result, so it may be ``ndim`` (a new last axis)."""
    arrays = tuple(arrays)
    if not arrays:
        raise GraphError("stack: needs at least one array")
    (axis,) = normalize_axes(axis, arrays[0].ndim + 1, "stack")
    return _apply("stack", arrays, axis=axis)


# ----- expand_dims and squeeze ------------------------------------------------------
def _expand_infer(inputs, attrs):
    (x,) = inputs
    it = iter(x.shape)
    return tuple(1 if i in attrs["axes"] else next(it) for i in range(x.ndim + len(attrs["axes"]))), x.dtype


def _squeeze_infer(inputs, attrs):
    (x,) = inputs
    return tuple(d for i, d in enumerate(x.shape) if i not in attrs["axes"]), x.dtype


register_op(OpDef("expand_dims", _expand_infer,
                  lambda node, args, out: [f"{out} = np.expand_dims({args[0]}, {axes_code(node.attrs['axes'])})"],
                  lambda node, ct: [_apply("squeeze", (ct,), axes=node.attrs["axes"])],
                  jvp=linear_jvp, memory="view", explain=_same,
                  doc="insert axes of size 1 at the given positions of the result, as np.expand_dims (a view)",
                  signature="expand_dims(x, axis)"))
register_op(OpDef("squeeze", _squeeze_infer,
                  lambda node, args, out: [f"{out} = np.squeeze({args[0]}, axis={axes_code(node.attrs['axes'])})"],
                  lambda node, ct: [_apply("expand_dims", (ct,), axes=node.attrs["axes"])],
                  jvp=linear_jvp, memory="view", explain=_same,
                  doc="remove axes of size 1 (None: every fixed axis of size 1), as np.squeeze (a view)",
                  signature="squeeze(x, axis=None)"))


@spec_function(X, Param("axis", "axes"))
def expand_dims(x: Node, axis) -> Node:
    """np.expand_dims: ``axis`` (an int or a tuple) are positions in the result."""
    if axis is None:
        raise ShapeError("expand_dims: axis is required (an integer or a tuple of integers)")
    n = 1 if isinstance(axis, int) else len(tuple(axis))
    return _apply("expand_dims", (x,), axes=normalize_axes(axis, x.ndim + n, "expand_dims"))


@spec_function(X, AXIS)
def squeeze(x: Node, axis=None) -> Node:
    """np.squeeze; None removes every axis of fixed size 1 (a symbolic dim is never removed,
    since it may or may not be 1 when the module runs)."""
    if axis is None:
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    else:
        axes = normalize_axes(axis, x.ndim, "squeeze")
        for a in axes:
            if x.shape[a] != 1:
                kind = "symbolic" if isinstance(x.shape[a], str) else "of size"
                raise ShapeError(f"squeeze: axis {a} of {format_shape(x.shape)} is {kind} {x.shape[a]}, not 1")
    return _apply("squeeze", (x,), axes=axes) if axes else x


# ----- flip -----------------------------------------------------------------------
register_op(OpDef("flip", lambda ins, attrs: (ins[0].shape, ins[0].dtype),
                  lambda node, args, out: [f"{out} = np.flip({args[0]}, axis={axes_code(node.attrs['axes'])})"],
                  lambda node, ct: [_apply("flip", (ct,), axes=node.attrs["axes"])],
                  jvp=linear_jvp, memory="view", explain=_call_explain("flip", "axes"),
                  doc="reverse the order of elements along axis (None: all axes), as np.flip (a view)",
                  signature="flip(x, axis=None)"))


@spec_function(X, AXIS)
def flip(x: Node, axis=None) -> Node:
    """np.flip along ``axis`` (an int, a tuple, or None for every axis)."""
    axes = normalize_axes(axis, x.ndim, "flip")
    return _apply("flip", (x,), axes=axes) if axes else x


# ----- pad ------------------------------------------------------------------------
def normalize_widths(widths, shape) -> tuple[tuple[int, int], ...]:
    """np.pad's ``pad_width`` forms as one (before, after) pair per axis: an int n (n, n on
    every axis), a pair (the same on every axis), or a pair per axis."""
    ndim = len(shape)
    expected = f"an integer, a (before, after) pair, or {ndim} such pairs (one per axis)"

    def ints(v):
        return all(isinstance(i, int) and not isinstance(i, bool) for i in v)

    if isinstance(widths, int) and not isinstance(widths, bool):
        pairs = ((widths, widths),) * ndim
    elif isinstance(widths, (tuple, list)) and len(widths) == 2 and ints(widths):
        pairs = (tuple(widths),) * ndim
    elif isinstance(widths, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 and ints(p)
                                                    for p in widths) and len(widths) in (1, ndim):
        pairs = tuple(tuple(p) for p in widths) * (ndim if len(widths) == 1 else 1)
    else:
        raise ShapeError(f"pad: widths must be {expected}, got {widths!r}")
    for (before, after), d in zip(pairs, shape):
        if before < 0 or after < 0:
            raise ShapeError(f"pad: widths must be non-negative, got {widths!r}")
        if isinstance(d, str) and (before or after):
            raise ShapeError(f"pad: cannot pad symbolic dimension {d} of {format_shape(shape)}")
    return pairs


def _pad_infer(inputs, attrs):
    (x,) = inputs
    return tuple(d if isinstance(d, str) else d + b + a for d, (b, a) in zip(x.shape, attrs["widths"])), x.dtype


def _pad_vjp(node, ct):
    """x̄ = ḡ cropped to where x sits in the padded result."""
    x = node.inputs[0]
    index = tuple(_ALL if (b, a) == (0, 0) else slice(b, b + d) for d, (b, a) in zip(x.shape, node.attrs["widths"]))
    return [getitem(ct, index)]


def _pad_explain(node, args, scalars):
    widths = node.attrs["widths"]
    return notation.opaque(f"pad{widths}", f"pad({{0}}, {widths})",
                           notation.lit(r"\operatorname{pad}") + r"\left({0}\right)", True)(*args)


register_op(OpDef("pad", _pad_infer,
                  lambda node, args, out: [f"{out} = np.pad({args[0]}, {node.attrs['widths']})"],
                  _pad_vjp, jvp=linear_jvp, explain=_pad_explain,
                  doc="zeros around x: widths an int, a (before, after) pair, or a pair per axis, as np.pad",
                  signature="pad(x, widths)"))


@spec_function(X, Param("widths", "widths"))
def pad(x: Node, widths) -> Node:
    """np.pad with zeros (its default, constant mode); ``widths`` in any of np.pad's forms."""
    pairs = normalize_widths(widths, x.shape)
    if all(p == (0, 0) for p in pairs):
        return x
    return _apply("pad", (x,), widths=pairs)


__all__ = ["argmax", "cumsum", "stack", "expand_dims", "squeeze", "flip", "pad", "normalize_widths"]
