"""The pipeline: Graph -> VJP pass -> optimisation passes -> module source -> module.

``compile_model`` lowers a model once and returns the text together with the
lowered graph and the stability findings gathered on the user's own graph (what
``backcomp compile --report`` prints); ``compile_source`` returns the text,
``write_module`` writes it atomically, and ``build`` imports it, caching by a
hash of the graph, the options and the compiler's own code, so that rebuilding
an unchanged model is instant.
"""
from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from backcomp import __version__
from backcomp.codegen import MARKER, build_parts, render
from backcomp.graph import Graph
from backcomp.passes import optimize, prepare_forward
from backcomp.passes.stability import Finding
from backcomp.vjp import differentiate


class OverwriteError(FileExistsError):
    """Refused to replace a file that backcomp did not generate."""


def _as_graph(model) -> tuple[Graph, str]:
    if isinstance(model, Graph):
        return model, "built in Python"
    from backcomp.spec import load_spec
    path = Path(model)
    return load_spec(path), path.name


def lower_graph(graph: Graph, opt_level: int = 1, findings: list[Finding] | None = None) -> Graph:
    """The differentiated (and, at opt_level >= 1, optimised) graph.

    ``findings`` collects the stability rewrites and risks that ``prepare_forward``
    sees on the way: the user's own nodes, before fusion with the backward hides them.
    """
    return _lower(graph, opt_level, findings)


def _lower(graph: Graph, opt_level: int, findings: list[Finding] | None = None) -> Graph:
    """The pipeline itself; also lowers a separable model's per-chunk loss (codegen.batch_parts)."""
    if opt_level >= 1:
        graph = prepare_forward(graph, findings)
    g = differentiate(graph) if graph.loss_node is not None else graph.clone()[0]
    return optimize(g) if opt_level >= 1 else g


#: the extra functions ``emit`` may ask for
EMITS = ("jvp", "hvp")


def parse_emit(emit) -> tuple[str, ...]:
    """``"jvp,hvp"``, ``("hvp",)`` or None as a sorted tuple of known names."""
    if emit is None:
        return ()
    items = emit.split(",") if isinstance(emit, str) else list(emit)
    names = {i.strip() for i in items if i.strip()}
    unknown = sorted(names - set(EMITS))
    if unknown:
        raise ValueError(f"unknown function to emit: {', '.join(unknown)} (choose from {', '.join(EMITS)})")
    return tuple(e for e in EMITS if e in names)


def lower_tangents(graph: Graph, emit: tuple[str, ...], opt_level: int = 1) -> tuple[Graph | None, Graph | None]:
    """The graphs of ``jvp`` and ``hvp`` (None where not asked for), optimised like the others.

    jvp: the forward outputs and their tangents (forward mode on the prepared forward).
    hvp: forward-over-reverse, the JVP of the backward graph seeded at the wrt params.
    """
    from backcomp.jvp import hvp_graph, jvp_graph
    if not emit:
        return None, None
    prepared = prepare_forward(graph) if opt_level >= 1 else graph
    finish = optimize if opt_level >= 1 else (lambda g: g)
    jvp = finish(jvp_graph(prepared)) if "jvp" in emit else None
    hvp = None
    if "hvp" in emit:
        if graph.loss_node is None:
            raise ValueError("hvp needs a model with a loss")
        hvp = finish(hvp_graph(differentiate(prepared)))
    return jvp, hvp


def stability_report(model) -> list[str]:
    """The numerically risky patterns the optimiser rewrote, and those it could not."""
    graph, _ = _as_graph(model)
    findings: list = []
    prepare_forward(graph, findings)
    return [str(f) for f in findings]


@dataclass
class Compiled:
    """One compilation: the module text, the graph it came from, and what it found."""
    graph: Graph                # as given (the user's names)
    lowered: Graph              # differentiated and optimised
    text: str
    findings: list[Finding] = field(default_factory=list)   # empty at -O0 (no rewrites)


def compile_model(model, opt_level: int = 1, optimizer: str | None = None, check_finite: bool = False,
                  source: str | None = None, emit=None) -> Compiled:
    """Lower ``model`` (a Graph or a spec path) once and render its module.

    ``source`` labels the module's docstring; a spec path gives its file name
    (not the path: the text stays the same wherever it is compiled from).
    """
    graph, label = _as_graph(model)
    emit = parse_emit(emit)
    findings: list[Finding] = []
    g = lower_graph(graph, opt_level, findings)
    jvp, hvp = lower_tangents(graph, emit, opt_level)
    parts = build_parts(g, source or label, check_finite=check_finite, model=graph, jvp=jvp, hvp=hvp,
                        lower_model=lambda partial: _lower(partial, opt_level))
    text = render(g, parts, optimizer=optimizer)
    return Compiled(graph, g, text, findings)


