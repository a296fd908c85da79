"""Issue 13's benchmark suite: one value_and_grad step of seven models, float32, 2 threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/suite.py
        [--repeats 15] [--threads 2] [--only transformer,cnn] [--json out.json]
        [--profile MODEL] [--smoke]

The models, each written as a spec (below) and compiled by backcomp:

- ``transformer``: a pre-LN transformer encoder block, B 16, T 64, d 128, 4 heads
  (reshape/transpose into heads, scores scaled by 1/sqrt(32), softmax), GELU MLP 4d,
  two residuals; loss mse against a target;
- ``gelu_mlp``: B 256, 512-1024-1024-10, exact GELU, integer-label cross-entropy;
- ``cnn``: B 64, 1x28x28, conv3x3x16 (padding 1), relu, 2x2 max pool, conv3x3x32,
  relu, pool, dense 10;
- ``rnn``: a tanh RNN unrolled 8 steps in the spec, B 64, 64 -> 128, classifier on the
  last state;
- ``relu_mlp``: B 128, 784-256-256-10, softmax cross-entropy on one-hot targets;
- ``lstm``: benchmarks/rnn.py's LSTM as a ``scan`` (one loop forward, one reversed loop
  backward), B 32, T 64, D 64, H 128, loss ``sum(hs * u)`` over the outputs;
- ``gpt_block``: token and position embeddings, one pre-LN causal self-attention block
  (4 heads, mask by ``tril``/``where``), GELU MLP 4d (tanh form, as GPT-2), final layer
  norm, untied output projection, ``cross_entropy`` over a vocabulary of 65, B 16, T 64,
  d 128.

Each model is also written in PyTorch (eager, ``torch.autograd.grad``) and in JAX
(``jax.jit(jax.value_and_grad(...))``), and for the ReLU MLP there is the hand-written
NumPy backprop of benchmarks/peers.py.  The LSTM's spec and peers are benchmarks/rnn.py's
(``torch.nn.LSTM``, ``lax.scan``, its hand-written NumPy BPTT).  All are first checked to agree with the
generated module on the same data (loss and every gradient, float32 tolerances), then
timed with ``timing.interleaved_medians`` at ``--threads`` threads (``pin_threads``),
model by model, in one process, so the ratios come from one run.  The table gives
medians and backcomp ÷ peer, with geometric means over the suite.

``--profile MODEL`` (repeatable, or ``all``) prints the per-statement profile of the
generated module's value_and_grad: each top-level statement of its source run on its
own, timed over several calls, median per statement; and inside each loop (a scan's
forward and backward), each body statement's time summed over the steps.  ``--smoke`` runs tiny sizes, one
thread, two rounds of one call and no settling: it checks that the script works and that
the implementations agree (tests/test_suite.py), and its times mean nothing.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

import backcomp  # noqa: E402
import timing  # noqa: E402

MODELS = ("transformer", "gelu_mlp", "cnn", "rnn", "relu_mlp", "lstm", "gpt_block")
TITLES = {
    "transformer": "transformer encoder block (B 16, T 64, d 128, 4 heads, GELU MLP 4d)",
    "gelu_mlp": "GELU MLP (B 256, 512-1024-1024-10)",
    "cnn": "CNN (B 64, 28x28, conv3x3x16, pool, conv3x3x32, pool, dense)",
    "rnn": "tanh RNN unrolled 8 steps (B 64, 64->128)",
    "relu_mlp": "ReLU MLP (B 128, 784-256-256-10)",
    "lstm": "LSTM scan (B 32, T 64, 64->128)",
    "gpt_block": "GPT block with embeddings (B 16, T 64, d 128, 4 heads, vocab 65)",
}


# ----------------------------------------------------------------------------
# Sizes (full, and --smoke)
# ----------------------------------------------------------------------------

def sizes(model: str, smoke: bool) -> dict[str, int]:
    full = {
        "transformer": dict(B=16, T=64, D=128, H=4),
        "gelu_mlp": dict(B=256, d0=512, d1=1024, d2=1024, d3=10),
        "cnn": dict(B=64),
        "rnn": dict(B=64, T=8, I=64, N=128, C=10),
        "relu_mlp": dict(B=128, d0=784, d1=256, d2=256, d3=10),
        "lstm": dict(B=32, T=64, D=64, H=128),
        "gpt_block": dict(B=16, T=64, D=128, H=4, V=65),
    }[model]
    if smoke:
        full = {**full, **{
            "transformer": dict(B=2, T=8, D=16, H=2),
            "gelu_mlp": dict(B=8, d0=16, d1=32, d2=32),
            "cnn": dict(B=4),
            "rnn": dict(B=4, T=3, I=8, N=16),
            "relu_mlp": dict(B=8, d0=16, d1=32, d2=32),
            "lstm": dict(B=3, T=5, D=4, H=8),
            "gpt_block": dict(B=2, T=8, D=16, H=2, V=11),
        }[model]}
    return full


# ----------------------------------------------------------------------------
# The specs
# ----------------------------------------------------------------------------

def transformer_spec(B, T, D, H) -> str:
    dh = D // H
    return f"""\
