"""lm/llama2c.py: llama2.c `.bin` checkpoints (versions 0, 1, 2) against an independent NumPy forward
pass of llama2.c's run.c, the sentencepiece tokenizer against sentencepiece itself, bad files, the
CLI, and (when ../shared/data holds it) the published greedy sample of stories260K."""
import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import lm
from engine import UserError
from lm import llama2c
from tests.lm_fixtures import make_text
from tests.helpers import ROOT, SHARED

STORIES = os.path.join(SHARED, "models", "stories260K")
LLAMA2_TOKENIZER = os.path.join(SHARED, "tokenizers", "llama2", "tokenizer.model")
TINY = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=16)
PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# karpathy/llama2.c doc/stories260K.md: `./run stories260K.bin -z tok512.bin -t 0.0` (256 steps from BOS)
SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, "
    "\"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" Her mom "
    "said, \"Don't worry, Lily. We can help you."
)
TEXTS = ["Once upon a time, there was a little girl named Lily.", "Hello  world", "  leading and trailing  ",
         "a\n\nb\tc", "digits 2024 and ünïcödé 東京 🙂", "Lily's mom said, \"let's go!\"", ""]


# --- llama2.c files, written here from export.py's layouts ----------------------------------------

def random_weights(seed=0, shared=True, **sizes):
    """llama2.c-layout float32 weights (per-layer tensors stacked on dim 0) scaled to keep activations O(1)."""
    c = {**TINY, **sizes}
    rng = np.random.default_rng(seed)
    dim, hidden, layers, vocab = c["dim"], c["hidden_dim"], c["n_layers"], c["vocab_size"]
    kv_dim = dim // c["n_heads"] * c["n_kv_heads"]

    def mat(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm(*shape):
        return (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    w = dict(token_embedding=(0.5 * rng.standard_normal((vocab, dim))).astype(np.float32), rms_att=norm(layers, dim),
             wq=mat(layers, dim, dim), wk=mat(layers, kv_dim, dim), wv=mat(layers, kv_dim, dim),
             wo=mat(layers, dim, dim), rms_ffn=norm(layers, dim), w1=mat(layers, hidden, dim),
             w2=mat(layers, dim, hidden), w3=mat(layers, hidden, dim), rms_final=norm(dim))
    if not shared:
        w["wcls"] = mat(vocab, dim)
    return c, w


def f32(*arrays):
    return b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in arrays)


def params(c, vocab_size=None):
    values = [c[k] for k in PARAMS]
    if vocab_size is not None:
        values[5] = vocab_size
    return struct.pack("<7i", *values)


def legacy_bytes(c, w):
    """Version 0: 7 int32 (negative vocab_size = separate classifier), then run.c's order, RoPE tables included."""
    head_size = c["dim"] // c["n_heads"]
    angles = np.outer(np.arange(c["seq_len"]), 10000.0 ** (-np.arange(0, head_size, 2) / head_size))
    vocab = c["vocab_size"] if "wcls" not in w else -c["vocab_size"]
    return params(c, vocab) + f32(w["token_embedding"], w["rms_att"], w["wq"], w["wk"], w["wv"], w["wo"],
                                  w["rms_ffn"], w["w1"], w["w2"], w["w3"], w["rms_final"],
                                  np.cos(angles), np.sin(angles), *([w["wcls"]] if "wcls" in w else []))


def header(version, c, shared, extra=b""):
    head = struct.pack("<Ii", llama2c.MAGIC, version) + params(c) + struct.pack("<B", shared) + extra
    return head + b"\0" * (256 - len(head))


def v1_bytes(c, w):
    """Version 1 (export.py version1_export): 256-byte header, norms first, then the matrices."""
    cls = [w["wcls"]] if "wcls" in w else []
    return header(1, c, "wcls" not in w) + f32(w["rms_att"], w["rms_ffn"], w["rms_final"], w["token_embedding"],
                                               *(w[k] for k in MATRICES), *cls)


def q80(x, group):
    """export.py's quantize_q80: int8 in [-127, 127] and one scale per group; also the dequantized values."""
    g = x.reshape(-1, group).astype(np.float32)
    scale = (np.abs(g).max(axis=1) / 127).astype(np.float32)
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q, scale, (q * scale[:, None]).reshape(x.shape)


def v2_bytes(c, w, group):
    """Version 2 (export.py version2_export): fp32 norms, then each matrix (per layer) as int8 + scales.
    Also returns the weights as the reader must dequantize them."""
    out = [header(2, c, "wcls" not in w, struct.pack("<i", group)), f32(w["rms_att"], w["rms_ffn"], w["rms_final"])]
    deq = {k: w[k] for k in ("rms_att", "rms_ffn", "rms_final")}
    for name in ("token_embedding", *MATRICES, *(["wcls"] if "wcls" in w else [])):
        parts = w[name] if name in MATRICES else [w[name]]
        values = []
        for part in parts:
            q, scale, back = q80(part, group)
            out += [q.tobytes(), f32(scale)]
            values.append(back)
        deq[name] = np.stack(values) if name in MATRICES else values[0]
    return b"".join(out), deq


def write(path, data):
    path.write_bytes(data)
    return str(path)


# --- an independent NumPy forward pass of llama2.c's run.c ----------------------------------------

def rmsnorm(x, weight):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)


