"""Train an MLP on scikit-learn's bundled 8x8 digits to >= 97% test accuracy.

Shows the whole path from a spec to a trained classifier: ``backcomp.build``
compiles examples/digits_mlp.toml with a fused Adam ``train_step``, which the
loop calls on minibatches; the test accuracy is measured with the module's
``forward``.  Plot: examples/out/digits_mlp.png.

    python examples/train_digits_mlp.py [--steps N] [--quick] [--out PLOT.png]
"""

import numpy as np
from sklearn.datasets import load_digits

from _common import parse_args, train_digits_classifier

args = parse_args(__doc__, name="digits_mlp", steps=3000, quick=60)
images = (load_digits().data / 16.0).astype(np.float32)   # 1797 images of 64 pixels in [0, 1]
train_digits_classifier("digits_mlp.toml", "digits MLP", images, args, lr=1e-3, evaluations=12)
