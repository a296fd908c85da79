"""Loop passes: merge a scan into the scan that extends it, and optimise step graphs.

The VJP and JVP of a scan build a second forward scan that computes the same outputs
and more (the residuals the backward reads, or the tangents): ``merge_scans`` points
the projections of the first at the second, so the loop runs once.  ``optimize_steps``
runs the ordinary passes (fusion, CSE, DCE) on every step graph, so a step's
elementwise work becomes one or two fused statements inside the loop.
``merge_sliced_elementwise`` computes one expression applied to adjacent slices of
the same arrays (an LSTM's input and forget gates) as one statement on the joined slice.
``split_carried_sums`` gives the terms of a fused sum that do not read the carries a
node of their own, so hoisting takes them out of the loop.
"""
from __future__ import annotations

from backcomp.graph import Graph, Node, toposort
from backcomp.loops import Step, scan_length
from backcomp.passes.dce import eliminate_dead_code

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
                    and base.attrs.get("reverse", False) == n.attrs.get("reverse", False) \
                    and base.attrs.get("stream") == n.attrs.get("stream") and _same_prefix(base, n) \
                    and scan_length(base) == scan_length(n):
                replaced[base] = (n, index_map)
                break
    if not replaced:
        return g
    for n in g.nodes:
        if n.op == "scan_out" and n.inputs[0] in replaced:
            ext, index_map = replaced[n.inputs[0]]
            n.inputs = (ext,)
            n.attrs = dict(n.attrs, index=index_map[n.attrs["index"]])
    g.nodes = toposort(g.nodes)   # the extension was built later than the readers it now feeds
    return eliminate_dead_code(g)


def _same_prefix(base: Node, ext: Node) -> bool:
    """Whether ``ext`` reads ``base``'s inputs where ``base``'s step reads them (the JVP
    scan interleaves tangents: its inputs are checked by position of each leaf group)."""
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
        g = optimize(merge_sliced_elementwise(step.as_graph()))
        g = split_carried_sums(g, len(step.carry))
        _OPTIMIZED[key] = step.rebuild(concatenate_scatters(g))
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


# ----- one elementwise statement over adjacent slices ----------------------------------------
def _sliced(n: Node) -> tuple[Node, int, int, int] | None:
    """(base, axis, start, stop) of a getitem taking one step-1 slice of one axis, else None."""
    if n.op != "getitem":
        return None
    (base,) = n.inputs
    index = n.attrs["index"]
    if Ellipsis in index or None in index or len(index) != base.ndim:
        return None
    cut = [(i, item) for i, item in enumerate(index) if item != slice(None)]
    if len(cut) != 1 or not isinstance(cut[0][1], slice) or cut[0][1].step not in (None, 1):
        return None
    axis, sl = cut[0]
    if not isinstance(base.shape[axis], int):
        return None
    start, stop, _ = sl.indices(base.shape[axis])
    return base, axis, start, stop


def _adjacent_pair(g: Graph):
    """Two elementwise nodes with one expression whose inputs are the same arrays sliced
    along one axis, the first's ranges ending where the second's begin; or None."""
    from backcomp.ops.elementwise import node_expr
    from backcomp.ops.registry import get_op
    groups: dict = {}
    for n in g.nodes:
        if n.op in ("input", "param") or not n.inputs or not get_op(n.op).elementwise:
            continue
        cuts = [_sliced(i) for i in n.inputs]
        if any(c is None for c in cuts) or len({c[1:] for c in cuts}) != 1:
            continue
        _, axis, start, stop = cuts[0]
        key = (n.op, node_expr(n), tuple(c[0] for c in cuts), axis, n.dtype)
        groups.setdefault(key, []).append((start, stop, n))
    for key, members in groups.items():
        ends = {start: n for start, _, n in members}
        for start, stop, n in members:
            if stop in ends and ends[stop] is not n:
                return n, ends[stop], key[2], key[3], start
    return None


