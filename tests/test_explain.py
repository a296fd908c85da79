"""explain: derivative expressions checked against the hand derivations of the references.

The references (shared/references/003, 004) derive σ′(z) = σ(z)(1 − σ(z)),
sigmoid + cross-entropy ⇒ ∂L/∂z = a − y, softmax + cross-entropy ⇒ (A − Y)/B,
∂L/∂W = δ aᵀ (here with row-major batches: ḡ_W = aᵀ · δ) and ∂L/∂b = Σ_B δ.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", ["attention", "layernorm", "functions", "residual_mlp"])
def test_every_example_explains(name):
    maths, _ = derive(load_spec(ROOT / "examples" / f"{name}.toml"))
    assert all(m.forward is not None for m in maths)
    assert to_dot(load_spec(ROOT / "examples" / f"{name}.toml"), backward=True).startswith("digraph")


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "examples").glob("*.toml")))
def test_latex_renders_for_every_example(spec):
    """LaTeX templates go through str.format: literal braces must be escaped."""
    r = subprocess.run([sys.executable, "-m", "backcomp", "explain", str(ROOT / "examples" / spec), "--latex"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r"\bar{g}" in r.stdout
