"""Training steps per second: the generated ``train_step`` against PyTorch eager.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_step.py
        [--repeats 15] [--threads 2] [--only relu_mlp,gelu_mlp,cnn] [--optimizers sgd,adam]
        [--json out.json] [--smoke]

For three models of the issue 13 suite (benchmarks/suite.py: its specs, data and PyTorch
losses), float32, and each optimizer (SGD, Adam with default hyperparameters, lr 1e-3),
one whole training step of:

- ``fused``: the module's ``train_step``: gradients written into the workspace
  ``state["grads"]`` (``_value_and_grad_into``) and the update done in place there;
- ``before``: what train_step did before the workspace: ``value_and_grad`` (fresh
  gradient arrays every step), then the same update loop over the returned dict;
- ``torch_eager``: ``opt.zero_grad(); loss.backward(); opt.step()`` with torch.optim.SGD
  or torch.optim.Adam (their CPU defaults) on the same model and data.

Each implementation trains its own copy of the same params; all three are first run
three steps from the same params and must agree (loss and params, float32 tolerances).
Then they are timed with ``timing.interleaved_medians`` at ``--threads`` threads
(``pin_threads``), model by model in one process, so the ratios come from one run.
``--grads`` adds the gradient computations alone to the same rounds: ``grads_fresh``
(value_and_grad) and ``grads_into`` (``_value_and_grad_into`` into a workspace), the
part of the step that the workspace changes.  ``--cpu-rounds N`` adds the median CPU
time per call over N more interleaved rounds (``process_time_medians``: steadier than wall
time when other jobs share the cores).  The peak memory a step traces (tracemalloc) is
printed for the fused and the former step.  ``--smoke`` runs tiny sizes, one thread,
two rounds: it checks that the script works.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

import suite  # noqa: E402
import timing  # noqa: E402

MODELS = ("relu_mlp", "gelu_mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
LR = 1e-3
IMPLS = ("fused", "before", "torch_eager")


# ----- "before": value_and_grad, then the update loop of the former templates ------

def _sgd_before(module, params, state, inputs):
    loss, grads = module.value_and_grad(params, inputs)
    state["step"] += 1
    for name, grad in grads.items():
        np.multiply(grad, -LR, out=grad)
        params[name] += grad
    return loss


def _adam_before(module, params, state, inputs, beta1=0.9, beta2=0.999, eps=1e-8):
    loss, grads = module.value_and_grad(params, inputs)
    state["step"] += 1
    step = state["step"]
    step_size = LR / (1.0 - beta1 ** step)
    sqrt_bias2 = (1.0 - beta2 ** step) ** 0.5
    for name, grad in grads.items():
        param, m, v = params[name], state["exp_avg"][name], state["exp_avg_sq"][name]
        scratch = state["scratch"][name]
        v *= beta2
        np.multiply(grad, grad, out=scratch)
        scratch *= 1.0 - beta2
        v += scratch
        m *= beta1
        grad *= 1.0 - beta1
        m += grad
        np.sqrt(v, out=grad)
        grad /= sqrt_bias2
        grad += eps
        np.divide(m, grad, out=grad)
        grad *= -step_size
        param += grad
    return loss


BEFORE = {"sgd": _sgd_before, "adam": _adam_before}


def steps(model: str, optimizer: str, smoke: bool) -> tuple[dict[str, Callable], dict[str, Callable], Callable]:
    """(step per implementation, params per implementation as NumPy arrays, and the two
    gradient computations alone: value_and_grad and the workspace's, for ``--grads``)."""
    import torch
    s = suite.sizes(model, smoke)
    module = suite.build_module(model, smoke, optimizer=optimizer)
    params, inputs = suite.make_data(model, module, smoke)

    fused_params = {k: v.copy() for k, v in params.items()}
    fused_state = module.init_state(fused_params)
    before_params = {k: v.copy() for k, v in params.items()}
    before_state = module.init_state(before_params)

    loss_fn = suite._torch_loss(model, s)
    tp = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    ti = [torch.from_numpy(v) for v in inputs.values()]
    opt = (torch.optim.SGD(list(tp.values()), lr=LR) if optimizer == "sgd"
           else torch.optim.Adam(list(tp.values()), lr=LR))

    def torch_step():
        opt.zero_grad()
        loss = loss_fn(tp, *ti)
        loss.backward()
        opt.step()
        return loss.detach()

    calls = {
        "fused": lambda: module.train_step(fused_params, inputs, fused_state, lr=LR),
        "before": lambda: BEFORE[optimizer](module, before_params, before_state, inputs),
        "torch_eager": torch_step,
    }
    views = {"fused": lambda: fused_params, "before": lambda: before_params,
             "torch_eager": lambda: {k: t.detach().numpy() for k, t in tp.items()}}
    def gradients_only():
        workspace = module._new_workspace(params)
        return {"grads_fresh": lambda: module.value_and_grad(params, inputs),
                "grads_into": lambda: module._value_and_grad_into(params, inputs, workspace)}
    return calls, views, gradients_only


def check_agree(model: str, optimizer: str, calls, views, n: int = 3) -> float:
    """Run ``n`` steps of each from the same params.  The fused and the former step run
    the same statements, so their params must be equal bit for bit; returns the largest
    deviation of torch's from the fused step's, relative to the param's largest magnitude
    (float32: below 1e-3; Adam's first steps are about lr·sign(g), so gradients near zero
    that round differently in torch move by up to 2 lr)."""
    losses = {k: [float(f()) for _ in range(n)] for k, f in calls.items()}
    ref = views["fused"]()
    for name, p in views["before"]().items():
        np.testing.assert_array_equal(p, ref[name], err_msg=f"{model}/{optimizer}: fused vs before, {name}")
    worst = 0.0
    for k in calls:
        np.testing.assert_allclose(losses[k], losses["fused"], rtol=1e-4, err_msg=f"{model}/{optimizer}: {k} loss")
        for name, p in views[k]().items():
            dev = float(np.max(np.abs(p - ref[name])) / max(np.max(np.abs(ref[name])), 1e-30))
            assert dev < 1e-3, f"{model}/{optimizer}: {k} param {name} deviates by {dev:.2e}"
            worst = max(worst, dev)
    return worst


def process_time_medians(calls: dict[str, Callable], rounds: int, inner: int, seed: int = 0) -> dict[str, float]:
    """Median CPU seconds per call (``time.process_time``: all threads of this process), in
    interleaved rounds of shuffled order.  Why: on a machine shared with other jobs, wall
    time mostly measures the others; the CPU time a call uses is far less disturbed, and
    for two implementations of the same statements it is the work that differs.  (With
    BLAS threads it also counts their spinning, so compare it at one thread.)"""
    order, samples = random.Random(seed), {k: [] for k in calls}
    for f in calls.values():
        f()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            names = list(calls)
            order.shuffle(names)
            for k in names:
                t0 = time.process_time()
                for _ in range(inner):
                    calls[k]()
                samples[k].append((time.process_time() - t0) / inner)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in samples.items()}


