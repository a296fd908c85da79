"""``python -m backcomp``: the command line (see backcomp.cli)."""
from backcomp.cli import run

run()
