"""Packed low-bit layers (`quant.QuantLinear`): bytes on disk and forward speed, against fp16 storage and
dense layers measured in the same run; and the same for a whole real model.

    python benchmarks/bench_packed.py                      # all three parts (part 3 if ../shared/data is present)
    python benchmarks/bench_packed.py --shapes 3072x768 --bits 2 --decode-shapes 4096x4096 --model none

1. Layers (OPT-125m shapes, bench_quant.py's synthetic W and H): for each method and bit width, bytes
   of the layer's stored tensors (codes, scales, zero points, rescaling) / its fp16 size, and forward
   tokens/s at --tokens tokens (prefill: the torch path) of the packed layer / a dense nn.Linear with
   the same (dequantized) weights.
2. Decode (`quant.kernels`, 1 token by default): tokens/s of a packed 2-bit layer / a dense fp32 and a
   dense bf16 nn.Linear, at 1 and 2 threads and Llama-sized shapes. The packed layers have the layout
   each method writes (codebook, rotation, scales) with random codes: quantizing a 11008x4096 weight
   takes minutes, and the forward's time does not depend on the code values.
3. A real model (default stories260K, llama2.c): every decoder linear quantized (calibration from
   WikiText-2 valid), saved with `lm.save_quantized`, reloaded: bytes of the quantized linears in
   model.safetensors / their fp16 size, perplexity reloaded vs at quantization time, forward tokens/s
   (prefill, 4 windows) and greedy `generate` tokens/s (batch 1, KV cache) packed / the fp model.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import lm  # noqa: E402
import quant  # noqa: E402
from bench_quant import shape, synthetic  # noqa: E402
from quant import kernels  # noqa: E402
from quant.e8p import get_codebook  # noqa: E402
from quant.codebooks.e8p import BY_BITS  # noqa: E402
from quant.model import quantize_model  # noqa: E402
from results import write_rows  # noqa: E402

SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
STORIES = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
WIKI = os.path.join(SHARED, "text", "wikitext-2-raw")
CONFIGS = {  # name -> (method, quantize_layer options)
    "ldlqRG": ("ldlqRG", dict(incoherence=False)),
    "ldlqRG+incoh": ("ldlqRG", dict(incoherence=True)),
    "e8p": ("e8p", dict(incoherence=True)),
}


DECODE_LAYOUTS = {  # config -> (codebook kind, rotation, qfn): the layouts quantize_layer writes for it
    "ldlqRG": ("grid", None, "a"),
    "ldlqRG+incoh": ("grid", "kron", "b"),
    "e8p": ("vector", "hadamard", None),
}


def stored_bytes(module):
    """Bytes of a QuantLinear's stored tensors except the bias (an fp16 layer stores its bias too)."""
    return sum(t.numel() * t.element_size() for n, t in module.state_dict().items() if n != "bias")


