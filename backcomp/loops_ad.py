"""Derivatives of loops: the VJP of a scan is a reversed scan, its JVP a scan of the JVP.

VJP (backpropagation through time), as jax's ``_scan_transpose``:
1. the step is differentiated by the ordinary VJP pass, seeded with one cotangent
   leaf per output (``Σ sum(out ⊙ ḡ_out)``), and optimised together with the forward;
2. the joint graph is cut in two: the backward part (what depends on a cotangent)
   and the forward part.  Forward values the backward reads and that change from step
   to step are *residuals*: the forward scan stores them, one (T, ...) array each, as
   extra stacked outputs (so the forward scan is replaced by one that *extends* it);
   values of the consts alone are recomputed (the hoisting pass takes them out of the
   loop);
3. the backward step runs in reverse: its carry is the carries' cotangent
   (ḡ_h[t-1] = ∂h[t]/∂h[t-1]ᵀ ḡ_h[t] + ...), its slices are the residuals, the
   outputs' cotangents and the sequences, and it *sums* the consts' cotangents over
   the steps (the params' gradients accumulate in place).

JVP: one scan over (carry, tangent of the carry) of the step's JVP (``push_tangents``
on the step graph), which recomputes the primal outputs beside their tangents.
"""
from __future__ import annotations

from backcomp.graph import Graph, GraphError, Node
from backcomp.loops import Step, length_attrs, new_leaf, out_kind, output_cotangents, scan_length  # noqa: F401

#: (step fingerprint, mask) -> plan: steps are immutable, so plans are shared
_VJP_PLANS: dict = {}
_JVP_PLANS: dict = {}


def extract(src: Graph, name: str, leaves: list[Node], leaf_names: list[str | None],
            outs: list[Node]) -> tuple[Graph, list[Node], list[Node]]:
    """A new graph computing ``outs`` of ``src`` from ``leaves`` (nodes of ``src`` that
    become leaves: the values are given, not recomputed)."""
    g = Graph(name, dims=dict(src.dims))
    m: dict[Node, Node] = {}
    for n, label in zip(leaves, leaf_names):
        if n not in m:
            m[n] = new_leaf(g, n.shape, n.dtype, label)
    seen: set[Node] = set()
    stack = list(outs)
    while stack:
        n = stack.pop()
        if n in seen or n in m:
            continue
        seen.add(n)
        stack.extend(n.inputs)
    for n in src.nodes:
        if n not in seen or n in m:
            continue
        if n.op in ("input", "param"):
            raise GraphError(f"internal error: step '{src.name}' reads leaf {n!r} that was not given")
        new = Node(n.op, tuple(m[i] for i in n.inputs), dict(n.attrs), n.shape, n.dtype, g, len(g.nodes),
                   None, n.scope, n.origin)
        g.nodes.append(new)
        if n.name is not None and g.lookup(n.name) is None:
            g.assign_name(n.name, new)
        m[n] = new
    g.cotangents = {k: m[v] for k, v in src.cotangents.items() if v in m}
    return g, [m[n] for n in leaves], [m[n] for n in outs]


def _recomputable(n: Node) -> bool:
    """Views (a transpose, a slice) are free to recompute from what they view: the
    backward stores the viewed value, not the view."""
    from backcomp.ops.registry import get_op
    return n.op not in ("input", "param", "scan_out") and get_op(n.op).memory == "view"


def _label(names: dict[Node, str], n: Node) -> str:
    return names[n].lstrip("_") or "v"


def vjp_plan(step: Step, mask: tuple[bool, ...]):
    """The forward step with residual outputs, and the backward step, for a scan whose
    outputs have a cotangent where ``mask`` says so (carries always do)."""
    key = (repr(step), mask)
    if key not in _VJP_PLANS:
        _VJP_PLANS[key] = _vjp_plan(step, mask)
    return _VJP_PLANS[key]


