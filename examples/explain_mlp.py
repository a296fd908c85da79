"""Derivatives as math: what `backcomp explain` says about the MLP of examples/mlp.toml.

A notebook in script form (each ``# %%`` is a cell; run it top to bottom, or
open it as a notebook in VS Code or Jupytext).  It prints the spec, then for
every node its forward expression and the VJP backcomp derived for each input,
first as text, then the chain from the loss down to ``W1`` alone, and then as
LaTeX, ready to paste between ``\\begin{align*}`` lines.  The same output comes
from the command line::

    backcomp explain examples/mlp.toml [--wrt W1] [--latex]
"""
# %% The spec: a softmax-cross-entropy MLP with an L2 penalty on W1.
from pathlib import Path

from backcomp.explain import explain
from backcomp.spec import load_spec

spec = Path(__file__).resolve().parent / "mlp.toml"
print(spec.read_text())
graph = load_spec(spec)

# %% Every node, as text.  ḡ_v is the cotangent ∂loss/∂v; W1 is used twice (in z1
# and in the penalty), so its cotangent sums one term from each consumer.
print(explain(graph))

# %% Only the chain from the loss down to W1: `backcomp explain examples/mlp.toml --wrt W1`.
print(explain(graph, wrt="W1"))

# %% The same derivatives as LaTeX: `backcomp explain examples/mlp.toml --latex`.
print(explain(graph, latex=True))