def run(model: str, optimizer: str, args) -> dict:
    calls, views, gradients_only = steps(model, optimizer, args.smoke)
    dev = check_agree(model, optimizer, calls, views)
    if args.grads:
        calls.update(gradients_only())
    print(f"\n== {suite.TITLES[model]}, {optimizer}: implementations agree over 3 steps "
          f"(largest param deviation / max|param| {dev:.1e})")
    kw = dict(settle_seconds=0.0, warmup=1, min_history=100, inner=1) if args.smoke else {}
    report = timing.interleaved_medians(calls, repeats=args.repeats, **kw)
    print(timing.format_report(report, ref="torch_eager", unit=1e-3, unit_name="ms"))
    med = {k: st.median for k, st in report.items()}
    peaks = {k: timing.peak_memory(calls[k])["tracemalloc_peak"] for k in ("fused", "before")}
    print("peak traced memory of one step (tracemalloc, NumPy arrays included): "
          + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in peaks.items()))
    cpu = {}
    if args.cpu_rounds:
        cpu = process_time_medians(calls, args.cpu_rounds, 1 if args.smoke else args.cpu_inner)
        print("median CPU time per call (process_time): "
              + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in cpu.items()))
    return {"model": model, "optimizer": optimizer, "median_s": med, "peak_bytes": peaks, "cpu_s": cpu,
            "iqr_s": {k: st.iqr for k, st in report.items()}, "min_s": {k: st.min for k, st in report.items()},
            "rounds": [report.rounds_accepted, report.rounds_rejected, report.rounds_forced], "deviation": dev}


def format_table(results: list[dict]) -> str:
    head = ["model", "optimizer", "fused steps/s", "before steps/s", "torch eager steps/s",
            "fused ÷ before (time)", "fused ÷ torch (time)", "grads: into ÷ fresh (time)",
            "fused ÷ before (CPU time)", "peak MiB fused / before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["median_s"]
        lines.append("| " + " | ".join([
            suite.TITLES[r["model"]], r["optimizer"], f"{1 / m['fused']:.1f}", f"{1 / m['before']:.1f}",
            f"{1 / m['torch_eager']:.1f}", f"{m['fused'] / m['before']:.2f}", f"{m['fused'] / m['torch_eager']:.2f}",
            f"{m['grads_into'] / m['grads_fresh']:.2f}" if "grads_into" in m else "—",
            f"{r['cpu_s']['fused'] / r['cpu_s']['before']:.2f}" if r["cpu_s"] else "—",
            f"{r['peak_bytes']['fused'] / 2**20:.2f} / {r['peak_bytes']['before'] / 2**20:.2f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(MODELS), help="comma-separated models (default: all)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--grads", action="store_true",
                    help="also time value_and_grad and _value_and_grad_into alone (grads_fresh, grads_into)")
    ap.add_argument("--cpu-rounds", type=int, default=0,
                    help="also measure median CPU time per call over this many interleaved rounds")
    ap.add_argument("--cpu-inner", type=int, default=5, help="calls per CPU-time sample")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds: check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.threads = min(args.repeats, 2), 1
    models = [m.strip() for m in args.only.split(",") if m.strip()]
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")
    for o in optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r} (choose from {', '.join(OPTIMIZERS)})")
    import torch  # noqa: F401  (before pin_threads, so that it sets torch's pool too)
    results = []
    with timing.pin_threads(args.threads):
        print(f"train_step, float32, {args.threads} threads{' (smoke sizes)' if args.smoke else ''}")
        print("BLAS:", json.dumps(timing.blas_info()))
        for m in models:
            for o in optimizers:
                results.append(run(m, o, args))
        machine = timing.machine_info()
    print("\n" + format_table(results))
    print(f"(medians of {args.repeats} interleaved rounds per row; load average at the end: "
          f"{' '.join(machine.get('loadavg', []))})")
    if args.json:
        out = {"threads": args.threads, "repeats": args.repeats, "smoke": args.smoke, "lr": LR,
               "blas": timing.blas_info(), "machine": machine, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
