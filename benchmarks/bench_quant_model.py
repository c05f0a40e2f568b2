"""Post-training quantization of a real pretrained model, every method of the table side by side:
perplexity, total proxy loss and seconds, with the fp model and nearest rounding measured in the same
run as baselines. `seconds` is the whole quantization (calibration forward passes, finetuning);
`layers s` the sum over the linear layers of quantizing each one (`quant.quantize_layer` and packing).

    python benchmarks/bench_quant_model.py --methods e8p --bits 2       # SmolLM2-135M, WikiText-2
    python benchmarks/bench_quant_model.py --methods e8p --bits 2 --block-ft 0 200   # QuIP#'s finetuning during quantization
    python benchmarks/bench_quant_model.py --model ../shared/data/models/stories260K/stories260K.bin --text stories \
        --nsamples 128 --eval-tokens 73728                            # stories260K, its own sampled text

Model: SmolLM2-135M-Instruct (GGUF) from ../shared/data (any `lm.load_causal_lm` model with --model).
Text (--text): 'wikitext' (default) = WikiText-2 raw valid (calibration) / test (evaluation) from
../shared/data (or any --train-file / --eval-file); 'stories' = in-domain text sampled from the fp model
itself (seeded, temperature 1, from BOS; calibration and evaluation from different seeds), for a model
trained on TinyStories.
"""
import itertools
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import lm  # noqa: E402
import quant  # noqa: E402
from lm.quantized import directory_bytes, round_to_stored, save_quantized  # noqa: E402
from lm.shared import SMOLLM2, WIKI_TEST, WIKI_VALID  # noqa: E402
from engine import ArgumentParser, UserError, cli, require_positive_ints, resolve_amp  # noqa: E402
from results import write_rows  # noqa: E402
from quant.blockft import BLOCK_FT_LR, BlockFT, check_finetuning, finetune_e2e  # noqa: E402
from quant.embedding import EMBED_BITS, check_groupsize, quantize_embeddings  # noqa: E402
from quant.model import quantize_model  # noqa: E402



# the columns that name a case: a run replaces the rows of its own cases only
CASE = ("model", "text", "method", "bits", "incoh", "yaqa", "block_ft", "e2e_ft", "amp", "embed_bits")


