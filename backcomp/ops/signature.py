"""What a spec may call: each builder function declares its spec signature where it is defined.

A spec expression such as ``softmax(h, axis=-1)`` is checked against the function's
``SpecFunction`` (argument names, kinds, defaults, minimums) before anything is built,
so errors point at the offending argument.  The declaration sits on the builder
function itself (``@spec_function(...)``), so adding a function touches one file.

Argument kinds (how ``backcomp.spec`` reads each argument):
  array     an array expression (no integer inputs)
  label     an array expression that may be an integer input (labels, ids)
  value     an array expression or a number
  cond      a comparison such as ``x > 0``
  arrays    a tuple of arrays
  subscripts an einsum string
  node      the name of an input, param or node (``grad(y, x)``'s x)
  number    a number (constants allowed)
  bool      True or False
  int       an integer (``minimum`` applies)
  pair      an integer or an (h, w) pair of integers (``minimum`` applies)
  axes      an integer or a tuple of integers
  ints      a tuple of integers
  shape     a tuple of integers and symbolic dim names
  dim       an integer or a symbolic dim name (``arange(T)``)
  widths    np.pad's widths: an integer, a (before, after) pair, or one pair per axis
Array-like kinds are passed positionally in declaration order, the rest by keyword.
A builder with a ``graph`` parameter (array constants: ``zeros((B, 4))`` has no
operand to find its graph from) gets the spec's graph as ``graph=``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

#: kinds passed positionally (operands); the others are options passed by keyword
OPERAND_KINDS = ("array", "value", "label", "cond", "arrays", "subscripts", "node")
KINDS = OPERAND_KINDS + ("number", "bool", "int", "pair", "axes", "ints", "shape", "dim", "widths")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    required: bool = True
    default: Any = None
    minimum: int | None = None   # the least value of an "int" or "pair" (sizes, strides, paddings)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown argument kind {self.kind!r} for '{self.name}'")


@dataclass(frozen=True)
class SpecFunction:
    name: str
    fn: Callable
    params: tuple[Param, ...]
    variadic: str | None = None   # kind of extra positional args (einsum operands)

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.kind not in OPERAND_KINDS)

    def signature(self) -> str:
        parts = [p.name if p.required else f"{p.name}={p.default!r}" for p in self.params]
        if self.variadic:
            parts.append("*operands")
        return f"{self.name}({', '.join(parts)})"

    def call(self, given: dict[str, Any], extra: tuple = (), graph=None):
        """Call the builder: operands positionally (then ``extra``), options by keyword."""
        args = [given[p.name] for p in self.params if p.kind in OPERAND_KINDS and p.name in given]
        options = {p.name: given[p.name] for p in self.params if p.kind not in OPERAND_KINDS and p.name in given}
        if "graph" in inspect.signature(self.fn).parameters:
            options["graph"] = graph
        return self.fn(*args, *extra, **options)


_FUNCTIONS: dict[str, SpecFunction] = {}


def spec_function(*params: Param, name: str | None = None, variadic: str | None = None):
    """Declare that a builder function may be called from specs with these arguments.

    Options are passed by keyword, so their names must be the builder's own
    parameter names; a mismatch is caught here, at import, not in a user's spec.
    """
    def declare(fn: Callable) -> Callable:
        fname = name or fn.__name__
        if fname in _FUNCTIONS:
            raise ValueError(f"spec function '{fname}' is declared twice")
        accepted = inspect.signature(fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            for p in params:
                if p.kind not in OPERAND_KINDS and p.name not in accepted:
                    raise ValueError(f"spec function '{fname}': option '{p.name}' is not a parameter of "
                                     f"{fn.__qualname__}")
        _FUNCTIONS[fname] = SpecFunction(fname, fn, tuple(params), variadic)
        return fn
    return declare


def spec_functions() -> dict[str, SpecFunction]:
    """Every function a spec may call, by name (a live view: do not modify)."""
    return _FUNCTIONS


# ----- the common argument lists ------------------------------------------------------
X = Param("x", "array")
AXIS = Param("axis", "axes", False, None)
KEEPDIMS = Param("keepdims", "bool", False, False)
UNARY = (X,)
REDUCTION = (X, AXIS, KEEPDIMS)
