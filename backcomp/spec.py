"""TOML spec -> Graph, with a safe ``ast``-based expression parser.

A spec declares a model in sections ([model], [inputs], [params], [constants],
[functions], [graph]); docs/spec.md is the reference.  Expressions are parsed by
``ast.parse`` and walked against a whitelist: nothing in a spec is ever handed to
``eval``, ``exec``, ``sympify`` or ``parse_expr``.  ``[functions]`` bodies are
walked the same way into SymPy expressions, so their derivatives are derived.

Every error is a ``SpecError`` that names the place, compiler style:
``mlp.toml:14:12: error: unknown function 'relux' in node 'h1' (did you mean 'relu'?)``.
tomllib reports no positions, so ``_Locator`` finds keys and values in the raw
text, and a column inside an expression is the string's start column plus the
ast node's offset.
"""
from __future__ import annotations

import ast
import difflib
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import sympy as sp

from backcomp import ops
from backcomp.graph import Graph, GraphError, Node, ShapeError, format_shape
from backcomp.ops.registry import RegistryError
from backcomp.ops.scalar import SCALAR_FUNCTIONS

#: hostile-input guards
MAX_EXPR_CHARS = 10_000
MAX_NESTING = 64          # brackets inside one expression
MAX_AST_DEPTH = 200       # e.g. a + a + ... + a chains
MAX_PARAM_ELEMENTS = 10 ** 9
MAX_SPEC_BYTES = 5_000_000

SECTIONS = ("model", "inputs", "params", "constants", "functions", "graph")
MODEL_KEYS = ("name", "loss", "outputs", "wrt")
DTYPES = {"float": "float", "float32": "float", "float64": "float",
          "int": "int", "int32": "int", "int64": "int"}


class SpecError(ValueError):
    """A problem in a spec file, located at ``path:line:col``."""

    def __init__(self, path: str, line: int | None, col: int | None, message: str):
        self.path, self.line, self.col, self.message = str(path), line, col, message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        return f"{where}: error: {self.message}"


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----- where things are in the raw text ----------------------------------------------
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=\s*""")


class _Locator:
    """Line and column (1-based) of sections, keys and values in the TOML text."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.sections: dict[str, tuple[int, int]] = {}
        self.keys: dict[tuple[str, str], tuple[int, int, int]] = {}
        section = ""
        in_multiline = False
        for i, raw in enumerate(self.lines, 1):
            if in_multiline:
                if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                    in_multiline = False
                continue
            m = _HEADER.match(raw)
            if m and not raw.lstrip().startswith("[["):
                section = m.group(1).strip().strip('"')
                self.sections.setdefault(section, (i, raw.index("[") + 1))
                continue
            m = _KEY.match(raw)
            if m:
                key = m.group(1)
                if key[0] in "\"'":
                    key = key[1:-1]
                self.keys.setdefault((section, key), (i, m.start(1) + 1, m.end() + 1))
                rest = raw[m.end():]
                if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                    in_multiline = True

    def section(self, name: str) -> tuple[int | None, int | None]:
        return self.sections.get(name, (None, None))

    def key(self, section: str, key: str) -> tuple[int | None, int | None]:
        if (section, key) in self.keys:
            line, col, _ = self.keys[(section, key)]
            return line, col
        return self.section(section)

    def value(self, section: str, key: str, sub: str | None = None) -> tuple[int | None, int | None]:
        """Where the value of ``key`` (or of ``sub`` in its inline table) starts."""
        if (section, key) not in self.keys:
            return self.section(section)
        line, col, vcol = self.keys[(section, key)]
        if sub is not None:
            m = re.compile(rf"""(?:\b|["']){re.escape(sub)}["']?\s*=\s*""").search(self.lines[line - 1], vcol - 1)
            if m:
                return line, m.end() + 1
            return line, col
        return line, vcol

    def string_start(self, line: int | None, col: int | None) -> tuple[int | None, int | None]:
        """Where a string's contents start, given where its opening quote is."""
        if line is None or col is None:
            return line, col
        text = self.lines[line - 1]
        head = text[col - 1:col + 2]
        if head in ('"""', "'''"):
            if text[col + 2:].strip() == "":
                return line + 1, 1
            return line, col + 3
        if head[:1] in ("'", '"'):
            return line, col + 1
        return line, col


# ----- the ops a spec may call -----------------------------------------------------------
@dataclass(frozen=True)
class Param:
    name: str
    kind: str            # see ``_Walker.arg`` for the kinds
    required: bool = True
    default: Any = None
    minimum: int | None = None   # the least value of an "int" or "pair" (sizes, strides, paddings)


