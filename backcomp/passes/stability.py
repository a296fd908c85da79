"""Numerically stable rewrites of elementwise expressions, and a report of them.

Runs after fusion, when a whole chain (``log(1 + x)``, ``log(sigmoid(z))``) sits in
one SymPy expression.  ``log(softmax(x))`` needs no rule: softmax is
``exp(x − lse)`` and SymPy folds ``log(exp(u))`` to ``u`` (log_softmax) by itself.
What cannot be rewritten is reported, so that users know where to look.

The report does not cry wolf over what is safe by construction.  A small sign
analysis (``Bound``) runs over the graph in topological order: every node gets a
lower bound from its op (a mean of squares is ≥ 0, ``v + 1e-5`` is ≥ 1e-5, a sum
of max-shifted exponentials is ≥ 1, ...), and a division or a log is reported only
where its operand is not bounded away from zero.  What an op's elements are (an
element of its input, a sum, sums of products, ...) its ``OpDef`` declares (``bound``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy as sp
from sympy.printing.str import StrPrinter

from backcomp.graph import Graph, Node
from backcomp.ops.elementwise import arg_symbol, node_expr
from backcomp.ops.registry import get_op
from backcomp.ops.scalar import (
    expm1,
    half_step,
    log1p,
    sigmoid,
    softplus,
    tie_max,
    tie_min,
)
from backcomp.passes.dce import eliminate_dead_code
from backcomp.passes.fuse import _set_expr, is_elementwise


def _is_one_plus(e) -> bool:
    return isinstance(e, sp.log) and e.args[0].is_Add and sp.S.One in e.args[0].args


def _is_exp_minus_one(e) -> bool:
    return e.is_Add and len(e.args) == 2 and sp.S.NegativeOne in e.args and any(
        isinstance(a, sp.exp) for a in e.args)


def _is_log_sigmoid(e) -> bool:
    return isinstance(e, sp.log) and isinstance(e.args[0], sigmoid)


def _is_log_one_minus_sigmoid(e) -> bool:
    if not (isinstance(e, sp.log) and e.args[0].is_Add and len(e.args[0].args) == 2):
        return False
    one, other = sorted(e.args[0].args, key=lambda a: not a.is_Number)
    return one == 1 and other.is_Mul and other.args[0] == -1 and isinstance(sp.Mul(*other.args[1:]), sigmoid)


def _is_log_one_plus_exp(e) -> bool:
    if not _is_one_plus(e):
        return False
    rest = e.args[0] - 1
    return isinstance(rest, sp.exp)


def _is_log_of_exp_product(e) -> bool:
    return isinstance(e, sp.log) and e.args[0].is_Mul and any(isinstance(a, sp.exp) for a in e.args[0].args)


def _split_log_of_exp_product(e):
    """log(exp(u)·v) = u + log(v): exact wherever the left side is defined (exp(u) > 0)."""
    factors = e.args[0].args
    u = sp.Add(*[a.args[0] for a in factors if isinstance(a, sp.exp)])
    return u + sp.log(sp.Mul(*[a for a in factors if not isinstance(a, sp.exp)]))


#: (description, matcher, rewrite), applied in order
RULES = (
    ("log(exp(u)·v) -> u + log(v)  (log of softmax -> log_softmax)", _is_log_of_exp_product,
     _split_log_of_exp_product),
    ("log(1 + exp(u)) -> softplus(u)", _is_log_one_plus_exp, lambda e: softplus((e.args[0] - 1).args[0])),
    ("log(sigmoid(z)) -> -softplus(-z)", _is_log_sigmoid,
     lambda e: -softplus(-e.args[0].args[0])),
    ("log(1 - sigmoid(z)) -> -softplus(z)", _is_log_one_minus_sigmoid,
     lambda e: -softplus([a for a in e.args[0].args if not a.is_Number][0].atoms(sigmoid).pop().args[0])),
    ("log(1 + u) -> log1p(u)", _is_one_plus, lambda e: log1p(e.args[0] - 1)),
    ("exp(u) - 1 -> expm1(u)", _is_exp_minus_one,
     lambda e: expm1([a for a in e.args if isinstance(a, sp.exp)][0].args[0])),
)


@dataclass
class Finding:
    node: str
    message: str
    rewritten: bool

    def __str__(self) -> str:
        return f"{self.node}: {'rewrote' if self.rewritten else 'risky'}: {self.message}"


def _label(node: Node) -> str:
    return node.name or (f"{node.scope} ({node.attrs.get('label', node.op)})" if node.scope else f"%{node.id}")


def stabilize_expr(expr: sp.Expr) -> tuple[sp.Expr, list[str]]:
    applied = []
    for description, match, rewrite in RULES:
        new = expr.replace(match, rewrite)
        if new != expr:
            applied.append(description)
            expr = new
    return expr, applied


# ----- what is known of a value's sign ---------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """A lower bound on every element of a value: each is ``>= low`` (``low >= 0``), and
    ``> 0`` if ``strict``.  ``None`` stands for "nothing known".

    ``Bound(0, False)`` is non-negative; ``Bound(0, True)`` is positive but may be as
    small as floating point allows (``exp(u)``, ``sigmoid(z)`` underflow to 0);
    ``Bound(c, True)`` with ``c`` a normal float32 is bounded away from zero: a safe
    denominator and a safe argument of log.
    """
    low: float
    strict: bool

    @property
    def away_from_zero(self) -> bool:
        return self.low >= FLOAT32_TINY


NONNEG = Bound(0.0, False)
POSITIVE = Bound(0.0, True)
#: the least positive normal float32: a bound at least this large survives the module's dtype
FLOAT32_TINY = 2.0 ** -126
_EXP_CAP = 700.0   # exp of a larger lower bound is capped (it would overflow a Python float)


def _number_bound(value: float) -> Bound | None:
    return Bound(value, value > 0) if value >= 0 else None


def _sum_bound(bounds: list[Bound | None]) -> Bound | None:
    """a + b: lows add; positive if any term is."""
    if any(b is None for b in bounds):
        return None
    low = sum(b.low for b in bounds)
    return Bound(low, low > 0 or any(b.strict for b in bounds))


def _product_bound(bounds: list[Bound | None]) -> Bound | None:
    """a · b of non-negatives: lows multiply; positive if every factor is."""
    if any(b is None for b in bounds):
        return None
    low = 0.0 if any(b.low == 0 for b in bounds) else math.prod(b.low for b in bounds)
    return Bound(low, all(b.strict for b in bounds))


def _meet(bounds: list[Bound | None]) -> Bound | None:
    """What holds of every one of several values (min, a choice between branches)."""
    if not bounds or any(b is None for b in bounds):
        return None
    return Bound(min(b.low for b in bounds), all(b.strict for b in bounds))


def _join(bounds: list[Bound | None]) -> Bound | None:
    """A max is at least each of its arguments: the best bound among them."""
    known = [b for b in bounds if b is not None]
    if not known:
        return None
    return Bound(max(b.low for b in known), any(b.strict for b in known))


def _increasing_from(f: Callable[[float], float], zero: float, b: Bound | None) -> Bound | None:
    """f increasing with f(zero) = 0 (log at 1; log1p, expm1, tanh, erf at 0): f(u) >= f(low)
    when u >= low >= zero, and f(u) > 0 when u > zero."""
    if b is None or b.low < zero:
        return None
    low = max(f(min(b.low, _EXP_CAP)), 0.0)
    return Bound(low, low > 0 or (zero == 0 and b.strict))


def expr_bound(expr: sp.Expr, leaf: Callable[[sp.Symbol], Bound | None]) -> Bound | None:
    """A lower bound of a scalar SymPy expression; ``leaf`` gives those of its symbols."""
    def rec(e: sp.Expr) -> Bound | None:
        if e.is_Number or e.is_NumberSymbol:
            try:
                value = float(e)
            except TypeError:       # zoo, nan
                return None
            return _number_bound(value) if math.isfinite(value) else None
        if e.is_Symbol:
            b = leaf(e)
            if b is None and e.is_positive:        # a dimension: a positive integer
                return Bound(1.0, True) if e.is_integer else POSITIVE
            if b is None and e.is_nonnegative:
                return NONNEG
            return b
        args = e.args
        if e.is_Add:
            return _sum_bound([rec(a) for a in args])
        if e.is_Mul:
            return _product_bound([rec(a) for a in args])
        if e.is_Pow:
            return _pow_bound(args[0], args[1], rec)
        if isinstance(e, sp.exp):                  # exp(u) > 0, and >= exp(low) when u >= low
            u = rec(args[0])
            return POSITIVE if u is None else Bound(math.exp(min(u.low, _EXP_CAP)), True)
        if isinstance(e, sigmoid):
            u = rec(args[0])
            return POSITIVE if u is None else Bound(1 / (1 + math.exp(-min(u.low, _EXP_CAP))), True)
        if isinstance(e, softplus):
            u = rec(args[0])
            return POSITIVE if u is None else Bound(u.low + math.log1p(math.exp(-u.low)), True)
        if isinstance(e, sp.Abs):
            return rec(args[0]) or NONNEG
        if isinstance(e, (sp.Max, tie_max)):
            return _join([rec(a) for a in args])
        if isinstance(e, (sp.Min, tie_min)):
            return _meet([rec(a) for a in args])
        if isinstance(e, (sp.Heaviside, half_step)):
            return NONNEG
        if isinstance(e, sp.Piecewise):
            return _meet([rec(piece.expr) for piece in args])
        if isinstance(e, sp.log):
            return _increasing_from(math.log, 1.0, rec(args[0]))
        for fn, f in ((log1p, math.log1p), (expm1, math.expm1), (sp.tanh, math.tanh), (sp.erf, math.erf)):
            if isinstance(e, fn):
                return _increasing_from(f, 0.0, rec(args[0]))
        return None

    return rec(expr)


def _pow_bound(base: sp.Expr, exponent: sp.Expr, rec) -> Bound | None:
    if not exponent.is_Number:                     # b ** q = exp(q log b) > 0 for b > 0
        b = rec(base)
        return POSITIVE if b is not None and b.strict else None
    p = float(exponent)
    if p == 0:
        return Bound(1.0, True)
    b = rec(base)
    if b is None:
        return NONNEG if exponent.is_Integer and exponent.is_even else None
    if p > 0:
        try:
            low = b.low ** p
        except OverflowError:
            low = math.inf
        return Bound(low, b.strict)
    return Bound(0.0, b.strict)                    # 1 / b**|p|: positive where b is (inf at 0)


def node_bound(node: Node, bounds: dict[Node, Bound]) -> Bound | None:
    """A lower bound of every element of ``node``, from what its op says its elements are
    (``OpDef.bound``) and its inputs' bounds."""
    if node.op in ("input", "param") or node.dtype != "float":
        return None
    if is_elementwise(node):
        symbols = {arg_symbol(i): x for i, x in enumerate(node.inputs)}
        return expr_bound(node_expr(node), lambda s: bounds.get(symbols[s]) if s in symbols else None)
    ins = [bounds.get(x) for x in node.inputs]
    elements = get_op(node.op).bound
    if elements == "element":                      # an element, a mean or a max of the first input's
        return ins[0]
    if elements == "element_or_zero":
        if tuple(node.attrs.get("padding", (0, 0))) != (0, 0):
            return _meet([ins[0], NONNEG])         # the zero padding is averaged in, or copied
        return ins[0]
    if elements == "sum":
        m = _shifted_exp_max(node.inputs[0]) if "axes" in node.attrs else None   # sum, not sum_to
        if m is not None and set(m.attrs["axes"]) <= set(node.attrs["axes"]):
            return Bound(1.0, True)    # Σ exp(x − max x) over windows that hold their max: a term is 1
        return ins[0]                  # a sum of at least one element, all of them >= low >= 0
    if elements == "products":                     # sums of products, at least one term each
        return _product_bound(ins)
    if elements == "products_or_zero":
        return NONNEG if all(b is not None for b in ins) else None
    if elements == "any_input":
        return _meet(ins)
    if elements == "one":
        return Bound(1.0, True)
    if elements == "zero":
        return NONNEG
    return None


