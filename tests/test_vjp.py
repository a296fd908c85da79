"""The reverse pass: fan-out accumulation, params used several times, pruning, same IR.

Gradients here are compared with numbers worked out by hand (in NumPy, from the
chain rule), not only with finite differences.
"""
from __future__ import annotations

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.ops.registry import registered_ops
from backcomp.vjp import differentiate

from conftest import gradcheck


def _values(seed=0, **shapes):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def test_one_value_feeds_three_consumers():
    """δ_h = Σ over h's three consumers: the cotangents of all three uses are summed."""
    g = backcomp.Graph("fanout3")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 2))
    a = g.input("a", (2,))
    h = g.assign_name("h", ops.tanh(x @ W))
    g.loss(ops.sum(h * a) + ops.sum(h ** 2) / 2 + ops.mean(ops.exp(h)))
    m = gradcheck(g, batch=4)

    v = _values(W=(3, 2), x=(4, 3), a=(2,))
    loss, grads = m.value_and_grad({"W": v["W"]}, {"x": v["x"], "a": v["a"]})
    H = np.tanh(v["x"] @ v["W"])
    np.testing.assert_allclose(loss, np.sum(H * v["a"]) + np.sum(H ** 2) / 2 + np.mean(np.exp(H)), rtol=1e-12)
    h_bar = v["a"] + H + np.exp(H) / H.size          # one term per consumer
    z_bar = h_bar * (1 - H ** 2)
    np.testing.assert_allclose(grads["W"], v["x"].T @ z_bar, rtol=1e-10)


def test_param_used_at_several_places():
    g = backcomp.Graph("reuse")
    W = g.param("W", (2, 3))
    x = g.input("x", (2, 3))
    v = g.input("v", (3,))
    g.loss(ops.sum(W * x) + ops.sum(W @ v) + ops.sum(W ** 2) + ops.sum(W.T @ W))
    m = gradcheck(g)
    val = _values(1, W=(2, 3), x=(2, 3), v=(3,))
    _, grads = m.value_and_grad({"W": val["W"]}, {"x": val["x"], "v": val["v"]})
    Wv = val["W"]
    # d/dW Σ(WᵀW) = W (1 + 1ᵀ): each entry of WᵀW is a dot of two columns
    ones = np.ones((3, 3))
    expected = val["x"] + np.outer(np.ones(2), val["v"]) + 2 * Wv + Wv @ (ones + ones.T)
    np.testing.assert_allclose(grads["W"], expected, rtol=1e-12)


def test_scalar_param_used_three_times_exact_numbers():
    """loss = w³ + 2w + w·w at w = 2: dloss/dw = 3w² + 2 + 2w = 18."""
    g = backcomp.Graph("scalar")
    w = g.param("w", ())
    g.loss(w * w * w + 2 * w + w * w)
    m = backcomp.build(g)
    loss, grads = m.value_and_grad({"w": np.array(2.0)}, {})
    assert float(loss) == 16.0
    assert float(grads["w"]) == 18.0
    assert grads["w"].shape == ()


def test_broadcast_param_is_summed_over_the_broadcast_axes():
    g = backcomp.Graph("unbroadcast")
    x = g.input("x", ("B", 2, 3))
    b = g.param("b", (3,))
    c = g.param("c", (2, 1))
    s = g.param("s", ())
    g.loss(ops.sum((x + b) * c * s))
    m = gradcheck(g)
    val = _values(2, x=(4, 2, 3), b=(3,), c=(2, 1), s=())
    _, grads = m.value_and_grad({k: val[k] for k in "bcs"}, {"x": val["x"]})
    X, B, C, S = val["x"], val["b"], val["c"], val["s"]
    np.testing.assert_allclose(grads["b"], np.sum(np.broadcast_to(C * S, X.shape), axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(grads["c"], np.sum((X + B) * S, axis=(0, 2))[:, None], rtol=1e-12)
    np.testing.assert_allclose(grads["s"], np.sum((X + B) * C), rtol=1e-12)
    assert grads["c"].shape == (2, 1) and grads["s"].shape == ()


def test_params_off_the_loss_path_get_exact_zeros():
    g = backcomp.Graph("offpath")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 2))
    g.param("unused", (4,))   # declared, read by nothing
    out_only = g.param("out_only", (2,))
    frozen = g.param("frozen", (3, 2))
    cond_only = g.param("cond_only", (2,))
    h = x @ W
    g.output("probe", h + out_only)                               # feeds an output, not the loss
    h = h + ops.stop_gradient(x @ frozen)                          # only through stop_gradient
    h = ops.where(h > cond_only, h, 0.5 * h)                       # only in a condition
    g.loss(ops.mean(h ** 2))
    g.output("loss", g.loss_node)
    m = backcomp.build(g)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) for k, s in m.PARAMS.items()}
    loss, grads = m.value_and_grad(params, {"x": rng.standard_normal((3, 3))})
    assert set(grads) == {"W", "unused", "out_only", "frozen", "cond_only"}
    for name in ("unused", "out_only", "frozen", "cond_only"):
        assert grads[name].shape == params[name].shape
        assert np.array_equal(grads[name], np.zeros(params[name].shape)), name
        assert grads[name].flags.writeable
    assert np.any(grads["W"] != 0)
    # and nothing on those params' paths was differentiated
    d = differentiate(g)
    assert d.grads["unused"].op == "zeros_like"
    assert d.params["frozen"] not in d.cotangents and d.params["out_only"] not in d.cotangents


