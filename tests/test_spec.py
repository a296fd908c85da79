"""The spec loader: every section, safe parsing, and located errors."""
from __future__ import annotations

import ast
import io
import contextlib
from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp import spec as spec_mod
from backcomp.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
MALFORMED = sorted((ROOT / "tests" / "malformed").glob("*.toml"))

MLP = '''
[model]
name = "tiny"
loss = "loss"
outputs = ["probs", "loss"]
wrt = ["W1", "b1"]

[inputs]
x = ["B", 4]
y = { shape = ["B", 3], dtype = "float32" }

[params]
W1 = { shape = [4, 3], init = "normal(0.01)" }
b1 = [3]

[constants]
lam = 0.5

[functions]
swish = { args = ["u"], expr = "u * sigmoid(u)" }

[graph]
loss = "mean(softmax_cross_entropy(logits, y)) + lam * sum(W1 ** 2)"
probs = "softmax(logits, axis=-1)"
logits = "swish(x @ W1 + b1)"
'''


def test_every_section_and_free_order():
    g = parse_spec(MLP, "tiny.toml")
    assert g.name == "tiny"
    assert list(g.inputs) == ["x", "y"] and g.inputs["x"].shape == ("B", 4)
    assert g.params["W1"].shape == (4, 3) and g.inits["W1"] == "normal(0.01)"
    assert g.inits["b1"] == "zeros"
    assert g.wrt == ("W1", "b1")
    assert list(g.outputs) == ["probs", "loss"]
    assert g.loss_node.name == "loss" and g.loss_node.shape == ()


def test_spec_matches_numpy():
    g = parse_spec(MLP, "tiny.toml")
    m = backcomp.build(g)
    rng = np.random.default_rng(0)
    x, W1, b1 = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    y = np.eye(3)[rng.integers(0, 3, 5)]
    z = x @ W1 + b1
    logits = z / (1 + np.exp(-z))
    lse = np.log(np.exp(logits).sum(-1))
    want = np.mean(lse - (y * logits).sum(-1)) + 0.5 * np.sum(W1 ** 2)
    out = m.forward({"W1": W1, "b1": b1}, {"x": x, "y": y})
    assert np.allclose(out["loss"], want)
    assert np.allclose(out["probs"], np.exp(logits - lse[:, None]))


def test_default_name_is_file_stem_and_must_be_identifier(tmp_path):
    body = '[model]\nloss = "loss"\n[inputs]\nx = [2]\n[params]\nw = [2]\n[graph]\nloss = "sum(w * x)"\n'
    (tmp_path / "my_model.toml").write_text(body)
    assert load_spec(tmp_path / "my_model.toml").name == "my_model"
    (tmp_path / "my-model.toml").write_text(body)
    with pytest.raises(SpecError, match="from the file name"):
        load_spec(tmp_path / "my-model.toml")


def test_default_loss_and_outputs():
    g = parse_spec('[inputs]\nx = [2]\n[params]\nw = [2]\n[graph]\nloss = "sum(w * x)"\n', "m.toml")
    assert g.loss_node.name == "loss"
    assert list(g.forward_outputs()) == ["loss"]


@pytest.mark.parametrize("expr", [
    "(x.T).T @ W", "transpose(x.T, (1, 0)) @ W", "x @ W.T.T", "x[:, 0:2] @ W[0:2]", "x[..., None][:, :, 0] @ W",
    "reshape(x, (-1, 2))[:, 0:1] * W[0, 0:1]", "concatenate((x, x), axis=1)[:, 0:4] @ W",
    "einsum('bi,ij->bj', x, W)", "where(x @ W > 0, x @ W, 0.1 * (x @ W))",
    "leaky_relu(x @ W, alpha=0.2)", "leaky_relu(x @ W, 0.2)", "maximum(x @ W, 0)",
    "logsumexp(x @ W, axis=1, keepdims=True)", "log_softmax(x @ W)", "gelu(-x @ W)",
    "sum(x @ W, axis=(0, 1))", "mean(x @ W, 0)", "max(x @ W, axis=-1)", "stop_gradient(x) @ W",
    "x[::-1] @ W", "-(+x) @ W ** 2 / 2", "mse(x @ W, 1.0) + 0 * sum(W)",
])
def test_expression_forms(expr):
    text = f'[inputs]\nx = [3, 4]\n[params]\nW = [4, 2]\n[graph]\nh = "{expr}"\nloss = "sum(h)"\n'
    g = parse_spec(text, "forms.toml")
    m = backcomp.build(g)
    rng = np.random.default_rng(1)
    loss, grads = m.value_and_grad({"W": rng.standard_normal((4, 2))}, {"x": rng.standard_normal((3, 4))})
    assert np.isfinite(loss) and grads["W"].shape == (4, 2)


