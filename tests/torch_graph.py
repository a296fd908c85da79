"""A backcomp graph evaluated by PyTorch, op by op: an independent reference.

Only the forward *meaning* of each op is written here (elementwise expressions are
walked into torch calls, structural ops call their torch counterparts); derivatives
of any order then come from ``torch.func`` and never from backcomp's rules, so
comparing backcomp's ``jvp``/``hvp``/``grad`` nodes with these checks the rules.
"""
from __future__ import annotations

import numpy as np
import sympy as sp
import torch
import torch.nn.functional as F
from sympy.codegen.cfunctions import expm1, log1p

from backcomp.graph import Graph, Node
from backcomp.ops.elementwise import arg_symbol, node_expr
from backcomp.ops.registry import get_op
from backcomp.ops.scalar import half_step, sigmoid, softplus, tie_max, tie_min

_UNARY = {sp.exp: torch.exp, sp.log: torch.log, sp.tanh: torch.tanh, sp.sin: torch.sin, sp.cos: torch.cos,
          sp.erf: torch.erf, sp.Abs: torch.abs, sigmoid: torch.sigmoid, log1p: torch.log1p, expm1: torch.expm1,
          softplus: lambda x: torch.logaddexp(torch.zeros_like(x), x)}
_RELATIONS = {sp.StrictGreaterThan: torch.gt, sp.StrictLessThan: torch.lt, sp.GreaterThan: torch.ge,
              sp.LessThan: torch.le, sp.Equality: torch.eq}


