"""The one finite-difference gradient checker: ``backcomp check``, the test suite's
``gradcheck`` and the test file written by ``compile --emit-test`` all run
``compare_gradients`` below.

Where: by default at the spec's own inits, ``init_params(seed, dtype=float64)`` —
random params of the wrong scale make losses such as a VAE's ``exp(logvar)``
explode, and then correct gradients look wrong.  Params whose init is constant
(``zeros``, ``ones``: two seeds give the same array) are jittered by
``jitter``·N(0, 1), 0.01 by default: at an exact zero, a zero weight matrix makes
every gradient upstream of it exactly 0 and a regulariser's gradient ``lam·w``
vanishes, so a wrong VJP there would pass unseen.  ``perturb`` adds noise to every
param (``--perturb``); ``jitter=0`` checks exactly at ``init_params``.

What: each wrt param per element (up to ``max_elements`` sampled entries), along
``directions`` random directions per param, and along random directions through
all wrt params jointly (as ``jax.test_util.check_grads`` and autograd's
``check_vjp``), comparing ⟨g, v⟩ with the central difference
D(h) = (L(p + hv) − L(p − hv)) / 2h.

Step: v is scaled entrywise by max(1, |p|) (a relative step), and h = u^(1/3) ≈ 6e-6
with u the float64 unit roundoff, the step that balances the truncation error
h²·|L'''|/6 against the rounding error ~u·|L|/h.  ⟨g, v⟩ is taken along the
displacement actually applied, fl(p + hv) − p: the rounding of p + hv (~u|p|/h ≈
2e-11 relative) would otherwise pass for a gradient error (it did, on linear losses).

Tolerance, derived per probe from the same evaluations rather than a fixed rtol:
- truncation: D(h) − D(2h) = −3·(h²L'''/6) + O(h⁴), so |D(h) − D(2h)|/3 estimates
  D(h)'s truncation error (Richardson); a kink within ±2h shows up here too;
- rounding: σ, the noise in L's own evaluation, is estimated from the fourth
  difference of the five values L(p + kh), k = −2..2 (Moré & Wild's ECnoise;
  h⁴L'''' is negligible): σ ≈ |Δ⁴L| / √70.  A probe uses the larger of its own
  estimate and the median over all probes (a single estimate can be small by
  chance), and never less than u·|L|; D(h) carries ~σ/h of it;
- tol = 10·(truncation + σ/h) + 10·u·|⟨g, v⟩|.  The factor 10 covers the
  estimates' own scatter; a VJP off by 1% (errors ~1e-2·|g|) still exceeds it
  by orders of magnitude (tests/test_check.py injects one).

The functions above the line "backcomp-only" use nothing but numpy, so that the
emitted test (which may not import backcomp) includes their source verbatim.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np


def constant_inits(module, seed=0):
    """The params whose init draws nothing (zeros, ones): two seeds give the same array."""
    a, b = module.init_params(seed, dtype=np.float64), module.init_params(seed + 1, dtype=np.float64)
    return [name for name in a if np.array_equal(a[name], b[name])]


def check_point(module, seed=0, perturb=0.0, jitter=0.01):
    """float64 params at which to check: ``init_params(seed)``, constant inits jittered
    by ``jitter``·N(0, 1), every param perturbed by ``perturb``·N(0, 1)."""
    params = module.init_params(seed, dtype=np.float64)
    constant = constant_inits(module, seed)
    rng = np.random.default_rng([seed, 1])
    for name, value in params.items():
        scale = max(perturb, jitter) if name in constant else perturb
        if scale:
            params[name] = value + scale * rng.standard_normal(value.shape)
    return params


def random_inputs(module, batch=3, seed=0, dtype=np.float64):
    """Random inputs matching ``module.INPUTS``; symbolic dims get ``batch``.

    Float inputs are N(0, 1).  Integer inputs are labels or indices, drawn in the
    range the module checks them against (``INDEX_RANGES``), else in [0, 2).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in module.INPUTS.items():
        concrete = tuple(batch if isinstance(d, str) else d for d in shape)
        if module.INPUT_KINDS[name] == "int":
            low, high = (batch if isinstance(b, str) else b for b in module.INDEX_RANGES.get(name, (0, 2)))
            out[name] = rng.integers(low, high, size=concrete).astype(np.int64)
        else:
            out[name] = rng.standard_normal(concrete).astype(dtype)
    return out