def test_functions_derive_their_derivatives():
    text = ('[inputs]\nx = [3]\n[params]\nw = [3]\n[constants]\nk = 3\n'
            '[functions]\ncube = { args = ["u"], expr = "k * u ** 3 / 3 + softsq(u)" }\n'
            'softsq = { args = ["v"], expr = "log(1 + exp(v)) ** 2" }\n'
            '[graph]\nloss = "sum(cube(w * x))"\n')
    m = backcomp.build(parse_spec(text, "f.toml"))
    x, w = np.array([0.5, -1.0, 2.0]), np.array([1.0, 0.3, -0.2])
    _, grads = m.value_and_grad({"w": w}, {"x": x})
    u = w * x
    sp_ = np.log1p(np.exp(u))
    want = (3 * u ** 2 + 2 * sp_ / (1 + np.exp(-u))) * x
    assert np.allclose(grads["w"], want)


def test_spec_text_is_never_evaluated(monkeypatch):
    import builtins
    import sympy

    def boom(*a, **k):
        raise AssertionError("spec text reached an evaluator")
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(sympy, "sympify", boom)
    monkeypatch.setattr(sympy, "parse_expr", boom, raising=False)
    parse_spec(MLP, "tiny.toml")
    sources = sorted((ROOT / "backcomp" / "spec").glob("*.py"))
    assert len(sources) >= 4
    for source in sources:
        tree = ast.parse(source.read_text())
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        called |= {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not called & {"eval", "exec", "sympify", "parse_expr", "S"}, source.name


def test_error_format_and_location():
    text = '[inputs]\nx = [3]\n[params]\nw = [3]\n[graph]\nh1 = "relux(w * x)"\nloss = "sum(h1)"\n'
    with pytest.raises(SpecError) as info:
        parse_spec(text, "examples/mlp.toml")
    assert str(info.value) == ("examples/mlp.toml:6:7: error: unknown function 'relux' in node 'h1' "
                               "(did you mean 'relu'?)")


def test_column_points_into_expression():
    text = '[inputs]\nx = ["B", 4]\n[params]\nW = [3, 2]\n[graph]\nloss   =   "sum(x @ W)"\n'
    with pytest.raises(SpecError) as info:
        parse_spec(text, "s.toml")
    e = info.value
    assert (e.line, e.col) == (6, 19)          # the '@'
    assert "(B, 4) and (3, 2)" in e.message


def test_multiline_expression_location():
    text = '[inputs]\nx = [4]\n[params]\nw = [4]\n[graph]\nloss = """\nsum(w * x)\n  + nope\n"""\n'
    with pytest.raises(SpecError) as info:
        parse_spec(text, "s.toml")
    assert (info.value.line, info.value.col) == (8, 5)


def test_cycle_is_printed():
    text = '[inputs]\nx = [4]\n[params]\nw = [4]\n[graph]\na = "c * w"\nb = "a + x"\nc = "b * 2"\nloss = "sum(a)"\n'
    with pytest.raises(SpecError, match=r"cycle in \[graph\]: a -> c -> b -> a"):
        parse_spec(text, "s.toml")


def test_deep_but_legal_graph_is_fine():
    lines = ['[inputs]\nx = [2]\n[params]\nw = [2]\n[graph]\nh0 = "w * x"']
    lines += [f'h{i} = "tanh(h{i - 1})"' for i in range(1, 400)]
    lines.append('loss = "sum(h399)"')
    g = parse_spec("\n".join(reversed(lines[1:])) and "\n".join(lines) + "\n", "deep.toml")
    assert g.loss_node is not None


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_every_example_loads():
    assert len(EXAMPLES) >= 7
    for path in EXAMPLES:
        assert load_spec(path).loss_node is not None


def test_op_table_covers_the_documented_ops():
    documented = {"relu", "sigmoid", "tanh", "exp", "log", "log1p", "sqrt", "abs", "softplus", "gelu", "erf",
                  "sin", "cos", "leaky_relu", "maximum", "minimum", "where", "sum", "mean", "max", "logsumexp",
                  "softmax", "log_softmax", "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse",
                  "transpose", "reshape", "concatenate", "einsum", "stop_gradient"}
    assert documented <= set(spec_mod.SPEC_OPS)
    for name, op in spec_mod.SPEC_OPS.items():
        assert callable(op.fn), name


# ----- the malformed corpus, in-process ------------------------------------------------
def test_malformed_corpus_is_large_and_distinct():
    assert len(MALFORMED) >= 40
    expectations = [p.read_bytes().split(b"\n", 1)[0] for p in MALFORMED]
    assert all(e.startswith(b"# expect: ") for e in expectations)


@pytest.mark.parametrize("path", MALFORMED, ids=[p.stem for p in MALFORMED])
def test_malformed_spec(path, tmp_path):
    from backcomp.cli import main
    expect = path.read_bytes().split(b"\n", 1)[0][len(b"# expect: "):].decode().strip()
    rel = path.relative_to(ROOT)
    out = tmp_path / "out.py"
    err = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["compile", str(rel), "-o", str(out)])
    message = err.getvalue()
    assert code == 2, message
    assert message.startswith(f"{rel}:") and message.split(":")[1].isdigit(), message
    assert expect in message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_docs_op_table_is_generated_from_the_code():
    doc = (ROOT / "docs" / "spec.md").read_text()
    assert spec_mod.ops_table_markdown() in doc
    for init in ("zeros", "ones", "normal(std)", "uniform(low, high)", "glorot_uniform", "he_normal"):
        assert init in doc
    for key in ("name", "loss", "outputs", "wrt", "shape", "dtype", "init", "args", "expr"):
        assert f"`{key}`" in doc or f"{key} =" in doc


