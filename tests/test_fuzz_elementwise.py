"""Fuzzing random elementwise specs: -O0 against -O1, finite differences, and dtypes.

Each seed writes a small spec (inputs, params, a chain of elementwise nodes from the
spec language, a reduced loss) and compiles it at -O0 and -O1.  In float64 the two
levels agree to 1e-10 and the gradients match central differences; in float32 both
agree with the float64 values to float32 accuracy; and in either dtype every float
array the module makes -- the loss, each gradient, each output and every
intermediate a function of the module holds (traced) -- has the model's dtype.
The seeds are fixed, so a failure reproduces with ``fuzz_spec(seed)``.
"""
from __future__ import annotations

import random
import sys

import numpy as np
import pytest

import backcomp
from backcomp.check import check_gradients
from backcomp.spec import parse_spec

# ----- the random specs -----------------------------------------------------------------
# Each template keeps in its own domain (log and sqrt of something positive, exp of
# something bounded), so any value may be its operand.
UNARY = [
    "tanh({a})", "sigmoid({a})", "relu({a})", "gelu({a})", "gelu({a}, approximate=True)", "erf({a})",
    "exp(tanh({a}))", "log({a} * {a} + 1)", "log1p({a} * {a})", "sqrt({a} * {a} + 0.5)", "abs({a})",
    "softplus({a})", "silu({a})", "log_sigmoid({a})", "leaky_relu({a}, alpha=0.1)", "{a} ** 2",
    "{a} ** 3", "square({a})", "-{a}", "sin({a})", "cos({a})", "expm1(tanh({a}))", "clip({a}, -0.5, 0.5)",
    "maximum({a}, 0.2)", "minimum({a}, -0.1)", "{a} * lam", "{a} / 3", "2 - {a}", "1 / ({a} * {a} + 1)",
    "where({a} > 0.1, {a}, 0.0)", "where({a} < 0, 0.5, {a} * 2)", "where({a} >= -0.2, 1.0, 0.0) * {a}",
    "where(k > 0, {a}, -{a})", "where(k <= 0, 0.0, {a})", "relu({a}) - relu({a} - 0.5)",
    "relu({a}) + relu({a} + 0.3)", "where({a} > 0.2, 1.0, -1.0)", "where(k > 0, 0.5, 0.0)",
]
BINARY = [
    "{a} + {b}", "{a} - {b}", "{a} * {b}", "{a} / ({b} * {b} + 1)", "({a} * {a} + 1) ** tanh({b})",
    "maximum({a}, {b} + 0.05)", "minimum({a}, {b} - 0.05)", "where({a} > {b}, {a} * 2, {b})", "where({a} <= 0.3, {b}, -{a})",
    "{a} * sigmoid({b})", "where({b} > 0.1, {a}, 0.0)", "{a} * where({b} > 0, 1.0, 0.0)",
    "abs({a}) - relu({b})",
    "where({b} < 0.2, {a} - {b}, 0.0)",
]
TERNARY = ["where({a} > 0, {b}, {c})", "where({a} > {b}, {c}, {b} * {c})"]
SINKS = ["sum(sin({a}))", "mean({a} * {a})", "sum({a}) * 0.5", "mean(tanh({a}))", "mse({a}, x)"]


def fuzz_spec(seed: int) -> str:
    """The spec text for ``seed``: inputs x (B, 3), k (B, 3) int64 and maybe u (B, 1);
    params p0 (3,), p1 (1, 3) and maybe p2 (B-free, (2, 1, 3)); 2 to 6 nodes; a loss."""
    rng = random.Random(seed)
    inputs = {"x": '["B", 3]', "k": '{ shape = ["B", 3], dtype = "int64" }'}
    params = {"p0": "[3]", "p1": "[1, 3]"}
    if rng.random() < 0.4:
        inputs["u"] = '["B", 1]'
    if rng.random() < 0.3:
        params["p2"] = "[3]"
    pool = [n for n in inputs if n != "k"] + list(params)
    nodes = {}
    for i in range(rng.randint(2, 6)):
        kind = rng.choices(["unary", "binary", "ternary"], [5, 5, 1])[0]
        a, b, c = (rng.choice(pool[-4:] if rng.random() < 0.6 else pool) for _ in range(3))
        template = rng.choice({"unary": UNARY, "binary": BINARY, "ternary": TERNARY}[kind])
        nodes[f"n{i}"] = template.format(a=a, b=b, c=c)
        pool.append(f"n{i}")
    last = pool[-1]
    terms = [rng.choice(SINKS).format(a=last)] + [rng.choice(SINKS).format(a=rng.choice(pool[:-1]))
                                                  for _ in range(rng.randint(0, 2))]
    lines = ["[model]", f'name = "fuzz{seed}"', 'loss = "loss"', f'outputs = ["{last}", "loss"]', "[inputs]"]
    lines += [f"{k} = {v}" for k, v in inputs.items()] + ["[params]"] + [f"{k} = {v}" for k, v in params.items()]
    lines += ["[constants]", "lam = 0.7", "[graph]"] + [f'{k} = "{v}"' for k, v in nodes.items()]
    lines.append(f'loss = "{" + ".join(terms)}"')
    return "\n".join(lines) + "\n"


