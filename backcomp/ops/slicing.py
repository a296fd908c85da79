"""Basic indexing (``x[i, a:b:c, None, ...]``), its VJP ``scatter``, and ``concatenate``.

getitem is NumPy's basic indexing (ints, slices with steps, None, one Ellipsis) and a
view.  Its VJP writes ḡ into zeros of the input's shape at the same index
(``scatter``, compiler-internal), whose VJP is that getitem again; an index that only
adds axes is undone by a reshape.  ``x[:T]``, T a symbolic dim, is checked against the
axis when the module runs.  concatenate's VJP slices ḡ back into each operand's part
of the axis.  Gathering by integer ids (take, embedding, one_hot) is ``indexing``.
"""
from __future__ import annotations

from typing import Sequence

from backcomp import notation
from backcomp.graph import Graph, GraphError, Node, Shape, ShapeError, format_shape
from backcomp.ops.batch_axis import ROW_TAG, Kind, Mixed, free_or_refuse, row
from backcomp.ops.common import _apply, _batched_with, linear_jvp, normalize_axes, shape_code
from backcomp.ops.layout import _shape_after_steps, reshape
from backcomp.ops.registry import OpDef, register_op
from backcomp.ops.signature import Param, spec_function


# ----- getitem and scatter --------------------------------------------------------
def _index_code(index: tuple) -> str:
    parts = []
    for item in index:
        if item is None:
            parts.append("None")
        elif item is Ellipsis:
            parts.append("...")
        elif isinstance(item, slice):
            s = "" if item.start is None else str(item.start)
            s += ":" + ("" if item.stop is None else str(item.stop))
            if item.step is not None:
                s += ":" + str(item.step)
            parts.append(s)
        else:
            parts.append(str(item))
    return ", ".join(parts) if len(parts) != 1 or parts[0] in ("None", "...") or ":" in parts[0] else parts[0]


def _indexed_axes(index: tuple) -> int:
    """How many axes of the array an index consumes (None and ... consume none)."""
    return len([i for i in index if i is not None and i is not Ellipsis])


def normalize_index(index, shape: Shape) -> tuple:
    """Validate a basic index (ints, slices, None, one Ellipsis) against ``shape``."""
    index = index if isinstance(index, tuple) else (index,)
    for item in index:
        ok = item is None or item is Ellipsis or (isinstance(item, int) and not isinstance(item, bool))
        if isinstance(item, slice):
            ok = all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (item.start, item.stop, item.step))
            if isinstance(item.stop, str) and item.stop.isidentifier() and item.start in (None, 0) and item.step is None:
                ok = True   # x[:T]: the first T entries, T a symbolic dim
            if item.step == 0:
                raise ShapeError("index: slice step cannot be zero")
        if not ok:
            raise ShapeError(f"index: only integers, slices, None and ... are allowed, got {item!r}")
    if list(index).count(Ellipsis) > 1:
        raise ShapeError("index: at most one '...' is allowed")
    n_axes = _indexed_axes(index)
    if n_axes > len(shape):
        raise ShapeError(f"index: too many indices for an array of shape {format_shape(shape)}")
    return index


def _getitem_infer(inputs, attrs):
    (x,) = inputs
    index = attrs["index"]
    n_axes = _indexed_axes(index)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        full = index[:k] + (slice(None),) * (x.ndim - n_axes) + index[k + 1:]
    else:
        full = index + (slice(None),) * (x.ndim - n_axes)
    out = []
    axis = 0
    for item in full:
        if item is None:
            out.append(1)
            continue
        d = x.shape[axis]
        axis += 1
        if isinstance(item, int):
            if isinstance(d, int) and not -d <= item < d:
                raise ShapeError(f"index {item} is out of bounds for axis {axis - 1} with size {d}")
            continue
        if isinstance(item.stop, str):
            out.append(item.stop)   # checked against d when the module runs (_dim_slice_checks)
            continue
        if isinstance(d, str):
            if item.start is None and item.stop is None and item.step in (None, 1, -1):
                out.append(d)
                continue
            raise ShapeError(f"index: cannot slice symbolic dimension {d} except with ':' or '::-1'")
        n = len(range(*item.indices(d)))
        if n == 0:
            raise ShapeError(f"index: slice {_index_code((item,))} of axis {axis - 1} (size {d}) is empty")
        out.append(n)
    return tuple(out), x.dtype


