"""``[steps]``: loop bodies in a spec, and the ``scan(step, init, xs, axis=0)`` call.

```toml
[steps.lstm]                      # one step; its names are local to it
carry = ["h", "c"]                # state passed from step to step
xs = ["x_t"]                      # slices of the scanned arrays at step t
[steps.lstm.graph]
z = "x_t @ Wx + h @ Wh + b"       # inputs, params, constants, [functions] are visible
...
[steps.lstm.returns]
carry = ["h_new", "c_new"]        # the new carry, in the order of `carry`
ys = ["h_new"]                    # per-step outputs, stacked along the scanned axis

[graph]
run = "scan(lstm, (zeros((B, H)), zeros((B, H))), x, axis=1)"
hs = "run.ys[0]"
h_last = "run.carry[0]"
```

A step is built at each ``scan`` call that names it: its carries take the shapes of
the initial values given there, its slices those of the sequences without the scanned
axis.  Errors name the step's line in the spec.

A loop with no per-step input (a fixed-point iteration, Euler steps, a layer repeated
with shared weights) declares no ``xs`` (or ``xs = []``) and is called with no sequence
and a fixed number of steps, as ``jax.lax.scan(f, init, None, length=n)``::

    run = "scan(euler, y0, (), length=8)"      # or scan(euler, y0, length=8)

``length`` is a positive integer (a literal or an integer constant); given with
sequences, it must equal their length.
"""
from __future__ import annotations

import ast
from typing import TYPE_CHECKING

from backcomp.graph import GraphError, Node, ShapeError
from backcomp.loops import ScanResult, finish_scan, new_leaf, step_graph
from backcomp.ops.registry import RegistryError
from backcomp.spec.text import SpecError, suggest, toml_type

if TYPE_CHECKING:
    from backcomp.spec.expressions import Walker
    from backcomp.spec.loader import _Loader

STEP_KEYS = ("carry", "xs", "graph", "returns")
RETURN_KEYS = ("carry", "ys")


