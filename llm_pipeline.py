"""The AISTATS pipeline in one command (`make llm-demo`): does RLO lower the damage of low-bit
quantization and of finetuning in quantized space?

For each loss (CE, and RLO `root` with --k/--m) and seed:
  1. finetune the full-precision model with that loss            (ft_opt.py)
  2. post-training quantization at each --wbits, with and without incoherence processing (opt.py)
  3. finetune the packed model in quantized space, same loss      (ft_opt.py --model PACKED_DIR)
and one table of perplexities (fp, finetuned, PTQ, QFT, and the ratios to the finetuned fp model),
mean ± 95% CI over the seeds, plus a PNG.

    python llm_pipeline.py                      # stories260K + WikiText-2 from ../shared/data
    python llm_pipeline.py --model DIR --train-file train.txt --eval-file test.txt --seed 0 1 2

Defaults: stories260K (llama2.c, a real pretrained Llama) from ../shared/data when present;
WikiText-2 raw valid as training/calibration text and test as evaluation text.
Every number is exp(mean token cross-entropy) on the same evaluation windows.
"""
import math
import os
import shutil


import ft_opt
import opt
import quant
from engine import (ArgumentParser, UserError, add_common_args, atomic_savefig, atomic_write_csv, atomic_write_text,
                    cli, format_ci, prepare_run_dir, require_positive_ints, set_threads)

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
DEFAULT_MODEL = os.path.join(SHARED, "models", "stories260K", "stories260K.bin")
DEFAULT_TRAIN = os.path.join(SHARED, "text", "wikitext-2-raw", "wiki.valid.raw")
DEFAULT_EVAL = os.path.join(SHARED, "text", "wikitext-2-raw", "wiki.test.raw")
FIELDS = ["seed", "loss", "quant", "wbits", "incoh", "fp", "finetuned", "ptq", "qft", "ptq_vs_ft", "qft_vs_ft",
          "ptq_seconds", "qft_codes_unchanged"]


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c .bin, HF directory or hub name")
    p.add_argument("--train-file", default=DEFAULT_TRAIN, help="finetuning and calibration text")
    p.add_argument("--eval-file", default=DEFAULT_EVAL, help="perplexity text")
    p.add_argument("--losses", nargs="+", default=["ce", "root"], choices=ft_opt.TOKEN_LOSSES)
    p.add_argument("--k", type=float, default=5.0, help="RLO root order k")
    p.add_argument("--m", type=float, default=5.0, help="RLO scale m")
    p.add_argument("--quant", nargs="+", default=["ldlqRG"], choices=quant.METHODS, help="PTQ methods")
    p.add_argument("--wbits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    p.add_argument("--incoh", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="incoherence processing (opt.py --incoh_processing)")
    p.add_argument("--seqlen", type=int, default=256, help="training block length")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window and calibration length")
    p.add_argument("--eval-windows", type=int, default=48, help="perplexity on the first N windows")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences of --eval-seqlen tokens")
    p.add_argument("--ft-steps", type=int, default=250, help="optimizer steps of the fp finetuning")
    p.add_argument("--qft-steps", type=int, default=100, help="optimizer steps in quantized space")
    p.add_argument("--lr", type=float, default=1e-3, help="fp finetuning learning rate")
    p.add_argument("--qft-lr", type=float, default=1e-3, help="learning rate in quantized space")
    p.add_argument("--bs", type=int, default=8, help="sequences per optimizer step (ft_opt.py --micro-bs, no accumulation)")
    add_common_args(p, out="runs/llm_pipeline", seeds=True, seed_help="one full pipeline per seed", data_dir=False)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", "llm_pipeline")
    require_positive_ints(args, "seqlen", "eval_seqlen", "eval_windows", "nsamples", "ft_steps", "qft_steps", "bs",
                          "threads")
    return args


def check_inputs(args):
    """Missing inputs and an occupied run folder fail before any work (not in parse_args, which
    commands.txt's test runs on machines without ../shared/data)."""
    for flag, path, default in (("--model", args.model, DEFAULT_MODEL), ("--train-file", args.train_file, DEFAULT_TRAIN),
                                ("--eval-file", args.eval_file, DEFAULT_EVAL)):
        if not os.path.exists(path) and (path == default or flag != "--model"):
            where = " (the default comes from ../shared/data beside the repo)" if path == default else ""
            raise UserError(f"{flag} {path!r} does not exist{where}; pass {flag} with your own file")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out!r} already holds a run; pass --overwrite to replace it or choose another")


