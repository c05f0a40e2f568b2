"""The repo's demo (`make demo`): the paper's convex claims, offline, in about a minute on 2 CPU cores.

1. Table 1 / Figure 1 on Wine: logistic regression vs rooted logistic regression, 5-fold CV, every
   k in 3..20 (`regression.py --dataset wine --sweep-k 3:20`).
2. Figure 2: 2/3/4-layer fully-connected nets on the 2-D spiral (1000/100/50 iterations, lr 0.01,
   k = 3), cross-entropy vs RLO, mean over 3 seeded 70/30 splits.
Prints the tables and the paths of the plots.
"""
import os

from engine import ArgumentParser, cli, read_csv
import regression

SPIRAL = [("fcn2", 1000), ("fcn3", 100), ("fcn4", 50)]


def first_iter_at(curves, method, k, level):
    """First iteration where the split-mean test accuracy of `method` reaches `level` %, or None."""
    for row in curves:
        if row["method"] == method and row["k"] in (k, "") and row["test_acc"] >= level:
            return int(row["iter"])
    return None


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
    p.add_argument("--optimizer", default="adam", choices=["gd", "adam"],
                   help="optimizer of the spiral FCNs (see the README: plain GD at lr 0.01 barely moves them)")
    p.add_argument("--repeats", type=int, default=3, help="seeded 70/30 spiral splits")
    args = p.parse_args(argv)
    overwrite = ["--overwrite"] if args.overwrite else []

    print("== 1. Wine: LR vs RLO (paper Table 1 / Figure 1) ==")
    regression.main(["--dataset", "wine", "--sweep-k", "3:20", "--out", os.path.join(args.out, "wine"), *overwrite])

    print(f"\n== 2. Spiral: FCNs, CE vs RLO k=3 (paper Figure 2), {args.optimizer} lr 0.01, "
          f"{args.repeats} x 70/30 split ==")
    print(f"{'model':6s} {'iters':>5s}  {'CE acc':>14s}  {'RLO acc':>14s}  {'RLO-CE':>6s}  "
          f"{'iters to 90% test acc (CE / RLO)':>32s}")
    pngs = []
    for model, iters in SPIRAL:
        out = os.path.join(args.out, f"spiral_{model}")
        rows = regression.main(["--dataset", "spiral", "--model", model, "--iters", str(iters), "--k", "3",
                                "--optimizer", args.optimizer, "--repeats", str(args.repeats), "--out", out,
                                "--quiet", *overwrite])
        acc = {r["method"]: (r["test_acc_mean"], r["test_acc_std"]) for r in rows}
        curves = read_csv(os.path.join(out, "curves.csv"))
        speed = [first_iter_at(curves, m, 3.0, 90.0) for m in ("lr", "rlo")]
        speed = " / ".join("never" if s is None else str(s) for s in speed)
        print(f"{model:6s} {iters:5d}  {acc['lr'][0]:6.2f} +- {acc['lr'][1]:4.2f}  {acc['rlo'][0]:6.2f} +- "
              f"{acc['rlo'][1]:4.2f}  {acc['rlo'][0] - acc['lr'][0]:+6.2f}  {speed:>32s}")
        pngs += [os.path.join(out, "boundary.png"), os.path.join(out, "convergence.png")]
    print("paper Figure 2: RLO 1 to 4.3 points above CE")
    print("plots:\n  " + "\n  ".join([os.path.join(args.out, "wine", "convergence.png")] + pngs))


if __name__ == "__main__":
    cli(main)
