"""conv2d, max_pool2d, avg_pool2d: forward against naive loops (and PyTorch when it is
importable), gradients against central differences in float64, the internal backward
ops (and their own VJPs), dtype preservation, shape errors, a small CNN."""
from __future__ import annotations

import re

import numpy as np
import pytest

import backcomp
from backcomp import Graph, ShapeError, ops
from backcomp.ops.conv import conv2d_grad_input, conv2d_grad_weight
from conftest import gradcheck


# ----- naive references: one Python loop per output pixel ----------------------------
def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d_loops(x, w, stride=1, padding=0):
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=x.dtype)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, o, ho, wo), dtype=x.dtype)
    for b in range(n):
        for k in range(o):
            for i in range(ho):
                for j in range(wo):
                    out[b, k, i, j] = np.sum(xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw] * w[k])
    return out


def pool_loops(x, size, stride=None, reduce=np.max):
    (kh, kw) = pair(size)
    (sh, sw) = pair(stride if stride is not None else size)
    n, c, h, wd = x.shape
    ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
    out = np.zeros((n, c, ho, wo), dtype=x.dtype)
    for b in range(n):
        for k in range(c):
            for i in range(ho):
                for j in range(wo):
                    out[b, k, i, j] = reduce(x[b, k, i * sh:i * sh + kh, j * sw:j * sw + kw])
    return out


def max_pool_grad_loops(x, ct, size, stride=None):
    """ḡ added at the first maximum of each window (PyTorch's tie rule)."""
    (kh, kw) = pair(size)
    (sh, sw) = pair(stride if stride is not None else size)
    gx = np.zeros_like(x)
    n, c, ho, wo = ct.shape
    for b in range(n):
        for k in range(c):
            for i in range(ho):
                for j in range(wo):
                    win = x[b, k, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    a, e = np.unravel_index(np.argmax(win), win.shape)
                    gx[b, k, i * sh + a, j * sw + e] += ct[b, k, i, j]
    return gx


# ----- configurations -----------------------------------------------------------------
# (x shape, w shape, stride, padding): strides 1 and 2, padding 0 and 1, non-square
# kernels, sizes where the stride does not divide (H + 2p - kh), tuple arguments.
CONV = [
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 0),
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1),
    ((2, 2, 7, 6), (3, 2, 3, 2), 2, 0),     # (7-3)%2 = 0, (6-2)%2 = 0
    ((2, 2, 8, 7), (3, 2, 3, 2), 2, 1),     # (8+2-3)%2 = 1, (7+2-2)%2 = 1: a row and a col dropped
    ((1, 3, 6, 9), (2, 3, 2, 4), (2, 3), (1, 0)),
    ((2, 1, 5, 4), (2, 1, 1, 1), 2, 0),     # 1x1 kernel with stride: dropped rows
    ((2, 2, 4, 5), (3, 2, 4, 5), 1, 0),     # kernel as large as the input: a 1x1 output
    ((1, 2, 3, 3), (2, 2, 3, 3), 3, 2),     # padding makes windows of zeros only
    ((1, 2, 9, 8), (2, 2, 5, 5), 2, 2),     # a 5x5 kernel: 25 window offsets
    ((2, 3, 6, 7), (4, 3, 3, 2), (1, 2), (2, 1)),   # non-square kernel, stride and padding pairs
]
CONV_IDS = [f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s}-p{p}" for x, w, s, p in CONV]

# (x shape, size, stride): stride == size, stride < size (overlapping), odd sizes
POOL = [
    ((2, 3, 4, 4), 2, None),
    ((2, 2, 7, 5), 2, None),                # odd: the last row and column are dropped
    ((2, 2, 5, 5), 2, 1),                   # overlapping windows
    ((1, 2, 7, 7), 3, 2),                   # overlapping, stride 2
    ((2, 1, 6, 7), (2, 3), (1, 2)),         # non-square window and stride
    ((1, 2, 5, 4), (3, 1), None),
    ((1, 2, 3, 4), 1, 2),                   # 1x1 windows: a strided subsample
    ((2, 3, 6, 4), (3, 2), None),           # non-square windows tiling the input exactly
    ((1, 2, 12, 13), 12, None),             # 144 window offsets: wider than int8 indices
]
POOL_IDS = [f"x{'x'.join(map(str, x))}-k{k}-s{s}" for x, k, s in POOL]


