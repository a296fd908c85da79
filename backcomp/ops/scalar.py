"""Scalar building blocks for elementwise ops, as SymPy expressions.

SymPy already knows exp, log, tanh, erf, ... and differentiates them.  Two functions
are added because their textbook formulas overflow: ``sigmoid`` and ``softplus``.
Each carries its ``definition`` (the source of truth) and an ``fdiff`` written in
terms of itself so derivatives reuse the forward value; a test checks that every
``fdiff`` equals ``diff(definition)``.
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

_x = sp.Symbol("x", real=True)


class sigmoid(sp.Function):
    """σ(x) = 1 / (1 + e^-x); printed in a form that cannot overflow."""

    definition = 1 / (1 + sp.exp(-_x))
    is_real = True

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _latex(self, printer):
        return rf"\sigma\left({printer._print(self.args[0])}\right)"


class softplus(sp.Function):
    """log(1 + e^x); printed as ``np.logaddexp(0, x)``."""

    definition = sp.log(1 + sp.exp(_x))
    is_real = True

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _latex(self, printer):
        return rf"\operatorname{{softplus}}\left({printer._print(self.args[0])}\right)"


#: scalar functions a spec or builder may call by name, with their arity
SCALAR_FUNCTIONS = {
    "exp": sp.exp,
    "log": sp.log,
    "log1p": log1p,
    "expm1": expm1,
    "sqrt": sp.sqrt,
    "abs": sp.Abs,
    "tanh": sp.tanh,
    "sigmoid": sigmoid,
    "softplus": softplus,
    "erf": sp.erf,
    "sin": sp.sin,
    "cos": sp.cos,
}

CUSTOM_FUNCTIONS = (sigmoid, softplus)


def fix_step_convention(expr: sp.Expr) -> sp.Expr:
    """Heaviside(x) -> Heaviside(x, 0): relu'(0) = 0, as PyTorch and JAX; and the
    derivative of a step, DiracDelta, is 0 (relu'' = 0 wherever it exists, as JAX)."""
    expr = expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
    return expr.replace(lambda e: isinstance(e, sp.Heaviside), lambda e: sp.Heaviside(e.args[0], 0))
