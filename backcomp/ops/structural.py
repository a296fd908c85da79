"""Structural ops: tensor-level shape rules, NumPy emission, VJP and JVP rules.

Each rule builds IR nodes from other registered ops.  Cotangents may come back with
a broadcast shape; the VJP pass sums them down to the input's shape (``sum_to``),
so rules here never unbroadcast by hand.  Tangents always have their value's exact
shape.  Most of these ops are linear, so their JVP is the op itself applied to the
tangent (``linear_jvp``); the bilinear ones (matmul, einsum) follow the product
rule (``multilinear_jvp``).  Beside them, each op declares what the passes need to
know of it (the ``OpDef`` fields after ``no_derivative``, ``backcomp.ops.registry``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import math

import sympy as sp

from backcomp.graph import (Graph, GraphError, Node, Shape, ShapeError, broadcast_shapes, check_shape, dim_factors,
                            format_shape, multiply_dims, product_dim)
from backcomp.ops.batch_axis import (FREE, LIN_TAG, ROW_TAG, Kind, Mixed, free_or_refuse, row, rows_or_free,
                                     same_kind, what)
from backcomp.ops.elementwise import CT, arg_symbol, dim_value, ew_from_expr
from backcomp.ops.registry import OpDef, register_op
from backcomp import notation
from backcomp.ops.signature import REDUCTION, UNARY, X, Param, spec_function


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
def _contraction_kind(node: Node, ins: list[str], out: str, kinds: list[Kind]) -> Kind:
    """einsum and matmul: multilinear in their operands."""
    lin = [i for i, k in enumerate(kinds) if k.tag == LIN_TAG]
    rows = [i for i, k in enumerate(kinds) if k.tag == ROW_TAG]
    if lin and rows:
        raise Mixed(node, f"combines rows of the batch with a {what(kinds[lin[0]].source)} of them")
    if len(lin) > 1:
        raise Mixed(node, "multiplies two sums or means over the batch, not a weighted sum of per-row terms")
    if lin:
        return kinds[lin[0]]
    if not rows:
        return FREE
    letters = {ins[i][kinds[i].axis] for i in rows}
    if len(letters) > 1:
        raise Mixed(node, "pairs each row of the batch with every other row")
    (letter,) = letters
    if letter in out:
        return row(out.index(letter))
    return Kind(LIN_TAG, source=node)   # a sum over the batch of per-row products (x.T @ r)


def _batched_as_is(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
    """An op whose attrs name no axis: the same op over the steps' leading axis."""
    return g.apply(node.op, ins, **node.attrs)


def _batched_with(shift: Callable[[dict, Any], dict]):
    """The batching rule of a one-operand op whose attrs name axes: ``shift(attrs, length)``
    moves them past the steps' leading axis; an operand without it is read as it is."""
    def batched(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
        return g.apply(node.op, ins, **(shift(node.attrs, length) if stacked[0] else node.attrs))
    return batched


# ----- matmul ---------------------------------------------------------------------
def _matmul_infer(inputs, attrs):
    a, b = inputs
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must have rank >= 1, got {format_shape(a.shape)} and {format_shape(b.shape)}")
    ka = a.shape[-1]
    kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if ka != kb:   # symbolic dims match only by name
        raise ShapeError(f"matmul: cannot multiply shapes {format_shape(a.shape)} and {format_shape(b.shape)} "
                         f"(inner dimensions {ka} and {kb} differ)")
    if a.ndim == 1 and b.ndim == 1:
        return (), "float"
    if a.ndim == 1:
        return b.shape[:-2] + b.shape[-1:], "float"
    if b.ndim == 1:
        return a.shape[:-1], "float"
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2], where="matmul batch dims: ")
    return batch + (a.shape[-2], b.shape[-1]), "float"


def _swap_last(x: Node) -> Node:
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return transpose(x, axes)


