"""The ops users build models from, and the registry behind them.

Elementwise ops live in ``elementwise`` (SymPy-defined, derivatives derived); the
tensor-level ops (VJP rules written by hand, sharing the helpers of ``common``) in
``contractions`` (matmul, einsum), ``reductions`` (sum, mean, max, min), ``layout``
(transpose, reshape, broadcast_to, sum_to), ``slicing`` (basic indexing, concatenate)
and ``identity_like`` (stop_gradient, identity, ones_like, zeros_like); the shape ops
and scans of release 2 in ``shape``, neural-network ops and losses in ``nn``.  To add
an op of your own, see ``register_op`` / ``OpDef`` and the README section "Your own ops".

Each op module registers its ops when it is first imported, so the order of the
imports below is the order of the op table (``backcomp.spec.ops_table_markdown``,
docs/spec.md).
"""
from __future__ import annotations

from typing import Callable, Sequence

import sympy as sp

from backcomp.graph import GraphError, Node
from backcomp.ops.elementwise import (  # noqa: F401  (re-exported)
    abs, add, clip, cos, div, equal, erf, exp, expm1, gelu, greater, greater_equal, leaky_relu, less,
    less_equal, log, log1p, log_sigmoid, maximum, minimum, mul, neg, pow, relu, sigmoid, silu, sin,
    softplus, sqrt, square, sub, tanh, where, ew_from_expr, arg_symbol, node_expr,
)
from backcomp.ops.contractions import einsum, matmul  # noqa: F401
from backcomp.ops.reductions import max, mean, min, sum  # noqa: F401
from backcomp.ops.layout import broadcast_to, reshape, sum_to, transpose  # noqa: F401
from backcomp.ops.slicing import concatenate, getitem  # noqa: F401
from backcomp.ops.identity_like import identity, stop_gradient  # noqa: F401
from backcomp.ops.nn import (  # noqa: F401
    cross_entropy, l2_normalize, layer_norm, log_softmax, logsumexp, mse, norm, sigmoid_binary_cross_entropy,
    softmax, softmax_cross_entropy, std, take_label, var,
)
from backcomp.ops.shape import argmax, cumsum, expand_dims, flip, pad, squeeze, stack  # noqa: F401
from backcomp.ops.conv import conv1d, conv2d, conv_transpose2d  # noqa: F401
from backcomp.ops.pool import avg_pool1d, avg_pool2d, max_pool1d, max_pool2d  # noqa: F401
from backcomp.ops.constants import arange, eye, full, ones, tril, triu, zeros  # noqa: F401
from backcomp.ops.indexing import embedding, one_hot, take  # noqa: F401
from backcomp.ops.random import dropout, normal, uniform  # noqa: F401
from backcomp.ops.batchnorm import batch_norm  # noqa: F401
from backcomp.ops.scalar import split_ties, ties_with_numbers
from backcomp.ops.signature import Param, spec_function
from backcomp.ops.registry import OpDef, get_op, register_op, registered_ops, unregister_op  # noqa: F401


def scalar_function(name: str, params: Sequence[sp.Symbol], expr: sp.Expr) -> Callable[..., Node]:
    """A user elementwise function from a SymPy expression; its derivative is derived.

    ``params`` are the SymPy symbols ``expr`` is written in.  The result is a
    builder: calling it on nodes (or numbers) makes an elementwise node labelled
    ``name``, differentiated by ``sympy.diff`` like every built-in elementwise op.
    """
    params = tuple(params)
    real = {p: sp.Symbol(p.name, real=True) for p in params}
    expr = split_ties(expr.xreplace(real))   # a tie of max(u, v) split in halves, as maximum(u, v)
    params = tuple(real[p] for p in params)
    extra = expr.free_symbols - set(params)
    if extra:
        raise GraphError(f"function '{name}' uses undefined names: {', '.join(sorted(s.name for s in extra))}")

    def build(*args):
        if len(args) != len(params):
            raise GraphError(f"{name}() takes {len(params)} argument{'s' if len(params) != 1 else ''}, got {len(args)}")
        bindings: dict[sp.Symbol, Node] = {}
        subst: dict[sp.Symbol, sp.Expr] = {}
        for p, a in zip(params, args):
            if isinstance(a, Node):
                s = sp.Symbol(f"%{name}:{p.name}", real=True)
                bindings[s] = a
                subst[p] = s
            else:
                subst[p] = sp.Float(a) if isinstance(a, float) else sp.Integer(a)
        if not bindings:
            raise GraphError(f"{name}() needs at least one array argument")
        return ew_from_expr(ties_with_numbers(expr.xreplace(subst)), bindings, label=name)

    build.__name__ = name
    build.__doc__ = f"{name}({', '.join(p.name for p in params)}) = {expr}"
    return build


@spec_function(Param("y", "array"), Param("x", "node"))
def grad(y: Node, x: Node) -> Node:
    """∂y/∂x for a scalar ``y``: a node of x's shape, itself differentiable.

    Built in place by the VJP pass (``backcomp.vjp.grad``), so ``grad(sum(grad(sum(u), x)), x)``
    is a second derivative and a loss may contain it.
    """
    from backcomp.vjp import grad as build_grad   # vjp.py builds on this package
    return build_grad(y, x)


def apply(op: str, *inputs: Node, **attrs) -> Node:
    """Apply a registered op by name (the way to call your own registered ops)."""
    if not inputs:
        raise GraphError(f"{op}() needs at least one array argument")
    return inputs[0].graph.apply(op, inputs, **attrs)


from backcomp import loops as _loops  # noqa: E402,F401  (registers scan and its projections)
