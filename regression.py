"""Convex experiments: rooted logistic regression (RLO) against logistic regression (LR).

Reproduces the paper's Table 1 (5-fold CV test accuracy of LR, LR-L2, RLO(k), RLO-L2), Figure 1
(training loss per iteration, LR vs RLO) and Figure 2 (decision regions of 2/3/4-layer FCNs on a
2-D spiral), and measures the Hessian conditioning claim (--diagnose).

    python regression.py --dataset wine --k 3
    python regression.py --dataset wine --sweep-k 3:20
    python regression.py --dataset ionosphere --data-dir ../shared/data/uci --sweep-k 3:20 --diagnose
    python regression.py --dataset spiral --model fcn2 --iters 1000

Two classes: one logit z = w.x + b, labels y in {-1, +1}, LR loss log(1 + exp(-y z)) against the binary
RLO k (1 + exp(-y z))^(1/k) (paper eq. 4). More classes: softmax cross-entropy against the convex
softmax RLO m (p_y^(-1/k) - 1) with m = k (eq. 4 written for softmax; it reduces to the binary RLO
minus the constant k for two classes). All losses come from `losses/`.

Outputs in --out: table.csv, curves.csv, convergence.png, boundary.png (2-D data), diagnose.json.
"""
import os
import sys

import numpy as np
import torch
from torch import nn

from data.synthetic import SYNTHETIC
from data.tabular import TABULAR, load_tabular
from engine import (ArgumentParser, UserError, add_common_args, atomic_savefig, atomic_write_csv, atomic_write_json, cli,
                    prepare_run_dir, require_positive_ints, set_threads)
from engine.cli import default_data_dir
from losses import get_loss
from losses.rooted import binary_root_convex_hessian_coef

DATASETS = list(TABULAR) + list(SYNTHETIC)
MODELS = {"linear": 0, "fcn2": 1, "fcn3": 2, "fcn4": 3}  # number of hidden layers
METHODS = ["lr", "lr_l2", "rlo", "rlo_l2"]
OUTPUTS = ("table.csv", "curves.csv", "convergence.png", "boundary.png", "diagnose.json")
LABELS = {"lr": "LR", "lr_l2": "LR-L2", "rlo": "RLO", "rlo_l2": "RLO-L2"}


def label(method, model):
    """Display name: the baseline of a network is its cross-entropy (CE), of a linear model LR."""
    return LABELS[method] if model == "linear" else LABELS[method].replace("LR", "CE")


# Paper Table 1 (5-fold CV test accuracy, %): LR and the best RLO with its k.
PAPER = {"wine": (90.0, 3, 97.22), "ionosphere": (81.4, 4, 85.07), "madelon": (52.03, 6, 54.36),
         "spectf": (80.49, 20, 84.0)}


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)} (required, no default)")
    p.add_argument("--model", default="linear", help=f"one of: {', '.join(MODELS)} (fcnN: N Linear layers, --hidden wide)")
    p.add_argument("--hidden", type=int, default=100, help="FCN width")
    p.add_argument("--k", type=float, default=3.0, help="RLO root k")
    p.add_argument("--sweep-k", default=None, help="run every k in A:B (integers, inclusive) or a list a,b,c; "
                                                   "print the top 3 (default: only --k)")
    p.add_argument("--iters", type=int, default=200, help="full-batch iterations")
    p.add_argument("--lr", type=float, default=0.01, help="step size")
    p.add_argument("--optimizer", "--opt", default="gd", choices=["gd", "adam"], help="gd: plain full-batch gradient descent")
    p.add_argument("--weight-decay", "--l2", type=float, default=0.01,
                   help="penalty weight_decay/2 * ||weights||^2 of the *_l2 methods")
    p.add_argument("--folds", type=int, default=5, help="stratified CV folds of the tabular sets")
    p.add_argument("--repeats", type=int, default=1, help="seeded 70/30 splits of the 2-D sets")
    p.add_argument("--no-standardize", action="store_true", help="keep raw features (default: standardize "
                                                                 "on each training fold)")
    p.add_argument("--diagnose", action="store_true", help="Hessian eigenvalues / condition of LR and RLO")
    p.add_argument("--quiet", action="store_true", help="print nothing (the results are in --out)")
    # These problems are tiny: one thread is fastest (2 threads made a 178x13 float64 matmul 200x slower).
    add_common_args(p, out="runs/regression/<dataset>[_<model>]", device=False, threads=1,
                    seed_help="CV shuffle, splits, FCN init, generated data", data_dir=os.path.join(default_data_dir(), "uci"),
                    data_dir_help="folder with the UCI files of ionosphere, madelon, spectf")
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose from: {', '.join(DATASETS)}")
    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; choose from: {', '.join(MODELS)}")
    require_positive_ints(args, "iters", "hidden", "repeats", "threads")
    if args.folds < 2:
        raise UserError(f"--folds must be >= 2, got {args.folds}")
    if not args.lr > 0 or args.weight_decay < 0:
        raise UserError(f"--lr must be > 0 and --weight-decay >= 0, got lr={args.lr}, weight_decay={args.weight_decay}")
    if args.diagnose and args.model != "linear":
        raise UserError("--diagnose needs --model linear (the convex case)")
    args.ks = parse_ks(args.sweep_k) if args.sweep_k else [args.k]
    for k in args.ks:
        get_loss("binary_root_convex", k=k)  # the one check of k
    if args.out is None:
        suffix = "" if args.model == "linear" else f"_{args.model}"
        args.out = os.path.join("runs", "regression", args.dataset + suffix)
    return args