def graph_bounds(graph: Graph) -> dict[Node, Bound]:
    """The bound of every node of ``graph`` that has one (nodes are in topological order)."""
    bounds: dict[Node, Bound] = {}
    for node in graph.nodes:
        b = node_bound(node, bounds)
        if b is not None:
            bounds[node] = b
    return bounds


# ----- exponentials that cannot overflow -----------------------------------------------------
def _own_max(m: Node, x: Node) -> Node | None:
    """The max reduction if ``m`` is max(x) (behind a stop_gradient or not) shaped so that
    x − m subtracts from each element the max of its own window: kept dims, or leading
    axes reduced (NumPy broadcasting aligns the rest from the right)."""
    if m.op == "stop_gradient":
        m = m.inputs[0]
    if m.op != "max" or m.inputs[0] is not x:
        return None
    axes = tuple(sorted(m.attrs["axes"]))
    return m if m.attrs["keepdims"] or axes == tuple(range(len(axes))) else None


def _shift_max(arg: sp.Expr, inputs: dict[sp.Symbol, Node]) -> Node | None:
    """For x − max(x) or x − logsumexp(x) (never above 0, and 0 at each window's max), the max node."""
    if arg in inputs and is_elementwise(inputs[arg]):      # the difference is a node of its own
        node = inputs[arg]
        return _shift_max(node_expr(node), {arg_symbol(i): x for i, x in enumerate(node.inputs)})
    terms = sp.Add.make_args(arg)
    if len(terms) != 2:
        return None
    for shift, x in (terms, terms[::-1]):
        m, x = inputs.get(-shift), inputs.get(x)
        if m is not None and x is not None:
            found = _own_max(m, x) or _logsumexp_max(m, x)
            if found is not None:
                return found
    return None


