"""The README quick start: use a module that `backcomp compile` wrote, with NumPy only.

Run it in the directory where you compiled examples/mlp.toml::

    backcomp compile path/to/backcomp/examples/mlp.toml -o mlp.py
    python path/to/backcomp/examples/use_mlp.py

It imports ``mlp`` from the current directory, makes a toy 4-class problem
(labels from a random linear rule on 8 features, as one-hot rows), and takes
plain gradient-descent steps with ``mlp.value_and_grad``: the loss falls.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())   # the compiled mlp.py sits in the current directory, not next to this script
try:
    import mlp
except ModuleNotFoundError:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(f"use_mlp.py: no mlp.py in {os.getcwd()}; first run\n"
             f"    backcomp compile {os.path.join(here, 'mlp.toml')} -o mlp.py")

rng = np.random.default_rng(0)
x = rng.standard_normal((256, 8)).astype(np.float32)
labels = np.argmax(x @ rng.standard_normal((8, 4)), axis=1)
inputs = {"x": x, "y": np.eye(4, dtype=np.float32)[labels]}

params = mlp.init_params(seed=0)          # {"W1": (8, 16), "b1": (16,), "W2": (16, 4), "b2": (4,)}
print("params:", {name: p.shape for name, p in params.items()})
first = None
for step in range(201):
    loss, grads = mlp.value_and_grad(params, inputs)
    first = loss if first is None else first
    if step % 25 == 0:
        accuracy = np.mean(mlp.forward(params, inputs)["probs"].argmax(axis=1) == labels)
        print(f"step {step:3d}  loss {loss:.4f}  accuracy {accuracy:.0%}")
    for name, grad in grads.items():
        params[name] -= 0.5 * grad            # gradient descent, in place
print(f"RESULT initial_loss={first:.6g} final_loss={loss:.6g}")
