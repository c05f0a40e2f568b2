"""llm_pipeline.py on a real pretrained model, llama2.c's stories260K (the default, SmolLM2-135M, takes minutes
per step), and WikiText-2 from ../shared/data, at a size a test affords (the tiny-model checks are in
test_llm_pipeline.py)."""
import os

import pytest

import llm_pipeline
from tests.helpers import SHARED

STORIES = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
WIKI = os.path.join(SHARED, "text", "wikitext-2-raw")


@pytest.mark.slow
@pytest.mark.real_data
def test_real_stories260K_recovers_in_quantized_space_for_ce_and_rlo(tmp_path):
    """The acceptance check at a size a test affords: stories260K, 2 bits, both methods,
    CE and RLO; finetuning in quantized space lowers the PTQ perplexity and keeps the codes."""
    if not (os.path.isfile(STORIES) and os.path.isdir(WIKI)):
        pytest.skip("../shared/data/models/stories260K or text/wikitext-2-raw absent: the real-model check "
                    "needs the team's shared data beside the repo")
    rows = llm_pipeline.main(["--model", STORIES, "--wbits", "2", "--seqlen", "128", "--eval-seqlen", "256",
                              "--eval-windows", "4", "--nsamples", "8", "--ft-steps", "5", "--qft-steps", "8",
                              "--lr", "1e-3", "--qft-lr", "3e-3", "--threads", "1", "--out", str(tmp_path / "run")])
    assert {(r["loss"], r["quant"], r["wbits"]) for r in rows} == {
        (l, q, 2) for l in ("ce", "root") for q in ("ldlqRG", "e8p")}
    for r in rows:
        assert r["qft_codes_unchanged"]
        assert r["qft"] < r["ptq"], r
        assert r["finetuned"] < r["fp"]
