"""Take work that does not depend on the carry out of a loop: before it, or after it.

Inside a step, a node that does not depend on the carries can be computed for every
step at once (jax's partial evaluation of a scan into "known" and "unknown" parts):

- *hoisted* before the loop: nodes of the slices and consts (``x_t @ Wx + b``) become
  one batched computation over the time-major sequence — one (T·B, D) @ (D, 4H) GEMM
  instead of T small ones — and the loop reads its slice ``[t]``; nodes of the consts
  alone (``Wh.T``) are computed once;
- *sunk* after the loop: nodes the new carries do not need (in a backward step, the
  params' gradient terms ``h_tᵀ ḡ_z[t]`` and the slices' cotangents ``ḡ_z[t] Wxᵀ``) are
  computed after it from the per-step values they read, which the loop stores; a sum over
  the steps of ``a_tᵀ b_t`` becomes one contraction over (T·B).

Both use *batching rules*: the same op applied to values with a leading T axis, which
each op declares in its ``OpDef`` (``batched``; elementwise ops share one here).  Ops
without a rule stay in the loop.
"""
from __future__ import annotations

from backcomp.graph import Graph, Node, ShapeError, multiply_dims, toposort
from backcomp.loops import Step, length_attrs, new_leaf, scan_length
from backcomp.ops.registry import OpDef, get_op
from backcomp.passes.dce import eliminate_dead_code


# ----- batching rules: the op over a leading T axis ----------------------------------------
def _elementwise(g: Graph, n: Node, ins: list[Node], batched: list[bool], length) -> Node:
    """Elementwise ops without a rule of their own: NumPy broadcasts, once the step axes line up."""
    fixed = []
    for x, b, orig in zip(ins, batched, n.inputs):
        if b and orig.ndim < n.ndim:   # align the step axes before NumPy broadcasts
            x = g.apply("reshape", (x,), shape=(x.shape[0],) + (1,) * (n.ndim - orig.ndim) + orig.shape)
        fixed.append(x)
    return g.apply(n.op, fixed, **n.attrs)


def _rule(opdef: OpDef):
    """The op's batching rule (``OpDef.batched``), the shared one of elementwise ops, or None."""
    return opdef.batched or (_elementwise if opdef.elementwise else None)


def batchable(n: Node) -> bool:
    if n.op in ("input", "param"):
        return False
    opdef = get_op(n.op)
    return _rule(opdef) is not None and (opdef.batchable is None or opdef.batchable(n))


def batch(g: Graph, n: Node, ins: list[Node], batched: list[bool], length) -> Node:
    """``n``'s op applied to ``ins``, those marked ``batched`` with a leading axis of ``length``."""
    return _rule(get_op(n.op))(g, n, ins, batched, length)


# ----- the pass ---------------------------------------------------------------------------
def hoist_loops(graph: Graph) -> Graph:
    """Graph -> Graph where each scan's carry-independent work runs before or after its loop."""
    g, _ = graph.clone()
    changed = False
    for node in [n for n in g.nodes if n.op == "scan"]:
        changed |= _hoist_one(g, node)
    if not changed:
        return g
    g.nodes = toposort(g.nodes)
    return eliminate_dead_code(g)


