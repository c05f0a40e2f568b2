"""Every way transformers can be pointed at a packed directory, each in a fresh process: the family's own
class (LlamaForCausalLM, OPTForCausalLM, ... for every family of quant.model.FAMILIES), AutoModel,
AutoModelForCausalLM with trust_remote_code unset / False / True, and pipeline("text-generation").
Without the toolkit imported each one either loads the packed model (logits equal to lm.load_causal_lm's)
or stops with one error that names the fix; never transformers' "newly initialized" random linears.
With `import lm` first every one of them loads the packed model."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lm
import opt
from lm.rlo_loader import PLAIN_LOAD_STOP, STOP_KEY
from quant.model import FAMILIES
from tests.lm_fixtures import make_text, tiny_family, train_tokenizer, write_wikitext
from tests.helpers import ROOT

IDS = list(range(3, 40))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """{family: packed dir} for every family, 'today': a llama dir in the layout written before class-level
    loads were stopped (no transformers_weights key), and each one's logits from lm.load_causal_lm."""
    root = tmp_path_factory.mktemp("class_loads")
    tokenizer = train_tokenizer(make_text(20), vocab_size=300)
    data = write_wikitext(str(root / "wikitext"), n_paragraphs=(8, 2, 2))
    dirs = {}
    for family in FAMILIES:
        dense = str(root / f"dense_{family}")
        tiny_family(family, tokenizer).save_pretrained(dense)
        tokenizer.save_pretrained(dense)
        dirs[family] = str(root / family)
        opt.main([dense, "wikitext2", "--data-dir", data, "--nsamples", "1", "--seqlen", "16", "--eval-windows", "1",
                  "--wbits", "2", "--quant", "nearest", "--proxy_only", "--device", "cpu", "--save", dirs[family]])
    dirs["today"] = str(root / "today")
    shutil.copytree(dirs["llama"], dirs["today"])
    config = json.load(open(os.path.join(dirs["today"], "config.json")))
    del config[STOP_KEY]
    json.dump(config, open(os.path.join(dirs["today"], "config.json"), "w"))
    ids = torch.tensor([IDS])
    logits = {}
    with torch.no_grad():
        for name, path in dirs.items():
            model, _ = lm.load_causal_lm(path)
            logits[name] = model(ids).logits
            logits[name + ":base"] = model.base_model(ids).last_hidden_state
    return {"dirs": dirs, "logits": logits, "root": root}


# Runs the load calls of argv[2] (a JSON list of [case, call, directory]) in order; prints one JSON line
# per case and saves each loaded model's output on IDS (logits, or the base model's last hidden state).
RUNNER = """
import importlib.util, json, sys, torch
import transformers
torch.set_num_threads(1)
out, cases = {}, json.loads(sys.argv[2])
ids = torch.tensor([[%s]])
def family_class(path):
    return getattr(transformers, json.load(open(path + "/config.json"))["architectures"][0])
CALLS = {
    "class": lambda d: family_class(d).from_pretrained(d),
    "OPTForCausalLM": lambda d: transformers.OPTForCausalLM.from_pretrained(d),
    "AutoModelForCausalLM": lambda d: transformers.AutoModelForCausalLM.from_pretrained(d),
    "AutoModelForCausalLM(trust_remote_code=False)":
        lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False),
    "AutoModelForCausalLM(trust_remote_code=True)":
        lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True),
    "AutoModel": lambda d: transformers.AutoModel.from_pretrained(d),
    "AutoModel(trust_remote_code=True)": lambda d: transformers.AutoModel.from_pretrained(d, trust_remote_code=True),
    "pipeline": lambda d: transformers.pipeline("text-generation", model=d).model,
    "pipeline(trust_remote_code=True)":
        lambda d: transformers.pipeline("text-generation", model=d, trust_remote_code=True).model,
}
for case, call, path in cases:
    if call == "import lm":
        import lm
        continue
    try:
        model = CALLS[call](path)
    except Exception as err:
        # on a line of its own: transformers' trust_remote_code prompt leaves the line unfinished
        print("\\n" + json.dumps({"case": case, "error": type(err).__name__, "message": " ".join(str(err).split())}))
        continue
    quantized = sum(type(m).__name__ == "QuantLinear" for m in model.modules())
    with torch.no_grad():
        result = model(ids)
    out[case] = result.logits if hasattr(result, "logits") else result.last_hidden_state
    print(json.dumps({"case": case, "quantized": quantized, "lm": "lm" in sys.modules}))
torch.save(out, sys.argv[1])
""" % ", ".join(map(str, IDS))


