"""The generated module as DESIGN.md promises it: API, dtypes, validation, determinism,
numpy-only imports, the build cache and atomic writes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp import compiler, ops

REPO = Path(__file__).resolve().parent.parent


def kitchen_sink(name: str = "sink") -> backcomp.Graph:
    """A model touching most op families (erf helper, labels, reductions, indexing, ...)."""
    g = backcomp.Graph(name)
    x = g.input("x", ("B", 4))
    labels = g.input("labels", ("B",), dtype="int")
    t = g.input("t", ("B", 2))
    W1 = g.param("W1", (4, 6))
    b1 = g.param("b1", (6,))
    W2 = g.param("W2", (6, 3))
    s = g.param("s", ())
    h = g.assign_name("h", ops.gelu(x @ W1 + b1))
    h2 = ops.concatenate((ops.leaky_relu(h[:, :3], alpha=0.1), ops.tanh(h[:, 3:])), axis=1)
    logits = g.assign_name("logits", ops.einsum("bi,ij->bj", h2, W2))
    probs = ops.softmax(logits)
    g.output("probs", probs)
    sq = ops.reshape(h, (-1, 2, 3))
    extra = ops.mean(ops.max(sq, axis=1)) + ops.mse(h[:, ::3], t) + ops.sum(ops.where(h > 0, ops.sqrt(h * h + 1), s))
    loss = ops.mean(ops.softmax_cross_entropy(logits, labels)) + 0.01 * extra + s ** 2 * ops.sigmoid(s)
    g.loss(loss)
    g.output("loss", g.loss_node)
    return g


def sink_inputs(batch=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4)).astype(dtype),
            "labels": rng.integers(0, 3, batch),
            "t": rng.standard_normal((batch, 2)).astype(dtype)}


@pytest.fixture(scope="module")
def sink():
    return backcomp.build(kitchen_sink())


# ----- the module's API ------------------------------------------------------------------------
def test_params_and_inputs_are_declared_as_in_design(sink):
    assert sink.PARAMS == {"W1": (4, 6), "b1": (6,), "W2": (6, 3), "s": ()}
    assert sink.INPUTS == {"x": ("B", 4), "labels": ("B",), "t": ("B", 2)}
    assert type(sink.PARAMS) is dict and all(type(v) is tuple for v in sink.PARAMS.values())
    assert list(sink.PARAMS) == ["W1", "b1", "W2", "s"]   # declaration order


def test_init_params_is_seeded_fresh_and_float32_by_default(sink):
    p0, p0b, p1 = sink.init_params(seed=0), sink.init_params(seed=0), sink.init_params(seed=1)
    assert set(p0) == set(sink.PARAMS)
    for k, v in p0.items():
        assert v.dtype == np.float32 and v.shape == sink.PARAMS[k]
        assert np.array_equal(v, p0b[k]) and v is not p0b[k]
    assert not np.array_equal(p0["W1"], p1["W1"])
    assert np.array_equal(p0["b1"], np.zeros(6))                 # rank-1 default: zeros
    bound = np.sqrt(6 / (4 + 6))                                   # rank-2 default: glorot_uniform
    assert np.all(np.abs(p0["W1"]) <= bound) and np.std(p0["W1"]) > bound / 4
    assert sink.init_params(0, dtype=np.float64)["W1"].dtype == np.float64


def test_value_and_grad_loss_equals_forward_loss(sink):
    params = sink.init_params(0, dtype=np.float64)
    inputs = sink_inputs()
    out = sink.forward(params, inputs)
    loss, grads = sink.value_and_grad(params, inputs)
    assert set(out) == {"probs", "loss"}
    assert np.shape(loss) == () and np.asarray(loss).dtype == np.float64
    assert loss == out["loss"]
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-12)
    assert set(grads) == set(sink.PARAMS) and sink.WRT == tuple(sink.PARAMS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_computes_in_the_dtype_it_is_given(sink, dtype):
    params = sink.init_params(0, dtype=dtype)
    inputs = sink_inputs(dtype=dtype)
    out = sink.forward(params, inputs)
    loss, grads = sink.value_and_grad(params, inputs)
    assert np.asarray(loss).dtype == dtype
    for k, v in out.items():
        assert v.dtype == dtype, k
    for k, g in grads.items():
        assert g.dtype == dtype and g.shape == params[k].shape, k
        assert np.all(np.isfinite(g))
    if dtype == np.float32:   # and agrees with the float64 computation to float32 accuracy
        p64 = {k: v.astype(np.float64) for k, v in params.items()}
        i64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in inputs.items()}
        loss64, grads64 = sink.value_and_grad(p64, i64)
        np.testing.assert_allclose(loss, loss64, rtol=1e-5)
        for k in grads:
            np.testing.assert_allclose(grads[k], grads64[k], rtol=1e-3, atol=1e-5)


def test_grads_are_fresh_writable_arrays(sink):
    params = sink.init_params(0, dtype=np.float64)
    inputs = sink_inputs()
    _, grads = sink.value_and_grad(params, inputs)
    for k, g in grads.items():
        if params[k].ndim == 0:
            continue                                  # see test_scalar_results_are_0d_arrays
        assert isinstance(g, np.ndarray) and g.flags.writeable, k
        for arr in list(params.values()) + list(inputs.values()):
            assert not np.shares_memory(g, arr), k


def test_scalar_results_are_0d_arrays():
    g = backcomp.Graph("scalar_results")
    s = g.param("s", ())
    g.loss(s * s)
    m = backcomp.build(g)
    loss, grads = m.value_and_grad({"s": np.array(3.0)}, {})
    assert isinstance(loss, np.ndarray) and loss.ndim == 0
    assert isinstance(grads["s"], np.ndarray) and grads["s"].ndim == 0 and grads["s"].flags.writeable
    assert float(grads["s"]) == 6.0


def test_grad_of_a_product_does_not_alias_the_input():
    """d/dW Σ(W·x) = x: the gradient must still be a new array, not the caller's x."""
    g = backcomp.Graph("alias")
    x = g.input("x", (2, 3))
    W = g.param("W", (2, 3))
    g.loss(ops.sum(W * x))
    m = backcomp.build(g)
    X = np.arange(6.0).reshape(2, 3)
    _, grads = m.value_and_grad({"W": np.zeros((2, 3))}, {"x": X})
    np.testing.assert_array_equal(grads["W"], X)
    grads["W"] *= 2
    np.testing.assert_array_equal(X, np.arange(6.0).reshape(2, 3))


