"""``scan(step, init, xs=(), length=n)``: a loop with no per-step input.

As ``jax.lax.scan(f, init, None, length=n)``: a fixed number of iterations of a
recurrence (a layer repeated with shared weights, Euler steps).  Values and gradients
are compared with a hand-unrolled NumPy loop and with ``jax.lax.scan(..., None,
length=n)`` on the same float64 arrays, with central differences, across -O0/-O1 and
reverse; jvp/hvp with jax.jvp; the spec path through the command line; the errors.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.graph import Graph, GraphError, ShapeError
from backcomp.loops import scan as loops_scan

from conftest import gradcheck

jax = pytest.importorskip("jax")
jnp = jax.numpy

ROOT = Path(__file__).resolve().parent.parent
B, D, H, K, N = 3, 4, 5, 2, 6


# ----- the model: a tanh layer repeated N times with shared weights ------------------------
def repeat_graph(reverse=False, length=N, name="repeat"):
    """h0 = tanh(x W0); N times h = tanh(h U + b) (shared U, b), each step's h V stacked;
    loss = Σ h_N² + Σ_t Σ c[t] ⊙ ys[t] (c weights the steps differently, so order matters)."""
    g = Graph(name)
    x = g.input("x", ("B", D))
    c = g.input("c", (length, "B", K))
    W0, U, b, V = g.param("W0", (D, H)), g.param("U", (H, H)), g.param("b", (H,)), g.param("V", (H, K))

    def layer(h, xs):
        assert xs == ()
        h_new = ops.tanh(h @ U + b)
        return h_new, h_new @ V

    run = g.scan(layer, ops.tanh(x @ W0), length=length, reverse=reverse, name="layer")
    g.output("ys", run.ys)
    g.output("h_last", run.carry)
    loss = ops.sum(run.carry * run.carry) + ops.sum(c * run.ys)
    g.output("loss", loss)
    g.loss(loss)
    return g


def data(seed=0, length=N):
    rng = np.random.default_rng(seed)
    params = {"W0": rng.normal(size=(D, H)) * 0.5, "U": rng.normal(size=(H, H)) * 0.5,
              "b": rng.normal(size=H) * 0.1, "V": rng.normal(size=(H, K))}
    inputs = {"x": rng.normal(size=(B, D)), "c": rng.normal(size=(length, B, K))}
    return params, inputs


def numpy_repeat(p, i, reverse=False):
    """The hand-unrolled loop: (loss, ys, h_last)."""
    h = np.tanh(i["x"] @ p["W0"])
    n = i["c"].shape[0]
    ys = np.empty((n, h.shape[0], K))
    for t in (range(n - 1, -1, -1) if reverse else range(n)):
        h = np.tanh(h @ p["U"] + p["b"])
        ys[t] = h @ p["V"]
    return np.sum(h * h) + np.sum(i["c"] * ys), ys, h


def jax_repeat(p, i, reverse=False):
    def layer(h, xs):
        assert xs is None
        h_new = jnp.tanh(h @ p["U"] + p["b"])
        return h_new, h_new @ p["V"]
    h, ys = jax.lax.scan(layer, jnp.tanh(i["x"] @ p["W0"]), None, length=i["c"].shape[0], reverse=reverse)
    return jnp.sum(h * h) + jnp.sum(i["c"] * ys), (ys, h)


def _close(a, b, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=what)


# ----- values and gradients ---------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_numpy_and_jax_values_and_gradients_at_O0_and_O1(reverse):
    params, inputs = data()
    ref_loss, ref_ys, ref_h = numpy_repeat(params, inputs, reverse)
    with jax.enable_x64(True):
        (j_loss, (j_ys, j_h)), j_grads = jax.value_and_grad(jax_repeat, has_aux=True)(
            {k: jnp.asarray(v) for k, v in params.items()}, {k: jnp.asarray(v) for k, v in inputs.items()}, reverse)
        j_grads = {k: np.asarray(v) for k, v in j_grads.items()}
    _close(j_loss, ref_loss, "jax vs numpy")   # the two references agree
    _close(j_ys, ref_ys, "jax vs numpy")
    results = []
    for level in (0, 1):
        m = backcomp.build(repeat_graph(reverse), opt_level=level)
        loss, grads = m.value_and_grad(params, inputs)
        out = m.forward(params, inputs)
        assert out["ys"].shape == (N, B, K) and out["h_last"].shape == (B, H)
        _close(loss, ref_loss, f"-O{level} loss")
        _close(out["loss"], ref_loss, f"-O{level} forward loss")
        _close(out["ys"], ref_ys, f"-O{level} ys")
        _close(out["h_last"], ref_h, f"-O{level} h_last")
        assert set(grads) == set(j_grads)
        for k in grads:
            _close(grads[k], j_grads[k], f"-O{level} grad {k} vs jax")
        results.append((loss, grads))
    for k in results[0][1]:   # -O0 and -O1 agree with each other too
        _close(results[0][1][k], results[1][1][k], f"-O0 vs -O1 {k}")
    if reverse:   # reverse changes the values: the order of the steps matters here
        assert not np.allclose(ref_ys, numpy_repeat(params, inputs, False)[1])


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_central_differences(reverse):
    gradcheck(repeat_graph(reverse), batch=B,
              reference=lambda p, i: numpy_repeat(p, i, reverse)[0])


def test_generated_loop_runs_a_literal_number_of_steps_and_is_deterministic():
    text = backcomp.compile_source(repeat_graph())
    assert text == backcomp.compile_source(repeat_graph())

    def loops(function):
        body = text.split(f"\ndef {function}(")[1].split("\ndef ")[0]
        return re.findall(r"^\s*for \w+ in range\((.*)\):$", body, flags=re.M)
    assert loops("forward") == [str(N)]
    assert loops("value_and_grad") == [str(N), f"{N} - 1, -1, -1"]
    assert f"# scan layer: loop over {N} steps" in text
    assert re.search(rf"= np\.empty\(\({N}, B, {H}\), dtype=", text)   # the stacked h: (N, B, H)
    assert f"ys = _matmul_2.reshape(({N}, B, {K}))" in text   # h V sunk after the loop: one GEMM over N·B rows
    # another length is another module: the trip count is part of the graph
    other = backcomp.compile_source(repeat_graph(length=3))
    assert "for t in range(3):" in other and f"range({N})" not in other


def test_one_step_and_length_agreeing_with_sequences():
    params, inputs = data(length=1)
    m = backcomp.build(repeat_graph(length=1))
    _close(m.value_and_grad(params, inputs)[0], numpy_repeat(params, inputs)[0])
    # both a sequence and length=: fine when they agree (as jax)
    g = Graph("agree")
    x = g.input("x", (N, B, D))
    W = g.param("W", (D, D))
    run = g.scan(lambda h, x_t: (ops.tanh(h @ W + x_t), None), ops.zeros((B, D), graph=g), x, length=N)
    g.loss(ops.sum(run.carry), "loss")
    p = {"W": np.random.default_rng(0).normal(size=(D, D)) * 0.5}
    xv = np.random.default_rng(1).normal(size=(N, B, D))
    h = np.zeros((B, D))
    for t in range(N):
        h = np.tanh(h @ p["W"] + xv[t])
    _close(backcomp.build(g).value_and_grad(p, {"x": xv})[0], h.sum())
    assert "length" not in run.node.attrs   # a scan over sequences is the node it always was


def test_several_carries_no_ys_and_a_python_none_xs():
    """Euler steps of a damped oscillator with a learned force: carries (q, v), no per-step
    output, xs=None (the step then receives None, as in jax)."""
    g = Graph("euler")
    q0, v0 = g.input("q0", ("B", 2)), g.input("v0", ("B", 2))
    A, k = g.param("A", (2, 2)), g.param("k", (2,))
    dt = 0.1
    seen = []

    def step(carry, xs):
        seen.append(xs)
        q, v = carry
        a = ops.tanh(q @ A) - k * v
        return (q + dt * v, v + dt * a), None

    run = g.scan(step, (q0, v0), None, length=7)
    q, v = run.carry
    assert run.ys == () and seen == [None]
    g.loss(ops.sum(q * q) + 0.5 * ops.sum(v * v), "loss")
    rng = np.random.default_rng(3)
    p = {"A": rng.normal(size=(2, 2)), "k": rng.uniform(0.1, 0.5, size=2)}
    i = {"q0": rng.normal(size=(B, 2)), "v0": rng.normal(size=(B, 2))}

    def jloss(p):
        def f(c, _):
            q, v = c
            return (q + dt * v, v + dt * (jnp.tanh(q @ p["A"]) - p["k"] * v)), None
        (q, v), _ = jax.lax.scan(f, (jnp.asarray(i["q0"]), jnp.asarray(i["v0"])), None, length=7)
        return jnp.sum(q * q) + 0.5 * jnp.sum(v * v)
    with jax.enable_x64(True):
        want, want_grads = jax.value_and_grad(jloss)({k_: jnp.asarray(v_) for k_, v_ in p.items()})
    for level in (0, 1):
        loss, grads = backcomp.build(g, opt_level=level).value_and_grad(p, i)
        _close(loss, want)
        for name in p:
            _close(grads[name], want_grads[name], f"-O{level} {name}")
    gradcheck(g, batch=B)


def test_nested_scans_without_sequences():
    """A loop of 3 steps whose step runs a loop of 2 (reversed outer, stacked outer ys)."""
    def build():
        g = Graph("nested")
        x = g.input("x", ("B", D))
        W, U = g.param("W", (D, D)), g.param("U", (D, D))

        def inner(h, _):
            return ops.tanh(h @ U), h

        def outer(h, _):
            r = loops_scan(inner, h, length=2, name="inner")
            h_new = ops.tanh(r.carry @ W) + h + ops.sum(r.ys, axis=0)
            return h_new, h_new * h_new
        run = g.scan(outer, x, length=3, reverse=True, name="outer")
        g.output("ys", run.ys)
        g.loss(ops.sum(run.ys * run.ys) + ops.sum(run.carry), "loss")
        return g

    def jloss(p, x):
        def inner(h, _):
            return jnp.tanh(h @ p["U"]), h

        def outer(h, _):
            hc, hs = jax.lax.scan(inner, h, None, length=2)
            h_new = jnp.tanh(hc @ p["W"]) + h + hs.sum(axis=0)
            return h_new, h_new * h_new
        h, ys = jax.lax.scan(outer, x, None, length=3, reverse=True)
        return jnp.sum(ys * ys) + jnp.sum(h)

    rng = np.random.default_rng(4)
    p = {"W": rng.normal(size=(D, D)) * 0.3, "U": rng.normal(size=(D, D)) * 0.3}
    x = rng.normal(size=(B, D)) * 0.5
    with jax.enable_x64(True):
        want, want_grads = jax.value_and_grad(jloss)({k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(x))
    for level in (0, 1):
        m = backcomp.build(build(), opt_level=level)
        loss, grads = m.value_and_grad(p, {"x": x})
        _close(loss, want, f"-O{level}")
        for k in p:
            _close(grads[k], want_grads[k], f"-O{level} {k}")
        assert m.forward(p, {"x": x})["ys"].shape == (3, B, D)
    gradcheck(build(), batch=B)


def test_jvp_and_hvp_match_jax():
    params, inputs = data(seed=2)
    rng = np.random.default_rng(7)
    v = {k: rng.normal(size=a.shape) for k, a in params.items()}
    with jax.enable_x64(True):
        jp = {k: jnp.asarray(a) for k, a in params.items()}
        jv = {k: jnp.asarray(a) for k, a in v.items()}
        ji = {k: jnp.asarray(a) for k, a in inputs.items()}
        (l, (ys, h)), (dl, (dys, dh)) = jax.jvp(lambda q: jax_repeat(q, ji), (jp,), (jv,))
        hv = jax.jvp(lambda q: jax.grad(lambda r: jax_repeat(r, ji)[0])(q), (jp,), (jv,))[1]
    for level in (0, 1):
        m = backcomp.build(repeat_graph(), opt_level=level, emit="jvp,hvp")
        outs, tangents = m.jvp(params, inputs, v)
        _close(outs["ys"], ys)
        _close(tangents["loss"], dl, f"-O{level} jvp loss")
        _close(tangents["ys"], dys, f"-O{level} jvp ys")
        _close(tangents["h_last"], dh, f"-O{level} jvp h_last")
        got = m.hvp(params, inputs, v)
        for k in params:
            _close(got[k], hv[k], f"-O{level} hvp {k}")


def test_a_backward_loop_that_reads_no_per_step_value():
    """h_new = 2 h + x_t: the backward step reads neither residuals nor slices, so its
    loop has no sequence and runs for the forward's length (it raised ShapeError
    "have different lengths" before scans had a length)."""
    g = Graph("affine")
    x = g.input("x", (5, B))
    w = g.param("w", (B,))
    run = g.scan(lambda h, x_t: (h * 2.0 + x_t, None), w * 1.0, x)
    g.loss(ops.sum(run.carry), "loss")
    loss, grads = backcomp.build(g).value_and_grad({"w": np.ones(B)}, {"x": np.ones((5, B))})
    _close(loss, B * (32 + 31))
    _close(grads["w"], np.full(B, 32.0))


# ----- random ops in the step --------------------------------------------------------------
def test_a_step_that_draws_gets_fresh_noise_each_step():
    g = Graph("noisy")
    x = g.input("x", ("B", H))
    U = g.param("U", (H, H))

    def step(h, _):
        h_new = ops.tanh(ops.dropout(h, 0.5) @ U)
        return h_new, ops.dropout(h * 0 + 1, 0.5)   # the mask itself
    run = g.scan(step, x, length=N)
    g.output("masks", run.ys)
    loss = ops.sum(run.carry * run.carry)
    g.output("loss", loss)
    g.loss(loss)
    p = {"U": np.random.default_rng(0).normal(size=(H, H))}
    i = {"x": np.random.default_rng(1).normal(size=(40, H))}
    m = backcomp.build(g)
    out = m.forward(p, i, rng=np.random.default_rng(5))
    masks = out["masks"]
    assert set(np.unique(masks)) == {0.0, 2.0}
    assert all(not np.array_equal(masks[t], masks[t + 1]) for t in range(N - 1))
    loss, grads = m.value_and_grad(p, i, rng=np.random.default_rng(5))
    assert np.array_equal(out["loss"], loss)
    assert np.array_equal(m.forward(p, i, rng=np.random.default_rng(5))["masks"], masks)
    assert np.array_equal(backcomp.build(g, opt_level=0).value_and_grad(p, i, rng=np.random.default_rng(5))[0], loss)
    for j in (0, 7, 24):   # central differences under the same draws
        plus, minus = p["U"].copy(), p["U"].copy()
        plus.flat[j] += 1e-6
        minus.flat[j] -= 1e-6
        fd = (m.value_and_grad({"U": plus}, i, rng=np.random.default_rng(5))[0]
              - m.value_and_grad({"U": minus}, i, rng=np.random.default_rng(5))[0]) / 2e-6
        np.testing.assert_allclose(grads["U"].flat[j], fd, rtol=1e-6, atol=1e-8)


# ----- dask --------------------------------------------------------------------------------
def test_dask_runs_a_loop_of_params_alone_and_refuses_one_over_batch_values():
    da = pytest.importorskip("dask.array")
    import backcomp.dask as bd
    # the loop reads params only (a weight matrix raised to a power by repeated steps):
    # the loss is a sum over rows of terms of it, batch-separable
    g = Graph("power")
    x, y = g.input("x", ("B", D)), g.input("y", ("B", D))
    U = g.param("U", (D, D))
    run = g.scan(lambda M, _: (ops.tanh(M @ U), None), U * 1.0, length=3)
    g.loss(ops.sum((x @ run.carry - y) ** 2), "loss")
    m = backcomp.build(g)
    assert m.BATCH_SEPARABLE is True, m.BATCH_REFUSAL
    rng = np.random.default_rng(0)
    p = {"U": rng.normal(size=(D, D)) * 0.5}
    X, Y = rng.normal(size=(11, D)), rng.normal(size=(11, D))
    loss, grads = bd.value_and_grad(m, p, {"x": da.from_array(X, chunks=(4, D)), "y": da.from_array(Y, chunks=(4, D))},
                                    scheduler="sync")
    want, want_grads = m.value_and_grad(p, {"x": X, "y": Y})
    np.testing.assert_allclose(loss, want, rtol=1e-10)
    np.testing.assert_allclose(grads["U"], want_grads["U"], rtol=1e-10)
    # a loop whose carry holds batch rows is refused, clearly
    m = backcomp.build(repeat_graph())
    assert m.BATCH_SEPARABLE is False and "scan" in m.BATCH_REFUSAL
    params, inputs = data()
    with pytest.raises(ValueError, match="not batch-separable"):
        bd.value_and_grad(m, params, {k: da.from_array(v) for k, v in inputs.items()}, scheduler="sync")


# ----- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("length, message", [
    (0, "length must be a positive int (at least one step), got 0"),
    (-2, "length must be a positive int (at least one step), got -2"),
    (2.5, "length must be a positive int, got 2.5 (float)"),
    (True, "length must be a positive int, got True (bool)"),
    ("T", "not the symbolic dim 'T'"),
])
def test_bad_lengths_are_refused(length, message):
    g = Graph("bad")
    h0 = g.input("h0", ("B", D))
    with pytest.raises(ShapeError, match=re.escape(message)):
        g.scan(lambda h, _: (h, None), h0, length=length)


def test_length_must_agree_with_the_sequences_and_one_of_them_is_needed():
    g = Graph("bad")
    x = g.input("x", ("B", 5, D))
    h0 = g.input("h0", ("B", D))
    with pytest.raises(ShapeError, match=re.escape("length=4 disagrees with the sequence of shape (B, 5, 4), "
                                                   "of length 5 along axis 1")):
        g.scan(lambda h, x_t: (h + x_t, None), h0, x, axis=1, length=4)
    with pytest.raises(GraphError, match="needs at least one sequence to scan over"):
        g.scan(lambda h, _: (h, None), h0)
    with pytest.raises(GraphError, match="needs at least one sequence to scan over"):
        g.scan(lambda h, _: (h, None), h0, ())
    assert g.scan(lambda h, _: (h * 2, h), h0, length=np.int64(3)).node.attrs["length"] == 3   # a NumPy int is one


# ----- the spec, through the command line -------------------------------------------------------
SPEC = """\
# y' = tanh(y A + c), integrated by N Euler steps from y0 = x W0
[model]
loss = "loss"
outputs = ["path"]

