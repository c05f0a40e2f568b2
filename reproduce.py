"""`make reproduce`: every claim of the two RLO papers re-run here, with seeds or folds, 95% confidence
intervals and a computed verdict per row, in one report (REPRODUCTION.md, figures under reproduction/).

    python reproduce.py                                   # everything, REPRODUCTION.md + reproduction/
    python reproduce.py --quick --out runs/reproduce_quick # every section at a tiny size (about 2 min)
    python reproduce.py --sections table1 gan --jobs 2    # some sections (the report holds only those)
    python reproduce.py --llm                             # also run the 12-minute LLM pipeline first

Sections: table1 (paper Table 1 on the real UCI sets, with nested k selection and SPECTF's official
split), convergence (Figure 1, with LR at RLO's initial gradient scale C^(1/k) as the control), conditioning
(Lemma 2: Hessian condition numbers at matched points), spiral (Figure 2: FCNs of depth 2/3/4), digits
(train.py on real 8x8 digits: CE vs focal vs RLO with res18 and a small ViT), gan (8-Gaussian ring and
5x5 grid), llm (the AISTATS pipeline's table when runs/llm_demo exists). Independent runs (folds,
seeds, networks, losses) go to --jobs processes.
"""
import contextlib
import copy
import datetime
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import multiprocessing
import numpy as np

from engine import ArgumentParser, UserError, atomic_copy, atomic_save, atomic_savefig, atomic_write_text, cli, mean_ci, read_csv

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_UCI = os.path.join(ROOT, "..", "shared", "data", "uci")
SECTIONS = ("table1", "convergence", "conditioning", "spiral", "digits", "gan", "llm")
UCI = ("wine", "ionosphere", "madelon", "spectf")
DIGITS_LOSSES = (("ce", 3, 3), ("focal", 3, 3), ("root", 3, 3), ("root", 8, 10), ("root_convex", 3, 3))
# Sizes. Quick: every section, table and figure, in about 2 minutes on 2 cores (what the tests run).
FULL = dict(seeds=5, iters=200, lr=0.01, ks=(2, 3, 4, 5, 6, 8, 10, 12, 15, 20), inner_folds=5, conv_iters=3000,
            cond_l2=1e-3, lbfgs_iters=3000, spiral=(("fcn2", 1000), ("fcn3", 100), ("fcn4", 50)), spiral_scale=1,
            digits_epochs={"res18": 8, "vit_tiny": 10}, digits_bs={"res18": 64, "vit_tiny": 32}, digits_size=32,
            digits_max_steps=None,
            digits_nets=(("res18", ("--dimhead", "16")), ("vit_tiny", ("--dimhead", "192", "--patch", "8"))),
            gan_flags=(), gan_w1=1000)
QUICK = dict(FULL, seeds=2, iters=20, ks=(3, 6), inner_folds=2, conv_iters=60, lbfgs_iters=50, spiral_scale=10,
             digits_epochs={"res18": 1, "vit_tiny": 1}, digits_bs={"res18": 32, "vit_tiny": 32}, digits_size=16, digits_max_steps=2, gan_flags=("--steps", "40", "--n-eval", "400"), gan_w1=200)
SCALED = "LR, step x C^(1/k)"  # the convergence control
# Convergence: iterations to cover these fractions of the way from w = 0 to the optimum (loss, accuracy).
LEVELS = {"loss": (0.5, 0.8), "acc": (0.9, 0.95)}
DIGITS_LEVELS = (90.0, 95.0)

VERDICT_RULE = """Each row tests one claim of the form "A is better than B" (higher accuracy, fewer iterations,
a smaller condition number, ...). A and B are each summarised by the mean over independent runs (CV folds or
seeds, at least 5 in the full run) and its two-sided 95% Student-t confidence interval
(`engine.stats.mean_ci`; for a single deterministic train/test split, the binomial interval
p ± 1.96 sqrt(p (1 - p) / n) over its n test cases). The verdict compares the two intervals:
- **reproduced**: the intervals are disjoint and A's lies on the better side;
- **not reproduced**: the intervals are disjoint and A's lies on the worse side (the opposite effect);
- **inconclusive**: the intervals overlap (touching counts as overlap), or an interval is undefined.
A run that never reaches a level within its budget counts as the budget, which can only lower its group's
mean: the group's interval becomes [the lower end of that CI, infinity), which can still be disjoint from
the other's.
The paper's numbers are shown beside ours; the verdict is on the claim (the direction), not on matching
the paper's absolute numbers, which depend on preprocessing the paper does not state. Code:
`reproduce.verdict`, tested in tests/test_reproduce.py."""


# ---- statistics -------------------------------------------------------------------------------------

def interval(values, n=None):
    """(low, mean, high) of the 95% Student-t CI of the mean of `values`; with `n` (one deterministic
    split, `values` = [accuracy % over its n test cases]) the binomial interval."""
    x = np.asarray(values, dtype=float)
    if n is not None:
        p = x[0] / 100
        half = 196 * math.sqrt(p * (1 - p) / n)
        return x[0] - half, x[0], x[0] + half
    mean, half = mean_ci(x)
    return mean - half, mean, mean + half


def reach(values, budget, digits=1):
    """(interval, text) of iterations / epochs to a level. Runs that never reach it (inf) count as the
    budget, which can only lower the mean: the interval is [the lower end of that sample's CI, inf)."""
    x = np.asarray(values, dtype=float)
    never = int(np.isinf(x).sum())
    if not never:
        ci = interval(x)
        return ci, fmt(ci, digits)
    low, mean, _ = interval(np.where(np.isinf(x), budget, x))
    return (low, math.inf, math.inf), f"≥ {mean:.{digits}f} ({never}/{x.size} never within {budget:g})"


def verdict(a, b, higher_is_better=True):
    """The verdict on "A is better than B" from their (low, mean, high) 95% intervals (see VERDICT_RULE)."""
    (a_lo, _, a_hi), (b_lo, _, b_hi) = a, b
    if any(math.isnan(v) for v in (a_lo, a_hi, b_lo, b_hi)):
        return "inconclusive"
    if not higher_is_better:
        a_lo, a_hi, b_lo, b_hi = -a_hi, -a_lo, -b_hi, -b_lo
    if a_lo > b_hi:
        return "reproduced"
    if a_hi < b_lo:
        return "not reproduced"
    return "inconclusive"


def fmt(ci, digits=2):
    lo, mean, hi = ci
    if math.isnan(hi):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def fmt_g(ci):
    lo, mean, hi = ci
    return f"{mean:.4g}" if math.isnan(hi) else f"{mean:.4g} ± {(hi - lo) / 2:.2g}"


