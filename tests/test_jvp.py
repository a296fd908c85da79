"""Forward mode: every op's JVP rule against central differences and against its own
VJP by the dot-product test ⟨u, J·t⟩ = ⟨Jᵀ·u, t⟩, in float64.

The op cases are test_ops.py's table (every registered op, broadcasting and symbolic
batch dims included) and its compiler-internal ops, plus the convolution family.
Each case's graph is ``loss = sum(op(...) * u)``; tangent inputs ``t_<param>`` seed
the JVP pass at every param, so one compiled module returns the op's output, its
tangent J·t, and ⟨u, J·t⟩ (the loss's tangent), while ``value_and_grad`` gives Jᵀ·u.
"""
from __future__ import annotations

import numpy as np
import pytest

import backcomp
from backcomp import ops
from backcomp.jvp import push_tangents
from backcomp.ops.conv import conv2d_grad_input, conv2d_grad_weight
from backcomp.ops.registry import registered_ops

from conftest import draw
from test_ops import CASES, DIRECT, VARIANTS, _direct, _shape_id, _sigmoid, build_case, unary

#: the elementwise ops whose gradient tests live in test_vocabulary.py
VOCABULARY = [
    unary("clip", lambda a: ops.clip(a, -0.5, 0.7), lambda a: np.clip(a, -0.5, 0.7), "nonzero"),
    unary("expm1", ops.expm1, np.expm1),
    unary("square", ops.square, np.square),
    unary("log_sigmoid", ops.log_sigmoid, lambda a: np.log(_sigmoid(a))),
    unary("silu", ops.silu, lambda a: a * _sigmoid(a)),
]
VARIANTS = VARIANTS + [pytest.param(c, s, id=f"{c.name}[{_shape_id(s)}]") for c in VOCABULARY for s in c.shapes]


def with_tangents(g: backcomp.Graph) -> dict:
    """Seed a tangent input at every param of a ``sum(op(...) * u)`` graph; outputs: the op's
    value ``out``, its tangent ``out_dot`` and the loss's tangent ``loss_dot``."""
    loss = g.loss_node
    out = loss.inputs[0].inputs[0]
    seeds = {p: g.input(f"t_{name}", p.shape) for name, p in g.params.items()}
    tangents = push_tangents(g, seeds, [out, loss])
    zero = lambda n: g.apply("zeros_like", (n,))   # noqa: E731
    g.output("out_", ops.identity(out))
    g.output("out_dot", tangents.get(out) or zero(out))
    g.output("loss_dot", tangents.get(loss) or zero(loss))
    return tangents


def check_jvp(g: backcomp.Graph, domains: dict, seed: int = 0, opt_level: int = 0):
    """J·t against central differences of the output, and ⟨u, J·t⟩ against ⟨Jᵀu, t⟩."""
    with_tangents(g)
    m = backcomp.build(g, opt_level=opt_level)
    params, inputs = draw(m, domains, batch=3, seed=seed)
    rng = np.random.default_rng(seed + 100)
    tans = {name: rng.standard_normal(p.shape) for name, p in params.items()}
    inputs = {**inputs, **{f"t_{k}": v for k, v in tans.items()}}
    res = m.forward(params, inputs)
    _, grads = m.value_and_grad(params, inputs)

    # dot-product test: the loss's tangent is ⟨u, J t⟩, the gradient gives ⟨Jᵀ u, t⟩
    adjoint = sum(float(np.vdot(grads[k], tans[k])) for k in grads)
    scale = max(1.0, abs(adjoint))
    assert abs(float(res["loss_dot"]) - adjoint) <= 1e-10 * scale, (float(res["loss_dot"]), adjoint)

    # central differences of the op's output along t
    h = 1e-6
    def at(s):
        return m.forward({k: v + s * tans[k] for k, v in params.items()}, inputs)["out_"]
    fd = (at(h) - at(-h)) / (2 * h)
    size = max(1.0, float(np.max(np.abs(fd), initial=0.0)))
    np.testing.assert_allclose(res["out_dot"], fd, rtol=1e-5, atol=1e-6 * size)
    return m


@pytest.mark.parametrize("case, shapes", VARIANTS)
def test_jvp_matches_finite_differences_and_vjp(case, shapes):
    g, domains, _ = build_case(case, shapes)
    check_jvp(g, domains, seed=len(case.name))


@pytest.mark.parametrize("name, build_fn, ref, leaves, int_inputs", DIRECT, ids=[d[0] for d in DIRECT])
def test_internal_op_jvp(name, build_fn, ref, leaves, int_inputs):
    g, domains, _ = _direct(name, build_fn, ref, leaves, int_inputs)
    check_jvp(g, {**domains, "labels": 4})