def _matmul_vjp(node: Node, ct: Node):
    """ā = ḡ Bᵀ, b̄ = Aᵀ ḡ; 1-D operands are treated as a row or a column."""
    a, b = node.inputs
    if a.ndim == 1 and b.ndim == 1:
        return [ct * b, ct * a]
    if a.ndim == 1:   # out[..., n] = Σ_k a[k] b[..., k, n]
        ga = matmul(b, ct) if ct.ndim == 1 else getitem(matmul(b, getitem(ct, (Ellipsis, None))), (Ellipsis, 0))
        gb = getitem(a, (slice(None), None)) * getitem(ct, (Ellipsis, None, slice(None)))
        return [ga, gb]
    if b.ndim == 1:   # out[..., m] = Σ_k a[..., m, k] b[k]
        ga = getitem(ct, (Ellipsis, None)) * b
        gb = matmul(ct, a) if ct.ndim == 1 else getitem(
            matmul(getitem(ct, (Ellipsis, None, slice(None))), a), (Ellipsis, 0, slice(None)))
        return [ga, gb]
    return [matmul(ct, _swap_last(b)), matmul(_swap_last(a), ct)]


def _matmul_explain(node, args, scalars):
    a, b = node.inputs   # ones (a grad node's seed) times a contraction over one element
    if args[0] == 1 and a.ndim >= 2 and a.shape[-1] == 1:   # is broadcasting, not a product
        return args[1]
    if args[1] == 1 and b.ndim >= 2 and b.shape[-2] == 1:
        return args[0]
    return notation.opaque("matmul", "{0} · {1}", r"{0} \cdot {1}")(*args)


def _matmul_emit(node: Node, args: Sequence[str], out: str) -> list[str]:
    """a @ b; a stack of rows times one matrix, (..., M, K) @ (K, N), as one GEMM over the
    flattened rows: np.matmul runs one small GEMM per batch entry, 1.24 ms against
    0.79 ms for (16, 64, 128) @ (128, 512) in float32 (a copy when a is not contiguous)."""
    a, b = node.inputs
    if a.ndim >= 3 and b.ndim == 2:
        rows = _size_code(a.shape[:-1])   # not -1: that cannot be inferred when K is 0
        return [f"{out} = ({args[0]}.reshape({rows}, {a.shape[-1]}) @ {args[1]}).reshape({shape_code(node.shape)})"]
    return [f"{out} = {args[0]} @ {args[1]}"]


def _matmul_subscripts(node: Node) -> tuple[list[str], str]:
    """matmul as einsum letters (batch dims right-aligned, as NumPy broadcasts them)."""
    a, b = node.inputs
    if a.ndim == 1 and b.ndim == 1:
        return ["k", "k"], ""
    if a.ndim == 1:
        lead = "abcdefgh"[:b.ndim - 2]
        return ["k", lead + "kn"], lead + "n"
    if b.ndim == 1:
        lead = "abcdefgh"[:a.ndim - 2]
        return [lead + "mk", "k"], lead + "m"
    rank = node.ndim - 2   # the broadcast batch dims
    lead = "abcdefgh"[:rank]
    return [lead[rank - (a.ndim - 2):] + "mk", lead[rank - (b.ndim - 2):] + "kn"], lead + "mn"


def _matmul_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    return _contraction_kind(node, *_matmul_subscripts(node), kinds)