[inputs]
x = ["B", 3]
y = ["B", 3]

[params]
W0 = [3, 3]
A = [3, 3]
c = [3]

[constants]
dt = 0.125
N = 8

[steps.euler]
carry = ["u"]
xs = []
[steps.euler.graph]
u_new = "u + dt * tanh(u @ A + c)"
[steps.euler.returns]
carry = ["u_new"]
ys = ["u_new"]

[graph]
run = "scan(euler, x @ W0, (), length=N)"
path = "run.ys[0]"
loss = "mean((run.carry[0] - y) ** 2) + 0.1 * mean(path ** 2)"
"""


def bc(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("BACKCOMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "backcomp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def numpy_euler(p, i):
    u = i["x"] @ p["W0"]
    path = []
    for _ in range(8):
        u = u + 0.125 * np.tanh(u @ p["A"] + p["c"])
        path.append(u)
    path = np.stack(path)
    return np.mean((u - i["y"]) ** 2) + 0.1 * np.mean(path ** 2), path


def test_spec_compiles_runs_checks_and_explains(tmp_path, capsys):
    spec = tmp_path / "euler.toml"
    spec.write_text(SPEC)
    r = bc("compile", str(spec), "-o", str(tmp_path / "euler.py"), "--emit", "jvp,hvp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    loader = importlib.util.spec_from_file_location("euler_length_test", tmp_path / "euler.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    source = (tmp_path / "euler.py").read_text()
    assert "for t in range(8):" in source
    rng = np.random.default_rng(0)
    p = {k: rng.normal(size=v.shape) * 0.5 for k, v in mod.init_params(0).items()}
    i = {"x": rng.normal(size=(B, 3)), "y": rng.normal(size=(B, 3))}
    want, path = numpy_euler(p, i)
    loss, grads = mod.value_and_grad(p, i)
    _close(loss, want)
    _close(mod.forward(p, i)["path"], path)

    def jloss(q):
        def f(u, _):
            u = u + 0.125 * jnp.tanh(u @ q["A"] + q["c"])
            return u, u
        u, us = jax.lax.scan(f, jnp.asarray(i["x"]) @ q["W0"], None, length=8)
        return jnp.mean((u - i["y"]) ** 2) + 0.1 * jnp.mean(us ** 2)
    v = {k: rng.normal(size=a.shape) for k, a in p.items()}
    with jax.enable_x64(True):
        jp = {k: jnp.asarray(a) for k, a in p.items()}
        jl, jg = jax.value_and_grad(jloss)(jp)
        hv = jax.jvp(jax.grad(jloss), (jp,), ({k: jnp.asarray(a) for k, a in v.items()},))[1]
    _close(loss, jl)
    for k in p:
        _close(grads[k], jg[k], k)
        _close(mod.hvp(p, i, v)[k], hv[k], f"hvp {k}")
    from backcomp.cli import main   # check and explain in process, as the command runs them
    capsys.readouterr()
    assert main(["check", str(spec)]) == 0
    assert "gradients match finite differences" in capsys.readouterr().out
    assert main(["explain", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "run = scan(euler, (x · W0,), (), length=8)    # carry (B, 3); ys (8, B, 3)" in out, out
    assert "ḡ_W0 = xᵀ · ḡ_run.init[0]" in out, out
    assert "step euler (carry u; no slices)" in out
    assert "(backpropagation through time, t = 7, ..., 0)" in out, out
    # a missing xs and the two-argument call parse the same as xs = [] and ()
    spec2 = tmp_path / "euler2.toml"
    spec2.write_text(SPEC.replace("xs = []\n", "").replace("x @ W0, (), length=N", "x @ W0, length=N"))
    assert main(["compile", str(spec2), "-o", str(tmp_path / "euler2.py")]) == 0
    body = lambda text: text.split("\ndef forward(")[1].split("\ndef ")[0]   # noqa: E731
    assert body((tmp_path / "euler2.py").read_text()) == body(source.split("\ndef jvp(")[0])


@pytest.mark.parametrize("edit, message, at", [
    (("length=N", "length=0"), "argument 'length' of scan() must be positive, got 0", "run"),
    (("length=N", "length=-3"), "argument 'length' of scan() must be positive, got -3", "run"),
    (("length=N", "length=2.5"), "argument 'length' of scan() must be a positive integer, got '2.5'", "run"),
    (("length=N", "length=dt"), "argument 'length' of scan() must be a positive integer, got 'dt'", "run"),
    (("length=N", "length=B"), "not the symbolic dim 'B' (of input 'x')", "run"),
    (("length=N", "length='8'"), "a string is not allowed here", "run"),
    (("x @ W0, (), length=N", "x @ W0, ()"),
     "scan() needs at least one sequence (xs), or a number of steps: scan(euler, init, (), length=n)", "run"),
    (("x @ W0, (), length=N", "x @ W0, x, length=N"),
     "step 'euler' takes no slice (it declares no xs), but scan() gives 1 sequence", "run"),
    (("xs = []", "xs = [\"x_t\"]"), "step 'euler' takes 1 slice (x_t), but scan() gives 0 sequences", "run"),
    (("length=N", "length=N, lenght=3"), "unexpected keyword argument 'lenght' (allowed: axis, reverse, length)",
     "run"),
    (("xs = []", "xs = \"x_t\""), "step 'euler' needs xs = [\"...\"], an array of names", "xs"),
])
def test_spec_errors_are_one_located_line_exit_2(tmp_path, capsys, edit, message, at):
    """In process (``cli.main``), as the command runs them: one line file:line:col, exit 2."""
    from backcomp.cli import main
    old, new = edit
    assert old in SPEC
    text = SPEC.replace(old, new, 1)
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert main(["compile", str(spec), "-o", str(tmp_path / "bad.py")]) == 2
    err = capsys.readouterr().err
    line = next(n for n, ln in enumerate(text.splitlines(), 1) if ln.startswith(at + " = "))
    assert re.fullmatch(rf"{re.escape(str(spec))}:{line}:\d+: error: .*", err.strip()), err
    assert message in err, err
    assert not (tmp_path / "bad.py").exists()


def test_a_spec_error_through_the_command(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(SPEC.replace("length=N", "length=0"))
    r = bc("compile", str(spec), "-o", str(tmp_path / "bad.py"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"{spec}:29:39: error: argument 'length' of scan() must be positive, got 0 in node 'run'"


def test_spec_length_disagreeing_with_the_sequences():
    from backcomp.spec import parse_spec
    from backcomp.spec.text import SpecError
    text = SPEC.replace('xs = []', 'xs = ["e_t"]').replace("x @ W0, (), length=N", "x @ W0, z, length=N") \
        .replace('y = ["B", 3]', 'y = ["B", 3]\nz = [5, "B", 3]').replace("u @ A + c", "u @ A + c + e_t")
    with pytest.raises(SpecError) as e:
        parse_spec(text, "bad.toml")
    assert "scan(): length=8 disagrees with the sequences, of length 5 along axis 0: (5, B, 3)" in str(e.value)
    assert e.value.line == text.splitlines().index(next(ln for ln in text.splitlines() if ln.startswith("run"))) + 1
    ok = parse_spec(text.replace("length=N", "length=5"), "ok.toml")   # agreeing: fine
    assert backcomp.build(ok).forward is not None
