"""benchmarks/bench_llamacpp.py without llama.cpp: stand-in llama-bench, llama-quantize and llama-imatrix
executables that report fixed rates and copy files, so that the script's own work is checked (GGUF files and
the importance matrix made once, llama-bench called with the protocol's lengths and depth, medians, the ratio
to IQ4_NL, the perplexity of each file against our float32 model's, our decode loop's row, the results file),
and its one-line errors."""
import csv
import functools
import os
import stat
import sys

import pytest

from engine import UserError
from lm import decode as fast
from tests.helpers import ROOT
from tests.lm_fixtures import make_text, tiny_tied_llama, train_tokenizer, write_tiny_gguf

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_llamacpp  # noqa: E402
import results  # noqa: E402

sys.path.pop(0)

# decode tok/s the stand-in llama-bench reports per GGUF type; prefill is ten times that
RATES = {"f16": 50.0, "iq4_nl": 100.0}
LLAMA_BENCH = f"""#!{sys.executable}
import json, os, sys
a = sys.argv[1:]
opt = dict(zip(a[::2], a[1:][::2]))
assert opt["-t"] == "1" and opt["-r"] == "1" and opt["-o"] == "json", a
name = os.path.basename(opt["-m"]).split(".")[0].split("-")[2]  # smollm2-135m-NAME[-imatrixN].gguf
rate = {RATES!r}[name]
if opt["-n"] == "0":
    assert opt["-p"] == "48" and "-d" not in opt, a
    print(json.dumps([dict(n_prompt=48, n_gen=0, avg_ts=10 * rate)]))
else:
    assert opt["-p"] == "0" and opt["-n"] == "24" and opt["-d"] == "8", a
    print(json.dumps([dict(n_prompt=0, n_gen=24, avg_ts=rate)]))
"""
LLAMA_QUANTIZE = f"""#!{sys.executable}
import shutil, sys
a = sys.argv[1:]
assert a[0] == "--allow-requantize", a
imatrix = a[2] if a[1] == "--imatrix" else None
src, dst, qtype = a[-3:]
assert (imatrix is not None) == (qtype != "F16") and (imatrix is None or imatrix.endswith("imatrix2.gguf")), a
shutil.copyfile(src, dst)  # the same weights: each file's perplexity is the float32 model's
with open(__file__ + ".calls", "a") as f:
    f.write(qtype + "\\n")
"""
LLAMA_IMATRIX = f"""#!{sys.executable}
import sys
a = sys.argv[1:]
opt = dict(zip(a[::2], a[1:][::2]))
assert opt["-m"].endswith("-f16.gguf") and opt["--chunks"] == "2" and opt["-c"] == "512", a
with open(opt["-o"], "w") as f:
    f.write("imatrix of " + opt["-f"])
with open(__file__ + ".calls", "a") as f:
    f.write("imatrix\\n")
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_llamacpp")
    tools = tmp / "build" / "bin"
    tools.mkdir(parents=True)
    executable(tools / "llama-bench", LLAMA_BENCH)
    executable(tools / "llama-quantize", LLAMA_QUANTIZE)
    executable(tools / "llama-imatrix", LLAMA_IMATRIX)
    text = make_text(60)
    (tmp / "text.txt").write_text(text)
    tokenizer = train_tokenizer(text)
    gguf = write_tiny_gguf(str(tmp / "tiny.gguf"), tiny_tied_llama(tokenizer), tokenizer)
    argv = ["--llama-cpp", str(tmp / "build"), "--model", gguf, "--text-file", str(tmp / "text.txt"),
            "--llama", "f16", "iq4_nl", "--ours", "fp32", "--threads", "1", "--reps", "2",
            "--prefill-tokens", "48", "--decode-prompt-tokens", "8", "--new-tokens", "24",
            "--imatrix-chunks", "2", "--calib-file", str(tmp / "text.txt"), "--perplexity",
            "--eval-file", str(tmp / "text.txt"), "--eval-tokens", "96", "--seqlen", "32",
            "--models-dir", str(tmp / "models")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_llamacpp, "write_rows", functools.partial(results.write_rows, directory=str(tmp / "results")))
        first = bench_llamacpp.main(argv)
        second = bench_llamacpp.main(argv)
    return dict(tmp=tmp, argv=argv, first=first, second=second, calls=tools / "llama-quantize.calls",
                imatrix_calls=tools / "llama-imatrix.calls")


def test_llama_cpp_rows_carry_llama_bench_rates_and_the_ratio_to_iq4_nl(setup):
    rows = {(r["runtime"], r["config"]): r for r in setup["first"]}
    for name, rate in RATES.items():
        row = rows["llama.cpp", name]
        assert row["decode tok/s"] == rate and row["prefill tok/s"] == 10 * rate and row["threads"] == 1
        assert row["decode / llama.cpp IQ4_NL"] == round(rate / RATES["iq4_nl"], 2)
        path = setup["tmp"] / "models" / f"smollm2-135m-{name}{'-imatrix2' if name != 'f16' else ''}.gguf"
        assert row["weights MB"] == round(path.stat().st_size / 1e6, 1)
        assert row["perplexity / fp32"] == 1.0 and row["perplexity"] > 1


def test_gguf_files_and_the_importance_matrix_are_made_once_and_reused(setup):
    assert sorted(setup["calls"].read_text().split()) == ["F16", "IQ4_NL"]
    assert setup["imatrix_calls"].read_text().split() == ["imatrix"]
    assert not [p for p in os.listdir(setup["tmp"] / "models") if p.endswith(".tmp")]


def test_our_decode_loop_has_a_row_beside_them_and_the_results_file_holds_one_run(setup):
    if not fast.available():
        pytest.skip("the C++ decode loop is not built here (RLO_NO_KERNEL or no compiler)")
    row = next(r for r in setup["second"] if r["runtime"] == "ours")
    assert row["config"] == "fp32" and row["decode tok/s"] > 0 and row["prefill tok/s"] > 0
    assert row["decode / llama.cpp IQ4_NL"] == pytest.approx(row["decode tok/s"] / RATES["iq4_nl"], abs=0.01)
    assert row["weights MB"] > 0 and row["perplexity / fp32"] == 1.0
    with open(setup["tmp"] / "results" / "bench_llamacpp.csv", newline="") as f:
        saved = list(csv.DictReader(f))
    assert sorted((r["runtime"], r["config"]) for r in saved) == [("llama.cpp", "f16"), ("llama.cpp", "iq4_nl"),
                                                                  ("ours", "fp32")]


@pytest.mark.parametrize("change, message", [
    (("--llama-cpp", "/nonexistent"), "no llama-bench in it"),
    (("--model", __file__), "not a GGUF file"),
    (("--reps", "0"), "--reps must be >= 1"),
    (("--threads", "0"), "--threads must be >= 1"),
    (("--prefill-tokens", "100000"), "the prompts need 100000"),
    (("--eval-tokens", "16"), "less than one --seqlen window"),
    (("--imatrix-chunks", "-1"), "--imatrix-chunks >= 0"),
])
def test_bad_input_is_one_user_error(setup, change, message):
    argv = list(setup["argv"])
    argv[argv.index(change[0]) + 1] = change[1]
    with pytest.raises(UserError, match=message):
        bench_llamacpp.main(argv)


def test_llama_bench_output_without_a_generation_test_is_refused():
    with pytest.raises(ValueError, match="expected a prompt and a generation test"):
        bench_llamacpp.parse_llama_bench([dict(n_prompt=128, n_gen=0, avg_ts=1.0)])
