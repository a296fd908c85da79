"""Logistic regression with L2 on scikit-learn's bundled breast-cancer data.

The spec (examples/breast_cancer.toml) writes the penalised loss with the
stable ``sigmoid_binary_cross_entropy`` of the logits; the script standardises
the features with the training set's statistics, then runs full-batch
gradient descent with the compiled ``value_and_grad`` and its own update line,
so the whole optimiser is visible.  Plot: examples/out/breast_cancer.png.

    python examples/train_breast_cancer.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, parse_args, spec

args = parse_args(__doc__, name="breast_cancer", steps=500, quick=40)

data = load_breast_cancer()
x_train, x_test, y_train, y_test = train_test_split(
    data.data, data.target, test_size=0.25, random_state=0, stratify=data.target)
mean, std = x_train.mean(axis=0), x_train.std(axis=0)
train = {"x": ((x_train - mean) / std).astype(np.float32), "y": y_train.astype(np.float32)}
test = {"x": ((x_test - mean) / std).astype(np.float32), "y": y_test.astype(np.float32)}

model = backcomp.build(spec("breast_cancer.toml"))
params = model.init_params(seed=0)
lr = 0.5


def evaluate(step):
    out = model.forward(params, test)
    log.record(step, loss=out["loss"], accuracy=float(np.mean((out["z"] > 0) == (y_test == 1))))


log = Log("breast cancer, logistic regression + L2", every=max(1, args.steps // 10))
evaluate(0)
for step in range(1, args.steps + 1):
    loss, grads = model.value_and_grad(params, train)
    for name, grad in grads.items():
        params[name] -= lr * grad                       # plain gradient descent
    log.record(step, train_loss=loss)
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out)