def rounds(fns, reps):
    """Median seconds of each function, called round-robin so that load changes hit all alike."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            tick = time.perf_counter()
            fn()
            t.append(time.perf_counter() - tick)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def bench_layers(args):
    print(f"{'shape':>9} {'config':>13} {'bits':>4} {'bytes / fp16':>12} {'proxy':>9} {'tokens/s packed / dense':>24}")
    table = []
    for rows, cols in args.shapes:
        W, H = synthetic(rows, cols, args.seed, 4096)
        x = torch.randn(args.tokens, cols)
        for name in args.configs:
            method, options = CONFIGS[name]
            for bits in args.bits:
                r = quant.quantize_layer(W, H, bits, method, seed=args.seed, lazy_batch=True, **options)
                packed = quant.QuantLinear.from_result(r)
                dense = torch.nn.Linear(cols, rows, bias=False)
                dense.weight.copy_(packed.dequantize())
                t_packed, t_dense = rounds([lambda: packed(x), lambda: dense(x)], args.reps)
                ratio = stored_bytes(packed) / (rows * cols * 2)
                print(f"{rows}x{cols:<4} {name:>13} {bits:>4} {ratio:>12.4f} {r.proxy:>9.4g} "
                      f"{t_dense / t_packed:>24.3f}", flush=True)
                table.append({"shape": f"{rows}x{cols}", "config": name, "bits": bits, "bytes_vs_fp16": round(ratio, 4),
                              "proxy": f"{r.proxy:.4g}", "tokens": args.tokens,
                              "packed_vs_dense_speed": round(t_dense / t_packed, 3), "reps": args.reps})
    print("results:", write_rows("bench_packed_layers", table))


def random_packed(rows, cols, name, bits, seed):
    """A rows x cols QuantLinear with config `name`'s layout at `bits` and uniformly random codes."""
    kind, rotation, qfn = DECODE_LAYOUTS[name]
    padded = list(quant.Incoherence(rows, cols, None, rotation, seed).padded_shape)
    spec = dict(shape=[rows, cols], padded=padded, wbits=bits, rotation=rotation, seed=seed, groupsize=-1,
                in_scale=rotation is not None)
    if kind == "vector":
        cb = get_codebook(BY_BITS[bits])
        spec.update(codebook=cb.name, stage_scales=list(cb.stage_scales))
    else:
        spec.update(codebook="grid", qfn=qfn)
    layer = quant.QuantLinear(spec)
    g = torch.Generator().manual_seed(seed)
    for key, b in layer.named_buffers():
        low, high = (0, 2 ** bits) if key == "zero" else (-2 ** 15, 2 ** 15) if b.dtype == torch.int16 else (0, 256)
        b.copy_(torch.randint(low, high, b.shape, generator=g).to(b.dtype))
    for p in layer.parameters():
        p.data.uniform_(0.5, 1.5, generator=g)
    return layer


@torch.no_grad()
def bench_decode(args):
    print(f"\ndecode: {args.decode_tokens} token(s) per forward, packed {args.decode_bits}-bit layers (random codes), "
          f"C++ kernel {'on' if kernels.ENABLED and kernels.extension() else 'off'}")
    print(f"{'shape':>10} {'threads':>7} {'config':>13} {'packed tokens/s':>15} {'/ dense fp32':>12} "
          f"{'/ dense bf16':>12}")
    table = []
    for rows, cols in args.decode_shapes:
        dense = torch.nn.Linear(cols, rows, bias=False)
        dense16 = torch.nn.Linear(cols, rows, bias=False).to(torch.bfloat16)
        x = torch.randn(args.decode_tokens, cols)
        x16 = x.to(torch.bfloat16)
        for name in args.configs:
            packed = random_packed(rows, cols, name, args.decode_bits, args.seed)
            packed(x)  # builds the kernel's plan (and the extension on first use) outside the timing
            for threads in args.decode_threads:
                torch.set_num_threads(threads)
                fns = [lambda: packed(x), lambda: dense(x), lambda: dense16(x16)]
                t_packed, t_fp32, t_bf16 = rounds(fns, args.reps)
                print(f"{rows}x{cols:<5} {threads:>7} {name:>13} {args.decode_tokens / t_packed:>15.1f} "
                      f"{t_fp32 / t_packed:>12.2f} {t_bf16 / t_packed:>12.2f}", flush=True)
                table.append({"shape": f"{rows}x{cols}", "config": name, "bits": args.decode_bits,
                              "tokens": args.decode_tokens, "threads": threads,
                              "packed_tokens_per_s": round(args.decode_tokens / t_packed, 1),
                              "vs_dense_fp32": round(t_fp32 / t_packed, 3), "vs_dense_bf16": round(t_bf16 / t_packed, 3),
                              "kernel": bool(kernels.ENABLED and kernels.extension()), "reps": args.reps})
    torch.set_num_threads(args.threads)
    print("results:", write_rows("bench_packed_decode", table))


def greedy(model, tokens):
    bos = torch.full((1, 1), model.config.bos_token_id, dtype=torch.long)
    return model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=False, max_new_tokens=tokens,
                          min_new_tokens=tokens, pad_token_id=0)


