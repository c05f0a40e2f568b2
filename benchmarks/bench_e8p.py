"""Lattice codebooks of `quant.e8p`: mean squared error per weight on unit Gaussian 8-vectors at 2, 3 and 4
bits beside the optimal scalar quantizer (Lloyd-Max) and the rate-distortion bound 2^(-2 bits), and the
nearest-codeword search throughput against a chunked brute-force argmin over all 2^16 E8P codewords,
measured in the same run (the ratio is the number to read; both codes are checked equal).

    python benchmarks/bench_e8p.py           # about 20 s on one core
    python benchmarks/bench_e8p.py --fit     # re-derive input_rms and the residual scales (a few minutes)

MSE uses each codebook's own scale rule (`scale_for`: RMS(W) / input_rms). --fit searches input_rms
and the residual stage scale in steps of 0.01 on the same samples and prints the best values, the
constants in `quant.e8p.get_codebook`.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from quant.e8p import CODEBOOKS, VectorCodebook, get_codebook  # noqa: E402
from results import write_rows  # noqa: E402

LLOYD_MAX = {2: 0.1175, 3: 0.03455, 4: 0.009497}  # optimal scalar quantizer of N(0, 1), 2^bits levels


def mse(cb, Z):
    X_hat, _ = cb.quantize(Z / cb.scale_for(Z))
    return float((X_hat * cb.scale_for(Z) - Z).square().mean())


def uniform_mse(Z, bits):
    """MSE of the best uniform scalar grid (2^bits levels, symmetric, step searched), on the same samples."""
    levels = 2 ** bits

    def err(step):
        q = (torch.round(Z / step + (levels - 1) / 2).clamp(0, levels - 1) - (levels - 1) / 2) * step
        return float((q - Z).square().mean())

    return argmin_on_grid(err, 0.05, 2.0)[1]


def brute_nearest(X, grid, chunk=1024):
    """Index of the nearest row of `grid` for every row of X: argmax of 2 x . g - |g|^2 over all rows."""
    norm = grid.square().sum(1)
    return torch.cat([(2 * c @ grid.T - norm).argmax(1) for c in X.split(chunk)])


def throughput(n_fast, n_brute, seed):
    cb = get_codebook("e8p")
    stage = cb.stages[0]
    X = torch.randn(n_fast, 8, generator=torch.Generator().manual_seed(seed)) * cb.input_rms
    t0 = time.perf_counter()
    _, codes = stage.nearest(X)
    fast = n_fast / (time.perf_counter() - t0)
    grid = stage.decode(torch.arange(1 << 16))
    t0 = time.perf_counter()
    brute = brute_nearest(X[:n_brute], grid)
    slow = n_brute / (time.perf_counter() - t0)
    return fast, slow, float((brute == codes[:n_brute]).float().mean())


def argmin_on_grid(err, lo, hi):
    """(value, error) minimizing err over lo, lo + 0.01, ..., hi by ternary search (err unimodal)."""
    cache = {}

    def f(i):
        if i not in cache:
            cache[i] = err(round(lo + 0.01 * i, 2))
        return cache[i]

    a, b = 0, round((hi - lo) / 0.01)
    while b - a > 2:
        m1, m2 = a + (b - a) // 3, b - (b - a) // 3
        a, b = (a, m2) if f(m1) < f(m2) else (m1, b)
    best = min(range(a, b + 1), key=f)
    return round(lo + 0.01 * best, 2), f(best)


def fit(Z):
    """For each codebook the input_rms (and residual scale) with the lowest MSE on Z: a search over
    input_rms in 0.80..1.30, for each value the best residual scale in 1.0..5.0."""
    for name in CODEBOOKS:
        base = get_codebook(name)
        if len(base.stages) == 1:
            rms, e = argmin_on_grid(lambda r: mse(VectorCodebook(name, base.stages, r, [1.0]), Z), 0.8, 1.3)
            print(f"{name:9s} input_rms {rms:.2f}  MSE {e:.5f}", flush=True)
            continue
        second = {}

        def err(r):
            cb1 = VectorCodebook(name, base.stages[:1], r, [1.0])
            s = cb1.scale_for(Z)
            X = Z / s
            R = X - cb1.quantize(X)[0]  # stage 1 once per input_rms, then only stage 2 varies

            def err2(m):
                return float((R - base.stages[1].nearest(R * m)[0] / m).square().mean() * s * s)

            second[r], e = argmin_on_grid(err2, 1.0, 5.0)
            return e

        rms, e = argmin_on_grid(err, 0.8, 1.3)
        print(f"{name:9s} input_rms {rms:.2f}  residual scale {second[rms]:.2f}  MSE {e:.5f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1 << 18, help="Gaussian 8-vectors for the MSE")
    p.add_argument("--search", type=int, default=1 << 17, help="vectors for the fast search timing")
    p.add_argument("--brute", type=int, default=4096, help="vectors for the brute-force timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", action="store_true", help="search the scale constants instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    Z = torch.randn(args.samples, 8, generator=torch.Generator().manual_seed(args.seed))
    if args.fit:
        fit(Z)
        return
    print(f"MSE per weight on {args.samples} unit Gaussian 8-vectors (ratio to each reference): best uniform "
          "scalar grid (same samples), optimal scalar quantizer (Lloyd-Max), rate-distortion bound 2^(-2 bits)")
    rows = []
    for name in CODEBOOKS:
        cb = get_codebook(name)
        e = mse(cb, Z)
        refs = {"uniform": uniform_mse(Z, cb.bits), "Lloyd-Max": LLOYD_MAX[cb.bits], "bound": 2.0 ** (-2 * cb.bits)}
        print(f"  {name:9s} {cb.bits} bits  MSE {e:.5f}   "
              + "   ".join(f"{k} {v:.5f} ({e / v:.3f}x)" for k, v in refs.items()), flush=True)
        rows.append({"measure": f"{name} MSE per weight", "bits": cb.bits, "value": f"{e:.5f}",
                     **{f"x_{k}": round(e / v, 3) for k, v in refs.items()}})
    fast, slow, same = throughput(args.search, args.brute, args.seed + 1)
    print(f"E8P nearest search ({args.threads} thread): {fast:,.0f} vectors/s, brute-force argmin over 2^16 "
          f"{slow:,.0f} vectors/s: {fast / slow:.0f}x faster; same codes on {same:.2%} of {args.brute} vectors")
    rows.append({"measure": "E8P nearest search, vectors/s", "bits": 2, "value": f"{fast:.0f}",
                 "x_brute_force": round(fast / slow, 1)})
    print("results:", write_rows("bench_e8p", rows))


if __name__ == "__main__":
    main()
