"""Numerically stable rewrites of elementwise expressions, and a report of them.

Runs after fusion, when a whole chain (``log(1 + x)``, ``log(sigmoid(z))``) sits in
one SymPy expression.  ``log(softmax(x))`` needs no rule: softmax is
``exp(x − lse)`` and SymPy folds ``log(exp(u))`` to ``u`` (log_softmax) by itself.
What cannot be rewritten is reported, so that users know where to look.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from backcomp.graph import Graph, Node
from backcomp.ops.elementwise import arg_symbol, node_expr
from backcomp.ops.scalar import expm1, log1p, sigmoid, softplus
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


def _is_shifted_by_own_max(arg: sp.Expr, inputs: dict[sp.Symbol, Node]) -> bool:
    """x − stop_gradient(max(x)) or x − logsumexp(x): never above 0, so exp cannot overflow."""
    if arg in inputs and is_elementwise(inputs[arg]):      # the difference is a node of its own
        node = inputs[arg]
        return _is_shifted_by_own_max(node_expr(node), {arg_symbol(i): x for i, x in enumerate(node.inputs)})
    terms = sp.Add.make_args(arg)
    if len(terms) != 2:
        return False
    for shift, x in (terms, terms[::-1]):
        m, x = inputs.get(-shift), inputs.get(x)
        if m is not None and x is not None and (_is_max_of(m, x) or _is_logsumexp_of(m, x)):
            return True
    return False


def _is_max_of(m: Node, x: Node) -> bool:
    return m.op == "stop_gradient" and m.inputs[0].op == "max" and m.inputs[0].inputs[0] is x


def _is_logsumexp_of(node: Node, x: Node) -> bool:
    """log(Σ exp(x − m)) + m with m = stop_gradient(max(x)), as nn.logsumexp builds it."""
    if not is_elementwise(node):
        return False
    names = {arg_symbol(i): n for i, n in enumerate(node.inputs)}
    terms = sp.Add.make_args(node_expr(node))
    logs = [t for t in terms if isinstance(t, sp.log)]
    rest = [t for t in terms if not isinstance(t, sp.log)]
    return (len(logs) == 1 and len(rest) == 1 and rest[0] in names and _is_max_of(names[rest[0]], x)
            and _is_sum_of_shifted_exp(names.get(logs[0].args[0])))


def _is_sum_of_shifted_exp(node: Node | None) -> bool:
    """Σ exp(x − max x) is at least 1: its log cannot underflow."""
    if node is None or node.op != "sum" or not is_elementwise(node.inputs[0]):
        return False
    inner = node.inputs[0]
    expr = node_expr(inner)
    names = {arg_symbol(i): x for i, x in enumerate(inner.inputs)}
    return isinstance(expr, sp.exp) and _is_shifted_by_own_max(expr.args[0], names)


def risks(expr: sp.Expr, inputs: dict[sp.Symbol, Node] | None = None) -> list[str]:
    """Patterns left in an expression that can overflow, underflow or divide by zero.

    ``inputs`` maps the expression's symbols to nodes, to recognise what is safe
    by construction (the max-shifted exponentials inside logsumexp).
    """
    inputs = inputs or {}
    found = []
    for log in expr.atoms(sp.log):
        if not _is_sum_of_shifted_exp(inputs.get(log.args[0])):
            found.append(f"log({log.args[0]}) is -inf where its argument underflows to 0")
    for e in expr.atoms(sp.exp):
        if not _is_shifted_by_own_max(e.args[0], inputs):
            found.append(f"exp({e.args[0]}) overflows for arguments above ~88 (float32) / ~709 (float64)")
    for p in expr.atoms(sp.Pow):
        if p.exp.is_negative and not p.base.is_positive:
            found.append(f"division by {p.base}, which may be 0")
    return sorted(set(found))


def stabilize(graph: Graph, findings: list[Finding] | None = None) -> Graph:
    """Graph -> Graph with the stable forms above; ``findings`` collects the report."""
    g, _ = graph.clone()
    for node in g.nodes:
        if not is_elementwise(node):
            continue
        expr = node_expr(node)
        new, applied = stabilize_expr(expr)
        if applied:
            _set_expr(node, list(node.inputs), new)
        if findings is not None and node.origin is None:   # report forward nodes only
            labels = {arg_symbol(i): sp.Symbol(_label(x), real=True) for i, x in enumerate(node.inputs)}
            inputs = {labels[arg_symbol(i)]: x for i, x in enumerate(node.inputs)}
            findings += [Finding(_label(node), a, True) for a in applied]
            findings += [Finding(_label(node), r, False) for r in risks(new.xreplace(labels), inputs)]
    return eliminate_dead_code(g)
