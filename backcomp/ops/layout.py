"""Layout ops: ``transpose``, ``reshape``, ``broadcast_to`` and its inverse ``sum_to``.

They move or repeat elements without computing new ones: transpose, reshape and
broadcast_to are views (``memory="view"``), and all four are linear, their JVP the op
applied to the tangent (``linear_jvp``).  Each VJP is another of them: transpose by
the inverse permutation, reshape back, broadcast_to summed back (``sum_to``, the VJP
pass's unbroadcasting) and sum_to broadcast again.  Dims are compared as products,
so a symbolic batch reshapes (B, T, 4) to ("B*T", 4) and back (``resolve_reshape``).
"""
from __future__ import annotations

from backcomp.graph import (Node, Shape, ShapeError, broadcast_shapes, check_shape, dim_factors, format_shape,
                            product_dim)
from backcomp.ops.batch_axis import ROW_TAG, Kind, Mixed, row
from backcomp.ops.common import _apply, _batched_with, _one, _same, axes_code, linear_jvp, shape_code
from backcomp.ops.registry import OpDef, register_op
from backcomp import notation
from backcomp.ops.signature import X, Param, spec_function


# ----- transpose ------------------------------------------------------------------
def _transpose_infer(inputs, attrs):
    (x,) = inputs
    return tuple(x.shape[a] for a in attrs["axes"]), inputs[0].dtype


def _transpose_emit(node, args, out):
    axes = node.attrs["axes"]
    n = len(axes)
    if axes == tuple(reversed(range(n))):
        return [f"{out} = {args[0]}.T"]
    if n >= 2 and axes == tuple(range(n - 2)) + (n - 1, n - 2):
        return [f"{out} = np.swapaxes({args[0]}, -1, -2)"]
    return [f"{out} = np.transpose({args[0]}, {shape_code(axes)})"]


def _transpose_vjp(node, ct):
    inverse = tuple(sorted(range(len(node.attrs["axes"])), key=lambda i: node.attrs["axes"][i]))
    return [transpose(ct, inverse)]


def _transpose_explain(node, args, scalars):
    axes = node.attrs["axes"]
    n = len(axes)
    if axes == tuple(reversed(range(n))) or axes == tuple(range(n - 2)) + (n - 1, n - 2):
        transposed = notation.opaque("T", "{0}ᵀ", r"{0}^{{\top}}", atom=True, wrap=True)
        inner = args[0]
        return inner.args[0] if isinstance(inner, transposed) else transposed(inner)   # (Wᵀ)ᵀ = W
    return notation.opaque(f"transpose{axes}", f"transpose({{0}}, {axes})",
                           notation.lit(rf"\mathrm{{transpose}}_{{{axes}}}") + r"\left({0}\right)", True)(args[0])


def _transpose_inline(node, readers):
    """A 2-D transpose read once is printed as ``x.T`` in its reader: BLAS reads it in place."""
    return ".T" if node.ndim == 2 and readers == 1 else None


def _transpose_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    k = kinds[0]
    return row(node.attrs["axes"].index(k.axis)) if k.tag == ROW_TAG else k


def _permutation_after_steps(attrs: dict, length) -> dict:
    return dict(attrs, axes=(0,) + tuple(a + 1 for a in attrs["axes"]))


register_op(OpDef("transpose", _transpose_infer, _transpose_emit, _transpose_vjp, jvp=linear_jvp, memory="view",
                  inline=_transpose_inline, explain=_transpose_explain, separability=_transpose_kind, bound="element",
                  batched=_batched_with(_permutation_after_steps),
                  doc="permute axes (default: reverse them, as x.T); a view, never a copy",
                  signature="transpose(x, axes=None) or x.T"))


@spec_function(X, Param("axes", "ints", False, None))
def transpose(x: Node, axes=None) -> Node:
    """Permute axes; no ``axes`` reverses them (``x.T``)."""
    if axes is None:
        axes = tuple(reversed(range(x.ndim)))
    axes = tuple(axes)
    if sorted(a % x.ndim if isinstance(a, int) and -x.ndim <= a < x.ndim else -1 for a in axes) != list(range(x.ndim)):
        raise ShapeError(f"transpose: axes {axes} are not a permutation of the {x.ndim} axes of {format_shape(x.shape)}")
    return _apply("transpose", (x,), axes=tuple(a % x.ndim for a in axes))


