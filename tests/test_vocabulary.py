"""The first slice of the release-2 vocabulary (issue 10), op by op.

clip, expm1, square, log_sigmoid, silu, gelu(approximate=True), min, var, std, norm.
Each op is checked three ways: its gradient against central differences in float64
(conftest's ``gradcheck``), float32 in → float32 out, and its values and gradients
against PyTorch on the same arrays (rtol 1e-10 in float64), with the edge cases where
conventions differ between libraries: values exactly on clip's borders, ties for
min, a constant slice for std, a zero slice for norm, logits far out in both tails.
Then one spec per op family with keywords written by name, and located errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backcomp
from backcomp import ops
from backcomp.spec import SpecError, parse_spec

from conftest import Copying, gradcheck

RTOL = 1e-10


def _dims(axis):
    return {} if axis is None else {"dim": axis}


@dataclass
class Case:
    name: str
    ours: Callable       # node -> node
    theirs: Callable     # torch tensor -> tensor
    domain: str = "real"
    shape: tuple = (3, 4)


ELEMENTWISE = [
    Case("clip", lambda x: ops.clip(x, -0.25, 0.35), lambda t: torch.clamp(t, -0.25, 0.35), "distinct"),
    Case("expm1", ops.expm1, torch.expm1),
    Case("square", ops.square, torch.square),
    Case("log_sigmoid", ops.log_sigmoid, F.logsigmoid),
    Case("silu", ops.silu, F.silu),
    Case("gelu_tanh", lambda x: ops.gelu(x, approximate=True), lambda t: F.gelu(t, approximate="tanh")),
    Case("gelu_erf", ops.gelu, F.gelu),
]


def _reduction_cases(name, ours, theirs, domain, extra=({},)):
    out = []
    for tag, kw, shape in [("all", {}, (3, 4)), ("axis1", {"axis": 1}, (3, 4)), ("axis_neg", {"axis": -1}, (2, 3, 4)),
                           ("axes_keepdims", {"axis": (0, 2), "keepdims": True}, (2, 3, 4))]:
        for more in extra:
            kwargs = {**kw, **more}
            label = "_".join([name, tag] + [f"{k}{v}" for k, v in more.items()])
            out.append(Case(label, (lambda kw: lambda x: ours(x, **kw))(kwargs),
                            (lambda kw: lambda t: theirs(t, kw.get("axis"), kw.get("keepdims", False), **{
                                k: v for k, v in kw.items() if k not in ("axis", "keepdims")}))(kwargs),
                            domain, shape))
    return out


REDUCTIONS = [
    *_reduction_cases("min", ops.min, lambda t, axis, keep: torch.amin(t, **_dims(axis), keepdim=keep), "distinct"),
    *_reduction_cases("var", ops.var, lambda t, axis, keep, ddof=0: torch.var(t, **_dims(axis), correction=ddof,
                                                                             keepdim=keep), "real",
                      ({}, {"ddof": 1})),
    *_reduction_cases("std", ops.std, lambda t, axis, keep, ddof=0: torch.std(t, **_dims(axis), correction=ddof,
                                                                             keepdim=keep), "real",
                      ({}, {"ddof": 1})),
    *_reduction_cases("norm", ops.norm, lambda t, axis, keep: torch.linalg.vector_norm(t, 2, **_dims(axis),
                                                                                      keepdim=keep), "real"),
]
CASES = ELEMENTWISE + REDUCTIONS


def case_graph(case: Case, shape=None) -> backcomp.Graph:
    """loss = Σ op(w) ⊙ u: the VJP of op along a random cotangent u; op(w) is output y."""
    g = backcomp.Graph(f"vocab_{case.name}")
    w = g.param("w", shape or case.shape)
    y = case.ours(w)
    u = g.input("u", y.shape)
    g.output("y", y)
    g.loss(ops.sum(y * u))
    return g


def symbolic_graph(case: Case) -> backcomp.Graph:
    """The op over a symbolic batch: op(x ⊙ p) with x of shape (B, 4), gradient w.r.t. p."""
    g = backcomp.Graph(f"vocab_sym_{case.name}")
    p = g.param("p", (4,))
    y = case.ours(g.input("x", ("B", 4)) * p)
    g.loss(ops.sum(y * g.input("u", y.shape)))
    return g


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradient_matches_finite_differences(case):
    gradcheck(case_graph(case), domains={"w": case.domain})


SYMBOLIC = [c for c in CASES if c.shape == (3, 4) and "keepdims" not in c.name]


@pytest.mark.parametrize("case", SYMBOLIC, ids=lambda c: c.name)
def test_gradient_over_a_symbolic_batch(case):
    gradcheck(symbolic_graph(case), batch=5, domains={"x": case.domain, "p": "positive"})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_in_float32_out(case):
    m = backcomp.build(case_graph(case))
    rng = np.random.default_rng(0)
    w = rng.standard_normal(case.shape).astype(np.float32)
    u = rng.standard_normal(m.INPUTS["u"]).astype(np.float32)
    out = m.forward({"w": w}, {"u": u})
    assert out["y"].dtype == np.float32
    loss, grads = m.value_and_grad({"w": w}, {"u": u})
    assert loss.dtype == np.float32 and grads["w"].dtype == np.float32
    ref, ref_grad = torch_value_and_grad(case, w.astype(np.float64), u.astype(np.float64))
    np.testing.assert_allclose(out["y"], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["w"], ref_grad, rtol=1e-4, atol=1e-5)


# ----- against PyTorch ---------------------------------------------------------------------
def torch_value_and_grad(case: Case, w: np.ndarray, u: np.ndarray):
    t = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    y = case.theirs(t)
    (y * torch.tensor(u, dtype=torch.float64)).sum().backward()
    return y.detach().numpy(), t.grad.numpy()


def ours_value_and_grad(case: Case, w: np.ndarray, u: np.ndarray):
    m = Copying(backcomp.build(case_graph(case, w.shape)))
    _, grads = m.value_and_grad({"w": w}, {"u": u})
    return m.forward({"w": w}, {"u": u})["y"], grads["w"]


def max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(ours - ref) / scale, initial=0.0))


def assert_matches_torch(case: Case, w: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Values and gradients of ``case`` on ``w`` equal PyTorch's; returns the max relative errors."""
    shape = np.shape(case.theirs(torch.tensor(w)).detach().numpy())
    u = np.random.default_rng(seed).standard_normal(shape)
    y, gw = ours_value_and_grad(case, w, u)
    ty, tgw = torch_value_and_grad(case, w, u)
    np.testing.assert_allclose(y, ty, rtol=RTOL, atol=0, err_msg=f"{case.name}: value")
    np.testing.assert_allclose(gw, tgw, rtol=RTOL, atol=1e-300, err_msg=f"{case.name}: gradient")
    return max_rel_error(y, ty), max_rel_error(gw, tgw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_pytorch_on_random_arrays(case):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(case.shape) * 2
    assert_matches_torch(case, w)


TAILS = np.array([[-800.0, -60.0, -20.0, -1e-8], [0.0, 1e-12, 3.0, 20.0], [60.0, 700.0, -3.0, 0.5]])


@pytest.mark.parametrize("case", [c for c in ELEMENTWISE if c.name not in ("expm1", "gelu_erf")],
                         ids=lambda c: c.name)
def test_matches_pytorch_in_the_tails(case):
    """±800 overflows exp in float64: the stable forms must still give PyTorch's values and gradients."""
    assert_matches_torch(case, TAILS)


def test_expm1_near_zero_and_in_the_tails():
    """Values as torch.expm1; the gradient is exp(x) itself.  PyTorch's backward is ḡ·(result + 1),
    which cancels for x ≪ 0 (a relative error of 1.7e-4 at x = −30), so the gradient is checked
    against np.exp there and against PyTorch where its formula is exact."""
    w = np.array([[-1e-300, -1e-12, 1e-10, 0.0], [1e-5, -30.0, 700.0, 1.0]])
    u = np.random.default_rng(0).standard_normal(w.shape)
    y, grad = ours_value_and_grad(ELEMENTWISE[1], w, u)
    ty, tgrad = torch_value_and_grad(ELEMENTWISE[1], w, u)
    np.testing.assert_allclose(y, ty, rtol=RTOL, atol=0)
    np.testing.assert_allclose(grad, u * np.exp(w), rtol=1e-15, atol=0)
    exact = w > -1
    np.testing.assert_allclose(grad[exact], tgrad[exact], rtol=RTOL, atol=0)


@pytest.mark.parametrize("lo, hi", [(-0.25, 0.35), (0, 1), (0.5, 0.5)])
def test_clip_on_its_borders_passes_the_gradient_as_torch_clamp(lo, hi):
    w = np.array([[lo - 1.0, lo, (lo + hi) / 2, hi], [hi + 1e-9, lo - 1e-9, hi, lo]])
    case = Case("clip_borders", lambda x: ops.clip(x, lo, hi), lambda t: torch.clamp(t, lo, hi))
    assert_matches_torch(case, w)
    _, grad = ours_value_and_grad(case, w, np.ones(w.shape))
    inside = (w >= lo) & (w <= hi)
    np.testing.assert_array_equal(grad, inside.astype(float))


def test_clip_float32_borders():
    m = backcomp.build(case_graph(Case("clip32", lambda x: ops.clip(x, -0.25, 0.5), None), (4,)))
    w = np.array([-0.25, 0.5, -1.0, 2.0], dtype=np.float32)
    loss, grads = m.value_and_grad({"w": w}, {"u": np.ones(4, dtype=np.float32)})
    assert grads["w"].dtype == np.float32
    np.testing.assert_array_equal(grads["w"], [1.0, 1.0, 0.0, 0.0])


TIES = np.array([[1.0, 0.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0], [-1.0, 5.0, -1.0, -1.0]])


@pytest.mark.parametrize("case", [c for c in REDUCTIONS if c.name.startswith("min") and c.shape == (3, 4)],
                         ids=lambda c: c.name)
def test_min_ties_share_the_gradient_as_torch_amin(case):
    assert_matches_torch(case, TIES)


def test_min_ties_values():
    case = REDUCTIONS[1]   # min over axis 1
    _, grad = ours_value_and_grad(case, TIES, np.ones(3))
    np.testing.assert_array_equal(grad, [[0, 0.5, 0.5, 0], [0.25] * 4, [1 / 3, 0, 1 / 3, 1 / 3]])


@pytest.mark.parametrize("case", [c for c in REDUCTIONS if c.name.startswith(("std", "norm"))
                                  and c.shape == (3, 4) and "all" not in c.name], ids=lambda c: c.name)
def test_std_of_a_constant_row_and_norm_of_a_zero_row_have_gradient_zero(case):
    """PyTorch masks these (the derivative of √ at 0 is infinite); a NaN would poison training."""
    w = np.array([[0.0, 0.0, 0.0, 0.0], [1.5, 1.5, 1.5, 1.5], [1.0, -2.0, 0.5, 3.0]])
    if case.name.startswith("norm"):
        w[1] = [0.5, -1.0, 2.0, 0.0]
    with np.errstate(divide="ignore", invalid="ignore"):
        _, rel_grad = assert_matches_torch(case, w)
        _, grad = ours_value_and_grad(case, w, np.ones(3))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[0], 0.0)


