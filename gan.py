"""Small offline GAN experiment: the rooted GAN loss (RLO, paper eq. 9) against the logistic GAN loss.

An MLP generator and discriminator are trained on the standard 2-D mode-collapse benchmarks: a ring
of 8 Gaussians (radius 2, std 0.02) or a 5x5 grid of 25 Gaussians (spacing 2, std 0.05). Every
--eval-every steps, --n-eval samples from fixed latents are scored as in the mode-collapse literature
(Unrolled GAN, VEEGAN, PacGAN): a sample is high quality when it lies within 3 standard deviations of
its nearest mode, and a mode is covered when it holds at least --min-count high-quality samples.

    python gan.py --loss root --k 2 --dataset ring --out runs/gan/ring_root
    python gan.py --compare --k 2 --dataset grid --seed 0 1 2 --out runs/gan/grid

The losses come from `losses.get_gan_loss`: 'ce' is the non-saturating logistic loss
(G: softplus(-D(G(z))), D: softplus(D(fake)) + softplus(-D(real))); 'root' replaces each softplus(x)
by k (1 + e^x)^(1/k). Both losses train the same networks from the same seeds and draws.

Outputs in --out: args.json, metrics.csv (one row per run and evaluation: loss, k, seed, step, modes, hq_share,
d_loss, g_loss, d_real, d_fake, g_grad), samples_<loss>_seed<S>_step<N>.png (scatter plots over training),
summary.csv (final metrics per run, with w1: the exact Wasserstein-1 distance between 1000 final samples and
1000 fresh real ones), and with both losses (--compare) compare.png: final samples side by side and the
metric curves over training, mean and range over seeds.
"""
import os
import time

import numpy as np
import torch
from torch import nn

from engine import (ArgumentParser, CSVLogger, UserError, add_common_args, atomic_savefig, atomic_write_csv, cli,
                    prepare_run_dir, read_csv, require_positive_ints, set_threads)
from losses import GAN_LOSSES, get_gan_loss

# d_real / d_fake: D's mean logit on the step's real / generated batch; g_grad: the norm of G's gradient
# (what a collapse looks like: D saturates and G's gradient vanishes or explodes).
FIELDS = ["loss", "k", "seed", "step", "modes", "hq_share", "d_loss", "g_loss", "d_real", "d_fake", "g_grad"]


def mode_centers(name):
    """(modes, 2) centers and the std of each Gaussian of the benchmark `name`."""
    if name == "ring":
        angle = 2 * np.pi * np.arange(8) / 8
        return torch.tensor(np.stack([2 * np.cos(angle), 2 * np.sin(angle)], 1), dtype=torch.float32), 0.02
    if name == "grid":
        axis = torch.arange(-4.0, 4.5, 2.0)
        return torch.cartesian_prod(axis, axis), 0.05
    raise UserError(f"unknown --data {name!r}; choose from: ring, grid")


def sample_real(centers, std, n, generator):
    idx = torch.randint(len(centers), (n,), generator=generator)
    return centers[idx] + std * torch.randn(n, 2, generator=generator)


def mode_metrics(samples, centers, std, min_count):
    """(modes covered, share of high-quality samples, high-quality count per mode)."""
    dist = torch.cdist(samples.double(), centers.double())
    nearest_dist, nearest = dist.min(1)
    high_quality = nearest_dist <= 3 * std  # NaN samples compare False: never high quality
    counts = torch.bincount(nearest[high_quality], minlength=len(centers))
    return int((counts >= min_count).sum()), float(high_quality.double().mean()), counts


def wasserstein(a, b):
    """Exact 2-D Wasserstein-1 distance between two equal-size sample sets (optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(a.double(), b.double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def w1_to_real(samples, centers, std, seed, n=1000):
    """W1 between the first `n` samples and `n` fresh real samples (drawn apart from training's draws)."""
    real = sample_real(centers, std, n, torch.Generator().manual_seed(20_000 + seed))
    return wasserstein(samples[:n], real)


def mlp(n_in, hidden, layers, n_out, act):
    dims = [n_in] + [hidden] * layers
    blocks = []
    for a, b in zip(dims[:-1], dims[1:]):
        blocks += [nn.Linear(a, b), act()]
    return nn.Sequential(*blocks, nn.Linear(dims[-1], n_out))


def label(loss, k):
    return "CE" if loss == "ce" else f"RLO k={k:g}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def scatter(ax, samples, centers, std, title, lim):
    """Generated samples, and each mode's high-quality disc (3 std) in red."""
    from matplotlib.patches import Circle

    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4, color="tab:blue", rasterized=True)
    for cx, cy in centers.tolist():
        ax.add_patch(Circle((cx, cy), 3 * std, fill=False, color="tab:red", lw=0.8))
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xticks=[], yticks=[])
    ax.set_aspect("equal")


