"""Scale: deep chains and large random DAGs compile without recursion, and the modules
they give compute the right numbers.

The long chains are checked against an explicit NumPy backpropagation (their closed
form), the random DAG against central differences along a random direction.  How
compile time grows with size is measured in benchmarks/scale.py, not asserted here:
wall-clock ratios on a shared machine are noise in a unit suite.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import backcomp  # noqa: E402
from scale import chain, elementwise_chain, random_dag  # noqa: E402


def _normal(rng, shapes: dict, scale: float) -> dict[str, np.ndarray]:
    return {k: scale * rng.standard_normal(s) for k, s in shapes.items()}


def chain_reference(params: dict, x: np.ndarray, t: np.ndarray, n: int) -> tuple[float, dict]:
    """Loss and gradients of ``chain(n)`` by hand: h_{i+1} = h_i + tanh(h_i W_i + b_i),
    loss = mean((h_n - t)^2), and the reverse loop of the chain rule."""
    hs, ts = [x], []
    for i in range(n):
        ts.append(np.tanh(hs[-1] @ params[f"W{i}"] + params[f"b{i}"]))
        hs.append(hs[-1] + ts[-1])
    loss = np.mean((hs[-1] - t) ** 2)
    g = 2 * (hs[-1] - t) / t.size
    grads = {}
    for i in reversed(range(n)):
        ga = g * (1 - ts[i] ** 2)
        grads[f"W{i}"] = hs[i].T @ ga
        grads[f"b{i}"] = ga.sum(axis=0)
        g = g + ga @ params[f"W{i}"].T
    return loss, grads


def test_a_2000_layer_chain_matches_a_numpy_backprop():
    n = 2000
    graph = chain(n)
    assert len(graph.nodes) > 4 * n > sys.getrecursionlimit()
    m = backcomp.build(graph)
    rng = np.random.default_rng(0)
    params = _normal(rng, m.PARAMS, 0.1)
    x, t = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    loss, grads = m.value_and_grad({k: v.copy() for k, v in params.items()}, {"x": x, "t": t})
    expected_loss, expected = chain_reference(params, x, t, n)
    assert sorted(grads) == sorted(expected) and len(grads) == 2 * n
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # the gradient reaches the first layer: a chain cut short would leave it zero
    assert np.abs(grads["W0"]).max() > 1e-3


def test_a_100_op_elementwise_chain_matches_the_chain_rule():
    """h = x * w through 100 alternating sin/tanh (fused into several kernels):
    d sum(h_100)/dw = sum_B x * prod_k f_k'(h_{k-1})."""
    n = 100
    m = backcomp.build(elementwise_chain(n))
    rng = np.random.default_rng(1)
    w, x = rng.standard_normal(4), rng.standard_normal((3, 4))
    loss, grads = m.value_and_grad({"w": w.copy()}, {"x": x})
    h, slope = x * w, np.ones_like(x)
    for i in range(n):
        slope = slope * (1 - np.tanh(h) ** 2 if i % 2 else np.cos(h))
        h = np.tanh(h) if i % 2 else np.sin(h)
    np.testing.assert_allclose(loss, h.sum(), rtol=1e-12)
    np.testing.assert_allclose(grads["w"], (x * slope).sum(axis=0), rtol=1e-9, atol=1e-14)


def test_a_1000_node_random_dag_matches_finite_differences():
    """Along a random direction v of all params: (L(p + εv) − L(p − εv)) / 2ε = Σ ⟨∇L, v⟩."""
    m = backcomp.build(random_dag(1000))
    rng = np.random.default_rng(2)
    params = _normal(rng, m.PARAMS, 0.3)
    inputs = {"x": rng.standard_normal((3, 6))}
    direction = _normal(rng, m.PARAMS, 1.0)
    loss, grads = m.value_and_grad({k: v.copy() for k, v in params.items()}, inputs)
    assert np.isfinite(loss) and sorted(grads) == sorted(m.PARAMS)
    eps = 1e-6

    def loss_at(step):
        moved = {k: params[k] + step * direction[k] for k in params}
        return float(m.value_and_grad(moved, inputs)[0])

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum(float(np.sum(grads[k] * direction[k])) for k in params)
    assert abs(analytic) > 1e-3, "a degenerate direction checks nothing"
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
