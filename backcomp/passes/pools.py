"""Pool first, then activate: max_pool(f(x, c)) = f(max_pool(x), c).

A max pool commutes with any ``f`` that is non-decreasing in ``x`` when its other
operands ``c`` are constant over each window (a per-channel bias): the largest
``f(x + c)`` of a window is ``f`` of its largest ``x``.  The conv → bias → relu → pool
of every CNN then adds the bias and applies the relu, forward and backward, to the
pooled values, a quarter of them for a 2x2 pool, and the relu's mask multiplies the
pooled cotangent instead of the whole scattered one (TensorFlow's grappler does the
same for max reductions of monotonic functions).  The gradient is the same wherever
the maximum of a window is unique; where ``f`` makes a tie that ``x`` does not have
(relu clamping negatives to 0), the tied positions get a zero gradient either way.

Monotonicity is read off the SymPy expression by composition (sums, positive
multiples, max/min, increasing functions defined on all reals, and selects continuous
at a threshold on ``x`` with no flat branch, as leaky_relu and elu), never guessed:
``log`` or ``sqrt``, undefined below zero, and ``x·sigmoid(x)``, not monotonic, stay
where they are.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, Node, consumers, toposort
from backcomp.ops import scalar as sc
from backcomp.ops.elementwise import arg_symbol, node_expr
from backcomp.passes.dce import eliminate_dead_code, roots
from backcomp.passes.fuse import is_elementwise

#: increasing on the whole real line: f(non-decreasing) is non-decreasing
_INCREASING = (sp.exp, sp.tanh, sp.erf, sp.atan, sp.asinh, sc.sigmoid, sc.softplus)


def nondecreasing(expr: sp.Expr, x: sp.Symbol) -> bool:
    """Whether ``expr`` is provably non-decreasing in ``x`` and defined for every real
    value of it (False when unsure)."""
    if x not in expr.free_symbols:
        return True
    if expr == x:
        return True
    if isinstance(expr, (sp.Add, sp.Max, sp.Min, sc.tie_max, sc.tie_min)):
        return all(nondecreasing(a, x) for a in expr.args)
    if isinstance(expr, sp.Mul):
        varying = [a for a in expr.args if x in a.free_symbols]
        constant = [a for a in expr.args if x not in a.free_symbols]
        return len(varying) == 1 and all(a.is_number and a.is_positive for a in constant) \
            and nondecreasing(varying[0], x)
    if isinstance(expr, sp.Pow):
        base, e = expr.args
        return x not in e.free_symbols and e.is_Integer and e > 0 and e % 2 == 1 and nondecreasing(base, x)
    if isinstance(expr, _INCREASING):
        return nondecreasing(expr.args[0], x)
    if isinstance(expr, sp.Piecewise):
        return _nondecreasing_select(expr, x)
    return False


def _nondecreasing_select(expr: sp.Piecewise, x: sp.Symbol) -> bool:
    """A select (leaky_relu, elu) is non-decreasing in ``x`` when its first branch and
    the select of the rest both are, the first condition puts a threshold on ``x`` (a
    linear comparison), and the two agree at that threshold: continuous, no jump down.
    Every branch must vary with ``x``: a flat one (clip's bounds) ties values that ``x``
    does not, and clip's derivative, 1 on its border, would then go to another element
    of the window than the first maximum (the gradient, not the value, would change)."""
    if len(expr.args) < 2:   # no default branch: undefined somewhere
        return False
    (first, cond), rest = expr.args[0], expr.args[1:]
    rest = rest[0].expr if len(rest) == 1 and rest[0].cond == sp.true else sp.Piecewise(*rest)
    if cond == sp.true:
        return nondecreasing(first, x)
    if not isinstance(cond, (sp.StrictGreaterThan, sp.GreaterThan, sp.StrictLessThan, sp.LessThan)):
        return False
    gap = cond.lhs - cond.rhs
    slope = sp.diff(gap, x)
    if not (slope.is_number and slope != 0):
        return False
    threshold = x - gap / slope   # where gap = 0: gap is slope·x + (free of x)
    if x in threshold.free_symbols or x not in first.free_symbols or x not in rest.free_symbols \
            or not (nondecreasing(first, x) and nondecreasing(rest, x)):
        return False
    try:
        return sp.simplify(first.subs(x, threshold) - rest.subs(x, threshold)) == 0
    except (TypeError, ValueError, RecursionError):   # SymPy could not decide: unsure
        return False


def _pooled_operand(f: Node) -> int | None:
    """The position of ``f``'s operand that the pool may take instead of ``f``'s value:
    the only one of ``f``'s full shape, ``f`` non-decreasing in it, every other operand
    of size 1 along the two pooled (spatial) axes."""
    full = [i for i, x in enumerate(f.inputs) if x.shape == f.shape and x.dtype == "float"]
    if len(full) != 1:
        return None
    for i, x in enumerate(f.inputs):   # NumPy aligns shapes from the right: (W,) and (H, W) vary too
        if i != full[0] and (any(d != 1 for d in x.shape[-2:]) or x.dtype != "float"):
            return None
    return full[0] if nondecreasing(node_expr(f), arg_symbol(full[0])) else None


def pool_before_activation(graph: Graph) -> Graph:
    """Graph -> Graph where ``max_pool2d(f(x, c))`` is ``f(max_pool2d(x), c)`` when ``f``
    is elementwise, non-decreasing in ``x``, constant over each window in ``c``, and read
    by the pool alone."""
    g, _ = graph.clone()
    kept = set(roots(g))
    changed = False
    while True:
        users = consumers(g.nodes)
        for pool in g.nodes:
            if pool.op != "max_pool2d":
                continue
            (f,) = pool.inputs
            if not is_elementwise(f) or f in kept or len(users[f]) != 1 or f.dtype != "float":
                continue
            i = _pooled_operand(f)
            if i is not None:
                break
        else:
            break
        with g.scoped(pool.scope or pool.name, pool.origin):
            pooled = g.apply("max_pool2d", (f.inputs[i],), **pool.attrs)
            inputs = list(f.inputs)
            inputs[i] = pooled
            moved = g.apply(f.op, tuple(inputs), **f.attrs)
        moved.name, pool.name = pool.name, None
        g.replace_uses({pool: moved})
        g.nodes = toposort(g.nodes)
        g = eliminate_dead_code(g)
        kept = set(roots(g))
        changed = True
    return g if changed else graph
