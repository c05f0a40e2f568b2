"""Deep nets on Fashion-MNIST's real 28x28 images (train.py --dataset fashionmnist): CE vs focal vs RLO (the
paper's CIFAR k=8 m=10 and the default k=3 m=3) with a ResNet and a small ViT, each loss's AdamW learning rate
chosen on a validation split of the 60,000 training images; final test accuracy, and epochs and seconds to a
validation accuracy, RLO paired against CE and against focal."""
import os
import platform

import numpy as np

from engine import UserError, atomic_dir

from .common import first_at, lr_text, pyplot, save_figure, train_grid, train_run
from .report import Section, Table, comparison_cells, method
from .stats import choose, fmt, interval, paired, reach

TITLE = "Deep nets on Fashion-MNIST: CE vs focal vs RLO (k=8 m=10, k=3 m=3)"
LOSSES = (("ce", 3, 3), ("focal", 3, 3), ("root", 8, 10), ("root", 3, 3))
RLO = [(loss, k, m) for loss, k, m in LOSSES if loss == "root"]
RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Sized for about an hour on 2 cores (estimated from one timed run per net; the report states the runs' own
# seconds): an "epoch" is 50 steps of 64 images of a fresh shuffle, because every epoch also scores the 2000
# validation and 10,000 test images.
FULL = dict(epochs={"res18": 5, "vit_tiny": 5}, bs={"res18": 64, "vit_tiny": 64}, size=28, max_steps=50,
            nets=(("res18", ("--dimhead", "16")), ("vit_tiny", ("--dimhead", "192", "--patch", "7"))),
            lr_grid=(1e-3, 2e-3), val_split=2000, levels={"res18": 82.0, "vit_tiny": 70.0}, threads=1,
            generated=None)
# QUICK trains on generated images in Fashion-MNIST's file layout (written into the cache): no data needed.
QUICK = dict(FULL, epochs={"res18": 2, "vit_tiny": 2}, bs={"res18": 16, "vit_tiny": 16}, size=14, max_steps=2,
             lr_grid=(1e-3,), val_split=32, levels={"res18": 20.0, "vit_tiny": 20.0},
             generated=dict(train=96, test=32))


def label(loss, k, m):
    return {"ce": "CE", "focal": "focal (γ=3)"}.get(loss) or f"RLO k={k:g} m={m:g}"


def data_dir(cfg, ctx, generated_folder="fashion_generated"):
    """The --data-dir of every run: the Fashion-MNIST files (QUICK: generated ones, written into the cache's
    `generated_folder`); a UserError naming the first missing file."""
    if cfg["generated"]:
        root = os.path.join(ctx.cache, generated_folder)
        write_generated(root, **cfg["generated"])
        return root
    raw = os.path.join(ctx.vision_dir, "FashionMNIST", "raw")
    for name in RAW:
        if not any(os.path.isfile(os.path.join(raw, name + ext)) for ext in ("", ".gz")):
            raise UserError(f"fashion: missing {os.path.join(raw, name)}.gz; put Fashion-MNIST's four IDX files "
                            f"({', '.join(n + '.gz' for n in RAW)}) in {raw}/ or pass --vision-dir")
    return ctx.vision_dir


def write_generated(root, train, test, seed=0):
    """Learnable stand-in images in the raw IDX layout (class c: a bright band at rows 2c..2c+5, plus noise)."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    if all(os.path.isfile(os.path.join(raw, name)) for name in RAW):
        return
    rng = np.random.default_rng(seed)
    with atomic_dir(raw) as tmp:
        for prefix, n in (("train", train), ("t10k", test)):
            labels = rng.integers(0, 10, n).astype(np.uint8)
            images = rng.integers(0, 96, (n, 28, 28)).astype(np.uint8)
            for image, c in zip(images, labels):
                image[2 * c:2 * c + 6] = 255
            for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
                header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
                with open(os.path.join(tmp, f"{prefix}-{kind}-ubyte"), "wb") as f:
                    f.write(header + array.tobytes())


def argv(cfg, net, net_flags, loss, k, m, lr, seed, data, out):
    a = ["--dataset", "fashionmnist", "--data-dir", data, "--net", net, *net_flags, "--loss", loss, "--k", f"{k:g}",
         "--m", f"{m:g}", "--epochs", str(cfg["epochs"][net]), "--bs", str(cfg["bs"][net]), "--lr", f"{lr:g}",
         "--opt", "adamw", "--aug", "none", "--size", str(cfg["size"]), "--amp", "--workers", "0", "--device", "cpu",
         "--threads", str(cfg["threads"]), "--val-split", str(cfg["val_split"]), "--seed", str(seed), "--out", out]
    return a + (["--steps-per-epoch", str(cfg["max_steps"])] if cfg["max_steps"] else [])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def task(argv):
    """One train.py run: its per-epoch validation and test accuracy and cumulative seconds, and the machine.
    The checkpoints are removed."""
    rows = train_run(argv)
    return dict(val_acc=[r["val_acc"] for r in rows], test_acc=[r["test_acc"] for r in rows],
                seconds=[r["wall_seconds"] for r in rows], cpu=f"{os.cpu_count()}-core {cpu_name()}")


def tasks(cfg, ctx):
    data = data_dir(cfg, ctx)
    return train_grid(cfg, ctx, "fashion", LOSSES, task,
                      lambda net, flags, loss, k, m, lr, seed, out: argv(cfg, net, flags, loss, k, m, lr, seed, data, out))


def measured(res):
    """(core-minutes, {net: mean seconds per epoch}, machine) of the runs, from their own recorded seconds."""
    per_epoch, total, cpus = {}, 0.0, set()
    for (net, *_), runs in res.items():
        for r in runs:
            total += r["seconds"][-1]
            per_epoch.setdefault(net, []).append(r["seconds"][-1] / len(r["seconds"]))
            cpus.add(r["cpu"])
    return total / 60, {net: float(np.mean(s)) for net, s in per_epoch.items()}, ", ".join(sorted(cpus))


def setup(cfg, res):
    """(claim, setup) of the section, with the measured time of the runs in `res` (none yet: without it)."""
    steps = f" of {cfg['max_steps']} steps" if cfg["max_steps"] else ""
    if cfg["generated"]:
        data = (f"generated stand-in images in Fashion-MNIST's IDX layout ({cfg['generated']['train']} train / "
                f"{cfg['generated']['test']} test: a smoke test of the pipeline, not Fashion-MNIST)")
    else:
        data = "Zalando's Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images, 10 classes)"
    minutes, per_epoch, cpus = measured(res)
    timing = (f" Measured: the {sum(len(r) for r in res.values())} runs took {minutes:.1f} core-minutes in all "
              f"(their recorded seconds; {cfg['threads']} torch thread per run, on {cpus}); mean seconds per epoch, "
              f"evaluation included: " + ", ".join(f"{net} {s:.1f}" for net, s in per_epoch.items()) + "."
              ) if res else ""
    return method("fashion", data=data, size=cfg["size"], val_split=cfg["val_split"], threads=cfg["threads"],
                  seeds=cfg["seeds"], lr_grid=lr_text(cfg["lr_grid"]), timing=timing,
                  sizes=", ".join(f"{net} {e} epochs{steps} at batch {cfg['bs'][net]}" for net, e in cfg["epochs"].items()),
                  epoch_note="; an epoch here is that many batches of a fresh shuffle of the training images" if steps else "",
                  levels=", ".join(f"{lv:g}% ({net})" for net, lv in cfg["levels"].items()))


def report(cfg, res, ctx, command):
    sec = Section("fashion", TITLE, *setup(cfg, res), command)
    table = Table("Final test accuracy (%), epochs and seconds to the validation level (mean ± 95% CI over seeds) "
                  "at each loss's chosen learning rate", [
                      "net", "loss", "lr chosen", "val acc at it", "final test acc", "val level",
                      "epochs to level", "seconds to level"])
    verdicts = Table("Paired verdicts per seed on \"RLO is better than the baseline\" (differences signed so that "
                     "> 0 favours RLO: accuracy RLO − baseline, epochs and seconds baseline − RLO)", [
                         "net", "RLO", "baseline", "measure", "paired difference [95% CI]", "MDE (80% power)",
                         "verdict", "unpaired"])
    grid_table = Table("Mean final validation accuracy (%) over seeds per learning rate (the selection; the test "
                       "split plays no part)", ["net", "loss", *(f"lr {lr:g}" for lr in cfg["lr_grid"])])
    curves = {}
    for net, _ in cfg["nets"]:
        chosen = {}
        for loss, k, m in LOSSES:
            if not all((net, loss, k, m, lr) in res for lr in cfg["lr_grid"]):
                continue
            grid = {lr: np.mean([r["val_acc"][-1] for r in res[(net, loss, k, m, lr)]]) for lr in cfg["lr_grid"]}
            grid_table.rows.append([net, label(loss, k, m), *(f"{v:.2f}" for v in grid.values())])
            lr = choose(list(cfg["lr_grid"]), grid)
            runs = res[(net, loss, k, m, lr)]
            chosen[(loss, k, m)] = result = loss_result(cfg, net, runs)
            curves[(net, label(loss, k, m))] = np.mean([r["test_acc"] for r in runs], axis=0)
            table.rows.append([net, label(loss, k, m), f"{lr:g}", f"{grid[lr]:.2f}", fmt(result["final"][1]),
                               f"{cfg['levels'][net]:g}%", result["epochs"][1][1], result["seconds"][1][1]])
        for rlo in RLO:
            for base in (("ce", 3, 3), ("focal", 3, 3)):
                if rlo in chosen and base in chosen:
                    verdicts.rows += compare(cfg, net, rlo, base, chosen, sec)
    sec.tables += [table, verdicts, grid_table]
    if curves:
        sec.add_figure(curves_figure(cfg, curves, ctx.out),
                       "Test accuracy per epoch on Fashion-MNIST at each loss's chosen learning rate, mean over seeds")
    return sec


def loss_result(cfg, net, runs):
    """{final, epochs, seconds}: each (per-run values, interval or reach) of one loss's chosen runs."""
    level = cfg["levels"][net]
    final = [r["test_acc"][-1] for r in runs]
    hits = [first_at(r["val_acc"], lambda a: a >= level) for r in runs]
    epochs = [h + 1 for h in hits]
    seconds = [r["seconds"][int(h)] if np.isfinite(h) else np.inf for r, h in zip(runs, hits)]
    budget = max(r["seconds"][-1] for r in runs)
    return dict(final=(final, interval(final)), epochs=(epochs, reach(epochs, cfg["epochs"][net])),
                seconds=(seconds, reach(seconds, budget)), budget=budget)


def compare(cfg, net, rlo, base, chosen, sec):
    """The verdict rows of one RLO setting against one baseline (final accuracy, epochs, seconds); RLO k=8 m=10
    against CE also gives headline rows."""
    a, b = chosen[rlo], chosen[base]
    budget = max(a["budget"], b["budget"])
    tests = [("final test acc", paired(a["final"][0], b["final"][0]), a["final"][1], b["final"][1], True, 2),
             ("epochs to level", paired(a["epochs"][0], b["epochs"][0], higher_is_better=False,
                                        budget=cfg["epochs"][net]), a["epochs"][1][0], b["epochs"][1][0], False, 1),
             ("seconds to level", paired(a["seconds"][0], b["seconds"][0], higher_is_better=False, budget=budget),
              a["seconds"][1][0], b["seconds"][1][0], False, 1)]
    rows = [[net, label(*rlo), label(*base), name, *comparison_cells(p, ours, theirs, higher, digits)]
            for name, p, ours, theirs, higher, digits in tests]
    if rlo == ("root", 8, 10) and base[0] == "ce":
        (_, p_acc, *_), (_, p_epochs, *_), _ = tests
        epochs = cfg["epochs"][net]
        sec.add_headline(f"Deep nets: RLO > CE (Fashion-MNIST, {net}, final acc)",
                         f"root k=8 m=10, {epochs} epochs, lr tuned on validation", "+1.44 to +2.32 (CIFAR-100)",
                         f"{fmt(b['final'][1])} vs {fmt(a['final'][1])}", p_acc)
        sec.add_headline(f"Deep nets: RLO faster (Fashion-MNIST, {net}, epochs to {cfg['levels'][net]:g}% val)",
                         f"root k=8 m=10, {epochs} epochs", "faster (CIFAR)",
                         f"{b['epochs'][1][1]} vs {a['epochs'][1][1]}", p_epochs, 1)
    return rows


def curves_figure(cfg, curves, out):
    """Mean test accuracy per epoch of every (net, loss); its path."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    nets = [n for n, _ in cfg["nets"]]
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4), squeeze=False)
    low = min(c.min() for c in curves.values())
    for ax, net in zip(axes[0], nets):
        for (n, name), curve in curves.items():
            if n == net:
                ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Fashion-MNIST, {net}: mean of {cfg['seeds']} seeds",
               ylim=(max(0, low - 2), 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out, "fashion_test_accuracy.png")
