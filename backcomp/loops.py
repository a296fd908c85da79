"""Loops: ``scan`` runs a step sub-graph along the leading axis of its sequences.

The contract is ``jax.lax.scan``'s: a *step* is a sub-graph from (carry, per-step
slices) to (new carry, per-step outputs); ``scan`` applies it T times and gives the
final carry and the outputs stacked along a new leading axis.  Compile time and code
size do not depend on T (it may be a symbolic dim): the step is one sub-graph, the
generated code one Python ``for`` loop.

In the IR a scan is one node of op ``scan`` whose value is a tuple (dtype "tuple");
``scan_out`` nodes project its outputs.  Its inputs are the initial carries, the
sequences (time-major: the scanned axis first) and the *consts*: the model values the
step reads (params, inputs, nodes), captured as leaves of the step when the step
refers to them, so that the VJP, JVP and DCE passes see the dependency.  A step may
also *sum* outputs over the steps instead of stacking them; reverse-mode scans use
that to accumulate the gradients of the consts.

Derivatives follow ``_scan_transpose`` in jax/_src/lax/control_flow/loops.py: the VJP
of a scan is a scan in reverse over residuals that the forward stores per step
(``_scan_vjp``), and the JVP of a scan is a scan of the step's JVP (``_scan_jvp``).
Both steps are built by the ordinary VJP/JVP passes run on the step graph.
"""
from __future__ import annotations

import contextvars
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

from backcomp.graph import Graph, GraphError, Node, ShapeError, format_shape
from backcomp.ops.batch_axis import FREE, Kind, Mixed
from backcomp.ops.registry import OpDef, register_op


