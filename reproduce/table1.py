"""Table 1: rooted logistic regression vs logistic regression on the real UCI sets, with nested k selection
and SPECTF's official split."""
import numpy as np

from .common import UCI, fold, pyplot, save_figure, uci_args, uci_present
from .report import Section, Table, comparison_cells, method
from .stats import fmt, interval, mcnemar, paired, paired_cells, seeds_needed

TITLE = "Table 1: rooted logistic regression vs logistic regression on the UCI sets"
FULL = dict(iters=200, lr=0.01, ks=(2, 3, 4, 5, 6, 8, 10, 12, 15, 20), inner_folds=5)
QUICK = dict(FULL, iters=20, ks=(3, 6), inner_folds=2)


def task(dataset, data_dir, index, cfg):
    """Test accuracy of LR and of RLO for every k on one outer fold, and the k that CV inside the training
    part alone picks (nested selection); on SPECTF's official split also each test row's correctness."""
    import torch
    from sklearn.model_selection import StratifiedKFold

    import regression

    args = uci_args(dataset, data_dir, cfg["seeds"], cfg["iters"], cfg["lr"])
    ds = regression.load(args)
    train, test = fold(ds, args, index)
    ks = sorted(set(cfg["ks"]) | {float(regression.PAPER[dataset][1])})

    def run(method, k, tr, te):
        Xtr, ytr, Xte, yte, _ = regression.fold_tensors(ds, tr, te, True)
        r = regression.Run(args, method, k, ds.num_classes, Xtr, ytr, Xte, yte, seed=0)
        with torch.no_grad():
            right = (regression.predict(r.forward(Xte)) == yte).numpy()
        return r.test_acc, right

    inner = StratifiedKFold(cfg["inner_folds"], shuffle=True, random_state=1).split(ds.X[train], ds.y[train])
    inner_acc = np.mean([[run("rlo", k, train[a], train[b])[0] for k in ks] for a, b in inner], axis=0)
    k_nested = ks[int(np.argmax(inner_acc))]  # ties: the smallest k
    rlo = {k: run("rlo", k, train, test) for k in ks}
    lr = run("lr", None, train, test)
    out = dict(lr=lr[0], rlo={k: v[0] for k, v in rlo.items()}, k_nested=k_nested, nested=rlo[k_nested][0],
               n_test=len(test))
    if index == "official":
        out["right"] = dict(lr=lr[1], rlo={k: v[1] for k, v in rlo.items()})
    return out


def tasks(cfg, ctx):
    present = uci_present(ctx.data_dir)
    out = {((d, "cv"), i): (task, dict(dataset=d, data_dir=ctx.data_dir, index=i, cfg=cfg))
           for d in present for i in range(cfg["seeds"])}
    if "spectf" in present:
        out[(("spectf", "official"), 0)] = (task, dict(dataset="spectf", data_dir=ctx.data_dir, index="official",
                                                       cfg=cfg))
    return out


def report(cfg, res, ctx, command):
    sec = Section("table1", TITLE, *method("table1", lr=cfg["lr"], iters=cfg["iters"], seeds=cfg["seeds"],
                                                ks=", ".join(f"{k:g}" for k in cfg["ks"]), inner_folds=cfg["inner_folds"]),
                  command)
    sec.tables.append(cv_table(cfg, res, sec))
    official = res.get(("spectf", "official"))
    if official:
        sec.tables.append(official_split_table(cfg, official, sec))
    present = [d for d in UCI if (d, "cv") in res]
    if present:
        sec.add_figure(accuracy_figure(res, present, ctx.out),
                       "Test accuracy against k (mean ± 95% CI over the folds), LR and the paper's numbers")
    return sec


