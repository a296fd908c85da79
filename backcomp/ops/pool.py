"""Pooling ops (NCHW, and NCL by lowering to a unit height), with tensor-level VJP rules.

Pools reduce strided views of the input window offset by window offset (no copy of
the windows, no Python loop over pixels in generated code).  Semantics as
``torch.nn.functional`` with ``ceil_mode=False``: the stride defaults to the window
size; padding is at most half the window; the max pool pads with −inf (a padded
position is never the maximum, since every window holds an input element), the
average pool with zeros that count in the divisor (``count_include_pad=True``, so
every window divides by kh·kw).  With padding, offset (i, j) of the windows covers
only the output positions whose offset lands inside the input: each statement works
on that region (``_regions``), so the input is never copied into a padded buffer.

The max pool's cotangent goes to the first maximum of each window (as PyTorch),
found once by a ``max_pool2d_argmax`` node shared by the backward; the average pool
spreads ḡ evenly.  Overlapping windows (stride < size) add up.  The backward ops are
linear in ḡ with adjoints among themselves (scatter ↔ gather at the argmax, average
pool ↔ its scatter), so the family can be differentiated again.

A padding of 0 is not stored on the node, so an unpadded pool reads, explains and
compiles exactly as before padding existed.
"""
from __future__ import annotations

from backcomp.graph import Node, ShapeError, format_shape
from backcomp.ops.conv import _covered, _int, _pair, _strided, apply, check_layout, out_size, per_image_kind, scratch
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import X, Param, spec_function
from backcomp.ops.common import linear_jvp
from backcomp.ops.layout import reshape

_SWV = "np.lib.stride_tricks.sliding_window_view"


# ----- geometry -------------------------------------------------------------------------
def pool_grid(op: str, shape, size, stride, padding) -> tuple:
    """The output's spatial dims of a pool of ``shape`` (N, C, *spatial), or a ShapeError;
    size, stride and padding hold one value per spatial dim."""
    spatial = shape[2:]
    if any(2 * p > k for p, k in zip(padding, size)):
        raise ShapeError(f"{op}: padding {_dims(padding)} must be at most half the window {_dims(size)} "
                         f"(as PyTorch)")
    padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
    if any(k > n for k, n in zip(size, padded)):
        where = f"padded input {_dims(padded)}" if any(padding) else f"input {_dims(spatial)}"
        raise ShapeError(f"{op}: window {_dims(size)} is larger than the {where} (shape {format_shape(shape)})")
    return tuple(out_size(n, k, s, p) for n, k, s, p in zip(spatial, size, stride, padding))


def _dims(values) -> str:
    return "x".join(str(v) for v in values)


def _padding(attrs) -> tuple[int, int]:
    return attrs.get("padding", (0, 0))


def pool_attrs(size, stride, padding=(0, 0)) -> dict:
    """A pool node's attrs: the padding only when it is not zero."""
    attrs = {"size": tuple(size), "stride": tuple(stride)}
    if tuple(padding) != (0, 0):
        attrs["padding"] = tuple(padding)
    return attrs


def _attrs_of(node: Node) -> dict:
    return pool_attrs(node.attrs["size"], node.attrs["stride"], _padding(node.attrs))


def _pool_out(op: str, x: Node, attrs) -> tuple:
    check_layout(x, op)
    return x.shape[:2] + pool_grid(op, x.shape, attrs["size"], attrs["stride"], _padding(attrs))


def _pool_infer(op: str):
    def infer(inputs, attrs):
        return _pool_out(op, inputs[0], attrs), "float"
    return infer


