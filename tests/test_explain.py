"""explain: derivative expressions checked against the hand derivations of the references.

The references (shared/references/003, 004) derive σ′(z) = σ(z)(1 − σ(z)),
sigmoid + cross-entropy ⇒ ∂L/∂z = a − y, softmax + cross-entropy ⇒ (A − Y)/B,
∂L/∂W = δ aᵀ (here with row-major batches: ḡ_W = aᵀ · δ) and ∂L/∂b = Σ_B δ.
"""
from __future__ import annotations

import math

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import backcomp
from backcomp.explain import derive, explain, to_dot
from backcomp.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def xor():
    return explain(load_spec(ROOT / "examples" / "xor.toml"))


@pytest.fixture(scope="module")
def mlp():
    return explain(load_spec(ROOT / "examples" / "mlp.toml"))


def lines_for(report: str, node: str) -> list[str]:
    blocks = report.split("\n\n")
    for b in blocks:
        if b.startswith(f"{node} = "):
            return [line.strip() for line in b.splitlines()]
    raise AssertionError(f"no block for {node}:\n{report}")


def test_xor_sigmoid_derivative(xor):
    block = lines_for(xor, "h1")
    assert block[0].startswith("h1 = σ(z1)")
    # σ′(z) = σ(z)(1 − σ(z)), written with the forward value h1 = σ(z1)
    assert squash(block[1]) == squash("ḡ_z1 = h1 ⊙ ḡ_h1 ⊙ (1 - h1)")


def test_xor_sigmoid_cross_entropy_gives_a_minus_y(xor):
    block = lines_for(xor, "loss")
    term = squash(block[1])
    assert term.startswith("ḡ_z2=ḡ_loss⊙")
    assert "(-t+σ(z2))/B" in term      # (a − y)/B with a = σ(z2)


def test_xor_weight_gradients_are_delta_times_activation(xor):
    z2 = lines_for(xor, "z2")
    assert "ḡ_W2 = h1ᵀ · ḡ_z2" in z2
    assert "ḡ_h1 = ḡ_z2 · W2ᵀ" in z2
    assert "ḡ_b2 = Σ_B(ḡ_z2)" in z2
    z1 = lines_for(xor, "z1")
    assert "ḡ_W1 = xᵀ · ḡ_z1" in z1


def test_mlp_relu_and_softmax_cross_entropy(mlp):
    assert squash(lines_for(mlp, "h1")[1]) == squash("ḡ_z1 = ḡ_h1 ⊙ (h1 > 0)")
    loss = squash("\n".join(lines_for(mlp, "loss")))
    # (softmax(logits) Σy − y)/B ⊙ ḡ_loss: equals (A − Y)/B for one-hot Y (Σy = 1)
    assert "ḡ_logits=ḡ_loss⊙(-y+softmax[axis=1](logits)⊙Σ[axis=1](y))/B" in loss
    assert "ḡ_W1+=0.001·W1⊙ḡ_loss" in loss   # the L2 term lam·W1
    assert "ḡ_W1 sums 2 terms" in mlp


def test_fan_out_accumulates():
    report = explain(load_spec(ROOT / "examples" / "residual_mlp.toml"))
    assert "ḡ_h sums 2 terms: (from r) + (from h2)" in report
    assert "ḡ_h += ḡ_h2" in report


def test_wrt_prints_the_chain_from_the_loss():
    report = explain(load_spec(ROOT / "examples" / "xor.toml"), wrt="W1")
    order = [b.split(" = ")[0] for b in report.split("\n\n")[1:]]
    assert order == ["loss", "z2", "h1", "z1"]
    assert "ḡ_W2" not in report and "ḡ_W1 = xᵀ · ḡ_z1" in report


def test_latex():
    report = explain(load_spec(ROOT / "examples" / "xor.toml"), latex=True, node="h1")
    assert r"\sigma\left(z_{1}\right)" in report or r"\sigma\left(z1\right)" in report
    assert r"\bar{g}_{z1} = h1 \odot \bar{g}_{h1} \odot \left(1 - h1\right)" in report


