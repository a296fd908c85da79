"""backcomp.dask on a LocalCluster: 1 vs 2 workers, single-chunk overhead, memory per worker.

    python benchmarks/dask_scaling.py                 # all three, ~3 minutes on 2 idle cores
    python benchmarks/dask_scaling.py --only memory   # or: throughput, overhead

- throughput: the full gradient of an MLP (32 -> 128 -> 128 -> 1, float64) over an
  in-memory data set persisted in the cluster (10⁶ rows, chunks of 5·10⁴), on a
  LocalCluster of 1 worker and one of 2 workers (one thread each, BLAS pinned to one
  thread by the nanny), interleaved rounds, medians;
- ceiling: the same chunk work in 1 process vs 2 processes without Dask, interleaved:
  the speedup this machine allows at the time of the run (the cores are shared);
- overhead: one chunk through backcomp.dask (sync scheduler, and a 1-worker cluster
  with the chunk already on it) against calling the module's value_and_grad directly;
- memory: logistic regression over 10⁷ rows × 32 features generated chunk by chunk
  (dask.array.random, chunks of 2.5·10⁵ rows = 64 MB), never materialised; the peak
  resident set of each worker process (getrusage ru_maxrss, the workers are fresh).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # as the workers (Dask's nanny pins them): one
os.environ.setdefault("OMP_NUM_THREADS", "1")        # BLAS thread per process, set before numpy loads

import numpy as np  # noqa: E402

import backcomp  # noqa: E402
import backcomp.dask as bd  # noqa: E402
import dask  # noqa: E402
import dask.array as da  # noqa: E402
from backcomp import ops  # noqa: E402
from distributed import Client, LocalCluster, get_task_stream, wait  # noqa: E402


def mlp(features: int = 32, hidden: int = 128) -> backcomp.Graph:
    g = backcomp.Graph("bench_mlp")
    x = g.input("x", ("B", features))
    y = g.input("y", ("B",))
    W1 = g.param("W1", (features, hidden), "he_normal")
    b1 = g.param("b1", (hidden,))
    W2 = g.param("W2", (hidden, hidden), "he_normal")
    b2 = g.param("b2", (hidden,))
    w3 = g.param("w3", (hidden,), "normal(0.05)")
    h = ops.relu(ops.relu(x @ W1 + b1) @ W2 + b2)
    z = g.assign_name("z", h @ w3)
    g.loss(ops.mean(ops.sigmoid_binary_cross_entropy(z, y)) + 1e-4 * ops.sum(W1 ** 2))
    return g


def logistic(features: int = 32) -> backcomp.Graph:
    g = backcomp.Graph("bench_logistic")
    x = g.input("x", ("B", features))
    y = g.input("y", ("B",))
    w = g.param("w", (features,))
    b = g.param("b", ())
    z = g.assign_name("z", x @ w + b)
    g.loss(ops.mean(ops.sigmoid_binary_cross_entropy(z, y)) + 1e-4 * ops.sum(w ** 2) / 2)
    return g


def synthetic(rows: int, features: int, chunk: int, seed: int = 0):
    """Lazy (x, y): standard normal features, labels from a fixed linear rule plus noise."""
    rng = da.random.default_rng(seed)
    x = rng.standard_normal((rows, features), chunks=(chunk, features))
    w_true = np.linspace(-1.0, 1.0, features)
    noise = rng.standard_normal((rows,), chunks=(chunk,))
    y = ((x @ w_true + 0.5 * noise) > 0).astype(np.float64)
    return x, y


def cluster(workers: int, **kw) -> Client:
    return Client(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=":0", **kw))


def throughput(rounds: int) -> dict:
    module = backcomp.build(mlp())
    params = {k: v.astype(np.float64) for k, v in module.init_params(0).items()}
    rows, chunk = 1_000_000, 50_000
    clients = {n: cluster(n) for n in (1, 2)}
    data = {}
    for n, c in clients.items():
        x, y = synthetic(rows, 32, chunk)
        x, y = c.persist([x, y])
        wait([x, y])
        data[n] = {"x": x, "y": y}
    times = {1: [], 2: []}
    busy = {1: [], 2: []}     # worker occupancy: Σ task compute time / (workers · wall time)
    results = {}
    for r in range(rounds + 1):                  # round 0 warms both clusters
        for n in (1, 2) if r % 2 else (2, 1):
            with clients[n].as_current(), get_task_stream(clients[n]) as stream:
                t = time.perf_counter()
                results[n] = bd.value_and_grad(module, params, data[n])
                wall = time.perf_counter() - t
            if r:
                work = sum(s["stop"] - s["start"] for task in stream.data for s in task["startstops"]
                           if s["action"] == "compute")
                times[n].append(wall)
                busy[n].append(work / (n * wall))
                print(f"round {r}: {n} worker(s) {wall:.3f} s, occupancy {busy[n][-1]:.0%}", flush=True)
    assert np.allclose(results[1][0], results[2][0], rtol=1e-12)
    for c in clients.values():
        c.close()
        c.cluster.close()
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"rows": rows, "chunk": chunk, "rounds": rounds, "seconds_1_worker": med[1], "seconds_2_workers": med[2],
            "speedup": med[1] / med[2], "min_speedup": min(times[1]) / min(times[2]),
            "occupancy_1": statistics.median(busy[1]), "occupancy_2": statistics.median(busy[2]),
            "load_average": os.getloadavg(), "all_1": times[1], "all_2": times[2]}


def _plain_chunks(source: str, n: int, rows: int) -> float:
    """n chunk gradients of the module in this process, without Dask (the machine's ceiling)."""
    import types
    module = types.ModuleType("ceiling")
    exec(compile(source, "ceiling", "exec"), module.__dict__)
    params = {k: v.astype(np.float64) for k, v in module.init_params(0).items()}
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((rows, 32)), "y": (rng.random(rows) > 0.5).astype(np.float64)}
    t = time.perf_counter()
    for _ in range(n):
        module.value_and_grad(params, data)
    return time.perf_counter() - t


