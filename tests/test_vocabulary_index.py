"""Issue 10, second slice: symbolic dims as values, gathering by ids, array constants.

- dims bound by the inputs are numbers in expressions (``sum(x) / B``), sizes in
  shapes (``zeros((B, 4))``) and slice bounds (``P[:T]``, checked when the module runs);
  they share the namespace of values;
- ``take`` / ``embedding`` / ``one_hot``: values and gradients against PyTorch on the same
  arrays, repeated and negative ids accumulating, finite differences, ids out of range
  a ValueError naming the input, the scatter-add helper against ``np.add.at``;
- ``zeros``/``ones``/``full``/``eye``/``arange``/``tril``/``triu``: values, the model's
  dtype, gradients, a causal attention against PyTorch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backcomp
from backcomp import ops
from backcomp.runtime import _scatter_add
from backcomp.spec import SpecError, parse_spec

from conftest import gradcheck

RTOL = 1e-10


def spec(graph: str, inputs: str, params: str, loss: str = "loss", extra: str = "") -> str:
    return (f'[model]\nname = "m"\nloss = "{loss}"\n{extra}[inputs]\n{inputs}\n[params]\n{params}\n'
            f'[graph]\n{graph}\n')


# ----- symbolic dims as values ---------------------------------------------------------------
def test_a_dim_is_a_number_in_expressions():
    g = parse_spec(spec('loss = "sum(x * W) / B + mean(x) * T / (B * T)"', 'x = ["B", "T", 3]', "W = [3]"), "m.toml")
    module = backcomp.build(g)
    rng = np.random.default_rng(0)
    for b, t in ((2, 5), (7, 1)):
        x, W = rng.normal(size=(b, t, 3)), rng.normal(size=3)
        loss, grads = module.value_and_grad({"W": W}, {"x": x})
        np.testing.assert_allclose(loss, np.sum(x * W) / b + x.mean() * t / (b * t), rtol=RTOL)
        np.testing.assert_allclose(grads["W"], x.sum(axis=(0, 1)) / b, rtol=RTOL)
    gradcheck(g)


def test_dims_in_shapes_and_slices():
    g = parse_spec(spec('h = "x + P[:T]"\nz = "zeros((B, T, 4)) + h"\nloss = "sum(reshape(z, (B, T * 4)) ** 2)"',
                        'x = ["B", "T", 4]', "P = [6, 4]"), "m.toml")
    module = gradcheck(g, batch=3)
    rng = np.random.default_rng(1)
    x, P = rng.normal(size=(2, 5, 4)), rng.normal(size=(6, 4))
    loss, grads = module.value_and_grad({"P": P}, {"x": x})
    np.testing.assert_allclose(loss, np.sum((x + P[:5]) ** 2), rtol=RTOL)
    expected = np.zeros_like(P)
    expected[:5] = 2 * (x + P[:5]).sum(axis=0)
    np.testing.assert_allclose(grads["P"], expected, rtol=RTOL)
    with pytest.raises(ValueError, match=r"T=7 exceeds 6, the size of axis 0 of a \(6, 4\) value sliced \[:T\]"):
        module.forward({"P": P}, {"x": rng.normal(size=(2, 7, 4))})


def test_dim_names_share_the_namespace_of_values():
    with pytest.raises(SpecError, match=r"m.toml:\d+:\d+: error: dimension 'B' of input 'x' has the name of a value "
                                        r"in \[constants\]"):
        parse_spec(spec('loss = "sum(x * W)"', 'x = ["B", 3]', "W = [3]", extra="[constants]\nB = 2\n"), "m.toml")
    with pytest.raises(SpecError, match=r"'B' is a dimension of input 'x'"):
        parse_spec(spec('B = "x * W"\nloss = "sum(B)"', 'x = ["B", 3]', "W = [3]"), "m.toml")


def test_an_unknown_dim_in_a_shape_is_located():
    with pytest.raises(SpecError, match=r"m.toml:\d+:\d+: error: .*'H'"):
        parse_spec(spec('loss = "sum(zeros((B, H)) + x * W)"', 'x = ["B", 3]', "W = [3]"), "m.toml")


# ----- take, embedding, one_hot --------------------------------------------------------------
def test_scatter_add_helper_matches_add_at():
    rng = np.random.default_rng(2)
    for n_ids, n, width in ((0, 5, 3), (10, 5, 3), (65, 7, 2), (1000, 13, 8), (300, 1000, 4)):
        ids = rng.integers(0, n, n_ids)
        rows = rng.normal(size=(n_ids, width)).astype(np.float32)
        expected = np.zeros((n, width), np.float32)
        np.add.at(expected, ids, rows)
        got = _scatter_add(ids, rows, n)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_take_matches_torch_with_repeated_and_negative_ids(axis):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 5, 6))
    n = a.shape[axis]
    ids = np.array([[0, n - 1, 0], [-1, 2, 0]])   # repeated, negative
    g = backcomp.Graph("take_case")
    A = g.param("A", a.shape)
    I = g.input("ids", ids.shape, dtype="int")
    C = g.input("c", a.shape[:axis % 3] + ids.shape + a.shape[axis % 3 + 1:])
    g.loss(ops.sum(ops.take(A, I, axis=axis) * C))
    module = backcomp.build(g)
    c = rng.normal(size=C.shape)
    loss, grads = module.value_and_grad({"A": a}, {"ids": ids, "c": c})
    ta = torch.tensor(a, requires_grad=True)
    moved = ta.movedim(axis, 0)[torch.tensor(ids % n)].movedim(tuple(range(2)), tuple(range(axis % 3, axis % 3 + 2)))
    ref = (moved * torch.tensor(c)).sum()
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["A"], ta.grad.numpy(), rtol=RTOL)
    gradcheck(g)


def test_embedding_matches_torch_and_checks_ids():
    g = parse_spec(spec('h = "embedding(ids, E)"\nloss = "sum(tanh(h @ W))"',
                        'ids = { shape = ["B", "T"], dtype = "int64" }', "E = [7, 4]\nW = [4, 2]"), "m.toml")
    module = gradcheck(g, batch=4)
    rng = np.random.default_rng(4)
    E, W = rng.normal(size=(7, 4)), rng.normal(size=(4, 2))
    ids = np.array([[1, 1, 6], [0, 1, 1]])
    loss, grads = module.value_and_grad({"E": E, "W": W}, {"ids": ids})
    tE, tW = torch.tensor(E, requires_grad=True), torch.tensor(W, requires_grad=True)
    ref = torch.tanh(F.embedding(torch.tensor(ids), tE) @ tW).sum()
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["E"], tE.grad.numpy(), rtol=RTOL)
    np.testing.assert_allclose(grads["W"], tW.grad.numpy(), rtol=RTOL)
    assert module.INDEX_RANGES == {"ids": (-7, 7)}
    with pytest.raises(ValueError, match=r"input 'ids' holds 7 at index \(1, 2\), outside the allowed range \[-7, 7\)"):
        module.forward({"E": E, "W": W}, {"ids": np.array([[0, 1, 2], [3, 4, 7]])})
    f32 = module.value_and_grad({"E": E.astype(np.float32), "W": W.astype(np.float32)}, {"ids": ids})
    assert f32[0].dtype == np.float32 and f32[1]["E"].dtype == np.float32


def test_one_hot_matches_torch():
    g = parse_spec(spec('loss = "sum((one_hot(y, 5) @ W) ** 2)"', 'y = { shape = ["B"], dtype = "int64" }', "W = [5, 3]"),
                   "m.toml")
    module = gradcheck(g)
    y = np.array([4, 0, 4, 2])
    W = np.random.default_rng(5).normal(size=(5, 3))
    oh = F.one_hot(torch.tensor(y), 5).double().numpy()
    loss, grads = module.value_and_grad({"W": W}, {"y": y})
    np.testing.assert_allclose(loss, np.sum((oh @ W) ** 2), rtol=RTOL)
    np.testing.assert_allclose(grads["W"], 2 * oh.T @ (oh @ W), rtol=RTOL)
    assert module.INDEX_RANGES == {"y": (0, 5)}
    with pytest.raises(ValueError, match="input 'y' holds -1"):
        module.forward({"W": W}, {"y": np.array([-1, 0])})


def test_take_grad_is_differentiable_again():
    """take's VJP (a scatter-add) has a VJP of its own, a take: the pair is closed."""
    g = backcomp.Graph("second")
    E = g.param("E", (5, 3))
    ids = g.input("ids", ("B",), dtype="int")
    c = g.input("c", ("B", 3))
    scattered = g.apply("take_grad", (c * ops.sum(E), ids), axis=0, shape=(5, 3))
    g.loss(ops.sum(ops.sin(scattered) * E))
    gradcheck(g, batch=6)


