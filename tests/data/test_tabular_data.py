"""Loaders of data/tabular.py (UCI formats, written here as tiny files) and data/synthetic.py."""
import os

import numpy as np
import pytest

from data import synthetic, tabular
from engine import UserError
from tests.helpers import SHARED


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_ionosphere_reads_uci_format(tmp_path):
    rng = np.random.default_rng(0)
    X = np.round(rng.uniform(-1, 1, (5, 34)), 5)
    labels = ["g", "b", "g", "g", "b"]
    write(tmp_path / "ionosphere.data", [",".join(f"{v:.5f}" for v in row) + "," + c for row, c in zip(X, labels)] + [""])
    ds = tabular.load_tabular("ionosphere", str(tmp_path))
    np.testing.assert_allclose(ds.X, X)
    assert ds.y.tolist() == [1, 0, 1, 1, 0] and ds.classes == ["b", "g"] and ds.num_classes == 2


def test_ionosphere_bad_rows_name_file_and_line(tmp_path):
    row = ",".join(["0.5"] * 34)
    write(tmp_path / "ionosphere.data", [row + ",g", row + ",x"])
    with pytest.raises(UserError, match=r"ionosphere.data:2: class must be 'g' or 'b'"):
        tabular.load_ionosphere(str(tmp_path))
    write(tmp_path / "ionosphere.data", [row + ",g", "0.5,g"])
    with pytest.raises(UserError, match=r"ionosphere.data:2: expected 35 columns, got 2"):
        tabular.load_ionosphere(str(tmp_path))


def test_madelon_concatenates_train_and_valid(tmp_path):
    rng = np.random.default_rng(1)
    parts = {"train": (rng.integers(0, 999, (4, 500)), [1, -1, -1, 1]), "valid": (rng.integers(0, 999, (2, 500)), [-1, 1])}
    for split, (X, y) in parts.items():
        # The UCI files end every row with a space.
        write(tmp_path / f"madelon_{split}.data", [" ".join(map(str, row)) + " " for row in X])
        write(tmp_path / f"madelon_{split}.labels", [str(v) for v in y])
    ds = tabular.load_tabular("madelon", str(tmp_path))
    np.testing.assert_array_equal(ds.X, np.vstack([parts["train"][0], parts["valid"][0]]))
    assert ds.y.tolist() == [1, 0, 0, 1, 0, 1]
    # Parsed once per process: a caller's edits stay its own, an edited file is read again.
    ds.X[:] = -1
    again = tabular.load_tabular("madelon", str(tmp_path))
    np.testing.assert_array_equal(again.X, np.vstack([parts["train"][0], parts["valid"][0]]))
    write(tmp_path / "madelon_valid.labels", ["1", "1"])  # one byte shorter: a new stamp even within one mtime tick
    assert tabular.load_tabular("madelon", str(tmp_path)).y.tolist() == [1, 0, 0, 1, 1, 1]


def test_madelon_label_count_mismatch(tmp_path):
    for split in ("train", "valid"):
        write(tmp_path / f"madelon_{split}.data", [" ".join(["1"] * 500)] * 3)
        write(tmp_path / f"madelon_{split}.labels", ["1", "-1", "1"])
    write(tmp_path / "madelon_valid.labels", ["1", "-1"])
    with pytest.raises(UserError, match="has 2 labels for 3 rows"):
        tabular.load_madelon(str(tmp_path))


def test_spectf_reads_both_files(tmp_path):
    rng = np.random.default_rng(2)
    train, test = rng.integers(0, 100, (3, 45)), rng.integers(0, 100, (2, 45))
    train[:, 0], test[:, 0] = [1, 0, 1], [0, 0]
    write(tmp_path / "SPECTF.train", [",".join(map(str, r)) for r in train])
    write(tmp_path / "SPECTF.test", [",".join(map(str, r)) for r in test])
    ds = tabular.load_tabular("spectf", str(tmp_path))
    np.testing.assert_array_equal(ds.X, np.vstack([train, test])[:, 1:])
    assert ds.y.tolist() == [1, 0, 1, 0, 0] and ds.X.shape == (5, 44)