def _only_adds_axes(index: tuple) -> bool:
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in index)


def _getitem_vjp(node, ct):
    x = node.inputs[0]
    if _only_adds_axes(node.attrs["index"]):
        return [reshape(ct, x.shape)]
    return [_apply("scatter", (ct,), index=node.attrs["index"], shape=x.shape)]


def _dim_slice_checks(node: Node, x: Node) -> list[str]:
    """``x[:T]`` with T a dim bound by the inputs: T must not exceed the axis (NumPy would
    silently give fewer entries, and the error would surface far away)."""
    index = node.attrs["index"]
    n_axes = _indexed_axes(index)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (x.ndim - n_axes) + index[k + 1:]
    lines, axis = [], 0
    for item in index:
        if item is None:
            continue
        d = x.shape[axis]
        if isinstance(item, slice) and isinstance(item.stop, str) and item.stop != d:
            lines += [f"if {item.stop} > {d}:",
                      f"    raise ValueError(f\"{item.stop}={{{item.stop}}} exceeds {d}, the size of axis {axis} of "
                      f"a {format_shape(x.shape)} value sliced [:{item.stop}]\")"]
        axis += 1
    return lines


def _getitem_emit(node, args, out):
    return _dim_slice_checks(node, node.inputs[0]) + [f"{out} = {args[0]}[{_index_code(node.attrs['index'])}]"]


def _index_axis(node: Node, axis: int) -> int:
    """Where input axis ``axis`` goes through basic indexing, if it is taken whole."""
    index, x = node.attrs["index"], node.inputs[0]
    consumed = len([i for i in index if i is not None and i is not Ellipsis])
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (x.ndim - consumed) + index[k + 1:]
    else:
        index = index + (slice(None),) * (x.ndim - consumed)
    src = out = 0
    for item in index:
        if item is None:
            out += 1
            continue
        if src == axis:
            if isinstance(item, slice) and item.start is None and item.stop is None and item.step in (None, 1):
                return out
            raise Mixed(node, "selects or reorders rows of the batch")
        src += 1
        out += 0 if isinstance(item, int) else 1
    raise AssertionError("unreachable: the batch axis is within the index")


def _getitem_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    if any(isinstance(i, slice) and i.stop == dim for i in node.attrs["index"]):
        raise Mixed(node, f"takes the first {dim} entries of a value: a chunk would take the first rows again")
    k = kinds[0]
    return row(_index_axis(node, k.axis)) if k.tag == ROW_TAG else k


def _index_after_steps(attrs: dict, length) -> dict:
    return dict(attrs, index=(slice(None),) + tuple(attrs["index"]))


def _getitem_explain(node, args, scalars):
    """``z[:, 128:256]`` (LaTeX ``z_{[:, 128:256]}``), as the spec writes it."""
    code = _index_code(node.attrs["index"])
    return notation.opaque(f"getitem[{code}]", "{0}[" + code + "]", "{{{0}}}_{{[" + code + "]}}",
                           atom=True, wrap=True)(*args)


register_op(OpDef("getitem", _getitem_infer, _getitem_emit, _getitem_vjp, jvp=linear_jvp, memory="view",
                  explain=_getitem_explain, doc="basic NumPy indexing: ints, slices with steps, None, ...",
                  separability=_getitem_kind, bound="element", batched=_batched_with(_index_after_steps),
                  signature="x[i, a:b:c, None, ...]"))


def _scatter_emit(node, args, out):
    return [f"{out} = np.zeros({shape_code(node.shape)}, dtype={args[0]}.dtype)",
            f"{out}[{_index_code(node.attrs['index'])}] = {args[0]}"]


def _scatter_after_steps(attrs: dict, length) -> dict:
    return _shape_after_steps(_index_after_steps(attrs, length), length)


