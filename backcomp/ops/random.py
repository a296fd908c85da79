"""Random ops: ``dropout``, ``normal``, ``uniform``, drawing from the ``rng=`` generator.

A module whose model has random ops takes ``rng=`` (a ``numpy.random.Generator``) and
``train=`` in each function.  A call draws one 63-bit seed from ``rng``, and each
random node draws from its own stream, ``np.random.default_rng([seed, stream])``,
``stream`` being the node's rank among the model's random ops.  So the same
generator state gives the same bytes, and ``forward`` and ``value_and_grad`` given
generators in the same state draw the same masks, whichever nodes each computes.
A scan whose step draws is a random op of its graph: at step t its loop draws the
step's seed from ``[seed, stream, t]``, and the step's random ops draw from that as
above, so each step has fresh noise, and the backward reads the forward's as a
residual (never drawn again).

``dropout(x, p)`` is ``x * dropout_mask(x, p)``: inverted dropout as PyTorch (kept
entries scaled by 1/(1 − p)), the mask a node of its own so that the gradient,
ḡ ⊙ mask, is derived and reuses it.  With ``train=False`` the mask is ones, and
dropout the exact identity; ``normal`` and ``uniform`` draw in both modes.
"""
from __future__ import annotations

from contextvars import ContextVar

from backcomp import notation
from backcomp.graph import Graph, GraphError, Node
from backcomp.ops.constants import _graph, _shape, dtype_anchor
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import Param, X, spec_function
from backcomp.ops.common import shape_code
from backcomp.printer import use_helper


def draws(node: Node, readers=None) -> str | None:
    """How ``node`` draws from ``rng=``: "train", "always" or None; a scan draws as the
    random ops of its step do ("always" wins), counting only the outputs that the nodes
    ``readers`` read when given (a draw feeding only an unread per-step output is pruned
    from the loop, so it asks for no rng=)."""
    from backcomp.ops.registry import get_op
    if node.op in ("input", "param"):
        return None
    if node.op == "scan":
        from backcomp.loops import read_outputs
        step = node.attrs["step"]
        read = None if readers is None else read_outputs(node, readers)
        live = _live(step, read)
        modes = {draws(n, live) for n in live} - {None}   # a nested loop: only its read outputs
        return "always" if "always" in modes else modes.pop() if modes else None
    return get_op(node.op).random


def _live(step, read=None) -> set[Node]:
    """The nodes of a step that its outputs (those marked in ``read``) read: a dead draw
    is never emitted."""
    outs = step.outputs if read is None else [o for o, r in zip(step.outputs, read) if r]
    live, stack = set(), [o for o in outs if o is not None]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.inputs)
    return live


def _stream(graph: Graph) -> int:
    """The next random node's stream: its rank among the graph's random ops (in a scan's
    step, among the step's: each step draws again, ``SEED`` below)."""
    return sum(1 for n in graph.nodes if draws(n))


#: the variable holding the seed random ops draw from: the call's ``_seed``, or inside a
#: scan's loop the step's, drawn from the enclosing seed, the scan's stream and t
SEED: ContextVar[str] = ContextVar("seed", default="_seed")


# ----- dropout ------------------------------------------------------------------------
def _mask_emit(node, args, out):
    use_helper("random")
    p, k = node.attrs["p"], node.attrs["stream"]
    return ["if train:",
            f"    {out} = _dropout_mask({SEED.get()}, {k}, {args[0]}, {p!r})",
            "else:",
            f"    {out} = np.ones_like({args[0]})"]


register_op(OpDef(
    "dropout_mask", lambda ins, attrs: (ins[0].shape, "float"), _mask_emit, None, random="train",
    no_derivative="random: a fresh draw, not a function of x (x gives its shape and dtype)",
    explain=lambda node, args, scalars: notation.opaque(
        f"mask{node.attrs['stream']}p{node.attrs['p']!r}", f"mask_{node.attrs['stream']}(p={node.attrs['p']:g})",
        notation.lit(rf"m_{{{node.attrs['stream']}}}"), True)(),
    doc="the scaled keep-mask of dropout: 1/(1-p) with probability 1-p, else 0; ones when train=False",
    signature="dropout_mask(x, p)"))


