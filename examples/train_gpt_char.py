"""Train a character-level GPT on eleven of Shakespeare's sonnets, then sample from it.

examples/gpt_char.toml is a two-block transformer written as a plain spec: token
embeddings (``embedding(ids, E)``) plus position embeddings (``P[:T]``), causal
multi-head attention (heads by reshape/transpose, the mask ``tril(ones((T, T)))``
applied with ``where``), ``layer_norm``, a GELU MLP (tanh form) and ``cross_entropy`` with
integer targets.  ``backcomp.build`` compiles it with a fused Adam ``train_step``.
The text is examples/data/sonnets.txt (public domain, 6.8 KB); ids are ASCII codes.
Training batches are random 33-character windows of the first ten sonnets; the
last one (CXXX) is held out.  After training the script samples text one
character at a time with ``forward(params, {"ids": ...}, outputs=("logits",))``
(no targets needed) and NumPy.  Plot: examples/out/gpt_char.png.

The text is small, so the model memorises it (the held-out loss says so).  On a
machine shared with other jobs, OPENBLAS_NUM_THREADS=1 makes each step several
times faster (two BLAS threads then mostly wait for each other).

    python examples/train_gpt_char.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import EXAMPLES, Log, accuracy, parse_args, spec

args = parse_args(__doc__, name="gpt_char", steps=2000, quick=30)

CONTEXT, BATCH = 32, 32
text = (EXAMPLES / "data" / "sonnets.txt").read_text(encoding="ascii")
codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64)
split = text.index("CXXX")
train_codes, held_out_codes = codes[:split], codes[split:]
rng = np.random.default_rng(0)


def windows(source: np.ndarray, starts: np.ndarray) -> dict:
    """Context windows and their next characters: ids[t + 1] is targets[t]."""
    w = source[starts[:, None] + np.arange(CONTEXT + 1)]
    return {"ids": w[:, :-1], "targets": w[:, 1:]}


def random_batch(source: np.ndarray, size: int) -> dict:
    return windows(source, rng.integers(0, len(source) - CONTEXT - 1, size))


model = backcomp.build(spec("gpt_char.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
evaluation = windows(train_codes, np.linspace(0, len(train_codes) - CONTEXT - 2, 128).astype(np.int64))
held_out = windows(held_out_codes, np.arange(0, len(held_out_codes) - CONTEXT - 1))


def evaluate(step):
    out = model.forward(params, evaluation)
    log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], evaluation["targets"]))


def sample(prompt: str, length: int, temperature: float, seed: int) -> str:
    """Extend ``prompt`` by ``length`` characters drawn from the model's softmax."""
    draw = np.random.default_rng(seed)
    printable = np.zeros(128, dtype=bool)
    printable[[10, *range(32, 127)]] = True          # newline and printable ASCII: nothing else is drawn
    ids = list(prompt.encode("ascii"))
    for _ in range(length):
        context = np.array([ids[-CONTEXT:]], dtype=np.int64)
        logits = model.forward(params, {"ids": context}, outputs=("logits",))["logits"][0, -1]
        z = np.where(printable, logits.astype(np.float64) / temperature, -np.inf)
        p = np.exp(z - z.max())
        ids.append(int(draw.choice(len(p), p=p / p.sum())))
    return bytes(ids).decode("ascii")


log = Log("char GPT, sonnets", every=max(1, args.steps // 10), evaluated_on="training text")
evaluate(0)
lr_max = 3e-3
for step in range(1, args.steps + 1):
    lr = lr_max * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
    log.record(step, train_loss=model.train_step(params, random_batch(train_codes, BATCH), state, lr=lr))
    if log.due(step, args.steps):
        evaluate(step)
held_out_loss = float(model.forward(params, held_out, outputs=("loss",))["loss"])
print(f"held-out sonnet CXXX: loss {held_out_loss:.4f}")
for prompt in ("Shall I ", "When in "):
    print(f"--- sample (temperature 0.8), prompt {prompt!r}:")
    print(sample(prompt, 240 if not args.quick else 40, temperature=0.8, seed=1))
log.finish(args.out, held_out_loss=held_out_loss)
