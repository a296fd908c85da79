"""Shared helpers for the backcomp test suite.

The central helper is ``gradcheck``: compile a graph, draw float64 values for its
leaves from per-leaf *domains* (positive for log/sqrt, away from kinks for
relu/abs, ...), and assert that every gradient of the compiled module matches
central finite differences of its forward loss, within the tolerance that
backcomp.check derives from the step (the project's one finite-difference checker).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import backcomp
from backcomp.check import check_gradients, fixed_draws


# ----- options and collection ---------------------------------------------------------
#: tests/golden/*.py are generated modules that test_golden.py compares with, not tests
collect_ignore = ["golden"]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/ from the current code generator instead of comparing")


# ----- session setup ------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Compiled modules go to a per-session temp dir, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("backcomp_cache")
    saved = os.environ.get("BACKCOMP_CACHE")
    os.environ["BACKCOMP_CACHE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("BACKCOMP_CACHE", None)
    else:
        os.environ["BACKCOMP_CACHE"] = saved


# ----- input domains -------------------------------------------------------------------
# Each domain draws float64 values of a shape from a generator (as jax's rng factories).
def rand_real(rng, shape):
    """Standard normal values."""
    return rng.standard_normal(shape)


def rand_positive(rng, shape):
    """Values in [0.5, 2): for log, sqrt, a pow base, a denominator."""
    return rng.uniform(0.5, 2.0, shape)


def rand_nonzero(rng, shape):
    """|x| in [0.2, 1.5) with a random sign: away from the kink of relu/abs/leaky_relu."""
    return rng.uniform(0.2, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def rand_distinct(rng, shape):
    """A shuffled, jittered grid: gaps of at least 0.04 within the array (no ties for max)
    and, with the jitter, no ties with another array drawn the same way (maximum, minimum)."""
    n = int(np.prod(shape, dtype=int))
    grid = (rng.permutation(n) - n / 2).reshape(shape) * 0.1
    return grid + rng.uniform(-0.03, 0.03, shape)


def rand_unit(rng, shape):
    """Values in (-0.9, 0.9)."""
    return rng.uniform(-0.9, 0.9, shape)


def rand_above_minus_half(rng, shape):
    """Values in [-0.45, 1): log1p's domain, both signs (times a positive <= 2: still > -1)."""
    return rng.uniform(-0.45, 1.0, shape)


DOMAINS = {"above_minus_half": rand_above_minus_half, "real": rand_real, "positive": rand_positive, "nonzero": rand_nonzero,
           "distinct": rand_distinct, "unit": rand_unit}


def concrete(shape, batch: int):
    return tuple(batch if isinstance(d, str) else d for d in shape)


def draw(module, domains: dict[str, str] | None = None, batch: int = 3, seed: int = 0,
         dtype=np.float64) -> tuple[dict, dict]:
    """(params, inputs) for ``module`` with each leaf drawn from its domain.

    ``domains`` maps a leaf name to a key of ``DOMAINS`` (default "real").  Integer
    inputs are labels in [0, the size of their model's class axis).
    """
    domains = domains or {}
    rng = np.random.default_rng(seed)
    params = {name: DOMAINS[domains.get(name, "real")](rng, shape).astype(dtype)
              for name, shape in module.PARAMS.items()}
    inputs = {}
    for name, shape in module.INPUTS.items():
        shape = concrete(shape, batch)
        if module.INPUT_KINDS[name] == "int":
            low, high = (batch if isinstance(b, str) else b for b in module.INDEX_RANGES.get(name, (0, 2)))
            inputs[name] = rng.integers(low, high, size=shape).astype(np.int64)
        else:
            inputs[name] = DOMAINS[domains.get(name, "real")](rng, shape).astype(dtype)
    return params, inputs


def gradcheck(graph, batch: int = 3, seed: int = 0, domains: dict[str, str] | None = None,
              reference=None, opt_level: int = 1):
    """Build ``graph``, check every gradient against central differences; return the module.

    ``reference(params, inputs) -> float`` is an independent NumPy computation of
    the loss; when given, the compiled loss must equal it (so the forward emission
    is checked too, not only that forward and backward agree with each other).
    """
    module = backcomp.build(graph, opt_level=opt_level)
    params, inputs = draw(module, domains, batch, seed)
    expected = None
    if reference is not None:
        expected = reference({k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in inputs.items()})
    checked = Copying(module)
    loss, grads = checked.value_and_grad(params, inputs)
    assert np.shape(loss) == () and np.isfinite(loss)
    assert set(grads) == set(module.WRT)
    for name, g in grads.items():
        assert g.shape == params[name].shape, f"grad of {name}: shape {g.shape} != {params[name].shape}"
        assert g.dtype == np.float64, f"grad of {name}: dtype {g.dtype}"
        assert np.all(np.isfinite(g)), f"grad of {name} is not finite: {g}"
    if reference is not None:
        np.testing.assert_allclose(loss, expected, rtol=1e-10, atol=1e-12, err_msg="forward loss vs NumPy reference")
    for result in check_gradients(checked, params, inputs, seed=seed):
        assert result.checked > 0
        assert result.ok, (
            f"{graph.name}: gradient of '{result.name}' off by {result.max_abs:.3g} (tolerance {result.tol:.3g}, "
            f"relative error {result.max_rel:.3g}) against central differences")
    return module


class Copying:
    """A module whose functions get fresh copies of their arguments on every call.

    Gradient checks call the module many times with the same arrays; this keeps
    them about gradients.  That modules never mutate their inputs is asserted on
    its own in test_module.py.
    """

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def forward(self, params, inputs):
        return self.module.forward(_copies(params), _copies(inputs), **fixed_draws(self.module))

    def value_and_grad(self, params, inputs):
        return self.module.value_and_grad(_copies(params), _copies(inputs), **fixed_draws(self.module))


def _copies(arrays: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}
