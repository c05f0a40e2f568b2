"""QTIP's bitshift trellis (`quant.trellis`) against QuIP#'s lattice codebooks (`quant.e8p`), same run:
mean squared error per weight on unit Gaussian sequences at 2, 3 and 4 bits beside the rate-distortion
bound 2^(-2 bits), and seconds to quantize one layer (`quant.quantize_layer`, method qtip vs e8p:
randomized Hadamard transform, block LDLQ, one scale per row) of 768x768 and 4096x4096 (qtip: HYB code;
qtip1mad: 1MAD).

    python benchmarks/bench_trellis.py                   # MSE of every code, then the layer timings
    python benchmarks/bench_trellis.py --fit             # re-derive quant.trellis.INPUT_RMS
    python benchmarks/bench_trellis.py --sweep --sequences 1024   # HYB: seam_bits, L and hyb_q against MSE and time

MSE: the trellis sees Z / s with s = RMS(Z) / input_rms (`Trellis.scale_for`), the codebooks their own
`scale_for`. Layer timing: W Gaussian, H = X^T X / tokens of Gaussian activations with a decaying
spectrum; whole layers (a 4096x4096 qtip layer takes about half a minute on one core, qtip1mad much
longer). Each method first quantizes a small layer untimed, so that the one-off costs a model pays once
(the C++ build, the HYB table) are not in its times.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import quant  # noqa: E402
from quant import kernels  # noqa: E402
from quant.e8p import get_codebook  # noqa: E402
from quant.trellis import CODES, HYB_Q, KBITS, SEAM_BITS, Trellis  # noqa: E402
from results import write_rows  # noqa: E402

E8P = {2: "e8p", 3: "e8p_rvq3", 4: "e8p_rvq4"}
SWEEP_SEAM = tuple(sorted({2, 3, 4, 6, SEAM_BITS, 12, 32}))  # 32: the whole rotated sequence, as QTIP searches it
SWEEP_STATES = ((16, 9), (16, 10), (16, 11), (15, 9), (15, 10), (15, 11), (14, 9), (14, 11))


def trellis_mse(tr, Z, input_rms=None):
    s = Z.square().mean().sqrt() / (input_rms or tr.input_rms)
    X_hat, _ = tr.quantize(Z / s)
    return float((X_hat * s - Z).square().mean())


def e8p_mse(name, Z):
    cb = get_codebook(name)
    s = cb.scale_for(Z)
    return float((cb.quantize(Z.reshape(-1, 8) / s)[0] * s - Z.reshape(-1, 8)).square().mean())


def sweep(Z, reps):
    """The qtip code (HYB, 2 bits) with other overlap-pass lengths (seam_bits) and trellis sizes (L, hyb_q):
    MSE and seconds of `quantize` (both Viterbi passes) on the same sequences, against the defaults; every
    row with the default input scale (INPUT_RMS, fitted at L = 16, hyb_q = 9)."""
    configs = [dict(seam_bits=b) for b in SWEEP_SEAM] + [dict(L=L, hyb_q=q) for L, q in SWEEP_STATES]
    trellises = [Trellis(k=2, code="hyb", **c) for c in configs]
    for tr in trellises:  # warm-up, untimed: the C++ build and the hyb tables
        tr.quantize(Z[:8])
    seconds, mse = [[] for _ in trellises], [None] * len(trellises)
    for _ in range(reps):
        for i, tr in enumerate(trellises):
            tick = time.perf_counter()
            mse[i] = trellis_mse(tr, Z)
            seconds[i].append(time.perf_counter() - tick)
    seconds = [sorted(s)[reps // 2] for s in seconds]
    base = configs.index(dict(seam_bits=SEAM_BITS))
    print(f"qtip's code (HYB, 2 bits) on {len(Z)} x 256 unit Gaussian weights, {torch.get_num_threads()} thread(s), "
          f"median of {reps} interleaved round(s); defaults seam_bits {SEAM_BITS}, L 16, hyb_q {HYB_Q}:")
    for tr, c, m, sec in zip(trellises, configs, mse, seconds):
        label = f"seam_bits {tr.seam_bits:2d}" if "seam_bits" in c else f"L {tr.L}, hyb_q {tr.hyb_q:2d}"
        print(f"  {label:16s} {2 * tr.seam_steps + tr.steps:3d} steps of 2^{tr.L} states  MSE {m:.5f} ({m / mse[base] - 1:+.2%})"
              f"  {sec:.3f} s ({sec / seconds[base]:.2f}x)", flush=True)
    write_rows("bench_trellis_sweep", [
        {"option": ", ".join(f"{k} {v}" for k, v in c.items()), "steps_searched": 2 * tr.seam_steps + tr.steps,
         "states": f"2^{tr.L}", "mse": f"{m:.5f}", "mse_vs_default": f"{m / mse[base] - 1:+.2%}",
         "seconds": round(sec, 4), "x_default_time": round(sec / seconds[base], 3), "sequences": len(Z), "reps": reps}
        for tr, c, m, sec in zip(trellises, configs, mse, seconds)])


def layer(rows, cols, seed, tokens=4096):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * torch.logspace(0, -1, cols)
    return torch.randn(rows, cols, generator=g) * 0.02, X.T @ X / tokens


def timed(W, H, bits, method):
    tick = time.perf_counter()
    r = quant.quantize_layer(W, H, bits, method, seed=0)
    return time.perf_counter() - tick, r.proxy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=64, help="Gaussian sequences of T = 256 weights for the MSE")
    p.add_argument("--codes", nargs="+", default=list(CODES), choices=list(CODES))
    p.add_argument("--bits", nargs="+", type=int, default=list(KBITS), choices=list(KBITS))
    p.add_argument("--time-bits", type=int, default=2, choices=list(KBITS), help="bit width of the layer timings")
    p.add_argument("--time-methods", nargs="+", default=["qtip", "qtip1mad"],
                   choices=[n for n, m in quant.TABLE.items() if m.codebook == "trellis"])
    p.add_argument("--sizes", nargs="+", type=int, default=[768, 4096], help="n of the n x n layers timed")
    p.add_argument("--reps", type=int, default=1, help="timed rounds per layer and method (median)")
    p.add_argument("--no-time", action="store_true", help="MSE only")
    p.add_argument("--fit", action="store_true", help="search input_rms in steps of 0.02 instead")
    p.add_argument("--sweep", action="store_true", help="instead: HYB's MSE and time against seam_bits, L and hyb_q")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.reps < 1 or min(args.sizes) < 1:
        p.error("--reps and --sizes must be positive")
    torch.set_num_threads(args.threads)
    Z = torch.randn(args.sequences, 256, generator=torch.Generator().manual_seed(args.seed))
    if args.sweep:
        sweep(Z, args.reps)
        return
    if args.fit:
        for code in args.codes:
            for k in args.bits:
                tr = Trellis(k=k, code=code)
                errs = {r / 100: trellis_mse(tr, Z, r / 100) for r in range(80, 111, 2)}
                best = min(errs, key=errs.get)
                print(f"{code:6s} k={k}  input_rms {best:.2f}  MSE {errs[best]:.5f}   "
                      + " ".join(f"{r:.2f}:{e:.5f}" for r, e in errs.items()), flush=True)
        return
    print(f"MSE per weight on {args.sequences} x 256 unit Gaussian weights ({torch.get_num_threads()} thread(s)); "
          "trellis L=16, T=256, tail-biting")
    table = []
    for k in args.bits:
        bound = 2.0 ** (-2 * k)
        e = e8p_mse(E8P[k], Z)
        table.append({"part": "Gaussian MSE", "bits": k, "case": E8P[k], "value": f"{e:.5f}", "ratio": round(e / bound, 3),
                      "ratio_to": "bound 2^-2b"})
        line = f"  {k} bits  bound {bound:.5f}  {E8P[k]} {e:.5f} ({e / bound:.3f}x)"
        for code in args.codes:
            tr = Trellis(k=k, code=code)
            tick = time.perf_counter()
            m = trellis_mse(tr, Z)
            line += f"  {code} (V={tr.V}) {m:.5f} ({m / bound:.3f}x, {time.perf_counter() - tick:.1f} s)"
            table.append({"part": "Gaussian MSE", "bits": k, "case": f"{code} (V={tr.V})", "value": f"{m:.5f}",
                          "ratio": round(m / bound, 3), "ratio_to": "bound 2^-2b"})
        print(line, flush=True)
    if args.no_time:
        print("results:", write_rows("bench_trellis", table))
        return
    print(f"Viterbi (one pass, {args.sequences} sequences of 256 weights, L=16, 2 bits), C++ kernel vs torch:")
    for code in args.codes:
        tr = Trellis(k=2, code=code)
        seconds = {}
        for path in (True, False):
            kernels.ENABLED = path
            tick = time.perf_counter()
            tr.viterbi(Z)
            seconds[path] = time.perf_counter() - tick
        kernels.ENABLED = True
        print(f"  {code}: kernel {seconds[True]:.3f} s, torch {seconds[False]:.3f} s ({seconds[False] / seconds[True]:.0f}x)",
              flush=True)
        table.append({"part": "Viterbi seconds, kernel", "bits": 2, "case": code, "value": f"{seconds[True]:.4f}",
                      "ratio": round(seconds[False] / seconds[True], 1), "ratio_to": "torch path (speed-up)"})
    bits = args.time_bits
    print(f"seconds per layer, {bits} bits, quant.quantize_layer (RHT + block LDLQ + codebook), same run, "
          f"median of {args.reps} interleaved round(s):")
    methods = ["e8p", *args.time_methods]
    for method in methods:  # warm-up, untimed
        timed(*layer(64, 256, seed=0), bits, method)
    for n in args.sizes:
        W, H = layer(n, n, seed=n)
        runs = {m: [] for m in methods}
        for _ in range(args.reps):
            for method in methods:
                runs[method].append(timed(W, H, bits, method))
        e8p_s, e8p_proxy = sorted(runs["e8p"])[args.reps // 2]
        line = f"  {n}x{n}: e8p {e8p_s:.2f} s"
        for method in args.time_methods:
            seconds, proxy = sorted(runs[method])[args.reps // 2]
            line += f"; {method} {seconds:.2f} s = {seconds / e8p_s:.2f}x e8p, proxy / e8p's {proxy / e8p_proxy:.3f}"
            table.append({"part": "layer seconds", "bits": bits, "case": f"{method} {n}x{n}", "value": f"{seconds:.3f}",
                          "ratio": round(seconds / e8p_s, 3), "ratio_to": f"e8p ({e8p_s:.3f} s)"})
        print(line, flush=True)
    print("results:", write_rows("bench_trellis", table))


if __name__ == "__main__":
    main()