def merge_sliced_elementwise(graph: Graph) -> Graph:
    """Graph -> Graph where ``f(z[:, a:b])`` and ``f(z[:, b:c])`` (any elementwise ``f``
    over inputs sliced alike) become ``m = f(z[:, a:c])`` read through the views
    ``m[:, :b-a]`` and ``m[:, b-a:]``: one statement instead of two, and a loop stores
    one residual for both.  An LSTM's σ(i) and σ(f), a GRU's σ(r) and σ(z)."""
    from backcomp.ops.slicing import normalize_index
    g, _ = graph.clone()
    changed = False
    while (pair := _adjacent_pair(g)) is not None:
        first, second, bases, axis, start = pair
        mid = start + first.shape[axis]
        stop = mid + second.shape[axis]

        def cut(x: Node, a: int, b: int) -> Node:
            index = tuple(slice(a, b) if i == axis else slice(None) for i in range(x.ndim))
            return g.apply("getitem", (x,), index=normalize_index(index, x.shape))
        with g.scoped(first.scope, first.origin):
            merged = g.apply(first.op, tuple(cut(b, start, stop) for b in bases), **first.attrs)
            views = {first: cut(merged, 0, mid - start), second: cut(merged, mid - start, stop - start)}
        for old, new in views.items():
            new.name, old.name = old.name, None
        g.replace_uses(views)
        g.nodes = toposort(g.nodes)
        g = eliminate_dead_code(g)
        changed = True
    return g if changed else graph


# ----- the carry-free terms of a sum, for hoisting --------------------------------------------
def split_carried_sums(graph: Graph, carried: int) -> Graph:
    """Graph -> Graph (a step's, from ``Step.as_graph``, whose first ``carried`` leaves are
    the carries) where a fused sum whose terms partly do not read the carries has those
    terms as a node of their own: ``x_t @ Wx + h @ Wh + bx + bh`` becomes
    ``h @ Wh + u`` with ``u = x_t @ Wx + bx + bh``, which hoisting computes for all steps
    at once before the loop (one pass over (T, B, 4H)) instead of two additions per step.
    The sum may be inside the node's expression too (an RNN's ``tanh(x_t @ Wx + h @ Wh +
    b)`` becomes ``tanh(h @ Wh + u)``).  A lone slice or const is left in place: there is
    nothing to hoist."""
    import sympy as sp

    from backcomp.ops.elementwise import arg_symbol, ew_from_expr, node_expr
    from backcomp.passes.fuse import _set_expr, is_elementwise
    g, _ = graph.clone()
    reads_carry = {g.inputs[f"l{i}"] for i in range(carried)}
    for n in g.nodes:
        if any(i in reads_carry for i in n.inputs):
            reads_carry.add(n)
    changed = False
    for n in list(g.nodes):
        if n not in reads_carry or not is_elementwise(n) or n.dtype != "float":
            continue
        carried_symbols = {arg_symbol(i) for i, x in enumerate(n.inputs) if x in reads_carry}
        bindings = {arg_symbol(i): x for i, x in enumerate(n.inputs)}
        parts: dict[sp.Symbol, Node] = {}

        def split(e: sp.Basic) -> sp.Basic:
            if isinstance(e, sp.Add) and e.free_symbols & carried_symbols:
                free = sp.Add(*(t for t in e.args if not t.free_symbols & carried_symbols))
                if free != 0 and not free.is_number and not free.is_Symbol:
                    with g.scoped(n.scope or n.name, n.origin):
                        part = ew_from_expr(free, bindings, "add")
                    symbol = sp.Dummy(real=True)
                    parts[symbol] = part
                    return sp.Add(*(split(t) for t in e.args if t.free_symbols & carried_symbols)) + symbol
            return e.func(*[split(a) for a in e.args]) if e.args else e

        expr = split(node_expr(n))
        if not parts:
            continue
        inputs = [x for s, x in bindings.items() if s in expr.free_symbols] + list(parts.values())
        olds = [s for s in bindings if s in expr.free_symbols] + list(parts)
        _set_expr(n, inputs, expr.xreplace({s: arg_symbol(j) for j, s in enumerate(olds)}))
        changed = True
    if not changed:
        return graph
    g.nodes = toposort(g.nodes)
    return g
