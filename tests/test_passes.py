"""Each optimisation pass alone (by structure), and -O1 against -O0 on every example."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import backcomp
from backcomp import ops
from backcomp.check import fixed_draws, random_inputs, random_params
from backcomp.compiler import compile_source, lower_graph, stability_report
from backcomp.ops.elementwise import arg_symbol, node_expr
from backcomp.ops.scalar import log1p, sigmoid, softplus
from backcomp.passes import prepare_forward
from backcomp.passes.cse import eliminate_common_subexpressions
from backcomp.passes.dce import eliminate_dead_code
from backcomp.passes.fuse import fuse_elementwise
from backcomp.passes.memory import plan_memory
from backcomp.passes.reductions import merge_reductions
from backcomp.passes.stability import stabilize
from backcomp.spec import parse_spec
from backcomp.vjp import differentiate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def ops_of(graph):
    return [n.op for n in graph.nodes if n.op not in ("input", "param")]


def test_dead_code_elimination_drops_what_no_root_needs():
    g = backcomp.Graph("dce")
    x = g.input("x", (3,))
    ops.exp(x)                      # built, never used
    g.loss(ops.sum(ops.tanh(x)))
    out = eliminate_dead_code(g)
    assert ops_of(out) == ["tanh", "sum"]
    assert ops_of(g) == ["exp", "tanh", "sum"], "passes must not mutate their input graph"


def test_cse_merges_identical_computations():
    g = backcomp.Graph("cse")
    x = g.input("x", (2, 3))
    W = g.param("W", (3, 3))
    g.loss(ops.sum(ops.tanh(x @ W)) + ops.sum(ops.exp(x @ W)))
    out = eliminate_common_subexpressions(g)
    assert ops_of(out).count("matmul") == 1
    assert ops_of(g).count("matmul") == 2


def test_fusion_makes_one_expression_of_a_chain():
    g = backcomp.Graph("fuse")
    x = g.input("x", (4,))
    b = g.param("b", (4,))
    g.loss(ops.sum(ops.tanh(ops.exp(x + b) * 2 - 1)))
    out = fuse_elementwise(g)
    assert ops_of(out) == ["ew", "sum"]
    (ew,) = [n for n in out.nodes if n.op == "ew"]
    a0, a1 = arg_symbol(0), arg_symbol(1)
    names = dict(zip(ew.inputs, (a0, a1)))
    X, B = names[out.inputs["x"]], names[out.params["b"]]
    assert sp.simplify(node_expr(ew) - sp.tanh(2 * sp.exp(X + B) - 1)) == 0


def test_fusion_keeps_values_that_have_other_consumers():
    g = backcomp.Graph("fanout")
    x = g.input("x", (4,))
    h = ops.exp(x)
    g.loss(ops.sum(ops.tanh(h)) + ops.sum(h))
    out = fuse_elementwise(g)
    assert "exp" in ops_of(out), "exp(x) feeds two consumers and must be computed once"


def test_nested_reductions_become_one():
    g = backcomp.Graph("red")
    x = g.input("x", ("B", 5))
    g.loss(ops.mean(ops.sum(x * x, axis=1)))
    out = merge_reductions(g)
    assert [op for op in ops_of(out) if op in ("sum", "mean")] == ["sum"]
    m = backcomp.build(g)
    xs = np.arange(10.0).reshape(2, 5)
    assert np.isclose(m.forward({}, {"x": xs})["loss"], np.mean(np.sum(xs * xs, axis=1)))


@pytest.mark.parametrize("build, expected", [
    (lambda u: ops.log(1 + ops.exp(u)), lambda a: softplus(a)),
    (lambda u: ops.log(1 + u * u), lambda a: log1p(a ** 2)),
    (lambda u: ops.log(ops.sigmoid(u)), lambda a: -softplus(-a)),
], ids=["softplus", "log1p", "log_sigmoid"])
def test_stable_rewrites(build, expected):
    g = backcomp.Graph("stab")
    u = g.input("u", (3,))
    g.loss(ops.sum(build(u)))
    findings = []
    out = stabilize(fuse_elementwise(g), findings)
    (ew,) = [n for n in out.nodes if n.op not in ("input", "param", "sum")]
    assert sp.simplify(node_expr(ew) - expected(arg_symbol(0))) == 0
    assert any(f.rewritten for f in findings)


def test_stability_report_names_rewrites_and_risks():
    g = backcomp.Graph("rep")
    u = g.input("u", (3,))
    with g.scoped("a"):
        a = g.assign_name("a", ops.log(1 + ops.exp(u)))
    with g.scoped("b"):
        b = g.assign_name("b", ops.log(u))
    g.loss(ops.sum(a + b))
    report = stability_report(g)
    assert any("softplus" in line and "rewrote" in line for line in report)
    assert any("risky" in line and "log" in line for line in report)


def test_log_of_softmax_becomes_log_softmax():
    """No rule needed: softmax is exp(x − lse), and SymPy folds log(exp(v)) to v."""
    g = backcomp.Graph("logsm")
    x = g.input("x", ("B", 4))
    g.loss(ops.sum(ops.log(ops.softmax(x, axis=-1))))
    text = compile_source(g)
    forward = text[text.index("def forward"):text.index("def value_and_grad")]
    assert "np.log(np.exp" not in forward
    m = backcomp.build(g)
    out = m.forward({}, {"x": np.array([[1e4, 0.0, -1e4, 3.0]])})["loss"]
    assert np.isfinite(out)


def _backward_section(text: str) -> str:
    """The backward statements of value_and_grad, without their comments."""
    vag = text[text.index("def value_and_grad"):]
    lines = vag[vag.index("# backward"):].splitlines()
    return "\n".join(line for line in lines if not line.strip().startswith("#"))


def mlp_graph():
    g = backcomp.Graph("mlp_ce")
    x = g.input("x", ("B", 6))
    y = g.input("y", ("B", 3))
    W1 = g.param("W1", (6, 5))
    b1 = g.param("b1", (5,))
    W2 = g.param("W2", (5, 3))
    b2 = g.param("b2", (3,))
    h = g.assign_name("h", ops.relu(x @ W1 + b1))
    logits = g.assign_name("logits", h @ W2 + b2)
    g.loss(ops.mean(ops.softmax_cross_entropy(logits, y)))
    return g


def test_softmax_cross_entropy_backward_reuses_the_forward_exponentials():
    """(softmax − y)/B with no Jacobian and no second exp in the backward."""
    back = _backward_section(compile_source(mlp_graph()))
    assert "exp(" not in back
    m = backcomp.build(mlp_graph())
    p, i = random_params(m), random_inputs(m, batch=4)
    i["y"] = np.eye(3)[[0, 2, 1, 1]]
    _, grads = m.value_and_grad(p, i)
    h = np.maximum(i["x"] @ p["W1"] + p["b1"], 0)
    z = h @ p["W2"] + p["b2"]
    soft = np.exp(z - z.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    np.testing.assert_allclose(grads["b2"], ((soft - i["y"]) / 4).sum(0), rtol=1e-12)


def test_relu_backward_reads_its_output():
    back = _backward_section(compile_source(mlp_graph()))
    assert re.search(r"\(h > 0\)", back), back


def test_sigmoid_bce_backward_is_sigmoid_minus_target():
    """d/dz of softplus(z) − y·z is σ(z) − y: derived, no log or 1/σ anywhere."""
    g = backcomp.Graph("bce")
    z = g.input("z", ("B",))
    y = g.input("y", ("B",))
    w = g.param("w", ())
    g.loss(ops.sum(ops.sigmoid_binary_cross_entropy(z * w, y)))
    d = lower_graph(g)
    node = d.grads["w"]
    while node.op != "ew":
        node = node.inputs[0]
    Z, W, Y = sp.symbols("Z W Y", real=True)
    leaf = {d.inputs["z"]: Z, d.params["w"]: W, d.inputs["y"]: Y}
    leaf.update({n: Z * W for n in d.nodes if set(n.inputs) == {d.inputs["z"], d.params["w"]}})
    expr = node_expr(node).xreplace({arg_symbol(i): leaf[x] for i, x in enumerate(node.inputs)})
    assert expr.has(sigmoid) and not expr.has(sp.log)
    assert sp.simplify(expr - Z * (sigmoid(Z * W) - Y)) == 0


def test_tanh_and_sigmoid_derivatives_reuse_the_forward_output():
    g = backcomp.Graph("reuse")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 4))
    V = g.param("V", (4, 1))
    h = g.assign_name("h", ops.tanh(x @ W))
    s = g.assign_name("s", ops.sigmoid(h @ V))
    g.loss(ops.mean(s))
    back = _backward_section(compile_source(g))
    # 1 - h², s·(1 - s): written as a chain in one array each (np.subtract(1, h**2, ...))
    assert "h**2" in back and "1 - s" in back, back
    assert "tanh(" not in back and "logaddexp" not in back and "_sigmoid(" not in back


def test_memory_plan_reuses_a_dead_buffer_and_never_an_input():
    g = backcomp.Graph("mem")
    x = g.input("x", ("B", 4))
    W = g.param("W", (4, 4))
    b = g.param("b", (4,))
    g.loss(ops.sum(ops.relu(x @ W + b)))
    text = compile_source(g)
    assert re.search(r"np\.add\((\w+), b, out=\1\)", text), text
    d = lower_graph(g)
    plan = plan_memory(d.nodes, {d.loss_node}, lambda n: n.op == "ew" or n.op in ("add", "relu"))
    reused = set(plan.reuse.values())
    assert not reused & (set(d.inputs.values()) | set(d.params.values()))


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_optimised_equals_unoptimised_on_every_example(spec):
    fast = backcomp.build(spec, opt_level=1)
    slow = backcomp.build(spec, opt_level=0)
    p, i = random_params(fast, seed=3, scale=0.3), random_inputs(fast, batch=4, seed=3)
    if "labels" in i or any(fast.INPUT_KINDS[k] == "int" for k in i):
        for k, kind in fast.INPUT_KINDS.items():
            if kind == "int":
                i[k] = np.zeros_like(i[k])
    # models with random ops or buffers: the same draws and fresh buffers for both
    loss1, g1 = fast.value_and_grad(p, i, **fixed_draws(fast))
    loss0, g0 = slow.value_and_grad(p, i, **fixed_draws(slow))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-10)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-10, atol=1e-13, err_msg=k)
    out1, out0 = fast.forward(p, i, **fixed_draws(fast)), slow.forward(p, i, **fixed_draws(slow))
    for k in out0:
        np.testing.assert_allclose(out1[k], out0[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_differentiate_does_not_mutate_the_users_graph():
    g = mlp_graph()
    before = [(n.op, n.inputs) for n in g.nodes]
    differentiate(g)
    assert [(n.op, n.inputs) for n in g.nodes] == before


def test_results_never_share_memory_with_the_callers_arrays():
    """`x + 0` is just x after simplification: forward outputs and grads must still be copies."""
    g = backcomp.Graph("alias")
    x = g.input("x", (3,))
    W = g.param("W", (3,))
    g.output("same_as_x", x + 0)
    g.loss(ops.sum(x * W))
    m = backcomp.build(g)
    xs, ws = np.ones(3), np.full(3, 2.0)
    _, grads = m.value_and_grad({"W": ws}, {"x": xs})
    out = m.forward({"W": ws}, {"x": xs})
    assert not np.shares_memory(grads["W"], xs) and not np.shares_memory(out["same_as_x"], xs)
    grads["W"][:] = 7
    assert np.all(xs == 1)


def test_stability_report_knows_logsumexp_and_softmax_are_safe():
    """exp(x − max x), log Σ exp(x − max x) and exp(x − lse) cannot overflow or underflow."""
    g = backcomp.Graph("safe")
    x = g.input("x", ("B", 4))
    with g.scoped("p"):
        p = g.assign_name("p", ops.softmax(x, axis=-1))
    g.output("p", p)
    g.loss(ops.sum(ops.logsumexp(x, axis=-1)))
    assert stability_report(g) == []


# ----- keep_residuals: the backward reads the forward's transcendental calls ----------------
def _gelu_mlp(act):
    g = backcomp.Graph("res")
    x = g.input("x", ("B", 4))
    W = g.param("W", (4, 5))
    b = g.param("b", (5,))
    g.loss(ops.sum(act(x @ W + b) ** 2))
    return g


@pytest.mark.parametrize("act, call", [(ops.gelu, "_erf("), (lambda z: z * ops.sigmoid(z), "_sigmoid(")])
def test_backward_reuses_calls_inside_the_forward_expression(act, call):
    """GELU's Φ(x) and swish's σ(u) are computed once: the backward reads them."""
    src = compile_source(_gelu_mlp(act))
    vag = "\n".join(line for line in src[src.index("def value_and_grad"):].splitlines()
                    if not line.strip().startswith("#"))
    assert vag.count(call) == 1, vag
    m = backcomp.build(_gelu_mlp(act))
    p, i = random_params(m), random_inputs(m, batch=3)
    slow = backcomp.build(_gelu_mlp(act), opt_level=0)
    for k, v in m.value_and_grad(p, i)[1].items():
        np.testing.assert_allclose(v, slow.value_and_grad(p, i)[1][k], rtol=1e-12)


def test_a_call_around_a_kept_call_is_kept_too():
    """A GRU's candidate, (1 − z)·tanh(n + σ(r)·h) + z·h: σ(r) is kept first, and the
    tanh around it must then read the kept σ, not stay inline (it did: the backward
    computed tanh again, three times per step in a scan)."""
    g = backcomp.Graph("gru_cell")
    x = g.input("x", ("B", 4))
    Wn, Wr, Wz = (g.param(k, (4, 4)) for k in ("Wn", "Wr", "Wz"))
    h = g.param("h", (4,))
    z = ops.sigmoid(x @ Wz)
    out = (1 - z) * ops.tanh(x @ Wn + ops.sigmoid(x @ Wr) * h) + z * h
    g.loss(ops.sum(out * out))
    src = compile_source(g)
    vag = "\n".join(line for line in src[src.index("def value_and_grad"):].splitlines()
                    if not line.strip().startswith("#"))
    assert vag.count("np.tanh(") == 1, vag
    m = backcomp.build(g)
    p, i = random_params(m), random_inputs(m, batch=3)
    slow = backcomp.build(g, opt_level=0)
    for k, v in m.value_and_grad(p, i)[1].items():
        np.testing.assert_allclose(v, slow.value_and_grad(p, i)[1][k], rtol=1e-12)


def test_gelu_keeps_its_pre_activation_once():
    """erf(z/√2) and z·Φ(z) read one z = x·W + b: neither pass recomputes the sum."""
    src = compile_source(_gelu_mlp(ops.gelu))
    code = [line for line in src[src.index("def value_and_grad"):].splitlines()
            if not line.strip().startswith("#")]
    adds = sum(line.count("+ b") + line.count("np.add(_matmul, b,") for line in code)
    assert adds == 1, "\n".join(code)


def test_gelu_erf_gets_a_node_of_its_own():
    from backcomp.passes.residuals import keep_residuals
    kept = keep_residuals(_gelu_mlp(ops.gelu))
    assert [type(node_expr(n)).__name__ for n in kept.nodes if n.op == "ew"] == ["erf", "Mul"]


def test_forward_alone_fuses_the_kept_call_back():
    src = compile_source(_gelu_mlp(ops.gelu))
    fwd = src[src.index("def forward"):src.index("def value_and_grad")]
    assert fwd.count("_erf(") == 1


def test_constant_calls_are_not_residuals():
    """2 ** x differentiates to log(2)·2 ** x: log(2) is a number, not a node."""
    from backcomp.passes.residuals import keep_residuals
    g = backcomp.Graph("rpow")
    x = g.input("x", (3,))
    g.loss(ops.sum(2.0 ** x))
    assert [n.op for n in keep_residuals(g).nodes].count("ew") == 0


# ----- pool before activation ------------------------------------------------------------
@pytest.mark.parametrize("expr, monotone", [
    (lambda x, c: sp.Max(x + c, 0), True), (lambda x, c: sigmoid(x + c), True), (lambda x, c: sp.tanh(x), True),
    (lambda x, c: 2 * sp.exp(x) - c, True), (lambda x, c: sp.erf(x) + softplus(x), True),
    (lambda x, c: sp.Max(x, c), True), (lambda x, c: (x + c) ** 3, True), (lambda x, c: 0.1 * sp.Min(x, 0) + sp.Max(x, 0), True),
    (lambda x, c: x * c, False), (lambda x, c: -x, False), (lambda x, c: sp.log(x), False), (lambda x, c: sp.sqrt(x), False),
    (lambda x, c: x * sigmoid(x), False), (lambda x, c: x ** 2, False), (lambda x, c: sp.Max(-x, 0), False),
    # selects: continuous at a threshold on x (leaky_relu of x + c, elu, clip), or not
    (lambda x, c: sp.Piecewise((x + c, x + c > 0), (0.01 * (x + c), True)), True),
    (lambda x, c: sp.Piecewise((x, x > 0), (sp.exp(x) - 1, True)), True),
    (lambda x, c: sp.Piecewise((-1, x < -1), (6, x > 6), (x, True)), False),   # clip: flat branches tie values
    (lambda x, c: sp.Piecewise((x, x > 0)), False),                              # no default branch
    (lambda x, c: sp.Piecewise((0.1 * x, -x > 0), (x, True)), True),
    (lambda x, c: sp.Piecewise((x - 1, x > 0), (x, True)), False),          # jumps down at 0
    (lambda x, c: sp.Piecewise((x, x > 0), (-0.5 * x, True)), False),       # a negative slope
    (lambda x, c: sp.Piecewise((x, x > c), (x - 1, True)), False),          # a jump up: only continuity is proved
    (lambda x, c: sp.Piecewise((x, x * x > 1), (0, True)), False),          # not a threshold on x
], ids=lambda v: "" if callable(v) else str(v))
def test_nondecreasing_is_read_off_the_expression(expr, monotone):
    from backcomp.passes.pools import nondecreasing
    x, c = arg_symbol(0), arg_symbol(1)
    assert nondecreasing(expr(x, c), x) is monotone


def _conv_pool(act=ops.relu, bias_shape=(4, 1, 1), also_output=False, pool_padding=0):
    g = backcomp.Graph("cp")
    x = g.input("x", ("B", 2, 8, 8))
    K = g.param("K", (4, 2, 3, 3))
    c = g.param("c", bias_shape)
    h = act(ops.conv2d(x, K, padding=1) + c)
    h.name = "h"
    p = ops.max_pool2d(h, 2, padding=pool_padding)
    p.name = "p"
    if also_output:
        g.output("h", h)
    g.loss(ops.sum(ops.tanh(p) * p))
    return g


def _pool_input(g):
    """What the max pool reads once the forward is prepared (pools move there)."""
    (pool,) = [n for n in prepare_forward(g).nodes if n.op == "max_pool2d"]
    return pool.inputs[0]


def _same_at_O1_as_at_O0(g, params=None, inputs=None, seed=0, scale=0.5):
    """Loss and gradients of ``g`` at -O1 equal -O0's (random draws unless given)."""
    fast, slow = backcomp.build(g, opt_level=1), backcomp.build(g, opt_level=0)
    params = params or random_params(fast, seed=seed, scale=scale)
    inputs = inputs or random_inputs(fast, batch=2, seed=seed)
    l1, g1 = fast.value_and_grad(params, inputs)
    l0, g0 = slow.value_and_grad(params, inputs)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("act", [ops.relu, ops.sigmoid, ops.tanh, ops.softplus, lambda z: ops.leaky_relu(z, 0.1)],
                         ids=["relu", "sigmoid", "tanh", "softplus", "leaky_relu"])