def test_take_errors_are_located():
    with pytest.raises(SpecError, match=r"m.toml:\d+:\d+: error: take: ids must be an integer input"):
        parse_spec(spec('loss = "sum(take(W, x))"', 'x = ["B", 3]', "W = [3]"), "m.toml")
    with pytest.raises(SpecError, match=r"m.toml:\d+:\d+: error: argument 'n' of one_hot\(\) must be positive"):
        parse_spec(spec('loss = "sum(one_hot(y, 0) * W)"', 'y = { shape = ["B"], dtype = "int64" }', "W = [3]"),
                   "m.toml")


# ----- array constants ------------------------------------------------------------------------
def test_constants_values_and_dtype():
    g = parse_spec(spec('a = "zeros((B, 3)) + ones((B, 3)) * 2 + full((B, 3), 0.25) + x * W"\n'
                        'e = "eye(3) @ V"\nm = "tril(ones((3, 3)), k=-1) + triu(ones((3, 3)), k=1)"\n'
                        'loss = "sum(a) + sum(e) + sum(m * V)"',
                        'x = ["B", 3]', "W = [3]\nV = [3, 3]", extra='outputs = ["a", "e", "m", "loss"]\n'), "m.toml")
    module = gradcheck(g)
    rng = np.random.default_rng(6)
    x, W, V = rng.normal(size=(2, 3)), rng.normal(size=3), rng.normal(size=(3, 3))
    for dtype in (np.float64, np.float32):
        out = module.forward({"W": W.astype(dtype), "V": V.astype(dtype)}, {"x": x.astype(dtype)})
        assert all(v.dtype == dtype for v in out.values()), {k: v.dtype for k, v in out.items()}
    out = module.forward({"W": W, "V": V}, {"x": x})
    np.testing.assert_allclose(out["a"], 2.25 + x * W, rtol=RTOL)
    np.testing.assert_allclose(out["e"], V, rtol=RTOL)
    np.testing.assert_allclose(out["m"], np.ones((3, 3)) - np.eye(3), rtol=RTOL)
    loss, grads = module.value_and_grad({"W": W, "V": V}, {"x": x})
    np.testing.assert_allclose(grads["V"], 1 + np.ones((3, 3)) - np.eye(3), rtol=RTOL)


