"""benchmarks/results.py: every row carries machine, threads, date and commit; a run of some cases replaces
only those cases' rows measured on its own machine; the file is never half-written."""
import csv
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import results  # noqa: E402

sys.path.pop(0)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_get_the_context_columns_last(tmp_path):
    path = results.write_rows("bench_x", [{"model": "fp32", "tok/s": 24.7}, {"model": "e8p2", "MB": 60}],
                              directory=str(tmp_path))
    rows = read(path)
    assert list(rows[0]) == ["model", "tok/s", "MB", *results.CONTEXT]
    assert [r["model"] for r in rows] == ["fp32", "e8p2"] and rows[1]["tok/s"] == "" and rows[0]["commit"]


def test_keep_replaces_only_the_cases_of_this_run(tmp_path):
    old = [{"model": "fp32", "threads": 1, "tok/s": 24.7}, {"model": "fp32", "threads": 2, "tok/s": 45.5},
           {"model": "e8p2", "threads": 1, "tok/s": 48.9}]
    results.write_rows("bench_x", old, directory=str(tmp_path))
    first = read(os.path.join(tmp_path, "bench_x.csv"))
    stamped = {(r["model"], r["threads"]): r for r in first}
    stamped["fp32", "2"].update(date="2020-01-01T00:00:00Z", commit="old")  # an earlier run's own stamp
    with open(os.path.join(tmp_path, "bench_x.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(first[0]))
        writer.writeheader()
        writer.writerows(stamped.values())
    path = results.write_rows("bench_x", [{"model": "e8p2", "threads": 1, "tok/s": 60.1, "GB/s": 3.6}],
                              directory=str(tmp_path), keep=("model", "threads"))
    rows = read(path)
    assert [(r["model"], r["threads"], r["tok/s"]) for r in rows] == [("fp32", "1", "24.7"), ("fp32", "2", "45.5"),
                                                                       ("e8p2", "1", "60.1")]
    assert rows[1]["commit"] == "old" and rows[1]["date"] == "2020-01-01T00:00:00Z" and rows[1]["GB/s"] == ""
    assert rows[2]["GB/s"] == "3.6"


def test_another_machines_rows_stay(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "machine", lambda: "CPU A")
    results.write_rows("bench_x", [{"model": "fp32", "tok/s": 24.7}], directory=str(tmp_path), keep=("model",))
    monkeypatch.setattr(results, "machine", lambda: "CPU B")
    path = results.write_rows("bench_x", [{"model": "fp32", "tok/s": 30.1}], directory=str(tmp_path), keep=("model",))
    assert [(r["machine"], r["tok/s"]) for r in read(path)] == [("CPU A", "24.7"), ("CPU B", "30.1")]
    path = results.write_rows("bench_x", [{"model": "fp32", "tok/s": 31.0}], directory=str(tmp_path), keep=("model",))
    assert [(r["machine"], r["tok/s"]) for r in read(path)] == [("CPU A", "24.7"), ("CPU B", "31.0")]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = results.write_rows("bench_x", [{"a": 1}], directory=str(tmp_path))
    with pytest.raises(ValueError):
        results.write_rows("bench_x", [{"a": 2}, {"a": float("nan"), "b": object.__new__(Unwritable)}],
                           directory=str(tmp_path))
    assert read(path)[0]["a"] == "1" and os.listdir(tmp_path) == ["bench_x.csv"]


class Unwritable:
    def __str__(self):
        raise ValueError("cannot be written")


def test_the_commit_is_dirty_for_changed_code_not_for_changed_results(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "bench_x.csv").write_text("a\n1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(results, "RESULTS_DIR", str(tmp_path / "benchmarks" / "results"))
    clean = results.commit()
    assert len(clean) == 12 and not clean.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "bench_x.csv").write_text("a\n2\n")  # a benchmark's earlier case
    assert results.commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert results.commit() == clean + "+dirty"
