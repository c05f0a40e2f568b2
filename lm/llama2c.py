"""Import Karpathy's llama2.c checkpoints (`.bin`: legacy version 0, version 1 fp32, version 2 int8 Q8_0)
as a Hugging Face `LlamaForCausalLM` plus a fast tokenizer built from the sentencepiece `.model`, offline.

    python -m lm.llama2c SRC.bin TOKENIZER.model OUT_DIR

writes OUT_DIR with `save_pretrained`, so `lm.load_causal_lm(OUT_DIR)` (and every script) loads it
like a hub checkpoint; `lm.load_causal_lm(SRC.bin)` reads the `.bin` directly.

Two things differ from HF's Llama and are converted here: llama2.c rotates interleaved pairs
(x[2i], x[2i+1]) with RoPE where HF rotates halves (x[i], x[i + head_size/2]), so the rows of wq and
wk are permuted per head; and llama2.c prepends BOS (id 1) to every prompt and generates from BOS
alone, so the tokenizer prepends BOS too.
"""
import glob
import math
import os

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine import ArgumentParser, UserError, atomic_dir, cli

MAGIC = 0x616B3432  # "ak42", the first uint32 of version 1 and 2 files
HEADER_BYTES = 256  # version 1 and 2 pad their header to this size
PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
BOS, EOS = 1, 2


def _header(path, raw, size):
    """The config dict and the byte offset of the first weight."""
    if size < 4 * len(PARAMS):
        raise UserError(f"{path}: {size} bytes, expected at least {4 * len(PARAMS)} for a llama2.c header")
    if int(np.frombuffer(raw, "<u4", 1)[0]) != MAGIC:
        # legacy files start with the 7 params; a negative vocab_size flags a separate classifier
        values = [int(x) for x in np.frombuffer(raw, "<i4", len(PARAMS))]
        config = dict(zip(PARAMS, values), version=0, shared_classifier=values[5] > 0, group_size=None)
        config["vocab_size"] = abs(values[5])
        return config, 4 * len(PARAMS)
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, expected at least {HEADER_BYTES} for a llama2.c version 1/2 header")
    version = int(np.frombuffer(raw, "<i4", 1, 4)[0])
    if version not in (1, 2):
        raise UserError(f"{path}: unknown llama2.c checkpoint version {version} (expected 0, 1 or 2)")
    values = [int(x) for x in np.frombuffer(raw, "<i4", len(PARAMS), 8)]
    # byte 36 is the shared-classifier flag; version 2's int32 group size follows it, unaligned
    group_size = int(np.frombuffer(raw, "<i4", 1, 37)[0]) if version == 2 else None
    config = dict(zip(PARAMS, values), version=version, shared_classifier=bool(raw[36]), group_size=group_size)
    return config, HEADER_BYTES


