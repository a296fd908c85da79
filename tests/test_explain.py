"""explain: derivative expressions checked against the hand derivations of the references.

The references (shared/references/003, 004) derive σ′(z) = σ(z)(1 − σ(z)),
sigmoid + cross-entropy ⇒ ∂L/∂z = a − y, softmax + cross-entropy ⇒ (A − Y)/B,
∂L/∂W = δ aᵀ (here with row-major batches: ḡ_W = aᵀ · δ) and ∂L/∂b = Σ_B δ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import backcomp
from backcomp.explain import derive, explain, line_names, to_dot, to_text
from backcomp.explain_loops import _step_model, explain_step
from backcomp.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def xor():
    return explain(load_spec(ROOT / "examples" / "xor.toml"))


@pytest.fixture(scope="module")
def mlp():
    return explain(load_spec(ROOT / "examples" / "mlp.toml"))


def lines_for(report: str, node: str) -> list[str]:
    blocks = report.split("\n\n")
    for b in blocks:
        if b.startswith(f"{node} = "):
            return [line.strip() for line in b.splitlines()]
    raise AssertionError(f"no block for {node}:\n{report}")


def test_xor_sigmoid_derivative(xor):
    block = lines_for(xor, "h1")
    assert block[0].startswith("h1 = σ(z1)")
    # σ′(z) = σ(z)(1 − σ(z)), written with the forward value h1 = σ(z1)
    assert squash(block[1]) == squash("ḡ_z1 = h1 ⊙ ḡ_h1 ⊙ (1 - h1)")


def test_xor_sigmoid_cross_entropy_gives_a_minus_y(xor):
    block = lines_for(xor, "loss")
    term = squash(block[1])
    assert term.startswith("ḡ_z2=ḡ_loss⊙")
    assert "(-t+σ(z2))/B" in term      # (a − y)/B with a = σ(z2)


def test_xor_weight_gradients_are_delta_times_activation(xor):
    z2 = lines_for(xor, "z2")
    assert "ḡ_W2 = h1ᵀ · ḡ_z2" in z2
    assert "ḡ_h1 = ḡ_z2 · W2ᵀ" in z2
    assert "ḡ_b2 = Σ_B(ḡ_z2)" in z2
    z1 = lines_for(xor, "z1")
    assert "ḡ_W1 = xᵀ · ḡ_z1" in z1


def test_mlp_relu_and_softmax_cross_entropy(mlp):
    assert squash(lines_for(mlp, "h1")[1]) == squash("ḡ_z1 = ḡ_h1 ⊙ (h1 > 0)")
    loss = squash("\n".join(lines_for(mlp, "loss")))
    # (softmax(logits) Σy − y)/B ⊙ ḡ_loss: equals (A − Y)/B for one-hot Y (Σy = 1)
    assert "ḡ_logits=ḡ_loss⊙(-y+softmax[axis=1](logits)⊙Σ[axis=1](y))/B" in loss
    assert "ḡ_W1+=0.001·W1⊙ḡ_loss" in loss   # the L2 term lam·W1
    assert "ḡ_W1 sums 2 terms" in mlp


def test_fan_out_accumulates():
    report = explain(load_spec(ROOT / "examples" / "residual_mlp.toml"))
    assert "ḡ_h sums 2 terms: (from r) + (from h2)" in report
    assert "ḡ_h += ḡ_h2" in report


def test_wrt_prints_the_chain_from_the_loss():
    report = explain(load_spec(ROOT / "examples" / "xor.toml"), wrt="W1")
    order = [b.split(" = ")[0] for b in report.split("\n\n")[1:]]
    assert order == ["loss", "z2", "h1", "z1"]
    assert "ḡ_W2" not in report and "ḡ_W1 = xᵀ · ḡ_z1" in report


def test_latex():
    report = explain(load_spec(ROOT / "examples" / "xor.toml"), latex=True, node="h1")
    assert r"\sigma\left(z_{1}\right)" in report or r"\sigma\left(z1\right)" in report
    assert r"\bar{g}_{z1} = h1 \odot \bar{g}_{h1} \odot \left(1 - h1\right)" in report


def test_logistic_l2_matches_the_lecture():
    # w̄ = z̄ x + r̄ w, with r̄ = λ
    report = explain(load_spec(ROOT / "examples" / "logistic_l2.toml"))
    assert "ḡ_w += x ⊙ ḡ_z" in report and "ḡ_w += w ⊙ ḡ_R" in report
    assert "ḡ_R = 0.01·ḡ_L_reg" in report
    assert "ḡ_y = ḡ_L ⊙ (-t + y)" in report


# ----- the explanations compute the gradients ---------------------------------------------
class Evaluate:
    """NumPy values of explain's expressions: SymPy arithmetic elementwise, and the tensor
    functions explain prints (``matmul``, ``T``, ``Σ_B``, ``softmax[axis=1]``, ...) as the
    operations their text names.  ``classes`` sizes ``onehot(labels)``.

    The text of a reduction over an axis does not say whether the axis is kept
    (``Σ[axis=2]`` is kept inside a softmax VJP, dropped in a loss): they all keep it
    here, as does ``logits[labels]``, so operands line up, and ``fit`` drops kept axes
    where a value's shape is known (named nodes, VJP terms)."""

    def __init__(self, values: dict[str, np.ndarray], dims: dict[str, int] | None = None):
        self.values = values
        self.classes = None
        self.dims = dims or {}   # symbolic dims in printed shapes and indices: full((B, 32), 0), P[:T]
        self.target = None       # the shape of the value whose ḡ a term is: scatter_add's table

    def _eval(self, code: str):
        return eval(code, {"__builtins__": {}}, dict(self.dims))   # noqa: S307 (explain's own text)

    def __call__(self, e):
        if isinstance(e, sp.Symbol):
            return self.values[e.name]
        if e.is_number:   # also pi, sqrt(2)
            return float(e)
        if isinstance(e, sp.Piecewise):   # norm's safe square root
            out = self(e.args[-1].expr)
            for piece in reversed(e.args[:-1]):
                out = np.where(self(piece.cond), self(piece.expr), out)
            return out
        args = [self(a) for a in e.args]
        if isinstance(e, sp.Add):
            return sum(args[1:], args[0])
        if isinstance(e, sp.Mul):
            return np.prod(np.broadcast_arrays(*args), axis=0) if len(args) > 1 else args[0]
        if isinstance(e, sp.Pow):
            return np.power(args[0], args[1])
        if isinstance(e, sp.Max):
            return np.maximum(*args)
        if isinstance(e, sp.Heaviside):
            return np.heaviside(args[0], args[1] if len(args) > 1 else 0.5)
        if isinstance(e, sp.StrictGreaterThan):
            return args[0] > args[1]
        name = type(e).__name__
        simple = {"tanh": np.tanh, "exp": np.exp, "sin": np.sin, "log": np.log, "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
                  "cos": np.cos, "softplus": lambda z: np.logaddexp(0, z), "matmul": np.matmul,
                  "erf": np.vectorize(math.erf),
                  "T": lambda a: np.swapaxes(a, -1, -2),
                  "take_label": lambda a, i: np.take_along_axis(a, i[..., None], -1),
                  "onehot": lambda _, i: np.eye(self.classes)[i]}
        if name in simple:
            return simple[name](*args)
        if name.startswith("transpose("):   # "transpose(1, 0, 2)"; of a scalar: the scalar broadcast
            return np.transpose(args[0], self._eval(name[len("transpose"):])) if np.ndim(args[0]) else args[0]
        if name.startswith("full("):   # "full(B, 32)=0"
            shape, _, value = name[len("full"):].rpartition("=")
            return np.full(self._eval(shape), float(value))
        if name == "take":   # E[ids]
            return args[0][args[1]]
        if name == "scatter_add":   # the rows of ḡ added at the ids, into zeros of the table's shape
            out = np.zeros(self.target)
            np.add.at(out, args[1], args[0])
            return out
        if name.startswith("getitem["):   # "getitem[:, 16:32]": z[:, 16:32]
            return eval(f"a[{name[len('getitem['):-1]}]", {"__builtins__": {}}, {**self.dims, "a": args[0]})   # noqa: S307
        if name.startswith("scatter["):   # "scatter[:, 16:32](B, 64)": zeros with x at the index
            code, _, shape = name[len("scatter["):].partition("]")
            out = np.zeros(self._eval(shape))
            exec(f"out[{code}] = x", {"__builtins__": {}}, {**self.dims, "out": out, "x": args[0]})   # noqa: S102
            return out
        base, _, rest = name.partition("[")
        if rest:   # attributes: "softmax[axis=2]", "Σ[axis=0,2]", "einsum[bts,bsd->btd]"
            if base == "einsum":
                return np.einsum(rest[:-1], *args)
            axis = tuple(int(a) for a in rest[:-1].removeprefix("axis=").split(","))
        else:
            axis = None
        if base.startswith("Σ_"):   # Σ over the named (leading) symbolic dims
            return np.sum(args[0], axis=tuple(range(len(base[2:].split(",")))))
        x = args[0]
        if base == "Σ":
            return np.sum(x, axis=axis, keepdims=axis is not None)
        if base == "mean":
            return np.mean(x, axis=axis, keepdims=axis is not None)
        if base in ("softmax", "logsumexp"):
            top = np.max(x, axis=axis, keepdims=True)
            lse = top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))
            return np.exp(x - lse) if base == "softmax" else lse
        raise AssertionError(f"no numeric meaning for {name} in {e}")


