"""The ``backcomp`` command: compile, explain, check and graph a model spec.

Exit codes: 0 success, 1 a gradient check failed, 2 a user error (bad spec, bad
arguments, unreadable or protected file), 3 an internal error.  User errors print
one ``file:line:col: error: ...`` line on stderr, never a traceback; set
BACKCOMP_DEBUG=1 to see the traceback of an internal error.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from backcomp import __version__

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER, EXIT_INTERNAL = 0, 1, 2, 3

EPILOG = """\
examples:
  backcomp compile examples/mlp.toml -o mlp.py      write mlp.py (forward, value_and_grad)
  backcomp compile examples/mlp.toml --optimizer adam --emit-test
  backcomp explain examples/xor.toml                 the VJP of every node, as math
  backcomp explain examples/mlp.toml --wrt W1        the chain from the loss down to W1
  backcomp check examples/mlp.toml --batch 4         gradients vs finite differences
  backcomp graph examples/mlp.toml -o mlp.svg        the DAG (SVG/PNG need Graphviz `dot`)

exit codes: 0 ok, 1 a check failed, 2 a user error, 3 an internal error
the spec format: docs/spec.md
"""


class UserError(Exception):
    """An error to report as one line and exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"backcomp: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="backcomp", description="backcomp: a symbolic-to-code gradient compiler. "
                "Compiles a model spec (TOML) into a standalone NumPy module with forward and "
                "backward functions.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"backcomp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compile", help="write the NumPy module for a spec",
                       description="Compile SPEC into a standalone NumPy module (written atomically).")
    c.add_argument("spec", metavar="SPEC")
    c.add_argument("-o", "--output", metavar="OUT.py", help="output file (default: <model name>.py here)")
    c.add_argument("--force", action="store_true", help="replace OUT.py even if backcomp did not write it")
    c.add_argument("-O0", dest="opt_level", action="store_const", const=0, default=1,
                   help="no optimisation passes (one statement per node)")
    c.add_argument("-O1", dest="opt_level", action="store_const", const=1, help="optimise (the default)")
    c.add_argument("--optimizer", choices=("sgd", "momentum", "adam"),
                   help="also generate init_state() and train_step()")
    c.add_argument("--check-finite", action="store_true", help="raise at the first NaN/Inf a node produces")
    c.add_argument("--report", action="store_true", help="print a numerical-stability report")
    c.add_argument("--emit", metavar="jvp,hvp", type=_emit_list, default=(),
                   help="also emit jvp(params, inputs, tangents) and/or hvp(params, inputs, v)")
    c.add_argument("--emit-test", action="store_true",
                   help="also write test_<name>.py: a pytest gradient check using only numpy")

    e = sub.add_parser("explain", help="print each node's forward expression and derived VJPs",
                       description="Print, for each node, its forward expression and the VJP for each input.")
    e.add_argument("spec", metavar="SPEC")
    e.add_argument("--wrt", metavar="PARAM", help="only the chain from the loss down to PARAM")
    e.add_argument("--node", metavar="NODE", help="only this node")
    e.add_argument("--latex", action="store_true", help="print LaTeX instead of text")

    k = sub.add_parser("check", help="compare gradients with finite differences",
                       description="Compile in memory and compare value_and_grad with central finite "
                                   "differences in float64, at the spec's own inits (init_params(seed)) and "
                                   "random inputs: per element and along random directions, with a tolerance "
                                   "derived from the step (see backcomp/check.py). Exits 1 on failure.")
    k.add_argument("spec", metavar="SPEC")
    k.add_argument("--batch", type=_positive_int, default=3, metavar="N", help="size of symbolic dims (default 3)")
    k.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    k.add_argument("--perturb", type=_scale, default=0.0, metavar="SCALE",
                   help="add SCALE·N(0,1) to every param (default 0: the inits themselves)")
    k.add_argument("--jitter", type=_scale, default=0.01, metavar="SCALE",
                   help="add SCALE·N(0,1) to params with a constant init such as zeros, where a wrong "
                        "gradient can hide (default 0.01; 0 checks exactly at the inits)")
    k.add_argument("--max-elements", type=_positive_int, default=200, metavar="N",
                   help="entries checked per param, sampled (default 200)")

    g = sub.add_parser("graph", help="print the DAG as Graphviz DOT (or write SVG/PNG)",
                       description="The forward DAG (with --backward, also the backward) as Graphviz DOT.")
    g.add_argument("spec", metavar="SPEC")
    g.add_argument("--backward", action="store_true", help="include the backward nodes")
    g.add_argument("-o", "--output", metavar="FILE", help="write here; .svg/.png run Graphviz `dot`")
    return p


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _scale(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


# ----- commands -------------------------------------------------------------------------
def _load(spec: str):
    from backcomp.spec import load_spec
    return load_spec(Path(spec))


def _emit_list(text: str) -> tuple[str, ...]:
    """--emit jvp,hvp: the extra functions, checked here so a typo is a usage error (exit 2)."""
    from backcomp.compiler import parse_emit
    try:
        return parse_emit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_compile(args) -> int:
    from backcomp.compiler import OverwriteError, atomic_write, compile_model
    start = time.perf_counter()
    graph = _load(args.spec)
    out = Path(args.output) if args.output else Path(f"{graph.name}.py")
    if out.suffix != ".py":
        raise UserError(f"{out}: error: the output must be a .py file")
    if not out.parent.is_dir() if str(out.parent) else False:
        raise UserError(f"{out}: error: directory {out.parent} does not exist")
    module_name = out.stem
    if not module_name.isidentifier():
        raise UserError(f"{out}: error: '{module_name}' is not importable; choose an identifier file name")
    compiled = compile_model(graph, args.opt_level, optimizer=args.optimizer, check_finite=args.check_finite,
                             source=Path(args.spec).name, emit=args.emit)
    text, lowered = compiled.text, compiled.lowered
    test_path = out.with_name(f"test_{module_name}.py")
    test_text = emit_test(module_name) if args.emit_test else None
    if test_text is not None and test_path.exists() and not args.force:
        from backcomp.codegen import MARKER
        head = test_path.read_text(encoding="utf-8", errors="replace")[:400]
        if MARKER not in head:
            raise UserError(f"{test_path}: error: exists and was not generated by backcomp (use --force to replace it)")
    try:
        atomic_write(out, text, force=args.force)
        if test_text is not None:
            atomic_write(test_path, test_text, force=args.force)
    except OverwriteError as e:
        raise UserError(f"{out}: error: {e}") from None
    except OSError as e:
        raise UserError(f"{out}: error: cannot write: {e.strerror or e}") from None
    seconds = time.perf_counter() - start
    forward = sum(1 for n in graph.nodes if n.op not in ("input", "param"))
    statements = sum(1 for n in lowered.nodes if n.op not in ("input", "param"))
    fused = sum(1 for n in lowered.nodes if n.op == "ew")
    extra = f", {test_path}" if test_text is not None else ""
    print(f"{args.spec} -> {out}{extra}: {forward} forward nodes, {statements} statements "
          f"({fused} fused elementwise groups), {seconds:.2f}s")
    if args.report:
        print_report(compiled, args.opt_level)
    return EXIT_OK


def print_report(compiled, opt_level: int) -> None:
    """The stability findings gathered while lowering the user's graph (its own names).

    -O0 applies no rewrites: the same analysis runs, and says what -O1 would rewrite.
    """
    findings = compiled.findings
    if opt_level == 0:
        from backcomp.passes import prepare_forward
        prepare_forward(compiled.graph, findings)
    print("stability report:")
    for f in findings:
        done = "rewrote" if opt_level else "not rewritten at -O0 (-O1 would)"
        print(f"  {f.node}: {done if f.rewritten else 'risky'}: {f.message}")
    if not findings:
        print("  nothing to report")


def cmd_explain(args) -> int:
    from backcomp.explain import explain
    graph = _load(args.spec)
    print(explain(graph, wrt=args.wrt, node=args.node, latex=args.latex))
    return EXIT_OK


def cmd_check(args) -> int:
    import numpy as np
    from backcomp.check import check_gradients, check_point, constant_inits, fixed_draws, held_stop_gradients, random_inputs
    from backcomp.compiler import build
    graph = _load(args.spec)
    if graph.loss_node is None:
        raise UserError(f"{args.spec}: error: the model declares no loss: there is no gradient to check")
    module = build(graph)
    params = check_point(module, args.seed, perturb=args.perturb, jitter=args.jitter)
    inputs = random_inputs(module, batch=args.batch, seed=args.seed)
    jittered = constant_inits(module, args.seed) if args.jitter > args.perturb else []
    with np.errstate(all="ignore"):
        loss = float(module.value_and_grad(params, inputs, **fixed_draws(module))[0])
        held = held_stop_gradients(graph, params, inputs)
        results = check_gradients(module, params, inputs, max_elements=args.max_elements, seed=args.seed,
                                  loss=held[0] if held else None)
    where = f"init_params(seed={args.seed})"
    if args.perturb:
        where += f" + {args.perturb:g}·N(0,1)"
    if jittered:
        where += f", {', '.join(jittered)} (constant inits) + {args.jitter:g}·N(0,1)"
    print(f"{args.spec}: loss {loss:.6g} at {where}, float64, batch {args.batch}")
    if held:
        print(f"finite differences hold the {held[1]} stop_gradient value(s) fixed, as the gradient does")
    rows = [("param", "shape", "probes", "|ad - fd|", "tolerance", "ratio", "")]
    for r in results:
        status = "ok" if r.ok else "FAIL"
        ratio = r.max_abs / r.tol if r.tol > 0 else (0.0 if r.max_abs == 0 else float("inf"))
        rows.append((r.name, str(r.shape) if r.shape is not None else "", str(r.checked), f"{r.max_abs:.2e}",
                     f"{r.tol:.2e}", f"{ratio:.3g}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"probes: up to {args.max_elements} entries and 2 random directions per param, 2 directions through "
          "all (worst shown);\nstep u^(1/3)·max(1, |p|), tolerance 10·(truncation + rounding) estimated from "
          "steps h and 2h")
    zero = [r.name for r in results if r.zero]
    if zero:
        print(f"note: the gradient is exactly 0 along every probe of {', '.join(zero)}: those rows say little")
    failed = [r.name for r in results if not r.ok]
    if failed or not np.isfinite(loss):
        what = ", ".join(failed) if failed else "the loss (not finite)"
        print(f"{args.spec}: gradient check FAILED for {what}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"{args.spec}: gradients match finite differences ({len(module.WRT)} params, batch {args.batch}, "
          f"seed {args.seed})")
    return EXIT_OK


def cmd_graph(args) -> int:
    from backcomp.explain import to_dot
    graph = _load(args.spec)
    dot = to_dot(graph, backward=args.backward)
    if not args.output:
        sys.stdout.write(dot)
        return EXIT_OK
    out = Path(args.output)
    fmt = out.suffix.lower().lstrip(".")
    try:
        if fmt in ("svg", "png"):
            exe = shutil.which("dot")
            if exe is None:
                raise UserError(f"{out}: error: writing .{fmt} needs Graphviz `dot` on PATH "
                                "(or write .dot and convert it yourself)")
            result = subprocess.run([exe, f"-T{fmt}", "-o", str(out)], input=dot.encode(), capture_output=True,
                                    timeout=120)
            if result.returncode != 0:
                raise UserError(f"{out}: error: dot failed: {result.stderr.decode(errors='replace').strip()}")
        else:
            out.write_text(dot, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{out}: error: cannot write: {e.strerror or e}") from None
    print(f"wrote {out}")
    return EXIT_OK


COMMANDS = {"compile": cmd_compile, "explain": cmd_explain, "check": cmd_check, "graph": cmd_graph}


# ----- the emitted test ------------------------------------------------------------------
def emit_test(module_name: str) -> str:
    """The source of a standalone pytest file that checks ``module_name``'s gradients.

    It includes backcomp.check's checker verbatim (the file may run where backcomp
    is not installed), so it runs the same algorithm as ``backcomp check``.
    """
    from backcomp.check import standalone_source
    from backcomp.codegen import MARKER, _environment
    text = _environment().get_template("test_module.py.jinja").render(
        name=module_name, version=__version__, test_file=f"test_{module_name}.py",
        checker=standalone_source())
    assert MARKER in text[:400]
    return text


# ----- entry point ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (never raises on bad input)."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USER
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("backcomp: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USER
    except Exception as e:  # noqa: BLE001  (the one place every error is turned into a message)
        from backcomp.graph import GraphError, ShapeError
        from backcomp.spec import SpecError
        if isinstance(e, SpecError):
            print(str(e), file=sys.stderr)
            return EXIT_USER
        if isinstance(e, (GraphError, ShapeError)):
            print(f"{getattr(args, 'spec', 'backcomp')}: error: {e}", file=sys.stderr)
            return EXIT_USER
        if os.environ.get("BACKCOMP_DEBUG"):
            raise
        print(f"backcomp: internal error: {type(e).__name__}: {e} (set BACKCOMP_DEBUG=1 for a traceback; "
              "please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
