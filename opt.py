"""Post-training quantization of decoder-only LMs (OPT, Llama-2/3, Mistral, Qwen2/3, ...: the families of
quant.model.FAMILIES) with QuIP (LDLQ / ldlqRG + incoherence processing), GPTQ or nearest rounding,
layer by layer on calibration data; perplexity before saving.

    python opt.py facebook/opt-125m wikitext2 --wbits 2 --quant ldlqRG --incoh_processing --save runs/q2
    python opt.py runs/ft_opt_wikitext2_root_k5_m5 c4 --wbits 2 --quant ldlq --incoh_processing --data-dir datasets/

QuIP's flags keep their names, defaults and meanings (see the README for the few differences).
Outputs: a per-layer table (layer, module, proxy loss, greedy passes, seconds), the perplexity on each
--eval dataset, args.json and quant_report.json in --out (default: SAVE, else
runs/opt_<model>_<quant>_w<wbits>); with --save, a packed low-bit checkpoint (lm.quantized: the codes,
scales and rotation seeds of every quantized linear, no dense copy, plus the fp rest) that
`--load`, `ft_opt.py --model` and `lm.load_causal_lm` run from.
"""
import copy
import os
import shutil
import time

import torch

import lm
import quant
from engine import (ArgumentParser, UserError, add_common_args, atomic_write_json, cli, prepare_run_dir,
                    require_positive_ints, resolve_amp, set_threads)
from lm import generate as lm_generate
from lm.checkpoint import STORED_DTYPES, is_quantized_dir
from lm.quantized import directory_bytes, round_to_stored, save_quantized
from quant.blockft import BLOCK_FT_LR, BlockFT, check_finetuning, finetune_e2e
from quant.embedding import EMBED_BITS, check_groupsize, quantize_embeddings
from quant.model import FAMILIES, decoder_layers, quantize_model

