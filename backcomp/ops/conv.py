"""Convolution ops (NCHW, and NCL by lowering to a unit height), with tensor-level VJP rules.

The convolutions copy the windows once into contiguous columns (im2col: one strided
copy per window offset, straight from the unpadded input, the padding being the
zeros of the buffer), laid out so that each direction is one GEMM with no transposed
copy of a large operand, and so that each copy moves whole image rows.  No Python
loop over pixels in generated code: scatters back to the input loop over the kh·kw
window offsets, unrolled into one statement each.  A conv2d without groups reads its
columns from an ``im2col`` node, which its weight gradient reads too: a training step
builds them once.  Pools are in ``pool.py``.

``conv2d`` is a cross-correlation exactly like ``torch.nn.functional.conv2d``
(x: N,C,H,W; w: O,C/groups,kh,kw; zero padding; dilation; groups).  Dilation only
moves where window offset (a, b) reads (rows a·d, a·d + s, ...); groups split the
channels into G independent convolutions, one *batched* GEMM over the G groups
(depthwise: groups = C).  Its VJPs are two more linear ops,

    x̄ = conv2d_grad_input(ḡ, w)    col2im: wᵀḡ per window offset, added at the
                                     offset's strided positions, cropped to the input
    w̄ = conv2d_grad_weight(x, ḡ)   the padded input's windows contracted with ḡ

and since all three are bilinear, each one's VJP is built from the other two: the
whole family can be differentiated again.  ``conv_transpose2d`` is conv2d's input
gradient with w read as (I, O/groups, kh, kw): it shares conv2d_grad_input's emission,
and its VJPs are conv2d and conv2d_grad_weight (with output_padding >= stride, which
PyTorch allows below the dilation, the first cropped to x and the second reading x
padded with zeros: ``_transpose_vjp``).  ``conv1d`` reshapes NCL to NC1L views and
calls conv2d with unit-height windows; there is no conv_transpose1d.

Options at PyTorch's defaults (dilation 1, groups 1) are not stored on the node, so
a plain convolution reads, explains and compiles exactly as before they existed.

Emitted code reads the batch size from the arrays (``x.shape[0]``), so a symbolic N
needs no binding, and it computes in the dtype it is given.  An emission that needs a
second array besides its result names it ``__<result>_<what>`` (no node name starts
with two underscores) and deletes it before it ends.
"""
from __future__ import annotations

from backcomp import notation
from backcomp.graph import Node, ShapeError, format_shape
from backcomp.ops.batch_axis import ROW_TAG, Kind, Mixed, free_or_refuse, row
from backcomp.ops.common import multilinear_jvp
from backcomp.ops.layout import reshape
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.shape import pad
from backcomp.ops.signature import X, Param, spec_function
from backcomp.ops.slicing import getitem

_LAYOUT = {1: "(N, C, L)", 2: "(N, C, H, W)"}


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


def _int(value, what: str, op: str, minimum: int) -> int:
    """An int >= ``minimum`` (the options of the 1-D ops and ``groups``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{op}: {what} must be an integer, got {value!r}")
    if value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ShapeError(f"{op}: {what} must be {kind}, got {value!r}")
    return value


def check_layout(x: Node, op: str, what: str = "input", spatial: int = 2) -> None:
    """A float array of rank 2 + ``spatial`` whose dims are fixed but for the batch."""
    if x.dtype != "float":
        raise ShapeError(f"{op}: {what} must be a float array, not {x.dtype}")
    if x.ndim != 2 + spatial:
        raise ShapeError(f"{op}: {what} must be {2 + spatial}-D {_LAYOUT[spatial]}, got shape {format_shape(x.shape)}")
    if any(isinstance(d, str) for d in x.shape[1:]):
        raise ShapeError(f"{op}: channels and spatial dims of the {what} must be fixed, "
                         f"got shape {format_shape(x.shape)} (only the batch dim may be symbolic)")


def _check_weight(w: Node, op: str, spatial: int = 2) -> None:
    if w.dtype != "float":
        raise ShapeError(f"{op}: weight must be a float array, not {w.dtype}")
    if w.ndim != 2 + spatial or any(isinstance(d, str) for d in w.shape):
        layout = "(O, C/groups, k)" if spatial == 1 else "(O, C/groups, kh, kw)"
        raise ShapeError(f"{op}: weight must be a fixed {2 + spatial}-D array {layout}, "
                         f"got shape {format_shape(w.shape)}")


def out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """PyTorch's output length: (size + 2·pad − dilation·(kernel − 1) − 1) // stride + 1."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _sizes(values) -> str:
    return "x".join(str(v) for v in values)


def conv_grid(op: str, x_shape, w_shape, stride, padding, dilation=None, groups: int = 1,
              weight_layout: str = "O, C/groups, kh, kw") -> tuple:
    """The output's spatial dims of a convolution of ``x_shape`` (N, C, *spatial) with
    ``w_shape`` (O, C/groups, *kernel), or a ShapeError naming both shapes; stride,
    padding and dilation hold one value per spatial dim."""
    c, (o, cg), kernel, spatial = x_shape[1], w_shape[:2], w_shape[2:], x_shape[2:]
    dilation = dilation or (1,) * len(spatial)
    xs, ws = format_shape(x_shape), format_shape(w_shape)
    if c % groups:
        raise ShapeError(f"{op}: groups={groups} does not divide the {c} input channels of {xs}")
    if o % groups:
        raise ShapeError(f"{op}: groups={groups} does not divide the {o} output channels of weight {ws}")
    if c // groups != cg:
        split = f" in {groups} groups of {c // groups}" if groups > 1 else ""
        raise ShapeError(f"{op}: input {xs} has {c} channels{split} but weight {ws} expects {cg}"
                         f"{' per group' if groups > 1 else ''} (weights are {weight_layout})")
    reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    padded = tuple(n + 2 * p for n, p in zip(spatial, padding))
    if any(r > n for r, n in zip(reach, padded)):
        dilated = f" (dilated to {_sizes(reach)})" if reach != tuple(kernel) else ""
        raise ShapeError(f"{op}: kernel {_sizes(kernel)}{dilated} of weight {ws} is larger than the padded input "
                         f"{_sizes(padded)} (input {xs}, padding {tuple(padding)})")
    return tuple(out_size(n, k, s, p, d) for n, k, s, p, d in zip(spatial, kernel, stride, padding, dilation))


