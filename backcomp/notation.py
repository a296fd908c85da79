"""The notation ``backcomp explain`` writes tensor ops in: opaque SymPy functions with formats.

An op's explain rule (``OpDef.explain``) returns a SymPy expression in which tensor
operations (matmul, Σ over axes, transposes, ...) are opaque functions made by
``opaque``; the printers in ``backcomp.explain`` look their text and LaTeX formats
up here.  It lives apart from explain so that op declarations can use it without
importing the explain machinery.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp


@dataclass(frozen=True)
class Fmt:
    text: str    # str.format over the printed args: "{0} · {1}"
    latex: str
    atom: bool = False   # needs no parentheses as a factor
    wrap: bool = False   # its sum, product and power args get parentheses: (a + b)ᵀ, (a ⊙ b)[:, 1:3]


FORMATS: dict[str, Fmt] = {}


def lit(text: str) -> str:
    """Escape braces so LaTeX text survives ``str.format`` in the templates."""
    return text.replace("{", "{{").replace("}", "}}")


def opaque(key: str, text: str, latex: str, atom: bool = False, wrap: bool = False) -> sp.FunctionClass:
    """An opaque SymPy function printed by ``text``; a key always has the same format
    (the registry is global, so a key that could take two arities would print wrong)."""
    fmt = FORMATS.setdefault(key, Fmt(text, latex, atom, wrap))
    assert fmt == Fmt(text, latex, atom, wrap), (key, fmt, text)
    return sp.Function(key, real=True)


def axes_label(shape, axes) -> tuple[str, str]:
    """Σ over all axes: no label; over symbolic dims: their names; else axis numbers."""
    if tuple(axes) == tuple(range(len(shape))):
        return "", ""
    dims = [shape[a] for a in axes]
    if all(isinstance(d, str) for d in dims):
        label = ",".join(dims)
    else:
        label = "[axis=" + ",".join(str(a) for a in axes) + "]"
    return label, label.replace("[axis=", r"\mathrm{axis}\,").rstrip("]")


def split_scalars(expr: sp.Expr, scalars) -> tuple[sp.Expr, sp.Expr]:
    """Σ(c ⊙ x) = c Σ(x) for factors c that are scalars (0-d values, dims, numbers)."""
    inside, outside = [], []
    for f in sp.Mul.make_args(expr):
        if f.free_symbols and all(s in scalars or s.is_integer for s in f.free_symbols) or f.is_Number and f != 1:
            outside.append(f)
        else:
            inside.append(f)
    if not inside:
        return expr, sp.Integer(1)
    return sp.Mul(*inside), sp.Mul(*outside)


def call(node, args, op_name: str | None = None) -> sp.Expr:
    """The generic notation ``op(args, attr=value)`` for ops without a rule of their own."""
    op = op_name or node.op
    slots = ", ".join("{%d}" % i for i in range(len(args)))
    attrs = ", ".join(f"{k}={v!r}" for k, v in node.attrs.items() if k not in ("label",))
    key = f"{op}[{attrs}]" if len(args) == 1 else f"{op}_{len(args)}[{attrs}]"   # a format per arity
    text = f"{op}({slots}{', ' + attrs if attrs else ''})"
    return opaque(key, text, lit(rf"\operatorname{{{op.replace('_', chr(92) + '_')}}}") + rf"\left({slots}\right)",
                  True)(*args)


def reduction(node, args, scalars, name: str, latex: str, axes) -> sp.Expr:
    """name_axes(x) over the reduced axes, with scalar factors pulled out of linear ones."""
    label, ltx = axes_label(node.inputs[0].shape, axes)
    sub = ("" if label.startswith("[") else "_") + label if label else ""
    lsub = lit(f"_{{{ltx}}}") if ltx else ""
    inner, outer = split_scalars(args[0], scalars) if name in ("Σ", "mean") else (args[0], 1)
    return outer * opaque(f"{name}{sub}", f"{name}{sub}({{0}})", f"{lit(latex)}{lsub}\\left({{0}}\\right)", True)(inner)
