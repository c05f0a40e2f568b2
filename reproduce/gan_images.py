"""GAN on Fashion-MNIST images (gan_images.py): the rooted GAN loss (k = 2) vs the logistic GAN loss with
DCGAN-style nets at two data sizes, each loss's learning rate chosen on the validation FD; the test FD in the
feature space of a classifier the section trains once, and per-class coverage, paired per seed."""
import os

import numpy as np

from .common import lr_text, pyplot, save_figure
from .fashion import data_dir
from .report import Section, Table, comparison_cells, method
from .stats import choose, fmt, interval, paired

TITLE = "GAN on Fashion-MNIST images: rooted GAN loss (k = 2) vs the logistic GAN loss, limited and full data"
LOSSES = ("ce", "root")
FULL = dict(sizes=(1000, 55000), flags=(), val_split=5000, lr_grid=(1e-4, 2e-4), generated=None)
# QUICK trains on generated images in Fashion-MNIST's file layout (written into the cache): no data needed.
QUICK = dict(FULL, sizes=(64, 128), flags=("--steps", "6", "--eval-every", "3", "--n-eval", "64", "--bs", "16",
                                           "--width", "4"),
             val_split=64, lr_grid=(2e-4,), generated=dict(train=256, test=64))


def arguments(cfg, data, n_train, loss, lr, scorer):
    """gan_images.py's arguments of one run (its seed apart; the run writes no files)."""
    return ["--data-dir", data, "--n-train", str(n_train), "--val-split", str(cfg["val_split"]), "--loss", loss,
            "--k", "2", "--lr", f"{lr:g}", "--scorer", scorer, *cfg["flags"]]


def task(argv, seed):
    """One GAN run: its summary row (validation and test FD, coverage, seconds) and 64 final samples (uint8)."""
    import time

    import torch

    import gan_images

    torch.set_num_threads(1)
    args = gan_images.build_parser().parse_args(argv + ["--seed", str(seed)])
    data = gan_images.prepare(args, gan_images.splits(args.data_dir, args.n_train, args.val_split))
    start = time.time()
    samples, row = gan_images.train_run(args, data, args.loss, seed, Rows())
    row.update(fd_floor=data["fd_floor"], scorer_acc=data["scorer_acc"], seconds=time.time() - start)
    return dict(row, samples=samples[:64].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).numpy())


class Rows:
    """A metrics logger that keeps nothing (the section reads the final row)."""

    def log(self, **row):
        pass


def tasks(cfg, ctx):
    import gan_images

    data = data_dir(cfg, ctx, generated_folder="gan_images_generated")
    scorer = os.path.join(ctx.cache, "gan_images", "scorer.pt")
    # trained here once, before the runs start in parallel (each run only loads it)
    images = gan_images.splits(data, 1, cfg["val_split"])
    gan_images.load_or_train_scorer(scorer, images["scorer_train"], images["test"], images["test_labels"])
    return {((n, loss, lr), seed): (task, dict(argv=arguments(cfg, data, n, loss, lr, scorer), seed=seed))
            for n in cfg["sizes"] for loss in LOSSES for lr in cfg["lr_grid"] for seed in range(cfg["seeds"])}


def choose_lr(cfg, res, n, loss):
    """The learning rate with the lowest mean validation FD over the seeds, and its runs."""
    grid = list(cfg["lr_grid"])
    lr = choose(grid, {lr: np.mean([r["fd_val"] for r in res[(n, loss, lr)]]) for lr in grid}, higher_is_better=False)
    return lr, res[(n, loss, lr)]


def label(loss):
    return "logistic" if loss == "ce" else "RLO k=2"