def ceiling(rounds: int, chunks: int = 20, rows: int = 50_000) -> dict:
    """The same chunk work as ``throughput`` in 1 process vs split over 2 processes, no
    Dask: how much faster two processes can be on this machine right now."""
    from concurrent.futures import ProcessPoolExecutor
    from pathlib import Path
    source = Path(backcomp.build(mlp()).__file__).read_text()
    times = {1: [], 2: []}
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_plain_chunks, [source] * 2, [1] * 2, [rows] * 2))   # warm both processes
        for r in range(rounds):
            for n in (1, 2) if r % 2 else (2, 1):
                t = time.perf_counter()
                list(pool.map(_plain_chunks, [source] * n, [chunks // n] * n, [rows] * n))
                times[n].append(time.perf_counter() - t)
                print(f"ceiling round {r + 1}: {n} process(es) {times[n][-1]:.3f} s", flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"seconds_1_process": med[1], "seconds_2_processes": med[2], "speedup": med[1] / med[2],
            "load_average": os.getloadavg()}


def overhead(rounds: int) -> dict:
    module = backcomp.build(mlp())
    params = {k: v.astype(np.float64) for k, v in module.init_params(0).items()}
    out = {}
    for rows in (1_000, 100_000):
        x, y = dask.compute(*synthetic(rows, 32, rows))
        data = {"x": x, "y": y}
        one = {"x": da.from_array(x, chunks=(rows, 32)), "y": da.from_array(y, chunks=rows)}
        direct, sync = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            module.value_and_grad(params, data)
            direct.append(time.perf_counter() - t)
            t = time.perf_counter()
            bd.value_and_grad(module, params, one, scheduler="sync")
            sync.append(time.perf_counter() - t)
        with cluster(1) as c:
            on = {k: c.persist(v) for k, v in one.items()}
            wait(list(on.values()))
            dist = []
            for i in range(rounds + 1):
                t = time.perf_counter()
                bd.value_and_grad(module, params, on)
                if i:
                    dist.append(time.perf_counter() - t)
        c.cluster.close()
        out[rows] = {k: statistics.median(v) for k, v in (("direct", direct), ("sync", sync), ("cluster", dist))}
    return out


def memory(rows: int = 10_000_000, chunk: int = 250_000) -> dict:
    module = backcomp.build(logistic())
    params = {k: v.astype(np.float64) for k, v in module.init_params(0).items()}
    x, y = synthetic(rows, 32, chunk)
    with cluster(2, memory_limit="4GiB") as c:
        before = c.run(_peak_rss)
        t = time.perf_counter()
        loss, grads = bd.value_and_grad(module, params, {"x": x, "y": y})
        seconds = time.perf_counter() - t
        peak = c.run(_peak_rss)
    c.cluster.close()
    return {"rows": rows, "features": 32, "chunk_rows": chunk, "chunk_MiB": chunk * 32 * 8 / 2**20,
            "data_GiB": rows * 32 * 8 / 2**30, "seconds": seconds, "loss": float(loss),
            "idle_rss_MiB": sorted(before.values()), "peak_rss_MiB": sorted(peak.values())}


def _peak_rss() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["throughput", "ceiling", "overhead", "memory"])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    report = {}
    for name, run in (("overhead", lambda: overhead(args.rounds)), ("throughput", lambda: throughput(args.rounds)),
                      ("ceiling", lambda: ceiling(args.rounds)), ("memory", memory)):
        if args.only in (None, name):
            report[name] = run()
            print(name, json.dumps(report[name], indent=1, default=float), flush=True)


if __name__ == "__main__":
    main()
