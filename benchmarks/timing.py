"""Timing and memory measurement for a noisy, shared 2-core machine.

- ``interleaved_medians``: robust per-call times (median and IQR) of several
  implementations measured in interleaved, shuffled rounds, so slow drifts
  and bursts of load from other tenants hit every implementation alike, and
  rounds visibly disturbed by such a burst are re-run.
- ``pin_threads``: one thread count for NumPy's BLAS, OpenMP, torch and jax,
  so no implementation wins by using more cores.
- ``peak_memory`` (in-process) and ``peak_memory_subprocess`` (fresh process
  per implementation): tracemalloc peak and resident-set growth of one step.
- ``blas_info`` / ``machine_info``: what to print next to the numbers.

Nothing here sets OPENBLAS_* variables; run benchmarks with
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/run.py``
so OpenBLAS picks its kernel for the CPU it actually runs on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = [
    "Stats", "TimingReport", "interleaved_medians", "format_report",
    "pin_threads", "blas_info", "machine_info",
    "peak_memory", "peak_memory_subprocess",
]

_HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# Interleaved timing
# ----------------------------------------------------------------------------

@dataclass
class Stats:
    """Per-call seconds of one implementation over the accepted rounds."""
    median: float
    q1: float
    q3: float
    min: float
    n: int               # accepted samples (rounds)
    inner: int           # calls per sample; each sample is their mean
    samples: list[float] = field(repr=False, default_factory=list)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


class TimingReport(dict):
    """``name -> Stats``, plus how many rounds were re-run.

    ``rounds_rejected``: disturbed rounds that were thrown away and re-run.
    ``rounds_forced``: disturbed rounds kept because the re-run cap was hit
    (non-zero means the machine was busy throughout; distrust close calls).
    """
    rounds_accepted: int = 0
    rounds_rejected: int = 0
    rounds_forced: int = 0
    canary: str | None = None
    settle_seconds: float = 0.0


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info
        return max([d["num_threads"] for d in threadpool_info()] or [1])
    except ImportError:
        return os.cpu_count() or 1


def _time_calls(fn: Callable[[], Any], k: int) -> float:
    pc = time.perf_counter
    t0 = pc()
    for _ in range(k):
        fn()
    return (pc() - t0) / k


def interleaved_medians(callables: dict[str, Callable[[], Any]], repeats: int = 30,
                        inner: int | dict[str, int] | None = None, *,
                        warmup: int = 3, seed: int = 0, disturb_factor: float = 1.5,
                        max_rejects: int | None = None, min_history: int = 5,
                        canary: str | None = None, target_sample_seconds: float = 0.005,
                        backoff_seconds: float = 0.05, settle_seconds: float | None = None,
                        pre_calls: int = 1) -> TimingReport:
    """Median and IQR of per-call time for each zero-arg callable.

    Why interleaved: on a shared machine the load changes over seconds, so
    timing A fully and then B would compare A's quiet minute to B's busy one.
    Each round instead times every implementation once (``inner`` back-to-back
    calls, averaged), in an order shuffled per round with a fixed ``seed``
    (no implementation always follows the same one, whose spinning BLAS or
    OpenMP threads could slow it). ``warmup`` untimed calls each come first
    (jax compile, oneDNN primitive creation, BLAS buffers, caches).

    ``inner``: int for all, dict per name, or None to pick per name so that
    a sample lasts about ``target_sample_seconds`` (keeps timer and dispatch
    overhead out of fast functions, and short samples less likely to be hit).

    A round is *disturbed* when, after ``min_history`` accepted rounds, either
    the ``canary`` (default: the implementation with the lowest running median,
    the shortest sample and so the quietest baseline) or the median over all
    implementations is slower than ``disturb_factor`` x its running median.
    A disturbed round is discarded and re-run after ``backoff_seconds``, up
    to ``max_rejects`` times (default ``repeats``); beyond that, disturbed
    rounds are kept and counted in ``rounds_forced``. The garbage collector
    is off while timing (as timeit does), after one collection.

    Why ``settle_seconds`` and ``pre_calls``: each library's idle worker
    threads keep spinning for a while after their last job (OpenBLAS for
    ~0.1 s), stealing cores from whatever runs next; measured here at 2
    threads, torch right after NumPy ran 2-5x slower than alone, and at 1
    thread jax right after NumPy ~1.5x slower. So before each sample the
    timer sleeps ``settle_seconds`` (None: 0.02 s if BLAS runs 1 thread,
    0.25 s otherwise) and makes ``pre_calls`` untimed calls (the first call
    after a switch pays cold caches and thread wake-ups). With these each
    implementation ran within noise of its time when measured alone.
    """
    if settle_seconds is None:
        settle_seconds = 0.02 if _blas_threads() <= 1 else 0.25
    names = list(callables)
    if not names:
        return TimingReport()
    if max_rejects is None:
        max_rejects = repeats
    rng = random.Random(seed)

    for _ in range(warmup):
        for n in rng.sample(names, len(names)):
            callables[n]()

    if isinstance(inner, int):
        inner_n = {n: max(1, inner) for n in names}
    elif isinstance(inner, dict):
        inner_n = {n: max(1, int(inner.get(n, 1))) for n in names}
    else:
        inner_n = {}
        for n in names:
            time.sleep(settle_seconds)
            callables[n]()
            t1 = statistics.median(_time_calls(callables[n], 1) for _ in range(5))
            inner_n[n] = max(1, min(100_000, math.ceil(target_sample_seconds / max(t1, 1e-9))))

    samples: dict[str, list[float]] = {n: [] for n in names}
    report = TimingReport()
    report.settle_seconds = settle_seconds
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while report.rounds_accepted < repeats:
            order = rng.sample(names, len(names))
            times = {}
            for n in order:
                if settle_seconds:
                    time.sleep(settle_seconds)
                for _ in range(pre_calls):
                    callables[n]()
                times[n] = _time_calls(callables[n], inner_n[n])
            disturbed = False
            if report.rounds_accepted >= min_history:
                med = {n: statistics.median(samples[n]) for n in names}
                c = canary if canary in med else min(med, key=med.__getitem__)
                report.canary = c
                ratios = [times[n] / med[n] for n in names]
                disturbed = (times[c] > disturb_factor * med[c]
                             or statistics.median(ratios) > disturb_factor)
            if disturbed and report.rounds_rejected < max_rejects:
                report.rounds_rejected += 1
                if backoff_seconds:
                    time.sleep(backoff_seconds)
                continue
            report.rounds_forced += disturbed
            report.rounds_accepted += 1
            for n in names:
                samples[n].append(times[n])
    finally:
        if gc_was_enabled:
            gc.enable()

    for n in names:
        xs = samples[n]
        q1, q2, q3 = _quartiles(xs)
        report[n] = Stats(median=q2, q1=q1, q3=q3, min=min(xs), n=len(xs),
                          inner=inner_n[n], samples=xs)
    return report


def format_report(report: TimingReport, ref: str | None = "hand_numpy",
                  unit: float = 1e-6, unit_name: str = "us") -> str:
    """A plain-text table: median, IQR, min, ratio to ``ref`` (if present)."""
    has_ref = ref in report
    lines = [f"{'impl':<16}{'median ' + unit_name:>14}{'IQR ' + unit_name:>12}"
             f"{'min ' + unit_name:>12}{'inner':>7}" + (f"{'x ' + ref:>16}" if has_ref else "")]
    for n, s in report.items():
        row = (f"{n:<16}{s.median / unit:>14.1f}{s.iqr / unit:>12.1f}"
               f"{s.min / unit:>12.1f}{s.inner:>7}")
        if has_ref:
            row += f"{s.median / report[ref].median:>16.2f}"
        lines.append(row)
    lines.append(f"rounds: {report.rounds_accepted} accepted, {report.rounds_rejected} "
                 f"re-run as disturbed, {report.rounds_forced} kept though disturbed; "
                 f"settle {report.settle_seconds:g} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Threads and environment facts
# ----------------------------------------------------------------------------

def _import_peers():
    """peers.py from this directory, however timing.py itself was imported."""
    if "peers" not in sys.modules and _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    import peers
    return peers


@contextlib.contextmanager
def pin_threads(n: int) -> Iterator[int]:
    """Limit every library's compute threads to ``n`` for the with-block.

    threadpoolctl limits BLAS (OpenBLAS/MKL/BLIS) and OpenMP pools (this also
    covers torch's libgomp); torch.set_num_threads(n) covers torch's
    intra-op pool if torch is imported; jax's XLA:CPU pool cannot be resized
    once started, so if jax is imported but its backend not started this
    starts it with ``n`` threads (see peers.init_jax_cpu), and warns if it
    already runs with another count. Peers built inside the block read the
    limit (peers.current_blas_threads) and match it. Restores on exit, jax
    excepted.
    """
    from threadpoolctl import threadpool_limits
    torch_prev = None
    with threadpool_limits(limits=n):
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            torch_prev = torch.get_num_threads()
            torch.set_num_threads(n)
        if "jax" in sys.modules:
            peers = _import_peers()
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                peers.init_jax_cpu(n)
        try:
            yield n
        finally:
            if torch_prev is not None:
                sys.modules["torch"].set_num_threads(torch_prev)


def blas_info() -> list[dict[str, Any]]:
    """threadpoolctl's view of the loaded BLAS and OpenMP libraries.

    One dict per library: user_api ('blas'/'openmp'), internal_api (e.g.
    'openblas'), prefix, version, architecture (the OpenBLAS kernel chosen,
    e.g. 'SkylakeX' -- check it is not a generic fallback), threading_layer,
    num_threads, filepath. torch's statically linked MKL is not listed; see
    machine_info()["torch"].
    """
    import numpy  # noqa: F401  (loads NumPy's BLAS so it is listed)
    from threadpoolctl import threadpool_info
    keys = ("user_api", "internal_api", "prefix", "version", "architecture",
            "threading_layer", "num_threads", "filepath")
    return [{k: d.get(k) for k in keys if k in d} for d in threadpool_info()]


def machine_info() -> dict[str, Any]:
    """CPU, load, Python/NumPy and framework versions and thread counts.

    Only frameworks already imported are described (importing one just to
    report it would change the process being measured).
    """
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    try:
        info["affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/loadavg") as f:
            info["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    info["openblas_env"] = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    if "numpy" in sys.modules:
        info["numpy"] = sys.modules["numpy"].__version__
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        cfg = torch.__config__.show()
        blas = [p.split("=", 1)[1] for p in cfg.replace(",", " ").split() if p.startswith("BLAS_INFO=")]
        info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                         "blas": blas[0] if blas else None,
                         "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        p = sys.modules.get("peers")
        info["jax"] = {"version": jax.__version__,
                       "threads": getattr(p, "_JAX_THREADS", None) if p else None}
    return info


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------

def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give glibc malloc's free memory back to the kernel (best effort).

    Otherwise a warm step reuses pages freed by the previous one and its
    temporaries never show up as resident-set growth.
    """
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], warmup: int = 1) -> dict[str, int | None]:
    """Peak extra memory of one call of ``fn`` (zero-arg), in this process, bytes.

    ``tracemalloc_peak``: peak of memory traced by tracemalloc during the call,
      above its level before -- Python objects and NumPy array data (NumPy
      reports its buffers to tracemalloc), the returned grads included. Blind
      to torch, jax/XLA and BLAS-internal buffers: near 0 for those peers.
    ``rss_peak``: peak resident set during the call minus resident set before
      (glibc malloc_trim, then kernel VmHWM reset, just before the call).
      Sees every allocator, at page granularity, but only memory newly
      faulted in: memory an allocator still holds (pools of torch/XLA, malloc
      memory trim cannot release) is reused invisibly, so it is a lower
      bound; None if the kernel mark cannot be reset. In a process that ran
      other code first this depends on history: prefer
      peak_memory_subprocess for comparisons.
    ``warmup`` untraced calls first, so one-time setup (jax compile) is excluded.
    """
    for _ in range(warmup):
        fn()
    gc.collect()
    rss_peak = None
    if _reset_hwm():
        rss0 = _status_kb("VmRSS")
        fn()
        hwm = _status_kb("VmHWM")
        if rss0 is not None and hwm is not None:
            rss_peak = max(0, hwm - rss0) * 1024
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        fn()                      # let lazily created objects settle under tracing
        gc.collect()
        tracemalloc.reset_peak()
        cur0 = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1] - cur0
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return {"tracemalloc_peak": peak, "rss_peak": rss_peak}


