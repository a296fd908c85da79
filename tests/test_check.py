"""backcomp.check, the one finite-difference checker, and the ``backcomp check`` command.

Checks at the spec's own inits (a VAE's exp(logvar) explodes at random params of the
wrong scale), along random directions and per element, with a tolerance derived from
the step; a gradient off by 1% must still fail.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backcomp.check import (check_point, compare_gradients, random_inputs, standalone_source)
from backcomp.cli import main
from backcomp.ops import registry
from backcomp.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))

# A VAE with the noise as an input: z = mu + exp(logvar/2)·eps, loss = reconstruction + KL.
# At 0.5·N(0, 1) params (the old check) its loss is ~2e8 and the check failed bd, bo.
VAE = """
[model]
name = "vae"
loss = "loss"

[inputs]
x = ["B", 32]
eps = ["B", 8]

[params]
We = [32, 64]
be = [64]
Wmu = [64, 8]
bmu = [8]
Wlv = [64, 8]
blv = [8]
Wd = [8, 64]
bd = [64]
Wo = [64, 32]
bo = [32]

[graph]
h = "relu(x @ We + be)"
mu = "h @ Wmu + bmu"
logvar = "h @ Wlv + blv"
z = "mu + exp(0.5 * logvar) * eps"
d = "relu(z @ Wd + bd)"
xhat = "d @ Wo + bo"
recon = "mean(sum((xhat - x) ** 2, axis=1))"
kl = "mean(-0.5 * sum(1 + logvar - mu ** 2 - exp(logvar), axis=1))"
loss = "recon + kl"
"""


@pytest.fixture
def vae_spec(tmp_path):
    path = tmp_path / "vae.toml"
    path.write_text(VAE)
    return path


def _table(out: str) -> dict[str, list[str]]:
    """The check's table: row name -> its columns."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("param "))
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("probes:"):
            break
        cols = line.split()
        rows[cols[0]] = cols
    return rows


