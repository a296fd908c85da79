"""Elementwise ops: each is a SymPy scalar expression; its VJP and JVP are *derived*.

Every elementwise node denotes a scalar expression over its inputs' symbols
(``%0, %1, ...``).  Named ops (``relu``, ``mul``, ...) build it from their scalar
definition; the generic ``ew`` op holds an expression directly (the backward and
the fusion pass make these).  One VJP rule and one JVP rule serve them all, from the
same partials: ``sympy.diff`` of the expression, with the forward expression
replaced by the node's own output so that derivatives such as σ' = σ(1 − σ) and
tanh' = 1 − tanh² reuse the forward value.  VJP: ḡ_xi = ḡ ⊙ ∂f/∂xi; JVP:
ṫ = Σ_i ∂f/∂xi ⊙ ṫ_i.  The partials are expressions again, so every elementwise
op can be differentiated to any order.
"""
from __future__ import annotations

import math
from functools import lru_cache
from numbers import Real
from typing import Callable, Sequence

import sympy as sp

from backcomp.graph import GraphError, Node, broadcast_shapes
from backcomp.ops.registry import OpDef, get_op, register_op
from backcomp.ops.signature import UNARY, X, Param, spec_function
from backcomp.ops import scalar as sc
from backcomp.ops.scalar import fix_step_convention, sigmoid, softplus
from backcomp.ops.scalar import log1p as sp_log1p


@lru_cache(maxsize=None)
def arg_symbol(i: int) -> sp.Symbol:
    """The symbol of an elementwise node's i-th input (names no spec can write)."""
    return sp.Symbol(f"%{i}", real=True)


def dim_symbol(name: str) -> sp.Symbol:
    """A symbolic dimension inside an expression (e.g. the batch size in mean's VJP)."""
    return sp.Symbol(name, positive=True, integer=True)


def dim_value(dim) -> sp.Expr:
    """A shape entry as a number in an expression: 4, B, or 4·B·T for "4*B*T"."""
    from backcomp.graph import dim_factors
    coeff, names = dim_factors(dim)
    return sp.Integer(coeff) * sp.Mul(*(dim_symbol(n) for n in names))


def dim_from_value(value) -> "int | str | None":
    """The shape entry a dim expression stands for (``B * T`` -> "B*T"), or None when it
    is not a positive integer times a product of dims."""
    from backcomp.graph import product_dim
    coeff, factors = (sp.Integer(value) if isinstance(value, int) else value).as_coeff_mul()
    if not (coeff.is_Integer and coeff > 0):
        return None
    names = []
    for f in factors:
        base, power = f.as_base_exp()
        if not (base.is_Symbol and base.is_integer and base.is_positive and power.is_Integer and power > 0):
            return None
        names += [base.name] * int(power)
    return product_dim(int(coeff), names)


OUT = sp.Symbol("%out", real=True)   # the node's own output, inside its derivative
CT = sp.Symbol("%ct", real=True)     # the incoming cotangent


@lru_cache(maxsize=None)
def tangent_symbol(i: int) -> sp.Symbol:
    """The tangent of an elementwise node's i-th input, inside its JVP."""
    return sp.Symbol(f"%dot{i}", real=True)


def _number(value) -> sp.Expr:
    if isinstance(value, sp.Expr) and value.free_symbols and all(s.is_integer for s in value.free_symbols):
        return value   # arithmetic on symbolic dims (``sum(x) / B``): a number once the module runs
    if isinstance(value, bool) or not isinstance(value, Real):
        raise GraphError(f"expected a node or a number, got {value!r}")
    if isinstance(value, int):
        return sp.Integer(value)
    return sp.Float(value, 17) if value != int(value) else sp.Integer(int(value))


def node_expr(node: Node) -> sp.Expr:
    """The scalar expression of an elementwise node, over ``arg_symbol(i)``."""
    if node.op == "ew":
        return node.attrs["expr"]
    opdef = get_op(node.op)
    args = [arg_symbol(p) if isinstance(p, int) else p for p in node.attrs["pattern"]]
    extra = {k: v for k, v in node.attrs.items() if k != "pattern"}
    return opdef.scalar(*args, **extra)


