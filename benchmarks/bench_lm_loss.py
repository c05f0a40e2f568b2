"""Token-level RLO vs F.cross_entropy: forward + backward time and peak memory on LM-head logits.

    .venv/bin/python benchmarks/bench_lm_loss.py                    # 8192 tokens x 50272 (OPT vocab)
    .venv/bin/python benchmarks/bench_lm_loss.py --tokens 2048 --dtype bfloat16

Each loss runs in its own child process on the same (tokens x vocab) leaf logits (10% of the targets
set to ignore_index -100, like padding), so one measurement's allocator state cannot leak into the
other. The logits are drawn directly in their dtype, and the peak counters are reset once the inputs
exist, so building the inputs cannot set the peak. Peak memory is the memory above the inputs during
forward + backward (benchmarks/peak.py says how). Time is the median of --repeats passes after one warm-up pass. Goal: both ratios <= 1.2.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from engine import UserError, cli
from losses import get_loss
from peak import measure
from results import write_rows


def worker(args):
    """One loss in this process; prints a JSON line {seconds, peak_mib}."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    # Drawn in its own dtype: an fp32 temporary here would be larger than the bf16 logits and set the peak.
    logits = torch.randn(args.tokens, args.vocab, device=device, dtype=getattr(torch, args.dtype)).requires_grad_()
    target = torch.randint(0, args.vocab, (args.tokens,), device=device)
    target[torch.rand(args.tokens, device=device) < 0.1] = -100
    if args.worker == "ce":
        loss_fn = lambda: F.cross_entropy(logits, target, ignore_index=-100)
    else:
        criterion = get_loss(args.worker, k=5, m=5, ignore_index=-100)
        loss_fn = lambda: criterion(logits, target)

    def step():
        loss_fn().backward()
        logits.grad = None

    print(json.dumps(measure(step, args.repeats, device)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--loss", default="root", help="the RLO form to compare: root or root_convex")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens < 1 or args.vocab < 2 or args.repeats < 1:
        raise UserError("--tokens >= 1, --vocab >= 2 and --repeats >= 1 are required")
    if args.loss not in ("root", "root_convex"):
        raise UserError(f"unknown RLO form {args.loss!r}; choose root or root_convex")
    if args.worker:
        return worker(args)

    print(f"{args.tokens} tokens x {args.vocab} vocab, {args.dtype} logits on {args.device}, "
          f"fwd+bwd, median of {args.repeats}")
    results = {}
    for name in ("ce", args.loss):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats),
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker {name} failed:\n{proc.stderr}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        label = "F.cross_entropy" if name == "ce" else f"token RLO ({name}, k=m=5)"
        print(f"{label:28s} {results[name]['seconds'] * 1e3:9.1f} ms  {results[name]['peak_mib']:9.1f} MiB peak")
    ce, rlo = results["ce"], results[args.loss]
    print(f"ratio RLO / CE: time {rlo['seconds'] / ce['seconds']:.2f}x, "
          f"peak memory {rlo['peak_mib'] / max(ce['peak_mib'], 1e-9):.2f}x "
          f"(logits themselves: {args.tokens * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20:.0f} MiB)")
    rows = [{"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype, "device": args.device, "loss": name,
             "seconds": round(r["seconds"], 4), "peak_mib": round(r["peak_mib"], 1),
             "x_ce_time": round(r["seconds"] / ce["seconds"], 3),
             "x_ce_peak": round(r["peak_mib"] / max(ce["peak_mib"], 1e-9), 3), "repeats": args.repeats}
            for name, r in results.items()]
    print("results:", write_rows(f"bench_lm_loss_{args.dtype}_{args.vocab}", rows))
    return results


if __name__ == "__main__":
    cli(main)
