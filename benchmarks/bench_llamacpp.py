"""This repo's C++ decode loop beside llama.cpp on the same model and machine: prefill and decode tokens/s,
interleaved round by round (so that load changes hit both runtimes alike).

    python benchmarks/bench_llamacpp.py --llama-cpp PATH/TO/llama.cpp/build            # 1 and 2 threads
    python benchmarks/bench_llamacpp.py --llama-cpp BUILD --threads 1 --ours e8p2     # a quick run

llama.cpp is the reference CPU runtime for low-bit models, not a dependency of this repo: its tools build
from the llama-cpp-python sdist (`pip download --no-binary :all: --no-deps llama-cpp-python`, unpack, then in
its vendor/llama.cpp `cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-bench
llama-quantize llama-imatrix`). --llama-cpp is that build directory (or a folder holding the tools, or its bin/).

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of ../shared/data. llama.cpp's files are made once from it into
--models-dir with `llama-quantize --allow-requantize`: F16 holds the same weights as the dense model here;
Q8_0 and IQ4_NL (llama.cpp's 4.5-bit non-linear type) use an importance matrix that `llama-imatrix` collects
once from the F16 file on --imatrix-chunks windows of 512 tokens of --calib-file (WikiText-2 valid: the
calibration text of this repo's quantizers; 0 chunks: none). Ours: `lm.decode`'s loop (as `python -m
lm.generate` runs it) on the dense model in float32 and bfloat16 and on bench_generate.py's packed
directories (8-bit embedding / head; calibrated for speed only, see bench_generate.py).
llama.cpp's rows are llama-bench's pp128 (a 128-token prompt, --prefill-tokens) and tg64 at depth 16 (64 tokens
after a 16-token context); ours are the same lengths (prefill to the first new token, then 64 greedy tokens
after a 16-token prompt, counted after the first), as bench_generate.py measures them. Medians of --reps
rounds; each round runs every config once. Weights MB: llama.cpp's GGUF file, or the tensors of our loaded
model (packed codes, scales and the 8-bit table for the packed configs). --perplexity adds the perplexity
of each llama.cpp file and of our float32 model with this repo's evaluator (transformers dequantizes the
GGUF tensors; the first --eval-tokens tokens of --eval-file in windows of --seqlen, as
bench_quant_model.py scores its rows), and its ratio to float32's.
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import bench_generate  # noqa: E402
import lm  # noqa: E402
from engine import ArgumentParser, UserError, cli, require_positive_ints  # noqa: E402
from lm.shared import SMOLLM2, WIKI_TEST, WIKI_VALID  # noqa: E402
from results import write_rows  # noqa: E402

# llama.cpp config -> llama-quantize type (None: the shared file as it is)
LLAMA_TYPES = {"q4_1": None, "f16": "F16", "q8_0": "Q8_0", "iq4_nl": "IQ4_NL"}
OURS = ("fp32", "bf16", "e8p2", "qtip1mad2", "ldlqRG2", "e8p4")


def tool(build, name):
    """Path of llama.cpp tool `name` in a build directory (its bin/ or itself)."""
    for folder in (os.path.join(build, "bin"), build):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise UserError(f"--llama-cpp {build}: no {name} in it or in its bin/ (build llama.cpp's tools as this "
                    "script's docstring says)")


def imatrix_file(args):
    """llama-imatrix's importance matrix from the F16 file, collected on first use (None: --imatrix-chunks 0)."""
    if args.imatrix_chunks == 0:
        return None
    path = os.path.join(args.models_dir, f"smollm2-135m-imatrix{args.imatrix_chunks}.gguf")
    if not os.path.isfile(path):
        tmp = path + ".tmp.gguf"
        subprocess.run([tool(args.llama_cpp, "llama-imatrix"), "-m", gguf_file(args, "f16"), "-f", args.calib_file,
                        "-c", "512", "--chunks", str(args.imatrix_chunks), "-t", str(max(args.threads)), "-o", tmp],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(tmp, path)
    return path


def gguf_file(args, name):
    """llama.cpp's GGUF file of config `name`, made by llama-quantize on first use."""
    qtype = LLAMA_TYPES[name]
    if qtype is None:
        return args.model
    imatrix = imatrix_file(args) if qtype != "F16" else None
    tag = f"-imatrix{args.imatrix_chunks}" if imatrix else ""
    path = os.path.join(args.models_dir, f"smollm2-135m-{name}{tag}.gguf")
    if not os.path.isfile(path):
        os.makedirs(args.models_dir, exist_ok=True)
        tmp = path + ".tmp"
        subprocess.run([tool(args.llama_cpp, "llama-quantize"), "--allow-requantize",
                        *(["--imatrix", imatrix] if imatrix else []), args.model, tmp, qtype],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(tmp, path)
    return path


def parse_llama_bench(tests):
    """{"prefill": tok/s, "decode": tok/s} from the tests of llama-bench's `-o json` output (one prompt test, one
    generation test)."""
    out = {}
    for test in tests:
        key = "decode" if test["n_gen"] > 0 else "prefill"
        out[key] = float(test["avg_ts"])
    if set(out) != {"prefill", "decode"}:
        raise ValueError(f"llama-bench gave {sorted(out)}, expected a prompt and a generation test")
    return out


def llama_round(args, path, threads):
    """One llama-bench run of `path`: a prompt test and a generation test at the prompt's depth, one repetition
    each."""
    base = [tool(args.llama_cpp, "llama-bench"), "-m", path, "-t", str(threads), "-r", "1", "-o", "json"]
    prefill = subprocess.run(base + ["-p", str(args.prefill_tokens), "-n", "0"], check=True, capture_output=True,
                             text=True)
    decode = subprocess.run(base + ["-p", "0", "-n", str(args.new_tokens), "-d", str(args.decode_prompt_tokens)],
                            check=True, capture_output=True, text=True)
    return parse_llama_bench(json.loads(prefill.stdout) + json.loads(decode.stdout))


def our_round(args, model, tokenizer, text_ids):
    """Our decode loop on the same lengths: prefill to the first new token, decode counted after the first."""
    long_ids, short_ids = text_ids[None, :args.prefill_tokens], text_ids[None, :args.decode_prompt_tokens]
    _, prefill, _ = bench_generate.run(model, tokenizer, long_ids, 1, "fast")
    _, _, decode = bench_generate.run(model, tokenizer, short_ids, args.new_tokens, "fast")
    return {"prefill": args.prefill_tokens / prefill, "decode": (args.new_tokens - 1) / decode}


def weights_mb(model):
    """MB of a loaded model's tensors, each stored tensor once (a tied head shares the embedding's)."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values()) / 1e6


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", required=True, help="llama.cpp's build directory (llama-bench, llama-quantize)")
    p.add_argument("--model", default=SMOLLM2, help="the GGUF file both runtimes start from")
    p.add_argument("--llama", nargs="+", default=list(LLAMA_TYPES), choices=list(LLAMA_TYPES),
                   help="llama.cpp's configs (GGUF types)")
    p.add_argument("--ours", nargs="+", default=list(OURS), choices=list(bench_generate.CONFIGS),
                   help="this repo's configs (bench_generate.py's names)")
    p.add_argument("--text-file", default=WIKI_VALID, help="the text whose tokens are the prompts")
    bench_generate.add_protocol_flags(p)
    p.add_argument("--imatrix-chunks", type=int, default=64,
                   help="windows of 512 tokens for llama.cpp's importance matrix (0: none)")
    p.add_argument("--calib-file", default=WIKI_VALID, help="the importance matrix's text")
    p.add_argument("--perplexity", action="store_true",
                   help="add the perplexity of llama.cpp's files and of our float32 model")
    p.add_argument("--eval-file", default=WIKI_TEST, help="the perplexity's text")
    p.add_argument("--eval-tokens", type=int, default=40 * 512)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    if not os.path.isfile(args.model) or not args.model.endswith(".gguf"):
        raise UserError(f"--model {args.model}: not a GGUF file (both runtimes start from one)")
    for name in ("llama-bench", "llama-quantize") + (("llama-imatrix",) if args.imatrix_chunks else ()):
        tool(args.llama_cpp, name)
    require_positive_ints(args, "reps", "nsamples", "prefill_tokens", "decode_prompt_tokens", "new_tokens",
                          "eval_tokens", "seqlen")
    if min(args.threads) < 1 or args.imatrix_chunks < 0:
        raise UserError("--threads must be >= 1 and --imatrix-chunks >= 0")
    text = lm.read_text_file(args.text_file)[:20000]
    if args.imatrix_chunks:
        lm.read_text_file(args.calib_file)
    eval_text = lm.read_text_file(args.eval_file) if args.perplexity else None

    files = {name: gguf_file(args, name) for name in args.llama}
    fp_model, tokenizer = lm.load_causal_lm(args.model)
    text_ids = lm.encode(tokenizer, text)
    if len(text_ids) < args.prefill_tokens:
        raise UserError(f"--text-file {args.text_file}: {len(text_ids)} tokens, the prompts need {args.prefill_tokens}")
    ppl = {}
    if args.perplexity:
        torch.set_num_threads(max(args.threads))
        test_ids = lm.encode(tokenizer, eval_text)[:args.eval_tokens]
        if len(test_ids) < args.seqlen:
            raise UserError(f"--eval-file {args.eval_file}: {len(test_ids)} tokens, less than one --seqlen window")
        ppl["ours", "fp32"] = lm.perplexity(fp_model, test_ids, args.seqlen)
        for name, path in files.items():
            ppl["llama.cpp", name] = lm.perplexity(lm.load_causal_lm(path)[0], test_ids, args.seqlen)
            print(f"llama.cpp {name}: perplexity {ppl['llama.cpp', name]:.2f} (float32 {ppl['ours', 'fp32']:.2f})",
                  flush=True)
    del fp_model
    ours = {name: loaded for name in args.ours if (loaded := bench_generate.load(args, name)) is not None}
    print(f"{os.path.basename(args.model)}: prefill {args.prefill_tokens} tokens, decode {args.new_tokens} after "
          f"{args.decode_prompt_tokens}; medians of "
          f"{args.reps} interleaved rounds")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {("llama.cpp", n): [] for n in files} | {("ours", n): [] for n in ours}
        for _ in range(args.reps):
            for name, path in files.items():
                times["llama.cpp", name].append(llama_round(args, path, threads))
            for name, (model, tok) in ours.items():
                times["ours", name].append(our_round(args, model, tok, text_ids))
        med = {key: {k: statistics.median(r[k] for r in runs) for k in ("prefill", "decode")}
               for key, runs in times.items()}
        anchor = med.get(("llama.cpp", "iq4_nl"))
        for (runtime, name), m in med.items():
            row = {"runtime": runtime, "config": name, "threads": threads,
                   "weights MB": round(os.path.getsize(files[name]) / 1e6 if runtime == "llama.cpp"
                                       else weights_mb(ours[name][0]), 1),
                   "prefill tok/s": round(m["prefill"], 1), "decode tok/s": round(m["decode"], 1)}
            if anchor:
                row["decode / llama.cpp IQ4_NL"] = round(m["decode"] / anchor["decode"], 2)
            if (runtime, name) in ppl:
                row["perplexity"] = round(ppl[runtime, name], 2)
                row["perplexity / fp32"] = round(ppl[runtime, name] / ppl["ours", "fp32"], 3)
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print("wrote", write_rows("bench_llamacpp", rows, keep=("runtime", "config", "threads")))
    return rows


if __name__ == "__main__":
    cli(main)
