"""The cost of forward mode and of Hessian-vector products, against jax.jit of the same.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/hvp.py [--repeats 20] [--threads 1]

For the digits MLP and CNN examples (examples/digits_mlp.toml, digits_cnn.toml) in
float32, batch 64: the generated module's ``jvp`` (tangents on every param and float
input) over one ``forward``, and its ``hvp`` over one ``value_and_grad``; and the same
two ratios for jax.jit (``jax.jvp`` of the forward; ``jax.jvp(jax.grad)`` against
``jax.value_and_grad``).  The jax functions evaluate the same graph op by op (below),
and are checked to agree with the module (loss, H·v, tangents) before any timing.
All eight functions run in the same interleaved rounds (benchmarks/timing.py), so the
ratios come from one run.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

import backcomp  # noqa: E402
import timing  # noqa: E402
from backcomp.ops.elementwise import arg_symbol, node_expr  # noqa: E402
from backcomp.ops.registry import get_op  # noqa: E402
from backcomp.spec import load_spec  # noqa: E402

MODELS = {"MLP": "digits_mlp.toml", "CNN": "digits_cnn.toml"}


# ----- the graph in jax ---------------------------------------------------------------------
def jax_evaluator(graph):
    """f(params, inputs) -> {output: value} in jax.numpy, op by op from the user's graph."""
    import jax
    import jax.numpy as jnp
    unary = {sp.exp: jnp.exp, sp.log: jnp.log, sp.tanh: jnp.tanh, sp.erf: jax.scipy.special.erf}

    def scalar(e, env):
        if e in env:
            return env[e]
        if e.is_Number:
            return float(e)
        a = [scalar(x, env) for x in e.args]
        if isinstance(e, sp.Add):
            return sum(a[1:], a[0])
        if isinstance(e, sp.Mul):
            out = a[0]
            for x in a[1:]:
                out = out * x
            return out
        if isinstance(e, sp.Pow):
            return a[0] ** a[1]
        if isinstance(e, sp.Max):
            return jnp.maximum(*a)
        return unary[e.func](a[0])

    def op(n, a, dims):
        at = n.attrs
        if get_op(n.op).elementwise:
            return scalar(node_expr(n), {arg_symbol(i): x for i, x in enumerate(a)})
        if n.op == "matmul":
            return a[0] @ a[1]
        if n.op in ("sum", "mean", "max"):
            return getattr(jnp, n.op)(a[0], axis=at["axes"], keepdims=at["keepdims"])
        if n.op == "reshape":
            return a[0].reshape(tuple(dims.get(d, d) for d in at["shape"]))
        if n.op == "stop_gradient":
            return jax.lax.stop_gradient(a[0])
        if n.op == "take_label":
            return jnp.take_along_axis(a[0], a[1][..., None], axis=-1)[..., 0]
        if n.op == "conv2d":
            (ph, pw) = at["padding"]
            return jax.lax.conv_general_dilated(a[0], a[1], at["stride"], ((ph, ph), (pw, pw)))
        if n.op == "max_pool2d":
            (kh, kw), (sh, sw) = at["size"], at["stride"]
            return jax.lax.reduce_window(a[0], -jnp.inf, jax.lax.max, (1, 1, kh, kw), (1, 1, sh, sw), "VALID")
        raise NotImplementedError(n.op)

    outputs = graph.forward_outputs()

    def f(params, inputs):
        dims = {d: inputs[src].shape[axis] for d, (src, axis) in graph.dims.items()}
        val = {}
        for n in graph.nodes:
            val[n] = params[n.name] if n.op == "param" else inputs[n.name] if n.op == "input" else \
                op(n, [val[x] for x in n.inputs], dims)
        return {k: val[v] for k, v in outputs.items()}
    return f


