"""Image GAN: the rooted GAN loss (RLO, paper eq. 9) against the logistic GAN loss on Fashion-MNIST, with
DCGAN-style convolutional nets and a chosen number of training images (limited data, e.g. 1,000, or all).

The paper's image claim (StyleGAN2-ADA, FID with limited data) needs InceptionV3 weights and GPUs; here
samples are scored offline in the feature space of a small Fashion-MNIST classifier (the scorer, trained once
by this script on the training images outside the validation split, saved to --scorer and reused):
- FD: the Fréchet distance between Gaussians fitted to the scorer's 128-d features of --n-eval generated
  samples (fixed latents) and of real images: the validation split's during training (what a learning-rate
  choice may read), the 10,000 test images' at the end; fd_floor, the FD between the validation and the test
  images themselves, is what a perfect generator would score up to sampling;
- coverage: the classes (of 10) that receive at least half of a uniform share of the samples, by the
  scorer's labels, and the largest class's share (mode collapse shows as few classes and a large share).

    python gan_images.py --loss root --k 2 --n-train 1000 --out runs/gan_images/root_1k
    python gan_images.py --compare --n-train 1000 --seed 0 1 2 --out runs/gan_images/1k

G: z -> linear -> (4w, 7, 7) -> convT -> (2w, 14, 14) -> convT -> (1, 28, 28), batch norm and ReLU between,
tanh out; D: conv (w, 14, 14) -> conv (2w, 7, 7) -> linear, LeakyReLU 0.2 (w = --width). Adam (betas 0.5,
0.999) for both, one D and one G update per step; both losses train from the same weights and draws.

Outputs in --out: args.json, metrics.csv (per evaluation: loss, k, seed, step, fd_val, classes, top_share,
d_loss, g_loss), summary.csv (final per run: fd_val, fd_test, fd_floor, classes, top_share) and
samples_<loss>_seed<S>.png.
"""
import math
import os
import time

import numpy as np
import torch
from torch import nn

from data.vision import build_dataset
from engine import (ArgumentParser, CSVLogger, UserError, add_common_args, atomic_save, atomic_savefig,
                    atomic_write_csv, cli, prepare_run_dir, require_positive_ints, set_threads)
from losses import GAN_LOSSES, get_gan_loss

FIELDS = ["loss", "k", "seed", "step", "fd_val", "classes", "top_share", "d_loss", "g_loss"]
CLASSES = 10
FEATURES = 128
SHARED_VISION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "vision")
SUBSET_SEED = 0  # which training images a --n-train subset holds: the same for every run and seed


def load_images(data_dir, split):
    """(uint8 images (n, 28, 28), int64 labels) of Fashion-MNIST's `split` (one clear line if a file is missing)."""
    ds = build_dataset("fashionmnist", data_dir, split, 28, aug="none")
    return ds.images, ds.labels.long()


def to_unit(images):
    """uint8 (n, 28, 28) -> float (n, 1, 28, 28) in [-1, 1], G's tanh range."""
    return images.float().div(127.5).sub(1).unsqueeze(1)


def splits(data_dir, n_train, val_split):
    """{train, val, test, test_labels, scorer_train}: images in [-1, 1]. The last `val_split` training images
    are the validation set; `n_train` of the others (a fixed random subset) train the GAN, all of them the
    scorer (scorer_train: images, labels)."""
    images, labels = load_images(data_dir, "train")
    if val_split >= len(images):
        raise UserError(f"--val-split {val_split} leaves no training images (the split has {len(images)})")
    pool = len(images) - val_split
    if n_train > pool:
        raise UserError(f"--n-train {n_train} exceeds the {pool} training images outside the validation split")
    subset = torch.randperm(pool, generator=torch.Generator().manual_seed(SUBSET_SEED))[:n_train]
    test_images, test_labels = load_images(data_dir, "test")
    return dict(train=to_unit(images[subset]), val=to_unit(images[pool:]), test=to_unit(test_images),
                test_labels=test_labels, scorer_train=(to_unit(images[:pool]), labels[:pool]))