def fixed_draws(module, seed=0):
    """Keyword arguments for each call: a model with random ops (dropout, normal) gets a
    generator in the same state every time, so its loss is a function of the params; a
    model with buffers (batch norm) gets fresh ones, which train mode updates but does
    not read."""
    import inspect
    accepted = inspect.signature(module.value_and_grad).parameters
    out = {}
    if "rng" in accepted:
        out["rng"] = np.random.default_rng(seed)
    if "buffers" in accepted:
        out["buffers"] = module.init_buffers(np.float64)
    return out


def loss_of(module, inputs):
    """params -> the module's loss at ``inputs``, from ``forward`` when it returns the
    loss (so forward and value_and_grad are checked against each other too)."""
    if module.LOSS in module.OUTPUTS:
        return lambda params: module.forward(params, inputs, **fixed_draws(module))[module.LOSS]
    return lambda params: module.value_and_grad(params, inputs, **fixed_draws(module))[0]


def compare_gradients(loss, params, grads, max_elements=200, directions=2, seed=0):
    """Compare ``grads`` (of the scalar ``loss(params)``) with central differences.

    Returns one dict per param in ``grads`` (its element and direction probes) and
    one named "(all)" (directions through every param): ``probes``, the worst
    probe's ``error`` |⟨g, v⟩ − D(h)| with its ``tol``, ``ad`` and ``fd``; ``rel``,
    the largest error relative to max(|ad|, |fd|, the row's largest |ad|, 1e-3);
    ``ok``; and ``zero`` when every ⟨g, v⟩ is 0 (the check says little).
    """
    u = np.finfo(np.float64).eps / 2
    h = u ** (1 / 3)
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    grads = {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
    f0 = float(loss(dict(params)))
    steps = (-2 * h, -h, h, 2 * h)
    rows, values, linear = [], [], []

    def probe(row, v):   # v: param name -> direction (only the params it moves)
        moved = [{k: x + t * v[k] if k in v else x for k, x in params.items()} for t in steps]
        rows.append(row)
        values.append([float(loss(dict(p))) for p in moved])
        # ⟨g, displacement actually taken⟩: p + t·v is rounded, and its error (~u|p|/h
        # relative) would otherwise pass for a gradient error
        linear.append([sum(float(np.vdot(grads[k], p[k] - params[k])) for k in v) for p in moved])

    def direction(names):
        r = {k: rng.standard_normal(params[k].shape) for k in names}
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in r.values())) or 1.0
        return {k: a / norm * np.maximum(1.0, np.abs(params[k])) for k, a in r.items()}

    for name, x in ((k, params[k]) for k in grads):
        picks = range(x.size) if x.size <= max_elements else np.sort(rng.choice(x.size, max_elements, replace=False))
        for i in picks:
            e = np.zeros(x.shape)
            e.flat[i] = max(1.0, abs(float(x.flat[i])))
            probe(name, {name: e})
        for _ in range(directions if x.size else 0):
            probe(name, direction([name]))
    for _ in range(directions if len(grads) > 1 else 0):
        probe("(all)", direction(list(grads)))

    fs, lin = np.array(values).reshape(-1, 4), np.array(linear).reshape(-1, 4)
    rest = fs - f0 - lin                      # L beyond its first-order model, at p − 2hv .. p + 2hv
    ad = (lin[:, 2] - lin[:, 1]) / (2 * h)    # ⟨g, v⟩
    fd = (fs[:, 2] - fs[:, 1]) / (2 * h)      # D(h)
    e1 = (rest[:, 2] - rest[:, 1]) / (2 * h)  # D(h) − ⟨g, v⟩
    e2 = (rest[:, 3] - rest[:, 0]) / (4 * h)  # D(2h) − ⟨g, v⟩
    error, truncation = np.abs(e1), np.abs(e1 - e2) / 3
    noise = np.abs(rest[:, 0] - 4 * rest[:, 1] - 4 * rest[:, 2] + rest[:, 3]) / np.sqrt(70)
    floor = u * np.maximum(np.max(np.abs(fs), axis=1, initial=0.0), abs(f0))
    sigma = np.maximum(np.maximum(noise, np.median(noise) if noise.size else 0.0), floor)
    tol = 10 * (truncation + sigma / h) + 10 * u * np.abs(ad)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isfinite(error), error / np.where(tol > 0, tol, np.inf), np.inf)
    results = []
    for row in list(grads) + (["(all)"] if "(all)" in rows else []):
        idx = np.array([i for i, r in enumerate(rows) if r == row], dtype=int)
        if idx.size == 0:
            results.append({"name": row, "probes": 0, "error": 0.0, "tol": 0.0, "ad": 0.0, "fd": 0.0,
                            "rel": 0.0, "ok": True, "zero": True})
            continue
        worst = idx[np.argmax(ratio[idx])]
        scale = max(float(np.max(np.abs(ad[idx]))), 1e-3)
        rel = error[idx] / np.maximum(np.maximum(np.abs(ad[idx]), np.abs(fd[idx])), scale)
        results.append({"name": row, "probes": int(idx.size), "error": float(error[worst]), "tol": float(tol[worst]),
                        "ad": float(ad[worst]), "fd": float(fd[worst]),
                        "rel": float(np.max(np.where(np.isnan(rel), np.inf, rel))),
                        "ok": bool(np.all(error[idx] <= tol[idx])), "zero": bool(np.all(ad[idx] == 0))})
    return results


