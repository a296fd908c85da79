"""The helpers generated modules inline (backcomp/runtime.py), against the standard library."""
from __future__ import annotations

import math

import numpy as np
import pytest

from backcomp.runtime import _erf, helper_source


def _erf_reference(x):
    return np.array([math.erf(float(v)) for v in np.ravel(x)]).reshape(np.shape(x))


def _grid():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal(100_000) * 3, np.linspace(-7, 7, 20_001),
                           np.geomspace(1e-300, 1e3, 20_000), -np.geomspace(1e-300, 30, 2_000),
                           [0.0, 1.0, -1.0, 6.0, np.nextafter(6.0, 0), np.nextafter(1.0, 0), 1e308]])


def test_erf_float64_within_1e_14_relative_over_the_real_line():
    x = _grid()
    ref = _erf_reference(x)
    rel = np.abs(_erf(x) - ref) / np.maximum(np.abs(ref), np.finfo(float).tiny)
    assert rel.max() <= 1e-14


def test_erf_float32_within_2_ulp_and_stays_float32():
    x = _grid()[:-1].astype(np.float32)   # without 1e308, which float32 cannot hold
    y = _erf(x)
    assert y.dtype == np.float32
    ref = _erf_reference(x)
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    assert (np.abs(y - ref) / ulp).max() <= 2