def peak_memory_subprocess(impl: str, sizes: list[int], batch: int, *, seed: int = 0,
                           threads: int = 1, warmup: int = 3, timeout: float = 600,
                           python: str | None = None) -> dict[str, Any]:
    """Memory of one step of ``impl`` measured in a fresh Python process.

    Why a fresh process: allocators keep freed memory and each framework
    grows its own pools, so in a shared process one implementation's numbers
    depend on what ran before it. ``impl`` is a peer name in peers.PEERS or
    ``"module:factory"`` (e.g. ``"bench_backcomp:make_backcomp"``) where
    ``factory(sizes) -> step`` and step(params, x, y) is a NumPy-input step
    (a peers.Step's prepare() is honoured); the child has benchmarks/ and the
    repo root on sys.path. Returns, in bytes:

    ``cold_maxrss_delta``: ru_maxrss after the first call minus before it
      (peak mark reset first; the process already has imports, data and the
      built step): one-time costs
      (jax trace/compile, oneDNN init, BLAS buffers) plus the step itself.
    ``tracemalloc_peak`` / ``rss_peak``: as in peak_memory(), for a warm
      step after ``warmup`` calls (rss_peak: max over 3 calls).
    ``baseline_rss``: resident set before the first call (imports + data).
    If the implementation cannot be imported, the dict has ``"skipped"``
    (the reason) instead of the numbers; other failures raise RuntimeError.
    Note torch keeps the previous step's .grad alive until the next step
    replaces it, so its warm peaks exclude one set of gradients.
    """
    cmd = [python or sys.executable, os.path.join(_HERE, "timing.py"), "--memprobe",
           json.dumps({"impl": impl, "sizes": list(sizes), "batch": batch, "seed": seed,
                       "threads": threads, "warmup": warmup})]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"memprobe for {impl} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _load_factory(impl: str):
    import importlib
    if ":" in impl:
        mod, attr = impl.split(":", 1)
        return getattr(importlib.import_module(mod), attr)
    return _import_peers().PEERS[impl]


