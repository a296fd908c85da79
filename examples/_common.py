"""What every example script shares: its command line, a progress log and the plot.

A script builds its model, then::

    args = parse_args(__doc__, name="digits_mlp", steps=3000, quick=60)
    log = Log("digits MLP", every=250)      # evaluations are on the test set
    log.record(0, loss=..., accuracy=...)        # before training
    for step in range(1, args.steps + 1):
        log.record(step, train_loss=module.train_step(params, batch, state))
        ...
    log.finish(args.out)

``finish`` saves the plot and prints one machine-readable last line,
``RESULT initial_loss=... final_loss=... accuracy=... seconds=...``, which the
tests read.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent


def spec(name: str) -> Path:
    """The path of a spec file that ships next to the scripts."""
    return EXAMPLES / name


def parse_args(doc: str, name: str, steps: int, quick: int) -> argparse.Namespace:
    """``--steps N``, ``--quick`` (a short run, for tests) and ``--out PLOT.png``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, metavar="N", help=f"training steps (default {steps})")
    p.add_argument("--quick", action="store_true", help=f"a short run of {quick} steps (for tests)")
    p.add_argument("--out", type=Path, default=EXAMPLES / "out" / f"{name}.png", metavar="PLOT.png",
                   help=f"where to save the plot (default examples/out/{name}.png)")
    args = p.parse_args()
    if args.steps is None:
        args.steps = quick if args.quick else steps
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows (or positions) whose largest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def batches(rng: np.random.Generator, n: int, size: int):
    """Index arrays of ``size`` rows, reshuffled every epoch, forever."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]


class Log:
    """Records the loss (and accuracy) as training runs, prints progress, plots it."""

    def __init__(self, title: str, every: int, evaluated_on: str = "test set"):
        self.title = title
        self.every = every
        self.evaluated_on = evaluated_on
        self.train: list[tuple[int, float]] = []     # (step, loss of that step's batch)
        self.evals: list[tuple[int, float, float | None]] = []   # (step, loss, accuracy)
        self.start = time.perf_counter()

    def due(self, step: int, last: int) -> bool:
        """Whether to evaluate at ``step`` (every ``every`` steps and at the last)."""
        return step % self.every == 0 or step == last

    def record(self, step: int, train_loss=None, loss=None, accuracy: float | None = None) -> None:
        """Record a training step's loss; with ``loss`` also an evaluation, which is printed."""
        if train_loss is not None:
            self.train.append((step, float(train_loss)))
        if loss is not None:
            self.evals.append((step, float(loss), accuracy))
            acc = f"  accuracy {accuracy:6.2%}" if accuracy is not None else ""
            print(f"step {step:5d}  loss {float(loss):.4f}{acc}  ({time.perf_counter() - self.start:.1f} s)",
                  flush=True)

    def finish(self, out: Path, **extra) -> None:
        """Save the plot to ``out`` and print the RESULT line (with ``extra`` fields)."""
        seconds = time.perf_counter() - self.start
        self.plot(out)
        (_, first, _), (_, last, acc) = self.evals[0], self.evals[-1]
        fields = {"initial_loss": f"{first:.6g}", "final_loss": f"{last:.6g}"}
        if acc is not None:
            fields["accuracy"] = f"{acc:.4f}"
        fields.update({k: f"{v:.4g}" for k, v in extra.items()})
        fields["seconds"] = f"{seconds:.1f}"
        print(f"saved {out}")
        print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def plot(self, out: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        has_acc = any(a is not None for _, _, a in self.evals)
        fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 4), squeeze=False)
        ax = axes[0, 0]
        if self.train:
            steps, losses = zip(*self.train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="training batch")
        steps, losses, accs = zip(*self.evals)
        ax.plot(steps, losses, "o-", color="tab:blue", ms=3, label=self.evaluated_on)
        ax.set(xlabel="step", ylabel="loss", title=f"{self.title}: loss")
        if min(losses) > 0:
            ax.set_yscale("log")
        ax.legend()
        if has_acc:
            ax = axes[0, 1]
            ax.plot(steps, [100 * a for a in accs], "o-", color="tab:green", ms=3)
            ax.set(xlabel="step", ylabel=f"accuracy on the {self.evaluated_on} (%)",
                   title=f"{self.title}: accuracy", ylim=(0, 100.5))
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)


def train_digits_classifier(spec_name: str, title: str, images: np.ndarray, args: argparse.Namespace,
                            lr: float, evaluations: int) -> None:
    """The digits scripts' whole run: a fixed stratified split, Adam ``train_step`` on
    minibatches of 64, test loss and accuracy ``evaluations`` times, the plot."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import backcomp

    labels = load_digits().target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels)
    test = {"x": x_test, "labels": y_test}
    model = backcomp.build(spec(spec_name), optimizer="adam")
    params = model.init_params(seed=0)
    state = model.init_state(params)
    rng = np.random.default_rng(0)

    def evaluate(step):
        out = model.forward(params, test)
        log.record(step, loss=out["loss"], accuracy=accuracy(out["logits"], y_test))

    log = Log(title, every=max(1, args.steps // evaluations))
    evaluate(0)
    for step, idx in zip(range(1, args.steps + 1), batches(rng, len(x_train), 64)):
        loss = model.train_step(params, {"x": x_train[idx], "labels": y_train[idx]}, state, lr=lr)
        log.record(step, train_loss=loss)
        if log.due(step, args.steps):
            evaluate(step)
    log.finish(args.out)
