"""The gradient workspace of train_step: ``_value_and_grad_into`` and its emission.

``_value_and_grad_into(params, inputs, grads)`` is value_and_grad lowered from the same
graph with each gradient written into ``grads[name]``; here it must give value_and_grad's
loss and gradients (bit for bit: the same statements, only the destination differs) on
every example model (convolutions, batch norm, dropout, scans, attention, embeddings),
leave params and inputs untouched, and never let a workspace array be the loss, a param
or an input.  ``write_into``'s rewrites are checked by their text.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp.check import fixed_draws
from backcomp.codegen import write_into
from backcomp.spec import parse_spec
from conftest import draw

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.toml"))


def _into(module, params, inputs, seed=0):
    """value_and_grad and _value_and_grad_into on copies of the same arrays (a workspace
    prefilled with NaN, so a gradient left unwritten shows)."""
    grads = {k: np.full_like(params[k], np.nan, order="C") for k in module.WRT}
    before = {k: v.copy() for k, v in {**params, **inputs}.items()}
    loss = module._value_and_grad_into(params, inputs, grads, **fixed_draws(module, seed))
    for k, v in {**params, **inputs}.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was written")
    ref_loss, ref = module.value_and_grad({k: v.copy() for k, v in params.items()},
                                          {k: v.copy() for k, v in inputs.items()}, **fixed_draws(module, seed))
    return loss, grads, ref_loss, ref


@pytest.mark.parametrize("example", EXAMPLES)
def test_workspace_gradients_are_value_and_grads(example):
    module = backcomp.build(ROOT / "examples" / example, optimizer="sgd")
    params, inputs = draw(module, batch=4, seed=3)
    loss, grads, ref_loss, ref = _into(module, params, inputs)
    assert type(loss) is np.ndarray and loss.shape == ()
    np.testing.assert_array_equal(loss, ref_loss)
    assert set(grads) == set(ref) == set(module.WRT)
    for k in ref:
        assert grads[k].dtype == params[k].dtype == np.float64
        np.testing.assert_array_equal(grads[k], ref[k], err_msg=f"{example}: gradient of {k}")
        assert np.any(grads[k] != 0) or not np.any(ref[k] != 0)


@pytest.mark.parametrize("example", ["mlp.toml", "digits_bn_cnn.toml", "gru.toml", "vae.toml"])
def test_workspace_at_O0(example):
    """Unoptimised, one statement per node: every gradient is its own statement's value."""
    module = backcomp.build(ROOT / "examples" / example, opt_level=0, optimizer="adam")
    params, inputs = draw(module, batch=3, seed=1)
    loss, grads, ref_loss, ref = _into(module, params, inputs)
    np.testing.assert_array_equal(loss, ref_loss)
    for k in ref:
        np.testing.assert_array_equal(grads[k], ref[k], err_msg=f"{example} -O0: gradient of {k}")


@pytest.mark.parametrize("example", ["mlp.toml", "digits_cnn.toml", "char_lstm.toml"])
def test_workspace_in_float32(example):
    module = backcomp.build(ROOT / "examples" / example, optimizer="sgd")
    params, inputs = draw(module, batch=4, seed=5, dtype=np.float32)
    loss, grads, ref_loss, ref = _into(module, params, inputs)
    assert loss.dtype == np.float32
    for k in ref:
        assert grads[k].dtype == np.float32
        np.testing.assert_array_equal(grads[k], ref[k], err_msg=f"{example}: gradient of {k}")


ALIASES = """\
[model]
name = "ws_alias"
loss = "loss"
[inputs]
x = ["B", 4]
[params]
W = [4, 3]
V = [4, 3]
c = [3]
d = [3]
s = { shape = [], init = "ones" }
[graph]
h = "tanh(x @ W)"
loss = "sum(W * V) + sum(h * c) + sum(h * d) + sum(x * x) * s"
"""


