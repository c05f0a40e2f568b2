"""Tabular classification sets for the convex experiments (paper Table 1).

Every loader returns a `Tabular(X, y, classes, name)`: X float64 (n, d), y int64 class indices
0..C-1, `classes` the original label names in index order. For two classes, index 1 is the positive
class (+1 for the binary losses) as the UCI file encodes it.

- `wine`, `breast_cancer`: embedded in scikit-learn, no files.
- `madelon_like`: scikit-learn's `make_classification` with Madelon's design (500 features, 5
  informative, 15 redundant linear combinations, 480 noise probes, 32 clusters on a 5-D hypercube,
  2600 rows), seeded; a stand-in when the real Madelon files are absent.
- `ionosphere`, `madelon`, `spectf`: the original UCI files, read from `data_dir` or its subfolder
  named after the set (`data_dir/madelon/`, `data_dir/spectf/`). The sets that ship
  as a train/validation split (madelon, spectf) are concatenated: the paper reports 5-fold CV on the
  whole set. A missing file raises one `UserError` naming the files and where to get them.
"""
import functools
import os
from dataclasses import dataclass

import numpy as np

from engine.errors import UserError


@dataclass
class Tabular:
    X: np.ndarray
    y: np.ndarray
    classes: list
    name: str

    @property
    def num_classes(self):
        return len(self.classes)


UCI_FILES = {
    "ionosphere": (["ionosphere.data"], "https://archive.ics.uci.edu/dataset/52/ionosphere"),
    "madelon": (["madelon_train.data", "madelon_train.labels", "madelon_valid.data", "madelon_valid.labels"],
                "https://archive.ics.uci.edu/dataset/171/madelon"),
    "spectf": (["SPECTF.train", "SPECTF.test"], "https://archive.ics.uci.edu/dataset/96/spectf+heart"),
}


def _uci_paths(name, data_dir):
    """The files of `name` in `data_dir` itself or in its subfolder `name/` (the layout of
    ../shared/data/uci, where madelon/ and spectf/ hold their several files)."""
    files, url = UCI_FILES[name]
    data_dir = data_dir or "."
    for folder in (data_dir, os.path.join(data_dir, name)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in files):
            return [os.path.join(folder, f) for f in files]
    missing = [f for f in files if not os.path.isfile(os.path.join(data_dir, f))]
    raise UserError(f"{name} needs {', '.join(files)} in {data_dir}/ or {os.path.join(data_dir, name)}/ "
                    f"(missing: {', '.join(missing)}); download them from {url} and pass --data-dir")


def _read_rows(path, sep):
    """Non-empty lines of a text file split on `sep` (None: any whitespace), with line numbers."""
    with open(path) as f:
        return [(i, line.strip().split(sep)) for i, line in enumerate(f, 1) if line.strip()]


def _floats(path, lineno, cells):
    try:
        return [float(c) for c in cells]
    except ValueError:
        raise UserError(f"{path}:{lineno}: expected numbers, got {','.join(cells)[:60]!r}") from None


def _check_width(path, rows, width):
    for lineno, cells in rows:
        if len(cells) != width:
            raise UserError(f"{path}:{lineno}: expected {width} columns, got {len(cells)}")


def load_ionosphere(data_dir):
    """ionosphere.data: 351 rows of 34 comma-separated features and a class 'g' (good) or 'b' (bad)."""
    (path,) = _uci_paths("ionosphere", data_dir)
    rows = _read_rows(path, ",")
    _check_width(path, rows, 35)
    classes = ["b", "g"]
    X, y = [], []
    for lineno, cells in rows:
        if cells[-1] not in classes:
            raise UserError(f"{path}:{lineno}: class must be 'g' or 'b', got {cells[-1]!r}")
        X.append(_floats(path, lineno, cells[:-1]))
        y.append(classes.index(cells[-1]))
    return Tabular(np.array(X), np.array(y, dtype=np.int64), classes, "ionosphere")


def _madelon_part(data_path, labels_path):
    rows = _read_rows(data_path, None)
    _check_width(data_path, rows, 500)
    labels = _read_rows(labels_path, None)
    if len(labels) != len(rows):
        raise UserError(f"{labels_path} has {len(labels)} labels for {len(rows)} rows of {data_path}")
    y = []
    for lineno, cells in labels:
        if len(cells) != 1 or cells[0] not in ("-1", "1"):
            raise UserError(f"{labels_path}:{lineno}: label must be -1 or 1, got {' '.join(cells)!r}")
        y.append(int(cells[0] == "1"))
    return [_floats(data_path, i, c) for i, c in rows], y