# ---- the report's structure ---------------------------------------------------------------------------

@dataclass
class Table:
    caption: str
    columns: list
    rows: list = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    claim: str
    setup: str
    command: str
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)  # (path, caption, command)
    notes: list = field(default_factory=list)
    headline: list = field(default_factory=list)  # [claim, setting, paper, ours, verdict]


def first_at(curve, ok):
    """First iteration / epoch index whose value satisfies `ok`, or inf."""
    hits = np.flatnonzero(ok(np.asarray(curve, dtype=float)))
    return float(hits[0]) if hits.size else math.inf


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _quiet(path):
    """Send a task's prints (train.py's progress) to a log file instead of the terminal."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _uci_args(dataset, data_dir, folds, iters, lr=0.01):
    import regression

    return regression.parse_args(["--dataset", dataset, "--data-dir", data_dir, "--folds", str(folds),
                                  "--iters", str(iters), "--lr", f"{lr!r}", "--quiet"])


def _fold(ds, args, fold):
    """(train, test) indices: CV fold `fold`, or UCI's own SPECTF split for fold 'official'."""
    import regression
    from data.tabular import spectf_official_split

    return spectf_official_split(args.data_dir) if fold == "official" else regression.splits(ds, args)[fold]


# ---- 1. Table 1 ---------------------------------------------------------------------------------------

def task_table1(dataset, data_dir, fold, cfg):
    """Test accuracy of LR and of RLO for every k on one outer fold, and the k that 5-fold CV inside the
    training part alone picks (nested selection)."""
    import regression
    from sklearn.model_selection import StratifiedKFold

    args = _uci_args(dataset, data_dir, cfg["seeds"], cfg["iters"], cfg["lr"])
    ds = regression.load(args)
    train, test = _fold(ds, args, fold)
    ks = sorted(set(cfg["ks"]) | {float(regression.PAPER[dataset][1])})

    def acc(method, k, tr, te):
        Xtr, ytr, Xte, yte, _ = regression.fold_tensors(ds, tr, te, True)
        return regression.Run(args, method, k, ds.num_classes, Xtr, ytr, Xte, yte, seed=0).test_acc

    inner = StratifiedKFold(cfg["inner_folds"], shuffle=True, random_state=1).split(ds.X[train], ds.y[train])
    inner_acc = np.mean([[acc("rlo", k, train[a], train[b]) for k in ks] for a, b in inner], axis=0)
    k_nested = ks[int(np.argmax(inner_acc))]  # ties: the smallest k
    rlo = {k: acc("rlo", k, train, test) for k in ks}
    return dict(lr=acc("lr", None, train, test), rlo=rlo, k_nested=k_nested, nested=rlo[k_nested], n_test=len(test))