def test_logistic_l2_matches_the_lecture():
    # w̄ = z̄ x + r̄ w, with r̄ = λ
    report = explain(load_spec(ROOT / "examples" / "logistic_l2.toml"))
    assert "ḡ_w += x ⊙ ḡ_z" in report and "ḡ_w += w ⊙ ḡ_R" in report
    assert "ḡ_R = 0.01·ḡ_L_reg" in report
    assert "ḡ_y = ḡ_L ⊙ (-t + y)" in report


# ----- the explanations compute the gradients ---------------------------------------------
class Evaluate:
    """NumPy values of explain's expressions: SymPy arithmetic elementwise, and the tensor
    functions explain prints (``matmul``, ``T``, ``Σ_B``, ``softmax[axis=1]``, ...) as the
    operations their text names.  ``classes`` sizes ``onehot(labels)``.

    The text of a reduction over an axis does not say whether the axis is kept
    (``Σ[axis=2]`` is kept inside a softmax VJP, dropped in a loss): they all keep it
    here, as does ``logits[labels]``, so operands line up, and ``fit`` drops kept axes
    where a value's shape is known (named nodes, VJP terms)."""

    def __init__(self, values: dict[str, np.ndarray]):
        self.values = values
        self.classes = None

    def __call__(self, e):
        if isinstance(e, sp.Symbol):
            return self.values[e.name]
        if e.is_number:   # also pi, sqrt(2)
            return float(e)
        if isinstance(e, sp.Piecewise):   # norm's safe square root
            out = self(e.args[-1].expr)
            for piece in reversed(e.args[:-1]):
                out = np.where(self(piece.cond), self(piece.expr), out)
            return out
        args = [self(a) for a in e.args]
        if isinstance(e, sp.Add):
            return sum(args[1:], args[0])
        if isinstance(e, sp.Mul):
            return np.prod(np.broadcast_arrays(*args), axis=0) if len(args) > 1 else args[0]
        if isinstance(e, sp.Pow):
            return np.power(args[0], args[1])
        if isinstance(e, sp.Max):
            return np.maximum(*args)
        if isinstance(e, sp.Heaviside):
            return np.heaviside(args[0], args[1] if len(args) > 1 else 0.5)
        if isinstance(e, sp.StrictGreaterThan):
            return args[0] > args[1]
        name = type(e).__name__
        simple = {"tanh": np.tanh, "exp": np.exp, "sin": np.sin, "log": np.log, "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
                  "softplus": lambda z: np.logaddexp(0, z), "matmul": np.matmul,
                  "erf": np.vectorize(math.erf),
                  "T": lambda a: np.swapaxes(a, -1, -2),
                  "take_label": lambda a, i: np.take_along_axis(a, i[..., None], -1),
                  "onehot": lambda _, i: np.eye(self.classes)[i]}
        if name in simple:
            return simple[name](*args)
        base, _, rest = name.partition("[")
        if rest:   # attributes: "softmax[axis=2]", "Σ[axis=0,2]", "einsum[bts,bsd->btd]"
            if base == "einsum":
                return np.einsum(rest[:-1], *args)
            axis = tuple(int(a) for a in rest[:-1].removeprefix("axis=").split(","))
        else:
            axis = None
        if base.startswith("Σ_"):   # Σ over the named (leading) symbolic dims
            return np.sum(args[0], axis=tuple(range(len(base[2:].split(",")))))
        x = args[0]
        if base == "Σ":
            return np.sum(x, axis=axis, keepdims=axis is not None)
        if base == "mean":
            return np.mean(x, axis=axis, keepdims=axis is not None)
        if base in ("softmax", "logsumexp"):
            top = np.max(x, axis=axis, keepdims=True)
            lse = top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))
            return np.exp(x - lse) if base == "softmax" else lse
        raise AssertionError(f"no numeric meaning for {name} in {e}")