def conv_attrs(stride, padding, dilation=(1, 1), groups: int = 1) -> dict:
    """The attrs of a conv-family node: dilation and groups only where they differ from
    PyTorch's defaults (so every builder makes the same attrs for the same conv)."""
    attrs = {"stride": tuple(stride), "padding": tuple(padding)}
    if tuple(dilation) != (1, 1):
        attrs["dilation"] = tuple(dilation)
    if groups != 1:
        attrs["groups"] = groups
    return attrs


def _geometry(attrs) -> tuple:
    """(stride, padding, dilation, groups) of a conv-family node."""
    return attrs["stride"], attrs["padding"], attrs.get("dilation", (1, 1)), attrs.get("groups", 1)


def _conv_of(node: Node) -> dict:
    """The conv attrs of a conv-family node, to build its VJPs with (output_padding and
    the in_hw / kernel of the backward ops dropped)."""
    return conv_attrs(*_geometry(node.attrs))


def _conv_out(op: str, x_shape, w_shape, attrs) -> tuple:
    """(N, O, Ho, Wo) of conv2d(x, w) with a node's attrs."""
    stride, padding, dilation, groups = _geometry(attrs)
    return (x_shape[0], w_shape[0]) + conv_grid(op, x_shape, w_shape, stride, padding, dilation, groups)


