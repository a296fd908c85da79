"""Full-batch L-BFGS over 10⁷ rows on a Dask LocalCluster: logistic regression, then an MLP.

    pip install -e ".[dask,examples]" scipy
    python examples/dask_lbfgs.py                 # 10⁷ rows; writes examples/out/dask_lbfgs.png

The data — 32 standard-normal features and a label from a noisy rule with an
interaction term, so an MLP beats a linear model — are generated chunk by chunk by
``dask.array.random`` and never held whole: every evaluation of the loss regenerates
them on the workers (the same values each time), so memory stays at a few chunks
per worker whatever ``--rows`` is.  Each evaluation is one call of
``backcomp.dask.value_and_grad``: the exact full-data loss and gradient, which
``scipy.optimize.minimize(method="L-BFGS-B", jac=True)`` consumes.  The accuracy
is computed lazily with ``backcomp.dask.forward`` under a Dask progress bar.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

import backcomp
import backcomp.dask as bd
import dask.array as da
from backcomp import ops
from distributed import Client, LocalCluster, progress

FEATURES = 32
OUT = Path(__file__).resolve().parent / "out" / "dask_lbfgs.png"


def logistic() -> backcomp.Graph:
    g = backcomp.Graph("dask_logistic")
    x = g.input("x", ("B", FEATURES))
    y = g.input("y", ("B",))
    w = g.param("w", (FEATURES,))
    b = g.param("b", ())
    z = g.output("z", x @ w + b)
    g.loss(ops.mean(ops.sigmoid_binary_cross_entropy(z, y)) + 1e-4 * ops.sum(w ** 2) / 2)
    return g


def mlp(hidden: int = 32) -> backcomp.Graph:
    g = backcomp.Graph("dask_mlp")
    x = g.input("x", ("B", FEATURES))
    y = g.input("y", ("B",))
    W1 = g.param("W1", (FEATURES, hidden), "he_normal")
    b1 = g.param("b1", (hidden,))
    w2 = g.param("w2", (hidden,), "normal(0.1)")
    b2 = g.param("b2", ())
    h = g.assign_name("h", ops.tanh(x @ W1 + b1))
    z = g.output("z", h @ w2 + b2)
    g.loss(ops.mean(ops.sigmoid_binary_cross_entropy(z, y)) + 1e-4 * ops.sum(W1 ** 2) / 2)
    return g


def synthetic(rows: int, chunk: int, seed: int = 0) -> dict:
    """Lazy inputs: x ~ N(0, 1); y = [x₀x₁ + ½·x·w + 0.3·noise > 0]."""
    rng = da.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES), chunks=(chunk, FEATURES))
    noise = rng.standard_normal((rows,), chunks=(chunk,))
    w = np.linspace(-1.0, 1.0, FEATURES) / np.sqrt(FEATURES)
    y = ((x[:, 0] * x[:, 1] + 0.5 * (x @ w) + 0.3 * noise) > 0).astype(np.float64)
    return {"x": x, "y": y}


def flat(params: dict) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in params.values()])


def unflat(theta: np.ndarray, like: dict) -> dict:
    out, start = {}, 0
    for k, v in like.items():
        out[k] = theta[start:start + v.size].reshape(v.shape)
        start += v.size
    return out


def fit(module, data: dict, maxiter: int) -> tuple[dict, list[float]]:
    """L-BFGS-B on the exact full-data loss; returns the params and the loss per iteration."""
    like = {k: v.astype(np.float64) for k, v in module.init_params(seed=0).items()}
    history: list[float] = []
    start = time.perf_counter()

    def fun(theta):
        loss, grads = bd.value_and_grad(module, unflat(theta, like), data)
        return float(loss), flat(grads)

    def callback(intermediate_result):
        history.append(float(intermediate_result.fun))
        print(f"  iteration {len(history) - 1:3d}  loss {history[-1]:.6f}  ({time.perf_counter() - start:.0f} s)",
              flush=True)

    history.append(fun(flat(like))[0])
    result = minimize(fun, flat(like), jac=True, method="L-BFGS-B", callback=callback,
                      options={"maxiter": maxiter})
    print(f"  {result.message} after {result.nit} iterations, {result.nfev} evaluations", flush=True)
    return unflat(result.x, like), history


def accuracy(client, module, params, data) -> float:
    z = bd.forward(module, params, data, outputs=["z"])["z"]
    future = client.compute(((z > 0) == (data["y"] > 0.5)).mean())
    progress(future)
    print()
    return float(future.result())


def plot(histories: dict, out: Path, rows: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in histories.items():
        ax.plot(range(len(losses)), losses, "o-", ms=3, label=name)
    ax.set(xlabel="L-BFGS iteration", ylabel="full-data loss", title=f"L-BFGS-B over {rows:,} rows on Dask")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"saved {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--chunk", type=int, default=250_000, help="rows per chunk (default 250000, 61 MiB of x)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--maxiter", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="10⁵ rows, 5 iterations (for tests)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.quick:
        args.rows, args.chunk, args.maxiter = 100_000, 25_000, 5

    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=":0")
    with Client(cluster) as client:
        if "dashboard" in client.scheduler_info().get("services", {}):
            print(f"Dask dashboard: {client.dashboard_link}")
        else:
            print("Dask dashboard: not running (pip install 'bokeh>=3.1' to get one)")
        data = synthetic(args.rows, args.chunk)
        print(f"{args.rows:,} rows x {FEATURES} features in {data['x'].numblocks[0]} chunks of {args.chunk:,} rows, "
              f"{args.workers} workers", flush=True)
        histories, scores = {}, {}
        for name, graph in (("logistic regression", logistic()), ("MLP 32-32-1", mlp())):
            module = backcomp.build(graph)
            print(f"{name}:", flush=True)
            params, histories[name] = fit(module, data, args.maxiter)
            scores[name] = accuracy(client, module, params, data)
            print(f"  accuracy {scores[name]:.2%} on all {args.rows:,} rows", flush=True)
    cluster.close()
    plot(histories, args.out, args.rows)
    print("RESULT " + " ".join(f"{k.split()[0].lower()}_loss={h[-1]:.6g} {k.split()[0].lower()}_accuracy="
                               f"{scores[k]:.4f}" for k, h in histories.items()), flush=True)


if __name__ == "__main__":
    main()
