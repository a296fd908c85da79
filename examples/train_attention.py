"""Single-head self-attention learns to reverse sequences (examples/reversal_attention.toml).

Each example is 8 random symbols out of 10, one-hot; the target at position t
is the symbol at position 7 - t.  Fresh sequences are generated every step and
the compiled Adam ``train_step`` trains on them; a fixed held-out batch measures
the loss and per-token accuracy.  At the end the script prints which position
each query attends to most, which should be the mirror image 7, 6, ..., 0.
Plot: examples/out/attention.png.

    python examples/train_attention.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import Log, accuracy, parse_args, spec

args = parse_args(__doc__, name="attention", steps=600, quick=60)

LENGTH, SYMBOLS = 8, 10
rng = np.random.default_rng(0)


def reversal_batch(size: int):
    symbols = rng.integers(0, SYMBOLS, (size, LENGTH))
    return {"tokens": np.eye(SYMBOLS, dtype=np.float32)[symbols], "target": symbols[:, ::-1].copy()}


model = backcomp.build(spec("reversal_attention.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
held_out = reversal_batch(512)


def evaluate(step):
    out = model.forward(params, held_out)
    log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], held_out["target"]))
    return out


log = Log("self-attention, sequence reversal", every=max(1, args.steps // 10), evaluated_on="held-out batch")
evaluate(0)
for step in range(1, args.steps + 1):
    log.record(step, train_loss=model.train_step(params, reversal_batch(64), state, lr=3e-3))
    if log.due(step, args.steps):
        out = evaluate(step)
print("most-attended key position per query:", out["attn"].mean(axis=0).argmax(axis=-1))
log.finish(args.out)
