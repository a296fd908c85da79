"""The convolution family of issue 10: conv2d with dilation and groups, conv1d,
conv_transpose2d, pools with padding, 1-D pools.

Every op and option is checked against torch.nn.functional on the same float64
arrays (values and gradients, rtol 1e-10), against central differences, and
differentiated again: the VJPs of the backward ops by finite differences of graphs
whose loss *contains* the backward (⟨∇L, v⟩, whose gradient is a Hessian-vector
product).  Then float32, a symbolic batch, shape errors, located spec errors and the
conv1d example.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backcomp
from backcomp import Graph, ShapeError, ops
from backcomp.ops.conv import conv2d_grad_input, conv2d_grad_weight
from backcomp.spec import SpecError, load_spec, parse_spec
from backcomp.vjp import differentiate
from conftest import gradcheck

F = torch.nn.functional
ROOT = Path(__file__).resolve().parent.parent


# ----- the cases: (id, operand shapes, our builder, torch's function) --------------------------
def _conv2d(**kw):
    return (lambda x, w: ops.conv2d(x, w, **kw)), (lambda x, w: F.conv2d(x, w, **kw))


def _conv1d(**kw):
    return (lambda x, w: ops.conv1d(x, w, **kw)), (lambda x, w: F.conv1d(x, w, **kw))


def _convt(**kw):
    return (lambda x, w: ops.conv_transpose2d(x, w, **kw)), (lambda x, w: F.conv_transpose2d(x, w, **kw))


def _pool(kind, size, stride=None, padding=0):
    ours = getattr(ops, kind)
    theirs = getattr(F, kind)
    return (lambda x: ours(x, size, stride, padding)), (lambda x: theirs(x, size, stride, padding))


CASES = {
    # conv2d: dilation, groups, depthwise, pairs, and both grad_weight paths (C/G·kh·kw < 32 and >= 32)
    "conv2d-dil2": ({"x": (2, 3, 7, 7), "w": (4, 3, 3, 3)}, *_conv2d(dilation=2)),
    "conv2d-dil-pairs": ({"x": (2, 2, 9, 8), "w": (3, 2, 3, 2)}, *_conv2d(stride=(2, 1), padding=(1, 2), dilation=(2, 3))),
    "conv2d-dil-dropped": ({"x": (1, 2, 10, 9), "w": (2, 2, 3, 3)}, *_conv2d(stride=2, padding=1, dilation=2)),
    "conv2d-reach=padded": ({"x": (1, 2, 5, 5), "w": (2, 2, 3, 3)}, *_conv2d(dilation=3, padding=1)),
    "conv2d-groups2": ({"x": (2, 4, 7, 6), "w": (6, 2, 3, 3)}, *_conv2d(groups=2, padding=1)),
    "conv2d-groups2-k36": ({"x": (2, 8, 6, 6), "w": (4, 4, 3, 3)}, *_conv2d(groups=2, stride=2, padding=1)),
    "conv2d-groups2-o1-k36": ({"x": (2, 8, 6, 6), "w": (2, 4, 3, 3)}, *_conv2d(groups=2, padding=1)),
    "conv2d-depthwise": ({"x": (2, 3, 6, 6), "w": (3, 1, 3, 3)}, *_conv2d(groups=3, padding=1)),
    "conv2d-depthwise-x2": ({"x": (2, 3, 7, 7), "w": (6, 1, 3, 3)}, *_conv2d(groups=3, stride=2)),
    "conv2d-depthwise-dil": ({"x": (2, 4, 9, 9), "w": (4, 1, 3, 3)}, *_conv2d(groups=4, dilation=2, padding=2)),
    "conv2d-all": ({"x": (1, 6, 9, 8), "w": (4, 3, 2, 3)}, *_conv2d(groups=2, dilation=(2, 1), padding=(1, 2), stride=(1, 2))),
    # conv1d
    "conv1d": ({"x": (2, 3, 10), "w": (4, 3, 3)}, *_conv1d()),
    "conv1d-s2-p1-d2": ({"x": (2, 3, 11), "w": (4, 3, 3)}, *_conv1d(stride=2, padding=1, dilation=2)),
    "conv1d-groups": ({"x": (2, 4, 9), "w": (6, 2, 2)}, *_conv1d(groups=2, padding=1)),
    "conv1d-depthwise": ({"x": (2, 5, 12), "w": (5, 1, 5)}, *_conv1d(groups=5, padding=2, dilation=2)),
    # conv_transpose2d: w is (I, O/groups, kh, kw)
    "convt": ({"x": (2, 3, 4, 5), "w": (3, 2, 3, 3)}, *_convt()),
    "convt-s2-p1-op1": ({"x": (2, 3, 4, 4), "w": (3, 2, 3, 3)}, *_convt(stride=2, padding=1, output_padding=1)),
    "convt-pairs": ({"x": (1, 2, 3, 4), "w": (2, 3, 2, 3)}, *_convt(stride=(2, 3), padding=(0, 1), output_padding=(1, 2))),
    "convt-1x1-s2-op1": ({"x": (2, 2, 3, 3), "w": (2, 2, 1, 1)}, *_convt(stride=2, output_padding=1)),
    "convt-groups-dil": ({"x": (2, 4, 3, 4), "w": (4, 3, 3, 2)}, *_convt(groups=2, dilation=2, stride=2, padding=1)),
    "convt-pad2": ({"x": (1, 2, 5, 5), "w": (2, 2, 3, 3)}, *_convt(padding=2)),
    # output_padding >= stride, allowed below the dilation: rows and columns past those of
    # conv2d's input gradient, holding what kernel taps land on (square, per axis, groups,
    # padding, stride 1 and a 1x1 kernel)
    "convt-op>=s-d2": ({"x": (2, 3, 4, 5), "w": (3, 2, 3, 3)}, *_convt(dilation=2, output_padding=1)),
    "convt-op>=s-d3-groups": ({"x": (2, 4, 3, 4), "w": (4, 3, 3, 2)},
                              *_convt(stride=2, padding=1, output_padding=2, groups=2, dilation=3)),
    "convt-op>=s-pairs": ({"x": (1, 2, 3, 4), "w": (2, 3, 2, 3)},
                          *_convt(stride=(1, 2), padding=(2, 0), output_padding=(2, 1), dilation=(3, 1))),
    "convt-op>=s-pairs-w": ({"x": (2, 4, 4, 3), "w": (4, 1, 2, 3)},
                            *_convt(stride=(2, 1), padding=(1, 2), output_padding=(1, 2), groups=4, dilation=(1, 3))),
    "convt-op>=s-1x1": ({"x": (2, 2, 3, 4), "w": (2, 3, 1, 1)},
                        *_convt(padding=(1, 0), output_padding=(1, 2), dilation=(2, 3))),
    # stride 1: the input gradient adds on flat images (uneven padding and dilation pairs,
    # a window wider than the padding, one window offset)
    "conv2d-s1-pairs": ({"x": (2, 3, 6, 7), "w": (4, 3, 2, 3)}, *_conv2d(padding=(2, 1), dilation=(1, 2))),
    "conv2d-s1-nopad-wide": ({"x": (2, 2, 5, 6), "w": (3, 2, 2, 4)}, *_conv2d()),
    "conv2d-1x1-pad": ({"x": (2, 3, 5, 4), "w": (4, 3, 1, 1)}, *_conv2d(padding=(1, 2))),
    "convt-s1-dil-pairs": ({"x": (2, 3, 4, 5), "w": (3, 2, 2, 3)}, *_convt(padding=(1, 0), dilation=(2, 1))),
    # pools with padding (max pads with -inf, avg counts the zeros)
    **{f"{kind}-{tag}": ({"x": xs}, *_pool(kind, *args)) for kind in ("max_pool2d", "avg_pool2d")
       for tag, xs, args in [
           ("k3-s2-p1", (2, 2, 7, 7), (3, 2, 1)),
           ("k2-s2-p1", (2, 2, 6, 5), (2, 2, 1)),          # no offset covers the whole output
           ("k2-s1-p1", (2, 2, 6, 5), (2, 1, 1)),          # overlapping, padded
           ("pairs", (1, 3, 7, 8), ((3, 2), (1, 2), (1, 1))),
           ("k3-default-p1", (2, 2, 5, 5), (3, None, 1)),
           ("k5-s1-p2", (1, 2, 4, 4), (5, 1, 2)),
           ("k1x3-p0x1", (1, 1, 3, 4), ((1, 3), 1, (0, 1))),
       ]},
    # 1-D pools
    **{f"{kind}-{tag}": ({"x": xs}, *_pool(kind, *args)) for kind in ("max_pool1d", "avg_pool1d")
       for tag, xs, args in [
           ("k3-s2-p1", (2, 3, 10), (3, 2, 1)),
           ("k2", (2, 3, 9), (2,)),
           ("k2-s1-p1", (2, 3, 9), (2, 1, 1)),
           ("k4-s3-p2", (1, 2, 7), (4, 3, 2)),
       ]},
}
POOLS = [k for k in CASES if "pool" in k]
MAX_POOLS = [k for k in POOLS if k.startswith("max")]


def case_graph(case: str, name: str = "case", loss: str = "tanh") -> Graph:
    """y = op(operands), loss = Σ tanh(y)·r: a cotangent that differs per output entry."""
    shapes, ours, _ = CASES[case]
    g = Graph(name)
    y = g.output("y", ours(*(g.param(k, s, init="normal(1.0)") for k, s in shapes.items())))
    r = g.input("r", y.shape)
    g.loss(ops.sum((ops.tanh(y) if loss == "tanh" else y) * r))
    return g


def _draw(case: str, rng, ties: bool = False) -> dict:
    shapes = CASES[case][0]
    return {k: (rng.integers(0, 2, s).astype(np.float64) if ties else rng.standard_normal(s))
            for k, s in shapes.items()}


# ----- values and gradients equal PyTorch's ---------------------------------------------------
def _against_torch(case: str, params: dict, m, rng):
    _, _, theirs = CASES[case]
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ty = theirs(*t.values())
    r = rng.standard_normal(tuple(ty.shape))
    (torch.tanh(ty) * torch.tensor(r)).sum().backward()
    out = m.forward(params, {"r": r})
    _, grads = m.value_and_grad(params, {"r": r})
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    for k in params:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case):
    m = backcomp.build(case_graph(case, "torch_case"))
    rng = np.random.default_rng(0)
    _against_torch(case, _draw(case, rng), m, rng)


@pytest.mark.parametrize("case", MAX_POOLS)
def test_padded_max_pool_ties_match_torch(case):
    """Many ties, whole windows of them, and windows reaching into the padding: the
    gradient goes to the first maximum among the window's input elements, as PyTorch."""
    m = backcomp.build(case_graph(case, "ties"))
    rng = np.random.default_rng(1)
    _against_torch(case, _draw(case, rng, ties=True), m, rng)


