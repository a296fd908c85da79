"""Train an MLP on scikit-learn's bundled 8x8 digits to >= 97% test accuracy.

Shows the whole path from a spec to a trained classifier: ``backcomp.build``
compiles examples/digits_mlp.toml with a fused Adam ``train_step``, which the
loop calls on minibatches; the test accuracy is measured with the module's
``forward``.  Plot: examples/out/digits_mlp.png.

    python examples/train_digits_mlp.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, accuracy, batches, parse_args, spec

args = parse_args(__doc__, name="digits_mlp", steps=3000, quick=60)

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)             # 1797 images of 64 pixels in [0, 1]
x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target.astype(np.int64), test_size=0.25, random_state=0, stratify=digits.target)
test = {"x": x_test, "labels": y_test}

model = backcomp.build(spec("digits_mlp.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
rng = np.random.default_rng(0)


def evaluate(step):
    out = model.forward(params, test)
    log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], y_test))


log = Log("digits MLP", every=max(1, args.steps // 12))
evaluate(0)
for step, idx in zip(range(1, args.steps + 1), batches(rng, len(x_train), 64)):
    loss = model.train_step(params, {"x": x_train[idx], "labels": y_train[idx]}, state, lr=1e-3)
    log.record(step, train_loss=loss)
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out)
