"""Scalar building blocks for elementwise ops, as SymPy expressions.

SymPy already knows exp, log, tanh, erf, ... and differentiates them.  Two functions
are added because their textbook formulas overflow: ``sigmoid`` and ``softplus``.
Each carries its ``definition`` (the source of truth) and an ``fdiff`` written in
terms of itself so derivatives reuse the forward value; a test checks that every
``fdiff`` equals ``diff(definition)``.  Three more are there for their derivatives:
``tie_max`` and ``tie_min``, the max and min of two varying operands, whose partials
``half_step`` split a tie in halves (SymPy's Max gives neither operand anything).
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

_x = sp.Symbol("x", real=True)


class sigmoid(sp.Function):
    """σ(x) = 1 / (1 + e^-x); printed in a form that cannot overflow."""

    definition = 1 / (1 + sp.exp(-_x))
    is_real = True

    def _eval_evalf(self, prec):
        """σ of a number has a numeric value, so SymPy can compare it (Max(σ(0) − 1, 0)
        folds to 0) while the expression stays σ(c): the stable printing and rewrites
        still see it (σ(−1000) is not 1/(1 + e¹⁰⁰⁰), which would print as 1/inf)."""
        return self.definition.xreplace({_x: self.args[0]})._eval_evalf(prec)

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _latex(self, printer):
        return rf"\sigma\left({printer._print(self.args[0])}\right)"


class softplus(sp.Function):
    """log(1 + e^x); printed as ``np.logaddexp(0, x)``."""

    definition = sp.log(1 + sp.exp(_x))
    is_real = True

    def _eval_evalf(self, prec):
        """As σ's: relu(log_sigmoid(x − x)) compares −softplus(0) with 0."""
        return self.definition.xreplace({_x: self.args[0]})._eval_evalf(prec)

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


class half_step(sp.Function):
    """H½(x): 1 above 0, ½ at 0, 0 below; the partials of max/min of two varying
    operands, so that a tie gives each half (as JAX and PyTorch).  Its derivative is 0,
    as relu's step's is (``fix_step_convention``, which leaves H½ alone)."""

    is_real = True
    is_nonnegative = True

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.S.Half
        if x.is_extended_positive:
            return sp.S.One
        if x.is_extended_negative:
            return sp.S.Zero
        return None

    def fdiff(self, argindex=1):
        return sp.S.Zero


def _varying(e: sp.Expr) -> bool:
    """Not a number or an expression of dims (B, 4·T): a value that can have a gradient."""
    return not all(s.is_integer for s in e.free_symbols)


class _Tie(sp.Function):
    """max or min of two varying operands, u and v, kept binary.

    SymPy's Max gives ∂/∂u = H(u − v), and with relu's H(0) = 0 both operands got 0
    at a tie; it also flattens max(max(a, b), c), which fusion does at -O1 and not at
    -O0, so a rule over its operands would depend on the level.  These stay nested as
    written, order-free (arguments sorted), with each partial H½: a tie splits the
    gradient in halves whichever operand comes first.  An operand that fusion folds
    to a number keeps this rule (it was an array at -O0); two numbers are a number."""

    nargs = 2
    is_real = True
    sign = 1   # of the step's argument: u − v for max, v − u for min

    @classmethod
    def eval(cls, u, v):
        if not (_varying(u) or _varying(v)):
            return cls.numeric(u, v)
        if u == v:   # max(u, u) = u: its partials ½ + ½ are u's whole derivative
            return u
        if sp.default_sort_key(v) < sp.default_sort_key(u):
            return cls(v, u)
        return None

    def fdiff(self, argindex=1):
        u, v = self.args if argindex == 1 else reversed(self.args)
        return half_step(self.sign * (u - v))


class tie_max(_Tie):
    """max(u, v) of two varying operands: ∂/∂u = H½(u − v)."""
    numeric = sp.Max


class tie_min(_Tie):
    """min(u, v) of two varying operands: ∂/∂u = H½(v − u)."""
    numeric = sp.Min
    sign = -1


def maximum(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """max(a, b): ``tie_max`` of two varying operands, else SymPy's Max, whose step at a
    tie with a number is relu's H(0) = 0 (max(x, 0), max(x, c) as before)."""
    return tie_max(a, b) if _varying(a) and _varying(b) else sp.Max(a, b)


def minimum(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """min(a, b): ``tie_min`` of two varying operands, else SymPy's Min."""
    return tie_min(a, b) if _varying(a) and _varying(b) else sp.Min(a, b)


def ties_with_numbers(expr: sp.Expr) -> sp.Expr:
    """A function body's ties after its arguments are substituted: ``maximum(a, b)``
    called with a number for ``b`` is SymPy's Max (relu's rule at a tie), as
    ``maximum(p, 0.5)`` written out is."""
    if not expr.has(tie_max, tie_min):
        return expr
    return expr.replace(lambda e: isinstance(e, (tie_max, tie_min)),
                        lambda e: (maximum if isinstance(e, tie_max) else minimum)(*e.args))


def split_ties(expr: sp.Expr) -> sp.Expr:
    """SymPy's Max and Min of two or more varying operands (in a user's expression) as
    nested ``tie_max``/``tie_min``, folded over the operands in SymPy's order, with any
    numbers in a Max/Min around them: the rule of ``maximum``/``minimum``, fixed before
    fusion could flatten it differently at each level (max(a, b, c) at a three-way tie
    gives ¼, ¼, ½, as max(max(a, b), c))."""
    def split(e):
        varying = [a for a in e.args if _varying(a)]
        if len(varying) < 2:
            return e
        tie, numeric = (tie_max, sp.Max) if isinstance(e, sp.Max) else (tie_min, sp.Min)
        out = varying[0]
        for a in varying[1:]:
            out = tie(out, a)
        constants = [a for a in e.args if not _varying(a)]
        return numeric(out, *constants) if constants else out
    return expr.replace(lambda e: isinstance(e, (sp.Max, sp.Min)), split)


def fix_step_convention(expr: sp.Expr) -> sp.Expr:
    """Heaviside(x) -> Heaviside(x, 0): relu'(0) = 0, as PyTorch and JAX; and the
    derivative of a step, DiracDelta, is 0 (relu'' = 0 wherever it exists, as JAX)."""
    expr = expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)
    return expr.replace(lambda e: isinstance(e, sp.Heaviside), lambda e: sp.Heaviside(e.args[0], 0))
