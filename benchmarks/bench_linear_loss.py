"""Fused LM head + token loss (losses.linear_token_loss) vs F.linear + F.cross_entropy: time and peak memory.

    .venv/bin/python benchmarks/bench_linear_loss.py                       # 8192 tokens, 768 hidden, 50272 vocab
    .venv/bin/python benchmarks/bench_linear_loss.py --vocab 128256 --dtype bfloat16 --check

Inputs: last hidden states (tokens x hidden) and the head weight (vocab x hidden), both leaves that
need gradients, drawn in --dtype; 10% of the targets are ignore_index -100. Each variant runs in its own
child process; peak memory is the memory above the inputs during forward + backward, the gradients of
the inputs included (benchmarks/peak.py). Time is the median of --repeats passes after a warm-up.
Targets: peak <= 0.05x and time <= 1.2x of F.linear + F.cross_entropy.
--check also reports each variant's largest relative error of the loss and of both gradients against a
float64 evaluation of the same inputs (slow: float64 matmuls).
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
from losses import get_loss, linear_token_loss
from peak import measure
from results import write_rows

# name -> (label, loss of (hidden, weight, target)); "unfused_ce" is the baseline
VARIANTS = {
    "unfused_ce": ("F.linear + F.cross_entropy",
                   lambda h, w, y, a: F.cross_entropy(F.linear(h, w), y, ignore_index=-100)),
    "unfused_rlo": ("F.linear + losses RLO",
                    lambda h, w, y, a: get_loss(a.loss, k=5, m=5)(F.linear(h, w), y)),
    "fused_ce": ("linear_token_loss ce", lambda h, w, y, a: linear_token_loss(h, w, y, "ce")),
    "fused_rlo": ("linear_token_loss RLO", lambda h, w, y, a: linear_token_loss(h, w, y, a.loss, k=5, m=5)),
    "fused_rlo_acc32": ("  same, fp32 weight-grad accum",
                        lambda h, w, y, a: linear_token_loss(h, w, y, a.loss, k=5, m=5, accum_dtype=torch.float32)),
}


def inputs(args, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(args.device, dtype)
    target = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    target[torch.rand(args.tokens, generator=g) < 0.1] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), target.to(args.device)


def relative_errors(args, hidden, weight, target):
    """Largest |x - ref| / max|ref| of the loss, d/dhidden and d/dweight against float64 (on the same
    rounded inputs; for the unfused RLO the float64 reference is the registry loss in float64)."""
    loss_fn = VARIANTS[args.worker][1]
    reference = "unfused_ce" if args.worker.endswith("_ce") else "unfused_rlo"
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    ref = VARIANTS[reference][1](h64, w64, target, args)
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    out = loss_fn(hidden, weight, target, args)
    grads = torch.autograd.grad(out, (hidden, weight))
    err = lambda x, r: ((x.double() - r).abs().max() / r.abs().max()).item()
    return {"loss": err(out, ref), "grad_hidden": err(grads[0], ref_grads[0]),
            "grad_weight": err(grads[1], ref_grads[1])}


def worker(args):
    device = torch.device(args.device)
    hidden, weight, target = inputs(args, getattr(torch, args.dtype))
    loss_fn = VARIANTS[args.worker][1]

    def step():
        loss_fn(hidden, weight, target, args).backward()
        hidden.grad = weight.grad = None

    result = measure(step, args.repeats, device)
    if args.check:
        result["errors"] = relative_errors(args, hidden, weight, target)
    print(json.dumps(result))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--loss", default="root", choices=["root", "root_convex"], help="the RLO form")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check", action="store_true", help="also errors against float64 (slow)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.tokens, args.hidden, args.repeats) < 1 or args.vocab < 2:
        raise UserError("--tokens, --hidden, --repeats >= 1 and --vocab >= 2 are required")
    if args.worker:
        return worker(args)

    names = [n for n in VARIANTS if args.dtype != "float32" or n != "fused_rlo_acc32"]
    print(f"{args.tokens} tokens x {args.hidden} hidden x {args.vocab} vocab, {args.dtype} on {args.device}, "
          f"fwd+bwd, median of {args.repeats}")
    results = {}
    for name in names:
        forwarded = ("tokens", "hidden", "vocab", "dtype", "loss", "repeats", "device")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name] + [
            f"--{key}={getattr(args, key)}" for key in forwarded]
        proc = subprocess.run(cmd + (["--check"] if args.check else []), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker {name} failed:\n{proc.stderr}")
        results[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results["unfused_ce"]
        errors = "  ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items())
        print(f"{VARIANTS[name][0]:32s} {r['seconds']:8.2f} s ({r['seconds'] / base['seconds']:.2f}x)  "
              f"{r['peak_mib']:8.1f} MiB peak ({r['peak_mib'] / max(base['peak_mib'], 1e-9):.3f}x)  {errors}")
    logits_mib = args.tokens * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(f"(the logits alone: {logits_mib:.0f} MiB; the weight gradient: "
          f"{args.vocab * args.hidden * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20:.0f} MiB)")
    base = results["unfused_ce"]
    rows = [{"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
             "device": args.device, "variant": VARIANTS[name][0], "seconds": round(r["seconds"], 4),
             "x_time": round(r["seconds"] / base["seconds"], 3), "peak_mib": round(r["peak_mib"], 1),
             "x_peak": round(r["peak_mib"] / max(base["peak_mib"], 1e-9), 4), "repeats": args.repeats,
             **{f"err_{k}": f"{v:.1e}" for k, v in r.get("errors", {}).items()}}
            for name, r in results.items()]
    print("results:", write_rows(f"bench_linear_loss_{args.dtype}_{args.vocab}", rows))
    return results


if __name__ == "__main__":
    cli(main)
