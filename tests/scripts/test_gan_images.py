"""gan_images.py: the Fréchet distance against scipy's matrix square root, coverage by hand, a tiny run of both
losses on generated images in Fashion-MNIST's file layout (same start per seed, the scorer trained once and
reused), and bad input as one line with nothing written."""
import csv
import os

import numpy as np
import pytest
import torch
from scipy import linalg

import gan_images
from engine import UserError
from reproduce.fashion import write_generated

TINY = ["--n-train", "48", "--val-split", "64", "--steps", "4", "--eval-every", "2", "--n-eval", "40", "--bs", "8",
        "--width", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan_images_data")
    write_generated(str(root), train=160, test=48)
    return str(root)


def test_frechet_matches_scipy_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)), dtype=torch.float64)
    b = torch.tensor(rng.normal(size=(300, 6)) * 2 + 1, dtype=torch.float64)
    (mu1, s1), (mu2, s2) = gan_images.gaussian(a), gan_images.gaussian(b)
    np.testing.assert_allclose(s1.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-12)
    root = linalg.sqrtm(s1.numpy() @ s2.numpy())
    reference = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * root.real)
    assert gan_images.frechet((mu1, s1), (mu2, s2)) == pytest.approx(reference, rel=1e-9)
    assert gan_images.frechet((mu1, s1), (mu1, s1)) == pytest.approx(0.0, abs=1e-9)
    shift = torch.arange(6, dtype=torch.float64)  # a mean shift adds its squared length
    assert gan_images.frechet((mu1 + shift, s1), (mu1, s1)) == pytest.approx(float((shift ** 2).sum()), rel=1e-9)


def test_coverage_counts_classes_with_half_a_uniform_share():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 4 + [4])  # 5% of 100 is half of 10%
    assert gan_images.coverage(labels) == (3, 0.5)
    assert gan_images.coverage(torch.arange(10).repeat(5)) == (10, 0.1)


def test_both_losses_train_score_and_reuse_the_scorer(images, tmp_path):
    out = tmp_path / "run"
    rows = gan_images.main(["--data-dir", images, *TINY, "--compare", "--seed", "0", "1", "--out", str(out)])
    assert [(r["loss"], r["seed"]) for r in rows] == [("ce", 0), ("root", 0), ("ce", 1), ("root", 1)]
    for r in rows:
        assert r["n_train"] == 48 and r["fd_val"] >= 0 and r["fd_test"] >= 0 and 1 <= r["classes"] <= 10
        assert 0.1 <= r["top_share"] <= 1 and r["fd_floor"] == rows[0]["fd_floor"] >= 0
    with open(out / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert [int(m["step"]) for m in metrics if m["loss"] == "ce" and m["seed"] == "0"] == [2, 4]
    assert {f"samples_{loss}_seed{s}.png" for loss in ("ce", "root") for s in (0, 1)} <= set(os.listdir(out))
    scorer = out / "scorer.pt"
    stamp = os.stat(scorer).st_mtime_ns
    again = gan_images.main(["--data-dir", images, *TINY, "--loss", "ce", "--seed", "0", "--out", str(tmp_path / "b"),
                             "--scorer", str(scorer)])
    assert os.stat(scorer).st_mtime_ns == stamp  # loaded, not retrained
    assert again[0]["fd_test"] == rows[0]["fd_test"] and again[0]["scorer_acc"] == rows[0]["scorer_acc"]


def test_the_same_seed_starts_both_losses_from_the_same_nets(images):
    args = gan_images.build_parser().parse_args(["--data-dir", images, *TINY])
    torch.manual_seed(3)
    first = gan_images.generator(args.z_dim, args.width).state_dict()
    torch.manual_seed(3)
    second = gan_images.generator(args.z_dim, args.width).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_input_is_one_line_and_writes_nothing(images, tmp_path):
    out = tmp_path / "never"
    cases = [(["--data-dir", str(tmp_path / "absent")], "fashionmnist"),
             (["--data-dir", images, "--n-train", "1000"], "--n-train 1000 exceeds the 96 training images"),
             (["--data-dir", images, "--val-split", "500"], "--val-split 500 leaves no training images"),
             (["--data-dir", images, "--k", "0"], "k must be a finite number"),
             (["--data-dir", images, "--n-eval", "1"], "--n-eval must be >= 2")]
    for argv, message in cases:
        with pytest.raises(UserError, match=message) as err:
            gan_images.main([*TINY, *argv, "--out", str(out)])  # the last of a repeated flag counts
        assert "\n" not in str(err.value)
        assert not out.exists()