def _at_most_zero(arg: sp.Expr, inputs: dict[sp.Symbol, Node], bounds: dict[Node, Bound]) -> bool:
    """Whether ``arg`` is never above 0, so that exp(arg) cannot overflow: −arg has a
    bound, or arg is x − max(x) (or x − logsumexp(x)) plus terms whose negations have
    one (as in x − m − log Σ exp(x − m), log_softmax, where Σ ≥ 1 makes the log ≥ 0)."""
    def leaf(s):
        return bounds.get(inputs[s]) if s in inputs else None

    if expr_bound(-arg, leaf) is not None:
        return True
    if arg in inputs and is_elementwise(inputs[arg]):      # the argument is a node of its own
        node = inputs[arg]
        return _at_most_zero(node_expr(node), {arg_symbol(i): x for i, x in enumerate(node.inputs)}, bounds)
    terms = sp.Add.make_args(arg)
    for i, x in enumerate(terms):
        for j, shift in enumerate(terms):
            m, xn = inputs.get(-shift), inputs.get(x)
            if i == j or m is None or xn is None or (_own_max(m, xn) or _logsumexp_max(m, xn)) is None:
                continue
            if all(expr_bound(-t, leaf) is not None for k, t in enumerate(terms) if k not in (i, j)):
                return True
    return False