def fit(a, shape: tuple) -> np.ndarray:
    """A value in its known shape: broadcast, or with kept size-1 axes dropped."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape and a.size == int(np.prod(shape)) and np.squeeze(a).shape == tuple(d for d in shape if d != 1):
        return a.reshape(shape)
    return np.broadcast_to(a, shape)


#: examples whose explanations the evaluator above can compute (the CNNs: conv2d, pool and
#: conv_transpose2d internals, which explain prints as opaque calls; pinn, gradient_penalty: the
#: terms through their grad nodes read the nodes' seed of ones as 1 (1ᵀ · X is a sum over
#: rows), whose shape the text leaves out; both are checked by value in test_grad.py;
#: vae, digits_bn_cnn: random draws (normal, dropout masks) the evaluator cannot reproduce,
#: and digits_bn_cnn's conv2d and buffers; gpt_char: integer ids of embeddings, which the
#: evaluator draws only as labels.  All three are checked
#: against finite differences by `backcomp check` in test_check.py)
#: the loop examples: a scan's line and its step's block, evaluated step by step by
#: test_explained_loops_compute_the_modules_gradients below
NOT_EVALUATED = {"digits_cnn", "conv1d_classifier", "conv_autoencoder", "pinn", "gradient_penalty", "vae",
                 "digits_bn_cnn", "gpt_char", "char_lstm", "gru", "lstm", "rnn"}
EVALUATED = sorted(p.stem for p in (ROOT / "examples").glob("*.toml") if p.stem not in NOT_EVALUATED)


def test_every_example_is_evaluated_or_says_why_not():
    stems = {p.stem for p in (ROOT / "examples").glob("*.toml")}
    assert NOT_EVALUATED <= stems and len(EVALUATED) >= len(stems) - len(NOT_EVALUATED) >= 10


@pytest.mark.parametrize("name", EVALUATED)
def test_explained_derivatives_compute_the_modules_gradients(name):
    """Evaluate every node's forward expression in graph order, then every VJP term in
    reverse (ḡ_loss = 1, ḡ_v = Σ of the terms its consumers send): the loss, the outputs
    and each parameter's gradient equal the compiled module's, in float64."""
    graph = load_spec(ROOT / "examples" / f"{name}.toml")
    maths, _ = derive(graph)
    module = backcomp.build(graph)
    rng = np.random.default_rng(3)
    params = {k: 0.5 * rng.standard_normal(s) for k, s in module.PARAMS.items()}
    classes = {n.inputs[1].name: n.inputs[0].shape[-1] for n in graph.nodes if n.op == "take_label"}
    inputs, dims = {}, {}
    for k, shape in module.INPUTS.items():
        shape = tuple(dims.setdefault(d, 3) if isinstance(d, str) else d for d in shape)
        inputs[k] = rng.integers(0, classes[k], shape) if module.INPUT_KINDS[k] == "int" else rng.standard_normal(shape)
    values = Evaluate({**params, **inputs, **{d: float(n) for d, n in dims.items()}})
    for m in maths:
        values.values[m.name] = fit(values(m.forward), tuple(dims.get(d, d) for d in m.shape))
    out = module.forward({k: v.copy() for k, v in params.items()}, inputs)
    for k, v in out.items():
        np.testing.assert_allclose(values.values[k], v, rtol=1e-9, atol=1e-12, err_msg=f"forward of {k}")
    loss, grads = module.value_and_grad({k: v.copy() for k, v in params.items()}, inputs)
    bars = {module.LOSS: np.ones(())}
    for m in reversed(maths):
        if m.name not in bars:
            continue
        values.values[f"ḡ_{m.name}"] = bars[m.name]
        for v, term in m.vjps.items():
            values.classes = values.values[v].shape[-1] if values.values[v].ndim else None
            bars[v] = bars.get(v, 0) + fit(values(term), values.values[v].shape)
    np.testing.assert_allclose(values.values[module.LOSS], loss, rtol=1e-9)
    assert set(grads) <= set(bars), f"explain has no term for {sorted(set(grads) - set(bars))}"
    for k, g in grads.items():
        np.testing.assert_allclose(bars[k], g, rtol=1e-8, atol=1e-12, err_msg=f"ḡ_{k}")


# ----- loops: the step's block and its recurrence compute the gradients --------------------
#: `backcomp explain` writes a scan as its line (scan(step, (initial carries), (sequences))
#: and the ḡ of its arguments: Σ_t ḡ_W[t], ḡ_run.xs[0], ...) and the step's block: the
#: step's lines at step t, then the recurrence across the steps and the wiring to the scan's
#: arguments and outputs.  The test below reads the block as printed (explain_step's text)
#: and computes with it: every expression in it must be the text of one of the SymPy
#: expressions explain derived for the step (its lines' forward and VJP terms), which the
#: evaluator computes; the recurrence's references (ḡ_h[t+1], ḡ_run.carry[0]) are followed
#: as written.  The forward pass is read off the same lines: a reference ḡ_b[j] in the line
#: of ḡ_a[i] says that b[j] is a[i], passed on as it is (ḡ_h_new[t] = ḡ_h[t+1] + ḡ_ys0[t]:
#: h[t+1] = h_new[t] and ys0[t] = h_new[t]; ḡ_run.init[0] = ḡ_h[0]: h[0] = run.init[0]).
NO_MATCH = object()


@dataclass
class Line:
    """A line of the report: a value's forward expression and the VJP terms it sends."""
    name: str
    forward: sp.Expr
    shape: tuple | str
    vjps: list[tuple[str, sp.Expr]] = field(default_factory=list)


