"""The shape, scan and NN slice of the release-2 vocabulary (issue 10), op by op.

argmax, cumsum, stack, expand_dims, squeeze, flip, pad, broadcast_to, layer_norm,
l2_normalize, cross_entropy.  As in test_vocabulary.py, each differentiable op is
checked against central differences in float64 (conftest's ``gradcheck``), keeps
float32, runs over a symbolic batch dim, and equals PyTorch in values and gradients
(rtol 1e-10 in float64) on the same arrays.  cross_entropy is checked on PyTorch's
own edge cases: ignored rows, every row ignored (nan, gradient 0), label smoothing,
3-D logits, and labels out of range (a ValueError naming the label).  Then the ops
from a spec, and located errors.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backcomp
from backcomp import ops
from backcomp.check import check_gradients
from backcomp.spec import SpecError, parse_spec

from conftest import Copying, gradcheck

RTOL = 1e-10


@dataclass
class Case:
    name: str
    ours: Callable        # node -> node
    theirs: Callable      # torch tensor -> tensor
    shape: tuple = (3, 4)
    domain: str = "real"
    symbolic: bool = True   # the op also applies to a (B, ...) operand


def _torch_pad(widths):
    """np.pad's per-axis (before, after) pairs as F.pad's flat list (last axis first)."""
    return [w for pair in reversed(widths) for w in pair]


CASES = [
    Case("cumsum_axis1", lambda x: ops.cumsum(x, axis=1), lambda t: torch.cumsum(t, 1)),
    Case("cumsum_axis0", lambda x: ops.cumsum(x, 0), lambda t: torch.cumsum(t, 0)),
    Case("cumsum_3d_neg", lambda x: ops.cumsum(x, axis=-2), lambda t: torch.cumsum(t, -2), (2, 3, 4)),
    Case("stack_axis0", lambda x: ops.stack((x, ops.sin(x), x)), lambda t: torch.stack((t, torch.sin(t), t))),
    Case("stack_axis1", lambda x: ops.stack((x * x, x), axis=1), lambda t: torch.stack((t * t, t), 1)),
    Case("stack_last", lambda x: ops.stack((x, ops.exp(x)), axis=-1), lambda t: torch.stack((t, torch.exp(t)), -1)),
    Case("expand_dims", lambda x: ops.expand_dims(x, 1), lambda t: t.unsqueeze(1)),
    Case("expand_dims_tuple", lambda x: ops.expand_dims(x, (0, -1)), lambda t: t.unsqueeze(0).unsqueeze(-1)),
    Case("squeeze_axis", lambda x: ops.squeeze(x, axis=1), lambda t: t.squeeze(1), (3, 1, 4)),
    Case("squeeze_all", lambda x: ops.squeeze(x), lambda t: t.squeeze(), (3, 1, 4, 1)),
    Case("flip_axis", lambda x: ops.flip(x, axis=1), lambda t: torch.flip(t, (1,))),
    Case("flip_tuple", lambda x: ops.flip(x, axis=(0, 2)), lambda t: torch.flip(t, (0, 2)), (3, 2, 4), symbolic=False),
    Case("flip_all", lambda x: ops.flip(x), lambda t: torch.flip(t, (0, 1))),
    Case("pad_int", lambda x: ops.pad(x, 1), lambda t: F.pad(t, [1, 1, 1, 1]), symbolic=False),
    Case("pad_pair", lambda x: ops.pad(x, (2, 0)), lambda t: F.pad(t, [2, 0, 2, 0]), symbolic=False),
    Case("pad_per_axis", lambda x: ops.pad(x, ((0, 0), (1, 3))), lambda t: F.pad(t, _torch_pad(((0, 0), (1, 3))))),
    Case("pad_3d", lambda x: ops.pad(x, ((1, 0), (0, 0), (0, 2))),
         lambda t: F.pad(t, _torch_pad(((1, 0), (0, 0), (0, 2)))), (2, 3, 4), symbolic=False),
    Case("broadcast_to", lambda x: ops.broadcast_to(x, (2, 3, 4)), lambda t: torch.broadcast_to(t, (2, 3, 4)),
         symbolic=False),
    Case("broadcast_to_unit", lambda x: ops.broadcast_to(x, (x.shape[0], 5, 4)),   # (B, 5, 4) over a batch
         lambda t: torch.broadcast_to(t, (t.shape[0], 5, 4)), (3, 1, 4)),
    Case("l2_normalize", ops.l2_normalize, lambda t: F.normalize(t, dim=-1)),
    Case("l2_normalize_axis0", lambda x: ops.l2_normalize(x, axis=0), lambda t: F.normalize(t, dim=0),
         symbolic=False),
    Case("l2_normalize_eps", lambda x: ops.l2_normalize(x, axis=1, eps=0.5), lambda t: F.normalize(t, dim=1, eps=0.5),
         (3, 4, 2)),
]


def case_graph(case: Case, shape=None) -> backcomp.Graph:
    """loss = Σ op(w) ⊙ u: the VJP of op along a random cotangent u; op(w) is output y."""
    g = backcomp.Graph(f"shape_{case.name}")
    w = g.param("w", shape or case.shape)
    y = case.ours(w)
    g.output("y", y)
    g.loss(ops.sum(y * g.input("u", y.shape)))
    return g


def symbolic_graph(case: Case) -> backcomp.Graph:
    """The op on x ⊙ p with x of shape (B, ...): gradients w.r.t. p through a symbolic batch."""
    g = backcomp.Graph(f"shape_sym_{case.name}")
    p = g.param("p", case.shape[1:])
    y = case.ours(g.input("x", ("B",) + case.shape[1:]) * p)
    assert y.shape[0] == "B" or "B" in y.shape
    g.loss(ops.sum(y * g.input("u", y.shape)))
    return g


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradient_matches_finite_differences(case):
    gradcheck(case_graph(case), domains={"w": case.domain})


@pytest.mark.parametrize("case", [c for c in CASES if c.symbolic], ids=lambda c: c.name)
def test_gradient_over_a_symbolic_batch(case):
    gradcheck(symbolic_graph(case), batch=5, domains={"p": "positive"})


def torch_value_and_grad(case: Case, w: np.ndarray, u: np.ndarray):
    t = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    y = case.theirs(t)
    (y * torch.tensor(u, dtype=torch.float64)).sum().backward()
    return y.detach().numpy(), t.grad.numpy()


def ours_value_and_grad(case: Case, w: np.ndarray, u: np.ndarray):
    m = Copying(backcomp.build(case_graph(case, w.shape)))
    _, grads = m.value_and_grad({"w": w}, {"u": u})
    return m.forward({"w": w}, {"u": u})["y"], grads["w"]


def assert_matches_torch(case: Case, w: np.ndarray, seed: int = 0):
    shape = tuple(case.theirs(torch.tensor(w)).shape)
    u = np.random.default_rng(seed).standard_normal(shape)
    y, gw = ours_value_and_grad(case, w, u)
    ty, tgw = torch_value_and_grad(case, w, u)
    assert y.shape == ty.shape and gw.shape == w.shape
    np.testing.assert_allclose(y, ty, rtol=RTOL, atol=1e-300, err_msg=f"{case.name}: value")
    np.testing.assert_allclose(gw, tgw, rtol=RTOL, atol=1e-300, err_msg=f"{case.name}: gradient")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_pytorch_on_random_arrays(case):
    w = np.random.default_rng(1).standard_normal(case.shape) * 2
    assert_matches_torch(case, w)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_in_float32_out(case):
    m = backcomp.build(case_graph(case))
    rng = np.random.default_rng(0)
    w = rng.standard_normal(case.shape).astype(np.float32)
    u = rng.standard_normal(m.INPUTS["u"]).astype(np.float32)
    y = m.forward({"w": w}, {"u": u})["y"]
    loss, grads = m.value_and_grad({"w": w}, {"u": u})
    assert y.dtype == np.float32 and loss.dtype == np.float32 and grads["w"].dtype == np.float32
    ty, tgw = torch_value_and_grad(case, w.astype(np.float64), u.astype(np.float64))
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["w"], tgw, rtol=1e-4, atol=1e-5)


def test_l2_normalize_of_a_zero_row_matches_torch():
    """A zero slice divides by eps: the value is 0 and the gradient 1/eps·ḡ, as F.normalize (no nan)."""
    w = np.array([[0.0, 0.0, 0.0, 0.0], [3.0, -4.0, 0.0, 0.0], [1e-13, 0.0, 0.0, 0.0]])
    with np.errstate(divide="ignore", invalid="ignore"):
        assert_matches_torch(CASES[[c.name for c in CASES].index("l2_normalize")], w)


def test_l2_normalize_with_a_tiny_eps_in_float32_divides_by_eps():
    """eps = 1e-30 is a float32 number but eps² is not: a zero row must still give 0, as F.normalize."""
    g = backcomp.Graph("tiny_eps")
    x = g.input("x", (2, 3))
    g.output("y", ops.l2_normalize(x, eps=1e-30))
    X = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = backcomp.build(g).forward({}, {"x": X})["y"]
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, F.normalize(torch.tensor(X), dim=-1, eps=1e-30).numpy())


def test_pad_crops_the_gradient_and_stack_splits_it():
    """The cotangent of pad is ḡ on the unpadded block; of stack, ḡ's slice for each operand."""
    g = backcomp.Graph("crop")
    w = g.param("w", (2, 3))
    v = g.param("v", (2, 3))
    padded = ops.pad(ops.stack((w, 2 * v), axis=-1), ((1, 0), (0, 2), (0, 0)))   # (3, 5, 2)
    g.loss(ops.sum(padded * g.input("u", padded.shape)))
    m = backcomp.build(g)
    u = np.arange(30.0).reshape(3, 5, 2)
    _, grads = m.value_and_grad({"w": np.ones((2, 3)), "v": np.ones((2, 3))}, {"u": u})
    np.testing.assert_array_equal(grads["w"], u[1:, :3, 0])
    np.testing.assert_array_equal(grads["v"], 2 * u[1:, :3, 1])