# ----- input validation -------------------------------------------------------------------------
def _valid():
    params = {"W": np.zeros((4, 2))}
    inputs = {"x": np.zeros((5, 4)), "y": np.zeros((5, 2))}
    return params, inputs


@pytest.fixture(scope="module")
def small():
    g = backcomp.Graph("validated")
    x = g.input("x", ("B", 4))
    y = g.input("y", ("B", 2))
    W = g.param("W", (4, 2))
    g.loss(ops.mse(x @ W, y))
    return backcomp.build(g)


@pytest.mark.parametrize("case, change, pattern", [
    ("missing_input", lambda p, i: i.pop("y"), r"missing 'y'"),
    ("unknown_input", lambda p, i: i.update(z=np.zeros(3)), r"unknown 'z'"),
    ("missing_param", lambda p, i: p.pop("W"), r"missing 'W'"),
    ("unknown_param", lambda p, i: p.update(V=np.zeros(3)), r"unknown 'V'"),
    ("wrong_rank", lambda p, i: i.update(x=np.zeros(20)), r"'x'.*\(B, 4\).*\(20,\)"),
    ("wrong_size", lambda p, i: i.update(x=np.zeros((5, 3))), r"'x'.*\(B, 4\).*\(5, 3\)"),
    ("batch_disagrees", lambda p, i: i.update(y=np.zeros((4, 2))), r"'y'.*B=4.*'x'.*B=5"),
    ("param_wrong_shape", lambda p, i: p.update(W=np.zeros((2, 4))), r"'W'.*\(4, 2\).*\(2, 4\)"),
    ("int_for_float", lambda p, i: i.update(x=np.zeros((5, 4), dtype=np.int64)), r"'x'.*float.*int64"),
])
def test_input_validation_errors(small, case, change, pattern):
    params, inputs = _valid()
    change(params, inputs)
    for fn in (small.forward, small.value_and_grad):
        with pytest.raises(ValueError, match=pattern):
            fn(params, inputs)


