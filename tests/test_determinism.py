"""Determinism and no lost data.

- The same model gives a byte-identical module: across builds in one process, and
  across processes with different PYTHONHASHSEED values (set and dict order must
  never leak into names or statement order) -- for graphs with fan-out, [functions]
  and every example spec.
- A failed write leaves the previous output byte-identical and no temp file behind;
  a file backcomp did not write is never replaced unless ``force``.
- Generated functions never modify their (read-only) inputs: forward,
  value_and_grad and train_step (which updates only the params, in place).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sympy as sp

import backcomp
from backcomp import compiler, ops
from backcomp.compiler import OverwriteError, atomic_write, compile_source, write_module

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
SPECS = [ROOT / "examples" / n for n in ("functions.toml", "mlp.toml", "attention.toml", "residual_mlp.toml")
         if (ROOT / "examples" / n).exists()]


# ----- graphs built in Python (the same code runs in the subprocesses) -------------------------
def fanout():
    g = backcomp.Graph("det_fanout")
    x = g.input("x", ("B", 4))
    W = g.param("W", (4, 4))
    b = g.param("b", (4,))
    h = ops.tanh(x @ W + b)
    a = h * ops.sigmoid(h) + ops.exp(-h)        # h used three times
    c = ops.sum(a @ W, axis=-1)                 # W used twice
    m = ops.max(a, axis=0, keepdims=True)
    g.output("a", a)
    g.loss(ops.mean(c ** 2) + ops.sum(m) + ops.sum(ops.softmax(a, axis=-1) * h))
    return g


def functions():
    u, s = sp.Symbol("u"), sp.Symbol("s")
    swish = ops.scalar_function("swish", [u], u / (1 + sp.exp(-u)))
    softsign = ops.scalar_function("softsign", [u, s], s * u / (1 + sp.Abs(u)))
    g = backcomp.Graph("det_functions")
    x = g.input("x", ("B", 3))
    W = g.param("W", (3, 3))
    h = swish(x @ W)
    k = softsign(h, 2.0) + softsign(x, 0.5)
    g.loss(ops.sum(k * h))
    return g


def wide():
    g = backcomp.Graph("det_wide")
    x = g.input("x", ("B", 6))
    ps = [g.param(f"p{i}", (6,)) for i in range(12)]
    terms = [ops.sin(x * p) for p in ps] + [ops.cos(x * ps[i] + ps[-1 - i]) for i in range(6)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    turned = ops.reshape(ops.transpose(ops.reshape(total, (-1, 2, 3)), (0, 2, 1)), (-1, 6))
    parts = ops.concatenate((total, total[:, ::-1], turned), axis=1)
    g.loss(ops.mean(ops.logsumexp(parts, axis=-1)))
    return g


GRAPHS = {"fanout": fanout, "functions": functions, "wide": wide}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _all_sources() -> dict[str, str]:
    out = {}
    for name, make in GRAPHS.items():
        for level in (0, 1):
            out[f"{name}-O{level}"] = compile_source(make(), opt_level=level)
        out[f"{name}-adam-finite"] = compile_source(make(), optimizer="adam", check_finite=True)
    for spec in SPECS:
        out[spec.name] = compile_source(spec)
    return out


def test_same_graph_twice_in_one_process_is_byte_identical():
    first, second = _all_sources(), _all_sources()
    for key in first:
        assert first[key] == second[key], f"{key}: differs between two compiles"


CHILD = '''
import hashlib, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_determinism import GRAPHS
from backcomp.compiler import compile_source
out = {}
for name, make in GRAPHS.items():
    for level in (0, 1):
        out[f"{name}-O{level}"] = hashlib.sha256(compile_source(make(), opt_level=level).encode()).hexdigest()
    out[f"{name}-adam-finite"] = hashlib.sha256(
        compile_source(make(), optimizer="adam", check_finite=True).encode()).hexdigest()
for spec in sys.argv[2:]:
    out[Path(spec).name] = hashlib.sha256(compile_source(spec).encode()).hexdigest()
print(json.dumps(out))
'''


def test_byte_identical_across_hash_seeds(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    expected = {k: _digest(v) for k, v in _all_sources().items()}
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=seed, BACKCOMP_CACHE=str(tmp_path / "cache"))
        r = subprocess.run([sys.executable, str(script), str(ROOT / "tests"), *map(str, SPECS)], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        diff = [k for k in expected if got.get(k) != expected[k]]
        assert not diff, f"PYTHONHASHSEED={seed}: different source for {diff}"


def test_distinct_graphs_give_distinct_sources():
    sources = _all_sources()
    assert len(set(sources.values())) == len(sources)


# ----- atomic writes ------------------------------------------------------------------------------
def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("where", ["replace", "write", "fsync"])
def test_failed_write_leaves_the_previous_output_intact(tmp_path, monkeypatch, where):
    out = tmp_path / "model.py"
    write_module(GRAPHS["fanout"](), out)
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(compiler.os, "replace", boom)
    elif where == "fsync":
        monkeypatch.setattr(compiler.os, "fsync", boom)
    else:
        real_fdopen = compiler.os.fdopen

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[: len(text) // 2])   # half the file reaches the disk ...
                self.f.flush()
                boom()                                 # ... then the write fails

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(compiler.os, "fdopen", lambda *a, **k: Half(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space"):
        write_module(GRAPHS["functions"](), out)
    assert out.read_bytes() == before
    assert _leftovers(tmp_path, {"model.py"}) == [], "a temp file was left behind"


def test_interrupted_write_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the middle of the write (not only OSError) is cleaned up too."""
    out = tmp_path / "model.py"
    write_module(GRAPHS["fanout"](), out)
    before = out.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compiler.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, "partial", force=False)
    assert out.read_bytes() == before
    assert _leftovers(tmp_path, {"model.py"}) == []


