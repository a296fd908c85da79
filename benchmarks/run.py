"""One value_and_grad step of a softmax-cross-entropy ReLU MLP, float32, side by side.

    python benchmarks/run.py [--threads 1] [--repeats 30] [--json benchmarks/results.json]

Times the generated module against hand-written NumPy, PyTorch eager, jax.jit, HIPS
autograd and a GEMM floor (only the step's matmuls, into preallocated outputs) at four
sizes, interleaved so that machine noise hits everyone alike; all implementations are
first checked to agree on the same data.  Then: compile time and generated lines for
MLPs of depth 2..128, and the peak memory of one step at the medium size, each
implementation in a fresh process.  Peers that are not installed are skipped with a
note (``pip install -e ".[bench]"`` installs them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import backcomp  # noqa: E402
import peers  # noqa: E402
import timing  # noqa: E402
from generated import make_generated, mlp_graph  # noqa: E402

SIZES = {
    "tiny": ([784, 128, 10], 32),
    "small": ([784, 256, 256, 10], 128),
    "medium": ([1024, 1024, 1024, 10], 512),
    "large": ([2048, 2048, 2048, 2048, 10], 1024),
}
ORDER = ["generated", "hand_numpy", "torch_eager", "jax_jit", "autograd", "gemm_floor"]


def bench_size(label, sizes, batch, repeats, threads):
    steps, skipped = peers.build_peers(sizes)
    steps = {"generated": make_generated(sizes), **steps}
    params, x, y = peers.make_data(sizes, batch, seed=0)
    results = {n: s(params, x, y) for n, s in steps.items()}
    deviation = peers.check_agree(results)
    callables = {n: steps[n].bind(params, x, y) for n in ORDER if n in steps}
    report = timing.interleaved_medians(callables, repeats=repeats)
    print(f"\n== {label}: sizes {sizes}, B={batch} ==")
    print(timing.format_report(report, ref="hand_numpy"))
    for name, reason in skipped.items():
        print(f"   skipped {name}: {reason}")
    med = {n: s.median for n, s in report.items()}
    ratios = {f"{a}/{b}": med[a] / med[b] for a in med for b in med if a != b}
    floor = med.get("gemm_floor")
    if floor:
        print("   x GEMM floor: " + ", ".join(f"{n} {m / floor:.2f}" for n, m in med.items()))
    if "generated" in med:
        print("   generated / peer: " + ", ".join(
            f"{n} {med['generated'] / m:.2f}" for n, m in med.items() if n != "generated"))
    return {
        "sizes": sizes, "batch": batch,
        "median_us": {n: s.median * 1e6 for n, s in report.items()},
        "iqr_us": {n: s.iqr * 1e6 for n, s in report.items()},
        "ratios": ratios, "max_abs_deviation": deviation, "skipped": skipped,
        "rounds": {"accepted": report.rounds_accepted, "rejected": report.rounds_rejected,
                   "forced": report.rounds_forced},
        "info": {n: s.info for n, s in steps.items()},
    }


def compile_scaling(depths=(2, 8, 32, 128), width=64):
    """Compile seconds and generated lines vs depth (should grow linearly)."""
    rows = []
    for depth in depths:
        graph = mlp_graph([width] * depth + [10], name=f"deep{depth}")
        started = time.perf_counter()
        source = backcomp.compile_source(graph)
        seconds = time.perf_counter() - started
        rows.append({"depth": depth, "compile_seconds": seconds, "lines": source.count("\n")})
    started = time.perf_counter()
    backcomp.compile_source(mlp_graph([784, 256, 256, 10], name="mlp3"))
    three_layer = time.perf_counter() - started
    print("\n== compile time vs depth ==")
    print(f"{'depth':>6}{'seconds':>10}{'lines':>8}{'s/layer':>10}")
    for r in rows:
        print(f"{r['depth']:>6}{r['compile_seconds']:>10.3f}{r['lines']:>8}{r['compile_seconds'] / r['depth']:>10.4f}")
    print(f"3-layer MLP [784,256,256,10]: {three_layer:.3f} s")
    return {"depths": rows, "three_layer_seconds": three_layer}


def memory(sizes, batch, threads):
    impls = ["generated:make_generated", "hand_numpy", "torch_eager", "jax_jit", "autograd"]
    out = {}
    print(f"\n== peak memory of one warm step, sizes {sizes}, B={batch} (fresh process each) ==")
    print(f"{'impl':<26}{'tracemalloc KiB':>16}{'rss KiB':>10}{'cold maxrss KiB':>17}")
    for impl in impls:
        r = timing.peak_memory_subprocess(impl, sizes, batch, threads=threads)
        out[impl] = r
        if "skipped" in r:
            print(f"{impl:<26} skipped: {r['skipped']}")
            continue
        print(f"{impl:<26}{r['tracemalloc_peak'] / 1024:>16.0f}{(r['rss_peak'] or 0) / 1024:>10.0f}"
              f"{(r['cold_maxrss_delta'] or 0) / 1024:>17.0f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS/torch/jax threads, pinned equal (default 1)")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds per size")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)

    with timing.pin_threads(args.threads):
        machine = timing.machine_info()
        print("machine:", json.dumps(machine, default=str))
        print("BLAS:", json.dumps(timing.blas_info(), default=str))
        print(f"threads pinned to {args.threads} for every implementation")
        results = {"machine": machine, "blas": timing.blas_info(), "threads": args.threads, "sizes": {}}
        for label in args.sizes:
            sizes, batch = SIZES[label]
            results["sizes"][label] = bench_size(label, sizes, batch, args.repeats, args.threads)
        results["compile"] = compile_scaling()
    if not args.skip_memory:
        results["memory"] = memory(*SIZES["medium"], args.threads)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