def ew_from_expr(expr: sp.Expr, bindings: dict[sp.Symbol, Node], label: str) -> Node:
    """A generic elementwise node for ``expr``; ``bindings`` maps its symbols to nodes.

    Symbols are renumbered in order of first use so that equal expressions over the
    same nodes produce identical nodes (CSE and byte-stable output rely on it).
    """
    if expr in bindings:  # the identity: reuse the node itself
        return bindings[expr]
    used = [s for s in bindings if s in expr.free_symbols]
    nodes: list[Node] = []
    subst: dict[sp.Symbol, sp.Symbol] = {}
    for s in used:
        n = bindings[s]
        if n in nodes:
            subst[s] = arg_symbol(nodes.index(n))
        else:
            subst[s] = arg_symbol(len(nodes))
            nodes.append(n)
    expr = expr.xreplace(subst)
    if not nodes:
        raise GraphError(f"elementwise expression {expr} has no array inputs")
    return nodes[0].graph.apply("ew", nodes, expr=expr, label=label)


def _infer(inputs: Sequence[Node], attrs: dict):
    shape = broadcast_shapes(*(x.shape for x in inputs))
    expr = attrs["expr"] if "expr" in attrs else None
    is_bool = isinstance(expr, (sp.logic.boolalg.Boolean)) and not isinstance(expr, sp.Expr)
    return shape, "bool" if is_bool else "float"


def _emit(node: Node, args: Sequence[str], out: str, into: str | None = None) -> list[str]:
    """``out = <expr>``; repeated subexpressions become temporaries (SymPy's cse).

    With ``into`` (the variable of a dead input buffer of the node's shape), the
    chain of operations from that input to the result is computed in place.
    Otherwise each value (the result, a temporary) is computed into one new array
    where that makes fewer arrays (``_Chains``).
    """
    from backcomp.printer import group_small, print_expr
    names = {arg_symbol(i): a for i, a in enumerate(args)}
    small = {arg_symbol(i) for i, x in enumerate(node.inputs) if x.shape != node.shape}
    expr = group_small(_arranged(node_expr(node)), small)
    # operands a chain may start from; none when an integer operand could widen the
    # result past the dtype of the array the chain runs in
    full = {arg_symbol(i) for i, x in enumerate(node.inputs) if x.dtype == "float" and x.shape == node.shape}
    if node.shape == () or any(x.dtype not in ("float", "bool") for x in node.inputs):
        full = set()   # (0-d operands give NumPy scalars, which have no out=)
    if into is not None and args.count(into) == 1:   # (another symbol reading the buffer would see it change)
        chains = _Chains(out, dict(names), set(full))
        calls = chains.into(expr, into, arg_symbol(args.index(into)))
        if calls:
            return chains.lines + calls[:-1] + [f"{out} = {calls[-1]}"] + _del(chains.temporaries)
    temps, (body,) = sp.cse([expr], symbols=sp.numbered_symbols("%t"), optimizations=None)
    temps, body = _step_arguments_named(*_cube_bases_named(temps, body))
    chains = _Chains(out, names, full)
    for k, (sym, sub) in enumerate(temps):
        chains.new(sub, _temporary(out, f"t{k}"))
        names[sym] = _temporary(out, f"t{k}")
        if _float_array(sub, full):
            full.add(sym)
    value = _full_shape(node, expr, args, print_expr(body, names))
    if value != print_expr(body, names):   # a folded value: written into a new array of its own
        return chains.lines + [f"{out} = {value}"]
    chains.new(body, out)
    return chains.lines + _del([_temporary(out, f"t{k}") for k in range(len(temps))] + chains.temporaries)


def fold_selects(expr: sp.Basic) -> sp.Basic:
    """``sp.piecewise_fold`` that cannot blow up: it folds at most three selects at a
    time.  Folding a sum of n selects makes one select of 2^n branches (ten
    ``where(x > i, 1.0, 0.0) * p`` took 40 s to compile); here a product distributes
    over a sum of selects (``x·(s1 + s2 + …)`` is ``x·s1 + x·s2 + …``) and each term
    folds on its own, so every select of numbers still folds into an array beside it
    (which is what keeps ``np.where(c, 1, 0.1)``, a float64 array, out of float32
    code); a product of selects folds them one at a time into the product before them;
    a select folds inside each branch; anything else folds its arguments."""
    if not isinstance(expr, sp.Basic) or not expr.args:
        return expr
    selects = expr.atoms(sp.Piecewise)
    if len(selects) <= 3:
        return sp.piecewise_fold(expr) if selects else expr
    if isinstance(expr, sp.Piecewise):
        return sp.Piecewise(*[(fold_selects(e), c) for e, c in expr.args])
    if isinstance(expr, sp.Mul):
        factors = list(expr.args)
        for k, f in enumerate(factors):
            if isinstance(f, sp.Add) and f.has(sp.Piecewise):
                rest = sp.Mul(*(factors[:k] + factors[k + 1:]))
                return fold_selects(sp.Add(*[rest * t for t in f.args]))
        # a product of selects (a chain's derivative): each folds into the product so far,
        # held as one symbol, so the branches add up instead of multiplying
        acc = fold_selects(sp.Mul(*[f for f in factors if not isinstance(f, sp.Piecewise)]))
        for f in factors:
            if isinstance(f, sp.Piecewise):
                held = sp.Dummy()
                acc = sp.piecewise_fold(held * fold_selects(f)).xreplace({held: acc})
        return acc
    return expr.func(*[fold_selects(a) for a in expr.args])