def conv_out_shape(x, w, stride, padding):
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    return (x[0], w[0], (x[2] + 2 * ph - w[2]) // sh + 1, (x[3] + 2 * pw - w[3]) // sw + 1)


def pool_out_shape(x, size, stride):
    (kh, kw) = pair(size)
    (sh, sw) = pair(stride if stride is not None else size)
    return (x[0], x[1], (x[2] - kh) // sh + 1, (x[3] - kw) // sw + 1)


def conv_graph(xs, ws, stride, padding, name="conv", x_is_param=True):
    """loss = Σ tanh(conv2d(x, w)) · r: a cotangent that differs per output entry."""
    g = Graph(name)
    x = g.param("x", xs, init="normal(1.0)") if x_is_param else g.input("x", xs)
    w = g.param("w", ws)
    r = g.input("r", conv_out_shape(xs, ws, stride, padding))
    y = g.output("y", ops.conv2d(x, w, stride=stride, padding=padding))
    g.loss(ops.sum(ops.tanh(y) * r))
    return g


def pool_graph(kind, xs, size, stride, name="pool"):
    g = Graph(name)
    x = g.param("x", xs, init="normal(1.0)")
    r = g.input("r", pool_out_shape(xs, size, stride))
    y = g.output("y", getattr(ops, kind)(x, size, stride))
    g.loss(ops.sum(y * r))
    return g


# ----- forward values against the loops ------------------------------------------------
@pytest.mark.parametrize("xs, ws, stride, padding", CONV, ids=CONV_IDS)
def test_conv2d_forward_matches_loops(xs, ws, stride, padding):
    m = backcomp.build(conv_graph(xs, ws, stride, padding))
    rng = np.random.default_rng(0)
    params = {"x": rng.standard_normal(xs), "w": rng.standard_normal(ws)}
    r = rng.standard_normal(conv_out_shape(xs, ws, stride, padding))
    y = m.forward(params, {"r": r})["y"]
    np.testing.assert_allclose(y, conv2d_loops(params["x"], params["w"], stride, padding), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, reduce", [("max_pool2d", np.max), ("avg_pool2d", np.mean)])
@pytest.mark.parametrize("xs, size, stride", POOL, ids=POOL_IDS)
def test_pool_forward_matches_loops(kind, reduce, xs, size, stride):
    m = backcomp.build(pool_graph(kind, xs, size, stride))
    rng = np.random.default_rng(1)
    x = rng.standard_normal(xs)
    y = m.forward({"x": x}, {"r": rng.standard_normal(pool_out_shape(xs, size, stride))})["y"]
    np.testing.assert_allclose(y, pool_loops(x, size, stride, reduce), rtol=1e-12, atol=1e-12)


# ----- gradients against central differences (float64, rel. error <= 1e-6) ------------
@pytest.mark.parametrize("xs, ws, stride, padding", CONV, ids=CONV_IDS)
def test_conv2d_gradients(xs, ws, stride, padding):
    def reference(p, i):
        return np.sum(np.tanh(conv2d_loops(p["x"], p["w"], stride, padding)) * i["r"])
    gradcheck(conv_graph(xs, ws, stride, padding), reference=reference)


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1)])
def test_conv2d_gradients_at_O0(stride, padding):
    gradcheck(conv_graph((2, 2, 6, 5), (3, 2, 3, 2), stride, padding), opt_level=0)


@pytest.mark.parametrize("kind", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("xs, size, stride", POOL, ids=POOL_IDS)
def test_pool_gradients(kind, xs, size, stride):
    reduce = np.max if kind == "max_pool2d" else np.mean

    def reference(p, i):
        return np.sum(pool_loops(p["x"], size, stride, reduce) * i["r"])
    # distinct values: no ties (max pool is not differentiable there)
    gradcheck(pool_graph(kind, xs, size, stride), domains={"x": "distinct"}, reference=reference)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (2, 1)])
def test_symbolic_batch(stride, padding):
    """N is symbolic: x is an input; a param added to it gets its gradient through
    conv2d_grad_input, whose zero buffer takes N from the cotangent at run time."""
    g = Graph("symbolic")
    x = g.input("x", ("B", 2, 7, 6))
    b = g.param("b", (2, 7, 6), init="normal(1.0)")
    w = g.param("w", (3, 2, 3, 2))
    h = ops.conv2d(x + b, w, stride=stride, padding=padding)
    p = ops.max_pool2d(ops.tanh(h), 2, 1)
    q = ops.avg_pool2d(h, (2, 1))
    g.loss(ops.sum(p * p) + ops.sum(q * q))
    m = gradcheck(g, batch=3)
    for batch in (1, 5):   # the same module at other batch sizes
        loss, grads = m.value_and_grad(m.init_params(dtype=np.float64),
                                       {"x": np.ones((batch, 2, 7, 6))})
        assert grads["b"].shape == (2, 7, 6) and np.isfinite(loss)


