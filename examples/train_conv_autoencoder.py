"""Train a convolutional autoencoder (examples/conv_autoencoder.toml) on the 8x8 digits.

Two stride-2 conv2d layers encode each image into 16 numbers; two stride-2
conv_transpose2d layers (output_padding 1) decode them.  backcomp derives the VJPs
of the transposed convolutions (a conv2d and a weight gradient) and compiles a fused
Adam ``train_step``.  Prints the test-set reconstruction error (mean squared, pixels
in [0, 1]) as training runs; plot: examples/out/conv_autoencoder.png.

    python examples/train_conv_autoencoder.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, batches, parse_args, spec

args = parse_args(__doc__, name="conv_autoencoder", steps=2000, quick=60)
images = (load_digits().images / 16.0).astype(np.float32)[:, None]   # (1797, 1, 8, 8) in [0, 1]
x_train, x_test = train_test_split(images, test_size=0.25, random_state=0)

model = backcomp.build(spec("conv_autoencoder.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
rng = np.random.default_rng(0)


def evaluate(step):
    log.record(step, loss=model.forward(params, {"x": x_test})["loss"])


log = Log("conv autoencoder, digits (MSE)", every=max(1, args.steps // 10))
evaluate(0)
for step, idx in zip(range(1, args.steps + 1), batches(rng, len(x_train), 64)):
    log.record(step, train_loss=model.train_step(params, {"x": x_train[idx]}, state, lr=3e-3))
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out)