class Scorer(nn.Module):
    """A small CNN classifier of Fashion-MNIST; `features` is its 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, CLASSES)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


@torch.no_grad()
def scorer_outputs(scorer, images, batch=1000):
    """(float64 features (n, 128), predicted labels (n,)) of images in [-1, 1]."""
    feats, labels = [], []
    for chunk in images.split(batch):
        f = scorer.features(chunk)
        feats.append(f.double())
        labels.append(scorer.head(f).argmax(1))
    return torch.cat(feats), torch.cat(labels)


def train_scorer(images, labels, epochs=2, batch=128, seed=0):
    """The scorer, trained with Adam (lr 1e-3) on (images, labels)."""
    torch.manual_seed(seed)
    scorer = Scorer()
    opt = torch.optim.Adam(scorer.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=order).split(batch):
            loss = nn.functional.cross_entropy(scorer(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return scorer.eval()


def load_or_train_scorer(path, train, test_images, test_labels):
    """The scorer saved at `path`, else one trained on `train` (images, labels) and saved there; its test
    accuracy (%)."""
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        scorer = Scorer()
        scorer.load_state_dict(saved["state_dict"])
        return scorer.eval(), float(saved["test_acc"])
    scorer = train_scorer(*train)
    _, predicted = scorer_outputs(scorer, test_images)
    acc = 100.0 * float((predicted == test_labels).double().mean())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save({"state_dict": scorer.state_dict(), "test_acc": acc}, path)
    return scorer, acc


def gaussian(features):
    """(mean, covariance) of float64 features (n, d)."""
    mu = features.mean(0)
    centered = features - mu
    return mu, centered.T @ centered / (len(features) - 1)


def frechet(a, b):
    """Fréchet distance between Gaussians a = (mu1, S1) and b = (mu2, S2): |mu1 - mu2|^2 + tr S1 + tr S2 -
    2 tr (S1^(1/2) S2 S1^(1/2))^(1/2), float64, square roots from symmetric eigendecompositions (no complex
    matrix square root)."""
    (mu1, s1), (mu2, s2) = a, b
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * middle)


def coverage(labels):
    """(classes with at least half a uniform share of the samples, the largest class's share)."""
    share = torch.bincount(labels, minlength=CLASSES).double() / len(labels)
    return int((share >= 0.5 / CLASSES).sum()), float(share.max())


def generator(z_dim, width):
    return nn.Sequential(nn.Linear(z_dim, 4 * width * 49), nn.Unflatten(1, (4 * width, 7, 7)),
                         nn.BatchNorm2d(4 * width), nn.ReLU(),
                         nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.ConvTranspose2d(2 * width, 1, 4, 2, 1), nn.Tanh())


def discriminator(width):
    return nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(2 * width * 49, 1))


@torch.no_grad()
def generate(G, z, batch=500):
    G.eval()
    out = torch.cat([G(chunk) for chunk in z.split(batch)])
    G.train()
    return out


def label(loss, k):
    return "logistic" if loss == "ce" else f"RLO k={k:g}"


def train_run(args, data, loss_name, seed, logger):
    """Train one GAN; log metrics every --eval-every steps; the final samples and summary row."""
    train, scorer, val_stats, test_stats = data["train"], data["scorer"], data["val"], data["test"]
    criterion = get_gan_loss(loss_name, k=args.k)
    torch.manual_seed(seed)
    G, D = generator(args.z_dim, args.width), discriminator(args.width)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    draws = torch.Generator().manual_seed(seed)  # batches and latents: identical for both losses
    eval_z = torch.randn(args.n_eval, args.z_dim, generator=torch.Generator().manual_seed(10_000 + seed))
    k = "" if loss_name == "ce" else args.k
    for step in range(1, args.steps + 1):
        real = train[torch.randint(len(train), (args.batch,), generator=draws)]
        z = torch.randn(2, args.batch, args.z_dim, generator=draws)
        d_loss = criterion.discriminator(D(G(z[0]).detach()).squeeze(1), D(real).squeeze(1))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = criterion.generator(D(G(z[1])).squeeze(1))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if step % args.eval_every == 0 or step == args.steps:
            samples = generate(G, eval_z)
            feats, labels = scorer_outputs(scorer, samples)
            fd_val = frechet(gaussian(feats), val_stats) if torch.isfinite(feats).all() else math.inf
            classes, top = coverage(labels)
            logger.log(loss=loss_name, k=k, seed=seed, step=step, fd_val=round(fd_val, 5), classes=classes,
                       top_share=round(top, 5), d_loss=round(d_loss.item(), 6), g_loss=round(g_loss.item(), 6))
    fd_test = frechet(gaussian(feats), test_stats) if torch.isfinite(feats).all() else math.inf
    return samples, dict(loss=loss_name, k=k, seed=seed, steps=args.steps, n_train=len(train), lr=args.lr,
                         fd_val=round(fd_val, 5), fd_test=round(fd_test, 5), classes=classes, top_share=round(top, 5))