def _regions(node: Node, in_hw, grid):
    """(k, region, source) per window offset (i, j), k = i·kw + j: the output positions
    whose offset (i, j) lands inside the unpadded input (``region``, "" when it is the
    whole output) and the strided input slice they read (``source``).  Offsets that
    land only in the padding are left out."""
    (kh, kw), (sh, sw), (ph, pw) = node.attrs["size"], node.attrs["stride"], _padding(node.attrs)
    (h, w), (ho, wo) = in_hw, grid
    for i in range(kh):
        r0, r1 = _covered(h, i, sh, ph, ho)
        for j in range(kw):
            c0, c1 = _covered(w, j, sw, pw, wo)
            if r0 == r1 or c0 == c1:
                continue
            region = "" if (r0, r1, c0, c1) == (0, ho, 0, wo) else f"[:, :, {r0}:{r1}, {c0}:{c1}]"
            yield (i * kw + j, region,
                   f"[:, :, {_strided(r0 * sh + i - ph, r1 - r0, sh)}, {_strided(c0 * sw + j - pw, c1 - c0, sw)}]")


def _forward_regions(node: Node):
    return list(_regions(node, node.inputs[0].shape[2:], node.shape[2:]))


def _windows(x: str, node: Node) -> str:
    """N, C, Ho, Wo, kh, kw strided windows of unpadded ``x`` (a read-only view)."""
    (kh, kw), (sh, sw) = node.attrs["size"], node.attrs["stride"]
    step = "" if (sh, sw) == (1, 1) else f"[:, :, ::{sh}, ::{sw}]"
    return f"{_SWV}({x}, ({kh}, {kw}), axis=(2, 3)){step}"


def _overlap(node: Node) -> bool:
    (kh, kw), (sh, sw) = node.attrs["size"], node.attrs["stride"]
    return sh < kh or sw < kw


def _check_grid(op: str, ct: Node, attrs) -> tuple:
    """The input shape a pool backward writes; ḡ must have the pool's output shape."""
    n = ct.shape[0] if ct.ndim == 4 else None
    in_shape = (n,) + tuple(attrs["in_shape"])
    expected = in_shape[:2] + pool_grid(op, in_shape, attrs["size"], attrs["stride"], _padding(attrs))
    if ct.ndim != 4 or ct.shape[1:] != expected[1:]:
        raise ShapeError(f"{op}: cotangent {format_shape(ct.shape)} does not match the pool output "
                         f"(N, {', '.join(str(d) for d in expected[1:])})")
    return in_shape


def _first_full(views, x: str, out: str, reduce: str) -> list[str]:
    """``out`` from the offsets that cover the whole output: ``reduce`` of the first two
    (then the others in place), a copy of the only one, or [] when there is none."""
    full = [src for _, region, src in views if not region]
    if len(full) == 1:
        return [f"{out} = {x}{full[0]}.copy()"]
    lines = [f"{out} = np.{reduce}({x}{full[0]}, {x}{full[1]})"] if full else []
    return lines + [f"np.{reduce}({out}, {x}{src}, out={out})" for src in full[2:]]


# ----- max pool: forward, the argmax of each window, scatter (the VJP) and gather (its VJP)
def _max_pool_vjp(node, ct):
    """x̄ = ḡ written at the first maximum of each window, summed where windows overlap."""
    x = node.inputs[0]
    idx = apply("max_pool2d_argmax", (x, node), **_attrs_of(node))
    return [apply("max_pool2d_scatter", (ct, idx), in_shape=x.shape[1:], **_attrs_of(node))]


def _max_pool_jvp(node, tangents):
    """ṫ read at the same first maximum of each window that the VJP writes to."""
    (t,) = tangents
    idx = apply("max_pool2d_argmax", (node.inputs[0], node), **_attrs_of(node))
    return apply("max_pool2d_gather", (t, idx), **_attrs_of(node))


def _max_pool_emit(node, args, out):
    """np.maximum over the kh·kw strided views of x, one window offset at a time: each
    pass streams over whole rows, with no copy of the windows (NaN propagates as in
    ``max``).  Offsets that reach the padding only update their region; if none covers
    the whole output, it starts as −inf (the padding's value)."""
    (x,), views = args, _forward_regions(node)
    lines = _first_full(views, x, out, "maximum")
    if not lines:
        (c, ho, wo) = node.shape[1:]
        lines = [f"{out} = np.full(({x}.shape[0], {c}, {ho}, {wo}), -np.inf, dtype={x}.dtype)"]
    return lines + [f"np.maximum({out}{region}, {x}{src}, out={out}{region})" for _, region, src in views if region]


