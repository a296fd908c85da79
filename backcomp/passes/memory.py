"""Memory planning for one generated function (an analysis over its statements).

Two decisions, both about buffers that are dead after a statement:
- ``reuse``: an elementwise statement may write its result into an input's buffer
  (``np.add(z, b, out=z)``) when that buffer is not needed afterwards, has the
  result's exact shape, is not aliased by a view, a param, an input or a returned
  value, and is not read by another operand of the statement;
- ``drops``: after its last use each temporary is deleted (``del``), so large
  intermediates are freed as soon as possible instead of at function exit.
Views (transpose, reshape, indexing, broadcast) share their source's buffer, so a
buffer lives until the last use of any of its views.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from backcomp.graph import Node
from backcomp.ops.registry import get_op


def memory_class(n: Node) -> str:
    """"caller" (an input or param: never written), or the op's own "fresh" / "view"."""
    return "caller" if n.op in ("input", "param") else get_op(n.op).memory


def is_view(n: Node) -> bool:
    return memory_class(n) == "view" and bool(n.inputs)


@dataclass
class MemoryPlan:
    reuse: dict[Node, Node] = field(default_factory=dict)   # node -> input whose buffer it writes
    drops: dict[int, list[Node]] = field(default_factory=dict)   # statement index -> dead nodes


def _aliases_input(n: Node, elementwise) -> bool:
    """Views, and elementwise nodes whose expression is just an input (``out = x``)."""
    if is_view(n):
        return True
    if elementwise(n):
        from backcomp.ops.elementwise import node_expr
        return node_expr(n).is_Symbol
    return False


def plan_memory(nodes: list[Node], returned: set[Node], elementwise,
                inlined: dict[Node, Node] | None = None) -> MemoryPlan:
    """Plan buffer reuse and deletions for statements computing ``nodes`` in order.

    ``inlined`` maps nodes printed inside their consumer (``x.T``) to the node
    they read: a use of one is a use of the other.
    """
    inlined = inlined or {}
    owner: dict[Node, Node] = {}    # node -> the node whose buffer holds its value
    views: set[Node] = set()

    def buf(n: Node) -> Node:
        while n in owner:
            n = owner[n]
        return n

    for n in nodes:
        if _aliases_input(n, elementwise):
            owner[n] = buf(n.inputs[0])
            views.add(n)
    last_use: dict[Node, int] = {}   # buffer -> last statement reading it (through any alias)
    last_var: dict[Node, int] = {}   # variable -> last statement reading it
    for i, n in enumerate(nodes):
        for x in n.inputs:
            while x in inlined:
                last_var[x] = i
                x = inlined[x]
            last_use[buf(x)] = i
            last_var[x] = i
    pinned = {buf(n) for n in returned} | {buf(n) for n in nodes if n.op in ("input", "param")}

    plan = MemoryPlan()
    for i, n in enumerate(nodes):
        if not (elementwise(n) and n.dtype == "float"):
            continue
        for x in n.inputs:
            b = buf(x)
            fresh = memory_class(b) == "fresh" and b not in views
            # another operand reading the same buffer (stop_gradient(a) beside a) would be
            # overwritten by the first call of an in-place chain before it is read
            shared = any(buf(y) is b for y in n.inputs if y is not x)
            if (x not in views and fresh and b not in pinned and b.dtype == "float" and not shared
                    and x.shape == n.shape == b.shape and n.shape != () and last_use.get(b) == i):
                plan.reuse[n] = x
                owner[n] = b
                last_use[b] = last_use.pop(n, i)
                if n in returned:
                    pinned.add(b)
                break
    for n in nodes:
        if n.op not in ("input", "param") and n not in returned and n in last_var and n not in inlined:
            plan.drops.setdefault(last_var[n], []).append(n)
    return plan
