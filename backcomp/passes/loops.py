"""Loop passes: merge a scan into the scan that extends it, and optimise step graphs.

The VJP and JVP of a scan build a second forward scan that computes the same outputs
and more (the residuals the backward reads, or the tangents): ``merge_scans`` points
the projections of the first at the second, so the loop runs once.  ``optimize_steps``
runs the ordinary passes (fusion, CSE, DCE) on every step graph, so a step's
elementwise work becomes one or two fused statements inside the loop.
"""
from __future__ import annotations

from backcomp.graph import Graph, Node
from backcomp.loops import Step
from backcomp.passes.dce import eliminate_dead_code
from backcomp.passes.reductions import _toposort

_OPTIMIZED: dict[str, Step] = {}


def merge_scans(graph: Graph) -> Graph:
    """Graph -> Graph where a scan that another extends is replaced by it."""
    g, _ = graph.clone()
    bases = [n for n in g.nodes if n.op == "scan" and "extends" not in n.attrs]
    replaced: dict[Node, tuple[Node, tuple]] = {}
    for n in g.nodes:
        if n.op != "scan" or "extends" not in n.attrs:
            continue
        base_repr, index_map = n.attrs["extends"]
        for base in bases:
            if repr(base.attrs["step"]) == base_repr and base not in replaced \
                    and base.attrs.get("reverse", False) == n.attrs.get("reverse", False) and _same_prefix(base, n):
                replaced[base] = (n, index_map)
                break
    if not replaced:
        return g
    for n in g.nodes:
        if n.op == "scan_out" and n.inputs[0] in replaced:
            ext, index_map = replaced[n.inputs[0]]
            n.inputs = (ext,)
            n.attrs = dict(n.attrs, index=index_map[n.attrs["index"]])
    g.nodes = _toposort(g.nodes)   # the extension was built later than the readers it now feeds
    return eliminate_dead_code(g)


def _same_prefix(base: Node, ext: Node) -> bool:
    """Whether ``ext`` reads ``base``'s inputs where ``base``'s step reads them (the JVP
    scan interleaves tangents: its inputs are checked by position of each leaf group)."""
    from backcomp.loops import Step
    b: Step = base.attrs["step"]
    e: Step = ext.attrs["step"]
    c, x, k = b.counts()
    ec, ex, ek = e.counts()
    groups_b = (base.inputs[:c], base.inputs[c:c + x], base.inputs[c + x:])
    groups_e = (ext.inputs[:ec], ext.inputs[ec:ec + ex], ext.inputs[ec + ex:])
    return all(ge[:len(gb)] == gb for gb, ge in zip(groups_b, groups_e))


def optimize_step(step: Step) -> Step:
    """The step after the -O1 passes (memoised by structure)."""
    from backcomp.passes import optimize
    key = repr(step)
    if key not in _OPTIMIZED:
        from backcomp.passes.hoist import concatenate_scatters
        _OPTIMIZED[key] = step.rebuild(concatenate_scatters(optimize(step.as_graph())))
    return _OPTIMIZED[key]


def optimize_steps(graph: Graph) -> Graph:
    """Graph -> Graph whose scans run optimised steps."""
    g, _ = graph.clone()
    for n in g.nodes:
        if n.op == "scan":
            n.attrs = dict(n.attrs, step=optimize_step(n.attrs["step"]))
            n.attrs.pop("extends", None)
    return g


def optimize_loops(graph: Graph) -> Graph:
    """The loop passes of ``optimize``: merge, then optimise each step."""
    if not any(n.op == "scan" for n in graph.nodes):
        return graph
    from backcomp.passes.hoist import hoist_loops
    return hoist_loops(optimize_steps(merge_scans(graph)))