@torch.no_grad()
def sample_tokens(model, n_tokens, seqlen, seed, batch=16):
    """`n_tokens` tokens sampled from the model (temperature 1) in rows of `seqlen` starting at BOS."""
    torch.manual_seed(seed)
    rows = []
    while sum(r.numel() for r in rows) < n_tokens:
        bos = torch.full((batch, 1), model.config.bos_token_id, dtype=torch.long)
        out = model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=0)
        rows.extend(out)
    return torch.cat(rows)[:n_tokens]


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--text", default="wikitext", choices=["stories", "wikitext"],
                   help="wikitext: calibration rows from --train-file, evaluation on --eval-file; stories: both sampled "
                   "from the fp model")
    p.add_argument("--train-file", default=WIKI_VALID, help="calibration text of --text wikitext")
    p.add_argument("--eval-file", default=WIKI_TEST, help="evaluation text of --text wikitext")
    p.add_argument("--methods", nargs="+", default=list(quant.METHODS), choices=quant.METHODS)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    p.add_argument("--incoh", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="incoherence processing for the scalar methods (e8p and qtip always use the RHT)")
    p.add_argument("--yaqa", nargs="+", default=["off"], choices=["off", "on"],
                   help="YAQA's two-sided rounding (opt.py --yaqa) off and/or on, for the methods that have it")
    p.add_argument("--block-ft", nargs="+", type=int, default=[0], metavar="STEPS",
                   help="opt.py --block-ft steps to compare (0: none)")
    p.add_argument("--block-ft-lr", type=float, default=BLOCK_FT_LR, help="relative, as opt.py's")
    p.add_argument("--e2e-ft", nargs="+", type=int, default=[0], metavar="STEPS",
                   help="opt.py --e2e-ft steps to compare (0: none)")
    p.add_argument("--e2e-ft-lr", type=float, default=1e-4)
    p.add_argument("--amp", action="store_true", help="opt.py --amp: bf16 autocast in the --block-ft and --e2e-ft steps")
    p.add_argument("--write-text", metavar="DIR", help="also write the sampled calibration and evaluation tokens, "
                   "decoded, to DIR/stories_train.txt and DIR/stories_test.txt (ft_opt.py --train-file/--eval-file)")
    p.add_argument("--embed-bits", type=int, choices=EMBED_BITS, help="also quantize the embedding and head (opt.py --embed-bits)")
    p.add_argument("--embed-groupsize", type=int, default=-1, help="opt.py --embed-groupsize")
    p.add_argument("--save", help="directory: save each packed model there as <method>_w<bits>_yaqa<off|on>_bft<steps>_e2e<steps>")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=40 * 512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require_positive_ints(args, "nsamples", "seqlen", "threads")
    if args.text == "stories" and (args.train_file, args.eval_file) != (WIKI_VALID, WIKI_TEST):
        raise UserError("--text stories samples both texts from the model; --train-file and --eval-file are for --text wikitext")
    if args.eval_tokens < args.seqlen:
        raise UserError(f"--eval-tokens {args.eval_tokens} is less than one window of --seqlen {args.seqlen}")
    for flag in ("block_ft", "e2e_ft"):
        name, steps = flag.replace("_", "-"), getattr(args, flag)
        if min(steps) < 0:
            raise UserError(f"--{name} takes step counts >= 0 (0: none), got {min(steps)}")
        if max(steps):
            check_finetuning(name, getattr(args, flag + "_lr"), args.nsamples)
    if args.amp and not max(args.block_ft + args.e2e_ft):
        raise UserError("--amp only applies to the training steps of --block-ft and --e2e-ft; give steps to one of them")
    check_groupsize(args.embed_bits, args.embed_groupsize)
    if args.save:
        taken = [c for c in map(case_dir, cases(args)) if os.path.exists(os.path.join(args.save, c))]
        if taken:
            raise UserError(f"--save {args.save!r} already holds {taken[0]}; choose another --save or remove it")
    return args


def cases(args):
    """(bits, method, incoh, yaqa, block-ft steps, e2e-ft steps) of every row, in the order they run."""
    for bits, method in itertools.product(args.bits, args.methods):
        vector = quant.TABLE[method].rotation is not None  # e8p, qtip: always the RHT
        yaqa = args.yaqa if quant.TABLE[method].two_sided else ["off"]
        yield from itertools.product([bits], [method], ["on"] if vector else args.incoh, yaqa, args.block_ft, args.e2e_ft)