def test_max_pool_goes_before_a_monotone_activation_and_the_gradient_is_unchanged(act):
    g = _conv_pool(act)
    text = compile_source(g)
    fwd = text.split("def value_and_grad")[1].split("_bar")[0]
    pool = re.search(r"(\w+) = np\.maximum\((\w+)\[:, :, 0:7:2, 0:7:2\]", fwd)
    assert pool and pool.group(2).endswith("conv2d"), fwd          # the pool reads the convolution itself
    assert re.search(rf"\bp = .*\b{pool.group(1)}\b.* \+ c|\bp = .*\bc \+ {pool.group(1)}\b", fwd), fwd
    rng = np.random.default_rng(0)
    p = {"K": rng.standard_normal((4, 2, 3, 3)), "c": rng.standard_normal((4, 1, 1))}
    x = rng.standard_normal((3, 2, 8, 8))
    x[0, :, :4, :4] = 0.0     # exact ties in every pool window there: still the first maximum
    _same_at_O1_as_at_O0(g, p, {"x": x})


@pytest.mark.parametrize("case", ["silu", "log", "clip", "bias (C, H, W)", "bias (H, W)", "bias (W,)", "bias (1, W)",
                                  "bias (H, 1)", "activation is an output"])
def test_max_pool_stays_after_what_it_does_not_commute_with(case):
    """Not monotone, not total, or an operand that varies over a window: NumPy aligns
    shapes from the right, so a (W,) or (H, W) bias varies over H or W."""
    kwargs = {"silu": {"act": lambda z: z * ops.sigmoid(z)}, "log": {"act": ops.log},
              "clip": {"act": lambda z: ops.clip(z, -0.5, 0.5)},
              "bias (C, H, W)": {"bias_shape": (4, 8, 8)}, "bias (H, W)": {"bias_shape": (8, 8)},
              "bias (W,)": {"bias_shape": (8,)}, "bias (1, W)": {"bias_shape": (1, 8)},
              "bias (H, 1)": {"bias_shape": (8, 1)},
              "activation is an output": {"also_output": True}}[case]
    g = _conv_pool(**kwargs)
    assert _pool_input(g).op != "conv2d", case
    if case.startswith("bias"):    # and the values are -O0's (they were not, for (W,) and (H, W))
        _same_at_O1_as_at_O0(g, seed=4, scale=1.0)


