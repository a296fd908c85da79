"""Optimisation passes, each a function Graph -> Graph, run in order by ``optimize``."""
from __future__ import annotations

from backcomp.graph import Graph
from backcomp.passes.cse import eliminate_common_subexpressions
from backcomp.passes.dce import eliminate_dead_code
from backcomp.passes.fuse import fuse_elementwise

PIPELINE = (eliminate_dead_code, eliminate_common_subexpressions, fuse_elementwise,
            eliminate_common_subexpressions)


def optimize(graph: Graph) -> Graph:
    """The default (-O1) pipeline."""
    for run in PIPELINE:
        graph = run(graph)
    return graph
