"""A GRU (examples/gru.toml) forecasts a noisy sine wave one step ahead.

Each sequence is 40 samples of sin(ω t + φ) plus noise, with a random frequency and
phase; the target at t is the clean value at t + 1.  The compiled Adam
``train_step`` trains on fresh sequences each step; a fixed held-out batch measures
the mean squared error (and, as its "accuracy", the fraction of forecasts within
0.1 of the clean target).  The plot shows the loss and one held-out sequence with its
forecast.  Plot: examples/out/gru_sine.png.

    python examples/train_gru_sine.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import Log, parse_args, spec

args = parse_args(__doc__, name="gru_sine", steps=600, quick=30)

LENGTH, NOISE = 40, 0.1
rng = np.random.default_rng(0)


def sines(size):
    t = np.arange(LENGTH + 1)
    omega = rng.uniform(0.15, 0.45, (size, 1))
    phase = rng.uniform(0, 2 * np.pi, (size, 1))
    clean = np.sin(omega * t + phase)
    noisy = clean[:, :-1] + NOISE * rng.normal(size=(size, LENGTH))
    return {"x": noisy[..., None].astype(np.float32), "y": clean[:, 1:, None].astype(np.float32)}


model = backcomp.build(spec("gru.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
held = sines(256)


def evaluate(step):
    """The held-out MSE, and as "accuracy" the fraction of forecasts within 0.1 of the target."""
    out = model.forward(params, held)
    pred = out["hs"] @ params["Wo"] + params["bo"]
    log.record(step, loss=out["loss"], accuracy=float(np.mean(np.abs(pred - held["y"]) < 0.1)))


log = Log("GRU, noisy sine forecast", every=max(1, args.steps // 10), evaluated_on="held-out batch")
evaluate(0)
for step in range(1, args.steps + 1):
    log.record(step, train_loss=model.train_step(params, sines(64), state, lr=1e-2))
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out)

# the forecast of one held-out sequence, beside the loss plot
import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

forecast = model.forward(params, held)
pred = (forecast["hs"][0] @ params["Wo"] + params["bo"])[:, 0]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(held["x"][0, :, 0], ".", color="0.6", label="noisy input x[t]")
ax.plot(held["y"][0, :, 0], "-", color="tab:blue", label="clean target sin at t+1")
ax.plot(pred, "--", color="tab:orange", label="GRU forecast")
ax.set(xlabel="t", title="one held-out sequence")
ax.legend(fontsize=8)
fig.tight_layout()
side = args.out.with_name(args.out.stem + "_forecast.png")
fig.savefig(side, dpi=100)
plt.close(fig)
print(f"saved {side}")
