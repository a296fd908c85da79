"""The backcomp side of the benchmark: the MLP as a graph, compiled to a module.

``make_generated(sizes)`` has the same shape as the peers' factories in peers.py, so
timing.py can time it and measure its memory in a fresh process like any peer.
"""
from __future__ import annotations

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import backcomp  # noqa: E402
from backcomp import ops  # noqa: E402
from peers import Step  # noqa: E402


def mlp_graph(sizes: list[int], name: str | None = None) -> backcomp.Graph:
    """z_i = h_{i-1} @ W_i + b_i, relu on hidden layers, mean softmax cross-entropy."""
    g = backcomp.Graph(name or f"mlp_{'_'.join(map(str, sizes))}")
    x = g.input("x", ("B", sizes[0]))
    y = g.input("y", ("B", sizes[-1]))
    h = x
    layers = len(sizes) - 1
    for i in range(1, layers + 1):
        W = g.param(f"W{i}", (sizes[i - 1], sizes[i]))
        b = g.param(f"b{i}", (sizes[i],))
        with g.scoped(f"z{i}"):
            z = g.assign_name(f"z{i}", h @ W + b)
        h = g.assign_name(f"h{i}", ops.relu(z)) if i < layers else z
    with g.scoped("loss"):
        g.loss(ops.mean(ops.softmax_cross_entropy(h, y)))
    return g


def make_generated(sizes: list[int], opt_level: int = 1) -> Step:
    """One value_and_grad call of the compiled module, NumPy in and out."""
    started = time.perf_counter()
    module = backcomp.build(mlp_graph(sizes), opt_level=opt_level)
    compile_seconds = time.perf_counter() - started

    def step(params, x, y):
        return module.value_and_grad(params, {"x": x, "y": y})

    return Step("generated" if opt_level else "generated_O0", step,
                info={"backcomp": backcomp.__version__, "compile_seconds": compile_seconds})


def make_generated_O0(sizes: list[int]) -> Step:
    return make_generated(sizes, opt_level=0)