def test_files_in_a_subfolder_named_after_the_set(tmp_path):
    """../shared/data/uci holds madelon/ and spectf/ as subfolders: --data-dir uci finds them there."""
    (tmp_path / "spectf").mkdir()
    rows = [",".join(["1"] + ["7"] * 44), ",".join(["0"] + ["9"] * 44)]
    write(tmp_path / "spectf" / "SPECTF.train", rows)
    write(tmp_path / "spectf" / "SPECTF.test", rows[:1])
    ds = tabular.load_tabular("spectf", str(tmp_path))
    assert ds.y.tolist() == [1, 0, 1] and ds.X.shape == (3, 44)


SHARED_UCI = os.path.join(SHARED, "uci")


@pytest.mark.skipif(not os.path.isdir(SHARED_UCI), reason="../shared/data/uci is absent (a clone without shared data)")
@pytest.mark.real_data
def test_shared_uci_layout_loads():
    shapes = {name: tabular.load_tabular(name, SHARED_UCI).X.shape for name in ("ionosphere", "madelon", "spectf")}
    assert shapes == {"ionosphere": (351, 34), "madelon": (2600, 500), "spectf": (267, 44)}


def test_missing_files_one_clear_message(tmp_path):
    (tmp_path / "SPECTF.train").write_text("")
    with pytest.raises(UserError) as err:
        tabular.load_tabular("spectf", str(tmp_path))
    msg = str(err.value)
    assert "SPECTF.train, SPECTF.test" in msg and "missing: SPECTF.test" in msg and "archive.ics.uci.edu" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="unknown tabular dataset 'iris'"):
        tabular.load_tabular("iris")


def test_sklearn_sets():
    wine, bc = tabular.load_tabular("wine"), tabular.load_tabular("breast_cancer")
    assert wine.X.shape == (178, 13) and np.bincount(wine.y).tolist() == [59, 71, 48]
    assert bc.X.shape == (569, 30) and np.bincount(bc.y).tolist() == [212, 357]
    assert wine.X.dtype == np.float64 and wine.y.dtype == np.int64


def test_madelon_like_design():
    full = tabular.load_tabular("madelon_like", seed=3)
    assert full.X.shape == (2600, 500) and abs(full.y.mean() - 0.5) < 0.03
    a, b = tabular.madelon_like(seed=3, n_samples=600), tabular.madelon_like(seed=3, n_samples=600)
    np.testing.assert_array_equal(a.X, b.X)
    # 15 redundant features are linear combinations of the 5 informative ones: rank 500 - 15.
    assert np.linalg.matrix_rank(a.X) == 485
    assert not np.array_equal(a.X, tabular.madelon_like(seed=4, n_samples=600).X)


def test_spiral_geometry():
    ds = synthetic.spiral(n=1500, seed=0)
    assert ds.X.shape == (1500, 2) and np.bincount(ds.y).tolist() == [750, 750]
    np.testing.assert_array_equal(ds.X, synthetic.spiral(seed=0).X)
    assert not np.array_equal(ds.X, synthetic.spiral(seed=1).X)
    # Without noise every point lies on its arm: angle = 2 pi turns r (+ pi for class 1), mod 2 pi.
    clean = synthetic.spiral(n=200, turns=1.5, noise=0.0, seed=0)
    r = np.linalg.norm(clean.X, axis=1)
    angle = 2 * np.pi * 1.5 * r + np.pi * clean.y
    np.testing.assert_allclose(clean.X, np.stack([r * np.cos(angle), r * np.sin(angle)], 1), atol=1e-12)
    assert r.max() <= 1.0
    with pytest.raises(UserError, match="spiral needs"):
        synthetic.spiral(noise=-1)


def test_gaussians_alternate_on_ring():
    ds = synthetic.gaussians(n=4000, blobs=4, std=0.05, seed=0)
    # Class 0 blobs at angles 0 and pi, class 1 at pi/2 and 3pi/2: |x| > |y| exactly for class 0.
    assert ((np.abs(ds.X[:, 0]) > np.abs(ds.X[:, 1])) == (ds.y == 0)).mean() > 0.999
    with pytest.raises(UserError, match="even blobs"):
        synthetic.gaussians(blobs=3)