def cv_table(cfg, res, sec):
    """One row per data set: LR and RLO at the paper's, the test-picked and the nested k, over the CV folds."""
    import regression

    n = cfg["seeds"]
    table = Table("Test accuracy (%), mean ± 95% CI over the CV folds; paired RLO − LR per fold [95% CI], its "
                  "minimum detectable effect (MDE) and the paired verdict; unpaired verdict beside it", [
        "data set", "paper LR", "paper RLO (k)", "our LR", "our RLO, paper's k", "RLO − LR [95% CI]", "MDE",
        "verdict", "unpaired", "our RLO, k picked on test folds", "our RLO, nested k (k per fold)",
        "nested − LR [95% CI]", "MDE", "verdict (nested)", "folds to detect the paper's gain"])
    for dataset in UCI:
        folds = res.get((dataset, "cv"))
        if folds is None:
            table.rows.append([dataset] + ["not run: data missing"] + [""] * 13)
            continue
        p_lr, p_k, p_rlo = regression.PAPER[dataset]
        lr_v = [f["lr"] for f in folds]
        rlo_v = [f["rlo"][float(p_k)] for f in folds]
        nest_v = [f["nested"] for f in folds]
        lr, rlo_p, nested = interval(lr_v), interval(rlo_v), interval(nest_v)
        means = {k: np.mean([f["rlo"][k] for f in folds]) for k in folds[0]["rlo"]}
        k_test = max(means, key=means.get)
        rlo_t = interval([f["rlo"][k_test] for f in folds])
        ks = ", ".join(f"{f['k_nested']:g}" for f in folds)
        pa, pn = paired(rlo_v, lr_v), paired(nest_v, lr_v)
        need = seeds_needed(p_rlo - p_lr, pa["sd"])
        table.rows.append([dataset, f"{p_lr}", f"{p_rlo} ({p_k})", fmt(lr), fmt(rlo_p),
                           *comparison_cells(pa, rlo_p, lr),
                           f"{fmt(rlo_t)} (k={k_test:g})", f"{fmt(nested)} (k: {ks})", *paired_cells(pn),
                           f"{need} (gain {p_rlo - p_lr:+.2f}, sd {pa['sd']:.2f})" if need else "n/a"])
        sec.add_headline(f"Table 1: RLO > LR ({dataset})", f"{n}-fold CV, paper's k={p_k}", f"{p_lr} vs {p_rlo}",
                         f"{fmt(lr)} vs {fmt(rlo_p)}", pa)
        sec.add_headline(f"Table 1: RLO > LR ({dataset}, nested k)", f"{n}-fold CV, k chosen inside each training "
                         f"fold", f"{p_lr} vs {p_rlo}", f"{fmt(lr)} vs {fmt(nested)}", pn)
    return table


def official_split_table(cfg, official, sec):
    """SPECTF's own train/test split: one deterministic run, McNemar on the shared test rows."""
    (f,) = official
    n_test = f["n_test"]
    lr = interval([f["lr"]], n=n_test)
    rows = []
    for name, k in (("RLO k=20 (the paper's k)", 20.0), (f"RLO nested k={f['k_nested']:g} ({cfg['inner_folds']}"
                                                         f"-fold CV on the 80 training rows)", f["k_nested"])):
        m = mcnemar(f["right"]["rlo"][k], f["right"]["lr"])
        rlo = interval([f["rlo"][k]], n=n_test)
        rows.append([name, fmt(rlo), f"{m['b']} / {m['c']}", f"{m['p']:.3g}", *comparison_cells(m, rlo, lr)])
        if k == 20.0:
            sec.add_headline("Table 1: RLO > LR (spectf, UCI's own split)", f"one split, McNemar on the {n_test} "
                             f"test rows", "80.49 vs 84.0", f"{fmt(lr)} vs {fmt(rlo)}", m)
    return Table(f"SPECTF, UCI's own split (train on SPECTF.train, 80 rows; test on SPECTF.test, {n_test} rows); "
                 f"one deterministic run: binomial 95% interval of each accuracy, exact McNemar test on the "
                 f"{n_test} shared test rows for the paired verdict", [
        "model", "test accuracy (%)", "rows only RLO / only LR gets right", "McNemar p", "RLO − LR [95% CI]",
        "MDE", "verdict", "unpaired"], [["LR", fmt(lr), "", "", "", "", "(baseline)", ""], *rows])


def accuracy_figure(res, present, out):
    """Test accuracy against k per data set, with LR's band and the paper's points; its path."""
    import regression

    plt = pyplot()
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
    return save_figure(fig, out, "table1_accuracy_vs_k.png")
