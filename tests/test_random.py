"""Random ops and train mode (issue 10): dropout, normal, uniform drawing from ``rng=``.

The contract: the same generator state gives the same bytes; ``forward`` and
``value_and_grad`` given generators in the same state draw the same masks; dropout
zeroes a fraction p and keeps the mean in expectation (tested statistically);
``train=False`` is the exact identity; without ``rng`` a model that must draw raises
``ValueError``; the gradient of dropout is ḡ ⊙ mask, the same mask as the forward.
"""
from __future__ import annotations

import numpy as np
import pytest

import backcomp
from backcomp.spec import SpecError, parse_spec

from conftest import gradcheck

MODEL = '''[model]
name = "drop"
loss = "loss"
outputs = ["h", "z", "loss"]
[inputs]
x = ["B", 6]
[params]
W = [6, 5]
[graph]
h = "dropout(tanh(x @ W), p=0.3)"
z = "normal((B, 5)) * 0.5 + uniform((B, 5), low=-1, high=1)"
loss = "mean(h * h + z * h)"
'''


@pytest.fixture(scope="module")
def module():
    return backcomp.build(parse_spec(MODEL, "drop.toml"))


def _data(dtype=np.float64):
    rng = np.random.default_rng(0)
    return {"W": rng.normal(size=(6, 5)).astype(dtype)}, {"x": rng.normal(size=(40, 6)).astype(dtype)}


def test_the_same_seed_gives_the_same_bytes(module):
    params, inputs = _data()
    a = module.forward(params, inputs, rng=np.random.default_rng(7))
    b = module.forward(params, inputs, rng=np.random.default_rng(7))
    c = module.forward(params, inputs, rng=np.random.default_rng(8))
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()
    assert a["h"].tobytes() != c["h"].tobytes()
    gen = np.random.default_rng(7)
    first, second = module.forward(params, inputs, rng=gen), module.forward(params, inputs, rng=gen)
    assert first["h"].tobytes() != second["h"].tobytes()   # the generator advances: fresh masks per call


def test_forward_and_value_and_grad_draw_the_same_masks(module):
    params, inputs = _data()
    out = module.forward(params, inputs, rng=np.random.default_rng(3))
    loss, grads = module.value_and_grad(params, inputs, rng=np.random.default_rng(3))
    assert loss == out["loss"]
    # d/dW mean(h² + z h) with h = m ⊙ tanh(xW): ḡ_W = xᵀ((2h + z) ⊙ m ⊙ (1 − tanh²) / n)
    t = np.tanh(inputs["x"] @ params["W"])
    mask = np.divide(out["h"], t, out=np.zeros_like(t), where=t != 0)
    expected = inputs["x"].T @ ((2 * out["h"] + out["z"]) * mask * (1 - t ** 2) / out["h"].size)
    np.testing.assert_allclose(grads["W"], expected, rtol=1e-10, atol=1e-14)


def test_dropout_zeroes_a_fraction_p_and_keeps_the_mean():
    g = parse_spec('[model]\nname = "d"\nloss = "loss"\noutputs = ["h", "loss"]\n[inputs]\nx = ["B", 1000]\n'
                   '[params]\nb = [1000]\n[graph]\nh = "dropout(x + b, p=0.25)"\nloss = "sum(h)"\n', "d.toml")
    m = backcomp.build(g)
    x, b = np.ones((200, 1000)), np.zeros(1000)
    h = m.forward({"b": b}, {"x": x}, rng=np.random.default_rng(0))["h"]
    n = h.size
    zeros = np.mean(h == 0)
    assert abs(zeros - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)          # 5 sigma of a binomial fraction
    assert set(np.unique(h)) == {0.0, 1 / 0.75}
    assert abs(h.mean() - 1.0) < 5 * np.sqrt(0.25 / 0.75 / n)         # inverted dropout keeps the mean
    eval_out = m.forward({"b": b}, {"x": x * 3.7}, train=False)
    assert eval_out["h"].tobytes() == (x * 3.7).tobytes()             # train=False: exact identity, no rng


