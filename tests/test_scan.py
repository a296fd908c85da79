"""Loops: ``scan`` compiles to one Python loop, and its gradients are BPTT.

Covers the ops ``scan`` and ``scan_out`` (forward, VJP and JVP rules) and the VJP
bookkeeping ops ``tuple_ct`` and ``tuple_ct_sum``; recurrent cells are checked against
``torch.nn`` with copied weights (float64, rtol 1e-10) and against finite differences.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.graph import Graph, GraphError, ShapeError

from conftest import gradcheck

torch = pytest.importorskip("torch")

B, T, D, H = 3, 5, 4, 6


def rnn_graph(name="rnn", loss_on=("ys", "carry")):
    """An Elman RNN (tanh) over x (B, T, D), as torch.nn.RNN with batch_first."""
    g = Graph(name)
    x = g.input("x", ("B", "T", D))
    Wx, Wh, b = g.param("Wx", (D, H)), g.param("Wh", (H, H)), g.param("b", (H,))

    def cell(h, x_t):
        h_new = ops.tanh(x_t @ Wx + h @ Wh + b)
        return h_new, h_new

    run = g.scan(cell, ops.zeros(("B", H), graph=g), x, axis=1, name="cell")
    hs = g.output("hs", run.ys)
    terms = []
    if "ys" in loss_on:
        terms.append(ops.sum(hs * hs))
    if "carry" in loss_on:
        terms.append(ops.sum(run.carry))
    loss = terms[0]
    for t in terms[1:]:
        loss = loss + t
    g.loss(loss, "loss")
    return g


def _params(module, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v) * scale for k, v in module.PARAMS.items()}


def _torch_rnn(p):
    rnn = torch.nn.RNN(D, H, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.tensor(p["Wx"].T))
        rnn.weight_hh_l0.copy_(torch.tensor(p["Wh"].T))
        rnn.bias_ih_l0.copy_(torch.tensor(p["b"]))
        rnn.bias_hh_l0.zero_()
    return rnn


def test_rnn_matches_torch_outputs_and_gradients():
    m = backcomp.build(rnn_graph())
    p = _params(m)
    x = np.random.default_rng(1).normal(size=(B, T, D))
    loss, grads = m.value_and_grad(p, {"x": x})
    rnn = _torch_rnn(p)
    out, hn = rnn(torch.tensor(x))
    ref = (out * out).sum() + hn.sum()
    ref.backward()
    np.testing.assert_allclose(m.forward(p, {"x": x})["hs"], out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-10)
    np.testing.assert_allclose(grads["Wx"], rnn.weight_ih_l0.grad.numpy().T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["Wh"], rnn.weight_hh_l0.grad.numpy().T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["b"], rnn.bias_ih_l0.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_on", [("ys",), ("carry",), ("ys", "carry")])
def test_rnn_gradients_match_finite_differences(loss_on):
    gradcheck(rnn_graph(loss_on=loss_on))


def _loops(text: str, function: str) -> list[str]:
    body = text.split(f"\ndef {function}(")[1].split("\ndef ")[0]
    return re.findall(r"^\s*for \w+ in range\((.*)\):$", body, flags=re.M)


def test_one_loop_forward_one_reversed_loop_backward_and_size_independent_of_T():
    text = backcomp.compile_source(rnn_graph())
    assert _loops(text, "forward") == ["T"]
    assert _loops(text, "value_and_grad") == ["T", "T - 1, -1, -1"]
    # residuals are preallocated (T, ...) arrays, written per step; no Python lists
    assert re.search(r"= np\.empty\(\(T, B, 6\), dtype=", text)
    assert ".append(" not in text
    # the same module runs any T
    m = backcomp.build(rnn_graph())
    p = _params(m)
    for steps in (1, 5, 50):
        x = np.random.default_rng(steps).normal(size=(2, steps, D))
        out = m.forward(p, {"x": x})["hs"]
        assert out.shape == (2, steps, H)
        h = np.zeros((2, H))
        for t in range(steps):
            h = np.tanh(x[:, t] @ p["Wx"] + h @ p["Wh"] + p["b"])
            np.testing.assert_allclose(out[:, t], h, rtol=1e-12)


def test_forward_keeps_the_dtype_and_compiles_at_O0():
    for level in (0, 1):
        m = backcomp.build(rnn_graph(), opt_level=level)
        p = {k: v.astype(np.float32) for k, v in _params(m).items()}
        x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
        out = m.forward(p, {"x": x})["hs"]
        loss, grads = m.value_and_grad(p, {"x": x})
        assert out.dtype == np.float32 and loss.dtype == np.float32
        assert all(v.dtype == np.float32 for v in grads.values())
        ref = backcomp.build(rnn_graph(), opt_level=1 - level)
        np.testing.assert_allclose(ref.value_and_grad(p, {"x": x})[0], loss, rtol=1e-5)


def test_stacked_and_parallel_scans():
    """A scan over the outputs of another, and an independent scan beside them, in one loss."""
    g = Graph("stacked")
    x = g.input("x", ("B", "T", D))
    W1, U1 = g.param("W1", (D, H)), g.param("U1", (H, H))
    W2, U2 = g.param("W2", (H, 3)), g.param("U2", (3, 3))
    V = g.param("V", (D, 2))
    first = g.scan(lambda h, x_t: (lambda n: (n, n))(ops.tanh(x_t @ W1 + h @ U1)),
                   ops.zeros(("B", H), graph=g), x, axis=1, name="layer1")
    second = g.scan(lambda h, x_t: (lambda n: (n, n))(ops.sigmoid(x_t @ W2 + h @ U2)),
                    ops.zeros(("B", 3), graph=g), first.ys, axis=1, name="layer2")
    side = g.scan(lambda s, x_t: (s + x_t @ V, None), ops.zeros(("B", 2), graph=g), x, axis=1, name="running_sum")
    g.loss(ops.sum(second.ys ** 2) + ops.sum(ops.sin(side.carry)) + ops.mean(first.carry), "loss")
    gradcheck(g)
    assert len(_loops(backcomp.compile_source(g), "value_and_grad")) == 6


def test_reverse_scan_and_several_carries_and_sequences():
    g = Graph("multi")
    x = g.input("x", ("B", "T", D))
    u = g.input("u", ("T", "B", 2))
    W = g.param("W", (D, 2))
    a = g.param("a", (2,))

    def step(carry, xs):
        s, q = carry
        x_t, u_t = xs
        s_new = s * ops.tanh(x_t @ W) + u_t * a
        q_new = q + ops.sum(s_new * s_new, axis=1, keepdims=True)
        return (s_new, q_new), (s_new, q_new * 2)

    run = g.scan(step, (ops.ones(("B", 2), graph=g), ops.zeros(("B", 1), graph=g)),
                 (ops.transpose(x, (1, 0, 2)), u), axis=0, reverse=True, name="back")
    ys0, ys1 = run.ys
    assert ys0.shape == ("T", "B", 2) and ys1.shape == ("T", "B", 1)
    g.loss(ops.sum(ys0 * ys1) + ops.sum(run.carry[1]), "loss")
    gradcheck(g)


def test_nested_scan():
    """A scan inside a step: an inner loop over the features of each time step."""
    g = Graph("nested")
    x = g.input("x", ("B", "T", D))
    w = g.param("w", (H,))
    W = g.param("W", (H, H))

    def inner(acc, x_f):   # x_f: (B,)
        return ops.tanh(acc * w + ops.reshape(x_f, ("B", 1))), None

    def outer(h, x_t):     # x_t: (B, D)
        run = g.scan(inner, h, x_t, axis=1, name="inner")
        h_new = ops.tanh(run.carry @ W)
        return h_new, h_new

    run = g.scan(outer, ops.zeros(("B", H), graph=g), x, axis=1, name="outer")
    g.loss(ops.sum(run.ys ** 2), "loss")
    gradcheck(g)


def test_steps_capture_model_values_as_inputs_of_the_scan():
    g = rnn_graph()
    scan = next(n for n in g.nodes if n.op == "scan")
    assert [x.name for x in scan.inputs[2:]] == ["Wx", "Wh", "b"]
    step = scan.attrs["step"]
    assert [c.name for c in step.consts] == ["Wx", "Wh", "b"]
    assert [c.name for c in step.carry] == ["carry"] and [c.name for c in step.xs] == ["x_t"]


def test_scan_errors():
    g = Graph("bad")
    x = g.input("x", ("B", "T", D))
    W = g.param("W", (D, H))
    with pytest.raises(ShapeError, match="returns carry .* with shape \\(B, 4\\), but it starts with shape \\(B, 6\\)"):
        g.scan(lambda h, x_t: (x_t, None), ops.zeros(("B", H), graph=g), x, axis=1)
    with pytest.raises(GraphError, match="returns 2 carries, but the loop starts with 1"):
        g.scan(lambda h, x_t: ((h, h), None), ops.zeros(("B", H), graph=g), x, axis=1)
    with pytest.raises(ShapeError, match="different lengths"):
        g.scan(lambda h, xs: (h, None), ops.zeros(("B", H), graph=g), (x, g.input("y", ("B", 7, D))), axis=1)
    with pytest.raises(ShapeError, match="axis 3 is out of range"):
        g.scan(lambda h, x_t: (h, None), ops.zeros(("B", H), graph=g), x, axis=3)
    with pytest.raises(GraphError, match="must return \\(new_carry, ys\\)"):
        g.scan(lambda h, x_t: h, ops.zeros(("B", H), graph=g), x, axis=1)
    assert W is not None


def test_check_finite_reaches_inside_the_loop():
    m = backcomp.build(rnn_graph(), check_finite=True)
    p = _params(m)
    p["Wh"][0, 0] = np.nan
    with pytest.raises(FloatingPointError):
        m.forward(p, {"x": np.ones((B, T, D))})


def test_train_step_with_a_loop():
    m = backcomp.build(rnn_graph(loss_on=("ys",)), optimizer="adam")
    p = _params(m, scale=0.3)
    state = m.init_state(p)
    x = np.random.default_rng(0).normal(size=(B, T, D))
    first = float(m.value_and_grad(p, {"x": x})[0])
    for _ in range(30):
        m.train_step(p, {"x": x}, state, lr=0.05)
    assert float(m.value_and_grad(p, {"x": x})[0]) < 0.5 * first


#: graphs whose forward-mode pass reaches scan and scan_out with tangents (test_jvp)
JVP_GRAPHS = {"rnn": rnn_graph}


def test_jvp_and_hvp_through_a_loop():
    m = backcomp.build(rnn_graph(), emit="jvp,hvp")
    p = _params(m)
    x = np.random.default_rng(1).normal(size=(B, T, D))
    rng = np.random.default_rng(5)
    v = {k: rng.normal(size=a.shape) for k, a in p.items()}
    eps = 1e-6
    plus = {k: p[k] + eps * v[k] for k in p}
    minus = {k: p[k] - eps * v[k] for k in p}
    _, tangents = m.jvp(p, {"x": x}, v)
    fd = (m.forward(plus, {"x": x})["hs"] - m.forward(minus, {"x": x})["hs"]) / (2 * eps)
    np.testing.assert_allclose(tangents["hs"], fd, rtol=1e-6, atol=1e-8)
    hv = m.hvp(p, {"x": x}, v)
    g_plus, g_minus = m.value_and_grad(plus, {"x": x})[1], m.value_and_grad(minus, {"x": x})[1]
    for k in p:
        np.testing.assert_allclose(hv[k], (g_plus[k] - g_minus[k]) / (2 * eps), rtol=1e-6, atol=1e-7)
    text = backcomp.compile_source(rnn_graph(), emit="jvp,hvp")
    assert _loops(text, "jvp") == ["T"]   # the JVP scan replaces the primal one


def test_loops_are_refused_by_the_batch_analysis():
    m = backcomp.build(rnn_graph())
    assert m.BATCH_SEPARABLE is False and "scan" in m.BATCH_REFUSAL


# ----- specs: [steps] and scan(...) -----------------------------------------------------
from pathlib import Path  # noqa: E402

from backcomp.spec import parse_spec  # noqa: E402
from backcomp.spec.text import SpecError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

LSTM_SPEC = """
[model]
loss = "loss"
outputs = ["hs", "h_last", "c_last"]
[inputs]
x = ["B", "T", {D}]
u = ["B", "T", {H}]
v = ["B", {H}]
w = ["B", {H}]
[params]
Wx = [{D}, {H4}]
Wh = [{H}, {H4}]
bx = [{H4}]
bh = [{H4}]
[constants]
H = {H}
[steps.lstm]
carry = ["h", "c"]
xs = ["x_t"]
[steps.lstm.graph]
z = "x_t @ Wx + h @ Wh + bx + bh"
c_new = "sigmoid(z[:, H:2*H]) * c + sigmoid(z[:, :H]) * tanh(z[:, 2*H:3*H])"
h_new = "sigmoid(z[:, 3*H:]) * tanh(c_new)"
[steps.lstm.returns]
carry = ["h_new", "c_new"]
ys = ["h_new"]
[graph]
run = "scan(lstm, (zeros((B, H)), zeros((B, H))), x, axis=1)"
hs = "run.ys[0]"
h_last = "run.carry[0]"
c_last = "run.carry[1]"
loss = "sum(hs * u) + sum(h_last * v) + sum(c_last * w)"
""".format(D=D, H=H, H4=4 * H)

GRU_SPEC = """
[model]
loss = "loss"
outputs = ["hs", "h_last"]
[inputs]
x = ["B", "T", {D}]
u = ["B", "T", {H}]
v = ["B", {H}]
[params]
Wx = [{D}, {H3}]
Wh = [{H}, {H3}]
bx = [{H3}]
bh = [{H3}]
[constants]
H = {H}
[steps.gru]
carry = ["h"]
xs = ["x_t"]
[steps.gru.graph]
gx = "x_t @ Wx + bx"
gh = "h @ Wh + bh"
r = "sigmoid(gx[:, :H] + gh[:, :H])"
z = "sigmoid(gx[:, H:2*H] + gh[:, H:2*H])"
n = "tanh(gx[:, 2*H:] + r * gh[:, 2*H:])"
h_new = "(1 - z) * n + z * h"
[steps.gru.returns]
carry = ["h_new"]
ys = ["h_new"]
[graph]
run = "scan(gru, zeros((B, H)), x, axis=1)"
hs = "run.ys[0]"
h_last = "run.carry[0]"
loss = "sum(hs * u) + sum(h_last * v)"
""".format(D=D, H=H, H3=3 * H)


def _torch_cell(kind, p):
    cell = getattr(torch.nn, kind)(D, H, batch_first=True).double()
    with torch.no_grad():
        cell.weight_ih_l0.copy_(torch.tensor(p["Wx"].T))
        cell.weight_hh_l0.copy_(torch.tensor(p["Wh"].T))
        cell.bias_ih_l0.copy_(torch.tensor(p["bx"]))
        cell.bias_hh_l0.copy_(torch.tensor(p["bh"]))
    return cell


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_spec_cells_match_torch(kind):
    m = backcomp.build(parse_spec(LSTM_SPEC if kind == "LSTM" else GRU_SPEC, f"{kind.lower()}.toml"))
    p = _params(m, seed=3)
    rng = np.random.default_rng(4)
    inputs = {k: rng.normal(size=tuple(B if d == "B" else T if d == "T" else d for d in shape))
              for k, shape in m.INPUTS.items()}
    out = m.forward(p, inputs)
    loss, grads = m.value_and_grad(p, inputs)
    cell = _torch_cell(kind, p)
    hs, state = cell(torch.tensor(inputs["x"]))
    ref = (hs * torch.tensor(inputs["u"])).sum()
    if kind == "LSTM":
        h_n, c_n = state
        ref = ref + (h_n[0] * torch.tensor(inputs["v"])).sum() + (c_n[0] * torch.tensor(inputs["w"])).sum()
        np.testing.assert_allclose(out["c_last"], c_n[0].detach().numpy(), rtol=1e-10, atol=1e-12)
    else:
        h_n = state
        ref = ref + (h_n[0] * torch.tensor(inputs["v"])).sum()
    ref.backward()
    np.testing.assert_allclose(out["hs"], hs.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["h_last"], h_n[0].detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-10)
    expected = {"Wx": cell.weight_ih_l0.grad.numpy().T, "Wh": cell.weight_hh_l0.grad.numpy().T,
                "bx": cell.bias_ih_l0.grad.numpy(), "bh": cell.bias_hh_l0.grad.numpy()}
    for k, v in expected.items():
        np.testing.assert_allclose(grads[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("spec", [LSTM_SPEC, GRU_SPEC], ids=["lstm", "gru"])
def test_spec_cells_match_finite_differences(spec):
    gradcheck(parse_spec(spec, "cell.toml"))


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_example_specs_are_a_dozen_lines_and_compile_to_a_loop(name):
    path = EXAMPLES / f"{name}.toml"
    text = path.read_text()
    step = text[text.index("[steps."):text.index("[graph]")]
    assert len([ln for ln in step.splitlines() if ln.strip() and not ln.startswith("#")]) <= 14
    source = backcomp.compile_source(path)
    assert _loops(source, "forward") == ["T"]
    assert _loops(source, "value_and_grad") == ["T", "T - 1, -1, -1"]
    gradcheck(parse_spec(text, str(path)))


def _spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as e:
        parse_spec(text, "bad.toml")
    return e.value


_BASE = LSTM_SPEC


@pytest.mark.parametrize("edit, message, line", [
    (("scan(lstm,", "scan(lstn,"), "unknown step 'lstn' in node 'run' (did you mean 'lstm'?)", "run = "),
    (("(zeros((B, H)), zeros((B, H))), x", "zeros((B, H)), x"),
     "step 'lstm' has 2 carries (h, c), but scan() gives 1 initial value", "run = "),
    (("zeros((B, H)), zeros((B, H)))", "zeros((B, H)), zeros((B, 1)))"),
     "returns carry 'c' with shape (B, 6), but it starts with shape (B, 1)", 'carry = ["h_new", "c_new"]'),
    (('carry = ["h_new", "c_new"]', 'carry = ["h_new", "z"]'),
     "returns carry 'c' with shape (B, 24), but it starts with shape (B, 6)", 'carry = ["h_new", "z"]'),
    (('carry = ["h_new", "c_new"]', 'carry = ["h_new"]'), "step 'lstm' returns 1 carry, but takes 2 (h, c)",
     'carry = ["h_new"]'),
    (('ys = ["h_new"]', 'ys = ["h_nwe"]'), "step 'lstm' returns 'h_nwe', which is not one of its names", 'ys = '),
    (("x, axis=1)", "(x, x), axis=1)"), "step 'lstm' takes 1 slice (x_t), but scan() gives 2 sequences", "run = "),
    (("x, axis=1)", "x, axis=3)"), "axis 3 is out of range", "run = "),
    (('hs = "run.ys[0]"', 'hs = "run.ys[1]"'), "run.ys[1] is out of range: step 'lstm' has 1 per-step output",
     'hs = '),
    (('hs = "run.ys[0]"', 'hs = "run + 1"'), "'run' is the result of scan(): read its parts as run.carry[i]",
     'hs = '),
    (('z = "x_t @ Wx', 'z = "x_t @ Wq'), "undefined name 'Wq'", 'z = '),
    (('xs = ["x_t"]', 'xs = ["x"]'), "'x' in step 'lstm' has the name of a value in [inputs]", 'xs = '),
])
def test_spec_errors_are_located(edit, message, line):
    old, new = edit
    assert old in _BASE
    text = _BASE.replace(old, new, 1)
    err = _spec_error(text)
    assert message in str(err), str(err)
    expected_line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith(line))
    assert err.line == expected_line, (str(err), expected_line)


def test_a_step_reads_graph_nodes_and_several_scans_chain():
    text = """
