"""float32 erf: the runtime's _erf against the float64 rational it replaced, and np.exp.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/erf.py [--repeats 41]
    python benchmarks/erf.py --exhaustive
    python benchmarks/erf.py --fit

On (16, 64, 512) float32 values N(0, 1)·1.5 (a GELU argument in a transformer step).
``previous`` is the float32 path before it: Eigen's rational x·P(x²)/Q(x²) evaluated in
float64, in blocks of 16384, 1.59 ulp.  ``--exhaustive`` instead checks _erf on every
float32 in [0, 4.5) and its negative against the float64 _erf (1e-14 relative), and
that every float32 from 4.5 up gives exactly 1 (a few minutes).  ``--fit`` (needs scipy)
re-derives _erf_block32's coefficients.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import numpy as np  # noqa: E402

from backcomp.runtime import _erf, _polyval_inplace  # noqa: E402
import timing  # noqa: E402


def previous(x):
    flat = x.reshape(-1)
    out = np.empty(flat.shape, x.dtype)
    for start in range(0, flat.size, 16384):
        s = np.clip(flat[start:start + 16384], -4.0, 4.0, dtype=np.float64)
        z = s * s
        p = _polyval_inplace((-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                              -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                              -1.60960333262415e-02), z)
        p /= _polyval_inplace((-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                               -7.37332916720468e-03, -1.42647390514189e-02), z)
        p *= s
        out[start:start + 16384] = p
    return out.reshape(x.shape)


def max_ulp(y, x):
    from math import erf
    ref = np.array([erf(v) for v in x.ravel().astype(float)])
    return float((np.abs(y.ravel() - ref) / np.spacing(np.abs(ref).astype(np.float32))).max())


def exhaustive():
    worst, where, hist = 0.0, None, np.zeros(8, np.int64)
    top = int(np.float32(4.5).view(np.int32))
    for start in range(0, top, 1 << 24):
        x = np.arange(start, min(start + (1 << 24), top), dtype=np.int32).view(np.float32)
        y = _erf(x)
        ref = _erf(x.astype(np.float64))
        ulp = np.abs(y - ref) / np.spacing(np.abs(ref).astype(np.float32))
        if ulp.max() > worst:
            worst, where = float(ulp.max()), x[ulp.argmax()]
        hist += np.histogram(ulp, bins=np.arange(9) / 4)[0]
        assert np.array_equal(_erf(-x), -y)
    print(f"every float32 in [0, 4.5) and its negative ({top} each): max {worst:.4f} ulp at {where!r}")
    print("ulps in [0, 0.25), [0.25, 0.5), ..., [1.75, 2):", hist.tolist(), "above 2:", top - int(hist.sum()))
    inf = int(np.float32(np.inf).view(np.int32))
    for start in range(top, inf + 1, 1 << 24):
        x = np.arange(start, min(start + (1 << 24), inf + 1), dtype=np.int32).view(np.float32)
        assert (_erf(x) == 1).all()
    print("every float32 in [4.5, inf] gives exactly 1")


def fit():
    """_erf_block32's coefficients: minimax in ulps of erf by linear programming, each
    coefficient then rounded to float32 in turn (lowest order first) with the others refitted.

    small(a) = a + a·P(a²) is fitted on [0, 1] and kept above erf (by 3e-7) from 1.08 up;
    large(a) = 1 - exp(Q(a)) on [0.95, 3.95], weighted by erfc (its error in erf), kept
    above erf below 0.8 and at erfc < e^-17.5 (so 1 - exp(Q) rounds to 1) from 3.95 up.
    """
    from scipy.optimize import linprog
    from scipy.special import erf, erfc

    def minimax(basis, target, weight, below, bound, fixed):
        # min t: |weight·(basis·c - target)| <= t and below·c <= bound, some c fixed
        free = [j for j in range(basis.shape[1]) if j not in fixed]

        def shift(m):   # what the fixed coefficients contribute
            return m[:, list(fixed)] @ list(fixed.values()) if fixed else 0
        a = basis[:, free] * weight[:, None]
        scale = np.abs(a).max(0)
        a, b = a / scale, (target - shift(basis)) * weight
        le = below[:, free] / scale
        rows = np.maximum(np.abs(le).max(1), 1e-300)[:, None]   # scaled rows help the solver
        one = np.ones((len(a), 1))
        res = linprog(np.r_[np.zeros(len(free)), 1],
                      A_ub=np.block([[a, -one], [-a, -one], [le / rows, 0 * rows]]),
                      b_ub=np.r_[b, -b, (bound - shift(below)) / rows[:, 0]],
                      bounds=[(None, None)] * len(free) + [(0, None)])
        c = np.zeros(basis.shape[1])
        c[list(fixed)], c[free] = list(fixed.values()), res.x[:-1] / scale
        return c

    def rounded(*problem):
        fixed = {}
        for j in range(problem[0].shape[1]):
            fixed[j] = float(np.float32(minimax(*problem, fixed)[j]))
        return [fixed[j] for j in range(len(fixed))]

    a, above = np.linspace(1e-6, 1.0, 6000), np.linspace(1.08, 8.0, 3000)
    ulp = np.spacing(erf(a).astype(np.float32)).astype(float)
    small = rounded(np.stack([a * a ** (2 * j) for j in range(7)], 1), erf(a) - a, 1 / ulp,
                    -np.stack([above * above ** (2 * j) for j in range(7)], 1), above - erf(above) - 3e-7)
    a, below, tail = np.linspace(0.95, 3.95, 6000), np.linspace(0, 0.8, 3000), np.linspace(3.95, 8.0, 3000)
    large = rounded(np.stack([a ** j for j in range(6)], 1), np.log(erfc(a)), erfc(a) * 2.0 ** 24,
                    np.stack([np.r_[below, tail] ** j for j in range(6)], 1),
                    np.r_[np.log(erfc(below)) - 3e-7 / erfc(below), np.full(len(tail), -17.5)])
    for name, c in (("P (a²), highest first", small), ("Q (a), highest first", large)):
        print(name, ", ".join(str(np.float32(v)) for v in c[::-1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--exhaustive", action="store_true")
    parser.add_argument("--fit", action="store_true")
    args = parser.parse_args(argv)
    if args.exhaustive or args.fit:
        exhaustive() if args.exhaustive else fit()
        return 0
    x = (np.random.default_rng(0).standard_normal((16, 64, 512)) * 1.5).astype(np.float32)
    steps = {"_erf": lambda: _erf(x), "previous": lambda: previous(x), "np.exp": lambda: np.exp(x)}
    report = timing.interleaved_medians(steps, repeats=args.repeats, inner=1)
    print(f"erf of {x.shape} float32, N(0, 1)*1.5")
    print(timing.format_report(report, ref="previous"))
    sample = x.ravel()[:200_000]
    print(f"max ulp on {sample.size} of these values: _erf {max_ulp(_erf(sample), sample):.3f}, "
          f"previous {max_ulp(previous(sample), sample):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