def _fold_number_selects(expr: sp.Expr) -> sp.Expr:
    """A select between numbers inside arithmetic on arrays, folded into it:
    ``np.where(c, 1.0, 0)`` is a float64 array and makes ``g + np.where(c, 1.0, 0)``
    float64 too; ``np.where(c, g + 1.0, g)`` keeps g's dtype."""
    from backcomp.printer import value_symbols

    def arrays(e: sp.Basic) -> set[sp.Symbol]:   # not a dim: 0.5/B is a number at run time
        return {v for v in value_symbols(e) if v.name.startswith("%")}
    if not isinstance(expr, sp.Expr) or not arrays(expr):
        return expr
    if all(arrays(p) for p in expr.atoms(sp.Piecewise)):
        return expr
    return fold_selects(expr)


def _temporary(out: str, what: str) -> str:
    """A temporary's variable: node names never start with two underscores, so it
    cannot be a live value's name (it is deleted at the statement's end)."""
    return f"__{out}_{what}"


def _del(temporaries: list[str]) -> list[str]:
    """Temporaries of a statement die with it, not at the function's end: their memory
    goes back to malloc for the next statement instead of being held (and faulted in
    again) while the rest of the step runs."""
    return [f"del {', '.join(temporaries)}"] if temporaries else []


def _negated_name(a: sp.Expr) -> bool:
    """−x for a name x (without building −a: on a derivative's sum that is costly)."""
    return a.is_Mul and len(a.args) == 2 and a.args[0] == -1 and a.args[1].is_Symbol


def _chain_start(expr: sp.Expr, full: set[sp.Symbol]) -> sp.Expr | None:
    """Where a chain computing ``expr`` in one array starts: down from the root through
    computed operands of the full shape, the first operation whose operands are all
    plain names or numbers (``x**2`` in tanh(c·x·(k·x**2 + 1)), ``y - t`` in (y − t)²)."""
    def leaf(a, within) -> bool:   # in a sum, −x prints as a subtraction: no operation of its own
        return a.is_Symbol or a.is_number or within.is_Add and _negated_name(a)

    from backcomp.printer import in_place
    e = expr
    while True:
        inner = [a for a in e.args if isinstance(a, sp.Expr) and not leaf(a, e) and a.free_symbols & full]
        if not inner or not in_place(inner[0]):   # (x > 0, a select: not necessarily float)
            break
        e = inner[0]
    return e if e != expr and in_place(expr) and _float_array(e, full) else None


def _float_array(e: sp.Expr, full: set[sp.Symbol]) -> bool:
    """Whether ``e`` is computed as an array of the model's float dtype: it has an
    operand of ``full`` outside any comparison or select (0.5*(x > 0) is float64, and
    exp of a boolean float16), so a chain started by it keeps the dtype."""
    if e.is_Symbol:
        return e in full
    if e.is_Add or e.is_Mul:
        return any(_float_array(a, full) for a in e.args)
    from backcomp.printer import in_place
    return in_place(e) and _float_array(e.args[0], full)


def _arrays_made(e: sp.Expr, full: set[sp.Symbol], memo: dict | None = None) -> int:
    """How many new arrays of the full shape ``e`` printed as one NumPy expression makes.

    NumPy reuses a temporary operand for the result (elision) only in an operation
    between two arrays: a function call, a power, or an operation with a Python
    number (float32 cannot take a float64 scalar in place) makes a new array.  Sums
    and products run left to right, numbers first in products and last in sums.
    (``memo``: a derivative's tree repeats subexpressions, exponentially many times.)"""
    memo = {} if memo is None else memo
    if e in memo:
        return memo[e]

    def is_full(a) -> bool:
        return bool(a.free_symbols & full)

    def leaf(a) -> bool:   # in a sum, −x prints as a subtraction: no operation of its own
        return a.is_Symbol or a.is_number or e.is_Add and _negated_name(a)

    if e.is_Symbol or e.is_number or not is_full(e):
        made = 0
    elif type(e).__name__ == "Grouped":
        made = _arrays_made(e.args[0], full, memo)
    else:
        made = sum(_arrays_made(a, full, memo) for a in e.args if not leaf(a))
        if not (e.is_Add or e.is_Mul):
            made += 1
        else:
            numbers = [a for a in e.args if a.is_number]
            operands = numbers + [a for a in e.args if not a.is_number] if e.is_Mul \
                else [a for a in e.args if not a.is_number] + numbers
            value = operands[0]
            temporary, wide = not leaf(value) and is_full(value), is_full(value)
            for a in operands[1:]:
                a_temporary = not leaf(a) and is_full(a)
                if not (temporary and not a.is_number or a_temporary and not value.is_number):
                    made += 1 if wide or is_full(a) else 0
                wide = wide or is_full(a)
                temporary, value = wide, a
    memo[e] = made
    return made


