"""backcomp.dask and the separability analysis behind it.

Every result is compared with the module's own value_and_grad on the concatenated
data (float64, rtol 1e-10): uneven chunks, one chunk, each Dask scheduler and a
LocalCluster of two processes; every model that mixes rows is refused naming the
node that does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.passes.separability import analyse, check_separable

da = pytest.importorskip("dask.array")   # in the test extra: never skipped in CI
import backcomp.dask as bd  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPECS = sorted(EXAMPLES.glob("*.toml"))
NOT_SEPARABLE = {"logistic_l2": "no input has a symbolic leading dim",
                 "vae": "draws random numbers",                                   # normal((B, Z))
                 "digits_bn_cnn": "applies mode_select to a sum or mean over the batch",   # batch norm
                 "gpt_char": "applies 'unignore_label'",   # cross_entropy's mean over non-ignored rows
                 **{name: "loops are not analysed for separability" for name in ("char_lstm", "gru", "lstm", "rnn")}}
RTOL = 1e-10


# ----- helpers -----------------------------------------------------------------------------
def draw_inputs(module, rows: int, seed: int = 0, other_dims: int = 3) -> dict[str, np.ndarray]:
    """Float64 values (and labels in INDEX_RANGES) for every input, ``rows`` in the batch."""
    rng = np.random.default_rng(seed)
    dims: dict[str, int] = {}
    out = {}
    for name, shape in module.INPUTS.items():
        shape = tuple(rows if d == module.BATCH_DIM else dims.setdefault(d, other_dims) if isinstance(d, str)
                      else d for d in shape)
        if module.INPUT_KINDS[name] == "int":
            out[name] = rng.integers(0, module.INDEX_RANGES[name][1], shape)
        else:
            out[name] = rng.standard_normal(shape)
    return out


def float64_params(module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {k: v.astype(np.float64) + 0.1 * rng.standard_normal(v.shape)
            for k, v in module.init_params(seed).items()}


def chunked(module, data: dict, chunks) -> dict:
    """The batch inputs as dask arrays with ``chunks`` along the batch axis."""
    out = {}
    for name, value in data.items():
        axis = module.BATCH_AXES.get(name)
        if axis is None:
            out[name] = value
        else:
            out[name] = da.from_array(value, chunks=tuple(chunks if i == axis else -1 for i in range(value.ndim)))
    return out


def assert_matches(module, params, data, result):
    loss, grads = result
    want_loss, want_grads = module.value_and_grad(params, data)
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    assert sorted(grads) == sorted(want_grads)
    for k in want_grads:
        assert isinstance(grads[k], np.ndarray) and grads[k].dtype == want_grads[k].dtype
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=RTOL, atol=RTOL * np.abs(want_grads[k]).max(),
                                   err_msg=k)


def graph_model(build, name="m", x_shape=("B", 4)):
    g = backcomp.Graph(name)
    x = g.input("x", x_shape)
    W = g.param("W", (x_shape[-1], 3))
    g.loss(build(g, x, W))
    return g


# ----- every example ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_every_example_matches_or_is_refused(spec):
    module = backcomp.build(spec)
    params = float64_params(module)
    if not module.BATCH_SEPARABLE:
        assert spec.stem in NOT_SEPARABLE, module.BATCH_REFUSAL
        assert NOT_SEPARABLE[spec.stem] in module.BATCH_REFUSAL
        with pytest.raises(ValueError, match=f"model '{spec.stem}' is not batch-separable"):
            bd.value_and_grad(module, params, draw_inputs(module, 1))
        return
    data = draw_inputs(module, 23)
    for chunks in ((5, 1, 11, 6), 23):   # uneven chunks (one of a single row), one chunk
        assert_matches(module, params, data,
                       bd.value_and_grad(module, params, chunked(module, data, chunks), scheduler="sync"))
    np.testing.assert_allclose(bd.loss(module, params, chunked(module, data, 7), scheduler="sync"),
                               module.value_and_grad(params, data)[0], rtol=RTOL)


def test_float32_stays_float32():
    module = backcomp.build(EXAMPLES / "mlp.toml")
    params = module.init_params(0)
    data = {k: v.astype(np.float32) for k, v in draw_inputs(module, 40).items()}
    loss, grads = bd.value_and_grad(module, params, chunked(module, data, 16), scheduler="sync")
    want, want_grads = module.value_and_grad(params, data)
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for k in grads:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-4, atol=1e-6)


# ----- losses of every separable form -------------------------------------------------------
def _sum_no_mean(g, x, W):
    return ops.sum(ops.tanh(x @ W))                                    # no 1/N


def _two_means(g, x, W):
    return ops.mean(ops.tanh(x @ W)) + ops.mean(x @ W, axis=0)[1] * 0.5 - 0.25 * ops.sum(W ** 2)


def _gram(g, x, W):
    return ops.sum((x.T @ ops.sigmoid(x @ W)) * 0.1) / 3 + ops.sum(W)   # Σ_rows of per-row outer products


def _mean_over_rows_and_features(g, x, W):
    h = g.assign_name("h", ops.relu(x @ W) + ops.exp(-ops.mean(x, axis=-1, keepdims=True)))
    return 2.0 * ops.mean(h) - ops.sum(W ** 3) + 1.0


def _per_row_then_weighted(g, x, W):
    r = g.assign_name("r", ops.softmax(x @ W, axis=-1))                # softmax over features: per row
    return ops.sum(ops.mean(r, axis=0) * ops.sum(W, axis=0)) + ops.sum(ops.log1p(r ** 2)) / 9


@pytest.mark.parametrize("build", [_sum_no_mean, _two_means, _gram, _mean_over_rows_and_features,
                                   _per_row_then_weighted], ids=lambda f: f.__name__.strip("_"))
def test_separable_forms_match(build):
    module = backcomp.build(graph_model(build, build.__name__.strip("_")))
    assert module.BATCH_SEPARABLE, module.BATCH_REFUSAL
    params, data = float64_params(module), draw_inputs(module, 30)
    assert_matches(module, params, data,
                   bd.value_and_grad(module, params, chunked(module, data, (9, 9, 2, 10)), scheduler="sync"))


def test_mean_over_a_sequence_axis_divides_by_rows_times_steps():
    """x (B, T, D) with T symbolic: mean over everything divides by B·T, chunks split B only;
    a (D,) input without the batch dim is broadcast to every chunk, not chunked."""
    g = backcomp.Graph("seq")
    x = g.input("x", ("B", "T", 4))
    shift = g.input("shift", (4,))
    W = g.param("W", (4, 2))
    g.loss(ops.mean(ops.tanh((x - shift) @ W)) + ops.sum(W ** 2) * 1e-3)
    module = backcomp.build(g)
    assert module.BATCH_AXES == {"x": 0}
    params = float64_params(module)
    data = draw_inputs(module, 17, other_dims=5)
    assert_matches(module, params, data,
                   bd.value_and_grad(module, params, chunked(module, data, 4), scheduler="sync"))


def test_batch_on_another_axis_of_an_input():
    g = backcomp.Graph("cols")
    x = g.input("x", ("B", 3))
    t = g.input("t", (2, "B"))              # targets stored column-wise
    W = g.param("W", (3, 2))
    g.loss(ops.mean((x @ W - t.T) ** 2))
    module = backcomp.build(g)
    assert module.BATCH_AXES == {"x": 0, "t": 1}
    params, data = float64_params(module), draw_inputs(module, 21)
    assert_matches(module, params, data,
                   bd.value_and_grad(module, params, chunked(module, data, (8, 13)), scheduler="sync"))


# ----- refusals ------------------------------------------------------------------------------
BN_SPEC = """
[model]
name = "bn"
[inputs]
x = ["B", 4]
t = ["B"]
[params]
W = [4, 3]
w = [3]
[graph]
z = "x @ W"
h = "(z - mean(z, axis=0)) / sqrt(mean(z ** 2, axis=0) + 1e-5)"
loss = "mean((h @ w - t) ** 2)"
"""

REFUSED = {
    "softmax_over_batch": (lambda g, x, W: ops.sum(g.assign_name("p", ops.softmax(x @ W, axis=0)) * 2),
                           "a max over axis 0 inside node 'p' mixes rows of the batch"),
    "square_of_mean": (lambda g, x, W: g.assign_name("m2", ops.mean(x @ W) ** 2) + 0,
                       "node 'm2' is a nonlinear function of a sum or mean over the batch"),
    "reversed_rows": (lambda g, x, W: ops.mean(g.assign_name("r", x[::-1]) * x @ W),
                      r"node 'r' \(getitem\) selects or reorders rows"),
    "all_pairs": (lambda g, x, W: ops.mean(g.assign_name("k", x @ x.T)) + ops.sum(W),
                  r"node 'k' \(matmul\) pairs each row of the batch with every other row"),
    "max_over_batch": (lambda g, x, W: ops.sum(g.assign_name("worst", ops.max(x @ W, axis=0))),
                       r"node 'worst' \(max over axis 0\) mixes rows"),
    "params_only": (lambda g, x, W: ops.sum(W ** 2), "the loss 'loss' does not sum or average over the batch dim 'B'"),
}


@pytest.mark.parametrize("case", REFUSED, ids=str)
def test_models_that_mix_rows_are_refused_naming_the_node(case):
    build, message = REFUSED[case]
    graph = graph_model(build, case)
    with pytest.raises(ValueError, match=f"model '{case}' is not batch-separable: " + message):
        check_separable(graph)
    module = backcomp.build(graph)
    assert not module.BATCH_SEPARABLE and not hasattr(module, "partial_value_and_grad")
    data = chunked(module, draw_inputs(module, 10), 5)
    with pytest.raises(ValueError, match=message):
        bd.value_and_grad(module, float64_params(module), data)


def test_batch_norm_spec_is_refused_naming_its_node(tmp_path):
    path = tmp_path / "bn.toml"
    path.write_text(BN_SPEC)
    module = backcomp.build(path)
    assert module.BATCH_REFUSAL == ("model 'bn' is not batch-separable: node 'h' combines rows of the batch "
                                    "with a mean over axis 0 of them")
    with pytest.raises(ValueError, match="node 'h' combines rows"):
        bd.loss(module, float64_params(module), chunked(module, draw_inputs(module, 8), 4))
    assert module.BATCH_AXES == {"x": 0, "t": 0}   # the inputs still have a batch; the loss mixes it


def test_outputs_keep_their_batch_axis_only_when_row_wise():
    from backcomp.spec import load_spec
    info = analyse(load_spec(EXAMPLES / "mlp.toml"))
    assert info.separable and info.batch_dim == "B"
    assert info.axes == {"x": 0, "y": 0, "probs": 0}   # the loss is not row-wise


# ----- forward over chunks --------------------------------------------------------------------
def test_forward_is_lazy_and_matches():
    module = backcomp.build(EXAMPLES / "mlp.toml")
    params, data = float64_params(module), draw_inputs(module, 25)
    out = bd.forward(module, params, chunked(module, data, (10, 10, 5)))
    assert list(out) == ["probs"] and isinstance(out["probs"], da.Array)
    assert out["probs"].shape == (25, 4) and out["probs"].chunks[0] == (10, 10, 5)
    np.testing.assert_allclose(out["probs"].compute(scheduler="sync"), module.forward(params, data)["probs"],
                               rtol=RTOL)
    with pytest.raises(ValueError, match="output 'loss' is not computed row by row.*backcomp.dask.loss"):
        bd.forward(module, params, chunked(module, data, 5), outputs=["loss"])


# ----- arguments ------------------------------------------------------------------------------
def test_argument_errors():
    module = backcomp.build(EXAMPLES / "mlp.toml")
    params, data = float64_params(module), draw_inputs(module, 12)
    with pytest.raises(ValueError, match="missing 'y'"):
        bd.value_and_grad(module, params, {"x": data["x"]})
    with pytest.raises(ValueError, match="input 'y' has 11 rows .* input 'x' has 12"):
        bd.value_and_grad(module, params, {"x": da.from_array(data["x"]), "y": data["y"][:11]})
    unknown = da.from_array(data["x"], chunks=4)[da.from_array(data["x"][:, 0] > -10, chunks=4)]
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        bd.value_and_grad(module, params, {"x": unknown, "y": data["y"]})
    with pytest.raises(ValueError, match="expected a module generated by backcomp"):
        bd.value_and_grad(np, params, data)
    with pytest.raises(ValueError, match="split_every"):
        bd.value_and_grad(module, params, chunked(module, data, 4), split_every=1)


def test_inputs_chunked_differently_are_aligned():
    module = backcomp.build(EXAMPLES / "digits_mlp.toml")
    params, data = float64_params(module), draw_inputs(module, 50)
    x = da.from_array(data["x"], chunks=(13, 16))          # features split too
    labels = da.from_array(data["labels"], chunks=7)
    assert_matches(module, params, data,
                   bd.value_and_grad(module, params, {"x": x, "labels": labels}, scheduler="sync", split_every=2))


# ----- schedulers ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_local_schedulers(scheduler):
    module = backcomp.build(EXAMPLES / "digits_cnn.toml")
    params, data = float64_params(module), draw_inputs(module, 31)
    assert_matches(module, params, data,
                   bd.value_and_grad(module, params, chunked(module, data, (12, 12, 7)), scheduler=scheduler))


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=":0")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def test_local_cluster_of_two_processes(client, monkeypatch):
    """Params are scattered once per call (one scatter of module source, params and
    broadcast inputs), whatever the number of chunks; both workers run chunks."""
    module = backcomp.build(EXAMPLES / "mlp.toml")
    params, data = float64_params(module), draw_inputs(module, 40)
    scatters = []
    scatter = type(client).scatter
    monkeypatch.setattr(type(client), "scatter", lambda self, *a, **k: scatters.append(k) or scatter(self, *a, **k))
    assert_matches(module, params, data, bd.value_and_grad(module, params, chunked(module, data, (9, 9, 9, 13))))
    assert len(scatters) == 1 and scatters[0]["broadcast"]
    np.testing.assert_allclose(bd.loss(module, params, chunked(module, data, 11)),
                               module.value_and_grad(params, data)[0], rtol=RTOL)
    out = bd.forward(module, params, chunked(module, data, 16))["probs"].compute()
    np.testing.assert_allclose(out, module.forward(params, data)["probs"], rtol=RTOL)
    # the workers ran the module from its source, not from the file it was built into
    state = client.run(lambda: [k for k in __import__("sys").modules if k.startswith("backcomp_")])
    assert len(state) == 2 and any(state.values())
    assert all(k.startswith("backcomp_chunk_") for names in state.values() for k in names)


def test_local_cluster_refusal_and_broadcast_input(client):
    g = backcomp.Graph("shifted")
    x = g.input("x", ("B", 3))
    shift = g.input("shift", (3,))
    w = g.param("w", (3,))
    g.loss(ops.mean(ops.softplus((x - shift) @ w)))
    module = backcomp.build(g)
    params, data = float64_params(module), draw_inputs(module, 33)
    data["shift"] = da.from_array(data["shift"])             # a small dask input, computed and broadcast
    want = module.value_and_grad(params, {k: np.asarray(v) for k, v in data.items()})
    got = bd.value_and_grad(module, params, chunked(module, data, 10))
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(got[1]["w"], want[1]["w"], rtol=RTOL)


@pytest.mark.slow
def test_lbfgs_example_runs(tmp_path):
    """examples/dask_lbfgs.py --quick: a LocalCluster, L-BFGS on both models, the plot."""
    import subprocess
    import sys
    out = tmp_path / "lbfgs.png"
    root = EXAMPLES.parent
    run = subprocess.run([sys.executable, str(EXAMPLES / "dask_lbfgs.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    result = dict(kv.split("=") for kv in run.stdout.strip().splitlines()[-1].split()[1:])
    assert float(result["logistic_loss"]) < 0.69 and float(result["mlp_loss"]) < 0.69
    assert "Dask dashboard:" in run.stdout and out.stat().st_size > 0