def test_successful_write_replaces_its_own_file_and_leaves_no_temp(tmp_path):
    out = tmp_path / "model.py"
    write_module(GRAPHS["fanout"](), out)
    write_module(GRAPHS["functions"](), out)
    assert out.read_text(encoding="utf-8") == compile_source(GRAPHS["functions"]())
    assert _leftovers(tmp_path, {"model.py"}) == []


@pytest.mark.parametrize("content", [b"print('my own code')\n", b"", b"\xff\xfe binary", b"# backcomp\n"])
def test_never_overwrites_a_foreign_file_unless_forced(tmp_path, content):
    out = tmp_path / "model.py"
    out.write_bytes(content)
    with pytest.raises(OverwriteError):
        write_module(GRAPHS["fanout"](), out)
    assert out.read_bytes() == content
    assert _leftovers(tmp_path, {"model.py"}) == []
    write_module(GRAPHS["fanout"](), out, force=True)
    assert out.read_text(encoding="utf-8") == compile_source(GRAPHS["fanout"]())


def test_never_replaces_a_directory(tmp_path):
    out = tmp_path / "model.py"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OverwriteError):
        write_module(GRAPHS["fanout"](), out)
    assert (out / "keep.txt").read_text() == "x"


# ----- read-only inputs -----------------------------------------------------------------------------
def _readonly(arrays: dict) -> dict:
    out = {}
    for k, v in arrays.items():
        v = np.array(v, copy=True)
        v.flags.writeable = False
        out[k] = v
    return out


def _values(module, dtype=np.float64):
    rng = np.random.default_rng(3)
    params = {k: (0.3 * rng.standard_normal(s)).astype(dtype) for k, s in module.PARAMS.items()}
    inputs = {k: rng.standard_normal(tuple(5 if isinstance(d, str) else d for d in s)).astype(dtype)
              for k, s in module.INPUTS.items()}
    return params, inputs


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("level", [0, 1])
def test_forward_and_value_and_grad_accept_read_only_arrays(name, level):
    m = backcomp.build(GRAPHS[name](), opt_level=level)
    params, inputs = _values(m)
    expected_loss, expected = m.value_and_grad({k: v.copy() for k, v in params.items()},
                                               {k: v.copy() for k, v in inputs.items()})
    expected_out = m.forward({k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in inputs.items()})
    ro_params, ro_inputs = _readonly(params), _readonly(inputs)
    out = m.forward(ro_params, ro_inputs)
    loss, grads = m.value_and_grad(ro_params, ro_inputs)
    assert loss == expected_loss
    for k in expected:
        np.testing.assert_array_equal(grads[k], expected[k])
        assert grads[k].flags.writeable, f"grad {k} is read-only"
    for k in expected_out:
        np.testing.assert_array_equal(out[k], expected_out[k])
    for k in params:
        np.testing.assert_array_equal(ro_params[k], params[k])
    for k in inputs:
        np.testing.assert_array_equal(ro_inputs[k], inputs[k])


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("name", ["fanout", "functions"])
def test_train_step_with_read_only_inputs(name, optimizer):
    """train_step updates params in place (by design); inputs are read-only and stay unchanged,
    and the step equals the one taken with ordinary writable inputs."""
    m = backcomp.build(GRAPHS[name](), optimizer=optimizer)
    params, inputs = _values(m)
    initial = {k: v.copy() for k, v in params.items()}
    ref_params = {k: v.copy() for k, v in params.items()}
    ref_state = m.init_state(ref_params)
    ref_losses = [m.train_step(ref_params, {k: v.copy() for k, v in inputs.items()}, ref_state, lr=0.05)
                  for _ in range(3)]
    ro_inputs = _readonly(inputs)
    state = m.init_state(params)
    losses = [m.train_step(params, ro_inputs, state, lr=0.05) for _ in range(3)]
    assert losses == ref_losses
    for k in params:
        np.testing.assert_array_equal(params[k], ref_params[k])
    for k in inputs:
        np.testing.assert_array_equal(ro_inputs[k], inputs[k])
    assert all(not np.array_equal(params[k], initial[k]) for k in m.WRT), "the params did not move"