@dataclass
class Block:
    """A step's block read back from its text."""
    caller: str              # the scan's line name, as the block writes it (run by ...)
    lines: list[Line]        # the step's lines at step t
    defs: list[tuple]        # (name, index or None, [(sign, "ref", (name, index)) | (sign, "expr", sp.Expr)], note)
    scans: dict[str, object]   # a scan inside the step: its line name -> its node

    @property
    def copies(self):
        """(source, source index, copy, copy index): ḡ_a[i] = ... + ḡ_b[j] says b[j] is a[i]."""
        for name, index, terms, _ in self.defs:
            for _, kind, ref in terms:
                if kind == "ref":
                    yield name, index, *ref


def _split_terms(rhs: str) -> list[tuple[int, str]]:
    """``a + (b + c)[t] - d`` -> [(1, "a"), (1, "(b + c)[t]"), (-1, "d")]."""
    out, depth, start, sign = [], 0, 0, 1
    i = 0
    while i < len(rhs):
        if rhs[i] in "([":
            depth += 1
        elif rhs[i] in ")]":
            depth -= 1
        if depth == 0 and rhs[i:i + 3] in (" + ", " - "):
            out.append((sign, rhs[start:i]))
            sign, start = (1 if rhs[i + 1] == "+" else -1), i + 3
            i += 3
            continue
        i += 1
    out.append((sign, rhs[start:]))
    return [(-s, t[1:]) if t.startswith("-") else (s, t) for s, t in out]


