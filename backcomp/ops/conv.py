"""Convolution and pooling ops (NCHW), with tensor-level VJP rules.

The convolutions copy the windows once into contiguous columns (im2col: one strided
copy per window offset, straight from the unpadded input, the padding being the
zeros of the buffer), laid out so that each direction is one GEMM with no transposed
copy of a large operand, and so that each copy moves whole image rows; pools reduce
strided views of the input window offset by window offset.  No Python loop over
pixels in generated code: scatters back to the input loop over the kh·kw window
offsets, unrolled into one statement each.

``conv2d`` is a cross-correlation exactly like ``torch.nn.functional.conv2d``
(x: N,C,H,W; w: O,C,kh,kw; zero padding).  Its VJPs are two more linear ops,

    x̄ = conv2d_grad_input(ḡ, w)    col2im: wᵀḡ per window offset, added at the
                                     offset's strided positions, cropped to the input
    w̄ = conv2d_grad_weight(x, ḡ)   the padded input's windows contracted with ḡ

and since all three are bilinear, each one's VJP is built from the other two: the
whole family can be differentiated again.  Pools (no padding, stride defaults to
the window size): the max pool's cotangent goes to the first maximum of each window
(as PyTorch), found once by a ``max_pool2d_argmax`` node shared by the backward;
the average pool spreads ḡ evenly.  Overlapping windows (stride < size) add up.

Emitted code reads the batch size from the arrays (``x.shape[0]``), so a symbolic N
needs no binding, and it computes in the dtype it is given.  An emission that needs a
second array besides its result names it ``__<result>_<what>`` (no node name starts
with two underscores) and deletes it before it ends.
"""
from __future__ import annotations

from backcomp.graph import Node, ShapeError, format_shape
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import X, Param, spec_function
from backcomp.ops.structural import linear_jvp, multilinear_jvp

_SWV = "np.lib.stride_tricks.sliding_window_view"


