"""Helpers the section modules share: UCI folds, quiet runs, curves, matplotlib."""
import contextlib
import math
import os

import numpy as np

from engine import UserError, atomic_savefig, read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_UCI = os.path.join(ROOT, "..", "shared", "data", "uci")
SHARED_VISION = os.path.join(ROOT, "..", "shared", "data", "vision")
UCI = ("wine", "ionosphere", "madelon", "spectf")


def first_at(curve, ok):
    """First iteration / epoch index whose value satisfies `ok`, or inf."""
    hits = np.flatnonzero(ok(np.asarray(curve, dtype=float)))
    return float(hits[0]) if hits.size else math.inf


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out, name, **savefig_kwargs):
    """Lay out, write atomically to out/name and close a pyplot figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out, name)
    atomic_savefig(fig, path, **savefig_kwargs)
    plt.close(fig)
    return path


@contextlib.contextmanager
def quiet(path):
    """Send a task's prints (train.py's progress) to a log file instead of the terminal."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def train_run(argv):
    """Run train.py with `argv` (holding --out) quietly; its metrics.csv rows. The checkpoints are removed: the
    sections keep only the metrics."""
    import train

    out = argv[argv.index("--out") + 1]
    with quiet(os.path.join(out, "log.txt")):
        train.main(argv + ["--overwrite"])
    for name in ("last.pt", "best.pt"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return read_csv(os.path.join(out, "metrics.csv"))


def train_grid(cfg, ctx, section, losses, task, argv):
    """The runs of a deep-net section: {((net, loss, k, m, lr), seed): (task, {"argv": ...})} over cfg's nets,
    learning-rate grid and seeds, each run in its own folder under the cache; argv(net, net_flags, loss, k, m,
    lr, seed, out) builds a run's train.py arguments."""
    out = {}
    for net, flags in cfg["nets"]:
        for loss, k, m in losses:
            for lr in cfg["lr_grid"]:
                for seed in range(cfg["seeds"]):
                    run = os.path.join(ctx.cache, "runs", section, f"{net}_{loss}_k{k:g}_m{m:g}_lr{lr:g}_seed{seed}")
                    out[((net, loss, k, m, lr), seed)] = (task, dict(argv=argv(net, flags, loss, k, m, lr, seed, run)))
    return out


def uci_args(dataset, data_dir, folds, iters, lr=0.01):
    import regression

    return regression.parse_args(["--dataset", dataset, "--data-dir", data_dir, "--folds", str(folds),
                                  "--iters", str(iters), "--lr", f"{lr!r}", "--quiet"])


def fold(ds, args, index):
    """(train, test) indices: CV fold `index`, or UCI's own SPECTF split for index 'official'."""
    import regression
    from data.tabular import spectf_official_split

    return spectf_official_split(args.data_dir) if index == "official" else regression.splits(ds, args)[index]


def has_uci(dataset, data_dir):
    from data.tabular import load_tabular

    try:
        load_tabular(dataset, data_dir)
        return True
    except UserError:
        return False


def uci_present(data_dir):
    return [d for d in UCI if d == "wine" or has_uci(d, data_dir)]


def lr_text(grid):
    return "{" + ", ".join(f"{g:g}" for g in grid) + "}"
