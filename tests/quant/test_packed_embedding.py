"""Whole-model packed files: tensors outside the quantized layers stored in 16-bit, and quantized token
embeddings / LM heads (`quant.embedding`, `opt.py --embed-bits`): lookups equal to the dequantized table,
the tied head through the packed QuantLinear, save/reload and `from_pretrained` giving the same logits,
the size report, and the bad-input lines."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lm
import opt
from engine import UserError
from quant.embedding import QuantEmbedding, quantize_embeddings, quantize_table
from quant.linear import QuantLinear
from tests.lm_fixtures import make_text, tiny_model, tiny_tied_llama, train_tokenizer, write_wikitext
from tests.helpers import OPT_FAST

FAST = [*OPT_FAST, "--proxy_only"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_text(60))


@pytest.mark.parametrize("wbits,groupsize", [(8, -1), (4, -1), (4, 16)])
def test_table_codes_round_to_the_nearest_grid_value(wbits, groupsize):
    W = torch.randn(50, 64, dtype=torch.float64) * torch.logspace(-2, 0, 50, dtype=torch.float64)[:, None]
    table, err = quantize_table(W, wbits, groupsize)
    Wq = table.dequantize().double()
    g = 64 if groupsize == -1 else groupsize
    groups = W.reshape(50, -1, g)
    span = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / (2 ** wbits - 1)
    # nearest rounding: every error at most half a step of its own grid (plus the zero point's rounding)
    assert ((Wq - W).abs().reshape(50, -1, g) <= span[..., None] * 0.5 * (1 + 1e-4) + 1e-7).all()
    assert err == pytest.approx(float((Wq - W).square().sum() / W.square().sum()), rel=1e-4)
    assert (8 if wbits == 8 else 4) == table.spec["wbits"] and table.codes.dtype == torch.uint8
    assert table.codes.shape == (50, 64 * wbits // 8)


def test_a_tied_embedding_and_head_share_one_quantized_table(tokenizer):
    model = tiny_tied_llama(tokenizer)
    W = model.model.embed_tokens.weight.detach().clone()
    info = quantize_embeddings(model, 8)
    emb, head = model.model.embed_tokens, model.lm_head
    assert info["tied"] and isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert not list(emb.parameters()) and not list(emb.buffers())  # no second copy
    ids = torch.tensor([[5, 0, 17, 5, len(tokenizer) - 1]])
    dense = head.dequantize()
    torch.testing.assert_close(emb(ids), dense[ids], rtol=0, atol=1e-6)  # lookups decode the same rows
    x = torch.randn(3, W.shape[1])
    torch.testing.assert_close(head(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    assert (dense - W).abs().max() <= (W.amax(1) - W.amin(1)).max() / 255 * 0.51
    assert model.config.tie_word_embeddings is False  # transformers must not re-tie an nn.Linear weight


def test_lookups_follow_the_model_dtype_and_finetuned_scales(tokenizer):
    model = tiny_tied_llama(tokenizer)
    quantize_embeddings(model, 4, 16)
    head = model.lm_head
    head.add_channel_scales()
    with torch.no_grad():
        head.out_scale.uniform_(0.5, 1.5)
        head.in_scale.uniform_(0.5, 1.5)
    ids = torch.arange(10)
    torch.testing.assert_close(model.model.embed_tokens(ids), head.dequantize()[ids], rtol=1e-6, atol=1e-6)
    assert model.to(torch.bfloat16).model.embed_tokens(ids).dtype == torch.bfloat16


def test_an_untied_head_and_embedding_get_tables_of_their_own(tokenizer):
    model = tiny_model("llama", tokenizer)
    emb_w, head_w = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    info = quantize_embeddings(model, 8)
    assert not info["tied"] and model.model.embed_tokens.table is not model.lm_head
    ids = torch.arange(7)
    assert (model.model.embed_tokens(ids) - emb_w[ids]).abs().max() < 0.01 * emb_w.abs().max()
    assert (model.lm_head.dequantize() - head_w).abs().max() < 0.01 * head_w.abs().max()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    data = write_wikitext(str(root / "wikitext"))
    src = str(root / "llama")
    tok = train_tokenizer(make_text(60))
    tiny_tied_llama(tok).save_pretrained(src)  # tied like SmolLM2 and Llama-3.2
    tok.save_pretrained(src)
    out = {}
    for name, flags in {"plain": [], "embed8": ["--embed-bits", "8"], "embed4": ["--embed-bits", "4", "--embed-groupsize", "16"],
                        "fp32": ["--save-dtype", "float32"]}.items():
        out[name] = str(root / name)
        out[name + "_report"] = opt.main([src, "wikitext2", "--data-dir", data, *FAST, "--wbits", "2", "--quant", "e8p",
                                          "--incoh_processing", "--save", out[name], *flags])
    return dict(out, src=src, data=data)


def stored_dtypes(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_tensors_outside_the_quantized_layers_are_stored_in_16_bit(saved):
    dtypes = stored_dtypes(saved["plain"])
    assert dtypes["model.embed_tokens.weight"] == "F16" and dtypes["model.norm.weight"] == "F16"
    assert "lm_head.weight" not in dtypes  # tied: stored once
    assert dtypes["model.layers.0.self_attn.q_proj.scale"] == "F16"  # a quantized layer's scales too
    assert dtypes["model.layers.0.self_attn.q_proj.codes0"] == "I16"  # its codes as they are
    zeros = {k: v for k, v in stored_dtypes(saved["embed8"]).items() if k.endswith(".zero")}
    assert zeros and set(zeros.values()) == {"F32"}  # grid zero points stay exact
    loaded, _ = lm.load_causal_lm(saved["plain"])
    assert loaded.model.layers[0].self_attn.q_proj.scale.dtype == torch.float32
    assert stored_dtypes(saved["fp32"])["model.embed_tokens.weight"] == "F32"
    config = json.load(open(os.path.join(saved["plain"], "config.json")))
    assert config["quantization_config"]["stored_dtype"] == "float16"


@pytest.mark.parametrize("name", ["plain", "embed8", "embed4"])
def test_save_and_reload_give_the_same_logits_both_ways(saved, name):
    path = saved[name]
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 7, 30]])
    a, _ = lm.load_causal_lm(path)
    b = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    if name != "plain":
        assert isinstance(a.model.embed_tokens, QuantEmbedding) and isinstance(b.model.embed_tokens, QuantEmbedding)
        assert b.model.embed_tokens.weight_table is b.lm_head
        c, _ = lm.load_causal_lm(path)  # saved again from a loaded model: the same file
        c.save_pretrained(path + "_again")
        assert stored_dtypes(path + "_again") == stored_dtypes(path)


def test_the_reported_perplexity_is_the_saved_models(saved, tmp_path):
    # norms and (unquantized) embedding are rounded to the stored float16 before evaluation
    report = opt.main([saved["src"], "wikitext2", "--data-dir", saved["data"], *OPT_FAST, "--eval-windows", "2",
                       "--wbits", "2", "--quant", "e8p", "--incoh_processing", "--save", str(tmp_path / "q"), "--check"])
    assert report["reloaded_ppl"]["wikitext2"] == pytest.approx(report["ppl"]["wikitext2"], rel=1e-6)


def test_finetuning_in_quantized_space_trains_the_tied_tables_scales_not_its_codes(saved, tmp_path):
    import ft_opt

    out = str(tmp_path / "qft")
    ft_opt.main(["--model", saved["embed8"], "--data-dir", saved["data"], "--seqlen", "32", "--eval-seqlen", "32",
                 "--eval-windows", "2", "--max-steps", "3", "--epochs", "1", "--micro-bs", "2", "--lr", "1e-2",
                 "--device", "cpu", "--out", out])
    before, _ = lm.load_causal_lm(saved["embed8"])
    after, _ = lm.load_causal_lm(out)
    assert torch.equal(after.lm_head.codes, before.lm_head.codes)
    assert after.lm_head.out_scale is not None and not torch.equal(after.lm_head.out_scale, torch.ones_like(after.lm_head.out_scale))
    ids = torch.arange(20)
    torch.testing.assert_close(after.model.embed_tokens(ids), after.lm_head.dequantize()[ids], rtol=1e-6, atol=1e-6)


def test_the_size_report_and_smaller_files(saved):
    sizes = {n: saved[n + "_report"]["size"]["directory_bytes"] for n in ("plain", "embed8", "embed4", "fp32")}
    assert sizes["embed4"] < sizes["embed8"] < sizes["plain"] < sizes["fp32"]
    assert saved["plain_report"]["size"]["fp16_bytes"] == 2 * sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(saved["src"]).parameters())
    assert saved["embed8_report"]["embedding"]["tied"]


@pytest.mark.parametrize("flags,message", [
    (["--embed-bits", "8"], "--embed-bits quantizes the embedding beside the layers: it needs --wbits 2, 3 or 4"),
    (["--wbits", "2", "--embed-groupsize", "16"], "--embed-groupsize 16: give -1 or a positive size, with --embed-bits"),
    (["--wbits", "2", "--embed-bits", "4", "--embed-groupsize", "0"], "--embed-groupsize 0"),
])
def test_bad_embedding_options_are_one_line(flags, message):
    with pytest.raises(UserError, match=message):
        opt.main(["no/such/model", "wikitext2", *flags])


def test_an_embedding_groupsize_that_does_not_divide_the_width(tokenizer):
    with pytest.raises(UserError, match="embedding groupsize 24 must be -1 \\(whole rows\\) or divide the width 64"):
        quantize_embeddings(tiny_tied_llama(tokenizer), 4, 24)


def test_dequantize_gives_a_plain_tied_model_with_the_same_logits(saved):
    model = AutoModelForCausalLM.from_pretrained(saved["embed8"])
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        after = model(ids).logits
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
