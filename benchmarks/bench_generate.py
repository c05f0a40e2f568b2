"""Whole-model generation speed: `lm.generate`'s C++ decode loop (`lm.decode`) against transformers'
`generate` on the same model, in the same run, interleaved round by round with each other and with the other
configs (so that load changes hit all of them alike).

    python benchmarks/bench_generate.py                                   # every config, 1 and 2 threads
    python benchmarks/bench_generate.py --configs fp32 e8p2 --threads 1   # a quick run
    python benchmarks/bench_generate.py --configs e8p2 --profile          # where the decode time goes

Model: SmolLM2-135M-Instruct (the GGUF of ../shared/data, dequantized to float32 or bfloat16), and packed
directories written by `opt.py --save` from it (the real file format, made once into --models-dir and
reused). They are calibrated on --nsamples windows of 128 tokens of WikiText-2 valid only, and the trellis
configs' Viterbi search (about 3.5 minutes a layer on 2 cores) is replaced by random streams (the layers'
LDLQ, scales and format otherwise as opt.py writes them): their speed is the packed format's, their
quality is not a result. Rows: prefill tokens/s (a --prefill-tokens prompt, to
the first new token) and decode tokens/s (after a --decode-prompt-tokens prompt, --new-tokens greedy tokens
with the end-of-sequence token disabled, counted after the first) of each runtime, the ratio fast / hf,
and whether both produced the same tokens; the weight bytes one decode step reads and the rate at which the
fast path reads them, beside this machine's read bandwidth (a float32 sum over --stream-mb, same threads):
the memory-bound ceiling of any runtime that reads the same bytes. Medians of --reps rounds. Rows of configs
and thread counts not run are kept from benchmarks/results/bench_generate.csv.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import lm  # noqa: E402
from lm import decode as fast  # noqa: E402
from lm import generate as lm_generate  # noqa: E402
from lm.shared import SMOLLM2, WIKI_VALID  # noqa: E402
from results import write_rows  # noqa: E402

# config -> (dtype, opt.py method, bits, opt.py options); dense configs have no method. Packed configs keep the
# tied embedding / LM head at 8 bits, as their whole-model files do (the head is a fifth of the weights).
HEAD = ["--embed-bits", "8"]
CONFIGS = {
    "fp32": ("float32", None, None, []),
    "bf16": ("bfloat16", None, None, []),
    **{f"e8p{b}": ("float32", "e8p", b, ["--incoh_processing", *HEAD]) for b in (2, 3, 4)},
    **{f"qtip1mad{b}": ("float32", "qtip1mad", b, ["--incoh_processing", *HEAD]) for b in (2, 3, 4)},
    **{f"qtip{b}": ("float32", "qtip", b, ["--incoh_processing", *HEAD]) for b in (2, 3, 4)},
    **{f"ldlqRG{b}": ("float32", "ldlqRG", b, HEAD) for b in (2, 3, 4)},
}


OPT = f"import sys; sys.path.insert(0, {ROOT!r}); import opt; opt.main(sys.argv[1:])"
TRELLIS_RANDOM = f"""import sys, torch
sys.path.insert(0, {ROOT!r})
import opt
from quant.trellis import Trellis
def random_streams(self, X):
    packed = torch.randint(0, 256, (X.shape[0], self.T * self.k // 8), dtype=torch.uint8)
    return self.decode(packed).to(X.dtype), packed
Trellis.quantize = random_streams
opt.main(sys.argv[1:])"""


def packed_dir(args, name):
    """The packed directory of config `name`, written by opt.py on first use."""
    _, method, bits, options = CONFIGS[name]
    path = os.path.join(args.models_dir, f"{name}_n{args.nsamples}_head8")
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"writing {path} (opt.py --quant {method} --wbits {bits}, {args.nsamples} x 128 calibration tokens)",
              flush=True)
        cmd = [sys.executable, "-c", TRELLIS_RANDOM if method.startswith("qtip") else OPT, args.model, "wikitext2", "--train-file", WIKI_VALID,
               "--nsamples", str(args.nsamples), "--seqlen", "128", "--wbits", str(bits), "--quant", method,
               *options, "--proxy_only", "--save", path]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def read_bandwidth(megabytes, reps):
    """GB/s of torch's float32 sum over a buffer of `megabytes` (far beyond the caches), median of `reps`."""
    x = torch.ones(int(megabytes * 1e6) // 4)
    times = []
    for _ in range(reps + 1):  # the first pass faults the pages in
        tick = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - tick)
    return x.nbytes / statistics.median(times[1:]) / 1e9


def run(model, tokenizer, ids, new, runtime):
    """(tokens, prefill s, decode s) of one `lm.generate.generate` call."""
    tokens, prefill, decode = lm_generate.generate(model, tokenizer, ids, new, runtime=runtime)
    return tokens.tolist(), prefill, decode


def load(args, name):
    """(model, tokenizer) of a config with the fast path ready, or None (the reason printed)."""
    dtype, method, _, _ = CONFIGS[name]
    path = args.model if method is None else packed_dir(args, name)
    model, tokenizer = lm.load_causal_lm(path, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = None  # every run decodes --new-tokens tokens
    reason = fast.why_not(model)
    if reason is not None or not fast.available():
        print(f"{name}: the fast path does not run it ({reason or 'no C++ extension'})")
        return None
    return model, tokenizer


def one_round(args, model, tokenizer, text_ids, times):
    """fast, hf, fast, hf: a prefill of each, then a decode of each; whether the decodes' tokens agree."""
    long_ids, short_ids = text_ids[None, :args.prefill_tokens], text_ids[None, :args.decode_prompt_tokens]
    for runtime in ("fast", "hf"):
        _, prefill, _ = run(model, tokenizer, long_ids, 1, runtime)
        times[f"{runtime}_prefill"].append(prefill)
    out = {}
    for runtime in ("fast", "hf"):
        out[runtime], _, decode = run(model, tokenizer, short_ids, args.new_tokens, runtime)
        times[f"{runtime}_decode"].append(decode)
    return out["fast"] == out["hf"]


def bench(args, models, threads, text_ids, bandwidth):
    """Rows of every loaded config at `threads` threads: --reps rounds, each running every config in turn, so
    that the machine's drift falls on all of them alike and their ratios hold."""
    times = {name: {k: [] for k in ("fast_prefill", "hf_prefill", "fast_decode", "hf_decode")} for name in models}
    same = dict.fromkeys(models, True)
    for _ in range(args.reps):
        for name, (model, tokenizer) in models.items():
            same[name] &= one_round(args, model, tokenizer, text_ids, times[name])
    rows = []
    for name, (model, _) in models.items():
        med = {k: statistics.median(v) for k, v in times[name].items()}
        row = {"model": name, "threads": threads,
               "prefill fast tok/s": round(args.prefill_tokens / med["fast_prefill"], 1),
               "prefill hf tok/s": round(args.prefill_tokens / med["hf_prefill"], 1),
               "decode fast tok/s": round((args.new_tokens - 1) / med["fast_decode"], 1),
               "decode hf tok/s": round((args.new_tokens - 1) / med["hf_decode"], 1)}
        row["prefill fast / hf"] = round(med["hf_prefill"] / med["fast_prefill"], 2)
        row["decode fast / hf"] = round(med["hf_decode"] / med["fast_decode"], 2)
        row["same tokens"] = same[name]
        step_mb = fast.FastDecoder(model, 2).step_bytes / 1e6
        row["MB / step"] = round(step_mb, 1)
        row["decode GB/s"] = round(step_mb * row["decode fast tok/s"] / 1e3, 1)
        row["read GB/s"] = round(bandwidth, 1)
        if args.profile:
            row.update(profile(model, text_ids[None, :args.decode_prompt_tokens], args.new_tokens))
        rows.append(row)
    return rows


def profile(model, ids, new):
    """Shares of one greedy decode's time: the C++ parts (decode.h's clocks) and the rest (Python)."""
    decoder = fast.FastDecoder(model, ids.shape[1] + new)
    token = int(decoder.prefill(ids).argmax())
    decoder.profile(on=True)
    tick = time.perf_counter()
    for pos in range(ids.shape[1], ids.shape[1] + new - 1):
        token = decoder.step(token, pos)
    total = time.perf_counter() - tick
    parts = decoder.profile(on=False)
    parts["python"] = total - sum(parts.values())
    return {f"{k} %": round(100 * v / total, 1) for k, v in parts.items()}


def add_protocol_flags(p):
    """The flags of the measurement protocol, shared with bench_llamacpp.py: threads, lengths, rounds and the
    packed models' calibration and folder."""
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows of the packed models")
    p.add_argument("--models-dir", default=os.path.join(ROOT, "runs", "bench_generate"),
                   help="where the packed models (and bench_llamacpp.py's GGUF files) are written once and reused")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="the dense model (packed configs are made from it)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add_protocol_flags(p)
    p.add_argument("--stream-mb", type=float, default=1024, help="buffer of the read-bandwidth baseline")
    p.add_argument("--profile", action="store_true", help="add the decode time's shares per part (C++ clocks)")
    args = p.parse_args()
    _, tokenizer = lm.load_causal_lm(args.model)
    text_ids = lm.encode(tokenizer, lm.read_text_file(WIKI_VALID)[:20000])
    print(f"{os.path.basename(args.model)}: prefill {args.prefill_tokens} tokens; decode {args.new_tokens} tokens "
          f"after {args.decode_prompt_tokens}; fast = lm.decode (C++), hf = transformers' generate; medians of "
          f"{args.reps} interleaved rounds")
    models = {name: loaded for name in args.configs if (loaded := load(args, name)) is not None}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth(args.stream_mb, args.reps)
        print(f"{threads} thread(s): float32 read bandwidth {bandwidth:.1f} GB/s")
        for row in bench(args, models, threads, text_ids, bandwidth):
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if rows:
        print("wrote", write_rows("bench_generate", rows, keep=("model", "threads")))


if __name__ == "__main__":
    main()
