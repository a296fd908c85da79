"""Inference modules and forward(outputs=...) (issue 10).

A spec without a loss compiles to a module with ``forward`` only; ``forward(params,
inputs, outputs=(...))`` returns exactly the requested outputs and needs only the
inputs they depend on (logits without the labels), validating those.
"""
from __future__ import annotations

import numpy as np
import pytest

import backcomp
from backcomp.spec import SpecError, parse_spec

TRAIN = '''[model]
name = "clf"
loss = "loss"
outputs = ["probs", "pred", "loss"]
[inputs]
x = ["B", 4]
y = { shape = ["B"], dtype = "int64" }
[params]
W = [4, 3]
[graph]
logits = "x @ W"
probs = "softmax(logits)"
pred = "argmax(logits, axis=-1)"
loss = "mean(softmax_cross_entropy(logits, y))"
'''


def _data():
    rng = np.random.default_rng(0)
    return {"W": rng.normal(size=(4, 3))}, rng.normal(size=(5, 4)), rng.integers(0, 3, 5)


def test_outputs_selects_and_needs_only_their_inputs():
    module = backcomp.build(parse_spec(TRAIN, "clf.toml"))
    params, x, y = _data()
    full = module.forward(params, {"x": x, "y": y})
    assert list(full) == ["probs", "pred", "loss"]
    only = module.forward(params, {"x": x}, outputs=("pred", "probs"))   # no labels needed
    assert list(only) == ["probs", "pred"]
    np.testing.assert_array_equal(only["pred"], full["pred"])
    np.testing.assert_allclose(only["probs"], full["probs"], rtol=1e-15)
    assert list(module.forward(params, {"x": x, "y": y}, outputs="loss")) == ["loss"]
    with pytest.raises(ValueError, match="inputs: missing 'y'"):
        module.forward(params, {"x": x}, outputs=("loss",))
    with pytest.raises(ValueError, match="inputs: unknown 'z'"):
        module.forward(params, {"x": x, "z": x}, outputs=("pred",))
    with pytest.raises(ValueError, match=r"outputs: unknown 'logit' \(the model's outputs: probs, pred, loss\)"):
        module.forward(params, {"x": x}, outputs=("logit",))
    with pytest.raises(ValueError, match=r"input 'x' must have shape \(B, 4\)"):
        module.forward(params, {"x": x[:, :3]}, outputs=("pred",))


def test_a_spec_without_a_loss_is_an_inference_module():
    text = TRAIN.replace('loss = "loss"\n', "", 1).replace('outputs = ["probs", "pred", "loss"]', 'outputs = ["probs"]')
    text = text.replace('loss = "mean(', 'ce = "mean(')
    module = backcomp.build(parse_spec(text, "clf.toml"))
    assert not hasattr(module, "value_and_grad") and module.LOSS is None and module.WRT == ()
    params, x, y = _data()
    probs = module.forward(params, {"x": x, "y": y})["probs"]
    e = np.exp(x @ params["W"] - (x @ params["W"]).max(-1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), rtol=1e-14)
    assert list(module.forward(params, {"x": x}, outputs="probs")) == ["probs"]
    source = backcomp.compile_source(parse_spec(text, "clf.toml"))   # forward only, no trailing blank lines
    assert "def value_and_grad(" not in source and source.endswith("}\n")


def test_a_spec_needs_a_loss_or_outputs():
    text = TRAIN.replace('loss = "loss"\n', "", 1).replace('outputs = ["probs", "pred", "loss"]\n', "")
    text = text.replace('loss = "mean(', 'ce = "mean(')
    with pytest.raises(SpecError, match=r"clf.toml:1:1: error: no loss and no outputs"):
        parse_spec(text, "clf.toml")
    with pytest.raises(SpecError, match="wrt needs a loss"):
        parse_spec(TRAIN.replace('loss = "loss"\n', 'wrt = ["W"]\n', 1).replace('loss = "mean(', 'ce = "mean(')
                   .replace('"pred", "loss"]', '"pred"]'), "clf.toml")


def test_outputs_with_rng_and_buffers():
    text = '''[model]
name = "m"
loss = "loss"
outputs = ["h", "loss"]
[inputs]
x = ["B", 3]
y = ["B", 3]
[params]
gamma = { shape = [3], init = "ones" }
beta = [3]
[buffers]
rm = [3]
rv = { shape = [3], init = "ones" }
[graph]
h = "dropout(batch_norm(x, gamma, beta, rm, rv), p=0.5)"
loss = "mean((h - y) ** 2)"
'''
    module = backcomp.build(parse_spec(text, "m.toml"))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    params, b1, b2 = module.init_params(dtype=np.float64), module.init_buffers(np.float64), module.init_buffers(np.float64)
    full = module.forward(params, {"x": x, "y": y}, rng=np.random.default_rng(5), buffers=b1)
    only = module.forward(params, {"x": x}, outputs="h", rng=np.random.default_rng(5), buffers=b2)
    np.testing.assert_array_equal(only["h"], full["h"])
    np.testing.assert_array_equal(b1["rm"], b2["rm"])                  # the update happened on both paths
    assert not (b2["rm"] == 0).all()
    ev = module.forward(params, {"x": x}, outputs=("h",), train=False, buffers=b2)["h"]
    np.testing.assert_allclose(ev, (x - b2["rm"]) / np.sqrt(b2["rv"] + 1e-5), rtol=1e-12)
