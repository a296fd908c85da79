"""The op registry: everything about an op in one ``OpDef``.

An op is its shape rule (``infer``), its NumPy emission (``emit``), its VJP rule
(``vjp``) and its JVP rule (``jvp``), declared side by side with its memory class and explain notation (the
builder function beside it declares its spec signature, ``backcomp.ops.signature``).  The VJP rule returns
one cotangent *node* per input (or None where the input gets no gradient); the JVP
rule returns the output's tangent node from one tangent per input (None: zero).
Both build registered ops, so the backward and forward-mode graphs are made of the
same IR as the forward and can be optimised, printed and differentiated again.  An
op with no derivative at all (comparisons, integer outputs, constants) says why in
``no_derivative`` instead of leaving its rules out silently.  Registering a name
twice is an error: silent overrides are how derivative rules go quietly wrong.

What the passes need to know of an op is declared here too, so that adding an op
touches one file: how it treats the batch axis (``separability``), what its output's
elements are for the sign analysis (``bound``) and how it is computed for all of a
loop's steps at once (``batched``).  The passes keep only the machinery that reads
these; an op that declares none gets their most cautious answer (refused on batch
values, nothing known of its sign, left in the loop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from backcomp.graph import Graph, Node, Shape

#: infer(inputs, attrs) -> (shape, dtype)
InferRule = Callable[[Sequence[Node], dict], tuple[Shape, str]]
#: emit(node, args, out) -> statements assigning ``out`` (args are variable names)
EmitRule = Callable[[Node, Sequence[str], str], list[str]]
#: vjp(node, cotangent) -> one cotangent per input (None: no gradient flows there)
VjpRule = Callable[[Node, Node], Sequence["Node | None"]]
#: jvp(node, tangents) -> the output's tangent (None: zero); one tangent per input,
#: each None (zero) or a node of that input's exact shape
JvpRule = Callable[[Node, Sequence["Node | None"]], "Node | None"]
#: separability(node, kinds, dim) -> the node's ``Kind`` from its inputs' kinds, or raises
#: ``Mixed`` (both in ``backcomp.ops.batch_axis``); ``dim`` is the batch dim's name
SeparabilityRule = Callable[[Node, Sequence[Any], str], Any]
#: batched(graph, node, inputs, stacked, length) -> in ``graph``, the node for every step
#: of a loop at once: the ``stacked`` inputs have a leading axis of ``length`` steps
BatchedRule = Callable[[Graph, Node, Sequence[Node], Sequence[bool], Any], Node]

#: the values of ``OpDef.bound``: what each element of the output is, in terms of the
#: inputs' elements (``backcomp.passes.stability`` turns each into a lower bound)
BOUNDS = ("", "element", "element_or_zero", "sum", "products", "products_or_zero", "any_input", "one", "zero")


@dataclass(frozen=True)
class OpDef:
    """One op.  ``vjp=None`` (and ``jvp=None``) means the op has no derivative, and
    ``no_derivative`` says why (labels, comparisons, constants)."""

    name: str
    infer: InferRule
    emit: EmitRule
    vjp: VjpRule | None
    doc: str = ""
    #: nodes of this op may be merged into a neighbouring elementwise expression
    elementwise: bool = False
    #: extra info for docs/tests: how the op is reached from user code
    signature: str = ""
    attrs_doc: dict[str, str] = field(default_factory=dict)
    #: the VJP rule accepts a cotangent that only broadcasts to the node's shape
    #: (elementwise ops and reductions); others get it materialised first
    broadcast_ct: bool = False
    #: elementwise ops only: scalar(*arg_symbols, **attrs) -> SymPy expression
    scalar: Callable[..., Any] | None = None
    #: integer operands that index: index_range(node) -> {input position: (low, high)},
    #: bounds as ints or dim names; model inputs used so are range-checked on entry;
    #: (low, high, allowed) also accepts the one value ``allowed`` (an ignore_index)
    index_range: Callable[[Node], dict[int, tuple[Any, Any]]] | None = None
    #: the result's memory: "fresh" (a new array the memory plan may overwrite) or
    #: "view" (may share the first input's buffer: kept alive while the view is)
    memory: str = "fresh"
    #: inline(node, readers) -> a suffix for the input's name ("" for another name,
    #: ".T" for a 2-D transpose read once), printed in the reader instead of a
    #: statement; None: the node is a statement of its own
    inline: Callable[[Node, int], str | None] | None = None
    #: explain(node, args, scalars) -> how ``backcomp explain`` writes the node, as a
    #: SymPy expression over its arguments' (``backcomp.notation``); None: op(args, attrs)
    explain: Callable[..., Any] | None = None
    #: draws from the module's ``rng=``: "train" (only in train mode, as dropout) or
    #: "always" (normal, uniform); the emission reads ``_seed`` and ``train``
    random: str | None = None
    #: computes differently with ``train=False`` (batch norm); the emission reads ``train``
    modal: bool = False
    #: forward mode: the tangent of the output from the tangents of the inputs
    jvp: JvpRule | None = None
    #: why an op has neither rule (its output is boolean, integer or a constant)
    no_derivative: str = ""
    #: how the op treats the batch axis, for ``backcomp.dask`` (``backcomp.ops.batch_axis``);
    #: None: elementwise ops get the pass's rule for expressions, others are refused on batch values
    separability: SeparabilityRule | None = None
    #: what each output element is, for the sign analysis of ``backcomp.passes.stability``:
    #: "element" (an element, a mean or a max of the first input's), "element_or_zero"
    #: (that, or a zero of the padding), "sum" (a sum of them), "products" (sums of products
    #: of the inputs'), "products_or_zero" (that, and padding zeros), "any_input" (an
    #: element of one input's), "one", "zero"; "": nothing known
    bound: str = ""
    #: hoisting out of a scan's step (``backcomp.passes.hoist``); None: elementwise ops are
    #: batched by broadcasting, others stay in the loop
    batched: BatchedRule | None = None
    #: batchable(node) -> whether ``batched`` applies to this node (None: to every node)
    batchable: Callable[[Node], bool] | None = None

    def __post_init__(self):
        if self.memory not in ("fresh", "view"):
            raise RegistryError(f"op '{self.name}': memory must be 'fresh' or 'view', not {self.memory!r}")
        if self.bound not in BOUNDS:
            raise RegistryError(f"op '{self.name}': bound must be one of {BOUNDS[1:]} or '', not {self.bound!r}")


_REGISTRY: dict[str, OpDef] = {}


class RegistryError(ValueError):
    """An op was registered twice or looked up but never registered."""


def register_op(opdef: OpDef) -> OpDef:
    """Add an op to the registry; a second registration of the same name is refused."""
    if opdef.name in _REGISTRY:
        raise RegistryError(f"op '{opdef.name}' is already registered")
    if not opdef.name.isidentifier():
        raise RegistryError(f"op name {opdef.name!r} must be an identifier")
    _REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RegistryError(f"unknown op '{name}'") from None


def registered_ops() -> dict[str, OpDef]:
    """A snapshot of the registry, in registration order."""
    return dict(_REGISTRY)


def unregister_op(name: str) -> None:
    """Remove an op (for tests and plugins that register temporary ops)."""
    _REGISTRY.pop(name, None)