def _reference(text: str, caller: str) -> tuple[str, str | None]:
    """``ḡ_h[t+1]`` -> ("h", "t+1"); ``ḡ_run.ys[0][t]`` -> ("run.ys[0]", "t")."""
    m = re.fullmatch(rf"ḡ_({re.escape(caller)}\.\w+\[\d+\]|[^\[\]]+)(?:\[([^\[\]]+)\])?", text)
    assert m, f"not a cotangent reference: {text!r}"
    return m[1], m[2]


def read_block(run, name: str, report: str) -> Block:
    """The block explain prints in ``report`` for scan node ``run`` (on the line ``name``),
    with each printed expression looked up among the expressions explain derived for the step."""
    text = explain_step(run, to_text, name)
    assert "\n".join(text) in report, f"the report has no block of {name} as:\n" + "\n".join(text)
    model, _ = _step_model(run.attrs["step"])
    maths, _ = derive(model)
    exprs = {to_text(e): e for m in maths for e in (m.forward, *m.vjps.values())}
    shapes = {m.name: m.shape for m in maths}

    def expr(s: str) -> sp.Expr:
        assert s in exprs, f"printed {s!r} is none of the step's derived expressions"
        return exprs[s]

    head = re.fullmatch(r"step \S+ \(carry .*; (?:slices .*|no slices)\), run by (\S+), at step t:", text[0])
    assert head, text[0]
    caller = head[1]
    across = next(i for i, s in enumerate(text) if s.startswith("  across the steps"))
    wiring = text.index(f"  and {caller}'s arguments and outputs:")
    lines: list[Line] = []
    for s in text[1:across]:
        if m := re.fullmatch(r"    (\S+) = (.*)    # .*", s):
            lines.append(Line(m[1], expr(m[2]), shapes[m[1]]))
        else:
            m = re.fullmatch(r"        ḡ_(\S+) \+?= (.*)", s)
            assert m, s
            lines[-1].vjps.append((m[1], expr(m[2])))
    defs = []
    for s in text[across + 1:wiring] + text[wiring + 1:]:
        m = re.fullmatch(r"    (ḡ_\S+) = (.*?)(?:    \((.*)\))?", s)
        assert m, s
        terms = []
        for sign, term in _split_terms(m[2]):
            if term == "0":
                continue
            if term.startswith("(") and term.endswith(")[t]"):
                terms.append((sign, "expr", expr(term[1:-len("[t]") - 1])))
            else:
                terms.append((sign, "ref", _reference(term, caller)))
        defs.append((*_reference(m[1], caller), terms, m[3] or ""))
    scans = {name: n for n, name in line_names(model).items() if n.op == "scan"}
    return Block(caller, lines, defs, scans)


def _at(index: str, t: int | None, steps: int) -> int:
    return eval(index, {"__builtins__": {}}, {"t": t, "T": steps})   # noqa: S307 (t+1, T-1, -1, 3)


class StepValues(dict):
    """The values a step's expressions read at step k: its leaves as the block wires
    them, its lines' values, and (the step's consts) the values of the scan's caller."""

    def __init__(self, loop: "Loop", k: int):
        super().__init__()
        self.loop, self.k = loop, k

    def __missing__(self, name: str):
        if name.startswith("ḡ_") or name.startswith("Σ_t"):
            raise KeyError(name)
        try:
            value = self.loop.forward_value(name, self.k)
        except LookupError:
            value = self.loop.outer.values[name]
        self[name] = value
        return value