def _matmul_batched(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
    """A stacked (T, M, K) times a matrix is one GEMM over (T·M, K); else broadcasting."""
    (a, b), (ba, bb) = ins, stacked
    if ba and not bb and node.inputs[0].ndim == 2 and b.ndim == 2:
        m, k = a.shape[1], a.shape[2]
        flat = g.apply("reshape", (a,), shape=(multiply_dims(length, m), k))
        out = g.apply("matmul", (flat, b))
        return g.apply("reshape", (out,), shape=(length, m, b.shape[1]))
    return g.apply("matmul", (a, b))


def _matrices(node: Node) -> bool:
    """Batched over matrices only: a stacked vector (T, K) would be read as one matrix."""
    return all(x.ndim >= 2 for x in node.inputs)


register_op(OpDef("matmul", _matmul_infer, _matmul_emit, _matmul_vjp, jvp=multilinear_jvp, explain=_matmul_explain,
                  separability=_matmul_kind, bound="products", batched=_matmul_batched, batchable=_matrices,
                  doc="np.matmul: 1-D, 2-D and batched (broadcast) operands", signature="a @ b"))


def matmul(a: Node, b: Node) -> Node:
    """a @ b with NumPy's matmul semantics."""
    return _apply("matmul", (a, b))


# ----- einsum ---------------------------------------------------------------------
def parse_einsum(subscripts: str, n_operands: int) -> tuple[list[str], str]:
    """'ij,jk->ik' -> (['ij', 'jk'], 'ik'); implicit output as NumPy (sorted singletons)."""
    if not isinstance(subscripts, str):
        raise GraphError("einsum: the first argument must be a subscripts string")
    spec = subscripts.replace(" ", "")
    if "..." in spec:
        raise GraphError("einsum: ellipsis ('...') is not supported; name every axis")
    lhs, arrow, out = spec.partition("->")
    ins = lhs.split(",")
    if len(ins) != n_operands:
        raise GraphError(f"einsum: subscripts '{subscripts}' name {len(ins)} operands, got {n_operands}")
    letters = "".join(ins)
    if not all(c.isalpha() for c in letters + out):
        raise GraphError(f"einsum: subscripts '{subscripts}' may only contain letters, ',' and '->'")
    if not arrow:
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    for s in ins + [out]:
        if len(set(s)) != len(s):
            raise GraphError(f"einsum: repeated index in '{s}' (traces/diagonals are not supported)")
    for c in out:
        if c not in letters:
            raise GraphError(f"einsum: output index '{c}' does not appear in any operand")
    return ins, out


def _einsum_infer(inputs, attrs):
    ins, out = parse_einsum(attrs["subscripts"], len(inputs))
    sizes: dict[str, object] = {}
    for s, x in zip(ins, inputs):
        if len(s) != x.ndim:
            raise ShapeError(f"einsum: operand '{s}' has rank {len(s)} but the array has shape {format_shape(x.shape)}")
        for c, d in zip(s, x.shape):
            if c in sizes and sizes[c] != d and 1 not in (sizes[c], d):
                raise ShapeError(f"einsum: index '{c}' has size {sizes[c]} in one operand and {d} in another")
            if sizes.get(c, 1) == 1:  # size 1 broadcasts against the other operands, as in np.einsum
                sizes[c] = d
    return tuple(sizes[c] for c in out), "float"


def _size_code(dims) -> str:
    """The product of some dims as code: 8, B, B*T (dim names are variables in the module)."""
    ints = math.prod(d for d in dims if isinstance(d, int))
    names = [str(d) for d in dims if not isinstance(d, int)]
    return "*".join(([str(ints)] if ints != 1 or not names else []) + names)


def _as_matmul(node, args, out) -> list[str] | None:
    """A two-operand contraction as one BLAS matmul over (batch..., left, contracted) and
    (batch..., contracted, right) views, or None when it is not one (a letter summed in
    one operand only, a contracted letter that broadcasts).

    np.einsum without ``optimize`` runs its own loops, not BLAS: an attention score
    (B 16, T 64, d 32) took 10 ms where matmul on the same views takes 0.5 ms.  Letters
    in both operands and the output batch the product (broadcasting as matmul does);
    weight gradients contract over the flattened batch, one GEMM instead of B.
    """
    (sa, sb), res = parse_einsum(node.attrs["subscripts"], 2)
    a, b = node.inputs
    first_b = [c for c in res if c in sb and c not in sa][:1]
    first_a = [c for c in res if c in sa and c not in sb][:1]
    if first_a and first_b and res.index(first_b[0]) < res.index(first_a[0]):
        sa, sb, a, b, args = sb, sa, b, a, args[::-1]   # (Bᵀ Aᵀ) instead of (A B)ᵀ: no transposed result
    dim = {c: d for s, x in ((sa, a), (sb, b)) for c, d in zip(s, x.shape)}
    if any(c not in sb and c not in res for c in sa) or any(c not in sa and c not in res for c in sb):
        return None
    batch = [c for c in res if c in sa and c in sb]
    left = [c for c in res if c in sa and c not in sb]
    right = [c for c in res if c in sb and c not in sa]
    contracted = [c for c in sa if c in sb and c not in res]
    if any(dict(zip(sa, a.shape))[c] != dict(zip(sb, b.shape))[c] for c in contracted):
        return None

    def operand(var, s, x, order, groups):
        perm = tuple(s.index(c) for c in order)
        code = var if perm == tuple(range(len(s))) else (
            f"{var}.T" if len(s) == 2 else f"{var}.transpose({', '.join(map(str, perm))})")
        if any(len(g) != 1 for g in groups):   # merge each group into one axis
            own = dict(zip(s, x.shape))
            sizes = [str(own[c]) for c in batch] + [_size_code([dim[c] for c in g]) for g in groups]
            code = f"{code}.reshape({', '.join(sizes)})"
        return code

    lhs = operand(args[0], sa, a, batch + left + contracted, [left, contracted])
    rhs = operand(args[1], sb, b, batch + contracted + right, [contracted, right])
    lines = [f"{out} = {lhs} @ {rhs}"]
    natural = batch + left + right
    if len(left) != 1 or len(right) != 1:
        final = dict(zip(res, node.shape))
        lines.append(f"{out} = {out}.reshape({shape_code(tuple(final[c] for c in natural))})")
    perm = tuple(natural.index(c) for c in res)
    if perm != tuple(range(len(res))):
        lines.append(f"{out} = {out}.transpose({', '.join(map(str, perm))})")
    return lines


def _einsum_emit(node, args, out):
    if len(args) == 2:
        lines = _as_matmul(node, args, out)
        if lines is not None:
            return lines
    ins, res = parse_einsum(node.attrs["subscripts"], len(args))
    spec = ",".join(ins) + "->" + res
    opt = ", optimize=True" if len(args) > 2 else ""
    return [f'{out} = np.einsum("{spec}", {", ".join(args)}{opt})']


def _einsum_vjp(node: Node, ct: Node):
    """The cotangent of operand i contracts ḡ with the other operands onto i's indices."""
    ins, out = parse_einsum(node.attrs["subscripts"], len(node.inputs))
    cts = []
    for i, x in enumerate(node.inputs):
        others = [(s, n) for j, (s, n) in enumerate(zip(ins, node.inputs)) if j != i]
        available = set(out).union(*(set(s) for s, _ in others))
        kept = "".join(c for c in ins[i] if c in available)
        g = einsum(",".join([out] + [s for s, _ in others]) + "->" + kept, ct, *(n for _, n in others))
        if kept != ins[i]:  # indices summed only inside operand i: broadcast back
            size = dict(zip(kept, g.shape))  # may exceed x's size 1 (np.einsum broadcasting)
            g = reshape(g, tuple(size[c] if c in available else 1 for c in ins[i]))
            g = broadcast_to(g, tuple(size[c] if c in available else d for c, d in zip(ins[i], x.shape)))
        cts.append(g)
    return cts


def _einsum_explain(node, args, scalars):
    s = node.attrs["subscripts"]
    slots = ", ".join("{%d}" % i for i in range(len(args)))
    return notation.opaque(f"einsum[{s}]", f"einsum(\"{s}\", {slots})",
                           notation.lit(rf"\operatorname{{einsum}}_{{\text{{{s}}}}}") + rf"\left({slots}\right)",
                           True)(*args)


def _einsum_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    return _contraction_kind(node, *parse_einsum(node.attrs["subscripts"], len(node.inputs)), kinds)


register_op(OpDef("einsum", _einsum_infer, _einsum_emit, _einsum_vjp, jvp=multilinear_jvp, explain=_einsum_explain,
                  separability=_einsum_kind, bound="products",
                  doc="np.einsum with explicit letters (no '...', no repeated index in one operand)",
                  signature='einsum("ij,jk->ik", a, b)'))


@spec_function(Param("subscripts", "subscripts"), variadic="array")
def einsum(subscripts: str, *operands: Node) -> Node:
    """Einstein summation, e.g. ``einsum("btd,bsd->bts", q, k)``."""
    if not operands:
        raise GraphError("einsum: needs at least one operand")
    return _apply("einsum", operands, subscripts=subscripts)


# ----- reductions -----------------------------------------------------------------
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


# ----- shape manipulation ---------------------------------------------------------
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
        transposed = notation.opaque("T", "{0}ᵀ", r"{0}^{{\top}}", atom=True)
        inner = args[0]
        return inner.args[0] if isinstance(inner, transposed) else transposed(inner)   # (Wᵀ)ᵀ = W
    return notation.opaque(f"transpose{axes}", f"transpose({{0}}, {axes})",
                           notation.lit(rf"\mathrm{{transpose}}_{{{axes}}}") + r"\left({0}\right)", True)(args[0])


def _transpose_inline(node, readers):
    """A 2-D transpose read once is printed as ``x.T`` in its reader: BLAS reads it in place."""
    return ".T" if node.ndim == 2 and readers == 1 else None


def _same(node, args, scalars):
    return args[0]


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


# ----- indexing -------------------------------------------------------------------
def _index_code(index: tuple) -> str:
    parts = []
    for item in index:
        if item is None:
            parts.append("None")
        elif item is Ellipsis:
            parts.append("...")
        elif isinstance(item, slice):
            s = "" if item.start is None else str(item.start)
            s += ":" + ("" if item.stop is None else str(item.stop))
            if item.step is not None:
                s += ":" + str(item.step)
            parts.append(s)
        else:
            parts.append(str(item))
    return ", ".join(parts) if len(parts) != 1 or parts[0] in ("None", "...") or ":" in parts[0] else parts[0]


def _indexed_axes(index: tuple) -> int:
    """How many axes of the array an index consumes (None and ... consume none).

    Counted with ``len``: this module's ``sum`` is the reduction op, not the builtin.
    """
    return len([i for i in index if i is not None and i is not Ellipsis])


def normalize_index(index, shape: Shape) -> tuple:
    """Validate a basic index (ints, slices, None, one Ellipsis) against ``shape``."""
    index = index if isinstance(index, tuple) else (index,)
    for item in index:
        ok = item is None or item is Ellipsis or (isinstance(item, int) and not isinstance(item, bool))
        if isinstance(item, slice):
            ok = all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (item.start, item.stop, item.step))
            if isinstance(item.stop, str) and item.stop.isidentifier() and item.start in (None, 0) and item.step is None:
                ok = True   # x[:T]: the first T entries, T a symbolic dim
            if item.step == 0:
                raise ShapeError("index: slice step cannot be zero")
        if not ok:
            raise ShapeError(f"index: only integers, slices, None and ... are allowed, got {item!r}")
    if list(index).count(Ellipsis) > 1:
        raise ShapeError("index: at most one '...' is allowed")
    n_axes = _indexed_axes(index)
    if n_axes > len(shape):
        raise ShapeError(f"index: too many indices for an array of shape {format_shape(shape)}")
    return index


