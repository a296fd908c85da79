"""TOML spec -> Graph, with a safe ``ast``-based expression parser.

A spec declares a model in sections ([model], [inputs], [params], [constants],
[functions], [graph]); docs/spec.md is the reference.  Expressions are parsed by
``ast.parse`` and walked against a whitelist: nothing in a spec is ever handed to
``eval``, ``exec``, ``sympify`` or ``parse_expr``.  ``[functions]`` bodies are
walked the same way into SymPy expressions, so their derivatives are derived.

Every error is a ``SpecError`` that names the place, compiler style:
``mlp.toml:14:12: error: unknown function 'relux' in node 'h1' (did you mean 'relu'?)``.
tomllib reports no positions, so ``Locator`` finds keys and values in the raw
text, and a column inside an expression is the string's start column plus the
ast node's offset.

The package: ``text`` (locations, errors, limits), ``expressions`` (the expression
walker), ``functions`` ([functions] bodies), ``loader`` (the sections, the Graph).
"""
from backcomp.spec.expressions import SPEC_OPS, parse_expression
from backcomp.spec.loader import load_spec, ops_table_markdown, parse_spec, read_spec_text
from backcomp.spec.text import SpecError

__all__ = ["SpecError", "load_spec", "parse_spec", "read_spec_text", "SPEC_OPS", "parse_expression",
           "ops_table_markdown"]