# ----- the command ----------------------------------------------------------------------
def test_vae_passes_at_its_inits(vae_spec, capsys):
    assert main(["check", str(vae_spec)]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == {"We", "be", "Wmu", "bmu", "Wlv", "blv", "Wd", "bd", "Wo", "bo", "(all)"}
    assert all(cols[-1] == "ok" for cols in rows.values()), out
    assert "at init_params(seed=0)" in out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_passes(path, capsys):
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    module_params = load_spec(path).wrt_params()
    assert set(rows) == set(module_params) | ({"(all)"} if len(module_params) > 1 else set())
    for name, cols in rows.items():
        error, tol = float(cols[-4]), float(cols[-3])
        assert cols[-1] == "ok" and error <= tol, out
    assert "gradients match finite differences" in out


# dropout needs rng= and batch_norm buffers=: the command's own loss line called
# value_and_grad without them ("this model has buffers ...: pass buffers=init_buffers()").
RANDOM_WITH_BUFFERS = """
[model]
loss = "loss"
[inputs]
x = ["B", 3, 4]
[params]
W = [4, 4]
gamma = { shape = [3], init = "ones" }
beta = [3]
[buffers]
rm = [3]
rv = { shape = [3], init = "ones" }
[graph]
y = "dropout(batch_norm(x @ W, gamma, beta, rm, rv), p=0.3)"
loss = "mean(y * x)"
"""


def test_models_with_random_ops_and_buffers_are_checked_with_fixed_draws(tmp_path, capsys):
    path = tmp_path / "bn_dropout.toml"
    path.write_text(RANDOM_WITH_BUFFERS)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gradients match finite differences" in out and set(_table(out)) == {"W", "gamma", "beta", "(all)"}


def _broken_matmul(monkeypatch, factor=1.01):
    """matmul's VJP with its second operand's cotangent scaled by ``factor``."""
    op = registry.get_op("matmul")
    rule = op.vjp

    def broken(node, ct):
        ga, gb = rule(node, ct)
        return [ga, gb * factor]
    monkeypatch.setitem(registry._REGISTRY, "matmul", dataclasses.replace(op, vjp=broken))


@pytest.mark.parametrize("spec", ["vae", "xor"])
def test_a_vjp_off_by_one_percent_fails(spec, vae_spec, monkeypatch, capsys):
    _broken_matmul(monkeypatch)
    path = vae_spec if spec == "vae" else ROOT / "examples" / "xor.toml"
    assert main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    rows = _table(captured.out)
    assert rows["W1" if spec == "xor" else "We"][-1] == "FAIL"
    assert "gradient check FAILED" in captured.err


def test_options_and_user_errors(vae_spec, capsys):
    assert main(["check", str(vae_spec), "--perturb", "0.05", "--max-elements", "5", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "+ 0.05·N(0,1)" in out and _table(out)["We"][-5] == "7"    # 5 entries + 2 directions
    assert main(["check", str(vae_spec), "--jitter", "0"]) == 0
    assert "constant inits" not in capsys.readouterr().out
    for bad in (["--perturb", "-1"], ["--perturb", "nan"], ["--max-elements", "0"]):
        assert main(["check", str(vae_spec), *bad]) == 2


# ----- where the check runs ----------------------------------------------------------------
def test_check_point_is_the_inits_with_constant_ones_jittered():
    import backcomp
    m = backcomp.build(ROOT / "examples" / "xor.toml")
    inits = m.init_params(0, dtype=np.float64)
    exact = check_point(m, 0, jitter=0)
    assert all(np.array_equal(exact[k], inits[k]) for k in inits)
    p = check_point(m, 0)
    assert [k for k in p if not np.array_equal(p[k], inits[k])] == ["b1", "b2"]   # zeros inits only
    assert all(np.abs(p[k] - inits[k]).max() < 0.05 for k in p)
    moved = check_point(m, 0, perturb=0.1)
    assert all(not np.array_equal(moved[k], inits[k]) for k in p)


def test_labels_are_drawn_in_the_models_class_range():
    """From the module's INDEX_RANGES: every class in [0, 10) appears, nothing outside."""
    import backcomp
    m = backcomp.build(ROOT / "examples" / "digits_mlp.toml")
    assert m.INDEX_RANGES == {"labels": (0, 10)}
    labels = random_inputs(m, batch=200, seed=0)["labels"]
    assert labels.min() == 0 and labels.max() == 9


# ----- the algorithm, on functions with known gradients ----------------------------------------
def _smooth():
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.uniform(0.5, 2, 5), "c": np.array(0.7)}

    def loss(p):
        return np.sum(np.exp(0.3 * p["a"])) * np.sum(np.log(p["b"])) + np.sin(p["c"]) * np.sum(p["a"] ** 3)

    def grads(p):
        ea, lb = np.exp(0.3 * p["a"]), np.sum(np.log(p["b"]))
        return {"a": 0.3 * ea * lb + 3 * np.sin(p["c"]) * p["a"] ** 2, "b": np.sum(ea) / p["b"],
                "c": np.cos(p["c"]) * np.sum(p["a"] ** 3)}
    return loss, params, grads(params)


def test_exact_gradients_pass_with_a_tight_tolerance():
    loss, params, grads = _smooth()
    rows = compare_gradients(loss, params, grads)
    assert [r["name"] for r in rows] == ["a", "b", "c", "(all)"]
    assert [r["probes"] for r in rows] == [14, 7, 3, 2]
    for r in rows:
        assert r["ok"], r
        assert r["tol"] < 1e-6 * max(abs(r["ad"]), 1.0)     # far tighter than a 1% error


@pytest.mark.parametrize("factor", [1.01, 0.999])
def test_one_scaled_gradient_fails_its_row_and_the_joint_directions(factor):
    loss, params, grads = _smooth()
    grads["b"] = grads["b"] * factor
    ok = {r["name"]: r["ok"] for r in compare_gradients(loss, params, grads)}
    assert ok == {"a": True, "b": False, "c": True, "(all)": False}


def test_one_wrong_entry_fails_per_element():
    loss, params, grads = _smooth()
    grads["a"] = grads["a"].copy()
    grads["a"][1, 2] *= 1.0001
    assert not compare_gradients(loss, params, grads)[0]["ok"]


def test_tolerance_follows_the_noise_of_the_loss():
    """A loss computed with 1e-11 relative noise (deep nets, big sums): a fixed rtol of
    1e-6 on central differences (error ~σ/h ≈ 1e-5) would fail the right gradient."""
    loss, params, grads = _smooth()

    def noisy(p):
        key = int.from_bytes(hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in p.values())).digest()[:8],
                             "little")
        value = loss(p)
        return value * (1 + 1e-11 * np.random.default_rng(key).standard_normal())
    rows = compare_gradients(noisy, params, grads)
    assert all(r["ok"] for r in rows), rows
    assert max(r["error"] / max(abs(r["ad"]), 1e-3) for r in rows) > 1e-6
    grads["c"] = grads["c"] * 1.01
    assert not compare_gradients(noisy, params, grads)[2]["ok"]