[model]
name = "suite_transformer"
loss = "loss"
[inputs]
x = ["B", "T", {D}]
target = ["B", "T", {D}]
[params]
g1 = {{ shape = [{D}], init = "ones" }}
be1 = [{D}]
Wq = [{D}, {D}]
bq = [{D}]
Wk = [{D}, {D}]
bk = [{D}]
Wv = [{D}, {D}]
bv = [{D}]
Wo = [{D}, {D}]
bo = [{D}]
g2 = {{ shape = [{D}], init = "ones" }}
be2 = [{D}]
W1 = [{D}, {4 * D}]
c1 = [{4 * D}]
W2 = [{4 * D}, {D}]
c2 = [{D}]
[constants]
scale = {1 / math.sqrt(dh)!r}
[graph]
h = "layer_norm(x, g1, be1)"
q = "transpose(reshape(h @ Wq + bq, (B, T, {H}, {dh})), (0, 2, 1, 3))"
k = "transpose(reshape(h @ Wk + bk, (B, T, {H}, {dh})), (0, 2, 1, 3))"
v = "transpose(reshape(h @ Wv + bv, (B, T, {H}, {dh})), (0, 2, 1, 3))"
att = "softmax(q @ transpose(k, (0, 1, 3, 2)) * scale, axis=-1)"
ctx = "reshape(transpose(att @ v, (0, 2, 1, 3)), (B, T, {D}))"
x1 = "x + ctx @ Wo + bo"
m = "gelu(layer_norm(x1, g2, be2) @ W1 + c1) @ W2 + c2"
out = "x1 + m"
loss = "mse(out, target)"
"""


def gelu_mlp_spec(B, d0, d1, d2, d3) -> str:
    return f"""\
[model]
name = "suite_gelu_mlp"
loss = "loss"
[inputs]
x = ["B", {d0}]
labels = {{ shape = ["B"], dtype = "int64" }}
[params]
W1 = {{ shape = [{d0}, {d1}], init = "he_normal" }}
b1 = [{d1}]
W2 = {{ shape = [{d1}, {d2}], init = "he_normal" }}
b2 = [{d2}]
W3 = [{d2}, {d3}]
b3 = [{d3}]
[graph]
h1 = "gelu(x @ W1 + b1)"
h2 = "gelu(h1 @ W2 + b2)"
logits = "h2 @ W3 + b3"
loss = "mean(softmax_cross_entropy(logits, labels))"
"""


def cnn_spec(B) -> str:
    return """\
[model]
name = "suite_cnn"
loss = "loss"
[inputs]
x = ["B", 1, 28, 28]
labels = { shape = ["B"], dtype = "int64" }
[params]
K1 = { shape = [16, 1, 3, 3], init = "he_normal" }
c1 = [16, 1, 1]
K2 = { shape = [32, 16, 3, 3], init = "he_normal" }
c2 = [32, 1, 1]
W = [1568, 10]
b = [10]
[graph]
h1 = "relu(conv2d(x, K1, padding=1) + c1)"
p1 = "max_pool2d(h1, 2)"
h2 = "relu(conv2d(p1, K2, padding=1) + c2)"
p2 = "max_pool2d(h2, 2)"
logits = "reshape(p2, (-1, 1568)) @ W + b"
loss = "mean(softmax_cross_entropy(logits, labels))"
"""


def rnn_spec(B, T, I, N, C) -> str:
    steps = ['h1 = "tanh(x[:, 0, :] @ Wx + b)"']
    steps += [f'h{t} = "tanh(x[:, {t - 1}, :] @ Wx + h{t - 1} @ Wh + b)"' for t in range(2, T + 1)]
    return f"""\
