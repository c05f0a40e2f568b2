"""lm.decode: the C++ decode loop gives `model.generate`'s greedy tokens for dense and packed models of two
families (every codebook with a kernel decoder, quantized embeddings), the same seeded samples, falls back
to `generate` where it cannot run, and says so in one line where it was asked for."""
import pytest
import torch

import lm
from engine import UserError
from lm import decode as fast
from lm import generate as lm_generate
from quant import kernels
from quant.embedding import quantize_embeddings
from quant.model import quantize_model
from tests.lm_fixtures import make_text, tiny_family, tiny_model, tiny_tied_llama, train_tokenizer

pytestmark = pytest.mark.kernel
NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_text(60))


@pytest.fixture(scope="module")
def calib(tokenizer):
    ids = lm.encode(tokenizer, make_text(8, seed=1))
    return ids[:64].view(2, 32)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not fast.available():
        pytest.skip("the C++ extension is disabled or could not be built")


def reference(model, ids, new=NEW, **sampling):
    """`model.generate`'s new tokens (greedy unless sampling options are given)."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             pad_token_id=model.config.pad_token_id, do_sample=bool(sampling), **sampling)
    return out[0, ids.shape[1]:]


def prompt(tokenizer, text="The cat sees the dog and"):
    return lm.encode(tokenizer, text)[None]


LONG = "The cat sees the dog and the dog sees the bird, then the bird sees the cat and all of them run home"


def check_greedy(model, tokenizer, text="The cat sees the dog and"):
    assert fast.why_not(model) is None
    ids = prompt(tokenizer, text)
    new, _, _ = lm_generate.generate(model, tokenizer, ids, NEW, runtime="fast")
    assert new.tolist() == reference(model, ids).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_dense_greedy_is_generates(family, tokenizer):
    model = tiny_model("llama", tokenizer) if family == "llama" else tiny_family(family, tokenizer)
    check_greedy(model, tokenizer)


def test_logits_match_the_forward(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids = prompt(tokenizer)
    decoder = fast.FastDecoder(model, ids.shape[1] + 2)
    first = int(decoder.prefill(ids).argmax())
    decoder.step(first, ids.shape[1])
    with torch.no_grad():
        full = model(torch.cat([ids, torch.tensor([[first]])], 1)).logits[0, -1]
    torch.testing.assert_close(decoder.logits, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,bits", [("ldlqRG", 2), ("ldlqRG", 4), ("e8p", 2), ("e8p", 3), ("e8p", 4),
                                         ("qtip1mad", 2), ("qtip", 2)])
def test_packed_greedy_is_generates(method, bits, tokenizer, calib):
    model = tiny_model("llama", tokenizer)
    quantize_model(model, calib, "cpu", bits, method, seed=0, incoherence=method != "ldlqRG")
    check_greedy(model, tokenizer)
    assert prompt(tokenizer, LONG).shape[1] > kernels.MAX_TOKENS  # trellis: a prefill of several kernel-sized chunks
    check_greedy(model, tokenizer, LONG)


def test_packed_qwen2(tokenizer, calib):
    model = tiny_family("qwen2", tokenizer)
    quantize_model(model, calib, "cpu", 2, "e8p", seed=0, incoherence=True)
    check_greedy(model, tokenizer)


@pytest.mark.parametrize("tied,bits", [(True, 4), (False, 8)])
def test_quantized_embedding_and_head(tied, bits, tokenizer):
    model = tiny_tied_llama(tokenizer) if tied else tiny_model("llama", tokenizer)
    quantize_embeddings(model, bits)
    check_greedy(model, tokenizer)


def test_sampling_draws_generates_samples(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids = prompt(tokenizer)
    for seed in (1, 2):
        new, _, _ = lm_generate.generate(model, tokenizer, ids, NEW, temperature=1.3, top_p=0.9, seed=seed,
                                         runtime="fast")
        torch.manual_seed(seed)
        assert new.tolist() == reference(model, ids, temperature=1.3, top_p=0.9).tolist()


def test_stops_at_end_of_sequence(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids = prompt(tokenizer)
    eos = int(reference(model, ids)[3])  # the 4th greedy token ends the sequence
    model.generation_config.eos_token_id = eos
    new, _, _ = lm_generate.generate(model, tokenizer, ids, NEW, runtime="fast")
    assert new.tolist() == reference(model, ids).tolist() and len(new) == 4


def test_step_bytes_are_the_weights_one_step_reads(tokenizer, calib):
    model = tiny_model("llama", tokenizer)  # float32 weights that do not convert to 16 bits exactly
    embedding = model.get_input_embeddings().weight
    dense = sum(p.nbytes for p in model.parameters()) - embedding.nbytes  # one row of the embedding only
    assert fast.FastDecoder(model, 4).step_bytes == dense
    quantize_model(model, calib, "cpu", 2, "e8p", seed=0, incoherence=True)
    linears = [m for m in model.modules() if isinstance(m, fast.QuantLinear)]
    packed = sum(t.nbytes for m in linears for t in (*m.parameters(), *m.buffers()))
    norms = sum(m.weight.nbytes for n, m in model.named_modules() if n.endswith("norm"))
    assert len(linears) == 7 * len(model.model.layers)
    assert fast.FastDecoder(model, 4).step_bytes == packed + norms + model.lm_head.weight.nbytes
    assert packed < sum(m.in_features * m.out_features for m in linears) * 4 / 8  # under 4 bits a weight
    tied = tiny_tied_llama(tokenizer)  # the head reads the embedding's matrix: counted once
    assert fast.FastDecoder(tied, 4).step_bytes == sum(p.nbytes for p in tied.parameters())


def test_profile_has_every_part(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids = prompt(tokenizer)
    decoder = fast.FastDecoder(model, ids.shape[1] + 4)
    decoder.profile(on=True)
    token = int(decoder.prefill(ids).argmax())
    for pos in range(ids.shape[1], ids.shape[1] + 3):
        token = decoder.step(token, pos)
    parts = decoder.profile(on=False)
    assert set(parts) == {"matmul", "attention", "head", "other"} and all(s > 0 for s in parts.values())


def test_falls_back_without_the_extension(tokenizer, monkeypatch, capsys):
    model = tiny_model("llama", tokenizer)
    ids = prompt(tokenizer)
    want = reference(model, ids).tolist()
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert lm_generate.generate(model, tokenizer, ids, NEW)[0].tolist() == want
    assert capsys.readouterr().err == ""
    assert lm_generate.generate(model, tokenizer, ids, NEW, runtime="fast")[0].tolist() == want
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "C++ extension is disabled" in err


def test_unsupported_models(tokenizer):
    opt = tiny_model("opt", tokenizer)
    ids = prompt(tokenizer)
    assert lm_generate.generate(opt, tokenizer, ids, 4)[0].tolist() == reference(opt, ids, 4).tolist()
    with pytest.raises(UserError, match="--runtime fast cannot run this model: .* not 'opt'"):
        lm_generate.generate(opt, tokenizer, ids, 4, runtime="fast")
    llama = tiny_model("llama", tokenizer)
    llama.generation_config.repetition_penalty = 1.2
    assert "repetition_penalty" in fast.why_not(llama)


def test_one_line_errors(tokenizer, tmp_path):
    model = tiny_model("llama", tokenizer)
    with pytest.raises(UserError, match="exceed the model's 128 positions"):
        lm_generate.generate(model, tokenizer, prompt(tokenizer, "the cat " * 70), 4, runtime="fast")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="cannot load"):
        lm_generate.main([str(tmp_path), "hi", "--runtime", "fast"])