class Loop:
    """A scan's line and its step's block, evaluated: values and cotangents per step,
    each computed once when first asked for."""

    def __init__(self, run, line: Line, outer: Evaluate, report: str):
        self.block = read_block(run, line.name, report)
        self.outer, self.report = outer, report
        _, init, xs, *flags = line.forward.args
        self.init = [outer(e) for e in init.args]
        self.xs = [np.asarray(outer(e)) for e in xs.args]
        length = [int(str(f).partition("=")[2]) for f in flags if str(f).startswith("length=")]
        self.steps = self.xs[0].shape[0] if self.xs else length[0]
        self.names = {ln.name for ln in self.block.lines}
        self.contexts: dict[int, Evaluate] = {}
        self.inner: dict[int, dict] = {}   # step -> the loops of scans inside the step
        self.step_bars: dict[int, dict] = {}
        self.cotangents: dict[tuple, np.ndarray] = {}
        self.outs: dict[str, np.ndarray] = {}

    def solve(self, index: str | None, k: int | None):
        """The t at which ``index`` is step k (None: an index without t), or NO_MATCH."""
        if index is None or k is None:
            return None if index is None and k is None else NO_MATCH
        if re.search(r"\bt\b", index):
            return next((t for t in range(self.steps) if _at(index, t, self.steps) == k), NO_MATCH)
        return None if _at(index, None, self.steps) == k else NO_MATCH

    def context(self, k: int) -> Evaluate:
        """Step k's forward values: the block's lines in order (a scan inside, run whole)."""
        if k not in self.contexts:
            ctx = self.contexts[k] = Evaluate(StepValues(self, k), self.outer.dims)
            self.inner[k] = forward_lines(self.block.lines, ctx, self.block.scans, self.report)
        return self.contexts[k]

    def forward_value(self, name: str, k: int | None):
        if name in self.names:
            return self.context(k).values[name]
        caller = re.escape(self.block.caller)
        if m := re.fullmatch(rf"{caller}\.(init|xs)\[(\d+)\]", name):
            return self.init[int(m[2])] if m[1] == "init" else self.xs[int(m[2])][k]
        for source, at, copy, copy_at in self.block.copies:
            if copy == name and (t := self.solve(copy_at, k)) is not NO_MATCH:
                return self.forward_value(source, None if at is None else _at(at, t, self.steps))
        raise LookupError(name)

    def outputs(self, name: str) -> dict[str, np.ndarray]:
        """run.carry[j] and run.ys[j] (stacked over the steps), under the scan's line name."""
        caller, out = re.escape(self.block.caller), {}
        for _, _, copy, _ in self.block.copies:
            if m := re.fullmatch(rf"{caller}\.(carry|ys)\[(\d+)\]", copy):
                key = f"{name}.{m[1]}[{m[2]}]"
                out[key] = self.forward_value(copy, None) if m[1] == "carry" else \
                    np.stack([self.forward_value(copy, k) for k in range(self.steps)])
        return out

    def cotangent(self, name: str, k: int | None) -> np.ndarray:
        if (name, k) not in self.cotangents:
            self.cotangents[name, k] = self._cotangent(name, k)
        return self.cotangents[name, k]

    def _cotangent(self, name: str, k: int | None):
        caller = re.escape(self.block.caller)
        if m := re.fullmatch(rf"{caller}\.(carry|ys)\[\d+\]", name):   # given by the scan's caller
            if name not in self.outs:   # an output the loss does not read
                return np.zeros_like(self.forward_value(name, k))
            return self.outs[name][k] if m[1] == "ys" else self.outs[name]
        found = [(terms, t) for lhs, index, terms, _ in self.block.defs
                 if lhs == name and (t := self.solve(index, k)) is not NO_MATCH]
        assert len(found) <= 1, f"the block gives ḡ_{name} at step {k} {len(found)} times"
        for terms, t in found:
            total = 0
            for sign, kind, x in terms:
                if kind == "ref":
                    total = total + sign * self.cotangent(x[0], None if x[1] is None else _at(x[1], t, self.steps))
                else:
                    ctx = self.backward(t)
                    value = ctx.values[name]
                    ctx.classes, ctx.target = (value.shape[-1] if value.ndim else None), value.shape
                    total = total + sign * fit(ctx(x), value.shape)
            if isinstance(total, int):   # "= 0"
                total = np.zeros_like(self.context(k).values[name])
            return total
        self.backward(k)   # a value inside step k: the sum of the terms the step's lines send it
        bars = self.step_bars[k]
        if name not in bars:
            return np.zeros_like(self.context(k).values[name])
        return bars[name]

    def backward(self, k: int) -> Evaluate:
        """Step k's cotangents: its lines' VJP terms in reverse, seeded by the recurrence."""
        ctx = self.context(k)
        if k not in self.step_bars:
            seeds = {ln.name: self.cotangent(ln.name, k) for ln in self.block.lines
                     if any(lhs == ln.name and self.solve(i, k) is not NO_MATCH for lhs, i, _, _ in self.block.defs)}
            self.step_bars[k] = backward_lines(self.block.lines, ctx, seeds, self.inner[k])
        return ctx

    def gradients(self, outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Given ḡ of the scan's outputs: ḡ_run.init[j], ḡ_run.xs[j] (stacked) and Σ_t ḡ_W[t]."""
        caller = self.block.caller
        self.outs = {f"{caller}{k[k.index('.'):]}": v for k, v in outs.items()}
        got = {}
        for lhs, _, _, note in self.block.defs:
            if lhs.startswith(f"{caller}.init["):
                got[f"ḡ_{lhs}"] = self.cotangent(lhs, None)
            elif lhs.startswith(f"{caller}.xs["):
                got[f"ḡ_{lhs}"] = np.stack([self.cotangent(lhs, k) for k in range(self.steps)])
            elif note.startswith("summed on"):
                assert note == f"summed on {caller}'s line", note
                got[f"Σ_t ḡ_{lhs}[t]"] = sum(self.cotangent(lhs, k) for k in range(self.steps))
        return got


def _is_scan(e) -> bool:
    return type(e).__name__ == "scan"


def forward_lines(lines: list[Line], ctx: Evaluate, scans: dict, report: str) -> dict[str, Loop]:
    """Every line's value in order; a scan's line runs its loop (its outputs: run.carry[j], run.ys[j])."""
    loops = {}
    for ln in lines:
        if _is_scan(ln.forward):
            loops[ln.name] = loop = Loop(scans[ln.name], ln, ctx, report)
            ctx.values.update(loop.outputs(ln.name))
        else:
            shape = tuple(ctx.dims.get(d, d) for d in ln.shape)
            ctx.values[ln.name] = fit(ctx(ln.forward), shape)
    return loops


def backward_lines(lines: list[Line], ctx: Evaluate, bars: dict, loops: dict[str, Loop]) -> dict:
    """The lines' VJP terms in reverse, each added to the ḡ of the value it names."""
    bars = dict(bars)
    for ln in reversed(lines):
        if ln.name in loops:
            outs = {k: v for k, v in bars.items() if k.startswith(f"{ln.name}.")}
            if not outs:
                continue
            ctx.values.update(loops[ln.name].gradients(outs))
        elif ln.name in bars:
            ctx.values[f"ḡ_{ln.name}"] = bars[ln.name]
        else:
            continue
        for v, term in ln.vjps:
            value = ctx.values[v]
            ctx.classes, ctx.target = (value.shape[-1] if value.ndim else None), value.shape
            bars[v] = bars.get(v, 0) + fit(ctx(term), value.shape)
    return bars


def check_explained_loops(graph, steps: int = 4):
    """Evaluate explain's lines for ``graph`` (float64, batch 3, ``steps`` steps), a scan's
    through its block; compare the outputs, the loss and every gradient with the module's."""
    maths, _ = derive(graph)
    report = explain(graph)
    scans = {name: n for n, name in line_names(graph).items() if n.op == "scan"}
    module = backcomp.build(graph)
    rng = np.random.default_rng(7)
    params = {k: 0.5 * rng.standard_normal(s) for k, s in module.PARAMS.items()}
    dims = {"B": 3, "T": steps}
    inputs = {}
    for k, shape in module.INPUTS.items():
        shape = tuple(dims[d] if isinstance(d, str) else d for d in shape)
        low, high = module.INDEX_RANGES.get(k, (0, 0))
        inputs[k] = rng.integers(max(low, 0), high, shape) if module.INPUT_KINDS[k] == "int" else rng.standard_normal(shape)
    ctx = Evaluate({**params, **inputs, **{d: float(n) for d, n in dims.items()}}, dims)
    lines = [Line(m.name, m.forward, m.shape, list(m.vjps.items())) for m in maths]
    loops = forward_lines(lines, ctx, scans, report)
    assert loops, "no scan"
    out = module.forward({k: v.copy() for k, v in params.items()}, inputs)
    for k, v in out.items():
        np.testing.assert_allclose(ctx.values[k], v, rtol=1e-9, atol=1e-12, err_msg=f"forward of {k}")
    loss, grads = module.value_and_grad({k: v.copy() for k, v in params.items()}, inputs)
    bars = backward_lines(lines, ctx, {module.LOSS: np.ones(())}, loops)
    np.testing.assert_allclose(ctx.values[module.LOSS], loss, rtol=1e-9)
    assert set(grads) <= set(bars), f"explain has no term for {sorted(set(grads) - set(bars))}"
    for k, g in grads.items():
        np.testing.assert_allclose(bars[k], g, rtol=1e-8, atol=1e-12, err_msg=f"ḡ_{k}")


LOOP_EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.toml") if "scan(" in p.read_text())


def test_the_loop_examples_are_the_ones_known():
    assert {"rnn", "lstm", "gru", "char_lstm"} <= set(LOOP_EXAMPLES)


@pytest.mark.parametrize("name", LOOP_EXAMPLES)
def test_explained_loops_compute_the_modules_gradients(name):
    """The scan's line, the step's lines at each t, the recurrence run backwards over t and
    the per-step terms summed over t give the module's outputs, loss and gradients."""
    check_explained_loops(load_spec(ROOT / "examples" / f"{name}.toml"))


def _wiring_graph() -> backcomp.Graph:
    """A builder's step (no names) run in reverse over two sequences, returning a carry as
    it is (k), one value as two carries (n), the carry into the step and a slice as per-step
    outputs (h, u_t) and a per-step output that is no carry (n ⊙ m)."""
    from backcomp import ops
    g = backcomp.Graph("wiring")
    x, u = g.input("x", ("B", "T", 4)), g.input("u", ("T", "B", 3))
    W, a = g.param("W", (4, 3)), g.param("a", (3,))

    def step(carry, xs):
        h, k, m = carry
        x_t, u_t = xs
        n = ops.tanh(x_t @ W + h * k + u_t * a)
        return (n, k, n), (n * m, h, u_t)

    run = g.scan(step, (ops.zeros(("B", 3), graph=g), ops.tanh(u[0]), ops.ones(("B", 3), graph=g)),
                 (ops.transpose(x, (1, 0, 2)), u), axis=0, reverse=True)
    ys0, ys1, ys2 = run.ys
    h, k, m = run.carry
    g.loss(ops.sum(ys0 * ys0) + ops.sum(ops.sin(ys1)) + ops.sum(ys2 * ys2 * ys0) + ops.sum(k * h)
           + ops.sum(ops.sin(m)), "loss")
    return g


def _unnamed_scans_graph() -> backcomp.Graph:
    """Builder scans, unnamed: one over another's outputs, one whose only output is read
    once, one without sequences (length=3)."""
    from backcomp import ops
    g = backcomp.Graph("unnamed_scans")
    x = g.input("x", ("B", "T", 4))
    W1, U1, W2, V, P = (g.param(k, s) for k, s in [("W1", (4, 5)), ("U1", (5, 5)), ("W2", (5, 2)), ("V", (4, 2)),
                                                     ("P", (2, 2))])
    first = g.scan(lambda h, x_t: (lambda n: (n, n))(ops.tanh(x_t @ W1 + h @ U1)), ops.zeros(("B", 5), graph=g), x,
                   axis=1, name="layer1")
    second = g.scan(lambda h, x_t: (lambda n: (n, n))(ops.sigmoid(x_t @ W2 + h)), ops.zeros(("B", 2), graph=g),
                    first.ys, axis=1, name="layer2")
    side = g.scan(lambda s, x_t: (s + x_t @ V, None), ops.zeros(("B", 2), graph=g), x, axis=1, name="running_sum")
    power = g.scan(lambda s, _: (ops.tanh(s @ P), None), side.carry, length=3, name="power")
    g.loss(ops.sum(second.ys ** 2) + ops.sum(ops.sin(power.carry)) + ops.mean(first.carry), "loss")
    return g


def _nested_graph() -> backcomp.Graph:
    """A scan inside a step: an inner loop over the features of each time step."""
    from backcomp import ops
    g = backcomp.Graph("nested")
    x = g.input("x", ("B", "T", 4))
    w, W = g.param("w", (3,)), g.param("W", (3, 3))

    def outer(h, x_t):
        run = g.scan(lambda acc, x_f: (ops.tanh(acc * w + x_f[:, None]), None), h, x_t, axis=1, name="inner")
        h_new = ops.tanh(run.carry @ W)
        return h_new, h_new

    run = g.scan(outer, ops.zeros(("B", 3), graph=g), x, axis=1, name="outer")
    g.loss(ops.sum(run.ys ** 2), "loss")
    return g


def _captured_graph() -> backcomp.Graph:
    """A step reading a value computed outside it and never named (tanh(W)): its block
    shows it (v2 = tanh(W)), where it was read as v2 and defined nowhere."""
    from backcomp import ops
    g = backcomp.Graph("captured")
    x = g.input("x", ("B", "T", 3))
    W = g.param("W", (3, 3))
    Wt = ops.tanh(W)
    run = g.scan(lambda h, x_t: (lambda n: (n, n))(ops.tanh(x_t @ Wt + h @ Wt)), ops.zeros(("B", 3), graph=g), x,
                 axis=1, name="rnn")
    g.loss(ops.sum(run.ys ** 2), "loss")
    return g


def test_a_value_a_step_captures_unnamed_is_shown_in_its_block():
    """(check_explained_loops does not evaluate such a line yet: it reads the step's own.)"""
    report = explain(_captured_graph())
    block = report[report.index("step rnn"):].splitlines()
    assert block[1] == "    v2 = tanh(W)    # read at every step", block
    assert "ḡ_W = Σ_t ḡ_v2[t] ⊙ (1 - tanh(W)^2)" in report


@pytest.mark.parametrize("build", [_wiring_graph, _unnamed_scans_graph, _nested_graph], ids=lambda f: f.__name__[1:])
def test_explained_loops_of_built_graphs_compute_the_modules_gradients(build):
    """Steps built in Python: explain names their unnamed values, and its blocks must still
    wire every output, carry and scan.  Each graph here once read wrong: the per-step
    outputs that are no new carry (n ⊙ m, and h and u_t, values into the step) got no ḡ, one
    value returned as two carries stopped explain (and the build, whose docstring is the
    explain text), a scan whose outputs were read once had no line (its block said run
    by scan, another scan's name, and a nested one's carry read ḡ_carry[t] = 0)."""
    check_explained_loops(build())


@pytest.mark.parametrize("name", ["attention", "layernorm", "functions", "residual_mlp"])
def test_backward_graph_renders_as_dot(name):
    dot = to_dot(load_spec(ROOT / "examples" / f"{name}.toml"), backward=True)
    assert dot.startswith("digraph") and "loss_bar" in dot     # the backward nodes are drawn


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "examples").glob("*.toml")))
def test_latex_renders_for_every_example(spec):
    """LaTeX templates go through str.format: literal braces must be escaped."""
    r = subprocess.run([sys.executable, "-m", "backcomp", "explain", str(ROOT / "examples" / spec), "--latex"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r"\bar{g}" in r.stdout


def test_latex_of_random_ops_masks_and_transposes():
    """The LaTeX templates of dropout masks, normal/uniform draws, tril/triu, arange and
    transpose with axes hold literal braces: they were str.format'ed unescaped (KeyError
    'N', 'tril', 'transpose'; IndexError for the mask)."""
    from backcomp.spec import parse_spec
    graph = parse_spec("""
[model]
loss = "loss"
[inputs]
x = ["B", "T", 4]
[params]
W = [4, 4]
[graph]
h = "dropout(transpose(x @ W, (1, 0, 2)), p=0.5) + normal((T, B, 4)) * uniform((T, B, 4), low=-1.0)"
s = "where(tril(ones((B, B))) + triu(ones((B, B)), k=1) > 0, h @ transpose(h, (0, 2, 1)), 0.0)"
loss = "sum(s) + sum(take(sum(x, axis=2), arange(T), axis=1) * one_hot(arange(B), 3)[:, :1])"
""", "latex_braces.toml")
    tex = explain(graph, latex=True)
    for piece in (r"\mathcal{N}_{", r"\mathcal{U}_{", r"m_{", r"\operatorname{tril}_{0}\left(",
                  r"\operatorname{triu}_{1}\left(", r"\operatorname{arange}(T)", r"\mathrm{transpose}_{(1, 0, 2)}\left(",
                  r"\operatorname{take}_{1}\left(", r"\operatorname{one\_hot}_{3}\left("):
        assert piece in tex, piece
    from string import Formatter
    from backcomp.notation import FORMATS
    for key, fmt in FORMATS.items():      # every template seen so far: only positional slots
        for template in (fmt.text, fmt.latex):
            fields = [f for _, f, _, _ in Formatter().parse(template) if f is not None]
            assert all(f.isdigit() for f in fields), (key, template)


def test_indexing_and_its_vjp_read_as_subscripts():
    """``z[:, 16:32]`` and ``scatter(v, [:, 16:32], (B, 64))``, not
    ``getitem(z, index=(slice(None, None, None), slice(16, 32, None)))``."""
    text = explain(load_spec(ROOT / "examples" / "lstm.toml"))
    assert "c_new = c ⊙ σ(z[:, 16:32]) + σ(z[:, :16]) ⊙ tanh(z[:, 32:48])" in text, text
    assert "scatter(ḡ_h_new ⊙ (1 - σ(z[:, 48:])) ⊙ σ(z[:, 48:]) ⊙ tanh(c_new), [:, 48:], (B, 64))" in text, text
    assert "slice(" not in text and "index=" not in text
    gpt = explain(load_spec(ROOT / "examples" / "gpt_char.toml"))
    assert "x0 = P[:T] + E[ids]" in gpt and "ḡ_P = scatter(Σ_B(ḡ_x0), [:T], (32, 64))" in gpt, gpt
    latex = explain(load_spec(ROOT / "examples" / "gpt_char.toml"), latex=True)
    assert r"x0 = {P}_{[:T]} + E_{[ids]}" in latex and r"\operatorname{scatter}_{[:T] \to (32, 64)}" in latex, latex


def test_a_subscript_of_a_sum_is_parenthesised():
    from backcomp import ops
    g = backcomp.Graph("sub")
    x, W, b = g.input("x", ("B", 4)), g.param("W", (4, 6)), g.param("b", (6,))
    g.loss(ops.sum(ops.tanh((x @ W + b)[:, 1:3])), "loss")
    text = explain(g)
    assert "(b + x · W)[:, 1:3]" in text, text
