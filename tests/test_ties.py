"""maximum/minimum at an exact tie of two varying operands: each gets half the gradient.

This is PyTorch's and JAX's rule.  SymPy's derivative of Max, H(u − v) and H(v − u)
with relu's H(0) = 0, gave both operands 0 (the fuzz helper's sum(minimum(leaky_relu(p),
p)) had gradient 0 where p > 0).  The rule must not depend on the operands' order or
on the level: fusion at -O1 reorders operands and would let SymPy flatten nested
maxima.  A tie with a number keeps relu's rule: max(x, 0) and max(x, c) give x 0.
Every case runs at -O0 and -O1, in float64 against torch and in float32 for the dtype
of everything the module computes.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

import backcomp
from backcomp import ops
from backcomp.explain import explain
from backcomp.jvp import push_tangents
from backcomp.spec import parse_spec

from test_fuzz_elementwise import traced

# exact ties between p, q and r, and with 0, in several places
P = np.array([1.0, 0.5, -1.0, 0.0, 0.0, 2.0])
Q = np.array([1.0, 1.0, -1.0, 0.0, 0.5, 4.0])
R = np.array([1.0, 0.0, -1.0, 0.0, 0.5, 4.0])
X = np.array([[0.5, -0.5, 1.5, 1.0, 2.0, -1.0], [-1.0, 2.0, 0.1, 1.0, 1.0, 1.0]])


def spec(graph: str) -> backcomp.Graph:
    text = ('[model]\nname = "ties"\nloss = "loss"\n[inputs]\nx = ["B", 6]\n'
            f'[params]\np = [6]\nq = [6]\nr = [6]\n[graph]\n{graph}\n')
    return parse_spec(text, "ties.toml")


def gradients(graph: backcomp.Graph, level: int, dtype) -> dict[str, np.ndarray]:
    """value_and_grad's gradients at P, Q, R, X, asserting every float array the module
    holds on the way has the params' dtype."""
    m = backcomp.build(graph, opt_level=level)
    params = {"p": P.astype(dtype), "q": Q.astype(dtype), "r": R.astype(dtype)}
    (loss, grads), seen = traced(m, m.value_and_grad, params, {"x": X.astype(dtype)})
    want = np.dtype(dtype).name
    wrong = {k: v for k, v in seen.items() if v != {want}}
    assert not wrong, f"-O{level}: a {want} model computes in another dtype: {wrong}"
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    return grads


def torch_gradients(f) -> dict[str, np.ndarray]:
    t = {k: torch.tensor(v, requires_grad=True) for k, v in (("p", P), ("q", Q), ("r", R))}
    f(t["p"], t["q"], t["r"], torch.tensor(X)).backward()
    return {k: v.grad.numpy() if v.grad is not None else np.zeros_like(P) for k, v in t.items()}


def check(graph: backcomp.Graph, want: dict[str, np.ndarray]):
    for level in (0, 1):
        for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
            got = gradients(graph, level, dtype)
            for name in ("p", "q", "r"):
                np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol,
                                           err_msg=f"-O{level} {np.dtype(dtype).name}: gradient of {name}")


CASES = {
    # the fuzz helper's reproducer: equal where p > 0, so the gradient there is ½ + ½
    "sum(minimum(leaky_relu(p, alpha=0.1), p))": lambda p, q, r, x: torch.minimum(F.leaky_relu(p, 0.1), p).sum(),
    "sum(maximum(p, q))": lambda p, q, r, x: torch.maximum(p, q).sum(),
    "sum(minimum(p, q) * x)": lambda p, q, r, x: (torch.minimum(p, q) * x).sum(),
    # operands that SymPy and fusion order differently at each level
    "sum(maximum(2 * p, q))": lambda p, q, r, x: torch.maximum(2 * p, q).sum(),
    "sum(x * tanh(maximum(2 * p, q)))": lambda p, q, r, x: (x * torch.tanh(torch.maximum(2 * p, q))).sum(),
    "sum(x * minimum(q, 2 * p))": lambda p, q, r, x: (x * torch.minimum(q, 2 * p)).sum(),
    # nested: SymPy would flatten max(max(p, q), r); three-way ties at 0, 2 and 3
    "sum(maximum(maximum(p, q), r))": lambda p, q, r, x: torch.maximum(torch.maximum(p, q), r).sum(),
    "sum(x * maximum(p, maximum(q, r)))": lambda p, q, r, x: (x * torch.maximum(p, torch.maximum(q, r))).sum(),
    "sum(x * minimum(maximum(p, q), r))": lambda p, q, r, x: (x * torch.minimum(torch.maximum(p, q), r)).sum(),
    # with relu (a max with 0) inside and outside: max(relu(p), q) is no max(p, q, 0)
    "sum(x * maximum(relu(p), q))": lambda p, q, r, x: (x * torch.maximum(F.relu(p), q)).sum(),
    "sum(x * relu(maximum(p, q)))": lambda p, q, r, x: (x * F.relu(torch.maximum(p, q))).sum(),
    "sum(maximum(p, q) * maximum(p, q))": lambda p, q, r, x: (torch.maximum(p, q) * torch.maximum(p, q)).sum(),
}


