"""Forward + backward of a depthwise and a dilated conv2d, float32, against PyTorch eager.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/conv_family.py [--repeats 20] [--profile]

Each model is one convolution whose input and weight are both differentiated (so the
input gradient, conv2d_grad_input, is timed too, as in a middle layer), under the loss
mean(y²).  B 32, 32x32 images:
  depthwise  x (32, 64, 32, 32) * w (64, 1, 3, 3), padding 1, groups 64
  dilated    x (32, 16, 32, 32) * w (32, 16, 3, 3), padding 2, dilation 2
The generated module and torch are first checked to agree on the loss and both
gradients, then timed in interleaved rounds (medians, benchmarks/timing.py).
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
from backcomp import Graph, ops  # noqa: E402
from gelu_mlp import profile  # noqa: E402

MODELS = {   # name: (x shape, w shape, conv2d options)
    "depthwise": ((32, 64, 32, 32), (64, 1, 3, 3), {"padding": 1, "groups": 64}),
    "dilated": ((32, 16, 32, 32), (32, 16, 3, 3), {"padding": 2, "dilation": 2}),
}


def build_module(name: str):
    xs, ws, options = MODELS[name]
    g = Graph(f"conv_{name}")
    y = ops.conv2d(g.param("x", xs, init="normal(1.0)"), g.param("w", ws, init="he_normal"), **options)
    g.loss(ops.mean(y * y))
    return backcomp.build(g)


def torch_step(name: str, params):
    import torch
    options = MODELS[name][2]
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}

    def step():
        y = torch.nn.functional.conv2d(tp["x"], tp["w"], **options)
        loss = (y * y).mean()
        grads = torch.autograd.grad(loss, list(tp.values()))
        return float(loss.detach()), {k: g.numpy() for k, g in zip(tp, grads)}
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="per-statement profile of the generated modules")
    args = ap.parse_args(argv)
    import torch  # noqa: F401  (imported before pin_threads, so its pool is pinned too)
    with timing.pin_threads(args.threads):
        print("BLAS:", timing.blas_info())
        for name in MODELS:
            module = build_module(name)
            params = module.init_params(seed=0, dtype=np.float32)

            def generated(module=module, params=params):
                loss, grads = module.value_and_grad(params, {})
                return float(loss), grads

            steps = {"generated": generated, "torch_eager": torch_step(name, params)}
            ref_loss, ref_grads = generated()
            loss, grads = steps["torch_eager"]()
            assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (name, loss, ref_loss)
            for k, g in grads.items():
                assert ref_grads[k].dtype == np.float32
                np.testing.assert_allclose(ref_grads[k], g, rtol=2e-3, atol=1e-6, err_msg=f"{name}: {k}")
            xs, ws, options = MODELS[name]
            print(f"\n{name}: x {xs} * w {ws} {options}, float32, {args.threads} threads; "
                  f"loss and gradients agree with torch")
            report = timing.interleaved_medians(steps, repeats=args.repeats)
            print(timing.format_report(report, ref="torch_eager"))
            med = {n: s.median for n, s in report.items()}
            print(f"{name}: generated / torch_eager = {med['generated'] / med['torch_eager']:.2f}")
            if args.profile:
                profile(module, params, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