def test_cumsum_gradient_is_the_reversed_cumsum():
    g = backcomp.Graph("cum")
    w = g.param("w", (4,))
    g.loss(ops.sum(ops.cumsum(w, axis=0) * g.input("u", (4,))))
    m = backcomp.build(g)
    u = np.array([1.0, 10.0, 100.0, 1000.0])
    _, grads = m.value_and_grad({"w": np.zeros(4)}, {"u": u})
    np.testing.assert_array_equal(grads["w"], [1111.0, 1110.0, 1100.0, 1000.0])
    assert "np.flip(np.cumsum(np.flip(" in backcomp.compile_source(g)


def test_cumsum_second_derivative_matches_torch():
    """cumsum's VJP is a cumsum node, so the backward differentiates again."""
    from backcomp.vjp import differentiate
    g = backcomp.Graph("cum2")
    w = g.param("w", (3, 4))
    g.loss(ops.sum(ops.cumsum(w * w, axis=1) ** 2 * g.input("u", (3, 4))))
    d = differentiate(g)
    gw = d.grads["w"]
    d.loss_node, d.grads, d.cotangents = None, {}, {}
    d.loss(ops.sum(gw * d.input("v", (3, 4))), name="gv")
    rng = np.random.default_rng(2)
    W, U, V = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    _, grads = backcomp.build(d).value_and_grad({"w": W}, {"u": U, "v": V})
    t = torch.tensor(W, requires_grad=True)
    (gt,) = torch.autograd.grad((torch.cumsum(t * t, 1) ** 2 * torch.tensor(U)).sum(), t, create_graph=True)
    (hv,) = torch.autograd.grad((gt * torch.tensor(V)).sum(), t)
    np.testing.assert_allclose(grads["w"], hv.numpy(), rtol=RTOL, atol=1e-13)


