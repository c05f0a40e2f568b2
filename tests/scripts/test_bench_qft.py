"""benchmarks/bench_qft.py on a tiny random Llama: the fp and QFT learning rates chosen on the validation
tail, the test perplexities of the four stages and their ratios, resuming without training again, and
the errors for a folder that is not packed and an occupied --out."""
import csv
import functools
import json
import math
import os
import sys

import pytest

import ft_opt
import lm
import opt
from engine import UserError
from tests.helpers import ROOT
from tests.lm_fixtures import make_text

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_qft  # noqa: E402
import results  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_qft")
    train, test = tmp / "train.txt", tmp / "test.txt"
    train.write_text(make_text(40, seed=1))
    test.write_text(make_text(8, seed=2))
    return tmp, str(train), str(test)


@pytest.fixture(scope="module")
def packed(tiny_llama_dir, texts):
    tmp, train, test = texts
    out = str(tmp / "packed")
    opt.main([tiny_llama_dir, "wikitext2", "--train-file", train, "--eval-file", test, "--nsamples", "4", "--seqlen", "32",
              "--eval-windows", "4", "--wbits", "2", "--quant", "e8p", "--threads", "1", "--save", out])
    return out


def argv(model, packed, texts, out, *extra):
    _, train, test = texts
    return ["--model", model, "--packed", packed, "--train-file", train, "--eval-file", test, "--valid-fraction", "0.25",
            "--steps", "2", "--bs", "4", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4",
            "--valid-windows", "2", "--lr", "1e-3", "3e-3", "--qft-lr", "1e-4", "3e-3", "--out", out, *extra]


@pytest.fixture(scope="module")
def run(tiny_llama_dir, packed, texts):
    tmp = texts[0]
    out, directory = str(tmp / "run"), tmp / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_qft, "write_rows", functools.partial(results.write_rows, directory=str(directory)))
        rows = bench_qft.main(argv(tiny_llama_dir, packed, texts, out))
    return dict(rows=rows, out=out, csv=directory / "bench_qft.csv")


def metrics(out, name):
    with open(os.path.join(out, name, "metrics.json")) as f:
        return json.load(f)


def test_each_grid_keeps_its_lowest_validation_perplexity(run):
    rows = {r["stage"]: r for r in run["rows"]}
    assert list(rows) == ["fp", "fp trained", "packed", "packed + QFT"]
    for stage, name, grid in (("fp trained", "fp", ("1e-3", "3e-3")), ("packed + QFT", "qft", ("1e-4", "3e-3"))):
        valid = {lr: metrics(run["out"], f"{name}_lr{float(lr):g}")["ppl_after"] for lr in grid}
        assert float(rows[stage]["lr"]) == float(min(valid, key=valid.get))
        assert float(rows[stage]["valid_ppl"]) == pytest.approx(min(valid.values()), rel=1e-3)
    assert float(rows["fp trained"]["valid_ppl"]) < float(rows["fp"]["valid_ppl"])  # the tiny language is learned


def test_test_perplexities_are_the_models_own_and_the_ratios_follow(run, tiny_llama_dir, packed, texts):
    rows = {r["stage"]: r for r in run["rows"]}
    model, tokenizer = lm.load_causal_lm(packed)
    ids = lm.encode(tokenizer, lm.read_text_file(texts[2]))
    assert float(rows["packed"]["ppl"]) == pytest.approx(lm.perplexity(model, ids, 32, max_windows=4), rel=1e-3)
    for r in rows.values():
        assert r["ppl_vs_fp"] == pytest.approx(float(r["ppl"]) / float(rows["fp"]["ppl"]), abs=2e-3)
        assert r["ppl_vs_fp_trained"] == pytest.approx(float(r["ppl"]) / float(rows["fp trained"]["ppl"]), abs=2e-3)
        assert math.isfinite(float(r["ppl"]))
    with open(run["csv"], newline="") as f:
        written = list(csv.DictReader(f))
    assert [w["stage"] for w in written] == list(rows) and written[0]["commit"] and written[0]["threads"]


def test_resume_reads_the_finished_runs_back(run, tiny_llama_dir, packed, texts, monkeypatch):
    def no_training(argv):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ft_opt, "main", no_training)
    monkeypatch.setattr(bench_qft, "write_rows", lambda *a, **k: None)
    again = bench_qft.main(argv(tiny_llama_dir, packed, texts, run["out"], "--resume"))
    assert [(r["stage"], r["lr"], r["ppl"]) for r in again] == [(r["stage"], r["lr"], r["ppl"]) for r in run["rows"]]


def test_bad_input_is_one_line(run, tiny_llama_dir, packed, texts):
    with pytest.raises(UserError, match="already holds a run"):
        bench_qft.main(argv(tiny_llama_dir, packed, texts, run["out"]))
    with pytest.raises(UserError, match="not a packed directory"):
        bench_qft.main(argv(tiny_llama_dir, tiny_llama_dir, texts, str(texts[0] / "other")))
