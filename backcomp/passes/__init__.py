"""Optimisation passes, each a function Graph -> Graph, run in order by ``optimize``."""
from __future__ import annotations

from functools import partial

from backcomp.graph import Graph
from backcomp.passes.cse import eliminate_common_subexpressions
from backcomp.passes.dce import eliminate_dead_code
from backcomp.passes.fuse import fuse_elementwise
from backcomp.passes.gemm import flatten_batched_gemms
from backcomp.passes.loops import optimize_loops
from backcomp.passes.pools import pool_before_activation
from backcomp.passes.reductions import hoist_constant_factors, merge_reductions
from backcomp.passes.residuals import keep_residuals
from backcomp.passes.reuse import reuse_values
from backcomp.passes.stability import Finding, stabilize


def prepare_forward(graph: Graph, findings: list[Finding] | None = None) -> Graph:
    """Before differentiation: fuse forward chains and rewrite them stably.

    Fusing first lets the VJP pass differentiate whole chains at once, so SymPy
    sees ``softplus(z) − y·z`` rather than pieces, and stable rewrites such as
    ``log(1 + exp(u))`` → ``softplus(u)`` reach the backward too.  Last, calls the
    backward would repeat (erf in GELU) become nodes of their own (``keep_residuals``).
    A max pool goes before the activation it commutes with, so the activation and its
    backward run on the pooled values (``pool_before_activation``).
    """
    for run in (eliminate_common_subexpressions, merge_reductions, fuse_elementwise, pool_before_activation,
                partial(stabilize, findings=findings), keep_residuals):
        graph = run(graph)
    return graph


def optimize(graph: Graph) -> Graph:
    """After differentiation (-O1): CSE across forward and backward, fusion, reuse of
    values fused expressions would recompute, DCE."""
    for run in (optimize_loops, eliminate_dead_code, flatten_batched_gemms, eliminate_common_subexpressions, fuse_elementwise,
                hoist_constant_factors, fuse_elementwise, eliminate_common_subexpressions, reuse_values):
        graph = run(graph)
    return graph