def test_batch_mismatch_message_names_both_shapes(small):
    params, inputs = _valid()
    inputs["y"] = np.zeros((4, 2))
    with pytest.raises(ValueError) as e:
        small.value_and_grad(params, inputs)
    msg = str(e.value)
    assert "(B, 2)" in msg and "(4, 2)" in msg and "'x'" in msg and "'y'" in msg


def test_float_labels_for_an_int_input_are_rejected(sink):
    inputs = sink_inputs()
    inputs["labels"] = inputs["labels"].astype(np.float64)
    with pytest.raises(ValueError, match="'labels'.*integers"):
        sink.forward(sink.init_params(0), inputs)


def test_non_dict_arguments_are_rejected(small):
    params, inputs = _valid()
    with pytest.raises(ValueError, match="dict"):
        small.forward(params, [inputs["x"], inputs["y"]])


# ----- inputs are never mutated; odd layouts work -----------------------------------------------------
def _mutation_models():
    g1 = backcomp.Graph("mut_mul")           # the cotangent of u·(...) is u itself: a tempting buffer
    x = g1.input("x", ("B", 3))
    u = g1.input("u", ("B", 3))
    p = g1.param("p", (1, 3))
    q = g1.param("q", (3,))
    g1.loss(ops.sum(u * (x * p + q)))
    yield g1
    g2 = backcomp.Graph("mut_mlp")
    x = g2.input("x", ("B", 3))
    y = g2.input("y", ("B", 3))
    W = g2.param("W", (3, 3))
    h = ops.exp(x) * ops.tanh(x @ W)
    g2.loss(ops.mean(ops.softmax_cross_entropy(h, y)) + ops.sum(ops.relu(x) * W[0]))
    yield g2
    g3 = backcomp.Graph("mut_neg")
    x = g3.input("x", ("B", 3))
    W = g3.param("W", (3,))
    g3.loss(ops.sum(-x * W) + ops.sum(ops.exp(-x) * 2))
    yield g3


@pytest.mark.parametrize("graph", list(_mutation_models()), ids=lambda g: g.name)
def test_inputs_and_params_are_never_mutated(graph):
    m = backcomp.build(graph)
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal(tuple(4 if isinstance(d, str) else d for d in s)) for k, s in m.INPUTS.items()}
    params = {k: rng.standard_normal(s) for k, s in m.PARAMS.items()}
    saved_i = {k: v.copy() for k, v in inputs.items()}
    saved_p = {k: v.copy() for k, v in params.items()}
    loss1, grads1 = m.value_and_grad(params, inputs)
    m.forward(params, inputs)
    for k in inputs:
        np.testing.assert_array_equal(inputs[k], saved_i[k], err_msg=f"input {k} was mutated")
    for k in params:
        np.testing.assert_array_equal(params[k], saved_p[k], err_msg=f"param {k} was mutated")
    # read-only arrays work too, and give the same result
    for v in list(inputs.values()) + list(params.values()):
        v.flags.writeable = False
    loss2, grads2 = m.value_and_grad(params, inputs)
    assert loss2 == loss1
    for k in grads1:
        np.testing.assert_array_equal(grads2[k], grads1[k])


