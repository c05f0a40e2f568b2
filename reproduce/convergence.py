"""Figure 1: convergence of GD on LR and RLO, with LR at RLO's initial gradient scale as the control."""
import copy

import numpy as np

from .common import UCI, first_at, fold, pyplot, save_figure, uci_args, uci_present
from .report import Section, Table, comparison_cells, method
from .stats import paired, reach

TITLE = "Figure 1: convergence of GD on LR and RLO, with the step-size control"
FULL = dict(lr=0.01, conv_iters=3000, lbfgs_iters=3000)
QUICK = dict(FULL, conv_iters=60, lbfgs_iters=50)
SCALED = "LR, step x C^(1/k)"  # the control
# Iterations to cover these fractions of the way from w = 0 to the optimum (loss, accuracy).
LEVELS = {"loss": (0.5, 0.8), "acc": (0.9, 0.95)}


def task(dataset, data_dir, index, cfg):
    """Training curves of LR, LR with its step times C^(1/k), and RLO(k) on one training fold, and each
    objective's minimum (L-BFGS), for the iterations to fixed loss and accuracy levels."""
    import torch

    import regression

    args = uci_args(dataset, data_dir, cfg["seeds"], cfg["conv_iters"], cfg["lr"])
    ds = regression.load(args)
    train, test = fold(ds, args, index)
    Xtr, ytr, Xte, yte, _ = regression.fold_tensors(ds, train, test, True)
    k = float(regression.PAPER[dataset][1])
    binary = ds.num_classes == 2
    n_out = 1 if binary else ds.num_classes
    X1 = torch.cat([Xtr, torch.ones(len(Xtr), 1, dtype=Xtr.dtype)], 1)
    optimum = {}
    for method in ("lr", "rlo"):
        loss, infimum = regression.make_loss(method, k, binary)
        theta, value, _ = regression.minimize(regression.risk(X1, ytr, loss, n_out), X1.shape[1] * n_out,
                                              cfg["lbfgs_iters"])
        optimum[method] = (theta, value - infimum)  # on the curves' scale (objective minus its infimum)
    out = X1 @ optimum["lr"][0].view(X1.shape[1], n_out)
    target_acc = regression.accuracy(regression.predict(out.squeeze(1) if binary else out), ytr)
    runs = {}
    # RLO's gradient at w = 0 is LR's times C^(1/k) (C classes; 2^(1/k) for the binary loss).
    for name, method, factor in (("LR", "lr", 1.0), (SCALED, "lr", ds.num_classes ** (1 / k)), ("RLO", "rlo", 1.0)):
        a = copy.copy(args)
        a.lr = args.lr * factor
        curve = regression.Run(a, method, k if method == "rlo" else None, ds.num_classes, Xtr, ytr, Xte, yte, 0).curve
        best = min(optimum[method][1], curve[:, 0].min())
        gap = (curve[:, 0] - best) / (curve[0, 0] - best)  # 1 at w = 0, 0 at the optimum
        acc_gain = (curve[:, 1] - curve[0, 1]) / (target_acc - curve[0, 1])
        runs[name] = dict(gap=gap.tolist(), acc=curve[:, 1].tolist(),
                          loss_iters=[first_at(gap, lambda g, q=q: g <= 1 - q) for q in LEVELS["loss"]],
                          acc_iters=[first_at(acc_gain, lambda a, q=q: a >= q) for q in LEVELS["acc"]])
    return dict(runs=runs, target_acc=target_acc, k=k)


def tasks(cfg, ctx):
    return {((d, "cv"), i): (task, dict(dataset=d, data_dir=ctx.data_dir, index=i, cfg=cfg))
            for d in uci_present(ctx.data_dir) for i in range(cfg["seeds"])}