# ----- argument checking ------------------------------------------------------------
def _pair(value, what: str, op: str, minimum: int) -> tuple[int, int]:
    """An int or a 2-tuple of ints, each >= ``minimum``, as (height, width)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ShapeError(f"{op}: {what} must be an integer or a pair of integers, got {value!r}")
    if any(v < minimum for v in pair):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ShapeError(f"{op}: {what} must be {kind}, got {value!r}")
    return pair


def _check_nchw(x: Node, op: str, what: str = "input") -> None:
    if x.dtype != "float":
        raise ShapeError(f"{op}: {what} must be a float array, not {x.dtype}")
    if x.ndim != 4:
        raise ShapeError(f"{op}: {what} must be 4-D (N, C, H, W), got shape {format_shape(x.shape)}")
    if any(isinstance(d, str) for d in x.shape[1:]):
        raise ShapeError(f"{op}: channels and spatial dims of the {what} must be fixed, "
                         f"got shape {format_shape(x.shape)} (only the batch dim may be symbolic)")


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _conv_out(op: str, x_shape, w_shape, stride, padding):
    """(N, O, Ho, Wo) of conv2d(x, w), or a ShapeError naming both shapes."""
    n, c, h, wd = x_shape
    o, ci, kh, kw = w_shape
    if c != ci:
        raise ShapeError(f"{op}: input {format_shape(x_shape)} has {c} channels but weight "
                         f"{format_shape(w_shape)} expects {ci} (weights are O, C, kh, kw)")
    (sh, sw), (ph, pw) = stride, padding
    if kh > h + 2 * ph or kw > wd + 2 * pw:
        raise ShapeError(f"{op}: kernel {kh}x{kw} of weight {format_shape(w_shape)} is larger than the "
                         f"padded input {h + 2 * ph}x{wd + 2 * pw} (input {format_shape(x_shape)}, padding {ph, pw})")
    return n, o, _out_size(h, kh, sh, ph), _out_size(wd, kw, sw, pw)


def _windows(x: str, kernel, stride) -> str:
    """N, C, Ho, Wo, kh, kw strided windows of ``x`` (a read-only view)."""
    (kh, kw), (sh, sw) = kernel, stride
    step = "" if (sh, sw) == (1, 1) else f"[:, :, ::{sh}, ::{sw}]"
    return f"{_SWV}({x}, ({kh}, {kw}), axis=(2, 3)){step}"


def _covered(size: int, kernel_offset: int, stride: int, pad: int, count: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose window offset lands inside the unpadded input."""
    lo = max(0, -(-(pad - kernel_offset) // stride))
    return lo, max(lo, min(count, (size - 1 + pad - kernel_offset) // stride + 1))


def _im2col(node: Node, x: str, cols: str, grid, channels_first: bool) -> list[str]:
    """Statements filling contiguous columns of the windows of ``x`` straight from the
    unpadded input, one strided copy per window offset (no padded copy of x; the zeros
    of the padding are the buffer's, filled only when there is padding).  Layout
    (N, C, kh, kw, Ho, Wo), or (C, kh, kw, N, Ho, Wo) with ``channels_first``: Wo is
    innermost either way, so each copy moves whole rows."""
    (c, h, w), (kh, kw) = node.inputs[0].shape[1:], node.attrs.get("kernel") or node.inputs[1].shape[2:]
    (sh, sw), (ph, pw), (ho, wo) = node.attrs["stride"], node.attrs["padding"], grid
    shape = f"({c}, {kh}, {kw}, {x}.shape[0], {ho}, {wo})" if channels_first else \
            f"({x}.shape[0], {c}, {kh}, {kw}, {ho}, {wo})"
    fill = "zeros" if (ph, pw) != (0, 0) else "empty"
    lines = [f"{cols} = np.{fill}({shape}, dtype={x}.dtype)"]
    for a in range(kh):
        (r0, r1) = _covered(h, a, sh, ph, ho)
        for b in range(kw):
            (c0, c1) = _covered(w, b, sw, pw, wo)
            if r1 == r0 or c1 == c0:
                continue
            src = (f"{x}[:, :, {_strided(r0 * sh + a - ph, r1 - r0, sh)}, "
                   f"{_strided(c0 * sw + b - pw, c1 - c0, sw)}]")
            dst = f"[:, {a}, {b}, :, {r0}:{r1}, {c0}:{c1}]" if channels_first else \
                  f"[:, :, {a}, {b}, {r0}:{r1}, {c0}:{c1}]"
            lines.append(f"{cols}{dst} = {src}" + (".transpose(1, 0, 2, 3)" if channels_first else ""))
    return lines


def _scratch(out: str, what: str) -> str:
    """A second local for an emission: node names never start with two underscores."""
    return f"__{out}_{what}"


def _strided(start: int, count: int, step: int) -> str:
    """Slice code for ``count`` positions from ``start`` in steps of ``step``."""
    return f"{start}:{start + (count - 1) * step + 1}" + (f":{step}" if step != 1 else "")


def _apply(op: str, inputs, **attrs) -> Node:
    return inputs[0].graph.apply(op, tuple(inputs), **attrs)


# ----- conv2d -------------------------------------------------------------------------
def _conv2d_infer(inputs, attrs):
    x, w = inputs
    _check_nchw(x, "conv2d")
    _check_nchw(w, "conv2d", "weight")
    if isinstance(w.shape[0], str):
        raise ShapeError(f"conv2d: weight shape {format_shape(w.shape)} must be fixed")
    return _conv_out("conv2d", x.shape, w.shape, attrs["stride"], attrs["padding"]), "float"


def _conv2d_emit(node, args, out):
    """im2col then one GEMM per image: the padded input's windows copied once into
    contiguous columns (N, C·kh·kw, Ho·Wo), and (O, C·kh·kw) @ columns gives
    (N, O, Ho·Wo), already NCHW: no transposed copy of the output."""
    x, w = args
    (o, c, kh, kw), (ho, wo) = node.inputs[1].shape, node.shape[2:]
    cols = _scratch(out, "cols")
    lines = _im2col(node, x, cols, (ho, wo), channels_first=False)
    lines += [f"{out} = ({w}.reshape({o}, {c * kh * kw}) @ {cols}.reshape(-1, {c * kh * kw}, {ho * wo}))"
              f".reshape(-1, {o}, {ho}, {wo})"]
    return lines + [f"del {cols}"]


def _conv2d_vjp(node, ct):
    """x̄ = conv2d_grad_input(ḡ, w), w̄ = conv2d_grad_weight(x, ḡ)."""
    x, w = node.inputs
    return [conv2d_grad_input(ct, w, x.shape[2:], node.attrs["stride"], node.attrs["padding"]),
            conv2d_grad_weight(x, ct, w.shape[2:], node.attrs["stride"], node.attrs["padding"])]


register_op(OpDef(
    "conv2d", _conv2d_infer, _conv2d_emit, _conv2d_vjp, jvp=multilinear_jvp,
    doc="2-D cross-correlation as torch.nn.functional.conv2d: x (N, C, H, W), w (O, C, kh, kw), "
        "zero padding; stride and padding an int or an (h, w) pair",
    signature="conv2d(x, w, stride=1, padding=0)",
    attrs_doc={"stride": "(sh, sw) step between windows", "padding": "(ph, pw) zeros added on each side"}))


@spec_function(X, Param("w", "array"), Param("stride", "pair", False, 1, minimum=1),
               Param("padding", "pair", False, 0, minimum=0))
def conv2d(x: Node, w: Node, stride=1, padding=0) -> Node:
    """Cross-correlation of NCHW ``x`` with OIHW ``w``, exactly as PyTorch's conv2d."""
    return _apply("conv2d", (x, w), stride=_pair(stride, "stride", "conv2d", 1),
                  padding=_pair(padding, "padding", "conv2d", 0))


# ----- the VJPs of conv2d --------------------------------------------------------------
def _grad_input_infer(inputs, attrs):
    ct, w = inputs
    _check_nchw(w, "conv2d_grad_input", "weight")
    if ct.ndim != 4:
        raise ShapeError(f"conv2d_grad_input: cotangent {format_shape(ct.shape)} must be 4-D (N, O, Ho, Wo)")
    (h, wd), o, c = attrs["in_hw"], w.shape[0], w.shape[1]
    x_shape = (ct.shape[0], c, h, wd)
    expected = _conv_out("conv2d_grad_input", x_shape, w.shape, attrs["stride"], attrs["padding"])
    if ct.shape != expected:
        raise ShapeError(f"conv2d_grad_input: cotangent {format_shape(ct.shape)} does not match the conv2d "
                         f"output {format_shape(expected)} of input {format_shape(x_shape)} and weight {format_shape(w.shape)}")
    return x_shape, "float"


def _grad_input_emit(node, args, out):
    """col2im: columns wᵀḡ of shape (N, C, kh, kw, Ho, Wo), one GEMM per image (no
    transposed copies); then each window offset (a, b) adds its columns at rows a,
    a+s, ... of the padded input, all in NCHW order.  Rows the forward dropped
    ((H + 2p − kh) % s of them) are never written: they stay zero."""
    ct, w = args
    (o, c, kh, kw), (sh, sw), (ph, pw) = node.inputs[1].shape, node.attrs["stride"], node.attrs["padding"]
    (h, wd), (ho, wo) = node.attrs["in_hw"], node.inputs[0].shape[2:]
    cols = _scratch(out, "cols")
    lines = [f"{cols} = ({w}.reshape({o}, {c * kh * kw}).T @ {ct}.reshape(-1, {o}, {ho * wo}))"
             f".reshape(-1, {c}, {kh}, {kw}, {ho}, {wo})",
             f"{out} = np.zeros(({cols}.shape[0], {c}, {h + 2 * ph}, {wd + 2 * pw}), dtype={cols}.dtype)"]
    for a in range(kh):
        for b in range(kw):
            lines.append(f"{out}[:, :, {_strided(a, ho, sh)}, {_strided(b, wo, sw)}] += {cols}[:, :, {a}, {b}]")
    crop = [] if (ph, pw) == (0, 0) else [f"{out} = {out}[:, :, {ph}:{ph + h}, {pw}:{pw + wd}]"]
    return lines + [f"del {cols}"] + crop


def _grad_input_vjp(node, ct):
    """Linear in ḡ and in w: ⟨grad_input(ḡ, w), u⟩ = ⟨ḡ, conv2d(u, w)⟩."""
    g, w = node.inputs
    stride, padding = node.attrs["stride"], node.attrs["padding"]
    return [_apply("conv2d", (ct, w), stride=stride, padding=padding),
            conv2d_grad_weight(ct, g, w.shape[2:], stride, padding)]


register_op(OpDef(
    "conv2d_grad_input", _grad_input_infer, _grad_input_emit, _grad_input_vjp, jvp=multilinear_jvp,
    doc="the VJP of conv2d w.r.t. its input: a transposed convolution (compiler-internal)"))


def conv2d_grad_input(ct: Node, w: Node, in_hw, stride, padding) -> Node:
    return _apply("conv2d_grad_input", (ct, w), in_hw=tuple(in_hw), stride=stride, padding=padding)


def _grad_weight_infer(inputs, attrs):
    x, ct = inputs
    _check_nchw(x, "conv2d_grad_weight")
    kh, kw = attrs["kernel"]
    o = ct.shape[1] if ct.ndim == 4 else None
    if not isinstance(o, int):
        raise ShapeError(f"conv2d_grad_weight: cotangent {format_shape(ct.shape)} must be 4-D with fixed channels")
    w_shape = (o, x.shape[1], kh, kw)
    expected = _conv_out("conv2d_grad_weight", x.shape, w_shape, attrs["stride"], attrs["padding"])
    if ct.shape != expected:
        raise ShapeError(f"conv2d_grad_weight: cotangent {format_shape(ct.shape)} does not match the conv2d "
                         f"output {format_shape(expected)} of input {format_shape(x.shape)} and weight {format_shape(w_shape)}")
    return w_shape, "float"


def _grad_weight_emit(node, args, out):
    """The padded input's windows copied once into contiguous columns (Wo innermost, so
    NumPy copies whole rows), then the contraction with ḡ over N·Ho·Wo as GEMMs whose
    long axis is the inner one (OpenBLAS is many times slower with it as the output's
    width).  Few columns (C·kh·kw < 32, a first layer): one GEMM per image into a small
    (N, O, C·kh·kw) partial, summed.  Otherwise one GEMM, columns (C·kh·kw, N·Ho·Wo)
    times ḡ as (N·Ho·Wo, O) (a small transposed copy of ḡ)."""
    x, ct = args
    (kh, kw), c, o = node.attrs["kernel"], node.inputs[0].shape[1], node.shape[0]
    k, (ho, wo) = c * kh * kw, node.inputs[1].shape[2:]
    cols = _scratch(out, "cols")
    lines = _im2col(node, x, cols, (ho, wo), channels_first=k >= 32)
    if k < 32:
        lines += [f"{out} = ({ct}.reshape(-1, {o}, {ho * wo}) @ {cols}.reshape(-1, {k}, {ho * wo}).transpose(0, 2, 1))"
                  f".sum(axis=0).reshape({o}, {c}, {kh}, {kw})"]
    else:
        lines += [f"{out} = ({cols}.reshape({k}, -1) @ {ct}.transpose(1, 0, 2, 3).reshape({o}, -1).T)"
                  f".T.reshape({o}, {c}, {kh}, {kw})"]
    return lines + [f"del {cols}"]


def _grad_weight_vjp(node, ct):
    """Linear in x and in ḡ: ⟨grad_weight(x, ḡ), u⟩ = ⟨ḡ, conv2d(x, u)⟩."""
    x, g = node.inputs
    stride, padding = node.attrs["stride"], node.attrs["padding"]
    return [conv2d_grad_input(g, ct, x.shape[2:], stride, padding),
            _apply("conv2d", (x, ct), stride=stride, padding=padding)]


register_op(OpDef(
    "conv2d_grad_weight", _grad_weight_infer, _grad_weight_emit, _grad_weight_vjp, jvp=multilinear_jvp,
    doc="the VJP of conv2d w.r.t. its weight: input windows contracted with ḡ (compiler-internal)"))


def conv2d_grad_weight(x: Node, ct: Node, kernel, stride, padding) -> Node:
    return _apply("conv2d_grad_weight", (x, ct), kernel=tuple(kernel), stride=stride, padding=padding)


# ----- pooling ------------------------------------------------------------------------
def _pool_out(op: str, x: Node, size, stride):
    _check_nchw(x, op)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = size, stride
    if kh > h or kw > w:
        raise ShapeError(f"{op}: window {kh}x{kw} is larger than the input {h}x{w} "
                         f"(shape {format_shape(x.shape)}; pools do not pad)")
    return n, c, _out_size(h, kh, sh, 0), _out_size(w, kw, sw, 0)


def _pool_infer(op: str):
    def infer(inputs, attrs):
        return _pool_out(op, inputs[0], attrs["size"], attrs["stride"]), "float"
    return infer


def _pool_emit(reduce: str):
    """Windows as (kh·kw, N, C, Ho, Wo), then one reduction over the leading axis."""
    def emit(node, args, out):
        kh, kw = node.attrs["size"]
        return [f"{out} = {_windows(args[0], node.attrs['size'], node.attrs['stride'])}.transpose(4, 5, 0, 1, 2, 3)",
                f"{out} = {out}.reshape(({kh * kw},) + {out}.shape[2:]).{reduce}(axis=0)"]
    return emit


def _offsets(node: Node, grid):
    """(k, slice code) per window offset: where offset k of every window lands in the input."""
    (kh, kw), (sh, sw) = node.attrs["size"], node.attrs["stride"]
    ho, wo = grid
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, f"[:, :, {_strided(i, ho, sh)}, {_strided(j, wo, sw)}]"


def _overlap(node: Node) -> bool:
    (kh, kw), (sh, sw) = node.attrs["size"], node.attrs["stride"]
    return sh < kh or sw < kw


def _pool_attrs(node: Node) -> dict:
    return {"size": node.attrs["size"], "stride": node.attrs["stride"]}


def _check_grid(op: str, ct: Node, attrs) -> tuple:
    """The input shape a pool backward writes; ḡ must have the pool's output shape."""
    n = ct.shape[0] if ct.ndim == 4 else None
    in_shape = (n,) + tuple(attrs["in_shape"])
    expected = (n,) + _out_size_pool(attrs)
    if ct.ndim != 4 or ct.shape[1:] != expected[1:]:
        raise ShapeError(f"{op}: cotangent {format_shape(ct.shape)} does not match the pool output "
                         f"(N, {', '.join(str(d) for d in expected[1:])})")
    return in_shape


def _out_size_pool(attrs) -> tuple:
    c, h, w = attrs["in_shape"]
    (kh, kw), (sh, sw) = attrs["size"], attrs["stride"]
    return c, _out_size(h, kh, sh, 0), _out_size(w, kw, sw, 0)


# max pool: forward, the argmax of each window, scatter (the VJP) and gather (its VJP)
def _max_pool_vjp(node, ct):
    """x̄ = ḡ written at the first maximum of each window, summed where windows overlap."""
    x = node.inputs[0]
    idx = _apply("max_pool2d_argmax", (x, node), **_pool_attrs(node))
    return [_apply("max_pool2d_scatter", (ct, idx), in_shape=x.shape[1:], **_pool_attrs(node))]


def _max_pool_emit(node, args, out):
    """np.maximum over the kh·kw strided views of x, one window offset at a time: each
    pass streams over whole rows, with no copy of the windows (NaN propagates as in
    ``max``)."""
    (x,), views = args, [where for _, where in _offsets(node, node.shape[2:])]
    if len(views) == 1:
        return [f"{out} = {x}{views[0]}.copy()"]
    return [f"{out} = np.maximum({x}{views[0]}, {x}{views[1]})"] + \
           [f"np.maximum({out}, {x}{where}, out={out})" for where in views[2:]]


def _max_pool_jvp(node, tangents):
    """ṫ read at the same first maximum of each window that the VJP writes to."""
    (t,) = tangents
    idx = _apply("max_pool2d_argmax", (node.inputs[0], node), **_pool_attrs(node))
    return _apply("max_pool2d_gather", (t, idx), **_pool_attrs(node))


register_op(OpDef(
    "max_pool2d", _pool_infer("max_pool2d"), _max_pool_emit, _max_pool_vjp, jvp=_max_pool_jvp,
    doc="max over size x size windows of NCHW x (no padding; stride defaults to size); "
        "the gradient goes to the first maximum of each window, as PyTorch",
    signature="max_pool2d(x, size, stride=size)"))


def _argmax_infer(inputs, attrs):
    x, m = inputs
    shape = _pool_out("max_pool2d_argmax", x, attrs["size"], attrs["stride"])
    if m.shape != shape:
        raise ShapeError(f"max_pool2d_argmax: window maxima {format_shape(m.shape)} do not match "
                         f"the pool output {format_shape(shape)}")
    return shape, "int"


def _index_dtype(node: Node) -> str:
    """The smallest integer type that holds every window offset."""
    kh, kw = node.attrs["size"]
    return "np.int8" if kh * kw <= 128 else "np.int32"


def _argmax_emit(node, args, out):
    """The first offset where a window equals its max (the forward's output): offsets are
    tried from last to first, so the first one that matches is written last.  Offsets
    are read as strided views of x and kept in the smallest integer type."""
    x, m = args
    (k, last), *rest = reversed(list(_offsets(node, node.shape[2:])))
    it = _index_dtype(node)
    lines = [f"{out} = np.where({x}{last} == {m}, {it}({k}), {it}(0))"]
    return lines + [f"{out} = np.where({x}{where} == {m}, {it}({j}), {out})" for j, where in rest]


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
    the input (stride = size, sizes divisible) write every element once: no zero fill."""
    ct, idx = args
    c, h, w = node.attrs["in_shape"]
    (kh, kw), (ho, wo) = node.attrs["size"], node.inputs[0].shape[2:]
    tiles = node.attrs["stride"] == node.attrs["size"] and (ho * kh, wo * kw) == (h, w)
    lines = [f"{out} = np.{'empty' if tiles else 'zeros'}(({ct}.shape[0], {c}, {h}, {w}), dtype={ct}.dtype)"]
    for k, where in _offsets(node, (ho, wo)):
        lines.append(f"{out}{where} += ({idx} == {k}) * {ct}" if _overlap(node) else
                     f"np.multiply({idx} == {k}, {ct}, out={out}{where})")
    return lines


def _scatter_vjp(node, ct):
    """Linear in ḡ: its adjoint gathers u at the same argmax positions."""
    g, idx = node.inputs
    return [_apply("max_pool2d_gather", (ct, idx), **_pool_attrs(node)), None]


register_op(OpDef(
    "max_pool2d_scatter", _scatter_infer, _scatter_emit, _scatter_vjp, jvp=linear_jvp,
    doc="the VJP of max_pool2d: ḡ added at each window's argmax (compiler-internal)"))


def _gather_infer(inputs, attrs):
    u, idx = inputs
    out = _pool_out("max_pool2d_gather", u, attrs["size"], attrs["stride"])
    if idx.shape != out or idx.dtype != "int":
        raise ShapeError(f"max_pool2d_gather: window indices {format_shape(idx.shape)} do not match "
                         f"the pool output {format_shape(out)}")
    return out, "float"


def _gather_emit(node, args, out):
    u, idx = args
    (kh, kw) = node.attrs["size"]
    return [f"{out} = {_windows(u, node.attrs['size'], node.attrs['stride'])}.transpose(4, 5, 0, 1, 2, 3)",
            f"{out} = np.take_along_axis({out}.reshape(({kh * kw},) + {out}.shape[2:]), {idx}[None], axis=0)[0]"]


def _gather_vjp(node, ct):
    u, idx = node.inputs
    return [_apply("max_pool2d_scatter", (ct, idx), in_shape=u.shape[1:], **_pool_attrs(node)), None]


register_op(OpDef(
    "max_pool2d_gather", _gather_infer, _gather_emit, _gather_vjp, jvp=linear_jvp,
    doc="u read at each pool window's argmax: the VJP of max_pool2d_scatter (compiler-internal)"))


# average pool: forward and its adjoint (each the other's VJP)
def _avg_pool_vjp(node, ct):
    """x̄ = ḡ / (kh·kw) spread over each window, summed where windows overlap."""
    return [_apply("avg_pool2d_scatter", (ct,), in_shape=node.inputs[0].shape[1:], **_pool_attrs(node))]


register_op(OpDef(
    "avg_pool2d", _pool_infer("avg_pool2d"), _pool_emit("mean"), _avg_pool_vjp, jvp=linear_jvp,
    doc="mean over size x size windows of NCHW x (no padding; stride defaults to size)",
    signature="avg_pool2d(x, size, stride=size)"))


def _avg_scatter_emit(node, args, out):
    (ct,) = args
    c, h, w = node.attrs["in_shape"]
    kh, kw = node.attrs["size"]
    lines = [f"{out} = np.zeros(({ct}.shape[0], {c}, {h}, {w}), dtype={ct}.dtype)"]
    op = "+=" if _overlap(node) else "="
    lines += [f"{out}{where} {op} {ct}" for _, where in _offsets(node, node.inputs[0].shape[2:])]
    return lines + [f"{out} /= {kh * kw}"]


register_op(OpDef(
    "avg_pool2d_scatter",
    lambda ins, attrs: (_check_grid("avg_pool2d_scatter", ins[0], attrs), "float"),
    _avg_scatter_emit,
    lambda node, ct: [_apply("avg_pool2d", (ct,), **_pool_attrs(node))], jvp=linear_jvp,
    doc="the VJP of avg_pool2d: ḡ / (kh·kw) added over each window (compiler-internal)"))


def _pool(op: str):
    def build(x: Node, size, stride=None) -> Node:
        size = _pair(size, "size", op, 1)
        stride = size if stride is None else _pair(stride, "stride", op, 1)
        return _apply(op, (x,), size=size, stride=stride)
    build.__name__ = op
    build.__doc__ = (f"{op.split('_')[0]} over ``size`` windows of NCHW ``x`` (int or (h, w)); "
                     f"``stride`` defaults to ``size``; no padding.")
    return spec_function(X, Param("size", "pair", minimum=1), Param("stride", "pair", False, None, minimum=1))(build)


max_pool2d = _pool("max_pool2d")
avg_pool2d = _pool("avg_pool2d")

__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "conv2d_grad_input", "conv2d_grad_weight"]
