"""Every registered op's gradient against central finite differences, in float64.

Table-driven in the style of jax's ``lax_autodiff_test``: each ``OpCase`` names the
op, builds it from operand nodes, gives an independent NumPy reference of the
forward value, lists operand shapes (broadcasting and a symbolic batch dim "B"
included) and declares the input domain of each operand.

How a case becomes a graph: an operand with a fixed shape is a param drawn from its
domain; an operand with a symbolic dim is ``x_i * p_i`` (an input from the domain
times a positive param broadcast over the symbolic axes), so gradients also flow
through batch-symbolic operands.  The loss is ``sum(op(...) * u)`` with ``u`` a
random input of the output's shape: the check is a VJP along a random cotangent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import backcomp
from backcomp import ops
from backcomp.ops.registry import registered_ops
from backcomp.vjp import differentiate

from conftest import DOMAINS, concrete, draw, gradcheck


@dataclass
class OpCase:
    name: str                        # the test id
    fn: Callable                     # operand nodes -> output node
    ref: Callable                    # operand arrays -> output array (independent NumPy)
    shapes: list[tuple]              # one tuple of operand shapes per variant
    domains: tuple[str, ...] = ()    # per operand; default "real"
    covers: tuple[str, ...] = ()     # registered ops this case is the gradient test of


def _erf(x):
    return np.vectorize(math.erf)(x)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _lse(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


UNARY_SHAPES = [((3,),), (("B", 3),), ((2, 3),)]
BINARY_SHAPES = [((2, 3), (2, 3)), (("B", 3), (3,)), (("B", 1), (1, 4)), ((3,), ()), ((2, 1, 3), (4, 1))]


def unary(name, fn, ref, domain="real", covers=None):
    return OpCase(name, fn, ref, UNARY_SHAPES, (domain,), covers or (name,))


def binary(name, fn, ref, domains=("real", "real"), covers=None):
    return OpCase(name, fn, ref, BINARY_SHAPES, domains, covers or (name,))


swish = ops.scalar_function("swish", [sp.Symbol("u")], sp.Symbol("u") * ops.scalar.sigmoid(sp.Symbol("u")))
_a, _b = sp.symbols("a b")
smooth_mix = ops.scalar_function("smooth_mix", [_a, _b], _a * sp.tanh(_b) + sp.exp(-_a ** 2) * _b)

CASES = [
    # ----- arithmetic ---------------------------------------------------------------
    binary("add", lambda a, b: a + b, np.add),
    binary("sub", lambda a, b: a - b, np.subtract),
    binary("mul", lambda a, b: a * b, np.multiply),
    binary("div", lambda a, b: a / b, np.divide, ("real", "positive")),
    binary("pow_node_exponent", lambda a, b: a ** b, np.power, ("positive", "real"), ("pow",)),
    unary("neg", lambda a: -a, np.negative),
    unary("pow_const_int", lambda a: a ** 3, lambda a: a ** 3, covers=("pow",)),
    unary("pow_const_neg_frac", lambda a: a ** -1.5, lambda a: a ** -1.5, "positive", ("pow",)),
    unary("pow_const_half", lambda a: a ** 0.5, np.sqrt, "positive", ("pow",)),
    unary("rpow", lambda a: 2.0 ** a, lambda a: 2.0 ** a, covers=("pow",)),
    unary("scalar_mix", lambda a: (3 - a) * 2.5 + 1 / (a * a + 1) - a / 4,
          lambda a: (3 - a) * 2.5 + 1 / (a * a + 1) - a / 4, covers=("add", "sub", "mul", "div")),
    binary("maximum", ops.maximum, np.maximum, ("distinct", "distinct")),
    binary("minimum", ops.minimum, np.minimum, ("distinct", "distinct")),
    unary("maximum_const", lambda a: ops.maximum(a, 0.1), lambda a: np.maximum(a, 0.1), "nonzero", ("maximum",)),
    # ----- unary math -----------------------------------------------------------------
    unary("exp", ops.exp, np.exp),
    unary("log", ops.log, np.log, "positive"),
    unary("log1p", ops.log1p, np.log1p, "above_minus_half"),
    unary("sqrt", ops.sqrt, np.sqrt, "positive"),
    unary("abs", ops.abs, np.abs, "nonzero"),
    unary("sin", ops.sin, np.sin),
    unary("cos", ops.cos, np.cos),
    unary("erf", ops.erf, _erf),
    # ----- activations ----------------------------------------------------------------
    unary("tanh", ops.tanh, np.tanh),
    unary("sigmoid", ops.sigmoid, _sigmoid),
    unary("softplus", ops.softplus, lambda a: np.log1p(np.exp(a))),
    unary("relu", ops.relu, lambda a: np.maximum(a, 0), "nonzero"),
    unary("gelu", ops.gelu, lambda a: a * (1 + _erf(a / np.sqrt(2))) / 2),
    unary("leaky_relu", ops.leaky_relu, lambda a: np.where(a > 0, a, 0.01 * a), "nonzero"),
    unary("leaky_relu_alpha", lambda a: ops.leaky_relu(a, alpha=0.2), lambda a: np.where(a > 0, a, 0.2 * a),
          "nonzero", ("leaky_relu",)),
    unary("swish", swish, lambda a: a * _sigmoid(a), covers=("ew",)),
    binary("user_two_arg_function", smooth_mix, lambda a, b: a * np.tanh(b) + np.exp(-a ** 2) * b,
           covers=("ew",)),
    # ----- comparisons and where ------------------------------------------------------
    binary("where_greater", lambda a, b: ops.where(a > b, a * b, a - b),
           lambda a, b: np.where(a > b, a * b, a - b), ("distinct", "distinct"), ("where", "greater")),
    binary("where_less", lambda a, b: ops.where(a < b, ops.sin(a), b ** 2),
           lambda a, b: np.where(a < b, np.sin(a), b ** 2), ("distinct", "distinct"), ("where", "less")),
    binary("where_ge_le", lambda a, b: ops.where(a >= 0.05, a, b) + ops.where(b <= a, b, 2 * a),
           lambda a, b: np.where(a >= 0.05, a, b) + np.where(b <= a, b, 2 * a), ("distinct", "distinct"),
           ("where", "greater_equal", "less_equal")),
    unary("where_equal", lambda a: ops.where(ops.equal(a, a), ops.exp(a), -a), np.exp,
          covers=("where", "equal")),
    # ----- matmul ---------------------------------------------------------------------
    OpCase("matmul", lambda a, b: a @ b, np.matmul, [
        ((3,), (3,)),                  # vector · vector -> scalar
        ((3,), (3, 4)),                # vector @ matrix
        ((2, 3), (3,)),                # matrix @ vector
        ((2, 3), (3, 4)),
        (("B", 3), (3, 4)),            # symbolic batch
        ((2, 2, 3), (3, 4)),           # batched @ matrix
        ((2, 2, 3), (2, 3, 4)),        # batched @ batched
        ((2, 1, 2, 3), (3, 3, 2)),     # broadcast batch dims
        ((3,), (2, 3, 4)),             # vector @ batched
        ((2, 4, 3), (3,)),             # batched @ vector
        (("B", 2, 3), ("B", 3, 2)),    # symbolic batch on both sides
    ]),
    # ----- einsum ---------------------------------------------------------------------
    OpCase("einsum_matmul", lambda a, b: ops.einsum("ij,jk->ik", a, b),
           lambda a, b: np.einsum("ij,jk->ik", a, b), [((2, 3), (3, 4))], covers=("einsum",)),
    OpCase("einsum_batched", lambda a, b: ops.einsum("bij,bjk->bik", a, b),
           lambda a, b: np.einsum("bij,bjk->bik", a, b), [((2, 2, 3), (2, 3, 4)), (("B", 2, 3), ("B", 3, 4)), (("B", 2, 3), (1, 3, 4)), ((1, 2, 3), (2, 3, 4))],
           covers=("einsum",)),
    OpCase("einsum_summed_in_one_operand", lambda a, b: ops.einsum("ij,jk->k", a, b),
           lambda a, b: np.einsum("ij,jk->k", a, b), [((2, 3), (3, 4))], covers=("einsum",)),
    OpCase("einsum_summed_in_one_operand_mid", lambda a, b: ops.einsum("ijk,k->i", a, b),
           lambda a, b: np.einsum("ijk,k->i", a, b), [((2, 3, 4), (4,))], covers=("einsum",)),
    OpCase("einsum_unary", lambda a: ops.einsum("ij->j", a), lambda a: np.einsum("ij->j", a),
           [((2, 3),), (("B", 3),)], covers=("einsum",)),
    OpCase("einsum_implicit_outer", lambda a, b: ops.einsum("i,j", a, b), lambda a, b: np.einsum("i,j", a, b),
           [((2,), (3,))], covers=("einsum",)),
    OpCase("einsum_three", lambda a, b, c: ops.einsum("ij,jk,kl->il", a, b, c),
           lambda a, b, c: np.einsum("ij,jk,kl->il", a, b, c), [((2, 3), (3, 4), (4, 2))], covers=("einsum",)),
    OpCase("einsum_broadcast_summed", lambda a, b: ops.einsum("ij,jk->k", a, b),
           lambda a, b: np.einsum("ij,jk->k", a, b), [((2, 1), (3, 4)), ((2, 3), (1, 4))], covers=("einsum",)),
    OpCase("einsum_full", lambda a, b: ops.einsum("ij,ij->", a, b), lambda a, b: np.einsum("ij,ij->", a, b),
           [((2, 3), (2, 3))], covers=("einsum",)),
    # ----- reductions -----------------------------------------------------------------
    *[OpCase(f"{op}_{tag}", (lambda op, kw: lambda a: getattr(ops, op)(a, **kw))(op, kw),
             (lambda ref, kw: lambda a: ref(a, axis=kw.get("axis"), keepdims=kw.get("keepdims", False)))(ref, kw),
             shapes, (dom,), (op,))
      for op, ref, dom in [("sum", np.sum, "real"), ("mean", np.mean, "real"), ("max", np.max, "distinct"),
                           ("logsumexp", _lse, "real")]
      for tag, kw, shapes in [
          ("all", {}, [((2, 3, 4),), (("B", 3),)]),
          ("axis0", {"axis": 0}, [((2, 3, 4),), (("B", 3),)]),
          ("axis_neg", {"axis": -1}, [((2, 3, 4),), (("B", 3),)]),
          ("axes_tuple", {"axis": (0, 2)}, [((2, 3, 4),), (("B", 3, 2),)]),
          ("keepdims", {"axis": (0, 2), "keepdims": True}, [((2, 3, 4),), (("B", 3, 2),)]),
          ("all_keepdims", {"keepdims": True}, [((2, 3),)]),
      ]],
    # ----- shape manipulation ---------------------------------------------------------
    OpCase("transpose_T", lambda a: a.T, lambda a: a.T, [((2, 3),), ((2, 3, 4),), (("B", 3),)], covers=("transpose",)),
    OpCase("transpose_axes", lambda a: ops.transpose(a, (1, 2, 0)), lambda a: np.transpose(a, (1, 2, 0)),
           [((2, 3, 4),), (("B", 3, 2),)], covers=("transpose",)),
    OpCase("transpose_neg_axes", lambda a: ops.transpose(a, (0, -1, -2)), lambda a: np.transpose(a, (0, 2, 1)),
           [((2, 3, 4),)], covers=("transpose",)),
    OpCase("reshape_fixed", lambda a: ops.reshape(a, (6, 4)), lambda a: a.reshape(6, 4), [((2, 3, 4),)],
           covers=("reshape",)),
    OpCase("reshape_infer", lambda a: ops.reshape(a, (4, -1)), lambda a: a.reshape(4, -1), [((2, 3, 4),)],
           covers=("reshape",)),
    OpCase("reshape_flat", lambda a: ops.reshape(a, (-1,)), lambda a: a.reshape(-1), [((2, 3, 4),)],
           covers=("reshape",)),
    OpCase("reshape_symbolic_infer", lambda a: ops.reshape(a, (-1, 6)), lambda a: a.reshape(-1, 6),
           [(("B", 3, 2),)], covers=("reshape",)),
    OpCase("reshape_symbolic_named", lambda a: ops.reshape(a, ("B", 2, 3)), lambda a: a.reshape(a.shape[0], 2, 3),
           [(("B", 6),)], covers=("reshape",)),
    OpCase("broadcast_to", lambda a: ops.broadcast_to(a, (2, 3)), lambda a: np.broadcast_to(a, (2, 3)),
           [((3,),), ((2, 1),), ((1, 3),)]),
    OpCase("concatenate_axis1", lambda a, b: ops.concatenate((a, b), axis=1),
           lambda a, b: np.concatenate((a, b), axis=1), [((2, 3), (2, 4)), (("B", 3), ("B", 2))],
           covers=("concatenate",)),
    OpCase("concatenate_axis0", lambda a, b: ops.concatenate((a, b)), lambda a, b: np.concatenate((a, b)),
           [((2, 3), (1, 3))], covers=("concatenate",)),
    OpCase("concatenate_three_neg_axis", lambda a, b, c: ops.concatenate((a, b, c), axis=-1),
           lambda a, b, c: np.concatenate((a, b, c), axis=-1), [((2, 1), (2, 3), (2, 2)), (("B", 1), ("B", 2), ("B", 1))],
           covers=("concatenate",)),
    OpCase("concatenate_same_twice", lambda a: ops.concatenate((a, a), axis=0), lambda a: np.concatenate((a, a)),
           [((2, 3),)], covers=("concatenate",)),
]

GETITEM_INDICES = [
    ("int", 1), ("negative_int", -1), ("slice", (slice(None), slice(1, 3))), ("step", slice(None, None, 2)),
    ("negative_step", slice(None, None, -1)), ("neg_step_bounds", (slice(None), slice(-1, 0, -2))),
    ("none", None), ("ellipsis_int", (Ellipsis, 0)), ("mixed", (1, slice(None, None, -1), None)),
    ("tail", (slice(None), slice(-2, None))), ("two_ints", (0, 1)), ("none_ellipsis", (None, Ellipsis, 1)),
]
CASES += [OpCase(f"getitem_{tag}", (lambda i: lambda a: a[i])(index), (lambda i: lambda a: a[i])(index),
                 [((3, 4, 2),)], covers=("getitem",)) for tag, index in GETITEM_INDICES]
CASES += [
    OpCase("getitem_symbolic", lambda a: a[:, 1], lambda a: a[:, 1], [(("B", 4),)], covers=("getitem",)),
    OpCase("getitem_symbolic_step", lambda a: a[..., ::2], lambda a: a[..., ::2], [(("B", 4),)], covers=("getitem",)),
    OpCase("getitem_symbolic_reverse", lambda a: a[::-1, None], lambda a: a[::-1, None], [(("B", 4),)],
           covers=("getitem",)),
    OpCase("getitem_same_value_twice", lambda a: a[0] * a[1] + a[0], lambda a: a[0] * a[1] + a[0], [((3, 4),)],
           covers=("getitem",)),
]

# ----- neural-network ops and losses ----------------------------------------------------
CASES += [
    OpCase("softmax", lambda a: ops.softmax(a), lambda a: np.exp(a - _lse(a, -1, True)), [((2, 5),), (("B", 4),)],
           covers=("logsumexp",)),
    OpCase("softmax_axis0", lambda a: ops.softmax(a, axis=0), lambda a: np.exp(a - _lse(a, 0, True)),
           [((3, 4),)], covers=("logsumexp",)),
    OpCase("log_softmax", lambda a: ops.log_softmax(a), lambda a: a - _lse(a, -1, True), [((2, 5),), (("B", 4),)],
           covers=("logsumexp",)),
    OpCase("softmax_cross_entropy_soft", ops.softmax_cross_entropy,
           lambda z, y: -np.sum(y * (z - _lse(z, -1, True)), axis=-1), [((3, 4), (3, 4)), (("B", 4), (4,))],
           ("real", "positive"), ("logsumexp",)),
    OpCase("sigmoid_binary_cross_entropy", ops.sigmoid_binary_cross_entropy,
           lambda z, y: -(y * np.log(_sigmoid(z)) + (1 - y) * np.log(1 - _sigmoid(z))),
           [((3, 4), (3, 4)), (("B", 2), ("B", 2)), (("B", 2), (2,))], ("real", "unit"), ("softplus",)),
    OpCase("mse", ops.mse, lambda a, b: np.mean((a - b) ** 2), [((3, 4), (3, 4)), (("B", 3), (3,))],
           covers=("mean",)),
]

def _shape_id(shapes) -> str:
    return "_".join("x".join(str(d) for d in s) or "scalar" for s in shapes)


VARIANTS = [pytest.param(case, shapes, id=f"{case.name}[{_shape_id(shapes)}]")
            for case in CASES for shapes in case.shapes]

#: bugs outside backcomp/ops/ that some variants hit: (test, case name) -> reason
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def variants(test: str) -> list:
    """VARIANTS with the known bugs of ``test`` marked as strict xfails."""
    out = []
    for v in VARIANTS:
        reason = KNOWN_BUGS.get((test, v.values[0].name))
        out.append(pytest.param(*v.values, id=v.id, marks=[pytest.mark.xfail(reason=reason, strict=True)])
                   if reason else v)
    return out


def build_case(case: OpCase, shapes) -> tuple[backcomp.Graph, dict, Callable]:
    """The graph of a case, its leaf domains, and the NumPy reference of its loss."""
    g = backcomp.Graph(f"case_{case.name}")
    domains: dict[str, str] = {}
    operands, makers = [], []
    for i, shape in enumerate(shapes):
        domain = case.domains[i] if i < len(case.domains) else "real"
        if any(isinstance(d, str) for d in shape):
            x = g.input(f"x{i}", shape)
            p = g.param(f"p{i}", tuple(1 if isinstance(d, str) else d for d in shape))
            domains[f"x{i}"], domains[f"p{i}"] = domain, "positive"
            operands.append(x * p)
            makers.append((lambda i: lambda P, I: I[f"x{i}"] * P[f"p{i}"])(i))
        else:
            p = g.param(f"p{i}", shape)
            domains[f"p{i}"] = domain
            operands.append(p)
            makers.append((lambda i: lambda P, I: P[f"p{i}"])(i))
    out = case.fn(*operands)
    u = g.input("u", out.shape)
    g.loss(ops.sum(out * u))

    def reference(params, inputs):
        return np.sum(case.ref(*(m(params, inputs) for m in makers)) * inputs["u"])

    return g, domains, reference


@pytest.mark.parametrize("case, shapes", VARIANTS)
def test_gradient_matches_finite_differences(case, shapes):
    g, domains, reference = build_case(case, shapes)
    gradcheck(g, batch=3, seed=len(case.name), domains=domains, reference=reference)


@pytest.mark.parametrize("case, shapes", variants("unoptimised"))
def test_gradient_unoptimised(case, shapes):
    """The same check at -O0: the ops' own VJP rules, without fusion/CSE/memory passes."""
    g, domains, reference = build_case(case, shapes)
    gradcheck(g, batch=2, seed=len(case.name) + 1, domains=domains, reference=reference, opt_level=0)