def _logsumexp_max(node: Node, x: Node) -> Node | None:
    """log(Σ exp(x − m)) + m with m = max(x), as nn.logsumexp builds it: the max node."""
    if not is_elementwise(node):
        return None
    names = {arg_symbol(i): n for i, n in enumerate(node.inputs)}
    terms = sp.Add.make_args(node_expr(node))
    logs = [t for t in terms if isinstance(t, sp.log)]
    rest = [t for t in terms if not isinstance(t, sp.log)]
    if len(logs) != 1 or len(rest) != 1 or rest[0] not in names:
        return None
    m = _own_max(names[rest[0]], x)
    total = names.get(logs[0].args[0])
    if m is None or total is None or total.op != "sum" or _shifted_exp_max(total.inputs[0]) is not m \
            or not set(m.attrs["axes"]) <= set(total.attrs["axes"]):
        return None
    return m   # the sum holds each window's max term exp(0) = 1, so log Σ >= 0 and lse >= max >= x


def _shifted_exp_max(node: Node) -> Node | None:
    """For an elementwise exp(x − max x), the max node."""
    if not is_elementwise(node):
        return None
    expr = node_expr(node)
    if not isinstance(expr, sp.exp):
        return None
    return _shift_max(expr.args[0], {arg_symbol(i): x for i, x in enumerate(node.inputs)})