def test_rng_is_required_where_the_model_draws(module):
    params, inputs = _data()
    with pytest.raises(ValueError, match="pass rng=np.random.default_rng"):
        module.forward(params, inputs)
    with pytest.raises(ValueError, match="pass rng"):
        module.forward(params, inputs, train=False)                   # normal and uniform draw in eval too
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        module.value_and_grad(params, inputs, rng=3)
    dropout_only = backcomp.build(parse_spec(MODEL.replace('normal((B, 5)) * 0.5 + uniform((B, 5), low=-1, high=1)',
                                                           'x @ W'), "drop.toml"))
    with pytest.raises(ValueError, match="or train=False"):
        dropout_only.value_and_grad(params, inputs)
    loss, _ = dropout_only.value_and_grad(params, inputs, train=False)
    h = np.tanh(inputs["x"] @ params["W"])
    np.testing.assert_allclose(loss, np.mean(h * h + (inputs["x"] @ params["W"]) * h), rtol=1e-12)


def test_draws_keep_the_dtype_and_their_distribution(module):
    for dtype in (np.float32, np.float64):
        params, inputs = _data(dtype)
        out = module.forward(params, inputs, rng=np.random.default_rng(1))
        assert all(v.dtype == dtype for v in out.values())
    g = parse_spec('[model]\nname = "n"\nloss = "loss"\noutputs = ["a", "u", "loss"]\n[inputs]\nx = ["B", 3]\n'
                   '[params]\nb = [3]\n[graph]\na = "normal((B, 500), mean=2.0, std=3.0)"\n'
                   'u = "uniform((B, 500), low=-2, high=5)"\nloss = "sum(x * b)"\n', "n.toml")
    out = backcomp.build(g).forward({"b": np.zeros(3)}, {"x": np.zeros((400, 3))}, rng=np.random.default_rng(2))
    a, u = out["a"], out["u"]
    assert a.shape == u.shape == (400, 500)
    assert abs(a.mean() - 2.0) < 5 * 3.0 / np.sqrt(a.size) and abs(a.std() - 3.0) < 0.05
    assert u.min() >= -2 and u.max() < 5 and abs(u.mean() - 1.5) < 5 * 7 / np.sqrt(12 * u.size)


def test_gradients_with_fixed_draws_match_finite_differences():
    gradcheck(parse_spec(MODEL, "drop.toml"), batch=5)


def test_train_step_passes_rng():
    m = backcomp.build(parse_spec(MODEL, "drop.toml"), optimizer="sgd")
    params, inputs = _data()
    before = params["W"].copy()
    loss = m.train_step(params, inputs, m.init_state(params), lr=0.1, rng=np.random.default_rng(0))
    _, grads = m.value_and_grad({"W": before}, inputs, rng=np.random.default_rng(0))
    np.testing.assert_allclose(params["W"], before - 0.1 * grads["W"], rtol=1e-12)
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match="pass rng"):
        m.train_step(params, inputs, m.init_state(params))


def test_bad_arguments_are_located():
    with pytest.raises(SpecError, match=r"d.toml:\d+:\d+: error: dropout: p must be a probability in \[0, 1\]"):
        parse_spec(MODEL.replace("p=0.3", "p=1.5"), "d.toml")
    with pytest.raises(SpecError, match=r"uniform: low \(2.0\) must be less than high"):
        parse_spec(MODEL.replace("low=-1, high=1", "low=2, high=1"), "d.toml")


def test_random_models_are_not_batch_separable(module):
    assert module.BATCH_SEPARABLE is False
    assert "draws random numbers" in module.BATCH_REFUSAL


def _rnn_with_noise(reverse=False, two_scans=False, noise="dropout"):
    """A tanh RNN whose step drops out its carry (or adds normal noise), optionally twice
    (two scans of the same step) and reversed."""
    from backcomp import ops
    g = backcomp.Graph("rnn_noise")
    x = g.input("x", ("B", "T", 3))
    W, U = g.param("W", (3, 4)), g.param("U", (4, 4))

    def step(h, x_t):
        h_in = ops.dropout(h, 0.5) if noise == "dropout" else h + 0.1 * ops.normal(("B", 4), graph=h.graph)
        h_new = ops.tanh(x_t @ W + h_in @ U)
        return h_new, h_new
    h0 = ops.tanh(x[:, 0] @ W)
    runs = [g.scan(step, h0, x, axis=1, reverse=reverse) for _ in range(2 if two_scans else 1)]
    hs = [r.ys for r in runs]
    g.output("hs", hs[0])
    if two_scans:
        g.output("hs2", hs[1])
    loss = sum(ops.sum(h * h) for h in hs)
    g.output("loss", loss)
    g.loss(loss)
    return g


def _noise_data():
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((3, 4)), "U": 0.5 * rng.standard_normal((4, 4))}
    return params, {"x": rng.standard_normal((2, 6, 3))}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("noise", ["dropout", "normal"])
