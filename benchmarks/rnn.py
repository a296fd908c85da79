"""Recurrent layers: one value_and_grad step of an LSTM and a GRU, float32, one thread.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/rnn.py [--repeats 15]

The loss is ``sum(hs * u)`` over the stacked hidden states (B = 32, T = 64, D = 64,
H = 128); gradients w.r.t. the four weight arrays.  Columns: the generated module
(one loop forward, one reversed loop backward), ``torch.nn.LSTM``/``GRU`` on the CPU in
eager mode, ``jax.jit`` of ``jax.value_and_grad`` over ``lax.scan``, and a hand-written
NumPy BPTT (the input GEMM hoisted, the weight gradients as one GEMM each).  Every
implementation's gradients are checked against the generated module's first.

``spec``, ``numpy_lstm``, ``torch_step`` and ``jax_step`` are also the LSTM of
benchmarks/suite.py.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

import backcomp  # noqa: E402
from backcomp.spec import parse_spec  # noqa: E402
import timing  # noqa: E402

B, T, D, H = 32, 64, 64, 128

LSTM = """\
[model]
name = "lstm_bench"
loss = "loss"
[inputs]
x = ["B", "T", {D}]
u = ["B", "T", {H}]
[params]
Wx = [{D}, {G}]
Wh = [{H}, {G}]
bx = [{G}]
bh = [{G}]
[constants]
H = {H}
[steps.lstm]
carry = ["h", "c"]
xs = ["x_t"]
[steps.lstm.graph]
z = "x_t @ Wx + h @ Wh + bx + bh"
c_new = "sigmoid(z[:, H:2*H]) * c + sigmoid(z[:, :H]) * tanh(z[:, 2*H:3*H])"
h_new = "sigmoid(z[:, 3*H:]) * tanh(c_new)"
[steps.lstm.returns]
carry = ["h_new", "c_new"]
ys = ["h_new"]
[graph]
run = "scan(lstm, (zeros((B, H)), zeros((B, H))), x, axis=1)"
loss = "sum(run.ys[0] * u)"
"""

GRU = """\
[model]
name = "gru_bench"
loss = "loss"
[inputs]
x = ["B", "T", {D}]
u = ["B", "T", {H}]
[params]
Wx = [{D}, {G}]
Wh = [{H}, {G}]
bx = [{G}]
bh = [{G}]
[constants]
H = {H}
[steps.gru]
carry = ["h"]
xs = ["x_t"]
[steps.gru.graph]
gx = "x_t @ Wx + bx"
gh = "h @ Wh + bh"
r = "sigmoid(gx[:, :H] + gh[:, :H])"
z = "sigmoid(gx[:, H:2*H] + gh[:, H:2*H])"
n = "tanh(gx[:, 2*H:] + r * gh[:, 2*H:])"
h_new = "(1 - z) * n + z * h"
[steps.gru.returns]
carry = ["h_new"]
ys = ["h_new"]
[graph]
run = "scan(gru, zeros((B, H)), x, axis=1)"
loss = "sum(run.ys[0] * u)"
"""


def spec(kind: str, D: int = D, H: int = H) -> str:
    """The benchmark's spec of ``kind`` ("lstm" or "gru"): batch and time stay symbolic."""
    gates = 4 if kind == "lstm" else 3
    return (LSTM if kind == "lstm" else GRU).format(D=D, H=H, G=gates * H)


def _sigmoid(v):
    return 0.5 * (1 + np.tanh(0.5 * v))