def report(cfg, res, ctx, command):
    sec = Section("convergence", TITLE, *method(
        "convergence", lr=cfg["lr"], conv_iters=cfg["conv_iters"],
        loss_levels=", ".join(f"{q:.0%}" for q in LEVELS["loss"]), acc_levels=", ".join(f"{q:.0%}" for q in LEVELS["acc"])),
        command)
    table = Table("Iterations to reach each level (mean ± 95% CI over folds); paired differences (baseline − RLO "
                  "iterations per fold [95% CI]), MDE and verdicts on \"RLO needs fewer iterations\" against LR "
                  "and against the step-scaled LR", [
        "data set (k)", "level", "LR", SCALED, "RLO", "LR − RLO [95% CI]", "MDE", "RLO vs LR", "unpaired",
        "scaled LR − RLO [95% CI]", "MDE", "RLO vs LR x C^(1/k)", "unpaired"])
    present = [d for d in UCI if (d, "cv") in res]
    for dataset in present:
        for kind, levels in LEVELS.items():
            for i, q in enumerate(levels):
                table.rows.append(level_row(cfg, dataset, res[(dataset, "cv")], kind, i, q, sec))
    sec.tables.append(table)
    if present:
        sec.add_figure(curves_figure(cfg, res, present, ctx.out), "Training objective (normalised to its own "
                       "minimum) and training accuracy per GD iteration, mean over folds")
    return sec


def level_row(cfg, dataset, folds, kind, i, q, sec):
    """Iterations of LR, the step-scaled LR and RLO to level `q` of `kind`, RLO against each; the first loss
    level also in the headline."""
    budget = cfg["conv_iters"]
    raw = {name: [f["runs"][name][f"{kind}_iters"][i] for f in folds] for name in folds[0]["runs"]}
    got = {name: reach(v, budget, 0) for name, v in raw.items()}
    p1 = paired(raw["RLO"], raw["LR"], higher_is_better=False, budget=budget)
    p2 = paired(raw["RLO"], raw[SCALED], higher_is_better=False, budget=budget)
    if kind == "loss" and i == 0:
        for p, base, what in ((p1, "LR", "LR"), (p2, SCALED, "LR at step x C^(1/k)")):
            sec.add_headline(f"Fig. 1: RLO converges faster ({dataset}, vs {what})",
                             f"GD iterations to {q:.0%} of the loss decrease", "faster (figure)",
                             f"{got[base][1]} vs {got['RLO'][1]}", p, 1)
    return [f"{dataset} ({folds[0]['k']:g})", f"{'training loss' if kind == 'loss' else 'training acc'} {q:.0%}",
            *(got[n][1] for n in ("LR", SCALED, "RLO")),
            *comparison_cells(p1, got["RLO"][0], got["LR"][0], False, 1),
            *comparison_cells(p2, got["RLO"][0], got[SCALED][0], False, 1)]


def curves_figure(cfg, res, present, out):
    """Training objective gap and training accuracy per iteration, mean over folds; its path."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(present), figsize=(4.2 * len(present), 7), squeeze=False)
    colors = {"LR": "tab:blue", SCALED: "tab:green", "RLO": "tab:red"}
    for j, dataset in enumerate(present):
        folds = res[(dataset, "cv")]
        for name, color in colors.items():
            gap = np.mean([f["runs"][name]["gap"] for f in folds], axis=0)
            acc = np.mean([f["runs"][name]["acc"] for f in folds], axis=0)
            label = name.replace("k)", f"{folds[0]['k']:g})")
            axes[0][j].plot(np.maximum(gap, 1e-12), color=color, label=label)
            axes[1][j].plot(acc, color=color, label=label)
        axes[1][j].axhline(np.mean([f["target_acc"] for f in folds]), color="k", ls=":", label="LR optimum")
        axes[0][j].set(yscale="log", xscale="symlog", title=f"{dataset}: training objective",
                       xlabel="GD iteration", ylabel="(L - min L) / (L(0) - min L)")
        axes[1][j].set(xscale="symlog", title=f"{dataset}: training accuracy", xlabel="GD iteration",
                       ylabel="training accuracy (%)")
        for ax in axes[:, j]:
            ax.set_xlim(0, cfg["conv_iters"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, out, "convergence.png")
