"""Numerical stability of generated code, in float32 and float64.

Each test feeds extreme values (logits of magnitude 1e4, sigmoid arguments of ±1e3,
probabilities that underflow) and states the mathematical limit that the value and
the gradient must equal.  Also: ``check_finite`` names the first node that made a
NaN/Inf, and ``stability_report`` lists what was rewritten and what is still risky.
"""
from __future__ import annotations

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.compiler import stability_report

DTYPES = [np.float32, np.float64]
BIG = 1e4
#: four logits per row, one dominant, all of magnitude up to 1e4
LOGITS = np.array([[BIG, -BIG, 0.5 * BIG, 0.0],
                   [-BIG, -0.25 * BIG, -0.5 * BIG, BIG],
                   [0.0, 3.0 * BIG / 4, -BIG, 0.1 * BIG]])
ARGMAX = np.eye(4)[LOGITS.argmax(axis=1)]
Y = np.eye(4)[[1, 2, 3]]           # targets that are never the dominant logit


def _rtol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


def logits_model(name, body, n=4, with_y=True, int_labels=False):
    """z = x + b (b a zero param, so grads w.r.t. b are the sum over rows of dloss/dz)."""
    g = backcomp.Graph(name)
    x = g.input("x", ("B", n))
    y = g.input("y", ("B",), dtype="int") if int_labels else g.input("y", ("B", n)) if with_y else None
    b = g.param("b", (n,))
    z = x + b
    g.loss(body(z, y))
    return backcomp.build(g)


def run(module, x, y=None, dtype=np.float64):
    params = {"b": np.zeros(module.PARAMS["b"], dtype=dtype)}
    inputs = {"x": np.asarray(x, dtype=dtype)}
    if y is not None:
        inputs["y"] = y if np.asarray(y).dtype.kind in "iu" else np.asarray(y, dtype=dtype)
    with np.errstate(all="ignore"):
        loss, grads = module.value_and_grad(params, inputs)
    assert np.isfinite(loss), f"loss {loss}"
    assert np.all(np.isfinite(grads["b"])), f"grad {grads['b']}"
    assert grads["b"].dtype == dtype and np.asarray(loss).dtype == dtype
    return float(loss), grads["b"].astype(np.float64)


