"""Helpers that generated modules define for themselves: their source is copied in.

A generated module imports nothing but numpy, so what NumPy lacks is written here
once, as plain functions over numpy, tested here, and inlined by the code
generator (``inspect.getsource``) into the modules that call it.
"""
from __future__ import annotations

import numpy as np


def _erf(x, out=None):
    """erf in the dtype of x, vectorised, in blocks; into ``out`` if given (x itself
    may be it: each block is read before it is written).

    Every temporary of a block stays in cache and in malloc's free lists, where
    whole-array float64 temporaries cost a page fault per 4 KiB each call (3.5× slower
    on 256×1024 float32, benchmarks/suite.py).  float32 gets _erf_block32 in float32
    arithmetic, in blocks of 65536 (≤ 1.48 ulp; 1.5-1.7× faster than the rational in
    float64 it replaced, benchmarks/erf.py); float64, float16 and integers get Cephes'
    two-range approximation (_erf_block, ≤ 1e-14 relative) in blocks of 16384.
    """
    x = np.asarray(x)
    flat = x.reshape(-1)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    result = out if out is not None and out.flags.c_contiguous and out.dtype == dtype \
        else np.empty(x.shape, dtype)
    values = result.reshape(-1)   # a view: result is C-contiguous
    if values.dtype == np.float32:
        with np.errstate(over="ignore", under="ignore"):   # huge |x|: see _erf_block32
            for start in range(0, flat.size, 65536):
                _erf_block32(flat[start:start + 65536], values[start:start + 65536])
    else:
        for start in range(0, flat.size, 16384):
            values[start:start + 16384] = _erf_block(flat[start:start + 16384])
    if out is not None and result is not out:
        out[...] = result
        return out
    return result


def _erf_block32(x, out):
    """erf of a float32 block into out, in float32 arithmetic (≤ 1.48 ulp, every float32).

    NumPy has no FMA, so each form keeps its rounding where it is damped: a + a·P(a²)
    for |x| < 1, where the correction a·P is small, and 1 - exp(Q(|x|)) from 0.95 up,
    where erfc = exp(Q) ≤ 0.18 shrinks exp's own 2.4 ulp.  Both are minimax fits (in
    ulps, coefficients rounded to float32 one by one) that stay above erf on the other's
    side, so their minimum is right everywhere with no select (np.where costs several
    passes); huge |x| overflows them to +inf and 1 - exp(-inf) = 1.  NaN stays NaN; the
    sign of x is copied back as a bit."""
    a = np.abs(x)
    small = _polyval_inplace((8.469371e-05, -0.0008199177, 0.005210091, -0.026865313,
                              0.112838544, -0.37612647, 0.12837917), a * a)
    small *= a
    small += a
    large = _polyval_inplace((-0.0012004222, 0.015179177, -0.08989049, -0.6525663,
                              -1.1188773, -0.0022500446), a)
    np.exp(large, out=large)
    np.subtract(1, large, out=large)
    np.minimum(small, large, out=small)
    sign = np.bitwise_xor(x.view(np.int32), a.view(np.int32), out=a.view(np.int32))
    np.bitwise_or(small.view(np.int32), sign, out=out.view(np.int32))


def _erf_block(x):
    """_erf of a 1-D block in float64: both ranges evaluated on every element (Horner's
    rule, in place), the right one picked per element, the sign copied from x."""
    a = np.abs(x).astype(np.float64)
    s = np.minimum(a, 1.0)
    z = s * s
    small = _polyval_inplace((9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
                              7.00332514112805075473e3, 5.55923013010394962768e4), z)
    small *= s
    small /= _polyval_inplace((1.0, 3.35617141647503099647e1, 5.21357949780152679795e2,
                               4.59432382970980127987e3, 2.26290000613890934246e4,
                               4.92673942608635921086e4), z)
    b = np.clip(a, 1.0, 6.0, out=s)   # NaN stays NaN
    large = _polyval_inplace((2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
                              4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
                              9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2), b)
    large /= _polyval_inplace((1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
                               9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
                               1.65666309194161350182e3, 5.57535340817727675546e2), b)
    np.multiply(b, b, out=z)
    np.negative(z, out=z)
    large *= np.exp(z, out=z)
    np.subtract(1.0, large, out=large)
    out = np.where(a < 1.0, small, large)
    return np.copysign(out, x, out=out)


def _polyval_inplace(coeffs, z):
    """np.polyval(coeffs, z) by Horner's rule in one new array."""
    p = z * coeffs[0]
    for c in coeffs[1:-1]:
        p += c
        p *= z
    p += coeffs[-1]
    return p