def test_var_second_derivative_matches_torch():
    """var's VJP is derived with the mean's term kept, so differentiating it again is right
    (a stop_gradient on the mean would give the right first derivative and a wrong second)."""
    from backcomp.vjp import differentiate
    g = backcomp.Graph("var2")
    w = g.param("w", (3, 4))
    g.loss(ops.sum(ops.var(w, axis=1, ddof=1) * g.input("u", (3,))))
    d = differentiate(g)
    gw = d.grads["w"]
    d.loss_node, d.grads, d.cotangents = None, {}, {}
    d.loss(ops.sum(gw * d.input("v", (3, 4))), name="gv")
    m = backcomp.build(d)
    rng = np.random.default_rng(3)
    W, U, V = rng.standard_normal((3, 4)), rng.standard_normal(3), rng.standard_normal((3, 4))
    _, grads = m.value_and_grad({"w": W}, {"u": U, "v": V})
    t = torch.tensor(W, requires_grad=True)
    (gt,) = torch.autograd.grad((torch.var(t, dim=1, correction=1) * torch.tensor(U)).sum(), t, create_graph=True)
    (hv,) = torch.autograd.grad((gt * torch.tensor(V)).sum(), t)
    np.testing.assert_allclose(grads["w"], hv.numpy(), rtol=RTOL, atol=1e-14)