REPORT_FILE = "quant_report.json"
PROJ_EXTRA = {0: "butterfly", 1: "kron", 2: "butterfly_nopermute"}  # QuIP's --pre_proj_extra
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv):
    return check_args(build_parser().parse_args(argv))


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="hub name or local directory (e.g. ft_opt.py's output) of a model of one of the "
                                 "families (config model_type: what it covers): "
                                 + "; ".join(f"{name}: {what}" for name, (_, what) in FAMILIES.items()))
    p.add_argument("dataset", choices=lm.DATASETS, help="calibration data source")
    # QuIP's flags, same names, defaults and meanings (--seed: in add_common_args below)
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences")
    p.add_argument("--percdamp", type=float, default=0.01, help="damping, fraction of mean(diag(H))")
    p.add_argument("--quant", default="nearest", choices=quant.METHODS + tuple(quant.UNSUPPORTED),
                   help="; ".join(f"{name}: {m.help}" for name, m in quant.TABLE.items()))
    p.add_argument("--wbits", type=int, default=16, choices=quant.WBITS, help="16 = no quantization")
    p.add_argument("--npasses", type=int, help="greedy passes (default: 1 for ldlqRG and allbal, else 0; "
                                              "QuIP's default 0 ran none for ldlqRG)")
    p.add_argument("--groupsize", type=int, default=-1, help="columns per grid (qfn a); -1: whole rows")
    p.add_argument("--pre_gptqH", action="store_true", help="dead-column fix and percdamp damping of H")
    p.add_argument("--pre_rescale", action="store_true", help="diagonal rescaling of W and H")
    p.add_argument("--pre_proj", action="store_true", help="random orthogonal multiplication of W and H")
    p.add_argument("--pre_proj_extra", type=int, choices=sorted(PROJ_EXTRA),
                   help="0: block-diagonal butterfly, 1: Kronecker, 2: butterfly without permutations "
                        "(default 1 with --incoh_processing, else 0)")
    p.add_argument("--qfn", choices=quant.QFNS, help="grid of the scalar methods: a: per-row min/max; b: 2.4 RMS, "
                                                    "symmetric (default: b with --incoh_processing, else a)")
    p.add_argument("--unbiased", action="store_true", help="stochastic (unbiased) rounding")
    p.add_argument("--incoh_processing", action="store_true",
                   help="= --pre_gptqH --pre_rescale --pre_proj --pre_proj_extra 1 --qfn b")
    p.add_argument("--incoh_mode", choices=("kron", "hadamard"),
                   help="rotation used by --incoh_processing: Kronecker (QuIP) or randomized Hadamard (QuIP#) "
                        "(default: kron; e8p always uses hadamard)")
    p.add_argument("--lazy_batch", action="store_true", help="LDLQ/GPTQ updates in blocks of 128 columns")
    p.add_argument("--proxy_only", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--save", help="write the packed quantized model to this new directory (default: none)")
    p.add_argument("--load", help="evaluate a packed model written by --save instead of quantizing MODEL (default: none)")
    p.add_argument("--check", action="store_true",
                   help="compare every packed layer with its dense weights; with --save also reload the "
                        "saved directory and recompute the perplexities")
    p.add_argument("--generate", metavar="PROMPT", help="greedy continuation of PROMPT by the (quantized) model (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens --generate adds")
    # ours
    p.add_argument("--seqlen", type=int, help="calibration and evaluation length (default: the model's)")
    p.add_argument("--eval", nargs="*", default=["wikitext2"], choices=lm.DATASETS, help="perplexity datasets")
    p.add_argument("--train-file", help="plain text file to calibrate on (default: DATASET's train split)")
    p.add_argument("--eval-windows", type=int, help="perplexity on the first N windows only (default: all)")
    p.add_argument("--eval-file", help="plain text file for perplexity, reported as 'eval_file' (default: the --eval datasets)")
    p.add_argument("--block-ft", type=int, metavar="STEPS",
                   help="QuIP#'s finetuning during quantization: after each group of linears sharing an input is "
                        "quantized, STEPS Adam steps train the decoder layer's continuous parameters toward the fp "
                        "model's hidden states; held-out calibration rows keep the best (default: none)")
    p.add_argument("--block-ft-lr", type=float, default=BLOCK_FT_LR,
                   help="Adam learning rate of --block-ft, relative: each tensor steps by about this fraction of "
                        "its RMS (default: %(default)s)")
    p.add_argument("--yaqa", action="store_true",
                   help="round against YAQA's Kronecker-factored Hessian of the full model's KL (input-side H times "
                        "the output-side Fisher), collected once on the fp model: one forward and backward pass per "
                        "calibration window")
    p.add_argument("--e2e-ft", type=int, metavar="STEPS",
                   help="QuIP#'s end-to-end stage after quantization: STEPS Adam steps on the scales and norms of "
                        "the whole model toward the fp model's next-token distributions (KL) on the calibration "
                        "rows, codes, embeddings and head fixed; held-out rows keep the best (default: none)")
    p.add_argument("--e2e-ft-lr", type=float, default=1e-4, help="Adam learning rate of --e2e-ft")
    p.add_argument("--amp", "--bf16", action="store_true",
                   help="bf16 autocast in the training steps of --block-ft and --e2e-ft (parameters, losses and "
                        "the held-out errors that keep the best state stay fp32; float32 on CPUs without bfloat16 "
                        "instructions)")
    p.add_argument("--embed-bits", type=int, choices=EMBED_BITS,
                   help="also quantize the token embedding and the LM head (tied: one table) to a grid of this many "
                        "bits, round to nearest; the head runs as a packed layer, lookups decode only their rows "
                        "(default: keep them in --save-dtype)")
    p.add_argument("--embed-groupsize", type=int, default=-1,
                   help="columns per scale of --embed-bits (-1: one scale and zero point per row)")
    p.add_argument("--save-dtype", default="float16", choices=tuple(STORED_DTYPES),
                   help="dtype of the quantized model's tensors outside the quantized layers (norms, an unquantized "
                        "embedding and head), as --save stores them; the reported perplexities are of that model")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                   help="model dtype (auto: float16 on CUDA, float32 on CPU)")
    add_common_args(p, out="SAVE, else runs/opt_<model>_<quant>_w<wbits> (_eval with --load)", seed_help="calibration sampling and "
                    "rotation seed", data_dir_help="folder with the dataset files (wiki.train.raw, ...)")
    return p


