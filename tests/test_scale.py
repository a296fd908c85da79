"""Scale: deep chains and large random DAGs compile, without recursion, in linear time.

Timing assertions are deliberately loose (a shared 2-core machine is noisy); the
measured table is benchmarks/scale.py.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import backcomp  # noqa: E402
from backcomp.compiler import compile_source  # noqa: E402
from scale import chain, elementwise_chain, random_dag  # noqa: E402


def _seconds(graph) -> float:
    started = time.perf_counter()
    compile_source(graph)
    return time.perf_counter() - started


def test_a_2000_layer_chain_compiles_and_runs():
    limit = sys.getrecursionlimit()
    graph = chain(2000)
    assert len(graph.nodes) > 4 * 2000 > limit
    m = backcomp.build(graph)
    inputs = {"x": np.full((2, 4), 0.1), "t": np.zeros((2, 4))}
    loss, grads = m.value_and_grad(m.init_params(0, dtype=np.float64), inputs)
    assert np.isfinite(loss) and len(grads) == 4000


def test_a_1000_node_random_dag_compiles():
    source = compile_source(random_dag(1000))
    assert "def value_and_grad" in source


def test_compile_time_grows_about_linearly():
    small, large = _seconds(chain(150)), _seconds(chain(600))
    assert large < 10 * small, f"4x the layers took {large / small:.1f}x the time"
    small, large = _seconds(elementwise_chain(25)), _seconds(elementwise_chain(100))
    assert large < 10 * small, f"4x the elementwise ops took {large / small:.1f}x the time"
