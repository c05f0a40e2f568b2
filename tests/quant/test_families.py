"""Every family of quant.model.FAMILIES, and a Llama-3.2-shaped Llama (rope_type llama3, rope_theta 5e5,
grouped-query attention, tied embeddings, vocab 128256), on tiny random configs (1 decoder layer, hidden
32): quantization (each method on some family, every method on Llama-3.2), packed save and reload at
the same perplexity, transformers' from_pretrained of the packed directory, finetuning in quantized
space, and dense finetuning with the fused loss at vocab 128256."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import ft_opt
import lm
import opt
import quant
from engine import UserError
from quant.model import FAMILIES, decoder_layers
from tests.lm_fixtures import make_text, tiny_family, train_tokenizer, write_wikitext

# Logits that are not head(hidden) (soft-capped, scaled): ft_opt.py refuses the fused loss for them. Set
# to values the tiny random logits feel (real checkpoints: softcap 30, scaling 8 on far larger logits).
NOT_FUSED = {"gemma2": {"final_logit_softcapping": 0.1}, "granite": {"logits_scaling": 8.0}}
# One method per family, so that the families together use every method (the full method x family matrix
# runs on Llama-3.2 below and on the 2-layer OPT / Llama of test_opt).
CASES = [(family, quant.METHODS[i % len(quant.METHODS)]) for i, family in enumerate(FAMILIES)]
QUANT = ["--nsamples", "2", "--seqlen", "32", "--eval-windows", "2", "--wbits", "2", "--incoh_processing"]
FT = ["--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2", "--micro-bs", "2", "--grad-accum", "1",
      "--epochs", "1", "--max-steps", "2", "--lr", "3e-3", "--warmup-steps", "0"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tokenizer = train_tokenizer(make_text(60))
    saved = {}

    def model_dir(family):
        if family not in saved:
            saved[family] = str(root / family)
            tiny_family(family, tokenizer, **NOT_FUSED.get(family, {})).save_pretrained(saved[family])
            tokenizer.save_pretrained(saved[family])
        return saved[family]

    return {"model": model_dir, "data": write_wikitext(str(root / "wikitext")), "root": root}


def quantize(families, family, method, name):
    out = str(families["root"] / name)
    report = opt.main([families["model"](family), "wikitext2", "--data-dir", families["data"], *QUANT, "--quant", method,
                       "--save", out])
    return out, report


def test_llama32_shaped_config_is_what_llama3_ships():
    tokenizer = train_tokenizer(make_text(5), vocab_size=300)
    config = tiny_family("llama3.2", tokenizer).config
    assert config.model_type == "llama" and config.vocab_size == 128256 and config.tie_word_embeddings
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("family, method", CASES)
def test_family_quantizes_reloads_loads_in_transformers_and_finetunes_in_quantized_space(families, family, method):
    dense = AutoModelForCausalLM.from_pretrained(families["model"](family))
    layers, _ = decoder_layers(dense)
    linears = sum(isinstance(m, torch.nn.Linear) for m in layers.modules())
    out, report = quantize(families, family, method, f"{family}_{method}")
    assert len(report["layers"]) == linears and all(math.isfinite(r["proxy"]) for r in report["layers"])
    model, tokenizer = lm.load_causal_lm(out)
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", families["data"]))
    ppl = lm.perplexity(model, ids, 32, max_windows=2)
    assert ppl == pytest.approx(report["ppl"]["wikitext2"], rel=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf) is type(dense) and sum(isinstance(m, quant.QuantLinear) for m in hf.modules()) == linears
    assert lm.perplexity(hf, ids, 32, max_windows=2) == ppl  # the same model, built by transformers

    fused = [] if family not in NOT_FUSED else ["--no-fused-loss"]
    if family in NOT_FUSED:
        with pytest.raises(UserError, match="use --no-fused-loss"):
            lm.NextTokenLoss(dense, "ce")
    ft_out = str(families["root"] / f"ft_{family}")
    metrics = ft_opt.main(["--model", out, "--data-dir", families["data"], "--out", ft_out, *FT, *fused])
    assert metrics["quantized"] and metrics["codes_unchanged"] and metrics["steps"] == 2
    assert math.isfinite(metrics["ppl_after"]) and metrics["ppl_after"] != metrics["ppl_before"]
    tuned = AutoModelForCausalLM.from_pretrained(ft_out)  # saved back packed, loadable by transformers
    assert lm.perplexity(tuned, ids, 32, max_windows=2) == pytest.approx(metrics["ppl_after"], rel=1e-6)


@pytest.mark.parametrize("method", quant.METHODS)
def test_llama32_every_method_saves_and_reloads_at_the_same_perplexity(families, method):
    out, report = quantize(families, "llama3.2", method, f"llama32_{method}")
    model, tokenizer = lm.load_causal_lm(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the packed round trip
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", families["data"]))
    assert lm.perplexity(model, ids, 32, max_windows=2) == pytest.approx(report["ppl"]["wikitext2"], rel=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert lm.perplexity(hf, ids, 32, max_windows=2) == pytest.approx(report["ppl"]["wikitext2"], rel=1e-6)


def test_llama32_finetunes_with_the_fused_loss_at_vocab_128256(families):
    src = families["model"]("llama3.2")
    runs = {name: ft_opt.main(["--model", src, "--data-dir", families["data"], "--out",
                               str(families["root"] / f"ft32_{name}"), *FT, *flags])
            for name, flags in (("fused", []), ("plain", ["--no-fused-loss"]))}
    assert runs["fused"]["train_loss"] == pytest.approx(runs["plain"]["train_loss"], rel=1e-5)
    assert runs["fused"]["ppl_after"] == pytest.approx(runs["plain"]["ppl_after"], rel=1e-5)
    assert runs["fused"]["ppl_after"] < runs["fused"]["ppl_before"]
    tuned = AutoModelForCausalLM.from_pretrained(str(families["root"] / "ft32_fused"))
    assert tuned.config.vocab_size == 128256 and tuned.lm_head.weight is tuned.model.embed_tokens.weight


def test_unsupported_family_is_one_line_naming_the_supported_ones():
    tokenizer = train_tokenizer(make_text(5), vocab_size=300)
    moe = tiny_family("mixtral", tokenizer, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(UserError) as err:
        decoder_layers(moe)
    assert str(err.value) == f"model family 'mixtral' is not supported; supported: {', '.join(FAMILIES)}"
    assert {"llama", "mistral", "qwen2", "qwen3", "opt"} <= set(FAMILIES)


def test_help_lists_the_families(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside the names
    with pytest.raises(SystemExit):
        opt.parse_args(["--help"])
    text = capsys.readouterr().out
    for family, (_, covers) in FAMILIES.items():
        assert f"{family}: {covers}" in text
    assert "Llama-3" in text

