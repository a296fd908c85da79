"""Train a CNN with batch norm and dropout on scikit-learn's 8x8 digits; save, reload, re-evaluate.

examples/digits_bn_cnn.toml stacks two [conv2d -> batch_norm -> relu ->
max_pool2d] stages, dropout and a dense layer.  Its running statistics are
[buffers]: the module's ``init_buffers()`` creates them, every ``train_step``
(train mode, dropout masks drawn from ``rng=``) updates them in place, and
``forward(..., train=False)`` evaluates with them (no dropout, no batch
statistics).  After training the params and the buffers are saved together
with ``np.savez``, loaded back, and the reloaded model must give exactly the
same test predictions; the script also shows what forgetting the buffers costs.
Same split as train_digits_cnn.py.  Plot: examples/out/digits_bn_cnn.png, and
the saved model next to it (digits_bn_cnn.npz).

    python examples/train_digits_bn_cnn.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, accuracy, batches, parse_args, spec

args = parse_args(__doc__, name="digits_bn_cnn", steps=1500, quick=40)

digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)[:, None]       # (1797, 1, 8, 8) in [0, 1]
labels = digits.target.astype(np.int64)
x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)
test = {"x": x_test, "labels": y_test}

model = backcomp.build(spec("digits_bn_cnn.toml"), optimizer="adam")
params = model.init_params(seed=0)
buffers = model.init_buffers()          # running means 0, variances 1: updated in place by train mode
state = model.init_state(params)
order = np.random.default_rng(0)        # minibatch order
dropout_rng = np.random.default_rng(1)  # dropout masks


def evaluate_with(params, buffers):
    """Test loss and accuracy in eval mode: running statistics, no dropout."""
    out = model.forward(params, test, buffers=buffers, train=False)
    return out, accuracy(out["logits"], y_test)


def evaluate(step):
    out, acc = evaluate_with(params, buffers)
    log.record(step, loss=out["loss"], accuracy=acc)
    return out, acc


log = Log("digits CNN, batch norm + dropout", every=max(1, args.steps // 10))
evaluate(0)
for step, idx in zip(range(1, args.steps + 1), batches(order, len(x_train), 64)):
    loss = model.train_step(params, {"x": x_train[idx], "labels": y_train[idx]}, state, lr=2e-3,
                            rng=dropout_rng, buffers=buffers)
    log.record(step, train_loss=loss)
    if log.due(step, args.steps):
        out, acc = evaluate(step)

# Save params and buffers together, load them into fresh dicts, evaluate again.
saved = args.out.with_suffix(".npz")
saved.parent.mkdir(parents=True, exist_ok=True)
np.savez(saved, **{f"param_{k}": v for k, v in params.items()}, **{f"buffer_{k}": v for k, v in buffers.items()})
with np.load(saved) as f:
    params2 = {k.removeprefix("param_"): f[k] for k in f.files if k.startswith("param_")}
    buffers2 = {k.removeprefix("buffer_"): f[k] for k in f.files if k.startswith("buffer_")}
out2, acc2 = evaluate_with(params2, buffers2)
if not np.array_equal(out2["logits"], out["logits"]):
    raise SystemExit("the reloaded model's test logits differ from the trained model's")
print(f"saved params and buffers to {saved}; reloaded: test accuracy {acc2:.2%} (identical logits)")
_, acc_fresh = evaluate_with(params2, model.init_buffers())
print(f"the same params with fresh buffers (mean 0, var 1) instead of the running statistics: {acc_fresh:.2%}")
log.finish(args.out, reloaded_accuracy=acc2, fresh_buffers_accuracy=acc_fresh)