@spec_function(X, Param("p", "number", False, 0.5))
def dropout(x: Node, p: float = 0.5) -> Node:
    """Inverted dropout (as PyTorch): in train mode each entry is zeroed with probability p
    and the rest scaled by 1/(1 − p); with train=False, the identity."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise GraphError(f"dropout: p must be a probability in [0, 1], got {p!r}")
    if not isinstance(x, Node) or x.dtype != "float":
        raise GraphError("dropout: x must be a float array")
    if p == 0:
        return x
    mask = x.graph.apply("dropout_mask", (x,), p=float(p), stream=_stream(x.graph))
    return x * mask


# ----- normal, uniform ----------------------------------------------------------------
def _draw_emit(node, args, out):
    use_helper("random")
    k, shape, dtype = node.attrs["stream"], shape_code(node.shape), f"{args[0]}.dtype"
    gen = f"np.random.default_rng([{SEED.get()}, {k}])"
    if node.attrs["dist"] == "normal":
        mean, std = node.attrs["a"], node.attrs["b"]
        line = f"{out} = {gen}.standard_normal({shape}, dtype={dtype})"
        lines = [line]
        if std != 1:
            lines.append(f"{out} *= {std!r}")
        if mean != 0:
            lines.append(f"{out} += {mean!r}")
        return lines
    low, high = node.attrs["a"], node.attrs["b"]
    lines = [f"{out} = {gen}.random({shape}, dtype={dtype})"]
    if (low, high) != (0.0, 1.0):
        lines += [f"{out} *= {high - low!r}", f"{out} += {low!r}"]
    return lines


def _draw_explain(node, args, scalars):
    dist, a, b, k = node.attrs["dist"], node.attrs["a"], node.attrs["b"], node.attrs["stream"]
    sym = "N" if dist == "normal" else "U"
    return notation.opaque(f"{dist}{k}({a!r},{b!r})", f"{sym}_{k}({a:g}, {b:g})", notation.lit(rf"\mathcal{{{sym}}}_{{{k}}}({a:g}, {b:g})"),
                           True)()


register_op(OpDef(
    "random", lambda ins, attrs: (attrs["shape"], "float"), _draw_emit, None, random="always",
    no_derivative="random: a fresh draw (its input only gives the dtype)", explain=_draw_explain,
    doc="normal(shape, mean, std) or uniform(shape, low, high) in the model's float dtype",
    signature="normal(shape) / uniform(shape)"))


def _draw(dist: str, shape, a: float, b: float, graph: Graph | None) -> Node:
    g = _graph(graph, dist)
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GraphError(f"{dist}: parameters must be numbers, got {v!r}")
    if dist == "normal" and b <= 0:
        raise GraphError(f"normal: std must be positive, got {b!r}")
    if dist == "uniform" and not a < b:
        raise GraphError(f"uniform: low ({a!r}) must be less than high ({b!r})")
    return g.apply("random", (dtype_anchor(g, dist),), shape=_shape(shape, dist), dist=dist, a=float(a),
                   b=float(b), stream=_stream(g))


@spec_function(Param("shape", "shape"), Param("mean", "number", False, 0.0), Param("std", "number", False, 1.0))
def normal(shape, mean: float = 0.0, std: float = 1.0, graph: Graph | None = None) -> Node:
    """Draws from N(mean, std²) of ``shape`` (symbolic dims allowed), e.g. a VAE's noise."""
    return _draw("normal", shape, mean, std, graph)


@spec_function(Param("shape", "shape"), Param("low", "number", False, 0.0), Param("high", "number", False, 1.0))
def uniform(shape, low: float = 0.0, high: float = 1.0, graph: Graph | None = None) -> Node:
    """Draws from U[low, high) of ``shape`` (symbolic dims allowed)."""
    return _draw("uniform", shape, low, high, graph)


__all__ = ["dropout", "normal", "uniform"]
