"""The reverse pass: append the backward of ``loss`` w.r.t. the wrt params.

Graph form of backpropagation: visiting nodes in reverse topological order, the
cotangent of a node is the sum over its consumers, δ^l = Σ_{i∈O^l} δ^i ∂α^i/∂α^l.
Each op's VJP rule (from the registry) turns a node's cotangent into cotangents
for its inputs; broadcasting is undone here, once, by ``sum_to``.  Only nodes on
a path from a wrt param to the loss are differentiated.
"""
from __future__ import annotations

from backcomp.graph import Graph, GraphError, Node, ancestors, broadcast_shapes, format_shape
from backcomp.ops import add, broadcast_to, sum_to
from backcomp.ops.registry import get_op

LEAVES = ("input", "param")


def _on_path(graph: Graph, loss: Node, wrt: list[Node]) -> set[Node]:
    """Nodes that depend on some wrt param and that the loss depends on."""
    reach = set(wrt)
    for node in graph.nodes:
        if node.inputs and get_op(node.op).vjp is not None and any(x in reach for x in node.inputs):
            reach.add(node)
    return reach & ancestors([loss])


def fit_cotangent(ct: Node, shape) -> Node:
    """Bring a cotangent to something that broadcasts to ``shape``.

    Axes where the cotangent is larger (the input was broadcast) are summed;
    axes where it is smaller stay small: cotangents are *lazy*, and only rules
    that need the exact shape get them materialised (``broadcast_to``).
    """
    if broadcast_shapes(ct.shape, shape) == shape:
        return ct
    lead = max(ct.ndim - len(shape), 0)
    body = ct.shape[lead:]
    aligned = shape[len(shape) - len(body):]
    return sum_to(ct, tuple(1 if a == 1 and d != 1 else d for d, a in zip(body, aligned)))


def backpropagate(g: Graph, y: Node, wrt: list[Node]) -> dict[Node, Node]:
    """Append the backward of the scalar ``y`` to ``g`` (in place) and return the
    cotangent of every node on a path from a ``wrt`` node to ``y``.

    The cotangents of ``wrt`` nodes are not propagated further: they are what was
    asked for.  A returned cotangent may be smaller than its node where the op
    accepts a lazy one (it broadcasts to the node); leaves get their exact shape.
    """
    needed = _on_path(g, y, wrt)
    stop = set(wrt)
    forward = [n for n in g.nodes if n in needed]
    cotangents: dict[Node, Node] = {}
    with g.scoped(scope=f"{y.name or y.scope}_bar" if (y.name or y.scope) else None, origin=(y, None)):
        seed = g.apply("ones_like", (y,))
    pending: dict[Node, list[Node]] = {y: [seed]}
    for node in reversed(forward):
        parts = pending.pop(node, [])
        if not parts:
            continue
        scope = f"{node.name or node.scope}_bar" if (node.name or node.scope) else None
        with g.scoped(scope=scope, origin=(node, None)):
            if node.dtype == "tuple" and len(parts) > 1:   # a loop: one cotangent per output it has
                ct = g.apply("tuple_ct_sum", tuple(parts))
            else:
                ct = parts[0]
                for part in parts[1:]:
                    ct = add(ct, part)
        opdef = get_op(node.op) if node.op not in LEAVES else None
        if ct.shape != node.shape and (opdef is None or not opdef.broadcast_ct):
            with g.scoped(scope=scope, origin=(node, None)):
                ct = broadcast_to(ct, node.shape)
        cotangents[node] = ct
        if opdef is None or node in stop:
            continue
        with g.scoped(scope=scope, origin=(node, None)):
            in_cts = list(opdef.vjp(node, ct))
        for i, (x, c) in enumerate(zip(node.inputs, in_cts)):
            if c is None or x not in needed:
                continue
            with g.scoped(scope=scope, origin=(node, x)):
                if opdef.elementwise and x.shape != node.shape and c.shape != node.shape:
                    # x was broadcast by this node: a lazy cotangent must first take the
                    # node's full shape, or summing it would miss the repeated copies
                    c = broadcast_to(c, node.shape)
                c = fit_cotangent(c, x.shape)
            if c.origin == (node, None) and c is not ct:
                c.origin = (node, x)
            pending.setdefault(x, []).append(c)
    return cotangents


def differentiate(graph: Graph) -> Graph:
    """Graph -> Graph with ``grads[p]`` (and ``cotangents[node]``) filled in."""
    if graph.loss_node is None:
        raise GraphError(f"model '{graph.name}' has no loss to differentiate")
    g, _ = graph.clone()
    unknown = [p for p in g.wrt_params() if p not in g.params]
    if unknown:
        raise GraphError(f"wrt names unknown params: {', '.join(unknown)}")
    wrt = [g.params[p] for p in g.wrt_params()]
    g.cotangents.update(backpropagate(g, g.loss_node, wrt))
    for p, node in zip(g.wrt_params(), wrt):
        if node in g.cotangents:
            g.grads[p] = g.cotangents[node]
        else:  # the loss does not depend on p: its gradient is exactly zero
            with g.scoped(scope=f"{p}_bar", origin=(node, None)):
                g.grads[p] = g.apply("zeros_like", (node,))
    return g


def grad(y: Node, x: Node) -> Node:
    """∂y/∂x as a node of y's graph (shape of ``x``): the backward of the scalar ``y``
    built in place from the same VJP rules, so it is an ordinary node that may be
    differentiated again, optimised and explained (``grad(sum(grad(sum(u), x)), x)``)."""
    if not isinstance(y, Node) or not isinstance(x, Node):
        raise GraphError("grad(y, x) takes two arrays: a scalar y and the value x to differentiate by")
    if y.graph is not x.graph:
        raise GraphError(f"grad: y and x belong to different graphs ('{y.graph.name}', '{x.graph.name}')")
    if y.shape != ():
        raise GraphError(f"grad: y must be a scalar (wrap it in sum() or mean()), but has shape "
                         f"{format_shape(y.shape)}")
    if y.dtype != "float" or x.dtype != "float":
        which = "y" if y.dtype != "float" else f"x ('{x.name}')" if x.name else "x"
        raise GraphError(f"grad: {which} must be a float value; integer and boolean values have no gradient")
    g = y.graph
    ct = backpropagate(g, y, [x]).get(x)
    with g.scoped(origin=(x, None)):
        if ct is None:   # y does not depend on x: the gradient is exactly zero
            ct = g.apply("zeros_like", (x,))
        elif ct.shape != x.shape:
            ct = broadcast_to(ct, x.shape)
    g.grad_of.setdefault(ct, (y, x))
    return ct
