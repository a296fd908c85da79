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
    source = (ROOT / "backcomp" / "spec.py").read_text()
    tree = ast.parse(source)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    called |= {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not called & {"eval", "exec", "sympify", "parse_expr", "S"}


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