def _hoist_one(g: Graph, node: Node) -> bool:
    step: Step = node.attrs["step"]
    sg = step.graph
    c, x, k = step.counts()
    oc, oy, os_ = step.out_counts()
    carry, xs, consts = step.carry, step.xs, step.consts
    length = scan_length(node)
    outer_of = {leaf: v for leaf, v in zip(step.leaves, node.inputs)}
    dep_carry: set[Node] = set(carry)
    dep_x: set[Node] = set(xs)
    for n in sg.nodes:
        if any(i in dep_carry for i in n.inputs):
            dep_carry.add(n)
        if any(i in dep_x for i in n.inputs):
            dep_x.add(n)
    body = [n for n in sg.nodes if n.op not in ("input", "param")]
    # before the loop: consts alone (once), slices and consts (batched)
    invariant: set[Node] = set()
    pre: set[Node] = set()
    from backcomp.ops.random import draws
    for n in body:
        if n in dep_carry or n.op == "scan" or draws(n):   # noise is drawn afresh each step
            continue
        inputs_ok = all(i in consts or i in xs or i in invariant or i in pre for i in n.inputs)
        if not inputs_ok:
            continue
        if n not in dep_x:
            if n.dtype != "tuple":
                invariant.add(n)
        elif batchable(n) and (n.op != "concatenate" or all(i in xs or i in pre for i in n.inputs)):
            pre.add(n)
    # after the loop: what the new carries do not need
    need: set[Node] = set()
    stack = list(step.carry_out)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(n.inputs)
    post: set[Node] = set()
    for n in body:
        if n.op == "sum_to" and n in step.sums and n not in step.ys and n not in need:
            post.add(n)   # Σ_t sum_to(a_t) is sum_to of the stacked a: one reduction after the loop
            continue
        if n in need or n in pre or n in invariant or not batchable(n) or any(i.dtype == "tuple" for i in n.inputs):
            continue
        if n.op == "concatenate" and any(i in consts or i in invariant for i in n.inputs):
            continue
        post.add(n)
    # only what some output of the post part reads is worth sinking
    keep_post: set[Node] = set()
    stack = [v for v in step.ys + step.sums if v in post]
    while stack:
        n = stack.pop()
        if n in keep_post or n not in post:
            continue
        keep_post.add(n)
        stack.extend(n.inputs)
    post = keep_post
    while True:   # a value a loop statement reads stays in the loop
        inside = [n for n in body if n not in post and n not in pre and n not in invariant]
        read = {i for n in inside for i in n.inputs} | {v for v in step.carry_out}
        drop = post & read
        if not drop:
            break
        post -= drop
    # loop values the post part reads are stacked by the loop (slices and consts are outside)
    outside = set(xs) | set(consts) | pre | invariant | post
    stored = [n for n in sg.nodes if n not in outside and any(n in u.inputs for u in post)]
    in_loop = [n for n in body if n not in outside]
    hoisted_used = [n for n in sg.nodes if n in pre or n in invariant
                    if any(n in u.inputs for u in in_loop) or (n in step.outputs and n not in post)]
    if not (pre or post or any(get_op(n.op).memory != "view" for n in invariant)):
        return False

    # the outer computations: hoisted (batched / once), then the loop, then the sunk part
    value: dict[Node, Node] = {}      # step node -> outer node (batched if it varies)
    is_batched: dict[Node, bool] = {}
    for leaf in consts:
        value[leaf], is_batched[leaf] = outer_of[leaf], False
    for leaf in xs:
        value[leaf], is_batched[leaf] = outer_of[leaf], True
    with g.scoped(scope=node.name or node.scope):
        for n in sg.nodes:
            if n in invariant or n in pre:
                ins = [value[i] for i in n.inputs]
                flags = [is_batched[i] for i in n.inputs]
                value[n] = batch(g, n, ins, flags, length) if any(flags) else g.apply(n.op, ins, **n.attrs)
                is_batched[n] = any(flags)
                value[n].name = None
    # the new step: hoisted values are slices (batched) or consts (once)
    new = Graph(sg.name, dims=dict(sg.dims))
    m: dict[Node, Node] = {}
    for leaf in carry:
        m[leaf] = new_leaf(new, leaf.shape, leaf.dtype, leaf.name)
    for leaf in xs:
        m[leaf] = new_leaf(new, leaf.shape, leaf.dtype, leaf.name)
    extra_xs = [n for n in hoisted_used if is_batched.get(n)]
    for n in extra_xs:
        m[n] = new_leaf(new, n.shape, n.dtype, n.name or (f"{n.scope}_{n.op}" if n.scope else None))
    for leaf in consts:
        m[leaf] = new_leaf(new, leaf.shape, leaf.dtype, leaf.name)
    extra_consts = [n for n in hoisted_used if not is_batched.get(n)]
    for n in extra_consts:
        m[n] = new_leaf(new, n.shape, n.dtype, n.name or (f"{n.scope}_{n.op}" if n.scope else None))
    for n in sg.nodes:
        if n in m or n in pre or n in invariant or n in post or n.op == "input":
            continue
        new_n = Node(n.op, tuple(m[i] for i in n.inputs), dict(n.attrs), n.shape, n.dtype, new, len(new.nodes),
                     None, n.scope, n.origin)
        new.nodes.append(new_n)
        if n.name is not None and new.lookup(n.name) is None:
            new.assign_name(n.name, new_n)
        m[n] = new_n
    new.cotangents = {a: m[b] for a, b in sg.cotangents.items() if b in m}
    kept_ys = [v for v in step.ys if v not in post]
    kept_sums = [v for v in step.sums if v not in post]
    leaves = [m[n] for n in carry] + [m[n] for n in xs] + [m[n] for n in extra_xs] + \
        [m[n] for n in consts] + [m[n] for n in extra_consts]
    outs = [m[v] for v in step.carry_out] + [m[v] for v in kept_ys] + [m[n] for n in stored] + [m[v] for v in kept_sums]
    new.inputs = {f"l{i}": leaf for i, leaf in enumerate(leaves)}
    new.outputs = {f"o{i}": o for i, o in enumerate(outs)}
    new_step = Step(new, tuple(m[n] for n in carry), tuple(m[n] for n in xs) + tuple(m[n] for n in extra_xs),
                    tuple(m[n] for n in consts) + tuple(m[n] for n in extra_consts),
                    tuple(m[v] for v in step.carry_out), tuple(m[v] for v in kept_ys) + tuple(m[n] for n in stored),
                    tuple(m[v] for v in kept_sums))
    inputs = list(node.inputs[:c + x]) + [value[n] for n in extra_xs] + list(node.inputs[c + x:]) + \
        [value[n] for n in extra_consts]
    loop = g.apply("scan", inputs, step=new_step, reverse=node.attrs.get("reverse", False),
                   **length_attrs(length, len(new_step.xs)), **{k: v for k, v in node.attrs.items() if k == "stream"})
    loop.name, loop.scope, loop.origin = node.name, node.scope, node.origin

    def out(i: int) -> Node:
        p = g.apply("scan_out", (loop,), index=i)
        p.scope, p.origin = node.scope, node.origin
        return p
    for i, n in enumerate(stored):
        value[n], is_batched[n] = out(oc + len(kept_ys) + i), True
        if n.name:
            value[n].name = f"{n.name}_seq"
    # after the loop: the sunk nodes, batched over the stored values
    sums_value: dict[Node, Node] = {}
    with g.scoped(scope=node.scope, origin=node.origin):
        for n in sg.nodes:
            if n not in post:
                continue
            if n in step.sums and n not in step.ys and (_contraction(n) or n.op == "sum_to"):
                continue
            ins = [value[i] for i in n.inputs]
            flags = [is_batched[i] for i in n.inputs]
            value[n] = batch(g, n, ins, flags, length) if any(flags) else g.apply(n.op, ins, **n.attrs)
            is_batched[n] = any(flags)
        for v in step.sums:
            if v in post:
                sums_value[v] = _sum_over_steps(g, v, value, is_batched, length)
    # the old projections read the new loop, the hoisted or the sunk values
    replace: dict[Node, Node] = {}
    for p in [n for n in g.nodes if n.op == "scan_out" and n.inputs[0] is node]:
        i = p.attrs["index"]
        if i < oc:
            r = out(i)
        elif i < oc + oy:
            y = step.ys[i - oc]
            if y in post or y in pre or y in invariant or y in xs or y in consts:
                r = value[y] if is_batched.get(y) else g.apply("broadcast_to", (value[y],), shape=p.shape)
            else:
                r = out(oc + kept_ys.index(y))
        else:
            s = step.sums[i - oc - oy]
            r = sums_value[s] if s in post else out(oc + len(kept_ys) + len(stored) + kept_sums.index(s))
        if r.shape != p.shape:
            raise ShapeError(f"internal error: hoisting changed {p!r} to {r!r}")
        if p.name and r.name is None:
            r.name = p.name
        replace[p] = r
    g.replace_uses(replace)
    return True