def parse_ks(spec):
    try:
        if ":" in spec:
            lo, hi = (int(s) for s in spec.split(":"))
            ks = [float(k) for k in range(lo, hi + 1)]
        else:
            ks = [float(s) for s in spec.split(",")]
    except ValueError:
        ks = []
    if not ks:
        raise UserError(f"--sweep-k must be A:B (integers, A <= B) or a comma list, got {spec!r}")
    return ks


def load(args):
    if args.dataset in SYNTHETIC:
        return SYNTHETIC[args.dataset](seed=args.seed)
    return load_tabular(args.dataset, args.data_dir, seed=args.seed)


def splits(ds, args):
    """(train_idx, test_idx) pairs: stratified K-fold for tabular sets, seeded 70/30 splits for 2-D sets."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if args.dataset in SYNTHETIC:
        idx = np.arange(len(ds.y))
        return [train_test_split(idx, test_size=0.3, stratify=ds.y, random_state=args.seed + r)
                for r in range(args.repeats)]
    if np.bincount(ds.y).min() < args.folds:
        raise UserError(f"{ds.name}: the smallest class has {np.bincount(ds.y).min()} samples, fewer than "
                        f"--folds {args.folds}")
    return list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(ds.X, ds.y))


def build_model(model, d, out, hidden):
    """linear: zero-initialised (the convex problem's usual start); fcnN: N Linear layers with ReLU."""
    if model == "linear":
        net = nn.Linear(d, out)
        nn.init.zeros_(net.weight)
        nn.init.zeros_(net.bias)
        return net.double()
    layers, width = [], d
    for _ in range(MODELS[model]):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out)).double()


def make_loss(method, k, binary):
    """(criterion, infimum): the loss of `method` and its infimum over logits (subtracted in curves)."""
    rooted = method.startswith("rlo")
    if binary:
        return (get_loss("binary_root_convex", k=k), k) if rooted else (get_loss("logistic"), 0.0)
    return (get_loss("root_convex", k=k, m=k), 0.0) if rooted else (get_loss("ce"), 0.0)


def predict(out):
    return (out > 0).long() if out.dim() == 1 else out.argmax(1)