@dataclass(frozen=True)
class SpecOp:
    name: str
    fn: Callable
    params: tuple[Param, ...]
    variadic: str | None = None   # kind of extra positional args (einsum operands)
    doc: str = ""

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.kind not in ("array", "value", "label", "cond", "arrays", "subscripts",
                                                                   "node"))

    def signature(self) -> str:
        parts = []
        for p in self.params:
            parts.append(p.name if p.required else f"{p.name}={p.default!r}")
        if self.variadic:
            parts.append("*operands")
        return f"{self.name}({', '.join(parts)})"


def _unary(name: str, fn: Callable) -> SpecOp:
    return SpecOp(name, fn, (Param("x", "array"),))


def _binary(name: str, fn: Callable, a="a", b="b", kinds=("value", "value")) -> SpecOp:
    return SpecOp(name, fn, (Param(a, kinds[0]), Param(b, kinds[1])))


def _reduction(name: str) -> SpecOp:
    return SpecOp(name, getattr(ops, name), (Param("x", "array"), Param("axis", "axes", False, None),
                                             Param("keepdims", "bool", False, False)))


def _spec_ops() -> dict[str, SpecOp]:
    table: dict[str, SpecOp] = {}
    for name in ("relu", "sigmoid", "tanh", "exp", "log", "log1p", "sqrt", "abs", "softplus"):
        table[name] = _unary(name, getattr(ops, name))
    table["gelu"] = SpecOp("gelu", ops.gelu, (Param("x", "array"), Param("approximate", "bool", False, False)))
    for name in ("erf", "sin", "cos", "stop_gradient", "expm1", "square", "log_sigmoid", "silu"):
        table[name] = _unary(name, getattr(ops, name))
    table["clip"] = SpecOp("clip", ops.clip, (Param("x", "array"), Param("lo", "number"), Param("hi", "number")))
    table["leaky_relu"] = SpecOp("leaky_relu", ops.leaky_relu,
                                 (Param("x", "array"), Param("alpha", "number", False, 0.01)))
    table["maximum"] = _binary("maximum", ops.maximum)
    table["minimum"] = _binary("minimum", ops.minimum)
    table["where"] = SpecOp("where", ops.where, (Param("cond", "cond"), Param("a", "value"), Param("b", "value")))
    for name in ("sum", "mean", "max", "min", "logsumexp", "norm"):
        table[name] = _reduction(name)
    for name in ("var", "std"):
        table[name] = SpecOp(name, getattr(ops, name),
                             _reduction(name).params + (Param("ddof", "int", False, 0, minimum=0),))
    for name in ("softmax", "log_softmax"):
        table[name] = SpecOp(name, getattr(ops, name), (Param("x", "array"), Param("axis", "int", False, -1)))
    table["softmax_cross_entropy"] = _binary("softmax_cross_entropy", ops.softmax_cross_entropy,
                                             "logits", "y", ("array", "label"))
    table["sigmoid_binary_cross_entropy"] = _binary("sigmoid_binary_cross_entropy",
                                                    ops.sigmoid_binary_cross_entropy, "z", "y", ("array", "value"))
    table["mse"] = _binary("mse", ops.mse, "a", "b", ("array", "value"))
    table["transpose"] = SpecOp("transpose", ops.transpose, (Param("x", "array"), Param("axes", "ints", False, None)))
    table["reshape"] = SpecOp("reshape", ops.reshape, (Param("x", "array"), Param("shape", "shape")))
    table["concatenate"] = SpecOp("concatenate", ops.concatenate,
                                  (Param("arrays", "arrays"), Param("axis", "int", False, 0)))
    table["einsum"] = SpecOp("einsum", ops.einsum, (Param("subscripts", "subscripts"),), variadic="array")
    table["conv2d"] = SpecOp("conv2d", ops.conv2d, (Param("x", "array"), Param("w", "array"),
                                                    Param("stride", "pair", False, 1, minimum=1),
                                                    Param("padding", "pair", False, 0, minimum=0)))
    table["grad"] = SpecOp("grad", ops.grad, (Param("y", "array"), Param("x", "node")))
    for pool in ("max_pool2d", "avg_pool2d"):
        table[pool] = SpecOp(pool, getattr(ops, pool), (Param("x", "array"), Param("size", "pair", minimum=1),
                                                        Param("stride", "pair", False, None, minimum=1)))
    return table


SPEC_OPS = _spec_ops()


