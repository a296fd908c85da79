"""``backcomp explain`` for models with loops: each step's VJPs and the carries' recurrence.

A step is explained as a small model of its own: its leaves (carries, slices, model
values) are the differentiated values and each output o is seeded with its cotangent
ḡ_o, so every line shows the step's VJPs in the user's names.  Then the recurrence
that backpropagation through time runs, from the last step to the first:

    ḡ_h_new[t] = ḡ_h[t+1] + ḡ_ys0[t]        (the next step's carry, this step's output)
    ḡ_h[t] = ḡ_z[t] · Whᵀ                   (the step's VJP w.r.t. its carry)
    ḡ_Wh = Σ_t (hᵀ · ḡ_z)[t]                (model values: summed over the steps)
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Graph, Node, format_shape
from backcomp.loops import Step

BAR = "ḡ_"


def loop_lines(node: Node) -> bool:
    """Whether a named node's line is made of a loop (a scan or one of its outputs)."""
    return node.op in ("scan", "scan_out")


def leaf_names(step: Step) -> list[str]:
    """The names the step's leaves are explained under (a captured value may have none)."""
    return [leaf.name or f"v{i}" for i, leaf in enumerate(step.leaves)]


def _output_names(step: Step) -> dict[Node, str]:
    """A name for each output the step computes: its own, else ``<carry>_new`` for a new
    carry and ``y<j>`` for a per-step output (a builder's step may name nothing, and
    its block would show no line)."""
    taken = {n.name for n in step.graph.nodes if n.name} | set(leaf_names(step))
    names: dict[Node, str] = {}
    leaves = set(step.leaves)
    for k, o in enumerate(step.carry_out + step.ys):
        if o is None or o in names or o in leaves:
            continue
        base = o.name or (f"{leaf_names(step)[k]}_new" if k < len(step.carry_out) else f"y{k - len(step.carry_out)}")
        name, i = base, 2
        while name in taken and name != o.name:
            name, i = f"{base}_{i}", i + 1
        names[o] = name
        taken.add(name)
    return names


def _step_model(step: Step) -> tuple[Graph, dict[Node, str]]:
    from backcomp.ops import sum as op_sum
    g = Graph(step.name, dims=dict(step.graph.dims))
    m: dict[Node, Node] = {}
    label: dict[Node, str] = {}
    outputs = _output_names(step)
    for leaf, name in zip(step.leaves, leaf_names(step)):
        kind = "param" if leaf.dtype == "float" else "input"
        m[leaf] = g._leaf(kind, name, leaf.shape, leaf.dtype)
        (g.params if kind == "param" else g.inputs)[name] = m[leaf]
        label[leaf] = name
    for n in step.graph.nodes:
        if n in m:
            continue
        m[n] = g.apply(n.op, [m[i] for i in n.inputs], **dict(n.attrs))
        name = outputs.get(n, n.name)
        if name is not None and g.lookup(name) is None:
            m[n] = g.assign_name(name, m[n])
    seed = None
    for k, o in enumerate(step.carry_out + step.ys):
        kind = "carry" if k < len(step.carry_out) else "ys"
        name = f"{outputs.get(o, o.name) or f'out{k}'}_ct" if kind == "carry" else f"ys{k - len(step.carry_out)}_ct"
        base, i = name, 2
        while g.lookup(name) is not None:   # one value returned as two carries: a seed each
            name, i = f"{base}{i}", i + 1
        s = g._leaf("input", name, o.shape, "float")
        g.inputs[name] = s
        term = op_sum(m[o] * s)
        seed = term if seed is None else seed + term
    g.loss(seed, "step_seed")
    return g, {m[k]: v for k, v in label.items()}