def test_arange_ids_and_a_causal_mask_match_torch():
    """A single-head causal attention with positions from arange(T), against PyTorch."""
    g = parse_spec(spec(
        'h = "x + take(P, arange(T))"\n'
        's = "where(tril(ones((T, T))) > 0, h @ transpose(h, (0, 2, 1)), -1e9)"\n'
        'loss = "sum(softmax(s, axis=-1) @ h)"',
        'x = ["B", "T", 4]', "P = [8, 4]"), "m.toml")
    module = gradcheck(g)
    rng = np.random.default_rng(7)
    x, P = rng.normal(size=(2, 5, 4)), rng.normal(size=(8, 4))
    loss, grads = module.value_and_grad({"P": P}, {"x": x})
    tP = torch.tensor(P, requires_grad=True)
    h = torch.tensor(x) + tP[torch.arange(5)]
    s = (h @ h.transpose(1, 2)).masked_fill(~torch.tril(torch.ones(5, 5, dtype=torch.bool)), -1e9)
    ref = (torch.softmax(s, -1) @ h).sum()
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["P"], tP.grad.numpy(), rtol=RTOL)


def test_tril_triu_gradients():
    g = backcomp.Graph("tri")
    W = g.param("W", (4, 4))
    x = g.input("x", ("B", 4, 4))
    g.loss(ops.sum(ops.tril(x * W, k=1) ** 2) + ops.sum(ops.triu(ops.sin(W), k=-1)))
    gradcheck(g)


def test_constants_need_a_graph_in_the_builder():
    with pytest.raises(backcomp.GraphError, match=r"zeros\(\) makes a new array: pass the graph"):
        ops.zeros((2, 3))
    g = backcomp.Graph("c")
    W = g.param("W", (2, 3))
    g.loss(ops.sum(ops.full((2, 3), 0.5, graph=g) * W))
    module = backcomp.build(g)
    loss, grads = module.value_and_grad({"W": np.ones((2, 3))}, {})
    assert loss == 3.0
    np.testing.assert_array_equal(grads["W"], np.full((2, 3), 0.5))


# ----- forward mode: the JVP rules of the linear ops here -------------------------------------
def _take_graph():
    g = backcomp.Graph("take_jvp")
    A = g.param("A", (5, 3))
    ids = g.input("ids", ("B", 2), dtype="int")
    u = g.input("u", ("B", 2, 3))
    g.loss(ops.sum(ops.take(ops.sin(A), ids) * u))
    return g