# ----- max pool ties: the first maximum of a window gets the gradient --------------------
@pytest.mark.parametrize("xs, size, stride", POOL, ids=POOL_IDS)
def test_max_pool_ties_go_to_the_first_maximum(xs, size, stride):
    g = pool_graph("max_pool2d", xs, size, stride, name="ties")
    m = backcomp.build(g)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2, xs).astype(np.float64)     # many ties, including whole windows
    r = rng.standard_normal(pool_out_shape(xs, size, stride))
    _, grads = m.value_and_grad({"x": x}, {"r": r})
    np.testing.assert_allclose(grads["x"], max_pool_grad_loops(x, r, size, stride), rtol=1e-14, atol=1e-14)


# ----- the internal backward ops: adjoint identities, float32, their own VJPs -------------
def _helper_graph(kind, dtype_name="h"):
    """A graph whose forward *is* a backward op, with every operand a param."""
    g = Graph(f"helper_{kind}_{dtype_name}")
    if kind == "grad_input":        # x: (2, 2, 7, 6), w: (3, 2, 3, 2), stride 2, padding 1
        ct = g.param("ct", (2, 3, 4, 4), init="normal(1.0)")
        w = g.param("w", (3, 2, 3, 2), init="normal(1.0)")
        y = conv2d_grad_input(ct, w, (7, 6), (2, 2), (1, 1))
    elif kind == "grad_weight":
        x = g.param("x", (2, 2, 7, 6), init="normal(1.0)")
        ct = g.param("ct", (2, 3, 4, 4), init="normal(1.0)")
        y = conv2d_grad_weight(x, ct, (3, 2), (2, 2), (1, 1))
    elif kind == "max_scatter":     # the backward of max_pool2d(x, 3, 2) on (1, 2, 7, 7)
        x = g.param("x", (1, 2, 7, 7), init="normal(1.0)")
        ct = g.param("ct", (1, 2, 3, 3), init="normal(1.0)")
        idx = g.apply("max_pool2d_argmax", (x, ops.max_pool2d(x, 3, 2)), size=(3, 3), stride=(2, 2))
        y = g.apply("max_pool2d_scatter", (ct, idx), in_shape=(2, 7, 7), size=(3, 3), stride=(2, 2))
    elif kind == "max_gather":
        x = g.param("x", (1, 2, 7, 7), init="normal(1.0)")
        u = g.param("u", (1, 2, 7, 7), init="normal(1.0)")
        idx = g.apply("max_pool2d_argmax", (x, ops.max_pool2d(x, 3, 2)), size=(3, 3), stride=(2, 2))
        y = g.apply("max_pool2d_gather", (u, idx), size=(3, 3), stride=(2, 2))
    else:                           # avg_scatter
        ct = g.param("ct", (1, 2, 3, 3), init="normal(1.0)")
        y = g.apply("avg_pool2d_scatter", (ct,), in_shape=(2, 7, 7), size=(3, 3), stride=(2, 2))
    r = g.input("r", y.shape)
    g.output("y", y)
    g.loss(ops.sum(ops.sin(y) * r))
    return g


HELPERS = ["grad_input", "grad_weight", "max_scatter", "max_gather", "avg_scatter"]


@pytest.mark.parametrize("kind", HELPERS)
def test_backward_ops_are_differentiable(kind):
    """Second order: the VJPs of the backward ops (built from conv2d and each other)."""
    domains = {"x": "distinct"}   # the argmax must not flip under a finite difference
    gradcheck(_helper_graph(kind), domains=domains)


def test_conv_backward_ops_are_adjoints():
    """⟨grad_input(ḡ, w), u⟩ = ⟨ḡ, conv2d(u, w)⟩ and ⟨grad_weight(x, ḡ), v⟩ = ⟨ḡ, conv2d(x, v)⟩."""
    rng = np.random.default_rng(3)
    gi, gw = backcomp.build(_helper_graph("grad_input")), backcomp.build(_helper_graph("grad_weight"))
    ct, w, x = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((3, 2, 3, 2)), rng.standard_normal((2, 2, 7, 6))
    u, v = rng.standard_normal((2, 2, 7, 6)), rng.standard_normal((3, 2, 3, 2))
    xbar = gi.forward({"ct": ct, "w": w}, {"r": u})["y"]
    wbar = gw.forward({"x": x, "ct": ct}, {"r": v})["y"]
    np.testing.assert_allclose(np.sum(xbar * u), np.sum(ct * conv2d_loops(u, w, 2, 1)), rtol=1e-12)
    np.testing.assert_allclose(np.sum(wbar * v), np.sum(ct * conv2d_loops(x, v, 2, 1)), rtol=1e-12)


