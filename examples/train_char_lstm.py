"""A character-level LSTM language model (examples/char_lstm.toml) trained on the text
that ships with backcomp: its own README and docs.

Windows of 64 characters are drawn at random from the text (the last 10% held out);
the compiled Adam ``train_step`` runs the LSTM as one loop forward and one reversed
loop backward.  The held-out loss is in nats per character (log 96 = 4.56 at the
start).  At the end the script prints samples drawn character by character.
Plot: examples/out/char_lstm.png.

    python examples/train_char_lstm.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np

import backcomp
from _common import EXAMPLES, Log, accuracy, parse_args, spec

args = parse_args(__doc__, name="char_lstm", steps=1000, quick=15)

ROOT = EXAMPLES.parent
text = "\n".join((ROOT / p).read_text(encoding="utf-8") for p in ("README.md", "docs/spec.md", "docs/dask.md")
                 if (ROOT / p).exists())
codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
codes = np.where(codes == 10, 95, np.clip(codes - 32, 0, 94))    # printable ASCII -> 0..94, newline -> 95
split = int(0.9 * len(codes))
train, held = codes[:split], codes[split:]
WINDOW, BATCH = 64, 32
rng = np.random.default_rng(0)


def windows(data, size):
    starts = rng.integers(0, len(data) - WINDOW - 1, size)
    chunk = np.stack([data[s:s + WINDOW + 1] for s in starts])
    return {"ids": chunk[:, :-1], "targets": chunk[:, 1:]}


def decode(ids) -> str:
    return "".join("\n" if i == 95 else chr(int(i) + 32) for i in ids)


model = backcomp.build(spec("char_lstm.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
held_batch = windows(held, 64)


def evaluate(step):
    out = model.forward(params, held_batch)
    log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], held_batch["targets"]))


def sample(prompt: str, length: int, temperature: float = 0.7) -> str:
    ids = [95 if ch == "\n" else min(max(ord(ch) - 32, 0), 94) for ch in prompt]
    for _ in range(length):
        window = np.array([ids[-WINDOW:]])
        logits = model.forward(params, {"ids": window, "targets": window})["logits"][0, -1]
        p = np.exp((logits - logits.max()) / temperature)
        ids.append(int(rng.choice(96, p=p / p.sum())))
    return decode(ids)


log = Log("character-level LSTM", every=max(1, args.steps // 10), evaluated_on="held-out text")
evaluate(0)
for step in range(1, args.steps + 1):
    log.record(step, train_loss=model.train_step(params, windows(train, BATCH), state, lr=3e-3))
    if log.due(step, args.steps):
        evaluate(step)
for prompt in ("The generated module", "backcomp "):
    print(f"sample: {sample(prompt, 120 if args.steps > 100 else 20)!r}")
log.finish(args.out)
