"""Regressions found by tests/test_fuzz_elementwise.py, each reduced to a minimal spec.

Each is checked at -O0 and -O1, in float64 against the gradient worked out by hand
and in float32 for the dtype of everything the module computes (``traced``).
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import backcomp
from backcomp import ops
from backcomp.compiler import lower_graph
from backcomp.spec import parse_spec

from test_fuzz_elementwise import traced


def spec(graph: str, outputs: str = '["loss"]', inputs: str = "") -> backcomp.Graph:
    text = (f'[model]\nname = "r"\nloss = "loss"\noutputs = {outputs}\n[inputs]\nx = ["B", 3]\n{inputs}'
            f'[params]\np = [3]\nq = [3]\n[graph]\n{graph}\n')
    return parse_spec(text, "r.toml")


P = np.array([1.0, 0.2, -1.0])
Q = np.array([1.0, 1.0, -1.0])
X = np.array([[0.5, -0.5, 1.5], [-1.0, 2.0, 0.1]])
K = np.array([[1, 0, 1], [1, 1, 0]])


def evaluate(graph, level, dtype):
    """(loss, grads, outputs) at P, Q, X (and K), asserting that every float array the
    module holds on the way, and what it returns, has the dtype of the params."""
    module = backcomp.build(graph, opt_level=level)
    params = {"p": P.astype(dtype), "q": Q.astype(dtype)}
    inputs = {"x": X.astype(dtype), **({"k": K} if "k" in module.INPUTS else {})}
    (loss, grads), seen = traced(module, module.value_and_grad, params, inputs)
    out, seen_forward = traced(module, module.forward, params, inputs)
    want = np.dtype(dtype).name
    wrong = {k: v for k, v in {**seen, **seen_forward}.items() if v != {want}}
    assert not wrong, f"-O{level}: a {want} model computes in another dtype: {wrong}"
    for name, value in [("loss", loss), *grads.items(), *out.items()]:
        assert value.dtype == dtype, f"-O{level}: {name} is {value.dtype}"
    return loss, grads, out


def check(graph, loss, grads):
    for level in (0, 1):
        for dtype in (np.float64, np.float32):
            got_loss, got, _ = evaluate(graph, level, dtype)
            tol = 1e-12 if dtype is np.float64 else 1e-6
            np.testing.assert_allclose(got_loss, loss, rtol=tol, atol=tol, err_msg=f"-O{level} loss")
            for name, g in grads.items():
                np.testing.assert_allclose(got[name], g, rtol=tol, atol=tol, err_msg=f"-O{level} grad {name}")


def test_a_step_minus_a_step_subtracts_numbers_not_booleans():
    """d/dp (relu(p) − relu(p − 0.5)) = H(p) − H(p − 0.5): boolean masks refused to subtract
    (TypeError: numpy boolean subtract)."""
    check(spec('loss = "sum(relu(p) - relu(p - 0.5))"'),
          np.sum(np.maximum(P, 0) - np.maximum(P - 0.5, 0)),
          {"p": (P > 0) * 1.0 - (P > 0.5), "q": 0 * Q})


def test_a_sum_of_steps_adds_numbers_not_booleans():
    """H(p) + H(p − 0.5) as masks was a logical or: the gradient 1.5 where it is 2.5."""
    check(spec('loss = "sum(relu(p) + relu(p - 0.5) + 0.5 * p)"'),
          np.sum(np.maximum(P, 0) + np.maximum(P - 0.5, 0) + 0.5 * P),
          {"p": (P > 0) * 1.0 + (P > 0.5) + 0.5, "q": 0 * Q})


def test_the_seed_stays_when_it_is_the_only_float_operand():
    """At -O1 the loss seed 1 replaced ones_like(loss), leaving np.where(p > 0.5 | p < −0.5, 0, 0.5):
    float64 in a float32 model (the p0_bar of the fuzzing report)."""
    check(spec('loss = "sum(clip(p, -0.5, 0.5)) * 0.5"'),
          0.5 * np.sum(np.clip(P, -0.5, 0.5)),
          {"p": 0.5 * ((P >= -0.5) & (P <= 0.5)), "q": 0 * Q})


def test_a_seed_selected_by_an_integer_mask_keeps_the_dtype():
    """With only the int input left, -O1 wrote np.full((B, 3), np.where(k > 0, 0.5, -0.5), dtype=float)."""
    graph = spec('loss = "0.5 * sum(where(k > 0, p, -p))"', inputs='k = { shape = ["B", 3], dtype = "int64" }\n')
    check(graph, 0.5 * np.sum(np.where(K > 0, P, -P)), {"p": 0.5 * np.sum(np.where(K > 0, 1, -1), axis=0), "q": 0 * Q})


def test_a_select_of_numbers_has_the_model_dtype():
    """where(x > 0, 1.0, 0.0) was np.where(x > 0, 1, 0), an int64 array: y and the loss were
    float64 at -O0 (and at -O1) in a float32 model."""
    mask = (X > 0) * 1.0
    y = mask * P
    graph = spec('y = "where(x > 0, 1.0, 0.0) * p"\nloss = "mean(y * y)"', outputs='["y", "loss"]')
    check(graph, np.mean(y * y), {"p": np.sum(2 * y * mask, axis=0) / y.size, "q": 0 * Q})
    for level in (0, 1):
        np.testing.assert_array_equal(evaluate(graph, level, np.float32)[2]["y"], y.astype(np.float32))


def test_a_select_of_numbers_is_no_in_place_buffer():
    """m = np.where(p > 0, 1, 0) was an int64 array, dead after its last use, so -O1
    multiplied into it in place: UFuncTypeError (float64 output into int64), even in float64."""
    m = (P > 0) * 1.0
    check(spec('m = "where(p > 0, 1.0, 0.0)"\nloss = "sum((q * m) ** 3) + sum(p * m)"'),
          np.sum((Q * m) ** 3) + np.sum(P * m), {"p": m, "q": 3 * (Q * m) ** 2 * m})


def test_a_select_of_numbers_added_to_an_array_keeps_its_dtype():
    """g + np.where(q < p, 1.0, 0): the select of numbers (the seed folded into 2·0.5) was a
    float64 temporary; it is folded into the select, np.where(q < p, g + 1.0, g)."""
    graph = spec('a = "where(p > q, p * 2, q)"\nloss = "sum(tanh(where(x > 0, p, 0.0))) + sum(a) * 0.5"')
    t = np.tanh(np.where(X > 0, P, 0.0))
    check(graph, np.sum(t) + 0.5 * np.sum(np.where(P > Q, 2 * P, Q)),
          {"p": np.sum((1 - t ** 2) * (X > 0), axis=0) + (P > Q), "q": 0.5 * (P <= Q)})


def test_a_select_compared_keeps_both_branches():
    """where(a > 0.1, …) with a = where(p <= 0.3, q, −p) on a shared condition: SymPy folded
    the comparison into the select and took the bare condition for "always", so -O1
    computed where(q > 0.1, …) and the loss differed from -O0."""
    graph = spec('a = "where(p <= 0.3, q, -p)"\nb = "where(p <= 0.3, p, -p)"\nloss = "sum(where(a > 0.1, b, 0.0))"')
    a, b = np.where(P <= 0.3, Q, -P), np.where(P <= 0.3, P, -P)
    check(graph, np.sum(np.where(a > 0.1, b, 0.0)), {"p": np.where(a > 0.1, np.where(P <= 0.3, 1.0, -1.0), 0.0),
                                                     "q": 0 * Q})


@pytest.mark.parametrize("level", [0, 1])
def test_a_comparison_times_an_array_compiles(level):
    """a * (b > 0.1) from the builder: fusion put the relational inside a Mul and SymPy
    raised TypeError ("Relational cannot be used in Mul")."""
    g = backcomp.Graph("mask")
    a, b = g.param("a", (3,)), g.input("b", ("B", 3))
    g.loss(ops.sum(ops.tanh(a * (b > 0.1))))
    m = backcomp.build(g, opt_level=level)
    b_value = X.astype(np.float32)
    (loss, grads), _ = traced(m, m.value_and_grad, {"a": P.astype(np.float32)}, {"b": b_value})
    mask = b_value > 0.1
    np.testing.assert_allclose(loss, np.sum(np.tanh(P * mask)), rtol=1e-6)
    np.testing.assert_allclose(grads["a"], np.sum((1 - np.tanh(P * mask) ** 2) * mask, axis=0), rtol=1e-6)
    assert grads["a"].dtype == np.float32


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("case", ["one_minus_mask", "mask_minus_mask", "exp_of_mask"])
def test_a_comparison_as_a_number_keeps_the_model_dtype(case, level):
    """1 - (b > 0) from the builder was int64 (so a·(1 - m) and the loss were float64 in a
    float32 model), m1 - m2 was NumPy's "boolean subtract" TypeError, exp(m) float16."""
    make, value = {
        "one_minus_mask": (lambda a, b: a * (1 - (b > 0)), lambda m0, m1: 1.0 - m0),
        "mask_minus_mask": (lambda a, b: a * ((b > 0) - (b > 1)), lambda m0, m1: m0 - m1),
        "exp_of_mask": (lambda a, b: a * ops.exp(b > 0), lambda m0, m1: np.exp(m0)),
    }[case]
    g = backcomp.Graph("mask_number")
    a, b = g.param("a", (3,)), g.input("b", ("B", 3))
    g.loss(ops.sum(make(a, b)))
    m = backcomp.build(g, opt_level=level)
    b_value = np.array([[1.5, -1.0, 0.5], [0.2, 2.0, -0.3]], np.float32)
    (loss, grads), seen = traced(m, m.value_and_grad, {"a": P.astype(np.float32)}, {"b": b_value})
    factor = value((b_value > 0).astype(np.float64), (b_value > 1).astype(np.float64))
    np.testing.assert_allclose(loss, np.sum(P * factor), rtol=1e-6)
    np.testing.assert_allclose(grads["a"], factor.sum(axis=0), rtol=1e-6)
    assert loss.dtype == grads["a"].dtype == np.float32
    assert all(v == {"float32"} for v in seen.values()), seen

