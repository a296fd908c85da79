"""Identity-like ops: ``stop_gradient`` and ``identity``, ``ones_like`` and ``zeros_like``.

stop_gradient and identity are their input under another name (printed in their
readers, never a statement of their own): stop_gradient has no derivative by
definition, identity passes ḡ and the tangent through.  ones_like and zeros_like are
constants of x's shape: the seed cotangent of the loss, the gradient of an unused
param.
"""
from __future__ import annotations

import sympy as sp

from backcomp.graph import Node
from backcomp.ops.batch_axis import rows_or_free, same_kind
from backcomp.ops.common import _apply, _batched_as_is, _one, _same, linear_jvp
from backcomp.ops.registry import OpDef, register_op
from backcomp import notation
from backcomp.ops.signature import UNARY, spec_function


def _another_name(node, readers):
    return ""


register_op(OpDef("stop_gradient", lambda ins, attrs: (ins[0].shape, ins[0].dtype), _one("{0}"), None,
                  memory="view", inline=_another_name, separability=same_kind, bound="element",
                  no_derivative="zero by definition: no gradient or tangent flows through it",
                  explain=lambda node, args, scalars: notation.opaque(
                      "stop_gradient", "stop_gradient({0})", r"\operatorname{{sg}}\left({0}\right)", True)(args[0]),
                  doc="identity forward, zero cotangent", signature="stop_gradient(x)"))
register_op(OpDef("identity", lambda ins, attrs: (ins[0].shape, ins[0].dtype), _one("{0}"),
                  lambda node, ct: [ct], jvp=linear_jvp, memory="view", inline=_another_name, explain=_same,
                  separability=same_kind, bound="element", batched=_batched_as_is,
                  doc="a second name for a value (compiler-internal)"))


register_op(OpDef("ones_like", lambda ins, attrs: (ins[0].shape, "float"), _one("np.ones_like({0})"), None,
                  no_derivative="a constant: its value does not depend on x's",
                  separability=rows_or_free, bound="one", batched=_batched_as_is,
                  explain=lambda node, args, scalars: sp.Integer(1),
                  doc="ones of x's shape and dtype: the seed cotangent of the loss (compiler-internal)"))
register_op(OpDef("zeros_like", lambda ins, attrs: (ins[0].shape, "float"), _one("np.zeros_like({0})"), None,
                  no_derivative="a constant: its value does not depend on x's",
                  separability=rows_or_free, bound="zero", batched=_batched_as_is,
                  explain=lambda node, args, scalars: sp.Integer(0),
                  doc="zeros of x's shape and dtype: the gradient of an unused param (compiler-internal)"))


@spec_function(*UNARY)
def stop_gradient(x: Node) -> Node:
    """x in the forward; no gradient flows back through it."""
    return _apply("stop_gradient", (x,))


def identity(x: Node) -> Node:
    return _apply("identity", (x,))


__all__ = ["stop_gradient", "identity"]