def check_args(args):
    """The flags' combinations checked, one UserError line each, before anything loads; the defaults that
    depend on other flags filled in."""
    if args.quant in quant.TABLE and not quant.codebooks.get(quant.TABLE[args.quant].codebook).scalar_options:
        check_scalar_flags(args)
    expand_incoherence(args)
    require_positive_ints(args, "nsamples", "max_new_tokens", "eval_windows", "threads", "block_ft", "e2e_ft")
    check_finetuning_flags(args)
    if args.embed_bits is not None and (args.load or args.wbits == 16):
        raise UserError("--embed-bits quantizes the embedding beside the layers: it needs --wbits 2, 3 or 4 and no --load")
    if args.yaqa and (args.load or args.wbits == 16):
        raise UserError("--yaqa is a way of rounding: it needs --wbits 2, 3 or 4 and no --load")
    check_groupsize(args.embed_bits, args.embed_groupsize)
    if args.percdamp < 0:
        raise UserError(f"--percdamp must be >= 0, got {args.percdamp}")
    if args.quant in quant.UNSUPPORTED:
        raise UserError(f"--quant {args.quant}: {quant.UNSUPPORTED[args.quant]}")
    check_model_paths(args)
    if args.wbits < 16 and not args.load:  # refuse bad combinations before the model is loaded
        o = quant_options(args)
        quant.check_options(args.quant, args.wbits, o["qfn"], o["npasses"], o["unbiased"], o["groupsize"], o["rotation"],
                            two_sided=o["yaqa"])
    if args.out is None:
        name = os.path.basename(os.path.normpath(args.load or args.model)).replace(".", "_")
        args.out = args.save or os.path.join("runs", f"opt_{name}_" + ("eval" if args.load else f"{args.quant}_w{args.wbits}"))
    return args


def expand_incoherence(args):
    """--incoh_processing's flags, and the defaults of the flags it sets."""
    if args.incoh_processing:
        args.pre_gptqH = args.pre_rescale = args.pre_proj = True
        args.qfn = args.qfn or "b"
        if args.pre_proj_extra is None:
            args.pre_proj_extra = 1  # what QuIP's --incoh_processing means (its code sets a misspelled name)
    if args.pre_proj_extra is None:
        args.pre_proj_extra = 0
    args.qfn = args.qfn or "a"
    args.incoh_mode = args.incoh_mode or "kron"


def check_finetuning_flags(args):
    """--block-ft and --e2e-ft: only while quantizing, with held-out rows and a usable learning rate; --amp
    only with one of them."""
    if args.amp and args.block_ft is None and args.e2e_ft is None:
        raise UserError("--amp only applies to the training steps of --block-ft and --e2e-ft; give one of them")
    for flag in ("block_ft", "e2e_ft"):
        name = flag.replace("_", "-")
        if getattr(args, flag) is None:
            continue
        if args.load or args.wbits == 16:
            raise UserError(f"--{name} finetunes while quantizing: it needs --wbits 2, 3 or 4 and no --load")
        check_finetuning(name, getattr(args, flag + "_lr"), args.nsamples)


def check_model_paths(args):
    """MODEL, --load and --save: a new (or overwritable) --save directory, a packed MODEL only with --load."""
    if args.save and os.path.exists(args.save) and (not os.path.isdir(args.save) or os.listdir(args.save)):
        if not (args.overwrite and os.path.isfile(os.path.join(args.save, "args.json"))):  # not a run of ours
            raise UserError(f"--save {args.save!r} exists and is not an empty directory; choose a new path"
                            + (" (or --overwrite a run of opt.py)" if os.path.isdir(args.save) else ""))
    if args.load and args.save:
        raise UserError("--load evaluates a saved model; it cannot be combined with --save")
    if not args.load and is_quantized_dir(args.model):
        raise UserError(f"{args.model!r} is already quantized: evaluate it with --load {args.model}")