def load_madelon(data_dir):
    """madelon_{train,valid}.data (500 space-separated integers per row) and .labels (-1 / 1 per line)."""
    train_data, train_labels, valid_data, valid_labels = _uci_paths("madelon", data_dir)
    Xa, ya = _madelon_part(train_data, train_labels)
    Xb, yb = _madelon_part(valid_data, valid_labels)
    return Tabular(np.array(Xa + Xb), np.array(ya + yb, dtype=np.int64), ["-1", "1"], "madelon")


def load_spectf(data_dir):
    """SPECTF.train / SPECTF.test: comma-separated, the diagnosis (0 / 1) first, then 44 integer features."""
    X, y = [], []
    for path in _uci_paths("spectf", data_dir):
        rows = _read_rows(path, ",")
        _check_width(path, rows, 45)
        for lineno, cells in rows:
            if cells[0] not in ("0", "1"):
                raise UserError(f"{path}:{lineno}: diagnosis must be 0 or 1, got {cells[0]!r}")
            X.append(_floats(path, lineno, cells[1:]))
            y.append(int(cells[0]))
    return Tabular(np.array(X), np.array(y, dtype=np.int64), ["0", "1"], "spectf")


def spectf_official_split(data_dir):
    """(train, test) row indices into `load_spectf`'s rows for UCI's own split: the rows of SPECTF.train
    (80) come first, then those of SPECTF.test (187)."""
    train_path, test_path = _uci_paths("spectf", data_dir)
    n_train, n_test = (len(_read_rows(p, ",")) for p in (train_path, test_path))
    return np.arange(n_train), np.arange(n_train, n_train + n_test)


def _sklearn_set(loader, name):
    from sklearn import datasets

    bunch = getattr(datasets, loader)()
    return Tabular(bunch.data.astype(np.float64), bunch.target.astype(np.int64), list(bunch.target_names), name)


def load_wine(data_dir=None):
    """178 wines, 13 features, 3 cultivars (scikit-learn's copy of the UCI set)."""
    return _sklearn_set("load_wine", "wine")


def load_breast_cancer(data_dir=None):
    """569 tumours, 30 features, malignant / benign (scikit-learn's copy of UCI WDBC)."""
    return _sklearn_set("load_breast_cancer", "breast_cancer")


def madelon_like(data_dir=None, seed=0, n_samples=2600):
    """Madelon's generator (Guyon 2003) as scikit-learn implements it; 1% label noise as in Madelon."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=n_samples, n_features=500, n_informative=5, n_redundant=15,
                               n_repeated=0, n_classes=2, n_clusters_per_class=16, flip_y=0.01,
                               class_sep=1.0, hypercube=True, shuffle=True, random_state=seed)
    return Tabular(X.astype(np.float64), y.astype(np.int64), ["0", "1"], "madelon_like")


TABULAR = {
    "wine": load_wine,
    "breast_cancer": load_breast_cancer,
    "ionosphere": load_ionosphere,
    "madelon": load_madelon,
    "spectf": load_spectf,
    "madelon_like": madelon_like,
}


@functools.lru_cache(maxsize=4)
def _parsed_uci(name, data_dir, stamps):
    """`stamps` (the files' mtime and size) is part of the key: an edited file is read again."""
    return TABULAR[name](data_dir)


def load_tabular(name, data_dir=None, seed=0):
    """The set `name` from TABULAR; `data_dir` for the UCI files, `seed` for generated sets."""
    if name not in TABULAR:
        raise UserError(f"unknown tabular dataset {name!r}; choose from: {', '.join(TABULAR)}")
    if name == "madelon_like":
        ds = madelon_like(seed=seed)
    elif name in UCI_FILES:  # parsed once per process (Madelon's 1.3M numbers take half a second); a copy each call
        stamps = tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, _uci_paths(name, data_dir)))
        cached = _parsed_uci(name, data_dir, stamps)
        ds = Tabular(cached.X.copy(), cached.y.copy(), list(cached.classes), cached.name)
    else:
        ds = TABULAR[name](data_dir)
    if not len(ds.y):  # empty files: one message here, not a numpy error in the caller
        raise UserError(f"{name}: its files in {data_dir or '.'}/ hold no rows")
    return ds