# ----- expressions ------------------------------------------------------------------------
_DISALLOWED = {
    ast.Lambda: "lambda", ast.ListComp: "a list comprehension", ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension", ast.GeneratorExp: "a generator expression",
    ast.Dict: "a dict", ast.Set: "a set", ast.IfExp: "a conditional expression ('a if c else b')",
    ast.BoolOp: "'and'/'or'", ast.NamedExpr: "':='", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield", ast.JoinedStr: "an f-string", ast.Starred: "'*' unpacking",
}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.MatMult: "@"}
_CMPOPS = {ast.Gt: "__gt__", ast.Lt: "__lt__", ast.GtE: "__ge__", ast.LtE: "__le__"}


@dataclass
class _Where:
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


def parse_expression(text: str, where: _Where) -> ast.expr:
    """``ast.parse`` in eval mode, refusing what would exhaust the parser or the walker."""
    if not isinstance(text, str):
        raise where.error(None, f"expected an expression string, got {_toml_type(text)}")
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


def _check_depth(root: ast.AST, where: _Where) -> None:
    stack = [(root, 1)]
    while stack:
        node, d = stack.pop()
        if d > MAX_AST_DEPTH:
            raise where.error(None, f"expression is nested too deeply (more than {MAX_AST_DEPTH} levels); "
                                    "split it into several nodes")
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(node))


def _toml_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _disallowed(node: ast.AST) -> str | None:
    for cls, what in _DISALLOWED.items():
        if isinstance(node, cls):
            return f"{what} is not allowed in a spec expression"
    return None