def report_table1(cfg, res, out, command):
    import regression

    sec = Section("table1", "Table 1: rooted logistic regression vs logistic regression on the UCI sets",
                  "RLO(k) reaches a higher test accuracy than LR (paper Table 1, 5-fold CV).",
                  f"Linear model from w = 0, features standardised on each training fold, full-batch GD, lr "
                  f"{cfg['lr']:g}, {cfg['iters']} iterations (the settings of regression.py), {cfg['seeds']}-fold "
                  f"stratified CV (shuffle seed 0); the interval is over the {cfg['seeds']} test folds. k grid "
                  f"{', '.join(f'{k:g}' for k in cfg['ks'])} (plus the paper's k). Three ways to pick k: the paper's "
                  f"k; the k with the best mean test accuracy over the test folds (how the paper picks it: "
                  f"optimistic, since the test folds choose it); nested: on each outer fold, the k with the best "
                  f"mean accuracy over {cfg['inner_folds']}-fold CV inside the training part only, then tested "
                  f"on the outer fold (unbiased). Data: the original UCI files in ../shared/data/uci (Wine: "
                  f"scikit-learn's copy).", command)
    table = Table("Test accuracy (%), mean ± 95% CI over the CV folds", [
        "data set", "paper LR", "paper RLO (k)", "our LR", "our RLO, paper's k", "verdict", "our RLO, k picked on test folds",
        "our RLO, nested k (k chosen per fold)", "verdict (nested)"])
    for dataset in UCI:
        folds = res.get((dataset, "cv"))
        if folds is None:
            table.rows.append([dataset] + ["not run: data missing"] + [""] * 7)
            continue
        p_lr, p_k, p_rlo = regression.PAPER[dataset]
        lr = interval([f["lr"] for f in folds])
        rlo_p = interval([f["rlo"][float(p_k)] for f in folds])
        means = {k: np.mean([f["rlo"][k] for f in folds]) for k in folds[0]["rlo"]}
        k_test = max(means, key=means.get)
        rlo_t = interval([f["rlo"][k_test] for f in folds])
        nested = interval([f["nested"] for f in folds])
        ks = ", ".join(f"{f['k_nested']:g}" for f in folds)
        v, v_nested = verdict(rlo_p, lr), verdict(nested, lr)
        table.rows.append([dataset, f"{p_lr}", f"{p_rlo} ({p_k})", fmt(lr), fmt(rlo_p), v,
                           f"{fmt(rlo_t)} (k={k_test:g})", f"{fmt(nested)} (k: {ks})", v_nested])
        sec.headline.append([f"Table 1: RLO > LR ({dataset})", f"5-fold CV, k={p_k} / nested k",
                             f"{p_lr} vs {p_rlo}", f"{fmt(lr)} vs {fmt(rlo_p)} / {fmt(nested)}", f"{v} / {v_nested}"])
    sec.tables.append(table)
    official = res.get(("spectf", "official"))
    if official:
        (f,) = official
        n = f["n_test"]
        lr, rlo20, nested = (interval([v], n=n) for v in (f["lr"], f["rlo"][20.0], f["nested"]))
        sec.tables.append(Table(f"SPECTF, UCI's own split (train on SPECTF.train, 80 rows; test on SPECTF.test, {n} "
                                f"rows); one deterministic run, binomial 95% interval over the {n} test cases", [
            "model", "test accuracy (%)", "verdict vs LR"], [
            ["LR", fmt(lr), ""], ["RLO k=20 (the paper's k)", fmt(rlo20), verdict(rlo20, lr)],
            [f"RLO nested k={f['k_nested']:g} ({cfg['inner_folds']}-fold CV on the 80 training rows)", fmt(nested),
             verdict(nested, lr)]]))
    # Figure: test accuracy against k, LR as a band, the paper's RLO point.
    present = [d for d in UCI if (d, "cv") in res]
    if present:
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
        for ax, dataset in zip(axes[0], present):
            folds = res[(dataset, "cv")]
            ks = sorted(folds[0]["rlo"])
            cis = [interval([f["rlo"][k] for f in folds]) for k in ks]
            ax.errorbar(ks, [c[1] for c in cis], yerr=[(c[2] - c[0]) / 2 for c in cis], fmt="o-", color="tab:red",
                        capsize=3, label="our RLO(k)")
            lo, mean, hi = interval([f["lr"] for f in folds])
            ax.axhspan(lo, hi, color="tab:blue", alpha=0.2)
            ax.axhline(mean, color="tab:blue", label="our LR (band: 95% CI)")
            p_lr, p_k, p_rlo = regression.PAPER[dataset]
            ax.plot([p_k], [p_rlo], "k*", markersize=10, label="paper RLO")
            ax.axhline(p_lr, color="k", ls=":", label="paper LR")
            ax.set(xlabel="k", ylabel="test accuracy (%)", title=dataset, xscale="log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "table1_accuracy_vs_k.png")
        atomic_savefig(fig, path)
        plt.close(fig)
        sec.figures.append((path, "Test accuracy against k (mean ± 95% CI over the folds), LR and the paper's numbers",
                            command))
    return sec


# ---- 2. Convergence (Figure 1) -----------------------------------------------------------------------

def task_convergence(dataset, data_dir, fold, cfg):
    """Training curves of LR, LR with its step times C^(1/k), and RLO(k) on one training fold, and each
    objective's minimum (L-BFGS), for the iterations to fixed loss and accuracy levels."""
    import torch

    import regression

    args = _uci_args(dataset, data_dir, cfg["seeds"], cfg["conv_iters"], cfg["lr"])
    ds = regression.load(args)
    train, test = _fold(ds, args, fold)
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


def report_convergence(cfg, res, out, command):
    budget = cfg["conv_iters"]
    sec = Section("convergence", "Figure 1: convergence of GD on LR and RLO, with the step-size control",
                  "RLO converges faster than LR. Control: at w = 0 the gradient of RLO is C^(1/k) times LR's "
                  "(C classes: d/dz k(1+e^-z)^(1/k) = 2^(1/k) d/dz log(1+e^-z) at z = 0, and k(p^(-1/k) - 1) has "
                  "d/d log p = -p^(-1/k) = -C^(1/k) at p = 1/C), so part of any speed-up may be a larger effective "
                  "step; LR run with its step multiplied by C^(1/k) separates the two.",
                  f"Same models and folds as Table 1, RLO at the paper's k, GD lr {cfg['lr']:g} (and "
                  f"{cfg['lr']:g} x C^(1/k) for the control), up to {budget} iterations. Loss level q: the "
                  f"iteration where the method's own training objective has covered a fraction q of the way "
                  f"from its value at w = 0 to its minimum (found by L-BFGS on the same fold), q = "
                  f"{', '.join(f'{q:.0%}' for q in LEVELS['loss'])}. Accuracy level q: the iteration where the "
                  f"training accuracy has covered a fraction q of the way from its value at w = 0 to the training "
                  f"accuracy of the LR optimum (one fixed target for all three runs), q = "
                  f"{', '.join(f'{q:.0%}' for q in LEVELS['acc'])}. Intervals over the training folds.",
                  command)
    table = Table("Iterations to reach each level (mean ± 95% CI over folds); verdicts on \"RLO needs fewer "
                  "iterations\" against LR and against the step-scaled LR", [
        "data set (k)", "level", "LR", SCALED, "RLO", "RLO vs LR", "RLO vs LR x C^(1/k)"])
    present = [d for d in UCI if (d, "cv") in res]
    for dataset in present:
        folds = res[(dataset, "cv")]
        k = folds[0]["k"]
        for kind, levels in LEVELS.items():
            for i, q in enumerate(levels):
                got = {name: reach([f["runs"][name][f"{kind}_iters"][i] for f in folds], budget, 0)
                       for name in folds[0]["runs"]}
                v1 = verdict(got["RLO"][0], got["LR"][0], higher_is_better=False)
                v2 = verdict(got["RLO"][0], got[SCALED][0], higher_is_better=False)
                table.rows.append([f"{dataset} ({k:g})", f"{'training loss' if kind == 'loss' else 'training acc'} "
                                   f"{q:.0%}", *(got[n][1] for n in ("LR", SCALED, "RLO")), v1, v2])
                if kind == "loss" and i == 0:
                    sec.headline.append([f"Fig. 1: RLO converges faster ({dataset})",
                                         f"GD iterations to {q:.0%} of the loss decrease: LR / LR at step x C^(1/k) "
                                         f"vs RLO", "faster (figure)",
                                         f"{got['LR'][1]} / {got[SCALED][1]} vs {got['RLO'][1]}", f"{v1} / {v2}"])
    sec.tables.append(table)
    if present:
        plt = _pyplot()
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
                ax.set_xlim(0, budget)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "convergence.png")
        atomic_savefig(fig, path)
        plt.close(fig)
        sec.figures.append((path, "Training objective (normalised to its own minimum) and training accuracy per GD "
                                  "iteration, mean over folds", command))
    return sec


# ---- 3. Conditioning (Lemma 2) ------------------------------------------------------------------------

def task_conditioning(dataset, data_dir, fold, cfg):
    """Condition numbers of the LR and RLO risk Hessians at w = 0, at the LR optimum (the same point for
    both) and at each risk's own optimum (of the risk plus l2/2 ||w||^2), on one training fold."""
    import torch

    import regression

    args = _uci_args(dataset, data_dir, cfg["seeds"], cfg["iters"])
    ds = regression.load(args)
    train, test = _fold(ds, args, fold)
    Xtr, ytr, *_ = regression.fold_tensors(ds, train, test, True)
    k = float(regression.PAPER[dataset][1])
    binary = ds.num_classes == 2
    n_out = 1 if binary else ds.num_classes
    X1 = torch.cat([Xtr, torch.ones(len(Xtr), 1, dtype=Xtr.dtype)], 1)
    Q = regression.identifiable_basis(X1, n_out)
    losses = {m: regression.make_loss(m, k, binary)[0] for m in ("lr", "rlo")}
    l2 = cfg["cond_l2"]
    optimum, grads = {}, {}
    for m, loss in losses.items():
        optimum[m], _, grads[m] = regression.minimize(regression.risk(X1, ytr, loss, n_out, l2), X1.shape[1] * n_out,
                                                      cfg["lbfgs_iters"])

    def cond(m, theta):  # of the risk itself: the ridge only makes the optimum finite
        return regression.condition_number(regression.risk_hessian(X1, ytr, losses[m], n_out)(theta), Q)

    zero = torch.zeros_like(optimum["lr"])
    lr_at_lr = cond("lr", optimum["lr"])
    return dict(k=k, zero=(cond("lr", zero), cond("rlo", zero)), at_lr=(lr_at_lr, cond("rlo", optimum["lr"])),
                own=(lr_at_lr, cond("rlo", optimum["rlo"])), grad=max(grads.values()))