def _chain_cost(expr: sp.Expr, start: sp.Expr, full: set[sp.Symbol]) -> int:
    """New full-shape arrays of the chain from ``start``: its own, and those its operands
    off the chain make as they are printed."""
    cost, e = 1, expr
    while e != start:
        on = next(a for a in e.args if a.has(start))
        cost += sum(_arrays_made(a, full) for a in e.args if a is not on)
        e = on
    return cost


def _replace(expr: sp.Expr, mapping: dict) -> sp.Expr:
    """``expr.xreplace(mapping)`` without evaluating what it rebuilds: a name in place of
    a subexpression changes no value, and re-evaluating sin(tanh(sin(…))) a hundred
    levels deep takes SymPy minutes."""
    with sp.evaluate(False):
        return expr.xreplace(mapping)


class _Chains:
    """Prints values as chains of operations in one array each (``np.multiply(v, 0.5,
    out=v)``) where that makes fewer arrays than one NumPy expression.

    NumPy reuses a temporary itself only in an operation between two arrays, never in
    a function call or with a Python number and float32: ``0.5*x*(e + 1)`` makes two
    arrays of x's size where one does, ``tanh(c*x*(k*x**2 + 1))`` five.  Each array
    that large is fresh memory from the OS on every call, a page fault per 4 KiB.
    ``lines`` collects the statements; ``temporaries`` the variables they define for
    operands off a chain (``__{out}_c0``), which the statement deletes at its end.
    """

    def __init__(self, out: str, names: dict, full: set[sp.Symbol]):
        self.out, self.names, self.full = out, names, full
        self.lines: list[str] = []
        self.temporaries: list[str] = []

    def new(self, expr: sp.Expr, var: str) -> None:
        """``var = <expr>``: a chain from its first operation when that makes fewer arrays."""
        from backcomp.printer import print_expr
        start = _chain_start(expr, self.full)
        if start is not None and _chain_cost(expr, start, self.full) < _arrays_made(expr, self.full):
            here = sp.Symbol("%here")
            first = f"{var} = {print_expr(start, self.names)}"
            calls = self.into(_replace(expr, {start: here}), var, here)
            if calls:
                self.lines += [first] + calls
                return
            expr = _replace(expr, {here: start})
        self.lines.append(f"{var} = {print_expr(expr, self.names)}")

    def into(self, expr: sp.Expr, buf: str, buffer: sp.Symbol) -> list[str] | None:
        """The calls computing ``expr`` in ``buf``, which holds ``buffer`` (``print_into``),
        or None; each operand off the chain that would make two arrays or more is
        computed first, into a temporary of its own (the exp in ḡ·(e + c·x·exp(−x²/2)))."""
        from backcomp.printer import compared_directly, in_place, print_into
        heavy = set()

        def visit(e):
            if not in_place(e):
                return
            for a in e.args:
                if a.has(buffer):
                    visit(a)
                elif isinstance(a, sc.half_step):   # a mask, whose argument it reads twice
                    if not compared_directly(a.args[0]):
                        heavy.add(a.args[0])
                elif isinstance(a, sp.Expr) and _arrays_made(a, self.full) >= 2:
                    heavy.add(a)
        visit(expr)
        for a in sorted(heavy, key=sp.default_sort_key):
            var, symbol = _temporary(self.out, f"c{len(self.temporaries)}"), sp.Symbol(f"%c{len(self.temporaries)}")
            self.temporaries.append(var)   # before new(): its own operands take the next names
            self.new(a, var)
            self.names[symbol] = var
            if _float_array(a, self.full):
                self.full.add(symbol)
            expr = _replace(expr, {a: symbol})
        return print_into(expr, {**self.names, buffer: buf}, buf, buffer)