def setup(name: str, spec: str, batch: int, rng):
    import jax
    path = os.path.join(ROOT, "examples", spec)
    graph = load_spec(path)
    m = backcomp.build(path, emit="jvp,hvp")
    params = m.init_params(seed=0)
    inputs = {}
    for k, shape in m.INPUTS.items():
        shape = tuple(batch if isinstance(d, str) else d for d in shape)
        inputs[k] = rng.integers(0, 10, shape).astype(np.int64) if m.INPUT_KINDS[k] == "int" else \
            rng.standard_normal(shape).astype(np.float32)
    floats = {k: v for k, v in inputs.items() if v.dtype.kind == "f"}
    tangents = {k: rng.standard_normal(np.shape(v)).astype(np.float32) for k, v in {**params, **floats}.items()}
    v = {k: rng.standard_normal(np.shape(params[k])).astype(np.float32) for k in m.WRT}

    f = jax_evaluator(graph)
    loss_name = graph.loss_node.name
    ints = {k: x for k, x in inputs.items() if k not in floats}
    j_forward = jax.jit(f)
    j_vag = jax.jit(jax.value_and_grad(lambda p, i: f(p, i)[loss_name]))
    j_jvp = jax.jit(lambda p, i, t: jax.jvp(lambda pi: f({k: pi[k] for k in p}, {**pi, **ints}),
                                              ({**p, **{k: i[k] for k in floats}},), (t,)))
    j_hvp = jax.jit(lambda p, i, w: jax.jvp(lambda q: jax.grad(lambda r: f(r, i)[loss_name])(q), (p,), (w,))[1])

    # agreement first: the loss, H·v and the tangents
    hv, jhv = m.hvp(params, inputs, v), j_hvp(params, inputs, v)
    for k in m.WRT:
        scale = float(np.abs(jhv[k]).max()) or 1.0
        assert np.allclose(hv[k], jhv[k], rtol=2e-3, atol=2e-3 * scale), (name, "hvp", k)
    (_, tan), (_, jtan) = m.jvp(params, inputs, tangents), j_jvp(params, inputs, tangents)
    for k in tan:
        scale = float(np.abs(jtan[k]).max()) or 1.0
        assert np.allclose(tan[k], jtan[k], rtol=2e-3, atol=2e-3 * scale), (name, "jvp", k)

    def block(x):
        return jax.block_until_ready(x)
    return {
        f"{name} generated forward": lambda: m.forward(params, inputs),
        f"{name} generated value_and_grad": lambda: m.value_and_grad(params, inputs),
        f"{name} generated jvp": lambda: m.jvp(params, inputs, tangents),
        f"{name} generated hvp": lambda: m.hvp(params, inputs, v),
        f"{name} jax forward": lambda: block(j_forward(params, inputs)),
        f"{name} jax value_and_grad": lambda: block(j_vag(params, inputs)),
        f"{name} jax jvp": lambda: block(j_jvp(params, inputs, tangents)),
        f"{name} jax hvp": lambda: block(j_hvp(params, inputs, v)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    import jax  # noqa: F401  (imported before pin_threads, so its pool gets the same count)
    rng = np.random.default_rng(0)
    with timing.pin_threads(args.threads):
        calls = {}
        for name, spec in MODELS.items():
            calls.update(setup(name, spec, args.batch, rng))
        print("agreement checked (loss, H·v, tangents vs jax)", flush=True)
        report = timing.interleaved_medians(calls, repeats=args.repeats)
    print(timing.format_report(report))
    print()
    print("| model | impl | jvp / forward | hvp / value_and_grad |")
    print("|---|---|---|---|")
    for name in MODELS:
        for impl in ("generated", "jax"):
            t = {k.rsplit(" ", 1)[-1]: report[f"{name} {impl} {k}"].median
                 for k in ("forward", "value_and_grad", "jvp", "hvp")}
            print(f"| {name} | {impl} | {t['jvp'] / t['forward']:.2f} ({t['jvp'] * 1e6:.0f} / {t['forward'] * 1e6:.0f} µs) "
                  f"| {t['hvp'] / t['value_and_grad']:.2f} ({t['hvp'] * 1e6:.0f} / {t['value_and_grad'] * 1e6:.0f} µs) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