def report_conditioning(cfg, res, out, command):
    sec = Section("conditioning", "Lemma 2: conditioning of the RLO and LR risks",
                  "The RLO risk's Hessian is better conditioned than the LR risk's (a smaller condition number).",
                  f"Risks on each standardised training fold of Table 1 (RLO at the paper's k). The optima are "
                  f"those of each risk plus {cfg['cond_l2']:g}/2 ||w||^2 on the weights, so that they are finite "
                  f"also on separable data (Wine), found by L-BFGS (the largest gradient norm left is reported "
                  f"below); the condition numbers are those of the risks' own Hessians (without the ridge, which "
                  f"would favour the risk with the smaller curvature) at those points. Hessians by autograd, eigenvalues on the identifiable subspace (directions "
                  f"that change some logit difference; constant features and the softmax shift are excluded). "
                  f"Three matched points: w = 0, the LR optimum (both Hessians at the same w), and each risk at "
                  f"its own optimum. Intervals over the training folds.", command)
    table = Table("Condition number λmax/λmin (mean ± 95% CI over folds); verdict on \"RLO's is smaller\"", [
        "data set (k)", "point", "LR", "RLO", "verdict"])
    worst = 0.0
    for dataset in UCI:
        folds = res.get((dataset, "cv"))
        if not folds:
            continue
        worst = max(worst, max(f["grad"] for f in folds))
        for key, point in (("zero", "w = 0"), ("at_lr", "LR optimum (same w)"), ("own", "each at its own optimum")):
            lr, rlo = (interval([f[key][i] for f in folds]) for i in (0, 1))
            v = verdict(rlo, lr, higher_is_better=False)
            table.rows.append([f"{dataset} ({folds[0]['k']:g})", point, fmt_g(lr), fmt_g(rlo), v])
            if key == "own":
                sec.headline.append([f"Lemma 2: RLO better conditioned ({dataset})", "Hessian κ, each at its own optimum",
                                     "smaller (lemma)", f"{fmt_g(lr)} vs {fmt_g(rlo)}", v])
    sec.tables.append(table)
    sec.notes.append(f"Largest gradient norm at an L-BFGS optimum: {worst:.1e}. For two classes both Hessians at "
                     f"w = 0 are constant multiples of X^T X, so their condition numbers are equal there by "
                     f"construction (a check of the computation).")
    return sec


# ---- 4. Spiral FCNs (Figure 2) -----------------------------------------------------------------------

def task_spiral(model, iters, seed, figure):
    """CE and RLO (k=3) FCNs on one seeded spiral (data, 70/30 split and initialisation all from the seed)."""
    import regression

    args = regression.parse_args(["--dataset", "spiral", "--model", model, "--iters", str(iters), "--optimizer",
                                  "adam", "--lr", "0.01", "--k", "3", "--seed", str(seed), "--quiet"])
    ds = regression.load(args)
    ((train, test),) = regression.splits(ds, args)
    Xtr, ytr, Xte, yte, scaler = regression.fold_tensors(ds, train, test, True)
    results = {}
    for method, k in (("lr", None), ("rlo", 3.0)):
        run = regression.Run(args, method, k, ds.num_classes, Xtr, ytr, Xte, yte, seed=seed)
        run.scaler, run.test_idx = scaler, test
        results[(method, k)] = [run]
    if figure:
        regression.plot_boundary(results, ds, 3.0, figure, model)
    return {m: dict(acc=r[0].test_acc, curve=r[0].curve[:, 2].tolist()) for (m, _), r in results.items()}


def report_spiral(cfg, res, out, command):
    depths = cfg["spiral"]
    sec = Section("spiral", "Figure 2: fully-connected nets on the 2-D spiral",
                  "FCNs trained with RLO reach a higher test accuracy than with CE (the paper: 1 to 4.3 points "
                  "higher, FCN with 2/3/4 layers).",
                  f"regression.py's spiral (1500 points, two arms, 1.5 turns, noise 0.04), a 70/30 split, ReLU "
                  f"FCNs with 1/2/3 hidden layers of 100 units (fcn2/3/4), CE vs RLO (root_convex, k = m = 3), "
                  f"full-batch Adam lr 0.01 (the paper does not state its optimizer), "
                  f"{'/'.join(str(max(1, i // cfg['spiral_scale'])) for _, i in depths)} iterations, "
                  f"{cfg['seeds']} seeds (each seed draws the data, the split and the initialisation).", command)
    table = Table("Test accuracy (%) and Adam iterations to 90% test accuracy (mean ± 95% CI over seeds)", [
        "model", "paper", "CE acc", "RLO acc", "verdict (acc)", "CE iters to 90%", "RLO iters to 90%", "verdict (speed)"])
    for model, iters in depths:
        seeds = res.get(model)
        if not seeds:
            continue
        ce, rlo = (interval([s[m]["acc"] for s in seeds]) for m in ("lr", "rlo"))
        budget = len(seeds[0]["lr"]["curve"]) - 1
        speed = {m: reach([first_at(s[m]["curve"], lambda a: a >= 90) for s in seeds], budget) for m in ("lr", "rlo")}
        v_acc = verdict(rlo, ce)
        v_speed = verdict(speed["rlo"][0], speed["lr"][0], higher_is_better=False)
        table.rows.append([model, "RLO +1 to +4.3", fmt(ce), fmt(rlo), v_acc, speed["lr"][1], speed["rlo"][1], v_speed])
        sec.headline.append([f"Fig. 2: RLO > CE on the spiral ({model})", f"Adam, {cfg['seeds']} seeds", "+1 to +4.3 points",
                             f"{fmt(ce)} vs {fmt(rlo)}", v_acc])
        path = os.path.join(out, f"spiral_{model}_boundary.png")
        if os.path.exists(path):
            sec.figures.append((path, f"Decision regions of {model} (seed 0), CE and RLO, test points on top", command))
    sec.tables.append(table)
    return sec