def _cube_bases_named(temps: list, body: sp.Expr) -> tuple[list, sp.Expr]:
    """The base of a cube or fourth power as a temporary of its own, so the power prints
    as products (t·t·t, two array passes): ``(x + c)**3`` is libm's pow per element,
    33 ms of a 54 ms step for the tanh-GELU of (16, 64, 512) float32."""
    pows = sorted({p for e in [body, *(v for _, v in temps)] for p in e.atoms(sp.Pow)
                   if p.exp in (3, 4, -3, -4) and not p.base.is_Symbol and not p.base.is_number},
                  key=sp.default_sort_key)
    if not pows:
        return temps, body
    named = {base: sp.Symbol(f"%p{k}") for k, base in enumerate(dict.fromkeys(p.base for p in pows))}
    swap = {p: named[p.base] ** p.exp for p in pows}
    out = [(s, v.xreplace(swap)) for s, v in temps]
    for base, s in named.items():   # right after the last temporary it reads
        order = [t for t, _ in out]
        out.insert(max([order.index(t) + 1 for t in base.free_symbols if t in order], default=0), (s, base))
    return out, body.xreplace(swap)


def _step_arguments_named(temps: list, body: sp.Expr) -> tuple[list, sp.Expr]:
    """The argument of a half step as a temporary of its own unless it is a name or a
    difference of names: the step's mask, [x > 0] + [x >= 0], reads it twice."""
    from backcomp.printer import compared_directly
    args = sorted({h.args[0] for e in [body, *(v for _, v in temps)] for h in e.atoms(sc.half_step)
                   if not compared_directly(h.args[0])}, key=sp.default_sort_key)
    if not args:
        return temps, body
    named = {a: sp.Symbol(f"%h{k}") for k, a in enumerate(args)}
    swap = {sc.half_step(a): sc.half_step(s) for a, s in named.items()}
    out = [(s, _replace(v, swap)) for s, v in temps]
    for a, s in named.items():   # right after the last temporary it reads
        order = [t for t, _ in out]
        out.insert(max([order.index(t) + 1 for t in a.free_symbols if t in order], default=0), (s, a))
    return out, _replace(body, swap)


def _arranged(expr: sp.Expr) -> sp.Expr:
    """The form ``_emit`` prints an expression in (before grouping small operands): number
    selects folded into the arrays beside them, common factors taken out."""
    return _common_factors_out(_fold_number_selects(expr))


@lru_cache(maxsize=4096)
def array_operations(expr: sp.Expr) -> int:
    """About how many operations ``_emit`` writes for ``expr``: counted on the form it
    prints (``_arranged``) after common-subexpression elimination, so a pass comparing two
    forms of a node compares the code each would get, not SymPy's raw operation count."""
    temps, body = sp.cse([_arranged(expr)], optimizations=None)
    return sum(sp.count_ops(e) for _, e in temps) + sp.count_ops(body[0])


def _common_factors_out(expr: sp.Expr) -> sp.Expr:
    """A sum whose terms share factors, with them taken out when that means fewer
    operations: ḡ·t0·t1 − t1·(s·t0) → t0·t1·(ḡ − s), a softmax backward in three array
    passes instead of five (every operation here is one pass over a whole array)."""
    if not isinstance(expr, sp.Expr):
        return expr
    factored = sp.factor_terms(expr)
    return factored if sp.count_ops(factored) < sp.count_ops(expr) else expr


def _full_shape(node: Node, expr: sp.Expr, args: Sequence[str], value: str) -> str:
    """``value`` as an array of the node's own shape and dtype.

    Folding can drop the operands that gave a node its shape and dtype (``0 * h``,
    ``x - x``, ``stop_gradient(h) * 0``): the node keeps them as inputs, and the
    folded value is then written into an array shaped and typed like them, so a
    rewrite never changes what a node is.
    """
    used = [i for i, x in enumerate(node.inputs) if arg_symbol(i) in expr.free_symbols]
    shape = broadcast_shapes(*(node.inputs[i].shape for i in used)) if used else ()
    typed = node.dtype != "float" or any(x.dtype == "float" for x in typing_operands(node, expr))
    if shape == node.shape and typed:
        return value
    floats = [a for a, x in zip(args, node.inputs) if x.dtype == "float"]
    dtype = "bool" if node.dtype == "bool" else f"{floats[0]}.dtype" if floats else "float"
    same = [a for a, x in zip(args, node.inputs) if x.shape == node.shape and x.dtype == node.dtype]
    if same and value in ("0", "1"):
        return f"np.{'zeros' if value == '0' else 'ones'}_like({same[0]})"
    if same:
        return f"np.full_like({same[0]}, {value})"
    from backcomp.ops.common import shape_code
    return f"np.full({shape_code(node.shape)}, {value}, dtype={dtype})"