def check_scalar_flags(args):
    """Codebooks without the scalar options (the lattice codebooks of e8p, the trellis of qtip) fix what the
    scalar methods' flags choose: one line per conflict."""
    fixed = {"--qfn": args.qfn, "--groupsize": None if args.groupsize == -1 else args.groupsize,
             "--pre_proj_extra": args.pre_proj_extra, "--unbiased": args.unbiased or None,
             "--npasses": args.npasses or None, "--incoh_mode kron": args.incoh_mode == "kron" or None}
    given = [flag for flag, value in fixed.items() if value is not None]
    if given:
        method = quant.TABLE[args.quant]
        what = quant.codebooks.get(method.codebook).unit(method)
        raise UserError(f"--quant {args.quant} quantizes {what}, one scale per row, after the "
                        f"randomized Hadamard transform, with block LDLQ; it does not take {', '.join(given)} "
                        f"(supported with it: --wbits {'/'.join(map(str, quant.TABLE[args.quant].wbits))}, "
                        "--incoh_processing or --pre_rescale, --percdamp, --pre_gptqH)")


def quant_options(args):
    """quant.model.quantize_model options from QuIP's flags (the method's own rotation where it has
    one) and --yaqa."""
    rotation = quant.TABLE[args.quant].rotation if args.quant in quant.TABLE else None
    if args.pre_proj and rotation is None:
        rotation = "hadamard" if args.incoh_processing and args.incoh_mode == "hadamard" else PROJ_EXTRA[args.pre_proj_extra]
    return dict(incoherence=False, qfn=args.qfn, rescale=args.pre_rescale, rotation=rotation,
                percdamp=args.percdamp, damp_h=args.pre_gptqH, npasses=quant.default_npasses(args.quant, args.npasses),
                groupsize=args.groupsize, unbiased=args.unbiased, lazy_batch=args.lazy_batch, yaqa=args.yaqa)