# ----- backcomp-only ---------------------------------------------------------------------
#: the checker's functions, in the order the emitted test includes their source
STANDALONE = (constant_inits, check_point, random_inputs, fixed_draws, loss_of, compare_gradients)


def standalone_source() -> str:
    """The source of ``STANDALONE``, for the emitted test (one definition, inlined)."""
    return "\n\n".join(inspect.getsource(f) for f in STANDALONE)


@dataclass
class ParamCheck:
    """One row of the check: a param (or "(all)", the joint directions)."""
    name: str
    shape: tuple | None
    checked: int      # probes: sampled elements and random directions
    max_abs: float    # the worst probe's |⟨g, v⟩ − D(h)| ...
    tol: float        # ... and the tolerance derived for that probe
    max_rel: float    # largest error relative to the gradient's scale
    ok: bool
    zero: bool        # every ⟨g, v⟩ was exactly 0: the check says little


def random_params(module, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    """scale·N(0, 1) params, ignoring the spec's inits (for tests that want generic values)."""
    rng = np.random.default_rng(seed + 1)
    return {k: (scale * rng.standard_normal(s)).astype(np.float64) for k, s in module.PARAMS.items()}


def check_gradients(module, params, inputs, max_elements: int = 200, directions: int = 2, seed: int = 0,
                    rtol: float | None = None, loss=None) -> list[ParamCheck]:
    """``value_and_grad``'s gradients against central differences of ``forward``'s loss
    (or of ``loss``, a function of the params, such as ``held_stop_gradients`` gives).

    ``rtol``, if given, is an extra fixed bound on ``max_rel`` (the derived tolerance
    always applies).
    """
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    _, grads = module.value_and_grad(params, inputs, **fixed_draws(module))
    rows = compare_gradients(loss or loss_of(module, inputs), params, {k: grads[k] for k in module.WRT},
                             max_elements, directions, seed)
    return [ParamCheck(r["name"], tuple(params[r["name"]].shape) if r["name"] in params else None, r["probes"],
                       r["error"], r["tol"], r["rel"], r["ok"] and (rtol is None or r["rel"] <= rtol), r["zero"])
            for r in rows]


def held_stop_gradients(graph, params, inputs):
    """params -> the loss with every stop_gradient value held at its value at ``params``,
    and how many are held; None when the graph has no stop_gradient.

    value_and_grad differentiates stop_gradient(x) as a constant, so on a param's path
    (a target network, a straight-through estimator x + sg(round(x) − x)) the plain
    loss is the wrong function to difference: its slope is not the gradient asked for,
    and a correct model FAILed.  A compiled copy of the graph returns each x (forward
    is the identity there); another takes them as inputs in place of the stop_gradients.
    """
    from backcomp.compiler import build
    from backcomp.graph import toposort
    if not any(n.op == "stop_gradient" and n.dtype == "float" for n in graph.nodes):
        return None
    seen, _ = graph.clone()
    held, _ = graph.clone()
    loss = graph.loss_node.name
    names = {}
    for a, b in zip(seen.nodes, held.nodes):
        if a.op == "stop_gradient" and a.dtype == "float":
            names[b] = f"stop_gradient_{len(names)}"
            seen.output(names[b], a.inputs[0])
    for g in (seen, held):
        if loss not in g.outputs:
            g.output(loss, g.loss_node)
    held.replace_uses({n: held.input(name, n.shape, n.dtype) for n, name in names.items()})
    held.nodes = toposort(held.nodes)
    values_module, held_module = build(seen), build(held)
    out = values_module.forward(params, inputs, **fixed_draws(values_module))
    values = {name: np.array(out[name]) for name in names.values()}
    return (lambda p: held_module.forward(p, {**inputs, **values}, **fixed_draws(held_module))[loss]), len(names)