def _scatter_explain(node, args, scalars):
    """``scatter(x, [:, 128:256], (B, 512))``: zeros of that shape with x at the index."""
    code, shape = _index_code(node.attrs["index"]), format_shape(node.shape)
    return notation.opaque(f"scatter[{code}]{shape}", "scatter({0}, [" + code + "], " + shape + ")",
                           r"\operatorname{{scatter}}_{{[" + code + r"] \to " + shape + "}}({0})", atom=True)(*args)


register_op(OpDef("scatter", lambda ins, attrs: (attrs["shape"], ins[0].dtype), _scatter_emit,
                  lambda node, ct: [getitem(ct, node.attrs["index"])], jvp=linear_jvp, explain=_scatter_explain,
                  batched=_batched_with(_scatter_after_steps),
                  doc="zeros with x written at an index: the VJP of indexing (compiler-internal)"))


def getitem(x: Node, index) -> Node:
    """Basic indexing ``x[index]``."""
    return _apply("getitem", (x,), index=normalize_index(index, x.shape))


# ----- concatenate ----------------------------------------------------------------
def _concat_infer(inputs, attrs):
    axis = attrs["axis"]
    first = inputs[0].shape
    total = 0
    for x in inputs:
        if x.ndim != len(first) or any(d != e for i, (d, e) in enumerate(zip(x.shape, first)) if i != axis):
            raise ShapeError(f"concatenate: shapes {' and '.join(format_shape(n.shape) for n in inputs)} "
                             f"differ outside axis {axis}")
        if isinstance(x.shape[axis], str):
            raise ShapeError(f"concatenate: cannot join along symbolic dimension {x.shape[axis]}")
        total += x.shape[axis]
    return first[:axis] + (total,) + first[axis + 1:], "float"


def _concat_vjp(node, ct):
    axis = node.attrs["axis"]
    cts, start = [], 0
    for x in node.inputs:
        stop = start + x.shape[axis]
        cts.append(getitem(ct, (slice(None),) * axis + (slice(start, stop),)))
        start = stop
    return cts


def _concat_jvp(node, tangents):
    """Linear: the tangents joined, zeros standing for inputs without one."""
    if all(t is None for t in tangents):
        return None
    parts = [t if t is not None else _apply("zeros_like", (x,)) for x, t in zip(node.inputs, tangents)]
    return _apply("concatenate", parts, **node.attrs)


def _concat_kind(node: Node, kinds: list[Kind], dim: str) -> Kind:
    k = kinds[0]
    if k.tag != ROW_TAG:
        return k if all(j.tag == k.tag for j in kinds) else free_or_refuse(node, kinds, dim)
    if any(j != k for j in kinds) or node.attrs["axis"] == k.axis:
        raise Mixed(node, "joins the batch with other values")
    return k


def _concat_batched(g: Graph, node: Node, ins: list[Node], stacked: list[bool], length) -> Node:
    """Every operand needs the steps' axis, or the joined axis would differ between them."""
    if not all(stacked):
        raise GraphError("concatenate of batched and unbatched values")
    return g.apply("concatenate", ins, **dict(node.attrs, axis=node.attrs["axis"] + 1))


register_op(OpDef("concatenate", _concat_infer,
                  lambda node, args, out: [f"{out} = np.concatenate(({', '.join(args)},), axis={node.attrs['axis']})"],
                  _concat_vjp, jvp=_concat_jvp, doc="join arrays along an existing axis",
                  separability=_concat_kind, bound="any_input", batched=_concat_batched,
                  signature="concatenate((a, b), axis=0)"))


@spec_function(Param("arrays", "arrays"), Param("axis", "int", False, 0))
def concatenate(arrays: Sequence[Node], axis: int = 0) -> Node:
    arrays = tuple(arrays)
    if not arrays:
        raise GraphError("concatenate: needs at least one array")
    (axis,) = normalize_axes(axis, arrays[0].ndim, "concatenate")
    return _apply("concatenate", arrays, axis=axis)


__all__ = ["getitem", "concatenate"]