def _contraction(n: Node) -> bool:
    """``a_tᵀ @ b_t`` summed over the steps: computed as one (T·M) contraction instead."""
    if n.op != "matmul" or n.ndim != 2:
        return False
    a, b = n.inputs
    return a.op == "transpose" and a.inputs[0].ndim == 2 and b.ndim == 2


def _sum_over_steps(g: Graph, v: Node, value, is_batched, length) -> Node:
    """Σ_t v_t from the batched values: a contraction for ``a_tᵀ b_t``, else a sum over T."""
    from backcomp.ops import sum_to
    if _contraction(v):
        a, b = v.inputs[0].inputs[0], v.inputs[1]
        va, vb = value[a], value[b]
        if is_batched[a] and is_batched[b]:
            rows = multiply_dims(length, a.shape[0])
            fa = g.apply("reshape", (va,), shape=(rows, a.shape[1]))
            fb = g.apply("reshape", (vb,), shape=(rows, b.shape[1]))
            return g.apply("matmul", (g.apply("transpose", (fa,), axes=(1, 0)), fb))
        value[v] = batch(g, v, [value[x] for x in v.inputs], [is_batched[x] for x in v.inputs], length)
        is_batched[v] = True
    if v.op == "sum_to":
        (a,) = v.inputs
        if is_batched[a]:
            return sum_to(value[a], v.shape)
        value[v] = g.apply(v.op, (value[a],), **v.attrs)
        is_batched[v] = False
    if not is_batched.get(v):   # the same value at every step
        from backcomp.ops.elementwise import dim_value
        return value[v] * dim_value(length)
    return sum_to(value[v], v.shape)