def plot_samples(path, samples, title, n=64):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = samples[:n].squeeze(1).add(1).div(2).clamp(0, 1).numpy()
    side = int(math.ceil(math.sqrt(len(grid))))
    canvas = np.ones((side * 29 - 1, side * 29 - 1))
    for i, image in enumerate(grid):
        r, c = divmod(i, side)
        canvas[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = image
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def prepare(args, images):
    """What every run of `args` shares: the GAN's training images (of `images`, from `splits`), the scorer
    (trained now if --scorer is missing) and the Gaussians of its features on the validation and test images."""
    start = time.time()
    scorer, acc = load_or_train_scorer(args.scorer, images["scorer_train"], images["test"], images["test_labels"])
    print(f"scorer: {acc:.2f}% test accuracy ({args.scorer}, {time.time() - start:.0f}s)", flush=True)
    val, test = (gaussian(scorer_outputs(scorer, images[split])[0]) for split in ("val", "test"))
    # the FD of real images to real images: what a perfect generator would score, up to sampling
    return dict(train=images["train"], scorer=scorer, scorer_acc=acc, val=val, test=test, fd_floor=frechet(val, test))


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="root", choices=sorted(GAN_LOSSES), help="GAN loss (ignored with --compare)")
    p.add_argument("--k", type=float, default=2.0, help="root k of the 'root' loss")
    p.add_argument("--compare", action="store_true", help="train both losses from the same weights and draws")
    p.add_argument("--n-train", type=int, default=55_000,
                   help="training images the GAN sees (a fixed random subset of those outside --val-split)")
    p.add_argument("--val-split", type=int, default=5000,
                   help="the last training images, held out: the validation FD (fd_val) is measured against them")
    p.add_argument("--steps", type=int, default=2000, help="training steps (one D and one G update each)")
    p.add_argument("--bs", "--batch", dest="batch", type=int, default=64, help="real and generated images per step")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (betas 0.5, 0.999) of G and D")
    p.add_argument("--z-dim", type=int, default=64, help="latent dimension")
    p.add_argument("--width", type=int, default=16, help="channels of D's first layer (G: 4x and 2x that)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--n-eval", type=int, default=2000, help="generated samples scored per evaluation (fixed latents)")
    p.add_argument("--scorer", default=None,
                   help="the scorer's weights: trained and saved here when the file is missing "
                        "(default: OUT/scorer.pt)")
    add_common_args(p, out="runs/gan_images", seeds=True, seed_help="weights, batches and latents (same per loss)",
                    device=False, data_dir_help="folder holding FashionMNIST/raw/ (torchvision's layout)",
                    data_dir=SHARED_VISION, threads=1)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or os.path.join("runs", "gan_images")
    require_positive_ints(args, "n_train", "val_split", "steps", "batch", "z_dim", "width", "eval_every", "threads")
    if args.n_eval < 2:
        raise UserError(f"--n-eval must be >= 2 (a covariance needs two samples), got {args.n_eval}")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seed values must be distinct, got {args.seeds}")
    get_gan_loss("root", k=args.k)  # a bad k fails here, before any data is read
    args.losses = ["ce", "root"] if args.compare else [args.loss]
    args.scorer = args.scorer or os.path.join(args.out, "scorer.pt")
    set_threads(args)
    images = splits(args.data_dir, args.n_train, args.val_split)  # missing data stops before --out is touched
    prepare_run_dir(args, ("metrics.csv", "summary.csv"))
    data = prepare(args, images)
    logger = CSVLogger(os.path.join(args.out, "metrics.csv"), FIELDS)
    rows = []
    for seed in args.seeds:
        for loss in args.losses:
            start = time.time()
            samples, row = train_run(args, data, loss, seed, logger)
            row.update(fd_floor=round(data["fd_floor"], 5), scorer_acc=round(data["scorer_acc"], 3),
                       seconds=round(time.time() - start, 2))
            rows.append(row)
            plot_samples(os.path.join(args.out, f"samples_{loss}_seed{seed}.png"), samples,
                         f"{label(loss, args.k)}, {args.n_train} images, seed {seed}: FD {row['fd_test']:.2f}")
            print(f"{label(loss, args.k):10s} seed {seed}: FD val {row['fd_val']:.2f} test {row['fd_test']:.2f}, "
                  f"{row['classes']}/{CLASSES} classes, top share {row['top_share']:.1%} ({row['seconds']:.0f}s)",
                  flush=True)
    atomic_write_csv(os.path.join(args.out, "summary.csv"), list(rows[0]), rows)
    return rows


if __name__ == "__main__":
    cli(main)