[model]
name = "suite_rnn"
loss = "loss"
[inputs]
x = ["B", {T}, {I}]
labels = {{ shape = ["B"], dtype = "int64" }}
[params]
Wx = [{I}, {N}]
Wh = [{N}, {N}]
b = [{N}]
Wy = [{N}, {C}]
by = [{C}]
[graph]
{chr(10).join(steps)}
logits = "h{T} @ Wy + by"
loss = "mean(softmax_cross_entropy(logits, labels))"
"""


def relu_mlp_spec(B, d0, d1, d2, d3) -> str:
    return f"""\
[model]
name = "suite_relu_mlp"
loss = "loss"
[inputs]
x = ["B", {d0}]
y = ["B", {d3}]
[params]
W1 = [{d0}, {d1}]
b1 = [{d1}]
W2 = [{d1}, {d2}]
b2 = [{d2}]
W3 = [{d2}, {d3}]
b3 = [{d3}]
[graph]
h1 = "relu(x @ W1 + b1)"
h2 = "relu(h1 @ W2 + b2)"
logits = "h2 @ W3 + b3"
loss = "mean(softmax_cross_entropy(logits, y))"
"""


def lstm_spec(B, T, D, H) -> str:
    """benchmarks/rnn.py's LSTM (batch and time symbolic in the spec)."""
    import rnn
    return rnn.spec("lstm", D=D, H=H)


def gpt_block_spec(B, T, D, H, V) -> str:
    dh = D // H
    return f"""\
[model]
name = "suite_gpt_block"
loss = "loss"
[inputs]
ids = {{ shape = ["B", "T"], dtype = "int64" }}
targets = {{ shape = ["B", "T"], dtype = "int64" }}
[params]
E = {{ shape = [{V}, {D}], init = "normal(0.02)" }}
P = {{ shape = [{T}, {D}], init = "normal(0.02)" }}
g1 = {{ shape = [{D}], init = "ones" }}
be1 = [{D}]
Wq = [{D}, {D}]
Wk = [{D}, {D}]
Wv = [{D}, {D}]
Wo = [{D}, {D}]
bo = [{D}]
g2 = {{ shape = [{D}], init = "ones" }}
be2 = [{D}]
W1 = [{D}, {4 * D}]
c1 = [{4 * D}]
W2 = [{4 * D}, {D}]
c2 = [{D}]
gf = {{ shape = [{D}], init = "ones" }}
bf = [{D}]
Wout = [{D}, {V}]
bout = [{V}]
[constants]
scale = {1 / math.sqrt(dh)!r}
[graph]
x = "embedding(ids, E) + P[:T]"
causal = "tril(ones((T, T)))"
h = "layer_norm(x, g1, be1)"
q = "transpose(reshape(h @ Wq, (B, T, {H}, {dh})), (0, 2, 1, 3))"
k = "transpose(reshape(h @ Wk, (B, T, {H}, {dh})), (0, 2, 1, 3))"
v = "transpose(reshape(h @ Wv, (B, T, {H}, {dh})), (0, 2, 1, 3))"
att = "softmax(where(causal > 0, q @ transpose(k, (0, 1, 3, 2)) * scale, -1e9), axis=-1)"
ctx = "reshape(transpose(att @ v, (0, 2, 1, 3)), (B, T, {D}))"
x1 = "x + ctx @ Wo + bo"
x2 = "x1 + gelu(layer_norm(x1, g2, be2) @ W1 + c1, approximate=True) @ W2 + c2"
logits = "layer_norm(x2, gf, bf) @ Wout + bout"
loss = "cross_entropy(logits, targets)"
"""


SPECS: dict[str, Callable[..., str]] = {
    "transformer": transformer_spec, "gelu_mlp": gelu_mlp_spec, "cnn": cnn_spec,
    "rnn": rnn_spec, "relu_mlp": relu_mlp_spec, "lstm": lstm_spec, "gpt_block": gpt_block_spec,
}