def _check(path, config):
    """One UserError line for a header no llama2.c model can have (e.g. a file of another format)."""
    bad = [f"{k} {config[k]}" for k in PARAMS if config[k] <= 0]
    if config["group_size"] is not None and config["group_size"] <= 0:
        bad.append(f"group_size {config['group_size']}")
    if bad:
        raise UserError(f"{path}: bad llama2.c header ({', '.join(bad)}; expected positive values)")
    dim, heads, kv_heads = config["dim"], config["n_heads"], config["n_kv_heads"]
    if dim % heads or (dim // heads) % 2:
        raise UserError(f"{path}: bad llama2.c header (dim {dim} is not n_heads {heads} times an even head size)")
    if heads % kv_heads:
        raise UserError(f"{path}: bad llama2.c header (n_kv_heads {kv_heads} does not divide n_heads {heads})")


def _layout(config):
    """(name, shape) of every tensor in file order (export.py's order for each version)."""
    dim, hidden, layers, vocab = config["dim"], config["hidden_dim"], config["n_layers"], config["vocab_size"]
    head_size = dim // config["n_heads"]
    kv_dim = head_size * config["n_kv_heads"]
    attention = [("wq", (layers, dim, dim)), ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)),
                 ("wo", (layers, dim, dim))]
    ffn = [("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim))]
    embedding, final = ("token_embedding", (vocab, dim)), ("rms_final", (dim,))
    att_norm, ffn_norm = ("rms_att", (layers, dim)), ("rms_ffn", (layers, dim))
    classifier = [] if config["shared_classifier"] else [("wcls", (vocab, dim))]
    if config["version"] == 0:
        rope = (config["seq_len"], head_size // 2)  # llama2.c's precomputed RoPE tables, skipped on read
        return [embedding, att_norm, *attention, ffn_norm, *ffn, final,
                ("freq_cis_real", rope), ("freq_cis_imag", rope), *classifier]
    return [att_norm, ffn_norm, final, embedding, *attention, *ffn, *classifier]


def _quantized(name, config):
    """Version 2 stores every matrix as int8 with one fp32 scale per group; only the norms stay fp32."""
    return config["version"] == 2 and not name.startswith("rms_")


def _pieces(name, shape):
    """The separately stored parts of a tensor: one per layer for the per-layer matrices."""
    return [shape[1:]] * shape[0] if name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") else [shape]


def _expected_bytes(path, config, offset):
    """The exact file size the header implies."""
    total = offset
    for name, shape in _layout(config):
        for part in _pieces(name, shape):
            n = math.prod(part)
            if not _quantized(name, config):
                total += 4 * n
            elif n % config["group_size"]:
                raise UserError(f"{path}: bad llama2.c header (group_size {config['group_size']} does not divide "
                                f"the {n} values of each {name})")
            else:
                total += n + 4 * (n // config["group_size"])
    return total


def read_checkpoint(path):
    """(config, {name: float32 tensor}) of a llama2.c `.bin`, with llama2.c's tensor names and layout
    (per-layer tensors stacked on dim 0; "wcls" only when the classifier is not the token embedding;
    version 2 dequantized). The file size must match the header exactly: a truncated download or a
    file of another format is one UserError line, not a silently wrong model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"llama2.c checkpoint {path!r} does not exist")
    size = os.path.getsize(path)
    raw = np.memmap(path, np.uint8, "r") if size else np.zeros(0, np.uint8)
    config, offset = _header(path, raw, size)
    _check(path, config)
    expected = _expected_bytes(path, config, offset)
    if size != expected:
        shape = ", ".join(f"{k} {config[k]}" for k in PARAMS)
        classifier = "shared" if config["shared_classifier"] else "separate"
        raise UserError(f"{path}: {size} bytes, expected {expected} for a llama2.c version {config['version']} "
                        f"checkpoint with {shape} and a {classifier} classifier (truncated, or not this format)")
    weights = {}
    for name, shape in _layout(config):
        parts = []
        for part in _pieces(name, shape):
            n = math.prod(part)
            if _quantized(name, config):
                groups = n // config["group_size"]
                q = np.frombuffer(raw, np.int8, n, offset)
                scale = np.frombuffer(raw, "<f4", groups, offset + n)
                parts.append((q.reshape(groups, -1) * scale[:, None]).reshape(part))
                offset += n + 4 * groups
            else:
                parts.append(np.frombuffer(raw, "<f4", n, offset).reshape(part))
                offset += 4 * n
        if not name.startswith("freq_cis"):
            weights[name] = torch.from_numpy(np.array(parts[0] if len(parts) == 1 else np.stack(parts), np.float32))
    return config, weights


def hf_config(config):
    """The `LlamaConfig` of llama2.c's model.py architecture (no biases, eps 1e-5, RoPE base 10000)."""
    return LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["dim"], intermediate_size=config["hidden_dim"],
        num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
        num_key_value_heads=config["n_kv_heads"], max_position_embeddings=config["seq_len"],
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=config["shared_classifier"], bos_token_id=BOS, eos_token_id=EOS,
    )


def _halves(weight, heads):
    """Rows of a q/k projection reordered per head from llama2.c's interleaved RoPE pairs to HF's halves:
    HF row j takes llama2.c row 2j, and row j + head_size/2 takes row 2j + 1."""
    return weight.reshape(heads, -1, 2, weight.shape[1]).transpose(1, 2).reshape(weight.shape)


def to_hf(config, weights, dtype=torch.float32):
    """A `LlamaForCausalLM` (eval mode) computing the same logits as llama2.c's run.c on these weights."""
    model = LlamaForCausalLM(hf_config(config))
    state = {
        "model.embed_tokens.weight": weights["token_embedding"],
        "model.norm.weight": weights["rms_final"],
        "lm_head.weight": weights.get("wcls", weights["token_embedding"]),
    }
    for i in range(config["n_layers"]):
        prefix = f"model.layers.{i}."
        state.update({
            prefix + "input_layernorm.weight": weights["rms_att"][i],
            prefix + "self_attn.q_proj.weight": _halves(weights["wq"][i], config["n_heads"]),
            prefix + "self_attn.k_proj.weight": _halves(weights["wk"][i], config["n_kv_heads"]),
            prefix + "self_attn.v_proj.weight": weights["wv"][i],
            prefix + "self_attn.o_proj.weight": weights["wo"][i],
            prefix + "post_attention_layernorm.weight": weights["rms_ffn"][i],
            prefix + "mlp.gate_proj.weight": weights["w1"][i],
            prefix + "mlp.down_proj.weight": weights["w2"][i],
            prefix + "mlp.up_proj.weight": weights["w3"][i],
        })
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def sentencepiece_tokenizer(path):
    """A fast HF tokenizer that encodes exactly like sentencepiece's BPE model `path` (llama2.c's
    tok*.model or Llama 2's tokenizer.model) and prepends BOS, as llama2.c does.

    Built here rather than by transformers' LlamaTokenizer conversion, which ignores the model's
    remove_extra_whitespaces (llama2.c's vocabularies collapse runs of spaces, Llama 2's does not).
    BPE merge ranks follow the merged piece's score, which is the order sentencepiece merges in."""
    # only here: reading the checkpoint and converting the weights need neither sentencepiece nor protobuf
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except DecodeError:
        proto.Clear()
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    ids = (spec.unk_id, spec.bos_id, spec.eos_id)
    if (not proto.pieces or spec.model_type != spec.BPE or not spec.byte_fallback or norm.precompiled_charsmap
            or not all(0 <= i < len(proto.pieces) for i in ids)):
        raise UserError(f"{path}: not a sentencepiece BPE model with byte fallback, <unk>/<s>/</s> pieces and no "
                        "normalization rule (what llama2.c trains); pass the tokenizer's .model file, not its .bin")
    pieces = [p.piece for p in proto.pieces]
    normal = {p.piece: p.score for p in proto.pieces if p.type == p.NORMAL}
    merges = [(piece[:k], piece[k:]) for piece in sorted(normal, key=normal.get, reverse=True)
              for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    tok = Tokenizer(BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token=pieces[spec.unk_id],
                        fuse_unk=True, byte_fallback=True))
    steps = []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    bos = pieces[spec.bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, spec.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=pieces[spec.eos_id],
                                   unk_token=pieces[spec.unk_id])


def find_tokenizer(checkpoint, tokenizer=None):
    """`tokenizer` if given, else the `tokenizer.model` or the one `tok*.model` beside the checkpoint."""
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise UserError(f"tokenizer {os.fspath(tokenizer)!r} does not exist; pass the sentencepiece .model "
                            "file the model was trained with")
        return os.fspath(tokenizer)
    folder = os.path.dirname(os.path.abspath(checkpoint))
    default = os.path.join(folder, "tokenizer.model")
    found = [default] if os.path.isfile(default) else sorted(glob.glob(os.path.join(folder, "tok*.model")))
    if not found:
        raise UserError(f"no tokenizer for {checkpoint}: put the sentencepiece .model it was trained with in {folder} "
                        "as tokenizer.model (llama2.c's default is Llama 2's tokenizer.model; custom vocabularies "
                        "are data/tok<N>.model), or pass it explicitly")
    if len(found) > 1:
        raise UserError(f"several tokenizers beside {checkpoint} ({', '.join(map(os.path.basename, found))}); "
                        "pass the one it was trained with")
    return found[0]


def load(path, tokenizer=None, dtype=torch.float32):
    """(model, tokenizer) for a llama2.c `.bin`; `tokenizer` is a sentencepiece `.model` path (default:
    found beside the checkpoint, see `find_tokenizer`)."""
    tokenizer_path = find_tokenizer(path, tokenizer)
    config, weights = read_checkpoint(path)
    tok = sentencepiece_tokenizer(tokenizer_path)
    if len(tok) != config["vocab_size"] or tok.bos_token_id != BOS:
        raise UserError(f"tokenizer {tokenizer_path} ({len(tok)} pieces, BOS id {tok.bos_token_id}) does not fit "
                        f"{path} ({config['vocab_size']} tokens, BOS id {BOS}); pass the one it was trained with")
    tok.model_max_length = config["seq_len"]
    return to_hf(config, weights, dtype), tok


def refuse_nonempty(out):
    """UserError unless `out` is absent or an empty directory: a conversion never mixes with old files."""
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(f"{out} already exists and is not an empty directory; pick a new output directory")


def save(model, tokenizer, out):
    """`save_pretrained` of both into `out` through a temporary sibling directory and a rename, so `out`
    is either absent or complete."""
    refuse_nonempty(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="llama2.c .bin file (version 0, 1 or 2)")
    p.add_argument("tokenizer", help="the sentencepiece .model file the checkpoint was trained with")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    args = p.parse_args(argv)
    refuse_nonempty(args.out)  # before the (possibly long) load
    model, tokenizer = load(args.checkpoint, args.tokenizer)
    save(model, tokenizer, args.out)
    print(f"wrote {args.out}: Llama with {model.num_parameters():,} parameters and a {len(tokenizer)}-token tokenizer")


if __name__ == "__main__":
    cli(main)
