"""Images/s of train.py's training step against a plain fp32 eager loop, same model, same data.

    python benchmarks/bench_train.py                        # res18, 32x32, batch 64: fp32 and bf16 steps
    python benchmarks/bench_train.py --amp --no-channels-last --net vit_small --device cuda

The baseline is the loop of the authors' script: fp32, contiguous (NCHW) tensors, `zero_grad()`, and
`loss.item()` / `correct.item()` after every step (a host sync per step). Ours is `engine.loop.train_step`
with train.py's speed options (channels_last for convnets, torch.compile when --compile) and metrics
accumulated on the device, measured twice: in fp32 (train.py's CPU default) and with bf16 autocast
(`--amp`, train.py's CUDA default); --amp / --no-amp measures only one. All use AdamW and the root
loss on the same pre-generated batches already on the device (data loading is not measured). The loops
alternate in rounds so that load from other processes hits them alike; medians over rounds are compared.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from engine.loop import autocast_dtype, train_step  # noqa: E402
from losses import get_loss  # noqa: E402
from results import write_rows  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="res18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per round and loop")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="measure only bf16 autocast (--amp) or only fp32 (--no-amp); default: both")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as train.py (on for convnets)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    net = models.canonical_name(args.net)
    amps = [False, True] if args.amp is None else [args.amp]
    channels_last = models.MODELS[net].convnet if args.channels_last is None else args.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    criterion = get_loss("root", k=3, m=3)
    dtype = autocast_dtype(device)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.bs, 3, args.size, args.size, generator=g),
                torch.randint(10, (args.bs,), generator=g)) for _ in range(4)]
    plain_batches = [(x.to(device), y.to(device)) for x, y in batches]
    our_batches = [(x.to(device, memory_format=fmt), y.to(device)) for x, y in batches]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    plain_model = models.build_model(net, 10, args.size).to(device)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)

    def plain_loop(n):
        plain_model.train()
        total_loss = correct = 0.0
        for i in range(n):
            x, y = plain_batches[i % len(plain_batches)]
            out = plain_model(x)
            loss = criterion(out, y)
            plain_opt.zero_grad()
            loss.backward()
            plain_opt.step()
            total_loss += loss.item()
            correct += out.argmax(1).eq(y).sum().item()

    def our_loop_for(amp):
        torch.manual_seed(0)
        model = models.build_model(net, 10, args.size).to(device, memory_format=fmt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_model = torch.compile(model) if args.compile else model
        scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
        sums = torch.zeros(3, dtype=torch.float64, device=device)

        def autocast():
            return torch.autocast(device.type, dtype=dtype, enabled=amp)

        def loop(n):
            step_model.train()
            for i in range(n):
                x, y = our_batches[i % len(our_batches)]
                train_step(step_model, x, y, criterion, opt, scaler, autocast, sums)
            sums.tolist()  # the once-per-log-interval sync

        return loop

    loops = {"plain fp32 eager": plain_loop}
    for amp in amps:
        mode = str(dtype).removeprefix("torch.") + " autocast" if amp else "fp32"
        loops[f"train.py step, {mode}"] = our_loop_for(amp)

    def timed(loop):
        sync()
        t = time.perf_counter()
        loop(args.steps)
        sync()
        return args.steps * args.bs / (time.perf_counter() - t)

    for loop in loops.values():  # warm-up (and compilation)
        loop(2)
    speeds = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            speeds[name].append(timed(loop))
    print(f"{net} {args.size}px batch {args.bs} on {device.type} ({torch.get_num_threads()} threads), "
          f"channels_last={channels_last} compile={args.compile}")
    base = statistics.median(speeds["plain fp32 eager"])
    rows = []
    for name, values in speeds.items():
        med = statistics.median(values)
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:34s} {med:8.1f} img/s  ratio {med / base:.2f}x  (rounds: {rounds})")
        rows.append({"net": net, "size": args.size, "batch": args.bs, "device": device.type, "step": name,
                     "images_per_s": round(med, 1), "x_plain": round(med / base, 3), "rounds": args.rounds})
    print("results:", write_rows("bench_train", rows))


if __name__ == "__main__":
    main()
