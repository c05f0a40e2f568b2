"""gan.py: the mixtures, the mode-collapse metrics, a tiny end-to-end run and its outputs, errors."""
import math
import os
import subprocess
import sys

import pytest
import torch

import gan
from engine import UserError, read_csv
from tests.helpers import ROOT


TINY = ["--steps", "12", "--eval-every", "6", "--n-eval", "300", "--hidden", "16", "--bs", "32", "--plots", "1"]


def test_mode_centers():
    ring, ring_std = gan.mode_centers("ring")
    assert ring.shape == (8, 2) and ring_std == 0.02
    torch.testing.assert_close(ring.norm(dim=1), torch.full((8,), 2.0))
    grid, grid_std = gan.mode_centers("grid")
    assert grid.shape == (25, 2) and grid_std == 0.05
    assert sorted(set(grid[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert len({tuple(c) for c in grid.tolist()}) == 25
    with pytest.raises(UserError, match="ring, grid"):
        gan.mode_centers("spiral")


def test_metrics_on_constructed_samples():
    centers, std = gan.mode_centers("ring")
    # 30 samples on modes 0-5, 19 on mode 6 (below min_count 20), none on mode 7; 50 far off (4 std away).
    on_mode = torch.cat([centers[i].repeat(30, 1) for i in range(6)] + [centers[6].repeat(19, 1)])
    off = centers[7] + torch.tensor([4 * std, 0.0])
    samples = torch.cat([on_mode, off.repeat(50, 1), torch.full((1, 2), float("nan"))])
    modes, hq, counts = gan.mode_metrics(samples, centers, std, min_count=20)
    assert modes == 6
    assert hq == pytest.approx(199 / 250)
    assert counts.tolist() == [30] * 6 + [19, 0]
    # A sample just inside 3 std counts as high quality, just outside does not.
    edge = centers[:1] + torch.tensor([[0.0, 3 * std * 0.999], [0.0, 3 * std * 1.001]])
    assert gan.mode_metrics(edge, centers, std, 1)[2].tolist() == [1] + [0] * 7


@pytest.mark.parametrize("data", ["ring", "grid"])
def test_real_samples_cover_every_mode_with_the_gaussian_hq_share(data):
    """Real data scores perfectly: all modes, and P(|x| <= 3 std) = 1 - exp(-9/2) for a 2-D Gaussian."""
    centers, std = gan.mode_centers(data)
    samples = gan.sample_real(centers, std, 20000, torch.Generator().manual_seed(0))
    modes, hq, counts = gan.mode_metrics(samples, centers, std, min_count=20)
    assert modes == len(centers)
    assert hq == pytest.approx(1 - math.exp(-4.5), abs=0.004)
    assert counts.min() > 0.8 * counts.float().mean()


def test_large_k_root_trains_like_ce():
    """Same seed, same draws: RLO with k -> inf takes the CE steps (its gradients tend to CE's)."""
    args = gan.build_parser().parse_args(["--steps", "20", "--hidden", "16", "--batch", "32", "--n-eval", "100",
                                          "--plots", "0", "--k", "1e5"])
    logger = type("Null", (), {"log": lambda self, **row: None})()
    ce = gan.train_run(args, "ce", 3, logger)[0]
    root = gan.train_run(args, "root", 3, logger)[0]
    args.k = 2.0
    root2 = gan.train_run(args, "root", 3, logger)[0]
    torch.testing.assert_close(root, ce, rtol=0, atol=1e-6)
    assert (root2 - ce).abs().max() > 3e-5  # with Adam, early steps differ little even at k = 2


def test_compare_run_writes_metrics_summary_and_pngs(tmp_path, capsys):
    out = str(tmp_path / "out")
    gan.main(["--compare", "--dataset", "grid", "--seed", "0", "1", "--out", out] + TINY)
    rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [(r["loss"], r["seed"], r["step"]) for r in rows] == [
        (loss, seed, step) for seed in (0.0, 1.0) for loss in ("ce", "root") for step in (6.0, 12.0)]
    assert all(0 <= r["modes"] <= 25 and 0 <= r["hq_share"] <= 1 and math.isfinite(r["d_loss"]) for r in rows)
    assert all(r["g_grad"] > 0 and math.isfinite(r["d_real"] - r["d_fake"]) for r in rows)
    assert {r["k"] for r in rows if r["loss"] == "root"} == {2.0} and {r["k"] for r in rows if r["loss"] == "ce"} == {""}
    summary = read_csv(os.path.join(out, "summary.csv"))
    assert len(summary) == 4 and {s["n_modes"] for s in summary} == {25.0}
    final = {(r["loss"], r["seed"]): (r["modes"], r["hq_share"]) for r in rows if r["step"] == 12}
    assert {(s["loss"], s["seed"]): (s["modes"], s["hq_share"]) for s in summary} == final
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == ["compare.png"] + [f"samples_{loss}_seed{s}_step12.png" for loss in ("ce", "root") for s in (0, 1)]
    for name in pngs:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "over 2 seeds" in capsys.readouterr().out

    # Seeded: a second run reproduces the metrics exactly; an existing result is not overwritten silently.
    with pytest.raises(UserError, match="--overwrite"):
        gan.main(["--compare", "--data", "grid", "--seeds", "0", "1", "--out", out] + TINY)
    gan.main(["--loss", "root", "--data", "grid", "--seeds", "1", "--out", out, "--overwrite"] + TINY)
    again = read_csv(os.path.join(out, "metrics.csv"))
    assert again == [r for r in rows if r["loss"] == "root" and r["seed"] == 1]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--k", "0"], "k must be a finite number > 0"),
    (["--seed", "1", "1"], "--seed values must be distinct"),
    (["--plots", "-1"], "--plots must be >= 0"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_arguments(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        gan.main(argv + ["--out", str(tmp_path)])
    assert not os.path.exists(tmp_path / "metrics.csv")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "gan.py", "--k", "-1", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: k must be a finite number > 0, got -1.0"]