@pytest.mark.parametrize("case, shapes", VARIANTS)
def test_float32_stays_float32(case, shapes):
    """No op upcasts: float32 in gives a float32 loss and float32 grads close to float64's."""
    g, domains, _ = build_case(case, shapes)
    m = backcomp.build(g)
    p64, i64 = draw(m, domains, batch=3, seed=1)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    i32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in i64.items()}
    loss32, grads32 = m.value_and_grad(p32, i32)
    loss64, grads64 = m.value_and_grad({k: v.astype(np.float64) for k, v in p32.items()},
                                       {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in i32.items()})
    assert np.asarray(loss32).dtype == np.float32
    assert np.asarray(m.forward(p32, i32)["loss"]).dtype == np.float32
    np.testing.assert_allclose(loss32, loss64, rtol=1e-4, atol=1e-4)
    for k, g32 in grads32.items():
        assert g32.dtype == np.float32, k
        np.testing.assert_allclose(g32, grads64[k], rtol=1e-3, atol=1e-3 * max(1.0, np.abs(grads64[k]).max()))


@pytest.mark.parametrize("case, shapes", variants("backward32"))
def test_backward_stays_float32(case, shapes):
    """Every backward emission keeps float32 (grads are cast at the end, so look before the
    cast: compile the differentiated graph with its gradient nodes as plain outputs)."""
    g, domains, _ = build_case(case, shapes)
    d = differentiate(g)
    grads = dict(d.grads)
    d.loss_node, d.grads, d.cotangents = None, {}, {}
    for name, node in grads.items():
        d.output(f"{name}_grad", node)
    m = backcomp.build(d)
    p, i = draw(m, domains, batch=3, seed=1, dtype=np.float32)
    out = m.forward(p, i)
    assert {k: str(np.asarray(v).dtype) for k, v in out.items()} == {k: "float32" for k in out}