def typing_operands(node: Node, expr: sp.Expr | None = None) -> list[Node]:
    """The inputs whose values (not only comparisons of them) make the node's value:
    NumPy takes its dtype from these, so a float node needs a float one among them."""
    from backcomp.printer import value_symbols
    values = value_symbols(node_expr(node) if expr is None else expr)
    return [x for i, x in enumerate(node.inputs) if arg_symbol(i) in values]


def reuse_output(d: sp.Expr, expr: sp.Expr) -> sp.Expr:
    """Write a derivative in terms of the node's own output where it can.

    exp' = exp, tanh' = 1 − tanh², σ' = σ(1 − σ) come from substituting the
    forward expression; for f = max(g, 0) the step H(g) equals H(f), so relu's
    backward reads its output instead of keeping its input alive.
    """
    d = d.subs(expr, OUT)
    if isinstance(expr, sp.Max) and len(expr.args) == 2 and sp.S.Zero in expr.args:
        g = [a for a in expr.args if a != 0][0]
        d = d.replace(lambda e: isinstance(e, sp.Heaviside) and e.args[0] == g,
                      lambda e: sp.Heaviside(OUT, *e.args[1:]))
    return d


@lru_cache(maxsize=4096)
def partial(expr: sp.Expr, i: int) -> sp.Expr:
    """∂expr/∂%i, written over the node's output ``OUT`` where it can be (shared by
    the VJP and the JVP: the same derivative, applied on either side)."""
    d = fix_step_convention(sp.diff(expr, arg_symbol(i)))
    if d != 0 and not expr.is_Atom:
        d = reuse_output(d, expr)
    return d


def elementwise_vjp(node: Node, ct: Node) -> list[Node | None]:
    """ḡ_xi = ḡ ⊙ ∂f/∂xi, with f's own value substituted where it reappears."""
    expr = node_expr(node)
    cts: list[Node | None] = []
    for i, x in enumerate(node.inputs):
        d = partial(expr, i) if x.dtype == "float" else sp.S.Zero
        if d == 0:
            cts.append(None)
            continue
        bindings = {CT: ct, OUT: node, **{arg_symbol(j): n for j, n in enumerate(node.inputs)}}
        cts.append(ew_from_expr(fold_selects(CT * d), bindings, label=f"d{node.op}"))
    return cts


def elementwise_jvp(node: Node, tangents: Sequence[Node | None]) -> Node | None:
    """ṫ = Σ_i ∂f/∂xi ⊙ ṫ_i, one elementwise node (the partials of the VJP)."""
    if node.dtype != "float":
        return None
    expr = node_expr(node)
    bindings: dict[sp.Symbol, Node] = {OUT: node, **{arg_symbol(j): n for j, n in enumerate(node.inputs)}}
    total = sp.S.Zero
    for i, (x, t) in enumerate(zip(node.inputs, tangents)):
        d = partial(expr, i) if t is not None and x.dtype == "float" else sp.S.Zero
        if d != 0:
            bindings[tangent_symbol(i)] = t
            total += d * tangent_symbol(i)
    if total == 0:
        return None
    return ew_from_expr(fold_selects(total), bindings, label=f"t{node.op}")


# ----- the generic node that fusion and the backward create ---------------------
register_op(OpDef(
    "ew", _infer, _emit, elementwise_vjp, elementwise=True, broadcast_ct=True, jvp=elementwise_jvp,
    doc="A fused elementwise expression (made by the compiler, not by users).",
))


def _make(name: str, scalar: Callable[..., sp.Expr], nargs: int, doc: str,
          signature: str, differentiable: bool = True, dtype: str = "float",
          spec: tuple[Param, ...] | None = None) -> Callable:
    """Register a named elementwise op and return its builder function
    (callable from specs with the arguments ``spec``, if given)."""
    def infer(inputs, attrs):
        return broadcast_shapes(*(x.shape for x in inputs), where=f"{name}: "), dtype

    register_op(OpDef(name, infer, _emit, elementwise_vjp if differentiable else None,
                      doc=doc, elementwise=True, broadcast_ct=True, signature=signature, scalar=scalar,
                      jvp=elementwise_jvp if differentiable else None,
                      no_derivative="" if differentiable else f"a comparison: its {dtype} output has no derivative"))

    def build(*args, **attrs):
        if len(args) != nargs:
            raise GraphError(f"{name}() takes {nargs} argument{'s' if nargs > 1 else ''}, got {len(args)}")
        nodes: list[Node] = []
        pattern = []
        for a in args:
            if isinstance(a, Node):
                if a not in nodes:
                    nodes.append(a)
                pattern.append(nodes.index(a))
            else:
                pattern.append(_number(a))
        if not nodes:
            raise GraphError(f"{name}() needs at least one array argument")
        if dtype == "float" and name != "where" and not any(n.dtype == "float" for n in nodes) \
                and any(n.dtype == "bool" for n in nodes):
            # a comparison as a number with no float array beside it (1 - (x > 0)):
            # NumPy would make it int64 (or refuse mask - mask); as where(c, 1.0, 0.0)
            # it is a select in the model's dtype
            return build(*[where(a, 1.0, 0.0) if isinstance(a, Node) and a.dtype == "bool" else a
                           for a in args], **attrs)
        return nodes[0].graph.apply(name, nodes, pattern=tuple(pattern), **attrs)

    build.__name__ = name
    build.__doc__ = doc
    if spec is not None:
        spec_function(*spec)(build)
    return build