def numpy_lstm(p, x, u):
    """Hand-written BPTT, time-major, the input GEMM and the weight gradients batched."""
    Wx, Wh, b = p["Wx"], p["Wh"], p["bx"] + p["bh"]
    B, T, D = x.shape
    H = Wh.shape[0]
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))
    gx = (xt.reshape(T * B, D) @ Wx).reshape(T, B, 4 * H) + b
    hs = np.empty((T + 1, B, H), x.dtype)
    cs = np.empty((T + 1, B, H), x.dtype)
    acts = np.empty((T, B, 4 * H), x.dtype)
    tc = np.empty((T, B, H), x.dtype)
    hs[0] = 0
    cs[0] = 0
    for t in range(T):
        z = gx[t] + hs[t] @ Wh
        a = acts[t]
        a[:, :2 * H] = _sigmoid(z[:, :2 * H])
        a[:, 2 * H:3 * H] = np.tanh(z[:, 2 * H:3 * H])
        a[:, 3 * H:] = _sigmoid(z[:, 3 * H:])
        cs[t + 1] = a[:, H:2 * H] * cs[t] + a[:, :H] * a[:, 2 * H:3 * H]
        tc[t] = np.tanh(cs[t + 1])
        hs[t + 1] = a[:, 3 * H:] * tc[t]
    ut = u.transpose(1, 0, 2)
    loss = np.sum(hs[1:] * ut)
    dz = np.empty((T, B, 4 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    dc = np.zeros((B, H), x.dtype)
    WhT = Wh.T
    for t in range(T - 1, -1, -1):
        a = acts[t]
        i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
        dh = dh + ut[t]
        dc = dc + dh * o * (1 - tc[t] ** 2)
        d = dz[t]
        d[:, :H] = dc * g * i * (1 - i)
        d[:, H:2 * H] = dc * cs[t] * f * (1 - f)
        d[:, 2 * H:3 * H] = dc * i * (1 - g ** 2)
        d[:, 3 * H:] = dh * tc[t] * o * (1 - o)
        dc = dc * f
        dh = d @ WhT
    flat = dz.reshape(T * B, 4 * H)
    db = flat.sum(axis=0)
    return loss, {"Wx": xt.reshape(T * B, D).T @ flat, "Wh": hs[:-1].reshape(T * B, H).T @ flat, "bx": db, "bh": db}


def numpy_gru(p, x, u):
    Wx, Wh, bx, bh = p["Wx"], p["Wh"], p["bx"], p["bh"]
    B, T, D = x.shape
    H = Wh.shape[0]
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))
    gx = (xt.reshape(T * B, D) @ Wx).reshape(T, B, 3 * H) + bx
    hs = np.empty((T + 1, B, H), x.dtype)
    hs[0] = 0
    rz = np.empty((T, B, 2 * H), x.dtype)
    ns = np.empty((T, B, H), x.dtype)
    ghn = np.empty((T, B, H), x.dtype)
    for t in range(T):
        gh = hs[t] @ Wh + bh
        rz[t] = _sigmoid(gx[t, :, :2 * H] + gh[:, :2 * H])
        ghn[t] = gh[:, 2 * H:]
        ns[t] = np.tanh(gx[t, :, 2 * H:] + rz[t, :, :H] * ghn[t])
        z = rz[t, :, H:]
        hs[t + 1] = (1 - z) * ns[t] + z * hs[t]
    ut = u.transpose(1, 0, 2)
    loss = np.sum(hs[1:] * ut)
    dgx = np.empty((T, B, 3 * H), x.dtype)
    dgh = np.empty((T, B, 3 * H), x.dtype)
    dh = np.zeros((B, H), x.dtype)
    WhT = Wh.T
    for t in range(T - 1, -1, -1):
        r, z, n = rz[t, :, :H], rz[t, :, H:], ns[t]
        dh = dh + ut[t]
        dn = dh * (1 - z) * (1 - n ** 2)
        dzz = dh * (hs[t] - n) * z * (1 - z)
        dr = dn * ghn[t] * r * (1 - r)
        dgx[t, :, :H], dgx[t, :, H:2 * H], dgx[t, :, 2 * H:] = dr, dzz, dn
        dgh[t, :, :H], dgh[t, :, H:2 * H], dgh[t, :, 2 * H:] = dr, dzz, dn * r
        dh = dh * z + dgh[t] @ WhT
    fx, fh = dgx.reshape(T * B, 3 * H), dgh.reshape(T * B, 3 * H)
    return loss, {"Wx": xt.reshape(T * B, D).T @ fx, "Wh": hs[:-1].reshape(T * B, H).T @ fh,
                  "bx": fx.sum(axis=0), "bh": fh.sum(axis=0)}