# ----- integer labels -----------------------------------------------------------------------
@pytest.mark.parametrize("batch_shape", [("B",), (2, 3)], ids=["B", "2x3"])
def test_softmax_cross_entropy_int_labels(batch_shape):
    g = backcomp.Graph("sce_int")
    x = g.input("x", batch_shape + (5,))
    W = g.param("W", (5, 5))
    labels = g.input("labels", batch_shape, dtype="int")
    logits = ops.tanh(x @ W) * 3
    g.loss(ops.mean(ops.softmax_cross_entropy(logits, labels)))

    def reference(P, I):
        z = np.tanh(I["x"] @ P["W"]) * 3
        logp = z - _lse(z, -1, True)
        return -np.mean(np.take_along_axis(logp, I["labels"][..., None], axis=-1))

    gradcheck(g, domains={"labels": 5}, reference=reference)


def test_softmax_cross_entropy_one_hot_equals_int_labels():
    """One-hot targets and the equivalent integer labels give the same loss and gradient."""
    g1 = backcomp.Graph("sce_onehot")
    z1 = g1.param("Z", (4, 3))
    y = g1.input("y", (4, 3))
    g1.loss(ops.mean(ops.softmax_cross_entropy(z1 * 2.0, y)))
    g2 = backcomp.Graph("sce_labels")
    z2 = g2.param("Z", (4, 3))
    labels = g2.input("labels", (4,), dtype="int")
    g2.loss(ops.mean(ops.softmax_cross_entropy(z2 * 2.0, labels)))
    m1, m2 = gradcheck(g1, batch=4), gradcheck(g2, batch=4, domains={"labels": 3})
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((4, 3))
    lab = np.array([0, 2, 1, 2])
    onehot = np.eye(3)[lab]
    l1, gr1 = m1.value_and_grad({"Z": Z}, {"y": onehot})
    l2, gr2 = m2.value_and_grad({"Z": Z}, {"labels": lab})
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    np.testing.assert_allclose(gr1["Z"], gr2["Z"], rtol=1e-12, atol=1e-15)
    # the textbook form: dL/dZ = 2 (softmax(2Z) - Y) / B
    s = np.exp(2 * Z - _lse(2 * Z, -1, True))
    np.testing.assert_allclose(gr1["Z"], 2 * (s - onehot) / 4, rtol=1e-12, atol=1e-15)