# ---- 5. Deep nets on real digits (train.py --dataset digits) -------------------------------------------

def digits_argv(cfg, net, net_flags, loss, k, m, seed, out):
    argv = ["--dataset", "digits", "--net", net, *net_flags, "--loss", loss, "--k", f"{k:g}", "--m", f"{m:g}",
            "--epochs", str(cfg["digits_epochs"][net]), "--bs", str(cfg["digits_bs"][net]), "--lr", "1e-3", "--opt", "adamw",
            "--aug", "none", "--size", str(cfg["digits_size"]), "--amp", "--workers", "0", "--device", "cpu",
            "--seed", str(seed), "--out", out]
    return argv + (["--steps-per-epoch", str(cfg["digits_max_steps"])] if cfg["digits_max_steps"] else [])


def task_digits(argv):
    """One train.py run; its per-epoch test accuracy. The checkpoints (45 MB for res18) are removed."""
    import train

    out = argv[argv.index("--out") + 1]
    with _quiet(os.path.join(out, "log.txt")):
        train.main(argv + ["--overwrite"])
    rows = read_csv(os.path.join(out, "metrics.csv"))
    for name in ("last.pt", "best.pt"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    return dict(test_acc=[r["test_acc"] for r in rows], seconds=rows[-1]["wall_seconds"])


def digits_label(loss, k, m):
    return {"ce": "CE", "focal": "focal (γ=3)"}.get(loss) or f"{loss} k={k:g} m={m:g}"


def report_digits(cfg, res, out, command, cifar_note):
    epochs = cfg["digits_epochs"]
    sizes = ", ".join(f"{net} {e} epochs at batch {cfg['digits_bs'][net]}" for net, e in epochs.items())
    sec = Section("digits", "Deep nets: CE vs focal vs RLO on real handwritten digits",
                  "Training with RLO converges faster (fewer epochs to a given test accuracy) and reaches a "
                  "higher final accuracy than CE (paper: CIFAR-10/100, Tiny-ImageNet, Food-101 with ResNets and ViTs).",
                  f"`train.py --dataset digits`: scikit-learn's 1797 real 8x8 digits, upscaled to "
                  f"{cfg['digits_size']}x{cfg['digits_size']}, first 1437 train / last 360 test, no augmentation. "
                  f"AdamW lr 1e-3 (wd 0.01), cosine schedule, {sizes}; bf16 "
                  f"autocast on CPU, {cfg['seeds']} seeds (initialisation and shuffling)"
                  + (f", at most {cfg['digits_max_steps']} steps per epoch" if cfg["digits_max_steps"] else "")
                  + ". Networks, narrowed to fit a CPU budget: res18 at width 16 (`--dimhead 16`: ResNet-18 in CIFAR form "
                  "with stage widths 16/32/64/128, 0.70M parameters; the paper's has 64/128/256/512, 11.2M) and "
                  "vit_tiny at width 192, patch 8 (4 blocks, 6 heads of 64, MLP 256; 1.6M parameters). Losses: CE, focal "
                  "(α 0.25, γ 3), root (m(1 - p^(1/k))) with k=3,m=3 and k=8,m=10, root_convex k=3,m=3. Epochs to "
                  "a level count from 1; a run that never reaches it counts as at least the budget.", command)
    table = Table("Test accuracy (%) after the last epoch and epochs to 90% / 95% test accuracy (mean ± 95% CI over "
                  "seeds); verdicts on \"this loss is better than CE\"", [
        "net", "loss", "final acc", "verdict (acc)", "epochs to 90%", "epochs to 95%", "verdict (epochs to 95%)"])
    curves = {}
    for net, _ in cfg["digits_nets"]:
        ce = None
        for loss, k, m in DIGITS_LOSSES:
            runs = res.get((net, loss, k, m))
            if not runs:
                continue
            final = interval([r["test_acc"][-1] for r in runs])
            speed = [reach([first_at(r["test_acc"], lambda a, lv=lv: a >= lv) + 1 for r in runs], epochs[net])
                     for lv in DIGITS_LEVELS]
            curves[(net, digits_label(loss, k, m))] = np.mean([r["test_acc"] for r in runs], axis=0)
            if loss == "ce":
                ce = (final, speed)
                table.rows.append([net, "CE", fmt(final), "(baseline)", speed[0][1], speed[1][1], "(baseline)"])
                continue
            v_acc = verdict(final, ce[0]) if ce else "inconclusive"
            v_speed = verdict(speed[1][0], ce[1][1][0], higher_is_better=False) if ce else "inconclusive"
            table.rows.append([net, digits_label(loss, k, m), fmt(final), v_acc, speed[0][1], speed[1][1], v_speed])
            if loss == "root" and k == 8 and ce:
                sec.headline.append([f"Deep nets: RLO > CE (digits, {net})", f"root k=8 m=10, {epochs[net]} epochs: final "
                                     f"acc / epochs to 95%", "faster, more accurate (CIFAR)",
                                     f"{fmt(ce[0])} vs {fmt(final)} / {ce[1][1][1]} vs {speed[1][1]}", f"{v_acc} / {v_speed}"])
    sec.tables.append(table)
    sec.tables.append(Table("CIFAR-10 / CIFAR-100 (the paper's own sets)", ["data set", "status"],
                            [["CIFAR-10, CIFAR-100", cifar_note]]))
    if curves:
        plt = _pyplot()
        nets = [n for n, _ in cfg["digits_nets"]]
        fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4), squeeze=False)
        for ax, net in zip(axes[0], nets):
            for (n, label), curve in curves.items():
                if n == net:
                    ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=label)
            for lv in DIGITS_LEVELS:
                ax.axhline(lv, color="grey", lw=0.6, ls=":")
            ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"digits, {net}: mean of {cfg['seeds']} seeds",
                   ylim=(max(0, min(c.min() for c in curves.values()) - 5), 100.5))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "digits_test_accuracy.png")
        atomic_savefig(fig, path)
        plt.close(fig)
        sec.figures.append((path, "Test accuracy per epoch on digits, mean over seeds", command))
    return sec


# ---- 6. GAN -------------------------------------------------------------------------------------------

class _Rows:
    def __init__(self):
        self.rows = []

    def log(self, **row):
        self.rows.append(row)