def test_max_pool_padding_is_minus_inf():
    """A window that is mostly padding still gives its one input element, even a negative one."""
    g = Graph("neg")
    x = g.input("x", (1, 1, 2, 2))
    g.output("y", ops.max_pool2d(x, 2, 1, padding=1))
    m = backcomp.build(g)
    x = -np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(m.forward({}, {"x": x})["y"], F.max_pool2d(torch.tensor(x), 2, 1, 1).numpy())


@pytest.mark.parametrize("size, stride, padding", [(2, 2, 0), (3, 2, 1), (2, 1, 1), ((1, 3), (1, 2), (0, 1))],
                         ids=["tiles", "k3-s2-p1", "overlap-p1", "k1x3"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_relu_then_max_pool_ties_match_torch(size, stride, padding, dtype):
    """relu before a pool makes whole windows of exact ties at 0 (and here at 1): the
    gradient goes to the first maximum of each window, as in PyTorch, in both dtypes."""
    g = Graph("relu_pool")
    x = g.param("x", (2, 3, 8, 7))
    y = g.output("y", ops.max_pool2d(ops.relu(x), size, stride, padding))
    r = g.input("r", y.shape)
    g.loss(ops.sum(y * r))
    m = backcomp.build(g)
    rng = np.random.default_rng(3)
    xv = rng.integers(-1, 2, (2, 3, 8, 7)).astype(dtype)
    rv = rng.standard_normal(y.shape).astype(dtype)
    tx = torch.tensor(xv, requires_grad=True)
    ty = F.max_pool2d(torch.relu(tx), size, stride, padding)
    (ty * torch.tensor(rv)).sum().backward()
    _, grads = m.value_and_grad({"x": xv}, {"r": rv})
    assert grads["x"].dtype == np.dtype(dtype)
    theirs = tx.grad.numpy()
    np.testing.assert_array_equal(grads["x"] != 0, theirs != 0)     # the same element of each window
    tol = 1e-6 if dtype == "float32" else 1e-13       # overlapping windows add in another order
    np.testing.assert_allclose(grads["x"], theirs, rtol=tol, atol=tol * np.abs(theirs).max())


PAST_STRIDE = [k for k in CASES if k.startswith("convt-op>=s")]


@pytest.mark.parametrize("case", PAST_STRIDE)
def test_output_padding_past_the_stride_at_both_levels(case):
    """output_padding >= stride (dilation > stride): values and gradients equal torch's
    unoptimised (-O0) and optimised (-O1), the two modules agree, and -O0's gradients
    match central differences too (the default level is checked below)."""
    fast = backcomp.build(case_graph(case, "past_stride_o1"), opt_level=1)
    slow = gradcheck(case_graph(case, "past_stride_o0"), opt_level=0)
    for m in (fast, slow):
        rng = np.random.default_rng(5)
        _against_torch(case, _draw(case, rng), m, rng)
    rng = np.random.default_rng(6)
    params = _draw(case, rng)
    r = rng.standard_normal(fast.INPUTS["r"])
    (lf, gf), (ls, gs) = fast.value_and_grad(params, {"r": r}), slow.value_and_grad(params, {"r": r})
    np.testing.assert_allclose(lf, ls, rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(gf[k], gs[k], rtol=1e-12, atol=1e-13, err_msg=k)


def test_output_padding_past_the_stride_holds_what_taps_reach():
    """stride 2, dilation 3, padding 1, output_padding 2, 3 input rows: output row i takes
    x row h through tap a where 2h + 3a − 1 = i, so of the 11 rows 1..7 and 9 are reached
    and rows 0, 8 and 10 are zero (row 9 lies past the 9 rows conv2d's input gradient
    spans); of the 10 columns (4 input columns, 2 taps: 2h + 3b − 1) 1..6 and 8 are
    reached, and 0, 7 and 9 are zero."""
    m = backcomp.build(case_graph("convt-op>=s-d3-groups", "reach"))
    rng = np.random.default_rng(7)
    params = _draw("convt-op>=s-d3-groups", rng)
    y = m.forward(params, {"r": np.zeros(m.INPUTS["r"])})["y"]
    assert y.shape == (2, 6, 11, 10)
    rows = [bool(np.any(y[:, :, i] != 0)) for i in range(11)]
    cols = [bool(np.any(y[:, :, :, j] != 0)) for j in range(10)]
    assert rows == [i in {1, 2, 3, 4, 5, 6, 7, 9} for i in range(11)], rows
    assert cols == [j in {1, 2, 3, 4, 5, 6, 8} for j in range(10)], cols


def test_output_padding_below_the_stride_builds_no_crop():
    """The VJP crops and pads only past the stride: the existing cases' backward is as before."""
    def backward_ops(case):
        return {n.op for n in differentiate(case_graph(case, "ops")).nodes}
    assert not {"pad", "getitem"} & backward_ops("convt-s2-p1-op1")
    assert {"pad", "getitem"} <= backward_ops("convt-op>=s-d3-groups")


# ----- gradients against central differences (float64) ---------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_by_finite_differences(case):
    gradcheck(case_graph(case, "fd_case"), domains={"x": "distinct"} if case in POOLS else None)


# ----- second order: the backward ops differentiated again -------------------------------------
def double_backward(graph: Graph, name: str) -> Graph:
    """The graph with loss ⟨∇_θ L, v⟩ over its params: its gradient H·v runs the VJP of
    every backward op of L (cotangents of cotangents)."""
    g = differentiate(graph)
    g.name, grads = name, dict(g.grads)
    g.grads, g.cotangents, g.outputs = {}, {}, {}
    terms = [ops.sum(grads[p] * g.input(f"v_{p}", g.params[p].shape)) for p in g.wrt_params()]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    g.loss(total, name="hvp")
    return g


SECOND_ORDER = ["conv2d-dil-pairs", "conv2d-groups2", "conv2d-groups2-k36", "conv2d-groups2-o1-k36",
                "conv2d-depthwise", "conv2d-depthwise-x2", "conv2d-all",
                "conv1d-s2-p1-d2", "conv1d-depthwise", "convt-s2-p1-op1", "convt-groups-dil", "convt-pairs",
                "convt-op>=s-d2", "convt-op>=s-d3-groups", "convt-op>=s-pairs", "convt-op>=s-pairs-w", "convt-op>=s-1x1",
                "max_pool2d-k3-s2-p1", "max_pool2d-k2-s1-p1", "avg_pool2d-pairs", "avg_pool2d-k2-s2-p1",
                "max_pool1d-k3-s2-p1", "avg_pool1d-k4-s3-p2"]


@pytest.mark.parametrize("case", SECOND_ORDER)
def test_hessian_vector_products_by_finite_differences(case):
    g = double_backward(case_graph(case, "first"), "hvp_case")
    ops_in_loss = {n.op for n in differentiate(g).nodes}
    if case.startswith("conv"):   # the backward's own VJPs ran: the whole bilinear family appears
        assert {"conv2d", "conv2d_grad_input", "conv2d_grad_weight"} <= ops_in_loss, ops_in_loss
    gradcheck(g, domains={"x": "distinct"} if case in POOLS else None)


def _backward_op_graph(kind: str) -> Graph:
    """A graph whose forward *is* a backward op with the new options, every operand a param."""
    g = Graph("backward_" + re.sub(r"\W", "_", kind))
    p = lambda name, shape: g.param(name, shape, init="normal(1.0)")   # noqa: E731
    if kind == "grad_input-groups-dil":     # conv2d (2, 4, 9, 8) * (6, 2, 3, 2), groups 2
        y = conv2d_grad_input(p("ct", (2, 6, 4, 5)), p("w", (6, 2, 3, 2)), (9, 8), (2, 1), (1, 0), (2, 3), 2)
    elif kind == "grad_weight-groups-dil":
        y = conv2d_grad_weight(p("x", (2, 4, 9, 8)), p("ct", (2, 6, 4, 5)), (3, 2), (2, 1), (1, 0), (2, 3), 2)
    elif kind == "grad_weight-groups-k>=32":
        y = conv2d_grad_weight(p("x", (2, 8, 6, 6)), p("ct", (2, 4, 3, 3)), (3, 3), (2, 2), (1, 1), (1, 1), 2)
    elif kind == "conv_transpose2d":
        y = ops.conv_transpose2d(p("x", (2, 4, 3, 4)), p("w", (4, 3, 3, 2)), stride=2, padding=1,
                                 output_padding=1, groups=2)
    else:                                   # the pool backward ops with padding
        attrs = {"size": (3, 2), "stride": (2, 1), "padding": (1, 1)}
        x = p("x", (1, 2, 7, 6))
        m = ops.max_pool2d(x, (3, 2), (2, 1), (1, 1))            # (1, 2, 4, 7)
        idx = g.apply("max_pool2d_argmax", (x, m), **attrs)
        if kind == "max_scatter-padded":
            y = g.apply("max_pool2d_scatter", (p("ct", (1, 2, 4, 7)), idx), in_shape=(2, 7, 6), **attrs)
        elif kind == "max_gather-padded":
            y = g.apply("max_pool2d_gather", (p("u", (1, 2, 7, 6)), idx), **attrs)
        else:
            y = g.apply("avg_pool2d_scatter", (p("ct", (1, 2, 4, 7)),), in_shape=(2, 7, 6), **attrs)
    r = g.input("r", y.shape)
    g.output("y", y)
    g.loss(ops.sum(ops.sin(y) * r))
    return g


BACKWARD_OPS = ["grad_input-groups-dil", "grad_weight-groups-dil", "grad_weight-groups-k>=32", "conv_transpose2d",
                "max_scatter-padded", "max_gather-padded", "avg_scatter-padded"]


@pytest.mark.parametrize("kind", BACKWARD_OPS)
def test_backward_ops_are_differentiable(kind):
    gradcheck(_backward_op_graph(kind), domains={"x": "distinct"})


def test_grouped_backward_ops_equal_torch():
    """conv2d_grad_input / _grad_weight with groups and dilation are torch's conv2d_input /
    conv2d_weight (the gradients of conv2d)."""
    rng = np.random.default_rng(2)
    ct, w, x = rng.standard_normal((2, 6, 4, 5)), rng.standard_normal((6, 2, 3, 2)), rng.standard_normal((2, 4, 9, 8))
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 3), groups=2)
    gi = backcomp.build(_backward_op_graph("grad_input-groups-dil"))
    gw = backcomp.build(_backward_op_graph("grad_weight-groups-dil"))
    r = rng.standard_normal((2, 4, 9, 8))
    got_i = gi.forward({"ct": ct, "w": w}, {"r": r})["y"]
    got_w = gw.forward({"x": x, "ct": ct}, {"r": rng.standard_normal((6, 2, 3, 2))})["y"]
    want_i = torch.nn.grad.conv2d_input(x.shape, torch.tensor(w), torch.tensor(ct), **kw).numpy()
    want_w = torch.nn.grad.conv2d_weight(torch.tensor(x), w.shape, torch.tensor(ct), **kw).numpy()
    np.testing.assert_allclose(got_i, want_i, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-10, atol=1e-12)


# ----- float32 and a symbolic batch --------------------------------------------------------------
F32 = ["conv2d-all", "conv2d-depthwise", "conv1d-groups", "convt-s2-p1-op1", "convt-op>=s-d3-groups", "max_pool2d-k2-s2-p1",
       "avg_pool2d-pairs", "max_pool1d-k3-s2-p1", "avg_pool1d-k2-s1-p1"]


@pytest.mark.parametrize("case", F32)
def test_float32_stays_float32(case):
    m = backcomp.build(case_graph(case, "f32"))
    rng = np.random.default_rng(3)
    params = {k: v.astype(np.float32) for k, v in _draw(case, rng).items()}
    r = rng.standard_normal(m.INPUTS["r"]).astype(np.float32)
    y = m.forward(params, {"r": r})["y"]
    loss, grads = m.value_and_grad(params, {"r": r})
    assert y.dtype == np.float32 and loss.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    _, grads64 = m.value_and_grad({k: v.astype(np.float64) for k, v in params.items()}, {"r": r.astype(np.float64)})
    for k in grads:
        np.testing.assert_allclose(grads[k], grads64[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_float32_backward_names_no_float64():
    src = backcomp.compile_source(case_graph("conv2d-all", "src32"))
    assert "float64" not in src


@pytest.mark.parametrize("case", ["conv2d-all", "conv1d-s2-p1-d2", "convt-pairs", "convt-op>=s-pairs",
                                  "max_pool2d-k2-s2-p1", "avg_pool1d-k3-s2-p1"])
def test_symbolic_batch(case):
    """x is an input (B, ...) plus a param b, so b's gradient flows through the input gradient
    of the op at every batch size; values and gradients equal torch's at two sizes."""
    shapes, ours, theirs = CASES[case]
    g = Graph("sym")
    x = g.input("x", ("B",) + shapes["x"][1:])
    b = g.param("b", shapes["x"][1:], init="normal(1.0)")
    others = {k: g.param(k, s, init="normal(1.0)") for k, s in shapes.items() if k != "x"}
    y = g.output("y", ours(x + b, *others.values()))
    g.loss(ops.sum(ops.tanh(y) * ops.tanh(y)))
    m = gradcheck(g, batch=3, domains={"x": "distinct", "b": "distinct"} if case in POOLS else None)
    rng = np.random.default_rng(4)
    params = {k: rng.standard_normal(s) for k, s in m.PARAMS.items()}
    for batch in (1, 5):
        xs = rng.standard_normal((batch,) + shapes["x"][1:])
        t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        ty = theirs(torch.tensor(xs) + t["b"], *(t[k] for k in others))
        (torch.tanh(ty) ** 2).sum().backward()
        loss, grads = m.value_and_grad(params, {"x": xs})
        np.testing.assert_allclose(loss, (torch.tanh(ty) ** 2).sum().item(), rtol=1e-10)
        for k in params:
            np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ----- generated code ---------------------------------------------------------------------------
def test_generated_code_has_no_loops_and_one_gemm_per_direction():
    g = Graph("code")
    x = g.input("x", ("B", 4, 9, 9))
    w = g.param("w", (4, 1, 3, 3))
    v = g.param("v", (4, 2, 3, 3))
    h = ops.conv2d(x, w, padding=2, dilation=2, groups=4)
    t = ops.conv_transpose2d(ops.max_pool2d(h, 3, 2, padding=1), v, stride=2, padding=1, output_padding=1)
    g.loss(ops.sum(ops.avg_pool2d(t, 2, padding=1) ** 2))
    src = backcomp.compile_source(g)
    assert not re.search(r"^\s+(for|while)\s", src.split("def forward")[1], re.M)
    # one contraction per direction: the depthwise conv and its w̄ (einsums over the groups:
    # GEMVs), the transposed conv, its input gradient (a conv2d) and v̄ (GEMMs)
    body = src.split("def value_and_grad")[1]
    assert (body.count(" @ "), body.count("np.einsum(")) == (3, 2)
    assert 'np.einsum("gk,ngkp->ngp", w.reshape(4, 9), ' in body
    assert "_cols[:, :, 2, 2, 0:7, 0:7] = x[:, :, 2:9, 2:9]" in src         # a dilated window offset
    assert "-np.inf" not in src                                             # k=3, p=1: a full offset exists


# ----- shape errors -----------------------------------------------------------------------------
def _error(build) -> str:
    g = Graph("bad")
    with pytest.raises(ShapeError) as info:
        build(g)
    return str(info.value)


@pytest.mark.parametrize("build, words", [
    (lambda g: ops.conv2d(g.input("x", (1, 4, 6, 6)), g.param("w", (3, 2, 3, 3)), groups=3),
     ["groups=3 does not divide the 4 input channels", "(1, 4, 6, 6)"]),
    (lambda g: ops.conv2d(g.input("x", (1, 4, 6, 6)), g.param("w", (3, 2, 3, 3)), groups=2),
     ["groups=2 does not divide the 3 output channels", "(3, 2, 3, 3)"]),
    (lambda g: ops.conv2d(g.input("x", (1, 4, 6, 6)), g.param("w", (4, 1, 3, 3)), groups=2),
     ["4 channels in 2 groups of 2", "expects 1 per group"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 6, 6)), g.param("w", (1, 1, 3, 3)), dilation=3),
     ["kernel 3x3 (dilated to 7x7)", "larger than the padded input 6x6"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 6, 6)), g.param("w", (1, 1, 3, 3)), dilation=0),
     ["dilation", "positive"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 6, 6)), g.param("w", (1, 1, 3, 3)), groups=0), ["groups", "positive"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 6, 6)), g.param("w", (1, 1, 3, 3)), groups=(1, 1)),
     ["groups", "integer"]),
    (lambda g: ops.conv1d(g.input("x", (1, 2, 6)), g.param("w", (3, 2, 4)), dilation=2),
     ["conv1d: kernel 4 (dilated to 7)", "padded input 6", "(1, 2, 6)"]),
    (lambda g: ops.conv1d(g.input("x", (1, 2, 6, 1)), g.param("w", (3, 2, 4))), ["3-D (N, C, L)"]),
    (lambda g: ops.conv1d(g.input("x", (1, 2, 6)), g.param("w", (3, 2, 4, 1))), ["weight", "3-D"]),
    (lambda g: ops.conv1d(g.input("x", (1, 2, 6)), g.param("w", (3, 1, 4)), groups=4),
     ["groups=4 does not divide the 2 input channels"]),
    (lambda g: ops.conv1d(g.input("x", (1, 2, 6)), g.param("w", (3, 2, 4)), stride=(1, 2)), ["stride", "integer"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 4, 4)), g.param("w", (2, 3, 3, 3)), stride=2,
                                    output_padding=2), ["output_padding (2, 2) must be smaller than the stride (2, 2)"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 4, 4)), g.param("w", (2, 3, 3, 3)), output_padding=(0, 1)),
     ["output_padding (0, 1) must be smaller than the stride (1, 1) or the dilation (1, 1) in each dim"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 4, 4)), g.param("w", (2, 3, 3, 3)), dilation=2,
                                    output_padding=2), ["output_padding (2, 2) must be smaller than the stride (1, 1) "
                                                        "or the dilation (2, 2) in each dim"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 4, 4)), g.param("w", (2, 3, 3, 3)), stride=3, dilation=2,
                                    output_padding=3), ["output_padding (3, 3) must be smaller than the stride (3, 3) "
                                                        "or the dilation (2, 2) in each dim"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 4, 4)), g.param("w", (2, 3, 3, 3)), stride=(1, 2),
                                    dilation=(3, 1), output_padding=(2, 2)),
     ["output_padding (2, 2) must be smaller than the stride (1, 2) or the dilation (3, 1) in each dim"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 1, 4)), g.param("w", (2, 3, 3, 3)), padding=2),
     ["output size -1x2 is not positive"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 2, 4, 4)), g.param("w", (3, 3, 3, 3))),
     ["2 channels", "expects 3", "I, O/groups, kh, kw"]),
    (lambda g: ops.conv_transpose2d(g.input("x", (1, 3, 4, 4)), g.param("w", (3, 3, 3, 3)), groups=2),
     ["groups=2 does not divide the 3 input channels"]),
    (lambda g: ops.max_pool2d(g.input("x", (1, 1, 6, 6)), 3, padding=2), ["padding 2x2 must be at most half the window 3x3"]),
    (lambda g: ops.avg_pool2d(g.input("x", (1, 1, 6, 6)), (2, 4), padding=(1, 3)), ["at most half the window 2x4"]),
    (lambda g: ops.max_pool2d(g.input("x", (1, 1, 2, 2)), 5, padding=1), ["window 5x5 is larger than the padded input 4x4"]),
    (lambda g: ops.max_pool1d(g.input("x", (1, 1, 3)), 6, padding=1), ["max_pool1d: window 6", "padded input 5"]),
    (lambda g: ops.avg_pool1d(g.input("x", (1, 1, 3)), 3, padding=2), ["avg_pool1d: padding 2", "half the window 3"]),
    (lambda g: ops.avg_pool1d(g.input("x", (1, 1, 3, 3)), 2), ["3-D"]),
], ids=["groups-in", "groups-out", "groups-per-group", "dilated>input", "dilation0", "groups0", "groups-pair",
        "conv1d-dilated>input", "conv1d-x-rank", "conv1d-w-rank", "conv1d-groups", "conv1d-stride-pair",
        "convt-op>=stride", "convt-op-pair", "convt-op>=dilation", "convt-op>=stride>dilation",
        "convt-op>=max-per-axis", "convt-size<=0", "convt-channels", "convt-groups",
        "pool-pad>half", "pool-pad>half-pair", "pool>padded", "pool1d>padded", "pool1d-pad>half", "pool1d-rank"])