# ----- gate cotangents: a sum of scatters that tile an axis is a concatenation ------------------
def _tile(s: Node) -> tuple[int, int, int] | None:
    """(axis, start, stop) of a scatter writing one slice of one axis, else None."""
    index = s.attrs["index"]
    if Ellipsis in index or None in index:
        return None
    cut = [(i, item) for i, item in enumerate(index) if item != slice(None)]
    if len(cut) != 1 or not isinstance(cut[0][1], slice) or cut[0][1].step not in (None, 1):
        return None
    axis, sl = cut[0]
    size = s.shape[axis]
    if not isinstance(size, int):
        return None
    start, stop, _ = sl.indices(size)
    return axis, start, stop


def concatenate_scatters(graph: Graph) -> Graph:
    """Graph -> Graph where ``scatter(a, [:, :H]) + scatter(b, [:, H:2H]) + ...`` covering an
    axis exactly becomes ``concatenate((a, b, ...))``: the cotangent of gates sliced from
    one pre-activation is written once instead of as zeros plus additions.  A scatter
    may feed several such sums (a GRU's r and z gates reach both x_t @ Wx and h @ Wh):
    each becomes its own concatenation, so long as no other node reads the scatter."""
    import sympy as sp

    from backcomp.graph import consumers
    from backcomp.ops.elementwise import arg_symbol, node_expr
    g, _ = graph.clone()
    users = consumers(g.nodes)
    roots = set(g.outputs.values())

    def is_sum(n: Node) -> bool:
        return n.op != "input" and get_op(n.op).elementwise and len(n.inputs) >= 2 and \
            node_expr(n) == sp.Add(*(arg_symbol(i) for i in range(len(n.inputs))))

    def terms(n: Node, tree: set[Node]) -> list[Node]:
        """The addends of a tree of sums (``(a + b) + c`` as the VJP pass accumulates);
        the sums themselves are added to ``tree``."""
        tree.add(n)
        out = []
        for x in n.inputs:
            inner = is_sum(x) and len(users[x]) == 1 and x not in roots
            out.extend(terms(x, tree) if inner else [x])
        return out

    tilings: dict[Node, tuple[int, list[Node]]] = {}   # sum -> (axis, its scatters in order)
    trees: dict[Node, set[Node]] = {}                    # sum -> the sums it is made of
    inner_sums = {x for n in g.nodes if is_sum(n) for x in n.inputs
                  if is_sum(x) and len(users[x]) == 1 and x not in roots}
    for n in list(g.nodes):
        if not is_sum(n) or n in inner_sums:
            continue
        parts = []
        trees[n] = set()
        for x in terms(n, trees[n]):
            tile = _tile(x) if x.op == "scatter" and x.shape == n.shape and x not in roots else None
            if tile is None:
                break
            parts.append((tile, x))
        else:
            axes = {t[0] for t, _ in parts}
            if len(axes) != 1:
                continue
            parts.sort(key=lambda p: p[0][1])
            bounds = [(t[1], t[2]) for t, _ in parts]
            axis = axes.pop()
            if bounds[0][0] != 0 or bounds[-1][1] != n.shape[axis] or \
                    any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
                continue
            tilings[n] = (axis, [x for _, x in parts])
    while True:   # a scatter that something else reads stays a scatter, and so do its sums
        kept = set().union(*(trees[n] for n in tilings))
        drop = [n for n, (_, xs) in tilings.items() if any(set(users[x]) - kept for x in xs)]
        if not drop:
            break
        for n in drop:
            del tilings[n]
    if not tilings:
        return g
    replace: dict[Node, Node] = {}
    for n, (axis, xs) in tilings.items():
        with g.scoped(n.scope, n.origin):
            replace[n] = g.apply("concatenate", tuple(x.inputs[0] for x in xs), axis=axis)
    g.replace_uses(replace)
    g.nodes = toposort(g.nodes)
    return eliminate_dead_code(g)
