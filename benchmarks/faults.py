"""Page faults and time per step of a generated module alone in its process, with and
without the import-time allocator warm-up (``np.empty(30 << 20, np.uint8)``).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/faults.py
        [--only transformer,cnn] [--steps 30] [--threads 1]

Each model of benchmarks/suite.py is compiled once; its module is run in a fresh
interpreter twice, as generated ("warm") and with the warm-up line removed ("cold"),
alternately for ``--rounds`` rounds.  Each run reports minor page faults per step
(``getrusage``) and the median wall and CPU time per step after three warm-up calls.
The suite itself runs every module in one process beside torch and JAX, whose own large
frees already raise glibc's threshold, so it hides what a user's process pays.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import suite  # noqa: E402
from backcomp import compile_source  # noqa: E402
from backcomp.spec import parse_spec  # noqa: E402

WARM_UP = "np.empty(30 << 20, np.uint8)\n"

RUN = """
import importlib.util, json, resource, statistics, sys, time
sys.path[:0] = {paths!r}
import suite   # numpy (OpenBLAS) first: threadpoolctl limits only the libraries loaded
from threadpoolctl import threadpool_limits
threadpool_limits({threads})
spec = importlib.util.spec_from_file_location("m", {module!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
params, inputs = suite.make_data({model!r}, m)
for _ in range(3):
    m.value_and_grad(params, inputs)
wall, cpu = [], []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({steps}):
    w, c = time.perf_counter(), time.process_time()
    m.value_and_grad(params, inputs)
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / {steps}
print(json.dumps({{"faults": faults, "wall": statistics.median(wall), "cpu": statistics.median(cpu)}}))
"""


def measure(model: str, module: Path, steps: int, threads: int) -> dict:
    code = RUN.format(paths=[HERE, os.path.dirname(HERE)], threads=threads, module=str(module),
                      model=model, steps=steps)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="transformer,gelu_mlp,cnn,lstm,gpt_block")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    print(f"page faults and time per value_and_grad step, one process per run, {args.threads} thread(s), "
          f"medians over {args.rounds} alternated runs of {args.steps} steps")
    print("| model | faults, warm | faults, cold | wall ms, warm | wall ms, cold | CPU ms, warm | CPU ms, cold |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.only.split(","):
            text = compile_source(parse_spec(suite.SPECS[model](**suite.sizes(model, False)), f"{model}.toml"))
            assert WARM_UP in text, "the generated module has no warm-up line"
            paths = {"warm": Path(tmp, f"{model}_warm.py"), "cold": Path(tmp, f"{model}_cold.py")}
            paths["warm"].write_text(text)
            paths["cold"].write_text(text.replace(WARM_UP, ""))
            runs: dict[str, list[dict]] = {"warm": [], "cold": []}
            for r in range(args.rounds):
                for kind in (("warm", "cold") if r % 2 == 0 else ("cold", "warm")):
                    runs[kind].append(measure(model, paths[kind], args.steps, args.threads))

            def med(kind, key):
                return statistics.median(run[key] for run in runs[kind])
            print(f"| {model} | {med('warm', 'faults'):.0f} | {med('cold', 'faults'):.0f} | "
                  f"{med('warm', 'wall') * 1e3:.1f} | {med('cold', 'wall') * 1e3:.1f} | "
                  f"{med('warm', 'cpu') * 1e3:.1f} | {med('cold', 'cpu') * 1e3:.1f} |", flush=True)
    print("load average at the end:", " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