def test_shape_errors(build, words):
    msg = _error(build)
    for word in words:
        assert word in msg, msg


# ----- spec files: located errors -----------------------------------------------------------------
SPEC = '''[model]
loss = "loss"
[inputs]
x = ["B", 4, 6, 6]
s = ["B", 4, 12]
[params]
w = [6, 2, 3, 3]
v = [4, 3, 3]
[graph]
h = "{expr}"
loss = "sum(h)"
'''


@pytest.mark.parametrize("expr, col, message", [
    ("conv2d(x, w, groups=3)", 6, "conv2d: groups=3 does not divide the 4 input channels of (B, 4, 6, 6)"),
    ("conv2d(x, w, groups=0)", 26, "argument 'groups' of conv2d() must be positive, got 0"),
    ("conv2d(x, w, dilation=(1, 0))", 32, "the w value of argument 'dilation' of conv2d() must be positive, got 0"),
    ("conv2d(x, w, groups=2, dilation=3)", 6, "conv2d: kernel 3x3 (dilated to 7x7) of weight (6, 2, 3, 3) is larger "
                                              "than the padded input 6x6 (input (B, 4, 6, 6), padding (0, 0))"),
    ("conv1d(s, v, dilation=(1, 2))", 28, "argument 'dilation' of conv1d() must be an integer, got '(1, 2)'"),
    ("conv1d(s, v, groups=2)", 6, "conv1d: input (B, 4, 12) has 4 channels in 2 groups of 2 but weight (4, 3, 3) "
                                  "expects 3 per group (weights are O, C/groups, k)"),
    ("conv_transpose2d(x, w)", 6, "conv_transpose2d: input (B, 4, 6, 6) has 4 channels but weight (6, 2, 3, 3) "
                                  "expects 6 (weights are I, O/groups, kh, kw)"),
    ("conv_transpose2d(x, w[:4], stride=2, output_padding=2)", 6,
     "conv_transpose2d: output_padding (2, 2) must be smaller than the stride (2, 2) or the dilation (1, 1) in each "
     "dim (as PyTorch)"),
    ("conv_transpose2d(x, w[:4], output_padding=(1, 0), dilation=(1, 2))", 6,
     "conv_transpose2d: output_padding (1, 0) must be smaller than the stride (1, 1) or the dilation (1, 2) in each "
     "dim (as PyTorch)"),
    ("conv_transpose2d(x, w[:4], padding=4)", 6, "conv_transpose2d: output size 0x0 is not positive"),
    ("max_pool2d(x, 2, padding=2)", 6, "max_pool2d: padding 2x2 must be at most half the window 2x2 (as PyTorch)"),
    ("avg_pool1d(s, 3, padding=-1)", 31, "argument 'padding' of avg_pool1d() must be non-negative, got -1"),
    ("max_pool1d(s, 13)", 6, "max_pool1d: window 13 is larger than the input 12 (shape (B, 4, 12))"),
])
def test_spec_errors_are_located(expr, col, message, tmp_path):
    path = tmp_path / "convs.toml"
    path.write_text(SPEC.format(expr=expr))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert text.startswith(f"{path}:10:{col}: error: "), text
    assert message in text and text.endswith("in node 'h'"), text


