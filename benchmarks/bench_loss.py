"""Forward+backward time of every multi-class loss against F.cross_entropy, in one run.

    python benchmarks/bench_loss.py [--n 4096] [--c 1000] [--repeats 30] [--device cpu|cuda]

Baselines: torch's F.cross_entropy, and the naive form of the authors' code (softmax, index, pow),
which is also the one that gives NaN gradients when p_y underflows. Prints median milliseconds and
the ratio to cross-entropy; on CUDA it also runs bf16 logits.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import get_loss  # noqa: E402
from results import write_rows  # noqa: E402


def naive_root(logits, target, k=3.0, m=3.0):
    """The authors' form: softmax, gather, pow (underflows for confident mistakes)."""
    p_y = F.softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    return (m * (1 - p_y.pow(1 / k))).mean()


def time_fwd_bwd(candidates, logits, target, repeats, device):
    """Median ms per candidate; candidates run round-robin so machine load drifts hit all alike."""
    def step(fn):
        x = logits.detach().requires_grad_()
        fn(x, target).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in candidates}
    names = list(candidates)
    for i in range(repeats + 3):
        # rotate the order each round: whoever runs first after a round pays the allocator's warm-up
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = candidates[name]
            t0 = time.perf_counter()
            step(fn)
            if i >= 3:  # warm-up rounds are not timed
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    candidates = {
        "ce (F.cross_entropy)": F.cross_entropy,
        "naive root (softmax-index-pow)": naive_root,
        **{name: get_loss(name, k=3, m=3) for name in ("ce", "focal", "root", "root_convex")},
    }
    print(f"forward+backward, logits ({args.n}, {args.c}), device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    rows = []
    for dtype in dtypes:
        logits = (torch.randn(args.n, args.c, device=args.device) * 3).to(dtype)
        target = torch.randint(0, args.c, (args.n,), device=args.device)
        results = time_fwd_bwd(candidates, logits, target, args.repeats, args.device)
        base = results["ce (F.cross_entropy)"]
        print(f"\n{str(dtype):16s} {'loss':32s} {'ms':>8s} {'x CE':>6s}")
        for name, ms in results.items():
            print(f"{'':16s} {name:32s} {ms:8.2f} {ms / base:6.2f}")
            rows.append({"logits": f"{args.n}x{args.c}", "dtype": str(dtype).removeprefix("torch."),
                         "device": args.device, "loss": name, "ms": round(ms, 3), "x_ce": round(ms / base, 3),
                         "repeats": args.repeats})
    print("results:", write_rows("bench_loss", rows))


if __name__ == "__main__":
    main()