@pytest.mark.parametrize("kind", HELPERS)
def test_backward_ops_keep_float32(kind):
    m = backcomp.build(_helper_graph(kind, "f32"))
    rng = np.random.default_rng(4)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in m.PARAMS.items()}
    inputs = {"r": rng.standard_normal(m.INPUTS["r"]).astype(np.float32)}
    assert m.forward(params, inputs)["y"].dtype == np.float32
    loss, grads = m.value_and_grad(params, inputs)
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())


def test_float32_is_preserved():
    """float32 in, float32 out: forward outputs, loss and grads of a conv + pool model."""
    g = Graph("f32")
    x = g.input("x", ("B", 2, 7, 6))
    w = g.param("w", (3, 2, 3, 2))
    h = g.output("h", ops.conv2d(x, w, stride=2, padding=1))
    p = g.output("p", ops.max_pool2d(h, 2, 1))
    a = g.output("a", ops.avg_pool2d(h, 2))
    g.loss(ops.sum(p) + ops.sum(a * a))
    m = backcomp.build(g)
    x32 = np.random.default_rng(5).standard_normal((4, 2, 7, 6)).astype(np.float32)
    params = m.init_params(dtype=np.float32)
    out = m.forward(params, {"x": x32})
    assert {k: v.dtype for k, v in out.items()} == {k: np.dtype(np.float32) for k in out}
    loss, grads = m.value_and_grad(params, {"x": x32})
    assert loss.dtype == np.float32 and grads["w"].dtype == np.float32
    # and the values agree with float64 to float32 precision
    loss64, grads64 = m.value_and_grad({k: v.astype(np.float64) for k, v in params.items()},
                                       {"x": x32.astype(np.float64)})
    np.testing.assert_allclose(grads["w"], grads64["w"], rtol=1e-4, atol=1e-4)


def test_backward_names_no_float64():
    """The backward allocates in its operands' dtype (np.zeros(..., dtype=ct.dtype))."""
    src = backcomp.compile_source(conv_graph((2, 2, 8, 7), (3, 2, 3, 2), 2, 1, name="src"))
    assert "float64" not in src.split("def value_and_grad")[1]
    assert "np.zeros(" in src and "dtype=" in src


# ----- the small CNN ----------------------------------------------------------------------
def cnn_graph(name="cnn"):
    g = Graph(name)
    x = g.input("x", ("B", 1, 8, 8))
    labels = g.input("labels", ("B",), dtype="int")
    w1 = g.param("w1", (4, 1, 3, 3))
    b1 = g.param("b1", (4, 1, 1), init="normal(0.1)")
    w2 = g.param("w2", (36, 10))
    b2 = g.param("b2", (10,))
    h = ops.relu(ops.conv2d(x, w1, padding=1) + b1)        # (B, 4, 8, 8)
    p = ops.max_pool2d(h, 3, 2)                            # (B, 4, 3, 3): overlapping windows
    logits = g.output("logits", ops.reshape(p, (-1, 36)) @ w2 + b2)
    g.loss(ops.mean(ops.softmax_cross_entropy(logits, labels)))
    return g


def test_small_cnn_gradients():
    m = gradcheck(cnn_graph(), batch=4, domains={"labels": 10})
    assert m.PARAMS["w1"] == (4, 1, 3, 3)


def test_small_cnn_trains_in_float32():
    m = backcomp.build(cnn_graph("cnn32"))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    params = m.init_params(seed=0, dtype=np.float32)
    first = None
    for _ in range(30):
        loss, grads = m.value_and_grad(params, {"x": x, "labels": labels})
        assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
        first = loss if first is None else first
        for k in params:
            params[k] -= 0.5 * grads[k]
    assert loss < 0.5 * first


