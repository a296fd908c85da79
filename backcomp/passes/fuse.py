"""Elementwise fusion: maximal trees of elementwise nodes become one expression.

A producer is merged into its elementwise consumer when nothing else needs its
value (or when it is a single number, which is free to recompute).  Views that
elementwise broadcasting makes redundant (``broadcast_to``, and reshapes of
single numbers) are looked through, and the loss seed ``ones_like(loss)`` is
replaced by 1.  What is left is one SymPy expression per group, which SymPy
canonicalises (``log(exp(u))`` → ``u``) and the printer emits with CSE; this is
how softmax + cross-entropy's backward becomes (softmax − y)/B.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, GraphError, Node, broadcast_shapes, consumers, static_size, toposort
from backcomp.ops.elementwise import arg_symbol, node_expr, typing_operands
from backcomp.ops.registry import get_op
from backcomp.passes.dce import eliminate_dead_code, roots
from backcomp.printer import value_symbols


#: Fused groups stay small SymPy kernels: the derivative of a chain of n nested
#: functions has O(n²) terms, so unbounded fusion makes compile time quadratic.
MAX_FUSED_OPS = 40


def _size(node: Node) -> int:
    return sp.count_ops(node_expr(node))


def is_elementwise(node: Node) -> bool:
    return node.op not in ("input", "param") and get_op(node.op).elementwise


def _set_expr(node: Node, inputs: list[Node], expr: sp.Expr) -> None:
    label = node.attrs.get("label", node.op) if node.op == "ew" else node.op
    node.op, node.inputs, node.attrs = "ew", tuple(inputs), {"expr": expr, "label": label}


def _substitute(node: Node, old: Node, new_inputs: list[Node], value: sp.Expr) -> None:
    """Replace input ``old`` of ``node`` by ``value`` (an expression over ``new_inputs``)."""
    expr = node_expr(node)
    inputs = [x for x in node.inputs if x is not old]
    for x in new_inputs:
        if x not in inputs:
            inputs.append(x)
    mapping = {arg_symbol(i): arg_symbol(inputs.index(x)) for i, x in enumerate(node.inputs) if x is not old}
    value = value.xreplace({arg_symbol(i): arg_symbol(inputs.index(x)) for i, x in enumerate(new_inputs)})
    mapping.update({arg_symbol(i): value for i, x in enumerate(node.inputs) if x is old})   # every use of old
    _set_expr(node, inputs, expr.xreplace(mapping))


def _shape_without(node: Node, old: Node, extra: list[Node]):
    shapes = [x.shape for x in node.inputs if x is not old] + [x.shape for x in extra]
    return broadcast_shapes(*shapes) if shapes else None


def _typed_without(node: Node, x: Node) -> bool:
    """Whether ``node`` keeps a float operand that gives its value's dtype once ``x``
    is gone (the loss seed ḡ = 1 may be the only one: np.where(p > 0, 0.5, 0) is float64)."""
    return node.dtype != "float" or any(y.dtype == "float" for y in typing_operands(node) if y is not x)


def _fusible(node: Node, x: Node) -> bool:
    """Whether ``x``'s expression may replace its symbol in ``node``'s.

    A comparison is merged only into a select's condition: SymPy refuses a
    relational inside arithmetic (``a * (b > 0.1)``).  A select is not merged into
    a comparison: SymPy folds the comparison into the select's branches, and for a
    select on a boolean operand its rewrite takes the bare condition for "always"
    and drops a branch (``where(c, p, q) > 0.1`` became ``p > 0.1``).
    """
    expr, symbol = node_expr(node), arg_symbol(node.inputs.index(x))
    if x.dtype == "bool" and symbol in value_symbols(expr):
        return False
    compared = any(symbol in r.free_symbols for r in expr.atoms(sp.core.relational.Relational))
    return not (compared and node_expr(x).has(sp.Piecewise))


def _rewrite_one(node: Node, users: dict[Node, list[Node]], protected: set[Node]) -> bool:
    """Apply the first applicable rewrite to one input of ``node``."""
    for x in node.inputs:
        unit = static_size(x.shape) == 1
        if x.op == "ones_like" and unit and _shape_without(node, x, []) == node.shape and _typed_without(node, x):
            _substitute(node, x, [], sp.Integer(1))
        elif x.op in ("broadcast_to", "reshape") and (x.op == "broadcast_to" or static_size(x.shape) == 1) \
                and _shape_without(node, x, [x.inputs[0]]) == node.shape:
            _substitute(node, x, [x.inputs[0]], arg_symbol(0))
        elif is_elementwise(x) and x not in protected:
            if not (len(users[x]) == 1 or unit):
                continue
            if _size(node) + _size(x) > MAX_FUSED_OPS:
                continue
            if _shape_without(node, x, list(x.inputs)) != node.shape or not _fusible(node, x):
                continue
            _substitute(node, x, list(x.inputs), node_expr(x))
        else:
            continue
        users[x] = [u for u in users[x] if u is not node]
        for y in node.inputs:
            if node not in users.setdefault(y, []):
                users[y].append(node)
        return True
    return False


def fuse_elementwise(graph: Graph) -> Graph:
    """Graph -> Graph with elementwise chains merged into single nodes."""
    g, _ = graph.clone()
    protected = set(roots(g)) | set(g.inputs.values()) | set(g.params.values())
    users = consumers(g.nodes)
    for node in g.nodes:
        if is_elementwise(node):
            while _rewrite_one(node, users, protected):
                pass
    _drop_unused_operands(g)
    return eliminate_dead_code(g)


def _drop_unused_operands(g: Graph) -> None:
    """Operands a fused expression no longer reads (``x @ W * 0``, ``x - x``) are dropped,
    so dead-code elimination removes the work that made them: a value folded to a
    number becomes a ``full`` constant of its shape in the model's dtype, and an
    operand that only gave the shape or dtype is kept only when nothing else does."""
    from backcomp.ops.constants import full
    constants: dict[Node, Node] = {}
    for node in g.nodes:
        if not is_elementwise(node) or node.dtype != "float":
            continue
        expr = node_expr(node)
        used = [i for i, x in enumerate(node.inputs) if arg_symbol(i) in expr.free_symbols]
        if len(used) == len(node.inputs):
            continue
        if not used:
            if expr.is_number and expr.is_real and expr.is_finite:
                try:
                    with g.scoped(node.scope or node.name, node.origin):
                        constants[node] = full(node.shape, float(expr), graph=g)
                except GraphError:   # a step's sub-graph has no param to take the dtype from
                    pass
            continue
        shapes = [node.inputs[i].shape for i in used]
        if broadcast_shapes(*shapes) == node.shape and any(x.dtype == "float" for x in typing_operands(node)):
            _set_expr(node, [node.inputs[i] for i in used],
                      expr.xreplace({arg_symbol(i): arg_symbol(k) for k, i in enumerate(used)}))
    if constants:
        for old, new in constants.items():
            if old.name is not None:
                new.name = old.name
        g.replace_uses(constants)
        g.nodes = toposort(g.nodes)