[model]
loss = "loss"
[inputs]
x = ["B", "T", 3]
[params]
W = [3, 4]
U = [4, 4]
V = [4, 2]
[steps.cell]
carry = ["h"]
xs = ["x_t"]
[steps.cell.graph]
h_new = "tanh(x_t @ W + h @ U + offset)"
[steps.cell.returns]
carry = ["h_new"]
ys = ["h_new"]
[steps.small]
carry = ["s"]
xs = ["e_t"]
[steps.small.graph]
s_new = "s * 0.5 + e_t @ V"
[steps.small.returns]
carry = ["s_new"]
ys = ["s_new"]
[graph]
loss = "sum(second.ys[0] ** 2) + sum(first.carry[0])"
second = "scan(small, zeros((B, 2)), first.ys[0], axis=1)"
first = "scan(cell, zeros((B, 4)), x, axis=1)"
offset = "sum(W, axis=0) * 0.1"
"""
    g = parse_spec(text, "chain.toml")
    assert sum(n.op == "scan" for n in g.nodes) == 2
    gradcheck(g)


def test_carry_independent_work_is_hoisted_and_gradient_terms_sunk():
    """x_t @ Wx for every t is one GEMM before the loop; Σ_t h_tᵀ ḡ_z[t] one contraction after."""
    text = backcomp.compile_source(parse_spec(LSTM_SPEC, "lstm.toml"))
    fwd = text.split("\ndef forward(")[1].split("\ndef ")[0]
    loop = fwd[fwd.index("for t in"):]
    before = fwd[:fwd.index("for t in")]
    assert re.search(r"= \w+\.reshape\(\(B\*T, 4\)\)", before) and "@ Wx" in before
    assert "@ Wx" not in loop and "@ Wh" in loop
    grad = text.split("\ndef value_and_grad(")[1].split("\ndef ")[0]
    back = grad[grad.index("for t in range(T - 1"):]
    back_loop = back[:back.index("\n    run_bar")] if "\n    run_bar" in back else back
    assert "@ WhT" in back_loop                                 # the carry's cotangent: in the loop,
    assert "WhT = np.ascontiguousarray(Wh.T)" in grad[:grad.index("for t in range(T - 1")]   # Whᵀ laid out once
    assert re.search(r"Wx_bar = \w+\.T @ \w+", back) and re.search(r"Wh_bar = \w+\.T @ \w+", back)


def test_explain_shows_the_step_vjps_and_the_carry_recurrence():
    from backcomp.explain import explain
    text = explain(parse_spec((EXAMPLES / "lstm.toml").read_text(), "lstm.toml"))
    assert "hs = transpose(run.ys[0], (1, 0, 2))    # shape (B, T, 16)" in text   # run.ys[0]: the (T, B, 16) stack
    assert "ḡ_run.ys[0] = transpose(ḡ_hs, (1, 0, 2))" in text   # the ḡ the step block reads (it had none)
    assert "step lstm (carry h, c; slices x_t), run by run, at step t:" in text
    assert "ḡ_h = ḡ_z · Whᵀ" in text and "ḡ_Wh = hᵀ · ḡ_z" in text
    assert "ḡ_h_new[t] = ḡ_h[t+1] + ḡ_ys0[t]" in text
    assert "ḡ_h[t] = (ḡ_z · Whᵀ)[t]" in text   # h[t]: the carry into step t (it said ḡ_h[t-1])
    assert "ḡ_Wh[t] = (hᵀ · ḡ_z)[t]    (summed on run's line)" in text and "    ḡ_Wh = Σ_t ḡ_Wh[t]" in text
    module_text = backcomp.compile_source(EXAMPLES / "lstm.toml")
    assert "ḡ_h[t] = (ḡ_z · Whᵀ)[t]" in module_text   # the module's docstring too
    assert "ḡ_run.init[0] = ḡ_h[0]    (the carry into the first step)" in text


def test_graph_draws_each_loop_as_one_cluster():
    from backcomp.explain import to_dot
    g = parse_spec((EXAMPLES / "lstm.toml").read_text(), "lstm.toml")
    dot = to_dot(g)
    assert dot.count("subgraph cluster_") == 1 and 'label="loop lstm: run"' in dot
    assert "style=dashed" in dot   # the new carries feed the next step
    backward = to_dot(g, backward=True)
    assert backward.count("subgraph cluster_") == 2   # the forward loop and the reversed one


# ----- hypothesis: random steps, the loop against the same step unrolled -------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_UNARY = {"tanh": ops.tanh, "sin": ops.sin, "sigmoid": ops.sigmoid, "half_square": lambda a: a * a * 0.5}
_BINARY = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b, "sub": lambda a, b: a - b}


@st.composite
def step_programs(draw):
    """A step as instructions over a stack of (B, 3) values: h, x_t @ W, h @ U, v."""
    n = draw(st.integers(2, 7))
    prog = []
    for _ in range(n):
        if draw(st.booleans()):
            prog.append(("unary", draw(st.sampled_from(sorted(_UNARY))), draw(st.integers(0, 10))))
        else:
            prog.append(("binary", draw(st.sampled_from(sorted(_BINARY))), draw(st.integers(0, 10)),
                         draw(st.integers(0, 10))))
    return prog, draw(st.integers(0, 10)), draw(st.booleans())


def _run_program(program, h, x_t, W, U, v):
    prog, out_pick, _ = program
    stack = [h, x_t @ W, h @ U, v + 0 * h]
    for ins in prog:
        if ins[0] == "unary":
            stack.append(_UNARY[ins[1]](stack[ins[2] % len(stack)]))
        else:
            stack.append(_BINARY[ins[1]](stack[ins[2] % len(stack)], stack[ins[3] % len(stack)]))
    h_new = ops.tanh(stack[-1])   # bounded, so long loops stay finite
    return h_new, stack[out_pick % len(stack)]


def _program_graph(program, loop: bool, steps: int = 4):
    g = Graph("prog_loop" if loop else "prog_unrolled")
    x = g.input("x", ("B", steps, 2))
    W, U, v = g.param("W", (2, 3)), g.param("U", (3, 3)), g.param("v", (3,))
    h0 = ops.zeros(("B", 3), graph=g)
    reverse = program[2]
    if loop:
        run = g.scan(lambda h, x_t: _run_program(program, h, x_t, W, U, v), h0, x, axis=1, reverse=reverse)
        ys, last = run.ys, run.carry
    else:
        h, outs = h0, [None] * steps
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            h, outs[t] = _run_program(program, h, x[:, t, :], W, U, v)
        ys, last = ops.concatenate([ops.reshape(o, ("B", 1, 3)) for o in outs], axis=1), h
    g.loss(ops.sum(ops.sin(ys)) + ops.sum(last * last), "loss")
    return g


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(step_programs())
def test_random_steps_match_the_unrolled_graph(program):
    loop, unrolled = backcomp.build(_program_graph(program, True)), backcomp.build(_program_graph(program, False))
    rng = np.random.default_rng(0)
    p = {k: rng.normal(size=v) * 0.7 for k, v in loop.PARAMS.items()}
    x = {"x": rng.normal(size=(3, 4, 2))}
    loss, grads = loop.value_and_grad(p, x)
    ref_loss, ref = unrolled.value_and_grad(p, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_final_carry_does_not_share_the_stacked_outputs_buffer(kind):
    """h_new is written straight into its row of hs: the final carry is a copy of the
    last row, so the two returned arrays never alias."""
    m = backcomp.build(parse_spec(LSTM_SPEC if kind == "LSTM" else GRU_SPEC, f"{kind.lower()}.toml"))
    rng = np.random.default_rng(5)
    inputs = {k: rng.normal(size=tuple(B if d == "B" else T if d == "T" else d for d in shape))
              for k, shape in m.INPUTS.items()}
    out = m.forward(_params(m, seed=5), inputs)
    assert not np.shares_memory(out["h_last"], out["hs"])
    np.testing.assert_array_equal(out["h_last"], out["hs"][:, -1])
    out["h_last"][...] = 0
    assert np.all(out["hs"][:, -1] != 0)


def test_gate_cotangents_are_written_into_the_stacked_rows():
    """The backward loops build the gates' cotangent in its stack's row, parts by out= into
    their columns where they can, without zero-filled scatters (a GRU's r and z
    cotangents feed both x_t @ Wx and h @ Wh, yet become concatenations)."""
    lstm = backcomp.compile_source(parse_spec(LSTM_SPEC, "lstm.toml"))
    grad = lstm.split("\ndef value_and_grad(")[1].split("\ndef ")[0]
    back = grad[grad.index("for t in range(T - 1"):]
    assert "np.zeros" not in back and "scatter" not in back
    assert re.search(r"= z_bar_concatenate_seq\[t, :, \d+:\d+\]", back)
    gru = backcomp.compile_source(parse_spec(GRU_SPEC, "gru.toml"))
    grad = gru.split("\ndef value_and_grad(")[1].split("\ndef ")[0]
    back = grad[grad.index("for t in range(T - 1"):]
    assert "np.zeros" not in back and "scatter" not in back
    assert re.search(r"= \w+_seq\[t, :, \d+:\d+\]", back)


def test_sigmoids_of_adjacent_gate_slices_are_one_statement():
    """σ(z[:, :H]) and σ(z[:, H:2H]) (LSTM i, f; GRU r, z) are one _sigmoid call on the
    joined slice, stored as one residual; the values still match torch (above)."""
    for spec, name in ((LSTM_SPEC, "lstm.toml"), (GRU_SPEC, "gru.toml")):
        text = backcomp.compile_source(parse_spec(spec, name))
        grad = text.split("\ndef value_and_grad(")[1].split("\ndef ")[0]
        loop = grad[grad.index("for t in range(T):"):grad.index("for t in range(T - 1")]
        assert loop.count("_sigmoid(") == (2 if name == "lstm.toml" else 1), name


def test_merge_sliced_elementwise_joins_only_adjacent_slices():
    from backcomp.ops.elementwise import node_expr
    from backcomp.ops.registry import get_op
    from backcomp.passes.loops import merge_sliced_elementwise
    g = parse_spec(LSTM_SPEC, "lstm.toml")
    step = [n for n in g.nodes if n.op == "scan"][0].attrs["step"].as_graph()
    merged = merge_sliced_elementwise(step)
    sig = [n for n in merged.nodes if n.op not in ("input", "param") and get_op(n.op).elementwise
           and "sigmoid" in str(node_expr(n))]
    assert sorted(n.shape[1] for n in sig) == [H, 2 * H]     # i and f joined; o (after g) alone
    assert merge_sliced_elementwise(merged) is merged        # nothing left to join


def test_a_stored_carry_is_computed_into_its_stack():
    """The LSTM's backward needs c at every step: c_new is computed into row t+1 of a
    (T+1, B, H) buffer whose first T rows are that residual, instead of copied there;
    h, whose new value is the stacked output, keeps a stack of its own."""
    text = backcomp.compile_source(parse_spec(LSTM_SPEC, "lstm.toml"))
    grad = text.split("\ndef value_and_grad(")[1].split("\ndef ")[0]
    loop = grad[grad.index("for t in range(T):"):grad.index("for t in range(T - 1")]
    assert re.search(r"c_new = c_buf\[t \+ 1\]\n\s+np\.add\(", loop)
    assert not re.search(r"\[t\] = c\n", loop)
    assert re.search(r"c_buf = np\.empty\(\(T \+ 1, B, \d+\)", grad) and "c_buf[0] = " in grad


def test_gru_backward_reads_the_stored_tanh_instead_of_recomputing_it():
    """n = tanh(x_n + σ(r)·h_n) is kept by the forward (written into its stack) and read
    by the backward: no tanh in the backward loop or after it."""
    text = backcomp.compile_source(parse_spec(GRU_SPEC, "gru.toml"))
    grad = text.split("\ndef value_and_grad(")[1].split("\ndef ")[0]
    forward_loop = grad[grad.index("for t in range(T):"):grad.index("for t in range(T - 1")]
    assert forward_loop.count("np.tanh(") == 1 and re.search(r"np\.tanh\(.*, out=\w+\)", forward_loop)
    assert "np.tanh(" not in grad[grad.index("for t in range(T - 1"):]


def test_the_carry_free_terms_of_a_step_sum_are_computed_before_the_loop():
    """z = x_t @ Wx + h @ Wh + bx + bh: x_t @ Wx + bx + bh is one pass over (T, B, 4H)
    before the loop, and the loop adds it to h @ Wh in one statement; σ of the gates is
    computed straight into its residual stack."""
    text = backcomp.compile_source(parse_spec(LSTM_SPEC, "lstm.toml"))
    loop = text.split("\ndef value_and_grad(")[1].split("for t in range(T):")[1].split("run = (")[0]
    assert "bx" not in loop and "bh" not in loop, loop
    assert re.search(r"z = np\.add\(\w+, \w+, out=\w+\)", loop), loop
    assert "_sigmoid(c_new_getitem_2, out=c_new_sigmoid)" in loop and "c_new_sigmoid_seq_2[t] = " not in loop, loop


def test_a_sum_inside_the_step_activation_splits_its_carry_free_terms_too():
    """h' = tanh(x_t @ Wx + h @ Wh + b): x_t @ Wx + b is one pass before the loop, and
    the loop adds it to h @ Wh once (it added b, then x_t @ Wx); values as without."""
    spec = parse_spec(open(EXAMPLES / "rnn.toml").read(), "rnn.toml")
    text = backcomp.compile_source(spec)
    loop = text.split("\ndef value_and_grad(")[1].split("for t in range(T):")[1].split("run = (")[0]
    assert "b" not in re.findall(r"\b\w+\b", loop) and loop.count("np.add(") == 1, loop
    fast, slow = backcomp.build(spec), backcomp.build(spec, opt_level=0)
    params = fast.init_params(seed=1, dtype=np.float64)
    params["b"] = np.linspace(-0.5, 0.5, 32)
    rng = np.random.default_rng(1)
    inputs = {"x": rng.standard_normal((3, 5, 8)), "labels": np.array([0, 3, 1])}
    (l1, g1), (l0, g0) = fast.value_and_grad(params, inputs), slow.value_and_grad(params, inputs)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-10, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("order", ["V * r.carry", "r.carry * V"])
def test_explain_shows_a_line_that_computes_with_a_loop_output(order):
    """A line reading a loop's output shows its whole expression, with the output as the
    value run.carry[0] and its ḡ (it showed just run.carry[0], and V * r.carry, which
    reads the output second, crashed build with an IndexError; found by review)."""
    from backcomp import ops
    from backcomp.explain import explain
    g = backcomp.Graph("expl")
    x, W, V = g.input("x", ("B", "T", 3)), g.param("W", (3, 3)), g.param("V", (3,))

    def step(h, x_t):
        h_new = ops.tanh(x_t @ W + h)
        return h_new, h_new
    r = g.scan(step, ops.zeros(("B", 3), graph=g), x, axis=1)
    r.node.name = "run"
    g.loss(ops.sum(V * r.carry if order.startswith("V") else r.carry * V))
    backcomp.build(g)
    text = explain(g)
    assert "loss = Σ(V ⊙ run.carry[0])" in text or "loss = Σ(run.carry[0] ⊙ V)" in text, text
    assert "ḡ_run.carry[0] = V ⊙ ḡ_loss" in text and "ḡ_V = ḡ_loss ⊙ Σ_B(run.carry[0])" in text, text


def test_explain_shows_the_scan_line_with_its_arguments_shapes_and_their_vjps():
    """The scan's own line shows its initial carries and sequences as expressions, the
    shapes of its outputs (it said ``(full, full), (transpose)  # shape ()``), and ḡ of
    the values they are made of, linked to the step's block."""
    from backcomp.explain import explain
    text = explain(parse_spec((EXAMPLES / "char_lstm.toml").read_text(), "char_lstm.toml"))
    assert ("run = scan(lstm, (full((B, 128), 0), full((B, 128), 0)), (transpose(E[ids], (1, 0, 2)),))"
            "    # carry (B, 128), (B, 128); ys (T, B, 128)") in text, text
    assert "ḡ_E = scatter_add(transpose(ḡ_run.xs[0], (1, 0, 2)), ids)" in text, text
    assert "ḡ_run.xs[0][t] = ḡ_e_t[t]" in text and "ḡ_ys0[t] = ḡ_run.ys[0][t]" in text, text
    assert "# shape ()" not in text.split("loss =")[0]


def test_explain_gives_the_vjps_of_a_scans_initial_carry_and_sequence():
    from backcomp import ops
    from backcomp.explain import explain
    g = backcomp.Graph("expl")
    x, W, P, h0 = g.input("x", (4, "T", 3)), g.param("W", (3, 3)), g.param("P", (3, 3)), g.param("h0", (4, 3))

    def step(h, x_t):
        h_new = ops.tanh(x_t @ W + h)
        return h_new, h_new
    r = g.scan(step, 2.0 * h0, x @ P, axis=1, reverse=True)
    r.node.name = "run"
    g.loss(ops.sum(r.carry))
    backcomp.build(g)
    text = explain(g)
    line = next(s for s in text.splitlines() if s.startswith("run = "))
    assert line == "run = scan(step, (2·h0,), (transpose(x · P, (1, 0, 2)),), reverse)    # carry (4, 3); ys (T, 4, 3)", line
    assert "ḡ_h0 = 2·ḡ_run.init[0]" in text and "ḡ_P = Σ[axis=0](xᵀ · transpose(ḡ_run.xs[0], (1, 0, 2)))" in text, text
    # reversed: the next step is t-1, the first T-1, the backward runs forwards
    assert "(backpropagation through time, t = 0, ..., T-1)" in text, text
    assert "ḡ_carry_new[t] = ḡ_carry[t-1] + ḡ_ys0[t]" in text and "ḡ_run.init[0] = ḡ_carry[T-1]" in text, text
    assert "carry_new = tanh(carry + x_t · W)" in text   # the builder's unnamed new carry gets a name


def test_explain_names_a_builders_unnamed_step_and_what_it_captures():
    """A step made of unnamed nodes showed no line and read ḡ_carry[t] = 0 (found by
    review); a value it captures (tanh(W), unnamed) is summed on the scan's line."""
    from backcomp import ops
    from backcomp.explain import explain
    g = backcomp.Graph("capt")
    x, W = g.input("x", ("B", "T", 3)), g.param("W", (3, 3))
    W2 = ops.tanh(W)
    r = g.scan(lambda h, x_t: (ops.tanh(x_t @ W2 + h), None), ops.zeros(("B", 3), graph=g), x, axis=1, name="cell")
    r.node.name = "run"
    g.loss(ops.sum(r.carry), "loss")
    text = explain(g)
    assert "ḡ_W = Σ_t ḡ_v2[t] ⊙ (1 - tanh(W)^2)" in text, text
    assert "carry_new = tanh(carry + x_t · v2)" in text and "ḡ_carry[t] = (ḡ_carry_new ⊙ (1 - carry_new^2))[t]" in text, text
    assert "ḡ_v2[t] = (x_tᵀ · (ḡ_carry_new ⊙ (1 - carry_new^2)))[t]" in text, text


def test_explain_follows_loops_chained_nested_and_reused():
    """Found by review: a scan reading another scan's output directly made compile fail
    ('scan_out reads the outputs of a scan node', from the docstring's explain); the
    argument's own value leaked as an identifier (run_init0) into its VJP; the final
    carry's ḡ was never linked to the recurrence; --wrt stopped at the loop's line; a
    step run by two scans got one block."""
    from backcomp import ops
    from backcomp.explain import explain
    g = backcomp.Graph("chained")
    x, P, Q = g.input("x", ("T", "B", 4)), g.param("P", (4, 4)), g.param("Q", (4, 4))

    def cell(h, x_t):
        h_new = ops.tanh(x_t + h @ Q)
        return h_new, h_new
    r1 = g.scan(cell, ops.tanh(x[0] @ P), x, name="cell")
    r1.node.name = "run"
    r2 = g.scan(cell, r1.carry, r1.ys, reverse=True, name="cell")   # time-major: the stack itself
    r2.node.name = "run2"
    g.loss(ops.sum(r2.carry), "loss")
    m = backcomp.build(g)   # compiling builds the docstring from explain
    params = {"P": np.eye(4) * 0.3, "Q": np.eye(4) * 0.2}
    loss, grads = m.value_and_grad(params, {"x": np.ones((3, 2, 4)) * 0.1})
    assert np.isfinite(loss) and set(grads) == {"P", "Q"}
    text = explain(g)
    assert "run2 = scan(cell, (run.carry[0],), (run.ys[0],), reverse)" in text, text
    assert "ḡ_run.carry[0] = ḡ_run2.init[0]" in text and "ḡ_run.ys[0] = ḡ_run2.xs[0]" in text, text
    assert "ḡ_P = x[0]ᵀ · (ḡ_run.init[0] ⊙ (1 - tanh(x[0] · P)^2))" in text, text
    assert "run_init0" not in text
    assert text.count("step cell (carry") == 2 and "t = 0, ..., T-1" in text and "t = T-1, ..., 0" in text, text
    assert "ḡ_carry[T] = ḡ_run.carry[0]    (the carry after the last step)" in text, text
    assert "ḡ_carry[-1] = ḡ_run2.carry[0]    (the carry after the last step)" in text, text
    wrt = explain(g, wrt="P")
    assert "run2 = scan(" in wrt and "loss = " in wrt, wrt
    assert "does not depend" not in explain(g, wrt="Q")
