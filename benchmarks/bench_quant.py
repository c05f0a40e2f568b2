"""Proxy loss and time of every method of the table (nearest / gptq / ldlq / ldlqRG / e8p), with and
without incoherence processing, on OPT-125m-shaped linear layers (rows x cols = out x in features:
768x768 attention, 3072x768 fc1, 768x3072 fc2) at 2, 3 and 4 bits.

    python benchmarks/bench_quant.py                          # all shapes, bits 2 3 4 (slow on CPU)
    python benchmarks/bench_quant.py --shapes 3072x768 --bits 2 --methods nearest ldlq

Inputs are synthetic, not from a model: H = E[x x^T] of Gaussian activations with a power-law
spectrum (eigenvalue i ~ (i+1)^-1.5) in a random basis plus a few outlier channels 20x larger (as LLM
activations have), W heavy-tailed (Student t, 4 degrees of freedom) with a few large entries.
Baselines measured in the same run: the proxy ratio is against nearest rounding with the same
processing; the time ratio is against nearest with the same processing; 'vs ldlqRG' compares with
ldlqRG under the same processing (e8p always uses the randomized Hadamard transform, so compare it
with `--rotation hadamard`).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import quant  # noqa: E402
from results import write_rows  # noqa: E402


def synthetic(rows, cols, seed, tokens):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # StudentT.sample takes no generator
    spectrum = (torch.arange(cols, dtype=torch.float64) + 1) ** -0.75  # std; eigenvalues ~ i^-1.5
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    X = (torch.randn(tokens, cols, generator=g, dtype=torch.float64) * spectrum) @ Q.T
    outliers = torch.randperm(cols, generator=g)[:max(1, cols // 256)]
    X[:, outliers] *= 20
    H = (X.T @ X / tokens).float()
    W = torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02
    W.view(-1)[torch.randperm(rows * cols, generator=g)[:rows // 8]] *= 10
    return W, H


def shape(text):
    """argparse type for ROWSxCOLS: a bad value is argparse's one-line error, not a traceback."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        rows = cols = 0
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxCOLS with positive integers")
    return rows, cols


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=shape, default=[(768, 768), (3072, 768), (768, 3072)],
                   help="ROWSxCOLS")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["nearest", "gptq", "ldlq", "ldlqRG", "e8p"], choices=quant.METHODS)
    p.add_argument("--incoherence", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--rotation", default="kron", choices=["kron", "hadamard"], help="incoherence rotation")
    p.add_argument("--tokens", type=int, default=8192, help="synthetic activations behind H")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the baselines first: nearest, then ldlqRG
    methods = ["nearest"] + sorted((m for m in args.methods if m != "nearest"), key=lambda m: m != "ldlqRG")
    print(f"device {args.device}, {torch.get_num_threads()} threads, rotation {args.rotation}, "
          "synthetic W and H (see --help)")
    print(f"{'shape':>9} {'bits':>4} {'incoh':>5} {'method':>8} {'proxy':>11} {'vs nearest':>10} "
          f"{'seconds':>8} {'time vs nearest':>15} {'proxy vs ldlqRG':>15} {'time vs ldlqRG':>14}")
    table = []
    for rows, cols in args.shapes:
        name = f"{rows}x{cols}"
        W, H = synthetic(rows, cols, args.seed, args.tokens)
        W, H = W.to(args.device), H.to(args.device)
        for bits in args.bits:
            for incoh in args.incoherence:
                base = {}
                for method in methods:
                    if quant.TABLE[method].rotation not in (None, args.rotation) or (
                            quant.TABLE[method].rotation and incoh == "off"):
                        continue  # e8p only runs with its own rotation
                    opts = dict(rotation=args.rotation if incoh == "on" else None)
                    quant.quantize_layer(W[:8], H, bits, method, incoh == "on", **opts)  # warm-up (lazy init)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    tick = time.perf_counter()
                    r = quant.quantize_layer(W, H, bits, method, incoh == "on", args.seed, lazy_batch=True, **opts)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - tick
                    base.setdefault("proxy", r.proxy)
                    base.setdefault("seconds", seconds)
                    if method == "ldlqRG":
                        base["ldlqRG"] = (r.proxy, seconds)
                    vs = (f"{r.proxy / base['ldlqRG'][0]:>15.3f} {seconds / base['ldlqRG'][1]:>14.2f}"
                          if "ldlqRG" in base else "")
                    print(f"{name:>9} {bits:>4} {incoh:>5} {method:>8} {r.proxy:>11.4g} "
                          f"{r.proxy / base['proxy']:>10.3f} {seconds:>8.3f} {seconds / base['seconds']:>15.2f} {vs}",
                          flush=True)
                    table.append({"shape": name, "bits": bits, "incoh": incoh, "method": method,
                                  "rotation": args.rotation if incoh == "on" else "", "proxy": f"{r.proxy:.4g}",
                                  "x_nearest_proxy": round(r.proxy / base["proxy"], 4), "seconds": round(seconds, 3),
                                  "x_nearest_time": round(seconds / base["seconds"], 3)})
    print("results:", write_rows("bench_quant", table))


if __name__ == "__main__":
    main()