def build_module(model: str, smoke: bool = False, optimizer: str | None = None):
    """The generated module of ``model`` (compiled from its spec, cached by backcomp)."""
    text = SPECS[model](**sizes(model, smoke))
    name = text.split('name = "', 1)[1].split('"', 1)[0]
    path = Path(tempfile.mkdtemp(prefix="suite_")) / f"{name}.toml"
    path.write_text(text)
    return backcomp.build(path, optimizer=optimizer)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def make_data(model: str, module, smoke: bool = False, seed: int = 0):
    """(params, inputs): the spec's inits, every bias-like param (all but one axis of
    size 1) moved by N(0, 0.1²) so no relu/pool ties or zero gammas hide a bug."""
    s = sizes(model, smoke)
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=np.float32)
    for k, v in params.items():
        if sum(d > 1 for d in v.shape) <= 1:
            params[k] = (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
    B = s["B"]
    if model == "transformer":
        shape = (B, s["T"], s["D"])
        inputs = {"x": rng.standard_normal(shape, dtype=np.float32),
                  "target": rng.standard_normal(shape, dtype=np.float32)}
    elif model == "gelu_mlp":
        inputs = {"x": rng.standard_normal((B, s["d0"]), dtype=np.float32),
                  "labels": rng.integers(0, s["d3"], B)}
    elif model == "cnn":
        inputs = {"x": rng.random((B, 1, 28, 28), dtype=np.float32), "labels": rng.integers(0, 10, B)}
    elif model == "rnn":
        inputs = {"x": rng.standard_normal((B, s["T"], s["I"]), dtype=np.float32),
                  "labels": rng.integers(0, s["C"], B)}
    elif model == "lstm":
        inputs = {"x": rng.standard_normal((B, s["T"], s["D"]), dtype=np.float32),
                  "u": rng.standard_normal((B, s["T"], s["H"]), dtype=np.float32)}
    elif model == "gpt_block":
        inputs = {"ids": rng.integers(0, s["V"], (B, s["T"])), "targets": rng.integers(0, s["V"], (B, s["T"]))}
    else:
        y = np.zeros((B, s["d3"]), np.float32)
        y[np.arange(B), rng.integers(0, s["d3"], B)] = 1
        inputs = {"x": rng.standard_normal((B, s["d0"]), dtype=np.float32), "y": y}
    return params, inputs


# ----------------------------------------------------------------------------
# Peers: the same models in PyTorch and JAX
# ----------------------------------------------------------------------------

def _torch_loss(model: str, s: dict[str, int]):
    import torch
    F = torch.nn.functional

    if model == "transformer":
        B, T, D, H = s["B"], s["T"], s["D"], s["H"]
        dh = D // H

        def heads(a):
            return a.reshape(B, T, H, dh).transpose(1, 2)

        def loss(p, x, target):
            h = F.layer_norm(x, (D,), p["g1"], p["be1"], eps=1e-5)
            q, k, v = (heads(F.linear(h, p["W" + c].T, p["b" + c])) for c in "qkv")
            att = torch.softmax(q @ k.transpose(-1, -2) * (1 / math.sqrt(dh)), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(B, T, D)
            x1 = x + F.linear(ctx, p["Wo"].T, p["bo"])
            h2 = F.layer_norm(x1, (D,), p["g2"], p["be2"], eps=1e-5)
            out = x1 + F.linear(F.gelu(F.linear(h2, p["W1"].T, p["c1"])), p["W2"].T, p["c2"])
            return F.mse_loss(out, target)
    elif model == "gelu_mlp":
        def loss(p, x, labels):
            h1 = F.gelu(torch.addmm(p["b1"], x, p["W1"]))
            h2 = F.gelu(torch.addmm(p["b2"], h1, p["W2"]))
            return F.cross_entropy(torch.addmm(p["b3"], h2, p["W3"]), labels)
    elif model == "cnn":
        def loss(p, x, labels):
            h1 = F.relu(F.conv2d(x, p["K1"], padding=1) + p["c1"])
            h2 = F.relu(F.conv2d(F.max_pool2d(h1, 2), p["K2"], padding=1) + p["c2"])
            logits = torch.addmm(p["b"], F.max_pool2d(h2, 2).reshape(-1, 1568), p["W"])
            return F.cross_entropy(logits, labels)
    elif model == "gpt_block":
        B, T, D, H, V = s["B"], s["T"], s["D"], s["H"], s["V"]
        dh = D // H
        future = ~torch.tril(torch.ones(T, T, dtype=torch.bool))

        def heads(a):
            return a.reshape(B, T, H, dh).transpose(1, 2)

        def loss(p, ids, targets):
            x = F.embedding(ids, p["E"]) + p["P"][:T]
            h = F.layer_norm(x, (D,), p["g1"], p["be1"], eps=1e-5)
            q, k, v = (heads(h @ p["W" + c]) for c in "qkv")
            att = torch.softmax((q @ k.transpose(-1, -2) * (1 / math.sqrt(dh))).masked_fill(future, -1e9), dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(B, T, D)
            x1 = x + F.linear(ctx, p["Wo"].T, p["bo"])
            h2 = F.layer_norm(x1, (D,), p["g2"], p["be2"], eps=1e-5)
            m = F.gelu(F.linear(h2, p["W1"].T, p["c1"]), approximate="tanh")
            x2 = x1 + F.linear(m, p["W2"].T, p["c2"])
            logits = F.linear(F.layer_norm(x2, (D,), p["gf"], p["bf"], eps=1e-5), p["Wout"].T, p["bout"])
            return F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))
    elif model == "rnn":
        def loss(p, x, labels):
            h = torch.tanh(torch.addmm(p["b"], x[:, 0], p["Wx"]))
            for t in range(1, x.shape[1]):
                h = torch.tanh(torch.addmm(p["b"], x[:, t], p["Wx"]) + h @ p["Wh"])
            return F.cross_entropy(torch.addmm(p["by"], h, p["Wy"]), labels)
    else:
        def loss(p, x, y):
            h1 = torch.relu(torch.addmm(p["b1"], x, p["W1"]))
            h2 = torch.relu(torch.addmm(p["b2"], h1, p["W2"]))
            return F.cross_entropy(torch.addmm(p["b3"], h2, p["W3"]), y)   # probability targets
    return loss


def torch_step(model: str, s: dict[str, int], params, inputs) -> Callable[[], tuple]:
    """PyTorch eager: the loss, then torch.autograd.grad over the params (tensors resident);
    the LSTM is benchmarks/rnn.py's ``torch.nn.LSTM``."""
    import torch
    if model == "lstm":
        import rnn
        return rnn.torch_step("lstm", params, inputs["x"], inputs["u"])
    loss_fn = _torch_loss(model, s)
    tp = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    ti = [torch.from_numpy(v) for v in inputs.values()]
    leaves = list(tp.values())

    def step():
        loss = loss_fn(tp, *ti)
        grads = torch.autograd.grad(loss, leaves)
        return loss.detach(), dict(zip(tp, grads))
    return step


def _jax_loss(model: str, s: dict[str, int]):
    import jax
    import jax.numpy as jnp
    lax = jax.lax

    def ce(logits, labels):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    def ln(x, g, b):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * g + b

    if model == "transformer":
        B, T, D, H = s["B"], s["T"], s["D"], s["H"]
        dh = D // H

        def heads(a):
            return a.reshape(B, T, H, dh).transpose(0, 2, 1, 3)

        def loss(p, x, target):
            h = ln(x, p["g1"], p["be1"])
            q, k, v = (heads(h @ p["W" + c] + p["b" + c]) for c in "qkv")
            att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) * (1 / math.sqrt(dh)), axis=-1)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
            x1 = x + ctx @ p["Wo"] + p["bo"]
            m = jax.nn.gelu(ln(x1, p["g2"], p["be2"]) @ p["W1"] + p["c1"], approximate=False) @ p["W2"] + p["c2"]
            return jnp.mean((x1 + m - target) ** 2)
    elif model == "gelu_mlp":
        def loss(p, x, labels):
            h1 = jax.nn.gelu(x @ p["W1"] + p["b1"], approximate=False)
            h2 = jax.nn.gelu(h1 @ p["W2"] + p["b2"], approximate=False)
            return ce(h2 @ p["W3"] + p["b3"], labels)
    elif model == "cnn":
        def conv(x, k):
            return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

        def pool(x):
            return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

        def loss(p, x, labels):
            h1 = jax.nn.relu(conv(x, p["K1"]) + p["c1"])
            h2 = jax.nn.relu(conv(pool(h1), p["K2"]) + p["c2"])
            return ce(pool(h2).reshape(-1, 1568) @ p["W"] + p["b"], labels)
    elif model == "gpt_block":
        B, T, D, H = s["B"], s["T"], s["D"], s["H"]
        dh = D // H
        causal = jnp.tril(jnp.ones((T, T), bool))

        def heads(a):
            return a.reshape(B, T, H, dh).transpose(0, 2, 1, 3)

        def loss(p, ids, targets):
            x = p["E"][ids] + p["P"][:T]
            h = ln(x, p["g1"], p["be1"])
            q, k, v = (heads(h @ p["W" + c]) for c in "qkv")
            att = jax.nn.softmax(jnp.where(causal, q @ k.transpose(0, 1, 3, 2) * (1 / math.sqrt(dh)), -1e9), axis=-1)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
            x1 = x + ctx @ p["Wo"] + p["bo"]
            m = jax.nn.gelu(ln(x1, p["g2"], p["be2"]) @ p["W1"] + p["c1"], approximate=True)
            logits = ln(x1 + m @ p["W2"] + p["c2"], p["gf"], p["bf"]) @ p["Wout"] + p["bout"]
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    elif model == "rnn":
        def loss(p, x, labels):
            h = jnp.tanh(x[:, 0] @ p["Wx"] + p["b"])
            for t in range(1, x.shape[1]):
                h = jnp.tanh(x[:, t] @ p["Wx"] + h @ p["Wh"] + p["b"])
            return ce(h @ p["Wy"] + p["by"], labels)
    else:
        def loss(p, x, y):
            h1 = jax.nn.relu(x @ p["W1"] + p["b1"])
            h2 = jax.nn.relu(h1 @ p["W2"] + p["b2"])
            return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(h2 @ p["W3"] + p["b3"]), -1))
    return loss