def _vjp_plan(step: Step, mask: tuple[bool, ...]):
    from backcomp.codegen import assign_names
    from backcomp.ops import sum as op_sum
    from backcomp.passes import optimize, prepare_forward
    from backcomp.passes.hoist import concatenate_scatters
    from backcomp.passes.loops import merge_sliced_elementwise
    from backcomp.vjp import backpropagate
    c, x, k = step.counts()
    oc, oy, os_ = step.out_counts()
    J = merge_sliced_elementwise(prepare_forward(step.as_graph()))
    leaves = [J.inputs[f"l{i}"] for i in range(c + x + k)]
    outs = [J.outputs[f"o{i}"] for i in range(oc + oy + os_)]
    ct_leaves: dict[int, Node] = {}
    terms = []
    for i, o in enumerate(outs):
        if not mask[i]:
            continue
        kind, j = out_kind(step, i)
        base = o.name or (leaves[i].name if kind == "carry" else None) or f"{kind[0]}{j}"
        leaf = new_leaf(J, o.shape, "float", f"{base}_bar" if kind != "ys" else f"{base}_bar_t")
        J.inputs[f"c{i}"] = leaf
        ct_leaves[i] = leaf
        terms.append(op_sum(o * leaf))
    if not terms:
        raise GraphError("internal error: a scan's VJP without any cotangent")
    seed = terms[0]
    for t in terms[1:]:
        seed = seed + t
    wrt = [leaf for leaf in leaves if leaf.dtype == "float"]
    cts = backpropagate(J, seed, wrt)
    J.cotangents.update({n: v for n, v in cts.items() if n.op != "input"})
    for i, leaf in enumerate(leaves):
        if leaf in cts:
            J.outputs[f"b{i}"] = cts[leaf]
    J = optimize(concatenate_scatters(J))
    leaves = [J.inputs[f"l{i}"] for i in range(c + x + k)]
    outs = [J.outputs[f"o{i}"] for i in range(oc + oy + os_)]
    ct_leaves = {i: J.inputs[f"c{i}"] for i in ct_leaves}
    leaf_cts = {i: J.outputs[f"b{i}"] for i in range(c + x + k) if f"b{i}" in J.outputs}

    # cut: backward nodes depend on a cotangent leaf; residuals are the forward values
    # they read that vary from step to step (carries, slices and what depends on them)
    from backcomp.ops.random import draws
    backward = set(ct_leaves.values())
    varying = set(leaves[:c + x])
    for n in J.nodes:
        if any(i in backward for i in n.inputs):
            backward.add(n)
        if any(i in varying for i in n.inputs) or draws(n):   # noise is stored, never drawn again
            varying.add(n)
    residuals: list[Node] = []
    used_xs: set[Node] = set()
    used_consts: set[Node] = set()
    seen: set[Node] = set()
    stack = list(leaf_cts.values())
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in backward:
            stack.extend(n.inputs)
        elif n in leaves[c:c + x]:
            used_xs.add(n)
        elif n in leaves[c + x:]:
            used_consts.add(n)
        elif n in varying and not _recomputable(n):
            residuals.append(n)
        else:   # a value of the consts alone: recomputed (and hoisted out of the loop)
            stack.extend(n.inputs)
    order = {n: i for i, n in enumerate(J.nodes)}
    residuals.sort(key=order.__getitem__)
    names = assign_names(J)
    ys_nodes = outs[oc:oc + oy]
    stored = [n for n in residuals if n not in ys_nodes]   # a per-step output is stored already

    # the forward step, storing the residuals as extra stacked outputs
    leaf_names = [n.name for n in leaves]
    gF, fl, fo = extract(J, step.name, leaves, leaf_names, outs + stored)
    fwd = Step(gF, tuple(fl[:c]), tuple(fl[c:c + x]), tuple(fl[c + x:]),
               tuple(fo[:oc]), tuple(fo[oc:oc + oy]) + tuple(fo[oc + oy + os_:]), tuple(fo[oc + oy:oc + oy + os_]))

    # the backward step
    xs_used = [n for n in leaves[c:c + x] if n in used_xs]
    consts_used = [n for n in leaves[c + x:] if n in used_consts]
    ys_ct = [i for i in range(oc, oc + oy) if i in ct_leaves]
    sums_ct = [i for i in range(oc + oy, oc + oy + os_) if i in ct_leaves]
    b_carry = [ct_leaves[i] for i in range(oc)]
    b_xs = residuals + [ct_leaves[i] for i in ys_ct] + xs_used
    b_consts = consts_used + [ct_leaves[i] for i in sums_ct]
    carry_cts = [leaf_cts.get(i) for i in range(c)]
    xs_ct = [i for i in range(c, c + x) if i in leaf_cts]
    consts_ct = [i for i in range(c + x, c + x + k) if i in leaf_cts]
    b_leaves = b_carry + b_xs + b_consts
    b_names = [_label(names, n) if n in residuals else n.name for n in b_leaves]
    roots = [v for v in carry_cts if v is not None] + [leaf_cts[i] for i in xs_ct + consts_ct]
    gB, bl, bo = extract(J, f"{step.name}_vjp", b_leaves, b_names, roots)
    mapped = iter(bo)
    b_carry_out = []
    for i, v in enumerate(carry_cts):
        if v is None:   # the carry affects nothing: its cotangent is zero
            with gB.scoped(scope=f"{leaves[i].name or 'carry'}_bar"):
                b_carry_out.append(gB.apply("zeros_like", (bl[i],)))
        else:
            b_carry_out.append(next(mapped))
    rest = list(mapped)
    nb_c, nb_x = len(b_carry), len(b_xs)
    bwd = Step(gB, tuple(bl[:nb_c]), tuple(bl[nb_c:nb_c + nb_x]), tuple(bl[nb_c + nb_x:]),
               tuple(b_carry_out), tuple(rest[:len(xs_ct)]), tuple(rest[len(xs_ct):]))
    source = [("ys", ys_nodes.index(n)) if n in ys_nodes else ("res", stored.index(n)) for n in residuals]
    layout = {"n_res": len(stored), "res_names": [_label(names, n) for n in stored], "res_source": source,
              "ys_ct": ys_ct, "sums_ct": sums_ct,
              "xs_used": [leaves.index(n) - c for n in xs_used],
              "consts_used": [leaves.index(n) - c - x for n in consts_used],
              "xs_ct": [i - c for i in xs_ct], "consts_ct": [i - c - x for i in consts_ct]}
    return fwd, bwd, layout