# ----- the report -----------------------------------------------------------------------------
class _ReportPrinter(StrPrinter):
    """SymPy's str form, with symbols printed as ``names`` says and numbers as the
    shortest repr that round-trips (``1e-05``).

    Constants are SymPy Floats of 17 significant digits (so that they keep every bit of
    a float64), which the stock printer shows in full: ``1.0000000000000001e-5``."""

    def __init__(self, names: dict[sp.Symbol, str]):
        super().__init__()
        self.names = names

    def _print_Symbol(self, expr):
        return self.names.get(expr, expr.name)

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_tie_max(self, expr):
        return f"Max({', '.join(map(self._print, expr.args))})"

    def _print_tie_min(self, expr):
        return f"Min({', '.join(map(self._print, expr.args))})"


def risks(expr: sp.Expr, inputs: dict[sp.Symbol, Node] | None = None,
          bounds: dict[Node, Bound] | None = None, names: dict[sp.Symbol, str] | None = None) -> list[str]:
    """Patterns left in an expression that can overflow, underflow or divide by zero.

    ``inputs`` maps the expression's symbols to nodes and ``bounds`` gives what is
    known of those nodes' signs (``graph_bounds`` of their graph by default), to
    recognise what is safe by construction: max-shifted exponentials, and
    denominators and log arguments bounded away from zero (``sqrt(var + eps)``, a
    softmax's sum).  ``names`` are the symbols' names in the messages.
    """
    inputs = inputs or {}
    if bounds is None:
        bounds = graph_bounds(next(iter(inputs.values())).graph) if inputs else {}
    _text = _ReportPrinter(names or {}).doprint

    def bound(e: sp.Expr) -> Bound | None:
        return expr_bound(e, lambda s: bounds.get(inputs[s]) if s in inputs else None)

    found = []
    for log in expr.atoms(sp.log):
        b = bound(log.args[0])
        if b is None or not b.away_from_zero:
            found.append(f"log({_text(log.args[0])}) is -inf where its argument underflows to 0")
    for e in expr.atoms(sp.exp):
        if not _at_most_zero(e.args[0], inputs, bounds):
            found.append(f"exp({_text(e.args[0])}) overflows for arguments above ~88 (float32) / ~709 (float64)")
    for p in expr.atoms(sp.Pow):
        if not p.exp.is_negative:
            continue
        b = bound(p.base)
        if b is not None and b.away_from_zero:
            continue
        denominator = _text(p.base if p.exp == -1 else sp.Pow(p.base, -p.exp))
        if b is not None and b.strict:
            found.append(f"division by {denominator}, which is positive but may underflow to 0")
        else:
            found.append(f"division by {denominator}, which may be 0")
    return sorted(set(found))


def stabilize(graph: Graph, findings: list[Finding] | None = None) -> Graph:
    """Graph -> Graph with the stable forms above; ``findings`` collects the report."""
    g, _ = graph.clone()
    bounds: dict[Node, Bound] = {}     # the sign analysis, for the report only
    for node in g.nodes:
        if is_elementwise(node):
            expr = node_expr(node)
            new, applied = stabilize_expr(expr)
            if applied:
                _set_expr(node, list(node.inputs), new)
            if findings is not None and node.origin is None:   # report forward nodes only
                inputs = {arg_symbol(i): x for i, x in enumerate(node.inputs)}
                labels = {arg_symbol(i): _label(x) for i, x in enumerate(node.inputs)}
                findings += [Finding(_label(node), a, True) for a in applied]
                findings += [Finding(_label(node), r, False) for r in risks(new, inputs, bounds, labels)]
        b = node_bound(node, bounds) if findings is not None else None   # inputs come first
        if b is not None:
            bounds[node] = b
    return eliminate_dead_code(g)
