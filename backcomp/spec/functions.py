"""[functions] bodies -> SymPy expressions (walked, never sympified), so derivatives are derived."""
from __future__ import annotations

import ast
from typing import Callable

import sympy as sp

from backcomp.ops.scalar import SCALAR_FUNCTIONS, maximum, minimum, ties_with_numbers
from backcomp.spec.expressions import BINOPS, Where, disallowed, finite
from backcomp.spec.text import suggest


# ----- [functions]: scalar SymPy expressions --------------------------------------------
SCALAR_EXTRA = {"relu": lambda a: sp.Max(a, 0), "maximum": maximum, "minimum": minimum,
                 "gelu": lambda a: a * (1 + sp.erf(a / sp.sqrt(2))) / 2}
_ARITY = {"maximum": 2, "minimum": 2}


class ScalarWalker:
    """Walks a [functions] body into a SymPy expression (never sympify)."""

    def __init__(self, args: dict[str, sp.Symbol], constants: dict[str, float],
                 resolve: Callable[[str, ast.AST], tuple[tuple[sp.Symbol, ...], sp.Expr]], where: Where):
        self.args, self.constants, self.resolve, self.where = args, constants, resolve, where

    def expr(self, node: ast.AST) -> sp.Expr:
        bad = disallowed(node)
        if bad:
            raise self.where.error(node, bad)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.where.error(node, f"'{ast.unparse(node)}' is not allowed here: a [functions] body "
                                             "uses numbers, its arguments, constants and scalar functions")
            v = finite(node.value, node, self.where)
            return sp.Integer(v) if isinstance(v, int) else sp.Float(v, 17)
        if isinstance(node, ast.Name):
            if node.id in self.args:
                return self.args[node.id]
            if node.id in self.constants:
                v = self.constants[node.id]
                return sp.Integer(v) if isinstance(v, int) else sp.Float(v, 17)
            known = list(self.args) + list(self.constants)
            raise self.where.error(node, f"undefined name '{node.id}'{suggest(node.id, known)} "
                                         "(a function body may use its arguments and [constants])")
        if isinstance(node, ast.BinOp):
            symbol = BINOPS.get(type(node.op))
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
            fn = SCALAR_FUNCTIONS.get(fname) or SCALAR_EXTRA.get(fname)
            if fn is not None:
                want = _ARITY.get(fname, 1)
                if len(args) != want:
                    raise self.where.error(node, f"{fname}() takes {want} argument{'s' if want > 1 else ''}, got {len(args)}")
                return fn(*args)
            params, body = self.resolve(fname, node.func)
            if len(args) != len(params):
                raise self.where.error(node, f"{fname}() takes {len(params)} arguments, got {len(args)}")
            return ties_with_numbers(body.xreplace(dict(zip(params, args))))
        if isinstance(node, ast.Compare):
            raise self.where.error(node, "comparisons are not allowed in a [functions] body")
        raise self.where.error(node, f"{type(node).__name__} syntax is not allowed in a [functions] body")