def finetune(args, model, loss, seed, steps, lr, out):
    argv = ["--model", model, "--train-file", args.train_file, "--eval-file", args.eval_file, "--loss", loss,
            "--k", str(args.k), "--m", str(args.m), "--seqlen", str(args.seqlen), "--eval-seqlen", str(args.eval_seqlen),
            "--eval-windows", str(args.eval_windows), "--max-steps", str(steps), "--epochs", "1000", "--lr", str(lr),
            "--warmup-steps", str(steps // 10), "--micro-bs", str(args.bs), "--grad-accum", "1", "--seed", str(seed),
            "--device", args.device, "--threads", str(args.threads), "--out", out]
    return ft_opt.main(argv)


def quantize(args, model, method, wbits, incoh, seed, out):
    argv = [model, "wikitext2", "--train-file", args.train_file, "--eval-file", args.eval_file, "--nsamples",
            str(args.nsamples), "--seqlen", str(args.eval_seqlen), "--eval-windows", str(args.eval_windows),
            "--wbits", str(wbits), "--quant", method, "--seed", str(seed), "--device", args.device, "--threads",
            str(args.threads), "--save", out]
    return opt.main(argv + (["--incoh_processing"] if incoh == "on" else []))


def summarize(rows):
    """Markdown table: one line per (loss, quant, wbits, incoh), mean ± 95% CI over seeds."""
    keys = sorted({(r["loss"], r["quant"], r["wbits"], r["incoh"]) for r in rows},
                  key=lambda k: (k[2], k[1], k[3], k[0]))
    lines = ["| loss | method | bits | incoh | seeds | fp | finetuned | PTQ | QFT | PTQ / ft | QFT / ft |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        group = [r for r in rows if (r["loss"], r["quant"], r["wbits"], r["incoh"]) == key]
        cells = [format_ci([r[f] for r in group]) for f in ("fp", "finetuned", "ptq", "qft", "ptq_vs_ft", "qft_vs_ft")]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib.pyplot as plt
    import numpy as np

    combos = sorted({(r["quant"], r["incoh"]) for r in rows})
    losses = sorted({r["loss"] for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 4), squeeze=False)
    for ax, (method, incoh) in zip(axes[0], combos):
        for i, loss in enumerate(losses):
            sel = [r for r in rows if r["loss"] == loss and (r["quant"], r["incoh"]) == (method, incoh)]
            bits = sorted({r["wbits"] for r in sel})
            for stage, style in (("ptq", "--"), ("qft", "-")):
                means = [np.mean([r[stage] for r in sel if r["wbits"] == b]) for b in bits]
                ax.plot(bits, means, style, marker="o", color=f"C{i}", label=f"{loss} {stage.upper()}")
            ax.axhline(np.mean([r["finetuned"] for r in sel]), color=f"C{i}", lw=0.8, ls=":",
                       label=f"{loss} fp finetuned")
        ax.set(xlabel="bits per weight", ylabel="perplexity (log scale)", yscale="log",
               title=f"{method}, incoherence {incoh}", xticks=sorted({r["wbits"] for r in rows}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    set_threads(args)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)  # --overwrite (checked in check_inputs), with the sub-runs' folders
    prepare_run_dir(args)
    rows = []
    for seed in args.seeds:
        for loss in args.losses:
            tag = f"{loss}_s{seed}"
            ft_dir = os.path.join(args.out, f"ft_{tag}")
            ft = finetune(args, args.model, loss, seed, args.ft_steps, args.lr, ft_dir)
            for method in args.quant:
                for wbits in args.wbits:
                    for incoh in args.incoh:
                        name = f"{tag}_{method}_w{wbits}_incoh{incoh}"
                        ptq_dir = os.path.join(args.out, f"ptq_{name}")
                        ptq = quantize(args, ft_dir, method, wbits, incoh, seed, ptq_dir)
                        qft = finetune(args, ptq_dir, loss, seed, args.qft_steps, args.qft_lr,
                                       os.path.join(args.out, f"qft_{name}"))
                        ppl = ptq["ppl"]["eval_file"]
                        rows.append(dict(seed=seed, loss=loss, quant=method, wbits=wbits, incoh=incoh,
                                         fp=ft["ppl_before"], finetuned=ft["ppl_after"], ptq=ppl, qft=qft["ppl_after"],
                                         ptq_vs_ft=ppl / ft["ppl_after"], qft_vs_ft=qft["ppl_after"] / ft["ppl_after"],
                                         ptq_seconds=ptq["quant_seconds"], qft_codes_unchanged=qft["codes_unchanged"]))
                        if not math.isclose(qft["ppl_before"], ppl, rel_tol=1e-4):
                            raise RuntimeError(f"{name}: the reloaded packed model's perplexity {qft['ppl_before']} "
                                               f"differs from the PTQ one {ppl}")
                        atomic_write_csv(os.path.join(args.out, "results.csv"), FIELDS, rows)
    table = summarize(rows)
    atomic_write_text(os.path.join(args.out, "table.md"), table)
    plot(rows, os.path.join(args.out, "pipeline.png"))
    print("\n" + table)
    print(f"results: {os.path.join(args.out, 'results.csv')}, table.md, pipeline.png in {args.out}")
    return rows


if __name__ == "__main__":
    cli(main)