def test_a_sum_of_many_number_selects_compiles_in_linear_size():
    """Σ_i where(x > c_i, 1.0, 0.0)·p: SymPy's piecewise_fold of the sum made one select of
    2^n branches (n = 10 took 40 s to compile, n = 12 70 s); folded term by term,
    the module holds one np.where per select in the forward and one in the backward."""
    n = 12
    cuts = np.linspace(-1.5, 1.5, n)
    terms = " + ".join(f"where(x > {float(c)!r}, 1.0, 0.0) * p" for c in cuts)
    graph = spec(f'loss = "sum({terms})"')
    counts = (X[:, :, None] > cuts).sum(axis=2)
    check(graph, np.sum(counts * P), {"p": counts.sum(axis=0), "q": np.zeros(3)})
    lowered = lower_graph(graph)
    branches = [len(s.args) for node in lowered.nodes if node.op == "ew" for s in node.attrs["expr"].atoms(sp.Piecewise)]
    assert branches and max(branches) == 2 and len(branches) <= 3 * n


@pytest.mark.parametrize("loss", [
    "sum(leaky_relu(leaky_relu(leaky_relu(leaky_relu(leaky_relu(p * x, 0.1), 0.1), 0.1), 0.1), 0.1))",
    "sum(where(x > 0.0, leaky_relu(p*x, 0.1) + leaky_relu(p*x - 1.0, 0.1), leaky_relu(p*x + 1.0, 0.1)))",
    "sum(x * (leaky_relu(p, 0.1) + leaky_relu(p - 1.0, 0.1) + leaky_relu(p + 1.0, 0.1) + leaky_relu(p - 0.5, 0.1)))",
    "sum(tanh(leaky_relu(p*x, 0.1) + leaky_relu(p*x - 1.0, 0.1) + leaky_relu(p*x + 1.0, 0.1) + leaky_relu(p*x - 0.5, 0.1)))",
], ids=["chain of five", "select of sums", "array times a sum of four", "tanh of a sum of four"])
def test_more_than_three_selects_fold_into_arrays_beside_them(loss):
    """Beyond three selects the fold goes term by term: a select of selects crashed SymPy
    (an ExprCondPair folded as a select), and a number select left on its own printed as
    np.where(c, 1, 0.1), float64 in a float32 model (found by review)."""
    graph = spec(f'loss = "{loss}"')
    base = evaluate(graph, 0, np.float64)
    for level in (0, 1):
        for dtype in (np.float64, np.float32):   # evaluate() asserts every array's dtype
            got_loss, got, _ = evaluate(graph, level, dtype)
            tol = 1e-12 if dtype is np.float64 else 1e-5
            np.testing.assert_allclose(got_loss, base[0], rtol=tol, atol=tol)
            np.testing.assert_allclose(got["p"], base[1]["p"], rtol=tol, atol=tol)