def test_stable_for_large_logits():
    """logsumexp/softmax/BCE of logits near ±1000 give finite values and gradients."""
    g = backcomp.Graph("stable")
    z = g.param("z", (2, 3))
    y = g.input("y", (2, 3))
    g.loss(ops.sum(ops.softmax_cross_entropy(z, y)) + ops.sum(ops.sigmoid_binary_cross_entropy(z, y))
           + ops.sum(ops.sigmoid(z) * y))
    m = backcomp.build(g)
    Z = np.array([[1000.0, -1000.0, 0.0], [-800.0, 800.0, 5.0]])
    loss, grads = m.value_and_grad({"z": Z}, {"y": np.full((2, 3), 0.5)})
    assert np.isfinite(loss) and np.all(np.isfinite(grads["z"]))


# ----- stop_gradient --------------------------------------------------------------------------
def test_stop_gradient_gradient_is_exactly_zero():
    g = backcomp.Graph("stopgrad")
    W = g.param("W", (2, 3))
    V = g.param("V", (3,))
    x = g.input("x", (2, 3))
    g.loss(ops.sum(ops.stop_gradient(W) ** 2 * x) + ops.sum(ops.stop_gradient(W * V) * V))
    m = backcomp.build(g)
    rng = np.random.default_rng(0)
    P = {"W": rng.standard_normal((2, 3)), "V": rng.standard_normal(3)}
    X = rng.standard_normal((2, 3))
    loss, grads = m.value_and_grad(P, {"x": X})
    np.testing.assert_allclose(loss, np.sum(P["W"] ** 2 * X) + np.sum(P["W"] * P["V"] * P["V"]), rtol=1e-12)
    assert np.array_equal(grads["W"], np.zeros((2, 3)))            # exactly zero, not ~0
    np.testing.assert_allclose(grads["V"], np.sum(P["W"] * P["V"], axis=0), rtol=1e-12)