def test_views_alias_nothing_the_caller_passed():
    """flip, expand_dims and squeeze are NumPy views: a returned one must be a copy."""
    g = backcomp.Graph("views")
    x = g.input("x", (3, 1))
    g.output("f", ops.flip(x, 0))
    g.output("s", ops.squeeze(x, 1))
    g.output("e", ops.expand_dims(x, 0))
    m = backcomp.build(g)
    X = np.arange(3.0).reshape(3, 1)
    out = m.forward({}, {"x": X})
    for v in out.values():
        assert not np.shares_memory(v, X)
    np.testing.assert_array_equal(out["f"], X[::-1])
    assert out["s"].shape == (3,) and out["e"].shape == (1, 3, 1)


# ----- argmax ------------------------------------------------------------------------------
def _argmax_module(axis, keepdims=False, shape=(3, 4)):
    g = backcomp.Graph("am")
    x = g.input("x", shape)
    g.output("i", ops.argmax(x, axis=axis, keepdims=keepdims))
    return backcomp.build(g)


@pytest.mark.parametrize("axis, keepdims", [(None, False), (0, False), (1, False), (-1, True), (None, True)])
def test_argmax_takes_the_first_of_ties_as_numpy_and_torch(axis, keepdims):
    X = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, 5.0, 5.0, 4.0]])
    i = _argmax_module(axis, keepdims).forward({}, {"x": X})["i"]
    want = np.argmax(X, axis=axis, keepdims=keepdims)
    assert i.dtype.kind == "i" and i.shape == want.shape
    np.testing.assert_array_equal(i, want)
    theirs = torch.argmax(torch.tensor(X), **({} if axis is None else {"dim": axis}), keepdim=keepdims)
    np.testing.assert_array_equal(i, theirs.numpy().reshape(want.shape))


