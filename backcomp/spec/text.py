"""Where things are in a spec's raw text, and the errors that point there.

tomllib reports no positions, so ``Locator`` finds sections, keys and values in the
raw text; a column inside an expression is the string's start column plus the ast
node's offset.  The hostile-input limits live here too: they bound what is read.
"""
from __future__ import annotations

import difflib
import re

#: hostile-input guards
MAX_EXPR_CHARS = 10_000
MAX_NESTING = 64          # brackets inside one expression
MAX_AST_DEPTH = 200       # e.g. a + a + ... + a chains
MAX_PARAM_ELEMENTS = 10 ** 9
MAX_SPEC_BYTES = 5_000_000

SECTIONS = ("model", "inputs", "params", "buffers", "constants", "functions", "steps", "graph")
MODEL_KEYS = ("name", "loss", "outputs", "wrt")
DTYPES = {"float": "float", "float32": "float", "float64": "float",
          "int": "int", "int32": "int", "int64": "int"}


class SpecError(ValueError):
    """A problem in a spec file, located at ``path:line:col``."""

    def __init__(self, path: str, line: int | None, col: int | None, message: str):
        self.path, self.line, self.col, self.message = str(path), line, col, message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        return f"{where}: error: {self.message}"


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----- where things are in the raw text ----------------------------------------------
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-]+)\s*=\s*""")


class Locator:
    """Line and column (1-based) of sections, keys and values in the TOML text."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.sections: dict[str, tuple[int, int]] = {}
        self.keys: dict[tuple[str, str], tuple[int, int, int]] = {}
        section = ""
        in_multiline = False
        for i, raw in enumerate(self.lines, 1):
            if in_multiline:
                if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                    in_multiline = False
                continue
            m = _HEADER.match(raw)
            if m and not raw.lstrip().startswith("[["):
                section = m.group(1).strip().strip('"')
                self.sections.setdefault(section, (i, raw.index("[") + 1))
                continue
            m = _KEY.match(raw)
            if m:
                key = m.group(1)
                if key[0] in "\"'":
                    key = key[1:-1]
                self.keys.setdefault((section, key), (i, m.start(1) + 1, m.end() + 1))
                rest = raw[m.end():]
                if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                    in_multiline = True

    def section(self, name: str) -> tuple[int | None, int | None]:
        return self.sections.get(name, (None, None))

    def key(self, section: str, key: str) -> tuple[int | None, int | None]:
        if (section, key) in self.keys:
            line, col, _ = self.keys[(section, key)]
            return line, col
        return self.section(section)

    def value(self, section: str, key: str, sub: str | None = None) -> tuple[int | None, int | None]:
        """Where the value of ``key`` (or of ``sub`` in its inline table) starts."""
        if (section, key) not in self.keys:
            return self.section(section)
        line, col, vcol = self.keys[(section, key)]
        if sub is not None:
            m = re.compile(rf"""(?:\b|["']){re.escape(sub)}["']?\s*=\s*""").search(self.lines[line - 1], vcol - 1)
            if m:
                return line, m.end() + 1
            return line, col
        return line, vcol

    def string_start(self, line: int | None, col: int | None) -> tuple[int | None, int | None]:
        """Where a string's contents start, given where its opening quote is."""
        if line is None or col is None:
            return line, col
        text = self.lines[line - 1]
        head = text[col - 1:col + 2]
        if head in ('"""', "'''"):
            if text[col + 2:].strip() == "":
                return line + 1, 1
            return line, col + 3
        if head[:1] in ("'", '"'):
            return line, col + 1
        return line, col

def toml_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__

