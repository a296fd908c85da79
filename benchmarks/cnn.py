"""One value_and_grad step of the issue-13 CNN, float32, 2 threads, side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cnn.py [--repeats 20] [--profile]
        [--baseline old_cnn_bench.py]

B 64, 1x28x28: conv 3x3x16 (padding 1), relu, 2x2 max pool, conv 3x3x32 (padding 1),
relu, 2x2 max pool, dense 10, integer-label cross-entropy.  Times the generated module
against PyTorch eager (skipped with a note if torch is missing), interleaved so that
machine noise hits both alike, after checking that the two agree on the loss and every
gradient.  ``--profile`` prints the per-statement time of the generated module;
``--baseline`` times a module generated from this SPEC by another checkout (say the
release before a change: ``backcomp compile``) in the same interleaved rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

import backcomp  # noqa: E402
import timing  # noqa: E402
from gelu_mlp import profile  # noqa: E402

SPEC = """\
[model]
name = "cnn_bench"
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


def build_module():
    path = Path(tempfile.mkdtemp(prefix="cnn_bench_")) / "cnn_bench.toml"
    path.write_text(SPEC)
    return backcomp.build(path)


def torch_step(params, x, labels):
    import torch
    F = torch.nn.functional
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx, ty = torch.from_numpy(x), torch.from_numpy(labels)

    def step():
        h1 = F.relu(F.conv2d(tx, tp["K1"], padding=1) + tp["c1"])
        h2 = F.relu(F.conv2d(F.max_pool2d(h1, 2), tp["K2"], padding=1) + tp["c2"])
        logits = F.max_pool2d(h2, 2).reshape(-1, 1568) @ tp["W"] + tp["b"]
        loss = F.cross_entropy(logits, ty)
        grads = torch.autograd.grad(loss, list(tp.values()))
        return float(loss.detach()), {k: g.numpy() for k, g in zip(tp, grads)}
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="per-statement profile of the generated module")
    ap.add_argument("--baseline", help="a module generated from SPEC elsewhere, timed alongside")
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401  (imported first, so pin_threads sets its pool too)
    except ImportError as e:
        print(f"skipped torch_eager: {e}")
    module = build_module()
    params = module.init_params(seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    params = {k: (v if k[0] in "KW" else rng.normal(0, 0.1, v.shape).astype(np.float32))
              for k, v in params.items()}        # non-zero biases: relu and pool ties stay rare
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, args.batch)
    inputs = {"x": x, "labels": labels}

    def generated():
        loss, grads = module.value_and_grad(params, inputs)
        return float(loss), grads

    with timing.pin_threads(args.threads):
        steps = {"generated": generated}
        if args.baseline:
            spec = importlib.util.spec_from_file_location("cnn_baseline", args.baseline)
            baseline = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(baseline)
            steps["baseline"] = lambda: (lambda lg: (float(lg[0]), lg[1]))(baseline.value_and_grad(params, inputs))
        if "torch" in sys.modules:
            steps["torch_eager"] = torch_step(params, x, labels)
        ref_loss, ref_grads = generated()
        for name, step in steps.items():
            loss, grads = step()
            assert grads[next(iter(grads))].dtype == np.float32, name
            assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (name, loss, ref_loss)
            for k, g in grads.items():
                np.testing.assert_allclose(g, ref_grads[k], rtol=2e-3, atol=2e-5, err_msg=f"{name}: {k}")
        print(f"CNN B={args.batch} 1x28x28 conv3x3x16-pool-conv3x3x32-pool-dense10, float32, "
              f"{args.threads} threads; all {len(steps)} agree on loss and gradients")
        print("BLAS:", timing.blas_info())
        report = timing.interleaved_medians(steps, repeats=args.repeats)
        print(timing.format_report(report, ref="torch_eager" if "torch_eager" in steps else None))
        med = {n: s.median for n, s in report.items()}
        print("generated / peer: " + ", ".join(f"{n} {med['generated'] / m:.2f}" for n, m in med.items()
                                               if n != "generated"))
        if args.profile:
            profile(module, params, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