def torch_step(kind: str, p, x, u):
    """``torch.nn.LSTM``/``GRU`` (eager, its fused CPU cell) holding copies of ``p``: one
    call returns the loss and the gradients of all four arrays in backcomp's layout
    (transposed views, no copies).  Threads are whatever the caller pinned."""
    import torch
    D, G = p["Wx"].shape
    cell = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(D, p["Wh"].shape[0], batch_first=True)
    with torch.no_grad():
        cell.weight_ih_l0.copy_(torch.tensor(p["Wx"].T))
        cell.weight_hh_l0.copy_(torch.tensor(p["Wh"].T))
        cell.bias_ih_l0.copy_(torch.tensor(p["bx"]))
        cell.bias_hh_l0.copy_(torch.tensor(p["bh"]))
    cell = cell.to(torch.from_numpy(x).dtype)
    leaves = [cell.weight_ih_l0, cell.weight_hh_l0, cell.bias_ih_l0, cell.bias_hh_l0]
    tx, tu = torch.from_numpy(x), torch.from_numpy(u)

    def step():
        out, _ = cell(tx)
        value = (out * tu).sum()
        gx, gh, bx, bh = torch.autograd.grad(value, leaves)
        return value.detach(), {"Wx": gx.T, "Wh": gh.T, "bx": bx, "bh": bh}
    return step


def jax_step(kind: str, p, x, u):
    """``jax.jit(jax.value_and_grad(loss))`` over ``lax.scan``, arrays device_put once."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    B, H = x.shape[0], p["Wh"].shape[0]

    def jloss(q, x, u):
        def cell(h_c, x_t):
            if kind == "lstm":
                h, c = h_c
                z = x_t @ q["Wx"] + h @ q["Wh"] + q["bx"] + q["bh"]
                i, f = jax.nn.sigmoid(z[:, :H]), jax.nn.sigmoid(z[:, H:2 * H])
                g, o = jnp.tanh(z[:, 2 * H:3 * H]), jax.nn.sigmoid(z[:, 3 * H:])
                c = f * c + i * g
                h = o * jnp.tanh(c)
                return (h, c), h
            h = h_c
            gx, gh = x_t @ q["Wx"] + q["bx"], h @ q["Wh"] + q["bh"]
            r = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
            z = jax.nn.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
            n = jnp.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h
            return h, h
        zero = jnp.zeros((B, H), x.dtype)
        init = (zero, zero) if kind == "lstm" else zero
        _, hs = lax.scan(cell, init, jnp.swapaxes(x, 0, 1))
        return jnp.sum(hs * jnp.swapaxes(u, 0, 1))
    vg = jax.jit(jax.value_and_grad(jloss))
    jp, jx, ju = jax.device_put((p, x, u))
    return lambda: jax.block_until_ready(vg(jp, jx, ju))


def steps_for(kind: str):
    module = backcomp.build(parse_spec(spec(kind), f"{kind}_bench.toml"))
    rng = np.random.default_rng(0)
    s = 1 / np.sqrt(H)
    p = {k: rng.uniform(-s, s, size=v).astype(np.float32) for k, v in module.PARAMS.items()}
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    u = rng.normal(size=(B, T, H)).astype(np.float32)
    inputs = {"x": x, "u": u}
    loss, ref = module.value_and_grad(p, inputs)
    steps = {"generated": lambda: module.value_and_grad(p, inputs)}
    hand = numpy_lstm if kind == "lstm" else numpy_gru
    _check("numpy_bptt", hand(p, x, u), loss, ref)
    steps["numpy_bptt"] = lambda: hand(p, x, u)
    if "torch" in sys.modules:
        steps["torch_eager"] = torch_step(kind, p, x, u)
        _check("torch", steps["torch_eager"](), loss, ref)
    if "jax" in sys.modules:
        steps["jax_jit"] = jax_step(kind, p, x, u)
        _check("jax", steps["jax_jit"](), loss, ref)
    return steps


def _check(name, result, loss, ref):
    value, grads = result
    np.testing.assert_allclose(float(value), float(loss), rtol=1e-3, err_msg=name)
    for k in ("Wx", "Wh", "bx", "bh"):
        np.testing.assert_allclose(np.asarray(grads[k]), ref[k], rtol=2e-3, atol=2e-3, err_msg=f"{name}: {k}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    # imported before the threads are pinned, so that pin_threads sets torch's pool and
    # starts XLA:CPU with one thread, as NumPy's BLAS
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for peer in ("torch", "jax"):
        try:
            __import__(peer)
        except ImportError as e:
            print(f"skipped {peer}: {e}")
    with timing.pin_threads(1):
        print("BLAS:", timing.blas_info())
        for kind in ("lstm", "gru"):
            steps = steps_for(kind)
            report = timing.interleaved_medians(steps, repeats=args.repeats)
            print(f"\n{kind.upper()} value_and_grad, B {B}, T {T}, D {D}, H {H}, float32, one thread")
            print(timing.format_report(report, ref="torch_eager" if "torch_eager" in steps else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