def report(cfg, res, ctx, command):
    grid = list(cfg["lr_grid"])
    runs_done = [r for runs in res.values() for r in runs]
    scorer_acc = runs_done[0]["scorer_acc"] if runs_done else float("nan")
    minutes = sum(r["seconds"] for r in runs_done) / 60
    sec = Section("gan_images", TITLE, *method(
        "gan_images", sizes=" and ".join(f"{n:,}" for n in cfg["sizes"]), val_split=f"{cfg['val_split']:,}",
        lr_grid=lr_text(grid), seeds=cfg["seeds"], flags=" ".join(cfg["flags"]) or "none (the script's defaults)",
        scorer_acc=f"{scorer_acc:.2f}", data="generated stand-in images in Fashion-MNIST's IDX layout (a smoke test, "
        "not Fashion-MNIST)" if cfg["generated"] else "Fashion-MNIST", runs=len(runs_done), minutes=f"{minutes:.1f}"),
        command)
    table = Table("Final test FD and coverage at each loss's chosen learning rate (mean ± 95% CI over seeds); "
                  "paired per seed (FD: logistic − RLO; classes: RLO − logistic; > 0 favours RLO), MDE, verdicts on "
                  "\"RLO is better than the logistic loss\"", [
                      "training images", "metric", "logistic", "RLO k=2", "paired, > 0 favours RLO [95% CI]", "MDE",
                      "verdict", "unpaired"])
    sel = Table("Mean validation FD over seeds per learning rate (the selection; the test images play no part)",
                ["training images", "loss", *(f"lr {lr:g}" for lr in grid), "chosen"])
    chosen = {}
    for n in cfg["sizes"]:
        if not all((n, loss, lr) in res for loss in LOSSES for lr in grid):
            continue
        runs = {}
        for loss in LOSSES:
            chosen[(n, loss)], runs[loss] = choose_lr(cfg, res, n, loss)
            vals = {g: np.mean([r["fd_val"] for r in res[(n, loss, g)]]) for g in grid}
            sel.rows.append([f"{n:,}", label(loss), *(f"**{vals[g]:.3f}**" if g == chosen[(n, loss)] else f"{vals[g]:.3f}"
                                                      for g in grid), f"{chosen[(n, loss)]:g}"])
        for key, name, higher in (("fd_test", "FD to the test images", False), ("classes", "classes covered (of 10)", True),
                                  ("top_share", "largest class share (%)", False)):
            scale = 100 if key == "top_share" else 1
            v = {loss: [r[key] * scale for r in runs[loss]] for loss in LOSSES}
            ce, rlo = interval(v["ce"]), interval(v["root"])
            p = paired(v["root"], v["ce"], higher)
            table.rows.append([f"{n:,}", name, fmt(ce, 3), fmt(rlo, 3), *comparison_cells(p, rlo, ce, higher, 3)])
            if key == "fd_test":
                sec.notes.append(f"{n:,} images: the FD of the validation to the test images themselves (a perfect "
                                 f"generator's score, up to sampling) is {runs['ce'][0]['fd_floor']:.2f}.")
                sec.add_headline(f"GAN: RLO lowers the FD ({n:,} Fashion-MNIST images)",
                                 f"DCGAN, lr tuned on validation FD (logistic {chosen[(n, 'ce')]:g}, RLO "
                                 f"{chosen[(n, 'root')]:g})", "better FID with limited data (StyleGAN2-ADA)",
                                 f"{fmt(ce, 2)} vs {fmt(rlo, 2)}", p, 3)
    sec.tables += [table, sel]
    present = [n for n in cfg["sizes"] if (n, "ce") in chosen]
    if present:
        sec.add_figure(samples_figure(res, present, chosen, ctx.out), "Seed 0's final samples (64 of the fixed "
                       "latents) at each loss's chosen learning rate, per number of training images")
    return sec


def samples_figure(res, present, chosen, out):
    plt = pyplot()
    fig, axes = plt.subplots(len(present), 2, figsize=(7, 3.7 * len(present)), squeeze=False)
    for i, n in enumerate(present):
        for j, loss in enumerate(LOSSES):
            r = res[(n, loss, chosen[(n, loss)])][0]
            images = r["samples"][:, 0]
            side = int(np.ceil(np.sqrt(len(images))))
            canvas = np.full((side * 29 - 1, side * 29 - 1), 255, dtype=np.uint8)
            for index, image in enumerate(images):
                row, col = divmod(index, side)
                canvas[row * 29:row * 29 + 28, col * 29:col * 29 + 28] = image
            axes[i][j].imshow(canvas, cmap="gray_r", vmin=0, vmax=255)
            axes[i][j].set_title(f"{n:,} images, {label(loss)}, lr {chosen[(n, loss)]:g}: FD {r['fd_test']:.2f}",
                                 fontsize=8)
            axes[i][j].axis("off")
    return save_figure(fig, out, "gan_images_samples.png", dpi=100)