# ----- arithmetic ---------------------------------------------------------------
add = _make("add", lambda a, b: a + b, 2, "a + b, broadcasting", "add(a, b) or a + b")
sub = _make("sub", lambda a, b: a - b, 2, "a - b, broadcasting", "sub(a, b) or a - b")
mul = _make("mul", lambda a, b: a * b, 2, "a * b, broadcasting", "mul(a, b) or a * b")
div = _make("div", lambda a, b: a / b, 2, "a / b, broadcasting", "div(a, b) or a / b")
pow = _make("pow", lambda a, b: a ** b, 2, "a ** b (a > 0 where b is not a constant)", "a ** b")
neg = _make("neg", lambda a: -a, 1, "-a", "-a")
maximum = _make("maximum", sc.maximum, 2,
                "elementwise max; the gradient goes to the larger of a and b, half to each at a tie "
                "(none at a tie with a number, as relu)", "maximum(a, b)",
                spec=(Param("a", "value"), Param("b", "value")))
minimum = _make("minimum", sc.minimum, 2,
                "elementwise min; the gradient goes to the smaller of a and b, half to each at a tie "
                "(none at a tie with a number)", "minimum(a, b)",
                spec=(Param("a", "value"), Param("b", "value")))

# ----- unary math ---------------------------------------------------------------
exp = _make("exp", sp.exp, 1, "e ** x", "exp(x)", spec=UNARY)
log = _make("log", sp.log, 1, "natural log (x > 0)", "log(x)", spec=UNARY)
log1p = _make("log1p", sp_log1p, 1, "log(1 + x), accurate for small x", "log1p(x)", spec=UNARY)
sqrt = _make("sqrt", sp.sqrt, 1, "square root (x > 0)", "sqrt(x)", spec=UNARY)
abs = _make("abs", sp.Abs, 1, "|x|; abs'(0) = 0", "abs(x)", spec=UNARY)
sin = _make("sin", sp.sin, 1, "sine", "sin(x)", spec=UNARY)
cos = _make("cos", sp.cos, 1, "cosine", "cos(x)", spec=UNARY)
erf = _make("erf", sp.erf, 1, "the error function", "erf(x)", spec=UNARY)

# ----- activations --------------------------------------------------------------
tanh = _make("tanh", sp.tanh, 1, "hyperbolic tangent", "tanh(x)", spec=UNARY)
sigmoid = _make("sigmoid", sigmoid, 1, "1 / (1 + exp(-x)), computed without overflow", "sigmoid(x)", spec=UNARY)
softplus = _make("softplus", softplus, 1, "log(1 + exp(x)), computed without overflow", "softplus(x)", spec=UNARY)
relu = _make("relu", lambda a: sp.Max(a, 0), 1, "max(x, 0); relu'(0) = 0", "relu(x)", spec=UNARY)


def _gelu(a, approximate=False):
    """x·Φ(x) (erf); approximate: ½x(1 + tanh(√(2/π)(x + 0.044715x³))), PyTorch's "tanh".

    The tanh form is written √(2/π)·x·(1 + 0.044715x²): a number times a sum is
    distributed by SymPy (√(2/π)x + √(2/π)·0.044715x³), which hides x from the residual
    pass and costs passes; a product of three factors is left alone."""
    if approximate:
        return a * (1 + sp.tanh(sp.Mul(_number(math.sqrt(2 / math.pi)), a, 1 + _number(0.044715) * a ** 2))) / 2
    return a * (1 + sp.erf(a / sp.sqrt(2))) / 2


_gelu_op = _make("gelu", _gelu, 1, "x·Φ(x), the exact erf form; approximate=True: the tanh form "
                 "(PyTorch's approximate='tanh')", "gelu(x, approximate=False)")