register_op(OpDef(
    "max_pool2d", _pool_infer("max_pool2d"), _max_pool_emit, _max_pool_vjp, jvp=_max_pool_jvp,
    separability=per_image_kind, bound="element",
    doc="max over size windows of NCHW x (size, stride, padding an int or an (h, w) pair; stride defaults to "
        "size; padding <= size/2 counts as -inf); the gradient goes to the first maximum of each window, as PyTorch",
    signature="max_pool2d(x, size, stride=size, padding=0)"))


def _argmax_infer(inputs, attrs):
    x, m = inputs
    shape = _pool_out("max_pool2d_argmax", x, attrs)
    if m.shape != shape:
        raise ShapeError(f"max_pool2d_argmax: window maxima {format_shape(m.shape)} do not match "
                         f"the pool output {format_shape(shape)}")
    return shape, "int"


def _index_dtype(node: Node) -> str:
    """The smallest integer type that holds every window offset."""
    kh, kw = node.attrs["size"]
    return "np.int8" if kh * kw <= 128 else "np.int32"


def _argmax_emit(node, args, out):
    """The first offset where a window equals its max (the forward's output), counted:
    idx = Σ_k [offsets 0..k all differ from the max], so a running "no max yet" mask is
    and-ed with one comparison per offset and added in (the last offset is never
    compared).  That is one strided read of x per offset and cheap contiguous passes
    over booleans: four times faster than the np.where per offset it replaces (0.5 ms
    against 2.3 ms for a 2x2 pool of (64, 16, 28, 28) float32).  Measured and dropped:
    max and argmax together in the forward by a compare chain (strict >, np.copyto
    where it wins), about 2.5x the time of the max then this count.  An offset that
    reaches the padding compares only in its region (padding is never the max)."""
    x, m = args
    (kh, kw), it = node.attrs["size"], _index_dtype(node)
    views = {k: (region, src) for k, region, src in _forward_regions(node)}
    if kh * kw == 1:
        return [f"{out} = np.zeros({m}.shape, dtype={it})"]
    acc, lines = scratch(out, "later"), []
    for k in range(kh * kw - 1):
        if k not in views:          # only padding: never the max, the mask stays
            if k == 0:
                lines.append(f"{acc} = np.ones({m}.shape, dtype=bool)")
        elif k == 0 and not views[0][0]:
            lines.append(f"{acc} = {x}{views[0][1]} != {m}")
        elif k == 0:
            region, src = views[0]
            lines += [f"{acc} = np.ones({m}.shape, dtype=bool)",
                      f"np.not_equal({x}{src}, {m}{region}, out={acc}{region})"]
        else:
            region, src = views[k]
            lines.append(f"np.logical_and({acc}{region}, {x}{src} != {m}{region}, out={acc}{region})")
        lines.append(f"{out} = {acc}.astype({it})" if k == 0 else f"{out} += {acc}")
    return lines + [f"del {acc}"]


register_op(OpDef(
    "max_pool2d_argmax", _argmax_infer, _argmax_emit, None,
    no_derivative="integer window offsets: piecewise constant, nothing to differentiate",
    doc="flat offset (i·kw + j) of the first maximum of each pool window, given the maxima "
        "(compiler-internal)"))


def _scatter_infer(inputs, attrs):
    ct, idx = inputs
    in_shape = _check_grid("max_pool2d_scatter", ct, attrs)
    if idx.shape != ct.shape or idx.dtype != "int":
        raise ShapeError(f"max_pool2d_scatter: window indices {format_shape(idx.shape)} do not match "
                         f"the cotangent {format_shape(ct.shape)}")
    return in_shape, "float"


