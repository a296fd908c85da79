"""Parameter initialisers: parsed from strings like "normal(0.01)" without eval.

The generated module carries its own tiny init code; this module validates the
init names at compile time and renders the call that the module makes.
"""
from __future__ import annotations

import math
import re

from backcomp.graph import GraphError, Shape

#: name -> number of numeric arguments it takes
INITS = {"zeros": 0, "ones": 0, "normal": 1, "uniform": 2, "glorot_uniform": 0, "he_normal": 0}

_CALL = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*(.*?)\s*\))?\s*$")


def default_init(shape: Shape) -> str:
    return "glorot_uniform" if len(shape) >= 2 else "zeros"


def parse_init(text: str, shape: Shape) -> tuple[str, tuple[float, ...]]:
    """'normal(0.01)' -> ('normal', (0.01,)); errors name the valid choices."""
    if not isinstance(text, str):
        raise GraphError(f"init must be a string such as \"normal(0.01)\", got {text!r}")
    m = _CALL.match(text)
    if not m or m.group(1) not in INITS:
        name = m.group(1) if m else text
        raise GraphError(f"unknown init '{name}' (choose from {', '.join(INITS)})")
    name, arg_text = m.group(1), m.group(2)
    args: tuple[float, ...] = ()
    if arg_text:
        try:
            args = tuple(float(a) for a in arg_text.split(","))
        except ValueError:
            raise GraphError(f"init '{text}': arguments must be numbers") from None
    if len(args) != INITS[name] or not all(math.isfinite(a) for a in args):
        raise GraphError(f"init '{name}' takes {INITS[name]} numeric argument(s), got '{text}'")
    if name in ("glorot_uniform", "he_normal") and len(shape) < 2:
        raise GraphError(f"init '{name}' needs a weight of rank >= 2, got rank {len(shape)}")
    if name == "normal" and args[0] < 0:
        raise GraphError(f"init '{text}': the standard deviation must be >= 0")
    if name == "uniform" and args[0] > args[1]:
        raise GraphError(f"init '{text}': low must not exceed high")
    return name, args


def fans(shape: Shape) -> tuple[int, int]:
    """(fan_in, fan_out): [in, out] for matrices; OIHW for conv weights, as PyTorch."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


#: the initialisers that are no draw: a module whose params all start so needs no generator
CONSTANT_INITS = ("zeros", "ones")


def init_draws(text: str, shape: Shape) -> bool:
    """Whether the init draws from ``init_params``' generator."""
    return parse_init(text, shape)[0] not in CONSTANT_INITS


def init_code(text: str, shape: Shape) -> str:
    """The dict entry value (with its comma) that ``init_params`` evaluates."""
    name, args = parse_init(text, shape)
    s = repr(tuple(shape))
    if name == "zeros":
        return f"np.zeros({s}, dtype=dtype),"
    if name == "ones":
        return f"np.ones({s}, dtype=dtype),"
    if name == "normal":
        return f"rng.normal(0.0, {args[0]!r}, {s}).astype(dtype),"
    if name == "uniform":
        return f"rng.uniform({args[0]!r}, {args[1]!r}, {s}).astype(dtype),"
    fan_in, fan_out = fans(shape)
    if name == "glorot_uniform":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return f"rng.uniform(-{limit!r}, {limit!r}, {s}).astype(dtype),  # glorot: sqrt(6 / ({fan_in} + {fan_out}))"
    std = math.sqrt(2.0 / fan_in)
    return f"rng.normal(0.0, {std!r}, {s}).astype(dtype),  # he: sqrt(2 / {fan_in})"
