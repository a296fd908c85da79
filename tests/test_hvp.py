"""The generated ``jvp`` and ``hvp`` functions (``emit="jvp,hvp"``, CLI ``--emit jvp,hvp``).

On every example spec, in float64: ``hvp`` against central differences of the
gradient and against ``torch.func.jvp(torch.func.grad(f))``; ``jvp`` against central
differences of the outputs and against ``torch.func.jvp``.  The torch side evaluates
the same graph op by op (tests/torch_graph.py) and differentiates it itself.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp.spec import load_spec
from backcomp import ops
from backcomp.check import fixed_draws

from conftest import Copying, draw

torch = pytest.importorskip("torch")
from torch_graph import evaluate, loss_fn, tensors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "examples").glob("*.toml"))
#: specs whose inputs must be drawn from a domain other than the default
DOMAINS: dict[str, dict[str, str]] = {}
#: examples the torch reference (tests/torch_graph.py) cannot evaluate: their jvp and hvp
#: are compared with finite differences (with fixed draws and fresh buffers) only
NO_TORCH = {"vae": "normal() draws", "digits_bn_cnn": "dropout masks and batch_norm buffers",
            "gpt_char": "take (the embeddings) and cross_entropy's ignore_index"}


def _random_like(arrays: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape) for k, v in arrays.items() if v.dtype.kind == "f"}


def _model(spec: Path):
    graph = load_spec(spec)
    m = backcomp.build(spec, emit="jvp,hvp")
    params, inputs = draw(m, DOMAINS.get(spec.stem), batch=3, seed=1)
    params = {k: np.asarray(v * 0.5 + 0.1 * np.random.default_rng(2).standard_normal(v.shape)) for k, v in params.items()}
    return graph, Copying(m), m, params, inputs


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_hvp_matches_finite_differences_and_torch(spec):
    graph, checked, m, params, inputs = _model(spec)
    v = _random_like({k: params[k] for k in m.WRT}, seed=3)
    hv = m.hvp({k: a.copy() for k, a in params.items()}, inputs, v, **fixed_draws(m))
    assert set(hv) == set(m.WRT)
    for k in m.WRT:
        assert hv[k].shape == params[k].shape and hv[k].dtype == np.float64

    h = 1e-5
    up = checked.value_and_grad({k: a + h * v[k] if k in v else a for k, a in params.items()}, inputs)[1]
    down = checked.value_and_grad({k: a - h * v[k] if k in v else a for k, a in params.items()}, inputs)[1]
    for k in m.WRT:
        fd = (up[k] - down[k]) / (2 * h)
        scale = max(1e-3, float(np.abs(fd).max()))
        np.testing.assert_allclose(hv[k], fd, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{spec.stem}: H·v [{k}]")
    if spec.stem in NO_TORCH:
        return   # H·v matched finite differences above; no torch reference for NO_TORCH[spec.stem]

    f = loss_fn(graph, tensors(inputs), tuple(m.WRT), tensors(params))
    P = {k: torch.from_numpy(np.array(params[k])) for k in m.WRT}
    V = {k: torch.from_numpy(np.array(v[k])) for k in m.WRT}
    _, ref = torch.func.jvp(torch.func.grad(f), (P,), (V,))
    for k in m.WRT:
        np.testing.assert_allclose(hv[k], ref[k].numpy(), rtol=1e-9, atol=1e-12 * max(1.0, float(ref[k].abs().max())),
                                   err_msg=f"{spec.stem}: H·v [{k}] vs torch")


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_jvp_matches_finite_differences_and_torch(spec):
    graph, checked, m, params, inputs = _model(spec)
    floats = {k: a for k, a in inputs.items() if a.dtype.kind == "f"}
    tangents = _random_like({**params, **floats}, seed=4)
    out, tan = m.jvp(params, inputs, tangents, **fixed_draws(m))
    expected = m.forward(params, inputs, **fixed_draws(m))
    assert set(out) == set(tan) == set(m.OUTPUTS)
    for k in out:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-12, atol=1e-14)

    h = 1e-6
    shift = lambda s: ({k: a + s * tangents[k] for k, a in params.items()},   # noqa: E731
                       {k: a + s * tangents[k] if k in tangents else a for k, a in inputs.items()})
    up, down = checked.forward(*shift(h)), checked.forward(*shift(-h))
    for k in tan:
        fd = (up[k] - down[k]) / (2 * h)
        scale = max(1e-3, float(np.abs(fd).max()))
        np.testing.assert_allclose(tan[k], fd, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{spec.stem}: tangent of {k}")
    if spec.stem in NO_TORCH:
        return   # the tangents matched finite differences above; no torch reference for NO_TORCH[spec.stem]

    outputs = [graph.outputs[k] if k in graph.outputs else graph.loss_node for k in m.OUTPUTS]
    ints = {k: torch.from_numpy(a) for k, a in inputs.items() if a.dtype.kind != "f"}

    def f(values):
        return tuple(evaluate(graph, {k: values[k] for k in params}, {**values, **ints}, outputs))
    primal = tensors({**params, **floats})
    _, ref = torch.func.jvp(f, (primal,), (tensors(tangents),))
    for k, r in zip(m.OUTPUTS, ref):
        np.testing.assert_allclose(tan[k], r.numpy(), rtol=1e-9, atol=1e-12 * max(1.0, float(r.abs().max())),
                                   err_msg=f"{spec.stem}: tangent of {k} vs torch")


# ----- the functions' contract ---------------------------------------------------------------
def _small():
    g = backcomp.Graph("small")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 2))
    b = g.param("b", (2,))
    v = g.assign_name("v", ops.tanh(x @ W + b))   # a value named like hvp's argument
    g.output("v", v)
    g.loss(ops.mean(v ** 2))
    return g


def test_missing_tangents_are_zero_and_results_are_fresh():
    m = backcomp.build(_small(), emit=("jvp", "hvp"))
    rng = np.random.default_rng(0)
    P = {"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    X = rng.standard_normal((4, 3))
    tW = rng.standard_normal((3, 2))
    _, only_w = m.jvp(P, {"x": X}, {"W": tW})
    _, full = m.jvp(P, {"x": X}, {"W": tW, "b": np.zeros(2), "x": np.zeros((4, 3))})
    np.testing.assert_array_equal(only_w["v"], full["v"])
    _, none = m.jvp(P, {"x": X}, {})
    assert not np.any(none["v"])
    hv = m.hvp(P, {"x": X}, {"W": tW})
    hv_full = m.hvp(P, {"x": X}, {"W": tW, "b": np.zeros(2)})
    np.testing.assert_array_equal(hv["W"], hv_full["W"])
    hv["W"][...] = 0   # fresh arrays, not views of anything the module keeps
    np.testing.assert_array_equal(m.hvp(P, {"x": X}, {"W": tW})["b"], hv_full["b"])


def test_float32_stays_float32():
    m = backcomp.build(_small(), emit="jvp,hvp")
    rng = np.random.default_rng(1)
    P = {"W": rng.standard_normal((3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    X = rng.standard_normal((4, 3)).astype(np.float32)
    out, tan = m.jvp(P, {"x": X}, {"x": np.ones((4, 3))})   # a float64 tangent is cast to x's dtype
    assert {a.dtype for a in (*out.values(), *tan.values())} == {np.dtype(np.float32)}
    hv = m.hvp(P, {"x": X}, {"W": np.ones((3, 2), np.float32)})
    assert {a.dtype for a in hv.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("call, message", [
    (lambda m, P, I: m.jvp(P, I, {"nope": np.ones(2)}), r"tangents: unknown 'nope' \(tangents may be given for W, b, x\)"),
    (lambda m, P, I: m.jvp(P, I, {"W": np.ones((2, 3))}), r"tangents 'W' must have the shape of 'W', \(3, 2\), got shape \(2, 3\)"),
    (lambda m, P, I: m.jvp(P, I, {"x": np.ones((4, 3), dtype=int)}), r"tangents 'x' must be a floating-point array"),
    (lambda m, P, I: m.jvp(P, I, [np.ones(2)]), r"tangents must be a dict of arrays, got list"),
    (lambda m, P, I: m.hvp(P, I, {"x": np.ones((4, 3))}), r"v: unknown 'x' \(tangents may be given for W, b\)"),
    (lambda m, P, I: m.hvp(P, {"x": np.ones((4, 2))}, {}), r"input 'x' must have shape \(B, 3\)"),
])
def test_tangent_validation(call, message):
    m = backcomp.build(_small(), emit="jvp,hvp")
    P = {"W": np.ones((3, 2)), "b": np.ones(2)}
    with pytest.raises(ValueError, match=message):
        call(m, P, {"x": np.ones((4, 3))})


def test_not_emitted_unless_asked_and_unknown_names_refused():
    m = backcomp.build(_small())
    assert not hasattr(m, "jvp") and not hasattr(m, "hvp")
    assert hasattr(backcomp.build(_small(), emit="hvp"), "hvp")
    with pytest.raises(ValueError, match="unknown function to emit: jacobian"):
        backcomp.compile_source(_small(), emit="jvp,jacobian")


def test_hvp_is_deterministic_and_optimised():
    """Same graph, same bytes; and the passes ran (the -O1 text is shorter than -O0's)."""
    a = backcomp.compile_source(_small(), emit="jvp,hvp")
    assert a == backcomp.compile_source(_small(), emit="hvp,jvp")
    assert len(a) < len(backcomp.compile_source(_small(), emit="jvp,hvp", opt_level=0))
    assert "# tangent of" in a


def test_cli_emit(tmp_path):
    out = tmp_path / "mlp.py"
    proc = subprocess.run([sys.executable, "-m", "backcomp", "compile", str(ROOT / "examples" / "mlp.toml"),
                           "-o", str(out), "--emit", "jvp,hvp"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "\ndef jvp(params, inputs, tangents):" in text and "\ndef hvp(params, inputs, v):" in text
    bad = subprocess.run([sys.executable, "-m", "backcomp", "compile", str(ROOT / "examples" / "mlp.toml"),
                          "-o", str(tmp_path / "x.py"), "--emit", "hessian"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown function to emit: hessian" in bad.stderr


def test_hvp_of_a_loss_holding_second_derivatives():
    """A PINN-style loss (d²u/dx² inside): its hvp against differences of its gradient."""
    g = backcomp.Graph("pinn_small")
    x = g.input("x", ("B", 1))
    W1, b1, W2 = g.param("W1", (1, 5)), g.param("b1", (5,)), g.param("W2", (5, 1))
    u = ops.tanh(x @ W1 + b1) @ W2
    d2u = ops.grad(ops.sum(ops.grad(ops.sum(u), x)), x)
    g.loss(ops.mean((d2u + ops.sin(x)) ** 2) + ops.mean(u ** 2))
    m = backcomp.build(g, emit="hvp")
    rng = np.random.default_rng(5)
    P = {k: rng.standard_normal(s) for k, s in m.PARAMS.items()}
    I = {"x": rng.uniform(0, 1, (6, 1))}
    v = {k: rng.standard_normal(s) for k, s in m.PARAMS.items()}
    hv = m.hvp(P, I, v)
    h = 1e-5
    up = m.value_and_grad({k: P[k] + h * v[k] for k in P}, I)[1]
    down = m.value_and_grad({k: P[k] - h * v[k] for k in P}, I)[1]
    for k in P:
        np.testing.assert_allclose(hv[k], (up[k] - down[k]) / (2 * h), rtol=1e-5, atol=1e-7)
