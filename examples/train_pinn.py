"""A physics-informed network: u''(x) = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0.

The spec (examples/pinn.toml) writes u as x(1 - x) times a tanh MLP and its second
derivative as grad nodes, ``du = grad(sum(u), x)``, ``d2u = grad(sum(du), x)``; the
loss is the mean squared residual d2u + pi^2 sin(pi x) at collocation points.  Adam
(``train_step``) in float64 on 64 fresh random points per step; the max error against
the exact solution sin(pi x) is measured on a grid of 1001 points.
Plot: the loss, u against sin(pi x), and the error (examples/out/pinn.png).

    python examples/train_pinn.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import Log, parse_args, spec

args = parse_args(__doc__, name="pinn", steps=4000, quick=60)

model = backcomp.build(spec("pinn.toml"), optimizer="adam")
params = model.init_params(seed=0, dtype=np.float64)
state = model.init_state(params)
rng = np.random.default_rng(0)
grid = {"x": np.linspace(0.0, 1.0, 1001)[:, None]}
exact = np.sin(np.pi * grid["x"][:, 0])


def max_error() -> float:
    return float(np.max(np.abs(model.forward(params, grid)["u"][:, 0] - exact)))


def evaluate(step):
    log.record(step, loss=model.forward(params, grid)["loss"])


class PinnLog(Log):
    def plot(self, out):
        """The loss, u against sin(pi x), and the error."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        u = model.forward(params, grid)["u"][:, 0]
        xs = grid["x"][:, 0]
        fig, ax = plt.subplots(1, 3, figsize=(14, 4))
        steps, losses, _ = zip(*self.evals)
        ax[0].plot(*zip(*self.train), color="tab:blue", alpha=0.3, lw=0.8, label="64 random points")
        ax[0].plot(steps, losses, "o-", ms=3, color="tab:blue", label="grid")
        ax[0].set(xlabel="step", ylabel="mean squared residual", yscale="log", title="loss")
        ax[0].legend()
        ax[1].plot(xs, exact, color="black", lw=3, alpha=0.3, label="sin(πx)")
        ax[1].plot(xs, u, color="tab:orange", label="PINN u(x)")
        ax[1].set(xlabel="x", ylabel="u", title="solution")
        ax[1].legend()
        ax[2].plot(xs, u - exact, color="tab:red")
        ax[2].set(xlabel="x", ylabel="u − sin(πx)", title=f"error (max {max_error():.1e})")
        ax[2].grid(alpha=0.3)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)


log = PinnLog("PINN for u'' = -pi^2 sin(pi x)", every=max(1, args.steps // 10), evaluated_on="grid of 1001 points")
evaluate(0)
for step in range(1, args.steps + 1):
    lr = 1e-2 if step < 0.6 * args.steps else 1e-3          # a step decay for the last 40%
    x = rng.uniform(0.0, 1.0, (64, 1))
    log.record(step, train_loss=model.train_step(params, {"x": x}, state, lr=lr))
    if log.due(step, args.steps):
        evaluate(step)

error = max_error()
print(f"max |u - sin(pi x)| on the grid: {error:.2e}")
log.finish(args.out, max_error=error)