class Run:
    """One training run: full-batch optimisation, recording loss and accuracy at every iterate."""

    def __init__(self, args, method, k, num_classes, Xtr, ytr, Xte, yte, seed):
        torch.manual_seed(seed)
        self.binary = binary = num_classes == 2
        self.model = build_model(args.model, Xtr.shape[1], 1 if binary else num_classes, args.hidden)
        loss, infimum = make_loss(method, k, binary)
        l2 = args.weight_decay if method.endswith("_l2") else 0.0
        weights = [p for name, p in self.model.named_parameters() if name.endswith("weight")]
        penalty = lambda: 0.5 * l2 * sum(w.pow(2).sum() for w in weights)
        opt = (torch.optim.SGD if args.optimizer == "gd" else torch.optim.Adam)(self.model.parameters(), lr=args.lr)
        self.curve = np.zeros((args.iters + 1, 3))  # train loss (minus infimum), train acc, test acc
        for t in range(args.iters + 1):
            out = self.forward(Xtr)
            value = loss(out, ytr) + penalty()
            with torch.no_grad():
                self.curve[t] = (value.item(), accuracy(predict(out), ytr), accuracy(predict(self.forward(Xte)), yte))
            if t == args.iters:
                break
            opt.zero_grad()
            value.backward()
            opt.step()
        if not np.isfinite(self.curve[:, 0]).all():
            raise UserError(f"{method} (k={k}) diverged at --lr {args.lr}; lower --lr or standardize the features")
        # The penalty moves the infimum: that of the regularised objective is its minimum, found here by
        # L-BFGS from the last iterate (the global one for the linear model, which is strictly convex).
        if l2:
            infimum = min(self.curve[:, 0].min(), self.regularised_minimum(loss, l2, Xtr, ytr))
        self.infimum = infimum
        self.curve[:, 0] -= infimum
        self.test_acc = self.curve[-1, 2]
        with torch.no_grad():
            self.constant = predict(self.forward(Xte)).unique().numel() == 1

    def forward(self, X, params=None):
        out = self.model(X) if params is None else torch.func.functional_call(self.model, params, (X,))
        return out.squeeze(1) if self.binary else out

    def regularised_minimum(self, loss, l2, X, y):
        """min of loss + l2/2 ||weights||^2 over the model's parameters, by `minimize` from the last iterate."""
        named = [(n, p.shape) for n, p in self.model.named_parameters()]
        start = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

        def objective(theta):
            params = {n: t.view(shape) for (n, shape), t in zip(named, theta.split([s.numel() for _, s in named]))}
            penalty = sum(t.pow(2).sum() for n, t in params.items() if n.endswith("weight"))
            return loss(self.forward(X, params), y) + 0.5 * l2 * penalty

        value = minimize(objective, start.numel(), max_iter=100, start=start)[1]
        return value if np.isfinite(value) else np.inf


def accuracy(pred, y):
    return 100.0 * (pred == y).double().mean().item()


def fold_tensors(ds, train, test, standardize):
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_mean=standardize, with_std=standardize).fit(ds.X[train])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return (t(scaler.transform(ds.X[train])), t(ds.y[train]), t(scaler.transform(ds.X[test])), t(ds.y[test]),
            scaler)


def run_all(ds, args, folds):
    """Train every (method, k) on every split of `folds`; returns results[(method, k)] = list of Runs."""
    results = {}
    for i, (train, test) in enumerate(folds):
        Xtr, ytr, Xte, yte, scaler = fold_tensors(ds, train, test, not args.no_standardize)
        for method in METHODS:
            for k in (args.ks if method.startswith("rlo") else [None]):
                run = Run(args, method, k, ds.num_classes, Xtr, ytr, Xte, yte, seed=args.seed + i)
                run.scaler = scaler
                run.test_idx = test
                results.setdefault((method, k), []).append(run)
    return results


def warn_constant(results):
    """A run that predicts one class for every test sample has collapsed (e.g. raw features at too large a
    --lr): its accuracy is the majority-class share, not a result of the method."""
    for (method, k), runs in results.items():
        collapsed = sum(r.constant for r in runs)
        if collapsed:
            name = method + ("" if k is None else f" k={k:g}")
            print(f"warning: {name} predicts a single class for every test sample in {collapsed}/{len(runs)} "
                  "splits: its accuracy is the majority-class share (standardize the features or lower --lr)",
                  file=sys.stderr)


def summarize(results):
    rows = []
    for (method, k), runs in results.items():
        acc = np.array([r.test_acc for r in runs])
        rows.append({"method": method, "k": "" if k is None else f"{k:g}", "test_acc_mean": acc.mean(),
                     "test_acc_std": acc.std(), "_k": k})
    return rows


def best_k(rows, method):
    return max((r for r in rows if r["method"] == method), key=lambda r: r["test_acc_mean"])["_k"]


