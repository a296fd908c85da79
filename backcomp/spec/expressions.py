"""Spec expressions -> graph nodes, by walking ``ast.parse`` output against a whitelist.

Nothing in a spec is ever handed to ``eval``, ``exec``, ``sympify`` or ``parse_expr``:
only the syntax below is accepted, calls go to the functions declared with
``@spec_function`` (checked argument by argument), and every error names its column.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable

import sympy as sp

from backcomp import ops
from backcomp.graph import Graph, GraphError, Node, ShapeError
from backcomp.ops.elementwise import dim_from_value, dim_symbol
from backcomp.ops.registry import RegistryError
from backcomp.ops.signature import Param, SpecFunction, spec_functions
from backcomp.spec.text import MAX_AST_DEPTH, MAX_EXPR_CHARS, MAX_NESTING, SpecError, suggest, toml_type


# ----- the ops a spec may call: declared beside each builder (backcomp.ops.signature) -----
SPEC_OPS = spec_functions()


# ----- expressions ------------------------------------------------------------------------
_DISALLOWED = {
    ast.Lambda: "lambda", ast.ListComp: "a list comprehension", ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension", ast.GeneratorExp: "a generator expression",
    ast.Dict: "a dict", ast.Set: "a set", ast.IfExp: "a conditional expression ('a if c else b')",
    ast.BoolOp: "'and'/'or'", ast.NamedExpr: "':='", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield", ast.JoinedStr: "an f-string", ast.Starred: "'*' unpacking",
}
BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.MatMult: "@"}
_CMPOPS = {ast.Gt: "__gt__", ast.Lt: "__lt__", ast.GtE: "__ge__", ast.LtE: "__le__"}


@dataclass
class Where:
    """An expression's text and where it starts in the spec file."""
    path: str
    text: str
    line: int | None
    col: int | None
    context: str   # e.g. "in node 'h1'"

    @property
    def src(self) -> str:
        """What ``ast`` parses: the text in parentheses, so it may span lines."""
        return "(" + self.text + "\n)"

    def error(self, node: ast.AST | None, message: str, col_shift: int | None = None) -> SpecError:
        """An error at ``node`` (offsets are into ``src``), or at the string's start."""
        line, col = self.line, self.col
        if node is not None and line is not None and hasattr(node, "lineno"):
            src_lines = self.src.split("\n")
            lineno = min(node.lineno, len(src_lines) - 1)
            offset = node.col_offset if col_shift is None else col_shift
            chars = len(src_lines[lineno - 1].encode("utf-8")[:offset].decode("utf-8", errors="ignore"))
            if lineno == 1:
                chars = max(chars - 1, 0)
                col = (col or 1) + chars
            else:
                line, col = line + lineno - 1, chars + 1
        cut = message.find(" (did you mean")
        if cut >= 0 and self.context:   # "unknown function 'f' in node 'h' (did you mean 'g'?)"
            message = f"{message[:cut]} {self.context}{message[cut:]}"
        else:
            message = f"{message} {self.context}".rstrip()
        return SpecError(self.path, line, col, message)


def parse_expression(text: str, where: Where) -> ast.expr:
    """``ast.parse`` in eval mode, refusing what would exhaust the parser or the walker."""
    if not isinstance(text, str):
        raise where.error(None, f"expected an expression string, got {toml_type(text)}")
    if len(text) > MAX_EXPR_CHARS:
        raise where.error(None, f"expression is too long ({len(text)} characters; the limit is {MAX_EXPR_CHARS})")
    if not text.strip():
        raise where.error(None, "empty expression")
    if "\x00" in text:
        raise where.error(None, "expression contains a NUL character")
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise where.error(None, f"syntax error: unmatched '{ch}'")
    if deepest > MAX_NESTING:
        raise where.error(None, f"expression is nested too deeply ({deepest} levels of brackets; the limit is {MAX_NESTING})")
    if depth > 0:
        raise where.error(None, "syntax error: an opening bracket is never closed")
    try:
        tree = ast.parse(where.src, mode="eval")
    except SyntaxError as e:
        fake = ast.Constant(0)
        fake.lineno, fake.col_offset = e.lineno or 1, max((e.offset or 1) - 1, 0)
        msg = (e.msg or "invalid syntax").replace("invalid syntax. ", "")
        raise where.error(fake, f"syntax error: {msg}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise where.error(None, f"expression is nested too deeply to parse ({type(e).__name__}); "
                                "split it into several nodes") from None
    _check_depth(tree.body, where)
    return tree.body