@pytest.mark.parametrize("level", [0, 1])
def test_a_clip_border_tie_keeps_its_gradient(level):
    """clip ties the border value 0.5 with the clamped 0.9; the first maximum, 0.5, sits on
    the border, where clip passes the gradient (as torch.clamp): dc = 3 at both levels
    (a pool moved before the clip gave 0; found by review)."""
    g = backcomp.Graph("clip_tie")
    x, c = g.input("x", ("B", 1, 2, 2)), g.param("c", (1, 1, 1))
    g.loss(ops.sum(3.0 * ops.max_pool2d(ops.clip(x + c, -0.5, 0.5), 2)))
    m = backcomp.build(g, opt_level=level)
    loss, grads = m.value_and_grad({"c": np.zeros((1, 1, 1))}, {"x": np.array([[[[0.5, 0.9], [-1.0, 0.2]]]])})
    assert float(loss) == 1.5 and grads["c"].item() == 3.0


def test_padded_max_pool_commutes_too():
    g = _conv_pool(pool_padding=1)
    assert _pool_input(g).op == "conv2d"
    _same_at_O1_as_at_O0(g, seed=1, scale=0.5)


@pytest.mark.parametrize("level", [0, 1])
def test_an_in_place_chain_never_writes_a_buffer_another_operand_reads(level):
    """a - stop_gradient(a) + a: stop_gradient(a) is a's buffer under another name, and the
    chain np.multiply(a, 2, out=a); np.subtract(a, a, out=a) gave 0 at -O1 (found by review)."""
    g = backcomp.Graph("sg_alias")
    x, W = g.input("x", ("B", 3)), g.param("W", (3, 4))
    a = ops.tanh(x @ W)
    y = a - ops.stop_gradient(a) + a
    g.output("y", y)
    g.loss(ops.sum(y * y))
    rng = np.random.default_rng(0)
    params, inputs = {"W": rng.standard_normal((3, 4))}, {"x": rng.standard_normal((2, 3))}
    m = backcomp.build(g, opt_level=level)
    a_value = np.tanh(inputs["x"] @ params["W"])
    np.testing.assert_allclose(m.forward(params, inputs)["y"], a_value, rtol=1e-14)
    loss, grads = m.value_and_grad(params, inputs)
    np.testing.assert_allclose(loss, np.sum(a_value ** 2), rtol=1e-14)
    # d/dW sum(y²) with y = 2a − sg(a): 2y·2·(1 − a²) through a only
    np.testing.assert_allclose(grads["W"], inputs["x"].T @ (4 * a_value * (1 - a_value ** 2)), rtol=1e-12)