@pytest.mark.parametrize("expr", list(CASES))
def test_a_tie_is_split_as_torch_splits_it(expr):
    check(spec(f'loss = "{expr}"'), torch_gradients(CASES[expr]))


def test_ties_match_jax():
    """JAX splits ties the same way.  Its leaky_relu′(0) is 1 (torch's and backcomp's
    0.1), so the reproducer is compared where p ≠ 0."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        p, q, r = (jnp.asarray(a) for a in (P, Q, R))
        grad = jax.grad(lambda p: jnp.sum(jnp.minimum(jax.nn.leaky_relu(p, 0.1), p)))(p)
        pairs = {
            "sum(maximum(2 * p, q))": jax.grad(lambda p, q, r: jnp.sum(jnp.maximum(2 * p, q)), (0, 1, 2))(p, q, r),
            "sum(maximum(maximum(p, q), r))":
                jax.grad(lambda p, q, r: jnp.sum(jnp.maximum(jnp.maximum(p, q), r)), (0, 1, 2))(p, q, r),
        }
    for level in (0, 1):
        got = gradients(spec('loss = "sum(minimum(leaky_relu(p, alpha=0.1), p))"'), level, np.float64)["p"]
        np.testing.assert_allclose(got[P != 0], np.asarray(grad)[P != 0], rtol=1e-12)
    for expr, want in pairs.items():
        check(spec(f'loss = "{expr}"'), dict(zip("pqr", map(np.asarray, want))))


def test_exact_ties_get_half_each():
    """The values written out: P and Q tie at indices 0, 2, 3."""
    tie = np.array([0.5, 0, 0.5, 0.5, 0, 0])
    check(spec('loss = "sum(maximum(p, q))"'), {"p": (P > Q) + tie, "q": (Q > P) + tie, "r": 0 * R})
    check(spec('loss = "sum(minimum(p, q))"'), {"p": (P < Q) + tie, "q": (Q < P) + tie, "r": 0 * R})
    # the reproducer: 1 where p > 0 (a tie, ½ + ½), and at p = 0 ½·leaky_relu′(0) + ½ = 0.55
    check(spec('loss = "sum(minimum(leaky_relu(p, alpha=0.1), p))"'),
          {"p": np.array([1.0, 1.0, 1.0, 0.55, 0.55, 1.0]), "q": 0 * Q, "r": 0 * R})


def test_maximum_of_2p_and_q_is_the_same_at_both_levels():
    """The review's case for the reverted fix: maximum(2*p, q) gave dq = 1 at -O0 and dp = 2
    at -O1.  At 2p = q (index 3, and 5: 4 = 4) each side gets half: dp = 2 · ½, dq = ½."""
    tie = (2 * P == Q)
    check(spec('loss = "sum(maximum(2 * p, q))"'),
          {"p": 2.0 * (2 * P > Q) + 1.0 * tie, "q": 1.0 * (Q > 2 * P) + 0.5 * tie, "r": 0 * R})


@pytest.mark.parametrize("expr, want", [
    ("sum(x * maximum(p, 0))", lambda: X.sum(0) * (P > 0)),
    ("sum(x * relu(p))", lambda: X.sum(0) * (P > 0)),
    ("sum(minimum(p, 0))", lambda: 1.0 * (P < 0)),
    ("sum(maximum(p, 0.5))", lambda: 1.0 * (P > 0.5)),             # p = 0.5 at index 1: 0
    ("sum(clip(p, -1, 0.5))", lambda: 1.0 * ((P >= -1) & (P <= 0.5))),   # borders: 1, as torch.clamp
], ids=["maximum(p, 0)", "relu", "minimum(p, 0)", "maximum(p, 0.5)", "clip"])
def test_a_tie_with_a_number_keeps_relus_rule(expr, want):
    check(spec(f'loss = "{expr}"'), {"p": want(), "q": 0 * Q, "r": 0 * R})


def test_a_user_max_of_two_arguments_splits_its_ties():
    """sp.Max in a scalar_function follows maximum's rule; of three operands it is nested
    in SymPy's order (u, v, w here): ¼, ¼, ½ at a three-way tie."""
    u, v, w = sp.symbols("u v w")
    f = ops.scalar_function("max3", [u, v, w], sp.Max(u, v, w))
    g = backcomp.Graph("max3")
    p, q, r = (g.param(n, (6,)) for n in "pqr")
    g.input("x", ("B", 6))
    g.loss(ops.sum(f(p, q, r)))
    check(g, torch_gradients(lambda p, q, r, x: torch.maximum(torch.maximum(p, q), r).sum()))


