"""backcomp: a symbolic-to-code gradient compiler.

Declare a model as a DAG of ops (a TOML spec or the ``Graph`` builder); backcomp
derives the vector-Jacobian product of every node and writes a standalone NumPy
module with ``init_params``, ``forward`` and ``value_and_grad``.
"""
__version__ = "0.1.0"

from backcomp import ops  # noqa: E402
from backcomp.graph import Graph, GraphError, ShapeError  # noqa: E402
from backcomp.compiler import build, compile_source, write_module  # noqa: E402

__all__ = ["Graph", "GraphError", "ShapeError", "ops", "build", "compile_source", "write_module", "__version__"]