def rope_interleaved(x, head_size):
    """run.c's RoPE: each pair (x[2i], x[2i+1]) of a head rotated by pos * 10000^(-2i/head_size)."""
    pos = np.arange(x.shape[0])[:, None]
    freq = 10000.0 ** (-(np.arange(0, x.shape[1], 2) % head_size) / head_size)
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)
    a, b = x[:, 0::2], x[:, 1::2]
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def reference_logits(c, w, tokens):
    """float64 logits at every position: rmsnorm, GQA attention with a causal mask, SwiGLU, final norm, classifier."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    heads, kv_heads = c["n_heads"], c["n_kv_heads"]
    head_size, n = c["dim"] // heads, len(tokens)
    x = w["token_embedding"][tokens]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for layer in range(c["n_layers"]):
        h = rmsnorm(x, w["rms_att"][layer])
        q = rope_interleaved(h @ w["wq"][layer].T, head_size).reshape(n, heads, head_size)
        k = rope_interleaved(h @ w["wk"][layer].T, head_size).reshape(n, kv_heads, head_size)
        v = (h @ w["wv"][layer].T).reshape(n, kv_heads, head_size)
        share = heads // kv_heads  # query head i reads kv head i // share
        k, v = np.repeat(k, share, axis=1), np.repeat(v, share, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_size) + causal
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(n, -1) @ w["wo"][layer].T
        h = rmsnorm(x, w["rms_ffn"][layer])
        gate = h @ w["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w.get("wcls", w["token_embedding"]).T


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


@pytest.mark.parametrize("shared", [True, False], ids=["tied", "untied"])
def test_legacy_checkpoint_matches_numpy_run_c(tmp_path, monkeypatch, shared):
    c, w = random_weights(shared=shared)
    config, weights = llama2c.read_checkpoint(write(tmp_path / "m.bin", legacy_bytes(c, w)))
    assert {k: config[k] for k in PARAMS} == c and config["shared_classifier"] == shared
    assert weights.keys() == w.keys()
    for name, value in w.items():
        np.testing.assert_array_equal(weights[name].numpy(), value, err_msg=name)
    model = llama2c.to_hf(config, weights)
    assert model.config.tie_word_embeddings == shared
    assert model.config.num_key_value_heads == 2 and model.config.max_position_embeddings == 16
    tokens = np.random.default_rng(1).integers(0, c["vocab_size"], c["seq_len"]).tolist()
    ref = reference_logits(c, w, tokens)
    assert np.abs(hf_logits(model, tokens) - ref).max() < 1e-5
    # the check can tell: without the per-head row permutation of wq/wk the logits are off
    monkeypatch.setattr(llama2c, "_halves", lambda weight, heads: weight)
    assert np.abs(hf_logits(llama2c.to_hf(config, weights), tokens) - ref).max() > 1e-2


def test_version1_file_reads_like_legacy(tmp_path):
    c, w = random_weights(seed=2, shared=False)
    legacy_config, legacy = llama2c.read_checkpoint(write(tmp_path / "v0.bin", legacy_bytes(c, w)))
    config, weights = llama2c.read_checkpoint(write(tmp_path / "v1.bin", v1_bytes(c, w)))
    assert config == {**legacy_config, "version": 1}
    assert weights.keys() == legacy.keys()
    assert all(torch.equal(weights[k], legacy[k]) for k in weights)


@pytest.mark.parametrize("shared", [True, False], ids=["tied", "untied"])
def test_version2_q80_file_is_dequantized(tmp_path, shared):
    c, w = random_weights(seed=3, shared=shared)
    data, deq = v2_bytes(c, w, group=8)
    config, weights = llama2c.read_checkpoint(write(tmp_path / "v2.bin", data))
    assert config["version"] == 2 and config["group_size"] == 8 and config["shared_classifier"] == shared
    assert weights.keys() == deq.keys()
    for name, value in deq.items():
        np.testing.assert_array_equal(weights[name].numpy(), value, err_msg=name)
    tokens = list(range(10))
    assert np.abs(hf_logits(llama2c.to_hf(config, weights), tokens) - reference_logits(c, deq, tokens)).max() < 1e-5


def bad_files():
    c, w = random_weights()
    good = legacy_bytes(c, w)
    return {
        "empty": (b"", "0 bytes, expected at least 28"),
        "short": (good[:10], "10 bytes, expected at least 28"),
        "truncated": (good[:-4], f"{len(good) - 4} bytes, expected {len(good)}"),
        "oversized": (good + b"\0" * 4, f"{len(good) + 4} bytes, expected {len(good)}"),
        "zero-dim": (params({**c, "dim": 0}) + good[28:], "dim 0"),
        "negative-hidden": (params({**c, "hidden_dim": -48}) + good[28:], "hidden_dim -48"),
        "heads-not-dividing-dim": (params({**c, "n_heads": 5}) + good[28:], "n_heads 5"),
        "kv-heads-not-dividing-heads": (params({**c, "n_kv_heads": 3}) + good[28:], "n_kv_heads 3 does not divide"),
        "unknown-version": (header(3, c, True) + good[28:], "unknown llama2.c checkpoint version 3"),
        "v1-short-header": (header(1, c, True)[:100], "100 bytes, expected at least 256"),
        "v2-group-0": (header(2, c, True, struct.pack("<i", 0)), "group_size 0"),
        "v2-group-not-dividing": (header(2, c, True, struct.pack("<i", 7)), "group_size 7 does not divide"),
    }


@pytest.mark.parametrize("case", list(bad_files()))
def test_bad_file_is_one_line_naming_expected_and_actual(tmp_path, case):
    data, message = bad_files()[case]
    with pytest.raises(UserError) as err:
        llama2c.read_checkpoint(write(tmp_path / "bad.bin", data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    data, message = bad_files()["truncated"]
    bad, tok = write(tmp_path / "bad.bin", data), write(tmp_path / "tokenizer.model", b"")
    proc = subprocess.run([sys.executable, "-m", "lm.llama2c", bad, tok, str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.bin", "tokenizer.model"]


# --- tokenizer and loading, on a sentencepiece model trained here with llama2.c's options ----------

@pytest.fixture(scope="module")
def toy_spm(tmp_path_factory):
    """A 300-piece sentencepiece BPE model trained like llama2.c's train_vocab (byte fallback, identity rule)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_text(60).splitlines()), model_writer=model, model_type="bpe", vocab_size=300,
        self_test_sample_size=0, character_coverage=1.0, num_threads=1, split_digits=True,
        allow_whitespace_only_pieces=True, byte_fallback=True, unk_surface=r" \342\201\207 ",
        normalization_rule_name="identity", minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tok300.model"
    path.write_bytes(model.getvalue())
    return str(path)