def _getitem_infer(inputs, attrs):
    (x,) = inputs
    index = attrs["index"]
    n_axes = _indexed_axes(index)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        full = index[:k] + (slice(None),) * (x.ndim - n_axes) + index[k + 1:]
    else:
        full = index + (slice(None),) * (x.ndim - n_axes)
    out = []
    axis = 0
    for item in full:
        if item is None:
            out.append(1)
            continue
        d = x.shape[axis]
        axis += 1
        if isinstance(item, int):
            if isinstance(d, int) and not -d <= item < d:
                raise ShapeError(f"index {item} is out of bounds for axis {axis - 1} with size {d}")
            continue
        if isinstance(item.stop, str):
            out.append(item.stop)   # checked against d when the module runs (_dim_slice_checks)
            continue
        if isinstance(d, str):
            if item.start is None and item.stop is None and item.step in (None, 1, -1):
                out.append(d)
                continue
            raise ShapeError(f"index: cannot slice symbolic dimension {d} except with ':' or '::-1'")
        n = len(range(*item.indices(d)))
        if n == 0:
            raise ShapeError(f"index: slice {_index_code((item,))} of axis {axis - 1} (size {d}) is empty")
        out.append(n)
    return tuple(out), x.dtype


def _only_adds_axes(index: tuple) -> bool:
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index)