def scan_vjp(node: Node, ct: Node) -> list[Node | None]:
    """The cotangents of a scan's inputs: a forward scan that stores the residuals (it
    extends ``node``, which the loop pass then replaces by it) and a reversed scan."""
    step: Step = node.attrs["step"]
    g = node.graph
    reverse = node.attrs.get("reverse", False)
    c, x, k = step.counts()
    oc, oy, os_ = step.out_counts()
    cts = output_cotangents(ct, len(step.outputs))
    mask = tuple(i < oc or v is not None for i, v in enumerate(cts))
    fwd, bwd, lay = vjp_plan(step, mask)
    n_res = lay["n_res"]
    index_map = tuple(range(oc + oy)) + tuple(oc + oy + n_res + j for j in range(os_))
    res_node = g.apply("scan", node.inputs, step=fwd, reverse=reverse, extends=(repr(step), index_map),
                       **length_attrs(scan_length(node), x), **_stream_of(node))
    res_node.origin = None   # the forward loop itself, not a backward statement
    res_node.name, res_node.scope = node.name, node.scope   # it replaces the node (a variable name only)
    stored = []
    for r in range(n_res):
        p = g.apply("scan_out", (res_node,), index=oc + oy + r)
        p.name = f"{lay['res_names'][r]}_seq"   # a variable name only: not one of the model's names
        p.origin = None
        stored.append(p)
    residuals = [stored[i] if kind == "res" else g.apply("scan_out", (res_node,), index=oc + i)
                 for kind, i in lay["res_source"]]
    inits = []
    for i in range(oc):
        if cts[i] is None:
            with g.scoped(scope=f"{step.carry[i].name or 'carry'}_bar"):
                inits.append(g.apply("zeros_like", (node.inputs[i],)))
        else:
            inits.append(cts[i])
    b_xs = residuals + [cts[i] for i in lay["ys_ct"]] + [node.inputs[c + j] for j in lay["xs_used"]]
    b_consts = [node.inputs[c + x + j] for j in lay["consts_used"]] + [cts[i] for i in lay["sums_ct"]]
    # a backward that reads no per-step value (h_new = 2 h + x_t) has no sequence: its length is the forward's
    back = g.apply("scan", (*inits, *b_xs, *b_consts), step=bwd, reverse=not reverse,
                   **length_attrs(scan_length(node), len(b_xs)))
    out: list[Node | None] = [None] * len(node.inputs)
    for i in range(c):
        out[i] = g.apply("scan_out", (back,), index=i)
    for pos, j in enumerate(lay["xs_ct"]):
        out[c + j] = g.apply("scan_out", (back,), index=c + pos)
    for pos, j in enumerate(lay["consts_ct"]):
        out[c + x + j] = g.apply("scan_out", (back,), index=c + len(lay["xs_ct"]) + pos)
    return out