# ----- running a module with its dtypes traced -------------------------------------------
def traced(module, fn, *args):
    """``fn(*args)`` and the float arrays (name -> dtype) that functions of ``module``
    held in their local variables, seen line by line (temporaries die with their
    statement, so they are looked at before it ends)."""
    filename = module.__file__
    seen: dict[str, set[str]] = {}

    def look(frame, event, arg):
        for k, v in frame.f_locals.items():
            if isinstance(v, (np.ndarray, np.generic)) and v.dtype.kind == "f":
                seen.setdefault(f"{frame.f_code.co_name}:{k}", set()).add(str(v.dtype))
        return look

    def calls(frame, event, arg):
        return look if frame.f_code.co_filename == filename else None

    sys.settrace(calls)
    try:
        return fn(*args), seen
    finally:
        sys.settrace(None)


def values(module, dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.uniform(-1.2, 1.2, s).astype(dtype) for k, s in module.PARAMS.items()}
    inputs = {k: rng.integers(-1, 2, (4, 3)) if module.INPUT_KINDS[k] == "int"
              else rng.uniform(-1.2, 1.2, tuple(4 if isinstance(d, str) else d for d in s)).astype(dtype)
              for k, s in module.INPUTS.items()}
    return params, inputs


def run(module, params, inputs):
    """(loss, grads, outputs), each call on fresh copies, and the dtypes seen on the way."""
    def copies(d):
        return {k: v.copy() for k, v in d.items()}
    (loss, grads), seen = traced(module, module.value_and_grad, copies(params), copies(inputs))
    out, seen_fwd = traced(module, module.forward, copies(params), copies(inputs))
    for k, v in seen_fwd.items():
        seen.setdefault(k, set()).update(v)
    return loss, grads, out, seen


def assert_dtypes(level, dtype, result):
    loss, grads, out, seen = result
    want = np.dtype(dtype).name
    assert isinstance(loss, np.ndarray) and loss.dtype == dtype, f"-O{level}: loss is {type(loss)} {loss.dtype}"
    for k, g in grads.items():
        assert g.dtype == dtype, f"-O{level}: gradient of {k} is {g.dtype}"
    for k, v in out.items():
        assert v.dtype == dtype, f"-O{level}: output {k} is {v.dtype}"
    wrong = {k: sorted(v - {want}) for k, v in seen.items() if v - {want}}
    assert not wrong, f"-O{level}: {want} model computes in another dtype: {wrong}"


def check_seed(seed: int):
    text = fuzz_spec(seed)
    graph = parse_spec(text, f"fuzz{seed}.toml")
    m1, m0 = backcomp.build(graph, opt_level=1), backcomp.build(graph, opt_level=0)
    ref = {}
    for dtype in (np.float64, np.float32):
        params, inputs = values(m1, dtype)
        r1, r0 = run(m1, params, inputs), run(m0, params, inputs)
        assert_dtypes(1, dtype, r1)
        assert_dtypes(0, dtype, r0)
        if dtype is np.float64:
            ref = r1
            assert np.isfinite(r1[0])
            for a, b, what in [(r1[0], r0[0], "loss")] + [(r1[1][k], r0[1][k], f"grad {k}") for k in r1[1]] \
                    + [(r1[2][k], r0[2][k], f"output {k}") for k in r1[2]]:
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"-O1 vs -O0: {what}")
            for level, m in ((1, m1), (0, m0)):
                for r in check_gradients(m, params, inputs, max_elements=12, directions=1):
                    assert r.ok, f"-O{level}: gradient of {r.name} off by {r.max_abs:.3g} (tol {r.tol:.3g})"
        else:
            for level, r in ((1, r1), (0, r0)):
                pairs = [(r[0], ref[0], "loss")] + [(r[1][k], ref[1][k], f"grad {k}") for k in ref[1]]
                for a, b, what in pairs:
                    scale = 1 + np.max(np.abs(b))
                    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * scale,
                                               err_msg=f"-O{level} float32 vs float64: {what}")


SEEDS = range(60)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_elementwise_spec(seed):
    check_seed(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(60, 400))
def test_random_elementwise_spec_more_seeds(seed):
    check_seed(seed)