def fit(a, shape: tuple) -> np.ndarray:
    """A value in its known shape: broadcast, or with kept size-1 axes dropped."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape and a.size == int(np.prod(shape)) and np.squeeze(a).shape == tuple(d for d in shape if d != 1):
        return a.reshape(shape)
    return np.broadcast_to(a, shape)


#: examples whose explanations the evaluator above can compute (the CNNs: conv2d, pool and
#: conv_transpose2d internals, which explain prints as opaque calls; pinn, gradient_penalty: the
#: terms through their grad nodes read the nodes' seed of ones as 1 (1ᵀ · X is a sum over
#: rows), whose shape the text leaves out; both are checked by value in test_grad.py;
#: vae, digits_bn_cnn: random draws (normal, dropout masks) the evaluator cannot reproduce,
#: and digits_bn_cnn's conv2d and buffers; gpt_char: integer ids of embeddings, which the
#: evaluator draws only as labels.  All three are checked
#: against finite differences by `backcomp check` in test_check.py)
#: the loop examples: a loop's line is shown as written and its VJPs in the step's block,
#: checked in test_scan.py
NOT_EVALUATED = {"digits_cnn", "conv1d_classifier", "conv_autoencoder", "pinn", "gradient_penalty", "vae",
                 "digits_bn_cnn", "gpt_char", "char_lstm", "gru", "lstm", "rnn"}
EVALUATED = sorted(p.stem for p in (ROOT / "examples").glob("*.toml") if p.stem not in NOT_EVALUATED)


def test_every_example_is_evaluated_or_says_why_not():
    stems = {p.stem for p in (ROOT / "examples").glob("*.toml")}
    assert NOT_EVALUATED <= stems and len(EVALUATED) >= len(stems) - len(NOT_EVALUATED) >= 10


@pytest.mark.parametrize("name", EVALUATED)
def test_explained_derivatives_compute_the_modules_gradients(name):
    """Evaluate every node's forward expression in graph order, then every VJP term in
    reverse (ḡ_loss = 1, ḡ_v = Σ of the terms its consumers send): the loss, the outputs
    and each parameter's gradient equal the compiled module's, in float64."""
    graph = load_spec(ROOT / "examples" / f"{name}.toml")
    maths, _ = derive(graph)
    module = backcomp.build(graph)
    rng = np.random.default_rng(3)
    params = {k: 0.5 * rng.standard_normal(s) for k, s in module.PARAMS.items()}
    classes = {n.inputs[1].name: n.inputs[0].shape[-1] for n in graph.nodes if n.op == "take_label"}
    inputs, dims = {}, {}
    for k, shape in module.INPUTS.items():
        shape = tuple(dims.setdefault(d, 3) if isinstance(d, str) else d for d in shape)
        inputs[k] = rng.integers(0, classes[k], shape) if module.INPUT_KINDS[k] == "int" else rng.standard_normal(shape)
    values = Evaluate({**params, **inputs, **{d: float(n) for d, n in dims.items()}})
    for m in maths:
        values.values[m.name] = fit(values(m.forward), tuple(dims.get(d, d) for d in m.shape))
    out = module.forward({k: v.copy() for k, v in params.items()}, inputs)
    for k, v in out.items():
        np.testing.assert_allclose(values.values[k], v, rtol=1e-9, atol=1e-12, err_msg=f"forward of {k}")
    loss, grads = module.value_and_grad({k: v.copy() for k, v in params.items()}, inputs)
    bars = {module.LOSS: np.ones(())}
    for m in reversed(maths):
        if m.name not in bars:
            continue
        values.values[f"ḡ_{m.name}"] = bars[m.name]
        for v, term in m.vjps.items():
            values.classes = values.values[v].shape[-1] if values.values[v].ndim else None
            bars[v] = bars.get(v, 0) + fit(values(term), values.values[v].shape)
    np.testing.assert_allclose(values.values[module.LOSS], loss, rtol=1e-9)
    assert set(grads) <= set(bars), f"explain has no term for {sorted(set(grads) - set(bars))}"
    for k, g in grads.items():
        np.testing.assert_allclose(bars[k], g, rtol=1e-8, atol=1e-12, err_msg=f"ḡ_{k}")


@pytest.mark.parametrize("name", ["attention", "layernorm", "functions", "residual_mlp"])
def test_backward_graph_renders_as_dot(name):
    dot = to_dot(load_spec(ROOT / "examples" / f"{name}.toml"), backward=True)
    assert dot.startswith("digraph") and "loss_bar" in dot     # the backward nodes are drawn


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "examples").glob("*.toml")))
def test_latex_renders_for_every_example(spec):
    """LaTeX templates go through str.format: literal braces must be escaped."""
    r = subprocess.run([sys.executable, "-m", "backcomp", "explain", str(ROOT / "examples" / spec), "--latex"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r"\bar{g}" in r.stdout


def test_latex_of_random_ops_masks_and_transposes():
    """The LaTeX templates of dropout masks, normal/uniform draws, tril/triu, arange and
    transpose with axes hold literal braces: they were str.format'ed unescaped (KeyError
    'N', 'tril', 'transpose'; IndexError for the mask)."""
    from backcomp.spec import parse_spec
    graph = parse_spec("""
