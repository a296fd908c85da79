"""A residual MLP (examples/residual_mlp.toml) on three generated spirals.

The hidden state ``h`` feeds both the residual branch and the skip connection
``h2 = h + r``, so backcomp sums the cotangents of its two consumers.  The data
are three interleaved 2-D spirals, given to the 6-input model as
(x, y, x², y², xy, r).  Prints the training loss and accuracy as Adam runs;
plot: examples/out/residual.png.

    python examples/train_residual.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import Log, accuracy, batches, parse_args, spec

args = parse_args(__doc__, name="residual", steps=1500, quick=60)


def spirals(n_per_class: int, rng: np.random.Generator):
    """Three noisy spiral arms, 120° apart; features (x, y, x², y², xy, r)."""
    t = rng.uniform(0.1, 1.0, (3, n_per_class))
    angle = 9.0 * t + np.arange(3)[:, None] * 2 * np.pi / 3 + rng.normal(0, 0.15, t.shape)
    x, y = (t * np.cos(angle)).ravel(), (t * np.sin(angle)).ravel()
    features = np.stack([x, y, x * x, y * y, x * y, np.hypot(x, y)], axis=1)
    return features.astype(np.float32), np.repeat(np.arange(3), n_per_class)


rng = np.random.default_rng(0)
x, labels = spirals(300, rng)
train = {"x": x, "labels": labels}

model = backcomp.build(spec("residual_mlp.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)


def evaluate(step):
    out = model.forward(params, train)
    log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], labels))


log = Log("residual MLP, spirals", every=max(1, args.steps // 10), evaluated_on="training set")
evaluate(0)
for step, idx in zip(range(1, args.steps + 1), batches(rng, len(x), 64)):
    loss = model.train_step(params, {"x": x[idx], "labels": labels[idx]}, state, lr=0.01)
    log.record(step, train_loss=loss)
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out)
