"""train_step against torch.optim, step by step.

For each optimizer (sgd, momentum, adam) and a few hyperparameter settings, several
train_step calls of a generated module leave the params where torch.optim leaves them
when given the same gradients (the module's own value_and_grad at the params before each
step, fed to the torch params as ``.grad``), in float64.  Models with ``rng=`` (dropout)
and ``buffers=`` (batch norm) are included: train_step passes them through, draws the
masks value_and_grad draws with a generator in the same state, and updates the buffers
once per step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import backcomp
from backcomp.spec import parse_spec

MLP = """\
[model]
name = "ts_mlp"
loss = "loss"
[inputs]
x = ["B", 5]
labels = { shape = ["B"], dtype = "int64" }
[params]
W1 = [5, 8]
b1 = [8]
W2 = [8, 3]
b2 = [3]
[graph]
h = "tanh(x @ W1 + b1)"
loss = "mean(softmax_cross_entropy(h @ W2 + b2, labels))"
"""

DROPOUT = MLP.replace('name = "ts_mlp"', 'name = "ts_drop"').replace(
    'h = "tanh(x @ W1 + b1)"', 'h = "dropout(tanh(x @ W1 + b1), p=0.3)"')

BATCHNORM = """\
[model]
name = "ts_bn"
loss = "loss"
[inputs]
x = ["B", 5]
labels = { shape = ["B"], dtype = "int64" }
[params]
W1 = [5, 8]
gamma = { shape = [8], init = "ones" }
beta = [8]
W2 = [8, 3]
[buffers]
rm = [8]
rv = { shape = [8], init = "ones" }
[graph]
h = "relu(batch_norm(x @ W1, gamma, beta, rm, rv))"
loss = "mean(softmax_cross_entropy(h @ W2, labels))"
"""

SETTINGS = {
    "sgd": [dict(lr=0.1), dict(lr=0.05, weight_decay=0.01)],
    "momentum": [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.01)],
    "adam": [dict(lr=0.01), dict(lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01)],
}


def torch_optimizer(name, tensors, kw):
    kw = dict(kw)
    if name == "sgd":
        return torch.optim.SGD(tensors, **kw)
    if name == "momentum":
        return torch.optim.SGD(tensors, **kw)
    betas = (kw.pop("beta1", 0.9), kw.pop("beta2", 0.999))
    return torch.optim.Adam(tensors, betas=betas, **kw)


def _data(seed=0, rows=6):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(rows, 5)), "labels": rng.integers(0, 3, rows)}


@pytest.mark.parametrize("spec", [MLP, DROPOUT, BATCHNORM], ids=["mlp", "dropout_rng", "batchnorm_buffers"])
@pytest.mark.parametrize("optimizer, setting", [(o, i) for o in SETTINGS for i in range(len(SETTINGS[o]))])
def test_train_step_matches_torch_optim(spec, optimizer, setting):
    kw = SETTINGS[optimizer][setting]
    module = backcomp.build(parse_spec(spec, "ts.toml"), optimizer=optimizer)
    params = module.init_params(seed=1, dtype=np.float64)
    params = {k: v + 0.1 * np.random.default_rng(2).normal(size=v.shape) for k, v in params.items()}
    tparams = {k: torch.tensor(v.copy()) for k, v in params.items()}
    opt = torch_optimizer(optimizer, list(tparams.values()), kw)
    state = module.init_state(params)
    extra = {}
    if "dropout" in spec:
        extra_fn = lambda s: {"rng": np.random.default_rng(100 + s)}   # noqa: E731
    elif "[buffers]" in spec:
        buffers, ref_buffers = module.init_buffers(np.float64), module.init_buffers(np.float64)
        extra_fn = lambda s: {"buffers": buffers}                     # noqa: E731
    else:
        extra_fn = lambda s: {}                                       # noqa: E731
    for step in range(4):
        inputs = _data(step)
        ref_extra = dict(extra_fn(step))
        if "buffers" in ref_extra:
            ref_extra["buffers"] = ref_buffers
        ref_loss, grads = module.value_and_grad({k: t.numpy().copy() for k, t in tparams.items()}, inputs, **ref_extra)
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        opt.step()
        loss = module.train_step(params, inputs, state, **kw, **extra_fn(step), **extra)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        for k in params:
            np.testing.assert_allclose(params[k], tparams[k].numpy(), rtol=1e-10, atol=1e-13,
                                       err_msg=f"{optimizer} {kw} step {step}: {k}")
        if "[buffers]" in spec:
            for k in buffers:
                np.testing.assert_allclose(buffers[k], ref_buffers[k], rtol=1e-12)
    assert state["step"] == 4