@spec_function(X, Param("approximate", "bool", False, False))
def gelu(x, approximate=False):
    """x·Φ(x) with the erf; ``approximate=True`` uses the tanh form, as PyTorch's ``approximate="tanh"``."""
    if not isinstance(approximate, bool):
        raise GraphError(f"gelu: approximate must be True or False, got {approximate!r}")
    return _gelu_op(x, approximate=True) if approximate else _gelu_op(x)


def _leaky(a, alpha):
    return sp.Piecewise((a, a > 0), (_number(alpha) * a, True))


_leaky_relu = _make("leaky_relu", _leaky, 1, "x if x > 0 else alpha·x", "leaky_relu(x, alpha=0.01)")


@spec_function(X, Param("alpha", "number", False, 0.01))
def leaky_relu(x, alpha=0.01):
    """x if x > 0 else alpha·x (alpha a number, default 0.01)."""
    _number(alpha)
    return _leaky_relu(x, alpha=float(alpha))


# ----- more unary math and activations ------------------------------------------
expm1 = _make("expm1", sc.expm1, 1, "e ** x − 1, accurate for small x", "expm1(x)", spec=UNARY)
square = _make("square", lambda a: a ** 2, 1, "x ** 2", "square(x)", spec=UNARY)
silu = _make("silu", lambda a: a * sc.sigmoid(a), 1, "x·σ(x) (swish), computed without overflow", "silu(x)", spec=UNARY)
log_sigmoid = _make("log_sigmoid", lambda a: -sc.softplus(-a), 1,
                    "log σ(x) = −softplus(−x), computed without overflow", "log_sigmoid(x)", spec=UNARY)


def _clip_scalar(a, lo, hi):
    return sp.Piecewise((lo, a < lo), (hi, a > hi), (a, True))


_clip = _make("clip", _clip_scalar, 3,
              "x limited to [lo, hi] (numbers); gradient 1 inside and on the borders, 0 outside (as torch.clamp)",
              "clip(x, lo, hi)")


@spec_function(X, Param("lo", "number"), Param("hi", "number"))
def clip(x, lo, hi):
    """x limited to [lo, hi] (numbers); the gradient is 1 inside and on the borders, 0 outside (as torch.clamp)."""
    lo_, hi_ = _number(lo), _number(hi)
    if lo_ > hi_:
        raise GraphError(f"clip: lo ({lo!r}) is greater than hi ({hi!r})")
    if not isinstance(x, Node):
        raise GraphError(f"clip() needs an array argument, got {x!r}")
    return _clip(x, lo_, hi_)


def safe_sqrt(x: Node, label: str = "sqrt") -> Node:
    """√x for x ≥ 0 whose derivative at 0 is 0 rather than ∞ (norm and std at zero, as PyTorch)."""
    s = sp.Symbol("%s", real=True)
    return ew_from_expr(sp.Piecewise((sp.sqrt(s), s > 0), (0, True)), {s: x}, label=label)


# ----- comparisons and selection (no gradient through the condition) ------------
greater = _make("greater", lambda a, b: sp.StrictGreaterThan(a, b), 2, "a > b", "a > b", False, "bool")
less = _make("less", lambda a, b: sp.StrictLessThan(a, b), 2, "a < b", "a < b", False, "bool")
greater_equal = _make("greater_equal", lambda a, b: sp.GreaterThan(a, b), 2, "a >= b", "a >= b", False, "bool")
less_equal = _make("less_equal", lambda a, b: sp.LessThan(a, b), 2, "a <= b", "a <= b", False, "bool")
equal = _make("equal", lambda a, b: sp.Eq(a, b), 2, "a == b", "a == b", False, "bool")


def _where_scalar(c, a, b):
    return sp.Piecewise((a, c), (b, True))


_where = _make("where", _where_scalar, 3, "a where cond else b (cond from a comparison)",
               "where(cond, a, b)")


@spec_function(Param("cond", "cond"), Param("a", "value"), Param("b", "value"))
def where(cond, a, b):
    """a where cond else b; cond is a boolean node (e.g. ``x > 0``)."""
    if not isinstance(cond, Node) or cond.dtype != "bool":
        raise GraphError("where() needs a comparison (such as x > 0) as its first argument")
    if not isinstance(a, Node) and not isinstance(b, Node):
        # two numbers have no array to take the dtype from (np.where(c, 1.0, 0.0) is
        # float64): one becomes a 0-d constant in the model's dtype, the other follows it
        from backcomp.ops.constants import full
        if a != 0 or b == 0:
            a = full((), a, graph=cond.graph)
        else:
            b = full((), b, graph=cond.graph)
    return _where(cond, a, b)