def explain_step(run: Node, fmt, caller: str | None = None, captures: dict | None = None) -> list[str]:
    """The lines of the step of scan node ``run`` (shown on the line ``caller``): the
    values it reads under names of its own (``captures``: v2 = tanh(W)), its nodes, their
    VJPs, and the recurrence across steps.  ``h[t]`` is the carry into
    step t; a reverse scan's next step is t-1, its first T-1, and its backward runs
    t = 0, ..., T-1 (T: the number of steps, written out when the scan has a fixed
    ``length``)."""
    from backcomp.explain import derive
    from backcomp.loops import scan_length
    step: Step = run.attrs["step"]
    caller, steps = caller or run.name or "scan", scan_length(run)
    model, _ = _step_model(step)
    maths, consumers = derive(model)
    carries = [c.name for c in step.carry]
    slices = [x.name for x in step.xs]
    lines = [f"step {step.name} (carry {', '.join(carries)}; {'slices ' + ', '.join(slices) if slices else 'no slices'}), "
             f"run by {caller}, at step t:"]
    for leaf, value in (captures or {}).items():
        lines.append(f"    {leaf} = {fmt(value)}    # read at every step")
    for m in maths:
        if m.name == "step_seed":
            continue
        note = m.shape if isinstance(m.shape, str) else f"shape {format_shape(m.shape)}"   # a nested loop's outputs
        lines.append(f"    {m.name} = {fmt(m.forward)}    # {note}")
        for v, term in m.vjps.items():
            acc = "+=" if len(consumers.get(v, [])) > 1 else "="
            lines.append(f"        {BAR}{v} {acc} {fmt(term)}")
    last = f"{steps - 1}" if isinstance(steps, int) else f"{steps}-1"
    order, nxt, first, after = (f"0, ..., {last}", "t-1", last, "-1") if run.attrs.get("reverse") else \
        (f"{last}, ..., 0", "t+1", "0", str(steps))
    lines.append(f"  across the steps (backpropagation through time, t = {order}):")
    called = dict(zip(step.leaves, leaf_names(step)))
    names = _output_names(step)
    into: dict[Node, list[str]] = {}   # each output: the cotangents it gets from outside the step
    for leaf, out in zip(step.carry, step.carry_out):
        into.setdefault(out, []).append(f"{BAR}{called[leaf]}[{nxt}]")
    for j, y in enumerate(step.ys):
        into.setdefault(y, []).append(f"{BAR}ys{j}[t]")
    for out, terms in into.items():
        if out not in called:   # a leaf returned as it is: its line below adds them
            lines.append(f"    {BAR}{names[out]}[t] = {' + '.join(terms)}")
    for leaf in step.carry:
        terms = [f"({fmt(t)})[t]" for t in _terms(maths, called[leaf])] + into.get(leaf, [])
        lines.append(f"    {BAR}{called[leaf]}[t] = {' + '.join(terms) or '0'}")
    for leaf in step.consts:
        terms = [f"({fmt(t)})[t]" for t in _terms(maths, called[leaf])] + into.get(leaf, [])
        if terms and leaf.dtype == "float":
            lines.append(f"    {BAR}{called[leaf]}[t] = {' + '.join(terms)}    (summed on {caller}'s line)")
    lines.append(f"  and {caller}'s arguments and outputs:")
    for j, y in enumerate(step.ys):
        lines.append(f"    {BAR}ys{j}[t] = {BAR}{caller}.ys[{j}][t]")
    for j, leaf in enumerate(step.carry):
        lines.append(f"    {BAR}{called[leaf]}[{after}] = {BAR}{caller}.carry[{j}]    (the carry after the last step)")
    for j, leaf in enumerate(step.carry):
        lines.append(f"    {BAR}{caller}.init[{j}] = {BAR}{called[leaf]}[{first}]    (the carry into the first step)")
    for j, leaf in enumerate(step.xs):
        if leaf.dtype == "float":
            lines.append(f"    {BAR}{caller}.xs[{j}][t] = {' + '.join([f'{BAR}{called[leaf]}[t]'] + into.get(leaf, []))}")
    return lines


def _terms(maths, name: str) -> list[sp.Expr]:
    return [m.vjps[name] for m in maths if name in m.vjps and m.name != "step_seed"]


def steps_of(graph: Graph) -> list[tuple[Node, str]]:
    """Every scan node and the name of its line, nested ones after (a scan inside a
    step as the step's block names it): each gets its step's block, since the block
    names the scan and its direction and length (a step run by two scans shows twice)."""
    from backcomp.explain import line_names
    out: list[tuple[Node, str]] = []
    names = line_names(graph)
    stack = [(n, names[n]) for n in graph.nodes if n.op == "scan"]
    while stack:
        run, caller = stack.pop(0)
        out.append((run, caller))
        model, _ = _step_model(run.attrs["step"])
        names = line_names(model)
        stack += [(n, names[n]) for n in model.nodes if n.op == "scan"]
    return out


def loop_math(node: Node, lines: dict[Node, str]) -> str:
    """The forward text of a named node made of a loop's output: run.ys[j] (a scan's own
    line is ``explain._scan_math``)."""
    x = node
    while x.op not in ("scan_out",) and x.inputs:
        x = x.inputs[0]
    step = x.inputs[0].attrs["step"]
    from backcomp.loops import out_kind
    kind, j = out_kind(step, x.attrs["index"])
    return f"{lines.get(x.inputs[0], x.inputs[0].name or 'scan')}.{kind}[{j}]"


def loop_cluster(node: Node, ids: dict[Node, str], escape) -> list[str]:
    """A scan drawn as one cluster holding its step: the loop's inputs feed the step's
    leaves, the new carries loop back to the carries (dashed), the outputs leave it."""
    from backcomp.codegen import assign_names
    step: Step = node.attrs["step"]
    names = assign_names(step.graph)
    base = ids[node]
    local = {n: f"{base}_{i}" for i, n in enumerate(step.graph.nodes)}
    lines = [f"  subgraph cluster_{base} {{",
             f'    label="{escape(f"loop {step.name}: {node.name or ids[node]}")}"; style=rounded; color="#8080c0";']
    for n in step.graph.nodes:
        detail = "" if n.op == "input" else "\\n" + (n.attrs.get("label", n.op) if n.op == "ew" else n.op)
        shape = "box" if n.op == "input" else "ellipse"
        lines.append(f'    {local[n]} [label="{escape(names[n] + detail)}\\n{escape(format_shape(n.shape))}", '
                     f"shape={shape}];")
    for n in step.graph.nodes:
        for x in n.inputs:
            lines.append(f"    {local[x]} -> {local[n]};")
    for leaf, out in zip(step.carry, step.carry_out):
        lines.append(f"    {local[out]} -> {local[leaf]} [style=dashed, constraint=false];")
    lines.append("  }")
    for x, leaf in zip(node.inputs, step.leaves):
        lines.append(f"  {ids[x]} -> {local[leaf]};")
    for out in step.outputs:
        lines.append(f"  {local[out]} -> {base};")
    return lines
