"""Keep what the backward needs from the forward: transcendental residuals.

The VJP of an elementwise node reuses the node's own output (tanh' = 1 − tanh²),
but not a function call *inside* it: for GELU, x·Φ(x), the derivative Φ(x) + x·φ(x)
calls erf again, and for swish, u·σ(u), the sigmoid.  This pass, run before
differentiation, gives each such call a node of its own (and its argument, when
the expression also reads that: z in z·Φ(z)), so that the forward computes it once
and the backward reads it.  ``forward`` alone then runs two or three statements
where it ran one, with the same number of transcendental calls.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, Node, toposort
from backcomp.ops.elementwise import arg_symbol, ew_from_expr, node_expr
from backcomp.ops.scalar import fix_step_convention, sigmoid, softplus
from backcomp.passes.fuse import is_elementwise

#: calls worth keeping: each costs far more than reading a stored array
TRANSCENDENTAL = (sp.erf, sp.exp, sp.tanh, sp.log, sigmoid, softplus, sp.sin, sp.cos)


def _residuals(node: Node) -> list[sp.Expr]:
    """Calls strictly inside ``node``'s expression that a derivative would compute again."""
    expr = node_expr(node)
    args = {arg_symbol(i) for i in range(len(node.inputs))}
    calls = sorted((f for f in expr.atoms(*TRANSCENDENTAL) if f != expr and f.free_symbols & args),
                   key=lambda f: (sp.count_ops(f), sp.default_sort_key(f)))   # inner calls first
    if not calls:
        return []
    derivatives = [fix_step_convention(sp.diff(expr, arg_symbol(i)))
                   for i, x in enumerate(node.inputs) if x.dtype == "float"]
    return [f for f in calls if any(d.has(f) for d in derivatives)]


def _shared_argument(expr: sp.Expr, f: sp.Expr) -> sp.Expr | None:
    """What of call ``f``'s argument ``expr`` also reads outside the call, to be kept
    rather than recomputed: the argument up to constant factors (z in erf(z/√2)), else
    one of its factors (z in tanh(c·z·(1 + k·z²)), the tanh GELU).  Only call-free
    values: in nested chains, rebuilding the calls around them is where SymPy's
    evaluation takes seconds."""
    outside = expr.xreplace({f: sp.Dummy(real=True)})
    core = sp.Mul(*[a for a in sp.Mul.make_args(f.args[0]) if not a.is_number])
    for part in dict.fromkeys((core, *sp.Mul.make_args(core))):
        if not part.is_Symbol and not part.is_number and not part.has(*TRANSCENDENTAL) and outside.has(part):
            return part
    return None


def keep_residuals(graph: Graph) -> Graph:
    """Graph -> Graph where transcendental calls the backward reuses are nodes of their own."""
    g, _ = graph.clone()
    changed = False
    for node in list(g.nodes):
        if not is_elementwise(node) or node.dtype != "float":
            continue
        calls = _residuals(node)
        if not calls:
            continue
        bindings = {arg_symbol(i): x for i, x in enumerate(node.inputs)}
        expr = node_expr(node)
        inputs = list(node.inputs)
        def bind(value: sp.Expr, label: str) -> sp.Symbol:
            """``value`` as a node of its own, an input of ``node``: its symbol there."""
            kept = ew_from_expr(value, bindings, label=label)
            if kept not in inputs:
                inputs.append(kept)
            symbol = arg_symbol(inputs.index(kept))
            bindings[symbol] = kept
            return symbol

        done: dict[sp.Expr, sp.Symbol] = {}   # what is kept so far, rewritten in later calls too
        with g.scoped(node.scope or node.name, node.origin):
            for f in calls:
                f = f.xreplace(done)   # tanh(n + σ(r)·h) reads the σ(r) kept before it
                core = _shared_argument(expr, f)
                if core is not None:
                    pre = bind(core, "arg")
                    expr, f, done[core] = expr.xreplace({core: pre}), f.xreplace({core: pre}), pre
                done[f] = bind(f, type(f).__name__)
                expr = expr.xreplace({f: done[f]})
        label = node.attrs.get("label", node.op) if node.op == "ew" else node.op
        node.op, node.inputs, node.attrs = "ew", tuple(inputs), {"expr": expr, "label": label}
        changed = True
    if changed:
        g.nodes = toposort(g.nodes)
    return g