# ----- generated code ---------------------------------------------------------------------
def test_generated_code_is_numpy_only_without_pixel_loops():
    src = backcomp.compile_source(cnn_graph("src_cnn"))
    imports = [line for line in src.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert imports == ["import numpy as np"]
    # windows are strided views: im2col copies one per window offset, pools reduce over them
    assert re.search(r"\w*_(cols|im2col)\[:, (:|\d), \d, (:|\d), \d+:\d+, \d+:\d+\] = \w+\[", src)
    body = src.split("def forward")[1]
    assert not re.search(r"^\s+(for|while)\s", body, re.M)


def test_spec_syntax(tmp_path):
    spec = tmp_path / "tiny_cnn.toml"
    spec.write_text('''
[model]
loss = "loss"
[inputs]
x = ["B", 1, 6, 6]
labels = { shape = ["B"], dtype = "int64" }
[params]
w = [2, 1, 3, 3]
v = [8, 3]
[graph]
h = "relu(conv2d(x, w, stride=1, padding=1))"
p = "avg_pool2d(max_pool2d(h, 2), 2, stride=1)"
loss = "mean(softmax_cross_entropy(reshape(p, (-1, 8)) @ v, labels))"
''')
    from backcomp.spec import load_spec
    m = gradcheck(load_spec(spec), domains={"labels": 3})
    assert m.INPUTS["x"] == ("B", 1, 6, 6)


# ----- shape errors -----------------------------------------------------------------------
def _error(build) -> str:
    g = Graph("bad")
    with pytest.raises(ShapeError) as info:
        build(g)
    return str(info.value)


def test_channel_mismatch_names_both_shapes():
    msg = _error(lambda g: ops.conv2d(g.input("x", ("B", 3, 8, 8)), g.param("w", (4, 2, 3, 3))))
    assert "(B, 3, 8, 8)" in msg and "(4, 2, 3, 3)" in msg and "channels" in msg


@pytest.mark.parametrize("build, words", [
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 5, 3))), ["larger", "4x4"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 7, 3)), padding=1), ["larger", "6x6"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 3, 3)), stride=0), ["stride", "positive"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 3, 3)), stride=(1, -2)), ["stride", "positive"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 3, 3)), padding=-1), ["padding", "non-negative"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 3, 3)), stride=1.5), ["stride", "integer"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 1, 3, 3)), padding=(1, 1, 1)), ["padding", "pair"]),
    (lambda g: ops.conv2d(g.input("x", (1, 4, 4)), g.param("w", (1, 1, 3, 3))), ["4-D", "(1, 4, 4)"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4)), g.param("w", (1, 3, 3))), ["weight", "4-D"]),
    (lambda g: ops.conv2d(g.input("x", ("B", 1, "H", 4)), g.param("w", (1, 1, 3, 3))), ["fixed", "(B, 1, H, 4)"]),
    (lambda g: ops.conv2d(g.input("x", (1, 1, 4, 4), dtype="int"), g.param("w", (1, 1, 3, 3))), ["float"]),
    (lambda g: ops.max_pool2d(g.input("x", (1, 1, 4, 4)), 5), ["larger", "4x4"]),
    (lambda g: ops.avg_pool2d(g.input("x", (1, 1, 4, 4)), (2, 5)), ["larger"]),
    (lambda g: ops.max_pool2d(g.input("x", (1, 1, 4, 4)), 2, 0), ["stride", "positive"]),
    (lambda g: ops.avg_pool2d(g.input("x", (1, 1, 4, 4)), 0), ["size", "positive"]),
    (lambda g: ops.max_pool2d(g.input("x", (4, 4)), 2), ["4-D"]),
], ids=["kernel>input", "kernel>padded", "stride0", "stride-neg", "padding-neg", "stride-float", "padding-triple",
        "x-rank3", "w-rank3", "symbolic-H", "int-input", "pool>input", "pool-nonsquare>input", "pool-stride0",
        "pool-size0", "pool-rank2"])
def test_shape_errors(build, words):
    msg = _error(build)
    for word in words:
        assert word in msg, msg


# ----- PyTorch -----------------------------------------------------------------------------
def _torch():
    import torch   # in the test extra: a missing torch fails, it does not skip
    return torch