def _check_depth(root: ast.AST, where: Where) -> None:
    stack = [(root, 1)]
    while stack:
        node, d = stack.pop()
        if d > MAX_AST_DEPTH:
            raise where.error(None, f"expression is nested too deeply (more than {MAX_AST_DEPTH} levels); "
                                    "split it into several nodes")
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(node))


def disallowed(node: ast.AST) -> str | None:
    for cls, what in _DISALLOWED.items():
        if isinstance(node, cls):
            return f"{what} is not allowed in a spec expression"
    return None


def number_value(node: ast.AST, where: Where, constants: dict[str, float]):
    """A compile-time number: a literal, a constant, or -/+ of one (no arrays)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return finite(node.value, node, where)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = number_value(node.operand, where, constants)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def finite(value, node, where):
    if isinstance(value, sp.Basic):   # arithmetic on symbolic dims: B * T, 1 / B
        return value
    if isinstance(value, int):
        if abs(value) > 2 ** 62:
            raise where.error(node, f"the number {str(value)[:20]}... is too large")
        return value
    if not math.isfinite(value):
        raise where.error(node, f"the number {value!r} is not finite")
    return value


class Walker:
    """Turns one expression's ast into graph nodes, checking every construct."""

    #: the spec's [steps] (``backcomp.spec.steps.Steps``): builds scan() calls and run.ys[i]
    steps = None

    def __init__(self, graph: Graph, names: dict[str, Node], constants: dict[str, float],
                 functions: dict[str, Callable], where: Where):
        self.graph, self.names, self.constants, self.functions, self.where = graph, names, constants, functions, where

    def err(self, node, message, col_shift=None):
        return self.where.error(node, message, col_shift)

    # -- values -------------------------------------------------------------------------
    def value(self, node: ast.AST):
        """A Node or a Python number."""
        bad = disallowed(node)
        if bad:
            raise self.err(node, bad)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                raise self.err(node, f"'{node.value}' is only allowed as the value of keepdims or approximate")
            if isinstance(node.value, (str, bytes)):
                raise self.err(node, "a string is only allowed as the first argument of einsum; "
                                     "a number or an array belongs here")
            if node.value is None or node.value is Ellipsis:
                raise self.err(node, f"'{ast.unparse(node)}' is only allowed inside a subscript")
            if isinstance(node.value, complex):
                raise self.err(node, "complex numbers are not supported")
            return finite(node.value, node, self.where)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.UnaryOp):
            return self.unary(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Attribute):
            return self.attribute(node)
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, ast.Compare):
            raise self.err(node, "a comparison is only allowed as the first argument of where()")
        if isinstance(node, (ast.Tuple, ast.List)):
            raise self.err(node, "a tuple is only allowed as axes, a shape, or the arrays of concatenate")
        raise self.err(node, f"{type(node).__name__} syntax is not allowed in a spec expression")

    def array(self, node: ast.AST, what: str, allow_int: bool = False) -> Node:
        v = self.value(node)
        if not isinstance(v, Node):
            raise self.err(node, f"{what} must be an array, not the number {v!r}")
        if not allow_int:
            self.no_int(v, node)
        return v

    def no_int(self, v, node):
        if isinstance(v, Node) and v.dtype == "int":
            what = f"integer input '{v.name}'" if v.op == "input" else "an integer value"
            raise self.err(node, f"{what} has no gradient and cannot be used in arithmetic; integers may be labels "
                                 "(cross_entropy), ids (take, embedding, one_hot), compared (masks) or indexed")

    def name(self, node: ast.Name):
        if node.id in self.constants:
            return self.constants[node.id]
        found = self.names.get(node.id)
        if found is not None:
            if found.dtype == "tuple":
                raise self.err(node, f"'{node.id}' is the result of scan(): read its parts as "
                                     f"{node.id}.carry[i] and {node.id}.ys[i]")
            return found
        if node.id in self.graph.dims:   # a symbolic dim is a number, bound when the module runs
            return dim_symbol(node.id)
        if node.id in SPEC_OPS or node.id in self.functions:
            raise self.err(node, f"'{node.id}' is a function; call it as {node.id}(...)")
        known = list(self.names) + list(self.constants)
        raise self.err(node, f"undefined name '{node.id}'{suggest(node.id, known)}")

    def _op_col(self, node: ast.BinOp | ast.Compare, symbol: str, left: ast.AST) -> int | None:
        """The byte offset of the operator, for errors that point at it."""
        lines = self.where.src.split("\n")
        if getattr(left, "end_lineno", None) != node.lineno:
            return None
        line = lines[node.lineno - 1].encode("utf-8")
        pos = line.find(symbol.encode(), left.end_col_offset)
        return pos if pos >= 0 else None

    def binop(self, node: ast.BinOp):
        symbol = BINOPS.get(type(node.op))
        if symbol is None:
            raise self.err(node, f"operator '{ast.unparse(node.op) if False else type(node.op).__name__}' "
                                 "is not allowed (use + - * / ** @)")
        a, b = self.value(node.left), self.value(node.right)
        self.no_int(a, node.left)
        self.no_int(b, node.right)
        col = self._op_col(node, symbol, node.left)
        if not isinstance(a, Node) and not isinstance(b, Node):
            if symbol == "@":
                raise self.err(node, "'@' needs arrays on both sides", col)
            return self.fold(a, b, symbol, node, col)
        if symbol == "@" and not (isinstance(a, Node) and isinstance(b, Node)):
            raise self.err(node, "'@' needs arrays on both sides (use * to scale by a number)", col)
        try:
            if symbol == "+":
                return a + b
            if symbol == "-":
                return a - b
            if symbol == "*":
                return a * b
            if symbol == "/":
                return a / b
            if symbol == "**":
                return a ** b
            return a @ b
        except (GraphError, ShapeError, RegistryError, ValueError, TypeError) as e:
            raise self.err(node, _clean(e), col) from None

    def fold(self, a, b, symbol, node, col):
        try:
            if symbol == "+":
                r = a + b
            elif symbol == "-":
                r = a - b
            elif symbol == "*":
                r = a * b
            elif symbol == "/":
                r = a / b
            elif isinstance(a, sp.Basic) or isinstance(b, sp.Basic):
                r = sp.Pow(a, b)
            else:
                r = float(a) ** float(b)
                if isinstance(r, complex):
                    raise ValueError("a negative number to a fractional power is not real")
        except ZeroDivisionError:
            raise self.err(node, "division by zero", col) from None
        except (OverflowError, ValueError) as e:
            raise self.err(node, f"cannot compute {a!r} {symbol} {b!r}: {e}", col) from None
        return finite(r, node, self.where)

    def unary(self, node: ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise self.err(node, f"operator '{'not' if isinstance(node.op, ast.Not) else '~'}' is not allowed")
        v = self.value(node.operand)
        self.no_int(v, node.operand)
        if isinstance(node.op, ast.UAdd):
            return v
        return -v

    def attribute(self, node: ast.Attribute):
        if node.attr in ("carry", "ys") and self.steps is not None:
            raise self.err(node, f"'{ast.unparse(node)}' is a tuple: index it, e.g. {ast.unparse(node)}[0]")
        if node.attr != "T":
            raise self.err(node, f"attribute access '.{node.attr}' is not allowed (only '.T')")
        v = self.array(node.value, "the operand of .T")
        return self.apply(node, ops.transpose, v)

    def subscript(self, node: ast.Subscript):
        if isinstance(node.value, ast.Attribute) and node.value.attr in ("carry", "ys") and self.steps is not None:
            return self.steps.part(self, node)
        x = self.array(node.value, "a subscripted value", allow_int=True)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        index = tuple(self.index_item(i) for i in items)
        return self.apply(node, ops.getitem, x, index)

    def index_item(self, node: ast.AST):
        if isinstance(node, ast.Constant) and (node.value is None or node.value is Ellipsis):
            return node.value
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else self.dim_or_int(p, "a slice bound")
                           for p in (node.lower, node.upper)),
                         None if node.step is None else self.int(node.step, "a slice step"))
        return self.int(node, "an index")

    def dim_or_int(self, node: ast.AST, what: str, minimum: int | None = None) -> int | str:
        """A symbolic dim written by its name (``B``), or a compile-time integer."""
        if isinstance(node, ast.Name) and node.id in self.graph.dims and node.id not in self.names:
            return node.id
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            v = self.value(node)
            if isinstance(v, sp.Basic):   # B * T, 4 * H: a product of dims
                dim = dim_from_value(v)
                if dim is None:
                    raise self.err(node, f"{what} must be an integer or a product of dims, got '{ast.unparse(node)}'")
                return dim
        return self.int(node, what, minimum=minimum)

    def int(self, node: ast.AST, what: str, expected: str = "an integer", minimum: int | None = None) -> int:
        """A compile-time integer (a literal or an integer constant), at least ``minimum``."""
        v = number_value(node, self.where, self.constants)
        if v is None and isinstance(node, ast.BinOp):   # arithmetic on integer constants: 2*H, H + 1
            folded = self.value(node)
            v = folded if isinstance(folded, int) and not isinstance(folded, bool) else None
        if v is None or isinstance(v, float) and not v.is_integer() or isinstance(node, ast.Constant) and isinstance(node.value, float):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                raise self.err(node, f"a string is not allowed here: {what} must be {expected}")
            raise self.err(node, f"{what} must be {expected}, got '{ast.unparse(node)}'")
        if minimum is not None and v < minimum:
            least = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f"at least {minimum}"
            raise self.err(node, f"{what} must be {least}, got {int(v)}")
        return int(v)

    def pair(self, node: ast.AST, what: str, minimum: int | None) -> int | tuple[int, int]:
        """An integer or an ``(h, w)`` pair of integers (conv and pool sizes, strides, paddings)."""
        expected = "an integer or an (h, w) pair of integers"
        if isinstance(node, (ast.Tuple, ast.List)):
            if len(node.elts) != 2:
                n = len(node.elts)
                raise self.err(node, f"{what} must be {expected}, got {n} value{'s' if n != 1 else ''}: "
                                     f"'{ast.unparse(node)}'")
            return tuple(self.int(e, f"the {'hw'[i]} value of {what}", "an integer", minimum)
                         for i, e in enumerate(node.elts))
        return self.int(node, what, expected, minimum)

    def widths(self, node: ast.AST, what: str):
        """np.pad's widths: an integer, a (before, after) pair, or a tuple of pairs (one per axis)."""
        expected = "an integer, a (before, after) pair, or one such pair per axis"

        def pair(n):
            if not isinstance(n, (ast.Tuple, ast.List)) or len(n.elts) != 2:
                raise self.err(n, f"{what} must be {expected}, got '{ast.unparse(n)}'")
            return tuple(self.int(e, f"a width in {what}", "an integer", 0) for e in n.elts)

        if not isinstance(node, (ast.Tuple, ast.List)):
            return self.int(node, what, expected, 0)
        if any(isinstance(e, (ast.Tuple, ast.List)) for e in node.elts):
            return tuple(pair(e) for e in node.elts)
        return pair(node)

    # -- calls ------------------------------------------------------------------------
    def call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            bad = disallowed(node.func)
            if bad:
                raise self.err(node.func, bad)
            raise self.err(node, "only calls of ops and [functions] by name are allowed "
                                 f"(not '{ast.unparse(node.func)}(...)')")
        fname = node.func.id
        if fname == "scan" and self.steps is not None and fname not in self.functions:
            return self.steps.call(self, node)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise self.err(node, "'*' and '**' unpacking are not allowed in calls")
        if fname in self.functions:
            if node.keywords:
                raise self.err(node.keywords[0].value, f"{fname}() takes no keyword arguments")
            args = [self.value(a) for a in node.args]
            for a, v in zip(node.args, args):
                self.no_int(v, a)
            return self.apply(node, self.functions[fname], *args)
        op = SPEC_OPS.get(fname)
        if op is None:
            if fname in self.names or fname in self.constants:
                raise self.err(node.func, f"'{fname}' is not a function")
            hint = suggest(fname, list(SPEC_OPS) + list(self.functions))
            raise self.err(node.func, f"unknown function '{fname}'{hint}")
        return self.call_op(node, op)

    def call_op(self, node: ast.Call, op: SpecFunction):
        params = list(op.params)
        given: dict[str, Any] = {}
        extra: list[Any] = []
        n_pos = len(node.args)
        if n_pos > len(params) and not op.variadic:
            raise self.err(node.args[len(params)], f"{op.name}() takes at most {len(params)} positional "
                                                   f"argument{'s' if len(params) != 1 else ''}, got {n_pos}: "
                                                   f"{op.signature()}")
        for i, a in enumerate(node.args):
            if i < len(params):
                given[params[i].name] = self.arg(a, params[i], op)
            else:
                extra.append(self.arg(a, Param("operand", op.variadic), op))
        for k in node.keywords:
            p = next((p for p in params if p.name == k.arg), None)
            if p is None or p.name not in op.keywords:
                allowed = ", ".join(op.keywords) or "none"
                raise self.err(k.value, f"{op.name}() got an unexpected keyword argument '{k.arg}' "
                                        f"(allowed: {allowed}){suggest(k.arg, op.keywords)}",
                               _kw_col(self.where.text, k))
            if p.name in given:
                raise self.err(k.value, f"{op.name}() got multiple values for argument '{k.arg}'")
            given[p.name] = self.arg(k.value, p, op)
        missing = [p.name for p in params if p.required and p.name not in given]
        if missing:
            raise self.err(node, f"{op.name}() is missing argument '{missing[0]}': {op.signature()}")
        if op.variadic and not extra:
            raise self.err(node, f"{op.name}() needs at least one operand: {op.name}(\"ij,jk->ik\", a, b)")
        return self.apply(node, op.call, given, tuple(extra), self.graph)

    def arg(self, node: ast.AST, p: Param, op: SpecFunction):
        what = f"argument '{p.name}' of {op.name}()"
        kind = p.kind
        if kind == "cond":
            if not isinstance(node, ast.Compare):
                raise self.err(node, f"{what} must be a comparison such as x > 0")
            return self.compare(node)
        if kind == "subscripts":
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                raise self.err(node, f"{what} must be a string such as \"ij,jk->ik\"")
            return node.value
        if kind in ("array", "label"):
            return self.array(node, what, allow_int=kind == "label")
        if kind == "node":   # grad's x: a value by name, not an expression
            if not isinstance(node, ast.Name) or not isinstance(self.names.get(node.id), Node):
                raise self.err(node, f"{what} must be the name of an input, param or node")
            return self.array(node, what)
        if kind == "value":
            v = self.value(node)
            self.no_int(v, node)
            return v
        if kind == "arrays":
            if not isinstance(node, (ast.Tuple, ast.List)):
                raise self.err(node, f"{what} must be a tuple of arrays, e.g. concatenate((a, b), axis=1)")
            return tuple(self.array(e, what) for e in node.elts)
        if kind == "number":
            v = number_value(node, self.where, self.constants)
            if v is None:
                raise self.err(node, f"{what} must be a number")
            return float(v)
        if kind == "bool":
            if not (isinstance(node, ast.Constant) and isinstance(node.value, bool)):
                raise self.err(node, f"{what} must be True or False")
            return node.value
        if kind == "dim":
            return self.dim_or_int(node, what, minimum=p.minimum)
        if kind in ("int", "pair"):
            if isinstance(node, ast.Constant) and node.value is None and not p.required and p.default is None:
                return None
            if kind == "pair":
                return self.pair(node, what, p.minimum)
            return self.int(node, what, minimum=p.minimum)
        if kind == "widths":
            return self.widths(node, what)
        if kind in ("axes", "ints", "shape"):
            if isinstance(node, ast.Constant) and node.value is None:
                if kind == "shape":
                    raise self.err(node, f"{what} must be a tuple of integers")
                return None
            if isinstance(node, (ast.Tuple, ast.List)):
                if kind == "shape":
                    return tuple(self.dim_or_int(e, what) for e in node.elts)
                return tuple(self.int(e, what) for e in node.elts)
            if kind == "axes":
                return self.int(node, what)
            raise self.err(node, f"{what} must be a tuple of integers, e.g. (1, 0)")
        raise AssertionError(kind)

    def compare(self, node: ast.Compare):
        if len(node.ops) != 1:
            raise self.err(node, "chained comparisons are not allowed; compare two values")
        method = _CMPOPS.get(type(node.ops[0]))
        if method is None:
            raise self.err(node, "only <, <=, > and >= comparisons are allowed")
        a, b = self.value(node.left), self.value(node.comparators[0])   # integers too: masks
        if not isinstance(a, Node):
            if not isinstance(b, Node):
                raise self.err(node, "a comparison needs an array on at least one side")
            a, b = b, a
            method = {"__gt__": "__lt__", "__lt__": "__gt__", "__ge__": "__le__", "__le__": "__ge__"}[method]
        return self.apply(node, getattr(a, method), b)

    def apply(self, node: ast.AST, fn: Callable, *args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except (GraphError, ShapeError, RegistryError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, ZeroDivisionError) as e:
            col = None
            if isinstance(node, ast.Call):
                col = node.func.col_offset
            raise self.err(node, _clean(e), col) from None
        if not isinstance(out, Node):
            raise self.err(node, "expression does not produce an array")
        return out


def _kw_col(text: str, k: ast.keyword) -> int | None:
    return getattr(k, "col_offset", None)


def _clean(e: Exception) -> str:
    msg = str(e) or type(e).__name__
    if isinstance(e, (TypeError, AttributeError, IndexError, KeyError)):
        return f"invalid arguments: {msg}"
    return msg