# ----- errors of the Python builder ----------------------------------------------------------
@pytest.mark.parametrize("build, pattern", [
    (lambda x: ops.clip(x, 1.0, -1.0), r"clip: lo \(1.0\) is greater than hi \(-1.0\)"),
    (lambda x: ops.clip(x, "a", 1.0), "expected a node or a number"),
    (lambda x: ops.gelu(x, approximate="tanh"), "approximate must be True or False"),
    (lambda x: ops.var(x, axis=1, ddof=4), "ddof=4 leaves no degrees of freedom over the 4 reduced elements"),
    (lambda x: ops.std(x, ddof=-1), "ddof must be a non-negative integer"),
    (lambda x: ops.min(x, axis=2), "min: axis 2 is out of range"),
    (lambda x: ops.norm(x, keepdims=1), "norm: keepdims must be true or false"),
])
def test_builder_errors(build, pattern):
    g = backcomp.Graph("bad")
    with pytest.raises((backcomp.GraphError, backcomp.ShapeError), match=pattern):
        build(g.param("w", (3, 4)))


# ----- in a spec, keywords by name -------------------------------------------------------------
ELEMENTWISE_SPEC = '''
[model]
outputs = ["y", "loss"]

[inputs]
x = ["B", 4]

[params]
W = [4, 4]

[graph]
h = "x @ W"
y = """clip(h, lo=-0.5, hi=0.75) + expm1(h) + square(h) + log_sigmoid(h) + silu(h)
       + gelu(h, approximate=True) + gelu(h, approximate=False) - gelu(-h)"""
loss = "mean(y)"
'''

