"""Derivatives of derivatives: ``grad(y, x)`` nodes, and every op closed under differentiation.

- Every op's backward can be differentiated again: for each case of test_ops.py's table
  (and its internal ops, and the convolution family), the loss Σ_p ⟨∂L/∂p, w_p⟩ — built
  with ``grad`` nodes — has a gradient (H·w) that matches central differences.
- ``grad`` nodes of order 2 and 3 match finite differences of the order below and
  closed forms, in the builder and in specs; a loss may contain them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.spec import SpecError, load_spec, parse_spec

from conftest import draw, gradcheck
from test_jvp import CONV_CASES, VOCABULARY, conv_graph
from test_ops import CASES, DIRECT, _direct, _shape_id, build_case


def second_order(g: backcomp.Graph) -> backcomp.Graph:
    """Replace the loss L of ``g`` by Σ_p ⟨grad(L, p), w_p⟩ (w_p new inputs): its gradient
    is the Hessian of L times w, through the VJP of every backward node of L."""
    loss = g.loss_node
    total = None
    for name, p in list(g.params.items()):
        term = ops.sum(ops.grad(loss, p) * g.input(f"w_{name}", p.shape))
        total = term if total is None else total + term
    g.loss_node = None
    g.loss(total, name="loss2")
    return g


SECOND = [pytest.param(c, s, id=f"{c.name}[{_shape_id(s)}]") for c in CASES + VOCABULARY for s in c.shapes]


@pytest.mark.parametrize("case, shapes", SECOND)
def test_second_derivative_of_every_op(case, shapes):
    g, domains, _ = build_case(case, shapes)
    gradcheck(second_order(g), batch=3, seed=len(case.name), domains=domains)


@pytest.mark.parametrize("name, build_fn, ref, leaves, int_inputs", DIRECT, ids=[d[0] for d in DIRECT])
def test_second_derivative_of_internal_ops(name, build_fn, ref, leaves, int_inputs):
    g, domains, _ = _direct(name, build_fn, ref, leaves, int_inputs)
    gradcheck(second_order(g), domains={**domains, "labels": 4})


@pytest.mark.parametrize("name, build_fn, leaves", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_second_derivative_of_conv_family(name, build_fn, leaves):
    g, domains = conv_graph(name, build_fn, leaves)
    gradcheck(second_order(g), domains=domains)


def test_third_derivative_through_backward_of_backward():
    """Order 3 through the backward ops that the second order creates (max, conv, softmax)."""
    g = backcomp.Graph("third")
    x = g.param("x", (1, 1, 4, 4))
    w = g.param("w", (2, 1, 2, 2))
    h = ops.tanh(ops.conv2d(x, w, padding=1))
    pooled = ops.max_pool2d(h, 2)
    y = ops.sum(ops.softmax(ops.reshape(pooled, (1, -1))) ** 2) + ops.sum(ops.max(h, axis=1) ** 3)
    gx = ops.grad(y, x)
    g2 = ops.grad(ops.sum(gx * gx), w)
    g.loss(ops.sum(g2 * ops.sin(w)))
    gradcheck(g, domains={"x": "distinct"})


# ----- grad nodes of order 1, 2, 3 against finite differences ----------------------------------
def _chain_graph():
    """u(x) = Σ_j W2_j tanh(W1_j x + b1_j) per row, and d^k u/dx^k for k = 1, 2, 3."""
    g = backcomp.Graph("derivs")
    x = g.input("x", ("B", 1))
    W1, b1, W2 = g.param("W1", (1, 6)), g.param("b1", (6,)), g.param("W2", (6, 1))
    u = g.assign_name("u", ops.tanh(x @ W1 + b1) @ W2)
    du = g.assign_name("du", g.grad(ops.sum(u), x))
    d2u = g.assign_name("d2u", g.grad(ops.sum(du), x))
    d3u = g.assign_name("d3u", ops.grad(ops.sum(d2u), x))
    for name, node in (("u", u), ("du", du), ("d2u", d2u), ("d3u", d3u)):
        g.output(name, node)
    g.loss(ops.mean((d2u + u) ** 2) + ops.mean(d3u ** 2) / 10)
    return g


def _closed_form(P, X):
    a = X @ P["W1"] + P["b1"]
    t = np.tanh(a)
    d1 = 1 - t ** 2
    d2 = -2 * t * d1
    d3 = -2 * d1 * d1 + 4 * t * t * d1
    w = P["W1"]
    return {"u": t @ P["W2"], "du": (d1 * w) @ P["W2"], "d2u": (d2 * w ** 2) @ P["W2"],
            "d3u": (d3 * w ** 3) @ P["W2"]}


@pytest.mark.parametrize("opt_level", [0, 1])
def test_grad_nodes_of_order_1_to_3(opt_level):
    g = _chain_graph()
    m = backcomp.build(g, opt_level=opt_level)
    rng = np.random.default_rng(0)
    P = {k: rng.standard_normal(v) for k, v in m.PARAMS.items()}
    X = rng.uniform(-1, 1, (7, 1))
    out = m.forward(P, {"x": X})
    for k, v in _closed_form(P, X).items():
        np.testing.assert_allclose(out[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    h = 1e-5
    up, down = m.forward(P, {"x": X + h}), m.forward(P, {"x": X - h})
    for lower, higher in (("u", "du"), ("du", "d2u"), ("d2u", "d3u")):
        fd = (up[lower] - down[lower]) / (2 * h)
        np.testing.assert_allclose(out[higher], fd, rtol=1e-6, atol=1e-7, err_msg=higher)


def test_loss_with_grad_nodes_has_checked_gradients():
    """value_and_grad of a loss containing d²u and d³u: derivatives of order 3 and 4 in x, 1 in W."""
    gradcheck(_chain_graph(), batch=5, domains={"x": "unit"})


def test_grad_wrt_node_and_input_and_param():
    g = backcomp.Graph("wrt_kinds")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 2))
    z = x @ W
    y = ops.sum(ops.sin(z))
    gz, gx, gW = ops.grad(y, z), ops.grad(y, x), ops.grad(y, W)
    assert gz.shape == z.shape and gx.shape == x.shape and gW.shape == W.shape
    for name, node in (("gz", gz), ("gx", gx), ("gW", gW)):
        g.output(name, node)
    g.loss(ops.sum(gx ** 2) + ops.sum(gW * W))
    m = gradcheck(g)
    rng = np.random.default_rng(1)
    P, X = {"W": rng.standard_normal((3, 2))}, rng.standard_normal((4, 3))
    out = m.forward(P, {"x": X})
    c = np.cos(X @ P["W"])
    np.testing.assert_allclose(out["gz"], c, rtol=1e-12)
    np.testing.assert_allclose(out["gx"], c @ P["W"].T, rtol=1e-12)
    np.testing.assert_allclose(out["gW"], X.T @ c, rtol=1e-12)


def test_grad_of_a_value_y_does_not_depend_on_is_zero():
    g = backcomp.Graph("indep")
    a, b = g.param("a", (2,)), g.param("b", (3,))
    g.output("gb", ops.grad(ops.sum(a * a), b))
    g.output("gstop", ops.grad(ops.sum(ops.stop_gradient(b) ** 2) * ops.sum(a), b))
    g.loss(ops.sum(a))
    out = backcomp.build(g).forward({"a": np.ones(2), "b": np.ones(3)}, {})
    assert np.array_equal(out["gb"], np.zeros(3)) and np.array_equal(out["gstop"], np.zeros(3))


@pytest.mark.parametrize("build, pattern", [
    (lambda g, x, W: ops.grad(x @ W, W), r"grad: y must be a scalar \(wrap it in sum\(\) or mean\(\)\), but has shape \(B, 2\)"),
    (lambda g, x, W: ops.grad(ops.sum(x @ W), g.input("k", (3,), dtype="int")), r"x \('k'\) must be a float value"),
    (lambda g, x, W: ops.grad(ops.sum(W), backcomp.Graph("other").param("q", (2,))), r"different graphs"),
    (lambda g, x, W: ops.grad(ops.sum(W), 2.0), r"takes two arrays"),
])
def test_grad_errors(build, pattern):
    g = backcomp.Graph("errs")
    x, W = g.input("x", ("B", 3)), g.param("W", (3, 2))
    with pytest.raises(backcomp.GraphError, match=pattern):
        build(g, x, W)


# ----- in specs --------------------------------------------------------------------------------
SPEC = '''
[model]
outputs = ["u", "du", "d2u"]
[inputs]
x = ["B", 1]
[params]
W1 = [1, 6]
b1 = [6]
W2 = [6, 1]
[graph]
u = "tanh(x @ W1 + b1) @ W2"
du = "grad(sum(u), x)"
d2u = "grad(sum(grad(sum(u), x)), x)"
loss = "mean((d2u + u) ** 2)"
'''


def test_grad_in_a_spec_matches_closed_form_and_checks():
    g = parse_spec(SPEC, "derivs.toml")
    m = gradcheck(g, batch=4, domains={"x": "unit"})
    rng = np.random.default_rng(2)
    P = {k: rng.standard_normal(v) for k, v in m.PARAMS.items()}
    X = rng.uniform(-1, 1, (5, 1))
    out = m.forward(P, {"x": X})
    ref = _closed_form(P, X)
    for k in ("u", "du", "d2u"):
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("expr, message", [
    ('grad(sum(u), 2 * x)', "argument 'x' of grad() must be the name of an input, param or node"),
    ('grad(sum(u), lam)', "argument 'x' of grad() must be the name of an input, param or node"),
    ('grad(u, x)', "grad: y must be a scalar"),
    ('grad(sum(u))', "grad() is missing argument 'x'"),
    ('grad(sum(u), labels)', "integer input 'labels' has no gradient"),
])
def test_grad_spec_errors(expr, message):
    text = SPEC.replace('loss = "mean((d2u + u) ** 2)"', f'loss = "mean((d2u + u) ** 2)"\nbad = "{expr}"')
    text = text.replace('x = ["B", 1]', 'x = ["B", 1]\nlabels = { shape = ["B"], dtype = "int64" }')
    text = text.replace("[graph]", "[constants]\nlam = 0.5\n[graph]")
    with pytest.raises(SpecError) as err:
        parse_spec(text, "bad.toml")
    assert message in str(err.value) and "in node 'bad'" in str(err.value), str(err.value)


def test_grad_matches_torch_double_backward():
    """d²u/dx² of a small tanh net and the gradient of a loss holding it, against torch.autograd."""
    torch = pytest.importorskip("torch")
    g = parse_spec(SPEC, "derivs.toml")
    m = backcomp.build(g)
    P, I = draw(m, {"x": "unit"}, batch=6, seed=3)
    out = m.forward(P, I)
    loss, grads = m.value_and_grad(P, I)
    T = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    x = torch.tensor(I["x"], requires_grad=True)
    u = torch.tanh(x @ T["W1"] + T["b1"]) @ T["W2"]
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    tloss = ((d2u + u) ** 2).mean()
    tg = torch.autograd.grad(tloss, list(T.values()))
    np.testing.assert_allclose(out["d2u"], d2u.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)
    for k, v in zip(T, tg):
        np.testing.assert_allclose(grads[k], v.numpy(), rtol=1e-10, atol=1e-13, err_msg=k)


# ----- explain ----------------------------------------------------------------------------------
def test_explain_shows_grad_nodes_as_derivatives():
    """A grad node reads ∂/∂x y = <its value>, and the VJPs through it (second derivatives)
    are ḡ lines like any other; a value read only for its shape contributes no '+= 0'."""
    from backcomp.explain import explain
    text = SPEC.replace('d2u = "grad(sum(grad(sum(u), x)), x)"', 'd2u = "grad(sum(du), x)"')
    text = text.replace('u = "tanh(x @ W1 + b1) @ W2"', 'h = "tanh(x @ W1 + b1)"\nu = "h @ W2"')
    g = parse_spec(text, "derivs.toml")
    out = explain(g)
    assert "du = ∂/∂x Σ(u) = ((1 - h^2) ⊙ W2ᵀ) · W1ᵀ    # shape (B, 1)" in out, out
    assert "d2u = ∂/∂x Σ(du) = (2·W1 ⊙ h ⊙ (h^2 - 1) ⊙ W2ᵀ) · W1ᵀ    # shape (B, 1)" in out, out
    assert "    ḡ_h += 2·W1 ⊙ (3·h^2 - 1) ⊙ W2ᵀ ⊙ (ḡ_d2u · W1)" in out, out
    assert "+= 0" not in out and "= 0\n" not in out
    latex = explain(g, latex=True)
    assert r"du = \frac{\partial}{\partial x} \sum\left(u\right) = " in latex, latex
    # and the module's docstring is that text
    assert "d2u = ∂/∂x Σ(du) = " in backcomp.compile_source(g)


# ----- the example specs of issue 12 ------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name, domains", [("pinn.toml", {"x": "unit"}), ("gradient_penalty.toml", {})])
def test_example_specs_with_grad_nodes_check(name, domains):
    gradcheck(load_spec(EXAMPLES / name), batch=4, domains=domains)


def test_pinn_and_gradient_penalty_match_torch():
    """Loss and gradients of both specs against the same models written in torch with
    torch.autograd.grad(create_graph=True): nothing of backcomp's rules on the torch side."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)

    m = backcomp.build(EXAMPLES / "pinn.toml")
    P = {k: rng.standard_normal(s) * 0.5 for k, s in m.PARAMS.items()}
    X = rng.uniform(0, 1, (9, 1))
    loss, grads = m.value_and_grad(P, {"x": X})
    T = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    x = torch.tensor(X, requires_grad=True)
    h2 = torch.tanh(torch.tanh(x @ T["W1"] + T["b1"]) @ T["W2"] + T["b2"])
    u = x * (1 - x) * (h2 @ T["W3"])
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
    tloss = ((d2u + np.pi ** 2 * torch.sin(np.pi * x)) ** 2).mean()
    for k, g in zip(T, torch.autograd.grad(tloss, list(T.values()))):
        np.testing.assert_allclose(grads[k], g.numpy(), rtol=1e-10, atol=1e-10, err_msg=f"pinn {k}")
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)

    m = backcomp.build(EXAMPLES / "gradient_penalty.toml")
    P = {k: rng.standard_normal(s) * 0.5 for k, s in m.PARAMS.items()}
    I = {"x": rng.standard_normal((6, 2)), "sign": np.array([-0.5, -0.5, 0.5, 0.5, 0, 0]),
         "gp": np.array([0, 0, 0, 0, 5.0, 5.0])}
    loss, grads = m.value_and_grad(P, I)
    T = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    x = torch.tensor(I["x"], requires_grad=True)
    d = (torch.tanh(torch.tanh(x @ T["W1"] + T["b1"]) @ T["W2"] + T["b2"]) @ T["W3"]).reshape(-1)
    (dx,) = torch.autograd.grad(d.sum(), x, create_graph=True)
    tloss = (torch.tensor(I["sign"]) * d).sum() + (torch.tensor(I["gp"]) * (dx.norm(dim=1) - 1) ** 2).sum()
    for k, g in zip(T, torch.autograd.grad(tloss, list(T.values()))):
        np.testing.assert_allclose(grads[k], g.numpy(), rtol=1e-10, atol=1e-12, err_msg=f"gradient penalty {k}")
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)