def test_argmax_keeps_int_for_float32_and_has_no_gradient():
    g = backcomp.Graph("am32")
    w = g.param("w", (3, 4))
    ids = ops.argmax(w, axis=1)
    assert ids.dtype == "int" and backcomp.ops.get_op("argmax").vjp is None
    g.output("ids", ids)
    g.loss(ops.sum(w * w))
    m = backcomp.build(g)
    W = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert m.forward({"w": W}, {})["ids"].dtype == np.int64
    _, grads = m.value_and_grad({"w": W}, {})
    np.testing.assert_array_equal(grads["w"], 2 * W)


def test_argmax_as_labels_downstream_matches_torch():
    """Distillation-style: the teacher's argmax are the student's labels; no gradient flows into the teacher."""
    g = backcomp.Graph("teacher")
    x = g.input("x", ("B", 4))
    S = g.param("S", (4, 5))
    T = g.param("T", (4, 5))
    labels = ops.argmax(x @ T, axis=-1)
    g.loss(ops.cross_entropy(x @ S, labels) + ops.mean(ops.softmax_cross_entropy(x @ S, labels)))
    m = gradcheck(g, batch=6)
    rng = np.random.default_rng(4)
    X, Sv, Tv = rng.standard_normal((6, 4)), rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    loss, grads = m.value_and_grad({"S": Sv, "T": Tv}, {"x": X})
    tS = torch.tensor(Sv, requires_grad=True)
    tT = torch.tensor(Tv, requires_grad=True)
    logits = torch.tensor(X) @ tS
    target = torch.argmax(torch.tensor(X) @ tT, dim=-1)
    ref = 2 * F.cross_entropy(logits, target)
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["S"], tS.grad.numpy(), rtol=RTOL)
    np.testing.assert_array_equal(grads["T"], 0.0)


# ----- layer_norm --------------------------------------------------------------------------
def _layer_norm_graph(shape, eps=1e-5):
    g = backcomp.Graph("ln")
    x = g.param("x", shape)
    gamma = g.param("gamma", shape[-1:])
    beta = g.param("beta", shape[-1:])
    y = ops.layer_norm(x, gamma, beta, eps=eps)
    g.output("y", y)
    g.loss(ops.sum(y * g.input("u", y.shape)))
    return g


@pytest.mark.parametrize("shape, eps", [((3, 5), 1e-5), ((2, 3, 4), 1e-3), ((4,), 0.1)])
def test_layer_norm_matches_torch_with_gamma_and_beta_gradients(shape, eps):
    rng = np.random.default_rng(7)
    P = {"x": rng.standard_normal(shape) * 3 + 1, "gamma": rng.standard_normal(shape[-1:]),
         "beta": rng.standard_normal(shape[-1:])}
    U = rng.standard_normal(shape)
    m = Copying(backcomp.build(_layer_norm_graph(shape, eps)))
    y = m.forward(P, {"u": U})["y"]
    _, grads = m.value_and_grad(P, {"u": U})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    ty = F.layer_norm(t["x"], shape[-1:], t["gamma"], t["beta"], eps=eps)
    (ty * torch.tensor(U)).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=RTOL, atol=1e-13)
    for k in P:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def test_layer_norm_finite_differences_float32_and_symbolic_batch():
    gradcheck(_layer_norm_graph((3, 5)))
    g = backcomp.Graph("ln_sym")
    W = g.param("W", (4, 6))
    gamma, beta = g.param("gamma", (6,)), g.param("beta", (6,))
    h = ops.layer_norm(g.input("x", ("B", "T", 4)) @ W, gamma, beta)
    g.loss(ops.mean(ops.tanh(h)))
    m = gradcheck(g, batch=3)
    rng = np.random.default_rng(0)
    P = {k: rng.standard_normal(s).astype(np.float32) for k, s in m.PARAMS.items()}
    X = rng.standard_normal((2, 3, 4)).astype(np.float32)
    loss, grads = m.value_and_grad(P, {"x": X})
    assert loss.dtype == np.float32 and all(v.dtype == np.float32 for v in grads.values())


# ----- cross_entropy -----------------------------------------------------------------------
def _ce_graph(logits_shape, ignore_index=-100, label_smoothing=0.0):
    g = backcomp.Graph("ce")
    z = g.param("z", logits_shape)
    labels = g.input("labels", logits_shape[:-1], dtype="int")
    g.loss(ops.cross_entropy(z, labels, ignore_index=ignore_index, label_smoothing=label_smoothing))
    return g


