"""Compare training runs: test accuracy and test (validation) loss against epoch and wall time.

    python plot.py runs/cifar10_vit_ce runs/cifar10_vit_root_k3_m3 --out compare.png

Reads each run folder's metrics.csv (and args.json for the legend: loss, k, m) and writes one PNG
with four panels, the layout of the paper's Figure 3 (accuracy / loss vs epoch and vs seconds).
"""
import json
import os

from engine import ArgumentParser, UserError, atomic_savefig, cli, read_csv
from losses import is_rooted

COLUMNS = ("epoch", "wall_seconds", "test_acc", "test_loss")  # of train.py's metrics.csv


def label(run):
    try:
        with open(os.path.join(run, "args.json")) as f:
            a = json.load(f)
    except (OSError, ValueError):
        return os.path.basename(os.path.normpath(run))
    rlo = f" k={a['k']:g} m={a['m']:g}" if is_rooted(a.get("loss")) else ""
    return f"{a.get('net')} {a.get('loss')}{rlo}"


def load(run):
    path = os.path.join(run, "metrics.csv")
    if not os.path.isfile(path):
        raise UserError(f"{run}: no metrics.csv (is it a train.py run folder?)")
    rows = read_csv(path)
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise UserError(f"{path} is not a train.py metrics.csv: no column {', '.join(missing)}")
    rows = [r for r in rows if r["test_acc"] != ""]  # epochs without an evaluation
    if not rows:
        raise UserError(f"{path} has no evaluated epochs yet")
    return rows


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by train.py")
    p.add_argument("--out", default="compare.png", help="PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: none)")
    args = p.parse_args(argv)
    data = [(label(r), load(r)) for r in args.runs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name, rows in data:
        for col, (x_key, x_label) in enumerate((("epoch", "epoch"), ("wall_seconds", "wall time (s)"))):
            x = [r[x_key] for r in rows]
            # markers: a run with a single evaluated epoch is a point, which a bare line would not draw
            axes[0, col].plot(x, [r["test_acc"] for r in rows], marker="o", ms=3, label=name)
            axes[1, col].plot(x, [r["test_loss"] for r in rows], marker="o", ms=3, label=name)
            axes[0, col].set(xlabel=x_label, ylabel="test accuracy (%)")
            axes[1, col].set(xlabel=x_label, ylabel="test loss (each run's own objective)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    atomic_savefig(fig, args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    cli(main)