def assert_encodes_like_sentencepiece(model_path, texts):
    tok, sp = llama2c.sentencepiece_tokenizer(model_path), spm.SentencePieceProcessor(model_file=model_path)
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text


def test_tokenizer_encodes_like_sentencepiece(toy_spm):
    assert_encodes_like_sentencepiece(toy_spm, TEXTS + make_text(3, seed=5).splitlines())


@pytest.mark.real_data
def test_tokenizer_without_whitespace_collapsing_llama2():
    if not os.path.isfile(LLAMA2_TOKENIZER):
        pytest.skip("../shared/data/tokenizers/llama2 absent: Llama 2's tokenizer.model is not in the shared data")
    assert_encodes_like_sentencepiece(LLAMA2_TOKENIZER, TEXTS)


def test_tokenizer_refuses_other_files(tmp_path):
    with pytest.raises(UserError, match="not a sentencepiece BPE model"):
        llama2c.sentencepiece_tokenizer(write(tmp_path / "tok.bin", b"\x07\x00\x00\x00garbage"))


def test_load_finds_tokenizer_and_load_causal_lm_reads_bin(tmp_path, toy_spm):
    c, w = random_weights(seed=4, vocab_size=300)
    path = write(tmp_path / "model.bin", legacy_bytes(c, w))
    with pytest.raises(UserError, match="put the sentencepiece .model it was trained with in .* as tokenizer.model"):
        llama2c.load(path)
    (tmp_path / "tok300.model").write_bytes(open(toy_spm, "rb").read())
    model, tok = lm.load_causal_lm(path, dtype=torch.float64)
    assert model.dtype == torch.float64 and not model.training and tok.model_max_length == 16
    tokens = tok("Hello world")["input_ids"]
    assert np.abs(hf_logits(model, tokens) - reference_logits(c, w, tokens)).max() < 1e-5  # HF builds RoPE in float32
    with pytest.raises(UserError, match="does not fit"):
        llama2c.load(write(tmp_path / "small.bin", legacy_bytes(*random_weights())), tokenizer=toy_spm)