def format_table(ds, args, rows, top=3):
    header = (f"{ds.name}: {len(ds.y)} samples, {ds.X.shape[1]} features, {ds.num_classes} classes; {args.model}, "
              + (f"{args.repeats} x 70/30 split" if args.dataset in SYNTHETIC else f"{args.folds}-fold stratified CV")
              + f", {args.optimizer} lr {args.lr:g}, {args.iters} iterations, weight decay {args.weight_decay:g}")
    lines = [header, f"{'method':8s} {'k':>4s}  {'test acc (%)':>16s}"]
    for method in METHODS:
        ranked = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["test_acc_mean"])[:top]
        for r in ranked:
            lines.append(f"{label(method, args.model):8s} {r['k'] or '-':>4s}  {r['test_acc_mean']:7.2f} +- {r['test_acc_std']:5.2f}")
    if args.dataset in PAPER:
        lr, k, rlo = PAPER[args.dataset]
        lines.append(f"paper Table 1: LR {lr:.2f}, RLO k={k} {rlo:.2f}")
    if len(args.ks) > top:
        ks = args.ks
        span = (f"{ks[0]:g}..{ks[-1]:g}" if ks == [float(k) for k in range(int(ks[0]), int(ks[-1]) + 1)]
                else ", ".join(f"{k:g}" for k in ks))
        lines.append(f"(RLO rows: the top {top} of k in {span}, chosen on the test folds as in the paper, so "
                     f"optimistic)")
    return "\n".join(lines)


def curve_rows(results):
    rows = []
    for (method, k), runs in results.items():
        mean = np.mean([r.curve for r in runs], axis=0)
        for t, (loss, train_acc, test_acc) in enumerate(mean):
            rows.append({"method": method, "k": "" if k is None else f"{k:g}", "iter": t, "train_loss": f"{loss:.8g}",
                         "train_acc": f"{train_acc:.4f}", "test_acc": f"{test_acc:.4f}"})
    return rows