def plot_samples(path, samples, centers, std, title, lim):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    scatter(ax, samples, centers, std, title, lim)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def train_run(args, loss_name, seed, logger):
    """Train one GAN; log metrics; return the final (samples, modes, hq_share)."""
    centers, std = mode_centers(args.data)
    lim = centers.abs().max().item() + 1.5
    criterion = get_gan_loss(loss_name, k=args.k)
    torch.manual_seed(seed)
    G = mlp(args.z_dim, args.hidden, args.g_layers, 2, nn.ReLU).to(args.device)
    D = mlp(2, args.hidden, args.d_layers, 1, lambda: nn.LeakyReLU(0.2)).to(args.device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    draws = torch.Generator().manual_seed(seed)  # real samples and latents: identical for both losses
    eval_z = torch.randn(args.n_eval, args.z_dim, generator=torch.Generator().manual_seed(10_000 + seed))
    plot_steps = set(np.linspace(0, args.steps, args.plots + 1).round().astype(int)[1:]) if args.plots else set()
    k = "" if loss_name == "ce" else args.k
    for step in range(1, args.steps + 1):
        real = sample_real(centers, std, args.batch, draws).to(args.device)
        z = torch.randn(2, args.batch, args.z_dim, generator=draws).to(args.device)
        d_fake, d_real = D(G(z[0]).detach()).squeeze(1), D(real).squeeze(1)
        d_loss = criterion.discriminator(d_fake, d_real)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = criterion.generator(D(G(z[1])).squeeze(1))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        logged = step % args.eval_every == 0 or step == args.steps
        if logged:
            g_grad = torch.sqrt(sum(p.grad.pow(2).sum() for p in G.parameters())).item()
        opt_g.step()
        if logged or step in plot_steps:
            with torch.no_grad():
                samples = G(eval_z.to(args.device)).cpu()
            modes, hq, _ = mode_metrics(samples, centers, std, args.min_count)
            if logged:
                logger.log(loss=loss_name, k=k, seed=seed, step=step, modes=modes, hq_share=round(hq, 5),
                           d_loss=round(d_loss.item(), 6), g_loss=round(g_loss.item(), 6),
                           d_real=round(d_real.mean().item(), 5), d_fake=round(d_fake.mean().item(), 5),
                           g_grad=round(g_grad, 6))
            if step in plot_steps:
                title = f"{label(loss_name, args.k)} seed {seed} step {step}\n{modes}/{len(centers)} modes, {hq:.0%} HQ"
                plot_samples(os.path.join(args.out, f"samples_{loss_name}_seed{seed}_step{step}.png"),
                             samples.numpy(), centers, std, title, lim)
    return samples, modes, hq


def plot_compare(path, args, finals, rows):
    """Final samples of the first seed per loss, and modes / HQ share over training (mean, min-max)."""
    plt = pyplot()
    centers, std = mode_centers(args.data)
    lim = centers.abs().max().item() + 1.5
    seed0 = args.seeds[0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    colors = {"ce": "tab:blue", "root": "tab:orange"}
    for ax, loss in zip(axes[:2], args.losses):
        samples, modes, hq = finals[(loss, seed0)]
        scatter(ax, samples.numpy(), centers, std,
                f"{label(loss, args.k)}, seed {seed0}: {modes}/{len(centers)} modes, {hq:.0%} HQ", lim)
    for ax, metric, name in [(axes[2], "modes", "modes covered"), (axes[3], "hq_share", "high-quality share")]:
        for loss in args.losses:
            steps = sorted({int(r["step"]) for r in rows if r["loss"] == loss})
            table = np.array([[next(float(r[metric]) for r in rows if r["loss"] == loss and int(r["seed"]) == s
                                    and int(r["step"]) == t) for t in steps] for s in args.seeds])
            ax.plot(steps, table.mean(0), color=colors[loss], label=f"{label(loss, args.k)} (mean of {len(args.seeds)})")
            ax.fill_between(steps, table.min(0), table.max(0), color=colors[loss], alpha=0.2)
        ax.set(xlabel="step", title=f"{args.data}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].axhline(len(centers), color="grey", lw=0.8, ls="--")
    axes[2].set_ylim(-0.3, len(centers) + 0.5)
    axes[3].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="root", choices=sorted(GAN_LOSSES), help="GAN loss (ignored with --compare)")
    p.add_argument("--k", type=float, default=2.0, help="root k of the 'root' loss")
    p.add_argument("--compare", action="store_true", help="train both losses and plot them side by side")
    p.add_argument("--dataset", "--data", dest="data", default="ring", choices=["ring", "grid"])
    p.add_argument("--steps", type=int, default=4000, help="training steps (one D and one G update each)")
    p.add_argument("--bs", "--batch", dest="batch", type=int, default=256, help="real and generated samples per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (betas 0.5, 0.999) of G and D")
    p.add_argument("--z-dim", type=int, default=2, help="latent dimension (2, as PacGAN's 2-D benchmarks)")
    p.add_argument("--hidden", type=int, default=128, help="width of the MLPs")
    p.add_argument("--g-layers", type=int, default=3, help="hidden layers of G (ReLU)")
    p.add_argument("--d-layers", type=int, default=3, help="hidden layers of D (LeakyReLU 0.2)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--n-eval", type=int, default=2500, help="generated samples scored per evaluation")
    p.add_argument("--min-count", type=int, default=20, help="high-quality samples for a mode to count")
    p.add_argument("--plots", type=int, default=4, help="scatter PNGs per run, evenly spaced (0: none)")
    # tiny MLPs: the CPU and one thread are fastest
    add_common_args(p, out="runs/gan", seeds=True, seed_help="weights, real samples and latents (and per loss)",
                    device="cpu", data_dir=False, threads=1)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", "gan")
    require_positive_ints(args, "steps", "batch", "z_dim", "hidden", "g_layers", "d_layers", "eval_every", "n_eval",
                          "min_count", "threads")
    if args.plots < 0:
        raise UserError(f"--plots must be >= 0, got {args.plots}")
    if not args.lr >= 0:
        raise UserError(f"--lr must be >= 0, got {args.lr}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seed values must be distinct, got {args.seeds}")
    args.losses = ["ce", "root"] if args.compare else [args.loss]
    set_threads(args)
    get_gan_loss("root", k=args.k)  # a bad k fails here, before any training
    prepare_run_dir(args, ("metrics.csv", "summary.csv", "compare.png"))
    metrics_path = os.path.join(args.out, "metrics.csv")
    logger = CSVLogger(metrics_path, FIELDS)

    finals = {}
    for seed in args.seeds:
        for loss in args.losses:
            start = time.time()
            finals[(loss, seed)] = train_run(args, loss, seed, logger)
            _, modes, hq = finals[(loss, seed)]
            print(f"{args.data} {label(loss, args.k):10s} seed {seed}: {modes} modes, {hq:.1%} high quality "
                  f"({time.time() - start:.0f}s)", flush=True)

    centers, std = mode_centers(args.data)
    n_modes = len(centers)
    atomic_write_csv(os.path.join(args.out, "summary.csv"),
                     ["data", "loss", "k", "seed", "steps", "modes", "n_modes", "hq_share", "w1"],
                     [dict(data=args.data, loss=loss, k="" if loss == "ce" else args.k, seed=seed, steps=args.steps,
                           modes=modes, n_modes=n_modes, hq_share=round(hq, 5),
                           w1=round(w1_to_real(samples, centers, std, seed, min(1000, args.n_eval)), 5))
                      for (loss, seed), (samples, modes, hq) in finals.items()])
    for loss in args.losses:
        modes = np.array([finals[(loss, s)][1] for s in args.seeds], dtype=float)
        hq = np.array([finals[(loss, s)][2] for s in args.seeds])
        print(f"{label(loss, args.k):10s} over {len(args.seeds)} seeds: modes {modes.mean():.2f} +- {modes.std():.2f} "
              f"of {n_modes}, high quality {hq.mean():.1%} +- {hq.std():.1%}")
    if args.compare:
        plot_compare(os.path.join(args.out, "compare.png"), args, finals, read_csv(metrics_path))
    return finals


if __name__ == "__main__":
    cli(main)