# ----- reuse_values: a fused expression reads what a node already holds ---------------------
def _attention(scale=0.5):
    g = backcomp.Graph("att")
    x = g.input("x", ("B", 5, 4))
    Wq = g.param("Wq", (4, 4))
    Wk = g.param("Wk", (4, 4))
    att = g.assign_name("att", ops.softmax((x @ Wq) @ ops.transpose(x @ Wk, (0, 2, 1)) * scale, axis=-1))
    g.loss(ops.sum(ops.tanh(att @ x)))
    return g


def test_softmax_backward_reads_the_forward_softmax_instead_of_dividing_again():
    """scale·e·(ḡ − s)/Σe contains the forward's e/Σe: one division, in the forward."""
    text = compile_source(_attention())
    vag = "\n".join(line for line in text[text.index("def value_and_grad"):].splitlines()
                    if not line.strip().startswith("#"))
    assert len(re.findall(r"np\.divide\(\w+, _sum\b|/\s*_sum\b", vag)) == 1, vag
    _same_at_O1_as_at_O0(_attention())


def test_reuse_never_finds_a_value_by_algebra():
    """exp(x/2) is not √(eˣ): reading exp(x)'s node there would overflow where e^(x/2) does not."""
    from backcomp.passes.reuse import _replace_exactly
    x, y, z, s = sp.symbols("x y z s", real=True)
    assert _replace_exactly(sp.exp(x / 2) * y, sp.exp(x), s) == sp.exp(x / 2) * y
    assert _replace_exactly(3 * x * y * z / (1 + x), x * y, s) == 3 * s * z / (1 + x)
    assert _replace_exactly(sp.tanh(x + y + z), x + z, s) == sp.tanh(s + y)
    # y/x stays a division: y·(1/x) overflows for a subnormal x where y/x does not
    assert _replace_exactly(y / x, 1 / x, s) == y / x and _replace_exactly(y + 1 / x, 1 / x, s) == y + s
    g = backcomp.Graph("halves")
    v = g.input("v", ("B",))
    w = g.param("w", ())
    lv = v * w
    g.loss(ops.sum(ops.exp(lv)) + ops.sum(ops.exp(lv * 0.5)))
    assert "**0.5" not in compile_source(g) and "np.sqrt" not in compile_source(g)
    _same_at_O1_as_at_O0(g)


