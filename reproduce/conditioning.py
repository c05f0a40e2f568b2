"""Lemma 2: condition numbers of the LR and RLO risk Hessians at matched points."""
from .common import UCI, fold, uci_args, uci_present
from .report import Section, Table, comparison_cells, method
from .stats import fmt_g, interval, paired

TITLE = "Lemma 2: conditioning of the RLO and LR risks"
FULL = dict(iters=200, cond_l2=1e-3, lbfgs_iters=3000)
QUICK = dict(FULL, iters=20, lbfgs_iters=50)


def task(dataset, data_dir, index, cfg):
    """Condition numbers of the LR and RLO risk Hessians at w = 0, at the LR optimum (the same point for
    both) and at each risk's own optimum (of the risk plus l2/2 ||w||^2), on one training fold."""
    import torch

    import regression

    args = uci_args(dataset, data_dir, cfg["seeds"], cfg["iters"])
    ds = regression.load(args)
    train, test = fold(ds, args, index)
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


def tasks(cfg, ctx):
    return {((d, "cv"), i): (task, dict(dataset=d, data_dir=ctx.data_dir, index=i, cfg=cfg))
            for d in uci_present(ctx.data_dir) for i in range(cfg["seeds"])}


POINTS = (("zero", "w = 0"), ("at_lr", "LR optimum (same w)"), ("own", "each at its own optimum"))


def report(cfg, res, ctx, command):
    sec = Section("conditioning", TITLE, *method("conditioning", cond_l2=cfg["cond_l2"]), command)
    table = Table("Condition number λmax/λmin (mean ± 95% CI over folds); paired κ(LR) − κ(RLO) per fold "
                  "[95% CI], MDE and verdict on \"RLO's is smaller\"", [
        "data set (k)", "point", "LR", "RLO", "κ(LR) − κ(RLO) [95% CI]", "MDE", "verdict", "unpaired"])
    worst = 0.0
    for dataset in UCI:
        folds = res.get((dataset, "cv"))
        if not folds:
            continue
        worst = max(worst, max(f["grad"] for f in folds))
        table.rows += [point_row(dataset, folds, key, point, sec) for key, point in POINTS]
    sec.tables.append(table)
    sec.notes.append(f"Largest gradient norm at an L-BFGS optimum: {worst:.1e}. For two classes both Hessians at "
                     f"w = 0 are constant multiples of X^T X, so their condition numbers are equal there by "
                     f"construction (a check of the computation).")
    return sec


def point_row(dataset, folds, key, point, sec):
    """κ of both risks at one matched point, RLO against LR (at each risk's own optimum also in the headline)."""
    lr_v, rlo_v = ([f[key][i] for f in folds] for i in (0, 1))
    lr, rlo = interval(lr_v), interval(rlo_v)
    p = paired(rlo_v, lr_v, higher_is_better=False)
    if key == "own":
        sec.add_headline(f"Lemma 2: RLO better conditioned ({dataset})", "Hessian κ, each at its own optimum",
                         "smaller (lemma)", f"{fmt_g(lr)} vs {fmt_g(rlo)}", p, 1)
    return [f"{dataset} ({folds[0]['k']:g})", point, fmt_g(lr), fmt_g(rlo), *comparison_cells(p, rlo, lr, False, 1)]