# ----- compiler-internal ops, built directly (second order where cheap) ---------------------
def _direct(name, build_fn, ref, shapes_domains, int_inputs=()):
    g = backcomp.Graph(f"direct_{name}")
    leaves = {}
    for leaf, (shape, _) in shapes_domains.items():
        leaves[leaf] = g.param(leaf, shape)
    for leaf, shape in int_inputs:
        leaves[leaf] = g.input(leaf, shape, dtype="int")
    out = build_fn(g, leaves)
    u = g.input("u", out.shape)
    g.loss(ops.sum(out * u))
    return g, {k: d for k, (_, d) in shapes_domains.items()}, (lambda P, I: np.sum(ref(P, I) * I["u"]))


def _scatter_ref(P, I):
    out = np.zeros((4, 3))
    out[1:4:2] = P["w"]
    return out


def _put_ref(P, I):
    out = np.zeros((3, 4))
    np.put_along_axis(out, I["labels"][:, None], P["w"][:, None], axis=-1)
    return out


DIRECT = [
    ("sum_to", lambda g, L: ops.apply("sum_to", L["w"], shape=(1, 3)), lambda P, I: P["w"].sum(0, keepdims=True),
     {"w": ((2, 3), "real")}, ()),
    ("sum_to_lead", lambda g, L: ops.sum_to(L["w"], (3,)), lambda P, I: P["w"].sum((0, 1)),
     {"w": ((2, 2, 3), "real")}, ()),
    ("scatter", lambda g, L: ops.apply("scatter", L["w"], index=(slice(1, 4, 2),), shape=(4, 3)), _scatter_ref,
     {"w": ((2, 3), "real")}, ()),
    ("put_label", lambda g, L: ops.apply("put_label", L["w"], L["labels"], shape=(3, 4)), _put_ref,
     {"w": ((3,), "real")}, (("labels", (3,)),)),
    ("take_label", lambda g, L: ops.take_label(L["w"], L["labels"]),
     lambda P, I: np.take_along_axis(P["w"], I["labels"][:, None], axis=-1)[:, 0],
     {"w": ((3, 4), "real")}, (("labels", (3,)),)),
    ("identity", lambda g, L: ops.apply("identity", L["w"]) * L["w"], lambda P, I: P["w"] ** 2,
     {"w": ((2, 3), "real")}, ()),
    ("ew", lambda g, L: ops.ew_from_expr(sp.tanh(ops.arg_symbol(0)) * ops.arg_symbol(1) ** 2,
                                         {ops.arg_symbol(0): L["w"], ops.arg_symbol(1): L["v"]}, label="t"),
     lambda P, I: np.tanh(P["w"]) * P["v"] ** 2, {"w": ((2, 3), "real"), "v": ((3,), "real")}, ()),
    ("ones_like", lambda g, L: ops.apply("ones_like", L["w"]) * L["w"] ** 2, lambda P, I: P["w"] ** 2,
     {"w": ((2, 3), "real")}, ()),
    ("zeros_like", lambda g, L: ops.apply("zeros_like", L["w"]) + ops.sin(L["w"]), lambda P, I: np.sin(P["w"]),
     {"w": ((2, 3), "real")}, ()),
]


@pytest.mark.parametrize("name, build_fn, ref, leaves, int_inputs", DIRECT, ids=[d[0] for d in DIRECT])
def test_internal_op_gradient(name, build_fn, ref, leaves, int_inputs):
    g, domains, reference = _direct(name, build_fn, ref, leaves, int_inputs)
    gradcheck(g, domains={**domains, "labels": 4}, reference=reference)


def test_max_vjp_forward_and_second_order():
    """max_vjp (the cotangent of max) computes ḡ shared over ties; it is differentiable in
    turn (linear in ḡ, piecewise constant in x), so max has a second derivative."""
    g = backcomp.Graph("maxvjp")
    x = g.input("x", (2, 3))
    m = ops.max(x, axis=1, keepdims=True)
    ct = g.input("g", (2, 1))
    out = ops.apply("max_vjp", x, m, ct, axes=(1,))
    g.output("out", out)
    mod = backcomp.build(g)
    X = np.array([[1.0, 3.0, 3.0], [0.0, -1.0, 2.0]])
    res = mod.forward({}, {"x": X, "g": np.array([[4.0], [5.0]])})["out"]
    np.testing.assert_array_equal(res, [[0.0, 2.0, 2.0], [0.0, 0.0, 5.0]])

    g2 = backcomp.Graph("maxvjp2")
    x2 = g2.param("x", (2, 3))
    c2 = g2.param("c", (2, 1))
    g2.loss(ops.sum(ops.apply("max_vjp", x2, ops.max(x2, axis=1, keepdims=True), c2, axes=(1,)) * x2))
    gradcheck(g2, domains={"x": "distinct"},
              reference=lambda P, I: np.sum(np.max(P["x"], axis=1, keepdims=True) * P["c"]))


def test_max_ties_share_the_gradient():
    g = backcomp.Graph("maxties")
    w = g.param("w", (2, 3))
    g.loss(ops.sum(ops.max(w, axis=1)) + ops.max(w))
    m = backcomp.build(g)
    W = np.array([[1.0, 3.0, 3.0], [3.0, -1.0, 2.0]])
    _, grads = m.value_and_grad({"w": W}, {})
    np.testing.assert_allclose(grads["w"], [[0, 0.5 + 1 / 3, 0.5 + 1 / 3], [1 + 1 / 3, 0, 0]], rtol=1e-12)


def test_relu_and_abs_derivative_at_zero_is_zero():
    g = backcomp.Graph("kinks")
    w = g.param("w", (3,))
    g.loss(ops.sum(ops.relu(w)) + ops.sum(ops.abs(w)))
    m = backcomp.build(g)
    _, grads = m.value_and_grad({"w": np.array([-1.0, 0.0, 2.0])}, {})
    np.testing.assert_array_equal(grads["w"], [-1.0, 0.0, 2.0])


