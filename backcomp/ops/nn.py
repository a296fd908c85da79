"""Neural-network ops, built from primitives so their gradients are *derived*.

Only label gathering is a new primitive.  logsumexp, softmax, log_softmax and the
losses are compositions: the backward of softmax cross-entropy comes out as
ḡ·(e/Σe − y) = ḡ·(softmax − y) from the VJP pass plus elementwise fusion, reusing
the forward's exponentials, without a Jacobian ever being formed.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import GraphError, Node, ShapeError, broadcast_shapes, format_shape
from backcomp.ops import elementwise as ew
from backcomp.ops import reductions as rd   # rd.sum, rd.max: the ops, not the builtins
from backcomp.ops.elementwise import arg_symbol
from backcomp import notation
from backcomp.ops.batch_axis import ROW_TAG, Kind, Mixed, free_or_refuse
from backcomp.ops.common import linear_jvp, normalize_axes, reduced_shape, shape_code
from backcomp.ops.identity_like import stop_gradient
from backcomp.ops.layout import reshape
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import REDUCTION, X, Param, spec_function


# ----- logsumexp ----------------------------------------------------------------------
@spec_function(*REDUCTION)
def logsumexp(x: Node, axis=None, keepdims: bool = False) -> Node:
    """log Σ exp(x) over ``axis``, stable for any magnitude of x.

    Built as m + log Σ exp(x − m) with m = max(x) behind a stop_gradient (the value
    does not depend on m).  Being made of primitives, its backward is derived:
    ∂/∂x = exp(x − m) / Σ exp(x − m), reusing the forward's exponentials and sum,
    so softmax is never recomputed.
    """
    axes = normalize_axes(axis, x.ndim, "logsumexp")
    m = stop_gradient(rd.max(x, axis=axes, keepdims=True))
    total = rd.sum(ew.exp(x - m), axis=axes, keepdims=True)
    out = ew.log(total) + m
    return out if keepdims else reshape(out, reduced_shape(x.shape, axes, False))


@spec_function(X, Param("axis", "int", False, -1))
def softmax(x: Node, axis: int = -1) -> Node:
    """exp(x − logsumexp(x)): stable, and its VJP reuses the forward values."""
    return ew.exp(x - logsumexp(x, axis=axis, keepdims=True))


@spec_function(X, Param("axis", "int", False, -1))
def log_softmax(x: Node, axis: int = -1) -> Node:
    """x − logsumexp(x), never log(softmax(x)) (which underflows to -inf)."""
    return x - logsumexp(x, axis=axis, keepdims=True)


# ----- statistics ---------------------------------------------------------------------
def _stat_args(op: str, x: Node, axis, keepdims, ddof=0) -> tuple[int, ...]:
    if not isinstance(keepdims, bool):
        raise GraphError(f"{op}: keepdims must be true or false")
    if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
        raise GraphError(f"{op}: ddof must be a non-negative integer, got {ddof!r}")
    axes = normalize_axes(axis, x.ndim, op)
    n = rd._count(x.shape, axes)
    if n.is_Integer and n <= ddof:
        raise GraphError(f"{op}: ddof={ddof} leaves no degrees of freedom over the {n} reduced elements")
    return axes


def _var(x: Node, axes: tuple[int, ...], keepdims: bool, ddof: int) -> Node:
    d = x - rd.mean(x, axis=axes, keepdims=True)
    if ddof == 0:
        return rd.mean(d * d, axis=axes, keepdims=keepdims)
    total = sp.Symbol("%sum", real=True)
    return ew.ew_from_expr(total / (rd._count(x.shape, axes) - ddof),
                           {total: rd.sum(d * d, axis=axes, keepdims=keepdims)}, label="var")


@spec_function(*REDUCTION, Param("ddof", "int", False, 0, minimum=0))
def var(x: Node, axis=None, keepdims: bool = False, ddof: int = 0) -> Node:
    """Σ(x − mean(x))² / (n − ddof) over ``axis`` (ddof=0 as NumPy; ddof=1 is torch.var's default).

    Two passes (centre, then square), built from mean/sum so the VJP is derived:
    2(x − μ)/(n − ddof)·ḡ plus the term through μ, which is zero in value but not
    in its derivative; keeping it (no stop_gradient on μ) keeps second derivatives right.
    """
    return _var(x, _stat_args("var", x, axis, keepdims, ddof), keepdims, ddof)


@spec_function(*REDUCTION, Param("ddof", "int", False, 0, minimum=0))
def std(x: Node, axis=None, keepdims: bool = False, ddof: int = 0) -> Node:
    """√var(x, axis, keepdims, ddof); the gradient of a constant slice is 0, as PyTorch."""
    return ew.safe_sqrt(_var(x, _stat_args("std", x, axis, keepdims, ddof), keepdims, ddof), label="std")


@spec_function(*REDUCTION)
def norm(x: Node, axis=None, keepdims: bool = False) -> Node:
    """The L2 norm √Σx² over ``axis`` (None: all); the gradient at x = 0 is 0, as PyTorch."""
    axes = _stat_args("norm", x, axis, keepdims)
    return ew.safe_sqrt(rd.sum(x * x, axis=axes, keepdims=keepdims), label="norm")


# ----- integer labels ---------------------------------------------------------------
def _take_infer(inputs, attrs):
    x, labels = inputs
    if labels.dtype != "int":
        raise ShapeError("integer labels must come from an input with dtype int64")
    if x.shape[:-1] != labels.shape:
        raise ShapeError(f"labels of shape {format_shape(labels.shape)} do not match logits of shape "
                         f"{format_shape(x.shape)} (expected {format_shape(x.shape[:-1])})")
    return labels.shape, "float"


def _take_label_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """One label per row of the batch, from that row."""
    x, labels = kinds
    if x.tag != ROW_TAG:
        return free_or_refuse(node, kinds, dim)
    if labels.tag == ROW_TAG and labels.axis == x.axis and x.axis < node.inputs[0].ndim - 1:
        return x
    raise Mixed(node, "picks labels across rows of the batch")


register_op(OpDef(
    "take_label", _take_infer,
    lambda node, a, out: [f"{out} = np.take_along_axis({a[0]}, {a[1]}[..., None], axis=-1)[..., 0]"],
    lambda node, ct: [node.graph.apply("put_label", (ct, node.inputs[1]), shape=node.inputs[0].shape), None],
    explain=lambda node, args, scalars: notation.opaque("take_label", "{0}[{1}]", r"{0}_{{[{1}]}}", True)(*args),
    jvp=linear_jvp, doc="x[..., labels]: pick one entry of the last axis per row", signature="take_label(x, labels)",
    separability=_take_label_kind, bound="element",
    index_range=lambda node: {1: (0, node.inputs[0].shape[-1])}))


def _put_emit(node, a, out):
    return [f"{out} = np.zeros({shape_code(node.shape)}, dtype={a[0]}.dtype)",
            f"np.put_along_axis({out}, {a[1]}[..., None], {a[0]}[..., None], axis=-1)"]


register_op(OpDef(
    "put_label", lambda ins, attrs: (attrs["shape"], "float"), _put_emit,
    lambda node, ct: [take_label(ct, node.inputs[1]), None], jvp=linear_jvp,
    explain=lambda node, args, scalars: notation.opaque(
        "onehot", "onehot({1})", r"\operatorname{{onehot}}\left({1}\right)", True)(*args) * args[0],
    doc="zeros with ḡ written at the labels: the VJP of take_label (compiler-internal)"))


def take_label(x: Node, labels: Node) -> Node:
    return x.graph.apply("take_label", (x, labels))


def _unignore_emit(node, a, out):
    return [f"{out} = np.where({a[0]} == {node.attrs['ignore']}, 0, {a[0]})"]


register_op(OpDef(
    "unignore_label", lambda ins, attrs: (ins[0].shape, "int"), _unignore_emit, None,
    no_derivative="integer labels",
    explain=lambda node, args, scalars: args[0],   # the rows it changes are selected away: read as the labels
    doc="labels with ignore_index replaced by 0, so that they can index (compiler-internal: cross_entropy)",
    index_range=lambda node: {0: (0, node.attrs["classes"], node.attrs["ignore"])}))


def _unignore_label(labels: Node, ignore: int, classes) -> Node:
    """The labels to gather with: ``ignore`` becomes class 0 (those rows are masked out of the
    loss), and the module checks the others lie in [0, classes) (``index_range``)."""
    return labels.graph.apply("unignore_label", (labels,), ignore=ignore, classes=classes)


# ----- losses -----------------------------------------------------------------------
@spec_function(Param("logits", "array"), Param("y", "label"))
def softmax_cross_entropy(logits: Node, y: Node) -> Node:
    """Per-row −Σ y·log_softmax(logits) (one-hot/soft y) or −log_softmax[label] (int y)."""
    if y.dtype == "int":
        return logsumexp(logits, axis=-1) - take_label(logits, y)
    try:
        fits = broadcast_shapes(y.shape, logits.shape) == logits.shape
    except ShapeError:
        fits = False
    if not fits:
        raise ShapeError(f"softmax_cross_entropy: targets {format_shape(y.shape)} do not match logits {format_shape(logits.shape)}")
    # Literally −Σ y·log_softmax: exact for soft labels whatever their row sums.
    return rd.sum(-(y * log_softmax(logits, axis=-1)), axis=-1)


@spec_function(Param("logits", "array"), Param("labels", "label"), Param("ignore_index", "int", False, -100),
               Param("label_smoothing", "number", False, 0.0))
def cross_entropy(logits: Node, labels: Node, ignore_index: int = -100, label_smoothing: float = 0.0) -> Node:
    """PyTorch's F.cross_entropy (mean over the rows whose label is not ``ignore_index``), class axis last.

    Per row, logsumexp(z) − (1 − ε)·z[label] − ε·mean(z): the smoothed target puts ε/C on
    every class, and −Σ_c log_softmax(z)_c / C = logsumexp(z) − mean(z).  Ignored rows are
    selected away (``where``, not multiplied by 0), so they add nothing to the value or the
    gradient; with every row ignored the mean is 0/0 = nan and the gradient 0, as PyTorch.
    """
    if labels.dtype != "int":
        raise ShapeError("cross_entropy: labels must be integers (an input with dtype int64, or argmax)")
    if logits.dtype != "float" or logits.ndim == 0:
        raise ShapeError(f"cross_entropy: logits must be a float array with a class axis last, "
                         f"got shape {format_shape(logits.shape)}")
    if logits.shape[:-1] != labels.shape:
        raise ShapeError(f"cross_entropy: labels of shape {format_shape(labels.shape)} do not match logits of shape "
                         f"{format_shape(logits.shape)} (expected {format_shape(logits.shape[:-1])})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise GraphError(f"cross_entropy: ignore_index must be an integer, got {ignore_index!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise GraphError(f"cross_entropy: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    picked = take_label(logits, _unignore_label(labels, ignore_index, logits.shape[-1]))
    eps = float(label_smoothing)
    row = logsumexp(logits, axis=-1) - (1 - eps) * picked if eps else logsumexp(logits, axis=-1) - picked
    if eps:
        row = row - eps * rd.mean(logits, axis=-1)
    ignored = ew.equal(labels, ignore_index)
    kept = rd.sum(ew.where(ignored, 0, row))
    count = rd.sum(ew.where(ignored, 0, row.graph.apply("ones_like", (row,))))   # in the logits' dtype
    return kept / count


# ----- normalisation ------------------------------------------------------------------
@spec_function(X, Param("gamma", "array"), Param("beta", "array"), Param("eps", "number", False, 1e-5))
def layer_norm(x: Node, gamma: Node, beta: Node, eps: float = 1e-5) -> Node:
    """(x − mean) / √(var + eps) · gamma + beta over the last axis (biased var), as F.layer_norm.

    Composed of mean, elementwise ops and a sum, so the backward (including the terms
    through the mean and the variance) is derived, and differentiable again.
    """
    if x.ndim == 0:
        raise ShapeError("layer_norm: x must have at least one axis")
    d = x.shape[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if not isinstance(p, Node) or p.shape != (d,):
            shown = format_shape(p.shape) if isinstance(p, Node) else repr(p)
            raise ShapeError(f"layer_norm: {name} must have shape ({d},) to match the last axis of x "
                             f"{format_shape(x.shape)}, got {shown}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise GraphError(f"layer_norm: eps must be a non-negative number, got {eps!r}")
    centred = x - rd.mean(x, axis=-1, keepdims=True)
    variance = rd.mean(centred * centred, axis=-1, keepdims=True)
    return centred / ew.sqrt(variance + float(eps)) * gamma + beta


@spec_function(X, Param("axis", "int", False, -1), Param("eps", "number", False, 1e-12))
def l2_normalize(x: Node, axis: int = -1, eps: float = 1e-12) -> Node:
    """x / max(‖x‖₂, eps) along ``axis``, as F.normalize(p=2).

    The divisor is the norm where it is at least eps, else eps: the gradient flows through
    the norm there (torch's clamp_min) and a zero slice gives 0, not nan.  The norm itself
    is compared, not Σx² with eps², which underflows in float32 for a small eps.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise GraphError(f"l2_normalize: eps must be a positive number, got {eps!r}")
    (axis,) = _stat_args("l2_normalize", x, axis, True)
    s = sp.Symbol("%sumsq", real=True)
    floor = sp.Float(float(eps), 17)
    divisor = ew.ew_from_expr(sp.Piecewise((sp.sqrt(s), sp.sqrt(s) >= floor), (floor, True)),
                              {s: rd.sum(x * x, axis=axis, keepdims=True)}, label="norm")
    return x / divisor


@spec_function(Param("z", "array"), Param("y", "value"))
def sigmoid_binary_cross_entropy(z: Node, y) -> Node:
    """−(y log σ(z) + (1 − y) log(1 − σ(z))) = softplus(z) − y·z, from the logits."""
    if isinstance(y, Node) and y.dtype == "int":
        raise GraphError("sigmoid_binary_cross_entropy needs float targets")
    return ew.softplus(z) - y * z


@spec_function(Param("a", "array"), Param("b", "value"))
def mse(a: Node, b) -> Node:
    """mean((a − b)²) over every element."""
    return rd.mean((a - b) ** 2)


__all__ = ["var", "std", "norm", "logsumexp", "softmax", "log_softmax", "softmax_cross_entropy", "sigmoid_binary_cross_entropy",
           "mse", "take_label", "arg_symbol", "cross_entropy", "layer_norm", "l2_normalize"]