def scalar(expr: sp.Expr, env: dict):
    """A SymPy expression over the node's arg symbols as torch operations."""
    if expr in env:
        return env[expr]
    if expr.is_Number:
        return float(expr)
    args = [scalar(a, env) for a in expr.args] if not isinstance(expr, sp.Piecewise) else None
    if isinstance(expr, sp.Add):
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if isinstance(expr, sp.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(expr, sp.Pow):
        return args[0] ** args[1]
    if isinstance(expr, (sp.Max, tie_max)):
        return torch.maximum(*torch.broadcast_tensors(*[torch.as_tensor(a, dtype=torch.float64) for a in args]))
    if isinstance(expr, (sp.Min, tie_min)):
        return torch.minimum(*torch.broadcast_tensors(*[torch.as_tensor(a, dtype=torch.float64) for a in args]))
    if isinstance(expr, sp.Heaviside):
        return (args[0] > 0).to(torch.float64)
    if isinstance(expr, half_step):
        return torch.heaviside(torch.as_tensor(args[0], dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    if isinstance(expr, sp.Piecewise):
        out = scalar(expr.args[-1].expr, env)
        for piece in reversed(expr.args[:-1]):
            out = torch.where(scalar(piece.cond, env), scalar(piece.expr, env), out)
        return out
    for cls, fn in _RELATIONS.items():
        if isinstance(expr, cls):
            return fn(torch.as_tensor(args[0]), torch.as_tensor(args[1]))
    fn = _UNARY.get(type(expr)) or _UNARY.get(expr.func)
    if fn is None:
        raise NotImplementedError(f"no torch reference for {expr.func}")
    return fn(torch.as_tensor(args[0]))


def evaluate(graph: Graph, params: dict, inputs: dict, nodes: list[Node]) -> list:
    """The values of ``nodes`` given torch tensors for the graph's params and inputs."""
    dims = {d: inputs[src].shape[axis] for d, (src, axis) in graph.dims.items()}
    val: dict[Node, object] = {}
    for n in graph.nodes:
        if n.op == "param":
            val[n] = params[n.name]
        elif n.op == "input":
            val[n] = inputs.get(n.name)
        else:
            val[n] = _op(n, [val[x] for x in n.inputs], dims)
    return [val[n] for n in nodes]


def _shape(shape, dims):
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)


def _op(n: Node, a: list, dims: dict):
    op, at = n.op, n.attrs
    if get_op(op).elementwise:
        out = scalar(node_expr(n), {arg_symbol(i): x for i, x in enumerate(a)})
        return torch.as_tensor(out, dtype=torch.float64).expand(_shape(n.shape, dims)) \
            if n.dtype == "float" else out
    if op == "matmul":
        return a[0] @ a[1]
    if op == "einsum":
        return torch.einsum(at["subscripts"], *a)
    if op in ("sum", "mean", "max"):
        if not at["axes"]:
            return a[0]
        fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[op]
        return fn(a[0], dim=at["axes"], keepdim=at["keepdims"])
    if op == "transpose":
        return a[0].permute(*at["axes"])
    if op == "reshape":
        return a[0].reshape(_shape(at["shape"], dims))
    if op == "sum_to":   # (made by grad nodes) undo broadcasting: sum the broadcast axes
        from backcomp.ops.layout import sum_to_axes
        axes, _ = sum_to_axes(n.inputs[0].shape, n.shape)
        return a[0].sum(dim=axes, keepdim=True).reshape(_shape(n.shape, dims)) if axes else a[0]
    if op == "broadcast_to":
        return a[0].expand(_shape(at["shape"], dims))
    if op == "getitem":
        return a[0][at["index"]]
    if op == "concatenate":
        return torch.cat(a, dim=at["axis"])
    if op == "stop_gradient":
        return a[0].detach()
    if op == "identity":
        return a[0]
    if op == "take_label":
        return torch.gather(a[0], -1, a[1][..., None])[..., 0]
    if op == "im2col":   # conv2d's columns, kept so the graph stays whole (conv2d reads x itself)
        x, (kh, kw) = a[0], at["kernel"]
        cols = F.unfold(x, (kh, kw), dilation=at.get("dilation", 1), padding=at["padding"], stride=at["stride"])
        cols = cols.reshape(x.shape[0], x.shape[1], kh, kw, *n.shape[4:])
        return cols.permute(1, 2, 3, 0, 4, 5) if at.get("channels_first") else cols
    if op == "conv2d":
        return F.conv2d(a[0], a[1], stride=at["stride"], padding=at["padding"], dilation=at.get("dilation", 1),
                        groups=at.get("groups", 1))
    if op == "conv_transpose2d":
        return F.conv_transpose2d(a[0], a[1], stride=at["stride"], padding=at["padding"],
                                  output_padding=at.get("output_padding", 0), groups=at.get("groups", 1),
                                  dilation=at.get("dilation", 1))
    if op == "max_pool2d":
        return F.max_pool2d(a[0], at["size"], at["stride"], padding=at.get("padding", 0))
    if op == "avg_pool2d":
        return F.avg_pool2d(a[0], at["size"], at["stride"], padding=at.get("padding", 0))
    if op == "ones_like":
        return torch.ones_like(a[0], dtype=torch.float64)
    if op == "zeros_like":
        return torch.zeros_like(a[0], dtype=torch.float64)
    if op == "full":
        return torch.full(_shape(n.shape, dims), at["value"], dtype=torch.float64)
    if op == "take":
        ax = at.get("axis", 0)
        ids = torch.remainder(a[1], a[0].shape[ax])   # np.take's negative ids count from the end
        flat = a[0].index_select(ax, ids.reshape(-1))
        return flat.reshape(a[0].shape[:ax] + ids.shape + a[0].shape[ax + 1:])
    if op == "scan":   # a Python loop over the step graph, as the generated module runs it
        step = at["step"]
        c, x, _ = step.counts()
        carry, seqs, consts = list(a[:c]), a[c:c + x], list(a[c + x:])
        length = seqs[0].shape[0]
        ys = [[None] * length for _ in step.ys]
        sums = [0 for _ in step.sums]
        for t in (range(length - 1, -1, -1) if at.get("reverse") else range(length)):
            vals = dict(zip(step.leaves, carry + [s[t] for s in seqs] + consts))
            for m in step.graph.nodes:
                if m not in vals:
                    vals[m] = _op(m, [vals[i] for i in m.inputs], dims)
            carry = [vals[o] for o in step.carry_out]
            for j, o in enumerate(step.ys):
                ys[j][t] = vals[o]
            sums = [acc + vals[o] for acc, o in zip(sums, step.sums)]
        return tuple(carry) + tuple(torch.stack(y) for y in ys) + tuple(sums)
    if op == "scan_out":
        return a[0][at["index"]]
    raise NotImplementedError(f"no torch reference for op '{op}'")


def tensors(arrays: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def loss_fn(graph: Graph, inputs: dict, wrt: tuple[str, ...], params: dict):
    """f(wrt params as a dict) -> the loss, the other params and the inputs held fixed."""
    fixed = {k: v for k, v in params.items() if k not in wrt}

    def f(p):
        return evaluate(graph, {**fixed, **p}, inputs, [graph.loss_node])[0]
    return f
