"""The AISTATS pipeline in one command (`make llm-demo`): does RLO lower the damage of low-bit
quantization and of finetuning in quantized space?

For each loss (CE, and RLO `root` with --k/--m) and seed:
  1. finetune the full-precision model with that loss            (ft_opt.py)
  2. post-training quantization with each --quant method at each --wbits (opt.py; e8p always
     rotates with its randomized Hadamard transform, --incoh on adds --incoh_processing)
  3. finetune the packed model in quantized space, same loss      (ft_opt.py --model PACKED_DIR)
and one table of perplexities (fp, finetuned, PTQ, QFT, and the ratios to the finetuned fp model),
mean ± 95% CI over the seeds, the paired RLO - CE differences, plus a PNG.

Learning rates: each loss gets the same --lr grid (fp finetuning) and --qft-lr grid (QFT, tuned at the
lowest --wbits per method and reused for the other widths), each value run on --tune-seed with the
same steps; the value with the lowest VALIDATION perplexity is used for every reported seed. The
validation text is --valid-file, or the last --valid-fraction of --train-file's lines, which then
neither finetune nor calibrate. The test text (--eval-file) is read only by the reported runs.

    python llm_pipeline.py --amp --jobs 2       # SmolLM2-135M + WikiText-2 from ../shared/data
    python llm_pipeline.py --model DIR --train-file train.txt --eval-file test.txt --seed 0 1 2 --jobs 2

Defaults: SmolLM2-135M-Instruct (a real pretrained 135M Llama, its GGUF file) from ../shared/data, with a
budget sized for CPUs: 40 fp finetuning steps and 20 steps in quantized space of 8 x 256 tokens, 2 bits,
64 calibration windows; WikiText-2 raw valid as training/calibration (and, its tail, validation) text and
test as evaluation text. Any model `lm.load_causal_lm` reads works, e.g. llama2.c's stories260K (the fast
model of the tests).
Every number is exp(mean token cross-entropy) on the first --eval-windows windows of its text.
"""
import contextlib
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

import ft_opt
import lm
import opt
import quant
from engine import (ArgumentParser, UserError, add_common_args, atomic_savefig, atomic_write_csv, atomic_write_json,
                    atomic_write_text, cli, format_ci, prepare_run_dir, require_positive_ints, run_args, set_threads)
from lm.shared import SMOLLM2, WIKI_TEST, WIKI_VALID
from quant.blockft import BLOCK_FT_LR

DEFAULT_MODEL, DEFAULT_TRAIN, DEFAULT_EVAL = SMOLLM2, WIKI_VALID, WIKI_TEST
# ptq_seconds: opt.py's quantization alone; *_wall: each sub-run's whole command (ft_wall: the fp finetuning this
# row starts from, shared by the rows of its seed and loss)
FIELDS = ["seed", "loss", "quant", "wbits", "incoh", "fp", "finetuned", "ptq", "qft", "ptq_vs_ft", "qft_vs_ft",
          "ptq_seconds", "qft_codes_unchanged", "lr", "qft_lr", "ft_wall", "ptq_wall", "qft_wall"]
# What a --resume must share with the run it continues (the seeds may grow; jobs and threads may change).
RUN_KEYS = ("model", "train_file", "valid_file", "valid_fraction", "eval_file", "losses", "k", "m", "quant", "wbits",
            "block_ft", "block_ft_lr", "amp", "incoh", "seqlen", "eval_seqlen", "eval_windows", "nsamples", "ft_steps",
            "qft_steps", "lr", "qft_lr", "tune_seed", "bs", "device")