def check_packed(model, n=8, seed=0):
    """Largest relative difference between each QuantLinear's packed forward and a dense matmul with
    its dequantized weight, on random inputs."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for module in model.modules():
        if isinstance(module, quant.QuantLinear):
            x = torch.randn(n, module.in_features, generator=g).to(module.codes_device())
            with torch.no_grad():
                dense = torch.nn.functional.linear(x, module.dequantize(), module.bias)
                worst = max(worst, float((module(x) - dense).abs().max() / dense.abs().max().clamp(min=1e-30)))
    return worst


def generate(model, tokenizer, prompt, max_new_tokens):
    """Greedy continuation of `prompt` (with the tokenizer's usual BOS), as `python -m lm.generate` runs it."""
    new, _, _ = lm_generate.generate(model, tokenizer, lm_generate.prompt_ids(tokenizer, prompt), max_new_tokens)
    return prompt + tokenizer.decode(new, skip_special_tokens=True)


def read_texts(args):
    """Every text the run needs, read before the model loads so that a missing or empty file fails fast:
    {eval name: text} and the calibration text (None: lm.calibration_batch reads DATASET itself)."""
    if args.proxy_only:
        evals = {}
    elif args.eval_file:
        evals = {"eval_file": lm.read_text_file(args.eval_file)}
    else:
        evals = {d: lm.load_text(d, "test", args.data_dir) for d in args.eval}
    if args.train_file:
        return evals, lm.read_text_file(args.train_file)
    if not args.load and args.wbits < 16:
        lm.load_text(args.dataset, "train", args.data_dir)  # only checked: C4 calibration samples documents
    return evals, None


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    set_threads(args)
    args.amp = resolve_amp(args.amp, args.device)
    dtype = DTYPES.get(args.dtype, torch.float16 if torch.device(args.device).type == "cuda" else torch.float32)
    eval_texts, calib_text = read_texts(args)
    report = dict(args=vars(args).copy(), layers=[], ppl={})
    model, tokenizer = load_model(args, dtype)
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # tied tensors are listed once
    seqlen = report["seqlen"] = lm.default_seqlen(model, args.seqlen)
    eval_ids = {name: lm.encode(tokenizer, text) for name, text in eval_texts.items()}
    calib_ids = lm.encode(tokenizer, calib_text) if calib_text is not None else None
    if args.save and os.path.isdir(args.save) and args.overwrite:
        shutil.rmtree(args.save)  # a previous run of opt.py (checked in parse_args)
    prepare_run_dir(args, (REPORT_FILE,))
    quantized = not args.load and args.wbits < 16
    if quantized:
        quantize(args, model, tokenizer, calib_ids, seqlen, report)
    evaluate(args, model, tokenizer, eval_ids, seqlen, report)
    if args.save:
        save(args, model, tokenizer, quantized, fp16_bytes, report)
        if args.check and eval_ids:
            check_reloaded(args, dtype, eval_ids, seqlen, report)
    report_path = os.path.join(args.out, REPORT_FILE)
    report["seconds"] = time.time() - started  # the whole command: loading, quantizing, evaluating, saving
    atomic_write_json(report_path, report)
    print(f"report: {report_path}")
    return report


def load_model(args, dtype):
    """(model, tokenizer) of MODEL, or of --load; a family without the decoder layers quantization walks fails
    here, before any data is read."""
    if args.load:
        print(f"loading the model from {args.load} (MODEL {args.model!r} only names the run)")
    model, tokenizer = lm.load_causal_lm(args.load or args.model, dtype=dtype)
    if args.block_ft is not None and getattr(model.config, "model_type", None) not in FAMILIES:
        raise UserError(f"--block-ft finetunes inside decoder layers; model family {model.config.model_type!r} has none "
                        f"that quant.model knows (families with decoder layers: {', '.join(FAMILIES)})")
    decoder_layers(model)
    return model, tokenizer


def quantize(args, model, tokenizer, calib_ids, seqlen, report):
    """Every decoder layer quantized on the calibration windows (with --block-ft inside, --embed-bits and
    --e2e-ft after), then rounded to what --save stores; the report gets the per-layer rows and totals."""
    options = quant_options(args)
    print_settings(args, options)
    if calib_ids is not None:
        calib = lm.calibration_windows(calib_ids, args.nsamples, seqlen, args.seed, repr(args.train_file))
    else:
        calib = lm.calibration_batch(tokenizer, args.dataset, args.nsamples, seqlen, args.seed, args.data_dir)
    print(f"{'layer':>5} {'module':<22} {'proxy loss':>12} {'passes':>6} {'seconds':>8}"
          + (f" {'two-sided proxy':>15}" if args.yaqa else ""))
    block_ft = None if args.block_ft is None else BlockFT(args.block_ft, args.block_ft_lr, seed=args.seed, amp=args.amp)
    fp_model = copy.deepcopy(model) if args.e2e_ft else None
    tick = time.time()
    rows = quantize_model(model, calib, args.device, args.wbits, args.quant, args.seed, on_result=show_layer,
                          block_ft=block_ft, **options)
    if args.embed_bits is not None:
        report["embedding"] = dict(bits=args.embed_bits, groupsize=args.embed_groupsize,
                                   **quantize_embeddings(model, args.embed_bits, args.embed_groupsize))
        print(f"embedding{' and tied head' if report['embedding']['tied'] else ' and head'}: {args.embed_bits} bits, "
              f"groupsize {args.embed_groupsize}, relative squared error {report['embedding']['embedding_error']:.3g}")
    report.update(layers=rows, total_proxy=sum(r["proxy"] for r in rows), quant_seconds=time.time() - tick,
                  options=options)
    if args.yaqa:
        report["total_proxy_two_sided"] = sum(r["proxy_two_sided"] for r in rows)
    if block_ft is not None:
        report["block_ft"] = dict(vars(block_ft), groups=sum("block_ft" in r for r in rows))
    if fp_model is not None:
        finetune_end_to_end(args, model, fp_model, calib, report)
    round_to_stored(model, args.save_dtype)
    print(f"total proxy loss {report['total_proxy']:.5g}, quantization {report['quant_seconds']:.1f} s")


def print_settings(args, options):
    method = quant.TABLE[args.quant]
    grid = quant.codebooks.get(method.codebook).for_bits(args.wbits).describe(method, options["qfn"])
    print(f"method {args.quant}, {args.wbits} bits, {grid}, rescale {options['rescale']}, "
          f"rotation {options['rotation']}, damping H {options['damp_h']} (percdamp {args.percdamp}), "
          f"lazy_batch {args.lazy_batch}, seed {args.seed}")
    if args.yaqa:
        print("YAQA: rounding against H times the output-side Fisher of the fp model (collected first); the "
              "table's proxy loss stays the one-sided tr(E H E^T), the two-sided one is tr(E^T H_out E H)")
    if method.greedy:
        given = "given" if args.npasses is not None else "default"
        print(f"greedy passes per layer: {options['npasses']} ({given}; a pass stops early at a fixed point)")


def show_layer(row):
    """One line of the per-layer table (and its warnings, and its --block-ft result)."""
    for w in row["warnings"]:
        print(f"warning: layer {row['layer']} {row['module']}: {w}")
    print(f"{row['layer']:>5} {row['module']:<22} {row['proxy']:>12.5g} {row['npasses']:>6} {row['seconds']:>8.2f}"
          + (f" {row['proxy_two_sided']:>15.5g}" if "proxy_two_sided" in row else ""))
    if "block_ft" in row:
        b = row["block_ft"]
        print(f"      block-ft {'/'.join(m.rpartition('.')[2] for m in b['group'])}: held-out relative error "
              f"{b['heldout_before']:.4g} -> {b['heldout_after']:.4g} (best step {b['best_step']}, {b['seconds']:.1f} s)")


def finetune_end_to_end(args, model, fp_model, calib, report):
    """--e2e-ft: the quantized model's continuous parameters toward the fp model's next-token distributions."""
    e2e = BlockFT(args.e2e_ft, args.e2e_ft_lr, seed=args.seed, amp=args.amp)
    report["e2e_ft"] = dict(vars(e2e), **finetune_e2e(model.to(args.device), fp_model.to(args.device), calib,
                                                      args.device, e2e))
    print(f"end-to-end finetuning: held-out KL per token {report['e2e_ft']['heldout_before']:.4g} -> "
          f"{report['e2e_ft']['heldout_after']:.4g} (best step {report['e2e_ft']['best_step']}, "
          f"{report['e2e_ft']['seconds']:.1f} s)")


def evaluate(args, model, tokenizer, eval_ids, seqlen, report):
    """Perplexity on every evaluation text, --generate's continuation and --check's packed-vs-dense check."""
    model.to(args.device)
    for name, ids in eval_ids.items():
        report["ppl"][name] = lm.perplexity(model, ids, seqlen, device=args.device, max_windows=args.eval_windows)
        print(f"{name} perplexity: {report['ppl'][name]:.6g}")
    if args.generate is not None:
        report["generated"] = generate(model, tokenizer, args.generate, args.max_new_tokens)
        print(f"generated: {report['generated']}")
    if args.check:
        report["check_max_rel_diff"] = check_packed(model)
        print(f"check: max relative |packed forward - dense forward| = {report['check_max_rel_diff']:.3g}")
    model.to("cpu")


def save(args, model, tokenizer, quantized, fp16_bytes, report):
    """--save: the packed directory of a quantized model (its size in the report), else a plain one."""
    if not quantized:
        lm.save_pretrained(model, tokenizer, args.save)
        print(f"saved the model to {args.save}")
        return
    done = {k: report[k] for k in ("block_ft", "e2e_ft", "embedding") if k in report}  # recorded only when run
    save_quantized(model, tokenizer, args.save, dict(method=args.quant, wbits=args.wbits, options=report["options"],
                                                     **done), dtype=args.save_dtype)
    report["size"] = dict(directory_bytes=directory_bytes(args.save), fp16_bytes=fp16_bytes)
    print(f"saved the packed {args.wbits}-bit model to {args.save}: {report['size']['directory_bytes'] / 1e6:.1f} MB "
          f"(the float16 model: {fp16_bytes / 1e6:.1f} MB)")


def check_reloaded(args, dtype, eval_ids, seqlen, report):
    """--check with --save: the saved directory loaded again and its perplexities beside the run's."""
    reloaded, _ = lm.load_causal_lm(args.save, dtype=dtype, device=args.device)
    report["reloaded_ppl"] = {name: lm.perplexity(reloaded, ids, seqlen, device=args.device, max_windows=args.eval_windows)
                              for name, ids in eval_ids.items()}
    for name, ppl in report["reloaded_ppl"].items():
        print(f"check: {name} perplexity of the reloaded model {ppl:.6g} "
              f"(relative difference {abs(ppl / report['ppl'][name] - 1):.2g})")


if __name__ == "__main__":
    cli(main)
