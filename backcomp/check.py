"""Gradients of a compiled module against central finite differences, in float64.

Used by ``backcomp check`` and the test suite.  Each param is checked per element
(up to ``max_elements`` randomly chosen ones), so a wrong entry cannot hide in an
average; relative error is |fd − ad| / max(|fd|, |ad|, scale) with ``scale`` the
gradient's own magnitude, so near-zero entries do not give spurious failures.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ParamCheck:
    name: str
    shape: tuple
    checked: int
    max_abs: float
    max_rel: float
    ok: bool


def random_inputs(module, batch: int = 3, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Random inputs matching ``module.INPUTS``; symbolic dims get ``batch``.

    Integer inputs are labels: drawn in [0, size of the model's last class axis)
    when that can be found, else in [0, 2).
    """
    rng = np.random.default_rng(seed)
    sizes = {}
    out = {}
    for name, shape in module.INPUTS.items():
        concrete = tuple(sizes.setdefault(d, batch) if isinstance(d, str) else d for d in shape)
        if module.INPUT_KINDS[name] == "int":
            high = getattr(module, "LABEL_CLASSES", {}).get(name, 2)
            out[name] = rng.integers(0, high, size=concrete).astype(np.int64)
        else:
            out[name] = rng.standard_normal(concrete).astype(dtype)
    return out


def random_params(module, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {k: (scale * rng.standard_normal(s)).astype(np.float64) for k, s in module.PARAMS.items()}


def check_gradients(module, params, inputs, eps: float = 1e-6, rtol: float = 1e-6,
                    max_elements: int = 200, seed: int = 0) -> list[ParamCheck]:
    """Compare ``value_and_grad`` with central differences of ``forward``'s loss."""
    rng = np.random.default_rng(seed)
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    _, grads = module.value_and_grad(params, inputs)

    def loss_at(p):
        return float(module.forward(p, inputs)[module.LOSS]) if module.LOSS in module.OUTPUTS \
            else float(module.value_and_grad(p, inputs)[0])

    results = []
    for name in module.WRT:
        value = params[name]
        g = np.asarray(grads[name], dtype=np.float64)
        flat = np.arange(value.size)
        if value.size > max_elements:
            flat = np.sort(rng.choice(value.size, max_elements, replace=False))
        scale = max(float(np.max(np.abs(g))) if g.size else 0.0, 1e-3)
        max_abs = max_rel = 0.0
        for i in flat:
            idx = np.unravel_index(i, value.shape)
            old = value[idx]
            value[idx] = old + eps
            up = loss_at(params)
            value[idx] = old - eps
            down = loss_at(params)
            value[idx] = old
            fd = (up - down) / (2 * eps)
            err = abs(fd - g[idx])
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / max(abs(fd), abs(g[idx]), scale))
        # central differences carry O(eps²) truncation and O(1e-16/eps) rounding error
        results.append(ParamCheck(name, tuple(value.shape), len(flat), max_abs, max_rel, max_rel <= rtol))
    return results
