"""transformers' from_pretrained / save_pretrained of packed directories (lm.hf_quantizer, lm.rlo_loader):
the same model as `opt.py --load` builds (perplexity and greedy generation identical), dtype and
device_map honoured, the packed format written back, and in a fresh process without the toolkit
imported either a correct load (trust_remote_code=True, toolkit on PYTHONPATH) or a clear error,
never random weights."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lm
import opt
import quant
from lm.hf_quantizer import RloHfQuantizer
from tests.helpers import OPT_FAST, ROOT

# llama: e8p codes (int16 words, Hadamard rotation); opt: scalar 2-bit grid codes (uint8, Kronecker), biases
METHOD = {"llama": ["--quant", "e8p"], "opt": ["--quant", "ldlqRG"]}


@pytest.fixture(scope="module")
def packed(tiny_lm_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("hfq")
    data = tiny_lm_assets["data"]
    dirs = {}
    for kind, method in METHOD.items():
        dirs[kind] = str(root / f"packed_{kind}")
        opt.main([tiny_lm_assets[kind], "wikitext2", "--data-dir", data, *OPT_FAST, "--wbits", "2", *method,
                  "--incoh_processing", "--proxy_only", "--save", dirs[kind]])
    return dict(dirs, data=data, root=root)


def eval_ids(packed, tokenizer):
    return lm.encode(tokenizer, lm.load_text("wikitext2", "test", packed["data"]))


@pytest.mark.parametrize("kind", list(METHOD))
def test_from_pretrained_is_the_model_opt_load_runs(packed, kind):
    path = packed[kind]
    report = opt.main([path, "wikitext2", "--load", path, "--data-dir", packed["data"], *OPT_FAST, "--out",
                       str(packed["root"] / f"load_{kind}"), "--generate", "The cat", "--max-new-tokens", "6"])
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    layers = json.load(open(os.path.join(path, "config.json")))["quantization_config"]["layers"]
    built = {n for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}
    assert built == set(layers) and isinstance(model.hf_quantizer, RloHfQuantizer) and not model.training
    assert all(m.weight.device.type != "meta" for m in model.modules() if isinstance(m, torch.nn.Linear))
    ids = eval_ids(packed, tokenizer)
    assert lm.perplexity(model, ids, 32) == report["ppl"]["wikitext2"]  # exactly
    assert opt.generate(model, tokenizer, "The cat", 6) == report["generated"]
    reference, _ = lm.load_quantized(path)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("kind", list(METHOD))
def test_dtype_and_device_map_are_honoured(packed, kind):
    model = AutoModelForCausalLM.from_pretrained(packed[kind], dtype=torch.bfloat16, device_map="cpu")
    reference, _ = lm.load_quantized(packed[kind], dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    q = next(m for m in model.modules() if isinstance(m, quant.QuantLinear))
    assert q.scale.dtype == torch.float32 and q.codes_device().type == "cpu"  # scales stay fp32, like load_quantized
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match="cannot be offloaded to disk"):
        AutoModelForCausalLM.from_pretrained(packed[kind], device_map={"": "disk"})


@pytest.mark.parametrize("kind", list(METHOD))
def test_save_pretrained_writes_the_packed_format_back(packed, kind, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(packed[kind])
    tokenizer = AutoTokenizer.from_pretrained(packed[kind])
    out = str(tmp_path / "again")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert {"config.json", "model.safetensors", "rlo_loader.py"} <= set(os.listdir(out))
    config, original = (json.load(open(os.path.join(d, "config.json"))) for d in (out, packed[kind]))
    assert config["model_type"] == "rlo" and config["rlo_base_model_type"] == kind
    assert config["auto_map"] == {"AutoConfig": "rlo_loader.RloConfig"}
    assert config["transformers_weights"] == original["transformers_weights"]  # stops plain class-level loads
    assert config["quantization_config"] == original["quantization_config"]
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(packed[kind], "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # the packed codes, no dense weight
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    ids = eval_ids(packed, tokenizer)
    expected = lm.perplexity(model, ids, 32)
    assert lm.perplexity(lm.load_causal_lm(out)[0], ids, 32) == expected
    assert lm.perplexity(AutoModelForCausalLM.from_pretrained(out), ids, 32) == expected
    with pytest.raises(ValueError, match="local directory"):
        model.save_pretrained(str(tmp_path / "hub"), push_to_hub=True)
    # a model loaded by lm.load_quantized saves the same way through transformers' method name
    reference, _ = lm.load_quantized(packed[kind])
    reference.save_pretrained(str(tmp_path / "ref"))
    assert json.load(open(tmp_path / "ref" / "config.json"))["model_type"] == "rlo"


def test_dequantize_gives_the_dense_model_that_saves_plainly(packed, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(packed["opt"])
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = model(ids).logits
        dense = model.dequantize()
        assert not any(isinstance(m, quant.QuantLinear) for m in dense.modules())
        torch.testing.assert_close(dense(ids).logits, expected, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(str(tmp_path / "dense"))
    config = json.load(open(tmp_path / "dense" / "config.json"))
    assert config["model_type"] == "opt" and "quantization_config" not in config
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, dense(ids).logits)


def test_directories_of_the_earlier_layout_still_load(packed, tmp_path):
    # written before the model_type change: the family's model_type, no auto_map, no loader file, no stop key
    old = str(tmp_path / "old")
    shutil.copytree(packed["llama"], old)
    os.remove(os.path.join(old, "rlo_loader.py"))
    path = os.path.join(old, "config.json")
    config = json.load(open(path))
    config["model_type"] = config.pop("rlo_base_model_type")
    del config["auto_map"], config["transformers_weights"]
    json.dump(config, open(path, "w"))
    tokenizer = AutoTokenizer.from_pretrained(old)
    ids = eval_ids(packed, tokenizer)
    expected = lm.perplexity(lm.load_causal_lm(packed["llama"])[0], ids, 32)
    assert lm.perplexity(lm.load_causal_lm(old)[0], ids, 32) == expected
    assert lm.perplexity(AutoModelForCausalLM.from_pretrained(old), ids, 32) == expected


WRITTEN_BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed_v1")


@pytest.mark.parametrize("name", sorted(os.listdir(WRITTEN_BEFORE)))
def test_checkpoints_written_by_an_earlier_version_load_to_the_same_logits(name):
    # tests/lm/packed_v1: files of this format version kept in the repository (tests/lm/write_packed_fixture.py)
    path = os.path.join(WRITTEN_BEFORE, name)
    expected = load_file(os.path.join(path, "expected.safetensors"))
    for model in (lm.load_causal_lm(path)[0], AutoModelForCausalLM.from_pretrained(path)):
        assert any(isinstance(m, quant.QuantLinear) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_packed_directory_of_another_format_version_is_refused(packed, tmp_path):
    other = str(tmp_path / "v0")
    shutil.copytree(packed["opt"], other)
    path = os.path.join(other, "config.json")
    config = json.load(open(path))
    config["quantization_config"]["format"] = "rlo-packed-v0"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match="format 'rlo-packed-v0', this toolkit reads 'rlo-packed-v1'"):
        AutoModelForCausalLM.from_pretrained(other)


FRESH = """
import importlib.util, sys, torch
from transformers import AutoModelForCausalLM
print("TOOLKIT", importlib.util.find_spec("quant") is not None)
for flags in ({}, {"trust_remote_code": True}):
    try:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **flags)
    except Exception as err:
        print("\\nREFUSED", type(err).__name__, " ".join(str(err).split()))  # after transformers' y/N prompt
        continue
    print("LOADED", type(model.model.layers[0].self_attn.q_proj).__name__, "lm" in sys.modules)
    with torch.no_grad():
        torch.save(model(torch.arange(3, 40)[None]).logits, sys.argv[2])
