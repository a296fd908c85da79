"""Train a small CNN on scikit-learn's bundled 8x8 digits to >= 97% test accuracy.

examples/digits_cnn.toml stacks conv2d (3x3, 32 channels) + relu + max_pool2d
+ reshape + a dense softmax layer; backcomp derives the convolution and pooling
VJPs and compiles a fused Adam ``train_step``.  Same split as
train_digits_mlp.py, so the two are comparable.  Plot: examples/out/digits_cnn.png.

    python examples/train_digits_cnn.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, accuracy, batches, parse_args, spec

args = parse_args(__doc__, name="digits_cnn", steps=1500, quick=40)

digits = load_digits()
x = (digits.images / 16.0).astype(np.float32)[:, None]     # (1797, 1, 8, 8) in [0, 1]
x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target.astype(np.int64), test_size=0.25, random_state=0, stratify=digits.target)
test = {"x": x_test, "labels": y_test}

model = backcomp.build(spec("digits_cnn.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
rng = np.random.default_rng(0)


def evaluate(step):
    out = model.forward(params, test)
    log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], y_test))


log = Log("digits CNN", every=max(1, args.steps // 10))
evaluate(0)
for step, idx in zip(range(1, args.steps + 1), batches(rng, len(x_train), 64)):
    loss = model.train_step(params, {"x": x_train[idx], "labels": y_train[idx]}, state, lr=2e-3)
    log.record(step, train_loss=loss)
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out)