def test_second_order_through_derived_vjp():
    """The backward is IR: differentiate a gradient again (d/dw of d/dx tanh(w·x)), by building
    the VJP graph and using its grad node as the loss of a new differentiation."""
    g = backcomp.Graph("second")
    w = g.param("w", (3,))
    x = g.param("x", (3,))
    g.loss(ops.sum(ops.tanh(w * x)))
    g.wrt = ("x",)
    d = differentiate(g)
    gx = d.grads["x"]                               # = w · (1 − tanh(w x)²)
    d.loss_node = None
    d.grads, d.cotangents = {}, {}
    d.wrt = ("w",)
    d.loss(ops.sum(gx), name="gx_sum")
    m = backcomp.build(d)
    rng = np.random.default_rng(0)
    P = {"w": rng.standard_normal(3), "x": rng.standard_normal(3)}
    loss, grads = m.value_and_grad(P, {})
    t = np.tanh(P["w"] * P["x"])
    np.testing.assert_allclose(loss, np.sum(P["w"] * (1 - t ** 2)), rtol=1e-12)
    # d/dw [w (1 − t²)] = (1 − t²) − 2 w t (1 − t²) x
    np.testing.assert_allclose(grads["w"], (1 - t ** 2) - 2 * P["w"] * t * (1 - t ** 2) * P["x"], rtol=1e-10)


# ----- coverage ---------------------------------------------------------------------------------
#: ops a user never calls directly, and the ops whose VJPs produce them (each is also
#: gradient-checked directly in ``test_internal_op_gradient``).
INTERNAL_VIA = {
    "ew": "every elementwise VJP (and scalar_function)",
    "sum_to": "add/mul of a broadcast operand",
    "broadcast_to": "sum_to's VJP; einsum with an index summed in one operand",
    "scatter": "getitem",
    "put_label": "take_label (softmax_cross_entropy with int labels)",
    "take_label": "softmax_cross_entropy with int labels",
    "max_vjp": "max",
    "ones_like": "the seed cotangent of every loss",
    "zeros_like": "a param not on the loss path",
    "identity": "naming a node twice",
}
#: no gradient by design: checked by value (stop_gradient) or via where's condition
NO_GRADIENT = {"stop_gradient", "greater", "less", "greater_equal", "less_equal", "equal"}


#: ops whose gradient tests live in their own file (FD checks there, same tolerance)
COVERED_ELSEWHERE = {
    "test_vocabulary.py": {"clip", "expm1", "square", "log_sigmoid", "silu"},
    "test_vocabulary_index.py": {"take", "take_grad", "one_hot", "full", "eye", "arange", "tril", "triu"},
    "test_random.py": {"dropout", "normal", "uniform"},   # the ops dropout_mask and random
    "test_batchnorm.py": {"mode_select", "buffer_update"},
    "test_vocabulary_shape.py": {"argmax", "cumsum", "stack", "expand_dims", "squeeze", "flip", "pad",
                                 "unignore_label"},
    "test_scan.py": {"scan", "scan_out", "tuple_ct", "tuple_ct_sum"},
    "test_conv.py": {"conv2d", "conv2d_grad_input", "conv2d_grad_weight", "im2col", "max_pool2d", "max_pool2d_argmax",
                     "max_pool2d_scatter", "max_pool2d_gather", "avg_pool2d", "avg_pool2d_scatter"},
    "test_conv_family.py": {"conv_transpose2d"},
}


def _covered_elsewhere() -> set[str]:
    """The listed ops, each checked to be named in its test file."""
    out = set()
    for filename, names in COVERED_ELSEWHERE.items():
        text = (Path(__file__).parent / filename).read_text()
        assert all(name in text for name in names), filename
        out |= names
    return out | {"dropout_mask", "random"}   # built by dropout, normal and uniform (test_random.py)


def test_every_registered_op_is_covered():
    registered = set(registered_ops())
    covered = {op for case in CASES for op in case.covers}          # the FD gradient table
    covered |= {case.name for case in CASES}
    covered |= {d[0] for d in DIRECT}                                 # internal ops built directly
    covered |= {"max_vjp"}                 # test_max_vjp_forward_and_second_order
    covered |= NO_GRADIENT                 # test_stop_gradient_..., and where's conditions above
    covered |= _covered_elsewhere()
    missing = registered - covered
    assert not missing, f"ops without a gradient test: {sorted(missing)}"
    assert set(INTERNAL_VIA) <= registered and NO_GRADIENT <= registered


def test_internal_ops_are_produced_by_the_vjps_named():
    """The forward+backward graphs of the table's cases really contain every registered op,
    so the internal ops are exercised as VJP products, not only when built by hand."""
    seen: set[str] = set()
    for case in CASES:
        for shapes in case.shapes:
            g, _, _ = build_case(case, shapes)
            seen |= {n.op for n in differentiate(g).nodes}
    for test in (_internal_graph_int_labels, _internal_graph_unused_param, _internal_graph_renamed):
        seen |= {n.op for n in differentiate(test()).nodes}
    missing = set(registered_ops()) - seen - {"stop_gradient"} - _covered_elsewhere()
    assert not missing, f"ops never reached by the table's graphs: {sorted(missing)}"


def _internal_graph_int_labels():
    g = backcomp.Graph("int_labels")
    z = g.param("z", (3, 4))
    g.loss(ops.sum(ops.softmax_cross_entropy(z, g.input("labels", (3,), dtype="int"))))
    return g


def _internal_graph_unused_param():
    g = backcomp.Graph("unused")
    w = g.param("w", (3,))
    g.param("unused", (2,))
    g.loss(ops.sum(w))
    return g


def _internal_graph_renamed():
    g = backcomp.Graph("renamed")
    w = g.param("w", (3,))
    h = g.assign_name("h", ops.exp(w))
    h2 = g.assign_name("h2", h)
    g.loss(ops.sum(h2 * h))
    return g


# ----- the registry ------------------------------------------------------------------------------
def test_registering_a_name_twice_raises():
    from backcomp.ops.registry import OpDef, RegistryError, get_op, register_op
    before = get_op("relu")
    with pytest.raises(RegistryError, match="'relu' is already registered"):
        register_op(OpDef("relu", before.infer, before.emit, before.vjp))
    assert get_op("relu") is before


def test_unknown_op_raises():
    from backcomp.ops.registry import RegistryError
    g = backcomp.Graph("unknown")
    w = g.param("w", (2,))
    with pytest.raises(RegistryError, match="unknown op 'no_such_op'"):
        ops.apply("no_such_op", w)