# ----- forward mode ---------------------------------------------------------------------
def jvp_plan(step: Step, mask: tuple[bool, ...]) -> Step:
    """The step over (values, tangents) computing (outputs, their tangents); ``mask``
    says which xs and consts have a tangent (every carry has one)."""
    key = (repr(step), mask)
    if key not in _JVP_PLANS:
        _JVP_PLANS[key] = _jvp_plan(step, mask)
    return _JVP_PLANS[key]


def _jvp_plan(step: Step, mask: tuple[bool, ...]) -> Step:
    from backcomp.jvp import push_tangents
    c, x, k = step.counts()
    g = step.as_graph()
    leaves = [g.inputs[f"l{i}"] for i in range(c + x + k)]
    outs = [g.outputs[f"o{i}"] for i in range(len(step.outputs))]
    dots = {}
    for i, leaf in enumerate(leaves):
        if mask[i]:
            dots[leaf] = new_leaf(g, leaf.shape, "float", f"{leaf.name}_dot" if leaf.name else None)
    tangents = push_tangents(g, dots, outs)
    out_dots = []
    for o in outs:
        t = tangents.get(o)
        if t is None:
            with g.scoped(scope=f"{o.name or 'out'}_dot"):
                t = g.apply("zeros_like", (o,))
        out_dots.append(t)
    oc, oy, os_ = step.out_counts()
    d = [dots[leaf] for leaf in leaves if leaf in dots]
    dc = [dots[leaf] for leaf in leaves[:c]]
    dx = [dots[leaf] for leaf in leaves[c:c + x] if leaf in dots]
    dk = [dots[leaf] for leaf in leaves[c + x:] if leaf in dots]
    assert len(d) == len(dc) + len(dx) + len(dk)
    leaves_new = leaves[:c] + dc + leaves[c:c + x] + dx + leaves[c + x:] + dk
    outs_new = outs[:oc] + out_dots[:oc] + outs[oc:oc + oy] + out_dots[oc:oc + oy] + outs[oc + oy:] + out_dots[oc + oy:]
    g.inputs = {f"l{i}": n for i, n in enumerate(leaves_new)}
    g.outputs = {f"o{i}": n for i, n in enumerate(outs_new)}
    return Step(g, tuple(leaves[:c] + dc), tuple(leaves[c:c + x] + dx), tuple(leaves[c + x:] + dk),
                tuple(outs[:oc] + out_dots[:oc]), tuple(outs[oc:oc + oy] + out_dots[oc:oc + oy]),
                tuple(outs[oc + oy:] + out_dots[oc + oy:]))


def scan_jvp(node: Node, tangents) -> Node | None:
    """The JVP scan (a tuple of the outputs and their tangents), or None when no input has a tangent."""
    step: Step = node.attrs["step"]
    if all(t is None for t in tangents):
        return None
    g = node.graph
    c, x, k = step.counts()
    oc, oy, os_ = step.out_counts()
    mask = tuple(True if i < c else t is not None for i, t in enumerate(tangents))
    jstep = jvp_plan(step, mask)
    t_carry = []
    for i in range(c):
        if tangents[i] is None:
            t_carry.append(g.apply("zeros_like", (node.inputs[i],)))
        else:
            t_carry.append(tangents[i])
    ins = node.inputs
    inputs = (list(ins[:c]) + t_carry + list(ins[c:c + x]) + [t for t in tangents[c:c + x] if t is not None]
              + list(ins[c + x:]) + [t for t in tangents[c + x:] if t is not None])
    index_map = tuple(range(oc)) + tuple(2 * oc + j for j in range(oy)) + tuple(2 * oc + 2 * oy + j for j in range(os_))
    return g.apply("scan", inputs, step=jstep, reverse=node.attrs.get("reverse", False),
                   extends=(repr(step), index_map), **length_attrs(scan_length(node), x), **_stream_of(node))


def _stream_of(node: Node) -> dict:
    """A scan's random stream, for a scan that recomputes its step (the forward storing
    residuals, the JVP): the same noise at each step."""
    return {"stream": node.attrs["stream"]} if "stream" in node.attrs else {}


def scan_out_jvp(node: Node, tangents) -> Node | None:
    """The tangent of one output: the matching tangent output of the JVP scan."""
    (t,) = tangents
    if t is None:
        return None
    base: Step = node.inputs[0].attrs["step"]
    oc, oy, os_ = base.out_counts()
    kind, j = out_kind(base, node.attrs["index"])
    index = {"carry": oc + j, "ys": 2 * oc + oy + j, "sums": 2 * oc + 2 * oy + os_ + j}[kind]
    return node.graph.apply("scan_out", (t,), index=index)