def plot_convergence(results, ds, args, k, path):
    """Figure 1 style: training loss relative to its start (minus its infimum, fold mean) and test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    style = {"lr": ("tab:blue", "-"), "lr_l2": ("tab:blue", "--"), "rlo": ("tab:red", "-"), "rlo_l2": ("tab:red", "--")}
    for method in METHODS:
        key = (method, k if method.startswith("rlo") else None)
        curve = np.mean([r.curve for r in results[key]], axis=0)
        name = label(method, args.model) + (f" k={k:g}" if method.startswith("rlo") else "")
        color, ls = style[method]
        ax_loss.plot(curve[:, 0] / curve[0, 0], color=color, ls=ls, label=name)
        ax_acc.plot(curve[:, 2], color=color, ls=ls, label=name)
    # The losses have different scales: compare each one's decrease relative to its start.
    ax_loss.set(yscale="log", xlabel="iteration", ylabel="(loss - infimum) / its value at iteration 0",
                title=f"{ds.name}: relative training loss")
    ax_acc.set(xlabel="iteration", ylabel="test accuracy (%)", title=f"{ds.name}: test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_boundary(results, ds, k, path, model="linear"):
    """Figure 2 style: decision regions of the first split's LR (CE) and RLO models, test points on top,
    labelled with the model's depth, the axes and the classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lo, hi = ds.X.min(0) - 0.1, ds.X.max(0) + 0.1
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    depth = "linear" if model == "linear" else f"{model} ({MODELS[model]} hidden layer{'s' * (MODELS[model] > 1)})"
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, method, title in zip(axes, ["lr", "rlo"], ["CE (logistic)", f"RLO k={k:g}"]):
        run = results[(method, k if method == "rlo" else None)][0]
        with torch.no_grad():
            pred = predict(run.forward(torch.from_numpy(run.scaler.transform(grid)))).numpy()
        ax.contourf(gx, gy, pred.reshape(gx.shape), levels=[-0.5, 0.5, 1.5], colors=["#c6dbef", "#fcbba1"])
        test = run.test_idx
        ax.scatter(ds.X[test, 0], ds.X[test, 1], c=np.where(ds.y[test] == 1, "tab:red", "tab:blue"), s=6)
        ax.set(title=f"{ds.name}, {depth}\n{title}: test acc {run.test_acc:.1f}%", xlabel="x1", ylabel="x2")
        ax.set_aspect("equal")
    dot = dict(marker="o", ls="", markersize=4)
    fig.legend(handles=[Patch(color="#c6dbef", label="predicted class 0"), Patch(color="#fcbba1", label="predicted class 1"),
                        Line2D([], [], color="tab:blue", label="test point, class 0", **dot),
                        Line2D([], [], color="tab:red", label="test point, class 1", **dot)],
               loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    atomic_savefig(fig, path)
    plt.close(fig)


# ---- --diagnose: Hessian of the empirical risk at the trained linear model ----------------------------

def output_loss(y, loss, n_out):
    """out (n, n_out) -> loss(out, y): the targets in the form every loss takes, for `risk` and `risk_hessian`."""
    binary = n_out == 1
    # Multi-class: one-hot soft targets give the same loss through plain log_softmax, which double backward
    # and the vectorized (vmap) Hessian can go through; the hard-target path is a custom autograd.Function.
    target = y if binary else torch.nn.functional.one_hot(y, n_out).double()
    return lambda out: loss(out.squeeze(1) if binary else out, target)


def risk(X1, y, loss, n_out, l2=0.0):
    """theta -> loss(X1 @ theta) + l2/2 ||weights||^2 (bias not penalized), theta the flattened (d+1, n_out)
    weights+bias (X1 ends in a column of ones)."""
    of_outputs = output_loss(y, loss, n_out)
    weights = torch.ones(X1.shape[1], n_out, dtype=X1.dtype)
    weights[-1] = 0

    def f(theta):
        W = theta.view(X1.shape[1], n_out)
        return of_outputs(X1 @ W) + 0.5 * l2 * (weights * W * W).sum()

    return f


def risk_hessian(X1, y, loss, n_out):
    """Hessian of the (unpenalized) `risk`, J^T (d^2 loss / d out^2) J with J: theta -> X1 @ W. The losses are
    means of per-row terms, so d^2 loss / d out^2 is block diagonal, one n_out x n_out block per row, and n_out
    Hessian-vector products give every block: a (d+1) n_out square Hessian in O(n (d+1)^2 n_out^2), where
    autograd over theta needs (d+1) n_out backward passes through all n rows."""
    of_outputs = output_loss(y, loss, n_out)

    def hessian(theta):
        out = (X1 @ theta.detach().view(X1.shape[1], n_out)).requires_grad_()
        (grad,) = torch.autograd.grad(of_outputs(out), out, create_graph=True)
        # blocks[i, q, p] = d^2 loss / d out_ip d out_iq (the sum over rows i of grad[i, p] leaves row i's own)
        blocks = torch.stack([torch.autograd.grad(grad[:, p].sum(), out, retain_graph=p < n_out - 1)[0]
                              for p in range(n_out)], 2)
        d = X1.shape[1]
        H = X1.new_empty(d, n_out, d, n_out)
        for p in range(n_out):  # block (p, q) = X1^T diag(blocks[:, q, p]) X1: one matrix product each
            for q in range(n_out):
                H[:, p, :, q] = (X1 * blocks[:, q, p, None]).T @ X1
        return H.reshape(d * n_out, d * n_out)

    return hessian


def minimize(f, dim, max_iter=3000, start=None):
    """(theta, f(theta), |grad|) at the minimum of the smooth convex `f` by L-BFGS from `start` (default 0),
    float64. Without a finite minimizer (separable data, no L2) it stops at the iteration limit with f near
    its infimum."""
    theta = (torch.zeros(dim, dtype=torch.float64) if start is None else start.double().clone()).requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = f(theta)
        value.backward()
        return value

    opt.step(closure)
    value = f(theta)
    (grad,) = torch.autograd.grad(value, theta)
    return theta.detach(), value.item(), grad.norm().item()


def condition_number(H, Q):
    """lambda_max / lambda_min of H on the identifiable subspace spanned by the orthonormal columns of Q."""
    evals = torch.linalg.eigvalsh(Q.T @ H @ Q)
    return (evals[-1] / evals[0]).item() if evals[0] > 0 else float("inf")


def closed_form_hessian(X1, margin, method, k):
    """X^T diag(h) X / n with the paper's coefficient h for RLO and sigma(1 - sigma) for LR (binary)."""
    if method == "rlo":
        h = binary_root_convex_hessian_coef(margin, k)
    else:
        s = torch.sigmoid(margin)
        h = s * (1 - s)
    return X1.T @ (h[:, None] * X1) / len(margin)


def identifiable_basis(X1, n_out):
    """Orthonormal basis of the parameter directions that change some logit difference: the row space of
    the data (a constant feature, e.g. ionosphere's column 2, gives a zero eigenvalue for every loss)
    times, for softmax, the class-centred directions (adding one vector to every class's weights changes
    no probability). Both Hessians are singular outside this subspace by construction."""
    _, sv, vh = torch.linalg.svd(X1, full_matrices=False)
    rows = vh[sv > 1e-10 * sv[0]].T
    if n_out == 1:
        return rows
    evals, evecs = torch.linalg.eigh(torch.eye(n_out, dtype=X1.dtype) - 1.0 / n_out)
    return torch.kron(rows.contiguous(), evecs[:, evals > 0.5].contiguous())


def diagnose(ds, args, k):
    """Eigenvalues and condition numbers of the LR and RLO risk Hessians, each at its own trained model."""
    from sklearn.preprocessing import StandardScaler

    X = StandardScaler().fit_transform(ds.X) if not args.no_standardize else ds.X
    X1 = torch.from_numpy(np.hstack([X, np.ones((len(X), 1))]))
    y = torch.from_numpy(ds.y)
    binary = ds.num_classes == 2
    n_out = 1 if binary else ds.num_classes
    Q = identifiable_basis(X1, n_out)
    report = {"k": k, "iters": args.iters, "dims": Q.shape[1]}
    for method in ("lr", "rlo"):
        run = Run(args, method, k, ds.num_classes, X1[:, :-1], y, X1[:, :-1], y, seed=args.seed)
        lin = run.model
        theta = torch.cat([lin.weight.detach().T, lin.bias.detach()[None]], 0).reshape(-1)
        loss, _ = make_loss(method, k, binary)
        H = risk_hessian(X1, y, loss, n_out)(theta)
        evals = torch.linalg.eigvalsh(Q.T @ H @ Q)
        entry = {"lambda_min": evals[0].item(), "lambda_max": evals[-1].item(),
                 "condition": (evals[-1] / evals[0]).item() if evals[0] > 0 else float("inf"),
                 "train_acc": run.curve[-1, 1]}
        if binary:
            margin = torch.where(y == 1, 1.0, -1.0).double() * (X1 @ theta)
            entry["closed_form_max_abs_diff"] = (H - closed_form_hessian(X1, margin, method, k)).abs().max().item()
        report[method] = entry
    return report


def format_diagnose(report, ds):
    k = report["k"]
    lines = [f"Hessian of the training risk after {report['iters']} iterations on all of {ds.name} "
             f"(no L2, {report['dims']} identifiable dims)", f"{'':28s} {'LR':>12s} {'RLO k=' + format(k, 'g'):>12s}"]
    for key, label in [("lambda_min", "lambda_min"), ("lambda_max", "lambda_max"), ("condition", "condition number"),
                       ("train_acc", "train acc (%)"), ("closed_form_max_abs_diff", "max |autograd - closed form|")]:
        if key in report["lr"]:
            lines.append(f"{label:28s} {report['lr'][key]:12.4g} {report['rlo'][key]:12.4g}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    set_threads(args)
    ds = load(args)
    folds = splits(ds, args)
    prepare_run_dir(args, OUTPUTS)
    results = run_all(ds, args, folds)
    warn_constant(results)
    rows = summarize(results)
    atomic_write_csv(os.path.join(args.out, "table.csv"), ["method", "k", "test_acc_mean", "test_acc_std"],
              [{**r, "test_acc_mean": f"{r['test_acc_mean']:.4f}", "test_acc_std": f"{r['test_acc_std']:.4f}"}
               for r in rows])
    atomic_write_csv(os.path.join(args.out, "curves.csv"), ["method", "k", "iter", "train_loss", "train_acc", "test_acc"],
              curve_rows(results))
    k = best_k(rows, "rlo")
    pngs = [os.path.join(args.out, "convergence.png")]
    plot_convergence(results, ds, args, k, pngs[0])
    if ds.X.shape[1] == 2 and ds.num_classes == 2:
        pngs.append(os.path.join(args.out, "boundary.png"))
        plot_boundary(results, ds, k, pngs[1], args.model)
    say = (lambda *a: None) if args.quiet else print
    say(format_table(ds, args, rows))
    if args.diagnose:
        report = diagnose(ds, args, k)
        atomic_write_json(os.path.join(args.out, "diagnose.json"), report)
        say(format_diagnose(report, ds))
    written = [os.path.join(args.out, f) for f in ["table.csv", "curves.csv"] + ["diagnose.json"] * args.diagnose]
    say("wrote", ", ".join(written + pngs))
    return rows


if __name__ == "__main__":
    cli(main)