def task_gan(data, loss, seed, flags, n_w1, out):
    """One gan.py run at its default setup; the final mode metrics, a 2-D Wasserstein-1 estimate against
    fresh real samples, and the final samples (for the figure)."""
    import torch

    import gan

    torch.set_num_threads(1)
    args = gan.build_parser().parse_args(["--data", data, "--loss", loss, "--k", "2", "--plots", "0", "--out", out,
                                          *flags])
    logger = _Rows()
    samples, modes, hq = gan.train_run(args, loss, seed, logger)
    centers, std = gan.mode_centers(data)
    floor = gan.sample_real(centers, std, n_w1, torch.Generator().manual_seed(30_000 + seed))
    return dict(modes=modes, n_modes=len(centers), hq=hq, w1=gan.w1_to_real(samples, centers, std, seed, n_w1),
                w1_real=gan.w1_to_real(floor, centers, std, seed, n_w1), samples=samples.numpy()[:1000], steps=args.steps,
                history=[(r["step"], r["modes"]) for r in logger.rows])


def report_gan(cfg, res, out, command):
    import gan

    defaults = gan.build_parser().parse_args(list(cfg["gan_flags"]))
    sec = Section("gan", "GAN: rooted GAN loss (k = 2) vs the logistic GAN loss on 2-D mixtures",
                  "RLO improves GAN training (paper: StyleGAN2-ADA FID with limited data, which needs GPUs and is "
                  "not rerun here; this is the offline mode-coverage benchmark). Baseline check first: a plain "
                  "MLP GAN with the logistic loss covers about 6 of the 8 ring modes (PacGAN, Lin et al. 2018).",
                  f"gan.py at its defaults: G {defaults.g_layers} hidden layers (ReLU) and D {defaults.d_layers} "
                  f"hidden layers (LeakyReLU 0.2) of {defaults.hidden} units (PacGAN used 400; 128 keeps a run at "
                  f"about 30 s on one core), z in R^{defaults.z_dim}, Adam lr {defaults.lr:g} (betas 0.5, 0.999), "
                  f"batch {defaults.batch}, {defaults.steps} steps of one D and one G update. Ring: 8 Gaussians, "
                  f"radius 2, std 0.02; grid: 25 Gaussians, spacing 2, std 0.05. Metrics on {defaults.n_eval} "
                  f"samples from fixed latents: high quality = within 3 std of the nearest mode; a mode is covered "
                  f"with at least {defaults.min_count} high-quality samples; W1 = exact optimal-transport distance "
                  f"between {cfg['gan_w1']} generated and {cfg['gan_w1']} fresh real samples (the floor: between "
                  f"two real sample sets). {cfg['seeds']} seeds; both losses see the same initial weights and draws "
                  f"per seed.", command)
    table = Table("Final metrics (mean ± 95% CI over seeds); verdicts on \"RLO is better than CE\"", [
        "data", "metric", "reference", "CE", "RLO k=2", "verdict"])
    for data in ("ring", "grid"):
        runs = {loss: res.get((data, loss)) for loss in ("ce", "root")}
        if not all(runs.values()):
            continue
        n_modes = runs["ce"][0]["n_modes"]
        for key, name, higher, ref in (("modes", f"modes covered (of {n_modes})", True,
                                        "≈6 of 8 (PacGAN)" if data == "ring" else ""),
                                       ("hq", "high-quality share (%)", True, ""),
                                       ("w1", "W1 to real samples", False,
                                        f"floor {np.mean([r['w1_real'] for r in runs['ce']]):.3f}")):
            scale = 100 if key == "hq" else 1
            ce, rlo = (interval([r[key] * scale for r in runs[loss]]) for loss in ("ce", "root"))
            v = verdict(rlo, ce, higher)
            table.rows.append([data, name, ref, fmt(ce, 3 if key == "w1" else 2), fmt(rlo, 3 if key == "w1" else 2), v])
            if key == "modes":
                sec.headline.append([f"GAN: RLO covers more modes ({data})", f"MLP GAN, {cfg['seeds']} seeds",
                                     "better FID (StyleGAN2-ADA, not 2-D)", f"{fmt(ce)} vs {fmt(rlo)} of {n_modes}", v])
        if data == "ring":
            first3 = [r["modes"] for r in runs["ce"][:3]]
            ok = sum(m >= 6 for m in first3) >= 2
            sec.notes.append(f"Baseline check (ring, CE, seeds 0-2: {first3} modes): "
                             + ("passes (≥ 6 of 8 modes on at least 2 of 3 seeds)." if ok else
                                "FAILS (fewer than 2 of the 3 seeds cover ≥ 6 of 8 modes)."))
    sec.notes.append("The setup (D depth, latent size, learning rate) was chosen so that CE passes the baseline "
                     "check, on CE alone, and not tuned for RLO: a loss that needs another learning rate is at a "
                     "disadvantage here (at D = 0 the rooted losses' gradients are 2^(1/k) times the logistic ones).")
    sec.tables.append(table)
    present = [d for d in ("ring", "grid") if res.get((d, "ce")) and res.get((d, "root"))]
    if present:
        plt = _pyplot()
        fig, axes = plt.subplots(len(present), 2, figsize=(8, 4 * len(present)), squeeze=False)
        for i, data in enumerate(present):
            centers, std = gan.mode_centers(data)
            lim = centers.abs().max().item() + 1.5
            for j, loss in enumerate(("ce", "root")):
                r = res[(data, loss)][0]
                gan.scatter(axes[i][j], r["samples"], centers, std, f"{data}, {gan.label(loss, 2.0)}, seed 0: "
                            f"{r['modes']}/{r['n_modes']} modes, {r['hq']:.0%} HQ", lim)
        fig.tight_layout()
        path = os.path.join(out, "gan_samples.png")
        atomic_savefig(fig, path, dpi=100)
        plt.close(fig)
        sec.figures.append((path, "Final generated samples (seed 0, 1000 shown) with each mode's 3-std disc", command))
    return sec


# ---- 7. LLM (AISTATS) ----------------------------------------------------------------------------------