def _sigmoid(x, out=None):
    """σ(x) = 1/(1 + e^−x): four passes (negate, exp, add, divide).  e^−x overflows to
    inf for x < −88.72 (float32; −709.78 in float64, −11.09 in float16) and 1/inf = 0, so
    nothing turns NaN; relative precision (under 2 ulp) holds down to the smallest normal
    result, below it σ is a subnormal within about one subnormal step, and 0 past the
    overflow (where σ < tiny/4).  1.45–1.6× faster than the one-exp
    max(e^−|x|, [x >= 0])/(1 + e^−|x|), whose bool-to-float maximum is a slow pass (an
    LSTM's (32, 256) gates, (16, 64, 256), float32)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":   # integer ids, booleans: σ of them as float64
        x = x.astype(np.float64)
    # out= keeps 0-d values arrays; out may be x itself (each pass is elementwise)
    out = np.empty_like(x) if out is None else out
    with np.errstate(over="ignore", under="ignore"):
        np.negative(x, out=out)
        np.exp(out, out=out)
        out += 1
        return np.divide(1, out, out=out)


def _index_error(kind, name, value, low, high):
    """Name the first index or label outside [low, high) and where it is."""
    where = tuple(int(i) for i in np.argwhere((value < low) | (value >= high))[0])
    raise ValueError(f"{kind} '{name}' holds {value[where]} at index {where}, "
                     f"outside the allowed range [{low}, {high})")


def _check_finite(node, value):
    """--check-finite: stop at the first node whose value is not finite."""
    if not np.all(np.isfinite(value)):
        raise FloatingPointError(f"non-finite value (NaN or Inf) produced by node: {node}")


def _scatter_add(ids, rows, n):
    """out[i] = Σ of rows[k] over k with ids[k] == i (ids 1-D, rows 2-D, n rows): take's VJP.

    Repeated ids accumulate.  Sorting the ids and summing each run with
    ``np.add.reduceat`` was 2-4× faster than ``np.add.at``, ``np.bincount`` per
    column or a one-hot matmul on every shape measured (benchmarks/take.py), except
    for a handful of ids, where ``np.add.at`` has no sort to pay for.
    """
    ids = np.where(ids < 0, ids + n, ids)   # take's ids may count from the end: -1 and n-1 are one row
    out = np.zeros((n, rows.shape[1]), dtype=rows.dtype)
    if ids.size <= 64:
        np.add.at(out, ids, rows)
        return out
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    out[ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


def _tangents(kind, given, primals):
    """The tangent of each value in ``primals`` (name -> array) from the dict ``given``:
    same shape as its value, cast to its dtype; a missing one is zeros."""
    if not isinstance(given, dict):
        raise ValueError(f"{kind} must be a dict of arrays, got {type(given).__name__}")
    unknown = [k for k in given if k not in primals]
    if unknown:
        raise ValueError(f"{kind}: unknown {', '.join(repr(k) for k in unknown)} "
                         f"(tangents may be given for {', '.join(primals)})")
    out = []
    for name, value in primals.items():
        t = given.get(name)
        if t is None:
            out.append(np.zeros_like(value))
            continue
        t = np.asarray(t)
        if t.dtype.kind != "f":
            raise ValueError(f"{kind} '{name}' must be a floating-point array, got dtype {t.dtype}")
        if t.shape != value.shape:
            raise ValueError(f"{kind} '{name}' must have the shape of '{name}', {value.shape}, got shape {t.shape}")
        out.append(t.astype(value.dtype, copy=False))
    return out


def _random_seed(rng, needed):
    """The seed of this call's random streams: one draw from the caller's generator."""
    if not needed:
        return None
    if rng is None:
        raise ValueError("this model draws random numbers (dropout in train mode, normal, uniform): "
                         "pass rng=np.random.default_rng(seed)" + ("" if needed == "always" else ", or train=False"))
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return int(rng.integers(2 ** 63))


def _dropout_mask(seed, stream, x, p):
    """1/(1 - p) where a uniform draw is >= p, else 0, in x's dtype (inverted dropout)."""
    u = np.random.default_rng([seed, stream]).random(x.shape, dtype=x.dtype)
    if p >= 1:
        return np.zeros_like(x)
    return np.where(u >= p, x.dtype.type(1 / (1 - p)), x.dtype.type(0))


#: helper name (as the printer and code generator report it) -> the functions it needs
HELPERS = {"erf": (_erf, _erf_block, _erf_block32, _polyval_inplace), "sigmoid": (_sigmoid,), "index": (_index_error,),
           "finite": (_check_finite,),
           "scatter_add": (_scatter_add,), "tangents": (_tangents,), "random": (_random_seed, _dropout_mask)}


def helper_source(name: str) -> str:
    """The source text a module needs to define helper ``name``."""
    import inspect
    return "\n\n\n".join(inspect.getsource(f).rstrip("\n") for f in HELPERS[name])
