"""The worked examples of the backpropagation references, reproduced through backcomp.

Each gradient is compared with the formula the reference derives, computed by hand
in NumPy (see /work/shared/references/README.md for which write-up holds which).
"""
from __future__ import annotations

import numpy as np
import pytest

import backcomp
from backcomp import ops

from conftest import gradcheck


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# ----- 002: logistic least squares with an L2 penalty ----------------------------------------
def logistic_least_squares(lam: float) -> backcomp.Graph:
    """z = wx + b, y = σ(z), ℓ = ½(t − y)², r = ½w², ℓ_reg = ℓ + λr."""
    g = backcomp.Graph("logistic_ls")
    w = g.param("w", ())
    b = g.param("b", ())
    x = g.input("x", ())
    t = g.input("t", ())
    z = w * x + b
    y = ops.sigmoid(z)
    ell = 0.5 * (t - y) ** 2
    r = 0.5 * w ** 2
    g.loss(ell + lam * r)
    return g


@pytest.mark.parametrize("w, b, x, t", [(0.7, -0.2, 1.5, 1.0), (-1.3, 0.4, -0.8, 0.0), (2.0, 1.0, 0.3, 0.25)])
def test_logistic_least_squares_with_l2(w, b, x, t):
    lam = 0.1
    m = backcomp.build(logistic_least_squares(lam))
    loss, grads = m.value_and_grad({"w": np.array(w), "b": np.array(b)}, {"x": np.array(x), "t": np.array(t)})
    # the reference's backward pass, line by line
    z = w * x + b
    y = sigmoid(z)
    ell_reg_bar = 1.0
    r_bar = ell_reg_bar * lam
    ell_bar = ell_reg_bar
    y_bar = -ell_bar * (t - y)
    z_bar = y_bar * y * (1 - y)            # σ'(z) = σ(z)(1 − σ(z))
    b_bar = z_bar
    w_bar = z_bar * x + r_bar * w          # w̄ = z̄·x + r̄·w
    np.testing.assert_allclose(loss, 0.5 * (t - y) ** 2 + lam * 0.5 * w ** 2, rtol=1e-14)
    np.testing.assert_allclose(grads["w"], w_bar, rtol=1e-12)
    np.testing.assert_allclose(grads["b"], b_bar, rtol=1e-12)


def test_logistic_least_squares_gradcheck():
    gradcheck(logistic_least_squares(0.1))


# ----- 002: one-hidden-layer MLP with squared error -------------------------------------------
def test_mlp_squared_error_matches_hand_backprop():
    """z = xW1 + b1, h = σ(z), y = hW2 + b2, ℓ = ½ Σ (y − t)² over the batch."""
    g = backcomp.Graph("mlp_se")
    x = g.input("x", ("B", 3))
    t = g.input("t", ("B", 2))
    W1 = g.param("W1", (3, 4))
    b1 = g.param("b1", (4,))
    W2 = g.param("W2", (4, 2))
    b2 = g.param("b2", (2,))
    h = ops.sigmoid(x @ W1 + b1)
    y = h @ W2 + b2
    g.loss(0.5 * ops.sum((y - t) ** 2))
    m = gradcheck(g, batch=5)

    rng = np.random.default_rng(7)
    P = {"W1": rng.standard_normal((3, 4)), "b1": rng.standard_normal(4),
         "W2": rng.standard_normal((4, 2)), "b2": rng.standard_normal(2)}
    X, T = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    loss, grads = m.value_and_grad(P, {"x": X, "t": T})
    # hand-written backprop (the reference's vector form, one row per example)
    Z = X @ P["W1"] + P["b1"]
    H = sigmoid(Z)
    Y = H @ P["W2"] + P["b2"]
    Y_bar = Y - T                          # ȳ = −(t − y)
    W2_bar = H.T @ Y_bar                   # w̄⁽²⁾_ki = ȳ_k h_i
    b2_bar = Y_bar.sum(0)
    H_bar = Y_bar @ P["W2"].T              # h̄_i = Σ_k ȳ_k w⁽²⁾_ki
    Z_bar = H_bar * H * (1 - H)            # z̄ = h̄ σ'(z)
    W1_bar = X.T @ Z_bar
    b1_bar = Z_bar.sum(0)
    np.testing.assert_allclose(loss, 0.5 * np.sum((Y - T) ** 2), rtol=1e-13)
    for name, expected in [("W1", W1_bar), ("b1", b1_bar), ("W2", W2_bar), ("b2", b2_bar)]:
        np.testing.assert_allclose(grads[name], expected, rtol=1e-11, atol=1e-14, err_msg=name)