def test_random_ops_in_a_scan_step_draw_afresh_each_step_and_the_gradient_uses_the_same_draws(reverse, noise):
    """Each step draws new noise (a stream per step from [seed, scan's stream, t]); forward
    and value_and_grad draw the same; the gradient (the backward reads the forward's
    noise, stored per step, never drawn again) matches central differences at -O0 and -O1."""
    params, inputs = _noise_data()
    losses = []
    for level in (0, 1):
        m = backcomp.build(_rnn_with_noise(reverse, noise=noise), opt_level=level)
        loss, grads = m.value_and_grad(params, inputs, rng=np.random.default_rng(5))
        out = m.forward(params, inputs, rng=np.random.default_rng(5))
        assert np.array_equal(out["loss"], loss)
        for k, v in params.items():
            for i in range(v.size):
                plus, minus = {kk: vv.copy() for kk, vv in params.items()}, {kk: vv.copy() for kk, vv in params.items()}
                plus[k].flat[i] += 1e-6
                minus[k].flat[i] -= 1e-6
                fd = (m.value_and_grad(plus, inputs, rng=np.random.default_rng(5))[0]
                      - m.value_and_grad(minus, inputs, rng=np.random.default_rng(5))[0]) / 2e-6
                np.testing.assert_allclose(grads[k].flat[i], fd, rtol=1e-6, atol=1e-8, err_msg=f"-O{level} {k}[{i}]")
        losses.append(loss)
        if noise == "dropout":   # half the carry's entries zeroed, a different half each step
            hs = out["hs"]
            clean = m.forward(params, inputs, train=False)["hs"]
            assert not np.allclose(hs, clean)
            assert np.array_equal(m.forward(params, inputs, train=False)["loss"], m.value_and_grad(params, inputs, train=False)[0])
    assert losses[0] == losses[1]
    assert losses[0] != backcomp.build(_rnn_with_noise(reverse, noise=noise)).value_and_grad(
        params, inputs, rng=np.random.default_rng(6))[0]


def test_each_step_and_each_scan_of_a_step_draws_its_own_noise():
    """The masks differ from step to step and between two scans of the same step: a
    stream per node would repeat one draw at every step."""
    from backcomp import ops
    g = backcomp.Graph("masks")
    x = g.input("x", ("B", "T", 4))

    def step(c, x_t):
        m = ops.dropout(x_t * 0 + 1, 0.5)   # the mask itself, as a per-step output
        return c, m
    c0 = ops.zeros(("B", 4), graph=g)
    g.output("m1", g.scan(step, c0, x, axis=1).ys)
    g.output("m2", g.scan(step, c0, x, axis=1).ys)
    m = backcomp.build(g)
    out = m.forward({}, {"x": np.zeros((50, 8, 4))}, rng=np.random.default_rng(0))
    m1, m2 = out["m1"], out["m2"]
    assert set(np.unique(m1)) == {0.0, 2.0} and abs((m1 == 0).mean() - 0.5) < 0.05
    assert all(not np.array_equal(m1[:, t], m1[:, t + 1]) for t in range(7))
    assert not np.array_equal(m1, m2)
    again = m.forward({}, {"x": np.zeros((50, 8, 4))}, rng=np.random.default_rng(0))
    assert np.array_equal(again["m1"], m1) and np.array_equal(again["m2"], m2)


def test_a_scan_that_draws_is_not_batch_separable():
    m = backcomp.build(_rnn_with_noise())
    assert m.BATCH_SEPARABLE is False