# ----- softmax family at |logits| = 1e4 ---------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_softmax_with_huge_logits(dtype):
    """sum(softmax(z) * y): softmax is onehot(argmax); d/dz = s ⊙ (y − s·y) = 0 there."""
    m = logits_model("st_softmax", lambda z, y: ops.sum(ops.softmax(z, axis=-1) * y))
    loss, g = run(m, LOGITS, Y, dtype)
    assert loss == pytest.approx(float(np.sum(ARGMAX * Y)), abs=1e-6)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_softmax_output_is_onehot(dtype):
    g = backcomp.Graph("st_softmax_out")
    x = g.input("x", ("B", 4))
    b = g.param("b", (4,))
    g.output("probs", ops.softmax(x + b, axis=-1))
    g.loss(ops.sum(g.outputs["probs"][:, 0]))
    m = backcomp.build(g)
    with np.errstate(all="ignore"):
        probs = m.forward({"b": np.zeros(4, dtype)}, {"x": LOGITS.astype(dtype)})["probs"]
    assert probs.dtype == dtype
    np.testing.assert_allclose(probs, ARGMAX, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_log_softmax_with_huge_logits(dtype):
    """log_softmax(z) = z − max(z) (finite, e.g. −2e4); d/dz Σ y·log_softmax = y − onehot·Σy."""
    m = logits_model("st_log_softmax", lambda z, y: ops.sum(ops.log_softmax(z, axis=-1) * y))
    loss, g = run(m, LOGITS, Y, dtype)
    expected = np.sum((LOGITS - LOGITS.max(axis=1, keepdims=True)) * Y)
    assert loss == pytest.approx(expected, rel=_rtol(dtype))
    np.testing.assert_allclose(g, np.sum(Y - ARGMAX * Y.sum(1, keepdims=True), axis=0), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_logsumexp_with_huge_logits(dtype):
    """logsumexp(z) = max(z) here; its gradient is softmax = onehot(argmax)."""
    m = logits_model("st_lse", lambda z, y: ops.sum(ops.logsumexp(z, axis=-1)), with_y=False)
    loss, g = run(m, LOGITS, None, dtype)
    assert loss == pytest.approx(LOGITS.max(axis=1).sum(), rel=_rtol(dtype), abs=1e-3)
    np.testing.assert_allclose(g, ARGMAX.sum(axis=0), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_softmax_cross_entropy_with_huge_logits(dtype):
    """mean CE = mean(max − z_target); d/dz = (onehot(argmax) − y) / B."""
    m = logits_model("st_sce", lambda z, y: ops.mean(ops.softmax_cross_entropy(z, y)))
    loss, g = run(m, LOGITS, Y, dtype)
    B = len(LOGITS)
    assert loss == pytest.approx(np.mean(LOGITS.max(1) - (LOGITS * Y).sum(1)), rel=_rtol(dtype))
    np.testing.assert_allclose(g, ((ARGMAX - Y) / B).sum(axis=0), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_softmax_cross_entropy_with_integer_labels_and_huge_logits(dtype):
    labels = np.array([1, 2, 3])
    m = logits_model("st_sce_int", lambda z, y: ops.mean(ops.softmax_cross_entropy(z, y)), int_labels=True)
    loss, g = run(m, LOGITS, labels, dtype)
    assert loss == pytest.approx(np.mean(LOGITS.max(1) - LOGITS[np.arange(3), labels]), rel=_rtol(dtype))
    np.testing.assert_allclose(g, ((ARGMAX - Y) / 3).sum(axis=0), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_log_of_softmax_is_compiled_as_log_softmax(dtype):
    """log(softmax(z)) underflows to log(0) = −inf if computed literally; the compiler
    turns it into z − logsumexp(z), finite with the log_softmax gradient."""
    m = logits_model("st_log_of_softmax", lambda z, y: ops.sum(ops.log(ops.softmax(z, axis=-1)) * y))
    loss, g = run(m, LOGITS, Y, dtype)
    expected = np.sum((LOGITS - LOGITS.max(axis=1, keepdims=True)) * Y)
    assert loss == pytest.approx(expected, rel=_rtol(dtype))
    np.testing.assert_allclose(g, np.sum(Y - ARGMAX * Y.sum(1, keepdims=True), axis=0), atol=1e-6)


# ----- sigmoid family at ±1e3 --------------------------------------------------------------------
Z = np.array([[1e3, -1e3, 1e3, -1e3]])


def _per_element(name, fn, with_y=False):
    """sum(fn(z)) (or sum(fn(z, y))); grad w.r.t. b is the elementwise derivative."""
    return logits_model(name, lambda z, y: ops.sum(fn(z, y) if with_y else fn(z)), with_y=with_y)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_sigmoid_saturates(dtype):
    """σ(±1e3) = 1, 0; σ' = σ(1 − σ) = 0 at both."""
    m = _per_element("st_sigmoid", ops.sigmoid)
    loss, g = run(m, Z, None, dtype)
    assert loss == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(g, 0.0, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_softplus_limits(dtype):
    """softplus(1e3) = 1e3, softplus(−1e3) = 0; d/dz softplus = σ(z): 1 and 0."""
    m = _per_element("st_softplus", ops.softplus)
    loss, g = run(m, Z, None, dtype)
    assert loss == pytest.approx(2e3, rel=_rtol(dtype))
    np.testing.assert_allclose(g, [1.0, 0.0, 1.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_sigmoid_binary_cross_entropy_limits(dtype):
    """BCE(z, y) = softplus(z) − y z: 1e3 where the sign is wrong, 0 where right;
    d/dz = σ(z) − y: ±1 where wrong, 0 where right."""
    m = _per_element("st_bce", lambda z, y: ops.sigmoid_binary_cross_entropy(z, y), with_y=True)
    y = np.array([[0.0, 1.0, 1.0, 0.0]])          # wrong, wrong, right, right
    loss, g = run(m, Z, y, dtype)
    assert loss == pytest.approx(2e3, rel=_rtol(dtype))
    np.testing.assert_allclose(g, [1.0, -1.0, 0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["log_sigmoid", "log_one_minus_sigmoid", "log_one_plus_exp"])
def test_log_forms_of_sigmoid_are_rewritten_stably(dtype, case):
    """log σ(z) = −softplus(−z): −1e3 at z = −1e3, d/dz = 1 − σ(z) (1 and 0);
    log(1 − σ(z)) = −softplus(z): d/dz = −σ(z); log(1 + e^z) = softplus(z)."""
    fn, value, grad = {
        "log_sigmoid": (lambda z: ops.log(ops.sigmoid(z)), -2e3, [0.0, 1.0, 0.0, 1.0]),
        "log_one_minus_sigmoid": (lambda z: ops.log(1.0 - ops.sigmoid(z)), -2e3, [-1.0, 0.0, -1.0, 0.0]),
        "log_one_plus_exp": (lambda z: ops.log(1.0 + ops.exp(z)), 2e3, [1.0, 0.0, 1.0, 0.0]),
    }[case]
    m = _per_element(f"st_{case}", fn)
    loss, g = run(m, Z, None, dtype)
    assert loss == pytest.approx(value, rel=_rtol(dtype))
    np.testing.assert_allclose(g, grad, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_log_one_plus_tiny_keeps_its_digits(dtype):
    """log(1 + u) at u = 1e-10 is 1e-10 (log1p), not 0 (what float rounding of 1 + u gives)."""
    m = _per_element("st_log1p", lambda z: ops.log(1.0 + z))
    loss, g = run(m, np.full((1, 4), 1e-10), None, dtype)
    assert loss == pytest.approx(4e-10, rel=1e-5)
    np.testing.assert_allclose(g, 1.0, rtol=1e-6)


# ----- check_finite ------------------------------------------------------------------------------
def _nan_model(name="st_finite"):
    g = backcomp.Graph(name)
    x = g.input("x", ("B", 3))
    w = g.param("w", (3,))
    h1 = g.output("h1", ops.log(x * w))                  # NaN where x·w < 0
    h2 = g.output("h2", ops.exp(h1) * 2.0 + 1.0)         # propagates the NaN (and is later)
    g.loss(ops.sum(h2 * h1))
    return g


BAD = ({"w": np.array([1.0, -1.0, 1.0])}, {"x": np.ones((2, 3))})


@pytest.mark.parametrize("fn", ["forward", "value_and_grad"])
def test_check_finite_names_the_first_bad_node(fn):
    m = backcomp.build(_nan_model(), check_finite=True)
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError) as info:
        getattr(m, fn)(*BAD)
    message = str(info.value)
    assert "h1" in message and "log" in message, message
    assert "h2" not in message.split("h1")[0], f"names a later node first: {message}"


def test_check_finite_in_compile_source_and_off_by_default():
    src = backcomp.compile_source(_nan_model("st_finite_src"), check_finite=True)
    ns: dict = {}
    exec(compile(src, "<st_finite_src>", "exec"), ns)   # generated source, not a spec
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="h1"):
        ns["value_and_grad"](*BAD)
    plain = backcomp.build(_nan_model())
    with np.errstate(all="ignore"):
        out = plain.forward(*BAD)
    assert np.isnan(out["h1"]).any()                   # without the option: NaN, no exception
    good = ({"w": np.array([1.0, 2.0, 3.0])}, {"x": np.ones((2, 3))})
    loss_checked, _ = backcomp.build(_nan_model(), check_finite=True).value_and_grad(*good)
    assert loss_checked == plain.value_and_grad(*good)[0]


def test_check_finite_catches_a_non_finite_gradient():
    """sqrt(0) is finite but its derivative is inf: the error names a backward node."""
    g = backcomp.Graph("st_finite_bwd")
    x = g.input("x", ("B", 2))
    w = g.param("w", (2,))
    g.loss(ops.sum(ops.sqrt(x * w)))
    m = backcomp.build(g, check_finite=True)
    params, inputs = {"w": np.array([0.0, 1.0])}, {"x": np.ones((1, 2))}
    m.forward(params, inputs)                          # the forward is finite
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="non-finite"):
        m.value_and_grad(params, inputs)


# ----- stability_report ------------------------------------------------------------------------
def _report_for(name, body):
    g = backcomp.Graph(name)
    x = g.input("x", ("B", 3))
    w = g.param("w", (3,))
    g.loss(ops.sum(body(x * w)))
    return stability_report(g)


@pytest.mark.parametrize("body, expected", [
    (lambda z: ops.log(1.0 + z * z), "log(1 + u) -> log1p(u)"),
    (lambda z: ops.log(1.0 + ops.exp(z)), "log(1 + exp(u)) -> softplus(u)"),
    (lambda z: ops.log(ops.sigmoid(z)), "log(sigmoid(z)) -> -softplus(-z)"),
    (lambda z: ops.log(1.0 - ops.sigmoid(z)), "log(1 - sigmoid(z)) -> -softplus(z)"),
], ids=["log1p", "softplus", "log_sigmoid", "log_one_minus_sigmoid"])
def test_report_lists_rewrites(body, expected):
    report = _report_for("st_report", body)
    assert any("rewrote" in line and expected in line for line in report), report


def test_report_lists_risky_patterns_left():
    report = _report_for("st_risky", lambda z: ops.exp(z) / (z * z))
    risky = [line for line in report if "risky" in line]
    assert any("exp(" in line and "overflow" in line for line in risky), report
    assert any("division" in line for line in risky), report
    assert not any("rewrote" in line for line in report), report


def test_report_is_clean_for_stable_ops():
    """softplus and sigmoid are already stable: nothing to rewrite, nothing risky."""
    report = _report_for("st_clean", lambda z: ops.softplus(z) + ops.sigmoid(z) + ops.tanh(z))
    assert report == [], report


def test_report_names_the_node():
    g = backcomp.Graph("st_named")
    x = g.input("x", ("B", 3))
    w = g.param("w", (3,))
    h = g.assign_name("h", ops.log(1.0 + x * w * x * w))
    g.loss(ops.sum(h))
    report = stability_report(g)
    assert any(line.startswith("h:") and "log1p" in line for line in report), report


# ----- no false alarms: a sign analysis of the graph ------------------------------------------------
def _spec_report(graph_lines: str, name="st_spec") -> list[str]:
    from backcomp.spec import parse_spec
    text = ('[inputs]\nx = ["B", 4]\ny = ["B", 4]\n[params]\ng = [4]\nb = [4]\n[graph]\n'
            + graph_lines.strip() + "\n")
    return stability_report(parse_spec(text, f"{name}.toml"))


SAFE_BY_CONSTRUCTION = {
    "layernorm": '''
m = "mean(x, axis=-1, keepdims=True)"
v = "mean((x - m) ** 2, axis=-1, keepdims=True)"
h = "(x - m) / sqrt(v + 1e-5) * g + b"
loss = "sum(h * y)"''',
    "rmsnorm": '''
h = "x / sqrt(mean(x * x, axis=-1, keepdims=True) + 1e-6) * g"
loss = "sum(h * y)"''',
    "manual_softmax": '''
z = "x * g + b"
e = "exp(z - max(z, axis=-1, keepdims=True))"
p = "e / sum(e, axis=-1, keepdims=True)"
loss = "sum(p * y)"''',
    "manual_softmax_stop_gradient": '''
z = "x * g + b"
e = "exp(z - stop_gradient(max(z, axis=-1, keepdims=True)))"
loss = "sum(e / sum(e, axis=-1, keepdims=True) * y)"''',
    "manual_softmax_all_axes": '''
z = "x * g"
loss = "sum(exp(z - max(z)) * y) / sum(exp(z - max(z)))"''',
    "sums_with_a_positive_constant": '''
h = "y / (1 + softplus(x * g)) + y / (g * g + 0.5) + y / (abs(x) + relu(b) + 1e-3)"
loss = "sum(h)"''',
    "log_of_eps_shifted_square": '''
loss = "sum(log(x * x * g * g + 1e-8))"''',
    "softmax_output_and_cross_entropy": '''
logits = "x * g + b"
probs = "softmax(logits, axis=-1)"
loss = "mean(softmax_cross_entropy(logits, y)) + sum(probs * y)"''',     # exp(x − m − log Σ): ≤ 0
    "gaussian": '''
loss = "sum(exp(-(x * g) ** 2) * y + exp(-abs(b)))"''',
}


@pytest.mark.parametrize("case", SAFE_BY_CONSTRUCTION)
def test_report_is_clean_where_safe_by_construction(case):
    """Regression (issue 9, defect 8): sqrt(var + eps) and a softmax's sum are positive
    by construction, bounded away from zero; nothing here can overflow either."""
    report = _spec_report(SAFE_BY_CONSTRUCTION[case], f"st_safe_{case}")
    assert report == [], report


@pytest.mark.parametrize("graph, expected", [
    ('loss = "sum(x * g / y)"', "division by y, which may be 0"),
    ('loss = "sum(g / (x - x * x))"', "which may be 0"),
    ('loss = "sum(g / (x * y + 1e-5))"', "division by"),                  # x·y may be negative
    ('loss = "sum(y / sigmoid(x * g))"', "positive but may underflow to 0"),
    ('loss = "sum(y / sqrt(x * x * g))"', "division by sqrt("),
    ('e = "exp(x * g)"\nloss = "sum(e / sum(e, axis=-1, keepdims=True) * y)"', "positive but may underflow"),
    ('z = "x * g"\ne = "exp(z - max(z, axis=0, keepdims=True))"\n'           # shifted by another axis' max:
     'loss = "sum(e / sum(e, axis=-1, keepdims=True) * y)"', "positive but may underflow"),   # no term is 1
    ('loss = "sum(log(x * g + 1e-8))"', "log("),
    # two inputs with the same label ("loss (sum)") were once merged into one symbol: a/b -> 1
    ('loss = "sum(x * g) / sum(y)"', "division by loss (sum), which may be 0"),
], ids=["x_over_y", "difference", "product_plus_eps", "sigmoid", "sqrt_of_nonneg", "unshifted_softmax",
        "other_axis_max", "log_of_signed", "same_label_inputs"])
def test_report_still_flags_what_may_be_zero(graph, expected):
    report = _spec_report(graph, "st_unsafe")
    risky = [line for line in report if "risky" in line]
    assert any(expected in line for line in risky), report


def test_unshifted_softmax_still_reports_its_exp():
    report = _spec_report('e = "exp(x * g)"\nloss = "sum(e / sum(e, axis=-1, keepdims=True) * y)"', "st_unshifted")
    assert any(line.startswith("e:") and "overflows" in line for line in report), report


def test_report_prints_constants_as_their_shortest_repr():
    """Regression (issue 9, defect 8): constants are SymPy Floats of 17 digits, which
    SymPy's str shows as 1.0000000000000001e-5."""
    report = _spec_report('loss = "sum(g / (y + 1e-5)) + sum(log(x * g + 0.1))"', "st_digits")
    text = "\n".join(report)
    assert "division by y + 1e-05, which may be 0" in text, text
    assert "0.1" in text and "1.0000000000000001e-5" not in text and "0.10000000000000001" not in text, text


def test_sign_analysis_of_a_graph():
    """graph_bounds: the lower bound of every node, derived from its op and its inputs."""
    from backcomp.passes.stability import NONNEG, POSITIVE, Bound, graph_bounds
    g = backcomp.Graph("st_bounds")
    x = g.input("x", ("B", 4))
    w = g.param("w", (4,))
    sq = (x - w) ** 2
    var = ops.mean(sq, axis=-1, keepdims=True)
    shifted = ops.exp(x - ops.max(x, axis=-1, keepdims=True))
    nodes = {
        "x": x, "square": sq, "var": var, "var_eps": var + 1e-5, "rsqrt": ops.sqrt(var + 1e-5) ** -1.0,
        "exp": ops.exp(x), "sum_exp": ops.sum(ops.exp(x), axis=-1), "relu": ops.relu(x),
        "shifted_sum": ops.sum(shifted, axis=-1), "shifted_sum_other_axis": ops.sum(shifted, axis=0),
        "softmax": ops.softmax(x, axis=-1), "log_softmax": ops.log_softmax(x, axis=-1),
        "abs_matmul": ops.abs(x) @ ops.reshape(w * w, (4, 1)), "neg_square": -sq,
    }
    bounds = graph_bounds(g)
    got = {k: bounds.get(n) for k, n in nodes.items()}
    assert got["x"] is None and got["neg_square"] is None and got["log_softmax"] is None
    assert got["square"] == got["var"] == got["relu"] == got["abs_matmul"] == NONNEG
    assert got["var_eps"] == Bound(1e-5, True) and got["var_eps"].away_from_zero
    assert got["rsqrt"] == POSITIVE
    assert got["exp"] == got["sum_exp"] == got["softmax"] == got["shifted_sum_other_axis"] == POSITIVE
    assert not got["exp"].away_from_zero
    assert got["shifted_sum"] == Bound(1.0, True)


@pytest.mark.parametrize("padding", [0, 1])
def test_conv_of_nonnegative_operands_is_nonnegative(padding):
    """conv2d reads its im2col columns: they carry x's bound (and the zero padding's)."""
    from backcomp.passes.stability import NONNEG, graph_bounds
    g = backcomp.Graph("st_conv")
    x = g.input("x", ("B", 2, 6, 6))
    w = g.param("w", (3, 2, 3, 3))
    y = ops.conv2d(ops.relu(x), ops.exp(w), padding=padding)
    assert graph_bounds(g).get(y) == NONNEG
