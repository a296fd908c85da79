"""Code generation defects found by a new user (issue 9), each at its mechanism:
helpers reported by the printer, folding that keeps shapes, index ranges validated."""
from __future__ import annotations

import inspect

import textwrap
from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.compiler import compile_source
from backcomp.printer import collect_helpers, print_expr
from conftest import gradcheck


def spec_module(tmp_path, graph_lines: str, inputs: str = 'x = ["B", 3]', params: str = "W = [3, 4]",
                opt_level: int = 1):
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""\
        [model]
        name = "m"
        loss = "loss"
        [inputs]
        {inputs}
        [params]
        {params}
        [graph]
        """) + textwrap.dedent(graph_lines))
    return backcomp.build(path, opt_level=opt_level)


# ----- 1. every helper a printed line calls is defined ----------------------------------------
def test_printer_reports_helpers_of_every_line():
    import sympy as sp
    x = sp.Symbol("x", real=True)
    with collect_helpers() as used:
        print_expr(sp.erf(x) + 1, {x: "a"})
    assert used == {"erf"}
    with collect_helpers() as used:
        print_expr(sp.exp(x), {x: "a"})
    assert used == set()


@pytest.mark.parametrize("opt_level", [0, 1])
def test_erf_moved_into_a_cse_temporary_is_defined(tmp_path, opt_level):
    m = spec_module(tmp_path, """\
        z = "x @ W"
        e = "stop_gradient(erf(z) * erf(z) + erf(z))"
        loss = "sum(e * z)"
        """, opt_level=opt_level)
    x = np.random.default_rng(0).standard_normal((2, 3))
    p = m.init_params(dtype=np.float64)
    from math import erf
    z = x @ p["W"]
    e = np.vectorize(erf)(z)
    loss, grads = m.value_and_grad(p, {"x": x})
    np.testing.assert_allclose(loss, np.sum((e * e + e) * z), rtol=1e-12)
    np.testing.assert_allclose(grads["W"], x.T @ (e * e + e), rtol=1e-12)


# ----- 2. folding never changes a node's shape or dtype ---------------------------------------
@pytest.mark.parametrize("expr", ["x @ W * 0", "0 * (x @ W)", "stop_gradient(x @ W) * 0", "(x @ W) - (x @ W)"])
@pytest.mark.parametrize("opt_level", [0, 1])
def test_zero_folding_keeps_the_shape(tmp_path, expr, opt_level):
    """The initial state of an RNN, written as users write it."""
    m = spec_module(tmp_path, f"""\
        h0 = "{expr}"
        h1 = "tanh(h0 @ W.T + x)"
        loss = "sum(h1 * h1) + sum(h0)"
        """, opt_level=opt_level)
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((5, 3)).astype(dtype)
        p = m.init_params(dtype=dtype)
        loss, grads = m.value_and_grad(p, {"x": x})
        assert loss.dtype == dtype and grads["W"].dtype == dtype
        np.testing.assert_allclose(loss, np.sum(np.tanh(x) ** 2), rtol=1e-6)
        np.testing.assert_allclose(grads["W"], 0, atol=1e-7)   # h0 = 0 whatever W is
        out = m.forward(p, {"x": x})
        assert out["loss"].shape == ()


@pytest.mark.parametrize("expr", ["x @ W * 0", "0 * (x @ W)"])
def test_folding_drops_the_work_of_dead_operands(tmp_path, expr):
    """h0 = x @ W · 0 is a zeros constant of h0's shape: the matmul that only gave it
    its shape is not computed (it was, as h0 = np.zeros_like(h0_matmul))."""
    m = spec_module(tmp_path, f"""\
        h0 = "{expr}"
        loss = "sum(tanh(h0 @ W + x) * h0)"
        """, params="W = [3, 3]")
    source = inspect.getsource(m.forward)
    assert "x @ W" not in source and "h0 = np.zeros((B, 3), dtype=W.dtype)" in source
    x = np.ones((2, 3), np.float32)
    out = m.forward(m.init_params(dtype=np.float32), {"x": x})["loss"]
    assert out == 0 and out.dtype == np.float32


def test_folded_operand_keeps_the_broadcast_shape(tmp_path):
    """tanh(x@W·0 + b) is (B, 4), not b's (4,): the sum must count every row."""
    m = spec_module(tmp_path, """\
        a = "tanh((x @ W) * 0 + b)"
        c = "where((x @ W) > (x @ W), x @ W, b)"
        loss = "sum(a * c)"
        """, params="W = [3, 4]\nb = [4]")
    p = m.init_params(dtype=np.float32)
    p["b"][:] = 0.5
    x = np.ones((6, 3), np.float32)
    loss, grads = m.value_and_grad(p, {"x": x})
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss, 6 * 4 * 0.5 * np.tanh(0.5), rtol=1e-6)
    d = np.tanh(0.5) + 0.5 * (1 - np.tanh(0.5) ** 2)
    np.testing.assert_allclose(grads["b"], np.full(4, 6 * d), rtol=1e-6)


