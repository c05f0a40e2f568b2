"""lm/: loading, corpora, calibration windows and the GPTQ/QuIP perplexity, on tiny offline models."""
import gzip
import json
import math
import os
import random

import pytest
import torch
from transformers import OPTConfig, ViTConfig

import lm
from engine import UserError
from tests.lm_fixtures import make_text


@pytest.fixture(scope="module")
def tiny(tiny_opt_dir, wikitext_dir):
    model, tokenizer = lm.load_causal_lm(tiny_opt_dir)
    return model, tokenizer, wikitext_dir


def reference_perplexity(model, ids, seqlen):
    """float64 model, window by window, NLL by hand from log-softmax."""
    model64 = type(model)(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    nll, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        window = ids[w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model64(window[None]).logits[0].double(), dim=-1)
        nll -= logp[torch.arange(seqlen - 1), window[1:]].sum().item()
        count += seqlen - 1
    return math.exp(nll / count)


def test_perplexity_matches_float64_reference_and_drops_remainder(tiny):
    model, tokenizer, data = tiny
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", data))
    seqlen = 40
    assert ids.numel() % seqlen != 0  # the remainder must be dropped
    ppl = lm.perplexity(model, ids, seqlen)
    assert ppl == pytest.approx(reference_perplexity(model, ids, seqlen), rel=1e-5)
    assert lm.perplexity(model, ids, seqlen, batch_size=3) == pytest.approx(ppl, rel=1e-6)
    # Tokens past the last full window do not count.
    cut = ids[: (ids.numel() // seqlen) * seqlen]
    assert lm.perplexity(model, torch.cat([cut, torch.zeros(seqlen - 1, dtype=torch.long)]), seqlen) == ppl
    assert model.training is False
    with pytest.raises(UserError, match="fewer than one window"):
        lm.perplexity(model, ids[:10], seqlen)


def test_perplexity_restores_training_mode(tiny):
    model, tokenizer, _ = tiny
    model.train()
    try:
        lm.perplexity(model, lm.encode(tokenizer, make_text(3)), 32)
        assert model.training
    finally:
        model.eval()


def test_a_corpus_encoded_again_comes_from_the_cache_and_never_from_another_tokenizers(tiny):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from lm import text as lm_text

    _, tokenizer, _ = tiny
    corpus = make_text(2000)
    assert len(corpus) >= lm_text._CACHE_FROM_CHARS
    first = lm.encode(tokenizer, corpus)
    first[0] = -1  # a caller's in-place edit does not reach the cache
    again = lm.encode(tokenizer, corpus)
    assert again[0] == tokenizer.bos_token_id
    assert torch.equal(again, torch.tensor(tokenizer(corpus, verbose=False)["input_ids"]))
    # the same vocabulary without the BOS post-processor: another tokenizer, so no cached ids
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert torch.equal(lm.encode(no_bos, corpus), again[1:])


def test_encode_whole_text_and_calibration_windows(tiny):
    _, tokenizer, data = tiny
    text = lm.load_text("wikitext2", "train", data)
    ids = lm.encode(tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() > tokenizer.model_max_length  # longer than the model's maximum: one tensor all the same
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == text

    batch = lm.calibration_batch(tokenizer, "wikitext2", 5, 16, seed=3, data_dir=data)
    assert batch.shape == (5, 16) and batch.dtype == torch.long
    rng = random.Random(3)  # GPTQ: random.seed(seed); i = randint(0, len - seqlen - 1) per sample
    for row in batch:
        i = rng.randint(0, ids.numel() - 16 - 1)
        assert torch.equal(row, ids[i:i + 16])
    assert torch.equal(batch, lm.calibration_batch(tokenizer, "wikitext2", 5, 16, seed=3, data_dir=data))
    assert not torch.equal(batch, lm.calibration_batch(tokenizer, "wikitext2", 5, 16, seed=4, data_dir=data))
    with pytest.raises(UserError, match="fewer than seqlen"):
        lm.calibration_batch(tokenizer, "wikitext2", 1, ids.numel(), data_dir=data)


def test_load_text_local_formats(tmp_path, tiny):
    _, tokenizer, _ = tiny
    (tmp_path / "ptb.valid.txt").write_text(" the cat sat\n a dog ran\n")
    assert lm.load_text("ptb", "validation", str(tmp_path)) == " the cat sat\n a dog ran\n"
    docs = [{"text": f"document {i} " + "word " * (5 + 10 * i), "url": "x"} for i in range(4)]
    (tmp_path / "c4-train.json").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    with gzip.open(tmp_path / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.write("\n".join(json.dumps(d) for d in docs[:2]))
    assert lm.load_text("c4", "train", str(tmp_path)) == " ".join(d["text"] for d in docs)
    # C4 has no test split: 'test' reads the validation shard, as GPTQ evaluates.
    assert lm.load_text("c4", "test", str(tmp_path)) == " ".join(d["text"] for d in docs[:2])
    batch = lm.calibration_batch(tokenizer, "c4", 3, 20, seed=0, data_dir=str(tmp_path))
    assert batch.shape == (3, 20)
    long_docs = [lm.encode(tokenizer, d["text"]) for d in docs if len(lm.encode(tokenizer, d["text"])) > 20]
    for row in batch:  # each window lies inside one document longer than seqlen
        assert any(any(torch.equal(row, d[i:i + 20]) for i in range(len(d) - 20)) for d in long_docs)
    with pytest.raises(UserError, match="more than 500 tokens"):
        lm.calibration_batch(tokenizer, "c4", 1, 500, data_dir=str(tmp_path))


def test_load_text_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"put wiki\.test\.raw in"):
        lm.load_text("wikitext2", "test", str(tmp_path))
    with pytest.raises(UserError, match="ptb.train.txt"):
        lm.load_text("ptb", "train", str(tmp_path))
    with pytest.raises(UserError, match="c4-validation.json"):
        lm.load_text("c4", "validation", str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset 'imdb'"):
        lm.load_text("imdb", "test")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        lm.load_text("wikitext2", "dev")
    (tmp_path / "wiki.test.raw").write_text(" \n\n")
    with pytest.raises(UserError, match="is empty"):
        lm.load_text("wikitext2", "test", str(tmp_path))
    (tmp_path / "c4-validation.json").write_text('{"content": "x"}\n')
    with pytest.raises(UserError, match="not C4 JSON"):
        lm.load_text("c4", "validation", str(tmp_path))


def test_load_causal_lm_user_errors(tmp_path):
    with pytest.raises(UserError, match="model directory .* does not exist"):
        lm.load_causal_lm(str(tmp_path / "missing"))
    # a missing model file is named as the file it should be, also as a relative path without ./
    with pytest.raises(UserError, match="GGUF file 'models/m.gguf' does not exist; put the file at that path"):
        lm.load_causal_lm("models/m.gguf")
    with pytest.raises(UserError, match="llama2.c checkpoint .*m.bin' does not exist; put the file at that path"):
        lm.load_causal_lm(str(tmp_path / "m.bin"))
    # conftest sets HF_HUB_OFFLINE=1: an uncached hub name fails at once with what to do instead.
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set .offline.*local directory holding config.json"):
        lm.load_causal_lm("facebook/opt-125m-not-cached-anywhere")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="'vit' model, not a causal language model"):
        lm.load_causal_lm(str(tmp_path))
    os.remove(tmp_path / "config.json")
    OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
              word_embed_proj_dim=32, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="cannot load"):  # config but no weights / tokenizer
        lm.load_causal_lm(str(tmp_path))


def test_max_positions_and_seqlen_rule():
    config = OPTConfig()
    assert lm.model_max_positions(config) == 2048
    assert lm.default_seqlen(config) == 2048
    assert lm.default_seqlen(config, 256) == 256
    with pytest.raises(UserError, match="larger than the model's 2048 positions"):
        lm.default_seqlen(config, 4096)


def test_shift_labels_masks_last_position_and_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert lm.shift_labels(ids).tolist() == [[6, 7, 8, -100], [2, 3, 0, -100]]
    assert lm.shift_labels(ids, mask).tolist() == [[6, 7, 8, -100], [2, 3, -100, -100]]
