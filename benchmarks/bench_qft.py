"""Finetuning in quantized space (QFT) at real size, read against the fp model trained the same way: a packed
model (`opt.py --save`) and the fp model it was quantized from each train with ft_opt.py on the same text,
loss, steps, batch and learning-rate grid, so the QFT gain is not mistaken for what the training text alone
gives (a pretrained model finetuned on WikiText gains on WikiText too).

    python benchmarks/bench_qft.py --packed runs/smol_qtip1mad2       # SmolLM2-135M, WikiText-2
    python benchmarks/bench_qft.py --packed runs/smol_qtip1mad2 --resume   # finish an interrupted run

Text: --train-file (default WikiText-2 raw valid, the text the packed model was calibrated on) is cut at a
line boundary into training lines and a validation tail (--valid-fraction), as llm_pipeline.py cuts it.
Every value of --lr (fp) and of --qft-lr (packed) trains on the lines; the one with the lowest validation
perplexity is kept, and only the kept models, the fp model and the packed model as saved are scored on
--eval-file (WikiText-2 raw test: --eval-windows windows of --eval-seqlen tokens, the protocol of
bench_quant_model.py). Rows go to benchmarks/results/bench_qft.csv: test perplexity, its ratio to the fp
model and to the trained fp model, validation perplexity, learning rate, seconds. Each training run lives in
its own folder under --out; with --resume a finished one is read back instead of run again."""
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import llm_pipeline  # noqa: E402
import lm  # noqa: E402
from engine import ArgumentParser, UserError, add_common_args, cli, prepare_run_dir, set_threads  # noqa: E402
from ft_opt import TOKEN_LOSSES  # noqa: E402
from lm.checkpoint import is_quantized_dir  # noqa: E402
from lm.shared import SMOLLM2, WIKI_TEST, WIKI_VALID  # noqa: E402
from results import write_rows  # noqa: E402

CASE = ("model", "packed", "loss", "stage")  # a run replaces the rows of its own cases only
RUN_KEYS = ("packed", "model", "train_file", "valid_fraction", "loss", "k", "m", "steps", "bs", "seqlen", "lr", "qft_lr",
            "eval_seqlen", "valid_windows", "amp", "seed")  # what a resumed run must share with its start


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packed", required=True, help="packed directory written by opt.py --save from --model")
    p.add_argument("--model", default=SMOLLM2, help="the fp model the packed one was quantized from")
    p.add_argument("--train-file", default=WIKI_VALID)
    p.add_argument("--eval-file", default=WIKI_TEST)
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--loss", default="ce", choices=TOKEN_LOSSES)
    p.add_argument("--k", type=float, default=5.0, help="RLO root order k (--loss root)")
    p.add_argument("--m", type=float, default=5.0, help="RLO scale m (--loss root)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of every training run")
    p.add_argument("--bs", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--seqlen", type=int, default=256, help="training sequence length")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4], help="fp learning-rate grid")
    p.add_argument("--qft-lr", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4], help="QFT learning-rate grid")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40, help="test windows of --eval-seqlen tokens")
    p.add_argument("--valid-windows", type=int, default=16, help="validation windows that choose the learning rates")
    p.add_argument("--amp", action="store_true", help="bf16 autocast in the training steps (ft_opt.py --amp)")
    add_common_args(p, out="runs/bench_qft", resume=True, seed_help="data order of every training run", device="cpu",
                    data_dir=False, threads=1)
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if not 0 < args.valid_fraction < 1:
        raise UserError(f"--valid-fraction must lie strictly between 0 and 1, got {args.valid_fraction}")
    for path in (args.packed, args.train_file, args.eval_file):
        if not os.path.exists(path):
            raise UserError(f"{path}: not found")
    if not is_quantized_dir(args.packed):
        raise UserError(f"--packed {args.packed}: not a packed directory written by opt.py --save")
    if os.path.isdir(args.out) and os.listdir(args.out) and not (args.overwrite or args.resume):
        raise UserError(f"--out {args.out} already holds a run; pass --resume to continue it or --overwrite to "
                        "replace it, or choose another")
    return args


def perplexity_on(model_path, test_ids, args):
    model, _ = lm.load_causal_lm(model_path, device=args.device)
    return lm.perplexity(model, test_ids, args.eval_seqlen, device=args.device, max_windows=args.eval_windows)