SELECTION_FIELDS = ["stage", "loss", "quant", "wbits", "incoh", "lr", "valid_ppl", "chosen", "wall"]


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file, HF directory or hub name, llama2.c .bin "
                                                          "(default: SmolLM2-135M-Instruct from ../shared/data)")
    p.add_argument("--train-file", default=DEFAULT_TRAIN, help="finetuning and calibration text")
    p.add_argument("--valid-file", help="learning-rate selection text (default: the tail of --train-file, "
                                        "see --valid-fraction)")
    p.add_argument("--valid-fraction", type=float, default=0.1,
                   help="without --valid-file: this last fraction of --train-file's lines is the validation text "
                        "and is left out of finetuning and calibration")
    p.add_argument("--eval-file", default=DEFAULT_EVAL, help="test perplexity text (never used to choose)")
    p.add_argument("--losses", nargs="+", default=["ce", "root"], choices=ft_opt.TOKEN_LOSSES)
    p.add_argument("--k", type=float, default=5.0, help="RLO root order k (the AISTATS runs: 5)")
    p.add_argument("--m", type=float, default=5.0, help="RLO scale m (the AISTATS runs: 5)")
    p.add_argument("--quant", nargs="+", default=["ldlqRG", "e8p"], choices=quant.METHODS, help="PTQ methods")
    p.add_argument("--wbits", nargs="+", type=int, default=[2], choices=[2, 3, 4])
    p.add_argument("--block-ft", type=int, metavar="STEPS",
                   help="opt.py --block-ft for every PTQ: QuIP#'s finetuning during quantization (default: none)")
    p.add_argument("--block-ft-lr", type=float, default=BLOCK_FT_LR, help="opt.py --block-ft-lr (relative)")
    p.add_argument("--amp", "--bf16", action="store_true",
                   help="bf16 autocast in every training step (ft_opt.py --amp, opt.py --amp with --block-ft)")
    p.add_argument("--incoh", nargs="+", default=["on"], choices=["off", "on"],
                   help="opt.py --incoh_processing (the AISTATS command); e8p rotates either way")
    p.add_argument("--seqlen", type=int, default=256, help="training block length")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window and calibration length")
    p.add_argument("--eval-windows", type=int, default=16, help="perplexity on the first N windows (valid and test)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences of --eval-seqlen tokens")
    p.add_argument("--ft-steps", type=int, default=40, help="optimizer steps of the fp finetuning")
    p.add_argument("--qft-steps", type=int, default=20, help="optimizer steps in quantized space")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                   help="fp finetuning learning rate; several: the grid each loss chooses from on validation")
    p.add_argument("--qft-lr", type=float, nargs="+", default=[3e-5, 1e-4, 1e-3, 3e-3],
                   help="learning rate in quantized space; several: the grid each (loss, method) chooses from")
    p.add_argument("--tune-seed", type=int, default=1000,
                   help="seed of the selection runs (apart from --seed, so that the reported runs are not the "
                        "ones the values were chosen on)")
    p.add_argument("--bs", type=int, default=8, help="sequences per optimizer step (ft_opt.py --micro-bs, no accumulation)")
    p.add_argument("--jobs", type=int, default=1, help="independent runs in parallel processes (one thread each)")
    add_common_args(p, out="runs/llm_pipeline", resume=True, seeds=True, seed_help="one full pipeline per seed: fp "
                    "data order, calibration rows and rotation seeds", data_dir=False)
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("runs", "llm_pipeline")
    require_positive_ints(args, "seqlen", "eval_seqlen", "eval_windows", "nsamples", "ft_steps", "qft_steps", "bs",
                          "threads", "jobs", "block_ft")
    for flag, values in (("--lr", args.lr), ("--qft-lr", args.qft_lr), ("--block-ft-lr", [args.block_ft_lr])):
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise UserError(f"{flag} values must be finite numbers > 0, got {' '.join(map(str, values))}")
    if not 0 < args.valid_fraction < 1:
        raise UserError(f"--valid-fraction must lie strictly between 0 and 1, got {args.valid_fraction}")
    return args


def check_inputs(args):
    """Missing inputs, a validation text that is the test text, and an occupied run folder fail before
    any work (not in parse_args, which commands.txt's test runs on machines without ../shared/data)."""
    for flag, path, default in (("--model", args.model, DEFAULT_MODEL), ("--train-file", args.train_file, DEFAULT_TRAIN),
                                ("--valid-file", args.valid_file, None), ("--eval-file", args.eval_file, DEFAULT_EVAL)):
        if path is not None and not os.path.exists(path) and (path == default or flag != "--model"):
            where = " (the default comes from ../shared/data beside the repo)" if path == default else ""
            raise UserError(f"{flag} {path!r} does not exist{where}; pass {flag} with your own file")
    for flag, path in (("--eval-file", args.eval_file), ("--train-file", args.train_file)):
        if args.valid_file and same_text(args.valid_file, path):
            raise UserError(f"--valid-file {args.valid_file!r} is the {flag} text: learning rates must be chosen "
                            "on text held out from the training and the test text")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if os.path.isdir(args.out) and os.listdir(args.out) and not (args.overwrite or args.resume):
        raise UserError(f"--out {args.out!r} already holds a run; pass --resume to continue it (with more seeds, "
                        "say) or --overwrite to replace it, or choose another")


