"""benchmarks/bench_quant_model.py on a tiny random Llama and generated text: one row per case beside the
fp perplexity of the same run, the packed directory each row measured (its size, and its reloaded
perplexity), a rerun that replaces only its own cases in the results file, and one-line errors."""
import csv
import functools
import json
import os
import sys

import pytest

import lm
from engine import UserError, cli
from lm.quantized import directory_bytes
from tests.helpers import ROOT
from tests.lm_fixtures import make_text

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_quant_model  # noqa: E402
import results  # noqa: E402

sys.path.pop(0)


def argv(model, tmp, *extra):
    return ["--model", model, "--train-file", str(tmp / "train.txt"), "--eval-file", str(tmp / "test.txt"),
            "--methods", "nearest", "e8p", "--bits", "2", "--incoh", "on", "--block-ft", "0", "2",
            "--nsamples", "4", "--seqlen", "32", "--eval-tokens", "128", *extra]


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_quant_model")
    (tmp / "train.txt").write_text(make_text(40, seed=1))
    (tmp / "test.txt").write_text(make_text(8, seed=2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_quant_model, "write_rows", functools.partial(results.write_rows, directory=str(tmp / "results")))
        rows = bench_quant_model.main(argv(tiny_llama_dir, tmp, "--save", str(tmp / "packed")))
    return dict(rows=rows, tmp=tmp, csv=tmp / "results" / "bench_quant_model.csv")


def test_one_row_per_case_against_the_fp_model_of_the_same_run(run, tiny_llama_dir):
    rows = run["rows"]
    assert [(r["method"], r["block_ft"]) for r in rows] == [("nearest", 0), ("nearest", 2), ("e8p", 0), ("e8p", 2)]
    fp, tokenizer = lm.load_causal_lm(tiny_llama_dir)
    test = lm.encode(tokenizer, lm.read_text_file(str(run["tmp"] / "test.txt")))[:128]
    fp_ppl = lm.perplexity(fp, test, 32)
    for r in rows:
        assert float(r["fp_ppl"]) == pytest.approx(fp_ppl, rel=1e-3)
        assert r["ppl_vs_fp"] == pytest.approx(float(r["ppl"]) / float(r["fp_ppl"]), abs=2e-3)  # both printed to 4 digits
        assert r["embed_bits"] == 16
        assert r["seconds"] >= r["layers_seconds"] > 0  # the whole quantization holds its layers' time


def test_each_row_measured_the_packed_directory_it_saved(run):
    for r in run["rows"]:
        out = run["tmp"] / "packed" / f"{r['method']}_w2_yaqaoff_bft{r['block_ft']}_e2e0"
        assert r["packed_mb"] == round(directory_bytes(str(out)) / 1e6, 1)
        config = json.load(open(out / "config.json"))["quantization_config"]
        assert (config["block_ft"] or {}).get("steps", 0) == r["block_ft"]
        model, tokenizer = lm.load_causal_lm(str(out))
        test = lm.encode(tokenizer, lm.read_text_file(str(run["tmp"] / "test.txt")))[:128]
        assert lm.perplexity(model, test, 32) == pytest.approx(float(r["ppl"]), rel=1e-3)


def test_a_rerun_replaces_only_its_own_cases(run, tiny_llama_dir, monkeypatch):
    with open(run["csv"]) as f:
        before = list(csv.DictReader(f))
    assert len(before) == 4 and all(row["machine"] and row["commit"] for row in before)
    monkeypatch.setattr(bench_quant_model, "write_rows",
                        functools.partial(results.write_rows, directory=str(run["tmp"] / "results")))
    [again] = bench_quant_model.main(argv(tiny_llama_dir, run["tmp"], "--methods", "e8p", "--block-ft", "2"))
    assert again["ppl"] == run["rows"][3]["ppl"]  # the same seed quantizes the same codes
    with open(run["csv"]) as f:
        after = list(csv.DictReader(f))
    assert [(r["method"], r["block_ft"]) for r in after] == [(r["method"], r["block_ft"]) for r in before]
    assert [r["date"] for r in after[:3]] == [r["date"] for r in before[:3]]


def test_bad_input_is_one_line_and_writes_nothing(run, tiny_llama_dir, capsys):
    tmp = run["tmp"]
    with pytest.raises(UserError, match="--save .* already holds nearest_w2_yaqaoff_bft0_e2e0"):
        bench_quant_model.main(argv(tiny_llama_dir, tmp, "--save", str(tmp / "packed")))
    for extra, message in [(["--block-ft-lr", "0"], "--block-ft-lr must be a finite number > 0"),
                           (["--nsamples", "1"], "--block-ft holds out calibration rows"),
                           (["--e2e-ft", "-1"], "--e2e-ft takes step counts >= 0"),
                           (["--text", "stories"], "--text stories samples both texts from the model"),
                           (["--eval-tokens", "8"], "--eval-tokens 8 is less than one window of --seqlen 32"),
                           (["--embed-groupsize", "16"], "--embed-groupsize 16: give -1 or a positive size, with --embed-bits")]:
        with pytest.raises(UserError, match=message):
            bench_quant_model.main(argv(tiny_llama_dir, tmp, *extra))
    with pytest.raises(UserError, match="--amp only applies"):
        bench_quant_model.main(argv(tiny_llama_dir, tmp, "--block-ft", "0", "--amp"))
    with pytest.raises(SystemExit) as exit_:  # as `python benchmarks/bench_quant_model.py` runs it
        cli(bench_quant_model.main, ["--model", str(tmp / "no.gguf")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: GGUF file '{tmp / 'no.gguf'}' does not exist; put the file at that path or pass another model (a GGUF "
        "file, a llama2.c .bin, a model directory or a hub name)")
    assert sorted(os.listdir(tmp / "packed")) == sorted(f"{m}_w2_yaqaoff_bft{s}_e2e0" for m in ("nearest", "e8p") for s in (0, 2))