"""


def fresh_process(packed, tmp_path, pythonpath):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # where transformers copies rlo_loader.py
    if pythonpath:
        env["PYTHONPATH"] = ROOT
    logits = str(tmp_path / "logits.pt")
    proc = subprocess.run([sys.executable, "-c", FRESH, packed["llama"], logits], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith(("TOOLKIT", "REFUSED", "LOADED"))], logits


def test_fresh_process_without_the_toolkit_refuses_with_what_to_do(packed, tmp_path):
    lines, _ = fresh_process(packed, tmp_path, pythonpath=False)
    assert lines[0] == "TOOLKIT False"  # really without it
    plain, remote = lines[1:]
    # never random weights: plain transformers does not know model_type "rlo" and asks for the loader
    assert plain.startswith("REFUSED ValueError") and "custom code" in plain and "trust_remote_code=True" in plain
    # the checkpoint's loader runs and names what is missing and what to do
    assert remote.startswith("REFUSED ImportError") and "packed low-bit checkpoint of the RLO toolkit" in remote
    assert "on PYTHONPATH" in remote


def test_fresh_process_with_trust_remote_code_loads_the_packed_model(packed, tmp_path):
    lines, logits = fresh_process(packed, tmp_path, pythonpath=True)
    assert lines[0] == "TOOLKIT True"
    assert lines[1].startswith("REFUSED ValueError") and "trust_remote_code=True" in lines[1]
    assert lines[2] == "LOADED QuantLinear True"  # the shipped loader imported lm itself
    reference, _ = lm.load_quantized(packed["llama"])
    with torch.no_grad():
        assert torch.equal(torch.load(logits), reference(torch.arange(3, 40)[None]).logits)
