"""The spec as a whole: TOML sections -> a checked Graph."""
from __future__ import annotations

import ast
import math
import re
import tomllib
from pathlib import Path
from typing import Callable

import sympy as sp

from backcomp import ops
from backcomp.graph import Graph, GraphError, Node, ShapeError, format_shape
from backcomp.ops.scalar import SCALAR_FUNCTIONS
from backcomp.spec.expressions import SPEC_OPS, Walker, Where, parse_expression
from backcomp.spec.functions import SCALAR_EXTRA, ScalarWalker
from backcomp.spec.steps import Steps
from backcomp.spec.text import (DTYPES, MAX_PARAM_ELEMENTS, MAX_SPEC_BYTES, MODEL_KEYS, SECTIONS, Locator, SpecError,
                                suggest, toml_type)


# ----- the spec ---------------------------------------------------------------------------
class _Loader:
    def __init__(self, text: str, path: str, stem: str):
        self.text, self.path, self.stem = text, path, stem
        self.loc = Locator(text)

    def fail(self, where: tuple[int | None, int | None], message: str) -> SpecError:
        return SpecError(self.path, where[0], where[1], message)

    def load(self) -> Graph:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            msg = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(e))
            if m:
                raise SpecError(self.path, int(m.group(1)), int(m.group(2)), f"invalid TOML: {msg}") from None
            n = len(self.text.split("\n"))
            raise SpecError(self.path, n, 1, f"invalid TOML: {msg}") from None
        for key, value in data.items():
            if key not in SECTIONS:
                where = self.loc.section(key) if key in self.loc.sections else self.loc.key("", key)
                raise self.fail(where if where[0] else (1, 1),
                                f"unknown section [{key}]{suggest(key, SECTIONS)} (sections: {', '.join(SECTIONS)})")
            if not isinstance(value, dict):
                raise self.fail(self.loc.key("", key), f"'{key}' must be a [{key}] table, not {toml_type(value)}")
        self.data = data
        model = data.get("model", {})
        for key in model:
            if key not in MODEL_KEYS:
                raise self.fail(self.loc.key("model", key),
                                f"unknown key '{key}' in [model]{suggest(key, MODEL_KEYS)} (keys: {', '.join(MODEL_KEYS)})")
        graph = self.make_graph(model)
        self.used: dict[str, str] = {}
        self.dims: dict[str, str] = {}   # symbolic dim -> the input that binds it
        self.constants = self.load_constants(data.get("constants", {}))
        self.load_inputs(graph, data.get("inputs", {}))
        self.load_params(graph, data.get("params", {}))
        self.load_buffers(graph, data.get("buffers", {}))
        self.functions = self.load_functions(data.get("functions", {}))
        self.steps = Steps(self, data.get("steps", {}))
        self.load_graph(graph, data.get("graph", {}))
        self.finish(graph, model)
        return graph

    def make_graph(self, model: dict) -> Graph:
        name = model.get("name", self.stem)
        where = self.loc.value("model", "name") if "name" in model else (1, 1)
        if not isinstance(name, str):
            raise self.fail(where, f"[model] name must be a string, not {toml_type(name)}")
        if not name.isidentifier() or name.startswith("_"):
            if "name" in model:
                raise self.fail(where, f"model name '{name}' is not a valid Python identifier")
            raise self.fail(where, f"model name '{name}' (from the file name) is not a valid Python identifier; "
                                   "set name = \"...\" in [model]")
        return Graph(name)

    def claim(self, name: str, section: str) -> None:
        where = self.loc.key(section, name)
        if not name.isidentifier():
            raise self.fail(where, f"'{name}' is not a valid name (use letters, digits and _)")
        if name.startswith("_"):
            raise self.fail(where, f"name '{name}' must not start with '_'")
        if name in SPEC_OPS or name in ("T",):
            raise self.fail(where, f"'{name}' is the name of a built-in op; choose another name")
        if name in self.used:
            raise self.fail(where, f"duplicate name '{name}': already defined in [{self.used[name]}]")
        if name in self.dims:
            raise self.fail(where, f"'{name}' is a dimension of input '{self.dims[name]}'; "
                                   "dim names share the namespace of values: choose another name")
        self.used[name] = section

    def claim_step(self, name: str, where) -> None:
        """A [steps] name: a name in the one namespace, called only by scan()."""
        if not name.isidentifier() or name.startswith("_"):
            raise self.fail(where, f"step name '{name}' is not a valid name (letters, digits and _)")
        if name in SPEC_OPS:
            raise self.fail(where, f"'{name}' is the name of a built-in op; choose another name")
        if name in self.used:
            raise self.fail(where, f"duplicate name '{name}': already defined in [{self.used[name]}]")
        self.used[name] = "steps"

    def load_constants(self, table: dict) -> dict[str, float]:
        out = {}
        for name, value in table.items():
            self.claim(name, "constants")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(self.loc.value("constants", name),
                                f"constant '{name}' must be a number, not {toml_type(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(self.loc.value("constants", name), f"constant '{name}' must be finite")
            out[name] = value
        return out

    def shape(self, section: str, name: str, value, sub: str | None = None) -> tuple:
        where = self.loc.value(section, name, sub)
        what = f"{section[:-1]} '{name}'"
        if not isinstance(value, list):
            raise self.fail(where, f"shape of {what} must be an array such as [\"B\", 10], not {toml_type(value)}")
        for d in value:
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                if isinstance(d, float):
                    raise self.fail(where, f"shape of {what}: dimension {d!r} is not an integer")
                raise self.fail(where, f"shape of {what}: dimension {d!r} must be a positive integer or a name")
            if isinstance(d, int) and d <= 0:
                raise self.fail(where, f"shape of {what}: dimension {d} must be positive")
            if isinstance(d, str) and not d.isidentifier():
                raise self.fail(where, f"shape of {what}: symbolic dimension '{d}' must be an identifier")
        size = math.prod(d for d in value if isinstance(d, int))
        if size > MAX_PARAM_ELEMENTS:
            raise self.fail(where, f"{what} has {size:.3g} elements; backcomp refuses fixed sizes above "
                                   f"{MAX_PARAM_ELEMENTS:.0e} elements")
        return tuple(value)

    def table_entry(self, section: str, name: str, value, allowed: tuple[str, ...]) -> dict:
        if isinstance(value, dict):
            for k in value:
                if k not in allowed:
                    raise self.fail(self.loc.value(section, name, k) if k else self.loc.key(section, name),
                                    f"unknown key '{k}' for {section[:-1]} '{name}'{suggest(k, allowed)} "
                                    f"(keys: {', '.join(allowed)})")
            if "shape" not in value:
                raise self.fail(self.loc.value(section, name), f"{section[:-1]} '{name}' needs a shape")
            return value
        return {"shape": value}

    def load_inputs(self, graph: Graph, table: dict) -> None:
        for name, value in table.items():
            self.claim(name, "inputs")
            entry = self.table_entry("inputs", name, value, ("shape", "dtype"))
            shape = self.shape("inputs", name, entry["shape"], "shape" if isinstance(value, dict) else None)
            dtype = entry.get("dtype", "float")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise self.fail(self.loc.value("inputs", name, "dtype"),
                                f"input '{name}': unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
            try:
                graph.input(name, shape, DTYPES[dtype])
            except (GraphError, ShapeError) as e:
                raise self.fail(self.loc.value("inputs", name), str(e)) from None
            for d in shape:
                if isinstance(d, str) and d in self.used:
                    raise self.fail(self.loc.value("inputs", name),
                                    f"dimension '{d}' of input '{name}' has the name of a value in [{self.used[d]}]; "
                                    "dim names share the namespace of values: choose another name")
                if isinstance(d, str):
                    self.dims.setdefault(d, name)

    def load_params(self, graph: Graph, table: dict) -> None:
        total = 0
        for name, value in table.items():
            self.claim(name, "params")
            entry = self.table_entry("params", name, value, ("shape", "init"))
            shape = self.shape("params", name, entry["shape"], "shape" if isinstance(value, dict) else None)
            if any(isinstance(d, str) for d in shape):
                raise self.fail(self.loc.value("params", name, "shape" if isinstance(value, dict) else None),
                                f"param '{name}': shape {format_shape(shape)} must be fixed (no symbolic dims)")
            total += math.prod(shape)
            if total > MAX_PARAM_ELEMENTS:
                raise self.fail(self.loc.value("params", name),
                                f"the params have {total:.3g} elements in all; backcomp refuses more than "
                                f"{MAX_PARAM_ELEMENTS:.0e}")
            init = entry.get("init")
            try:
                graph.param(name, shape, init)
            except (GraphError, ShapeError) as e:
                where = self.loc.value("params", name, "init" if init is not None else None)
                raise self.fail(where, str(e)) from None

    def set_loss(self, graph: Graph, loss, known: dict) -> None:
        where = self.loc.value("model", "loss")
        if not isinstance(loss, str):
            raise self.fail(where, f"[model] loss must be a node name, not {toml_type(loss)}")
        if loss not in known:
            raise self.fail(where, f"loss '{loss}' is not a node{suggest(loss, known)}")
        try:
            graph.loss(known[loss], loss)
        except GraphError as e:
            node_where = self.loc.value("graph", loss) if loss in self.data.get("graph", {}) else where
            raise self.fail(node_where, str(e)) from None

    def load_buffers(self, graph: Graph, table: dict) -> None:
        """Non-trained state: fixed shapes, init "zeros" (default) or "ones"."""
        for name, value in table.items():
            self.claim(name, "buffers")
            entry = self.table_entry("buffers", name, value, ("shape", "init"))
            sub = "shape" if isinstance(value, dict) else None
            shape = self.shape("buffers", name, entry["shape"], sub)
            init = entry.get("init", "zeros")
            try:
                graph.buffer(name, shape, init)
            except (GraphError, ShapeError) as e:
                where = self.loc.value("buffers", name, "init" if "init" in entry else sub)
                raise self.fail(where, str(e)) from None

    def load_functions(self, table: dict) -> dict[str, Callable]:
        bodies: dict[str, tuple[tuple[sp.Symbol, ...], sp.Expr]] = {}
        active: list[str] = []

        def resolve(fname: str, at: ast.AST | None) -> tuple[tuple[sp.Symbol, ...], sp.Expr]:
            if fname in bodies:
                return bodies[fname]
            if fname not in table:
                hint = suggest(fname, list(SCALAR_FUNCTIONS) + list(SCALAR_EXTRA) + list(table))
                raise current[-1].error(at, f"unknown scalar function '{fname}'{hint}")
            if fname in active:
                cycle = " -> ".join(active[active.index(fname):] + [fname])
                raise current[-1].error(at, f"[functions] are recursive: {cycle}")
            active.append(fname)
            bodies[fname] = build_body(fname, table[fname])
            active.pop()
            return bodies[fname]

        current: list[Where] = []

        def build_body(fname: str, value) -> tuple[tuple[sp.Symbol, ...], sp.Expr]:
            where = self.loc.value("functions", fname)
            if not isinstance(value, dict):
                raise self.fail(where, f"function '{fname}' must be a table {{ args = [...], expr = \"...\" }}")
            for k in value:
                if k not in ("args", "expr"):
                    raise self.fail(self.loc.value("functions", fname, k),
                                    f"unknown key '{k}' for function '{fname}'{suggest(k, ('args', 'expr'))} (keys: args, expr)")
            args = value.get("args")
            if not isinstance(args, list) or not args or not all(isinstance(a, str) and a.isidentifier() for a in args):
                raise self.fail(self.loc.value("functions", fname, "args") if "args" in value else where,
                                f"function '{fname}': args must be a non-empty array of argument names")
            if len(set(args)) != len(args):
                raise self.fail(self.loc.value("functions", fname, "args"), f"function '{fname}': repeated argument name")
            if "expr" not in value:
                raise self.fail(where, f"function '{fname}' needs an expr")
            line, col = self.loc.string_start(*self.loc.value("functions", fname, "expr"))
            w = Where(self.path, value["expr"] if isinstance(value["expr"], str) else "", line, col,
                       f"in function '{fname}'")
            tree = parse_expression(value["expr"], w)
            current.append(w)
            symbols = {a: sp.Symbol(a, real=True) for a in args}
            body = ScalarWalker(symbols, self.constants, resolve, w).expr(tree)
            current.pop()
            return tuple(symbols[a] for a in args), body

        out = {}
        for fname in table:
            self.claim(fname, "functions")
            if fname in SCALAR_FUNCTIONS:
                raise self.fail(self.loc.key("functions", fname), f"'{fname}' is a built-in function; choose another name")
        for fname in table:
            params, body = resolve(fname, None)
            try:
                out[fname] = ops.scalar_function(fname, params, body)
            except (GraphError, ValueError) as e:
                raise self.fail(self.loc.value("functions", fname), str(e)) from None
        return out

    def load_graph(self, graph: Graph, table: dict) -> None:
        trees: dict[str, tuple[ast.expr, Where]] = {}
        for name, text in table.items():
            self.claim(name, "graph")
            line, col = self.loc.value("graph", name)
            if not isinstance(text, str):
                raise self.fail((line, col), f"node '{name}' must be an expression string, not {toml_type(text)}")
            line, col = self.loc.string_start(line, col)
            where = Where(self.path, text, line, col, f"in node '{name}'")
            trees[name] = (parse_expression(text, where), where)
        deps = {name: [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in table]
                for name, (tree, _) in trees.items()}
        for name, (tree, _) in trees.items():   # a scan comes after the nodes its step reads
            called = {n.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                      and n.func.id == "scan" and n.args and isinstance(n.args[0], ast.Name)}
            for step in sorted(called):
                deps[name] += sorted(n for n in self.steps.free_names(step) if n in table and n != name)
        names: dict[str, Node] = dict(graph.inputs) | dict(graph.params) | dict(graph.buffers)
        for name in _topological(deps, lambda cycle: self.fail(
                self.loc.value("graph", cycle[0]), f"cycle in [graph]: {' -> '.join(cycle)}")):
            tree, where = trees[name]
            walker = Walker(graph, names, self.constants, self.functions, where)
            walker.steps = self.steps
            with graph.scoped(name):
                value = walker.value(tree)
                if not isinstance(value, Node):
                    raise where.error(tree, "this expression is a constant number; put it in [constants]")
                try:
                    node = graph.assign_name(name, value)
                except GraphError as e:
                    raise where.error(tree, str(e)) from None
            names[name] = node

    def finish(self, graph: Graph, model: dict) -> None:
        known = dict(graph.inputs) | dict(graph.params) | {n: graph.lookup(n) for n in self.data.get("graph", {})}
        loss = model.get("loss")
        if loss is None and graph.lookup("loss") is not None and "loss" in self.data.get("graph", {}):
            loss = "loss"
        if loss is None and model.get("outputs") is None:
            raise self.fail(self.loc.section("model") if "model" in self.data else (1, 1),
                            "no loss and no outputs: set loss = \"<node>\" (or, for an inference module, "
                            "outputs = [...]) in [model]")
        if loss is not None:
            self.set_loss(graph, loss, known)
        outputs = model.get("outputs")
        if outputs is not None:
            where = self.loc.value("model", "outputs")
            if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                raise self.fail(where, "[model] outputs must be an array of node names")
            for o in outputs:
                if o not in known:
                    raise self.fail(where, f"output '{o}' is not a node{suggest(o, known)}")
                if known[o].dtype not in ("float", "int"):   # int: argmax's ids, an integer input
                    raise self.fail(where, f"output '{o}' is not an array of numbers")
                graph.output(o, known[o])
        wrt = model.get("wrt")
        if wrt is not None and graph.loss_node is None:
            raise self.fail(self.loc.value("model", "wrt"), "[model] wrt needs a loss to differentiate")
        if wrt is not None:
            where = self.loc.value("model", "wrt")
            if not isinstance(wrt, list) or not all(isinstance(p, str) for p in wrt):
                raise self.fail(where, "[model] wrt must be an array of param names")
            if not wrt:
                raise self.fail(where, "[model] wrt is empty; leave it out to differentiate every param")
            for p in wrt:
                if p not in graph.params:
                    what = "an input (inputs are never differentiated)" if p in graph.inputs else "not a param"
                    raise self.fail(where, f"wrt '{p}' is {what}{suggest(p, graph.params) if p not in graph.inputs else ''}")
            if len(set(wrt)) != len(wrt):
                raise self.fail(where, "[model] wrt names a param twice")
            graph.wrt = tuple(wrt)
        if not graph.params and graph.loss_node is not None:
            raise self.fail(self.loc.section("params") if "params" in self.data else (1, 1),
                            "the model has no [params] to differentiate")


def _topological(deps: dict[str, list[str]], cycle_error) -> list[str]:
    """Declaration order, each node after its dependencies; iterative, cycles reported."""
    order: list[str] = []
    state: dict[str, int] = {}   # 1 = on the stack, 2 = done
    for root in deps:
        if state.get(root) == 2:
            continue
        stack = [(root, iter(deps[root]))]
        state[root] = 1
        while stack:
            name, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[name] = 2
                order.append(name)
            elif state.get(nxt) == 1:
                path = [n for n, _ in stack]
                raise cycle_error(path[path.index(nxt):] + [nxt])
            elif state.get(nxt) is None:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return order


def ops_table_markdown() -> str:
    """The op reference table of docs/spec.md, generated from the table above and the registry."""
    from backcomp.ops.registry import registered_ops
    reg = registered_ops()
    rows = ["| call | keywords | meaning |", "|---|---|---|"]
    for name, op in SPEC_OPS.items():
        doc = reg[name].doc if name in reg else (getattr(op.fn, "__doc__", "") or "").strip().split("\n")[0]
        rows.append(f"| `{op.signature()}` | {', '.join(op.keywords) or '—'} | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def read_spec_text(path: Path) -> str:
    """The spec's text; unreadable files are SpecErrors without a line."""
    shown = str(path)
    if path.is_dir():
        raise SpecError(shown, None, None, "is a directory, not a spec file")
    try:
        data = path.read_bytes()[:MAX_SPEC_BYTES + 1]
    except FileNotFoundError:
        raise SpecError(shown, None, None, "no such file") from None
    except OSError as e:
        raise SpecError(shown, None, None, f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(shown, None, None, f"spec is larger than {MAX_SPEC_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError(shown, line, col, f"the file is not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def parse_spec(text: str, path: str = "<spec>", stem: str | None = None) -> Graph:
    """A Graph from spec text; ``stem`` is the default model name."""
    if stem is None:
        stem = Path(path).stem
    try:
        return _Loader(text, str(path), stem).load()
    except RecursionError:
        raise SpecError(str(path), None, None, "the spec is nested too deeply") from None


def load_spec(path) -> Graph:
    """Read and parse a spec file into a Graph; every problem is a SpecError."""
    path = Path(path)
    return parse_spec(read_spec_text(path), str(path), path.stem)

