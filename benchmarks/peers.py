"""Peer implementations of one training step of a softmax-cross-entropy ReLU MLP.

These are what backcomp's generated gradient code is measured against. Every
peer computes, for float32 data,

    h0 = x;  z_i = h_{i-1} @ W_i + b_i;  h_i = relu(z_i) (hidden layers only)
    loss = mean_over_batch( -sum(Y * log_softmax(z_L), axis=-1) )

and returns ``(loss, grads)`` with grads keyed ``"W1", "b1", "W2", ...``.
``sizes`` is ``[input_dim, hidden..., classes]``; ``W_i`` has shape
``[sizes[i-1], sizes[i]]`` and ``b_i`` shape ``[sizes[i]]``.

Usage (from a script in benchmarks/, e.g. ``python benchmarks/run.py``)::

    from peers import make_data, build_peers, check_agree
    params, x, y = make_data([784, 128, 10], batch=32, seed=0)
    steps, skipped = build_peers([784, 128, 10])   # skipped: name -> reason
    results = {n: s(params, x, y) for n, s in steps.items()}
    check_agree(results)                            # vs hand_numpy
    fn = steps["jax_jit"].bind(params, x, y)        # zero-arg, inputs resident

Peers that cannot be imported are reported in ``skipped``, never raised.
Nothing here sets OPENBLAS_* variables: the environment decides the BLAS.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

__all__ = [
    "PEERS", "REFERENCE", "NON_NUMERIC", "PeerUnavailable", "Step",
    "make_data", "param_names", "build_peers", "check_agree",
    "make_hand_numpy", "make_torch_eager", "make_jax_jit", "make_autograd",
    "make_gemm_floor", "init_jax_cpu", "current_blas_threads",
]

REFERENCE = "hand_numpy"
"""The peer every other one is checked against (and ratios are taken to)."""

NON_NUMERIC = frozenset({"gemm_floor"})
"""Peers that time work but compute no loss/grads; excluded from check_agree."""


class PeerUnavailable(ImportError):
    """A peer's framework is missing or unusable; the peer is skipped, not fatal."""


# ----------------------------------------------------------------------------
# Data and the Step wrapper
# ----------------------------------------------------------------------------

def param_names(sizes: list[int]) -> list[str]:
    """``["W1", "b1", "W2", "b2", ...]`` for ``len(sizes) - 1`` layers."""
    out = []
    for i in range(1, len(sizes)):
        out += [f"W{i}", f"b{i}"]
    return out


