"""The reverse pass: append the backward of ``loss`` w.r.t. the wrt params.

Graph form of backpropagation: visiting nodes in reverse topological order, the
cotangent of a node is the sum over its consumers, δ^l = Σ_{i∈O^l} δ^i ∂α^i/∂α^l.
Each op's VJP rule (from the registry) turns a node's cotangent into cotangents
for its inputs; broadcasting is undone here, once, by ``sum_to``.  Only nodes on
a path from a wrt param to the loss are differentiated.
"""
from __future__ import annotations

from backcomp.graph import Graph, GraphError, Node, ancestors, broadcast_shapes
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


def differentiate(graph: Graph) -> Graph:
    """Graph -> Graph with ``grads[p]`` (and ``cotangents[node]``) filled in."""
    if graph.loss_node is None:
        raise GraphError(f"model '{graph.name}' has no loss to differentiate")
    g, _ = graph.clone()
    loss = g.loss_node
    unknown = [p for p in g.wrt_params() if p not in g.params]
    if unknown:
        raise GraphError(f"wrt names unknown params: {', '.join(unknown)}")
    wrt = [g.params[p] for p in g.wrt_params()]
    needed = _on_path(g, loss, wrt)
    forward = [n for n in g.nodes if n in needed]

    with g.scoped(scope=f"{loss.name}_bar", origin=(loss, None)):
        seed = g.apply("ones_like", (loss,))
    pending: dict[Node, list[Node]] = {loss: [seed]}
    for node in reversed(forward):
        parts = pending.pop(node, [])
        if not parts:
            continue
        scope = f"{node.name or node.scope}_bar" if (node.name or node.scope) else None
        with g.scoped(scope=scope, origin=(node, None)):
            ct = parts[0]
            for part in parts[1:]:
                ct = add(ct, part)
        opdef = get_op(node.op) if node.op not in LEAVES else None
        if ct.shape != node.shape and (opdef is None or not opdef.broadcast_ct):
            with g.scoped(scope=scope, origin=(node, None)):
                ct = broadcast_to(ct, node.shape)
        g.cotangents[node] = ct
        if opdef is None:
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

    for p, node in zip(g.wrt_params(), wrt):
        if node in g.cotangents:
            g.grads[p] = g.cotangents[node]
        else:  # the loss does not depend on p: its gradient is exactly zero
            with g.scoped(scope=f"{p}_bar", origin=(node, None)):
                g.grads[p] = g.apply("zeros_like", (node,))
    return g