def jax_step(model: str, s: dict[str, int], params, inputs) -> Callable[[], tuple]:
    """jax.jit(jax.value_and_grad(loss)), inputs device_put once, blocking on the result;
    the LSTM is benchmarks/rnn.py's ``lax.scan``."""
    import jax
    if model == "lstm":
        import rnn
        return rnn.jax_step("lstm", params, inputs["x"], inputs["u"])
    vg = jax.jit(jax.value_and_grad(_jax_loss(model, s)))
    jp, ji = jax.device_put((params, list(inputs.values())))

    def step():
        return jax.block_until_ready(vg(jp, *ji))
    return step


def hand_numpy_step(model: str, s: dict[str, int], params, inputs) -> Callable[[], tuple] | None:
    """benchmarks/peers.py's hand-written backprop for the ReLU MLP, benchmarks/rnn.py's
    BPTT for the LSTM; None for the others."""
    if model == "lstm":
        import rnn
        return lambda: rnn.numpy_lstm(params, inputs["x"], inputs["u"])
    if model != "relu_mlp":
        return None
    import peers
    step = peers.make_hand_numpy([s["d0"], s["d1"], s["d2"], s["d3"]])
    return lambda: step(params, inputs["x"], inputs["y"])


# ----------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------

def check_agree(name: str, result, ref_loss: float, ref_grads: dict[str, np.ndarray]) -> float:
    """Loss and every gradient of a peer against the generated module's; the largest
    deviation, relative to each gradient's largest entry (at least 1% of the largest
    entry of all gradients).  Raises AssertionError."""
    loss, grads = result
    loss = float(np.asarray(loss))
    assert abs(loss - ref_loss) <= 2e-4 * abs(ref_loss) + 1e-6, f"{name}: loss {loss} vs {ref_loss}"
    assert set(grads) == set(ref_grads), f"{name}: grads for {sorted(grads)} vs {sorted(ref_grads)}"
    worst = 0.0
    overall = max(float(np.max(np.abs(r))) for r in ref_grads.values()) or 1.0
    for k, ref in ref_grads.items():
        g = np.asarray(grads[k])
        assert g.shape == ref.shape, f"{name}: {k} shape {g.shape} vs {ref.shape}"
        # a gradient that is 0 in exact arithmetic (the key bias under softmax) is
        # rounding noise in every implementation: compare it on the scale of the others
        scale = max(float(np.max(np.abs(ref))), 1e-2 * overall)
        np.testing.assert_allclose(g, ref, rtol=2e-3, atol=1e-3 * scale, err_msg=f"{name}: grad {k}")
        worst = max(worst, float(np.max(np.abs(g - ref))) / scale)
    return worst