def test_an_activation_of_a_number_is_a_number():
    """relu(log_sigmoid(p − p)): the fused expression is Max(−softplus(0), 0), which SymPy
    refused to build ("The argument '-softplus(0)' is not comparable", seed 406):
    σ and softplus of a number now have a numeric value, so SymPy compares them, and stay
    σ(c) and softplus(c) in the expression (σ(−1000) as 1/(1 + e¹⁰⁰⁰) printed 1/inf)."""
    check(spec('loss = "sum(relu(log_sigmoid(p - p)) + sigmoid(q - q) * p * q)"'),
          np.sum(0.5 * P * Q), {"p": 0.5 * Q, "q": 0.5 * P})


@pytest.mark.parametrize("level", [0, 1])
def test_an_activation_of_a_large_number_keeps_its_stable_form(level):
    """σ(c) and softplus(c) of numbers are not expanded: σ(−1000) as 1/(1 + e¹⁰⁰⁰) printed
    the literal ``inf`` (a NameError when the module ran), and log(1 − σ(1000)) lost its
    rewrite to −softplus(1000) (a loss of −inf where it is −1000 per element)."""
    m = backcomp.build(spec('loss = "sum(sigmoid(p * 0 - 1000) * x) + sum(log_sigmoid(q * 0 - 1000) * p)"'),
                       opt_level=level)
    loss, grads = m.value_and_grad({"p": P, "q": Q}, {"x": X})
    np.testing.assert_allclose(loss, -1000 * P.sum() * 1, rtol=1e-12)
    np.testing.assert_allclose(grads["p"], np.full(3, -1000.0), rtol=1e-12)