def _torch_ce(Z, labels, ignore_index=-100, label_smoothing=0.0):
    """F.cross_entropy with the class axis moved to 1 (PyTorch's layout)."""
    t = torch.tensor(Z, requires_grad=True)
    logits = t if t.ndim <= 2 else t.movedim(-1, 1)
    loss = F.cross_entropy(logits, torch.tensor(labels), ignore_index=ignore_index, label_smoothing=label_smoothing)
    loss.backward()
    return loss.detach().numpy(), t.grad.numpy()


CE_CASES = [
    ("plain", (5, 4), [0, 3, 1, 1, 2], -100, 0.0),
    ("ignored_rows", (5, 4), [0, -100, 3, -100, 2], -100, 0.0),
    ("smoothing", (5, 4), [0, 2, 3, 1, 1], -100, 0.1),
    ("smoothing_ignored", (5, 4), [-100, 2, 3, -100, 1], -100, 0.1),
    ("ignore_in_range", (4, 3), [2, 0, 2, 1], 2, 0.25),
    ("ignore_minus_one", (4, 3), [-1, 0, 2, -1], -1, 0.0),
    ("3d_btc", (2, 3, 5), [[0, 4, -100], [1, -100, 3]], -100, 0.1),
    ("unbatched", (6,), 4, -100, 0.0),
]


@pytest.mark.parametrize("name, shape, labels, ignore, eps", CE_CASES, ids=[c[0] for c in CE_CASES])
def test_cross_entropy_matches_torch(name, shape, labels, ignore, eps):
    Z = np.random.default_rng(3).standard_normal(shape) * 3
    L = np.array(labels, dtype=np.int64)
    m = Copying(backcomp.build(_ce_graph(shape, ignore, eps)))
    loss, grads = m.value_and_grad({"z": Z}, {"labels": L})
    ref, ref_grad = _torch_ce(Z, L, ignore, eps)
    np.testing.assert_allclose(loss, ref, rtol=RTOL)
    np.testing.assert_allclose(grads["z"], ref_grad, rtol=RTOL, atol=1e-15)
    for result in check_gradients(m, {"z": Z}, {"labels": L}):   # central differences, ignored rows present
        assert result.ok, (name, result)


def test_cross_entropy_with_every_row_ignored_is_nan_with_gradient_zero_as_torch():
    """PyTorch's mean over zero rows is 0/0 = nan, and its gradient is 0 (ignored rows are
    masked, not multiplied): the same here, so one empty batch cannot poison the params."""
    Z = np.random.default_rng(0).standard_normal((3, 4))
    L = np.full(3, -100)
    for eps in (0.0, 0.1):
        m = backcomp.build(_ce_graph((3, 4), label_smoothing=eps))
        with np.errstate(divide="ignore", invalid="ignore"):
            loss, grads = m.value_and_grad({"z": Z}, {"labels": L})
        ref, ref_grad = _torch_ce(Z, L, label_smoothing=eps)
        assert np.isnan(loss) and np.isnan(ref)
        np.testing.assert_array_equal(grads["z"], 0.0)
        np.testing.assert_array_equal(ref_grad, 0.0)


def test_cross_entropy_float32_and_symbolic_batch():
    g = backcomp.Graph("ce_sym")
    W = g.param("W", (4, 5))
    labels = g.input("labels", ("B", "T"), dtype="int")
    g.loss(ops.cross_entropy(g.input("x", ("B", "T", 4)) @ W, labels, label_smoothing=0.1))
    m = gradcheck(g, batch=4)
    assert m.INDEX_RANGES == {"labels": (0, 5)}
    rng = np.random.default_rng(1)
    W32 = rng.standard_normal((4, 5)).astype(np.float32)
    X = rng.standard_normal((2, 3, 4)).astype(np.float32)
    L = np.array([[0, -100, 4], [3, 3, -100]])
    loss, grads = m.value_and_grad({"W": W32}, {"x": X, "labels": L})
    assert loss.dtype == np.float32 and grads["W"].dtype == np.float32
    tW = torch.tensor(W32.astype(np.float64), requires_grad=True)
    ref = F.cross_entropy((torch.tensor(X.astype(np.float64)) @ tW).movedim(-1, 1), torch.tensor(L),
                          label_smoothing=0.1)
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grads["W"], tW.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("labels, bad, where", [
    ([0, 4, 1], 4, "(1,)"), ([0, -1, 1], -1, "(1,)"), ([-100, 2, 7], 7, "(2,)"), ([-100, -101, 0], -101, "(1,)"),
])
def test_cross_entropy_labels_out_of_range_raise_but_ignore_index_does_not(labels, bad, where):
    m = backcomp.build(_ce_graph((3, 4)))
    Z = np.zeros((3, 4))
    with pytest.raises(ValueError, match=rf"input 'labels' holds {bad} at index \{where[:-1]}\), "
                                         r"outside the allowed range \[0, 4\)"):
        m.value_and_grad({"z": Z}, {"labels": np.array(labels)})
    m.forward({"z": Z}, {"labels": np.array([-100, 3, 0])})