def compile_source(model, opt_level: int = 1, optimizer: str | None = None,
                   check_finite: bool = False, source: str | None = None, emit=None) -> str:
    """Module source for a Graph or a spec path.

    ``optimizer`` ("sgd", "momentum", "adam") adds ``init_state``/``train_step``;
    ``check_finite`` makes the module raise FloatingPointError at the first node
    that produces a NaN or Inf; ``emit`` ("jvp,hvp", or a tuple of those names) adds
    ``jvp(params, inputs, tangents)`` and/or ``hvp(params, inputs, v)``.
    """
    return compile_model(model, opt_level, optimizer, check_finite, source, emit).text


def atomic_write(path: Path, text: str, force: bool = False) -> None:
    """Write via a temp file + rename: readers never see half a file.

    A file that exists and was not generated by backcomp is never replaced
    unless ``force``: it may be the user's own code.
    """
    path = Path(path)
    if path.exists() and not force:
        if path.is_dir():
            raise OverwriteError(f"{path} is a directory")
        try:
            head = path.read_text(encoding="utf-8", errors="replace")[:400]
        except OSError as e:
            raise OverwriteError(f"cannot read {path}: {e.strerror}") from None
        if MARKER not in head:
            raise OverwriteError(f"{path} exists and was not generated by backcomp (use --force to replace it)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, _file_mode(path))   # mkstemp makes 0600; a module is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _file_mode(path: Path) -> int:
    """The mode a replaced file had, else what ``open`` would give under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_module(model, path, force: bool = False, opt_level: int = 1, optimizer: str | None = None,
                 check_finite: bool = False, emit=None) -> Path:
    """Compile and write the module to ``path`` atomically; returns the path."""
    text = compile_source(model, opt_level, optimizer=optimizer, check_finite=check_finite, emit=emit)
    atomic_write(Path(path), text, force=force)
    return Path(path)


def cache_dir() -> Path:
    root = os.environ.get("BACKCOMP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "backcomp")
    return Path(root)


_MEMORY: dict[str, ModuleType] = {}


@lru_cache(maxsize=1)
def _compiler_fingerprint() -> str:
    """A hash of backcomp's own code and templates: a changed compiler never reuses
    modules that an older one generated, even without a version bump."""
    from backcomp.codegen import templates_dir
    h = hashlib.sha256(__version__.encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")) + sorted(templates_dir().rglob("*.jinja")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _rules_fingerprint(graph: Graph) -> str | None:
    """A hash of the rules of ops defined outside backcomp (user ops, patched rules).

    backcomp's own rules are covered by the compiler fingerprint; a rule from
    elsewhere is hashed by its bytecode and closure, and if it cannot be, the
    graph is not cached at all (None) rather than risk a stale module.
    """
    from backcomp.ops.registry import get_op
    h = hashlib.sha256()
    for name in sorted({n.op for n in graph.nodes} - {"input", "param"}):
        op = get_op(name)
        for rule in (op.infer, op.emit, op.vjp, op.jvp, op.scalar):
            module = getattr(rule, "__module__", "") or ""
            if rule is None or module.startswith(("backcomp.", "sympy.")):
                continue
            code = getattr(rule, "__code__", None)
            if code is None:
                return None
            h.update(marshal.dumps(code))
            for cell in rule.__closure__ or ():
                h.update(repr(cell.cell_contents).encode())
    return h.hexdigest()


def graph_key(graph: Graph, *options) -> str | None:
    """A hash of the graph's structure, the compile options, the compiler itself and
    any op rules defined outside it; None when the graph must not be cached."""
    rules = _rules_fingerprint(graph)
    if rules is None:
        return None
    h = hashlib.sha256(f"{_compiler_fingerprint()}|{rules}|{options}|{graph.name}".encode())
    index = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        attrs = sorted((k, repr(v)) for k, v in n.attrs.items())
        h.update(repr((n.op, n.name, n.shape, n.dtype, [index[i] for i in n.inputs], attrs)).encode())
    h.update(repr(sorted((index[k], index[y], index[x]) for k, (y, x) in graph.grad_of.items())).encode())
    h.update(repr((sorted(graph.inits.items()), list(graph.outputs), graph.wrt,
                   graph.loss_node and graph.loss_node.name)).encode())
    return h.hexdigest()[:20]


def build(model, opt_level: int = 1, optimizer: str | None = None, check_finite: bool = False,
          emit=None) -> ModuleType:
    """Compile and import; unchanged models come back from the cache at once.

    ``emit`` ("jvp,hvp" or a tuple) adds the forward-mode ``jvp`` and/or ``hvp``."""
    graph, source = _as_graph(model)
    emit = parse_emit(emit)
    key = graph_key(graph, opt_level, optimizer, check_finite, source, *emit)
    if key in _MEMORY:
        return _MEMORY[key]
    if key is None:   # rules we cannot fingerprint: compile afresh, in a private file
        path = Path(tempfile.mkdtemp(prefix="backcomp_")) / f"{graph.name}.py"
        key = path.parent.name
    else:
        path = cache_dir() / f"{graph.name}_{key}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = compile_model(graph, opt_level, optimizer, check_finite, source, emit).text
        atomic_write(path, text, force=True)
    module = import_path(path, f"backcomp_generated.{graph.name}_{key}")
    _MEMORY[key] = module
    return module


def import_path(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
