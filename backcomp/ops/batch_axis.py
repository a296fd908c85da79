"""What ops' separability rules are written in (``OpDef.separability``).

The batch-separability analysis (``backcomp.passes.separability``) gives every node
a ``Kind`` from its inputs' kinds, by the rule its op declares.  The kinds, the
refusal a rule raises and the rule of an op that declares none live here, apart
from the pass, so that each op module can declare its rule without importing the
passes (which import the ops).
"""
from __future__ import annotations

from dataclasses import dataclass

from backcomp.graph import Node

LIN_TAG, ROW_TAG, MIXED_TAG = "lin", "row", "mixed"


@dataclass(frozen=True)
class Kind:
    """What a node is with respect to the batch (see ``backcomp.passes.separability``)."""
    tag: str                       # "free", "row", "lin" or "mixed"
    axis: int | None = None        # the batch axis of a "row" node
    why: str | None = None         # why a "mixed" node is not separable
    source: Node | None = None     # "lin": a batch reduction it is built on


FREE = Kind("free")


def row(axis: int) -> Kind:
    return Kind(ROW_TAG, axis=axis)


class Mixed(Exception):
    """Raised by a rule: ``node`` mixes rows of the batch, and ``why`` ends the refusal."""

    def __init__(self, node: Node, why: str):
        self.node, self.why = node, why


def what(node: Node) -> str:
    """A few words for a node: 'mean over axis 0', 'max_pool2d', 'x[::-1]'."""
    if node.op in ("sum", "mean", "max"):
        axes = node.attrs["axes"]
        return f"{node.op} over axis {axes[0] if len(axes) == 1 else axes}"
    if node.op == "ew":
        return node.attrs.get("label", "elementwise")
    return node.op


# ----- rules shared by several ops ---------------------------------------------------------
def free_or_refuse(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """The rule of an op that declares none: batch-free when no operand sees the batch,
    else refused (when in doubt, refuse).  Ops whose rule covers only batch rows in
    their first operand end with it too."""
    if all(j.tag == "free" for j in kinds):
        return FREE
    if kinds[0].tag != ROW_TAG:
        if any(j.tag == LIN_TAG for j in kinds):
            raise Mixed(node, f"applies {node.op} to a sum or mean over the batch")
        raise Mixed(node, "takes the batch in an operand it does not keep apart")
    raise Mixed(node, f"applies '{node.op}', which backcomp does not know to keep rows of the batch apart")


def same_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """The value itself under another name (identity, stop_gradient)."""
    return kinds[0]


def rows_or_free(node: Node, kinds: list[Kind], dim: str) -> Kind:
    """A function of each row alone of the first operand (ones_like, one_hot of ids)."""
    return kinds[0] if kinds[0].tag == ROW_TAG else FREE