def test_wrt_prunes_to_the_requested_params():
    g = backcomp.Graph("only_w")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 2))
    b = g.param("b", (2,))
    V = g.param("V", (2, 2))
    b_branch = ops.exp(b)                      # only b depends on this
    g.loss(ops.sum(ops.tanh((x @ W) * b_branch) @ V))
    g.wrt = ("W",)
    d = differentiate(g)
    assert set(d.grads) == {"W"}
    assert d.params["b"] not in d.cotangents and d.params["V"] not in d.cotangents
    exp_node = next(n for n in d.nodes if n.op == "exp")
    assert exp_node not in d.cotangents        # b's branch is not on a path to W
    m = gradcheck(g)
    assert m.WRT == ("W",)
    _, grads = m.value_and_grad(m.init_params(0, dtype=np.float64), {"x": np.ones((2, 3))})
    assert set(grads) == {"W"}


def test_wrt_unknown_param_is_an_error():
    g = backcomp.Graph("bad_wrt")
    W = g.param("W", (2,))
    g.loss(ops.sum(W))
    g.wrt = ("W", "nope")
    with pytest.raises(backcomp.GraphError, match="nope"):
        differentiate(g)


def test_backward_is_in_the_same_ir():
    g = backcomp.Graph("same_ir")
    x = g.input("x", ("B", 4))
    W = g.param("W", (4, 3))
    b = g.param("b", (3,))
    labels = g.input("labels", ("B",), dtype="int")
    z = ops.relu(x @ W + b)
    g.loss(ops.mean(ops.softmax_cross_entropy(z, labels)) + 0.1 * ops.sum(ops.max(W, axis=0)))
    n_forward = len(g.nodes)
    d = differentiate(g)
    ops_known = set(registered_ops()) | {"input", "param"}
    assert all(n.op in ops_known for n in d.nodes)
    backward = d.nodes[n_forward:]
    assert backward, "no backward nodes"
    assert all(n.origin is not None for n in backward)            # each names the node it differentiates
    assert all(n.graph is d for n in d.nodes)
    # the user's graph is untouched: differentiate works on a clone
    assert len(g.nodes) == n_forward and not g.grads
    # the backward can be printed, node by node, like the forward
    assert all(repr(n) for n in backward)
    for n in backward:
        assert all(i.id < n.id for i in n.inputs)               # still a topological order


def test_deep_chain_does_not_hit_the_recursion_limit():
    g = backcomp.Graph("deep")
    w = g.param("w", (2,))
    h = w
    for _ in range(400):
        h = h * 0.999 + 0.001
    g.loss(ops.sum(h))
    d = differentiate(g)
    assert "w" in d.grads
    m = backcomp.build(g)
    _, grads = m.value_and_grad({"w": np.array([1.0, 2.0])}, {})
    np.testing.assert_allclose(grads["w"], [0.999 ** 400] * 2, rtol=1e-12)


def test_cotangent_of_a_named_node_is_recorded():
    g = backcomp.Graph("named")
    W = g.param("W", (3,))
    h = g.assign_name("h", ops.sin(W))
    g.loss(ops.sum(h * h))
    d = differentiate(g)
    h_new = d.lookup("h")
    assert h_new in d.cotangents
    assert d.cotangents[h_new].shape == (3,)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_lazy_cotangent_of_a_broadcast_bias(reduce):
    """sum(x + b) with x (B, 3), b (3,): b_bar counts every row (regression: it got 1, not B)."""
    g = backcomp.Graph(f"bias_{reduce}")
    x = g.input("x", ("B", 3))
    b = g.param("b", (3,))
    g.loss(getattr(ops, reduce)(x * 2 + b))
    for level in (0, 1):
        m = backcomp.build(g, opt_level=level)
        _, grads = m.value_and_grad({"b": np.zeros(3)}, {"x": np.ones((4, 3))})
        np.testing.assert_allclose(grads["b"], [4.0] * 3 if reduce == "sum" else [1 / 3] * 3, rtol=1e-12)
