"""Reductions over axes: ``sum``, ``mean``, ``max`` and ``min`` (−max(−x)), and ``max_vjp``.

sum and mean are linear (``linear_jvp``); their VJP broadcasts ḡ back over the
reduced axes.  The rules accept a cotangent that only broadcasts to the node's shape
(``broadcast_ct``) and put a unit axis back at every reduced axis (``_kept``), leaving
the broadcast to the consumer.  max's VJP and JVP spread ḡ over the maxima, ties
sharing it equally (as JAX), through the compiler-internal ``max_vjp``.  ``_count``,
the number of reduced elements with symbolic dims, is read by the passes too.

This module's ``sum``, ``max`` and ``min`` are the ops, not the builtins.  The rules
build reshapes, imported from ``layout`` where they are used: layout registers its
ops after these, in the order of the op table (``backcomp.ops`` imports the op
modules in that order).
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import GraphError, Node, Shape
from backcomp.ops.batch_axis import LIN_TAG, ROW_TAG, Kind, Mixed, row, what
from backcomp.ops.common import _apply, _batched_with, axes_code, keepdims_shape, linear_jvp, normalize_axes, reduced_shape
from backcomp.ops.elementwise import CT, dim_value, ew_from_expr
from backcomp.ops.registry import OpDef, register_op
from backcomp import notation
from backcomp.ops.signature import REDUCTION, spec_function


def _reduce_infer(inputs, attrs):
    (x,) = inputs
    return reduced_shape(x.shape, attrs["axes"], attrs["keepdims"]), "float"


def _reduce_emit(fn: str):
    def emit(node, args, out):
        x = node.inputs[0]
        axes, keep = node.attrs["axes"], node.attrs["keepdims"]
        if axes == tuple(range(x.ndim)) and not keep:
            return [f"{out} = {args[0]}.{fn}()"]
        return [f"{out} = {args[0]}.{fn}(axis={axes_code(axes)}{', keepdims=True' if keep else ''})"]
    return emit


def _kept(node: Node, ct: Node) -> Node:
    """The cotangent reshaped to keepdims form, so it broadcasts against the input.

    ``ct`` may be smaller than the node (it only has to broadcast to it): pad its
    rank first, then put a unit axis back at every reduced axis.
    """
    from backcomp.ops.layout import reshape   # registered after the reductions (the module docstring)
    x = node.inputs[0]
    axes = node.attrs["axes"]
    padded = (1,) * (node.ndim - ct.ndim) + ct.shape
    if node.attrs["keepdims"]:
        shape = padded
    else:
        it = iter(padded)
        shape = tuple(1 if i in axes else next(it) for i in range(x.ndim))
    return ct if ct.shape == shape else reshape(ct, shape)


def _sum_vjp(node, ct):
    """ḡ_x = ḡ broadcast back over the summed axes (left to the consumer)."""
    return [_kept(node, ct)]


def _count(shape: Shape, axes) -> sp.Expr:
    """Number of reduced elements, symbolic dims included (e.g. B·10)."""
    n = sp.Integer(1)
    for a in axes:
        d = shape[a]
        n *= dim_value(d)
    return n


def _mean_vjp(node, ct):
    x = node.inputs[0]
    return [ew_from_expr(CT / _count(x.shape, node.attrs["axes"]), {CT: _kept(node, ct)}, label="mean_vjp")]


def _max_vjp(node, ct):
    """Ties share the cotangent equally (as JAX), so gradients stay bounded."""
    from backcomp.ops.layout import reshape   # registered after the reductions (the module docstring)
    x = node.inputs[0]
    out_kd = node if node.attrs["keepdims"] else reshape(node, keepdims_shape(x.shape, node.attrs["axes"]))
    return [_apply("max_vjp", (x, out_kd, _kept(node, ct)), axes=node.attrs["axes"])]


def _max_vjp_emit(node, args, out):
    x, m, g = args
    axes = axes_code(node.attrs["axes"])
    return [f"{out} = {x} == {m}",
            f"{out} = {out} * ({g} / np.sum({out}, axis={axes}, keepdims=True, dtype={g}.dtype))"]


def _max_weights(x: Node, out_kd: Node, axes) -> Node:
    """1/(number of ties) at the maxima of x, 0 elsewhere: ∂max/∂x (piecewise constant)."""
    return _apply("max_vjp", (x, out_kd, _apply("ones_like", (out_kd,))), axes=axes)


def _max_jvp(node, tangents):
    """ṫ = Σ over the reduced axes of ṫ at the maxima, ties sharing equally (as the VJP)."""
    from backcomp.ops.layout import reshape   # registered after the reductions (the module docstring)
    (t,) = tangents
    x, axes = node.inputs[0], node.attrs["axes"]
    out_kd = node if node.attrs["keepdims"] else reshape(node, keepdims_shape(x.shape, axes))
    return _apply("sum", (_max_weights(x, out_kd, axes) * t,), axes=axes, keepdims=node.attrs["keepdims"])


def _max_vjp_vjp(node, ct):
    """max_vjp(x, m, ḡ) is linear in ḡ with weights that are piecewise constant in x and
    m (zero derivative wherever it exists, as relu''): ḡ̄ = Σ_axes weights ⊙ ct."""
    x, m, _ = node.inputs
    axes = node.attrs["axes"]
    return [None, None, _apply("sum", (_max_weights(x, m, axes) * ct,), axes=axes, keepdims=True)]


def _max_vjp_jvp(node, tangents):
    """Linear in ḡ (the weights are piecewise constant): max_vjp(x, m, ṫ_ḡ)."""
    t = tangents[2]
    return None if t is None else _apply("max_vjp", (node.inputs[0], node.inputs[1], t), **node.attrs)


def _reduce_explain(name: str, latex: str):
    def explain(node, args, scalars):
        return notation.reduction(node, args, scalars, name, latex, node.attrs["axes"])
    return explain


def _reduce_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """A sum or mean over the batch is LIN (linear in per-row terms); a max over it mixes rows."""
    k = kinds[0]
    axes, keep = node.attrs["axes"], node.attrs["keepdims"]
    if k.tag == LIN_TAG:
        if node.op == "max":
            raise Mixed(node, f"takes the max of a sum or mean over the batch ({what(k.source)})")
        return k
    if k.tag != ROW_TAG:
        return k
    if k.axis not in axes:
        return row(k.axis if keep else k.axis - len([a for a in axes if a < k.axis]))
    if node.op == "max":
        raise Mixed(node, "mixes rows of the batch")
    return Kind(LIN_TAG, source=node)


def _reduce_axes_after_steps(attrs: dict, length) -> dict:
    return dict(attrs, axes=tuple(a + 1 for a in attrs["axes"]))


register_op(OpDef("sum", _reduce_infer, _reduce_emit("sum"), _sum_vjp, jvp=linear_jvp, explain=_reduce_explain("Σ", r"\sum"),
                  separability=_reduce_kind, bound="sum", batched=_batched_with(_reduce_axes_after_steps),
                  broadcast_ct=True, doc="sum over axis (int, tuple, or all when omitted), keepdims", signature="sum(x, axis=None, keepdims=False)"))
register_op(OpDef("mean", _reduce_infer, _reduce_emit("mean"), _mean_vjp, jvp=linear_jvp,
                  separability=_reduce_kind, bound="element", batched=_batched_with(_reduce_axes_after_steps),
                  explain=_reduce_explain("mean", r"\operatorname{mean}"), broadcast_ct=True, doc="mean over axis, keepdims", signature="mean(x, axis=None, keepdims=False)"))
register_op(OpDef("max", _reduce_infer, _reduce_emit("max"), _max_vjp, jvp=_max_jvp, explain=_reduce_explain("max", r"\max"),
                  separability=_reduce_kind, bound="element", batched=_batched_with(_reduce_axes_after_steps),
                  broadcast_ct=True, doc="max over axis, keepdims; ties share the gradient", signature="max(x, axis=None, keepdims=False)"))
register_op(OpDef("max_vjp", lambda ins, attrs: (ins[0].shape, "float"), _max_vjp_emit, _max_vjp_vjp,
                  jvp=_max_vjp_jvp,
                  doc="the cotangent of max: ḡ spread over the maximal elements (compiler-internal)"))


def _reduction(op):
    def build(x: Node, axis=None, keepdims: bool = False) -> Node:
        if not isinstance(keepdims, bool):
            raise GraphError(f"{op}: keepdims must be true or false")
        return _apply(op, (x,), axes=normalize_axes(axis, x.ndim, op), keepdims=keepdims)
    build.__name__ = op
    build.__doc__ = f"np.{op} over ``axis`` (None = all axes), optionally keeping dims."
    return spec_function(*REDUCTION)(build)


sum = _reduction("sum")
mean = _reduction("mean")
max = _reduction("max")


@spec_function(*REDUCTION)
def min(x: Node, axis=None, keepdims: bool = False) -> Node:
    """min over axis, keepdims; ties share the gradient (as torch.amin).

    Built as −max(−x): exact, since negation rounds nothing, and its VJP is derived
    from max's, so ties are treated exactly as max treats them.
    """
    if not isinstance(keepdims, bool):
        raise GraphError("min: keepdims must be true or false")
    axes = normalize_axes(axis, x.ndim, "min")
    return -max(-x, axis=axes, keepdims=keepdims)


__all__ = ["sum", "mean", "max", "min"]
