"""`python -m lm.generate`: the same tokens as `model.generate` (greedy, dense and packed), chat through the
tokenizer's template (one turn and turns read from standard input), seeded sampling, the speed line, and
one-line errors."""
import io
import subprocess
import sys

import pytest
import torch

import lm
import opt
from engine import UserError
from lm import generate as lm_generate
from tests.lm_fixtures import save_tiny_lm, write_wikitext
from tests.helpers import ROOT

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    dense = save_tiny_lm(str(root / "llama"), "llama")
    packed = str(root / "packed")
    opt.main([dense, "wikitext2", "--data-dir", write_wikitext(str(root / "wikitext")), "--nsamples", "4", "--seqlen",
              "32", "--device", "cpu", "--wbits", "2", "--quant", "e8p", "--incoh_processing", "--proxy_only",
              "--save", packed])
    return {"dense": dense, "packed": packed}


@pytest.mark.parametrize("kind", ["dense", "packed"])
def test_greedy_output_is_model_generates(models, kind, capsys):
    prompt = "The cat sees"
    text = lm_generate.main([models[kind], prompt, "--max-new-tokens", "9"])
    model, tokenizer = lm.load_causal_lm(models[kind])
    ids = lm.encode(tokenizer, prompt)[None]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    out = capsys.readouterr().out
    assert out.startswith(prompt + text + "\n")
    lines = out.splitlines()
    assert lines[-1].startswith(f"prefill {ids.shape[1]} tokens: ") and "decode 8 tokens: " in lines[-1]


def test_sampling_is_seeded(models):
    args = [models["dense"], "A dog", "--max-new-tokens", "12", "--temperature", "1.5"]
    first = lm_generate.main(args + ["--seed", "3"])
    assert lm_generate.main(args + ["--seed", "3"]) == first
    assert any(lm_generate.main(args + ["--seed", str(s)]) != first for s in (4, 5, 6))


def test_chat_uses_the_template_and_keeps_the_conversation(models, monkeypatch):
    model, tokenizer = lm.load_causal_lm(models["dense"])
    tokenizer.chat_template = TEMPLATE
    chat = [{"role": "user", "content": "hello"}]
    ids = lm_generate.prompt_ids(tokenizer, None, chat)
    assert tokenizer.decode(ids[0]) == "<s>user: hello\n<s>assistant:"
    tokenizer.save_pretrained(models["dense"])  # the template travels with the tokenizer
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand then?\n\n"))
    conversation = lm_generate.main([models["dense"], "--chat", "--max-new-tokens", "4"])
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert conversation[2]["content"] == "and then?"


def test_errors_are_one_line(models, tmp_path):
    with pytest.raises(UserError, match="exceed the model's 128 positions"):
        lm_generate.main([models["dense"], "the cat " * 80, "--max-new-tokens", "4"])
    with pytest.raises(UserError, match="the prompt is empty"):
        lm_generate.main([models["dense"], "  "])
    with pytest.raises(UserError, match="give a PROMPT"):
        lm_generate.main([models["dense"]])
    with pytest.raises(UserError, match="--top-p in \\(0, 1\\]"):
        lm_generate.main([models["dense"], "x", "--top-p", "0"])
    res = subprocess.run([sys.executable, "-m", "lm.generate", str(tmp_path / "nothing"), "hi"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
