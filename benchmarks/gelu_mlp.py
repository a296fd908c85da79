"""One value_and_grad step of a GELU MLP (exact erf form), float32, side by side.

    python benchmarks/gelu_mlp.py [--repeats 20] [--batch 256]

The model of issue 13: B 256, 512-1024-1024-10, GELU hidden layers, integer-label
cross-entropy.  Times the generated module against PyTorch eager and jax.jit (each
skipped with a note if not installed), interleaved so that machine noise hits all
alike, after checking that all three agree on the same data.  What made it slow in
release 1 was erf through ``math.erf`` per element, and the backward calling erf
again; ``--profile`` prints the per-statement time of the generated module.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

import backcomp  # noqa: E402
import timing  # noqa: E402

SPEC = """\
[model]
name = "gelu_mlp_bench"
loss = "loss"
[inputs]
x = ["B", {d0}]
labels = {{ shape = ["B"], dtype = "int64" }}
[params]
W1 = {{ shape = [{d0}, {d1}], init = "he_normal" }}
b1 = [{d1}]
W2 = {{ shape = [{d1}, {d2}], init = "he_normal" }}
b2 = [{d2}]
W3 = [{d2}, {d3}]
b3 = [{d3}]
[graph]
h1 = "gelu(x @ W1 + b1)"
h2 = "gelu(h1 @ W2 + b2)"
logits = "h2 @ W3 + b3"
loss = "mean(softmax_cross_entropy(logits, labels))"
"""


def build_module(sizes):
    path = Path(tempfile.mkdtemp(prefix="gelu_bench_")) / "gelu_mlp_bench.toml"
    path.write_text(SPEC.format(d0=sizes[0], d1=sizes[1], d2=sizes[2], d3=sizes[3]))
    return backcomp.build(path)


def torch_step(params, x, labels):
    import torch
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx, ty = torch.from_numpy(x), torch.from_numpy(labels)
    gelu, ce = torch.nn.functional.gelu, torch.nn.functional.cross_entropy

    def step():
        h1 = gelu(tx @ tp["W1"] + tp["b1"])
        h2 = gelu(h1 @ tp["W2"] + tp["b2"])
        loss = ce(h2 @ tp["W3"] + tp["b3"], ty)
        grads = torch.autograd.grad(loss, list(tp.values()))
        return float(loss.detach()), {k: g.numpy() for k, g in zip(tp, grads)}
    return step


def jax_step(params, x, labels):
    import jax
    import jax.numpy as jnp

    def loss_fn(p, x, y):
        h1 = jax.nn.gelu(x @ p["W1"] + p["b1"], approximate=False)
        h2 = jax.nn.gelu(h1 @ p["W2"] + p["b2"], approximate=False)
        logits = h2 @ p["W3"] + p["b3"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    vg = jax.jit(jax.value_and_grad(loss_fn))
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jx, jy = jnp.asarray(x), jnp.asarray(labels)

    def step():
        loss, grads = vg(jp, jx, jy)
        return float(loss), {k: np.asarray(g) for k, g in grads.items()}
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="per-statement profile of the generated module")
    args = ap.parse_args(argv)
    sizes = [512, 1024, 1024, 10]
    module = build_module(sizes)
    params = module.init_params(seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, sizes[0])).astype(np.float32)
    labels = rng.integers(0, sizes[-1], args.batch)
    inputs = {"x": x, "labels": labels}

    def generated():
        loss, grads = module.value_and_grad(params, inputs)
        return float(loss), grads

    steps = {"generated": generated}
    for name, factory in (("torch_eager", torch_step), ("jax_jit", jax_step)):
        try:
            steps[name] = factory(params, x, labels)
        except ImportError as e:
            print(f"skipped {name}: {e}")
    ref_loss, ref_grads = generated()
    for name, step in steps.items():
        loss, grads = step()
        assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss), (name, loss, ref_loss)
        for k, g in grads.items():
            np.testing.assert_allclose(g, ref_grads[k], rtol=2e-3, atol=2e-5, err_msg=f"{name}: {k}")
    print(f"GELU MLP {sizes}, B={args.batch}, float32; all {len(steps)} agree on loss and gradients")
    print("BLAS:", timing.blas_info())
    report = timing.interleaved_medians(steps, repeats=args.repeats)
    print(timing.format_report(report, ref="torch_eager" if "torch_eager" in steps else None))
    med = {n: s.median for n, s in report.items()}
    print("generated / peer: " + ", ".join(f"{n} {med['generated'] / m:.2f}" for n, m in med.items()
                                           if n != "generated"))
    if args.profile:
        profile(module, params, inputs)
    return 0


def profile(module, params, inputs) -> None:
    """Time each statement of value_and_grad: the source, split into lines, run one by one."""
    import inspect
    import time
    body = textwrap.dedent("\n".join(inspect.getsource(module.value_and_grad).splitlines()[2:]))
    env = dict(vars(module), params=params, inputs=inputs)
    rows = []
    for stmt in body.splitlines():
        if not stmt.strip() or stmt.lstrip().startswith("#") or stmt.startswith("return"):
            continue
        code = compile(stmt, "<statement>", "exec")   # the generated module's own text
        t = time.perf_counter()
        exec(code, env)
        rows.append((time.perf_counter() - t, stmt.strip()))
    total = sum(t for t, _ in rows)
    for t, stmt in sorted(rows, reverse=True)[:12]:
        print(f"{t * 1e3:8.2f} ms {100 * t / total:5.1f}%  {stmt[:100]}")


if __name__ == "__main__":
    sys.exit(main())
