"""One value_and_grad step of a single-head attention block, float32, against PyTorch.

    python benchmarks/attention.py [--repeats 15] [--batch 16] [--tokens 64] [--width 128]

Scores and context are einsums ('btd,bsd->bts', 'bts,bsd->btd') and the projections
batched matmuls with shared weights: the two patterns issue 13 found slow (np.einsum
without BLAS, and weight gradients as one GEMM per batch entry plus a sum).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

import backcomp  # noqa: E402
import timing  # noqa: E402
from backcomp.spec import parse_spec  # noqa: E402

SPEC = """\
[model]
name = "attention_bench"
loss = "loss"
[inputs]
x = ["B", "T", {d}]
target = ["B", "T", {d}]
[params]
Wq = [{d}, {d}]
Wk = [{d}, {d}]
Wv = [{d}, {d}]
Wo = [{d}, {d}]
[graph]
q = "x @ Wq"
k = "x @ Wk"
v = "x @ Wv"
attn = "softmax(einsum('btd,bsd->bts', q, k) * {scale}, axis=-1)"
out = "einsum('bts,bsd->btd', attn, v) @ Wo + x"
loss = "mse(out, target)"
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args(argv)
    b, t, d = args.batch, args.tokens, args.width
    module = backcomp.build(parse_spec(SPEC.format(d=d, scale=1 / np.sqrt(d)), "attention_bench.toml"))
    rng = np.random.default_rng(0)
    params = module.init_params(seed=0)
    inputs = {"x": rng.normal(size=(b, t, d)).astype(np.float32),
              "target": rng.normal(size=(b, t, d)).astype(np.float32)}
    steps = {"generated": lambda: module.value_and_grad(params, inputs)}
    try:
        import torch
        tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        tx, tt = torch.tensor(inputs["x"]), torch.tensor(inputs["target"])

        def torch_step():
            for v in tp.values():
                v.grad = None
            q, k, v = tx @ tp["Wq"], tx @ tp["Wk"], tx @ tp["Wv"]
            attn = torch.softmax(q @ k.transpose(1, 2) / np.sqrt(d), -1)
            loss = ((attn @ v @ tp["Wo"] + tx - tt) ** 2).mean()
            loss.backward()
            return loss
        loss, grads = module.value_and_grad(params, inputs)
        np.testing.assert_allclose(loss, torch_step().item(), rtol=1e-4)
        for k in grads:
            np.testing.assert_allclose(grads[k], tp[k].grad.numpy(), rtol=2e-3, atol=1e-6)
        steps["torch_eager"] = torch_step
    except ImportError as e:
        print(f"skipped torch: {e}")
    with timing.pin_threads(2):
        print("BLAS:", timing.blas_info())
        report = timing.interleaved_medians(steps, repeats=args.repeats)
    print(f"attention B={b} T={t} d={d}, float32, 2 threads")
    print(timing.format_report(report, ref="torch_eager" if "torch_eager" in steps else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