def test_unignore_label_maps_only_the_ignored_value_to_class_0():
    """The compiler-internal op cross_entropy gathers with: ignored rows index class 0 (then
    masked out), every other label is kept, and the module range-checks them except ignore."""
    g = backcomp.Graph("unignore")
    labels = g.input("labels", (5,), dtype="int")
    g.output("safe", ops.apply("unignore_label", labels, ignore=-100, classes=4))
    m = backcomp.build(g)
    assert m.INDEX_RANGES == {"labels": (0, 4)}
    out = m.forward({}, {"labels": np.array([3, -100, 0, -100, 2])})["safe"]
    np.testing.assert_array_equal(out, [3, 0, 0, 0, 2])
    assert out.dtype == np.int64
    with pytest.raises(ValueError, match=r"holds 4 at index \(4,\)"):
        m.forward({}, {"labels": np.array([3, -100, 0, -100, 4])})


def test_ignore_index_is_allowed_only_when_every_use_allows_it():
    """Labels also read by softmax_cross_entropy (no ignore_index) must all be classes."""
    g = backcomp.Graph("ce_shared")
    z = g.param("z", (3, 4))
    labels = g.input("labels", (3,), dtype="int")
    g.loss(ops.cross_entropy(z, labels) + ops.sum(ops.softmax_cross_entropy(z, labels)))
    m = backcomp.build(g)
    with pytest.raises(ValueError, match="holds -100 at index"):
        m.forward({"z": np.zeros((3, 4))}, {"labels": np.array([0, -100, 1])})
    g2 = backcomp.Graph("ce_two_ignores")
    z2 = g2.param("z", (3, 4))
    labels2 = g2.input("labels", (3,), dtype="int")
    g2.loss(ops.cross_entropy(z2, labels2) + ops.cross_entropy(z2, labels2, ignore_index=-1))
    with pytest.raises(ValueError, match="holds -1 at index"):
        backcomp.build(g2).forward({"z": np.zeros((3, 4))}, {"labels": np.array([0, -1, 1])})


# ----- errors of the Python builder ----------------------------------------------------------
@pytest.mark.parametrize("build, pattern", [
    (lambda g, w, x: ops.squeeze(w, axis=0), r"squeeze: axis 0 of \(3, 4\) is of size 3, not 1"),
    (lambda g, w, x: ops.squeeze(x, axis=0), r"squeeze: axis 0 of \(B, 1\) is symbolic B, not 1"),
    (lambda g, w, x: ops.expand_dims(w, 3), r"expand_dims: axis 3 is out of range for an array of rank 3"),
    (lambda g, w, x: ops.stack((w, x)), r"stack: all arrays must have the same shape, got \(3, 4\) and \(B, 1\)"),
    (lambda g, w, x: ops.stack((w, w), axis=3), r"stack: axis 3 is out of range"),
    (lambda g, w, x: ops.pad(w, ((1, 1),) * 3), r"pad: widths must be an integer, a \(before, after\) pair, or 2"),
    (lambda g, w, x: ops.pad(w, -1), r"pad: widths must be non-negative"),
    (lambda g, w, x: ops.pad(x, 1), r"pad: cannot pad symbolic dimension B of \(B, 1\)"),
    (lambda g, w, x: ops.flip(w, axis=(1, 1)), r"flip: repeated axis"),
    (lambda g, w, x: ops.cumsum(w, axis=None), r"cumsum: axis must be an integer"),
    (lambda g, w, x: ops.argmax(w, axis=2), r"argmax: axis 2 is out of range"),
    (lambda g, w, x: ops.broadcast_to(w, (2, 4, 4)), r"cannot broadcast"),
    (lambda g, w, x: ops.broadcast_to(w, (0, 4)), r"broadcast_to: dimension 0 must be positive"),
    (lambda g, w, x: ops.layer_norm(w, g.param("ga", (3,)), g.param("be", (4,))),
     r"layer_norm: gamma must have shape \(4,\) to match the last axis of x \(3, 4\), got \(3,\)"),
    (lambda g, w, x: ops.l2_normalize(w, eps=0), r"l2_normalize: eps must be a positive number"),
    (lambda g, w, x: ops.cross_entropy(w, g.input("lab", (4,), dtype="int")),
     r"cross_entropy: labels of shape \(4,\) do not match logits of shape \(3, 4\) \(expected \(3,\)\)"),
    (lambda g, w, x: ops.cross_entropy(w, g.input("y", (3,))), r"cross_entropy: labels must be integers"),
    (lambda g, w, x: ops.cross_entropy(w, g.input("lab", (3,), dtype="int"), label_smoothing=1.5),
     r"label_smoothing must be a number in \[0, 1\], got 1.5"),
])
def test_builder_errors(build, pattern):
    g = backcomp.Graph("bad")
    with pytest.raises((backcomp.GraphError, backcomp.ShapeError), match=pattern):
        build(g, g.param("w", (3, 4)), g.input("x", ("B", 1)))