def test_a_functions_body_max_of_two_arguments_splits_its_ties():
    """maximum in a [functions] body is the op's: half each at a tie of its arguments,
    relu's 0 at a tie with a number written in the body."""
    text = ('[model]\nname = "ties"\nloss = "loss"\n[inputs]\nx = ["B", 6]\n'
            '[params]\np = [6]\nq = [6]\nr = [6]\n'
            '[functions]\nhinge = { args = ["a", "b"], expr = "maximum(a, b) + maximum(a, 0.5)" }\n'
            '[graph]\nloss = "sum(hinge(p, q) * x)"\n')
    check(parse_spec(text, "ties.toml"), torch_gradients(
        lambda p, q, r, x: ((torch.maximum(p, q) + F.relu(p - 0.5) + 0.5) * x).sum()))


def test_a_functions_max_called_with_a_number_ties_as_maximum_with_a_number():
    """hinge(p, 0.5) = maximum(p, 0.5): relu's 0 at p = 0.5 (P[1]), as maximum(p, 0.5)
    written out, not half (found by review); hinge(p, q) still splits its ties."""
    text = ('[model]\nname = "ties"\nloss = "loss"\n[inputs]\nx = ["B", 6]\n'
            '[params]\np = [6]\nq = [6]\nr = [6]\n'
            '[functions]\nhinge = { args = ["a", "b"], expr = "maximum(a, b)" }\n'
            'twice = { args = ["a"], expr = "hinge(a, 0.5) + hinge(a, a * 0.5)" }\n'
            '[graph]\nloss = "sum((hinge(p, 0.5) + twice(p) + hinge(p, q)) * x)"\n')
    check(parse_spec(text, "ties.toml"), torch_gradients(
        lambda p, q, r, x: ((2 * (F.relu(p - 0.5) + 0.5) + torch.maximum(p, p * 0.5) + torch.maximum(p, q)) * x).sum()))


@pytest.mark.parametrize("level", [0, 1])
def test_the_tangent_at_a_tie_is_the_mean_of_the_operands_tangents(level):
    """Forward mode uses the same partials: ṫ = ½ṫ_p + ½ṫ_q where p = q (torch.func.jvp)."""
    g = backcomp.Graph("jvp_ties")
    p, q = g.param("p", (6,)), g.param("q", (6,))
    out = ops.maximum(p * 2.0, q)
    g.loss(ops.sum(out))
    tp, tq = g.input("tp", (6,)), g.input("tq", (6,))
    g.output("out_dot", push_tangents(g, {p: tp, q: tq}, [out])[out])
    m = backcomp.build(g, opt_level=level)
    rng = np.random.default_rng(0)
    tan_p, tan_q = rng.standard_normal(6), rng.standard_normal(6)
    got = m.forward({"p": P, "q": Q}, {"tp": tan_p, "tq": tan_q})["out_dot"]
    _, want = torch.func.jvp(lambda a, b: torch.maximum(2 * a, b), (torch.tensor(P), torch.tensor(Q)),
                             (torch.tensor(tan_p), torch.tensor(tan_q)))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", [0, 1])
def test_a_gradient_of_a_gradient_at_a_tie(level):
    """∂/∂q of ∂/∂p Σ max(p, q)² = 2·max·H½(p − q): ½ at a tie (torch's double backward)."""
    graph = spec('d = "grad(sum(maximum(p, q) * maximum(p, q)), p)"\nloss = "sum(d * x)"')
    m = backcomp.build(graph, opt_level=level)
    _, got = m.value_and_grad({"p": P, "q": Q, "r": R}, {"x": X})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in (("p", P), ("q", Q))}
    (d,) = torch.autograd.grad((torch.maximum(t["p"], t["q"]) ** 2).sum(), t["p"], create_graph=True)
    (d * torch.tensor(X)).sum().backward()
    np.testing.assert_allclose(got["p"], t["p"].grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["q"], t["q"].grad.numpy(), rtol=1e-12, atol=1e-12)


def test_the_backward_multiplies_by_masks():
    """ḡ·H½(u − v) is 0.5·ḡ times [u > v] + [u >= v] in int8: no np.heaviside, 10x slower."""
    for level in (0, 1):
        source = backcomp.compile_source(spec('loss = "sum(x * tanh(maximum(p, q)))"'), opt_level=level)
        backward = source[source.index("def value_and_grad"):]
        assert "np.heaviside" not in backward
        assert "((p > q).view(np.int8) + (p >= q).view(np.int8))" in backward
        assert "((q > p).view(np.int8) + (q >= p).view(np.int8))" in backward


def test_explain_shows_the_half_step():
    report = explain(spec('h = "maximum(p, q)"\nloss = "sum(h * x)"'))
    assert "½((p > q) + (p ≥ q))" in report and "½((q > p) + (q ≥ p))" in report, report
    latex = explain(spec('h = "maximum(p, q)"\nloss = "sum(h * x)"'), latex=True)
    assert r"\tfrac{1}{2}\left(\mathbb{1}\left[p > q\right] + \mathbb{1}\left[p \geq q\right]\right)" in latex