def make_data(sizes: list[int], batch: int, seed: int = 0
              ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Deterministic float32 inputs: ``(params, x, y)``.

    W is Glorot-uniform (keeps activations O(1) so no peer hits denormals or
    overflow), b is zero, x is standard normal ``[batch, sizes[0]]`` and y is
    one-hot ``[batch, sizes[-1]]`` of uniformly random labels. All arrays are
    C-contiguous float32, so no peer pays a hidden cast or copy.
    """
    if len(sizes) < 2:
        raise ValueError("sizes needs at least [input_dim, classes]")
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i in range(1, len(sizes)):
        fan_in, fan_out = sizes[i - 1], sizes[i]
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        params[f"W{i}"] = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
        params[f"b{i}"] = np.zeros(fan_out, dtype=np.float32)
    x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    labels = rng.integers(0, sizes[-1], size=batch)
    y = np.zeros((batch, sizes[-1]), dtype=np.float32)
    y[np.arange(batch), labels] = 1.0
    return params, x, y


def _identity_prepare(params, x, y):
    return params, x, y


class Step:
    """A peer's training step: ``step(params, x, y) -> (loss, grads)``.

    Accepts NumPy inputs (converting if its framework needs to). ``prepare``
    converts inputs once to the framework's native, resident form so that
    timing excludes per-call conversion -- each peer at its best, as a real
    training loop would hold its parameters. ``bind`` returns the zero-arg
    callable that ``timing.interleaved_medians`` wants. ``info`` carries
    facts worth reporting (framework version, threads, jax compile time).
    """

    def __init__(self, name: str, fn: Callable, prepare: Callable = _identity_prepare,
                 info: dict[str, Any] | None = None):
        self.name = name
        self.fn = fn
        self.prepare = prepare
        self.info: dict[str, Any] = info if info is not None else {}  # shared: peers update it

    def __call__(self, params, x, y):
        return self.fn(params, x, y)

    def bind(self, params, x, y) -> Callable[[], Any]:
        """Zero-arg callable on prepared (framework-resident) inputs."""
        p, xx, yy = self.prepare(params, x, y)
        fn = self.fn
        return lambda: fn(p, xx, yy)

    def __repr__(self):
        return f"Step({self.name!r}, info={self.info!r})"


def current_blas_threads() -> int:
    """Thread count NumPy's BLAS is limited to right now (e.g. by pin_threads).

    Framework peers copy it so that every peer uses the same number of cores.
    Falls back to os.cpu_count() if threadpoolctl is missing.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.cpu_count() or 1
    counts = [d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"]
    return min(counts) if counts else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------
# hand_numpy: the reference
# ----------------------------------------------------------------------------

def make_hand_numpy(sizes: list[int]) -> Step:
    """Textbook batched backprop in NumPy, written carefully; the reference.

    Stable log-softmax; dlogits = (softmax - Y) / B (valid as rows of Y sum to
    1, as one-hot rows do); dW = h.T @ delta; db = delta.sum(0);
    delta_prev = (delta @ W.T) * (h > 0). Bias-add, ReLU and the softmax run
    in place, and the ReLU mask is taken from h (h > 0 iff z > 0) so z need
    not be kept. float32 throughout (NumPy 2 keeps Python scalars weak).
    """
    L = len(sizes) - 1
    Wn = [f"W{i}" for i in range(1, L + 1)]
    bn = [f"b{i}" for i in range(1, L + 1)]

    def step(params, x, y):
        B = x.shape[0]
        hs = [x]
        h = x
        for i in range(L - 1):
            z = h @ params[Wn[i]]
            z += params[bn[i]]
            np.maximum(z, 0, out=z)
            hs.append(z)
            h = z
        z = h @ params[Wn[-1]]
        z += params[bn[-1]]
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        z -= np.log(s)                    # z is now log_softmax
        loss = -np.vdot(y, z) / B
        delta = e
        delta /= s                        # softmax
        delta -= y
        delta *= 1.0 / B
        grads = {}
        for i in range(L - 1, -1, -1):
            h = hs[i]
            grads[Wn[i]] = h.T @ delta
            grads[bn[i]] = delta.sum(axis=0)
            if i > 0:
                delta = delta @ params[Wn[i]].T
                delta *= h > 0
        return loss, grads

    return Step("hand_numpy", step, info={"numpy": np.__version__})


# ----------------------------------------------------------------------------
# torch_eager
# ----------------------------------------------------------------------------

def make_torch_eager(sizes: list[int], threads: int | None = None) -> Step:
    """PyTorch eager on CPU: addmm/relu/cross_entropy forward, loss.backward().

    ``threads`` defaults to current_blas_threads() so torch (MKL/oneDNN/OpenMP)
    uses as many cores as NumPy's BLAS. Inputs become tensors via
    torch.from_numpy (zero-copy); prepare() makes them leaf tensors once,
    and each call sets .grad = None (zero_grad(set_to_none=True) semantics).
    Grads come back as torch tensors (np.asarray works on them).
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:  # pragma: no cover - depends on environment
        raise PeerUnavailable(f"torch not importable: {e}") from e
    threads = threads or current_blas_threads()
    torch.set_num_threads(threads)
    L = len(sizes) - 1
    names = param_names(sizes)
    Wn = names[0::2]
    bn = names[1::2]

    def prepare(params, x, y):
        tp = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)).requires_grad_(True)
              for k, v in params.items()}
        tx = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
        ty = y if isinstance(y, torch.Tensor) else torch.from_numpy(y)
        return tp, tx, ty

    def step(params, x, y):
        if isinstance(x, np.ndarray):
            params, x, y = prepare(params, x, y)
        for k in names:
            params[k].grad = None
        h = x
        for i in range(L):
            z = torch.addmm(params[bn[i]], h, params[Wn[i]])
            h = torch.relu(z) if i < L - 1 else z
        # probability targets: mean over batch of -sum(y * log_softmax(z))
        loss = F.cross_entropy(h, y)
        loss.backward()
        return loss.detach(), {k: params[k].grad for k in names}

    return Step("torch_eager", step, prepare,
                info={"torch": torch.__version__, "threads": torch.get_num_threads()})


# ----------------------------------------------------------------------------
# jax_jit
# ----------------------------------------------------------------------------

_JAX_THREADS: int | None = None   # pool size we initialized XLA:CPU with


def _jax_backend_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:
        return True   # cannot tell: assume yes, i.e. do not try to resize


def init_jax_cpu(threads: int | None = None):
    """Import jax on the CPU backend with an XLA:CPU pool of ``threads`` cores.

    XLA sizes its intra-op thread pool from the CPU affinity mask when the
    backend starts and cannot change it afterwards (XLA_FLAGS thread options
    did not limit it in jaxlib 0.10). So if the backend is not up yet, this
    narrows the calling thread's affinity to the first ``threads`` CPUs,
    starts the backend (it sizes its pool from that mask), then restores the
    full mask on the calling thread and on the threads the backend started.
    Returns the jax module; the
    thread count in effect is in ``peers._JAX_THREADS`` (None = unknown,
    backend was started elsewhere).
    """
    global _JAX_THREADS
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax
    except ImportError as e:
        raise PeerUnavailable(f"jax not importable: {e}") from e
    threads = threads or current_blas_threads()
    if not _jax_backend_initialized():
        full = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if full and threads < len(full):
            tasks = "/proc/self/task"
            before = set(os.listdir(tasks)) if os.path.isdir(tasks) else set()
            os.sched_setaffinity(0, sorted(full)[:threads])
            try:
                jax.devices()
            finally:
                os.sched_setaffinity(0, full)
            # Unbind the new XLA workers again: the pool keeps its size, but
            # they may run on any core, like BLAS/OpenMP threads (bound to one
            # core they compete with the Python thread when it lands there).
            if before:
                for tid in set(os.listdir(tasks)) - before:
                    try:
                        os.sched_setaffinity(int(tid), full)
                    except OSError:
                        pass
        else:
            jax.devices()
        _JAX_THREADS = min(threads, len(full)) if full else threads
    elif _JAX_THREADS is not None and _JAX_THREADS != threads:
        warnings.warn(f"jax backend already running with {_JAX_THREADS} threads; "
                      f"cannot change it to {threads}", RuntimeWarning, stacklevel=2)
    if jax.default_backend() != "cpu":
        raise PeerUnavailable(f"jax default backend is {jax.default_backend()!r}, not cpu "
                              "(set JAX_PLATFORMS=cpu before importing jax)")
    return jax


def make_jax_jit(sizes: list[int], threads: int | None = None) -> Step:
    """jax.jit(jax.value_and_grad(loss)) on the CPU backend, float32.

    Each call blocks until loss and grads are ready (async dispatch would
    otherwise make timings meaningless). The first call for a new batch size
    traces and compiles; its wall time (trace + compile + one run) is stored
    in ``step.info["compile_seconds"]``, kept apart from steady-state timing.
    prepare() device_puts inputs once; NumPy inputs also work (copied per call).
    """
    jax = init_jax_cpu(threads)
    import jax.numpy as jnp
    L = len(sizes) - 1

    def loss_fn(params, x, y):
        h = x
        for i in range(1, L + 1):
            z = h @ params[f"W{i}"] + params[f"b{i}"]
            h = jax.nn.relu(z) if i < L else z
        logp = jax.nn.log_softmax(h, axis=-1)
        return -jnp.mean(jnp.sum(y * logp, axis=-1))

    vg = jax.jit(jax.value_and_grad(loss_fn))
    seen: set = set()
    info = {"jax": jax.__version__, "threads": _JAX_THREADS, "compile_seconds": None}

    def step(params, x, y):
        if x.shape not in seen:
            t0 = time.perf_counter()
            out = jax.block_until_ready(vg(params, x, y))
            info["compile_seconds"] = time.perf_counter() - t0
            seen.add(x.shape)
            return out
        return jax.block_until_ready(vg(params, x, y))

    def prepare(params, x, y):
        return jax.device_put((params, x, y))

    return Step("jax_jit", step, prepare, info)


# ----------------------------------------------------------------------------
# autograd (HIPS)
# ----------------------------------------------------------------------------

def make_autograd(sizes: list[int]) -> Step:
    """HIPS autograd value_and_grad over a dict of params (NumPy-traced tape).

    Shows the cost of a general-purpose, per-op-taped NumPy autodiff.
    """
    try:
        import autograd
        import autograd.numpy as anp
        from autograd import value_and_grad
    except ImportError as e:
        raise PeerUnavailable(f"autograd not importable: {e}") from e
    L = len(sizes) - 1

    def loss_fn(params, x, y):
        h = x
        for i in range(1, L + 1):
            z = anp.dot(h, params[f"W{i}"]) + params[f"b{i}"]
            h = anp.maximum(z, 0.0) if i < L else z
        z = h - anp.max(h, axis=1, keepdims=True)
        logp = z - anp.log(anp.sum(anp.exp(z), axis=1, keepdims=True))
        return -anp.mean(anp.sum(y * logp, axis=1))

    vg = value_and_grad(loss_fn)
    return Step("autograd", vg, info={"autograd": getattr(autograd, "__version__", "?")})


# ----------------------------------------------------------------------------
# gemm_floor
# ----------------------------------------------------------------------------

def make_gemm_floor(sizes: list[int]) -> Step:
    """Only the GEMMs of one step, into preallocated outputs: a lower bound.

    Forward h @ W per layer; backward h.T @ delta and delta @ W.T per layer,
    except delta @ W1.T (the input needs no gradient). np.matmul(out=...)
    with buffers allocated once per batch size, so no allocation is timed.
    Nothing NumPy-based can do this step faster on this BLAS; it returns
    ``(None, None)`` and is excluded from check_agree.
    """
    L = len(sizes) - 1
    Wn = [f"W{i}" for i in range(1, L + 1)]
    bufs: dict[int, tuple] = {}

    def alloc(B):
        fwd = [np.empty((B, sizes[i + 1]), np.float32) for i in range(L)]
        delta = [np.empty((B, sizes[i + 1]), np.float32) for i in range(L)]
        delta[-1][...] = np.random.default_rng(0).standard_normal(delta[-1].shape) * 0.01
        dW = [np.empty((sizes[i], sizes[i + 1]), np.float32) for i in range(L)]
        return fwd, delta, dW

    def step(params, x, y):
        B = x.shape[0]
        b = bufs.get(B)
        if b is None:
            b = bufs[B] = alloc(B)
        fwd, delta, dW = b
        mm = np.matmul
        h = x
        for i in range(L):
            mm(h, params[Wn[i]], out=fwd[i])
            h = fwd[i]
        for i in range(L - 1, -1, -1):
            mm((fwd[i - 1] if i > 0 else x).T, delta[i], out=dW[i])
            if i > 0:
                mm(delta[i], params[Wn[i]].T, out=delta[i - 1])
        return None, None

    return Step("gemm_floor", step, info={"numpy": np.__version__})


# ----------------------------------------------------------------------------
# Registry and agreement check
# ----------------------------------------------------------------------------

PEERS: dict[str, Callable[[list[int]], Step]] = {
    "hand_numpy": make_hand_numpy,
    "torch_eager": make_torch_eager,
    "jax_jit": make_jax_jit,
    "autograd": make_autograd,
    "gemm_floor": make_gemm_floor,
}
"""name -> factory(sizes) -> Step. Order is the reporting order."""


def build_peers(sizes: list[int], names: list[str] | None = None
                ) -> tuple[dict[str, Step], dict[str, str]]:
    """Build the named peers (default: all) -> ``(steps, skipped)``.

    A peer whose framework is missing or unusable lands in ``skipped`` as
    ``name -> reason`` instead of raising, so a run without torch or jax
    still benchmarks the rest. Call inside ``timing.pin_threads(n)`` so the
    framework peers pick up the same thread count.
    """
    steps: dict[str, Step] = {}
    skipped: dict[str, str] = {}
    for name in names or list(PEERS):
        try:
            steps[name] = PEERS[name](sizes)
        except ImportError as e:   # includes PeerUnavailable
            skipped[name] = str(e)
    return steps, skipped


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):     # torch tensor
        a = a.detach()
    return np.asarray(a)


def check_agree(results: dict[str, tuple[Any, dict[str, Any]]], ref: str = REFERENCE,
                rtol: float = 1e-4, atol: float = 1e-5, require_float32: bool = True
                ) -> dict[str, float]:
    """Assert every peer's loss and grads match ``results[ref]`` to float32 tolerance.

    ``results`` maps name -> (loss, grads) as returned by the steps; entries
    whose loss is None (gemm_floor) are ignored. Criterion: relative Frobenius
    error ``|a - r| / |r| <= 10 rtol`` per array (``atol`` guards all-zero arrays). With ``require_float32`` every output
    must be float32 too, since a peer silently computing in float64 would be
    an unfair (and slower) comparison. Returns name -> max abs deviation
    over loss and all grads; raises AssertionError listing every mismatch.
    """
    ref_loss, ref_grads = results[ref]
    ref_loss = _np(ref_loss)
    problems: list[str] = []
    maxdev: dict[str, float] = {}
    for name, (loss, grads) in results.items():
        if loss is None:
            continue
        worst = 0.0
        pairs = [("loss", _np(loss), ref_loss)]
        missing = set(ref_grads) ^ set(grads)
        if missing:
            problems.append(f"{name}: grad keys differ from {ref}: {sorted(missing)}")
        pairs += [(k, _np(grads[k]), _np(ref_grads[k])) for k in ref_grads if k in grads]
        for key, a, r in pairs:
            if a.shape != r.shape:
                problems.append(f"{name}.{key}: shape {a.shape} != {r.shape}")
                continue
            if require_float32 and a.dtype != np.float32:
                problems.append(f"{name}.{key}: dtype {a.dtype}, expected float32")
            a64, r64 = a.astype(np.float64), r.astype(np.float64)
            dev = np.abs(a64 - r64)
            worst = max(worst, float(dev.max(initial=0.0)))
            # Relative Frobenius error: a wrong gradient is off by O(1); float32 noise
            # (summation order, and ReLU masks of units within 1e-7 of 0 that flip
            # between BLAS libraries) by far less than 1e-3.
            rel = float(np.linalg.norm(a64 - r64) / max(np.linalg.norm(r64), atol))
            if rel > rtol * 10:
                problems.append(f"{name}.{key}: relative error {rel:.3g} (max abs {dev.max():.3g})")
        maxdev[name] = worst
    if problems:
        raise AssertionError("peers disagree with %s:\n  %s" % (ref, "\n  ".join(problems)))
    return maxdev


if __name__ == "__main__":
    # Self-check: every available peer agrees with hand_numpy on two shapes.
    for sizes, batch in (([784, 128, 10], 32), ([784, 256, 256, 10], 128)):
        params, x, y = make_data(sizes, batch, seed=0)
        steps, skipped = build_peers(sizes)
        for n, why in skipped.items():
            print(f"skipped {n}: {why}")
        res = {n: s(params, x, y) for n, s in steps.items()}
        dev = check_agree(res)
        print(sizes, batch, "agree;", ", ".join(f"{n} {d:.1e}" for n, d in dev.items()))