def _getitem_vjp(node, ct):
    x = node.inputs[0]
    if _only_adds_axes(node.attrs["index"]):
        return [reshape(ct, x.shape)]
    return [_apply("scatter", (ct,), index=node.attrs["index"], shape=x.shape)]


def _dim_slice_checks(node: Node, x: Node) -> list[str]:
    """``x[:T]`` with T a dim bound by the inputs: T must not exceed the axis (NumPy would
    silently give fewer entries, and the error would surface far away)."""
    index = node.attrs["index"]
    n_axes = _indexed_axes(index)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (x.ndim - n_axes) + index[k + 1:]
    lines, axis = [], 0
    for item in index:
        if item is None:
            continue
        d = x.shape[axis]
        if isinstance(item, slice) and isinstance(item.stop, str) and item.stop != d:
            lines += [f"if {item.stop} > {d}:",
                      f"    raise ValueError(f\"{item.stop}={{{item.stop}}} exceeds {d}, the size of axis {axis} of "
                      f"a {format_shape(x.shape)} value sliced [:{item.stop}]\")"]
        axis += 1
    return lines


def _getitem_emit(node, args, out):
    return _dim_slice_checks(node, node.inputs[0]) + [f"{out} = {args[0]}[{_index_code(node.attrs['index'])}]"]


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
            raise Mixed(node, "selects or reorders rows of the batch")
        src += 1
        out += 0 if isinstance(item, int) else 1
    raise AssertionError("unreachable: the batch axis is within the index")