# ----- conv and pool arguments: an int or an (h, w) pair --------------------------------
CONV_PAIRS = '''
[inputs]
x = ["B", 2, 7, 6]

[params]
w = [3, 2, 3, 2]

[constants]
one = 1

[graph]
h = "conv2d(x, w, stride=(1, 2), padding=(1, 0))"
h2 = "conv2d(x, w, (2, one), [0, 1])"
p = "max_pool2d(h, (2, 1))"
q = "avg_pool2d(h, size=(1, 2), stride=(1, 1))"
r = "max_pool2d(h2, 2, stride=(1, 2))"
loss = "sum(tanh(p)) + sum(q * q) / 2 + sum(sigmoid(r))"

[model]
outputs = ["h", "h2", "p", "q", "r", "loss"]
'''


def _conv_pairs_reference(w, x):
    """The same model in torch.nn.functional (float64)."""
    import torch
    import torch.nn.functional as F
    x, w = torch.as_tensor(x), torch.as_tensor(w)
    h = F.conv2d(x, w, stride=(1, 2), padding=(1, 0))
    h2 = F.conv2d(x, w, stride=(2, 1), padding=(0, 1))
    p = F.max_pool2d(h, (2, 1))
    q = F.avg_pool2d(h, (1, 2), stride=(1, 1))
    r = F.max_pool2d(h2, 2, stride=(1, 2))
    loss = torch.tanh(p).sum() + (q * q).sum() / 2 + torch.sigmoid(r).sum()
    return {k: v.numpy() for k, v in dict(h=h, h2=h2, p=p, q=q, r=r, loss=loss).items()}