# ----- reshape --------------------------------------------------------------------
def resolve_reshape(shape: Shape, target) -> Shape:
    """Target shape with its one ``-1`` inferred, symbolic dims included.

    Dims are compared as products: (B, T, 4) reshapes to ("B*T", 4), to (-1, 4)
    (which infers "B*T") and back to (B, T, 4).
    """
    target = tuple(target)
    if any(isinstance(d, bool) or not isinstance(d, (int, str)) for d in target):
        raise ShapeError(f"reshape: shape {target!r} must hold integers and dim names")
    if target.count(-1) > 1:
        raise ShapeError("reshape: only one dimension may be -1")
    if any(isinstance(d, int) and d != -1 and d <= 0 for d in target):
        raise ShapeError(f"reshape: dimensions must be positive, got {format_shape(target)}")

    def size(dims) -> tuple[int, list[str]]:
        n, names = 1, []
        for d in dims:
            coeff, more = dim_factors(d)
            n, names = n * coeff, names + more
        return n, sorted(names)

    src_n, rest = size(shape)
    dst_n, dst_names = size(d for d in target if d != -1)
    for d in dst_names:
        if d not in rest:
            raise ShapeError(f"reshape: cannot reshape {format_shape(shape)} to {format_shape(target)} "
                             f"(dimension {d} does not divide it)")
        rest.remove(d)
    if -1 not in target:
        if rest or src_n != dst_n:
            raise ShapeError(f"reshape: cannot reshape {format_shape(shape)} to {format_shape(target)}")
        return target
    if src_n % dst_n:
        raise ShapeError(f"reshape: cannot reshape {format_shape(shape)} to {format_shape(target)}")
    fill = product_dim(src_n // dst_n, rest)
    return tuple(fill if d == -1 else d for d in target)


def _reshape_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    k = kinds[0]
    if k.tag != ROW_TAG:
        return k
    if node.inputs[0].shape[:k.axis + 1] != node.shape[:k.axis + 1]:
        raise Mixed(node, "reshapes across the batch axis")
    return row(k.axis)


def _shape_after_steps(attrs: dict, length) -> dict:
    return dict(attrs, shape=(length,) + tuple(attrs["shape"]))


register_op(OpDef("reshape", lambda ins, attrs: (attrs["shape"], ins[0].dtype), _one("{0}.reshape({shape_code})"),
                  lambda node, ct: [reshape(ct, node.inputs[0].shape)], jvp=linear_jvp, memory="view", explain=_same,
                  separability=_reshape_kind, bound="element", batched=_batched_with(_shape_after_steps),
                  doc="np.reshape; one -1 is inferred, symbolic dims allowed", signature="reshape(x, shape)"))


@spec_function(X, Param("shape", "shape"))
def reshape(x: Node, shape) -> Node:
    """np.reshape with one optional -1 (``reshape(h, (-1, 32))`` keeps a symbolic batch)."""
    target = resolve_reshape(x.shape, shape)
    if target == x.shape:
        return x
    return _apply("reshape", (x,), shape=target)


# ----- broadcast_to and sum_to ----------------------------------------------------
def _broadcast_infer(inputs, attrs):
    (x,) = inputs
    shape = attrs["shape"]
    if broadcast_shapes(x.shape, shape, where="broadcast_to: ") != shape:
        raise ShapeError(f"broadcast_to: cannot broadcast {format_shape(x.shape)} to {format_shape(shape)}")
    return shape, x.dtype


def _broadcast_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    k = kinds[0]
    return row(node.ndim - node.inputs[0].ndim + k.axis) if k.tag == ROW_TAG else k


register_op(OpDef("broadcast_to", _broadcast_infer, _one("np.broadcast_to({0}, {shape_code})"),
                  lambda node, ct: [sum_to(ct, node.inputs[0].shape)], jvp=linear_jvp, memory="view", explain=_same,
                  separability=_broadcast_kind, bound="element", batched=_batched_with(_shape_after_steps),
                  doc="np.broadcast_to (a read-only view)", signature="broadcast_to(x, shape)"))


@spec_function(X, Param("shape", "shape"))
def broadcast_to(x: Node, shape) -> Node:
    """np.broadcast_to: ``shape`` holds positive ints and dim names (``broadcast_to(b, (B, 4))``)."""
    shape = check_shape(shape, "broadcast_to")
    return x if x.shape == shape else _apply("broadcast_to", (x,), shape=shape)


def sum_to_axes(src: Shape, dst: Shape) -> tuple[tuple[int, ...], bool]:
    """Axes of ``src`` to sum to undo broadcasting to ``dst``; and whether to reshape."""
    lead = len(src) - len(dst)
    ones = tuple(lead + i for i, d in enumerate(dst) if d == 1 and src[lead + i] != 1)
    return tuple(range(lead)) + ones, bool(ones)


def _sum_to_emit(node, args, out):
    axes, keep = sum_to_axes(node.inputs[0].shape, node.shape)
    if keep and len(node.inputs[0].shape) == len(node.shape):
        return [f"{out} = {args[0]}.sum(axis={axes_code(axes)}, keepdims=True)"]
    if not keep:
        return [f"{out} = {args[0]}.sum(axis={axes_code(axes)})"]
    return [f"{out} = {args[0]}.sum(axis={axes_code(axes)}, keepdims=True).reshape({shape_code(node.shape)})"]


register_op(OpDef("sum_to", lambda ins, attrs: (attrs["shape"], ins[0].dtype), _sum_to_emit,
                  lambda node, ct: [broadcast_to(ct, node.inputs[0].shape)], jvp=linear_jvp, bound="sum",
                  explain=lambda node, args, scalars: notation.reduction(
                      node, args, scalars, "Σ", r"\sum", sum_to_axes(node.inputs[0].shape, node.shape)[0]),
                  doc="sum over broadcast axes: the VJP of broadcasting (compiler-internal)"))


def sum_to(x: Node, shape) -> Node:
    """Sum ``x`` down to ``shape``, undoing NumPy broadcasting."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    if broadcast_shapes(shape, x.shape) != x.shape:
        raise ShapeError(f"sum_to: {format_shape(x.shape)} is not a broadcast of {format_shape(shape)}")
    return _apply("sum_to", (x,), shape=shape)


__all__ = ["transpose", "reshape", "broadcast_to", "sum_to"]