def _getitem_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    if any(isinstance(i, slice) and i.stop == dim for i in node.attrs["index"]):
        raise Mixed(node, f"takes the first {dim} entries of a value: a chunk would take the first rows again")
    k = kinds[0]
    return row(_index_axis(node, k.axis)) if k.tag == ROW_TAG else k


def _index_after_steps(attrs: dict, length) -> dict:
    return dict(attrs, index=(slice(None),) + tuple(attrs["index"]))


register_op(OpDef("getitem", _getitem_infer, _getitem_emit,
                  _getitem_vjp, jvp=linear_jvp, memory="view", doc="basic NumPy indexing: ints, slices with steps, None, ...",
                  separability=_getitem_kind, bound="element", batched=_batched_with(_index_after_steps),
                  signature="x[i, a:b:c, None, ...]"))


def _scatter_emit(node, args, out):
    return [f"{out} = np.zeros({shape_code(node.shape)}, dtype={args[0]}.dtype)",
            f"{out}[{_index_code(node.attrs['index'])}] = {args[0]}"]


def _scatter_after_steps(attrs: dict, length) -> dict:
    return _shape_after_steps(_index_after_steps(attrs, length), length)


register_op(OpDef("scatter", lambda ins, attrs: (attrs["shape"], ins[0].dtype), _scatter_emit,
                  lambda node, ct: [getitem(ct, node.attrs["index"])], jvp=linear_jvp,
                  batched=_batched_with(_scatter_after_steps),
                  doc="zeros with x written at an index: the VJP of indexing (compiler-internal)"))


def getitem(x: Node, index) -> Node:
    """Basic indexing ``x[index]``."""
    return _apply("getitem", (x,), index=normalize_index(index, x.shape))


def _concat_infer(inputs, attrs):
    axis = attrs["axis"]
    first = inputs[0].shape
    total = 0
    for x in inputs:
        if x.ndim != len(first) or any(d != e for i, (d, e) in enumerate(zip(x.shape, first)) if i != axis):
            raise ShapeError(f"concatenate: shapes {' and '.join(format_shape(n.shape) for n in inputs)} "
                             f"differ outside axis {axis}")
        if isinstance(x.shape[axis], str):
            raise ShapeError(f"concatenate: cannot join along symbolic dimension {x.shape[axis]}")
        total += x.shape[axis]
    return first[:axis] + (total,) + first[axis + 1:], "float"


def _concat_vjp(node, ct):
    axis = node.attrs["axis"]
    cts, start = [], 0
    for x in node.inputs:
        stop = start + x.shape[axis]
        cts.append(getitem(ct, (slice(None),) * axis + (slice(start, stop),)))
        start = stop
    return cts