def test_gradients_that_are_leaves_or_shared_are_copied():
    """V's gradient is W and W's contains V, c's and d's are one value, s's is a sum of
    inputs: each workspace array gets its own copy, so the update cannot touch a param,
    an input or another param's gradient."""
    module = backcomp.build(parse_spec(ALIASES, "ws.toml"), optimizer="sgd")
    src = backcomp.compile_source(parse_spec(ALIASES, "ws.toml"), optimizer="sgd")
    body = src[src.index("def _value_and_grad_into"):src.index("def _new_workspace")]
    assert 'grads["V"][...] = V_bar' in body and "V_bar = W\n" in body   # V_bar is another name for W
    assert 'grads["d"][...] = d_bar' in body and 'out=grads["c"]' in body   # one value, two arrays
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=v) for k, v in module.PARAMS.items()}
    inputs = {"x": rng.normal(size=(5, 4))}
    loss, grads, ref_loss, ref = _into(module, params, inputs)
    np.testing.assert_array_equal(loss, ref_loss)
    for k in ref:
        np.testing.assert_array_equal(grads[k], ref[k], err_msg=k)
    assert not any(np.shares_memory(a, b) for a in grads.values() for b in grads.values() if a is not b)
    np.testing.assert_array_equal(grads["V"], params["W"])
    np.testing.assert_array_equal(grads["c"], grads["d"])

    state = module.init_state(params)
    before = {k: v.copy() for k, v in {**params, **inputs}.items()}
    module.train_step(params, inputs, state, lr=0.1)
    np.testing.assert_array_equal(inputs["x"], before["x"])
    for k in ref:   # V moves by -lr W (the W of before the step), W by -lr (V + ...)
        np.testing.assert_allclose(params[k], before[k] - 0.1 * ref[k], rtol=1e-14, atol=1e-15, err_msg=k)


def test_a_mismatched_workspace_is_refused():
    module = backcomp.build(ROOT / "examples" / "mlp.toml", optimizer="adam")
    params = module.init_params(dtype=np.float64)
    _, inputs = draw(module, batch=4)
    state = module.init_state(params)
    for bad in (np.zeros_like(params["W1"], dtype=np.float32),        # wrong dtype
                np.zeros(params["W1"].shape[::-1]).T,                 # not C-contiguous
                params["W1"],                                         # the param itself
                np.zeros(params["W1"].shape[:1])):                    # wrong shape
        state["grads"]["W1"] = bad
        with pytest.raises(ValueError, match="W1.*init_state"):
            module.train_step(params, inputs, state)
    with pytest.raises(ValueError, match="W1.*init_state"):   # a state made before the workspace
        module.train_step(params, inputs, {k: v for k, v in state.items() if k != "grads"})
    with pytest.raises(ValueError, match="params: missing 'b2'"):
        module.train_step({k: v for k, v in params.items() if k != "b2"}, inputs, module.init_state(params))
    with pytest.raises(ValueError, match="param 'b1' must be a numpy array"):
        module.train_step({**params, "b1": params["b1"].tolist()}, inputs, module.init_state(params))


# ----- the rewrite, by its text ---------------------------------------------------

@pytest.mark.parametrize("rhs, expected", [
    ("h1.T @ logits_bar", 'np.matmul(h1.T, logits_bar, out=g["W"])'),
    ("(a + b) * c", 'np.multiply(a + b, c, out=g["W"])'),
    ("0.01*w + y_bar*x", 'np.add(0.01*w, y_bar*x, out=g["W"])'),
    ("-y/B", 'np.divide(-y, B, out=g["W"])'),
    ("-y", 'np.negative(y, out=g["W"])'),
    ("logits_bar.sum(axis=0)", 'logits_bar.sum(axis=0, out=g["W"])'),
    ("t.sum()", 't.sum(out=g["W"])'),
    ("np.add(z, 0.001*W1, out=z)", 'np.add(z, 0.001*W1, out=g["W"])'),
    ("np.exp(a - m)", 'np.exp(a - m, out=g["W"])'),
    ("np.maximum(σ, 0)", 'np.maximum(σ, 0, out=g["W"])'),
    ("np.add(σ, 1, out=σ)", 'np.add(σ, 1, out=g["W"])'),
])
def test_write_into_gives_the_out_form(rhs, expected):
    assert write_into([f"v = {rhs}"], "v", 'g["W"]') == [f"v = {expected}"]