# ----------------------------------------------------------------------------
# Per-statement profile of the generated module
# ----------------------------------------------------------------------------

def statement_profile(fn: Callable, env: dict[str, Any], repeats: int = 7) -> list[tuple[float, str]]:
    """Median seconds of each top-level statement of ``fn``'s body, run one by one in
    ``env`` (the module's globals plus its arguments), over ``repeats`` passes; the
    ``return`` is timed as an assignment (it holds the copies and casts of the grads)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]                      # the docstring
    stmts = []
    for st in body:
        if isinstance(st, ast.Return):
            st = ast.Assign(targets=[ast.Name("_returned", ast.Store())], value=st.value, lineno=0, col_offset=0)
        text = ast.unparse(st)
        code = compile(ast.fix_missing_locations(ast.Module([st], type_ignores=[])), "<generated>", "exec")
        stmts.append((code, text))
    times: list[list[float]] = [[] for _ in stmts]
    pc = time.perf_counter
    for _ in range(repeats):
        scope = dict(env)
        for i, (code, _) in enumerate(stmts):
            t = pc()
            exec(code, scope)
            times[i].append(pc() - t)
    return [(statistics.median(ts), text) for ts, (_, text) in zip(times, stmts)]


def loop_profile(fn: Callable, env: dict[str, Any], repeats: int = 7) -> list[tuple[float, int, str]]:
    """Inside each top-level ``for`` loop of ``fn`` (a scan's forward or backward): the
    median over ``repeats`` calls of each body statement's time summed over the steps,
    as (seconds, loop number, statement).  Each statement is timed by perf_counter calls
    around it in an instrumented copy of ``fn``, which adds ~0.1 µs per statement and step."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    func = tree.body[0]
    labels: list[tuple[int, str]] = []
    loops = [st for st in func.body if isinstance(st, ast.For)]
    for k, loop in enumerate(loops):
        body = []
        for st in loop.body:
            labels.append((k, ast.unparse(st)))
            i = len(labels) - 1
            body += [ast.parse("_t0_ = _pc_()").body[0], st, ast.parse(f"_acc_[{i}] += _pc_() - _t0_").body[0]]
        loop.body = body
    if not labels:
        return []
    func.name = "_instrumented"
    scope = dict(env, _pc_=time.perf_counter)
    exec(compile(ast.fix_missing_locations(tree), "<generated>", "exec"), scope)
    runs = []
    for _ in range(repeats):
        scope["_acc_"] = acc = [0.0] * len(labels)
        scope["_instrumented"](env["params"], env["inputs"])
        runs.append(acc)
    return [(statistics.median(r[i] for r in runs), k, text) for i, (k, text) in enumerate(labels)]


def print_profile(model: str, module, params, inputs, top: int = 20, repeats: int = 7) -> list[dict]:
    env = dict(vars(module), params=params, inputs=inputs)
    rows = statement_profile(module.value_and_grad, env, repeats)
    total = sum(t for t, _ in rows)
    print(f"\n-- profile of the generated value_and_grad: {TITLES[model]} --")
    print(f"   {len(rows)} statements, sum of per-statement medians {total * 1e3:.2f} ms; the top {top}:")
    for t, text in sorted(rows, key=lambda r: -r[0])[:top]:
        line = " ".join(text.split())
        print(f"{t * 1e3:9.3f} ms {100 * t / total:5.1f}%  {line[:110]}")
    inner = loop_profile(module.value_and_grad, env, repeats)
    for k in sorted({k for _, k, _ in inner}):
        body = [(t, text) for t, j, text in inner if j == k]
        spent = sum(t for t, _ in body)
        print(f"   inside loop {k + 1} (all steps): {len(body)} statements, {spent * 1e3:.2f} ms; the top {top // 2}:")
        for t, text in sorted(body, key=lambda r: -r[0])[:top // 2]:
            print(f"{t * 1e3:9.3f} ms {100 * t / spent:5.1f}%    {' '.join(text.split())[:108]}")
    return [{"seconds": t, "statement": text} for t, text in rows] + \
        [{"seconds": t, "loop": k + 1, "statement": text} for t, k, text in inner]


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

@dataclass
class ModelResult:
    model: str
    median: dict[str, float]
    iqr: dict[str, float]
    min: dict[str, float]
    rounds: str
    deviation: dict[str, float]


COLUMNS = ("backcomp", "hand_numpy", "torch_eager", "jax_jit")


def run_model(model: str, args, peers_wanted: set[str]) -> ModelResult:
    s = sizes(model, args.smoke)
    module = build_module(model, args.smoke)
    params, inputs = make_data(model, module, args.smoke)

    def generated():
        return module.value_and_grad(params, inputs)

    steps: dict[str, Callable] = {"backcomp": generated}
    if "hand_numpy" in peers_wanted and (h := hand_numpy_step(model, s, params, inputs)) is not None:
        steps["hand_numpy"] = h
    if "torch_eager" in peers_wanted:
        steps["torch_eager"] = torch_step(model, s, params, inputs)
    if "jax_jit" in peers_wanted:
        steps["jax_jit"] = jax_step(model, s, params, inputs)
    ref_loss, ref_grads = generated()
    ref_loss = float(ref_loss)
    deviation = {n: check_agree(f"{model}/{n}", step(), ref_loss, ref_grads)
                 for n, step in steps.items() if n != "backcomp"}
    print(f"\n== {TITLES[model]}: {len(steps)} implementations agree (loss {ref_loss:.6g}; largest grad "
          f"deviation / max|grad|: " + ", ".join(f"{n} {d:.1e}" for n, d in deviation.items()) + ")")
    kw = dict(settle_seconds=0.0, warmup=1, min_history=100, inner=1) if args.smoke else {}
    report = timing.interleaved_medians(steps, repeats=args.repeats, **kw)
    print(timing.format_report(report, ref="torch_eager" if "torch_eager" in report else None,
                               unit=1e-3, unit_name="ms"))
    rounds = (f"{report.rounds_accepted} accepted, {report.rounds_rejected} re-run, "
              f"{report.rounds_forced} kept though disturbed")
    result = ModelResult(model, {n: st.median for n, st in report.items()},
                         {n: st.iqr for n, st in report.items()}, {n: st.min for n, st in report.items()},
                         rounds, deviation)
    if model in args.profile or "all" in args.profile:
        result.profile = print_profile(model, module, params, inputs, repeats=3 if args.smoke else 7)
    return result


def _ms(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} µs"


def format_table(results: list[ModelResult], stat: str = "median") -> str:
    """The README's markdown table: medians (or ``stat="min"``: minima), and backcomp ÷
    each peer, with geometric means over the models."""
    results = [ModelResult(r.model, getattr(r, stat), r.iqr, r.min, r.rounds, r.deviation) for r in results]
    peers = [c for c in COLUMNS[1:] if any(c in r.median for r in results)]
    head = ["model", "backcomp"] + [c.replace("_", " ") for c in peers] + [f"÷ {c.split('_')[0]}" for c in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    logs: dict[str, list[float]] = {c: [] for c in peers}
    for r in results:
        row = [TITLES[r.model], _ms(r.median["backcomp"])] + [_ms(r.median.get(c)) for c in peers]
        for c in peers:
            if c in r.median:
                ratio = r.median["backcomp"] / r.median[c]
                logs[c].append(math.log(ratio))
                row.append(f"{ratio:.2f}")
            else:
                row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    geo = ["geometric mean", ""] + [""] * len(peers) + [
        f"{math.exp(statistics.fmean(logs[c])):.2f}" if logs[c] and c != "hand_numpy" else "—" for c in peers]
    lines.append("| " + " | ".join(geo) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(MODELS), help="comma-separated models (default: all)")
    ap.add_argument("--peers", default="hand_numpy,torch_eager,jax_jit", help="comma-separated peers")
    ap.add_argument("--profile", action="append", default=[], choices=MODELS + ("all",),
                    help="print the per-statement profile of MODEL's generated module")
    ap.add_argument("--json", help="write the results (medians, IQRs, ratios, machine) here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds: check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.threads = min(args.repeats, 2), 1
    models = [m.strip() for m in args.only.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")
    wanted = {p.strip() for p in args.peers.split(",") if p.strip()}
    # torch and jax are imported before the threads are pinned, so that pin_threads sets
    # torch's pool and starts XLA:CPU with the same number of threads as NumPy's BLAS
    if "torch_eager" in wanted:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            print(f"skipped torch_eager: {e}")
            wanted.discard("torch_eager")
    if "jax_jit" in wanted:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        try:
            import jax
        except ImportError as e:
            print(f"skipped jax_jit: {e}")
            wanted.discard("jax_jit")
    results = []
    with timing.pin_threads(args.threads):
        print(f"issue 13 suite, float32, {args.threads} threads{' (smoke sizes)' if args.smoke else ''}")
        print("BLAS:", json.dumps(timing.blas_info()))
        print("machine:", json.dumps(timing.machine_info()))
        for m in models:
            results.append(run_model(m, args, wanted))
        machine = timing.machine_info()
    print("\n" + format_table(results))
    print(f"(medians of {args.repeats} interleaved rounds per model; load average at the end: "
          f"{' '.join(machine.get('loadavg', []))})")
    print("\n" + format_table(results, "min"))
    print("(minima over the same rounds: the least disturbed sample of each implementation)")
    if args.json:
        out = {"threads": args.threads, "repeats": args.repeats, "smoke": args.smoke,
               "blas": timing.blas_info(), "machine": machine,
               "models": {r.model: {"title": TITLES[r.model], "median_s": r.median, "iqr_s": r.iqr, "min_s": r.min,
                                    "rounds": r.rounds, "deviation": r.deviation,
                                    "backcomp_over": {c: r.median["backcomp"] / r.median[c]
                                                      for c in r.median if c != "backcomp"},
                                    **({"profile": r.profile} if hasattr(r, "profile") else {})}
                          for r in results}}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