def test_cli_refuses_nonempty_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty directory"):
        llama2c.main(["missing.bin", "missing.model", str(tmp_path / "out")])


# --- the real stories260K ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    path = os.path.join(STORIES, "stories260K.bin")
    if not os.path.isfile(path):
        pytest.skip("../shared/data/models/stories260K absent: llama2.c's stories260K.bin and tok512.model "
                    "are not in this checkout's shared data")
    return path, os.path.join(STORIES, "tok512.model")


@pytest.mark.real_data
def test_stories260k_greedy_sample_matches_llama2c(stories):
    model, tok = llama2c.load(stories[0])
    assert model.config.vocab_size == 512 and model.config.num_key_value_heads == 4
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=256, do_sample=False, pad_token_id=0)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")
    assert text == SAMPLE


@pytest.mark.real_data
def test_stories260k_tokenizer_round_trip(stories):
    tok = llama2c.sentencepiece_tokenizer(stories[1])
    ids = tok("Once upon a time")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "Once upon a time"
    assert tok.decode(tok(SAMPLE)["input_ids"], skip_special_tokens=True) == SAMPLE
    assert_encodes_like_sentencepiece(stories[1], TEXTS + SAMPLE.splitlines())
    with pytest.raises(UserError, match="not a sentencepiece BPE model"):
        llama2c.sentencepiece_tokenizer(os.path.join(STORIES, "tok512.bin"))  # llama2.c's own export format


@pytest.mark.real_data
def test_stories260k_cli_writes_loadable_directory(stories, tmp_path):
    out = tmp_path / "stories260K-hf"
    llama2c.main([*stories, str(out)])
    assert not [p for p in os.listdir(tmp_path) if p != "stories260K-hf"]
    model, tok = lm.load_causal_lm(str(out))
    direct, direct_tok = lm.load_causal_lm(stories[0])
    ids = direct_tok(SAMPLE[:200])["input_ids"]
    assert tok(SAMPLE[:200])["input_ids"] == ids
    assert torch.equal(torch.tensor(hf_logits(model, ids)), torch.tensor(hf_logits(direct, ids)))