# ----- the step -----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Step:
    """One step of a loop: a sub-graph, its leaves and its outputs (all nodes of ``graph``).

    Leaves are ``input`` nodes of ``graph``: the carries, the per-step slices ``xs``
    and the ``consts`` (outer values the step reads).  Outputs: the new carries (each of
    its carry's shape), ``ys`` stacked along the scanned axis, ``sums`` summed over the
    steps.  A Step is never mutated: passes build new ones (``rebuild``).
    """

    graph: Graph
    carry: tuple[Node, ...]
    xs: tuple[Node, ...]
    consts: tuple[Node, ...]
    carry_out: tuple[Node, ...]
    ys: tuple[Node, ...]
    sums: tuple[Node, ...] = ()

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def leaves(self) -> tuple[Node, ...]:
        return self.carry + self.xs + self.consts

    @property
    def outputs(self) -> tuple[Node, ...]:
        return self.carry_out + self.ys + self.sums

    def counts(self) -> tuple[int, int, int]:
        return len(self.carry), len(self.xs), len(self.consts)

    def out_counts(self) -> tuple[int, int, int]:
        return len(self.carry_out), len(self.ys), len(self.sums)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the step's structure: equal steps give equal scans (CSE, build cache)."""
        index = {n: i for i, n in enumerate(self.graph.nodes)}
        h = hashlib.sha256(self.graph.name.encode())
        for n in self.graph.nodes:
            attrs = sorted((k, repr(v)) for k, v in n.attrs.items())
            h.update(repr((n.op, n.name, n.shape, n.dtype, [index[x] for x in n.inputs], attrs)).encode())
        h.update(repr(([index[x] for x in self.leaves], self.counts(),
                       [index[x] for x in self.outputs], self.out_counts())).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Step({self.graph.name}:{self.fingerprint})"

    def as_graph(self) -> Graph:
        """The step graph with its leaves and outputs as the roots that passes keep."""
        g, m = self.graph.clone()
        g.inputs = {f"l{i}": m[x] for i, x in enumerate(self.leaves)}
        g.outputs = {f"o{i}": m[x] for i, x in enumerate(self.outputs)}
        g.loss_node, g.grads, g.cotangents, g.tangents = None, {}, {}, {}
        return g

    def rebuild(self, g: Graph) -> "Step":
        """The Step of a graph that ``as_graph`` made and a pass transformed."""
        leaves = [g.inputs[f"l{i}"] for i in range(len(self.leaves))]
        outs = [g.outputs[f"o{i}"] for i in range(len(self.outputs))]
        c, x, _ = self.counts()
        oc, oy, _ = self.out_counts()
        return Step(g, tuple(leaves[:c]), tuple(leaves[c:c + x]), tuple(leaves[c + x:]),
                    tuple(outs[:oc]), tuple(outs[oc:oc + oy]), tuple(outs[oc + oy:]))


def new_leaf(g: Graph, shape, dtype: str, name: str | None) -> Node:
    """An ``input`` node of a step graph (bound by the loop, not by ``_validate``)."""
    leaf = Node("input", (), {}, tuple(shape), dtype, g, len(g.nodes))
    g.nodes.append(leaf)
    if name is not None and g.lookup(name) is None and name.isidentifier() and not name.startswith("_"):
        g.assign_name(name, leaf)
    return leaf


def step_graph(parent: Graph, name: str) -> Graph:
    """An empty step graph nested in ``parent``: it captures the outer values it reads."""
    g = Graph(name, dims=dict(parent.dims))
    g.parent, g.captured = parent, {}
    return g


# ----- the builder --------------------------------------------------------------------
@dataclass
class ScanResult:
    """What ``scan`` returns: the tuple node, the final carries and the stacked outputs
    (each in the structure the step gave: one node or a tuple)."""
    node: Node
    carry: Any
    ys: Any


def _as_tuple(v, what: str) -> tuple[tuple[Node, ...], bool]:
    if isinstance(v, Node):
        return (v,), True
    if isinstance(v, (tuple, list)) and all(isinstance(x, Node) for x in v):
        return tuple(v), False
    if v is None or v == ():
        return (), False
    raise GraphError(f"scan: {what} must be an array or a tuple of arrays, got {type(v).__name__}")


def _innermost(nodes: Sequence[Node]) -> Graph:
    from backcomp.graph import innermost_graph
    return innermost_graph(nodes[0].graph, nodes)


def moveaxis(x: Node, source: int, dest: int) -> Node:
    """``np.moveaxis`` as a transpose node (a view); the identity when nothing moves."""
    from backcomp.ops import transpose
    source, dest = source % x.ndim, dest % x.ndim
    if source == dest:
        return x
    order = [i for i in range(x.ndim) if i != source]
    order.insert(dest, source)
    return transpose(x, tuple(order))


def scan(step: Callable, init, xs=(), axis: int = 0, name: str = "step", reverse: bool = False,
         carry_names: Sequence[str] | None = None, xs_names: Sequence[str] | None = None,
         length: int | None = None) -> ScanResult:
    """Run ``step(carry, x) -> (new_carry, ys)`` along ``axis`` of ``xs``.

    ``init`` and ``xs`` are arrays or tuples of arrays; ``step`` receives the carry and
    the slices in the same structure and returns the new carry (same structure, same
    shapes) and its per-step outputs (an array, a tuple, or None).  Model values the step
    reads are captured: they need not be passed.  The result's ``ys`` are stacked along
    ``axis``; with ``reverse`` the steps run from the last slice to the first.

    ``length`` (a positive int) is the number of steps, as in ``jax.lax.scan``: with no
    sequences (``xs=()`` or None) the step runs ``length`` times and receives ``()`` as
    its slices (a fixed-point iteration, an ODE integrator's steps, a layer repeated
    with shared weights); with sequences it must equal their length.
    """
    inits, init_single = _as_tuple(init, "init")
    seqs, xs_single = _as_tuple(xs, "xs")
    length = check_length(length)
    if not seqs and length is None:
        raise GraphError("scan: needs at least one sequence to scan over (xs), or a number of steps (length=)")
    if not inits:
        raise GraphError("scan: needs at least one carry (init)")
    for v in inits + seqs:
        if v.dtype != "float":
            raise GraphError(f"scan: carries and sequences must be float arrays, not {v.dtype} ({v!r})")
    outer = _innermost(list(inits + seqs))
    for s in seqs:
        if s.ndim == 0:
            raise ShapeError("scan: a sequence must have at least one axis to scan over")
        if isinstance(axis, bool) or not isinstance(axis, int) or not -s.ndim <= axis < s.ndim:
            raise ShapeError(f"scan: axis {axis!r} is out of range for a sequence of shape {format_shape(s.shape)}")
    lengths = {s.shape[axis] for s in seqs}
    if len(lengths) > 1:
        raise ShapeError(f"scan: the sequences have different lengths along axis {axis}: "
                         f"{' and '.join(format_shape(s.shape) for s in seqs)}")
    if seqs and length is not None:
        _same_length(seqs, axis, length)
    g = step_graph(outer, name)
    carry_names = list(carry_names or [v.name or ("carry" if len(inits) == 1 else f"carry{i}")
                                       for i, v in enumerate(inits)])
    xs_names = list(xs_names or [f"{s.name}_t" if s.name else ("x_t" if len(seqs) == 1 else f"x{i}_t")
                                 for i, s in enumerate(seqs)])
    carry = tuple(new_leaf(g, v.shape, v.dtype, n) for v, n in zip(inits, carry_names))
    slices = tuple(new_leaf(g, s.shape[:axis % s.ndim] + s.shape[axis % s.ndim + 1:], s.dtype, n)
                   for s, n in zip(seqs, xs_names))
    for i, leaf in enumerate(carry + slices):
        g.inputs[f"l{i}"] = leaf
    out = step(carry[0] if init_single else carry,
               slices[0] if xs_single else None if xs is None else slices)   # jax passes None for xs=None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise GraphError(f"scan: step '{name}' must return (new_carry, ys)")
    new_carry, single_c = _as_tuple(out[0], "the new carry")
    ys, ys_single = _as_tuple(out[1], "the per-step outputs")
    return finish_scan(g, inits, seqs, carry, slices, new_carry, ys, axis, reverse,
                       single=(init_single, ys_single), length=length)


def check_length(length) -> int | None:
    """``scan``'s ``length=``: None or a positive int (a NumPy integer is taken as one).

    A symbolic dim is refused: with no sequence, nothing binds it when the module runs
    (scan over an input of that dim instead), and ``jax.lax.scan`` wants a static length too."""
    import numbers
    if length is None:
        return None
    if isinstance(length, str):
        raise ShapeError(f"scan: length must be a positive int, not the symbolic dim {length!r}; "
                         "a loop of a symbolic number of steps scans over an input of that dim")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        raise ShapeError(f"scan: length must be a positive int, got {length!r} ({type(length).__name__})")
    if length < 1:
        raise ShapeError(f"scan: length must be a positive int (at least one step), got {int(length)}")
    return int(length)


def _same_length(seqs, axis: int, length: int) -> None:
    """With both sequences and ``length=``, they agree (as ``jax.lax.scan`` requires)."""
    for s in seqs:
        if s.ndim and -s.ndim <= axis < s.ndim and s.shape[axis] != length:
            raise ShapeError(f"scan: length={length} disagrees with the sequence of shape "
                             f"{format_shape(s.shape)}, of length {s.shape[axis]} along axis {axis}")


def length_attrs(length, n_seqs: int) -> dict:
    """The ``length`` attr of a scan node: only a scan without sequences has one (the others
    take their length from their sequences, and their nodes stay as they were)."""
    return {} if n_seqs else {"length": length}


def finish_scan(g: Graph, inits, seqs, carry, slices, new_carry, ys, axis: int, reverse: bool,
                single=(False, False), length: int | None = None) -> ScanResult:
    """Close the step graph ``g`` and build the scan node and its projections (``length``:
    the number of steps, needed when there is no sequence)."""
    if len(new_carry) != len(carry):
        raise GraphError(f"scan: step '{g.name}' returns {len(new_carry)} carr{'y' if len(new_carry) == 1 else 'ies'}, "
                         f"but the loop starts with {len(carry)}")
    new_carry = tuple(_local(g, v) for v in new_carry)
    ys = tuple(_local(g, v) for v in ys)
    for i, (c, v) in enumerate(zip(carry, new_carry)):
        if v.shape != c.shape or v.dtype != c.dtype:
            label = f"'{c.name}'" if c.name else str(i)
            raise ShapeError(f"scan: step '{g.name}' returns carry {label} with shape {format_shape(v.shape)}, "
                             f"but it starts with shape {format_shape(c.shape)}; a carry keeps its shape")
    for v in ys:
        if v.dtype != "float":
            raise GraphError(f"scan: step '{g.name}' returns a {v.dtype} per-step output; outputs must be float")
    outer_consts = tuple(g.captured)
    consts = tuple(g.captured.values())
    g.captured = None   # closed: nothing more is captured
    for i, leaf in enumerate(consts):
        g.inputs[f"l{len(carry) + len(slices) + i}"] = leaf
    step = Step(g, tuple(carry), tuple(slices), consts, new_carry, ys)
    outer = g.parent
    seqs_tm = tuple(moveaxis(s, axis, 0) for s in seqs)
    from backcomp.ops.random import _stream, draws
    drawing = any(draws(n) for n in g.nodes)
    stream = {"stream": _stream(outer)} if drawing else {}
    if not seqs:
        for y in ys:   # the stacked output has one axis more than the step's
            if not -(y.ndim + 1) <= axis <= y.ndim:
                raise ShapeError(f"scan: axis {axis} is out of range to stack the per-step outputs of step "
                                 f"'{g.name}' (shape {format_shape(y.shape)} per step)")
    node = outer.apply("scan", (*inits, *seqs_tm, *outer_consts), step=step, reverse=reverse,
                       **length_attrs(length, len(seqs)), **stream)
    carries = tuple(outer.apply("scan_out", (node,), index=i) for i in range(len(carry)))
    stacked = tuple(moveaxis(outer.apply("scan_out", (node,), index=len(carry) + j), 0, axis)
                    for j in range(len(ys)))
    return ScanResult(node, carries[0] if single[0] else carries, stacked[0] if single[1] else stacked)


def _local(g: Graph, v: Node) -> Node:
    """A step output as a node of the step graph (outer values are captured)."""
    if v.graph is g:
        return v
    return g.capture(v)


# ----- shape rules ----------------------------------------------------------------------
def scan_length(node: Node):
    """The number of steps of a scan node: the leading dim of its sequences, or its
    ``length`` attr when it has none (``scan(..., length=n)``, a backward loop that
    reads no per-step value)."""
    if "length" in node.attrs:
        return node.attrs["length"]
    c, _, _ = node.attrs["step"].counts()
    return node.inputs[c].shape[0]


def _scan_infer(inputs, attrs):
    step: Step = attrs["step"]
    c, x, k = step.counts()
    if len(inputs) != c + x + k:
        raise GraphError(f"scan: step '{step.name}' takes {c + x + k} values, got {len(inputs)}")
    for v, leaf in zip(inputs[:c], step.carry):
        if v.shape != leaf.shape:
            raise ShapeError(f"scan: the initial carry has shape {format_shape(v.shape)}, but step "
                             f"'{step.name}' takes {format_shape(leaf.shape)}")
    lengths = {v.shape[0] for v in inputs[c:c + x] if v.ndim}
    for v, leaf in zip(inputs[c:c + x], step.xs):
        if v.shape[1:] != leaf.shape:
            raise ShapeError(f"scan: a sequence of shape {format_shape(v.shape)} does not slice to "
                             f"{format_shape(leaf.shape)}, the slice step '{step.name}' takes")
    if "length" in attrs:
        length = attrs["length"]
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ShapeError(f"scan: step '{step.name}' runs {length!r} times; length must be a positive int")
        if lengths - {length}:
            raise ShapeError(f"scan: length={length} disagrees with the sequences of step '{step.name}'")
    elif not x:
        raise ShapeError(f"scan: step '{step.name}' has no sequence and no length: how many steps?")
    elif len(lengths) != 1:
        raise ShapeError(f"scan: the sequences of step '{step.name}' have different lengths")
    for v, leaf in zip(inputs[c + x:], step.consts):
        if v.shape != leaf.shape:
            raise ShapeError(f"scan: value of shape {format_shape(v.shape)} given for a leaf of shape "
                             f"{format_shape(leaf.shape)} of step '{step.name}'")
    return (), "tuple"


def out_kind(step: Step, index: int) -> tuple[str, int]:
    """("carry" | "ys" | "sums", position) of output ``index``."""
    oc, oy, os_ = step.out_counts()
    if index < oc:
        return "carry", index
    if index < oc + oy:
        return "ys", index - oc
    if index < oc + oy + os_:
        return "sums", index - oc - oy
    raise GraphError(f"scan_out: step '{step.name}' has no output {index}")


def output_shapes(node: Node) -> str:
    """What a scan node holds, for ``explain``'s shape note: the node itself is a tuple
    (shape ()), its outputs are ``carry (B, H), ...; ys (T, B, H), ...``."""
    step: Step = node.attrs["step"]
    groups: dict[str, list[str]] = {}
    for i, out in enumerate(step.outputs):
        kind, _ = out_kind(step, i)
        shape = (scan_length(node),) + out.shape if kind == "ys" else out.shape
        groups.setdefault(kind, []).append(format_shape(shape))
    return "; ".join(f"{kind} {', '.join(shapes)}" for kind, shapes in groups.items())


def _scan_out_infer(inputs, attrs):
    (node,) = inputs
    if node.op != "scan":
        raise GraphError("scan_out reads the outputs of a scan node")
    step = node.attrs["step"]
    out = step.outputs[attrs["index"]] if attrs["index"] < len(step.outputs) else None
    kind, _ = out_kind(step, attrs["index"])
    if kind == "ys":
        return (scan_length(node),) + out.shape, out.dtype
    return out.shape, out.dtype


# ----- code generation ------------------------------------------------------------------
@dataclass
class _Lowering:
    """What the statement list being lowered looks like (set by ``codegen._lower``)."""
    nodes: set
    names: dict
    check_finite: bool
    taken: set = field(default_factory=set)


_CURRENT: contextvars.ContextVar[_Lowering | None] = contextvars.ContextVar("backcomp_lowering", default=None)
_ENCLOSING: contextvars.ContextVar[frozenset] = contextvars.ContextVar("backcomp_enclosing", default=frozenset())


def enter_lowering(nodes, names, check_finite: bool) -> None:
    """Called by ``codegen._lower`` for every statement list: a loop's emission reads which of
    its outputs the list uses, the variable names in use and the --check-finite flag."""
    _CURRENT.set(_Lowering(set(nodes), names, check_finite, set(_ENCLOSING.get())))


def _claimer(taken: set) -> Callable[[str], str]:
    import keyword
    from backcomp.codegen import RESERVED

    def claim(base: str) -> str:
        name = base
        k = 2
        while keyword.iskeyword(name) or name in taken or name in RESERVED:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name
    return claim


def live_outputs(node: Node, ctx: _Lowering | None) -> list[bool]:
    """Which outputs of a scan node the statements being lowered read (all, without context)."""
    step = node.attrs["step"]
    if ctx is None:
        return [True] * len(step.outputs)
    return read_outputs(node, ctx.nodes)


def read_outputs(node: Node, readers) -> list[bool]:
    """Which outputs of scan ``node`` the nodes ``readers`` read, the new carries always
    (they feed the next step)."""
    step = node.attrs["step"]
    used = {n.attrs["index"] for n in readers if n.op == "scan_out" and n.inputs[0] is node}
    oc = len(step.carry_out)
    return [i < oc or i in used for i in range(len(step.outputs))]


def prune(step: Step, live: Sequence[bool]) -> Step:
    """The step computing only the outputs in ``live`` (the others become None, and their
    nodes are dropped when nothing else needs them)."""
    from backcomp.passes.dce import eliminate_dead_code
    if all(live):
        return step
    g = step.as_graph()
    g.outputs = {k: v for (k, v), keep in zip(g.outputs.items(), live) if keep}
    g = eliminate_dead_code(g)
    leaves = [g.inputs[f"l{i}"] for i in range(len(step.leaves))]
    outs = [g.outputs.get(f"o{i}") for i in range(len(step.outputs))]
    c, x, _ = step.counts()
    oc, oy, _ = step.out_counts()
    return Step(g, tuple(leaves[:c]), tuple(leaves[c:c + x]), tuple(leaves[c + x:]),
                tuple(outs[:oc]), tuple(outs[oc:oc + oy]), tuple(outs[oc + oy:]))


def _scan_emit(node: Node, args: Sequence[str], out: str) -> list[str]:
    """A Python ``for`` loop: bind the carries, preallocate the stacked outputs and the
    sums, run the step's statements (lowered like any graph: fused, memory-planned) once
    per step, and pack the results into the tuple ``out``."""
    from backcomp.codegen import assign_names, lower
    from backcomp.ops.random import SEED, draws
    from backcomp.ops.common import shape_code
    from backcomp.printer import use_helper
    ctx = _CURRENT.get()
    live = live_outputs(node, ctx)
    step = prune(node.attrs["step"], live)
    c, x, k = step.counts()
    oc, oy, os_ = step.out_counts()
    taken = set(ctx.taken) | set(ctx.names.values()) if ctx is not None else set()
    taken.add(out)
    claim = _claimer(taken)
    local = assign_names(step.graph)
    body_nodes = _body_nodes(step)
    names: dict[Node, str] = {}
    # leaves: carries and slices are loop variables, consts are read where they are
    for leaf, arg in zip(step.consts, args[c + x:]):
        names[leaf] = arg
    for n in step.graph.nodes:
        if n not in names:
            names[n] = claim(local[n].lstrip("_") or "v")
    t = claim("t")
    length = scan_length(node)
    steps = str(length)
    dtype = claim("dtype_")
    float_args = [a for a, v in zip(args, node.inputs) if v.dtype == "float"]
    lines = [f"# scan {step.name}: {'reversed ' if node.attrs.get('reverse') else ''}loop over {steps} steps"]
    lines.append(f"{dtype} = np.result_type({', '.join(float_args)})")
    for leaf, outer in zip(step.consts, node.inputs[c + x:]):
        if _transposed_gemm_operand(leaf, outer, body_nodes):
            base = ctx.names.get(outer.inputs[0], "") if ctx is not None else ""
            contiguous = claim(f"{base.lstrip('_') if base.isidentifier() else 'w'}T")
            lines.append(f"{contiguous} = np.ascontiguousarray({names[leaf]})   # read by a GEMM at every step")
            names[leaf] = contiguous
    for leaf, arg in zip(step.carry, args[:c]):
        lines.append(f"{names[leaf]} = {arg}")
    stacks, accs = [], []
    allocs: list[list[str]] = []   # per stack: the lines that make it (written before the loop)
    for j, y in enumerate(step.ys):
        if y is None:
            stacks.append(None)
            allocs.append([])
            continue
        s = claim(f"{names[y]}_seq")
        stacks.append(s)
        allocs.append([f"{s} = np.empty({shape_code((length,) + y.shape)}, dtype={dtype})"])
    sums = []
    for j, v in enumerate(step.sums):
        if v is None:
            accs.append(None)
            continue
        a = claim(f"{names[v]}_sum")
        accs.append(a)
        sums.append(f"{a} = np.zeros({shape_code(v.shape)}, dtype={dtype})")
    reverse = bool(node.attrs.get("reverse"))
    rng = f"range({steps} - 1, -1, -1)" if reverse else f"range({steps})"
    body = [f"{names[leaf]} = {arg}[{t}]" for leaf, arg in zip(step.xs, args[c:c + x]) if leaf in body_nodes]
    returned = {v for v in step.outputs if v is not None}
    helpers: set[str] = set()
    seed = SEED.get()
    if any(draws(n, body_nodes) for n in body_nodes):   # fresh noise each step, from [seed, stream, t]
        outer_seed, seed = seed, claim("seed_t")
        body.insert(0, f"{seed} = None if {outer_seed} is None else "
                       f"int(np.random.default_rng([{outer_seed}, {node.attrs['stream']}, {t}]).integers(2 ** 63))")
    token, seed_token = _ENCLOSING.set(frozenset(taken)), SEED.set(seed)
    try:
        body += lower(body_nodes, names, helpers, returned, ctx.check_finite if ctx else False)
    finally:
        _ENCLOSING.reset(token)
        SEED.reset(seed_token)
        _CURRENT.set(ctx)
    for h in helpers:
        use_helper(h)
    in_slot: set[Node] = set()   # per-step outputs computed straight into their stack
    filled: set[int] = set()      # stacks whose rows need no copy
    for j, (leaf, v) in enumerate(zip(step.carry, step.carry_out)):
        # a stored carry: the new carry is computed into row t+1 of a (T+1, ...) buffer
        # whose first T rows are the stack (row 0 the initial carry), so nothing is copied.
        # Not when the new carry is stacked too (an LSTM's h): that stack and this one
        # would share rows, and the code after the loop may write into a dead stack
        k = next((k for k, y in enumerate(step.ys) if y is leaf and stacks[k]), None)
        if k is None or v is None or v.op == "input" or _is_view(v) or v in in_slot \
                or sum(o is v for o in step.carry_out) != 1 or any(y is v for y in step.ys):
            continue
        buf = claim(f"{names[leaf]}_buf")
        if not _write_into(body, names[v], f"{buf}[{t}]" if reverse else f"{buf}[{t} + 1]"):
            continue
        in_slot.add(v)
        rows = shape_code((length,) + v.shape).replace(f"({length},", f"({length} + 1,", 1)
        allocs[k] = [f"{buf} = np.empty({rows}, dtype={dtype})", f"{buf}[{steps if reverse else 0}] = {args[j]}",
                     f"{stacks[k]} = {buf}[{'1:' if reverse else ':-1'}]"]
        filled.add(k)
    for k, (y, s) in enumerate(zip(step.ys, stacks)):
        if s is None or k in filled:
            continue
        if y not in in_slot and (_concatenate_into(body, y, names, s, t) or _write_into(body, names[y], f"{s}[{t}]")):
            in_slot.add(y)
        else:
            body.append(f"{s}[{t}] = {names[y]}")
    lines += [line for a in allocs for line in a] + sums
    lines.append(f"for {t} in {rng}:")
    for v, a in zip(step.sums, accs):
        if a is not None:
            body.append(f"{a} += {names[v]}")
    pairs = [(names[leaf], names[v]) for leaf, v in zip(step.carry, step.carry_out)
             if v is not None and names[leaf] != names[v]]
    if pairs:
        body.append(f"{', '.join(p[0] for p in pairs)} = {', '.join(p[1] for p in pairs)}")
    lines += ["    " + line for line in body]
    finals = []
    for leaf, v in zip(step.carry, step.carry_out):
        if v is None:
            finals.append("None")
        elif v.op == "input" or _is_view(v) or v in in_slot:   # a slice, a const, a carry passed
            finals.append(f"np.array({names[leaf]})")   # through or a stack's row: no shared buffer
        else:
            finals.append(names[leaf])
    finals += [s or "None" for s in stacks] + [a or "None" for a in accs]
    lines.append(f"{out} = ({', '.join(finals)},)")
    return lines


def _write_into(body: list[str], name: str, slot: str) -> bool:
    """Rewrite the statement ``name = <value>`` of ``body`` to compute the value into
    ``slot`` (a row of a preallocated stack) and bind ``name`` to that row, when the
    value has an ``out=`` form (codegen's ``_out_form``): the row is then written once,
    with no temporary and no copy."""
    from backcomp.codegen import _out_form
    prefix = f"{name} = "
    for i, line in enumerate(body):
        if line.startswith(prefix):
            call = _out_form(line[len(prefix):], name)
            if call is None:
                return False
            body[i:i + 1] = [f"{prefix}{slot}", call]
            return True
    return False


def _concatenate_into(body: list[str], y: Node, names: dict[Node, str], stack: str, t: str) -> bool:
    """For a per-step output ``y = concatenate(parts)`` (the gates' cotangent of a
    recurrent cell): compute each part straight into its columns of the stack's row when
    its statement allows (``_write_into``) and nothing else reads its buffer, copy the
    others there, and bind ``y`` to the row: no concatenation, no temporaries."""
    import re
    if y.op != "concatenate":
        return False
    axis = y.attrs["axis"]
    name = names[y]
    head = f"{name} = np.concatenate(("
    at = [i for i, line in enumerate(body) if line.startswith(head)]
    if len(at) != 1 or not all(isinstance(p.shape[axis], int) for p in y.inputs):
        return False
    lead = f"{t}, " + ":, " * axis
    copies, written, start = [], set(), 0
    for p in y.inputs:
        stop = start + p.shape[axis]
        part = names[p]
        uses = [i for i, line in enumerate(body) if re.search(rf"\b{re.escape(part)}\b", line)
                and not line.startswith(("del ", "#"))]
        defined = [i for i in uses if body[i].startswith(f"{part} = ")]
        chain = [i for i in uses if body[i].endswith(f"out={part})")]   # in place after its definition
        own = (p not in written and part.isidentifier() and p.op not in ("input", "param")
               and len(defined) == 1 and set(uses) == {defined[0], at[0], *chain}
               and all(defined[0] < i < at[0] for i in chain) and defined[0] < at[0])
        if own and _write_into(body, part, f"{stack}[{lead}{start}:{stop}]"):
            written.add(p)
            at[0] += 1   # the part's statement became two
        else:
            copies.append(f"{name}[{':, ' * axis}{start}:{stop}] = {part}")
        start = stop
    if not written:
        return False
    body[at[0]:at[0] + 1] = [f"{name} = {stack}[{t}]"] + copies
    return True


def _transposed_gemm_operand(leaf: Node, outer: Node, body: list[Node]) -> bool:
    """Whether a const is a transposed matrix that a matmul of the step reads: it is
    copied to a contiguous array once before the loop, as OpenBLAS multiplies by a
    transposed operand about 1.6x slower at recurrent sizes ((32, 512) @ (512, 128):
    86 µs vs 56 µs per step, one thread), and the copy costs about one step's GEMM."""
    return (outer.op == "transpose" and outer.ndim == 2
            and any(n.op == "matmul" and leaf in n.inputs for n in body))


def _is_view(v: Node) -> bool:
    from backcomp.passes.memory import is_view
    return v.op not in ("input", "param") and is_view(v)


def _body_nodes(step: Step) -> list[Node]:
    from backcomp.graph import live_nodes
    return live_nodes(step.graph, [v for v in step.outputs if v is not None])


def _scan_out_emit(node, args, out):
    return [f"{out} = {args[0]}[{node.attrs['index']}]"]


# ----- batch separability -----------------------------------------------------------
def _loop_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """Refused on batch values: the step is not analysed for separability."""
    if any(k.tag != "free" for k in kinds):
        raise Mixed(node, "runs a loop (scan) over batch values; loops are not analysed for separability")
    return FREE


# ----- derivatives ----------------------------------------------------------------------
def _register():
    register_op(OpDef(
        "scan", _scan_infer, _scan_emit, _scan_vjp_rule, jvp=_scan_jvp_rule, separability=_loop_kind,
        doc="run a step sub-graph along the leading axis (a Python for loop); the value is a tuple",
        signature="scan(step, init, xs=(), axis=0, reverse=False, length=None)"))
    register_op(OpDef(
        "scan_out", _scan_out_infer, _scan_out_emit, _scan_out_vjp, jvp=_scan_out_jvp, separability=_loop_kind,
        doc="one output of a scan: a final carry, stacked outputs or a sum (compiler-internal)"))
    register_op(OpDef(
        "tuple_ct", lambda ins, attrs: ((), "tuple"), _no_emit, None,
        no_derivative="bookkeeping of the VJP pass: the cotangent of one output of a scan",
        doc="the cotangent of one output of a tuple value (compiler-internal, never emitted)"))
    register_op(OpDef(
        "tuple_ct_sum", lambda ins, attrs: ((), "tuple"), _no_emit, None,
        no_derivative="bookkeeping of the VJP pass: the cotangents of several outputs of a scan",
        doc="cotangents of several outputs of a tuple value (compiler-internal, never emitted)"))


def _no_emit(node, args, out):
    raise GraphError(f"internal error: a '{node.op}' node reached code generation")


def _scan_out_vjp(node: Node, ct: Node):
    return [node.graph.apply("tuple_ct", (ct,), index=node.attrs["index"])]


def output_cotangents(ct: Node, n: int) -> list[Node | None]:
    """Per output of a scan, the sum of the cotangents its projections received."""
    from backcomp.ops import add
    parts: list[list[Node]] = [[] for _ in range(n)]
    stack = [ct]
    while stack:
        c = stack.pop()
        if c.op == "tuple_ct":
            parts[c.attrs["index"]].append(c.inputs[0])
        elif c.op == "tuple_ct_sum":
            stack.extend(reversed(c.inputs))
        else:
            raise GraphError(f"internal error: cotangent of a scan is a '{c.op}' node")
    out: list[Node | None] = []
    for p in parts:
        total = p[0] if p else None
        for q in p[1:]:
            total = add(total, q)
        out.append(total)
    return out


def _scan_vjp_rule(node: Node, ct: Node):
    from backcomp.loops_ad import scan_vjp
    return scan_vjp(node, ct)


def _scan_jvp_rule(node: Node, tangents):
    from backcomp.loops_ad import scan_jvp
    return scan_jvp(node, tangents)


def _scan_out_jvp(node: Node, tangents):
    from backcomp.loops_ad import scan_out_jvp
    return scan_out_jvp(node, tangents)


_register()
