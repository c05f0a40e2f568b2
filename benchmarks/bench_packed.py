"""Packed low-bit layers (`quant.QuantLinear`): bytes on disk and forward speed, against fp16 storage and a
dense nn.Linear measured in the same run; and the same for a whole real model.

    python benchmarks/bench_packed.py                      # layers + stories260K (if ../shared/data is present)
    python benchmarks/bench_packed.py --shapes 3072x768 --bits 2 --model none

1. Layers (OPT-125m shapes, bench_quant.py's synthetic W and H): for each method and bit width, bytes
   of the layer's stored tensors (codes, scales, zero points, rescaling) / its fp16 size, and forward
   tokens/s of the packed layer / a dense nn.Linear with the same (dequantized) weights.
2. A real model (default stories260K, llama2.c): every decoder linear quantized (calibration from
   WikiText-2 valid), saved with `lm.save_quantized`, reloaded: bytes of the quantized linears in
   model.safetensors / their fp16 size, perplexity reloaded vs at quantization time, and forward
   tokens/s packed / the fp model.
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
from quant.model import quantize_model  # noqa: E402

SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
STORIES = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
WIKI = os.path.join(SHARED, "text", "wikitext-2-raw")
CONFIGS = {  # name -> (method, quantize_layer options)
    "ldlqRG": ("ldlqRG", dict(incoherence=False)),
    "ldlqRG+incoh": ("ldlqRG", dict(incoherence=True)),
    "e8p": ("e8p", dict(incoherence=True)),
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


@torch.no_grad()
def bench_model(args):
    fp_model, tokenizer = lm.load_causal_lm(args.model)
    seqlen = lm.default_seqlen(fp_model, args.seqlen)
    calib = lm.calibration_windows(lm.encode(tokenizer, lm.read_text_file(os.path.join(WIKI, "wiki.valid.raw"))),
                                   args.nsamples, seqlen, args.seed)
    test = lm.encode(tokenizer, lm.read_text_file(os.path.join(WIKI, "wiki.test.raw")))
    print(f"\nmodel {args.model}: calibration {args.nsamples}x{seqlen}, perplexity on {args.eval_windows} windows "
          f"of WikiText-2 test")
    print(f"{'config':>13} {'bits':>4} {'linears bytes / fp16':>20} {'ppl':>9} {'reloaded ppl rel. diff':>22} "
          f"{'tokens/s packed / fp':>20}")
    batch = test[: 4 * seqlen].view(4, seqlen)
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
            print(f"{name:>13} {bits:>4} {on_disk / fp16:>20.4f} {ppl:>9.4g} {abs(again / ppl - 1):>22.2g} "
                  f"{t_fp / t_packed:>20.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=shape, default=[(768, 768), (3072, 768), (768, 3072)], help="ROWSxCOLS")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--tokens", type=int, default=512, help="tokens per layer forward")
    p.add_argument("--reps", type=int, default=20, help="timed rounds (median)")
    p.add_argument("--model", default=STORIES, help="model for part 2 ('none' to skip)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for part 2")
    p.add_argument("--seqlen", type=int, help="calibration/evaluation window (default: the model's)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, CPU")
    bench_layers(args)
    if args.model != "none":
        if not os.path.exists(args.model):
            print(f"\nskipping part 2: {args.model} not found (pass --model)")
        else:
            bench_model(args)


if __name__ == "__main__":
    main()