def case_dir(case):
    bits, method, _, two_sided, steps, e2e = case
    return f"{method}_w{bits}_yaqa{two_sided}_bft{steps}_e2e{e2e}"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    args.amp = resolve_amp(args.amp, "cpu")
    fp, tokenizer = lm.load_causal_lm(args.model)
    if args.text == "stories":
        calib = sample_tokens(fp, args.nsamples * args.seqlen, args.seqlen, seed=1000 + args.seed)
        calib = calib.view(args.nsamples, args.seqlen)
        test = sample_tokens(fp, args.eval_tokens, args.seqlen, seed=2000 + args.seed)
    else:
        train = lm.encode(tokenizer, lm.read_text_file(args.train_file))
        calib = lm.calibration_windows(train, args.nsamples, args.seqlen, args.seed)
        test = lm.encode(tokenizer, lm.read_text_file(args.eval_file))[:args.eval_tokens]
    if args.write_text:
        os.makedirs(args.write_text, exist_ok=True)
        for name, ids in (("train", calib.reshape(-1)), ("test", test)):
            rows = ids.reshape(-1, args.seqlen) if ids.numel() % args.seqlen == 0 else [ids]
            text = "\n".join(tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows)
            with open(os.path.join(args.write_text, f"stories_{name}.txt"), "w") as f:
                f.write(text + "\n")
    base = lm.perplexity(fp, test, args.seqlen)
    print(f"model {os.path.basename(args.model)}, text {args.text}: calibration {args.nsamples}x{args.seqlen}, "
          f"evaluation {test.numel()} tokens, {torch.get_num_threads()} thread(s)")
    print(f"fp perplexity {base:.4g}")
    # one-off costs outside the timings: the C++ kernels' first build, the trellis tables (as bench_trellis.py)
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(64, 256, generator=g), torch.randn(1024, 256, generator=g)
    for method, bits in itertools.product(args.methods, args.bits):
        quant.quantize_layer(W, X.T @ X / len(X), bits, method, seed=0)
    fp16_mb = 2 * sum(p.numel() for p in fp.parameters()) / 1e6  # tied tensors counted once
    print(f"packed directories (MB) beside the float16 model's {fp16_mb:.1f} MB; embedding and head "
          + (f"quantized to {args.embed_bits} bits" if args.embed_bits else "in float16"))
    print(f"{'method':>8} {'bits':>4} {'incoh':>5} {'yaqa':>4} {'bft':>5} {'e2e':>5} {'ppl':>9} {'ppl / fp':>9} {'proxy':>10} "
          f"{'seconds':>8} {'layers s':>8} {'MB':>7}")
    table = []
    for case in cases(args):
        bits, method, incoh, two_sided, steps, e2e = case
        model, tok = lm.load_causal_lm(args.model)
        options = dict(incoherence=incoh == "on", lazy_batch=True)
        block_ft = BlockFT(steps, args.block_ft_lr, seed=args.seed, amp=args.amp) if steps else None
        tick = time.perf_counter()
        rows = quantize_model(model, calib, "cpu", bits, method, args.seed, block_ft=block_ft,
                              yaqa=two_sided == "on", **options)
        if e2e:
            finetune_e2e(model, fp, calib, "cpu", BlockFT(e2e, args.e2e_ft_lr, seed=args.seed, amp=args.amp))
        if args.embed_bits:
            quantize_embeddings(model, args.embed_bits, args.embed_groupsize)
        seconds = time.perf_counter() - tick
        round_to_stored(model, "float16")  # the model its packed directory holds
        ppl = lm.perplexity(model, test, args.seqlen)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(args.save or tmp, case_dir(case))
            save_quantized(model, tok, out, dict(method=method, wbits=bits, options=options,
                                                 block_ft=vars(block_ft) if block_ft else None, e2e_ft=e2e or None))
            megabytes = directory_bytes(out) / 1e6
        proxy, layers_seconds = sum(r["proxy"] for r in rows), sum(r["seconds"] for r in rows)
        print(f"{method:>8} {bits:>4} {incoh:>5} {two_sided:>4} {steps:>5} {e2e:>5} {ppl:>9.4g} {ppl / base:>9.3f} "
              f"{proxy:>10.4g} {seconds:>8.2f} {layers_seconds:>8.2f} {megabytes:>7.1f}", flush=True)
        table.append({"model": os.path.basename(args.model), "text": args.text, "method": method, "bits": bits,
                      "incoh": incoh, "yaqa": two_sided, "block_ft": steps, "e2e_ft": e2e,
                      "amp": "on" if args.amp and (steps or e2e) else "off", "embed_bits": args.embed_bits or 16,
                      "ppl": f"{ppl:.4g}", "fp_ppl": f"{base:.4g}", "ppl_vs_fp": round(ppl / base, 3),
                      "proxy": f"{proxy:.4g}", "seconds": round(seconds, 2), "layers_seconds": round(layers_seconds, 2),
                      "packed_mb": round(megabytes, 1), "fp16_mb": round(fp16_mb, 1)})
        # after every row: a long run keeps what it measured; other cases' rows stay
        write_rows("bench_quant_model", table, keep=CASE)
    return table


if __name__ == "__main__":
    cli(main)