@pytest.mark.parametrize("lines", [
    ["v = x"],                                          # another name: no statement makes memory
    ["v = a.sum(axis=0).reshape((3, 1))"],              # a view of a temporary
    ["v = np.where(m, a, b)"],                          # not a ufunc
    ["v = np.broadcast_to(a, (3, 4))"],
    ["v = _scatter_add(i, r, 9)"],
    ["v = a @ b", "for t in range(3):", "    v = v + t"],   # rebound afterwards
])
def test_write_into_copies_where_there_is_no_out_form(lines):
    assert write_into(lines, "v", 'g["W"]') == lines + ['g["W"][...] = v', 'v = g["W"]']


@pytest.mark.parametrize("level", [0, 1])
def test_a_param_used_in_and_out_of_a_scan_is_updated_by_its_whole_gradient(level):
    """W's gradient is the scan's part plus the part from outside it, added in place into
    the scan's part: at -O0 the workspace got a copy of the scan's part, and the sum went
    to the old array (train_step moved W by the scan's part only; found by review)."""
    from backcomp import ops
    g = backcomp.Graph("in_and_out")
    x = g.input("x", ("B", "T", 3))
    W, U = g.param("W", (3, 4)), g.param("U", (4, 4))

    def step(h, x_t):
        h_new = ops.tanh(x_t @ W + h @ U)
        return h_new, h_new
    run = g.scan(step, ops.tanh(x[:, 0] @ W), x, axis=1)
    g.loss(ops.sum(run.ys * run.ys) + ops.sum(run.carry))
    m = backcomp.build(g, optimizer="sgd", opt_level=level)
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((3, 4)), "U": 0.5 * rng.standard_normal((4, 4))}
    inputs = {"x": rng.standard_normal((2, 5, 3))}
    _, grads = m.value_and_grad(params, inputs)
    stepped = {k: v.copy() for k, v in params.items()}
    m.train_step(stepped, inputs, m.init_state(stepped), lr=1.0)
    for k in params:
        np.testing.assert_allclose(params[k] - stepped[k], grads[k], rtol=1e-12, atol=1e-12, err_msg=k)


def test_write_into_rewrites_the_last_assignment_only():
    lines = ["v_t0 = a*b", "v = v_t0 + c", '_check_finite("v", v)']
    assert write_into(lines, "v", "g") == ["v_t0 = a*b", "v = np.add(v_t0, c, out=g)", '_check_finite("v", v)']


def test_train_step_benchmark_smoke(tmp_path, capsys):
    """benchmarks/train_step.py --smoke: the three implementations agree over three
    steps (it asserts so) and the table is printed; the times mean nothing."""
    pytest.importorskip("torch")
    pytest.importorskip("threadpoolctl")
    import json
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step as bench
    out = tmp_path / "ts.json"
    assert bench.main(["--smoke", "--json", str(out), "--grads", "--cpu-rounds", "2"]) == 0
    assert "| fused ÷ before (time) | fused ÷ torch (time) | grads: into ÷ fresh (time) |" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert {(r["model"], r["optimizer"]) for r in results} == {(m, o) for m in bench.MODELS for o in bench.OPTIMIZERS}
    assert all(r["deviation"] < 1e-3 and set(r["median_s"]) == set(r["cpu_s"]) == {*bench.IMPLS, "grads_fresh",
                                                                                    "grads_into"} for r in results)
    assert all(set(r["peak_bytes"]) == {"fused", "before"} for r in results)
