"""Train a variational autoencoder on scikit-learn's 8x8 digits; plot reconstructions and samples.

examples/vae.toml encodes an image to the mean and log-variance of q(z|x) (8
latent dims), draws z = mu + exp(logvar / 2) * eps with ``normal((B, Z))`` (the
reparameterisation trick: the noise comes from ``rng=``, the gradient flows
through mu and logvar), decodes it to Bernoulli logits, and minimises the
negative ELBO: reconstruction cross-entropy + KL(q(z|x) || N(0, I)), in nats per
image.  The compiled Adam ``train_step`` trains it on minibatches of the
training digits; the test loss is evaluated with a fixed noise generator so the
points of the curve are comparable.  Plots: examples/out/vae.png (loss) and
examples/out/vae_images.png (test digits, their reconstructions, and decoded
draws from the prior).

    python examples/train_vae.py [--steps N] [--quick] [--out PLOT.png]
"""
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import backcomp
from _common import Log, batches, parse_args, spec

args = parse_args(__doc__, name="vae", steps=4000, quick=60)

digits = load_digits()
images = (digits.data / 16.0).astype(np.float32)             # 1797 images of 64 pixels in [0, 1]
x_train, x_test = train_test_split(images, test_size=0.25, random_state=0, stratify=digits.target)
test = {"x": x_test}

model = backcomp.build(spec("vae.toml"), optimizer="adam")
params = model.init_params(seed=0)
state = model.init_state(params)
order = np.random.default_rng(0)        # minibatch order
noise = np.random.default_rng(1)        # eps of the reparameterisation


def evaluate(step):
    out = model.forward(params, test, rng=np.random.default_rng(123))   # the same eps at every evaluation
    log.record(step, loss=out["loss"])
    print(f"            reconstruction {float(out['recon']):.2f} + KL {float(out['kl']):.2f} nats per image")
    return out


log = Log("VAE on digits: negative ELBO", every=max(1, args.steps // 10))
evaluate(0)
for step, idx in zip(range(1, args.steps + 1), batches(order, len(x_train), 64)):
    log.record(step, train_loss=model.train_step(params, {"x": x_train[idx]}, state, lr=1e-3, rng=noise))
    if log.due(step, args.steps):
        out = evaluate(step)
active = int(np.sum(np.var(out["mu"], axis=0) > 0.01))   # latent dims the encoder uses
print(f"latent dims in use (variance of mu over the test set > 0.01): {active} of {out['mu'].shape[1]}")


def plot_images(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("test digits", x_test[:12]), ("reconstructions", out["reconstruction"][:12]),
            ("samples from the prior", out["samples"][:12]), ("", out["samples"][12:24])]
    fig, axes = plt.subplots(len(rows), 12, figsize=(12, 4.4))
    for (title, row), ax_row in zip(rows, axes):
        for image, ax in zip(row, ax_row):
            ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        ax_row[0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("VAE on 8x8 digits (pixel means of p(x|z))")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


plot_images(out, args.out.with_name(args.out.stem + "_images.png"))
log.finish(args.out, recon=float(out["recon"]), kl=float(out["kl"]))