# ----- from a spec ---------------------------------------------------------------------------
SPEC = '''
[model]
outputs = ["pred", "loss"]

[inputs]
x = ["B", 4]
labels = { shape = ["B"], dtype = "int64" }

[params]
W = [4, 6]
gamma = [6]
beta = [6]

[graph]
h = "layer_norm(x @ W, gamma, beta, eps=1e-3)"
u = "l2_normalize(h, axis=-1)"
s = "stack((u, flip(h, axis=1), cumsum(h, axis=-1)), axis=1)"
p = "pad(s, ((0, 0), (0, 0), (1, 2)))"
q = "squeeze(expand_dims(p, 1), axis=1) + broadcast_to(gamma[None, None, 0:1], (1, 3, 9))"
logits = "sum(q, axis=1)"
pred = "argmax(logits, axis=-1)"
loss = """cross_entropy(logits, labels, ignore_index=-1, label_smoothing=0.05)
          + mean(cross_entropy(logits, pred))"""
'''


def _torch_spec(X, L, P):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in P.items()}
    h = F.layer_norm(torch.tensor(X) @ t["W"], (6,), t["gamma"], t["beta"], eps=1e-3)
    s = torch.stack((F.normalize(h, dim=-1), torch.flip(h, (1,)), torch.cumsum(h, -1)), 1)
    q = F.pad(s, [1, 2]).unsqueeze(1).squeeze(1) + torch.broadcast_to(t["gamma"][None, None, 0:1], (1, 3, 9))
    logits = q.sum(1)
    pred = logits.argmax(-1)
    loss = F.cross_entropy(logits, torch.tensor(L), ignore_index=-1, label_smoothing=0.05) \
        + F.cross_entropy(logits, pred)
    loss.backward()
    return pred.numpy(), loss.item(), {k: v.grad.numpy() for k, v in t.items()}


def test_spec_with_every_op_matches_torch():
    g = parse_spec(SPEC, "shape.toml")
    m = Copying(backcomp.build(g))
    rng = np.random.default_rng(5)
    P = {"W": rng.standard_normal((4, 6)), "gamma": rng.standard_normal(6), "beta": rng.standard_normal(6)}
    X = rng.standard_normal((5, 4))
    L = np.array([0, -1, 8, 3, -1])
    out = m.forward(P, {"x": X, "labels": L})
    loss, grads = m.value_and_grad(P, {"x": X, "labels": L})
    pred, ref, ref_grads = _torch_spec(X, L, P)
    np.testing.assert_array_equal(out["pred"], pred)
    np.testing.assert_allclose(loss, ref, rtol=RTOL)
    for k in P:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert m.INDEX_RANGES == {"labels": (0, 9)}
    with pytest.raises(ValueError, match=r"holds 9 at index \(2,\)"):
        m.forward(P, {"x": X, "labels": np.array([0, -1, 9, 3, -1])})
    for result in check_gradients(m, P, {"x": X, "labels": L}):
        assert result.ok, result


def test_spec_ops_explain_in_their_own_notation():
    from backcomp.explain import explain
    text = explain(parse_spec(SPEC, "shape.toml"))
    for fragment in ("cumsum(h, axis=1)", "flip(h, axis=1)", "stack((", "pad(s, ((0, 0), (0, 0), (1, 2)))",
                     "argmax(logits, axis=1)", "revcumsum("):
        assert fragment in text, fragment