def _number_value(node: ast.AST, where: _Where, constants: dict[str, float]):
    """A compile-time number: a literal, a constant, or -/+ of one (no arrays)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _finite(node.value, node, where)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _number_value(node.operand, where, constants)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def _finite(value, node, where):
    if isinstance(value, int):
        if abs(value) > 2 ** 62:
            raise where.error(node, f"the number {str(value)[:20]}... is too large")
        return value
    if not math.isfinite(value):
        raise where.error(node, f"the number {value!r} is not finite")
    return value


class _Walker:
    """Turns one expression's ast into graph nodes, checking every construct."""

    def __init__(self, graph: Graph, names: dict[str, Node], constants: dict[str, float],
                 functions: dict[str, Callable], where: _Where):
        self.graph, self.names, self.constants, self.functions, self.where = graph, names, constants, functions, where

    def err(self, node, message, col_shift=None):
        return self.where.error(node, message, col_shift)

    # -- values -------------------------------------------------------------------------
    def value(self, node: ast.AST):
        """A Node or a Python number."""
        bad = _disallowed(node)
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
            return _finite(node.value, node, self.where)
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
            raise self.err(node, f"integer input '{v.name}' has no gradient and cannot be used in arithmetic; "
                                 "integer inputs can only be the labels of softmax_cross_entropy")

    def name(self, node: ast.Name):
        if node.id in self.constants:
            return self.constants[node.id]
        found = self.names.get(node.id)
        if found is not None:
            return found
        if node.id in SPEC_OPS or node.id in self.functions:
            raise self.err(node, f"'{node.id}' is a function; call it as {node.id}(...)")
        known = list(self.names) + list(self.constants)
        raise self.err(node, f"undefined name '{node.id}'{_suggest(node.id, known)}")

    def _op_col(self, node: ast.BinOp | ast.Compare, symbol: str, left: ast.AST) -> int | None:
        """The byte offset of the operator, for errors that point at it."""
        lines = self.where.src.split("\n")
        if getattr(left, "end_lineno", None) != node.lineno:
            return None
        line = lines[node.lineno - 1].encode("utf-8")
        pos = line.find(symbol.encode(), left.end_col_offset)
        return pos if pos >= 0 else None

    def binop(self, node: ast.BinOp):
        symbol = _BINOPS.get(type(node.op))
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
            else:
                r = float(a) ** float(b)
                if isinstance(r, complex):
                    raise ValueError("a negative number to a fractional power is not real")
        except ZeroDivisionError:
            raise self.err(node, "division by zero", col) from None
        except (OverflowError, ValueError) as e:
            raise self.err(node, f"cannot compute {a!r} {symbol} {b!r}: {e}", col) from None
        return _finite(r, node, self.where)

    def unary(self, node: ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise self.err(node, f"operator '{'not' if isinstance(node.op, ast.Not) else '~'}' is not allowed")
        v = self.value(node.operand)
        self.no_int(v, node.operand)
        if isinstance(node.op, ast.UAdd):
            return v
        return -v

    def attribute(self, node: ast.Attribute):
        if node.attr != "T":
            raise self.err(node, f"attribute access '.{node.attr}' is not allowed (only '.T')")
        v = self.array(node.value, "the operand of .T")
        return self.apply(node, ops.transpose, v)

    def subscript(self, node: ast.Subscript):
        x = self.array(node.value, "a subscripted value")
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        index = tuple(self.index_item(i) for i in items)
        return self.apply(node, ops.getitem, x, index)

    def index_item(self, node: ast.AST):
        if isinstance(node, ast.Constant) and (node.value is None or node.value is Ellipsis):
            return node.value
        if isinstance(node, ast.Slice):
            return slice(*(None if p is None else self.int(p, "a slice bound") for p in (node.lower, node.upper, node.step)))
        return self.int(node, "an index")

    def int(self, node: ast.AST, what: str, expected: str = "an integer", minimum: int | None = None) -> int:
        """A compile-time integer (a literal or an integer constant), at least ``minimum``."""
        v = _number_value(node, self.where, self.constants)
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

    # -- calls ------------------------------------------------------------------------
    def call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name):
            bad = _disallowed(node.func)
            if bad:
                raise self.err(node.func, bad)
            raise self.err(node, "only calls of ops and [functions] by name are allowed "
                                 f"(not '{ast.unparse(node.func)}(...)')")
        fname = node.func.id
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
            hint = _suggest(fname, list(SPEC_OPS) + list(self.functions))
            raise self.err(node.func, f"unknown function '{fname}'{hint}")
        return self.call_op(node, op)

    def call_op(self, node: ast.Call, op: SpecOp):
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
                                        f"(allowed: {allowed}){_suggest(k.arg, op.keywords)}",
                               _kw_col(self.where.text, k))
            if p.name in given:
                raise self.err(k.value, f"{op.name}() got multiple values for argument '{k.arg}'")
            given[p.name] = self.arg(k.value, p, op)
        missing = [p.name for p in params if p.required and p.name not in given]
        if missing:
            raise self.err(node, f"{op.name}() is missing argument '{missing[0]}': {op.signature()}")
        if op.variadic and not extra:
            raise self.err(node, f"{op.name}() needs at least one operand: {op.name}(\"ij,jk->ik\", a, b)")
        kwargs = {p.name: given[p.name] for p in params if p.name in given}
        if op.name in ("transpose", "reshape") or op.name == "einsum":
            args = [kwargs.pop(p.name) for p in params if p.name in kwargs]
            return self.apply(node, op.fn, *args, *extra, **kwargs)
        first = kwargs.pop(params[0].name)
        return self.apply(node, op.fn, first, *(kwargs.pop(p.name) for p in params[1:] if p.kind in
                                                ("array", "value", "label", "cond", "node") and p.name in kwargs),
                          **kwargs)

    def arg(self, node: ast.AST, p: Param, op: SpecOp):
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
            v = _number_value(node, self.where, self.constants)
            if v is None:
                raise self.err(node, f"{what} must be a number")
            return float(v)
        if kind == "bool":
            if not (isinstance(node, ast.Constant) and isinstance(node.value, bool)):
                raise self.err(node, f"{what} must be True or False")
            return node.value
        if kind in ("int", "pair"):
            if isinstance(node, ast.Constant) and node.value is None and not p.required and p.default is None:
                return None
            if kind == "pair":
                return self.pair(node, what, p.minimum)
            return self.int(node, what, minimum=p.minimum)
        if kind in ("axes", "ints", "shape"):
            if isinstance(node, ast.Constant) and node.value is None:
                if kind == "shape":
                    raise self.err(node, f"{what} must be a tuple of integers")
                return None
            if isinstance(node, (ast.Tuple, ast.List)):
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
        a, b = self.value(node.left), self.value(node.comparators[0])
        self.no_int(a, node.left)
        self.no_int(b, node.comparators[0])
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


# ----- [functions]: scalar SymPy expressions --------------------------------------------
_SCALAR_EXTRA = {"relu": lambda a: sp.Max(a, 0), "maximum": sp.Max, "minimum": sp.Min,
                 "gelu": lambda a: a * (1 + sp.erf(a / sp.sqrt(2))) / 2}
_ARITY = {"maximum": 2, "minimum": 2}


