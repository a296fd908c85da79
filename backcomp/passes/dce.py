"""Dead-code elimination: keep what the module's functions can reach."""
from __future__ import annotations

from backcomp.graph import Graph, Node, ancestors


def roots(graph: Graph) -> list[Node]:
    """What the generated functions return: outputs, the loss, the gradients and tangents."""
    out = list(graph.forward_outputs().values()) if (graph.outputs or graph.loss_node) else []
    if graph.loss_node is not None:
        out.append(graph.loss_node)
    return out + list(graph.grads.values()) + list(graph.tangent_outputs.values()) + list(graph.effects)


def eliminate_dead_code(graph: Graph) -> Graph:
    """Graph -> Graph without nodes no root depends on (inputs and params stay)."""
    g, _ = graph.clone()
    live = ancestors(roots(g))
    g.nodes = [n for n in g.nodes if n in live or n.op in ("input", "param")]
    g.cotangents = {k: v for k, v in g.cotangents.items() if v in live}  # keys may be gone
    g.tangents = {k: v for k, v in g.tangents.items() if v in live}
    for i, n in enumerate(g.nodes):
        n.id = i
    return g