def train_grid(args, model, grid, name, train_file, valid_file):
    """Each learning rate of `grid` trained on `train_file` and scored on `valid_file`: (the chosen run's
    folder, its learning rate, {lr: metrics})."""
    # llm_pipeline.finetune builds ft_opt.py's argv from these fields
    run_args = SimpleNamespace(**{**vars(args), "eval_windows": args.valid_windows})
    runs = {}
    for lr in grid:
        out = os.path.join(args.out, f"{name}_lr{lr:g}")
        runs[lr] = llm_pipeline.finetune(run_args, model, args.loss, args.seed, args.steps, lr, train_file,
                                         valid_file, out, weights=True)
        print(f"{name} lr {lr:g}: validation perplexity {runs[lr]['ppl_before']:.4g} -> {runs[lr]['ppl_after']:.4g} "
              f"({runs[lr].get('seconds', 0):.0f} s)", flush=True)
    lr = llm_pipeline.choose([(lr, m["ppl_after"]) for lr, m in runs.items()])
    return os.path.join(args.out, f"{name}_lr{lr:g}"), lr, runs


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args)
    if os.path.isdir(args.out) and args.overwrite:
        shutil.rmtree(args.out)  # with the training runs' folders
    prepare_run_dir(args, run_keys=RUN_KEYS)
    train_file, valid_file = llm_pipeline.split_texts(
        SimpleNamespace(valid_file=None, train_file=args.train_file, valid_fraction=args.valid_fraction),
        os.path.join(args.out, "data"))
    _, tokenizer = lm.load_causal_lm(args.model)
    test_ids = lm.encode(tokenizer, lm.read_text_file(args.eval_file))
    fp_dir, fp_lr, fp_runs = train_grid(args, args.model, args.lr, "fp", train_file, valid_file)
    qft_dir, qft_lr, qft_runs = train_grid(args, args.packed, args.qft_lr, "qft", train_file, valid_file)
    # (stage, model, learning rate, training run, validation perplexity)
    stages = [("fp", args.model, None, None, fp_runs[fp_lr]["ppl_before"]),
              ("fp trained", fp_dir, fp_lr, fp_runs[fp_lr], fp_runs[fp_lr]["ppl_after"]),
              ("packed", args.packed, None, None, qft_runs[qft_lr]["ppl_before"]),
              ("packed + QFT", qft_dir, qft_lr, qft_runs[qft_lr], qft_runs[qft_lr]["ppl_after"])]
    with open(os.path.join(args.packed, "config.json")) as f:
        packing = json.load(f)["quantization_config"]
    ppl = {}
    for stage, path, *_ in stages:
        tick = time.perf_counter()
        ppl[stage] = perplexity_on(path, test_ids, args)
        print(f"{stage}: test perplexity {ppl[stage]:.4g} ({time.perf_counter() - tick:.0f} s)", flush=True)
    rows = [dict(model=os.path.basename(args.model), packed=os.path.basename(os.path.normpath(args.packed)),
                 method=packing["method"], wbits=packing["wbits"], loss=args.loss, stage=stage,
                 steps=args.steps if run else 0, lr="" if lr is None else f"{lr:g}", tokens_per_step=args.bs * args.seqlen,
                 valid_ppl=f"{valid:.4g}", ppl=f"{ppl[stage]:.4g}", ppl_vs_fp=round(ppl[stage] / ppl["fp"], 3),
                 ppl_vs_fp_trained=round(ppl[stage] / ppl["fp trained"], 3),
                 seconds=round(run["seconds"], 1) if run else "", amp="on" if args.amp else "off")
            for stage, path, lr, run, valid in stages]
    print(f"\n{'stage':>13} {'valid ppl':>9} {'test ppl':>9} {'/ fp':>6} {'/ fp trained':>12}")
    for r in rows:
        print(f"{r['stage']:>13} {r['valid_ppl']:>9} {r['ppl']:>9} {r['ppl_vs_fp']:>6} {r['ppl_vs_fp_trained']:>12}")
    write_rows("bench_qft", rows, keep=CASE)
    return rows


if __name__ == "__main__":
    cli(main)