class _ScalarWalker:
    """Walks a [functions] body into a SymPy expression (never sympify)."""

    def __init__(self, args: dict[str, sp.Symbol], constants: dict[str, float],
                 resolve: Callable[[str, ast.AST], tuple[tuple[sp.Symbol, ...], sp.Expr]], where: _Where):
        self.args, self.constants, self.resolve, self.where = args, constants, resolve, where

    def expr(self, node: ast.AST) -> sp.Expr:
        bad = _disallowed(node)
        if bad:
            raise self.where.error(node, bad)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.where.error(node, f"'{ast.unparse(node)}' is not allowed here: a [functions] body "
                                             "uses numbers, its arguments, constants and scalar functions")
            v = _finite(node.value, node, self.where)
            return sp.Integer(v) if isinstance(v, int) else sp.Float(v, 17)
        if isinstance(node, ast.Name):
            if node.id in self.args:
                return self.args[node.id]
            if node.id in self.constants:
                v = self.constants[node.id]
                return sp.Integer(v) if isinstance(v, int) else sp.Float(v, 17)
            known = list(self.args) + list(self.constants)
            raise self.where.error(node, f"undefined name '{node.id}'{_suggest(node.id, known)} "
                                         "(a function body may use its arguments and [constants])")
        if isinstance(node, ast.BinOp):
            symbol = _BINOPS.get(type(node.op))
            if symbol is None or symbol == "@":
                raise self.where.error(node, "only + - * / ** are allowed in a [functions] body")
            a, b = self.expr(node.left), self.expr(node.right)
            if symbol == "/" and b == 0:
                raise self.where.error(node, "division by zero")
            return {"+": sp.Add, "-": lambda x, y: x - y, "*": sp.Mul, "/": lambda x, y: x / y,
                    "**": sp.Pow}[symbol](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.expr(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.keywords:
                raise self.where.error(node.keywords[0].value, "keyword arguments are not allowed in a [functions] body")
            fname = node.func.id
            args = [self.expr(a) for a in node.args]
            fn = SCALAR_FUNCTIONS.get(fname) or _SCALAR_EXTRA.get(fname)
            if fn is not None:
                want = _ARITY.get(fname, 1)
                if len(args) != want:
                    raise self.where.error(node, f"{fname}() takes {want} argument{'s' if want > 1 else ''}, got {len(args)}")
                return fn(*args)
            params, body = self.resolve(fname, node.func)
            if len(args) != len(params):
                raise self.where.error(node, f"{fname}() takes {len(params)} arguments, got {len(args)}")
            return body.xreplace(dict(zip(params, args)))
        if isinstance(node, ast.Compare):
            raise self.where.error(node, "comparisons are not allowed in a [functions] body")
        raise self.where.error(node, f"{type(node).__name__} syntax is not allowed in a [functions] body")


# ----- the spec ---------------------------------------------------------------------------
class _Loader:
    def __init__(self, text: str, path: str, stem: str):
        self.text, self.path, self.stem = text, path, stem
        self.loc = _Locator(text)

    def fail(self, where: tuple[int | None, int | None], message: str) -> SpecError:
        return SpecError(self.path, where[0], where[1], message)

    def load(self) -> Graph:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            msg = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(e))
            if m:
                raise SpecError(self.path, int(m.group(1)), int(m.group(2)), f"invalid TOML: {msg}") from None
            n = len(self.text.split("\n"))
            raise SpecError(self.path, n, 1, f"invalid TOML: {msg}") from None
        for key, value in data.items():
            if key not in SECTIONS:
                where = self.loc.section(key) if key in self.loc.sections else self.loc.key("", key)
                raise self.fail(where if where[0] else (1, 1),
                                f"unknown section [{key}]{_suggest(key, SECTIONS)} (sections: {', '.join(SECTIONS)})")
            if not isinstance(value, dict):
                raise self.fail(self.loc.key("", key), f"'{key}' must be a [{key}] table, not {_toml_type(value)}")
        self.data = data
        model = data.get("model", {})
        for key in model:
            if key not in MODEL_KEYS:
                raise self.fail(self.loc.key("model", key),
                                f"unknown key '{key}' in [model]{_suggest(key, MODEL_KEYS)} (keys: {', '.join(MODEL_KEYS)})")
        graph = self.make_graph(model)
        self.used: dict[str, str] = {}
        self.constants = self.load_constants(data.get("constants", {}))
        self.load_inputs(graph, data.get("inputs", {}))
        self.load_params(graph, data.get("params", {}))
        self.functions = self.load_functions(data.get("functions", {}))
        self.load_graph(graph, data.get("graph", {}))
        self.finish(graph, model)
        return graph

    def make_graph(self, model: dict) -> Graph:
        name = model.get("name", self.stem)
        where = self.loc.value("model", "name") if "name" in model else (1, 1)
        if not isinstance(name, str):
            raise self.fail(where, f"[model] name must be a string, not {_toml_type(name)}")
        if not name.isidentifier() or name.startswith("_"):
            if "name" in model:
                raise self.fail(where, f"model name '{name}' is not a valid Python identifier")
            raise self.fail(where, f"model name '{name}' (from the file name) is not a valid Python identifier; "
                                   "set name = \"...\" in [model]")
        return Graph(name)

    def claim(self, name: str, section: str) -> None:
        where = self.loc.key(section, name)
        if not name.isidentifier():
            raise self.fail(where, f"'{name}' is not a valid name (use letters, digits and _)")
        if name.startswith("_"):
            raise self.fail(where, f"name '{name}' must not start with '_'")
        if name in SPEC_OPS or name in ("T",):
            raise self.fail(where, f"'{name}' is the name of a built-in op; choose another name")
        if name in self.used:
            raise self.fail(where, f"duplicate name '{name}': already defined in [{self.used[name]}]")
        self.used[name] = section

    def load_constants(self, table: dict) -> dict[str, float]:
        out = {}
        for name, value in table.items():
            self.claim(name, "constants")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(self.loc.value("constants", name),
                                f"constant '{name}' must be a number, not {_toml_type(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(self.loc.value("constants", name), f"constant '{name}' must be finite")
            out[name] = value
        return out

    def shape(self, section: str, name: str, value, sub: str | None = None) -> tuple:
        where = self.loc.value(section, name, sub)
        what = f"{section[:-1]} '{name}'"
        if not isinstance(value, list):
            raise self.fail(where, f"shape of {what} must be an array such as [\"B\", 10], not {_toml_type(value)}")
        for d in value:
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                if isinstance(d, float):
                    raise self.fail(where, f"shape of {what}: dimension {d!r} is not an integer")
                raise self.fail(where, f"shape of {what}: dimension {d!r} must be a positive integer or a name")
            if isinstance(d, int) and d <= 0:
                raise self.fail(where, f"shape of {what}: dimension {d} must be positive")
            if isinstance(d, str) and not d.isidentifier():
                raise self.fail(where, f"shape of {what}: symbolic dimension '{d}' must be an identifier")
        size = math.prod(d for d in value if isinstance(d, int))
        if size > MAX_PARAM_ELEMENTS:
            raise self.fail(where, f"{what} has {size:.3g} elements; backcomp refuses fixed sizes above "
                                   f"{MAX_PARAM_ELEMENTS:.0e} elements")
        return tuple(value)

    def table_entry(self, section: str, name: str, value, allowed: tuple[str, ...]) -> dict:
        if isinstance(value, dict):
            for k in value:
                if k not in allowed:
                    raise self.fail(self.loc.value(section, name, k) if k else self.loc.key(section, name),
                                    f"unknown key '{k}' for {section[:-1]} '{name}'{_suggest(k, allowed)} "
                                    f"(keys: {', '.join(allowed)})")
            if "shape" not in value:
                raise self.fail(self.loc.value(section, name), f"{section[:-1]} '{name}' needs a shape")
            return value
        return {"shape": value}

    def load_inputs(self, graph: Graph, table: dict) -> None:
        for name, value in table.items():
            self.claim(name, "inputs")
            entry = self.table_entry("inputs", name, value, ("shape", "dtype"))
            shape = self.shape("inputs", name, entry["shape"], "shape" if isinstance(value, dict) else None)
            dtype = entry.get("dtype", "float")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise self.fail(self.loc.value("inputs", name, "dtype"),
                                f"input '{name}': unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
            try:
                graph.input(name, shape, DTYPES[dtype])
            except (GraphError, ShapeError) as e:
                raise self.fail(self.loc.value("inputs", name), str(e)) from None

    def load_params(self, graph: Graph, table: dict) -> None:
        total = 0
        for name, value in table.items():
            self.claim(name, "params")
            entry = self.table_entry("params", name, value, ("shape", "init"))
            shape = self.shape("params", name, entry["shape"], "shape" if isinstance(value, dict) else None)
            if any(isinstance(d, str) for d in shape):
                raise self.fail(self.loc.value("params", name, "shape" if isinstance(value, dict) else None),
                                f"param '{name}': shape {format_shape(shape)} must be fixed (no symbolic dims)")
            total += math.prod(shape)
            if total > MAX_PARAM_ELEMENTS:
                raise self.fail(self.loc.value("params", name),
                                f"the params have {total:.3g} elements in all; backcomp refuses more than "
                                f"{MAX_PARAM_ELEMENTS:.0e}")
            init = entry.get("init")
            try:
                graph.param(name, shape, init)
            except (GraphError, ShapeError) as e:
                where = self.loc.value("params", name, "init" if init is not None else None)
                raise self.fail(where, str(e)) from None

    def load_functions(self, table: dict) -> dict[str, Callable]:
        bodies: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] = {}
        active: list[str] = []

        def resolve(fname: str, at: ast.AST | None) -> tuple[tuple[sp.Symbol, ...], sp.Expr]:
            if fname in bodies:
                return bodies[fname]
            if fname not in table:
                hint = _suggest(fname, list(SCALAR_FUNCTIONS) + list(_SCALAR_EXTRA) + list(table))
                raise current[-1].error(at, f"unknown scalar function '{fname}'{hint}")
            if fname in active:
                cycle = " -> ".join(active[active.index(fname):] + [fname])
                raise current[-1].error(at, f"[functions] are recursive: {cycle}")
            active.append(fname)
            bodies[fname] = build_body(fname, table[fname])
            active.pop()
            return bodies[fname]

        current: list[_Where] = []

        def build_body(fname: str, value) -> tuple[tuple[sp.Symbol, ...], sp.Expr]:
            where = self.loc.value("functions", fname)
            if not isinstance(value, dict):
                raise self.fail(where, f"function '{fname}' must be a table {{ args = [...], expr = \"...\" }}")
            for k in value:
                if k not in ("args", "expr"):
                    raise self.fail(self.loc.value("functions", fname, k),
                                    f"unknown key '{k}' for function '{fname}'{_suggest(k, ('args', 'expr'))} (keys: args, expr)")
            args = value.get("args")
            if not isinstance(args, list) or not args or not all(isinstance(a, str) and a.isidentifier() for a in args):
                raise self.fail(self.loc.value("functions", fname, "args") if "args" in value else where,
                                f"function '{fname}': args must be a non-empty array of argument names")
            if len(set(args)) != len(args):
                raise self.fail(self.loc.value("functions", fname, "args"), f"function '{fname}': repeated argument name")
            if "expr" not in value:
                raise self.fail(where, f"function '{fname}' needs an expr")
            line, col = self.loc.string_start(*self.loc.value("functions", fname, "expr"))
            w = _Where(self.path, value["expr"] if isinstance(value["expr"], str) else "", line, col,
                       f"in function '{fname}'")
            tree = parse_expression(value["expr"], w)
            current.append(w)
            symbols = {a: sp.Symbol(a, real=True) for a in args}
            body = _ScalarWalker(symbols, self.constants, resolve, w).expr(tree)
            current.pop()
            return tuple(symbols[a] for a in args), body

        out = {}
        for fname in table:
            self.claim(fname, "functions")
            if fname in SCALAR_FUNCTIONS:
                raise self.fail(self.loc.key("functions", fname), f"'{fname}' is a built-in function; choose another name")
        for fname in table:
            params, body = resolve(fname, None)
            try:
                out[fname] = ops.scalar_function(fname, params, body)
            except (GraphError, ValueError) as e:
                raise self.fail(self.loc.value("functions", fname), str(e)) from None
        return out

    def load_graph(self, graph: Graph, table: dict) -> None:
        trees: dict[str, tuple[ast.expr, _Where]] = {}
        for name, text in table.items():
            self.claim(name, "graph")
            line, col = self.loc.value("graph", name)
            if not isinstance(text, str):
                raise self.fail((line, col), f"node '{name}' must be an expression string, not {_toml_type(text)}")
            line, col = self.loc.string_start(line, col)
            where = _Where(self.path, text, line, col, f"in node '{name}'")
            trees[name] = (parse_expression(text, where), where)
        deps = {name: [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in table]
                for name, (tree, _) in trees.items()}
        names: dict[str, Node] = dict(graph.inputs) | dict(graph.params)
        for name in _topological(deps, lambda cycle: self.fail(
                self.loc.value("graph", cycle[0]), f"cycle in [graph]: {' -> '.join(cycle)}")):
            tree, where = trees[name]
            walker = _Walker(graph, names, self.constants, self.functions, where)
            with graph.scoped(name):
                value = walker.value(tree)
                if not isinstance(value, Node):
                    raise where.error(tree, "this expression is a constant number; put it in [constants]")
                try:
                    node = graph.assign_name(name, value)
                except GraphError as e:
                    raise where.error(tree, str(e)) from None
            names[name] = node

    def finish(self, graph: Graph, model: dict) -> None:
        known = dict(graph.inputs) | dict(graph.params) | {n: graph.lookup(n) for n in self.data.get("graph", {})}
        loss = model.get("loss")
        if loss is None:
            if graph.lookup("loss") is not None and "loss" in self.data.get("graph", {}):
                loss = "loss"
            else:
                raise self.fail(self.loc.section("model") if "model" in self.data else (1, 1),
                                "no loss: set loss = \"<node>\" in [model]")
        where = self.loc.value("model", "loss")
        if not isinstance(loss, str):
            raise self.fail(where, f"[model] loss must be a node name, not {_toml_type(loss)}")
        if loss not in known:
            raise self.fail(where, f"loss '{loss}' is not a node{_suggest(loss, known)}")
        try:
            graph.loss(known[loss], loss)
        except GraphError as e:
            node_where = self.loc.value("graph", loss) if loss in self.data.get("graph", {}) else where
            raise self.fail(node_where, str(e)) from None
        outputs = model.get("outputs")
        if outputs is not None:
            where = self.loc.value("model", "outputs")
            if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                raise self.fail(where, "[model] outputs must be an array of node names")
            for o in outputs:
                if o not in known:
                    raise self.fail(where, f"output '{o}' is not a node{_suggest(o, known)}")
                if known[o].dtype != "float":
                    raise self.fail(where, f"output '{o}' is not a float array")
                graph.output(o, known[o])
        wrt = model.get("wrt")
        if wrt is not None:
            where = self.loc.value("model", "wrt")
            if not isinstance(wrt, list) or not all(isinstance(p, str) for p in wrt):
                raise self.fail(where, "[model] wrt must be an array of param names")
            if not wrt:
                raise self.fail(where, "[model] wrt is empty; leave it out to differentiate every param")
            for p in wrt:
                if p not in graph.params:
                    what = "an input (inputs are never differentiated)" if p in graph.inputs else "not a param"
                    raise self.fail(where, f"wrt '{p}' is {what}{_suggest(p, graph.params) if p not in graph.inputs else ''}")
            if len(set(wrt)) != len(wrt):
                raise self.fail(where, "[model] wrt names a param twice")
            graph.wrt = tuple(wrt)
        if not graph.params:
            raise self.fail(self.loc.section("params") if "params" in self.data else (1, 1),
                            "the model has no [params] to differentiate")


def _topological(deps: dict[str, list[str]], cycle_error) -> list[str]:
    """Declaration order, each node after its dependencies; iterative, cycles reported."""
    order: list[str] = []
    state: dict[str, int] = {}   # 1 = on the stack, 2 = done
    for root in deps:
        if state.get(root) == 2:
            continue
        stack = [(root, iter(deps[root]))]
        state[root] = 1
        while stack:
            name, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[name] = 2
                order.append(name)
            elif state.get(nxt) == 1:
                path = [n for n, _ in stack]
                raise cycle_error(path[path.index(nxt):] + [nxt])
            elif state.get(nxt) is None:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return order


def ops_table_markdown() -> str:
    """The op reference table of docs/spec.md, generated from the table above and the registry."""
    from backcomp.ops.registry import registered_ops
    reg = registered_ops()
    rows = ["| call | keywords | meaning |", "|---|---|---|"]
    for name, op in SPEC_OPS.items():
        doc = reg[name].doc if name in reg else (getattr(op.fn, "__doc__", "") or "").strip().split("\n")[0]
        rows.append(f"| `{op.signature()}` | {', '.join(op.keywords) or '—'} | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def read_spec_text(path: Path) -> str:
    """The spec's text; unreadable files are SpecErrors without a line."""
    shown = str(path)
    if path.is_dir():
        raise SpecError(shown, None, None, "is a directory, not a spec file")
    try:
        data = path.read_bytes()[:MAX_SPEC_BYTES + 1]
    except FileNotFoundError:
        raise SpecError(shown, None, None, "no such file") from None
    except OSError as e:
        raise SpecError(shown, None, None, f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(shown, None, None, f"spec is larger than {MAX_SPEC_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(shown, line, col, f"the file is not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def parse_spec(text: str, path: str = "<spec>", stem: str | None = None) -> Graph:
    """A Graph from spec text; ``stem`` is the default model name."""
    if stem is None:
        stem = Path(path).stem
    try:
        return _Loader(text, str(path), stem).load()
    except RecursionError:
        raise SpecError(str(path), None, None, "the spec is nested too deeply") from None


def load_spec(path) -> Graph:
    """Read and parse a spec file into a Graph; every problem is a SpecError."""
    path = Path(path)
    return parse_spec(read_spec_text(path), str(path), path.stem)


__all__ = ["SpecError", "load_spec", "parse_spec", "SPEC_OPS", "parse_expression"]
