"""Newton-CG against L-BFGS: logistic regression + L2 on the breast-cancer data.

The same spec as train_breast_cancer.py (examples/breast_cancer.toml), compiled with
``emit="hvp"``: ``scipy.optimize.minimize(method="Newton-CG", jac=True, hessp=...)``
gets the loss and gradient from ``value_and_grad`` and Hessian-vector products from
the module's ``hvp`` (forward-over-reverse, no Hessian is ever formed); L-BFGS-B gets
``value_and_grad`` alone.  Both run in float64 from the same start to the same
gradient tolerance, and the script prints the iterations each needed.
Plot: the loss and gradient norm per iteration (examples/out/newton_cg.png).

    python examples/train_newton_cg.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from scipy.optimize import minimize
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, parse_args, spec

args = parse_args(__doc__, name="newton_cg", steps=200, quick=8)

data = load_breast_cancer()
x_train, x_test, y_train, y_test = train_test_split(
    data.data, data.target, test_size=0.25, random_state=0, stratify=data.target)
mean, std = x_train.mean(axis=0), x_train.std(axis=0)
train = {"x": (x_train - mean) / std, "y": y_train.astype(np.float64)}
test = {"x": (x_test - mean) / std, "y": y_test.astype(np.float64)}

model = backcomp.build(spec("breast_cancer.toml"), emit="hvp")
start = model.init_params(seed=0, dtype=np.float64)
names = list(model.WRT)
sizes = [start[k].size for k in names]


def unflatten(theta):
    parts = np.split(theta, np.cumsum(sizes)[:-1])
    return {k: p.reshape(start[k].shape) for k, p in zip(names, parts)}


def flatten(arrays):
    return np.concatenate([np.ravel(arrays[k]) for k in names])


def fun(theta):
    loss, grads = model.value_and_grad(unflatten(theta), train)
    return float(loss), flatten(grads)


def hessp(theta, v):
    return flatten(model.hvp(unflatten(theta), train, unflatten(v)))


def run(method):
    """Minimise from the same start; the loss and gradient norm after every iteration."""
    trace = [fun(flatten(start))]
    options = {"maxiter": args.steps, "xtol": 1e-12} if method == "Newton-CG" else \
              {"maxiter": args.steps, "gtol": 1e-10, "ftol": 0.0}
    res = minimize(fun, flatten(start), jac=True, method=method, hessp=hessp if method == "Newton-CG" else None,
                   callback=lambda xk, *rest: trace.append(fun(xk)), options=options)
    return res, [(loss, float(np.linalg.norm(g))) for loss, g in trace]


newton, newton_trace = run("Newton-CG")
lbfgs, lbfgs_trace = run("L-BFGS-B")
for i, (loss, gnorm) in enumerate(newton_trace):
    print(f"step {i:5d}  Newton-CG loss {loss:.10f}  |grad| {gnorm:.2e}")
TOL = 1e-6   # the comparison: iterations until the gradient norm is below this


def iterations_to_tol(trace):
    return next((i for i, (_, gnorm) in enumerate(trace) if gnorm <= TOL), len(trace) - 1)


for name, res, trace in (("Newton-CG", newton, newton_trace), ("L-BFGS-B", lbfgs, lbfgs_trace)):
    print(f"{name}: |grad| <= {TOL:g} after {iterations_to_tol(trace)} iterations; stopped after {res.nit} "
          f"({res.nfev} loss+gradient evaluations"
          f"{f', {res.nhev} Hessian-vector products' if name == 'Newton-CG' else ''}), "
          f"final loss {res.fun:.10f}, |grad| {trace[-1][1]:.1e}")


def test_accuracy(theta):
    out = model.forward(unflatten(theta), test)
    return float(np.mean((out["z"] > 0) == (y_test == 1)))


class CompareLog(Log):
    def plot(self, out):
        """Loss above its minimum and gradient norm per iteration, both methods."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        best = min(newton.fun, lbfgs.fun)
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for name, trace, style in (("Newton-CG (hvp)", newton_trace, "o-"), ("L-BFGS-B", lbfgs_trace, ".-")):
            loss, gnorm = zip(*trace)
            ax[0].plot(np.maximum(np.array(loss) - best, 1e-17), style, ms=4, label=name)
            ax[1].plot(gnorm, style, ms=4, label=name)
        ax[1].axhline(TOL, color="gray", lw=0.8, ls="--")
        ax[0].set(xlabel="iteration", ylabel="loss − best loss", yscale="log", title="loss")
        ax[1].set(xlabel="iteration", ylabel="‖gradient‖", yscale="log", title="gradient norm")
        for a in ax:
            a.legend()
            a.grid(alpha=0.3)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)


log = CompareLog("Newton-CG vs L-BFGS", every=1, evaluated_on="training set")
log.record(0, loss=newton_trace[0][0])
log.record(len(newton_trace) - 1, loss=newton.fun, accuracy=test_accuracy(newton.x))
log.finish(args.out, newton_iterations=iterations_to_tol(newton_trace),
           lbfgs_iterations=iterations_to_tol(lbfgs_trace))
