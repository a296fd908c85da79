"""Optimisation passes, each a function Graph -> Graph, run in ``optimize``."""
from __future__ import annotations

from backcomp.graph import Graph


def optimize(graph: Graph) -> Graph:
    """The default pipeline."""
    return graph