def same_text(a, b):
    """The same file, or two files with the same text (a copy of the test text is the test text)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.getsize(a) == os.path.getsize(b) and lm.read_text_file(a) == lm.read_text_file(b)


def split_texts(args, folder):
    """(training/calibration file, validation file): --valid-file as given, else --train-file cut at a
    line boundary into data/train.txt and data/valid.txt in the run folder (disjoint by construction)."""
    if args.valid_file:
        return args.train_file, args.valid_file
    lines = lm.read_text_file(args.train_file).splitlines(keepends=True)
    cut = round(len(lines) * (1 - args.valid_fraction))
    head, tail = "".join(lines[:cut]), "".join(lines[cut:])
    if not head.strip() or not tail.strip():
        raise UserError(f"--train-file {args.train_file!r} has {len(lines)} lines: too few to hold out "
                        f"--valid-fraction {args.valid_fraction} of them; pass --valid-file")
    os.makedirs(folder, exist_ok=True)
    paths = os.path.join(folder, "train.txt"), os.path.join(folder, "valid.txt")
    for path, text in zip(paths, (head, tail)):
        atomic_write_text(path, text)
    return paths


def finished(args, out, result_file, unfinished=None):
    """With --resume, whether the sub-run in `out` has ended: its `result_file` is there and `unfinished` (a file
    only a running one holds) is not. Nothing is removed: also asked of a later stage of a chain."""
    path = os.path.join(out, result_file)
    return args.resume and os.path.isfile(path) and not (unfinished and os.path.exists(os.path.join(out, unfinished)))


def resumed(args, out, result_file, unfinished=None, weights=False):
    """With --resume, the result (`result_file`'s JSON) of the finished sub-run in `out`; None when it is to be
    run, after removing what an interrupted one left there. `weights`: a later stage still reads the sub-run's
    model, so it counts as finished only with its weights (a clone of the repository holds the runs' results,
    not their models)."""
    if not (args.resume and os.path.isdir(out)):
        return None
    if finished(args, out, result_file, unfinished) and not (
            weights and not any(f.endswith(".safetensors") for f in os.listdir(out))):
        with open(os.path.join(out, result_file)) as f:
            return json.load(f)
    shutil.rmtree(out)
    return None


def finetune(args, model, loss, seed, steps, lr, train_file, eval_file, out, weights=False):
    """ft_opt.py: --seed sets the data order (and any new head's init), the same for every loss."""
    done = resumed(args, out, "metrics.json", unfinished="checkpoint.pt", weights=weights)  # ft_opt removes it at the end
    if done is not None:
        return done
    argv = ["--model", model, "--train-file", train_file, "--eval-file", eval_file, "--loss", loss,
            "--k", str(args.k), "--m", str(args.m), "--seqlen", str(args.seqlen), "--eval-seqlen", str(args.eval_seqlen),
            "--eval-windows", str(args.eval_windows), "--max-steps", str(steps), "--epochs", "1000", "--lr", str(lr),
            "--warmup-steps", str(steps // 10), "--micro-bs", str(args.bs), "--grad-accum", "1", "--seed", str(seed),
            "--device", args.device, "--threads", str(args.threads), "--out", out]
    return ft_opt.main(argv + (["--amp"] if args.amp else []))


def quantize(args, model, method, wbits, incoh, seed, train_file, eval_file, out, weights=False):
    """opt.py: --seed sets the calibration rows and every layer's rotation seed, the same for every loss."""
    done = resumed(args, out, opt.REPORT_FILE, weights=weights)  # written last
    if done is not None:
        return done
    argv = [model, "wikitext2", "--train-file", train_file, "--eval-file", eval_file, "--nsamples",
            str(args.nsamples), "--seqlen", str(args.eval_seqlen), "--eval-windows", str(args.eval_windows),
            "--wbits", str(wbits), "--quant", method, "--seed", str(seed), "--device", args.device, "--threads",
            str(args.threads), "--save", out]
    if args.block_ft:
        argv += ["--block-ft", str(args.block_ft), "--block-ft-lr", str(args.block_ft_lr)] + (["--amp"] if args.amp else [])
    return opt.main(argv + (["--incoh_processing"] if incoh == "on" else []))


def ptq_then_qft(args, ft_dir, loss, seed, method, wbits, incoh, qft_lr, train_file, eval_file, name):
    """PTQ of a finetuned model, then QFT with the same loss; (PTQ report, QFT metrics). Checks that
    the packed model QFT reloads has the perplexity measured at quantization time."""
    ptq_dir, qft_dir = os.path.join(args.out, f"ptq_{name}"), os.path.join(args.out, f"qft_{name}")
    ptq = quantize(args, ft_dir, method, wbits, incoh, seed, train_file, eval_file, ptq_dir,
                   weights=not finished(args, qft_dir, "metrics.json", unfinished="checkpoint.pt"))
    qft = finetune(args, ptq_dir, loss, seed, args.qft_steps, qft_lr, train_file, eval_file, qft_dir)
    if not math.isclose(qft["ppl_before"], ptq["ppl"]["eval_file"], rel_tol=1e-4):
        raise RuntimeError(f"{name}: the reloaded packed model's perplexity {qft['ppl_before']} "
                           f"differs from the PTQ one {ptq['ppl']['eval_file']}")
    return ptq, qft


def _init_worker(threads):
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def runner(jobs, threads):
    """run(fn, calls) -> an iterator over fn(*call) for each call, in order: lazily in this process
    (jobs 1), or all submitted at once to `jobs` spawned processes (no fork of a process that already
    holds torch's threads)."""
    if jobs == 1:
        yield lambda fn, calls: (fn(*call) for call in calls)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        def run(fn, calls):
            futures = [pool.submit(fn, *call) for call in calls]
            return (f.result() for f in futures)
        yield run


def choose(candidates):
    """The grid value with the lowest validation perplexity (the first of equals); a diverged run's
    NaN or inf never wins (a NaN would compare as smallest once it is the running minimum)."""
    return min(candidates, key=lambda c: c[1] if math.isfinite(c[1]) else math.inf)[0]


def select_lrs(args, train_file, valid_file, run):
    """Learning rates chosen on the validation text, each loss over the same grids with the same steps,
    on --tune-seed: ({loss: lr}, {(loss, method, incoh): qft_lr}, selection rows). A grid of one value
    is used as it is, without runs."""
    tune, rows = os.path.join(args.out, "tune"), []
    lrs, qft_lrs = {}, {}
    wbits = min(args.wbits)
    combos = [(loss, method, incoh) for loss in args.losses for method in args.quant for incoh in args.incoh]
    # named by the fp learning rate they start from: a grown --lr grid (resumed) may choose another
    ptq_dir = lambda c, lr: os.path.join(tune, f"ptq_{c[0]}_lr{lr:g}_{c[1]}_w{wbits}_incoh{c[2]}")
    qft_dir = lambda c, lr, qlr: os.path.join(tune, f"qft_{c[0]}_lr{lr:g}_{c[1]}_w{wbits}_incoh{c[2]}_lr{qlr:g}")
    # a tuning model's weights are needed while a stage after it is still to run
    ft_weights = {(loss, lr): len(args.qft_lr) > 1 and not all(finished(args, ptq_dir(c, lr), opt.REPORT_FILE)
                                                               for c in combos if c[0] == loss)
                  for loss in args.losses for lr in args.lr}
    fp_runs = [(loss, lr) for loss in args.losses for lr in args.lr] if len(args.lr) > 1 else []
    results = list(run(finetune, [(args, args.model, loss, args.tune_seed, args.ft_steps, lr, train_file, valid_file,
                              os.path.join(tune, f"ft_{loss}_lr{lr:g}"), ft_weights[loss, lr]) for loss, lr in fp_runs]))
    for loss in args.losses:
        got = [(lr, m) for (l, lr), m in zip(fp_runs, results) if l == loss]
        lrs[loss] = choose([(lr, m["ppl_after"]) for lr, m in got]) if got else args.lr[0]
        rows += [dict(stage="ft", loss=loss, quant="", wbits="", incoh="", lr=lr, valid_ppl=m["ppl_after"],
                      chosen=lr == lrs[loss], wall=m.get("seconds", "")) for lr, m in got]
    if len(args.qft_lr) == 1:
        return lrs, {(l, q, i): args.qft_lr[0] for l in args.losses for q in args.quant for i in args.incoh}, rows
    if not fp_runs:  # else the tuning seed's fp model at the chosen lr already exists
        got = run(finetune, [(args, args.model, loss, args.tune_seed, args.ft_steps, lrs[loss], train_file, valid_file,
                              os.path.join(tune, f"ft_{loss}_lr{lrs[loss]:g}"), ft_weights[loss, lrs[loss]])
                             for loss in args.losses])
        rows += [dict(stage="ft", loss=loss, quant="", wbits="", incoh="", lr=lrs[loss], valid_ppl=m["ppl_after"],
                      chosen=True, wall=m.get("seconds", "")) for loss, m in zip(args.losses, got)]
    ft_dir = {loss: os.path.join(tune, f"ft_{loss}_lr{lrs[loss]:g}") for loss in args.losses}
    ptqs = run(quantize, [(args, ft_dir[c[0]], c[1], wbits, c[2], args.tune_seed, train_file, valid_file,
                           ptq_dir(c, lrs[c[0]]), not all(finished(args, qft_dir(c, lrs[c[0]], qlr), "metrics.json",
                                                                   "checkpoint.pt") for qlr in args.qft_lr))
                          for c in combos])
    rows += [dict(stage="ptq", loss=c[0], quant=c[1], wbits=wbits, incoh=c[2], lr="", valid_ppl=r["ppl"]["eval_file"],
                  chosen="", wall=r.get("seconds", "")) for c, r in zip(combos, ptqs)]
    qft_runs = [(c, lr) for c in combos for lr in args.qft_lr]
    results = list(run(finetune, [(args, ptq_dir(c, lrs[c[0]]), c[0], args.tune_seed, args.qft_steps, qlr, train_file,
                                   valid_file, qft_dir(c, lrs[c[0]], qlr)) for c, qlr in qft_runs]))
    for combo in combos:
        got = [(lr, m) for (c, lr), m in zip(qft_runs, results) if c == combo]
        qft_lrs[combo] = choose([(lr, m["ppl_after"]) for lr, m in got])
        rows += [dict(stage="qft", loss=combo[0], quant=combo[1], wbits=wbits, incoh=combo[2], lr=lr,
                      valid_ppl=m["ppl_after"], chosen=lr == qft_lrs[combo], wall=m.get("seconds", "")) for lr, m in got]
    return lrs, qft_lrs, rows


def summarize(rows):
    """Markdown: one line per (loss, quant, wbits, incoh), mean ± 95% CI over seeds, with the chosen
    learning rates; then the paired differences RLO - CE per (quant, wbits, incoh) over the seeds both ran."""
    keys = sorted({(r["loss"], r["quant"], r["wbits"], r["incoh"]) for r in rows},
                  key=lambda k: (k[2], k[1], k[3], k[0]))
    lines = ["| loss | method | bits | incoh | seeds | lr | QFT lr | fp | finetuned | PTQ | QFT | PTQ / ft | QFT / ft |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        group = [r for r in rows if (r["loss"], r["quant"], r["wbits"], r["incoh"]) == key]
        cells = [format_ci([r[f] for r in group]) for f in ("fp", "finetuned", "ptq", "qft", "ptq_vs_ft", "qft_vs_ft")]
        lrs = " ".join(sorted({f"{r['lr']:g}" for r in group})), " ".join(sorted({f"{r['qft_lr']:g}" for r in group}))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(group)} | {lrs[0]} | {lrs[1]} | "
                     + " | ".join(cells) + " |")
    losses = sorted({r["loss"] for r in rows})
    if "ce" in losses and len(losses) > 1:
        lines += ["", "Paired differences (other loss - CE, same seed: same data order, calibration rows and "
                      "rotations), mean ± 95% t-interval over the seeds:", "",
                  "| loss | method | bits | incoh | pairs | finetuned | PTQ / ft | QFT / ft |", "|---|---|---|---|---|---|---|---|"]
        by = {(r["seed"], r["loss"], r["quant"], r["wbits"], r["incoh"]): r for r in rows}
        for loss, quant_, wbits, incoh in (k for k in keys if k[0] != "ce"):
            pairs = [(by[(s, "ce", quant_, wbits, incoh)], r) for (s, l, q, w, i), r in by.items()
                     if (l, q, w, i) == (loss, quant_, wbits, incoh) and (s, "ce", q, w, i) in by]
            if pairs:
                cells = [format_ci([b[f] - a[f] for a, b in pairs]) for f in ("finetuned", "ptq_vs_ft", "qft_vs_ft")]
                lines.append(f"| {loss} | {quant_} | {wbits} | {incoh} | {len(pairs)} | " + " | ".join(cells) + " |")
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


def report_seed(args, seed, chains, results, fts, lrs, qft_lrs, rows, n_chains, start):
    """Append one seed's rows as its chains end, writing results.csv after each (progress of a long run)."""
    for (loss, method, wbits, incoh), (ptq, qft) in zip(chains, results):
        ft, ppl = fts[loss], ptq["ppl"]["eval_file"]
        rows.append(dict(seed=seed, loss=loss, quant=method, wbits=wbits, incoh=incoh, fp=ft["ppl_before"],
                         finetuned=ft["ppl_after"], ptq=ppl, qft=qft["ppl_after"], ptq_vs_ft=ppl / ft["ppl_after"],
                         qft_vs_ft=qft["ppl_after"] / ft["ppl_after"], ptq_seconds=ptq["quant_seconds"],
                         qft_codes_unchanged=qft["codes_unchanged"], lr=lrs[loss], qft_lr=qft_lrs[(loss, method, incoh)],
                         ft_wall=ft.get("seconds", ""), ptq_wall=ptq.get("seconds", ""), qft_wall=qft.get("seconds", "")))
        atomic_write_csv(os.path.join(args.out, "results.csv"), FIELDS, rows)
        print(f"[{len(rows)}/{n_chains}] {loss} seed {seed} {method} {wbits} bits incoh {incoh}: PTQ {ppl:.4g}, "
              f"QFT {qft['ppl_after']:.4g} ({(time.time() - start) / 60:.1f} min)", flush=True)


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    set_threads(args)
    if os.path.isdir(args.out) and args.overwrite:
        shutil.rmtree(args.out)  # with the sub-runs' folders
    prepare_run_dir(args, run_keys=RUN_KEYS)
    if args.resume:  # the finished sub-runs are reused; the record names this invocation's seeds
        atomic_write_json(os.path.join(args.out, "args.json"), run_args(args))
    train_file, valid_file = split_texts(args, os.path.join(args.out, "data"))
    rows, start = [], time.time()
    with runner(args.jobs, args.threads) as run:
        lrs, qft_lrs, selection = select_lrs(args, train_file, valid_file, run)
        print(f"selection: {len(selection)} grid values on --tune-seed {args.tune_seed}, "
              f"{(time.time() - start) / 60:.1f} min", flush=True)
        atomic_write_csv(os.path.join(args.out, "selection.csv"), SELECTION_FIELDS, selection)
        print("chosen on validation: lr " + ", ".join(f"{l} {v:g}" for l, v in lrs.items()) + "; QFT lr "
              + ", ".join(f"{l} {q} incoh {i} {v:g}" for (l, q, i), v in qft_lrs.items()), flush=True)
        # The reported runs, the only ones that read the test text, seed after seed: a long run's rows are
        # written as each seed ends, so it can be stopped and resumed between seeds at no loss.
        n_chains = len(args.seeds) * len(args.losses) * len(args.quant) * len(args.wbits) * len(args.incoh)
        for seed in args.seeds:
            chains = [(loss, method, wbits, incoh) for loss in args.losses for method in args.quant
                      for wbits in args.wbits for incoh in args.incoh]
            names = [f"{loss}_s{seed}_{method}_w{wbits}_incoh{incoh}" for loss, method, wbits, incoh in chains]
            weights = {loss: not all(finished(args, os.path.join(args.out, f"qft_{n}"), "metrics.json", "checkpoint.pt")
                                     for c, n in zip(chains, names) if c[0] == loss) for loss in args.losses}
            fts = dict(zip(args.losses, run(finetune, [(args, args.model, loss, seed, args.ft_steps, lrs[loss], train_file,
                                                        args.eval_file, os.path.join(args.out, f"ft_{loss}_s{seed}"),
                                                        weights[loss]) for loss in args.losses])))
            calls = [(args, os.path.join(args.out, f"ft_{loss}_s{seed}"), loss, seed, method, wbits, incoh,
                      qft_lrs[(loss, method, incoh)], train_file, args.eval_file, n)
                     for (loss, method, wbits, incoh), n in zip(chains, names)]
            report_seed(args, seed, chains, run(ptq_then_qft, calls), fts, lrs, qft_lrs, rows, n_chains, start)
    atomic_write_csv(os.path.join(args.out, "results.csv"), FIELDS, rows)
    table = summarize(rows)
    atomic_write_text(os.path.join(args.out, "table.md"), table)
    plot(rows, os.path.join(args.out, "pipeline.png"))
    print("\n" + table)
    print(f"results: {os.path.join(args.out, 'results.csv')}, selection.csv, table.md, pipeline.png in {args.out} "
          f"({(time.time() - start) / 60:.1f} min in {args.jobs} process(es))")
    return rows


if __name__ == "__main__":
    cli(main)