def test_reuse_reads_only_what_value_and_grad_computes_anyway():
    """σ(z) as an output beside a BCE loss on z: the backward's σ(z) − y stays where it
    was (in place, in the backward), not an early read of the output into a new array;
    and a loop's step is left alone (a value read only there would become a stack)."""
    g = backcomp.Graph("bce_out")
    x = g.input("x", ("B", 3))
    t = g.input("t", ("B",))
    w = g.param("w", (3,))
    z = g.assign_name("z", ops.matmul(x, w))
    g.output("y", ops.sigmoid(z))
    g.loss(ops.mean(ops.sigmoid_binary_cross_entropy(z, t)))
    text = compile_source(g)
    vag = text[text.index("def value_and_grad"):]
    assert "y = " not in vag and vag.count("_sigmoid(") == 1, vag
    lstm = (Path(__file__).parent.parent / "examples" / "lstm.toml").read_text()
    carry_only = re.sub(r'(?m)^loss = ".*"$', 'loss = "sum(run.carry[0])"', lstm.split("[graph]")[-1])
    spec = lstm.split("[graph]")[0].replace("[model]", '[model]\nname = "lstm_carry"', 1) + "[graph]" + carry_only
    vag = compile_source(parse_spec(spec))
    vag = vag[vag.index("def value_and_grad"):]
    # h's stack is the (T+1)-row carry buffer; nothing stacks h_new a second time
    assert "h_buf = np.empty" in vag and "h_new_seq" not in vag, vag


def test_array_operations_counts_what_the_emission_writes():
    """Scored after factoring and CSE, as _emit prints: x·y·z − x·y·w is x·y·(z − w)."""
    from backcomp.ops.elementwise import array_operations
    x, y, z, w = sp.symbols("x y z w", real=True)
    assert sp.count_ops(x * y * z - x * y * w) == 5 and array_operations(x * y * z - x * y * w) == 3
    assert array_operations(sp.exp(x) * y + sp.exp(x) * z) == 3
