"""XOR with the classic 2-2-1 sigmoid network (examples/xor.toml).

The four patterns are the whole data set, so every step is full-batch: the
compiled module's fused Adam ``train_step`` runs them until the network's
outputs round to the XOR truth table, which the script prints at the end.
Plot: examples/out/xor.png.

    python examples/train_xor.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import Log, parse_args, spec

args = parse_args(__doc__, name="xor", steps=1500, quick=100)

data = {"x": np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32),
        "t": np.array([[0], [1], [1], [0]], dtype=np.float32)}

model = backcomp.build(spec("xor.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)


def evaluate(step):
    out = model.forward(params, data)
    log.record(step, loss=out["loss"], accuracy=float(np.mean((out["y"] > 0.5) == (data["t"] > 0.5))))
    return out


log = Log("XOR 2-2-1", every=max(1, args.steps // 10), evaluated_on="four patterns")
evaluate(0)
for step in range(1, args.steps + 1):
    log.record(step, train_loss=model.train_step(params, data, state, lr=0.05))
    if log.due(step, args.steps):
        out = evaluate(step)
for (a, b), y in zip(data["x"].astype(int), out["y"][:, 0]):
    print(f"  {a} xor {b} -> {y:.3f}")
log.finish(args.out)
