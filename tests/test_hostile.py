"""Hostile specs: each is refused with exit 2 and one located message, nothing runs, nothing is written.

Most cases call ``backcomp.cli.main`` in-process (fast); a few run ``python -m
backcomp`` in a subprocess with a timeout, so a hang or a traceback would show.
A canary file proves that no code in a spec is ever executed, and a source scan
proves that backcomp never hands text to eval/exec/sympify/parse_expr.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import backcomp
from backcomp import ops

ROOT = Path(__file__).resolve().parent.parent

VALID = """\
[model]
name = "victim"
loss = "loss"

[inputs]
x = ["B", 3]
t = ["B", 2]

[params]
W = [3, 2]

[constants]
lam = 0.1

[functions]
sq = { args = ["u"], expr = "u * u" }

[graph]
y = "x @ W"
loss = "mean(sq(y - t)) + lam * sum(W ** 2)"
"""


def spec_with(graph_expr: str | None = None, *, replace: tuple[str, str] | None = None) -> str:
    text = VALID
    if graph_expr is not None:
        text = text.replace('y = "x @ W"', f"y = {toml_string(graph_expr)}")
    if replace is not None:
        assert replace[0] in text, replace
        text = text.replace(*replace)
    return text


def toml_string(s: str) -> str:
    return "'''" + s + "'''" if "'" not in s and "\n" not in s else '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cli(*args: str) -> tuple[int, str, str]:
    from backcomp.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def assert_refused(spec: Path, tmp_path: Path, code: int, err: str):
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith(f"{spec}:") and ": error: " in lines[0], lines[0]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name not in (spec.name, "CANARY_DIR"))
    assert written == [], f"files written: {written}"


# ----- code-execution attempts ---------------------------------------------------------------
def _payloads(canary: Path) -> dict[str, str]:
    c = str(canary)
    return {
        "import_system": f"__import__('os').system('touch {c}')",
        "open_write": f"open('{c}', 'w')",
        "dunder_class": "x.__class__",
        "dunder_chain": "x.__class__.__base__.__subclasses__()",
        "dunder_globals": "relu.__globals__",
        "getattr_call": "getattr(x, 'T')",
        "attribute_other_than_T": "x.shape",
        "method_call": "x.sum()",
        "lambda": "(lambda: x)()",
        "list_comprehension": "[x for x in W]",
        "generator": "sum(x for x in W)",
        "dict_comprehension": "{k: x for k in W}",
        "fstring": "f'{x}'",
        "walrus": "(z := x @ W)",
        "conditional": "x @ W if x else x @ W",
        "starred": "relu(*x)",
        "eval_call": "eval('1')",
        "exec_call": f"exec('open(\"{c}\", \"w\")')",
        "string_literal": "'__import__'",
        "bytes_literal": "b'x'",
        "set_literal": "{x}",
        "await": "await x",
        "yield": "(yield x)",
        "statement": "import os",
        "semicolon": f"x @ W; __import__('os').system('touch {c}')",
        "subscript_call": "x[__import__('os')]",
        "keyword_injection": f"softmax(x @ W, axis=__import__('os').system('touch {c}'))",
    }


BUGS: dict[str, str] = {}   # payload name -> known bug (strict xfail); none left


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=BUGS[n]))
                                  if n in BUGS else n for n in sorted(_payloads(Path("c")))])
def test_code_execution_attempts_are_refused_and_never_run(name, tmp_path, monkeypatch):
    canary = tmp_path / "CANARY_DIR" / "PWNED"
    canary.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "victim.toml"
    spec.write_text(spec_with(_payloads(canary)[name]), encoding="utf-8")
    code, _, err = cli("compile", str(spec), "-o", str(tmp_path / "victim.py"))
    assert not canary.exists(), "code from the spec ran"
    assert_refused(spec, tmp_path, code, err)


@pytest.mark.parametrize("where", ["function_body", "constant", "init", "dtype", "shape_dim", "model_name", "loss"])
def test_payloads_in_other_places_are_refused(where, tmp_path, monkeypatch):
    canary = tmp_path / "CANARY_DIR" / "PWNED"
    canary.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    evil = f"__import__('os').system('touch {canary}')"
    replace = {
        "function_body": ('expr = "u * u"', f'expr = "{evil}"'),
        "constant": ("lam = 0.1", f'lam = "{evil}"'),
        "init": ("W = [3, 2]", f'W = {{ shape = [3, 2], init = "{evil}" }}'),
        "dtype": ('t = ["B", 2]', f't = {{ shape = ["B", 2], dtype = "{evil}" }}'),
        "shape_dim": ('t = ["B", 2]', f't = ["B", "{evil}"]'),
        "model_name": ('name = "victim"', f'name = "{evil}"'),
        "loss": ('loss = "loss"', f'loss = "{evil}"'),
    }[where]
    spec = tmp_path / "victim.toml"
    spec.write_text(spec_with(replace=replace), encoding="utf-8")
    code, _, err = cli("compile", str(spec), "-o", str(tmp_path / "victim.py"))
    assert not canary.exists()
    assert_refused(spec, tmp_path, code, err)


MARKED = """\
[model]
name = "marked"
loss = "zq_loss"