@pytest.fixture
def user_op():
    """A user op registered through the public API: cube(x) = x³ with its own VJP rule,
    and rowdot(a, b) = Σ_j a_ij b_ij (a structural op with its own rule); unregistered after."""
    from backcomp.ops import OpDef, register_op, unregister_op

    def cube_infer(inputs, attrs):
        return inputs[0].shape, "float"

    def cube_emit(node, args, out):
        return [f"{out} = {args[0]} * {args[0]} * {args[0]}"]

    def cube_vjp(node, ct):
        (x,) = node.inputs
        return [ct * 3 * x * x]

    def rowdot_infer(inputs, attrs):
        a, b = inputs
        if a.shape != b.shape:
            raise backcomp.ShapeError(f"rowdot: shapes {a.shape} and {b.shape} differ")
        return a.shape[:-1], "float"

    def rowdot_emit(node, args, out):
        return [f"{out} = np.sum({args[0]} * {args[1]}, axis=-1)"]

    def rowdot_vjp(node, ct):
        a, b = node.inputs
        ct = ct[..., None]
        return [ct * b, ct * a]

    register_op(OpDef("user_cube", cube_infer, cube_emit, cube_vjp, doc="x**3"))
    register_op(OpDef("user_rowdot", rowdot_infer, rowdot_emit, rowdot_vjp, doc="row-wise dot"))
    yield
    unregister_op("user_cube")
    unregister_op("user_rowdot")


@pytest.mark.parametrize("shape", [(3,), ("B", 3), (2, 3)], ids=["3", "Bx3", "2x3"])
def test_user_registered_op_gradients(user_op, shape):
    g = backcomp.Graph("user_ops")
    fixed = tuple(1 if isinstance(d, str) else d for d in shape)
    a = g.param("a", fixed)
    b = g.param("b", shape[-1:])
    x = g.input("x", shape)
    cube = ops.apply("user_cube", a * x + b)
    dot = ops.apply("user_rowdot", cube, ops.broadcast_to(ops.sin(b) * x, cube.shape))
    g.loss(ops.sum(dot) + ops.sum(ops.apply("user_cube", b)))

    def reference(P, I):
        c = (P["a"] * I["x"] + P["b"]) ** 3
        return np.sum(c * (np.sin(P["b"]) * I["x"])) + np.sum(P["b"] ** 3)

    gradcheck(g, reference=reference)


def test_user_op_unregistered_after_use(user_op):
    from backcomp.ops.registry import unregister_op
    assert "user_cube" in registered_ops()
    unregister_op("user_cube")
    assert "user_cube" not in registered_ops()


@pytest.mark.parametrize("fn", ["sigmoid", "softplus"])
def test_custom_sympy_function_fdiff_matches_definition(fn):
    from backcomp.ops import scalar
    cls = getattr(scalar, fn)
    x = sp.Symbol("x", real=True)
    definition = cls.definition.xreplace({scalar._x: x})
    derived = sp.diff(cls(x), x).rewrite(sp.exp)
    written = sp.diff(definition, x)
    # replace the custom functions by their definitions, then compare symbolically
    expanded = derived.replace(lambda e: isinstance(e, scalar.CUSTOM_FUNCTIONS),
                               lambda e: type(e).definition.xreplace({scalar._x: e.args[0]}))
    assert sp.simplify(expanded - written) == 0
    # and numerically, at a few points, as a guard against a vacuous simplify
    f1, f2 = sp.lambdify(x, expanded), sp.lambdify(x, written)
    for v in (-3.0, -0.5, 0.0, 1.7):
        assert math.isclose(f1(v), f2(v), rel_tol=1e-12)


def test_scalar_function_rejects_undefined_names():
    u, v = sp.symbols("u v")
    with pytest.raises(backcomp.GraphError, match="undefined names: v"):
        ops.scalar_function("bad", [u], u * v)


def test_domains_are_declared():
    for case in CASES:
        assert all(d in DOMAINS for d in case.domains), case.name
        for shapes in case.shapes:
            concrete(shapes[0], 3)


# ----- shape rules: errors name the op and both shapes -------------------------------------------
def _g():
    g = backcomp.Graph("errors")
    return g, g.param("a", (2, 3)), g.param("b", (4, 3)), g.input("x", ("B", 3))


@pytest.mark.parametrize("build, pattern", [
    (lambda g, a, b, x: a + b, r"^add: cannot broadcast shapes \(2, 3\) and \(4, 3\)"),
    (lambda g, a, b, x: x * a, r"^mul: cannot broadcast shapes \(B, 3\) and \(2, 3\)"),
    (lambda g, a, b, x: ops.where(x > b, x, a), r"^greater: cannot broadcast shapes \(B, 3\) and \(4, 3\)"),
    (lambda g, a, b, x: a @ b, r"matmul.*\(2, 3\) and \(4, 3\)"),
    (lambda g, a, b, x: ops.einsum("ij,jk->ik", a, b), r"einsum: index 'j' has size 3 in one operand and 4"),
    (lambda g, a, b, x: ops.reshape(a, (4, 2)), r"reshape.*\(2, 3\) to \(4, 2\)"),
    (lambda g, a, b, x: ops.reshape(a, (-1, -1)), r"only one dimension may be -1"),
    (lambda g, a, b, x: a[2], r"index 2 is out of bounds for axis 0 with size 2"),
    (lambda g, a, b, x: a[0, 0, 0], r"too many indices"),
    (lambda g, a, b, x: x[1:], r"cannot slice symbolic dimension B"),
    (lambda g, a, b, x: ops.concatenate((a, b), axis=1), r"concatenate.*\(2, 3\) and \(4, 3\).*axis 1"),
    (lambda g, a, b, x: ops.concatenate((x, x), axis=0), r"symbolic dimension B"),
    (lambda g, a, b, x: ops.sum(a, axis=2), r"sum: axis 2 is out of range"),
    (lambda g, a, b, x: ops.max(a, axis=(0, 0)), r"repeated axis"),
    (lambda g, a, b, x: ops.transpose(a, (0, 0)), r"not a permutation"),
    (lambda g, a, b, x: ops.broadcast_to(a, (4, 3)), r"broadcast"),
    (lambda g, a, b, x: ops.softmax_cross_entropy(a, g.input("lab", (3,), dtype="int")),
     r"labels of shape \(3,\) do not match logits of shape \(2, 3\)"),
    (lambda g, a, b, x: ops.softmax_cross_entropy(a, b), r"targets \(4, 3\) do not match logits \(2, 3\)"),
    (lambda g, a, b, x: g.param("z", (0, 3)), r"dimension 0 must be positive"),
    (lambda g, a, b, x: g.input("n", (-2,)), r"dimension -2 must be positive"),
    (lambda g, a, b, x: g.param("f", (2.5,)), r"must be a positive integer"),
])
def test_shape_errors(build, pattern):
    g, a, b, x = _g()
    with pytest.raises(backcomp.ShapeError, match=pattern):
        build(g, a, b, x)