def test_erf_in_blocks_keeps_shape_dtype_and_values():
    """_erf works in blocks (65536 elements in float32): a 2-D array whose size is no
    multiple of that gives, in its own shape and dtype, the values of the elements one by one."""
    x = (np.random.default_rng(1).standard_normal((300, 301)) * 2).astype(np.float32)
    y = _erf(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y.ravel(), np.concatenate([_erf(v) for v in np.array_split(x.ravel(), 7)]))
    np.testing.assert_array_equal(y[17], _erf(x[17]))
    ulp = np.spacing(np.abs(_erf_reference(x)).astype(np.float32)).astype(np.float64)
    assert (np.abs(y - _erf_reference(x)) / ulp).max() <= 2
    assert _erf(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_erf_float32_within_2_ulp_on_every_64th_float32():
    """The float32 path is float32 arithmetic: every 64th float32 in [0, 4.5) (from the
    denormals up, past 3.92 where erf rounds to 1), edges and their negatives, against the
    float64 _erf (1e-14 relative).  Every float32 in [0, 4.5) was checked once: 1.48 ulp
    at most, at 1.0581299."""
    bits = np.arange(0, np.float32(4.5).view(np.int32), 64, dtype=np.int32)
    edges = np.array([1.0581299, 0.95, 1.0, 1.08, 3.9192057, 3.9192059, 4.5, 6.5, 30.0, 1e5, 3e38,
                      np.finfo(np.float32).tiny, 1e-45, 1e-30, 1e-8], np.float32)
    worst = 0.0
    for chunk in np.array_split(bits.view(np.float32), 8) + [edges]:
        for x in (chunk, -chunk):
            y = _erf(x)
            assert y.dtype == np.float32
            ref = _erf(x.astype(np.float64))
            worst = max(worst, (np.abs(y - ref) / np.spacing(np.abs(ref).astype(np.float32))).max())
        assert np.array_equal(_erf(-chunk).view(np.int32), (-_erf(chunk)).view(np.int32))   # odd, bit for bit
    assert worst <= 2


def test_erf_float32_saturates_to_one_without_floating_point_errors():
    """Past 3.92 erf rounds to 1 in float32; huge |x| overflows Horner's rule to inf on
    the way there, which must neither warn nor raise under the caller's errstate."""
    x = np.array([3.93, 4.0, 4.5, 9.0, 1e4, 1e19, 3e38, np.inf], np.float32)
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(_erf(x), np.ones_like(x))
        np.testing.assert_array_equal(_erf(-x), -np.ones_like(x))
        assert np.isnan(_erf(np.array([np.nan, -np.nan], np.float32))).all()


def test_erf_float16_and_reversed_views_keep_dtype():
    h = np.linspace(-5, 5, 2001).astype(np.float16)
    y = _erf(h)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), _erf_reference(h.astype(np.float64)), rtol=0, atol=2 ** -11)
    x = np.linspace(-3, 3, 70001, dtype=np.float32)
    np.testing.assert_array_equal(_erf(x[::-1]), _erf(x)[::-1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("value, expected", [(np.inf, 1.0), (-np.inf, -1.0), (-0.0, -0.0), (0.0, 0.0),
                                             (6.5, 1.0), (-30.0, -1.0)])
def test_erf_special_values(value, expected, dtype):
    out = _erf(np.array(value, dtype))
    assert out.shape == () and out.dtype == dtype
    assert out == expected and math.copysign(1, out) == math.copysign(1, expected)
    assert np.isnan(_erf(np.array([np.nan, 1.0], dtype)))[0]


def test_helper_source_defines_what_it_names_with_numpy_only():
    namespace = {"np": np}
    exec(compile(helper_source("erf"), "<helper>", "exec"), namespace)   # our own source, not a spec's
    x = np.linspace(-3, 3, 101)
    np.testing.assert_array_equal(namespace["_erf"](x), _erf(x))
    assert "import" not in helper_source("erf")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_is_accurate_in_both_tails_and_keeps_dtype_and_shape(dtype):
    from backcomp.runtime import _sigmoid
    x = np.concatenate([np.linspace(-100, 100, 4001), [-1e4, 1e4, 0.0, -0.0]]).astype(dtype)
    ref = np.array([1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in x.astype(float)])
    y = _sigmoid(x)
    assert y.dtype == dtype and y.shape == x.shape
    tiny = np.finfo(dtype).tiny
    normal = ref >= tiny   # full relative precision down to the smallest normal result
    assert normal.sum() > 3000 and (np.abs(y - ref)[normal] / ref[normal]).max() <= 4 * np.finfo(dtype).eps
    # below it (x < -87.3 in float32): 0 or a subnormal, never a larger floor value
    assert np.all(np.abs(y - ref)[~normal] <= tiny / 2) and y[x == -1e4] == 0
    assert _sigmoid(np.array([np.inf, -np.inf, np.nan], dtype)).tolist()[:2] == [1.0, 0.0]
    assert np.isnan(_sigmoid(np.array(np.nan, dtype)))
    zero_d = _sigmoid(np.array(2.0, dtype))
    assert isinstance(zero_d, np.ndarray) and zero_d.shape == () and zero_d.dtype == dtype
    assert abs(float(zero_d) - 1 / (1 + math.exp(-2))) <= 4 * np.finfo(dtype).eps


def test_sigmoid_in_place_equals_the_fresh_result():
    from backcomp.runtime import _sigmoid
    x = np.random.default_rng(3).standard_normal((7, 5)).astype(np.float32) * 20
    fresh = _sigmoid(x)
    same = _sigmoid(x, out=x)
    assert same is x and np.array_equal(x, fresh)


def test_sigmoid_of_integers_is_float64():
    from backcomp.runtime import _sigmoid
    y = _sigmoid(np.array([1, 2, -3]))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-np.array([1.0, 2.0, -3.0]))), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_erf_into_out_even_in_place_equals_the_fresh_result(dtype):
    """Chains compute erf in the array of its argument: _erf(x, out=x)."""
    from backcomp.runtime import _erf
    x = (np.random.default_rng(3).standard_normal((7, 70000 // 7)) * 2).astype(dtype)
    fresh = _erf(x)
    same = x.copy()
    assert _erf(same, out=same) is same
    np.testing.assert_array_equal(same, fresh)
    strided = np.empty((x.shape[1], x.shape[0]), dtype).T   # not C-contiguous: copied in
    assert _erf(x, out=strided) is strided
    np.testing.assert_array_equal(strided, fresh)


def test_erf_into_an_out_of_another_dtype_is_cast_as_numpy_casts():
    """(review) float64 x into a float32 out: computed in float64, then cast."""
    from backcomp.runtime import _erf
    x = np.linspace(-3, 3, 7)
    out = np.empty(7, np.float32)
    assert _erf(x, out=out) is out
    np.testing.assert_array_equal(out, _erf(x).astype(np.float32))