def _scatter_emit(node, args, out):
    """Offset by offset: (idx == k)·ḡ at offset k's strided positions, written in place
    (``out=``) where windows do not overlap and added where they do.  Windows that tile
    the input (stride = size, sizes divisible, no padding) write every element once: no
    zero fill.  (A one-hot compare broadcast over an (N, C, Ho, kh, Wo, kw) view writes
    contiguously but loops over runs of kw elements: ten times slower, measured.)"""
    ct, idx = args
    c, h, w = node.attrs["in_shape"]
    (kh, kw), (ho, wo) = node.attrs["size"], node.inputs[0].shape[2:]
    tiles = node.attrs["stride"] == node.attrs["size"] and (ho * kh, wo * kw) == (h, w) and "padding" not in node.attrs
    lines = [f"{out} = np.{'empty' if tiles else 'zeros'}(({ct}.shape[0], {c}, {h}, {w}), dtype={ct}.dtype)"]
    for k, region, src in _regions(node, (h, w), (ho, wo)):
        lines.append(f"{out}{src} += ({idx}{region} == {k}) * {ct}{region}" if _overlap(node) else
                     f"np.multiply({idx}{region} == {k}, {ct}{region}, out={out}{src})")
    return lines


def _scatter_vjp(node, ct):
    """Linear in ḡ: its adjoint gathers u at the same argmax positions."""
    g, idx = node.inputs
    return [apply("max_pool2d_gather", (ct, idx), **_attrs_of(node)), None]


register_op(OpDef(
    "max_pool2d_scatter", _scatter_infer, _scatter_emit, _scatter_vjp, jvp=linear_jvp,
    doc="the VJP of max_pool2d: ḡ added at each window's argmax (compiler-internal)"))


def _gather_infer(inputs, attrs):
    u, idx = inputs
    out = _pool_out("max_pool2d_gather", u, attrs)
    if idx.shape != out or idx.dtype != "int":
        raise ShapeError(f"max_pool2d_gather: window indices {format_shape(idx.shape)} do not match "
                         f"the pool output {format_shape(out)}")
    return out, "float"


def _gather_emit(node, args, out):
    """u at each window's argmax: one take_along_axis over the windows' view, or, with
    padding, a copy per offset where the argmax is that offset."""
    u, idx = args
    if "padding" in node.attrs:
        return [f"{out} = np.zeros({idx}.shape, dtype={u}.dtype)"] + \
               [f"np.copyto({out}{region}, {u}{src}, where={idx}{region} == {k})"
                for k, region, src in _regions(node, node.inputs[0].shape[2:], node.shape[2:])]
    (kh, kw) = node.attrs["size"]
    return [f"{out} = {_windows(u, node)}.transpose(4, 5, 0, 1, 2, 3)",
            f"{out} = np.take_along_axis({out}.reshape(({kh * kw},) + {out}.shape[2:]), {idx}[None], axis=0)[0]"]


def _gather_vjp(node, ct):
    u, idx = node.inputs
    return [apply("max_pool2d_scatter", (ct, idx), in_shape=u.shape[1:], **_attrs_of(node)), None]


register_op(OpDef(
    "max_pool2d_gather", _gather_infer, _gather_emit, _gather_vjp, jvp=linear_jvp,
    doc="u read at each pool window's argmax: the VJP of max_pool2d_scatter (compiler-internal)"))


# ----- average pool: forward and its adjoint (each the other's VJP) -----------------------
def _avg_pool_vjp(node, ct):
    """x̄ = ḡ / (kh·kw) spread over each window, summed where windows overlap."""
    return [apply("avg_pool2d_scatter", (ct,), in_shape=node.inputs[0].shape[1:], **_attrs_of(node))]


def _avg_pool_emit(node, args, out):
    """Windows as (kh·kw, N, C, Ho, Wo), then one mean over the leading axis.  With
    padding: the sum of the offsets' regions over kh·kw (the zeros count)."""
    (x,), (kh, kw) = args, node.attrs["size"]
    if "padding" not in node.attrs:
        return [f"{out} = {_windows(x, node)}.transpose(4, 5, 0, 1, 2, 3)",
                f"{out} = {out}.reshape(({kh * kw},) + {out}.shape[2:]).mean(axis=0)"]
    views = _forward_regions(node)
    lines = _first_full(views, x, out, "add")
    if not lines:
        (c, ho, wo) = node.shape[1:]
        lines = [f"{out} = np.zeros(({x}.shape[0], {c}, {ho}, {wo}), dtype={x}.dtype)"]
    return lines + [f"{out}{region} += {x}{src}" for _, region, src in views if region] + [f"{out} /= {kh * kw}"]


