"""GGUF files as models: transformers' loader behind `lm.load_causal_lm` (a tiny GGUF written here with the
`gguf` package, laid out as llama.cpp's converter writes it), the `python -m lm.gguf` conversion, the
one-line errors for bad files, and (when ../shared/data holds it) SmolLM2-135M-Instruct."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import lm
from engine import UserError
from lm import gguf as gguf_cli
from lm.shared import SMOLLM2
from tests.lm_fixtures import make_text, tiny_tied_llama, train_tokenizer, write_tiny_gguf
from tests.helpers import ROOT

TEXT = make_text(60)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    tokenizer = train_tokenizer(TEXT)
    model = tiny_tied_llama(tokenizer)
    path = write_tiny_gguf(str(folder / "tiny.gguf"), model, tokenizer)
    return model, tokenizer, path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_gguf_file_loads_as_the_model_and_tokenizer_it_holds(tiny):
    model, tokenizer, path = tiny
    loaded, loaded_tok = lm.load_causal_lm(path)
    ids = tokenizer(TEXT[:300], return_tensors="pt").input_ids
    assert torch.equal(loaded_tok(TEXT[:300], return_tensors="pt").input_ids, ids)  # BOS included
    assert ids[0, 0] == tokenizer.bos_token_id
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
    assert loaded.config.tie_word_embeddings and not loaded.training


def test_a_directory_holding_one_gguf_file_loads_it_in_the_requested_dtype(tiny):
    _, _, path = tiny
    loaded, _ = lm.load_causal_lm(os.path.dirname(path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_one_load_parses_the_file_once_and_leaves_gguf_as_it_was(tiny, monkeypatch):
    import gguf

    model, tokenizer, path = tiny
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed, mapped = [], []

    def counting_reader(*args, **kwargs):
        parsed.append(args[0])
        return reader_class(*args, **kwargs)

    def counting_map(*args):
        mapped.append(args)
        return name_map(*args)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_map)
    loaded, _ = lm.load_causal_lm(path)
    assert len(parsed) == 1 and len(mapped) == 1  # transformers asks three times and once per tensor
    assert gguf.GGUFReader is counting_reader and gguf.get_tensor_name_map is counting_map
    ids = tokenizer(TEXT[:100], return_tensors="pt").input_ids
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_conversion_writes_a_plain_hf_directory(tiny, tmp_path):
    model, tokenizer, path = tiny
    out = tmp_path / "hf"
    gguf_cli.main([path, str(out)])
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    ids = tokenizer(TEXT[:200], return_tensors="pt").input_ids
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), ids), logits(model, ids), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        gguf_cli.main([path, str(out)])


def truncated(path, tmp_path, size):
    out = tmp_path / f"cut{size}.gguf"
    with open(path, "rb") as f:
        out.write_bytes(f.read(size))
    return str(out)


@pytest.mark.parametrize("keep", [100, -4096])  # inside the header; inside the tensor data
def test_a_truncated_file_is_one_line_naming_it(tiny, tmp_path, keep):
    _, _, path = tiny
    bad = truncated(path, tmp_path, keep if keep > 0 else os.path.getsize(path) + keep)
    with pytest.raises(UserError, match=f"{os.path.basename(bad)}.* is not a readable GGUF file .*truncated") as err:
        lm.load_causal_lm(bad)
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_gguf_and_an_unknown_architecture(tiny, tmp_path):
    model, tokenizer, _ = tiny
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model\n")
    with pytest.raises(UserError, match="junk.gguf.* is not a readable GGUF file"):
        lm.load_causal_lm(str(junk))
    other = write_tiny_gguf(str(tmp_path / "other.gguf"), model, tokenizer, architecture="rwkv9")
    with pytest.raises(UserError, match="other.gguf.*architecture 'rwkv9' is not one transformers reads"):
        lm.load_causal_lm(other)


def test_a_directory_with_two_gguf_files_asks_which(tiny, tmp_path):
    _, _, path = tiny
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(path, tmp_path / name)
    with pytest.raises(UserError, match="holds 2 GGUF files \\(a.gguf, b.gguf\\); pass the one to load"):
        lm.load_causal_lm(str(tmp_path))


def test_the_conversion_cli_fails_with_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    res = subprocess.run([sys.executable, "-m", "lm.gguf", str(bad), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "bad.gguf" in res.stderr and "not a readable GGUF file" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.real_data
def test_smollm2_loads_from_the_shared_gguf():
    if not os.path.isfile(SMOLLM2):
        pytest.skip("../shared/data/models/smollm2-135m-instruct absent: SmolLM2-135M-Instruct's GGUF is not in "
                    "this checkout's shared data")
    model, tokenizer = lm.load_causal_lm(SMOLLM2)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == (30, 576, 1536, 9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer("Hello world").input_ids == [19556, 905]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