def test_jvp_and_hvp_of_a_scan_that_draws_see_the_same_noise():
    """The JVP's scan recomputes the step with the forward's stream: its tangent and the
    HVP are the derivatives of the loss under the same draws (central differences)."""
    params, inputs = _noise_data()
    m = backcomp.build(_rnn_with_noise(), emit="jvp,hvp")
    v = {k: np.random.default_rng(1).standard_normal(a.shape) for k, a in params.items()}
    at = lambda s: {k: params[k] + s * v[k] for k in params}   # noqa: E731
    draw = lambda: np.random.default_rng(3)                   # noqa: E731
    _, tangents = m.jvp(params, inputs, v, rng=draw())
    fd = (m.value_and_grad(at(1e-6), inputs, rng=draw())[0] - m.value_and_grad(at(-1e-6), inputs, rng=draw())[0]) / 2e-6
    np.testing.assert_allclose(tangents["loss"], fd, rtol=1e-6)
    hv = m.hvp(params, inputs, v, rng=draw())
    gp, gm = m.value_and_grad(at(1e-5), inputs, rng=draw())[1], m.value_and_grad(at(-1e-5), inputs, rng=draw())[1]
    for k in params:
        np.testing.assert_allclose(hv[k], (gp[k] - gm[k]) / 2e-5, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("level", [0, 1])
def test_a_draw_in_a_step_that_nothing_reads_is_harmless(level):
    """Noise in a per-step output the model never reads: the loop prunes it, and the
    module still defines what it calls (it raised NameError: _random_seed; found by review)."""
    from backcomp import ops
    g = backcomp.Graph("dead_draw")
    x = g.input("x", ("B", "T", 3))
    W, U = g.param("W", (3, 4)), g.param("U", (4, 4))

    def step(h, x_t):
        h_new = ops.tanh(x_t @ W + h @ U)
        return h_new, (h_new, h_new * ops.normal(("B", 4), graph=h.graph))
    run = g.scan(step, ops.zeros(("B", 4), graph=g), x, axis=1)
    g.loss(ops.sum(run.ys[0] ** 2))
    m = backcomp.build(g, opt_level=level)
    params, inputs = {"W": np.full((3, 4), 0.1), "U": 0.5 * np.eye(4)}, {"x": np.ones((2, 5, 3))}
    h, hs = np.zeros((2, 4)), []
    for _ in range(5):
        h = np.tanh(inputs["x"][:, 0] @ params["W"] + h @ params["U"])
        hs.append(h)
    import inspect
    assert "rng" not in inspect.signature(m.value_and_grad).parameters   # it asked for rng= it never used
    loss, grads = m.value_and_grad(params, inputs)
    np.testing.assert_allclose(loss, np.sum(np.array(hs) ** 2), rtol=1e-12)
    np.testing.assert_allclose(m.forward(params, inputs)["loss"], loss, rtol=1e-12)
    assert set(grads) == {"W", "U"}


@pytest.mark.parametrize("level", [0, 1])
def test_a_draw_nothing_reads_adds_no_rng_parameter_at_either_level(level):
    """-O0 keeps the dead node, -O1 drops it: the functions' parameters are the same
    (rng= was there at -O0 only; found by review)."""
    import inspect

    from backcomp import ops
    g = backcomp.Graph("dead_outer")
    x, W = g.input("x", ("B", 3)), g.param("W", (3, 4))
    ops.normal(("B", 4), graph=g)
    g.loss(ops.sum(ops.tanh(x @ W)))
    m = backcomp.build(g, opt_level=level)
    assert "rng" not in inspect.signature(m.value_and_grad).parameters
    loss, _ = m.value_and_grad({"W": np.ones((3, 4))}, {"x": np.ones((2, 3))})
    np.testing.assert_allclose(loss, 8 * np.tanh(3.0))


@pytest.mark.parametrize("level", [0, 1])
def test_a_dead_draw_in_a_nested_loop_asks_for_no_rng(level):
    """An inner loop whose only draw feeds a per-step output nothing reads (found by
    review: the readers-aware count stopped at the outer loop)."""
    import inspect

    from backcomp import ops
    g = backcomp.Graph("nested_dead_draw")
    x = g.input("x", ("B", "T", 3))
    W, U = g.param("W", (3, 4)), g.param("U", (4, 4))

    def inner(c, _):
        c2 = ops.tanh(c @ U)
        return c2, (c2 * ops.normal(("B", 4), graph=c.graph),)

    def step(h, x_t):
        r = h.graph.scan(inner, ops.tanh(x_t @ W + h), length=2, name="inner")
        return r.carry, r.carry
    run = g.scan(step, ops.zeros(("B", 4), graph=g), x, axis=1)
    g.loss(ops.sum(run.ys ** 2), "loss")
    m = backcomp.build(g, opt_level=level)
    assert "rng" not in inspect.signature(m.value_and_grad).parameters
    params, xs = {"W": np.full((3, 4), 0.1), "U": 0.5 * np.eye(4)}, np.ones((2, 5, 3))
    h, want = np.zeros((2, 4)), 0.0
    for t in range(5):
        c = np.tanh(xs[:, t] @ params["W"] + h)
        for _ in range(2):
            c = np.tanh(c @ params["U"])
        h, want = c, want + np.sum(c ** 2)
    np.testing.assert_allclose(m.value_and_grad(params, {"x": xs})[0], want, rtol=1e-12)