def report_llm(cfg, llm_dir, out, command):
    path = os.path.join(llm_dir, "results.csv")
    sec = Section("llm", "LLM (AISTATS 2025): RLO finetuning and low-bit quantization",
                  "A model finetuned with RLO loses less perplexity when quantized to 2-4 bits, before and after "
                  "finetuning in quantized space.",
                  f"llm_pipeline.py (`make llm-demo`, 12 min on 2 cores; run here with `--llm`): stories260K, "
                  f"finetune with CE and with root k = m = 5, PTQ (ldlqRG) at 2/3/4 bits with and without "
                  f"incoherence, then QFT; perplexity on WikiText-2 test, relative to each loss's own finetuned "
                  f"model. Read from {os.path.relpath(path, ROOT)}.", command)
    table = Table("Perplexity after quantization relative to the finetuned fp model (lower is better; mean ± 95% "
                  "CI over the pipeline's seeds); verdicts on \"RLO's ratio is lower\"", [
        "method", "bits", "incoh", "seeds", "CE PTQ/ft", "RLO PTQ/ft", "verdict (PTQ)", "CE QFT/ft", "RLO QFT/ft",
        "verdict (QFT)"])
    if not os.path.isfile(path):
        table.rows.append(["**pending: not run**", "", "", "", "", "", "", "", "",
                           f"no {os.path.relpath(path, ROOT)}; run `make llm-demo` or `python reproduce.py --llm`"])
        sec.headline.append(["AISTATS: RLO lowers low-bit damage", "stories260K, 2 bits", "lower PPL ratio",
                             "pending: not run", "pending"])
        sec.tables.append(table)
        return sec
    rows = read_csv(path)
    groups = sorted({(r["quant"], int(r["wbits"]), r["incoh"]) for r in rows}, key=lambda g: (g[1], g[0], str(g[2])))
    for quant, bits, incoh in groups:
        sel = {loss: [r for r in rows if (r["quant"], int(r["wbits"]), r["incoh"]) == (quant, bits, incoh)
                      and r["loss"] == loss] for loss in ("ce", "root")}
        if not sel["ce"] or not sel["root"]:
            continue
        cells, verdicts = [], []
        for key in ("ptq_vs_ft", "qft_vs_ft"):
            ce, rlo = (interval([r[key] for r in sel[loss]]) for loss in ("ce", "root"))
            verdicts.append(verdict(rlo, ce, higher_is_better=False))
            cells += [fmt_g(ce), fmt_g(rlo), verdicts[-1]]
        table.rows.append([quant, bits, incoh, len(sel["ce"]), *cells])
        if bits == 2 and incoh == "off":
            sec.headline.append(["AISTATS: RLO lowers low-bit damage", f"stories260K, {quant} 2 bits, QFT/ft",
                                 "lower PPL ratio", f"{cells[3]} vs {cells[4]} ({len(sel['ce'])} seed(s))", verdicts[1]])
    sec.tables.append(table)
    png = os.path.join(llm_dir, "pipeline.png")
    if os.path.exists(png):  # copied beside the other figures: the run folder is not part of the repository
        copy_path = os.path.join(out, "llm_pipeline.png")
        atomic_copy(png, copy_path)
        sec.figures.append((copy_path, "llm_pipeline.py's own figure", "make llm-demo"))
    return sec


# ---- driver --------------------------------------------------------------------------------------------

def _init_worker():
    import torch

    torch.set_num_threads(1)  # one process per core: independent runs in parallel, not threads