@torch.no_grad()
def bench_model(args):
    fp_model, tokenizer = lm.load_causal_lm(args.model)
    seqlen = lm.default_seqlen(fp_model, args.seqlen)
    calib = lm.calibration_windows(lm.encode(tokenizer, lm.read_text_file(os.path.join(WIKI, "wiki.valid.raw"))),
                                   args.nsamples, seqlen, args.seed)
    test = lm.encode(tokenizer, lm.read_text_file(os.path.join(WIKI, "wiki.test.raw")))
    print(f"\nmodel {args.model}: calibration {args.nsamples}x{seqlen}, perplexity on {args.eval_windows} windows "
          f"of WikiText-2 test; generate: {args.gen_tokens} greedy tokens from BOS")
    print(f"{'config':>13} {'bits':>4} {'linears bytes / fp16':>20} {'ppl':>9} {'reloaded ppl rel. diff':>22} "
          f"{'forward tokens/s packed / fp':>28} {'generate tokens/s fp':>20} {'packed / fp':>11}")
    batch = test[: 4 * seqlen].view(4, seqlen)
    table = []
    for name in args.configs:
        method, options = CONFIGS[name]
        for bits in args.bits:
            model, _ = lm.load_causal_lm(args.model)
            quantize_model(model, calib, "cpu", bits, method, args.seed, lazy_batch=True, **options)
            ppl = lm.perplexity(model, test, seqlen, max_windows=args.eval_windows)
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "q")
                lm.save_quantized(model, tokenizer, out, dict(method=method, wbits=bits, options=options))
                reloaded, _ = lm.load_causal_lm(out)
                layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, quant.QuantLinear)}
                with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
                    on_disk = sum(f.get_tensor(k).nbytes for k in f.keys()
                                  if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias"))
            fp16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
            again = lm.perplexity(reloaded, test, seqlen, max_windows=args.eval_windows)
            t_packed, t_fp = rounds([lambda: reloaded(batch), lambda: fp_model(batch)], args.reps)
            greedy(reloaded, 2)  # the kernel's per-layer plans, outside the timing
            g_packed, g_fp = rounds([lambda: greedy(m, args.gen_tokens) for m in (reloaded, fp_model)], args.gen_reps)
            print(f"{name:>13} {bits:>4} {on_disk / fp16:>20.4f} {ppl:>9.4g} {abs(again / ppl - 1):>22.2g} "
                  f"{t_fp / t_packed:>28.3f} {args.gen_tokens / g_fp:>20.1f} {g_fp / g_packed:>11.3f}", flush=True)
            table.append({"model": os.path.basename(args.model), "config": name, "bits": bits,
                          "linears_bytes_vs_fp16": round(on_disk / fp16, 4), "ppl": f"{ppl:.4g}",
                          "reloaded_ppl_rel_diff": f"{abs(again / ppl - 1):.2g}",
                          "forward_packed_vs_fp": round(t_fp / t_packed, 3),
                          "generate_fp_tokens_per_s": round(args.gen_tokens / g_fp, 1),
                          "generate_packed_vs_fp": round(g_fp / g_packed, 3)})
    print("results:", write_rows("bench_packed_model", table))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=shape, default=[(768, 768), (3072, 768), (768, 3072)], help="ROWSxCOLS")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--tokens", type=int, default=512, help="tokens per layer forward")
    p.add_argument("--reps", type=int, default=20, help="timed rounds (median)")
    p.add_argument("--decode-shapes", nargs="*", type=shape, default=[(768, 768), (4096, 4096), (11008, 4096)],
                   help="ROWSxCOLS of part 2 (none: skip it)")
    p.add_argument("--decode-bits", type=int, default=2, choices=[2, 3, 4])
    p.add_argument("--decode-tokens", type=int, default=1, help="tokens per forward in part 2")
    p.add_argument("--decode-threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--model", default=STORIES, help="model for part 3 ('none' to skip)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for part 3")
    p.add_argument("--seqlen", type=int, help="calibration/evaluation window (default: the model's)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens per generate() in part 3")
    p.add_argument("--gen-reps", type=int, default=5, help="timed generate() rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="threads of parts 1 and 3")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, CPU")
    bench_layers(args)
    if args.decode_shapes:
        bench_decode(args)
    if args.model != "none":
        if not os.path.exists(args.model):
            print(f"\nskipping part 3: {args.model} not found (pass --model)")
        else:
            bench_model(args)


if __name__ == "__main__":
    main()