@pytest.mark.parametrize("build, pattern", [
    (lambda g, a, b, x: ops.where(a, a, b), r"where\(\) needs a comparison"),
    (lambda g, a, b, x: ops.relu(a, a), r"relu\(\) takes 1 argument, got 2"),
    (lambda g, a, b, x: ops.add(1.0, 2.0), r"needs at least one array argument"),
    (lambda g, a, b, x: ops.einsum("ii->i", a), r"repeated index"),
    (lambda g, a, b, x: ops.einsum("...i->i", a), r"ellipsis"),
    (lambda g, a, b, x: a + "x", r"expected a node or a number"),
    (lambda g, a, b, x: ops.sum(a, keepdims=1), r"keepdims must be true or false"),
    (lambda g, a, b, x: a + backcomp.Graph("other").param("c", (3,)), r"belongs to graph 'other'"),
])
def test_graph_errors(build, pattern):
    g, a, b, x = _g()
    with pytest.raises(backcomp.GraphError, match=pattern):
        build(g, a, b, x)


# ----- property: binary ops over random broadcastable shapes -----------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def broadcast_pair(draw):
    rank = draw(st.integers(0, 3))
    full = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    def side():
        drop = draw(st.integers(0, rank))
        return tuple(1 if draw(st.booleans()) else d for d in full[drop:])
    return side(), side()


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(pair=broadcast_pair(), op=st.sampled_from(["mul", "div", "maximum", "sub"]))
def test_binary_ops_over_random_broadcast_shapes(pair, op):
    case = next(c for c in CASES if c.name == op)
    g, domains, reference = build_case(case, pair)
    gradcheck(g, domains=domains, reference=reference)


def test_an_op_is_one_declaration_spec_memory_and_explain(tmp_path):
    """The README's cube: one OpDef (with its explain rule) and one @spec_function make
    an op a spec can call, that explain writes as math and that compiles and differentiates."""
    from backcomp.explain import explain
    from backcomp.ops import OpDef, register_op, unregister_op
    from backcomp.ops import signature
    from backcomp.ops.registry import RegistryError
    from backcomp.spec import parse_spec
    from backcomp.ops.signature import X, spec_function

    register_op(OpDef("readme_cube", lambda inputs, attrs: (inputs[0].shape, "float"),
                      lambda node, args, out: [f"{out} = {args[0]} ** 3"],
                      lambda node, ct: [ct * 3 * node.inputs[0] * node.inputs[0]],
                      explain=lambda node, args, scalars: args[0] ** 3))

    def readme_cube(x):
        return ops.apply("readme_cube", x)

    spec_function(X)(readme_cube)
    try:
        g = parse_spec('[model]\nname = "c"\nloss = "loss"\n[inputs]\nx = ["B", 3]\n[params]\nb = [3]\n'
                       '[graph]\nh = "readme_cube(x + b)"\nloss = "sum(h)"\n', "c.toml")
        text = explain(g, wrt="b")
        assert "(x + b)^3" in text.replace("b + x", "x + b")
        x = np.array([[0.5, -1.0, 2.0]])
        b = np.array([0.1, 0.2, -0.3])
        loss, grads = backcomp.build(g).value_and_grad({"b": b}, {"x": x})
        np.testing.assert_allclose(loss, np.sum((x + b) ** 3), rtol=1e-12)
        np.testing.assert_allclose(grads["b"], 3 * np.sum((x + b) ** 2, axis=0), rtol=1e-12)
        with pytest.raises(RegistryError, match="memory must be"):
            OpDef("bad_memory", None, None, None, memory="borrowed")
    finally:
        unregister_op("readme_cube")
        del signature._FUNCTIONS["readme_cube"]


def test_what_the_passes_know_of_an_op_is_declared_on_it():
    """backcomp.dask learns a user op from its OpDef alone: without a separability rule a
    model using it on batch rows is refused naming it; with one it is separable.  A bound
    that the sign analysis does not know is refused at declaration."""
    from backcomp.ops import OpDef, register_op, unregister_op
    from backcomp.ops.batch_axis import LIN_TAG, Mixed
    from backcomp.ops.registry import RegistryError
    from backcomp.passes.separability import analyse

    def cube(name, **rules):
        return OpDef(name, lambda inputs, attrs: (inputs[0].shape, "float"),
                     lambda node, args, out: [f"{out} = {args[0]} ** 3"], None, **rules)

    def rows_in_place(node, kinds, dim):
        """Each element cubed alone: rows stay where they are; not linear in a batch mean."""
        if kinds[0].tag == LIN_TAG:
            raise Mixed(node, "cubes a sum or mean over the batch")
        return kinds[0]

    def model(op):
        g = backcomp.Graph("rows")
        x = g.input("x", ("B", 3))
        w = g.param("w", (3,))
        g.loss(ops.mean(g.assign_name("h", ops.apply(op, x)) * w))
        return g

    register_op(cube("cube_unruled"))
    register_op(cube("cube_ruled", separability=rows_in_place))
    try:
        refused = analyse(model("cube_unruled"))
        assert refused.refusal == ("model 'rows' is not batch-separable: node 'h' (cube_unruled) applies "
                                   "'cube_unruled', which backcomp does not know to keep rows of the batch apart")
        assert analyse(model("cube_ruled")).separable
        with pytest.raises(RegistryError, match="bound must be one of"):
            cube("cube_bad_bound", bound="positive")
    finally:
        unregister_op("cube_unruled")
        unregister_op("cube_ruled")


def test_memory_classes_are_declared_on_the_ops():
    views = {name for name, op in registered_ops().items() if op.memory == "view"}
    assert views == {"transpose", "reshape", "getitem", "broadcast_to", "identity", "stop_gradient",
                     "expand_dims", "squeeze", "flip", "mode_select", "buffer_update"}