# ----- 004: batched softmax + cross-entropy MLP ----------------------------------------------
def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("labels", ["one_hot", "int"])
def test_softmax_cross_entropy_mlp_batch(labels):
    """∂L/∂Z² = (A² − Y)/B; dW² = A¹ᵀΔ, db² = Σ_rows Δ, Δ¹ = ΔW²ᵀ ⊙ f′(Z¹)."""
    g = backcomp.Graph(f"mlp_ce_{labels}")
    x = g.input("x", ("B", 4))
    y = g.input("y", ("B", 3)) if labels == "one_hot" else g.input("y", ("B",), dtype="int")
    W1 = g.param("W1", (4, 5))
    b1 = g.param("b1", (5,))
    W2 = g.param("W2", (5, 3))
    b2 = g.param("b2", (3,))
    A1 = ops.tanh(x @ W1 + b1)
    Z2 = A1 @ W2 + b2
    g.loss(ops.mean(ops.softmax_cross_entropy(Z2, y)))
    m = backcomp.build(g)

    B = 6
    rng = np.random.default_rng(11)
    P = {"W1": rng.standard_normal((4, 5)), "b1": rng.standard_normal(5),
         "W2": rng.standard_normal((5, 3)), "b2": rng.standard_normal(3)}
    X = rng.standard_normal((B, 4))
    cls = rng.integers(0, 3, B)
    Y = np.eye(3)[cls]
    loss, grads = m.value_and_grad(P, {"x": X, "y": Y if labels == "one_hot" else cls})

    Z1 = X @ P["W1"] + P["b1"]
    A1v = np.tanh(Z1)
    A2 = softmax(A1v @ P["W2"] + P["b2"])
    np.testing.assert_allclose(loss, -np.sum(Y * np.log(A2)) / B, rtol=1e-12)
    Delta2 = (A2 - Y) / B                   # ∂L/∂Z² = (A² − Y)/B
    np.testing.assert_allclose(grads["b2"], Delta2.sum(0), rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(grads["W2"], A1v.T @ Delta2, rtol=1e-11, atol=1e-15)
    Delta1 = Delta2 @ P["W2"].T * (1 - A1v ** 2)
    np.testing.assert_allclose(grads["W1"], X.T @ Delta1, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(grads["b1"], Delta1.sum(0), rtol=1e-11, atol=1e-15)


# ----- 003: a 2-2-1 sigmoid network learns XOR by gradient descent ----------------------------
def xor_graph() -> backcomp.Graph:
    g = backcomp.Graph("xor")
    x = g.input("x", ("B", 2))
    y = g.input("y", ("B", 1))
    W1 = g.param("W1", (2, 2), init="normal(1.0)")
    b1 = g.param("b1", (2,), init="normal(1.0)")
    W2 = g.param("W2", (2, 1), init="normal(1.0)")
    b2 = g.param("b2", (1,), init="normal(1.0)")
    h = ops.sigmoid(x @ W1 + b1)
    z = h @ W2 + b2
    g.output("a", ops.sigmoid(z))
    # sigmoid + cross-entropy: ∂C/∂z = a − y (reference 003)
    g.loss(ops.mean(ops.sigmoid_binary_cross_entropy(z, y)))
    g.output("loss", g.loss_node)
    return g


X_XOR = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y_XOR = np.array([[0.0], [1.0], [1.0], [0.0]])


def test_xor_output_gradient_is_a_minus_y():
    m = backcomp.build(xor_graph())
    P = m.init_params(seed=0, dtype=np.float64)
    _, grads = m.value_and_grad(P, {"x": X_XOR, "y": Y_XOR})
    a = m.forward(P, {"x": X_XOR, "y": Y_XOR})["a"]
    H = sigmoid(X_XOR @ P["W1"] + P["b1"])
    np.testing.assert_allclose(grads["b2"], np.mean(a - Y_XOR, axis=0), rtol=1e-12)
    np.testing.assert_allclose(grads["W2"], H.T @ (a - Y_XOR) / 4, rtol=1e-12)


def test_xor_trains_to_classify_all_four_points():
    m = backcomp.build(xor_graph())
    params = m.init_params(seed=3, dtype=np.float64)
    inputs = {"x": X_XOR, "y": Y_XOR}
    first = float(m.value_and_grad(params, inputs)[0])
    for step in range(20000):
        loss, grads = m.value_and_grad(params, inputs)
        for k in params:
            params[k] -= 2.0 * grads[k]
        a = m.forward(params, inputs)["a"]
        if step % 50 == 0 and np.array_equal(a > 0.5, Y_XOR > 0.5) and loss < 0.3:
            break
    a = m.forward(params, inputs)["a"]
    assert np.array_equal((a > 0.5).astype(float), Y_XOR), f"XOR not learned after {step} steps: {a.ravel()}"
    assert float(loss) < first
