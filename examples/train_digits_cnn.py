"""Train a small CNN on scikit-learn's bundled 8x8 digits to >= 97% test accuracy.

examples/digits_cnn.toml stacks conv2d (3x3, 32 channels) + relu + max_pool2d
+ reshape + a dense softmax layer; backcomp derives the convolution and pooling
VJPs and compiles a fused Adam ``train_step``.  Same split as
train_digits_mlp.py, so the two are comparable.  Plot: examples/out/digits_cnn.png.

    python examples/train_digits_cnn.py [--steps N] [--quick] [--out PLOT.png]
"""

import numpy as np
from sklearn.datasets import load_digits

from _common import parse_args, train_digits_classifier

args = parse_args(__doc__, name="digits_cnn", steps=1500, quick=40)
images = (load_digits().images / 16.0).astype(np.float32)[:, None]   # (1797, 1, 8, 8) in [0, 1]
train_digits_classifier("digits_cnn.toml", "digits CNN", images, args, lr=2e-3, evaluations=10)
