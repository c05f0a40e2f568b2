"""Tiny offline causal LMs for tests: a generated corpus in wikitext-2 raw format, a byte-level BPE
tokenizer trained on it (`tokenizers`, saved as a PreTrainedTokenizerFast), and random-weight OPT
and Llama models (2 layers, hidden 64) saved with `save_pretrained` like a hub checkpoint; and one
smaller random model per family of `quant.model.FAMILIES` (`tiny_family`), a Llama-3.2-shaped one
among them.

Plain helpers, not pytest fixtures, so any test module can build them at the scope it needs.
"""
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast)

SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the river", "a small bird", "the king"]
_VERBS = ["sees", "follows", "likes", "finds", "carries", "remembers"]
_OBJECTS = ["the ball", "a red house", "the green hill", "an apple", "the long road", "a quiet song"]


def make_text(n_paragraphs=20, seed=0):
    """Wikitext-2 raw style text: ` = Heading = ` lines and paragraphs of simple grammatical sentences
    (a small language a 2-layer model learns within a few steps)."""
    rng = random.Random(seed)
    lines = []
    for p in range(n_paragraphs):
        if p % 5 == 0:
            lines += ["", f" = Section {p // 5} = ", ""]
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} ." for _ in range(6)]
        lines.append(" " + " ".join(s.capitalize() for s in sentences) + " ")
    return "\n".join(lines) + "\n"


def write_wikitext(directory, seed=0, n_paragraphs=(40, 8, 8)):
    """wiki.train.raw / wiki.valid.raw / wiki.test.raw in `directory`; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    for i, (name, n) in enumerate(zip(("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"), n_paragraphs)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(make_text(n, seed=seed + i))
    return directory


def train_tokenizer(text, vocab_size=500):
    """Byte-level BPE trained on `text`; like OPT/Llama it prepends BOS to every encoded text."""
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    bos = SPECIAL["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **SPECIAL)


def tiny_model(kind, tokenizer, seed=0, max_positions=128):
    """A random-weight 'opt' or 'llama' causal LM sized for tests."""
    torch.manual_seed(seed)
    ids = {f"{k[:-6]}_token_id": tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL.items() if k != "unk_token"}
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=max_positions, **ids)
    if kind == "opt":
        config = OPTConfig(ffn_dim=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0, **common)
        return OPTForCausalLM(config).eval()
    if kind == "llama":
        config = LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        return LlamaForCausalLM(config).eval()
    raise ValueError(f"unknown tiny model kind {kind!r}")


def save_tiny_lm(directory, kind="opt", text=None, seed=0):
    """A tiny model + tokenizer written to `directory` with `save_pretrained` (safetensors); returns it."""
    tokenizer = train_tokenizer(text if text is not None else make_text(60, seed=seed))
    model = tiny_model(kind, tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Llama-3.2-1B's config.json where it defines the family (RoPE scaling "llama3", rope_theta 5e5, grouped-
# query attention, tied embeddings, the 128256-token vocabulary, 131072 positions), at a tiny width.
LLAMA32 = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})


def tiny_family(family, tokenizer, seed=0, **overrides):
    """A random-weight model of a `quant.model.FAMILIES` family ('llama3.2': Llama-3.2-shaped): 1 decoder
    layer, hidden 32, 4 query heads of 8 over 2 key/value heads."""
    torch.manual_seed(seed)
    ids = {f"{k[:-6]}_token_id": tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL.items() if k != "unk_token"}
    if family == "opt":
        config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                           num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=128, dropout=0.0, **ids)
        return OPTForCausalLM(config).eval()
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **ids)
    if family == "llama3.2":
        family, kwargs = "llama", dict(kwargs, **LLAMA32)
    config = AutoConfig.for_model(family, **dict(kwargs, **overrides))
    return AutoModelForCausalLM.from_config(config).eval()


def _gguf_rope_order(w, n_heads):
    """The row order llama.cpp's converter gives q/k projections (interleaved rotary halves); transformers'
    GGUF loader undoes it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, tokenizer, architecture="llama"):
    """A tied Llama `model` and its byte-level BPE `tokenizer` as a float32 GGUF file, laid out as llama.cpp's
    converter writes one (tensor names, q/k row order, gpt2-style tokenizer metadata); returns `path`."""
    import json

    import gguf

    c = model.config
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    w = gguf.GGUFWriter(path, architecture)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])])
    w.add_token_types([1] * len(spec["vocab"]))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(True)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _gguf_rope_order(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _gguf_rope_order(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_tied_llama(tokenizer, seed=0):
    """`tiny_model('llama')` with its head tied to the token embedding (as SmolLM2 and Llama-3.2 are)."""
    model = tiny_model("llama", tokenizer, seed=seed)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_tiny_gpt2(directory, tokenizer_from):
    """A random 1-layer GPT-2 (a family quant.model does not support) with the tokenizer of the checkpoint
    `tokenizer_from`, saved in `directory`."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)
    return directory
