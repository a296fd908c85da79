"""The IR: a DAG of nodes with symbolic shapes, shared by forward and backward.

A node is one op applied to earlier nodes.  Shapes are tuples whose entries are
ints (fixed sizes) or strings (symbolic dims such as "B", bound when the generated
module runs).  Nodes are created only through ``Graph.apply`` so that every node's
shape is checked the moment it is built, and the order of ``Graph.nodes`` is a
valid topological order (a node's inputs always come before it).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable

Dim = int | str
Shape = tuple[Dim, ...]


class ShapeError(ValueError):
    """An op was applied to operands whose shapes do not fit together."""


class GraphError(ValueError):
    """A graph is malformed: bad names, missing loss, a non-scalar loss, ..."""


def check_shape(shape: Iterable[Any], what: str, products: bool = False) -> Shape:
    """Validate a shape: positive ints or identifier-like dim names (and, with
    ``products``, products of them such as "B*T", written by ``product_dim``)."""
    out = []
    for dim in tuple(shape):
        if isinstance(dim, bool) or not isinstance(dim, (int, str)):
            raise ShapeError(f"{what}: dimension {dim!r} must be a positive integer or a name")
        if isinstance(dim, int) and dim <= 0:
            raise ShapeError(f"{what}: dimension {dim} must be positive")
        if isinstance(dim, str) and not dim.isidentifier():
            if not (products and "*" in dim and product_dim(*dim_factors(dim)) == dim):
                raise ShapeError(f"{what}: symbolic dimension {dim!r} must be an identifier")
        out.append(dim)
    return tuple(out)


def dim_factors(dim: Dim) -> tuple[int, list[str]]:
    """A dim as (integer coefficient, dim names): 32 -> (32, []), "4*B*T" -> (4, ["B", "T"])."""
    if isinstance(dim, int):
        return dim, []
    coeff, names = 1, []
    for f in dim.split("*"):
        if f.isdigit():
            coeff *= int(f)
        elif f.isidentifier():
            names.append(f)
        else:
            raise ShapeError(f"symbolic dimension {dim!r} must be a name or a product of names and integers")
    return coeff, sorted(names)


def product_dim(coeff: int, names: Iterable[str]) -> Dim:
    """The one spelling of a product of dims: an int, a name, or "4*B*T" (names sorted)."""
    names = sorted(names)
    if not names:
        return coeff
    return "*".join(([str(coeff)] if coeff != 1 else []) + names)


def multiply_dims(a: Dim, b: Dim) -> Dim:
    """The dim a·b (ints multiply, names join: 4 · B → "4*B")."""
    ca, na = dim_factors(a)
    cb, nb = dim_factors(b)
    return product_dim(ca * cb, na + nb)


def broadcast_shapes(*shapes: Shape, where: str = "") -> Shape:
    """NumPy broadcasting over ints and symbolic dims (a name only matches itself or 1)."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(rank):
        dim: Dim = 1
        for s in shapes:
            d = s[axis - rank + len(s)] if axis >= rank - len(s) else 1
            if d == 1 or d == dim:
                continue
            if dim != 1:
                shown = " and ".join(format_shape(s) for s in shapes)
                raise ShapeError(f"{where}cannot broadcast shapes {shown}")
            dim = d
        out.append(dim)
    return tuple(out)


def format_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def static_size(shape: Shape) -> int | None:
    """Number of elements when every dim is fixed, else None."""
    size = 1
    for d in shape:
        if isinstance(d, str):
            return None
        size *= d
    return size


@dataclass(eq=False, repr=False)
class Node:
    """One value in the DAG.  Compared by identity; ``id`` is its creation index."""

    op: str
    inputs: tuple["Node", ...]
    attrs: dict[str, Any]
    shape: Shape
    dtype: str  # "float", "int" or "bool"
    graph: "Graph"
    id: int
    name: str | None = None
    #: the named node this one was built for (names temporaries in generated code)
    scope: str | None = None
    #: backward nodes: (forward node, the input node or None) they differentiate
    origin: tuple | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        label = self.name or f"%{self.id}"
        return f"<{label} = {self.op}{format_shape(self.shape)}>"

    # Operator overloading delegates to the op registry (imported lazily: the
    # registry builds nodes, so it depends on this module, not the reverse).
    def __add__(self, other): return _ops().add(self, other)
    def __radd__(self, other): return _ops().add(other, self)
    def __sub__(self, other): return _ops().sub(self, other)
    def __rsub__(self, other): return _ops().sub(other, self)
    def __mul__(self, other): return _ops().mul(self, other)
    def __rmul__(self, other): return _ops().mul(other, self)
    def __truediv__(self, other): return _ops().div(self, other)
    def __rtruediv__(self, other): return _ops().div(other, self)
    def __pow__(self, other): return _ops().pow(self, other)
    def __rpow__(self, other): return _ops().pow(other, self)
    def __matmul__(self, other): return _ops().matmul(self, other)
    def __rmatmul__(self, other): return _ops().matmul(other, self)
    def __neg__(self): return _ops().neg(self)
    def __pos__(self): return self
    def __gt__(self, other): return _ops().greater(self, other)
    def __lt__(self, other): return _ops().less(self, other)
    def __ge__(self, other): return _ops().greater_equal(self, other)
    def __le__(self, other): return _ops().less_equal(self, other)
    def __getitem__(self, index): return _ops().getitem(self, index)
    __hash__ = object.__hash__

    @property
    def T(self) -> "Node":
        return _ops().transpose(self)


