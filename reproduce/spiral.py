"""Figure 2: CE vs RLO FCNs of depth 2/3/4 on the 2-D spiral, each loss's Adam learning rate chosen on a
validation split."""
import os

import numpy as np

from .common import first_at, lr_text
from .report import Section, Table, comparison_cells, method
from .stats import choose, fmt, interval, paired, reach, seeds_needed

TITLE = "Figure 2: fully-connected nets on the 2-D spiral"
FULL = dict(spiral=(("fcn2", 1000), ("fcn3", 100), ("fcn4", 50)), lr_grid=(0.005, 0.01, 0.02), val_frac=0.2)
QUICK = dict(FULL, spiral=(("fcn2", 100), ("fcn3", 10), ("fcn4", 5)))
METHODS = (("lr", None), ("rlo", 3.0))
PAPER_GAIN = 1.0  # the smallest gain the paper reports (+1 to +4.3 points)


def task(model, iters, seed, cfg, figure):
    """CE and RLO (k=3) FCNs on one seeded spiral (data, 70/30 split and initialisation all from the seed)
    at every learning rate of the grid, trained on the training part minus its last `val_frac` (the
    validation rows): {(method, lr): validation accuracy, test accuracy and curve}."""
    import torch

    import regression

    args = regression.parse_args(["--dataset", "spiral", "--model", model, "--iters", str(iters), "--optimizer",
                                  "adam", "--lr", "0.01", "--k", "3", "--seed", str(seed), "--quiet"])
    ds = regression.load(args)
    ((train, test),) = regression.splits(ds, args)
    n_val = int(round(cfg["val_frac"] * len(train)))
    fit, val = train[:-n_val], train[-n_val:]
    Xtr, ytr, Xte, yte, scaler = regression.fold_tensors(ds, fit, test, True)
    _, _, Xval, yval, _ = regression.fold_tensors(ds, fit, val, True)  # scaled by the same fit rows
    out, shown = {}, {}
    for lr in cfg["lr_grid"]:
        args.lr = lr
        for method, k in METHODS:
            run = regression.Run(args, method, k, ds.num_classes, Xtr, ytr, Xte, yte, seed=seed)
            with torch.no_grad():
                val_acc = regression.accuracy(regression.predict(run.forward(Xval)), yval)
            out[(method, lr)] = dict(val=val_acc, acc=run.test_acc, curve=run.curve[:, 2].tolist())
            if lr == 0.01:
                run.scaler, run.test_idx = scaler, test
                shown[(method, k)] = [run]
    if figure and shown:
        regression.plot_boundary(shown, ds, 3.0, figure, model)
    return out


def tasks(cfg, ctx):
    return {(model, seed): (task, dict(model=model, iters=iters, seed=seed, cfg=cfg,
                                       figure=os.path.join(ctx.out, f"spiral_{model}_boundary.png") if seed == 0
                                       else None))
            for model, iters in cfg["spiral"] for seed in range(cfg["seeds"])}


def report(cfg, res, ctx, command):
    sec = Section("spiral", TITLE, *method("spiral", iterations="/".join(str(i) for _, i in cfg["spiral"]),
                                                seeds=cfg["seeds"], lr_grid=lr_text(cfg["lr_grid"]), val_frac=cfg["val_frac"]),
                  command)
    table = Table("Test accuracy (%) and Adam iterations to 90% test accuracy (mean ± 95% CI over seeds) at each "
                  "loss's chosen learning rate; paired RLO − CE per seed [95% CI], MDE, verdicts", [
        "model", "paper", "lr chosen (CE / RLO)", "CE acc", "RLO acc", "RLO − CE [95% CI]", "MDE", "verdict (acc)",
        "unpaired", f"seeds to detect +{PAPER_GAIN:g}", "CE iters to 90%", "RLO iters to 90%", "verdict (speed)"])
    for model, _ in cfg["spiral"]:
        seeds = res.get(model)
        if seeds:
            table.rows.append(model_row(cfg, model, seeds, sec))
            path = os.path.join(ctx.out, f"spiral_{model}_boundary.png")
            if os.path.exists(path):
                sec.add_figure(path, f"Decision regions of {model} (seed 0, lr 0.01 for both losses), CE and RLO, "
                                     f"test points on top")
    sec.tables.append(table)
    sec.notes.append(f"Seeds to detect: the number of seeds a paired t-test (two-sided 5%, 80% power) needs to "
                     f"detect the paper's smallest gain (+{PAPER_GAIN:g} point) at the observed spread of the "
                     f"paired differences.")
    return sec


def model_row(cfg, model, seeds, sec):
    """One net's row at each loss's chosen learning rate (and its headline row)."""
    grid = list(cfg["lr_grid"])
    chosen = {m: choose(grid, {lr: np.mean([s[(m, lr)]["val"] for s in seeds]) for lr in grid}) for m, _ in METHODS}
    runs = {m: [s[(m, chosen[m])] for s in seeds] for m, _ in METHODS}
    acc = {m: [r["acc"] for r in runs[m]] for m in runs}
    ce, rlo = interval(acc["lr"]), interval(acc["rlo"])
    budget = len(runs["lr"][0]["curve"]) - 1
    iters = {m: [first_at(r["curve"], lambda a: a >= 90) for r in runs[m]] for m in runs}
    speed = {m: reach(iters[m], budget) for m in runs}
    p = paired(acc["rlo"], acc["lr"])
    p_speed = paired(iters["rlo"], iters["lr"], higher_is_better=False, budget=budget)
    need = seeds_needed(PAPER_GAIN, p["sd"])
    sec.add_headline(f"Fig. 2: RLO > CE on the spiral ({model})",
                     f"Adam, lr tuned on validation (CE {chosen['lr']:g}, RLO {chosen['rlo']:g})",
                     "+1 to +4.3 points", f"{fmt(ce)} vs {fmt(rlo)}", p)
    return [model, "RLO +1 to +4.3", f"{chosen['lr']:g} / {chosen['rlo']:g}", fmt(ce), fmt(rlo),
            *comparison_cells(p, rlo, ce), need or "n/a", speed["lr"][1], speed["rlo"][1], p_speed["verdict"]]