def test_non_contiguous_and_readonly_inputs(sink):
    params = sink.init_params(0, dtype=np.float64)
    inputs = sink_inputs(batch=5)
    expected_loss, expected = sink.value_and_grad(params, inputs)
    wide = np.zeros((5, 8))
    wide[:, ::2] = inputs["x"]
    odd = {"x": wide[:, ::2],                                    # strided view
           "labels": np.repeat(inputs["labels"], 2)[::2],         # strided int view
           "t": np.asfortranarray(inputs["t"])}                   # Fortran order
    oddp = {k: (np.asfortranarray(v) if v.ndim == 2 else v.copy()) for k, v in params.items()}
    oddp["W1"] = np.ascontiguousarray(params["W1"].T).T          # a transposed view
    for v in list(odd.values()) + list(oddp.values()) + [wide]:
        v.flags.writeable = False
    before = wide.copy()
    loss, grads = sink.value_and_grad(oddp, odd)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-13)
    for k in grads:
        np.testing.assert_allclose(grads[k], expected[k], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(wide, before)


# ----- numpy-only import ------------------------------------------------------------------------------
BLOCKER = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys
    BLOCKED = {"sympy", "jinja2", "backcomp", "mpmath"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: generated modules may import only numpy")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    spec = importlib.util.spec_from_file_location("generated", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import numpy as np
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((5, 4)), "labels": rng.integers(0, 3, 5), "t": rng.standard_normal((5, 2))}
    params = mod.init_params(0, dtype=np.float64)
    loss, grads = mod.value_and_grad(params, inputs)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"loss": float(loss), "grads": {k: v.tolist() for k, v in grads.items()}, "leaked": leaked}))
