"""train_step against torch.optim, step by step.

For each optimizer (sgd, momentum, adam) and a few hyperparameter settings, several
train_step calls of a generated module leave the params where torch.optim leaves them
when given the same gradients (the module's own value_and_grad at the params before each
step, fed to the torch params as ``.grad``), in float64.  Models with ``rng=`` (dropout)
and ``buffers=`` (batch norm) are included: train_step passes them through, draws the
masks value_and_grad draws with a generator in the same state, and updates the buffers
once per step.

Then the whole step against PyTorch with nothing shared: the same MLP written in torch,
``opt.zero_grad(); loss.backward(); opt.step()`` with torch.optim, several steps, in
float64 and float32; and the allocation check: a step replaces no param array and reuses
the workspace in ``state["grads"]``.
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
    "momentum": [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.01),
                 dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02)],
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
    workspace = dict(state["grads"])
    originals = dict(params)
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
        # in place: the same param arrays, the same workspace arrays, step after step
        assert all(params[k] is originals[k] for k in params) and params.keys() == originals.keys()
        assert all(state["grads"][k] is workspace[k] for k in workspace) and state["grads"].keys() == workspace.keys()
    assert state["step"] == 4


def _torch_mlp_loss(p, x, labels):
    h = torch.tanh(x @ p["W1"] + p["b1"])
    return torch.nn.functional.cross_entropy(h @ p["W2"] + p["b2"], labels)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("optimizer, setting", [(o, i) for o in SETTINGS for i in range(len(SETTINGS[o]))])
def test_train_step_is_a_torch_training_step(optimizer, setting, dtype):
    """Loss, backward and update all from torch: the generated step agrees after 5 steps."""
    kw = SETTINGS[optimizer][setting]
    module = backcomp.build(parse_spec(MLP, "ts.toml"), optimizer=optimizer)
    params = {k: (v + 0.1 * np.random.default_rng(2).normal(size=v.shape)).astype(dtype)
              for k, v in module.init_params(seed=1, dtype=np.float64).items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = torch_optimizer(optimizer, list(tparams.values()), kw)
    state = module.init_state(params)
    tight = dtype == np.float64
    for step in range(5):
        data = _data(step, rows=7)
        inputs = {"x": data["x"].astype(dtype), "labels": data["labels"]}
        opt.zero_grad()
        ref = _torch_mlp_loss(tparams, torch.tensor(inputs["x"]), torch.tensor(inputs["labels"]))
        ref.backward()
        opt.step()
        loss = module.train_step(params, inputs, state, **kw)
        assert loss.dtype == dtype and all(v.dtype == dtype for v in params.values())
        np.testing.assert_allclose(loss, ref.item(), rtol=1e-12 if tight else 2e-6)
        for k in params:
            np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-10 if tight else 2e-5,
                                       atol=1e-13 if tight else 2e-6, err_msg=f"{optimizer} {kw} step {step}: {k}")


def test_nesterov_needs_momentum_and_no_dampening():
    module = backcomp.build(parse_spec(MLP, "ts.toml"), optimizer="momentum")
    params = module.init_params(dtype=np.float64)
    state = module.init_state(params)
    for bad in (dict(momentum=0.0), dict(momentum=0.9, dampening=0.1)):
        with pytest.raises(ValueError, match="Nesterov"):
            module.train_step(params, _data(), state, nesterov=True, **bad)


@pytest.mark.parametrize("optimizer", list(SETTINGS))
def test_a_step_allocates_no_param_sized_array(optimizer):
    """After the first step, a step of a model whose gradients all have out= forms
    allocates nothing as large as a param: tracemalloc's peak over a step stays below
    the smallest large param (the activations here are smaller than it)."""
    import tracemalloc
    spec = MLP.replace("[5, 8]", "[5, 400]").replace("b1 = [8]", "b1 = [400]").replace("[8, 3]", "[400, 300]") \
        .replace("b2 = [3]", "b2 = [300]")
    module = backcomp.build(parse_spec(spec, "ts_big.toml"), optimizer=optimizer)
    params = module.init_params(dtype=np.float64)
    state = module.init_state(params)
    inputs = _data(0, rows=2)
    inputs["labels"] = inputs["labels"] % 3
    module.train_step(params, inputs, state, lr=0.01)
    tracemalloc.start()
    try:
        module.train_step(params, inputs, state, lr=0.01)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < params["W2"].nbytes / 4, f"{optimizer}: a step allocated {peak} bytes"