# ----- the convolution family and the internal ops of max ------------------------------------
def _conv_cases():
    """(id, builder(g, params) -> node, {param: (shape, domain)}); strides, padding, overlap."""
    def pool_idx(g, x, size, stride):
        m = ops.max_pool2d(x, size, stride)
        return g.apply("max_pool2d_argmax", (x, m), size=m.attrs["size"], stride=m.attrs["stride"])

    return [
        ("conv2d", lambda g, P: ops.conv2d(P["x"], P["w"]), {"x": ((2, 2, 5, 4), "real"), "w": ((3, 2, 3, 2), "real")}),
        ("conv2d_stride_pad", lambda g, P: ops.conv2d(P["x"], P["w"], stride=2, padding=1),
         {"x": ((2, 2, 6, 5), "real"), "w": ((3, 2, 3, 3), "real")}),
        ("conv2d_grad_input", lambda g, P: conv2d_grad_input(P["g"], P["w"], (5, 4), (1, 1), (1, 0)),
         {"g": ((2, 3, 5, 3), "real"), "w": ((3, 2, 3, 2), "real")}),
        ("conv2d_grad_weight", lambda g, P: conv2d_grad_weight(P["x"], P["g"], (3, 3), (2, 2), (1, 1)),
         {"x": ((2, 2, 6, 5), "real"), "g": ((2, 3, 3, 3), "real")}),
        ("max_pool2d", lambda g, P: ops.max_pool2d(P["x"], 2), {"x": ((2, 2, 4, 6), "distinct")}),
        ("max_pool2d_overlap", lambda g, P: ops.max_pool2d(P["x"], 3, 2), {"x": ((1, 2, 7, 5), "distinct")}),
        ("avg_pool2d", lambda g, P: ops.avg_pool2d(P["x"], (2, 3), 1), {"x": ((2, 2, 4, 6), "real")}),
        ("avg_pool2d_scatter", lambda g, P: g.apply("avg_pool2d_scatter", (P["g"],), in_shape=(2, 4, 5),
                                                   size=(2, 2), stride=(1, 2)),
         {"g": ((2, 2, 3, 2), "real")}),
        ("max_pool2d_scatter", lambda g, P: g.apply("max_pool2d_scatter", (P["g"], pool_idx(g, P["x"], 2, 1)),
                                                   in_shape=(2, 4, 5), size=(2, 2), stride=(1, 1)) * P["x"],
         {"g": ((2, 2, 3, 4), "real"), "x": ((2, 2, 4, 5), "distinct")}),
        ("max_pool2d_gather", lambda g, P: g.apply("max_pool2d_gather", (P["v"], pool_idx(g, P["x"], 2, 2)),
                                                  size=(2, 2), stride=(2, 2)),
         {"v": ((2, 2, 4, 6), "real"), "x": ((2, 2, 4, 6), "distinct")}),
        ("max_vjp", lambda g, P: g.apply("max_vjp", (P["x"], ops.max(P["x"], axis=1, keepdims=True), P["c"]),
                                         axes=(1,)),
         {"x": ((3, 4), "distinct"), "c": ((3, 1), "real")}),
        ("max_vjp_ties", lambda g, P: g.apply("max_vjp", (P["x"] * 0 + 1, ops.max(P["x"] * 0 + 1, axis=0,
                                                                                   keepdims=True), P["c"]),
                                              axes=(0,)) * P["x"],
         {"x": ((3, 4), "real"), "c": ((1, 4), "real")}),
    ]


CONV_CASES = _conv_cases()


def conv_graph(name, build_fn, leaves):
    g = backcomp.Graph(f"jvp_{name}")
    P = {k: g.param(k, shape) for k, (shape, _) in leaves.items()}
    out = build_fn(g, P)
    u = g.input("u", out.shape)
    g.loss(ops.sum(out * u))
    return g, {k: d for k, (_, d) in leaves.items()}


@pytest.mark.parametrize("name, build_fn, leaves", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_family_jvp(name, build_fn, leaves):
    g, domains = conv_graph(name, build_fn, leaves)
    check_jvp(g, domains)


def test_jvp_optimised_equals_unoptimised():
    """The passes keep tangents exact: one case with broadcasting, fusion and a reduction."""
    case = next(c for c in CASES if c.name == "softmax_cross_entropy_soft")
    for opt in (0, 1):
        g, domains, _ = build_case(case, case.shapes[1])
        check_jvp(g, domains, opt_level=opt)


# ----- coverage ------------------------------------------------------------------------------
def test_every_op_has_both_rules_or_says_why_not():
    """No op lacks a derivative rule: each has a VJP and a JVP, or neither and a reason."""
    bad = {name: (op.vjp is not None, op.jvp is not None) for name, op in registered_ops().items()
           if not ((op.vjp is not None and op.jvp is not None)
                   or (op.vjp is None and op.jvp is None and op.no_derivative))}
    assert not bad, f"ops with a missing rule (vjp?, jvp?): {bad}"


def test_every_jvp_rule_is_exercised():
    """The graphs above reach every op with a JVP rule with a tangent, so each rule runs."""
    seen: set[str] = set()
    graphs = [build_case(c, s)[0] for c in CASES + VOCABULARY for s in c.shapes[:1]]
    graphs += [_direct(*d)[0] for d in DIRECT]
    graphs += [conv_graph(*c)[0] for c in CONV_CASES]
    from test_vocabulary_index import JVP_GRAPHS
    from test_vocabulary_shape import JVP_GRAPHS as SHAPE_JVP_GRAPHS
    from test_batchnorm import JVP_GRAPHS as BN_JVP_GRAPHS
    from test_conv_family import JVP_GRAPHS as CONV_JVP_GRAPHS
    graphs += [build() for build in [*JVP_GRAPHS.values(), *SHAPE_JVP_GRAPHS.values(), *BN_JVP_GRAPHS.values(),
                                     *CONV_JVP_GRAPHS.values()]]
    from test_scan import JVP_GRAPHS as SCAN_GRAPHS
    graphs += [build() for build in SCAN_GRAPHS.values()]
    for g in graphs:
        tangents = with_tangents(g)
        seen |= {n.op for n in tangents if n.op not in ("input", "param")}
    need = {name for name, op in registered_ops().items() if op.jvp is not None}
    assert not need - seen, f"JVP rules never exercised: {sorted(need - seen)}"
