"""Read a value the module computes anyway instead of computing it again inside a fusion.

Fusion builds each elementwise group as one expression over its operands, so a
group can contain, as a sub-expression, a value another node holds.  A softmax's
backward, scale·e·(ḡ − s)/Σe, contains the forward's e/Σe: the module divided
again, and since the forward's array had no reader left it was overwritten in place
first.  Here the sub-expression becomes a read of that node: scale·att·(ḡ − s), one
pass fewer (issue 13: a derivative never recomputes what the forward has).

Only values ``value_and_grad`` computes for the loss or the gradients anyway are
read: a forward-only output (σ(z) beside a BCE loss on z) would otherwise be
computed early, into a new array, only to move the work; and in a loop's step,
where the forward's values reach the backward as stored stacks, a value read only
here would become one more stack, so steps are left alone.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, Node, ancestors, consumers, toposort
from backcomp.ops.elementwise import arg_symbol, array_operations, node_expr
from backcomp.passes.dce import eliminate_dead_code
from backcomp.passes.fuse import is_elementwise


def _needed(graph: Graph) -> set[Node]:
    """What value_and_grad (and the jvp/hvp functions) compute: the ancestors of the
    loss, the gradients and the tangent outputs (none in a step's graph, whose roots are
    only its outputs)."""
    roots = ([graph.loss_node] if graph.loss_node is not None else []) + list(graph.grads.values()) \
        + list(graph.tangent_outputs.values())
    return ancestors(roots)


def _candidates(node: Node, users: dict[Node, list[Node]], needed: set[Node]) -> list[Node]:
    """Float elementwise nodes the module computes anyway from operands of ``node``
    only (so none of them depends on ``node``), each doing at least one operation."""
    operands = set(node.inputs)
    found: dict[Node, None] = {}
    for x in node.inputs:
        for f in users.get(x, ()):
            if f is not node and f in needed and f not in operands and is_elementwise(f) \
                    and f.dtype == "float" and set(f.inputs) <= operands and sp.count_ops(node_expr(f)) > 0:
                found[f] = None
    return list(found)


def _replace_exactly(expr: sp.Expr, value: sp.Expr, symbol: sp.Symbol) -> sp.Expr:
    """``expr`` with each sub-tree equal to ``value`` replaced by ``symbol``, and each
    sum or product holding all of ``value``'s terms or factors among its own: what the
    printer would evaluate anyway.  Never SymPy's algebraic ``subs``, which finds
    exp(x) in exp(x/2) and would compute √(eˣ), overflowing where e^(x/2) does not;
    nor a reciprocal 1/v among a product's factors: the printer divides, u/v, where
    u·(1/v) would overflow for a subnormal v."""
    kind = type(value) if isinstance(value, (sp.Add, sp.Mul)) else None
    reciprocal = isinstance(value, sp.Pow) and value.exp.is_negative

    def visit(e: sp.Expr, factor: bool = False) -> sp.Expr:
        if e == value and not (factor and reciprocal):
            return symbol
        if not e.args:
            return e
        if kind is not None and type(e) is kind:
            rest = list(e.args)
            for a in value.args:
                if a not in rest:
                    break
                rest.remove(a)
            else:
                return kind(symbol, *(visit(a, kind is sp.Mul) for a in rest))
        return e.func(*(visit(a, isinstance(e, sp.Mul)) for a in e.args))
    return visit(expr)


def _reading_from(node: Node, f: Node) -> tuple[int, list[Node], sp.Expr] | None:
    """(cost, operands, expression) of ``node`` reading ``f``'s value from ``f`` where
    its expression computes it, when that emits fewer array operations; else None."""
    expr = node_expr(node)
    inputs = list(node.inputs) + [f]
    value = node_expr(f).xreplace({arg_symbol(i): arg_symbol(node.inputs.index(x)) for i, x in enumerate(f.inputs)})
    rewritten = _replace_exactly(expr, value, arg_symbol(len(node.inputs)))
    if rewritten == expr:
        return None
    cost = array_operations(rewritten)
    if cost >= array_operations(expr):
        return None
    read = rewritten.free_symbols
    used = [i for i in range(len(inputs)) if arg_symbol(i) in read]
    return cost, [inputs[i] for i in used], rewritten.xreplace({arg_symbol(i): arg_symbol(k) for k, i in enumerate(used)})


def reuse_values(graph: Graph) -> Graph:
    """Graph -> Graph where a fused expression reads, rather than recomputes, the value
    of a node value_and_grad computes anyway (from operands the expression reads)."""
    g, _ = graph.clone()
    needed = _needed(g)
    if not needed:
        return g
    users = consumers(g.nodes)
    changed = False
    for node in g.nodes:
        if node.op != "ew" or node.dtype != "float":
            continue
        while rewrites := [r for f in _candidates(node, users, needed) if (r := _reading_from(node, f)) is not None]:
            _, inputs, expr = min(rewrites, key=lambda r: r[0])
            for x in node.inputs:
                users[x] = [u for u in users[x] if u is not node]
            node.inputs, node.attrs = tuple(inputs), {**node.attrs, "expr": expr}
            for x in node.inputs:
                users.setdefault(x, []).append(node)
            changed = True
    if not changed:
        return g
    g.nodes = toposort(g.nodes)
    return eliminate_dead_code(g)