[model]
loss = "loss"
[inputs]
x = ["B", "T", 4]
[params]
W = [4, 4]
[graph]
h = "dropout(transpose(x @ W, (1, 0, 2)), p=0.5) + normal((T, B, 4)) * uniform((T, B, 4), low=-1.0)"
s = "where(tril(ones((B, B))) + triu(ones((B, B)), k=1) > 0, h @ transpose(h, (0, 2, 1)), 0.0)"
loss = "sum(s) + sum(take(sum(x, axis=2), arange(T), axis=1) * one_hot(arange(B), 3)[:, :1])"
""", "latex_braces.toml")
    tex = explain(graph, latex=True)
    for piece in (r"\mathcal{N}_{", r"\mathcal{U}_{", r"m_{", r"\operatorname{tril}_{0}\left(",
                  r"\operatorname{triu}_{1}\left(", r"\operatorname{arange}(T)", r"\mathrm{transpose}_{(1, 0, 2)}\left(",
                  r"\operatorname{take}_{1}\left(", r"\operatorname{one\_hot}_{3}\left("):
        assert piece in tex, piece
    from string import Formatter
    from backcomp.notation import FORMATS
    for key, fmt in FORMATS.items():      # every template seen so far: only positional slots
        for template in (fmt.text, fmt.latex):
            fields = [f for _, f, _, _ in Formatter().parse(template) if f is not None]
            assert all(f.isdigit() for f in fields), (key, template)


def test_indexing_and_its_vjp_read_as_subscripts():
    """``z[:, 16:32]`` and ``scatter(v, [:, 16:32], (B, 64))``, not
    ``getitem(z, index=(slice(None, None, None), slice(16, 32, None)))``."""
    text = explain(load_spec(ROOT / "examples" / "lstm.toml"))
    assert "c_new = c ⊙ σ(z[:, 16:32]) + σ(z[:, :16]) ⊙ tanh(z[:, 32:48])" in text, text
    assert "scatter(ḡ_h_new ⊙ (1 - σ(z[:, 48:])) ⊙ σ(z[:, 48:]) ⊙ tanh(c_new), [:, 48:], (B, 64))" in text, text
    assert "slice(" not in text and "index=" not in text
    gpt = explain(load_spec(ROOT / "examples" / "gpt_char.toml"))
    assert "x0 = P[:T] + E[ids]" in gpt and "ḡ_P = scatter(Σ_B(ḡ_x0), [:T], (32, 64))" in gpt, gpt
    latex = explain(load_spec(ROOT / "examples" / "gpt_char.toml"), latex=True)
    assert r"x0 = {P}_{[:T]} + E_{[ids]}" in latex and r"\operatorname{scatter}_{[:T] \to (32, 64)}" in latex, latex


def test_a_subscript_of_a_sum_is_parenthesised():
    from backcomp import ops
    g = backcomp.Graph("sub")
    x, W, b = g.input("x", ("B", 4)), g.param("W", (4, 6)), g.param("b", (6,))
    g.loss(ops.sum(ops.tanh((x @ W + b)[:, 1:3])), "loss")
    text = explain(g)
    assert "(b + x · W)[:, 1:3]" in text, text