def _covered(size: int, kernel_offset: int, stride: int, pad: int, count: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose window offset lands inside the unpadded input."""
    lo = max(0, -(-(pad - kernel_offset) // stride))
    return lo, max(lo, min(count, (size - 1 + pad - kernel_offset) // stride + 1))


def _strided(start: int, count: int, step: int) -> str:
    """Slice code for ``count`` positions from ``start`` in steps of ``step``."""
    return f"{start}:{start + (count - 1) * step + 1}" + (f":{step}" if step != 1 else "")


def _im2col(node: Node, x: str, cols: str, kernel, grid, channels_first: bool) -> list[str]:
    """Statements filling contiguous columns of the windows of ``x`` straight from the
    unpadded input, one strided copy per window offset (no padded copy of x; the zeros
    of the padding are the buffer's, filled only when there is padding).  Layout
    (N, C, kh, kw, Ho, Wo), or (C, kh, kw, N, Ho, Wo) with ``channels_first``: Wo is
    innermost either way, so each copy moves whole rows.  Offset (a, b) of a dilated
    window reads rows a·dh, a·dh + sh, ... of the padded input."""
    (c, h, w), (kh, kw) = node.inputs[0].shape[1:], kernel
    (sh, sw), (ph, pw), (dh, dw), _ = _geometry(node.attrs)
    ho, wo = grid
    shape = f"({c}, {kh}, {kw}, {x}.shape[0], {ho}, {wo})" if channels_first else \
            f"({x}.shape[0], {c}, {kh}, {kw}, {ho}, {wo})"
    fill = "zeros" if (ph, pw) != (0, 0) else "empty"
    lines = [f"{cols} = np.{fill}({shape}, dtype={x}.dtype)"]
    for a in range(kh):
        (r0, r1) = _covered(h, a * dh, sh, ph, ho)
        for b in range(kw):
            (c0, c1) = _covered(w, b * dw, sw, pw, wo)
            if r1 == r0 or c1 == c0:
                continue
            src = (f"{x}[:, :, {_strided(r0 * sh + a * dh - ph, r1 - r0, sh)}, "
                   f"{_strided(c0 * sw + b * dw - pw, c1 - c0, sw)}]")
            dst = f"[:, {a}, {b}, :, {r0}:{r1}, {c0}:{c1}]" if channels_first else \
                  f"[:, :, {a}, {b}, {r0}:{r1}, {c0}:{c1}]"
            lines.append(f"{cols}{dst} = {src}" + (".transpose(1, 0, 2, 3)" if channels_first else ""))
    return lines


def scratch(out: str, what: str) -> str:
    """A second local for an emission: node names never start with two underscores."""
    return f"__{out}_{what}"


def apply(op: str, inputs, **attrs) -> Node:
    return inputs[0].graph.apply(op, tuple(inputs), **attrs)


def per_image_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """Convolutions and pools keep the images of x (axis 0) apart: the batch may be that
    axis, with weights free of it (conv2d's third input, the im2col of x, has it too)."""
    k, weights, cols = kinds[0], kinds[1:2], kinds[2:]
    if k.tag != ROW_TAG:
        return free_or_refuse(node, kinds, dim)
    if k.axis == 0 and all(j.tag == "free" for j in weights) and all(j.tag == ROW_TAG for j in cols):
        return k
    raise Mixed(node, "convolves or pools along the batch axis")


# ----- im2col: the columns a conv2d and its weight gradient share ----------------------
def _im2col_infer(inputs, attrs):
    (x,) = inputs
    check_layout(x, "im2col")
    (n, c), (kh, kw) = x.shape[:2], attrs["kernel"]
    stride, padding, dilation, _ = _geometry(attrs)
    ho, wo = conv_grid("im2col", x.shape, (1, c, kh, kw), stride, padding, dilation)
    return ((c, kh, kw, n, ho, wo) if attrs.get("channels_first") else (n, c, kh, kw, ho, wo)), "float"


def _im2col_emit(node, args, out):
    """The windows of x copied once into contiguous columns, one strided copy per window
    offset (``_im2col``).  conv2d reads them in its forward GEMM and its weight gradient
    in its GEMM, so a training step builds them once where it built them twice.  Layout
    (measured on the suite CNN at B 64, float32, interleaved medians under load):
    (N, C, kh, kw, Ho, Wo) for the 9-row first conv (forward plus weight gradient 1.5 ms
    instead of 2.6 with two copies, 2 threads); (C, kh, kw, N, Ho, Wo) for the 144-row
    second (9.2 ms instead of 10.4 at 1 thread; batch-first shared was 10.3, its weight
    gradient a batched GEMM summed over N taking 2.5× the CPU time at 2 threads)."""
    (x,), (kh, kw) = args, node.attrs["kernel"]
    return _im2col(node, x, out, (kh, kw), node.shape[4:], node.attrs.get("channels_first", False))


def _im2col_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """The batch as axis 0 of x stays axis 0 of the columns, or axis 3 channels-first."""
    k = kinds[0]
    if k.tag == ROW_TAG and k.axis == 0:
        return row(3 if node.attrs.get("channels_first") else 0)
    return free_or_refuse(node, kinds, dim)


register_op(OpDef(
    "im2col", _im2col_infer, _im2col_emit, None, separability=_im2col_kind, bound="element_or_zero",
    doc="the windows of x (N, C, H, W) as columns (N, C, kh, kw, Ho, Wo), or (C, kh, kw, N, Ho, Wo) with "
        "channels_first: the operand conv2d and its weight gradient share (compiler-internal)",
    attrs_doc={"kernel": "(kh, kw) window", "channels_first": "the (C, kh, kw, N, Ho, Wo) layout (absent: batch first)"},
    no_derivative="a copy of conv2d's input made for its GEMMs: conv2d and conv2d_grad_weight differentiate "
                  "through that input itself, so no cotangent or tangent ever reaches the columns"))


# ----- conv2d -------------------------------------------------------------------------
def _conv2d_infer(inputs, attrs):
    x, w, *cols = inputs
    check_layout(x, "conv2d")
    _check_weight(w, "conv2d")
    shape = _conv_out("conv2d", x.shape, w.shape, attrs)
    _check_cols("conv2d", x, w.shape[2:], shape[2:], cols, attrs)
    return shape, "float"


def _check_cols(op: str, x: Node, kernel, grid, cols, attrs) -> None:
    """A shared-columns input has the shape ``im2col`` gives x (groups=1 only)."""
    if not cols:
        return
    (n, c), (kh, kw), (ho, wo) = x.shape[:2], kernel, grid
    expected = (c, kh, kw, n, ho, wo) if _channels_first(c * kh * kw) else (n, c, kh, kw, ho, wo)
    if _geometry(attrs)[3] != 1 or cols[0].shape != expected:
        raise ShapeError(f"{op}: columns {format_shape(cols[0].shape)} are not the im2col {format_shape(expected)} "
                         f"of input {format_shape(x.shape)} (shared columns need groups=1)")


def _cols_of(node: Node, args, x: str, out: str, k: int) -> tuple[list[str], str, bool, bool]:
    """(statements, name, channels_first, shared) of the columns a conv2d or its weight
    gradient reads: the ``im2col`` node it shares (its third input), or else its own
    scratch copy (batch first for the forward, as grouped convs need)."""
    if len(args) == 3:
        return [], args[2], _channels_first(k), True
    (ho, wo), kernel = _cols_grid(node), _cols_kernel(node)
    cols, channels_first = scratch(out, "cols"), node.op == "conv2d_grad_weight" and _channels_first(k)
    return _im2col(node, x, cols, kernel, (ho, wo), channels_first), cols, channels_first, False


def _cols_grid(node: Node) -> tuple:
    """(Ho, Wo) of a conv2d (its output) or of its weight gradient (its cotangent)."""
    return node.shape[2:] if node.op == "conv2d" else node.inputs[1].shape[2:]


def _cols_kernel(node: Node) -> tuple:
    return node.inputs[1].shape[2:] if node.op == "conv2d" else node.attrs["kernel"]


def _channels_first(k: int) -> bool:
    """The columns' layout for C/G·kh·kw = ``k`` rows: (N, C, kh, kw, Ho, Wo) for few rows
    (a first layer: the weight gradient is one small GEMM per image, summed), else
    (C, kh, kw, N, Ho, Wo), so that the forward and the weight gradient are each one
    2-D GEMM over N·Ho·Wo (measured: see ``im2col``)."""
    return k >= 32


def _conv2d_emit(node, args, out):
    """im2col then one GEMM.  Columns (N, C·kh·kw, Ho·Wo): (O, C·kh·kw) @ columns gives
    (N, O, Ho·Wo), already NCHW.  Columns (C·kh·kw, N·Ho·Wo): one 2-D GEMM (O, N·Ho·Wo),
    then one transposed copy to NCHW.  With G groups the columns are
    (N, G, C/G·kh·kw, Ho·Wo) and the weight (G, O/G, C/G·kh·kw): one batched GEMM.  The
    columns are the ``im2col`` node the builder made (shared with the weight gradient)
    when there is one, else a scratch copy deleted at the end."""
    x, w = args[:2]
    (o, cg, kh, kw), (ho, wo), groups = node.inputs[1].shape, node.shape[2:], _geometry(node.attrs)[3]
    k = cg * kh * kw
    lines, cols, channels_first, shared = _cols_of(node, args, x, out, k)
    if channels_first and groups == 1:
        lines += [f"{out} = np.ascontiguousarray(({w}.reshape({o}, {k}) @ {cols}.reshape({k}, -1))"
                  f".reshape({o}, -1, {ho}, {wo}).transpose(1, 0, 2, 3))"]
    elif channels_first:
        raise AssertionError("conv2d: channels-first columns are only made for groups=1")
    elif groups == 1:
        lines += [f"{out} = ({w}.reshape({o}, {k}) @ {cols}.reshape(-1, {k}, {ho * wo}))"
                  f".reshape(-1, {o}, {ho}, {wo})"]
    elif o == groups:       # one output channel per group (depthwise): GEMVs, as one einsum
        lines += [f"{out} = np.einsum(\"gk,ngkp->ngp\", {w}.reshape({o}, {k}), {cols}.reshape(-1, {o}, {k}, {ho * wo}))"
                  f".reshape(-1, {o}, {ho}, {wo})"]
    else:
        lines += [f"{out} = ({w}.reshape({groups}, {o // groups}, {k}) @ {cols}.reshape(-1, {groups}, {k}, {ho * wo}))"
                  f".reshape(-1, {o}, {ho}, {wo})"]
    return lines + ([] if shared else [f"del {cols}"])


def _conv2d_vjp(node, ct):
    """x̄ = conv2d_grad_input(ḡ, w), w̄ = conv2d_grad_weight(x, ḡ) reading the forward's
    columns; none to the columns, a copy of x whose gradient x̄ already is."""
    x, w, *cols = node.inputs
    return [apply("conv2d_grad_input", (ct, w), in_hw=x.shape[2:], **_conv_of(node)),
            apply("conv2d_grad_weight", (x, ct, *cols), kernel=w.shape[2:], **_conv_of(node))] + [None] * len(cols)


def _without_cols(node, args, scalars):
    """Explained as before the columns were shared: op(x, w, attrs), the columns being x."""
    return notation.call(node, args[:2])


def _conv2d_jvp(node, tangents):
    """Bilinear in (x, w), the columns being a copy of x: ẏ = conv2d(ẋ, w) + conv2d(x, ẇ)."""
    x, w, *cols = node.inputs
    dx, dw = tangents[:2]
    terms = ([apply("conv2d", (dx, w), **node.attrs)] if dx is not None else []) + \
            ([apply("conv2d", (x, dw, *cols), **node.attrs)] if dw is not None else [])
    return terms[0] + terms[1] if len(terms) == 2 else (terms[0] if terms else None)


register_op(OpDef(
    "conv2d", _conv2d_infer, _conv2d_emit, _conv2d_vjp, jvp=_conv2d_jvp, explain=_without_cols,
    separability=per_image_kind, bound="products_or_zero",
    doc="2-D cross-correlation as torch.nn.functional.conv2d: x (N, C, H, W), w (O, C/groups, kh, kw), "
        "zero padding; stride, padding and dilation an int or an (h, w) pair; groups divides C and O "
        "(depthwise: groups = C)",
    signature="conv2d(x, w, stride=1, padding=0, dilation=1, groups=1)",
    attrs_doc={"stride": "(sh, sw) step between windows", "padding": "(ph, pw) zeros added on each side",
               "dilation": "(dh, dw) step between kernel taps (absent: 1)",
               "groups": "channel groups convolved separately (absent: 1)"}))


@spec_function(X, Param("w", "array"), Param("stride", "pair", False, 1, minimum=1),
               Param("padding", "pair", False, 0, minimum=0), Param("dilation", "pair", False, 1, minimum=1),
               Param("groups", "int", False, 1, minimum=1))
def conv2d(x: Node, w: Node, stride=1, padding=0, dilation=1, groups=1) -> Node:
    """Cross-correlation of NCHW ``x`` with OIHW ``w``, exactly as PyTorch's conv2d.

    Without groups the node reads an ``im2col`` node of x as a third input, which the
    weight gradient reads too: the columns are built once per step, not twice."""
    attrs = conv_attrs(_pair(stride, "stride", "conv2d", 1), _pair(padding, "padding", "conv2d", 0),
                       _pair(dilation, "dilation", "conv2d", 1), _int(groups, "groups", "conv2d", 1))
    _conv2d_infer((x, w), attrs)     # the conv2d's own errors before the columns'
    if attrs.get("groups", 1) != 1:
        return apply("conv2d", (x, w), **attrs)
    kernel = w.shape[2:]
    layout = {"channels_first": True} if _channels_first(w.shape[1] * kernel[0] * kernel[1]) else {}
    cols = apply("im2col", (x,), kernel=kernel, **attrs, **layout)
    return apply("conv2d", (x, w, cols), **attrs)


# ----- the VJPs of conv2d --------------------------------------------------------------
def _grad_input_infer(inputs, attrs):
    ct, w = inputs
    _check_weight(w, "conv2d_grad_input")
    if ct.ndim != 4:
        raise ShapeError(f"conv2d_grad_input: cotangent {format_shape(ct.shape)} must be 4-D (N, O, Ho, Wo)")
    (h, wd), groups = attrs["in_hw"], _geometry(attrs)[3]
    x_shape = (ct.shape[0], w.shape[1] * groups, h, wd)
    expected = _conv_out("conv2d_grad_input", x_shape, w.shape, attrs)
    if ct.shape != expected:
        raise ShapeError(f"conv2d_grad_input: cotangent {format_shape(ct.shape)} does not match the conv2d "
                         f"output {format_shape(expected)} of input {format_shape(x_shape)} and weight {format_shape(w.shape)}")
    return x_shape, "float"


def _col2im_emit(node, args, out):
    """x̄ = wᵀḡ gathered back onto the input, cropped to it.  Stride 1 with more than
    one window offset: ``_shifted_col2im`` (no columns at all).  Otherwise col2im:
    columns wᵀḡ of shape (N, C, kh, kw, ·), one GEMM (batched over the groups; an
    outer product when each group has one channel of ḡ) with no transposed copies;
    then each window offset (a, b) adds its columns at rows a·dh, a·dh + sh, ... of
    the padded input, all in NCHW order, and the padding is cropped (a view).  Rows the
    forward dropped ((H + 2p − reach) % s of them) are never written: they stay zero.
    The result (N, C, H, W) is the node's shape, so conv_transpose2d (whose output
    padding is such rows) shares this emission.  With output_padding >= stride
    (dilation > stride) x is shorter than conv2d of the output would be: the offsets
    add x where they land and the rows no tap reaches stay zero, as in PyTorch (a 1x1
    kernel then takes the general path, its columns no longer the whole output)."""
    ct, w = args
    (o, cg, kh, kw), ((sh, sw), (ph, pw), (dh, dw), groups) = node.inputs[1].shape, _geometry(node.attrs)
    (c, h, wd), (ho, wo) = node.shape[1:], node.inputs[0].shape[2:]
    (hp, wp), flat = (h + 2 * ph, wd + 2 * pw), (sh, sw) == (1, 1)
    if flat and kh * kw > 1:
        return _shifted_col2im(node, ct, w, out)
    k, cols = cg * kh * kw, scratch(out, "cols")
    length = ho * wo
    if groups == 1:
        gemm = f"{w}.reshape({o}, {k}).T @ {ct}.reshape(-1, {o}, {length})"
    elif o == groups:       # one channel of ḡ per group (depthwise): an outer product
        gemm = f"{w}.reshape({o}, {k}, 1) * {ct}.reshape(-1, {o}, 1, {length})"
    else:
        gemm = (f"{w}.reshape({groups}, {o // groups}, {k}).transpose(0, 2, 1) @ "
                f"{ct}.reshape(-1, {groups}, {o // groups}, {length})")
    crop = "" if (ph, pw) == (0, 0) else f"[:, :, {ph}:{ph + h}, {pw}:{pw + wd}]"
    if flat and (ho, wo) == (hp, wp):   # a 1x1 kernel: the columns are the padded input
        return [f"{out} = ({gemm}).reshape(-1, {c}, {hp}, {wp}){crop}"]
    lines = [f"{cols} = ({gemm}).reshape(-1, {c}, {kh}, {kw}, {ho}, {wo})",
             f"{out} = np.zeros(({cols}.shape[0], {c}, {hp}, {wp}), dtype={cols}.dtype)"]
    lines += [f"{out}[:, :, {_strided(a * dh, ho, sh)}, {_strided(b * dw, wo, sw)}] += {cols}[:, :, {a}, {b}]"
              for a in range(kh) for b in range(kw)]
    return lines + [f"del {cols}"] + ([f"{out} = {out}{crop}"] if crop else [])


def _shifted_col2im(node, ct: str, w: str, out: str) -> list[str]:
    """The input gradient of a stride-1 convolution as kh·kw GEMMs on shifted views of
    ḡ, summed, with no columns.  ḡ is copied once, channel-major, into images of the
    padded input's size Hp·Wp laid end to end ((O, 1 + N, Hp, Wp), ḡ at [:, 1:, :Ho,
    :Wo], zero elsewhere, a zero image in front).  Flat, window offset (a, b) is the
    shift s = a·dh·Wp + b·dw: padded-input position i gets w[:, :, a, b]ᵀ ḡ[i − s], and
    where i − s crosses a row or image edge it lands on the zeros past Wo, past Ho or
    in the front image, so each offset is one GEMM (C, O) @ (O, N·Hp·Wp) reading a
    strided view of the copy (BLAS takes its row stride as is).  The result is a
    channel-major (C, N, Hp, Wp) buffer; the node's value is its cropped, transposed
    view.  Measured on the suite CNN's second conv (B 64, float32, minima of
    interleaved runs): 2.4 ms against 4.4 for one batched GEMM into (N, C·kh·kw, Ho·Wp)
    columns plus nine strided adds, 3.4 for the columns as one 2-D GEMM over
    channel-major rows, 2.5 for the shifted GEMMs against an unshifted copy with the
    adds shifted; and 3.2 ms against 3.4 at one thread.  The view is copied out in NCHW
    order at the end: a relu mask, a bias sum and a pool's scatter read it next, and on
    the strided view each of those passes took up to five times as long (the CNN step
    0.97 of its time with the copy, one thread).  Groups: one GEMM per group
    (batched), or with one channel of ḡ per group (depthwise) a broadcast product."""
    (o, cg, kh, kw), (_, (ph, pw), (dh, dw), groups) = node.inputs[1].shape, _geometry(node.attrs)
    (c, h, wd), (ho, wo) = node.shape[1:], node.inputs[0].shape[2:]
    (hp, wp), og = (h + 2 * ph, wd + 2 * pw), o // groups
    size = hp * wp
    rows, wt, part = scratch(out, "rows"), scratch(out, "w"), scratch(out, "part")
    lines = [f"{rows} = np.zeros(({o}, {ct}.shape[0] + 1, {hp}, {wp}), dtype={ct}.dtype)",
             f"{rows}[:, 1:, {_upto(ho, hp)}, {_upto(wo, wp)}] = {ct}.transpose(1, 0, 2, 3)"]
    if groups == 1:     # wt[a, b] = w[:, :, a, b]ᵀ, (C, O)
        lines += [f"{rows} = {rows}.reshape({o}, -1)",
                  f"{wt} = np.ascontiguousarray({w}.transpose(2, 3, 1, 0))"]
        form = "np.matmul"
    else:               # wt[a, b] = (G, C/G, O/G); depthwise (O/G = 1) multiplies
        lines += [f"{rows} = {rows}.reshape({groups}, {og}, -1)",
                  f"{wt} = np.ascontiguousarray({w}.reshape({groups}, {og}, {cg}, {kh}, {kw}).transpose(3, 4, 0, 2, 1))"]
        form = "np.multiply" if og == 1 else "np.matmul"
    offsets = [(a, b, a * dh * wp + b * dw) for a in range(kh) for b in range(kw)]
    for i, (a, b, s) in enumerate(offsets):
        view = f"{rows}[..., {size - s}:{-s}]" if s else f"{rows}[..., {size}:]"
        if i == 0:
            lines.append(f"{out} = {form}({wt}[{a}, {b}], {view})")
        elif i == 1:
            lines += [f"{part} = {form}({wt}[{a}, {b}], {view})", f"{out} += {part}"]
        else:
            lines += [f"{form}({wt}[{a}, {b}], {view}, out={part})", f"{out} += {part}"]
    crop = f"[:, :, {ph}:{ph + h}, {pw}:{pw + wd}]" if (ph, pw) != (0, 0) else ""
    return lines + [f"del {rows}, {wt}, {part}",
                    f"{out} = np.ascontiguousarray({out}.reshape({c}, -1, {hp}, {wp}){crop}.transpose(1, 0, 2, 3))"]


def _upto(n: int, size: int) -> str:
    """Slice code for the first ``n`` of ``size`` positions."""
    return ":" if n == size else f":{n}"


def _grad_input_vjp(node, ct):
    """Linear in ḡ and in w: ⟨grad_input(ḡ, w), u⟩ = ⟨ḡ, conv2d(u, w)⟩."""
    g, w = node.inputs
    return [apply("conv2d", (ct, w), **_conv_of(node)),
            apply("conv2d_grad_weight", (ct, g), kernel=w.shape[2:], **_conv_of(node))]


register_op(OpDef(
    "conv2d_grad_input", _grad_input_infer, _col2im_emit, _grad_input_vjp, jvp=multilinear_jvp,
    doc="the VJP of conv2d w.r.t. its input: a transposed convolution (compiler-internal)"))


def conv2d_grad_input(ct: Node, w: Node, in_hw, stride, padding, dilation=(1, 1), groups: int = 1) -> Node:
    return apply("conv2d_grad_input", (ct, w), in_hw=tuple(in_hw), **conv_attrs(stride, padding, dilation, groups))


def _grad_weight_infer(inputs, attrs):
    x, ct, *cols = inputs
    check_layout(x, "conv2d_grad_weight")
    (kh, kw), groups = attrs["kernel"], _geometry(attrs)[3]
    o = ct.shape[1] if ct.ndim == 4 else None
    if not isinstance(o, int):
        raise ShapeError(f"conv2d_grad_weight: cotangent {format_shape(ct.shape)} must be 4-D with fixed channels")
    if x.shape[1] % groups:
        raise ShapeError(f"conv2d_grad_weight: groups={groups} does not divide the {x.shape[1]} input channels "
                         f"of {format_shape(x.shape)}")
    w_shape = (o, x.shape[1] // groups, kh, kw)
    expected = _conv_out("conv2d_grad_weight", x.shape, w_shape, attrs)
    if ct.shape != expected:
        raise ShapeError(f"conv2d_grad_weight: cotangent {format_shape(ct.shape)} does not match the conv2d "
                         f"output {format_shape(expected)} of input {format_shape(x.shape)} and weight {format_shape(w_shape)}")
    _check_cols("conv2d_grad_weight", x, (kh, kw), ct.shape[2:], cols, attrs)
    return w_shape, "float"


def _grad_weight_emit(node, args, out):
    """The padded input's windows copied once into contiguous columns (Wo innermost, so
    NumPy copies whole rows), then the contraction with ḡ over N·Ho·Wo as GEMMs whose
    long axis is the inner one (OpenBLAS is many times slower with it as the output's
    width).  Few columns per group (C/G·kh·kw < 32: a first layer, a depthwise conv):
    one GEMM per image (and group) into a small (N, [G,] O/G, C/G·kh·kw) partial, summed.
    Otherwise one GEMM (batched over the groups), columns (C/G·kh·kw, N·Ho·Wo) times ḡ
    as (N·Ho·Wo, O/G) (a small transposed copy of ḡ).  One output channel per group
    (depthwise) makes those GEMVs: one einsum instead, about twice as fast.  The
    columns are the forward's ``im2col`` node when it is the third input."""
    x, ct = args[:2]
    (kh, kw), c, o, groups = node.attrs["kernel"], node.inputs[0].shape[1], node.shape[0], _geometry(node.attrs)[3]
    cg, og, (ho, wo) = c // groups, o // groups, node.inputs[1].shape[2:]
    k = cg * kh * kw
    lines, cols, channels_first, shared = _cols_of(node, args, x, out, k)
    if groups == 1 and k < 32:
        lines += [f"{out} = ({ct}.reshape(-1, {o}, {ho * wo}) @ {cols}.reshape(-1, {k}, {ho * wo}).transpose(0, 2, 1))"
                  f".sum(axis=0).reshape({o}, {c}, {kh}, {kw})"]
    elif groups == 1:
        lines += [f"{out} = ({cols}.reshape({k}, -1) @ {ct}.transpose(1, 0, 2, 3).reshape({o}, -1).T)"
                  f".T.reshape({o}, {c}, {kh}, {kw})"]
    elif og == 1:           # groups > 1, one output channel each (depthwise): GEMVs, as one einsum
        lines += [f"{out} = np.einsum(\"ngp,ngkp->gk\", {ct}.reshape(-1, {o}, {ho * wo}), "
                  f"{cols}.reshape(-1, {o}, {k}, {ho * wo}))"
                  if k < 32 else
                  f"{out} = np.einsum(\"gkq,gq->gk\", {cols}.reshape({o}, {k}, -1), "
                  f"{ct}.transpose(1, 0, 2, 3).reshape({o}, -1))"]
        lines[-1] += f".reshape({o}, {cg}, {kh}, {kw})"
    elif k < 32:
        lines += [f"{out} = ({ct}.reshape(-1, {groups}, {og}, {ho * wo}) @ "
                  f"{cols}.reshape(-1, {groups}, {k}, {ho * wo}).transpose(0, 1, 3, 2))"
                  f".sum(axis=0).reshape({o}, {cg}, {kh}, {kw})"]
    else:
        lines += [f"{out} = ({cols}.reshape({groups}, {k}, -1) @ "
                  f"{ct}.transpose(1, 0, 2, 3).reshape({groups}, {og}, -1).transpose(0, 2, 1))"
                  f".transpose(0, 2, 1).reshape({o}, {cg}, {kh}, {kw})"]
    return lines + ([] if shared else [f"del {cols}"])


def _grad_weight_vjp(node, ct):
    """Linear in x and in ḡ: ⟨grad_weight(x, ḡ), u⟩ = ⟨ḡ, conv2d(x, u)⟩ (reading the
    same columns); none to the columns, a copy of x."""
    x, g, *cols = node.inputs
    return [apply("conv2d_grad_input", (g, ct), in_hw=x.shape[2:], **_conv_of(node)),
            apply("conv2d", (x, ct, *cols), **_conv_of(node))] + [None] * len(cols)


def _grad_weight_jvp(node, tangents):
    """Bilinear in (x, ḡ), the columns being a copy of x."""
    x, g, *cols = node.inputs
    dx, dg = tangents[:2]
    terms = ([apply("conv2d_grad_weight", (dx, g), **node.attrs)] if dx is not None else []) + \
            ([apply("conv2d_grad_weight", (x, dg, *cols), **node.attrs)] if dg is not None else [])
    return terms[0] + terms[1] if len(terms) == 2 else (terms[0] if terms else None)


register_op(OpDef(
    "conv2d_grad_weight", _grad_weight_infer, _grad_weight_emit, _grad_weight_vjp, jvp=_grad_weight_jvp,
    explain=_without_cols,
    doc="the VJP of conv2d w.r.t. its weight: input windows contracted with ḡ (compiler-internal)"))


def conv2d_grad_weight(x: Node, ct: Node, kernel, stride, padding, dilation=(1, 1), groups: int = 1) -> Node:
    return apply("conv2d_grad_weight", (x, ct), kernel=tuple(kernel), **conv_attrs(stride, padding, dilation, groups))


# ----- conv_transpose2d ------------------------------------------------------------------
def _transpose_infer(inputs, attrs):
    """y (N, O, Ho, Wo) with Ho = (H − 1)·s − 2p + d·(kh − 1) + output_padding + 1.
    output_padding must be smaller than the stride or the dilation in each dim, as in
    PyTorch: below the stride, conv2d of y with the same options is H long again;
    from the stride up (dilation > stride only) it is H + output_padding // s long
    (``_unreached``)."""
    x, w = inputs
    check_layout(x, "conv_transpose2d")
    _check_weight(w, "conv_transpose2d")
    (stride, padding, dilation, groups), extra = _geometry(attrs), attrs.get("output_padding", (0, 0))
    xs, ws = format_shape(x.shape), format_shape(w.shape)
    if any(e >= max(s, d) for e, s, d in zip(extra, stride, dilation)):
        raise ShapeError(f"conv_transpose2d: output_padding {extra} must be smaller than the stride {stride} "
                         f"or the dilation {dilation} in each dim (as PyTorch)")
    if x.shape[1] != w.shape[0]:
        raise ShapeError(f"conv_transpose2d: input {xs} has {x.shape[1]} channels but weight {ws} expects "
                         f"{w.shape[0]} (weights are I, O/groups, kh, kw)")
    if x.shape[1] % groups:
        raise ShapeError(f"conv_transpose2d: groups={groups} does not divide the {x.shape[1]} input channels of {xs}")
    size = tuple((n - 1) * s - 2 * p + d * (k - 1) + e + 1
                 for n, s, p, d, k, e in zip(x.shape[2:], stride, padding, dilation, w.shape[2:], extra))
    if any(n < 1 for n in size):
        raise ShapeError(f"conv_transpose2d: output size {_sizes(size)} is not positive (input {xs}, weight {ws}, "
                         f"stride {stride}, padding {padding}): padding removes more than the transposed "
                         f"convolution makes")
    return (x.shape[0], w.shape[1] * groups) + size, "float"


def _unreached(node: Node) -> tuple[int, int]:
    """(qh, qw) = output_padding // stride: the rows and columns by which conv2d of a
    conv_transpose2d's output (same options) is longer than its input x.  Zero unless
    output_padding >= stride, which PyTorch allows when the dilation is larger still."""
    return tuple(e // s for e, s in zip(node.attrs.get("output_padding", (0, 0)), node.attrs["stride"]))


def _transpose_vjp(node, ct):
    """y = conv2d_grad_input(x, w) at y's size, so x̄ = conv2d(ḡ, w) and
    w̄ = conv2d_grad_weight(ḡ, x).  With output_padding >= stride (dilation > stride)
    that conv2d is (qh, qw) = ``_unreached`` longer than x: y is conv2d_grad_input of x
    padded with qh zero rows and qw zero columns at the bottom and right (an input that
    is zero there; the scatter that emits y never reads it), so x̄ is conv2d(ḡ, w)
    cropped to x and w̄ = conv2d_grad_weight(ḡ, that padded x).  Each is again a conv
    op and a linear structural op (getitem, pad), differentiable in turn."""
    x, w = node.inputs
    (qh, qw) = _unreached(node)
    gx = apply("conv2d", (ct, w), **_conv_of(node))
    if (qh, qw) != (0, 0):
        (h, wd) = x.shape[2:]
        gx = getitem(gx, (slice(None), slice(None), slice(None, h) if qh else slice(None),
                          slice(None, wd) if qw else slice(None)))
        x = pad(x, ((0, 0), (0, 0), (0, qh), (0, qw)))
    return [gx, apply("conv2d_grad_weight", (ct, x), kernel=w.shape[2:], **_conv_of(node))]


register_op(OpDef(
    "conv_transpose2d", _transpose_infer, _col2im_emit, _transpose_vjp, jvp=multilinear_jvp, separability=per_image_kind,
    doc="transposed convolution as torch.nn.functional.conv_transpose2d: x (N, I, H, W), w (I, O/groups, kh, kw); "
        "stride, padding, output_padding (< stride or < dilation, in each dim) and dilation an int or an (h, w) "
        "pair; groups divides I and O",
    signature="conv_transpose2d(x, w, stride=1, padding=0, output_padding=0, groups=1, dilation=1)",
    attrs_doc={"output_padding": "(oh, ow) rows and columns added at the bottom and right (absent: 0)"}))


@spec_function(X, Param("w", "array"), Param("stride", "pair", False, 1, minimum=1),
               Param("padding", "pair", False, 0, minimum=0), Param("output_padding", "pair", False, 0, minimum=0),
               Param("groups", "int", False, 1, minimum=1), Param("dilation", "pair", False, 1, minimum=1))
def conv_transpose2d(x: Node, w: Node, stride=1, padding=0, output_padding=0, groups=1, dilation=1) -> Node:
    """The adjoint of conv2d, as PyTorch's conv_transpose2d (same argument order)."""
    op = "conv_transpose2d"
    attrs = conv_attrs(_pair(stride, "stride", op, 1), _pair(padding, "padding", op, 0),
                       _pair(dilation, "dilation", op, 1), _int(groups, "groups", op, 1))
    extra = _pair(output_padding, "output_padding", op, 0)
    if extra != (0, 0):
        attrs["output_padding"] = extra
    return apply(op, (x, w), **attrs)


# ----- conv1d: conv2d on a unit height ---------------------------------------------------
@spec_function(X, Param("w", "array"), Param("stride", "int", False, 1, minimum=1),
               Param("padding", "int", False, 0, minimum=0), Param("dilation", "int", False, 1, minimum=1),
               Param("groups", "int", False, 1, minimum=1))
def conv1d(x: Node, w: Node, stride=1, padding=0, dilation=1, groups=1) -> Node:
    """1-D cross-correlation as torch.nn.functional.conv1d: x (N, C, L), w (O, C/groups, k).

    Checked in 1-D terms, then computed as conv2d of (N, C, 1, L) and (O, C/groups, 1, k)
    reshape views with windows (1, k): the same im2col and GEMMs, and the same VJPs.
    """
    op = "conv1d"
    s, p, d, g = (_int(stride, "stride", op, 1), _int(padding, "padding", op, 0),
                  _int(dilation, "dilation", op, 1), _int(groups, "groups", op, 1))
    check_layout(x, op, spatial=1)
    _check_weight(w, op, spatial=1)
    (n, c, length), (o, cg, k) = x.shape, w.shape
    (lo,) = conv_grid(op, x.shape, w.shape, (s,), (p,), (d,), g, weight_layout="O, C/groups, k")
    y = conv2d(reshape(x, (n, c, 1, length)), reshape(w, (o, cg, 1, k)),
               stride=(1, s), padding=(0, p), dilation=(1, d), groups=g)
    return reshape(y, (n, o, lo))


__all__ = ["conv1d", "conv2d", "conv_transpose2d", "conv2d_grad_input", "conv2d_grad_weight"]