@pytest.mark.parametrize("xs, ws, stride, padding", CONV, ids=CONV_IDS)
def test_conv2d_matches_torch(xs, ws, stride, padding):
    torch = _torch()
    m = backcomp.build(conv_graph(xs, ws, stride, padding))
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    r = rng.standard_normal(conv_out_shape(xs, ws, stride, padding))
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=padding)
    (torch.tanh(ty) * torch.tensor(r)).sum().backward()
    out = m.forward({"x": x, "w": w}, {"r": r})
    _, grads = m.value_and_grad({"x": x, "w": w}, {"r": r})
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["w"], tw.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("kind", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("xs, size, stride", POOL, ids=POOL_IDS)
def test_pool_matches_torch(kind, xs, size, stride, ties):
    torch = _torch()
    m = backcomp.build(pool_graph(kind, xs, size, stride))
    rng = np.random.default_rng(8)
    x = rng.integers(0, 2, xs).astype(np.float64) if ties else rng.standard_normal(xs)
    r = rng.standard_normal(pool_out_shape(xs, size, stride))
    tx = torch.tensor(x, requires_grad=True)
    ty = getattr(torch.nn.functional, kind)(tx, size, stride)
    (ty * torch.tensor(r)).sum().backward()
    out = m.forward({"x": x}, {"r": r})
    _, grads = m.value_and_grad({"x": x}, {"r": r})
    np.testing.assert_allclose(out["y"], ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["x"], tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_small_cnn_matches_torch():
    torch = _torch()
    F = torch.nn.functional
    m = backcomp.build(cnn_graph("cnn_torch"))
    params = {k: v.astype(np.float64) for k, v in m.init_params(seed=3).items()}
    params["b1"] = np.random.default_rng(9).standard_normal((4, 1, 1))
    rng = np.random.default_rng(10)
    x, labels = rng.standard_normal((5, 1, 8, 8)), rng.integers(0, 10, 5)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = F.relu(F.conv2d(torch.tensor(x), t["w1"], padding=1) + t["b1"])
    logits = F.max_pool2d(h, 3, 2).reshape(-1, 36) @ t["w2"] + t["b2"]
    loss = F.cross_entropy(logits, torch.tensor(labels))
    loss.backward()
    ours, grads = m.value_and_grad(params, {"x": x, "labels": labels})
    np.testing.assert_allclose(ours, loss.item(), rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ----- the columns a conv2d shares with its weight gradient ---------------------------------
def two_conv_graph(name="two_conv"):
    """The suite CNN's two layouts: 9 rows of columns (batch first) and 36 (channels first)."""
    g = Graph(name)
    x = g.input("x", ("B", 1, 8, 8))
    labels = g.input("labels", ("B",), dtype="int")
    k1, k2, v = g.param("k1", (4, 1, 3, 3)), g.param("k2", (5, 4, 3, 3)), g.param("v", (80, 3))
    h1 = ops.max_pool2d(ops.relu(ops.conv2d(x, k1, padding=1)), 2, 2)           # (B, 4, 4, 4)
    h2 = ops.max_pool2d(ops.relu(ops.conv2d(h1, k2, padding=1)), 2, 2)          # (B, 5, 2, 2)
    g.loss(ops.mean(ops.softmax_cross_entropy(ops.reshape(h2, (-1, 20)) @ v[:20], labels)))
    return g


def test_columns_are_built_once_per_step_and_match_torch():
    torch = _torch()
    m = backcomp.build(two_conv_graph())
    step = backcomp.compile_source(two_conv_graph()).split("def value_and_grad")[1].split("\ndef ")[0]
    fills = re.findall(r"^\s+(\w+) = np\.zeros\(", step, re.M)
    assert len([f for f in fills if "im2col" in f]) == 2, step                 # one im2col per conv,
    assert not [f for f in fills if f.endswith("_cols")], step                  # none rebuilt
    assert re.search(r"np\.zeros\(\(4, 3, 3, \w+\.shape\[0\], 4, 4\)", step)  # 36 rows: channels first
    assert m.BATCH_SEPARABLE, m.BATCH_REFUSAL
    rng = np.random.default_rng(3)
    params = {"k1": rng.standard_normal((4, 1, 3, 3)), "k2": rng.standard_normal((5, 4, 3, 3)),
              "v": rng.standard_normal((80, 3))}
    x, labels = rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 3, 6)
    loss, grads = m.value_and_grad(params, {"x": x, "labels": labels})
    t = {k: torch.tensor(a, requires_grad=True) for k, a in params.items()}
    F = torch.nn.functional
    h1 = F.max_pool2d(F.relu(F.conv2d(torch.tensor(x), t["k1"], padding=1)), 2, 2)
    h2 = F.max_pool2d(F.relu(F.conv2d(h1, t["k2"], padding=1)), 2, 2)
    tl = F.cross_entropy(h2.reshape(-1, 20) @ t["v"][:20], torch.tensor(labels))
    tl.backward()
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-10, atol=1e-12)
