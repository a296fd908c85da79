"""Derivatives as math: each node's forward expression and the VJP of each input.

Built on the same machinery as the compiler.  For a named node N (one line of a
spec's [graph]), its IR nodes are rebuilt in a small graph whose leaves are the
named values N reads, seeded with a symbolic cotangent ḡ_N, and
``backcomp.vjp.differentiate`` derives the cotangent of every leaf from the op
registry's VJP rules (elementwise ones by ``sympy.diff``).  The resulting
backward nodes are read back as one expression per input: elementwise parts as
SymPy expressions (lightly simplified), matmul as ``·``, transposes as ``ᵀ``,
sums over broadcast axes as ``Σ``.  Notation: ḡ_v = ∂loss/∂v, ⊙ the elementwise
product, (u > v) 1 or 0, and ½((u > v) + (u ≥ v)) the step of max(u, v) of two
varying operands (½ at a tie); a value with several consumers accumulates one
``+=`` term from each.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from backcomp import notation
from backcomp.graph import Graph, Node, format_shape
from backcomp.notation import FORMATS, Fmt, lit, opaque
from backcomp.ops import sum as op_sum
from backcomp.ops.elementwise import arg_symbol, node_expr
from backcomp.ops.registry import get_op
from backcomp.ops.scalar import half_step, tie_max
from backcomp.printer import sides, value_symbols
from backcomp.vjp import differentiate
from backcomp.explain_loops import explain_step, leaf_names, loop_cluster, loop_lines, loop_math, steps_of
from backcomp.loops import output_shapes

BAR = "ḡ_"


class _Reader:
    """Reads a backward (or forward) node back as a SymPy expression."""

    def __init__(self, symbols: dict[Node, sp.Expr], scalars: set[sp.Symbol] = frozenset()):
        self.memo: dict[Node, sp.Expr] = dict(symbols)
        self.scalars = scalars

    def __call__(self, node: Node) -> sp.Expr:
        stack = [node]
        while stack:   # iterative, so long chains cannot exhaust the recursion limit
            n = stack[-1]
            if n in self.memo:
                stack.pop()
                continue
            missing = [x for x in n.inputs if x not in self.memo]
            if missing:
                stack.extend(missing)
                continue
            self.memo[n] = self.read(n, [self.memo[x] for x in n.inputs])
            stack.pop()
        return self.memo[node]

    def read(self, n: Node, args: list[sp.Expr]) -> sp.Expr:
        if n.op in ("input", "param"):
            return sp.Symbol(n.name or f"%{n.id}", real=True)
        opdef = get_op(n.op)
        if opdef.elementwise:
            expr = node_expr(n)
            values = value_symbols(expr)
            return expr.xreplace({arg_symbol(i): _as_number(a) if x.dtype == "bool" and arg_symbol(i) in values else a
                                  for i, (x, a) in enumerate(zip(n.inputs, args))})
        if opdef.explain is not None:
            return opdef.explain(n, args, self.scalars)
        return notation.call(n, args)


def _as_number(cond: sp.Basic) -> sp.Expr:
    """A comparison used as a number (``a * (b > 0.1)``) is 1 or 0: SymPy refuses a
    relational inside arithmetic."""
    return sp.Piecewise((1, cond), (0, True))


def _tidy(expr: sp.Expr) -> sp.Expr:
    """Light simplification: collect and factor without rewriting step functions."""
    if sp.count_ops(expr) > 60:
        return expr
    try:
        out = sp.factor_terms(sp.expand(expr, deep=False))
        candidates = [expr, out]
        if not expr.has(sp.Heaviside, half_step, sp.Piecewise, sp.tanh, sp.sin, sp.cos):   # trigsimp: seconds each
            candidates.append(sp.simplify(expr))
        return min(candidates, key=lambda e: (sp.count_ops(e), len(str(e))))
    except Exception:  # noqa: BLE001  (simplification is cosmetic)
        return expr


# ----- printers ------------------------------------------------------------------------------
def _compound(a: sp.Expr) -> bool:
    """Whether ``a`` needs parentheses as the operand of a wrapping format (Fmt.wrap):
    a sum, product or power, or a tensor op that is not atomic."""
    return isinstance(a, (sp.Add, sp.Mul, sp.Pow)) or (
        isinstance(a, sp.Function) and not FORMATS.get(a.func.__name__, Fmt("", "", True)).atom)


class TextPrinter(StrPrinter):
    """Unicode math: ⊙ for elementwise products, · for matmul, σ, ᵀ, Σ."""

    def _print_Function(self, expr):
        fmt = FORMATS.get(expr.func.__name__)
        if fmt is None:
            return super()._print_Function(expr)
        return fmt.text.format(*(f"({self._print(a)})" if fmt.wrap and _compound(a) else self._print(a)
                                 for a in expr.args))

    def _print_Mul(self, expr):
        num, den = sp.fraction(expr)
        if den != 1:
            n = self._print(num) if not isinstance(num, sp.Add) else f"({self._print(num)})"
            d = self._print(den)
            if isinstance(den, (sp.Add, sp.Mul)) or (isinstance(den, sp.Function) and den.func.__name__ in FORMATS and not FORMATS[den.func.__name__].atom):
                d = f"({d})"
            return f"{n}/{d}"
        coeff, rest = expr.as_coeff_Mul()
        factors = sp.Mul.make_args(rest)
        parts = []
        for f in factors:
            s = self._print(f)
            if isinstance(f, sp.Add) or (isinstance(f, sp.Function) and f.func.__name__ in FORMATS and not FORMATS[f.func.__name__].atom):
                s = f"({s})"
            parts.append(s)
        body = " ⊙ ".join(parts)
        if coeff == 1:
            return body
        if coeff == -1:
            return f"-{body}"
        return f"{self._print(coeff)}·{body}"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp == sp.Rational(1, 2):
            return f"√{self._wrap(base)}"
        if exp.is_Number and exp < 0:
            return f"1/{self._wrap(sp.Pow(base, -exp))}"
        return f"{self._wrap(base)}^{self._wrap(exp)}"

    def _wrap(self, e):
        s = self._print(e)
        return f"({s})" if isinstance(e, (sp.Add, sp.Mul, sp.Pow)) or (e.is_Number and e < 0) else s

    def _print_Heaviside(self, expr):
        return f"({self._print(expr.args[0])} > 0)"

    def _print_half_step(self, expr):
        u, v = map(self._print, sides(expr.args[0]))
        return f"½(({u} > {v}) + ({u} ≥ {v}))"

    def _print_sigmoid(self, expr):
        return f"σ({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr):
        out = self._print(expr.args[-1].expr)
        for piece in reversed(expr.args[:-1]):
            out = f"where({self._print(piece.cond)}, {self._print(piece.expr)}, {out})"
        return out

    def _print_Max(self, expr):
        return f"max({', '.join(self._print(a) for a in expr.args)})"

    def _print_Min(self, expr):
        return f"min({', '.join(self._print(a) for a in expr.args)})"

    _print_tie_max, _print_tie_min = _print_Max, _print_Min

    def _print_Float(self, expr):
        return f"{float(expr):g}"

    def _print_Rational(self, expr):
        return f"{expr.p}/{expr.q}"


class MathLatexPrinter(LatexPrinter):
    """LaTeX: sympy.latex for the elementwise parts, templates for tensor ops."""

    def __init__(self):
        super().__init__({"mul_symbol": r" \odot ", "symbol_names": {}})

    def _print_Function(self, expr, exp=None):
        fmt = FORMATS.get(expr.func.__name__)
        if fmt is None:
            return super()._print_Function(expr, exp)
        out = fmt.latex.format(*(rf"\left({self._print(a)}\right)" if fmt.wrap and _compound(a) else self._print(a)
                                 for a in expr.args))
        return f"{{{out}}}^{{{exp}}}" if exp else out

    def _print_Symbol(self, expr, style="plain"):
        if expr.name.startswith(BAR):
            return rf"\bar{{g}}_{{{self._name(expr.name[len(BAR):])}}}"
        return self._name(expr.name)

    @staticmethod
    def _name(name: str) -> str:
        if "_" in name:
            head, _, tail = name.partition("_")
            return rf"{head}_{{\mathrm{{{tail.replace('_', chr(92) + '_')}}}}}"
        return name

    def _print_Heaviside(self, expr, exp=None):
        return rf"\mathbb{{1}}\left[{self._print(expr.args[0])} > 0\right]"

    def _print_half_step(self, expr, exp=None):
        u, v = map(self._print, sides(expr.args[0]))
        tex = rf"\tfrac{{1}}{{2}}\left(\mathbb{{1}}\left[{u} > {v}\right] + \mathbb{{1}}\left[{u} \geq {v}\right]\right)"
        return rf"\left({tex}\right)^{{{exp}}}" if exp else tex

    def _print_tie_max(self, expr, exp=None):
        name = "max" if isinstance(expr, tie_max) else "min"
        tex = rf"\{name}\left({', '.join(self._print(a) for a in expr.args)}\right)"
        return rf"{tex}^{{{exp}}}" if exp else tex

    _print_tie_min = _print_tie_max

    def _print_Float(self, expr):
        return f"{float(expr):g}"


def to_text(expr: sp.Expr) -> str:
    return TextPrinter().doprint(expr)


def to_latex(expr: sp.Expr) -> str:
    return MathLatexPrinter().doprint(expr)


# ----- per-node derivation ---------------------------------------------------------------
@dataclass
class NodeMath:
    """One named node: its forward expression and the VJP term for each input."""
    name: str
    shape: tuple | str   # a scan: its outputs' shapes (``loops.output_shapes``)
    forward: sp.Expr
    vjps: dict[str, sp.Expr] = field(default_factory=dict)   # input name -> its term
    #: a grad(y, x) node: (y as an expression, x's name), shown as ∂y/∂x before its value
    grad: tuple[sp.Expr, str] | None = None
    #: a scan: the values its step reads under names of its own (a builder's ``v2`` for
    #: tanh(W)), as expressions of the graph, which the step's block shows
    captures: dict[str, sp.Expr] = field(default_factory=dict)


def line_names(graph: Graph) -> dict[Node, str]:
    """The nodes that get a line of their own, and the name each is shown under.

    Named nodes (a spec's [graph] lines) keep their names.  In a graph built in
    Python, an unnamed value read in several places gets a line too, named as the
    module names it: written inline it would be repeated at every use, and a chain
    of such values grows exponentially.  So does every scan: its outputs are read
    as ``<its name>.carry[j]`` and its step's block says which scan runs it.
    """
    from backcomp.codegen import assign_names
    users: dict[Node, int] = {}
    for n in graph.nodes:
        for x in set(n.inputs):
            users[x] = users.get(x, 0) + 1
    shared = [n for n in graph.nodes if n.name is None and n.scope is None
              and (users.get(n, 0) > 1 or n.op == "scan")   # a scan: its step's block names it
              and n.op not in ("input", "param", "stop_gradient")]
    names = {n: n.name for n in graph.nodes if n.name is not None}
    generated = assign_names(graph) if shared else {}
    taken = set(names.values())
    for n in shared:
        base = name = generated[n].lstrip("_")   # names may not start with '_'
        k = 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        names[n] = name
        taken.add(name)
    return names


def _named_order(graph: Graph, lines: dict[Node, str]) -> list[Node]:
    return [n for n in graph.nodes if n in lines and n.op not in ("input", "param")]


def _members(graph: Graph, target: Node, lines: dict[Node, str]) -> list[Node]:
    """The IR nodes that make up ``target``'s expression (its scope), in order."""
    want = {target}
    stack = [target]
    while stack:
        n = stack.pop()
        for x in n.inputs:
            if x not in want and x not in lines and not loop_lines(x):   # a loop's output: a value read
                want.add(x)
                stack.append(x)
    return [n for n in graph.nodes if n in want]


def node_math(graph: Graph, target: Node, differentiable: set[int],
              lines: dict[Node, str] | None = None) -> NodeMath:
    """Forward expression of ``target`` and ḡ of each named input it reads.

    ``differentiable`` holds the ids of the nodes the loss depends on; ``lines``
    the names of the nodes shown on lines of their own (``line_names``).
    """
    lines = line_names(graph) if lines is None else lines
    members = _members(graph, target, lines)
    inside = set(members)
    leaves: list[Node] = []
    for n in members:
        for x in n.inputs:
            if x not in inside and x not in leaves:
                leaves.append(x)
    name_of = {leaf: lines.get(leaf, leaf.name or f"v{leaf.id}") for leaf in leaves}
    shown: dict[str, str] = {}   # a loop's output read here: an identifier, shown as run.carry[0]
    for leaf in leaves:
        if leaf not in lines and loop_lines(leaf):
            name_of[leaf] = f"loop{leaf.id}"
            shown[name_of[leaf]] = loop_math(leaf, lines)
    target_name = lines[target]
    local = Graph("explain")
    mapping: dict[Node, Node] = {}
    wrt = []
    for leaf in leaves:
        if leaf.id in differentiable and leaf.dtype == "float":
            m = local._leaf("param", name_of[leaf], leaf.shape, "float")   # symbolic dims allowed here
            local.params[name_of[leaf]] = m
            wrt.append(name_of[leaf])
        else:
            m = local._leaf("input", name_of[leaf], leaf.shape, leaf.dtype)
            local.inputs[m.name] = m
        mapping[leaf] = m
    for n in members:
        mapping[n] = local.apply(n.op, [mapping[x] for x in n.inputs], **dict(n.attrs))
    out = mapping[target]
    names = {m: sp.Symbol(m.name, real=True) for m in mapping.values() if m.op in ("input", "param")}
    forward = _tidy(_softmax(_Reader(names)(out)))
    math = NodeMath(target_name, target.shape, forward)
    if target in graph.grad_of:
        y, x = graph.grad_of[target]
        named = {n: sp.Symbol(name, real=True) for n, name in lines.items()}
        math.grad = (_Reader(named)(y), lines.get(x, x.name or f"v{x.id}"))
    if not wrt or out.dtype != "float" or target.id not in differentiable:
        return _shown_as(math, shown)
    seed = local._leaf("input", BAR + target_name, target.shape, "float")
    local.loss(op_sum(seed * out), "seed")
    local.wrt = tuple(wrt)
    d = differentiate(local)
    symbols = {d.lookup(name): sp.Symbol(name, real=True) for name in [*wrt, *local.inputs]}
    symbols[d.lookup(BAR + target_name)] = sp.Symbol(BAR + target_name, real=True)
    symbols[d.nodes[out.id]] = sp.Symbol(target_name, real=True)
    scalars = {v for k, v in symbols.items() if k is not None and k.shape == ()}
    reader = _Reader({k: v for k, v in symbols.items() if k is not None}, scalars)
    for p in wrt:
        term = _tidy(_softmax(reader(d.grads[p])))
        if term != 0:   # a value read only for its shape (the seed of a grad node)
            math.vjps[p] = term
    return _shown_as(math, shown)


def _shown_as(math: NodeMath, shown: dict[str, str]) -> NodeMath:
    """``math`` with the identifiers of loop outputs written as the loop's (run.carry[0])."""
    if not shown:
        return math
    swap = {sp.Symbol(k, real=True): sp.Symbol(v, real=True) for k, v in shown.items()}
    math.forward = math.forward.xreplace(swap)
    math.vjps = {shown.get(k, k): v.xreplace(swap) for k, v in math.vjps.items()}
    return math


def _stable_lse(expr: sp.Expr) -> sp.Expr:
    """Σ exp(x − sg(m)) is exp(logsumexp(x) − sg(m)): the max-shift is an implementation detail."""
    mapping = {}
    for f in expr.atoms(sp.Function):
        name = f.func.__name__
        if not (name.startswith("Σ") and name in FORMATS and isinstance(f.args[0], sp.exp)):
            continue
        terms = sp.Add.make_args(f.args[0].args[0])
        shifts = [t for t in terms if isinstance(-t, sp.Function) and (-t).func.__name__ == "stop_gradient"]
        if len(shifts) != 1:
            continue
        c = -shifts[0]
        x = f.args[0].args[0] + c
        fmt = FORMATS[name]
        lse = opaque(name.replace("Σ", "logsumexp", 1), fmt.text.replace("Σ", "logsumexp", 1),
                  fmt.latex.replace(r"\sum", lit(r"\operatorname{logsumexp}"), 1), True)(x)
        mapping[f] = sp.exp(lse - c)
    if not mapping:
        return expr
    return sp.powsimp(expr.xreplace(mapping), combine="exp")


def _softmax(expr: sp.Expr) -> sp.Expr:
    """exp(x − logsumexp(x)) reads better as softmax(x)."""
    expr = _stable_lse(expr)
    def is_softmax(e):
        if not isinstance(e, sp.exp):
            return False
        terms = sp.Add.make_args(e.args[0])
        return len(terms) == 2 and any(_is_lse_of(t, terms) for t in terms)

    def to_softmax(e):
        terms = sp.Add.make_args(e.args[0])
        lse = next(t for t in terms if _is_lse_of(t, terms))
        (x,) = (-lse).args
        name = (-lse).func.__name__.replace("logsumexp", "softmax")
        return opaque(name, FORMATS[(-lse).func.__name__].text.replace("logsumexp", "softmax"),
                   FORMATS[(-lse).func.__name__].latex.replace("logsumexp", "softmax"), True)(x)
    return expr.replace(is_softmax, to_softmax)


def _is_lse_of(t, terms) -> bool:
    neg = -t
    if not (isinstance(neg, sp.Function) and neg.func.__name__.startswith("logsumexp")):
        return False
    return any(o == neg.args[0] for o in terms if o is not t)


# ----- the report ----------------------------------------------------------------------------
def derive(graph: Graph) -> tuple[list[NodeMath], dict[str, list[str]]]:
    """NodeMath for every named node, and for every value the nodes that consume it."""
    if graph.loss_node is not None:
        differentiable = {k.id for k in differentiate(graph).cotangents}
    else:
        differentiable = set()
    lines = line_names(graph)
    maths = [_scan_math(graph, n, differentiable, lines) if n.op == "scan"
             else _loop_output_math(n, differentiable, lines) if n.op == "scan_out"
             else node_math(graph, n, differentiable, lines)
             for n in _named_order(graph, lines)]
    consumers: dict[str, list[str]] = {}
    for m in maths:
        for v in m.vjps:
            consumers.setdefault(v, []).append(m.name)
    return maths, consumers


def _scan_math(graph: Graph, node: Node, differentiable: set[int], lines: dict[Node, str]) -> NodeMath:
    """A scan's line: scan(step, (initial carries), (sequences)), each argument written
    as an expression of named values, and the VJPs of those values from the step's
    cotangents: ``ḡ_run.init[j]`` (the carry's before the first step), ``ḡ_run.xs[j]``
    (the slices' ḡ stacked over the steps) and, for a value the step reads, the sum over
    t of its per-step ḡ (see the step's block)."""
    name, step = lines[node], node.attrs["step"]
    c, x, _ = step.counts()
    math = NodeMath(name, output_shapes(node), sp.Integer(0))
    args: dict[str, list[sp.Expr]] = {"init": [], "xs": [], "consts": []}
    for j, v in enumerate(node.inputs):
        kind, k = ("init", j) if j < c else ("xs", j - c) if j < c + x else ("consts", j - c - x)
        ct = sp.Symbol(f"Σ_t {BAR}{leaf_names(step)[j]}[t]" if kind == "consts" else f"{BAR}{name}.{kind}[{k}]",
                       real=True)
        if v in lines or v.op in ("input", "param") or loop_lines(v):   # another loop's output: run.carry[0]
            shown = lines.get(v) or (loop_math(v, lines) if loop_lines(v) else v.name or f"v{v.id}")
            args[kind].append(sp.Symbol(shown, real=True))
            if v.id in differentiable and v.dtype == "float":
                math.vjps[shown] = math.vjps.get(shown, 0) + ct
            continue
        ident = f"{name}_{kind}{k}"   # a leaf's name must be an identifier: shown as its cotangent says
        sub = node_math(graph, v, differentiable, {**lines, v: ident})
        args[kind].append(sub.forward)
        if kind == "consts":
            math.captures[leaf_names(step)[j]] = sub.forward
        seed = {sp.Symbol(BAR + ident, real=True): ct,
                sp.Symbol(ident, real=True): sub.forward}   # tanh's VJP reads its value
        for leaf, term in sub.vjps.items():
            math.vjps[leaf] = math.vjps.get(leaf, 0) + term.xreplace(seed)
    flags = [sp.Symbol(f"length={node.attrs['length']}")] if "length" in node.attrs else []
    flags += [sp.Symbol("reverse")] if node.attrs.get("reverse") else []
    math.forward = sp.Function("scan")(sp.Symbol(step.name), sp.Tuple(*args["init"]), sp.Tuple(*args["xs"]), *flags)
    return math


def _loop_output_math(node: Node, differentiable: set[int], lines: dict[Node, str]) -> NodeMath:
    """A line naming a loop's output as it is (``last = run.carry[0]``; a per-step output
    moved back to its axis is a transpose of the stack ``run.ys[0]``, read by node_math):
    its ḡ is the output's."""
    name, shown = lines[node], loop_math(node, lines)
    math = NodeMath(name, node.shape, sp.Symbol(shown, real=True))
    if node.id in differentiable and node.dtype == "float":
        math.vjps[shown] = sp.Symbol(BAR + name, real=True)
    return math


def explain(graph: Graph, wrt: str | None = None, node: str | None = None, latex: bool = False) -> str:
    """The derivative report that ``backcomp explain`` prints."""
    from backcomp.graph import GraphError
    maths, consumers = derive(graph)
    by_name = {m.name: m for m in maths}
    loss = graph.loss_node.name if graph.loss_node is not None else None
    selected = maths
    if node is not None:
        if node not in by_name:
            if node in graph.inputs or node in graph.params:
                raise GraphError(f"--node: '{node}' is an input or param, not a node with an expression")
            raise GraphError(f"--node: no node named '{node}'{_hint(node, by_name)}")
        selected = [by_name[node]]
    if wrt is not None:
        if wrt not in graph.params:
            raise GraphError(f"--wrt: '{wrt}' is not a param{_hint(wrt, graph.params)}")
        if wrt not in consumers:
            return f"{loss} does not depend on {wrt}: ḡ_{wrt} = 0"
        on_path = _chain(wrt, consumers, loss)
        selected = [m for m in reversed(maths) if m.name in on_path]
    fmt = to_latex if latex else to_text
    lines: list[str] = []
    if latex:
        lines.append(r"% generated by backcomp explain; \bar{g}_v = \partial " + (loss or "L") + r" / \partial v")
    else:
        lines.append(f"{graph.name}: ḡ_v = ∂{loss}/∂v, ⊙ elementwise product, · matrix product")
    if loss is not None and (node is None or node == loss):
        lines.append(rf"\bar{{g}}_{{{MathLatexPrinter._name(loss)}}} = 1" if latex else f"ḡ_{loss} = 1")
    for m in selected:
        lhs = MathLatexPrinter._name(m.name) if latex else m.name
        shape = m.shape if isinstance(m.shape, str) else format_shape(m.shape)
        deriv = ""
        if m.grad is not None:   # ∂y/∂x, then its value: a derivative read like any other line
            y, x = m.grad
            deriv = (rf"\frac{{\partial}}{{\partial {MathLatexPrinter._name(x)}}} {fmt(y)} = " if latex
                     else f"∂/∂{x} {fmt(y)} = ")
        if latex:
            lines.append("")
            note = rf"\text{{{shape}}}".replace("_", r"\_") if isinstance(m.shape, str) else rf"\text{{shape }} {shape}"
            lines.append(rf"{lhs} = {deriv}{fmt(m.forward)} \qquad {note}")
        else:
            lines.append("")
            note = shape if isinstance(m.shape, str) else f"shape {shape}"
            lines.append(f"{lhs} = {deriv}{fmt(m.forward)}    # {note}")
        for v, term in m.vjps.items():
            if wrt is not None and v not in on_path:
                continue
            acc = "+=" if len(consumers.get(v, [])) > 1 else "="
            if latex:
                acc_l = r"\mathrel{+}=" if acc == "+=" else "="
                lines.append(rf"\quad \bar{{g}}_{{{MathLatexPrinter._name(v)}}} {acc_l} {fmt(term)}")
            else:
                lines.append(f"    {BAR}{v} {acc} {fmt(term)}")
    if node is None and not latex:
        for run, caller in steps_of(graph):
            lines.append("")
            lines += explain_step(run, fmt, caller, by_name[caller].captures if caller in by_name else {})
    if node is None:
        multi = [(v, c) for v, c in consumers.items() if len(c) > 1 and (wrt is None or v in on_path)]
        if multi:
            lines.append("")
            for v, c in multi:
                terms = " + ".join(f"(from {x})" for x in c)
                lines.append(("% " if latex else "") + f"{BAR}{v} sums {len(c)} terms: {terms}")
    return "\n".join(lines)


#: a module's docstring lists the explain text of models up to this size
SUMMARY_MAX_LINES, SUMMARY_MAX_MEMBERS = 80, 60


def summary(graph: Graph) -> str | None:
    """The explain text for a generated module's docstring, or None for a model too big
    to read there (many lines, or a line made of many unnamed nodes)."""
    lines = line_names(graph)
    shown = _named_order(graph, lines)
    if len(shown) > SUMMARY_MAX_LINES or any(len(_members(graph, n, lines)) > SUMMARY_MAX_MEMBERS
                                            for n in shown):
        return None
    return explain(graph)


def _chain(param: str, consumers: dict[str, list[str]], loss: str | None) -> set[str]:
    """The values on some path from ``param`` up to the loss."""
    up = {param}
    stack = [param]
    while stack:
        v = stack.pop()
        outputs = [k for k in consumers if k.startswith(f"{v}.")]   # a loop's: run → run.ys[0] → ...
        up.update(outputs)
        for c in consumers.get(v, []) + [c for k in outputs for c in consumers[k]]:
            if c not in up:
                up.add(c)
                stack.append(c)
    return up


def _hint(name, choices) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----- Graphviz ------------------------------------------------------------------------------
def to_dot(graph: Graph, backward: bool = False) -> str:
    """The forward DAG (and, with ``backward``, the differentiated one) as DOT."""
    from backcomp.codegen import assign_names
    g = differentiate(graph) if backward and graph.loss_node is not None else graph
    if g is not graph and any(n.op == "scan" for n in g.nodes):
        from backcomp.passes.loops import merge_scans
        g = merge_scans(g)   # the forward loop that stores the residuals replaces the plain one
    names = assign_names(g)
    ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
    lines = [f'digraph "{graph.name}" {{', "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];']
    for n in g.nodes:
        label = names[n]
        if n.op in ("input", "param"):
            shape, style = ("box", 'style=filled, fillcolor="#dde8f8"') if n.op == "param" else ("box", "")
        else:
            detail = n.attrs.get("label", n.op) if n.op == "ew" else n.op
            label = f"{label}\\n{detail}"
            shape, style = "ellipse", ""
            if n.origin is not None:
                style = 'style=filled, fillcolor="#f8e0d0"'
            elif n is g.loss_node:
                style = 'style=filled, fillcolor="#d8f0d8"'
        label += f"\\n{format_shape(n.shape)}"
        attrs = f'label="{_dot_escape(label)}", shape={shape}' + (f", {style}" if style else "")
        lines.append(f"  {ids[n]} [{attrs}];")
    for n in g.nodes:
        for x in n.inputs:
            if n.op != "scan":
                lines.append(f"  {ids[x]} -> {ids[n]};")
    for n in g.nodes:
        if n.op == "scan":
            lines += loop_cluster(n, ids, _dot_escape)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(s: str) -> str:
    return s.replace('"', '\\"')


__all__ = ["explain", "summary", "derive", "node_math", "to_dot", "to_text", "to_latex", "NodeMath"]