register_op(OpDef(
    "avg_pool2d", _pool_infer("avg_pool2d"), _avg_pool_emit, _avg_pool_vjp, jvp=linear_jvp,
    separability=per_image_kind, bound="element_or_zero",
    doc="mean over size windows of NCHW x (size, stride, padding an int or an (h, w) pair; stride defaults to "
        "size; the zero padding counts in the divisor, as PyTorch's count_include_pad=True)",
    signature="avg_pool2d(x, size, stride=size, padding=0)"))


def _avg_scatter_emit(node, args, out):
    (ct,) = args
    c, h, w = node.attrs["in_shape"]
    kh, kw = node.attrs["size"]
    lines = [f"{out} = np.zeros(({ct}.shape[0], {c}, {h}, {w}), dtype={ct}.dtype)"]
    op = "+=" if _overlap(node) else "="
    lines += [f"{out}{src} {op} {ct}{region}" for _, region, src in _regions(node, (h, w), node.inputs[0].shape[2:])]
    return lines + [f"{out} /= {kh * kw}"]


register_op(OpDef(
    "avg_pool2d_scatter",
    lambda ins, attrs: (_check_grid("avg_pool2d_scatter", ins[0], attrs), "float"),
    _avg_scatter_emit,
    lambda node, ct: [apply("avg_pool2d", (ct,), **_attrs_of(node))], jvp=linear_jvp,
    doc="the VJP of avg_pool2d: ḡ / (kh·kw) added over each window (compiler-internal)"))


# ----- the builders ---------------------------------------------------------------------
def _pool(op: str):
    def build(x: Node, size, stride=None, padding=0) -> Node:
        size = _pair(size, "size", op, 1)
        stride = size if stride is None else _pair(stride, "stride", op, 1)
        return apply(op, (x,), **pool_attrs(size, stride, _pair(padding, "padding", op, 0)))
    build.__name__ = op
    build.__doc__ = (f"{op.split('_')[0]} over ``size`` windows of NCHW ``x`` (int or (h, w)); "
                     f"``stride`` defaults to ``size``; ``padding`` as PyTorch.")
    return spec_function(X, Param("size", "pair", minimum=1), Param("stride", "pair", False, None, minimum=1),
                         Param("padding", "pair", False, 0, minimum=0))(build)


def _pool1d(op: str, pool2d):
    """The 1-D pool: checked in 1-D terms, then the 2-D pool of an (N, C, 1, L) view
    with (1, size) windows."""
    def build(x: Node, size, stride=None, padding=0) -> Node:
        k = _int(size, "size", op, 1)
        s = k if stride is None else _int(stride, "stride", op, 1)
        p = _int(padding, "padding", op, 0)
        check_layout(x, op, spatial=1)
        (n, c, length) = x.shape
        (lo,) = pool_grid(op, x.shape, (k,), (s,), (p,))
        return reshape(pool2d(reshape(x, (n, c, 1, length)), (1, k), (1, s), (0, p)), (n, c, lo))
    build.__name__ = op
    what = "max" if op.startswith("max") else "mean (zero padding counted in the divisor)"
    build.__doc__ = (f"{what} over windows of NCL x as torch.nn.functional.{op}; stride defaults to size; "
                     f"padding <= size/2.")
    return spec_function(X, Param("size", "int", minimum=1), Param("stride", "int", False, None, minimum=1),
                         Param("padding", "int", False, 0, minimum=0))(build)


max_pool2d = _pool("max_pool2d")
avg_pool2d = _pool("avg_pool2d")
max_pool1d = _pool1d("max_pool1d", max_pool2d)
avg_pool1d = _pool1d("avg_pool1d", avg_pool2d)

__all__ = ["max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d"]