def _take_grad_graph():
    g = backcomp.Graph("take_grad_jvp")
    C = g.param("C", (4, 3))
    ids = g.input("ids", (4,), dtype="int")
    u = g.input("u", (6, 3))
    g.loss(ops.sum(g.apply("take_grad", (ops.tanh(C), ids), axis=0, shape=(6, 3)) * u))
    return g


def _triangle_graph(op):
    def build():
        g = backcomp.Graph(f"{op}_jvp")
        W = g.param("W", (4, 4))
        u = g.input("u", ("B", 4, 4))
        g.loss(ops.sum(getattr(ops, op)(ops.exp(W), k=-1) * u))
        return g
    return build


#: graphs of the form sum(op(...) * u) whose op has a JVP rule (test_jvp checks each is reached)
JVP_GRAPHS = {"take": _take_graph, "take_grad": _take_grad_graph, "tril": _triangle_graph("tril"),
              "triu": _triangle_graph("triu")}


@pytest.mark.parametrize("name", sorted(JVP_GRAPHS))
def test_jvp_of_gathers_and_triangles(name):
    from test_jvp import check_jvp
    check_jvp(JVP_GRAPHS[name](), {})


# ----- batch separability (backcomp.dask) of the new ops ------------------------------------
def test_separability_of_gathers_and_constants():
    from backcomp.passes.separability import analyse
    ids = 'ids = { shape = ["B", "T"], dtype = "int64" }'
    ok = parse_spec(spec('h = "embedding(ids, E) + take(P, arange(T)) + zeros((B, T, 4))"\n'
                         'loss = "mean(tril(ones((T, T))) @ h) + sum(one_hot(ids, 6) @ E)"', ids,
                         "E = [6, 4]\nP = [8, 4]"), "m.toml")
    assert analyse(ok).separable
    for graph, why in (('h = "take(P, arange(B))"\nloss = "sum(h) + sum(E)"', "numbers the rows of the batch"),
                       ('h = "P[:B]"\nloss = "sum(h) + sum(E)"', "takes the first B entries")):
        result = analyse(parse_spec(spec(graph, ids, "E = [6, 4]\nP = [8, 4]"), "m.toml"))
        assert not result.separable and why in result.refusal, result.refusal


def test_integer_masks_from_comparisons():
    """Integers may be compared (a padding mask from ids, a causal mask from positions)."""
    g = parse_spec(spec('pos = "arange(T)"\nkeep = "where(ids > 0, 1.0, 0.0)"\n'
                        's = "where(pos[:, None] >= pos[None, :], x @ transpose(x, (0, 2, 1)), -1e9)"\n'
                        'loss = "sum(softmax(s, axis=-1) * W[:T, :T]) + sum(keep * mean(x, axis=-1))"',
                        'x = ["B", "T", 3]\nids = { shape = ["B", "T"], dtype = "int64" }', "W = [4, 4]"), "m.toml")
    module = backcomp.build(g)
    rng = np.random.default_rng(9)
    x, ids, W = rng.normal(size=(2, 4, 3)), rng.integers(0, 3, (2, 4)), rng.normal(size=(4, 4))
    loss, _ = module.value_and_grad({"W": W}, {"x": x, "ids": ids})
    s = np.where(np.tril(np.ones((4, 4))) > 0, x @ x.transpose(0, 2, 1), -1e9)
    e = np.exp(s - s.max(-1, keepdims=True))
    expected = np.sum(e / e.sum(-1, keepdims=True) * W) + np.sum((ids > 0) * x.mean(-1))
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    with pytest.raises(SpecError, match="integer input 'ids' has no gradient and cannot be used in arithmetic"):
        parse_spec(spec('loss = "sum(ids * W)"', 'ids = { shape = ["B", 4], dtype = "int64" }', "W = [4]"), "m.toml")


def test_scatter_add_merges_negative_ids_with_their_rows():
    """take accepts ids in [-n, n): -1 and n-1 are the same row, on both paths of the helper."""
    for count in (10, 40):   # np.add.at below 65 ids, sort + reduceat above
        ids = np.array([-1] * count + [4] * count + [0] * count)
        got = _scatter_add(ids, np.ones((ids.size, 2)), 5)
        np.testing.assert_array_equal(got[:, 0], [count, 0, 0, 0, 2 * count])