""")


def test_generated_module_runs_with_only_numpy(tmp_path):
    path = backcomp.write_module(kitchen_sink("numpy_only"), tmp_path / "numpy_only.py")
    source = path.read_text()
    imports = {m.group(1) for m in re.finditer(r"^\s*(?:import|from)\s+(\w+)", source, re.M)}
    assert imports <= {"numpy", "math"}, imports
    script = tmp_path / "run.py"
    script.write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([sys.executable, "-I", str(script), str(path)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["leaked"] == []
    m = backcomp.build(kitchen_sink("numpy_only"))
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((5, 4)), "labels": rng.integers(0, 3, 5), "t": rng.standard_normal((5, 2))}
    loss, grads = m.value_and_grad(m.init_params(0, dtype=np.float64), inputs)
    assert result["loss"] == float(loss)
    for k in grads:
        np.testing.assert_array_equal(np.array(result["grads"][k]), grads[k])


def test_blocker_really_blocks(tmp_path):
    """The numpy-only check is not vacuous: a module importing sympy fails under it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sympy\n")
    script = tmp_path / "run.py"
    script.write_text(BLOCKER)
    proc = subprocess.run([sys.executable, "-I", str(script), str(bad)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode != 0 and "blocked" in proc.stderr


# ----- determinism ------------------------------------------------------------------------------------
def test_same_graph_built_twice_gives_identical_source():
    a = backcomp.compile_source(kitchen_sink())
    b = backcomp.compile_source(kitchen_sink())
    assert a == b
    assert backcomp.compile_source(kitchen_sink(), opt_level=0) == backcomp.compile_source(kitchen_sink(), opt_level=0)


HASHSEED_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import backcomp
    from test_module import kitchen_sink
    sys.stdout.write(backcomp.compile_source(kitchen_sink()))
""")


def test_source_is_identical_across_hash_seeds(tmp_path):
    outputs = []
    for seed in ("0", "1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed, BACKCOMP_CACHE=str(tmp_path / "cache"))
        proc = subprocess.run([sys.executable, "-c", HASHSEED_SCRIPT, str(REPO), str(Path(__file__).parent)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0] == backcomp.compile_source(kitchen_sink())


# ----- the build cache ---------------------------------------------------------------------------------
def test_build_cache_returns_the_same_module_quickly(monkeypatch):
    g1 = kitchen_sink("cached")
    m1 = backcomp.build(g1)
    t0 = time.perf_counter()
    m2 = backcomp.build(kitchen_sink("cached"))       # an equal graph, built anew
    elapsed = time.perf_counter() - t0
    assert m2 is m1
    assert elapsed < 0.5
    # a new process has no in-memory cache: the file cache answers without compiling
    monkeypatch.setattr(compiler, "_MEMORY", {})
    monkeypatch.setattr(compiler, "lower_graph", lambda *a, **k: pytest.fail("recompiled a cached model"))
    m3 = backcomp.build(kitchen_sink("cached"))
    p = m3.init_params(0, dtype=np.float64)
    assert m3.value_and_grad(p, sink_inputs())[0] == m1.value_and_grad(p, sink_inputs())[0]


def test_build_cache_distinguishes_different_graphs():
    def model(width):
        g = backcomp.Graph("cache_key")
        x = g.input("x", ("B", 3))
        W = g.param("W", (3, width))
        g.loss(ops.sum(ops.tanh(x @ W)))
        return g

    m3, m4 = backcomp.build(model(3)), backcomp.build(model(4))
    assert m3 is not m4
    assert m3.PARAMS["W"] == (3, 3) and m4.PARAMS["W"] == (3, 4)
    g = model(3)
    g.loss_node.graph.wrt = ("W",)
    assert backcomp.build(model(3), opt_level=0) is not m3


def test_build_uses_the_cache_dir(_isolated_cache):
    g = backcomp.Graph("in_cache_dir")
    W = g.param("W", (2,))
    g.loss(ops.sum(W * W))
    m = backcomp.build(g)
    assert Path(m.__file__).resolve().parent == Path(_isolated_cache).resolve()


# ----- write_module -----------------------------------------------------------------------------------
def _tiny(name="tiny"):
    g = backcomp.Graph(name)
    W = g.param("W", (2,))
    g.loss(ops.sum(ops.exp(W)))
    return g


def test_write_module_writes_and_overwrites_its_own_files(tmp_path):
    path = tmp_path / "tiny.py"
    assert backcomp.write_module(_tiny(), path) == path
    first = path.read_text()
    assert "generated by backcomp" in first[:400]
    backcomp.write_module(_tiny(), path)                           # its own file: no force needed
    assert path.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.py"]   # no temp files left


def test_written_modules_have_ordinary_permissions(tmp_path):
    """mkstemp makes 0600 files: a new module gets the umask's mode, a replaced one keeps its own."""
    path = tmp_path / "tiny.py"
    umask = os.umask(0o022)
    try:
        backcomp.write_module(_tiny(), path)
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o664)
        backcomp.write_module(_tiny(), path)
        assert path.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(umask)


def test_write_module_refuses_to_overwrite_a_user_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def my_code():\n    return 42\n")
    with pytest.raises(FileExistsError, match="not generated by backcomp"):
        backcomp.write_module(_tiny(), path)
    assert path.read_text() == "def my_code():\n    return 42\n"
    backcomp.write_module(_tiny(), path, force=True)
    assert "generated by backcomp" in path.read_text()[:400]


def test_write_module_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "tiny.py"
    backcomp.write_module(_tiny(), path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(compiler.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        backcomp.write_module(_tiny("other"), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.py"]


def test_write_module_compile_error_leaves_target_untouched(tmp_path):
    path = tmp_path / "broken.py"
    g = backcomp.Graph("broken")
    g.param("W", (2,))                          # neither a loss nor outputs
    with pytest.raises(backcomp.GraphError):
        backcomp.write_module(g, path)
    assert not path.exists()


def test_written_module_imports_and_matches_build(tmp_path):
    path = backcomp.write_module(kitchen_sink("written"), tmp_path / "written.py")
    mod = compiler.import_path(path, "written_for_test")
    built = backcomp.build(kitchen_sink("written"))
    p = built.init_params(0, dtype=np.float64)
    la, ga = mod.value_and_grad(p, sink_inputs())
    lb, gb = built.value_and_grad(p, sink_inputs())
    assert la == lb and all(np.array_equal(ga[k], gb[k]) for k in ga)


# ----- generated names ------------------------------------------------------------------------------
def test_unfused_erf_node_does_not_shadow_the_erf_helper():
    g = backcomp.Graph("erf_matmul")
    w = g.param("w", (3,))
    v = g.param("v", (3,))
    g.loss(ops.erf(w) @ v)
    m = backcomp.build(g)
    loss, grads = m.value_and_grad({"w": np.ones(3), "v": np.ones(3)}, {})
    np.testing.assert_allclose(loss, 3 * 0.8427007929497149, rtol=1e-12)


def test_user_names_that_clash_with_module_names_still_work():
    """Names the generated code uses itself (np, params, grads, dims, B, ...) are renamed, not shadowed."""
    g = backcomp.Graph("clashes")
    x = g.input("inputs", ("B", 2))
    np_ = g.param("np", (2,))
    grads = g.param("grads", (2,))
    h = g.assign_name("params", x * np_)
    h2 = g.assign_name("dims", h + grads)
    g.loss(ops.sum(g.assign_name("B_", ops.tanh(h2))), name="value_and_grad")
    m = backcomp.build(g)
    X = np.ones((3, 2))
    loss, gr = m.value_and_grad({"np": np.full(2, 0.5), "grads": np.zeros(2)}, {"inputs": X})
    np.testing.assert_allclose(loss, 6 * np.tanh(0.5), rtol=1e-12)
    np.testing.assert_allclose(gr["grads"], 3 * (1 - np.tanh(0.5) ** 2) * np.ones(2), rtol=1e-12)


def test_build_cache_sees_a_changed_user_op_rule():
    """The cache key covers rules defined outside backcomp: a new rule, a new module."""
    from backcomp.compiler import _MEMORY

    def make(factor):
        ops.unregister_op("times_k")
        ops.register_op(ops.OpDef("times_k", lambda ins, a: (ins[0].shape, "float"),
                                  lambda n, args, out: [f"{out} = {args[0]} * {factor}"],
                                  lambda n, ct: [ct * factor]))
        g = backcomp.Graph("times_k_model")
        x = g.param("x", (2,))
        g.loss(ops.sum(ops.apply("times_k", x)))
        return g

    try:
        first = backcomp.build(make(3)).forward({"x": np.ones(2)}, {})["loss"]
        _MEMORY.clear()                        # as in a new process: only the disk cache is left
        second = backcomp.build(make(2)).forward({"x": np.ones(2)}, {})["loss"]
        assert (float(first), float(second)) == (6.0, 4.0)
    finally:
        ops.unregister_op("times_k")


_FAULTS = """
import importlib.util, resource, sys
import numpy as np
spec = importlib.util.spec_from_file_location("m", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
p = m.init_params(seed=0)
i = {"x": np.ones((8192, 64), np.float32), "y": np.zeros((8192, 64), np.float32)}
for _ in range(3):
    m.value_and_grad(p, i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    m.value_and_grad(p, i)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's dynamic mmap threshold")
def test_large_temporaries_reuse_memory_instead_of_page_faulting(tmp_path):
    """A step whose temporaries are 2 MiB each: with the module's import-time warm-up,
    glibc recycles them (a few page faults per step); without it, every step faults
    each of them in afresh (256 per MiB of 4 KiB pages).  The child runs with glibc's
    default malloc: no MALLOC_* or GLIBC_TUNABLES settings, no preloaded allocator."""
    g = backcomp.Graph("wide")
    x, y = g.input("x", (8192, 64)), g.input("y", (8192, 64))
    h = ops.tanh(x @ g.param("W1", (64, 64)))
    g.loss(ops.mean((ops.tanh(h @ g.param("W2", (64, 64))) - y) ** 2))
    text = compiler.compile_source(g)
    warm = "np.empty(30 << 20, np.uint8)\n"
    assert warm in text
    (tmp_path / "warm.py").write_text(text)
    (tmp_path / "cold.py").write_text(text.replace(warm, ""))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    faults = {}
    for name in ("warm", "cold"):
        run = subprocess.run([sys.executable, "-c", _FAULTS, str(tmp_path / f"{name}.py")],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        faults[name] = float(run.stdout)
    assert faults["warm"] < 100 and faults["cold"] > 1000, faults