def test_spec_cli_error_is_one_located_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.format(expr="conv2d(x, w, groups=3)"))
    r = subprocess.run([sys.executable, "-m", "backcomp", "compile", str(path), "-o", str(tmp_path / "o.py")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.fullmatch(rf"{re.escape(str(path))}:10:6: error: conv2d: groups=3 does not divide .*\n", r.stderr)


def test_spec_options_by_keyword_and_position():
    text = SPEC.format(expr="conv2d(x, w, 1, 1, 2, 2)").replace('loss = "sum(h)"', '''t = "conv_transpose2d(h, w[:, :1], 2, 1, 1)"
p = "max_pool2d(t, 3, 2, 1) + avg_pool2d(t, 3, padding=1, stride=2)"
q = "max_pool1d(s, 3, 2, padding=1) + avg_pool1d(s, 3, 1, 1)[:, :, ::2]"
c = "conv1d(q, v[:, :2], padding=2, dilation=2, groups=2)"
loss = "sum(p ** 2) + sum(c ** 2)"''')
    g = parse_spec(text, "opts.toml")
    assert g.lookup("h").attrs == {"stride": (1, 1), "padding": (1, 1), "dilation": (2, 2), "groups": 2}
    assert g.lookup("h").shape == ("B", 6, 4, 4)
    assert g.lookup("t").shape == ("B", 1, 8, 8) and g.lookup("t").attrs["output_padding"] == (1, 1)
    assert g.lookup("p").shape == ("B", 1, 4, 4) and g.lookup("q").shape == ("B", 4, 6)
    assert g.lookup("c").shape == ("B", 4, 6)
    gradcheck(g, batch=2, domains={"s": "distinct"})


# ----- the registry and the docs ---------------------------------------------------------------------
def test_default_options_are_not_stored():
    """Same conv, same attrs, whichever way it was written: CSE and explain see one form."""
    g = Graph("attrs")
    x, w = g.input("x", (1, 2, 5, 5)), g.param("w", (2, 2, 3, 3))
    a = ops.conv2d(x, w, 1, 0, 1, 1)
    b = ops.conv2d(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    assert a.attrs == b.attrs == {"stride": (1, 1), "padding": (0, 0)}
    assert ops.max_pool2d(x, 2, padding=0).attrs == {"size": (2, 2), "stride": (2, 2)}
    assert ops.conv_transpose2d(x, w, output_padding=0).attrs == {"stride": (1, 1), "padding": (0, 0)}


def test_explain_shows_the_options():
    g = Graph("explained")
    x = g.input("x", ("B", 4, 9))
    w = g.param("w", (4, 1, 3))
    v = g.param("v", (4, 2, 2, 2))
    h = ops.conv1d(x, w, padding=2, dilation=2, groups=4)
    t = ops.conv_transpose2d(ops.reshape(h, (-1, 4, 3, 3)), v, stride=2, output_padding=1)
    g.loss(ops.sum(ops.avg_pool2d(t, 2, padding=1)))
    from backcomp.explain import explain
    text = explain(g)
    assert "dilation=(1, 2)" in text and "groups=4" in text
    assert "conv_transpose2d(" in text and "output_padding=(1, 1)" in text
    assert "avg_pool2d_scatter(" in text and "padding=(1, 1)" in text


# ----- the conv1d example -----------------------------------------------------------------------------
def waveforms(n: int, rng, length: int = 64):
    """Noisy sine, square and sawtooth waves of random frequency and phase: labels 0, 1, 2."""
    labels = rng.integers(0, 3, n)
    t = np.arange(length) / length
    freq, phase = rng.uniform(2, 6, (n, 1)), rng.uniform(0, 1, (n, 1))
    u = (freq * t + phase) % 1.0
    waves = np.stack([np.sin(2 * np.pi * u), np.where(u < 0.5, 1.0, -1.0), 2 * u - 1])
    x = waves[labels, np.arange(n)] + 0.3 * rng.standard_normal((n, length))
    return x[:, None, :], labels


def test_conv1d_example_passes_backcomp_check():
    r = subprocess.run([sys.executable, "-m", "backcomp", "check", "examples/conv1d_classifier.toml"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gradients match finite differences" in r.stdout


def test_conv1d_example_learns_the_waveforms():
    m = backcomp.build(ROOT / "examples" / "conv1d_classifier.toml")
    rng = np.random.default_rng(0)
    x, labels = waveforms(600, rng)
    xt, lt = waveforms(300, rng)
    params = m.init_params(seed=0)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    first = None
    for epoch in range(60):
        for idx in np.array_split(rng.permutation(len(x)), 10):
            loss, grads = m.value_and_grad(params, {"x": x[idx].astype(np.float32), "labels": labels[idx]})
            first = loss if first is None else first
            for k in params:
                velocity[k] = 0.9 * velocity[k] - 0.05 * grads[k]
                params[k] += velocity[k]
    logits = m.forward(params, {"x": xt.astype(np.float32), "labels": lt})["logits"]
    assert loss < 0.3 * first
    assert np.mean(np.argmax(logits, axis=1) == lt) >= 0.9


# ----- forward mode: conv_transpose2d's JVP (product rule over x and w) -------------------------
def _transpose_jvp_graph():
    g = backcomp.Graph("conv_transpose_jvp")
    X = g.param("X", (2, 3, 4, 4))
    W = g.param("W", (3, 2, 3, 3))
    y = ops.conv_transpose2d(ops.sin(X), ops.cos(W), stride=2, padding=1, output_padding=1)
    u = g.input("u", y.shape)
    g.loss(ops.sum(y * u))
    return g


#: graphs of the form sum(op(...) * u) whose op has a JVP rule (test_jvp checks each is reached)
JVP_GRAPHS = {"conv_transpose2d": _transpose_jvp_graph}


def test_jvp_of_conv_transpose2d():
    from test_jvp import check_jvp
    check_jvp(_transpose_jvp_graph(), {})


@pytest.mark.parametrize("case", ["convt-op>=s-d3-groups", "convt-op>=s-pairs", "convt-op>=s-1x1"])
def test_jvp_of_conv_transpose2d_past_the_stride(case):
    """output_padding >= stride: the tangent equals finite differences and ⟨u, J t⟩ = ⟨Jᵀ u, t⟩."""
    from test_jvp import check_jvp
    shapes, ours, _ = CASES[case]
    g = backcomp.Graph("conv_transpose_jvp_past_stride")
    y = ours(ops.sin(g.param("X", shapes["x"])), ops.cos(g.param("W", shapes["w"])))
    g.loss(ops.sum(y * g.input("u", y.shape)))
    check_jvp(g, {})