# ----- one checker for the whole project -----------------------------------------------------
def test_one_finite_difference_checker():
    """conftest's gradcheck and the emitted test run backcomp.check; no other FD loop."""
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert "check_gradients(" in conftest and "/ (2 * eps)" not in conftest and "def numeric_grad" not in conftest
    cli = (ROOT / "backcomp" / "cli.py").read_text()
    assert "/ (2 * EPS)" not in cli and "TEST_TEMPLATE" not in cli
    assert inspect.getsource(compare_gradients) in standalone_source()


def test_emitted_test_fails_on_a_module_with_a_wrong_gradient(tmp_path):
    out = tmp_path / "mlp_mod.py"
    assert main(["compile", str(ROOT / "examples" / "mlp.toml"), "-o", str(out), "--emit-test"]) == 0
    test_file = tmp_path / "test_mlp_mod.py"
    assert inspect.getsource(compare_gradients) in test_file.read_text()
    env = dict(os.environ, PYTHONPATH="")

    def pytest_run():
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    r = pytest_run()
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    at = text.index('"W2": ', text.index("\ndef value_and_grad("))   # in value_and_grad's return statement
    out.write_text(text[:at] + '"W2": 1.01 * ' + text[at + len('"W2": '):])
    r = pytest_run()
    assert r.returncode == 1 and "dloss/dW2" in r.stdout, r.stdout + r.stderr


# A clipped straight-through estimator and a frozen target: the gradient treats both
# stop_gradient values as constants, so the plain loss (whose slope through clip is 0
# past ±0.05) is the wrong function to difference; the check holds them fixed.
STOP_GRADIENT = """
[model]
name = "ste"
loss = "loss"
[inputs]
x = ["B", 4]
y = ["B", 2]
[params]
W = [4, 2]
target = [4, 2]
[graph]
q = "W + stop_gradient(clip(W, -0.05, 0.05) - W)"
d = "x @ q - y"
reg = "sum((W - stop_gradient(target * 2)) ** 2)"
loss = "mean(d ** 2) + 0.1 * reg"
"""


def test_stop_gradient_values_are_held_fixed_by_the_differences(tmp_path, capsys):
    path = tmp_path / "ste.toml"
    path.write_text(STOP_GRADIENT)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hold the 2 stop_gradient value(s) fixed" in out
    assert {k: v[-1] for k, v in _table(out).items()} == {"W": "ok", "target": "ok", "(all)": "ok"}


def test_a_wrong_vjp_still_fails_with_stop_gradients_held(tmp_path, monkeypatch, capsys):
    _broken_matmul(monkeypatch)
    path = tmp_path / "ste.toml"
    path.write_text(STOP_GRADIENT)
    assert main(["check", str(path)]) == 1
    assert _table(capsys.readouterr().out)["W"][-1] == "FAIL"
