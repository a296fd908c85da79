"""batch_norm and [buffers] (issue 10), against torch.nn.functional.batch_norm.

Train mode: batch statistics, gradients through them, the running statistics updated
in place (momentum, unbiased variance) exactly as PyTorch's; eval mode: the running
statistics; buffers validated (a converted copy would lose the update) and created by
``init_buffers``; errors located in specs.  The ops behind it: ``mode_select`` (batch
or running statistics) and ``buffer_update`` (the in-place update, an effect).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backcomp
from backcomp.spec import SpecError, parse_spec

from conftest import gradcheck

RTOL = 1e-10


def spec(x_shape: str, loss: str = "sum(y * y * x)", buffers: str = 'rm = [3]\nrv = { shape = [3], init = "ones" }',
         call: str = "batch_norm(x, gamma, beta, rm, rv, momentum=0.2)") -> str:
    return (f'[model]\nname = "bn"\nloss = "loss"\noutputs = ["y", "loss"]\n[inputs]\nx = {x_shape}\n'
            f'[params]\ngamma = {{ shape = [3], init = "ones" }}\nbeta = [3]\n[buffers]\n{buffers}\n'
            f'[graph]\ny = "{call}"\nloss = "{loss}"\n')


@pytest.mark.parametrize("x_shape, shape", [('["N", 3, 4, 5]', (6, 3, 4, 5)), ('["N", 3]', (7, 3)),
                                            ('["N", 3, 8]', (2, 3, 8))])
def test_train_and_eval_match_torch(x_shape, shape):
    module = backcomp.build(parse_spec(spec(x_shape), "bn.toml"))
    rng = np.random.default_rng(0)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    buffers = module.init_buffers(np.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(2):   # two steps: the running statistics compound
        x = rng.normal(size=shape) * (1 + step)
        loss, grads = module.value_and_grad({"gamma": gamma, "beta": beta}, {"x": x}, buffers=buffers)
        tx = torch.tensor(x, requires_grad=True)
        tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
        y = F.batch_norm(tx, rm, rv, tg, tb, training=True, momentum=0.2)
        ref = (y * y * tx).sum()
        ref.backward()
        np.testing.assert_allclose(loss, ref.item(), rtol=RTOL)
        np.testing.assert_allclose(grads["gamma"], tg.grad.numpy(), rtol=RTOL)
        np.testing.assert_allclose(grads["beta"], tb.grad.numpy(), rtol=RTOL)
        np.testing.assert_allclose(buffers["rm"], rm.numpy(), rtol=RTOL, atol=1e-15)
        np.testing.assert_allclose(buffers["rv"], rv.numpy(), rtol=RTOL)
    saved = {k: v.copy() for k, v in buffers.items()}
    out = module.forward({"gamma": gamma, "beta": beta}, {"x": x}, buffers=buffers, train=False)
    expected = F.batch_norm(torch.tensor(x), rm, rv, torch.tensor(gamma), torch.tensor(beta), training=False)
    np.testing.assert_allclose(out["y"], expected.numpy(), rtol=RTOL)
    assert all((buffers[k] == saved[k]).all() for k in saved)          # eval mode leaves them alone


def test_gradients_in_train_mode_match_finite_differences():
    gradcheck(parse_spec(spec('["N", 3, 2, 2]'), "bn.toml"), batch=4)


def test_eval_mode_gradient_treats_running_statistics_as_constants():
    module = backcomp.build(parse_spec(spec('["N", 3]', loss="sum(y * x)"), "bn.toml"))
    rng = np.random.default_rng(1)
    x, gamma, beta = rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=3)
    buffers = {"rm": rng.normal(size=3), "rv": rng.uniform(0.5, 2, size=3)}
    _, grads = module.value_and_grad({"gamma": gamma, "beta": beta}, {"x": x}, buffers=buffers, train=False)
    xhat = (x - buffers["rm"]) / np.sqrt(buffers["rv"] + 1e-5)
    np.testing.assert_allclose(grads["gamma"], (xhat * x).sum(0), rtol=RTOL)
    np.testing.assert_allclose(grads["beta"], x.sum(0), rtol=RTOL)


def test_float32_buffers_and_init_buffers():
    module = backcomp.build(parse_spec(spec('["N", 3]'), "bn.toml"), optimizer="sgd")
    assert module.BUFFERS == {"rm": (3,), "rv": (3,)}
    buffers = module.init_buffers()
    assert buffers["rm"].dtype == np.float32 and (buffers["rv"] == 1).all() and (buffers["rm"] == 0).all()
    params = module.init_params()
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    out = module.forward(params, {"x": x}, buffers=buffers)
    assert out["y"].dtype == np.float32 and buffers["rm"].dtype == np.float32
    loss = module.train_step(params, {"x": x}, module.init_state(params), lr=0.1, buffers=buffers)
    assert np.isfinite(loss) and np.abs(buffers["rm"]).max() > 0


def test_buffers_are_validated():
    module = backcomp.build(parse_spec(spec('["N", 3]'), "bn.toml"))
    params, x = module.init_params(dtype=np.float64), {"x": np.ones((4, 3))}
    with pytest.raises(ValueError, match=r"this model has buffers \(rm, rv\): pass buffers=init_buffers\(\)"):
        module.forward(params, x)
    with pytest.raises(ValueError, match="buffers: missing 'rv'"):
        module.forward(params, x, buffers={"rm": np.zeros(3)})
    with pytest.raises(ValueError, match=r"buffer 'rm' must have shape \(3,\)"):
        module.forward(params, x, buffers={"rm": np.zeros(4), "rv": np.ones(3)})
    with pytest.raises(ValueError, match="buffer 'rm' must be a float numpy array .* updated in place"):
        module.forward(params, x, buffers={"rm": [0.0, 0.0, 0.0], "rv": np.ones(3)})


def test_spec_errors_are_located():
    with pytest.raises(SpecError, match=r"bn.toml:\d+:\d+: error: batch_norm: running_mean must be a \[buffers\] entry"):
        parse_spec(spec('["N", 3]', call="batch_norm(x, gamma, beta, gamma, rv)"), "bn.toml")
    with pytest.raises(SpecError, match=r"bn.toml:\d+:\d+: error: buffer 'rm': init must be 'zeros' or 'ones'"):
        parse_spec(spec('["N", 3]', buffers='rm = { shape = [3], init = "normal(1)" }\nrv = [3]'), "bn.toml")
    with pytest.raises(SpecError, match=r"bn.toml:\d+:\d+: error: batch_norm: gamma must have shape \(4,\)"):
        parse_spec(spec('["N", 4]'), "bn.toml")


def test_batch_norm_is_not_batch_separable():
    module = backcomp.build(parse_spec(spec('["N", 3]'), "bn.toml"))
    assert module.BATCH_SEPARABLE is False and "mean" in module.BATCH_REFUSAL


def _select_graph():
    g = backcomp.Graph("select_jvp")
    W = g.param("W", (3, 4))
    V = g.param("V", (3, 4))
    u = g.input("u", (3, 4))
    g.loss(backcomp.ops.sum(g.apply("mode_select", (backcomp.ops.sin(W), V * V)) * u))
    return g


#: graphs of the form sum(op(...) * u) whose op has a JVP rule (test_jvp checks each is reached)
JVP_GRAPHS = {"mode_select": _select_graph}


def test_jvp_of_mode_select():
    from test_jvp import check_jvp
    check_jvp(_select_graph(), {})
