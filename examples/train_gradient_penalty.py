"""A WGAN-GP critic between two 2-D point clouds, trained with a gradient penalty.

The spec (examples/gradient_penalty.toml) computes the critic D, its gradient w.r.t.
the input points as a grad node, ``dx = grad(sum(d), x)``, and the loss
mean D(fake) − mean D(real) + lam · mean((‖dx‖ − 1)²) at random interpolates between
real and fake points; Adam ``train_step`` differentiates that through the gradient.
Real points: scikit-learn's two moons; fake points: a Gaussian blob (a generator that
has not learned yet).  −loss without the penalty estimates the Wasserstein distance.
Plot: the loss, and the critic's value and gradient norm over the plane
(examples/out/gradient_penalty.png).

    python examples/train_gradient_penalty.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import make_moons

import backcomp
from _common import Log, parse_args, spec

args = parse_args(__doc__, name="gradient_penalty", steps=800, quick=30)
LAM, N = 10.0, 128

model = backcomp.build(spec("gradient_penalty.toml"), optimizer="adam")
params = model.init_params(seed=0, dtype=np.float64)
state = model.init_state(params)
rng = np.random.default_rng(0)


def batch(n: int, seed=None) -> dict:
    """n real, n fake and n interpolated points, with the weights that pick the loss terms."""
    r = rng if seed is None else np.random.default_rng(seed)
    real = make_moons(n, noise=0.05, random_state=int(r.integers(1 << 30)))[0] - [0.5, 0.25]
    fake = r.normal([0.0, 0.0], 0.5, (n, 2))
    eps = r.uniform(0.0, 1.0, (n, 1))
    x = np.concatenate([real, fake, eps * real + (1 - eps) * fake])
    sign = np.concatenate([np.full(n, -1.0 / n), np.full(n, 1.0 / n), np.zeros(n)])
    gp = np.concatenate([np.zeros(2 * n), np.full(n, LAM / n)])
    return {"x": x, "sign": sign, "gp": gp}


held_out = batch(512, seed=1)


def penalty_gap(out) -> float:
    """mean |‖∇D‖ − 1| at the held-out interpolates: what the penalty drives to 0."""
    return float(np.mean(np.abs(out["gnorm"][1024:] - 1)))


def evaluate(step):
    out = model.forward(params, held_out)
    log.record(step, loss=out["loss"])
    wasserstein = float(-np.sum(held_out["sign"] * out["d"]))
    print(f"      Wasserstein estimate {wasserstein:.3f}  mean |‖∇D‖ − 1| {penalty_gap(out):.3f}")


class CriticLog(Log):
    def plot(self, out):
        """The loss; the critic over the plane; its gradient norm over the plane."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs, ys = np.meshgrid(np.linspace(-2, 2, 120), np.linspace(-1.6, 1.6, 100))
        plane = {"x": np.stack([xs.ravel(), ys.ravel()], axis=1), "sign": np.zeros(xs.size), "gp": np.zeros(xs.size)}
        res = model.forward(params, plane)
        fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
        steps, losses, _ = zip(*self.evals)
        ax[0].plot(*zip(*self.train), color="tab:blue", alpha=0.3, lw=0.8, label="training batch")
        ax[0].plot(steps, losses, "o-", ms=3, color="tab:blue", label="held-out batch")
        ax[0].set(xlabel="step", ylabel="critic loss", title="loss (−W + penalty)")
        ax[0].legend()
        pts = held_out["x"]
        for a, values, title, cmap in ((ax[1], res["d"], "critic D(x)", "coolwarm"),
                                       (ax[2], res["gnorm"], "‖∇ₓD(x)‖ (penalised towards 1)", "viridis")):
            c = a.contourf(xs, ys, values.reshape(xs.shape), levels=20, cmap=cmap)
            fig.colorbar(c, ax=a)
            a.scatter(*pts[:512].T, s=3, color="white", edgecolor="black", linewidth=0.2, label="real (moons)")
            a.scatter(*pts[512:1024].T, s=3, color="black", label="fake (Gaussian)")
            a.set(title=title, xlabel="x₁", ylabel="x₂")
        ax[1].legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)


log = CriticLog("WGAN-GP critic", every=max(1, args.steps // 10), evaluated_on="held-out batch")
evaluate(0)
for step in range(1, args.steps + 1):
    log.record(step, train_loss=model.train_step(params, batch(N), state, lr=1e-3, beta1=0.5, beta2=0.9))
    if log.due(step, args.steps):
        evaluate(step)
log.finish(args.out, penalty_gap=penalty_gap(model.forward(params, held_out)))
