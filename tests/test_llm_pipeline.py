"""llm_pipeline.py end to end on a tiny random Llama and generated text (the real default model is run
by `make llm-demo`; its measured table is in the README)."""
import csv
import os

import pytest

import llm_pipeline
from engine import UserError
from tests.lm_fixtures import make_text, save_tiny_lm


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (see conftest.one_thread)."""


def test_pipeline_writes_table_plot_and_checks_the_packed_round_trip(tmp_path):
    model = save_tiny_lm(str(tmp_path / "llama"), "llama")
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text(make_text(40, seed=1))
    test.write_text(make_text(8, seed=2))
    out = str(tmp_path / "run")
    argv = ["--model", model, "--train-file", str(train), "--eval-file", str(test), "--wbits", "2", "4",
            "--incoh", "on", "--seeds", "0", "1", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4",
            "--nsamples", "4", "--ft-steps", "4", "--qft-steps", "4", "--lr", "3e-3", "--qft-lr", "3e-3", "--bs", "4",
            "--threads", "1", "--device", "cpu", "--out", out]
    rows = llm_pipeline.main(argv)
    assert len(rows) == 2 * 2 * 2  # seeds x losses x bit widths
    assert all(r["qft_codes_unchanged"] for r in rows)
    assert {"args.json", "results.csv", "table.md", "pipeline.png"} <= set(os.listdir(out))
    with open(os.path.join(out, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == 8
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("\n") == 2 + 4 and "±" in table  # header + (2 losses x 2 bit widths), CI over 2 seeds
    for r in rows:
        assert r["ptq_vs_ft"] == pytest.approx(r["ptq"] / r["finetuned"])
        assert r["finetuned"] < r["fp"]  # the fp finetuning learned the tiny language
    fp = {r["fp"] for r in rows}
    assert len(fp) == 1  # every row starts from the same base model and evaluation windows
    with pytest.raises(UserError, match="already holds a run"):
        llm_pipeline.main(argv)


def test_missing_default_data_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--eval-file .* does not exist"):
        llm_pipeline.main(["--model", str(tmp_path), "--train-file", __file__, "--eval-file", str(tmp_path / "no.txt"),
                           "--out", str(tmp_path / "x")])


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
STORIES = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
WIKI = os.path.join(SHARED, "text", "wikitext-2-raw")


def test_real_stories260K_recovers_in_quantized_space_for_ce_and_rlo(tmp_path):
    """The issue's acceptance check at a size a test affords: stories260K, 2 and 3 bits, CE and RLO;
    finetuning in quantized space lowers the PTQ perplexity and keeps the codes."""
    if not (os.path.isfile(STORIES) and os.path.isdir(WIKI)):
        pytest.skip("../shared/data/models/stories260K or text/wikitext-2-raw absent: the real-model check "
                    "needs the team's shared data beside the repo")
    rows = llm_pipeline.main(["--wbits", "2", "3", "--incoh", "off", "--seqlen", "128", "--eval-seqlen", "256",
                              "--eval-windows", "8", "--nsamples", "16", "--ft-steps", "10", "--qft-steps", "30",
                              "--qft-lr", "3e-3", "--threads", "1", "--out", str(tmp_path / "run")])
    assert {(r["loss"], r["wbits"]) for r in rows} == {(l, b) for l in ("ce", "root") for b in (2, 3)}
    for r in rows:
        assert r["qft_codes_unchanged"]
        assert r["qft"] < r["ptq"], r
        assert r["finetuned"] < r["fp"]
