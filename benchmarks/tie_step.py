"""The half step H½ of a maximum/minimum tie: printed forms timed against each other.

    python benchmarks/tie_step.py [--repeats 7]

On (256, 1024) float32 arrays g, u, v with v = u in every 7th column.  "product" is
g·H½(x) with x = u − v held in an array (the form of a backward's factor); "from the
operands" is the same with u and v (what a backward of maximum(u, v) reads); "alone" is
H½(x) with no array factor.  Each form is checked for exact values and float32; the
rows marked "for reference" are relu's step H(x), with H(0) = 0.
"""
from __future__ import annotations

import argparse
import timeit

import numpy as np


def forms(g, u, v, x):
    return {
        "product": {
            "g*(x > 0)  [H, for reference]": lambda: g * (x > 0),
            "0.5*g*((x > 0).view(np.int8) + (x >= 0).view(np.int8))  [printed]":
                lambda: 0.5 * g * ((x > 0).view(np.int8) + (x >= 0).view(np.int8)),
            "0.5*g*np.add(x > 0, x >= 0, dtype=np.int8)": lambda: 0.5 * g * np.add(x > 0, x >= 0, dtype=np.int8),
            "g*np.add(x > 0, x >= 0, dtype=np.int8)*0.5": lambda: g * np.add(x > 0, x >= 0, dtype=np.int8) * 0.5,
            "g*(np.sign(x) + 1)*0.5": lambda: g * (np.sign(x) + 1) * 0.5,
            "g*(x > 0) + 0.5*g*(x == 0)": lambda: g * (x > 0) + 0.5 * g * (x == 0),
            "np.where(x == 0, 0.5*g, g*(x > 0))": lambda: np.where(x == 0, 0.5 * g, g * (x > 0)),
            "g*np.heaviside(x, 0.5)": lambda: g * np.heaviside(x, 0.5),
        },
        "from the operands": {
            "0.5*g*((u > v).view(np.int8) + (u >= v).view(np.int8))  [printed]":
                lambda: 0.5 * g * ((u > v).view(np.int8) + (u >= v).view(np.int8)),
            "0.5*g*np.add(u > v, u >= v, dtype=np.int8)": lambda: 0.5 * g * np.add(u > v, u >= v, dtype=np.int8),
            "0.5*g*np.add(u - v > 0, u - v >= 0, dtype=np.int8)":
                lambda: 0.5 * g * np.add(u - v > 0, u - v >= 0, dtype=np.int8),
            "g*np.heaviside(u - v, 0.5)": lambda: g * np.heaviside(u - v, 0.5),
        },
        "alone": {
            "np.heaviside(x, 0)  [H, for reference]": lambda: np.heaviside(x, 0),
            "np.multiply(np.sign(x) + 1, 0.5)  [printed]": lambda: np.multiply(np.sign(x) + 1, 0.5),
            "np.heaviside(x, 0.5)": lambda: np.heaviside(x, 0.5),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    g, u, v = (rng.standard_normal((256, 1024)).astype(np.float32) for _ in range(3))
    v[:, ::7] = u[:, ::7]
    x = u - v
    step = np.where(x > 0, 1.0, np.where(x == 0, 0.5, 0.0)).astype(np.float32)
    for group, table in forms(g, u, v, x).items():
        want = g * step if group != "alone" else step
        print(group)
        for name, f in table.items():
            out = f()
            ok = "reference" in name or (out.dtype == np.float32 and np.array_equal(out, want))
            best = min(timeit.repeat(f, number=20, repeat=args.repeats)) / 20
            print(f"  {best * 1e6:7.0f} µs  {'' if ok else 'WRONG '}{name}")


if __name__ == "__main__":
    main()