def test_a_tie_split_times_an_irrational_number_prints():
    """maximum(erf(p), q)'s partial is ½·(2/√π)·e^(−p²) at a tie: the printer's number
    factor 1/√π was given to sp.Float unevaluated (TypeError: cannot create mpf, seeds
    852 and 1135).  What failed was compiling the tie's term; P and Q hold no tie."""
    from math import erf, pi, sqrt
    erf_p = np.array([erf(v) for v in P])
    tie = np.where(erf_p > Q, 1.0, np.where(erf_p == Q, 0.5, 0.0))
    check(spec('loss = "sum(maximum(erf(p), q))"'), np.sum(np.maximum(erf_p, Q)),
          {"p": tie * 2 / sqrt(pi) * np.exp(-P ** 2), "q": 1 - tie})


@pytest.mark.parametrize("level", [0, 1])
def test_a_value_read_twice_after_cse_is_not_overwritten_before_its_second_read(level):
    """Seed 1859: where(p > p, 2p, p) − p is 0, but after CSE the fused backward read one
    array under two symbols (%0 − %1, uncancelled) and its in-place chain wrote the array
    before the second read: -O1 gave 0.86, 0.83, 0.80 where the gradient is 1."""
    g = parse_spec('[model]\nname = "r1859"\nloss = "loss"\n[inputs]\nx = ["B", 3]\n[params]\np1 = [1, 3]\n'
                   '[graph]\nn2 = "where(p1 > p1, p1 * 2, p1)"\nn3 = "n2 - p1"\nloss = "mean(n3 * x) + sum(n2)"\n',
                   "r.toml")
    _, grads = backcomp.build(g, opt_level=level).value_and_grad({"p1": P[None]}, {"x": X})
    np.testing.assert_allclose(grads["p1"], np.ones((1, 3)), rtol=1e-15)


def test_a_select_of_a_number_over_the_batch_size_keeps_the_dtype():
    """Seed 2568: the backward of mean(where(n > 0.1, n, 0)) held np.where(c, 0.333/B, 0),
    float64 in a float32 model: a select whose branches read only the batch size B is a
    select of numbers, and folds into the array beside it like one."""
    n = np.maximum(P, X)
    ones = (P > X) * 1.0
    check(spec('n3 = "maximum(p, x)"\nloss = "sum(relu(n3)) + mean(where(n3 > 0.1, n3, 0.0))"'),
          np.sum(np.maximum(n, 0)) + np.mean(np.where(n > 0.1, n, 0.0)),
          {"p": (ones * ((n > 0) + (n > 0.1) / n.size)).sum(0), "q": np.zeros(3)})
