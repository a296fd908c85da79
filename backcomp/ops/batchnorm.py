"""Batch normalisation: batch statistics in train mode, running ones in eval mode.

``batch_norm(x, gamma, beta, running_mean, running_var)`` normalises x (N, C, ...)
over every axis but the channels, as ``torch.nn.functional.batch_norm``.  Which
statistics it uses is the module's ``train=`` flag, read by one op,
``mode_select(a, b)`` (``a if train else b``), so the rest is ordinary arithmetic
whose gradient is derived: in train mode through the batch mean and variance, in
eval mode with the running statistics as constants.  The running statistics are
buffers, updated in place in train mode by ``buffer_update`` nodes, which the
graph keeps as *effects* (computed although nothing reads them): momentum-weighted,
with the unbiased variance, as PyTorch.
"""
from __future__ import annotations

from backcomp import notation
from backcomp.graph import GraphError, Node, ShapeError, format_shape
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import Param, X, spec_function
from backcomp.ops.layout import reshape


def _select_infer(inputs, attrs):
    a, b = inputs
    if a.shape != b.shape:
        raise ShapeError(f"mode_select: shapes {format_shape(a.shape)} and {format_shape(b.shape)} differ")
    return a.shape, a.dtype


def _select_vjp(node, ct):
    zero = node.graph.apply("zeros_like", (ct,))
    return [node.graph.apply("mode_select", (ct, zero)), node.graph.apply("mode_select", (zero, ct))]


def _select_jvp(node, tangents):
    ta, tb = tangents
    if ta is None and tb is None:
        return None
    ta = ta if ta is not None else node.graph.apply("zeros_like", (node.inputs[0],))
    tb = tb if tb is not None else node.graph.apply("zeros_like", (node.inputs[1],))
    return node.graph.apply("mode_select", (ta, tb))


register_op(OpDef(
    "mode_select", _select_infer, lambda node, args, out: [f"{out} = {args[0]} if train else {args[1]}.copy()"],
    _select_vjp, jvp=_select_jvp, modal=True, memory="view",
    explain=lambda node, args, scalars: notation.opaque(
        "mode_select", "({0} if train else {1})", r"\left[{0} \,|\, {1}\right]", True)(*args),
    doc="a if train else a copy of b (b may be a buffer: nothing may write into it): the train-mode and "
        "eval-mode values of one quantity (compiler-internal)"))


def _update_emit(node, args, out):
    buffer, stat, x = args
    m = node.attrs["momentum"]
    value = f"{stat}.reshape({buffer}.shape)"
    if node.attrs["unbiased"]:   # n/(n-1) with n the elements per channel, as PyTorch's running_var
        value = f"{value} * ({x}.size / {x}.shape[1] / max({x}.size / {x}.shape[1] - 1, 1))"
    return ["if train:",
            f"    {buffer} *= {1 - m!r}",
            f"    {buffer} += {m!r} * {value}",
            f"{out} = {buffer}"]


register_op(OpDef(
    "buffer_update", lambda ins, attrs: (ins[0].shape, ins[0].dtype), _update_emit, None, modal=True,
    memory="view", no_derivative="an in-place update of a buffer: an effect, not a value anything reads",
    doc="running ← (1 − momentum)·running + momentum·statistic, in place, in train mode (compiler-internal)"))


@spec_function(X, Param("gamma", "array"), Param("beta", "array"), Param("running_mean", "array"),
               Param("running_var", "array"), Param("momentum", "number", False, 0.1),
               Param("eps", "number", False, 1e-5))
def batch_norm(x: Node, gamma: Node, beta: Node, running_mean: Node, running_var: Node,
               momentum: float = 0.1, eps: float = 1e-5) -> Node:
    """Batch norm over axis 1 of x (N, C, ...), as torch.nn.functional.batch_norm: batch
    statistics (biased variance) and an in-place update of the running ones in train
    mode, the running statistics in eval mode."""
    g = x.graph
    if x.ndim < 2:
        raise ShapeError(f"batch_norm: x must be (N, C, ...), got shape {format_shape(x.shape)}")
    channels = x.shape[1]
    for what, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(v, Node) or v.shape != (channels,):
            shown = format_shape(v.shape) if isinstance(v, Node) else repr(v)
            raise ShapeError(f"batch_norm: {what} must have shape ({channels},), the channels of x, got {shown}")
    for what, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v not in g.buffers.values():
            raise GraphError(f"batch_norm: {what} must be a [buffers] entry (it is updated in place)")
    for what, v in (("momentum", momentum), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= 1 if what == "momentum" else v > 0):
            raise GraphError(f"batch_norm: {what} must be a number {'in [0, 1]' if what == 'momentum' else '> 0'}, "
                             f"got {v!r}")
    from backcomp import ops
    axes = (0,) + tuple(range(2, x.ndim))
    kept = (1, channels) + (1,) * (x.ndim - 2)
    batch_mean = ops.mean(x, axis=axes, keepdims=True)
    batch_var = ops.mean(ops.square(x - batch_mean), axis=axes, keepdims=True)
    mean = g.apply("mode_select", (batch_mean, reshape(running_mean, kept)))
    var = g.apply("mode_select", (batch_var, reshape(running_var, kept)))
    for buffer, stat, unbiased in ((running_mean, batch_mean, False), (running_var, batch_var, True)):
        g.effects.append(g.apply("buffer_update", (buffer, stat, x), momentum=float(momentum), unbiased=unbiased))
    return (x - mean) / ops.sqrt(var + float(eps)) * reshape(gamma, kept) + reshape(beta, kept)


__all__ = ["batch_norm"]