def plan(args, cfg):
    """{key: (function, kwargs)} of every independent run of the requested sections, most expensive first."""
    tasks = {}
    fig_dir = args.out
    if "digits" in args.sections:
        for net, flags in cfg["digits_nets"]:
            for loss, k, m in DIGITS_LOSSES:
                for seed in range(cfg["seeds"]):
                    out = os.path.join(args.cache, "runs", "digits", f"{net}_{loss}_k{k:g}_m{m:g}_seed{seed}")
                    tasks[("digits", (net, loss, k, m), seed)] = (task_digits, dict(
                        argv=digits_argv(cfg, net, flags, loss, k, m, seed, out)))
    if "gan" in args.sections:
        for data in ("ring", "grid"):
            for loss in ("ce", "root"):
                for seed in range(cfg["seeds"]):
                    tasks[("gan", (data, loss), seed)] = (task_gan, dict(
                        data=data, loss=loss, seed=seed, flags=cfg["gan_flags"], n_w1=cfg["gan_w1"],
                        out=os.path.join(args.cache, "runs", "gan")))
    uci = [d for d in UCI if d == "wine" or _has_uci(d, args.data_dir)]
    for section, fn in (("table1", task_table1), ("conditioning", task_conditioning), ("convergence", task_convergence)):
        if section in args.sections:
            for dataset in uci:
                for fold in range(cfg["seeds"]):
                    tasks[(section, (dataset, "cv"), fold)] = (fn, dict(dataset=dataset, data_dir=args.data_dir,
                                                                        fold=fold, cfg=cfg))
            if section == "table1" and "spectf" in uci:
                tasks[(section, ("spectf", "official"), 0)] = (fn, dict(dataset="spectf", data_dir=args.data_dir,
                                                                        fold="official", cfg=cfg))
    if "spiral" in args.sections:
        for model, iters in cfg["spiral"]:
            for seed in range(cfg["seeds"]):
                tasks[("spiral", model, seed)] = (task_spiral, dict(
                    model=model, iters=max(1, iters // cfg["spiral_scale"]), seed=seed,
                    figure=os.path.join(fig_dir, f"spiral_{model}_boundary.png") if seed == 0 else None))
    return tasks


def _has_uci(dataset, data_dir):
    from data.tabular import load_tabular

    try:
        load_tabular(dataset, data_dir)
        return True
    except UserError:
        return False


def run_tasks(tasks, jobs):
    """Run every task in `jobs` processes; {key: result}, and the summed task seconds per section."""
    results, seconds = {}, {}

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that already holds torch's threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = {pool.submit(_timed_call, fn, kwargs): key for key, (fn, kwargs) in tasks.items()}
        for future, key in futures.items():
            value, took = future.result()
            results[key] = value
            seconds[key[0]] = seconds.get(key[0], 0.0) + took
            print(f"  done {key[0]} {key[1]} {key[2]} ({took:.0f}s)", flush=True)
    return results, seconds


def _timed_call(fn, kwargs):
    start = time.time()
    return fn(**kwargs), time.time() - start


def group(results, section):
    """{key: [result per fold / seed, in order]} of one section."""
    out = {}
    for (sec, key, index), value in sorted(((k, v) for k, v in results.items() if k[0] == section),
                                           key=lambda kv: kv[0][2]):
        out.setdefault(key, []).append(value)
    return out


def markdown(sections, provenance, args, wall):
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.report)))
    mode = "QUICK (tiny sizes: a smoke test, not evidence)" if args.quick else "full-size"
    lines = ["# Reproduction report: Rooted Logistic Objectives (arXiv 2310.03890) and the AISTATS-2025 follow-up", "",
             f"Written by `{args.command}` ({wall / 60:.1f} min wall, {args.jobs} parallel processes) from the "
             f"{mode} runs of each section below; every number is computed by `reproduce.py` from those runs, "
             f"nothing is typed in by hand except the papers' numbers.", "",
             "| section | run on | minutes of runs (summed over processes) | by |", "|---|---|---|---|"]
    lines += [f"| {s} | {date} | {sec / 60:.1f} | `{cmd}` |" for s, date, sec, cmd in provenance]
    lines += ["", "## Verdict rule", "", VERDICT_RULE, "", "## Headline", "", HEADLINE_START, *headline_table(sections),
              HEADLINE_END, ""]
    for i, sec in enumerate(sections, 1):
        lines += [f"## {i}. {sec.title}", "", f"**Claim.** {sec.claim}", "", f"**Setup.** {sec.setup}", "",
                  f"**Command:** `{sec.command}`", ""]
        for table in sec.tables:
            lines += [f"*{table.caption}*", "", "| " + " | ".join(table.columns) + " |",
                      "|" + "---|" * len(table.columns)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
            lines.append("")
        for note in sec.notes:
            lines += [note, ""]
        for path, caption, command in sec.figures:
            lines += [f"![{caption}]({rel(path)})", "", f"*{caption}.* Made by `{command}`.", ""]
    return "\n".join(lines)


HEADLINE_START, HEADLINE_END = "<!-- reproduce:headline:start -->", "<!-- reproduce:headline:end -->"


def headline_table(sections):
    rows = [r for sec in sections for r in sec.headline]
    return ["| claim | setting | paper | ours (baseline vs RLO) | verdict |", "|---|---|---|---|---|"] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def update_readme(readme, sections):
    """Replace the README's quoted headline table (between the markers) by this run's."""
    with open(readme) as f:
        text = f.read()
    if HEADLINE_START not in text or HEADLINE_END not in text:
        raise UserError(f"{readme} has no {HEADLINE_START} ... {HEADLINE_END} block to update")
    head, rest = text.split(HEADLINE_START, 1)
    _, tail = rest.split(HEADLINE_END, 1)
    atomic_write_text(readme, head + "\n".join([HEADLINE_START, *headline_table(sections), HEADLINE_END]) + tail)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every section at a tiny size (what the tests run)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), help=f"any of: {', '.join(SECTIONS)}")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes (default: the cores)")
    p.add_argument("--n-seeds", dest="seeds", type=int, default=None,
                   help="number of seeds, and of CV folds, per row (default 5; quick 2)")
    p.add_argument("--out", default="reproduction", help="figures and run folders (default %(default)s)")
    p.add_argument("--report", default=None, help="the markdown report (default REPRODUCTION.md, or OUT/REPRODUCTION.md "
                                                  "with --quick)")
    p.add_argument("--readme", default=None, help="also update the headline table quoted in this README")
    p.add_argument("--cache", default=None, help="each section's raw results and train.py run folders; the report "
                                                 "holds every section found here (default runs/reproduce, or "
                                                 "OUT/cache with --quick)")
    p.add_argument("--data-dir", default=SHARED_UCI, help="UCI files (default ../shared/data/uci)")
    p.add_argument("--cifar-dir", default="data", help="where train.py would find CIFAR (only reported)")
    p.add_argument("--llm", action="store_true", help="run llm_pipeline.py into --llm-dir first (12 min)")
    p.add_argument("--llm-dir", default=os.path.join("runs", "llm_demo"), help="llm_pipeline.py run folder")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}; choose from: {', '.join(SECTIONS)}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds is not None and args.seeds < 2:
        raise UserError(f"--n-seeds must be >= 2 (a confidence interval needs two runs), got {args.seeds}")
    if args.report is None:
        args.report = os.path.join(args.out, "REPRODUCTION.md") if args.quick else "REPRODUCTION.md"
    if args.cache is None:
        args.cache = os.path.join(args.out, "cache") if args.quick else os.path.join("runs", "reproduce")
    args.command = "python reproduce.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    if args.llm and "llm" in args.sections:
        import llm_pipeline

        llm_pipeline.main(["--out", args.llm_dir, "--overwrite"])
    tasks = plan(args, cfg)
    print(f"reproduce: {len(tasks)} runs in {args.jobs} processes ({', '.join(args.sections)})", flush=True)
    results, seconds = run_tasks(tasks, args.jobs) if tasks else ({}, {})
    for section in args.sections:  # each section's raw results, so a later --sections run keeps the others
        if section != "llm":
            atomic_save(dict(
                quick=args.quick, cfg=cfg, results=group(results, section), seconds=seconds.get(section, 0.0),
                date=datetime.date.today().isoformat(), command=args.command), os.path.join(args.cache, f"{section}.pt"))
    cifar = [d for d in ("cifar-10-batches-py", "cifar-100-python") if os.path.isdir(os.path.join(args.cifar_dir, d))]
    cifar_note = (f"data found in {args.cifar_dir}/ ({', '.join(cifar)}): run `python train.py --dataset cifar10 --net "
                  f"res18 --loss LOSS --data-dir {args.cifar_dir}` per row (200 epochs each: GPU-sized, not part "
                  f"of this CPU report)" if cifar else
                  f"not run: no CIFAR data in {args.cifar_dir}/ (cifar-10-batches-py/, cifar-100-python/; pass "
                  f"--cifar-dir); with the data, `python train.py --dataset cifar10 --net res18 --loss LOSS` per row")
    reports = {"table1": report_table1, "convergence": report_convergence, "conditioning": report_conditioning,
               "spiral": report_spiral, "digits": lambda *a: report_digits(*a, cifar_note), "gan": report_gan}
    sections, provenance = [], []
    for section in SECTIONS:
        command = f"python reproduce.py{' --quick' if args.quick else ''} --sections {section}"
        if section == "llm":
            sections.append(report_llm(cfg, args.llm_dir, args.out, "python reproduce.py --llm --sections llm"))
            continue
        path = os.path.join(args.cache, f"{section}.pt")
        saved = load_cache(path) if os.path.exists(path) else None
        if saved is None or saved["quick"] != args.quick:
            continue  # never run at this size: left out of the report
        sections.append(reports[section](saved["cfg"], saved["results"], args.out, command))
        provenance.append((section, saved["date"], saved["seconds"], saved["command"]))
    atomic_write_text(args.report, markdown(sections, provenance, args, time.time() - start) + "\n")
    if args.readme:
        update_readme(args.readme, sections)
    print(f"wrote {args.report} ({time.time() - start:.0f}s); figures in {args.out}/")
    print("\n".join(headline_table(sections)))
    return sections


def load_cache(path):
    import torch

    return torch.load(path, weights_only=False)  # our own file, written by atomic_save above


if __name__ == "__main__":
    cli(main)
