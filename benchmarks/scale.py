"""Compile-time scaling: how long backcomp takes, and how many lines it writes, as models grow.

    python benchmarks/scale.py                     # the full table (chains up to 2000 layers)
    python benchmarks/scale.py --quick             # smaller sizes, for a smoke run
    python benchmarks/scale.py --json out.json     # also write the numbers as JSON
    python benchmarks/scale.py --check             # exit 1 if compile time grows too fast

Models (built with the Python builder, so spec parsing is not timed):
- ``chain(n)``: a residual chain of n layers, h = h + tanh(h @ W_i + b_i), width 4;
- ``elementwise_chain(n)``: n unary ops in a row, h = sin(tanh(...)) -- one fused expression;
- ``mlp(depth)``: depth hidden layers relu(h @ W + b) of width 32, softmax cross-entropy;
- ``random_dag(n)``: n nodes, each an op of one or two earlier nodes (fan-out everywhere).

Each row is the median of ``--repeat`` compiles of a fresh graph (the build cache is not
involved: ``compile_source`` is called directly; SymPy's cache is cleared before each).  A compile that raises is recorded with
its error instead of a time.  The tests in tests/test_scale.py use the same builders
(and check the numbers the modules compute; timing is measured only here).

Growth: for each pair in ``GROWTH`` (4x the size), the ratio of compile times is
printed as ``x4.0 nodes -> x4.6 time`` and compared with ``GROWTH_LIMIT`` (10x: linear
growth with room for noise; quadratic growth would give about 16x).  ``--check``
makes a ratio over the limit exit 1.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import backcomp  # noqa: E402
from backcomp import ops  # noqa: E402
from backcomp.compiler import compile_source  # noqa: E402
from sympy.core.cache import clear_cache  # noqa: E402


# ----- the models ---------------------------------------------------------------------------
def chain(n: int, width: int = 4) -> backcomp.Graph:
    """A residual chain of ``n`` layers, each with its own weight and bias."""
    g = backcomp.Graph(f"chain{n}")
    h = g.input("x", ("B", width))
    t = g.input("t", ("B", width))
    for i in range(n):
        W = g.param(f"W{i}", (width, width), init="normal(0.1)")
        b = g.param(f"b{i}", (width,))
        h = h + ops.tanh(h @ W + b)
    g.loss(ops.mse(h, t))
    return g


def elementwise_chain(n: int, width: int = 4) -> backcomp.Graph:
    """``n`` unary elementwise ops in a row (fusion makes them one expression)."""
    g = backcomp.Graph(f"ewchain{n}")
    x = g.input("x", ("B", width))
    w = g.param("w", (width,))
    h = x * w
    for i in range(n):
        h = ops.tanh(h) if i % 2 else ops.sin(h)
    g.loss(ops.sum(h))
    return g


def mlp(depth: int, width: int = 32, n_in: int = 16, n_out: int = 10) -> backcomp.Graph:
    """``depth`` hidden relu layers and a softmax cross-entropy loss."""
    g = backcomp.Graph(f"mlp{depth}")
    h = g.input("x", ("B", n_in))
    y = g.input("y", ("B", n_out))
    fan = n_in
    for i in range(depth):
        W = g.param(f"W{i}", (fan, width))
        b = g.param(f"b{i}", (width,))
        h = ops.relu(h @ W + b)
        fan = width
    Wo = g.param("Wo", (fan, n_out))
    bo = g.param("bo", (n_out,))
    g.loss(ops.mean(ops.softmax_cross_entropy(h @ Wo + bo, y)))
    return g


def random_dag(n: int, seed: int = 0, width: int = 6, n_params: int = 8) -> backcomp.Graph:
    """``n`` op nodes over (B, width) values, each using one or two random earlier nodes."""
    rng = random.Random(seed)
    g = backcomp.Graph(f"dag{n}_{seed}")
    pool = [g.input("x", ("B", width))]
    params = [g.param(f"W{i}", (width, width), init="normal(0.2)") for i in range(n_params)]
    vecs = [g.param(f"v{i}", (width,)) for i in range(n_params)]
    used: set[int] = set()
    while len(pool) < n + 1:
        i = rng.randrange(len(pool)) if rng.random() < 0.5 else len(pool) - 1 - rng.randrange(min(8, len(pool)))
        a = pool[i]
        j = rng.randrange(len(pool))
        b = pool[j]
        kind = rng.randrange(8)
        if kind == 0:
            new = a @ rng.choice(params)
        elif kind == 1:
            new = a + b
        elif kind == 2:
            new = a * ops.tanh(b)
        elif kind == 3:
            new = ops.tanh(a) + rng.choice(vecs)
        elif kind == 4:
            new = ops.sin(a) * rng.choice(vecs)
        elif kind == 5:
            new = a - ops.mean(a, axis=-1, keepdims=True)
        elif kind == 6:
            new = ops.sigmoid(a) * b
        else:
            new = ops.softmax(a, axis=-1) + b
        used.update((i, j))
        pool.append(new)
    sinks = [p for k, p in enumerate(pool) if k not in used and k > 0] or [pool[-1]]
    loss = ops.mean(sinks[0] ** 2)
    for s in sinks[1:]:
        loss = loss + ops.mean(s ** 2)
    g.loss(loss)
    return g


def op_count(graph: backcomp.Graph) -> int:
    return sum(1 for node in graph.nodes if node.op not in ("input", "param"))


# ----- measuring ----------------------------------------------------------------------------
def measure(build, size: int, repeat: int = 1, opt_level: int = 1) -> dict:
    times, lines, error = [], None, None
    nodes = op_count(build(size))
    for _ in range(repeat):
        graph = build(size)
        clear_cache()   # SymPy's cache: every compile starts cold, whatever ran before it
        start = time.perf_counter()
        try:
            source = compile_source(graph, opt_level=opt_level)
        except Exception as e:  # noqa: BLE001  (recorded in the table)
            error = f"{type(e).__name__}: {str(e)[:80]}"
            break
        times.append(time.perf_counter() - start)
        lines = source.count("\n")
    return {"model": build.__name__, "size": size, "nodes": nodes, "opt_level": opt_level,
            "seconds": statistics.median(times) if times else None, "lines": lines, "error": error}


PLAN = {
    "chain": (chain, [250, 500, 1000, 2000]),
    "mlp": (mlp, [2, 8, 32, 128]),
    "random_dag": (random_dag, [250, 500, 1000]),
    "elementwise_chain": (elementwise_chain, [25, 50, 100, 2000]),
}
QUICK = {"chain": [125, 250, 500], "mlp": [2, 8, 32], "random_dag": [125, 250], "elementwise_chain": [25, 100]}


#: (model, small size, large size): compile-time growth that must stay about linear
GROWTH = [("chain", 150, 600), ("elementwise_chain", 25, 100)]
GROWTH_LIMIT = 10.0


def measure_growth(name: str, small: int, large: int, repeat: int = 1) -> dict:
    build = PLAN[name][0]
    a, b = measure(build, small, repeat=repeat), measure(build, large, repeat=repeat)
    ratio = b["seconds"] / a["seconds"] if a["seconds"] and b["seconds"] is not None else None
    return {"model": name, "sizes": [small, large], "nodes": [a["nodes"], b["nodes"]],
            "seconds": [a["seconds"], b["seconds"]], "node_ratio": b["nodes"] / a["nodes"],
            "time_ratio": ratio, "limit": GROWTH_LIMIT, "ok": ratio is not None and ratio < GROWTH_LIMIT,
            "error": a["error"] or b["error"]}


def print_growth(rows: list[dict]) -> None:
    print(f"\ncompile-time growth (limit x{GROWTH_LIMIT:g} time):")
    for r in rows:
        small, large = r["sizes"]
        if r["time_ratio"] is None:
            print(f"  {r['model']} {small} -> {large}: {r['error']}")
            continue
        print(f"  {r['model']} {small} -> {large}: x{r['node_ratio']:.1f} nodes -> x{r['time_ratio']:.1f} time"
              f"  {'ok' if r['ok'] else 'TOO FAST A GROWTH'}")


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<18} {'size':>6} {'nodes':>7} {'seconds':>9} {'s/node (ms)':>12} {'lines':>7}  note"
    print(header)
    print("-" * len(header))
    previous: dict[str, dict] = {}
    for r in rows:
        if r["seconds"] is None:
            print(f"{r['model']:<18} {r['size']:>6} {r['nodes']:>7} {'-':>9} {'-':>12} {'-':>7}  {r['error']}")
            continue
        note = ""
        p = previous.get(r["model"])
        if p is not None:
            note = f"x{r['nodes'] / p['nodes']:.1f} nodes -> x{r['seconds'] / p['seconds']:.1f} time"
        print(f"{r['model']:<18} {r['size']:>6} {r['nodes']:>7} {r['seconds']:>9.2f} "
              f"{1000 * r['seconds'] / r['nodes']:>12.2f} {r['lines']:>7}  {note}")
        previous[r["model"]] = r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--repeat", type=int, default=1, help="compiles per size (median is reported)")
    ap.add_argument("--only", choices=sorted(PLAN), action="append", help="only these models")
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if 4x the size takes {GROWTH_LIMIT:g}x the compile time or more")
    ap.add_argument("--json", metavar="FILE", default=str(Path(__file__).with_name("scale.json")),
                    help="where to write the numbers (default: benchmarks/scale.json)")
    args = ap.parse_args(argv)
    rows = []
    for name, (build, sizes) in PLAN.items():
        if args.only and name not in args.only:
            continue
        for size in (QUICK[name] if args.quick else sizes):
            row = measure(build, size, repeat=args.repeat)
            rows.append(row)
            print(f"  {name}({size}): {row['seconds'] if row['seconds'] is not None else row['error']}",
                  file=sys.stderr, flush=True)
    print_table(rows)
    growth = [measure_growth(name, small, large, repeat=args.repeat) for name, small, large in GROWTH
              if not args.only or name in args.only]
    print_growth(growth)
    report = {"backcomp": backcomp.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "rows": rows, "growth": growth}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 1 if args.check and not all(r["ok"] for r in growth) else 0


if __name__ == "__main__":
    sys.exit(main())