def start(packed, name, cases, toolkit):
    """A fresh interpreter (the repo not importable unless `toolkit`) running `cases`; started, not awaited,
    so the two processes of a test share the wall time."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(packed["root"] / f"modules_{name}")  # where transformers copies rlo_loader.py
    if toolkit:
        env["PYTHONPATH"] = ROOT
    out = str(packed["root"] / f"{name}.pt")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, out, json.dumps(cases)], cwd=packed["root"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def finish(started):
    proc, out = started
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    # transformers' load report lists the linears it initialized randomly; it must never appear
    assert "newly initialized" not in stderr + stdout and "MISSING" not in stderr, stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, (line for line in stdout.splitlines() if line.startswith("{")))}
    return results, torch.load(out)


def same_output(packed, outputs, case, reference):
    assert torch.equal(outputs[case], packed["logits"][reference]), case


@pytest.fixture(scope="module")
def runs(packed):
    """Both fresh processes, run side by side: 'bare' (the toolkit not importable) and 'toolkit' (on
    PYTHONPATH, imported only by the checkpoint's loader or by the `import lm` step)."""
    dirs = packed["dirs"]
    llama = dirs["llama"]
    refusals = [["AutoModelForCausalLM", "AutoModelForCausalLM", llama],
                ["AutoModelForCausalLM(trust_remote_code=False)", "AutoModelForCausalLM(trust_remote_code=False)",
                 llama],
                ["AutoModel", "AutoModel", llama], ["pipeline", "pipeline", llama]]
    bare = [*([f"class {f}", "class", dirs[f]] for f in FAMILIES), *refusals,
            ["AutoModelForCausalLM(trust_remote_code=True)", "AutoModelForCausalLM(trust_remote_code=True)", llama]]
    toolkit = [["class llama", "class", llama],  # the toolkit importable but not imported
               *([f"remote {c}", c, dirs[f]] for c, f in (("AutoModelForCausalLM(trust_remote_code=True)", "llama"),
                                                          ("AutoModel(trust_remote_code=True)", "opt"),
                                                          ("pipeline(trust_remote_code=True)", "qwen2"))),
               ["", "import lm", ""],
               *([f"lm class {f}", "class", dirs[f]] for f in FAMILIES),
               *([f"lm {c}", c, llama] for c, _, _ in refusals),
               ["lm AutoModel opt", "AutoModel", dirs["opt"]],
               ["lm OPTForCausalLM on llama", "OPTForCausalLM", llama],
               ["lm class today", "class", dirs["today"]], ["lm AutoModelForCausalLM today", "AutoModelForCausalLM",
                                                           dirs["today"]]]
    started = {"bare": start(packed, "bare", bare, toolkit=False),
               "toolkit": start(packed, "toolkit", toolkit, toolkit=True)}
    return {name: finish(s) for name, s in started.items()}


def test_without_the_toolkit_every_load_stops_with_what_to_do(runs):
    results, outputs = runs["bare"]
    assert not outputs  # nothing loaded
    for family in FAMILIES:  # class-level: stopped by config.json's transformers_weights, before any model is built
        r = results[f"class {family}"]
        assert r["error"] == "ValueError" and r["message"].endswith(PLAIN_LOAD_STOP), r
    for case in ("AutoModelForCausalLM", "AutoModelForCausalLM(trust_remote_code=False)", "AutoModel", "pipeline"):
        r = results[case]  # model_type "rlo" is the checkpoint's own code: transformers asks for the flag
        assert r["error"] == "ValueError" and "custom code" in r["message"], r
        assert "trust_remote_code=True" in r["message"], r
    r = results["AutoModelForCausalLM(trust_remote_code=True)"]  # the checkpoint's loader says what is missing
    assert r["error"] == "ImportError" and "packed low-bit checkpoint of the RLO toolkit" in r["message"], r
    assert "on PYTHONPATH" in r["message"]


def test_toolkit_on_path_loads_with_trust_remote_code_and_class_level_asks_for_import_lm(runs, packed):
    results, outputs = runs["toolkit"]
    r = results["class llama"]
    assert r["error"] == "ValueError" and r["message"].endswith(PLAIN_LOAD_STOP), r
    for case, family, base in (("AutoModelForCausalLM(trust_remote_code=True)", "llama", False),
                               ("AutoModel(trust_remote_code=True)", "opt", True),
                               ("pipeline(trust_remote_code=True)", "qwen2", False)):
        r = results[f"remote {case}"]
        assert r.get("quantized", 0) > 0 and r["lm"], r  # the shipped loader imported the toolkit
        same_output(packed, outputs, f"remote {case}", family + (":base" if base else ""))


def test_after_import_lm_every_load_is_the_packed_model(runs, packed):
    results, outputs = runs["toolkit"]
    for family in FAMILIES:
        assert results[f"lm class {family}"].get("quantized", 0) > 0, results[f"lm class {family}"]
        same_output(packed, outputs, f"lm class {family}", family)
    for case in ("AutoModelForCausalLM", "AutoModelForCausalLM(trust_remote_code=False)", "pipeline"):
        same_output(packed, outputs, f"lm {case}", "llama")
    same_output(packed, outputs, "lm AutoModel", "llama:base")
    same_output(packed, outputs, "lm AutoModel opt", "opt:base")
    r = results["lm OPTForCausalLM on llama"]  # another family's class: refused, not half-loaded
    assert r["error"] == "ValueError" and "packed 'llama' checkpoint, not a 'opt' one" in r["message"], r


def test_directories_written_before_the_class_level_stop_still_load(runs, packed):
    _, outputs = runs["toolkit"]
    same_output(packed, outputs, "lm class today", "today")
    same_output(packed, outputs, "lm AutoModelForCausalLM today", "today")
    assert torch.equal(packed["logits"]["today"], packed["logits"]["llama"])  # lm.load_causal_lm: the same model


def test_a_dense_save_of_a_class_level_load_is_plain(packed, tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(packed["dirs"]["llama"])  # in-process: lm is imported
    assert model.config.model_type == "llama" and not hasattr(model.config, STOP_KEY)
    dense = model.dequantize()
    dense.save_pretrained(str(tmp_path / "dense"))
    config = json.load(open(tmp_path / "dense" / "config.json"))
    assert config["model_type"] == "llama" and not {"auto_map", "rlo_base_model_type", STOP_KEY} & set(config)
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "dense"))
    with torch.no_grad():
        ids = torch.tensor([IDS])
        torch.testing.assert_close(again(ids).logits, packed["logits"]["llama"], rtol=1e-5, atol=1e-5)
