"""regression.py: the binary RLO against float64 closed forms (paper eq. 4-7), the Hessian diagnostics,
the training loop against a numpy reimplementation, and short runs that write every output."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import regression
from data.tabular import load_tabular
from engine import UserError
from losses import get_loss
from losses.rooted import binary_root_convex_grad_coef, binary_root_convex_hessian_coef
from tests.helpers import ROOT

KS = [1.5, 3.0, 20.0]


# ---- float64 closed forms of f(z) = k (1 + e^-z)^(1/k), z = y w.x, written out independently ----------
def f_np(z, k):
    return k * (1 + np.exp(-z)) ** (1 / k)


def df_np(z, k):  # eq. 5-6: f'(z) = -(1 + e^-z)^(1/k - 1) e^-z
    return -((1 + np.exp(-z)) ** (1 / k - 1)) * np.exp(-z)


def d2f_np(z, k):  # f''(z) = e^-z (1 + e^-z)^(1/k - 2) (1 + e^-z / k)
    u = np.exp(-z)
    return u * (1 + u) ** (1 / k - 2) * (1 + u / k)


@pytest.mark.parametrize("k", KS)
def test_binary_rlo_value_is_eq4(k):
    rng = np.random.default_rng(0)
    z, y = rng.uniform(-30, 30, 200), rng.choice([-1.0, 1.0], 200)
    loss = get_loss("binary_root_convex", k=k, reduction="none")
    got = loss(torch.tensor(z), torch.tensor(y)).numpy()
    # rtol 1e-8, not 1e-15: torch's softplus returns x for x > 20, dropping log1p(e^-20) ~ 2e-9.
    np.testing.assert_allclose(got, f_np(y * z, k), rtol=1e-8)
    # Labels {0, 1} read 0 as -1; a confidently wrong fp32 logit stays finite.
    np.testing.assert_allclose(loss(torch.tensor(z), torch.tensor((y > 0).astype(np.int64))).numpy(), got, rtol=1e-12)
    big = loss(torch.tensor([-200.0]), torch.tensor([1.0])).item()
    assert np.isfinite(big)
    if 200 / k < 80:  # below the overflow clamp of losses/rooted.py the value is exact
        assert big == pytest.approx(k * np.exp(200 / k), rel=1e-5)


@pytest.mark.parametrize("k", KS)
def test_binary_rlo_gradient_is_eq5_6(k):
    rng = np.random.default_rng(1)
    X, y, w = rng.normal(size=(50, 4)), rng.choice([-1.0, 1.0], 50), rng.normal(size=4)
    wt = torch.tensor(w, requires_grad=True)
    get_loss("binary_root_convex", k=k)(torch.tensor(X) @ wt, torch.tensor(y)).backward()
    margin = y * (X @ w)
    np.testing.assert_allclose(wt.grad.numpy(), (df_np(margin, k) * y) @ X / len(y), rtol=1e-10)
    coef = binary_root_convex_grad_coef(torch.tensor(margin), k).numpy()
    np.testing.assert_allclose(coef, df_np(margin, k), rtol=1e-12)


@pytest.mark.parametrize("k", KS)
def test_hessian_coefficient_against_autograd(k):
    z = torch.linspace(-12, 12, 97, dtype=torch.float64, requires_grad=True)
    value = get_loss("binary_root_convex", k=k, reduction="sum")(z, torch.ones_like(z))
    (first,) = torch.autograd.grad(value, z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    coef = binary_root_convex_hessian_coef(z.detach(), k)
    np.testing.assert_allclose(coef.numpy(), second.numpy(), rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(coef.numpy(), d2f_np(z.detach().numpy(), k), rtol=1e-10)
    # The paper's h = l^k s (1 - s (1 - 1/k)), l^k = (1 + e^-z)^(1/k), holds with s = sigmoid(-z) (the
    # probability of the wrong label); reading s as sigmoid(+z) does not give the second derivative.
    zz = z.detach().numpy()
    lk = (1 + np.exp(-zz)) ** (1 / k)
    s_wrong, s_right = 1 / (1 + np.exp(zz)), 1 / (1 + np.exp(-zz))
    np.testing.assert_allclose(lk * s_wrong * (1 - s_wrong * (1 - 1 / k)), second.numpy(), rtol=1e-10)
    assert np.abs(lk * s_right * (1 - s_right * (1 - 1 / k)) - second.numpy()).max() > 0.05


def test_large_k_tends_to_logistic():
    z = torch.linspace(-10, 10, 41, dtype=torch.float64)
    s = torch.sigmoid(z)
    torch.testing.assert_close(binary_root_convex_hessian_coef(z, 1e12), s * (1 - s), rtol=1e-6, atol=0)
    torch.testing.assert_close(binary_root_convex_grad_coef(z, 1e12), -torch.sigmoid(-z), rtol=1e-6, atol=0)
    assert not torch.allclose(binary_root_convex_hessian_coef(z, 3.0), s * (1 - s), rtol=1e-2)


@pytest.mark.parametrize("k", [3.0, 7.0])
def test_softmax_rlo_for_two_classes_is_binary_rlo_minus_k(k):
    """The multi-class form used for wine (root_convex, m = k) reduces to eq. 4 for two classes."""
    z = torch.linspace(-20, 20, 81, dtype=torch.float64)
    y = (torch.arange(81) % 2).long()
    multi = get_loss("root_convex", k=k, m=k, reduction="none")(torch.stack([torch.zeros_like(z), z], 1), y)
    binary = get_loss("binary_root_convex", k=k, reduction="none")(z, y)
    torch.testing.assert_close(multi, binary - k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", KS)
def test_risk_hessian_closed_form_and_strictly_convex(k):
    rng = np.random.default_rng(2)
    X1 = torch.tensor(np.hstack([rng.normal(size=(40, 3)), np.ones((40, 1))]))
    y = torch.tensor(rng.integers(0, 2, 40))
    sign = torch.where(y == 1, 1.0, -1.0).double()
    for method, name in (("rlo", "binary_root_convex"), ("lr", "logistic")):
        hess = regression.risk_hessian(X1, y, get_loss(name, k=k), 1)
        for scale in (0.1, 1.0, 5.0):  # random w, up to large margins
            theta = torch.tensor(rng.normal(scale=scale, size=4))
            H = hess(theta)
            closed = regression.closed_form_hessian(X1, sign * (X1 @ theta), method, k)
            # Not exact to 1e-15: autograd through torch's softplus treats margins beyond 20 as linear.
            torch.testing.assert_close(H, closed, rtol=1e-7, atol=1e-9)
            assert torch.linalg.eigvalsh(H)[0] > 0  # X has full column rank: strictly convex (Lemma 1)


@pytest.mark.parametrize("name,n_out", [("root_convex", 3), ("ce", 4), ("binary_root_convex", 1), ("logistic", 1)])
def test_risk_hessian_equals_autograd_over_theta(name, n_out):
    """The per-row block form against torch's Hessian of the risk itself (a loss that were not a mean of
    per-row terms would break the block form)."""
    rng = np.random.default_rng(5)
    X1 = torch.tensor(np.hstack([rng.normal(size=(30, 3)), np.ones((30, 1))]))
    y = torch.tensor(rng.integers(0, max(n_out, 2), 30))
    theta = torch.tensor(rng.normal(size=4 * n_out))
    loss = get_loss(name, k=3.0, m=3.0) if "root" in name else get_loss(name)
    want = torch.autograd.functional.hessian(regression.risk(X1, y, loss, n_out), theta)
    torch.testing.assert_close(regression.risk_hessian(X1, y, loss, n_out)(theta), want, rtol=1e-10, atol=1e-12)


def test_identifiable_basis_drops_constant_feature_and_softmax_shift():
    rng = np.random.default_rng(3)
    X = np.hstack([rng.normal(size=(30, 2)), np.zeros((30, 1)), np.ones((30, 1))])  # zero column + bias
    X1 = torch.tensor(X)
    assert regression.identifiable_basis(X1, 1).shape == (4, 3)
    Q = regression.identifiable_basis(X1, 3)
    assert Q.shape == (12, 6)
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64))
    y = torch.tensor(rng.integers(0, 3, 30))
    H = regression.risk_hessian(X1, y, get_loss("root_convex", k=3.0, m=3.0), 3)(torch.tensor(rng.normal(size=12)))
    assert torch.linalg.eigvalsh(H)[0].abs() < 1e-12  # singular in full ...
    assert torch.linalg.eigvalsh(Q.T @ H @ Q)[0] > 1e-6  # ... strictly convex on the identifiable subspace


def test_gradient_descent_matches_numpy():
    """Full-batch GD on the mean RLO plus l2/2 ||w||^2 (the bias is not penalised), from w = 0."""
    args = regression.parse_args(["--dataset", "breast_cancer", "--iters", "4", "--lr", "0.3", "--l2", "0.5"])
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(25, 3)), rng.integers(0, 2, 25)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    run = regression.Run(args, "rlo_l2", 2.5, 2, Xt, yt, Xt, yt, seed=0)
    w, b, sign = np.zeros(3), 0.0, np.where(y == 1, 1.0, -1.0)
    for _ in range(4):
        g = df_np(sign * (X @ w + b), 2.5) * sign
        w, b = w - 0.3 * (g @ X / 25 + 0.5 * w), b - 0.3 * g.mean()
    np.testing.assert_allclose(run.model.weight.detach().numpy()[0], w, rtol=1e-10)
    np.testing.assert_allclose(run.model.bias.item(), b, rtol=1e-10)
    # curves: objective minus the infimum of the regularised objective, at the final iterate
    final = f_np(sign * (X @ w + b), 2.5).mean() + 0.25 * w @ w
    assert 2.5 < run.infimum < final and run.curve[-1, 0] == pytest.approx(final - run.infimum, rel=1e-10)


@pytest.mark.parametrize("method", ["lr_l2", "rlo_l2"])
def test_l2_curves_subtract_the_regularised_infimum_and_reach_zero(method):
    ds = load_tabular("wine")
    X = torch.from_numpy((ds.X - ds.X.mean(0)) / ds.X.std(0))
    args = regression.parse_args(["--dataset", "wine", "--iters", "300", "--lr", "0.5", "--weight-decay", "0.1"])
    run = regression.Run(args, method, 3.0, 3, X, torch.from_numpy(ds.y), X, torch.from_numpy(ds.y), seed=0)
    assert run.curve[:, 0].min() >= 0 and run.curve[-1, 0] < 1e-6 < run.curve[0, 0]


def test_a_collapsed_run_is_reported(capsys):
    ds = load_tabular("wine")  # raw features (proline ~ 1000): a few GD steps predict one class everywhere
    X, y = torch.from_numpy(ds.X), torch.from_numpy(ds.y)
    run = regression.Run(regression.parse_args(["--dataset", "wine", "--iters", "5"]), "lr", None, 3, X, y, X, y, 0)
    assert run.constant
    regression.warn_constant({("lr", None): [run]})
    assert "warning: lr predicts a single class for every test sample in 1/1 splits" in capsys.readouterr().err


def test_printed_k_range_follows_the_k_list():
    ds = load_tabular("wine")
    for spec, shown in [("3:6", "k in 3..6"), ("3,4,6,10", "k in 3, 4, 6, 10")]:
        args = regression.parse_args(["--dataset", "wine", "--sweep-k", spec])
        rows = [{"method": "rlo", "k": f"{k:g}", "test_acc_mean": 90.0, "test_acc_std": 1.0} for k in args.ks]
        assert shown in regression.format_table(ds, args, rows)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_cv_run_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "bc"
    regression.main(["--dataset", "breast_cancer", "--iters", "15", "--folds", "3", "--sweep-k", "2:5",
                     "--diagnose", "--out", str(out)])
    table = read(out / "table.csv")
    assert list(table[0]) == ["method", "k", "test_acc_mean", "test_acc_std"]
    assert [(r["method"], r["k"]) for r in table] == [("lr", ""), ("lr_l2", "")] + \
        [(m, str(k)) for m in ("rlo", "rlo_l2") for k in range(2, 6)]
    curves = read(out / "curves.csv")
    assert len(curves) == 10 * 16 and list(curves[0]) == ["method", "k", "iter", "train_loss", "train_acc", "test_acc"]
    last = {(r["method"], r["k"]): float(r["test_acc"]) for r in curves if r["iter"] == "15"}
    for r in table:  # the table is the fold mean of the last iterate's test accuracy
        assert float(r["test_acc_mean"]) == pytest.approx(last[(r["method"], r["k"])], abs=1e-3)
        assert 50 < float(r["test_acc_mean"]) <= 100 and float(r["test_acc_std"]) >= 0
    lr_loss = [float(r["train_loss"]) for r in curves if r["method"] == "lr"]
    assert lr_loss[0] == pytest.approx(np.log(2)) and all(np.diff(lr_loss) < 0)  # GD descends from w = 0
    report = json.loads((out / "diagnose.json").read_text())
    for method in ("lr", "rlo"):
        e = report[method]
        assert e["closed_form_max_abs_diff"] < 1e-12 and 0 < e["lambda_min"] < e["lambda_max"]
        assert e["condition"] == pytest.approx(e["lambda_max"] / e["lambda_min"])
    png = (out / "convergence.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not (out / "boundary.png").exists() and not list(out.glob("*.tmp"))
    printed = capsys.readouterr().out
    rlo_rows = [line for line in printed.splitlines() if line.startswith("RLO ")]
    accs = [float(line.split()[2]) for line in rlo_rows]
    assert len(rlo_rows) == 3 and accs == sorted(accs, reverse=True)  # the top 3 of 4 k
    assert "condition number" in printed and "top 3" in printed


def test_multiclass_and_spiral_runs(tmp_path):
    wine = tmp_path / "wine"
    regression.main(["--dataset", "wine", "--iters", "10", "--folds", "2", "--diagnose", "--out", str(wine), "--quiet"])
    report = json.loads((wine / "diagnose.json").read_text())
    assert report["dims"] == 14 * 2 and report["rlo"]["lambda_min"] > 0 and "closed_form_max_abs_diff" not in report["lr"]
    spiral = tmp_path / "spiral"
    rows = regression.main(["--dataset", "spiral", "--model", "fcn3", "--iters", "5", "--repeats", "2",
                            "--optimizer", "adam", "--out", str(spiral), "--quiet"])
    assert {r["method"] for r in rows} == set(regression.METHODS)
    assert (spiral / "boundary.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "iris"], "unknown dataset 'iris'"),
    (["--dataset", "wine", "--model", "mlp"], "unknown model 'mlp'"),
    (["--dataset", "wine", "--sweep-k", "3-20"], "--sweep-k must be"),
    (["--dataset", "wine", "--sweep-k", "0:2"], "k must be a finite number > 0"),
    (["--dataset", "spiral", "--model", "fcn2", "--diagnose"], "--diagnose needs --model linear"),
    (["--dataset", "wine", "--folds", "1"], "--folds must be >= 2"),
    (["--dataset", "wine", "--folds", "60"], "fewer than --folds 60"),
])
def test_bad_input_raises_user_error(argv, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        regression.main(argv + ["--out", str(tmp_path)])


def test_missing_uci_file_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "regression.py", "--dataset", "ionosphere", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: ionosphere needs ionosphere.data in {tmp_path}/ or {tmp_path}/ionosphere/ "
                                   "(missing: ionosphere.data); "
                                   "download them from https://archive.ics.uci.edu/dataset/52/ionosphere and pass --data-dir")
    assert not (tmp_path / "out").exists()


def test_minimize_and_condition_number():
    """L-BFGS finds the penalized logistic optimum (zero gradient, the bias unpenalized); the condition
    number is taken on the given subspace."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 3))
    y = torch.tensor((X[:, 0] + rng.normal(size=80) > 0).astype(np.float64))
    X1 = torch.tensor(np.hstack([X, np.ones((80, 1))]))
    f = regression.risk(X1, y, get_loss("logistic"), 1, l2=0.5)
    theta, value, grad = regression.minimize(f, 4)
    assert grad < 1e-6 and value == pytest.approx(f(theta).item())
    plain = regression.risk(X1, y, get_loss("logistic"), 1)
    W = theta.clone()
    assert f(W).item() == pytest.approx(plain(W).item() + 0.25 * (W[:3] ** 2).sum().item())
    H = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    assert regression.condition_number(H, torch.eye(3, dtype=torch.float64)) == float("inf")
    assert regression.condition_number(H, torch.eye(3, dtype=torch.float64)[:, :2]) == pytest.approx(4.0)
