"""Forward mode: push tangents through a graph with each op's JVP rule.

The mirror of ``vjp.py``.  Visiting nodes in topological order, a node's tangent is
its op's JVP rule applied to the tangents of its inputs (None where an input has
none: a zero that is never materialised); rules build registered ops, so tangents
are IR like everything else, optimised by the same passes and differentiable again.
Tangents always have their node's exact shape.  Only nodes that depend on a seed and
that some target needs get a tangent.

``jvp_graph`` builds what a generated module's ``jvp`` computes (the forward outputs
and their tangents, seeded at every param and float input); ``hvp_graph`` is
forward-over-reverse: the JVP of the backward graph, seeded at the wrt params, whose
tangents of the gradients are the Hessian of the loss times the seed.
"""
from __future__ import annotations

from typing import Iterable

from backcomp.graph import Graph, GraphError, Node, ancestors
from backcomp.ops import broadcast_to
from backcomp.ops.registry import get_op

LEAVES = ("input", "param")
TANGENT = "tangent"   # third element of a tangent node's origin: (node, None, "tangent")


def push_tangents(g: Graph, seeds: dict[Node, Node], targets: Iterable[Node]) -> dict[Node, Node]:
    """Append to ``g`` (in place) the tangent of every node between ``seeds`` (node ->
    its tangent) and ``targets``; return node -> tangent for the nodes that have one."""
    for node, t in seeds.items():
        if t.shape != node.shape:
            raise GraphError(f"the tangent of {node!r} has shape {t.shape}, not {node.shape}")
    needed = ancestors(targets)
    tangents = dict(seeds)
    for node in list(g.nodes):   # a snapshot: the tangent nodes appended are not visited
        if node in tangents or node not in needed or node.op in LEAVES:
            continue
        ins = [tangents.get(x) for x in node.inputs]
        if all(t is None for t in ins):
            continue
        opdef = get_op(node.op)
        if opdef.jvp is None:
            if opdef.no_derivative or opdef.vjp is None:
                continue   # no derivative by definition (comparisons, constants, stop_gradient)
            raise GraphError(f"op '{node.op}' has a VJP rule but no JVP rule: forward mode and second "
                             f"derivatives through it need OpDef(jvp=...)")
        label = node.name or node.scope
        with g.scoped(scope=f"{label}_dot" if label else None, origin=(node, None, TANGENT)):
            t = opdef.jvp(node, ins)
            if t is not None and t.shape != node.shape:
                t = broadcast_to(t, node.shape)
        if t is not None:
            tangents[node] = t
            g.tangents.setdefault(node, t)
    return tangents


def tangent_leaf(g: Graph, value: Node) -> Node:
    """A leaf holding the tangent of ``value`` (a param or input), named ``<value>_dot``.

    It is bound by the generated ``jvp``/``hvp`` from their tangent argument, not by
    ``_validate``: it is not one of the model's inputs.
    """
    base = name = f"{value.name}_dot"
    k = 2
    while g.lookup(name) is not None:
        name, k = f"{base}{k}", k + 1
    leaf = Node("input", (), {}, value.shape, "float", g, len(g.nodes))
    g.nodes.append(leaf)
    g.assign_name(name, leaf)
    g.tangent_inputs[value.name] = leaf
    g.tangents[value] = leaf
    return leaf


def _zeros(g: Graph, node: Node) -> Node:
    with g.scoped(scope=f"{node.name}_dot" if node.name else None):
        return g.apply("zeros_like", (node,))


def jvp_graph(graph: Graph) -> Graph:
    """The forward outputs and their tangents, seeded at every param and float input.

    ``graph`` is a forward graph (after ``prepare_forward``); the result's
    ``tangent_inputs`` are keyed by param/input name and its ``tangent_outputs`` by
    output name (a zeros node for an output that depends on no tangent).
    """
    g, _ = graph.clone()
    g.grads, g.cotangents = {}, {}
    outputs = g.forward_outputs()
    leaves = [n for n in (*g.params.values(), *g.inputs.values()) if n.dtype == "float"]
    seeds = {leaf: tangent_leaf(g, leaf) for leaf in leaves}
    tangents = push_tangents(g, seeds, outputs.values())
    g.tangent_outputs = {k: tangents[v] if v in tangents else _zeros(g, v) for k, v in outputs.items()}
    return g


def hvp_graph(differentiated: Graph) -> Graph:
    """Forward-over-reverse: the tangent of each gradient of ``differentiated`` (a graph
    the VJP pass filled) seeded at the wrt params, i.e. H·v with v the seeds.

    The result returns only these tangents (``tangent_outputs``, keyed by param): the
    loss, outputs and gradients are no longer roots, so DCE and fusion treat them as
    ordinary intermediates.
    """
    g, _ = differentiated.clone()
    grads = dict(g.grads)
    seeds = {g.params[p]: tangent_leaf(g, g.params[p]) for p in grads}
    tangents = push_tangents(g, seeds, grads.values())
    g.tangent_outputs = {p: tangents[n] if n in tangents else _zeros(g, g.params[p]) for p, n in grads.items()}
    g.loss_node, g.outputs, g.grads = None, {}, {}
    return g