class Steps:
    """The ``[steps]`` of one spec: checked up front, built at each ``scan`` call."""

    def __init__(self, loader: "_Loader", table: dict):
        self.loader = loader
        self.table = table
        self.results: dict[Node, ScanResult] = {}
        self.active: list[str] = []
        for name, body in table.items():
            self.check(name, body)

    # -- the section's shape ------------------------------------------------------------
    def check(self, name: str, body) -> None:
        ld = self.loader
        section = f"steps.{name}"
        where = ld.loc.section(section) if section in ld.loc.sections else ld.loc.key("steps", name)
        ld.claim_step(name, where)
        if not isinstance(body, dict):
            raise ld.fail(where, f"step '{name}' must be a table ([steps.{name}]), not {toml_type(body)}")
        for key in body:
            if key not in STEP_KEYS:
                raise ld.fail(ld.loc.key(section, key), f"unknown key '{key}' in step '{name}'"
                                                        f"{suggest(key, STEP_KEYS)} (keys: {', '.join(STEP_KEYS)})")
        names = body.get("carry")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ld.fail(ld.loc.value(section, "carry") if "carry" in body else where,
                          f"step '{name}' needs carry = [\"...\"], a non-empty array of names")
        names = body.setdefault("xs", [])   # no xs: a loop run for length= steps
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ld.fail(ld.loc.value(section, "xs"),
                          f"step '{name}' needs xs = [\"...\"], an array of names (or xs = [] and "
                          "scan(..., length=n) for a loop with no per-step input)")
        graph = body.get("graph")
        if not isinstance(graph, dict) or not graph:
            raise ld.fail(ld.loc.section(f"{section}.graph") if "graph" in body else where,
                          f"step '{name}' needs a [steps.{name}.graph] table of name = expression")
        returns = body.get("returns")
        if not isinstance(returns, dict):
            raise ld.fail(where, f"step '{name}' needs a [steps.{name}.returns] table with carry = [...] "
                                 "(and ys = [...])")
        for key in returns:
            if key not in RETURN_KEYS:
                raise ld.fail(ld.loc.key(f"{section}.returns", key),
                              f"unknown key '{key}' in the returns of step '{name}'{suggest(key, RETURN_KEYS)} "
                              "(keys: carry, ys)")
        local = list(body["carry"]) + list(body["xs"]) + list(graph)
        seen: set[str] = set()
        for n in local:
            place = ld.loc.key(f"{section}.graph", n) if n in graph else ld.loc.value(
                section, "carry" if n in body["carry"] else "xs")
            if not n.isidentifier() or n.startswith("_"):
                raise ld.fail(place, f"'{n}' in step '{name}' is not a valid name (letters, digits and _, "
                                     "not starting with _)")
            if n in seen:
                raise ld.fail(place, f"duplicate name '{n}' in step '{name}'")
            if n in ld.used or n in ld.dims:
                what = f"a value in [{ld.used[n]}]" if n in ld.used else f"a dimension of input '{ld.dims[n]}'"
                raise ld.fail(place, f"'{n}' in step '{name}' has the name of {what}; step names are local: "
                                     "choose another name")
            seen.add(n)
        for key in RETURN_KEYS:
            if key not in returns:
                if key == "carry":
                    raise ld.fail(ld.loc.section(f"{section}.returns"),
                                  f"the returns of step '{name}' need carry = [...]: the new carry")
                continue
            value = returns[key]
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise ld.fail(ld.loc.value(f"{section}.returns", key),
                              f"{key} in the returns of step '{name}' must be an array of names")
            for n in value:
                if n not in seen:
                    raise ld.fail(ld.loc.value(f"{section}.returns", key),
                                  f"step '{name}' returns '{n}', which is not one of its names{suggest(n, seen)}")
        if len(returns["carry"]) != len(body["carry"]):
            raise ld.fail(ld.loc.value(f"{section}.returns", "carry"),
                          f"step '{name}' returns {len(returns['carry'])} carr"
                          f"{'y' if len(returns['carry']) == 1 else 'ies'}, but takes {len(body['carry'])} "
                          f"({', '.join(body['carry'])})")

    def free_names(self, name: str) -> set[str]:
        """The [graph] names a step reads (the nodes a scan of it must come after)."""
        out: set[str] = set()
        body = self.table.get(name, {})
        for text in body.get("graph", {}).values():
            if isinstance(text, str):
                try:
                    out |= {n.id for n in ast.walk(ast.parse("(" + text + "\n)", mode="eval")) if isinstance(n, ast.Name)}
                except SyntaxError:
                    pass
        for n in list(out):
            if n in self.table and n != name:
                out |= self.free_names(n) if n not in self.active else set()
        return out

    # -- scan(step, init, xs, axis=0, reverse=False, length=None) -----------------------------
    def call(self, walker: "Walker", node: ast.Call) -> Node:
        args = node.args
        if not args or not isinstance(args[0], ast.Name):
            raise walker.err(node, "scan() takes the name of a [steps] table first: scan(step, init, xs, axis=0)")
        name = args[0].id
        if name not in self.table:
            raise walker.err(args[0], f"unknown step '{name}'{suggest(name, self.table)}"
                                      + ("" if self.table else " (declare it in [steps." + name + "])"))
        lengthy = any(k.arg == "length" for k in node.keywords)
        if len(args) != 3 and not (lengthy and len(args) == 2):
            raise walker.err(node, f"scan() takes 3 positional arguments (step, init, xs), got {len(args)}"
                                   + (" (with length=, xs may be left out)" if len(args) == 2 else ""))
        options = {"axis": 0, "reverse": False, "length": None}
        length_node = None
        for k in node.keywords:
            if sum(other.arg == k.arg for other in node.keywords) > 1:   # Python's parser lets f(a=1, a=2) through
                raise walker.err(k.value, f"scan() got multiple values for argument '{k.arg}'")
            if k.arg == "axis":
                options["axis"] = walker.int(k.value, "argument 'axis' of scan()")
            elif k.arg == "reverse":
                if not (isinstance(k.value, ast.Constant) and isinstance(k.value.value, bool)):
                    raise walker.err(k.value, "argument 'reverse' of scan() must be True or False")
                options["reverse"] = k.value.value
            elif k.arg == "length":
                length_node = k.value
                if isinstance(k.value, ast.Name) and k.value.id in self.loader.dims:
                    raise walker.err(k.value, f"argument 'length' of scan() must be a positive integer, not the "
                                              f"symbolic dim '{k.value.id}' (of input '{self.loader.dims[k.value.id]}'): "
                                              "to run one step per entry of that dim, scan over the input")
                options["length"] = walker.int(k.value, "argument 'length' of scan()", "a positive integer", 1)
            else:
                raise walker.err(k.value, f"scan() got an unexpected keyword argument '{k.arg}' "
                                          "(allowed: axis, reverse, length)")
        if name in self.active:
            raise walker.err(args[0], f"step '{name}' scans itself: {' -> '.join(self.active + [name])}")
        body = self.table[name]
        inits = self._arrays(walker, args[1], "the initial carry")
        xs_node = args[2] if len(args) == 3 else None
        no_xs = xs_node is None or isinstance(xs_node, ast.Tuple) and not xs_node.elts \
            or isinstance(xs_node, ast.Constant) and xs_node.value is None
        seqs = [] if no_xs else self._arrays(walker, xs_node, "the sequences (xs)")
        if not seqs and options["length"] is None:
            raise walker.err(xs_node if xs_node is not None else node,
                             "scan() needs at least one sequence (xs), or a number of steps: "
                             f"scan({name}, init, (), length=n)")
        if len(inits) != len(body["carry"]):
            raise walker.err(args[1], f"step '{name}' has {len(body['carry'])} carr"
                                      f"{'y' if len(body['carry']) == 1 else 'ies'} ({', '.join(body['carry'])}), "
                                      f"but scan() gives {len(inits)} initial value{'s' if len(inits) != 1 else ''}")
        if len(seqs) != len(body["xs"]):
            slices = (f"{len(body['xs'])} slice{'s' if len(body['xs']) != 1 else ''} ({', '.join(body['xs'])})"
                      if body["xs"] else "no slice (it declares no xs)")
            raise walker.err(xs_node if xs_node is not None else node,
                             f"step '{name}' takes {slices}, "
                             f"but scan() gives {len(seqs)} sequence{'s' if len(seqs) != 1 else ''}")
        axis = options["axis"]
        for a, s in zip(xs_node.elts if isinstance(xs_node, ast.Tuple) else [xs_node], seqs):
            if not -s.ndim <= axis < s.ndim:
                raise walker.err(a, f"scan(): axis {axis} is out of range for a sequence of shape "
                                    f"{_shape(s.shape)}")
        lengths = {s.shape[axis] for s in seqs}
        if len(lengths) > 1:
            raise walker.err(xs_node, f"scan(): the sequences have different lengths along axis {axis}: "
                                      f"{' and '.join(_shape(s.shape) for s in seqs)}")
        if seqs and options["length"] is not None and lengths != {options["length"]}:
            raise walker.err(length_node, f"scan(): length={options['length']} disagrees with the sequences, "
                                          f"of length {lengths.pop()} along axis {axis}: "
                                          f"{' and '.join(_shape(s.shape) for s in seqs)}")
        self.active.append(name)
        try:
            result = self.build(walker, name, inits, seqs, axis, options["reverse"], options["length"])
        finally:
            self.active.pop()
        self.results[result.node] = result
        return result.node

    def _arrays(self, walker: "Walker", node: ast.AST, what: str) -> list[Node]:
        items = node.elts if isinstance(node, ast.Tuple) else [node]
        if isinstance(node, ast.Tuple) and not items:
            raise walker.err(node, f"{what} of scan() is empty")
        return [walker.array(e, f"{what} of scan()") for e in items]

    def build(self, walker: "Walker", name: str, inits, seqs, axis: int, reverse: bool,
              length: int | None = None) -> ScanResult:
        from backcomp.spec.expressions import Walker, Where, parse_expression
        from backcomp.spec.loader import _topological
        ld = self.loader
        body = self.table[name]
        section = f"steps.{name}"
        g = step_graph(walker.graph, name)
        carry = [new_leaf(g, v.shape, v.dtype, n) for v, n in zip(inits, body["carry"])]
        slices = [new_leaf(g, s.shape[:axis % s.ndim] + s.shape[axis % s.ndim + 1:], s.dtype, n)
                  for s, n in zip(seqs, body["xs"])]
        for i, leaf in enumerate(carry + slices):
            g.inputs[f"l{i}"] = leaf
        names: dict[str, Node] = dict(walker.names)
        names.update({leaf.name: leaf for leaf in carry + slices})
        trees: dict[str, tuple[ast.expr, Where]] = {}
        for n, text in body["graph"].items():
            line, col = ld.loc.value(f"{section}.graph", n)
            if not isinstance(text, str):
                raise ld.fail((line, col), f"node '{n}' of step '{name}' must be an expression string, "
                                           f"not {toml_type(text)}")
            line, col = ld.loc.string_start(line, col)
            where = Where(ld.path, text, line, col, f"in node '{n}' of step '{name}'")
            trees[n] = (parse_expression(text, where), where)
        deps = {n: [a.id for a in ast.walk(tree) if isinstance(a, ast.Name) and a.id in trees]
                for n, (tree, _) in trees.items()}
        for n in _topological(deps, lambda cycle: ld.fail(
                ld.loc.value(f"{section}.graph", cycle[0]), f"cycle in step '{name}': {' -> '.join(cycle)}")):
            tree, where = trees[n]
            inner = Walker(g, names, ld.constants, ld.functions, where)
            inner.steps = self
            with g.scoped(n):
                value = inner.value(tree)
                if not isinstance(value, Node):
                    raise where.error(tree, "this expression is a constant number; put it in [constants]")
                try:
                    node = g.assign_name(n, value) if value.graph is g else g.assign_name(n, g.apply("identity", (value,)))
                except GraphError as e:
                    raise where.error(tree, str(e)) from None
            names[n] = node
        returns = body["returns"]
        new_carry = [names[n] for n in returns["carry"]]
        ys = [names[n] for n in returns.get("ys", [])]
        try:
            return finish_scan(g, inits, seqs, carry, slices, new_carry, ys, axis, reverse, length=length)
        except (GraphError, ShapeError, RegistryError) as e:
            message = str(e).replace("scan: ", "", 1)
            key = "carry" if "carry" in message else "ys" if "ys" in returns else "carry"
            raise ld.fail(ld.loc.value(f"{section}.returns", key), message) from None

    # -- run.carry[i], run.ys[j] ----------------------------------------------------------
    def part(self, walker: "Walker", node: ast.Subscript) -> Node:
        attr = node.value
        owner = attr.value
        result = self.results.get(walker.names.get(owner.id)) if isinstance(owner, ast.Name) else None
        if result is None:
            raise walker.err(attr, f"'.{attr.attr}' reads a result of scan(): '{ast.unparse(owner)}' is not one")
        items = result.carry if attr.attr == "carry" else result.ys
        index = walker.int(node.slice, f"the index of {ast.unparse(attr)}")
        if not -len(items) <= index < len(items):
            raise walker.err(node.slice, f"{ast.unparse(attr)}[{index}] is out of range: step "
                                         f"'{result.node.attrs['step'].name}' has {len(items)} "
                                         f"{'carr' + ('y' if len(items) == 1 else 'ies') if attr.attr == 'carry' else 'per-step output' + ('' if len(items) == 1 else 's')}")
        return items[index]


def _shape(shape) -> str:
    from backcomp.graph import format_shape
    return format_shape(shape)


__all__ = ["Steps", "SpecError"]