def test_zero_folding_graph_gradcheck():
    g = backcomp.Graph("fold")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 3))
    h = x @ W
    g.loss(ops.sum(ops.tanh(h * 0 + x) * h) + ops.sum((h - h) * h))
    gradcheck(g)


# ----- 5. labels outside [0, C) are refused by name --------------------------------------------
@pytest.mark.parametrize("bad, shown", [(-1, "-1"), (105, "105"), (5, "5")])
def test_labels_outside_the_class_range_are_a_value_error(tmp_path, bad, shown):
    m = spec_module(tmp_path, """\
        loss = "mean(softmax_cross_entropy(x @ W, y))"
        """, inputs='x = ["B", 3]\ny = { shape = ["B"], dtype = "int64" }', params="W = [3, 5]")
    assert m.INDEX_RANGES == {"y": (0, 5)}
    p = m.init_params()
    x = np.ones((4, 3), np.float32)
    m.value_and_grad(p, {"x": x, "y": np.array([0, 1, 4, 2])})   # in range: fine
    y = np.array([0, 1, bad, 2])
    for run in (m.value_and_grad, m.forward):
        with pytest.raises(ValueError, match=rf"input 'y' holds {shown} at index \(2,\), "
                                             r"outside the allowed range \[0, 5\)"):
            run(p, {"x": x, "y": y})


def test_models_without_indices_define_no_index_check():
    g = backcomp.Graph("plain")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 3))
    g.loss(ops.sum(x @ W))
    src = compile_source(g)
    assert "INDEX_RANGES = {}" in src and "_index_error" not in src


def test_expressions_with_cse_temporaries_are_not_rewrapped():
    """The shape check looks at the whole expression, not at what is left after CSE."""
    from pathlib import Path
    src = compile_source(Path(__file__).resolve().parent.parent / "examples" / "functions.toml")
    assert "full_like" not in src and "zeros_like" not in src


# ----- 7. the docstring is the model's explain text, in the user's names ---------------------
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_docstring_is_the_explain_text(path):
    from backcomp.explain import explain
    from backcomp.spec import load_spec
    m = backcomp.build(path)
    text = explain(load_spec(path))
    assert textwrap.indent(text, "    ") in m.__doc__
    assert "_bar" not in m.__doc__ and "stop_gradient" not in m.__doc__


def residual_chain(name: str, layers: int) -> backcomp.Graph:
    """h ← h + tanh(h·W), built in Python with no names: every h is read twice."""
    g = backcomp.Graph(name)
    h = g.input("x", ("B", 2))
    for i in range(layers):
        h = h + ops.tanh(h @ g.param(f"W{i}", (2, 2)))
    g.loss(ops.sum(h))
    return g


def test_docstring_of_a_big_unnamed_model_points_to_explain():
    src = compile_source(residual_chain("deep", 300))
    assert "deep: 901 nodes, too many to list here; `backcomp explain` shows each derivative." in src


def test_explain_names_shared_unnamed_values():
    """Shared values get lines of their own (written inline, the text doubles per layer)."""
    from backcomp.explain import explain
    text = explain(residual_chain("shared", 30))
    assert len(text.splitlines()) < 200 and "ḡ_W29 = " in text


def test_labels_indexing_a_fixed_and_a_symbolic_class_axis_fit_both(tmp_path):
    m = spec_module(tmp_path, """\
        a = "softmax_cross_entropy(x @ W, y)"
        b = "softmax_cross_entropy(z, y)"
        loss = "mean(a) + mean(b)"
        """, inputs='x = ["B", 3]\nz = ["B", "C"]\ny = { shape = ["B"], dtype = "int64" }', params="W = [3, 5]")
    assert m.INDEX_RANGES == {"y": (0, "min(5, C)")}
    p, y = m.init_params(), np.array([0, 2, 3])
    x = np.ones((3, 3), np.float32)
    m.value_and_grad(p, {"x": x, "z": np.ones((3, 4), np.float32), "y": y})      # 3 < min(5, 4)
    for c in (3, 7):    # 3 is outside [0, 3); with C = 7, 5 still bounds it
        bad = np.array([0, 2, 5]) if c == 7 else y
        with pytest.raises(ValueError, match=r"input 'y' holds \d at index \(2,\), outside the allowed range"):
            m.value_and_grad(p, {"x": x, "z": np.ones((3, c), np.float32), "y": bad})


