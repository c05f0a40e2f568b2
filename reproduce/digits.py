"""Deep nets on real 8x8 digits (train.py --dataset digits): CE vs focal vs RLO with res18 and a small ViT,
each loss's AdamW learning rate chosen on a validation split of the training images."""
import os

import numpy as np

from .common import first_at, lr_text, pyplot, save_figure, train_grid, train_run
from .report import Section, Table, comparison_cells, method
from .stats import choose, fmt, interval, paired, paired_cells, reach

TITLE = "Deep nets: CE vs focal vs RLO on real handwritten digits"
LOSSES = (("ce", 3, 3), ("focal", 3, 3), ("root", 8, 10))  # root k=8 m=10: the paper's CIFAR setting
LEVELS = (90.0, 95.0)
FULL = dict(epochs={"res18": 8, "vit_tiny": 8}, bs={"res18": 64, "vit_tiny": 32}, size=32, max_steps=None,
            nets=(("res18", ("--dimhead", "16")), ("vit_tiny", ("--dimhead", "192", "--patch", "8"))),
            lr_grid=(5e-4, 1e-3, 2e-3), val_split=287)
QUICK = dict(FULL, epochs={"res18": 1, "vit_tiny": 1}, bs={"res18": 32, "vit_tiny": 32}, size=16, max_steps=2,
             lr_grid=(2e-3,))  # one rate: the 2-D GAN section exercises choosing among several


def argv(cfg, net, net_flags, loss, k, m, lr, seed, out):
    a = ["--dataset", "digits", "--net", net, *net_flags, "--loss", loss, "--k", f"{k:g}", "--m", f"{m:g}",
         "--epochs", str(cfg["epochs"][net]), "--bs", str(cfg["bs"][net]), "--lr", f"{lr:g}", "--opt", "adamw",
         "--aug", "none", "--size", str(cfg["size"]), "--amp", "--workers", "0", "--device", "cpu",
         "--val-split", str(cfg["val_split"]), "--seed", str(seed), "--out", out]
    return a + (["--steps-per-epoch", str(cfg["max_steps"])] if cfg["max_steps"] else [])


def task(argv):
    """One train.py run; its per-epoch validation and test accuracy. The checkpoints are removed."""
    rows = train_run(argv)
    return dict(val_acc=[r["val_acc"] for r in rows], test_acc=[r["test_acc"] for r in rows],
                seconds=rows[-1]["wall_seconds"])


def tasks(cfg, ctx):
    return train_grid(cfg, ctx, "digits", LOSSES, task, lambda *run: argv(cfg, *run))


def label(loss, k, m):
    return {"ce": "CE", "focal": "focal (γ=3)"}.get(loss) or f"{loss} k={k:g} m={m:g}"


def choose_lr(cfg, res, net, loss, k, m):
    """The learning rate with the best mean final validation accuracy over the seeds, and its runs."""
    grid = list(cfg["lr_grid"])
    val = {lr: np.mean([r["val_acc"][-1] for r in res[(net, loss, k, m, lr)]]) for lr in grid}
    lr = choose(grid, val)
    return lr, res[(net, loss, k, m, lr)]