def _ops():
    from backcomp import ops
    return ops


@dataclass(eq=False)
class Graph:
    """A model: named inputs and params, op nodes, a scalar loss and named outputs."""

    name: str
    nodes: list[Node] = field(default_factory=list)
    inputs: dict[str, Node] = field(default_factory=dict)
    params: dict[str, Node] = field(default_factory=dict)
    outputs: dict[str, Node] = field(default_factory=dict)
    inits: dict[str, str] = field(default_factory=dict)
    loss_node: Node | None = None
    wrt: tuple[str, ...] | None = None
    #: filled by the VJP pass: the cotangent node of each wrt param, and of each node
    grads: dict[str, Node] = field(default_factory=dict)
    cotangents: dict[Node, Node] = field(default_factory=dict)
    #: filled by the JVP pass (forward mode): the tangent node of each node it reached,
    #: the tangent leaves it was seeded with (by the name of their value) and the
    #: tangents a generated ``jvp``/``hvp`` returns (by name)
    tangents: dict[Node, Node] = field(default_factory=dict)
    tangent_inputs: dict[str, Node] = field(default_factory=dict)
    tangent_outputs: dict[str, Node] = field(default_factory=dict)
    #: grad(y, x) nodes -> (y, x), for ``explain`` to show them as ∂y/∂x
    grad_of: dict[Node, tuple[Node, Node]] = field(default_factory=dict)
    #: stamped on nodes as they are created (see ``scoped``)
    scope: str | None = None
    #: stamped on backward nodes as they are created
    origin: tuple | None = None
    #: which symbolic dims are bound from which input axis, in declaration order
    dims: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: non-trained state (batch norm's running statistics): leaves like inputs, passed
    #: as ``buffers=`` and updated in place by the ``effects`` (computed in every
    #: function even though nothing reads them)
    buffers: dict[str, Node] = field(default_factory=dict)
    effects: list[Node] = field(default_factory=list)
    #: a loop's step graph (backcomp.loops): the graph it is nested in, and each outer
    #: value it reads -> the leaf standing for it inside (None once the step is closed)
    parent: "Graph | None" = None
    captured: "dict[Node, Node] | None" = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise GraphError(f"model name {self.name!r} is not a valid Python identifier")
        self._names: dict[str, Node] = {}

    # -- leaves -------------------------------------------------------------
    def input(self, name: str, shape: Iterable[Dim], dtype: str = "float") -> Node:
        """A value supplied per call; ``dtype`` "int" marks labels (never differentiated)."""
        if dtype not in ("float", "int"):
            raise GraphError(f"input '{name}': dtype must be float or int, not {dtype!r}")
        shape = check_shape(shape, f"input '{name}'")
        node = self._leaf("input", name, shape, dtype)
        self.inputs[name] = node
        for axis, dim in enumerate(shape):
            if isinstance(dim, str):
                self.dims.setdefault(dim, (name, axis))
        return node

    def buffer(self, name: str, shape: Iterable[Dim], init: str = "zeros") -> Node:
        """Non-trained state of fixed shape (running statistics), initialised by ``init``
        ("zeros" or "ones") in ``init_buffers``; never differentiated."""
        shape = check_shape(shape, f"buffer '{name}'")
        if any(isinstance(d, str) for d in shape):
            raise ShapeError(f"buffer '{name}': shape {format_shape(shape)} must be fixed (no symbolic dims)")
        if init not in ("zeros", "ones"):
            raise GraphError(f"buffer '{name}': init must be 'zeros' or 'ones', not {init!r}")
        node = self._leaf("input", name, shape, "float")
        self.buffers[name] = node
        self.inits[name] = init
        return node

    def param(self, name: str, shape: Iterable[Dim], init: str | None = None) -> Node:
        """A trainable array; ``init`` is an init name such as "glorot_uniform" or "normal(0.01)"."""
        from backcomp.inits import parse_init, default_init
        shape = check_shape(shape, f"param '{name}'")
        if any(isinstance(d, str) for d in shape):
            raise ShapeError(f"param '{name}': shape {format_shape(shape)} must be fixed (no symbolic dims)")
        init = init if init is not None else default_init(shape)
        parse_init(init, shape)  # validate now, not when the module runs
        node = self._leaf("param", name, shape, "float")
        self.params[name] = node
        self.inits[name] = init
        return node

    def _leaf(self, op: str, name: str, shape: Shape, dtype: str) -> Node:
        node = Node(op, (), {}, shape, dtype, self, len(self.nodes))
        self.nodes.append(node)
        self.assign_name(name, node)
        return node

    # -- naming and roles ---------------------------------------------------
    def assign_name(self, name: str, node: Node) -> Node:
        """Give a node a user-facing name (used for its variable in generated code)."""
        if not name.isidentifier() or name.startswith("_"):
            raise GraphError(f"name {name!r} must be an identifier not starting with '_'")
        if name in self._names and self._names[name] is not node:
            raise GraphError(f"duplicate name '{name}'")
        if node.name is not None and node.name != name:
            node = _ops().identity(node)
        node.name = name
        self._names[name] = node
        return node

    def loss(self, node: Node, name: str = "loss") -> Node:
        """Mark the scalar that value_and_grad differentiates."""
        if node.shape != ():
            raise GraphError(f"loss '{node.name or name}' must be a scalar, but has shape {format_shape(node.shape)}")
        if node.dtype != "float":
            raise GraphError("loss must be a float value")
        if node.name is None:
            node = self.assign_name(name, node)
        self.loss_node = node
        return node

    def output(self, name: str, node: Node) -> Node:
        """Add a value that forward() returns under ``name``."""
        if node.name is None:
            node = self.assign_name(name, node)
        self.outputs[name] = node
        return node

    def forward_outputs(self) -> dict[str, Node]:
        """What forward() returns: the declared outputs, else just the loss."""
        if self.outputs:
            return dict(self.outputs)
        if self.loss_node is None:
            raise GraphError(f"model '{self.name}' has neither a loss nor outputs")
        return {self.loss_node.name: self.loss_node}

    def grad(self, y: Node, x: Node) -> Node:
        """∂y/∂x (``y`` a scalar node) as a differentiable node of this graph."""
        return _ops().grad(y, x)

    def lookup(self, name: str) -> Node | None:
        return self._names.get(name)

    # -- building op nodes ---------------------------------------------------
    def apply(self, op: str, inputs: Iterable[Node], **attrs: Any) -> Node:
        """Create a node of registered op ``op``; its shape rule runs here."""
        from backcomp.ops.registry import get_op
        opdef = get_op(op)
        inputs = tuple(inputs)
        home = innermost_graph(self, inputs)
        if home is not self:   # an operand lives in a step nested in this graph: build there
            return home.apply(op, inputs, **attrs)
        if self.captured is not None:
            inputs = tuple(x if x.graph is self else self.capture(x) for x in inputs)
        for x in inputs:
            if x.graph is not self:
                raise GraphError(f"node {x!r} belongs to graph '{x.graph.name}', not '{self.name}'")
        shape, dtype = opdef.infer(inputs, attrs)
        node = Node(op, inputs, attrs, tuple(shape), dtype, self, len(self.nodes),
                    scope=self.scope, origin=self.origin)
        self.nodes.append(node)
        return node

    def capture(self, x: Node) -> Node:
        """The leaf of this step graph that stands for ``x``, a value of an enclosing graph."""
        if self.captured is None or self.parent is None:
            raise GraphError(f"node {x!r} belongs to graph '{x.graph.name}', not '{self.name}'")
        outer = x if x.graph is self.parent else self.parent.capture(x)
        leaf = self.captured.get(outer)
        if leaf is None:
            leaf = Node("input", (), {}, x.shape, x.dtype, self, len(self.nodes))
            self.nodes.append(leaf)
            if x.name is not None and x.name not in self._names:
                self.assign_name(x.name, leaf)
            self.captured[outer] = leaf
        return leaf

    def scan(self, step, init, xs=(), axis: int = 0, name: str = "step", reverse: bool = False,
             length: int | None = None):
        """Run ``step(carry, x) -> (new_carry, ys)`` along ``axis`` of ``xs`` as one loop
        (``backcomp.loops.scan``); the result has ``.carry`` and ``.ys`` (stacked on ``axis``).

        With no sequences, ``length=n`` (a positive int) runs the step n times, as
        ``jax.lax.scan(f, init, None, length=n)``: ``g.scan(step, h0, length=4)``."""
        from backcomp.loops import scan
        return scan(step, init, xs, axis=axis, name=name, reverse=reverse, length=length)

    @contextmanager
    def scoped(self, scope: str | None = None, origin: tuple | None = None):
        """Stamp nodes built inside the block with a scope name and/or an origin."""
        saved = self.scope, self.origin
        self.scope = scope if scope is not None else self.scope
        self.origin = origin if origin is not None else self.origin
        try:
            yield
        finally:
            self.scope, self.origin = saved

    def clone(self) -> tuple["Graph", dict[Node, Node]]:
        """A structurally equal graph with fresh nodes, and the old -> new node map.

        Passes work on clones so that the graph a user built is never mutated.
        """
        g = Graph(self.name, wrt=self.wrt, inits=dict(self.inits), dims=dict(self.dims))
        mapping: dict[Node, Node] = {}
        for n in self.nodes:
            m = Node(n.op, tuple(mapping[i] for i in n.inputs), dict(n.attrs), n.shape, n.dtype, g,
                     len(g.nodes), n.name, n.scope,
                     tuple(mapping.get(o, o) for o in n.origin) if n.origin else None)
            g.nodes.append(m)
            mapping[n] = m
            if n.name is not None:
                g._names[n.name] = m
        g.inputs = {k: mapping[v] for k, v in self.inputs.items()}
        g.params = {k: mapping[v] for k, v in self.params.items()}
        g.buffers = {k: mapping[v] for k, v in self.buffers.items()}
        g.effects = [mapping[v] for v in self.effects if v in mapping]
        g.outputs = {k: mapping[v] for k, v in self.outputs.items()}
        g.loss_node = mapping.get(self.loss_node) if self.loss_node is not None else None
        g.grads = {k: mapping[v] for k, v in self.grads.items()}
        # keys may be forward nodes a pass removed: keep them, they still name cotangents
        g.cotangents = {mapping.get(k, k): mapping[v] for k, v in self.cotangents.items()}
        g.tangents = {mapping.get(k, k): mapping[v] for k, v in self.tangents.items()}
        g.tangent_inputs = {k: mapping[v] for k, v in self.tangent_inputs.items()}
        g.tangent_outputs = {k: mapping[v] for k, v in self.tangent_outputs.items()}
        g.grad_of = {mapping[k]: (mapping[y], mapping[x]) for k, (y, x) in self.grad_of.items()
                     if k in mapping and y in mapping and x in mapping}
        return g, mapping

    def replace_uses(self, replace: dict[Node, Node]) -> None:
        """Point every use of a node in ``replace`` (inputs, roots) at its substitute."""
        if not replace:
            return
        for node in self.nodes:
            node.inputs = tuple(replace.get(x, x) for x in node.inputs)
        self.outputs = {k: replace.get(v, v) for k, v in self.outputs.items()}
        self.effects = [replace.get(v, v) for v in self.effects]
        self.grads = {k: replace.get(v, v) for k, v in self.grads.items()}
        self.cotangents = {k: replace.get(v, v) for k, v in self.cotangents.items() if k not in replace}
        self.tangents = {k: replace.get(v, v) for k, v in self.tangents.items() if k not in replace}
        self.tangent_outputs = {k: replace.get(v, v) for k, v in self.tangent_outputs.items()}
        if self.loss_node is not None:
            self.loss_node = replace.get(self.loss_node, self.loss_node)

    def wrt_params(self) -> tuple[str, ...]:
        return self.wrt if self.wrt is not None else tuple(self.params)


def innermost_graph(graph: Graph, nodes: Iterable[Node]) -> Graph:
    """The most deeply nested of ``graph`` and the graphs of ``nodes`` (steps nest in their
    parents): where an op over these values must be built."""
    home = graph
    for x in nodes:
        g = x.graph
        if g is home:
            continue
        up = g.parent
        while up is not None and up is not home:
            up = up.parent
        if up is home:
            home = g
    return home


def consumers(nodes: Iterable[Node]) -> dict[Node, list[Node]]:
    """Map each node to the nodes that use it, in topological order."""
    users: dict[Node, list[Node]] = {}
    for node in nodes:
        users.setdefault(node, [])
        for x in node.inputs:
            users.setdefault(x, [])
            if not users[x] or users[x][-1] is not node:
                users[x].append(node)
    return users


def toposort(nodes: list[Node]) -> list[Node]:
    """Stable topological order (inputs before users), iteratively: passes that append
    new nodes after their users restore the order with it."""
    placed: set[Node] = set()
    order: list[Node] = []
    for root in nodes:
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in placed:
                continue
            if expanded:
                placed.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((x, False) for x in reversed(n.inputs) if x not in placed)
    return order


def ancestors(roots: Iterable[Node]) -> set[Node]:
    """Every node some root depends on (roots included), found iteratively."""
    seen: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.inputs)
    return seen


def live_nodes(graph: Graph, roots: Iterable[Node]) -> list[Node]:
    """The nodes the roots need, in the graph's (topological) order."""
    needed = ancestors(roots)
    return [n for n in graph.nodes if n in needed]
