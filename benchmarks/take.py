"""Embedding lookups: forward + backward (the scatter-add) against PyTorch, float32.

    python benchmarks/take.py [--repeats 15]

One step is ``loss = sum(embedding(ids, E) * c)`` and its gradient w.r.t. E, for a
char-level vocabulary and a word-level one.  The generated module's backward is
``_scatter_add`` (sort the ids, sum each run with ``np.add.reduceat``); the columns
``add_at`` and ``onehot`` time the alternatives it was chosen over on the same data.
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

SPEC = """\
[model]
name = "take_bench"
loss = "loss"
[inputs]
ids = {{ shape = ["B", "T"], dtype = "int64" }}
c = ["B", "T", {d}]
[params]
E = [{v}, {d}]
[graph]
loss = "sum(embedding(ids, E) * c)"
"""

SHAPES = {"char (B 32, T 128, V 65, D 128)": (32, 128, 65, 128),
          "word (B 32, T 128, V 50000, D 256)": (32, 128, 50000, 256)}


def steps_for(b, t, v, d):
    module = backcomp.build(parse_spec(SPEC.format(v=v, d=d), "take_bench.toml"))
    rng = np.random.default_rng(0)
    E = rng.normal(size=(v, d)).astype(np.float32)
    ids = rng.integers(0, v, (b, t))
    c = rng.normal(size=(b, t, d)).astype(np.float32)
    steps = {"generated": lambda: module.value_and_grad({"E": E}, {"ids": ids, "c": c})}

    def add_at():
        out = np.zeros_like(E)
        np.add.at(out, ids.reshape(-1), c.reshape(-1, d))
        return E[ids], out
    steps["add_at"] = add_at
    if v <= 1000:
        def onehot():
            oh = (ids.reshape(-1)[:, None] == np.arange(v)).astype(np.float32)
            return E[ids], oh.T @ c.reshape(-1, d)
        steps["onehot"] = onehot
    try:
        import torch
        tE, tids, tc = torch.tensor(E, requires_grad=True), torch.tensor(ids), torch.tensor(c)

        def torch_step():
            tE.grad = None
            (torch.nn.functional.embedding(tids, tE) * tc).sum().backward()
            return tE.grad
        steps["torch_eager"] = torch_step
        ours = module.value_and_grad({"E": E}, {"ids": ids, "c": c})[1]["E"]
        np.testing.assert_allclose(ours, torch_step().numpy(), rtol=1e-4, atol=1e-3)
    except ImportError as e:
        print(f"skipped torch: {e}")
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    with timing.pin_threads(1):
        print("BLAS:", timing.blas_info())
        for label, shape in SHAPES.items():
            steps = steps_for(*shape)
            report = timing.interleaved_medians(steps, repeats=args.repeats)
            print(f"\n{label}, float32, one thread")
            print(timing.format_report(report, ref="torch_eager" if "torch_eager" in steps else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