def test_explain_formats_do_not_leak_between_arities():
    """concatenate of two, then of three arrays: the format registry is global, and the
    second used to print with the first's two slots (an IndexError in every docstring)."""
    from backcomp.explain import explain
    for k in (2, 3):
        g = backcomp.Graph(f"cat{k}")
        x = g.input("x", ("B", 2))
        W = g.param("W", (2, 2))
        g.loss(ops.sum(ops.concatenate(tuple(x @ W * (i + 1) for i in range(k)), axis=1)))
        parts = ", ".join(["x · W"] + [f"{i + 1}·(x · W)" for i in range(1, k)])
        assert f"loss = Σ(concatenate({parts}, axis=1))" in explain(g)


def test_fusing_a_producer_read_twice_replaces_every_read():
    """A consumer whose inputs repeat a producer (e, e): fusion substitutes both reads
    (it substituted the first and left the symbol '%1' in the printed code)."""
    from backcomp.ops.elementwise import arg_symbol, node_expr
    from backcomp.passes.fuse import fuse_elementwise
    g = backcomp.Graph("twice")
    x = g.input("x", ("B", 3))
    e = ops.exp(x)
    g.loss(ops.sum(g.apply("ew", (e, e), expr=arg_symbol(0) * arg_symbol(1), label="mul")))
    fused = [n for n in fuse_elementwise(g).nodes if n.op == "ew"]
    assert [str(node_expr(n)) for n in fused] == ["exp(2*%0)"]
    m = backcomp.build(g)
    x_ = np.linspace(-1, 1, 6).reshape(2, 3)
    np.testing.assert_allclose(m.value_and_grad({}, {"x": x_})[0], np.exp(2 * x_).sum(), rtol=1e-12)


def test_explain_reads_a_double_transpose_as_the_matrix():
    from backcomp.explain import explain
    g = backcomp.Graph("tt")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 3))
    h = g.assign_name("h", ops.tanh(x @ W))
    g.loss(ops.sum(ops.tanh(h @ ops.transpose(W, (1, 0)))))
    text = explain(g)
    assert "ᵀᵀ" not in text and "ḡ_h = (ḡ_loss ⊙ (1 - tanh(h · Wᵀ)^2)) · W" in text


def test_cubes_print_as_products_of_a_named_base(tmp_path):
    """x**3 is libm's pow per element (33 ms of a 54 ms tanh-GELU step): cubes and
    fourth powers are products of their base, named once when it is an expression."""
    m = spec_module(tmp_path, """\
        z = "x @ W"
        loss = "sum(tanh(z + 0.04 * (z + 1) ** 3) + 1 / (z * z + 2) ** 3 + z ** 4)"
        """, params="W = [3, 3]")
    source = inspect.getsource(m.value_and_grad)
    assert "**3" not in source and "**4" not in source, source
    for dtype in (np.float32, np.float64):
        x = np.random.default_rng(4).standard_normal((5, 3)).astype(dtype)
        p = m.init_params(dtype=dtype)
        z = (x @ p["W"]).astype(np.float64)
        ref = np.sum(np.tanh(z + 0.04 * (z + 1) ** 3) + 1 / (z * z + 2) ** 3 + z ** 4)
        d = (1 - np.tanh(z + 0.04 * (z + 1) ** 3) ** 2) * (1 + 0.12 * (z + 1) ** 2) \
            - 6 * z / (z * z + 2) ** 4 + 4 * z ** 3
        loss, grads = m.value_and_grad(p, {"x": x})
        assert loss.dtype == dtype
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(loss, ref, rtol=tol)
        np.testing.assert_allclose(grads["W"], x.astype(np.float64).T @ d, rtol=tol * 10, atol=tol)


def test_rows_times_a_matrix_with_an_empty_inner_dim(tmp_path):
    """(..., M, K) @ (K, N) is one GEMM over reshape(B*T, K): with K = 0 (a valid input)
    reshape(-1, 0) cannot infer its rows; the product is zeros, as plain matmul gives."""
    m = spec_module(tmp_path, """\
        y = "x @ M"
        loss = "sum(y * w)"
        """, inputs='x = ["B", "T", "D"]\nM = ["D", 3]', params="w = [3]")
    p = m.init_params(dtype=np.float64)
    loss, grads = m.value_and_grad(p, {"x": np.zeros((2, 5, 0)), "M": np.zeros((0, 3))})
    assert loss == 0 and np.array_equal(grads["w"], np.zeros(3))
    x = np.random.default_rng(5).standard_normal((2, 5, 4))
    M = np.random.default_rng(6).standard_normal((4, 3))
    out = m.forward(p, {"x": x, "M": M})["loss"]
    np.testing.assert_allclose(out, np.sum((x @ M) * p["w"]), rtol=1e-12)