@pytest.mark.parametrize("expr, col, message", [
    ("pad(h, ((1, 2), 3))", 17, "argument 'widths' of pad() must be an integer, a (before, after) pair, or one such "
                                "pair per axis, got '3' in node 'y'"),
    ("pad(h, (1, 2, 3))", 8, "argument 'widths' of pad() must be an integer, a (before, after) pair, or one such "
                             "pair per axis, got '(1, 2, 3)' in node 'y'"),
    ("pad(h, (1, -2))", 12, "a width in argument 'widths' of pad() must be non-negative, got -2 in node 'y'"),
    ("pad(h, ((0, 0), (1, 1), (2, 2)))", 1, "pad: widths must be an integer, a (before, after) pair, or 2 such "
                                            "pairs (one per axis), got ((0, 0), (1, 1), (2, 2)) in node 'y'"),
    ("squeeze(h, axis=1)", 1, "squeeze: axis 1 of (B, 6) is of size 6, not 1 in node 'y'"),
    ("squeeze(h, 0)", 1, "squeeze: axis 0 of (B, 6) is symbolic B, not 1 in node 'y'"),
    ("expand_dims(h)", 1, "expand_dims() is missing argument 'axis': expand_dims(x, axis) in node 'y'"),
    ("cumsum(h)", 1, "cumsum() is missing argument 'axis': cumsum(x, axis) in node 'y'"),
    ("flip(h, axis=1.5)", 14, "argument 'axis' of flip() must be an integer, got '1.5' in node 'y'"),
    ("stack(h, axis=0)", 7, "argument 'arrays' of stack() must be a tuple of arrays, e.g. concatenate((a, b), axis=1) "
                            "in node 'y'"),
    ("argmax(h, axis=(0, 1))", 16, "argument 'axis' of argmax() must be an integer, got '(0, 1)' in node 'y'"),
    ("broadcast_to(h, (3, 6))", 1, "broadcast_to: cannot broadcast shapes (B, 6) and (3, 6) in node 'y'"),
    ("layer_norm(h, gamma)", 1, "layer_norm() is missing argument 'beta': layer_norm(x, gamma, beta, eps=1e-05) "
                                "in node 'y'"),
    ("l2_normalize(h, ord=2)", 17, "l2_normalize() got an unexpected keyword argument 'ord' (allowed: axis, eps) "
                                   "in node 'y'"),
    ("cross_entropy(h, labels, label_smoothing=2)", 1,
     "cross_entropy: label_smoothing must be a number in [0, 1], got 2.0 in node 'y'"),
    ("cross_entropy(h, labels, ignore_index=0.5)", 39,
     "argument 'ignore_index' of cross_entropy() must be an integer, got '0.5' in node 'y'"),
    ("cross_entropy(h, h)", 1, "cross_entropy: labels must be integers (an input with dtype int64, or argmax) "
                               "in node 'y'"),
])
def test_spec_errors_are_located(expr, col, message):
    """``col`` is 1-based within the expression (the argument, the keyword's value, or the call)."""
    text = textwrap.dedent(f'''\
        [inputs]
        x = ["B", 4]
        labels = {{ shape = ["B"], dtype = "int64" }}
        [params]
        W = [4, 6]
        gamma = [6]
        [graph]
        h = "x @ W"
        y = "{expr}"
        loss = "mean(y)"
        ''')
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.toml")
    start = len('y = "')
    assert str(info.value) == f"bad.toml:9:{start + col}: error: {message}"


# ----- forward mode: the JVP rules of the shape ops ------------------------------------------
def _jvp_graph(name, build, x_shape, u_shape):
    def make():
        g = backcomp.Graph(f"{name}_jvp")
        W = g.param("W", x_shape)
        u = g.input("u", u_shape)
        g.loss(ops.sum(build(ops.sin(W)) * u))
        return g
    return make


#: graphs of the form sum(op(...) * u) whose op has a JVP rule (test_jvp checks each is reached)
JVP_GRAPHS = {
    "cumsum": _jvp_graph("cumsum", lambda w: ops.cumsum(w, axis=1), (3, 4), (3, 4)),
    "stack": _jvp_graph("stack", lambda w: ops.stack((w, w * w), axis=1), (3, 4), (3, 2, 4)),
    "expand_dims": _jvp_graph("expand_dims", lambda w: ops.expand_dims(w, 1), (3, 4), (3, 1, 4)),
    "squeeze": _jvp_graph("squeeze", lambda w: ops.squeeze(w, 1), (3, 1, 4), (3, 4)),
    "flip": _jvp_graph("flip", lambda w: ops.flip(w, 0), (3, 4), (3, 4)),
    "pad": _jvp_graph("pad", lambda w: ops.pad(w, ((1, 0), (0, 2))), (3, 4), (4, 6)),
}


@pytest.mark.parametrize("name", sorted(JVP_GRAPHS))
def test_jvp_of_shape_ops(name):
    from test_jvp import check_jvp
    check_jvp(JVP_GRAPHS[name](), {})