def _concat_jvp(node, tangents):
    """Linear: the tangents joined, zeros standing for inputs without one."""
    if all(t is None for t in tangents):
        return None
    parts = [t if t is not None else _apply("zeros_like", (x,)) for x, t in zip(node.inputs, tangents)]
    return _apply("concatenate", parts, **node.attrs)


def _concat_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    k = kinds[0]
    if k.tag != ROW_TAG:
        return k if all(j.tag == k.tag for j in kinds) else free_or_refuse(node, kinds, dim)
    if any(j != k for j in kinds) or node.attrs["axis"] == k.axis:
        raise Mixed(node, "joins the batch with other values")
    return k


def _concat_batched(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
    """Every operand needs the steps' axis, or the joined axis would differ between them."""
    if not all(stacked):
        raise GraphError("concatenate of batched and unbatched values")
    return g.apply("concatenate", ins, **dict(node.attrs, axis=node.attrs["axis"] + 1))


register_op(OpDef("concatenate", _concat_infer,
                  lambda node, args, out: [f"{out} = np.concatenate(({', '.join(args)},), axis={node.attrs['axis']})"],
                  _concat_vjp, jvp=_concat_jvp, doc="join arrays along an existing axis",
                  separability=_concat_kind, bound="any_input", batched=_concat_batched,
                  signature="concatenate((a, b), axis=0)"))


@spec_function(Param("arrays", "arrays"), Param("axis", "int", False, 0))
def concatenate(arrays: Sequence[Node], axis: int = 0) -> Node:
    arrays = tuple(arrays)
    if not arrays:
        raise GraphError("concatenate: needs at least one array")
    (axis,) = normalize_axes(axis, arrays[0].ndim, "concatenate")
    return _apply("concatenate", arrays, axis=axis)


# ----- identity-like ----------------------------------------------------------------
def _another_name(node, readers):
    return ""


register_op(OpDef("stop_gradient", lambda ins, attrs: (ins[0].shape, ins[0].dtype), _one("{0}"), None,
                  memory="view", inline=_another_name, separability=same_kind, bound="element",
                  no_derivative="zero by definition: no gradient or tangent flows through it",
                  explain=lambda node, args, scalars: notation.opaque(
                      "stop_gradient", "stop_gradient({0})", r"\operatorname{{sg}}\left({0}\right)", True)(args[0]),
                  doc="identity forward, zero cotangent", signature="stop_gradient(x)"))
register_op(OpDef("identity", lambda ins, attrs: (ins[0].shape, ins[0].dtype), _one("{0}"),
                  lambda node, ct: [ct], jvp=linear_jvp, memory="view", inline=_another_name, explain=_same,
                  separability=same_kind, bound="element", batched=_batched_as_is,
                  doc="a second name for a value (compiler-internal)"))


register_op(OpDef("ones_like", lambda ins, attrs: (ins[0].shape, "float"), _one("np.ones_like({0})"), None,
                  no_derivative="a constant: its value does not depend on x's",
                  separability=rows_or_free, bound="one", batched=_batched_as_is,
                  explain=lambda node, args, scalars: sp.Integer(1),
                  doc="ones of x's shape and dtype: the seed cotangent of the loss (compiler-internal)"))
register_op(OpDef("zeros_like", lambda ins, attrs: (ins[0].shape, "float"), _one("np.zeros_like({0})"), None,
                  no_derivative="a constant: its value does not depend on x's",
                  separability=rows_or_free, bound="zero", batched=_batched_as_is,
                  explain=lambda node, args, scalars: sp.Integer(0),
                  doc="zeros of x's shape and dtype: the gradient of an unused param (compiler-internal)"))


@spec_function(*UNARY)
def stop_gradient(x: Node) -> Node:
    """x in the forward; no gradient flows back through it."""
    return _apply("stop_gradient", (x,))


def identity(x: Node) -> Node:
    return _apply("identity", (x,))


__all__ = ["matmul", "einsum", "sum", "mean", "max", "min", "transpose", "reshape", "broadcast_to", "sum_to",
           "getitem", "concatenate", "stop_gradient", "identity", "arg_symbol"]
