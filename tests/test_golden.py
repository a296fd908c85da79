"""Golden files: the generated module of every example spec, kept byte for byte.

As SymForce's codegen tests (``compare_or_update``): each case compiles a spec and
compares the source with ``tests/golden/<case>.py``, so a change to the emitted code
is a diff that a reviewer reads.  The cases are every ``examples/*.toml`` with the
default options, plus ``mlp_adam`` (examples/mlp.toml with ``optimizer="adam"``) and
``mlp_jvp_hvp`` (the same with ``emit="jvp,hvp"``).

After an intended change to the generated code, refresh the files and commit them
with the change:

    pytest tests/test_golden.py --update-golden

tests/conftest.py registers the option and keeps pytest from collecting the golden
files (they are ordinary .py files, so diffs show them as Python).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from backcomp.compiler import compile_source

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
REFRESH = "pytest tests/test_golden.py --update-golden"
DIFF_LINES = 60

#: case name -> (spec path relative to the repository, compile_source options)
CASES: dict[str, tuple[str, dict]] = {
    **{p.stem: (f"examples/{p.name}", {}) for p in sorted((ROOT / "examples").glob("*.toml"))},
    "mlp_adam": ("examples/mlp.toml", {"optimizer": "adam"}),
    "mlp_jvp_hvp": ("examples/mlp.toml", {"emit": "jvp,hvp"}),
}


def generate(case: str) -> str:
    """The module source of a case.  The spec is passed as a path relative to the
    repository (the cwd is the repository root while it compiles), so nothing about
    where the checkout lives can reach the text."""
    spec, options = CASES[case]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return compile_source(Path(spec), **options)
    finally:
        os.chdir(cwd)


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)   # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compare_or_update(path: Path, text: str, update: bool) -> None:
    """Rewrite ``path`` when updating; otherwise fail with a short unified diff unless
    its bytes are exactly ``text`` (UTF-8)."""
    data = text.encode("utf-8")
    if update:
        path.parent.mkdir(exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            write_atomically(path, data)
        return
    rel = path.relative_to(ROOT)
    if not path.exists():
        pytest.fail(f"{rel} does not exist: create it with `{REFRESH}`", pytrace=False)
    old = path.read_bytes()
    if old == data:
        return
    diff = list(difflib.unified_diff(old.decode("utf-8", errors="replace").splitlines(keepends=True),
                                     text.splitlines(keepends=True), f"{rel} (golden)", f"{rel} (generated)"))
    shown = "".join(diff[:DIFF_LINES]) or "(the lines are equal: the bytes differ, e.g. line endings)\n"
    more = f"... {len(diff) - DIFF_LINES} more diff lines\n" if len(diff) > DIFF_LINES else ""
    pytest.fail(f"the generated module differs from {rel}:\n{shown}{more}"
                f"If the change is intended, refresh the golden files with `{REFRESH}` and commit them.",
                pytrace=False)


@pytest.fixture
def update(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_module_matches_its_golden_file(case, update):
    compare_or_update(GOLDEN / f"{case}.py", generate(case), update)


def test_golden_files_cover_exactly_the_cases(update):
    """A new example without a golden file fails, and so does a golden file whose
    example is gone (``--update-golden`` deletes it)."""
    present = {p.stem for p in GOLDEN.glob("*.py")}
    stale = sorted(present - set(CASES))
    if update:
        for name in stale:
            (GOLDEN / f"{name}.py").unlink()
        return
    missing = sorted(set(CASES) - present)
    assert not missing and not stale, (
        f"golden files missing for {missing}, without a case: {stale}; run `{REFRESH}`")
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(f"{c}.py" for c in CASES), \
        "tests/golden/ holds only the golden modules"


CHILD = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from test_golden import CASES, generate
print(json.dumps({case: hashlib.sha256(generate(case).encode()).hexdigest() for case in CASES}))
"""


def test_goldens_do_not_depend_on_the_process(tmp_path):
    """The same text from another process, cwd and PYTHONHASHSEED: the golden files hold
    nothing machine- or run-dependent (the subprocess imports backcomp from this checkout)."""
    here = {case: hashlib.sha256(generate(case).encode()).hexdigest() for case in CASES}
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="4242", BACKCOMP_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "tests")], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    there = json.loads(r.stdout)
    assert [c for c in CASES if there[c] != here[c]] == []


def test_a_mismatch_fails_with_a_diff_and_the_refresh_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "golden" / "m.py"
    compare_or_update(path, "a = 1\nb = 2\n", update=True)
    assert path.read_bytes() == b"a = 1\nb = 2\n"
    compare_or_update(path, "a = 1\nb = 2\n", update=False)
    with pytest.raises(pytest.fail.Exception) as failure:
        compare_or_update(path, "a = 1\nb = 3\n", update=False)
    message = str(failure.value)
    assert "-b = 2\n+b = 3\n" in message and REFRESH in message
    assert [p.name for p in path.parent.iterdir()] == ["m.py"], "a temp file was left behind"
