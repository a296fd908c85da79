"""Contractions: ``matmul`` and ``einsum``, multilinear in their operands.

Their JVP is the product rule (``multilinear_jvp``); their VJP contracts ḡ with the
other operands onto each one's axes (ā = ḡ Bᵀ, b̄ = Aᵀ ḡ for matmul).  Both are
emitted as BLAS matmuls where they can be: a stack of rows times one matrix as one
GEMM over the flattened rows, a two-operand einsum as one matmul over reshaped views
(np.einsum without ``optimize`` runs its own loops).  The batch-axis rule of both is
``_contraction_kind``, on einsum letters.

The VJP rules build transposes, slices and reshapes, imported from ``layout`` and
``slicing`` where they are used: those modules register their ops after these, in
the order of the op table (``backcomp.ops`` imports the op modules in that order).
"""
from __future__ import annotations

from typing import Sequence

import math

from backcomp.graph import Graph, GraphError, Node, ShapeError, broadcast_shapes, format_shape, multiply_dims
from backcomp.ops.batch_axis import FREE, LIN_TAG, ROW_TAG, Kind, Mixed, row, what
from backcomp.ops.common import _apply, multilinear_jvp, shape_code
from backcomp.ops.registry import OpDef, register_op
from backcomp import notation
from backcomp.ops.signature import Param, spec_function


# ----- the batch-axis rule of both ------------------------------------------------
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
    from backcomp.ops.layout import transpose   # registered after matmul (the module docstring)
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return transpose(x, axes)


def _matmul_vjp(node: Node, ct: Node):
    """ā = ḡ Bᵀ, b̄ = Aᵀ ḡ; 1-D operands are treated as a row or a column."""
    from backcomp.ops.slicing import getitem   # registered after matmul (the module docstring)
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
    return notation.opaque("matmul", "{0} · {1}", r"{0} \cdot {1}", wrap=True)(*args)


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
    from backcomp.ops.layout import broadcast_to, reshape   # registered after einsum (the module docstring)
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


__all__ = ["matmul", "einsum"]
