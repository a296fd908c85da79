"""SymPy scalar expressions -> NumPy source, dtype-preserving and numerically stable.

Built on SymPy's ``NumPyPrinter``; each override fixes one way the stock printer
would break generated code: float64 constants that upcast float32 arrays,
``select(..., default=nan)`` for step functions, ``reduce(maximum, ...)``, or
unstable forms of the sigmoid family.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import sympy as sp
from sympy.printing.numpy import NumPyPrinter

from backcomp.ops.scalar import expm1, half_step, log1p, sigmoid, softplus, tie_max, tie_min


_HELPERS_USED: ContextVar[set[str] | None] = ContextVar("backcomp_helpers_used", default=None)


@contextmanager
def collect_helpers() -> Iterator[set[str]]:
    """The module-level helpers (``_erf``) called by anything printed inside the block.

    Emission rules print through this printer wherever they print (a CSE temporary,
    an in-place chain), so the printer reports what the module must define; nothing
    searches the emitted text for it.
    """
    used: set[str] = set()
    token = _HELPERS_USED.set(used)
    try:
        yield used
    finally:
        _HELPERS_USED.reset(token)


def use_helper(name: str) -> None:
    """Record that a statement being emitted calls the module-level helper ``name``."""
    used = _HELPERS_USED.get()
    if used is not None:
        used.add(name)


def value_symbols(expr: sp.Basic, memo: dict | None = None) -> set[sp.Symbol]:
    """The symbols whose values flow into ``expr``'s result, not only into a comparison
    or a select's condition: NumPy takes the result's dtype from these alone
    (``np.where(p > 0, 0, 0.5)`` is float64 whatever p is)."""
    memo = {} if memo is None else memo
    if expr in memo:
        return memo[expr]
    if expr.is_Symbol:
        out = {expr}
    elif isinstance(expr, sp.Piecewise):
        out = set().union(*(value_symbols(e, memo) for e, _ in expr.args))
    elif isinstance(expr, sp.logic.boolalg.Boolean) and not isinstance(expr, sp.Expr):
        out = set()
    else:
        out = set().union(set(), *(value_symbols(a, memo) for a in expr.args))
    memo[expr] = out
    return out


def float_literal(value) -> str:
    """A Python float literal: Python scalars never upcast float32 arrays (NEP 50)."""
    return repr(float(value))


class NumpyExprPrinter(NumPyPrinter):
    """Prints with the ``np.`` alias and maps SymPy symbols to variable names."""

    def __init__(self, names: dict[sp.Symbol, str] | None = None):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})
        self.names = names or {}
        self.helpers: set[str] = set()  # module-level helpers the expression needs

    def use_helper(self, name: str) -> None:
        """Record a helper for this printer and for the enclosing ``collect_helpers``."""
        self.helpers.add(name)
        use_helper(name)

    def _module_format(self, fqn, register=True):
        """Use the conventional ``np`` alias instead of ``numpy``."""
        return "np." + fqn[len("numpy."):] if fqn.startswith("numpy.") else fqn

    def _print(self, expr, **kwargs):
        """Any number that is not an integer (log(2), sqrt(pi)) prints as a Python float."""
        if isinstance(expr, sp.Basic) and expr.is_number and not expr.is_Integer and expr.is_real \
                and expr.is_finite and not isinstance(expr, sp.Rational):
            return float_literal(expr.evalf(17))
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, expr):
        """Input symbols print as their variable; dim symbols as themselves."""
        return self.names.get(expr, expr.name)

    def _print_Float(self, expr):
        """Python float literals keep float32 arrays float32."""
        return float_literal(expr)

    def _print_Rational(self, expr):
        """1/2 -> 0.5: exact enough, and never integer division."""
        return float_literal(expr.p / expr.q)

    def _print_NumberSymbol(self, expr):
        """pi, E -> literals instead of float64 ``np.pi`` scalars."""
        return float_literal(expr.evalf(17))

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Mul(self, expr):
        """The number factors of a product as one float: 0.3989422804014327*x, not
        (0.5)*1.4142135623730951*x/1.772453850905516 — each factor would be an array pass.
        Steps multiply last, as masks, when another factor is an array
        (``0.5*g*(x > 0)``): ``0.5*(x > 0)`` first would be float64.  A half step's
        mask is twice the step; its ½ joins the number factor."""
        steps = [a for a in expr.args if isinstance(a, _STEPS)]
        rest = [a for a in expr.args if not isinstance(a, _STEPS)]
        if steps and any(not _scalar(s) for s in value_symbols(sp.Mul(*rest))):
            halves = sum(isinstance(a, half_step) for a in steps)
            if halves:   # (not Mul(½, a + b): SymPy would distribute it, a pass per term)
                coeff = sp.Mul(*[a for a in rest if a.is_number]) / 2 ** halves
                rest = [sp.Float(coeff.evalf(17), 17)] * (coeff != 1) + [a for a in rest if not a.is_number]   # 1/√π too
            value = sp.Mul(*rest, evaluate=not halves)
            return "*".join([self.parenthesize(value, sp.printing.precedence.PRECEDENCE["Mul"], strict=True)]
                            + [self.mask(a) for a in steps])
        numbers = [a for a in expr.args if a.is_number]
        if len(numbers) > 1 and all(a.is_real and a.is_finite for a in numbers):
            coeff = sp.Float(sp.Mul(*numbers).evalf(17), 17)
            expr = sp.Mul(coeff, *[a for a in expr.args if not a.is_number], evaluate=False)
        return super()._print_Mul(expr)

    def _print_Pow(self, expr, rational=False):
        """Small integer powers as products/quotients, square roots as ``np.sqrt``."""
        base, exp = expr.args
        if exp.is_Number and not base.is_Number:
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
            if exp == sp.Rational(1, 2):
                return f"np.sqrt({self._print(base)})"
            if exp == -sp.Rational(1, 2):
                return f"1/np.sqrt({self._print(base)})"
            if exp == -1:
                return f"1/{b}"
            if exp.is_Integer and exp < 0:
                return f"1/{self._print(base ** -exp)}" if -exp in (3, 4) and base.is_Symbol else f"1/{b}**{-int(exp)}"
            if exp in (3, 4) and base.is_Symbol:   # x**3 is libm pow per element: 60 ns each
                return "(" + "*".join([b] * int(exp)) + ")"   # parenthesised: y/(x*x*x)
            if exp.is_Integer:
                return f"{b}**{int(exp)}"
            return f"{b}**{float_literal(exp)}"
        if base.is_Number and exp.is_Number:
            return float_literal(expr.evalf(17))
        if base == sp.E:
            return f"np.exp({self._print(exp)})"
        return f"{self.parenthesize(base, 61)}**{self.parenthesize(exp, 61)}"

    def _print_Max(self, expr):
        """Nested binary ``np.maximum`` (the stock printer emits ``reduce``)."""
        return self._nested("np.maximum", expr.args)

    def _print_Min(self, expr):
        return self._nested("np.minimum", expr.args)

    _print_tie_max = _print_Max
    _print_tie_min = _print_Min

    def _nested(self, fn, args):
        args = sorted(args, key=lambda a: a.is_Number)  # arrays first: keeps their dtype
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    def _print_Heaviside(self, expr):
        """H(x) with H(0) = 0 (relu' at 0 is 0, as PyTorch), as a number in x's dtype:
        a boolean mask would add as logical or and refuse to subtract (H(x) − H(x − 1))."""
        return f"np.heaviside({self._print(expr.args[0])}, 0)"

    def _print_half_step(self, expr):
        """H½(x) as a number in x's dtype, (sign(x) + 1)/2 in one call: 160–220 µs for a
        (256, 1024) float32 x, against 1350–1600 µs for np.heaviside(x, 0.5)."""
        return f"np.multiply(np.sign({self._print(expr.args[0])}) + 1, 0.5)"

    def mask(self, expr):
        """H(x) as a boolean mask, for a factor of a product with a float array; H½(x)
        as twice itself, [x > 0] + [x >= 0] added as int8 (bool + bool is a logical
        or), the product's number factor taking the ½.  g·H½(x) for (256, 1024) float32
        g and x (``benchmarks/tie_step.py``): 150 µs printed so, 160 µs with
        ``np.add(x > 0, x >= 0, dtype=np.int8)`` (125 and 136 µs, medians of an
        interleaved A/B), 250 µs for ``g*(np.sign(x) + 1)*0.5``, 230–260 µs for
        ``g*(x > 0) + 0.5*g*(x == 0)``, 1550 µs for ``g*np.heaviside(x, 0.5)``; g·H(x)
        as ``g*(x > 0)`` takes 95 µs.  The argument is read twice: a difference of
        names is compared as it stands (u − v > 0 is u > v in IEEE arithmetic, and
        saves the subtraction), anything else is made a temporary first
        (``compared_directly``)."""
        if isinstance(expr, sp.Heaviside):
            return f"({self._print(expr.args[0])} > 0)"
        u, v = (self._print(side) for side in sides(expr.args[0]))
        return f"(({u} > {v}).view(np.int8) + ({u} >= {v}).view(np.int8))"

    def _print_Piecewise(self, expr):
        """Nested ``np.where``; the last branch is the ``True`` default."""
        pieces = list(expr.args)
        out = self._print(pieces[-1].expr)
        for piece in reversed(pieces[:-1]):
            out = f"np.where({self._print(piece.cond)}, {self._print(piece.expr)}, {out})"
        return out

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Not(self, expr):
        return f"~({self._print(expr.args[0])})"

    def _print_sigmoid(self, expr):
        """σ(x) by the module's ``_sigmoid`` (backcomp/runtime.py): no overflow at either tail."""
        self.use_helper("sigmoid")
        return f"_sigmoid({self._print(expr.args[0])})"

    def _print_softplus(self, expr):
        """log(1 + exp(x)) without overflow."""
        return f"np.logaddexp(0, {self._print(expr.args[0])})"

    def _print_erf(self, expr):
        """NumPy has no erf; the module defines ``_erf`` (backcomp/runtime.py)."""
        self.use_helper("erf")
        return f"_erf({self._print(expr.args[0])})"

    def _print_Grouped(self, expr):
        return f"({self._print(expr.args[0])})"

    def _print_sign(self, expr):
        return f"np.sign({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"np.abs({self._print(expr.args[0])})"

    def _print_log1p(self, expr):
        return f"np.log1p({self._print(expr.args[0])})"

    def _print_expm1(self, expr):
        return f"np.expm1({self._print(expr.args[0])})"


_STEPS = (sp.Heaviside, half_step)
_MAX_MIN = (sp.Max, sp.Min, tie_max, tie_min)


def sides(x: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """u and v with x = u − v: the terms of a sum with a sign, and those without."""
    terms = sp.Add.make_args(x)
    minus = [t for t in terms if t.could_extract_minus_sign()]
    return sp.Add(*[t for t in terms if t not in minus]), -sp.Add(*minus)


def compared_directly(x: sp.Expr) -> bool:
    """Whether H½(x)'s mask reads ``x`` as names and numbers only (x, u − v, −x, x − 0.5),
    so that printing it twice computes nothing twice."""
    return all(side.is_Symbol or side.is_number for side in sides(x))


_UFUNCS = {sp.exp: "exp", sp.log: "log", sp.tanh: "tanh", sp.sin: "sin", sp.cos: "cos", sp.Abs: "abs",
           log1p: "log1p", expm1: "expm1"}


class _NotInPlace(Exception):
    """The chain to the buffer passes through something that is not a plain ufunc."""


def print_into(expr: sp.Expr, names: dict[sp.Symbol, str], into: str, buffer: sp.Symbol) -> list[str] | None:
    """``expr`` as ufunc calls that work inside the dead buffer ``into`` (no allocation).

    ``buffer`` is the symbol whose array ``into`` holds; it must occur once, so
    that overwriting it cannot change an operand still to be read.  The chain of
    operations from ``buffer`` up to the root is written in place
    (``np.add(z, b, out=z)``, then ``np.maximum(z, 0, out=z)``); operands off the
    chain are printed as usual.  Returns the calls, or None if it does not apply.
    """
    if expr == buffer or expr.count(buffer) != 1:
        return None
    p = NumpyExprPrinter(names)
    calls: list[str] = []

    def value(e) -> str:
        return into if e == buffer else p.doprint(e)

    def write(e) -> None:
        """Leave the value of ``e`` (which contains ``buffer``) in ``into``."""
        if e == buffer:
            return
        spine = next(a for a in e.args if a.has(buffer))
        others = [a for a in e.args if a is not spine]
        halves = [o for o in others if isinstance(o, half_step)] if e.is_Mul else []
        if halves:   # a half step's mask is twice the step: its ½ joins the numbers, first
            rest = [o for o in others if not isinstance(o, half_step)]
            number = sp.Mul(*[o for o in rest if _scalar(o)]) / 2 ** len(halves)
            others = [number] * (number != 1) + [o for o in rest if not _scalar(o)] + halves
        elif (e.is_Add or e.is_Mul) and sum(map(_scalar, others)) > 1:
            # the numbers and dims among them as one: a pass over the array each otherwise
            scalars = [o for o in others if _scalar(o)]
            others = [o for o in others if not _scalar(o)] + [e.func(*scalars)]
        if e.is_Mul and sp.S.NegativeOne in others and spine.is_Add:
            # -(a - b) = b - a: fold the sign into the sum instead of a pass of its own
            rest = [o for o in others if o != -1]
            negated = sp.Add(*[Grouped(-a.args[0]) if isinstance(a, Grouped) else -a for a in spine.args])
            return write(sp.Mul(*rest, negated, evaluate=False) if rest else negated)
        if e.is_Add and spine.could_extract_minus_sign():
            write(-spine)                       # x - S: compute S, then subtract it from x
            calls.append(f"np.subtract({p.doprint(sp.Add(*others))}, {into}, out={into})")
        elif e.is_Add:
            write(spine)
            for o in others:
                if o.could_extract_minus_sign():
                    calls.append(f"np.subtract({into}, {p.doprint(-o)}, out={into})")
                else:
                    calls.append(f"np.add({into}, {p.doprint(o)}, out={into})")
        elif e.is_Mul:
            write(spine)
            for o in others:
                if o == -1:
                    calls.append(f"np.negative({into}, out={into})")
                elif isinstance(o, _STEPS):
                    calls.append(f"np.multiply({into}, {p.mask(o)}, out={into})")
                elif o.is_Pow and o.exp.is_Number and o.exp < 0:
                    calls.append(f"np.divide({into}, {p.doprint(1 / o)}, out={into})")
                else:
                    calls.append(f"np.multiply({into}, {p.doprint(o)}, out={into})")
        elif e.is_Pow and spine is e.base and e.exp.is_Number:
            write(spine)
            if e.exp == 2:
                calls.append(f"np.square({into}, out={into})")
            elif e.exp == sp.Rational(1, 2):
                calls.append(f"np.sqrt({into}, out={into})")
            elif e.exp == -1:
                calls.append(f"np.divide(1, {into}, out={into})")
            elif e.exp == 3:
                calls.append(f"np.multiply({into}, np.square({into}), out={into})")
            else:
                calls.append(f"np.power({into}, {float_literal(e.exp)}, out={into})")
        elif e.func in _UFUNCS:
            write(spine)
            calls.append(f"np.{_UFUNCS[e.func]}({into}, out={into})")
        elif isinstance(e, softplus):
            write(spine)
            calls.append(f"np.logaddexp(0, {into}, out={into})")
        elif isinstance(e, sigmoid):
            write(spine)
            p.use_helper("sigmoid")   # not exp(-logaddexp(0, -x)): ten times slower
            calls.append(f"_sigmoid({into}, out={into})")
        elif isinstance(e, sp.erf):
            write(spine)
            p.use_helper("erf")
            calls.append(f"_erf({into}, out={into})")
        elif isinstance(e, _MAX_MIN) and len(e.args) == 2:
            write(spine)
            fn = "maximum" if isinstance(e, (sp.Max, tie_max)) else "minimum"
            calls.append(f"np.{fn}({into}, {p.doprint(others[0])}, out={into})")
        else:
            raise _NotInPlace

    try:
        write(expr)
    except _NotInPlace:
        return None
    return calls


def in_place(e: sp.Expr) -> bool:
    """Whether ``print_into`` can compute ``e`` in the array of one of its operands."""
    return bool(e.is_Add or e.is_Mul or e.is_Pow and e.exp.is_Number or e.func in _UFUNCS
                or isinstance(e, (sigmoid, softplus, sp.erf))
                or isinstance(e, _MAX_MIN) and len(e.args) == 2)


def _scalar(e: sp.Expr) -> bool:
    """A number, or an expression of dims (B, T): a Python scalar at run time."""
    return all(not s.name.startswith("%") for s in e.free_symbols)


class Grouped(sp.Function):
    """Parentheses that SymPy will not flatten away (a printing device only)."""

    nargs = 1


def group_small(expr: sp.Expr, small: set[sp.Symbol]) -> sp.Expr:
    """Group the operands of sums and products that only involve small arrays.

    NumPy evaluates ``a*b/c`` left to right, so with ``a`` of shape (B, C) and ``b``,
    ``c`` of shape (B, 1) it makes two passes over (B, C); ``a*(b/c)`` makes one.
    Symbols not in the expression's array inputs (dims such as B) count as small.
    """
    def is_small(e) -> bool:
        return e.is_number or all(s in small or not s.name.startswith("%") for s in e.free_symbols)

    def visit(e):
        if not e.args or isinstance(e, Grouped):
            return e
        args = [visit(a) for a in e.args]
        if (e.is_Add or e.is_Mul) and len(args) > 2:
            smalls = [a for a in args if is_small(a) and not a.is_number]
            if len(smalls) >= 2 and len(smalls) < len(args):
                rest = [a for a in args if not (is_small(a) and not a.is_number)]
                group = Grouped(e.func(*smalls))
                return e.func(*rest, group, evaluate=False)
        return e.func(*args) if args != list(e.args) else e

    return visit(expr)


def print_expr(expr: sp.Expr, names: dict[sp.Symbol, str], helpers: set[str] | None = None) -> str:
    """Print one scalar expression as a NumPy expression over the named arrays."""
    printer = NumpyExprPrinter(names)
    text = printer.doprint(expr)
    if helpers is not None:
        helpers |= printer.helpers
    return text


__all__ = ["NumpyExprPrinter", "collect_helpers", "use_helper", "print_expr", "in_place", "float_literal", "sigmoid", "softplus",
           "value_symbols", "sides", "compared_directly"]