def _memprobe(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
    import peers
    sizes, batch, impl = spec["sizes"], spec["batch"], spec["impl"]
    with pin_threads(spec["threads"]):
        try:
            step = _load_factory(impl)(sizes)
        except ImportError as e:          # includes peers.PeerUnavailable
            return {"impl": impl, "sizes": sizes, "batch": batch, "skipped": str(e)}
        params, x, y = peers.make_data(sizes, batch, spec["seed"])
        prepare = getattr(step, "prepare", None)
        args = prepare(params, x, y) if prepare else (params, x, y)
        fn = lambda: step(*args)  # noqa: E731
        gc.collect()
        _reset_hwm()      # else ru_maxrss still holds the peak of the imports
        baseline = _status_kb("VmRSS")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
        fn()
        cold = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        rss = [peak_memory(fn, warmup=max(0, spec["warmup"] - 1) if i == 0 else 0)
               for i in range(3)]
        peaks = [m["rss_peak"] for m in rss if m["rss_peak"] is not None]
        return {"impl": impl, "sizes": sizes, "batch": batch,
                "cold_maxrss_delta": cold * 1024,
                "tracemalloc_peak": max(m["tracemalloc_peak"] for m in rss),
                "rss_peak": max(peaks) if peaks else None,
                "baseline_rss": baseline * 1024 if baseline is not None else None}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memprobe":
        print(json.dumps(_memprobe(json.loads(sys.argv[2]))))
    else:
        print(json.dumps({"blas": blas_info(), "machine": machine_info()}, indent=1))