def report(cfg, res, ctx, command):
    sec = Section("digits", TITLE, *method(
        "digits", size=cfg["size"], val_split=cfg["val_split"], train_rows=1437 - cfg["val_split"], seeds=cfg["seeds"],
        sizes=", ".join(f"{net} {e} epochs at batch {cfg['bs'][net]}" for net, e in cfg["epochs"].items()),
        step_cap=f", at most {cfg['max_steps']} steps per epoch" if cfg["max_steps"] else "",
        lr_grid=lr_text(cfg["lr_grid"])), command)
    table = Table("Test accuracy (%) after the last epoch and epochs to 90% / 95% test accuracy (mean ± 95% CI over "
                  "seeds) at each loss's chosen learning rate; paired (this loss − CE per seed) verdicts on \"this "
                  "loss is better than CE\"", [
        "net", "loss", "lr chosen", "val acc at it", "final acc", "− CE [95% CI]", "MDE", "verdict (acc)", "unpaired",
        "epochs to 90%", "epochs to 95%", "CE − this [95% CI]", "MDE", "verdict (epochs to 95%)"])
    grid_table = Table("Mean final validation accuracy (%) over seeds per learning rate (the selection; the test "
                       "split plays no part)", ["net", "loss", *(f"lr {lr:g}" for lr in cfg["lr_grid"])])
    curves = {}
    for net, _ in cfg["nets"]:
        ce = None  # the baseline's (final accuracies, their interval, epochs to each level, reach)
        for loss, k, m in LOSSES:
            if not all((net, loss, k, m, lr) in res for lr in cfg["lr_grid"]):
                continue
            grid_table.rows.append([net, label(loss, k, m), *(
                f"{np.mean([r['val_acc'][-1] for r in res[(net, loss, k, m, lr)]]):.2f}" for lr in cfg["lr_grid"])])
            lr, runs = choose_lr(cfg, res, net, loss, k, m)
            curves[(net, label(loss, k, m))] = np.mean([r["test_acc"] for r in runs], axis=0)
            result = loss_result(cfg, net, runs)
            _, final, _, speed = result
            head = [net, label(loss, k, m), f"{lr:g}", f"{np.mean([r['val_acc'][-1] for r in runs]):.2f}", fmt(final)]
            if loss == "ce":
                ce = result
                table.rows.append([*head, "(baseline)", "", "", "", speed[0][1], speed[1][1], "(baseline)", "", ""])
            elif ce is not None:
                table.rows.append([*head, *compare_to_ce(cfg, net, loss, result, ce, sec)])
    sec.tables += [table, grid_table, Table("CIFAR-10 / CIFAR-100 (the paper's own sets)", ["data set", "status"],
                                            [["CIFAR-10, CIFAR-100", ctx.cifar_note]])]
    if curves:
        sec.add_figure(curves_figure(cfg, curves, ctx.out),
                       "Test accuracy per epoch on digits at each loss's chosen learning rate, mean over seeds")
    return sec


def loss_result(cfg, net, runs):
    """(final test accuracies, their interval, epochs to each level per run, reach of each level) of one loss."""
    final_v = [r["test_acc"][-1] for r in runs]
    to = [[first_at(r["test_acc"], lambda a, lv=lv: a >= lv) + 1 for r in runs] for lv in LEVELS]
    return final_v, interval(final_v), to, [reach(t, cfg["epochs"][net]) for t in to]


def compare_to_ce(cfg, net, loss, result, ce, sec):
    """The cells after a loss's own: its final accuracy and its epochs to 95% against CE's (RLO's: headline rows)."""
    final_v, final, to, speed = result
    epochs = cfg["epochs"][net]
    p_acc = paired(final_v, ce[0])
    p_speed = paired(to[1], ce[2][1], higher_is_better=False, budget=epochs)
    if loss == "root":
        sec.add_headline(f"Deep nets: RLO > CE (digits, {net}, final acc)",
                         f"root k=8 m=10, {epochs} epochs, lr tuned on validation", "more accurate (CIFAR)",
                         f"{fmt(ce[1])} vs {fmt(final)}", p_acc)
        sec.add_headline(f"Deep nets: RLO faster (digits, {net}, epochs to 95%)", f"root k=8 m=10, {epochs} epochs",
                         "faster (CIFAR)", f"{ce[3][1][1]} vs {speed[1][1]}", p_speed, 1)
    return [*comparison_cells(p_acc, final, ce[1]), speed[0][1], speed[1][1], *paired_cells(p_speed, 1)]


def curves_figure(cfg, curves, out):
    """Mean test accuracy per epoch of every (net, loss); its path."""
    plt = pyplot()
    nets = [n for n, _ in cfg["nets"]]
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for (n, name), curve in curves.items():
            if n == net:
                ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=name)
        for lv in LEVELS:
            ax.axhline(lv, color="grey", lw=0.6, ls=":")
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"digits, {net}: mean of {cfg['seeds']} seeds",
               ylim=(max(0, min(c.min() for c in curves.values()) - 5), 100.5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out, "digits_test_accuracy.png")