def test_conv_and_pool_take_hw_pairs_as_keywords_and_positionally():
    """Regression (issue 9, defect 3): pairs were refused with "must be an integer"."""
    from conftest import gradcheck
    g = parse_spec(CONV_PAIRS, "pairs.toml")
    assert g.lookup("h").shape == ("B", 3, 7, 3) and g.lookup("h").attrs["stride"] == (1, 2)
    assert g.lookup("h2").shape == ("B", 3, 3, 7)
    assert g.lookup("p").shape == ("B", 3, 3, 3) and g.lookup("p").attrs["stride"] == (2, 1)
    assert g.lookup("q").shape == ("B", 3, 7, 2)
    assert g.lookup("r").shape == ("B", 3, 2, 3)
    m = gradcheck(g, batch=2, seed=3,
                  reference=lambda params, inputs: float(_conv_pairs_reference(params["w"], inputs["x"])["loss"]))
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((2, 2, 7, 6)), rng.standard_normal((3, 2, 3, 2))
    out = m.forward({"w": w}, {"x": x})
    want = _conv_pairs_reference(w, x)
    for name in ("h", "h2", "p", "q", "r", "loss"):
        assert out[name].shape == want[name].shape, name
        np.testing.assert_allclose(out[name], want[name], rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("expr, col, message", [
    ("conv2d(x, w, stride=(1, 2, 3))", 26, "argument 'stride' of conv2d() must be an integer or an (h, w) pair "
                                           "of integers, got 3 values: '(1, 2, 3)'"),
    ("conv2d(x, w, stride=(1.5, 2))", 27, "the h value of argument 'stride' of conv2d() must be an integer, got '1.5'"),
    ("conv2d(x, w, padding=(1, -1))", 31, "the w value of argument 'padding' of conv2d() must be non-negative, got -1"),
    ("conv2d(x, w, 0)", 19, "argument 'stride' of conv2d() must be positive, got 0"),
    ("conv2d(x, w, stride=2.0)", 26, "argument 'stride' of conv2d() must be an integer or an (h, w) pair of "
                                     "integers, got '2.0'"),
    ("max_pool2d(x, (2,))", 20, "argument 'size' of max_pool2d() must be an integer or an (h, w) pair of "
                                "integers, got 1 value: '(2,)'"),
    ("avg_pool2d(x, (2, 2), stride=(0, 1))", 36, "the h value of argument 'stride' of avg_pool2d() must be "
                                                 "positive, got 0"),
    ("max_pool2d(x, x)", 20, "argument 'size' of max_pool2d() must be an integer or an (h, w) pair of integers, "
                             "got 'x'"),
])
def test_malformed_hw_pairs_are_located_errors(expr, col, message):
    text = f'[inputs]\nx = ["B", 2, 6, 5]\n[params]\nw = [3, 2, 3, 2]\n[graph]\nh = "{expr}"\nloss = "sum(h)"\n'
    with pytest.raises(SpecError) as info:
        parse_spec(text, "pairs.toml")
    assert str(info.value) == f"pairs.toml:6:{col}: error: {message} in node 'h'"


# ----- spec signatures declared on the builders -----------------------------------------
def test_spec_function_checks_option_names_at_declaration():
    from backcomp.ops.signature import X, Param, spec_function

    def scale(x, factor=1.0):
        return x * factor

    with pytest.raises(ValueError, match="option 'factr' is not a parameter"):
        spec_function(X, Param("factr", "number", False, 1.0), name="scale_typo")(scale)
    with pytest.raises(ValueError, match="declared twice"):
        spec_function(X, name="relu")(scale)
    with pytest.raises(ValueError, match="unknown argument kind"):
        Param("x", "tensor")


def test_a_declared_builder_is_callable_from_specs(tmp_path):
    from backcomp import ops
    from backcomp.ops import signature
    from backcomp.ops.signature import X, Param, spec_function

    def scaled_tanh(x, factor=1.0):
        return ops.tanh(x) * factor

    spec_function(X, Param("factor", "number", False, 1.0))(scaled_tanh)
    try:
        g = spec_mod.parse_spec(
            '[model]\nname = "m"\nloss = "loss"\n[inputs]\nx = ["B", 3]\n[params]\nb = [3]\n[graph]\n'
            'loss = "sum(scaled_tanh(x + b, factor=2.5))"\n', "m.toml")
        x = np.linspace(-1, 1, 6).reshape(2, 3)
        mod = backcomp.build(g)
        b = np.array([0.1, -0.2, 0.3])
        np.testing.assert_allclose(mod.forward({"b": b}, {"x": x})["loss"], 2.5 * np.tanh(x + b).sum(), rtol=1e-12)
    finally:
        del signature._FUNCTIONS["scaled_tanh"]