REDUCTION_SPEC = '''
[model]
outputs = ["y", "loss"]

[inputs]
x = ["B", 4]

[params]
W = [4, 4]

[graph]
h = "x @ W"
y = "min(h, axis=-1) + std(h, axis=-1, ddof=1) + std(h, 1) + norm(h, axis=1, keepdims=False) + min(h, -1, True)[:, 0]"
loss = "mean(y) + norm(W)"
'''


def _torch_elementwise(h):
    return (torch.clamp(h, -0.5, 0.75) + torch.expm1(h) + torch.square(h) + F.logsigmoid(h) + F.silu(h)
            + F.gelu(h, approximate="tanh") + F.gelu(h) - F.gelu(-h))


def _torch_reductions(h):
    return (torch.amin(h, dim=-1) + torch.std(h, dim=-1, correction=1) + torch.std(h, dim=1, correction=0)
            + torch.linalg.vector_norm(h, dim=1) + torch.amin(h, dim=-1, keepdim=True)[:, 0])


@pytest.mark.parametrize("text, reference, extra", [
    (ELEMENTWISE_SPEC, _torch_elementwise, lambda W: 0),
    (REDUCTION_SPEC, _torch_reductions, lambda W: torch.linalg.vector_norm(W)),
], ids=["elementwise", "reductions"])
def test_spec_with_keywords_matches_torch(text, reference, extra):
    m = backcomp.build(parse_spec(text, "vocab.toml"))
    rng = np.random.default_rng(5)
    W, x = rng.standard_normal((4, 4)), rng.standard_normal((6, 4))
    x[0, :] = 0.0   # a zero row of h: std's and norm's masked gradient, clip's border at h = 0 is inside
    with np.errstate(divide="ignore"):   # √'s derivative at 0 is computed, then masked to 0
        loss, grads = m.value_and_grad({"W": W}, {"x": x})
    y = m.forward({"W": W}, {"x": x})["y"]
    tW = torch.tensor(W, requires_grad=True)
    ty = reference(torch.tensor(x) @ tW)
    tloss = ty.mean() + extra(tW)
    tloss.backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=1e-15)
    np.testing.assert_allclose(loss, tloss.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["W"], tW.grad.numpy(), rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("expr, col, message", [
    ("gelu(h, approx=True)", 9, "gelu() got an unexpected keyword argument 'approx' (allowed: approximate) "
                                "in node 'y' (did you mean 'approximate'?)"),
    ("gelu(h, approximate=1)", 21, "argument 'approximate' of gelu() must be True or False in node 'y'"),
    ("clip(h, lo=1, high=2)", 15, "clip() got an unexpected keyword argument 'high' (allowed: lo, hi) "
                                  "in node 'y' (did you mean 'hi'?)"),
    ("clip(h, 0.5)", 1, "clip() is missing argument 'hi': clip(x, lo, hi) in node 'y'"),
    ("clip(h, lo=2, hi=1)", 1, "clip: lo (2.0) is greater than hi (1.0) in node 'y'"),
    ("std(h, axis=-1, ddof=-1)", 22, "argument 'ddof' of std() must be non-negative, got -1 in node 'y'"),
    ("std(h, axis=-1, ddof=4)", 1, "std: ddof=4 leaves no degrees of freedom over the 4 reduced elements in node 'y'"),
    ("norm(h, axis=-1, ord=1)", 18, "norm() got an unexpected keyword argument 'ord' (allowed: axis, keepdims) "
                                    "in node 'y'"),
    ("min(h, axis=3)", 1, "min: axis 3 is out of range for an array of rank 2 in node 'y'"),
])
def test_spec_errors_are_located(expr, col, message):
    """``col`` is 1-based within the expression (the keyword, the value, or the call)."""
    text = ELEMENTWISE_SPEC.split("[graph]")[0] + f'[graph]\nh = "x @ W"\ny = "{expr}"\nloss = "mean(y)"\n'
    line = text.split("\n").index(f'y = "{expr}"') + 1
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.toml")
    start = len('y = "')
    assert str(info.value) == f"bad.toml:{line}:{start + col}: error: {message}"


def test_var_in_a_spec_matches_torch(tmp_path):
    """var by name in a spec (ddof as a keyword), values and gradients as torch.var."""
    import textwrap
    path = tmp_path / "v.toml"
    path.write_text(textwrap.dedent('''\
        [model]
        name = "v"
        loss = "loss"
        [inputs]
        x = ["B", 5]
        [params]
        W = [5, 5]
        [graph]
        h = "x @ W"
        loss = "sum(var(h, axis=-1, ddof=1)) + sum(var(h))"
        '''))
    m = backcomp.build(path)
    p = m.init_params(dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 5))
    loss, grads = m.value_and_grad(p, {"x": x})
    W = torch.tensor(p["W"], requires_grad=True)
    h = torch.tensor(x) @ W
    ref = h.var(dim=-1, correction=1).sum() + h.var(correction=0)
    ref.backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grads["W"], W.grad.numpy(), rtol=1e-10)