[inputs]
zq_x = ["B", 3]

[params]
zq_W = { shape = [3, 2], init = "normal(0.1)" }

[constants]
zq_lam = 0.25

[functions]
zq_fn = { args = ["zq_u"], expr = "zq_u * sigmoid(zq_u) + zq_lam" }

[graph]
zq_h = "zq_fn(zq_x @ zq_W)"
zq_loss = "mean(zq_h ** 2) + zq_lam * sum(zq_W ** 2)"
"""


def _mentions_spec(obj) -> bool:
    """Whether text or a code object carries names that only the marked spec contains."""
    if isinstance(obj, (str, bytes)):
        return "zq_" in (obj if isinstance(obj, str) else obj.decode("latin-1"))
    if hasattr(obj, "co_names"):
        return any(_mentions_spec(c) for c in (*obj.co_names, *obj.co_varnames, *obj.co_consts)
                   if isinstance(c, (str, bytes)) or hasattr(c, "co_names"))
    return False


def test_spec_text_never_reaches_an_evaluator(tmp_path, monkeypatch):
    """Compiling and explaining a spec whose names are marked: no eval/exec/parse_expr call
    ever sees them (sympify of a string goes through sympy's parse_expr, so this covers it)."""
    import builtins
    import sympy.parsing.sympy_parser as sympy_parser

    seen = []
    real = {"eval": builtins.eval, "exec": builtins.exec, "parse_expr": sympy_parser.parse_expr}

    def spy(name):
        def wrapper(obj, *args, **kwargs):
            if _mentions_spec(obj):
                seen.append((name, str(obj)[:80]))
            return real[name](obj, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "eval", spy("eval"))
    monkeypatch.setattr(builtins, "exec", spy("exec"))
    monkeypatch.setattr(sympy_parser, "parse_expr", spy("parse_expr"))
    spec = tmp_path / "marked.toml"
    spec.write_text(MARKED, encoding="utf-8")
    code, _, err = cli("compile", str(spec), "-o", str(tmp_path / "marked.py"))
    assert code == 0, err
    code, _, err = cli("explain", str(spec))
    assert code == 0, err
    assert seen == [], f"spec text reached an evaluator: {seen}"
    # the spy works: a direct eval of marked text is seen
    builtins.eval("1 if 'zq_' else 0")
    assert seen and seen[0][0] == "eval"


EVALUATORS = {"eval", "exec", "sympify", "parse_expr", "parse_latex", "__import__", "S", "lambdify",
              "exec_module", "run_path", "run_module"}
#: (file, function) pairs allowed to execute code: they run *generated module source*, never spec text
ALLOWED = {("compiler.py", "import_path")}


def _evaluator_calls() -> list[tuple[str, str, int, str]]:
    """(file, enclosing function, line, callee) of every evaluator call in backcomp/."""
    found = []
    for path in sorted((ROOT / "backcomp").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            builtin_compile = isinstance(f, ast.Name) and f.id == "compile"
            if name not in EVALUATORS and not builtin_compile:
                continue
            fn = node
            while fn in parents and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = parents[fn]
            found.append((path.name, getattr(fn, "name", "<module>"), node.lineno, name))
    return found


def test_backcomp_source_never_calls_an_evaluator():
    """A scan of every backcomp/*.py: no call of eval/exec/compile/sympify/parse_expr/S/exec_module/...
    except running the module backcomp itself generated."""
    found = [f"backcomp/{file}:{line}: {name}()" for file, fn, line, name in _evaluator_calls()
             if (file, fn) not in ALLOWED]
    assert not found, "evaluator calls in backcomp/: " + ", ".join(found)


def test_every_allowed_evaluator_exists():
    """An allow-list entry that no longer matches any call is stale (it once pointed at
    cli._exec_module, which was removed): the runtime test below must spy on the real one."""
    used = {(file, fn) for file, fn, _, _ in _evaluator_calls()}
    assert ALLOWED <= used, f"stale entries: {sorted(ALLOWED - used)}"


def test_the_allowed_exec_only_sees_generated_source(tmp_path, monkeypatch):
    """backcomp executes code in one place, ``compiler.import_path``: it imports the module
    file that ``build`` has just written.  With a spy on it and on ``builtins.exec`` (which
    the import machinery calls), run `backcomp check` and ``backcomp.build`` on the marked
    spec with an empty cache: every file imported is byte for byte what ``compile_source``
    generates for the spec, and every exec of code carrying the spec's names runs one of
    those files."""
    import builtins

    from backcomp import compiler
    from backcomp.codegen import MARKER
    from backcomp.spec import load_spec

    spec = tmp_path / "marked.toml"
    spec.write_text(MARKED, encoding="utf-8")
    generated = {compiler.compile_source(spec), compiler.compile_source(load_spec(spec))}
    imported: list[tuple[str, str]] = []        # (path, text)
    executed: list[str] = []                    # co_filename of each exec of spec-named code
    real_import, real_exec = compiler.import_path, builtins.exec

    def import_spy(path, module_name):
        imported.append((str(path), Path(path).read_text(encoding="utf-8")))
        return real_import(path, module_name)

    def exec_spy(obj, *args, **kwargs):
        if _mentions_spec(obj):
            executed.append(getattr(obj, "co_filename", "<text>"))
        return real_exec(obj, *args, **kwargs)

    monkeypatch.setattr(compiler, "import_path", import_spy)
    monkeypatch.setattr(builtins, "exec", exec_spy)
    for run, cache in [(lambda: cli("check", str(spec)), "check"), (lambda: backcomp.build(spec), "build")]:
        monkeypatch.setenv("BACKCOMP_CACHE", str(tmp_path / cache))
        monkeypatch.setattr(compiler, "_MEMORY", {})
        before = len(imported)
        result = run()
        if isinstance(result, tuple):
            assert result[0] == 0, result[2]
        else:
            assert result.forward is not None and "zq_W" in result.PARAMS
        assert len(imported) == before + 1, f"{cache}: expected one import of a generated module, saw {imported[before:]}"
    monkeypatch.undo()
    for path, text in imported:
        assert MARKER in text[:400], f"{path} does not carry the generated-module marker"
        assert text in generated, f"{path} is not compile_source output for the spec"
    assert executed, "the exec spy saw nothing: it no longer sits on the path that imports modules"
    assert set(executed) <= {path for path, _ in imported}, f"spec-named code ran from elsewhere: {executed}"


def test_the_scan_would_catch_an_eval():
    tree = ast.parse("def f(text):\n    return sympy.sympify(text) + eval(text)\n")
    names = {n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert {"sympify", "eval"} <= names & EVALUATORS


# ----- size and nesting ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["long_expression", "nested_parens", "nested_calls", "long_chain_in_function",
                                  "nested_brackets_subscript", "huge_param", "huge_param_inline",
                                  "astronomic_dim", "huge_int_literal", "huge_float_literal"])
def test_enormous_inputs_are_refused_quickly(case, tmp_path):
    big = {
        "long_expression": spec_with("x @ W" + " + x @ W" * 12_500),                   # 100,000 chars
        "nested_parens": spec_with("(" * 5000 + "x @ W" + ")" * 5000),
        "nested_calls": spec_with("tanh(" * 3000 + "x @ W" + ")" * 3000),
        "long_chain_in_function": spec_with(replace=('expr = "u * u"', 'expr = "' + "u + " * 30_000 + 'u"')),
        "nested_brackets_subscript": spec_with("(x @ W)" + "[0]" * 3000),
        "huge_param": spec_with(replace=("W = [3, 2]", "W = [3, 2]\nV = [1000000, 1000000]")),
        "huge_param_inline": spec_with(replace=("W = [3, 2]", "W = [3, 2]\nV = { shape = [1000000, 1000000], init = \"ones\" }")),
        "astronomic_dim": spec_with(replace=("W = [3, 2]", f"W = [3, 2]\nV = [{10**18}, {10**18}]")),
        "huge_int_literal": spec_with("x @ W * " + "9" * 5000),
        "huge_float_literal": spec_with("x @ W * 1e999"),
    }[case]
    spec = tmp_path / "victim.toml"
    spec.write_text(big, encoding="utf-8")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code, _, err = cli("compile", str(spec), "-o", str(tmp_path / "victim.py"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 20
    assert peak < 300 * 2 ** 20, f"peak allocation {peak / 2**20:.0f} MiB"
    assert_refused(spec, tmp_path, code, err)


def test_huge_params_are_never_allocated_by_the_compiler():
    """The builder accepts a 10^12-element param; compiling must not allocate it
    (only init_params, at run time, would)."""
    g = backcomp.Graph("huge")
    x = g.input("x", ("B", 1_000_000))
    W = g.param("W", (1_000_000, 1_000_000))
    g.loss(ops.sum(ops.tanh(x @ W)))
    tracemalloc.start()
    try:
        src = backcomp.compile_source(g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "1000000, 1000000" in src
    assert peak < 200 * 2 ** 20


# ----- unreadable files ----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["non_utf8", "non_utf8_in_expression", "directory", "missing", "empty",
                                  "nul_bytes", "bom_and_crlf_garbage"])
def test_unreadable_specs(case, tmp_path):
    spec = tmp_path / "victim.toml"
    if case == "non_utf8":
        spec.write_bytes(b"[model]\nname = \"\xff\xfe\x80\"\n")
    elif case == "non_utf8_in_expression":
        spec.write_bytes(spec_with().replace('y = "x @ W"', 'y = "x @ W\xe9"').encode("latin-1"))
    elif case == "directory":
        spec.mkdir()
    elif case == "empty":
        spec.write_bytes(b"")
    elif case == "nul_bytes":
        spec.write_bytes(spec_with().encode().replace(b"x @ W", b"x \x00 W"))
    elif case == "bom_and_crlf_garbage":
        spec.write_bytes(b"\xef\xbb\xbf[graph\r\n]]]\r\n")
    code, out, err = cli("compile", str(spec), "-o", str(tmp_path / "victim.py"))
    assert code == 2, err
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert first.startswith(f"{spec}:") and ": error: " in first, first
    assert not (tmp_path / "victim.py").exists()


# ----- in a real process: exit codes, no traceback, no hang ----------------------------------
def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("BACKCOMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "backcomp", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


@pytest.mark.parametrize("case", ["import_system", "nested_parens", "huge_param", "directory"])
def test_hostile_specs_in_a_subprocess(case, tmp_path):
    canary = tmp_path / "CANARY_DIR" / "PWNED"
    canary.parent.mkdir()
    spec = tmp_path / "victim.toml"
    if case == "directory":
        spec.mkdir()
    else:
        text = {"import_system": spec_with(_payloads(canary)["import_system"]),
                "nested_parens": spec_with("(" * 5000 + "x @ W" + ")" * 5000),
                "huge_param": spec_with(replace=("W = [3, 2]", "W = [3, 2]\nV = [1000000, 1000000]"))}[case]
        spec.write_text(text, encoding="utf-8")
    r = _run(["compile", str(spec), "-o", str(tmp_path / "victim.py")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{spec}:") and ": error: " in r.stderr
    assert not canary.exists()
    assert not (tmp_path / "victim.py").exists()
