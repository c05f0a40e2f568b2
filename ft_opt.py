"""Finetune a causal LM (the families of quant.model.FAMILIES: OPT, Llama-2/3, Mistral, Qwen2/3, ...; any
transformers causal LM) with a token-level CE / focal / RLO loss, report the true perplexity before and
after, and save the model for `opt.py` (quantization).

    python ft_opt.py                                   # facebook/opt-125m on wikitext2, root loss k=m=5
    python ft_opt.py --model DIR --loss ce --data-dir datasets/wikitext-2-raw --out runs/opt125m_ce

Defaults follow the authors' script (block 256, lr 1e-5, 500 warmup steps, weight decay 0.01, micro-batch
4 x accumulation 2, 3 epochs). Unlike it, the perplexity reported is exp(mean token cross-entropy) for
every training loss, by the GPTQ/QuIP protocol (lm.perplexity), not exp(the training loss).
Output in --out: args.json, the model and tokenizer (save_pretrained, safetensors) and metrics.json;
checkpoint.pt (for --resume) until the run finishes.

Finetuning in quantized space: with --model a packed directory written by `opt.py --save`, the codes
stay frozen and the continuous parameters train (norms, biases, the QuantLinears' codebook scales and
per-channel in/out scales, and the unquantized embeddings and head unless --freeze-embeddings), as in
QuIP#'s and AQLM's finetuning; the result is saved back in the packed format. --update-codes FRACTION
adds PV-tuning's discrete step (`quant.pv`): after every --update-codes-every optimizer steps, each
layer re-encodes up to FRACTION of its code groups toward its gradient (summed since the last update), kept only if the loss of a fixed probe batch drops.
"""
import math
import os
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

import lm
from lm.quantized import round_to_stored
import quant
from quant.model import FAMILIES
from engine.distributed import barrier, distributed, full_state, fully_shard_blocks, load_full_state
from engine import (ArgumentParser, UserError, add_common_args, atomic_save, atomic_write_json, cli, load_checkpoint,
                    prepare_run_dir, require_positive_ints, resolve_amp, rng_state, run_args, set_rng_state,
                    set_threads)
from losses import describe, get_loss, is_rooted, names
from quant.pv import CodeUpdater

TOKEN_LOSSES = names()  # the multi-class forms
# --micro-bs is not among them: any split of the global batch over processes resumes (checked apart)
RESUME_KEYS = ("model", "dataset", "train_file", "loss", "k", "m", "seqlen", "grad_accum", "epochs",
               "max_steps", "lr", "warmup_steps", "seed", "freeze_embeddings", "update_codes", "update_codes_every")
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "step", "metrics")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="facebook/opt-125m",
                   help="hub name, local directory, or a packed quantized directory (opt.py --save); tested "
                        f"families (config model_type): {', '.join(FAMILIES)}; other causal LMs load too")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="keep the input embeddings and the output head fixed")
    p.add_argument("--dataset", default="wikitext2", help=f"one of {', '.join(lm.DATASETS)}")
    p.add_argument("--train-file", help="plain text file to train on (default: the dataset's train split)")
    p.add_argument("--eval-file", help="plain text file for perplexity (default: the dataset's test split)")
    p.add_argument("--loss", default="root", help=describe())
    p.add_argument("--k", type=float, default=5.0, help="RLO root order k")
    p.add_argument("--m", type=float, default=5.0, help="RLO scale m")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=500, help="linear warmup length in optimizer steps")
    p.add_argument("--weight-decay", "--wd", type=float, default=0.01)
    p.add_argument("--micro-bs", type=int, default=4, help="sequences per forward pass and process")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--seqlen", type=int, default=256, help="training block length in tokens")
    p.add_argument("--eval-seqlen", type=int, help="perplexity window (default: the model's max positions)")
    p.add_argument("--eval-windows", type=int, help="perplexity on the first N windows only (default: all)")
    p.add_argument("--eval-bs", type=int, default=1, help="windows per perplexity forward pass")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total (default: all epochs)")
    p.add_argument("--no-fused-loss", dest="fused_loss", action="store_false",
                   help="compute the loss from the model's logits instead of the fused head + loss "
                        "(losses.linear_token_loss, which never builds the tokens x vocab logits; default: fused)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state over the processes "
                        "(FSDP2 fully_shard per transformer block) instead of DDP's full copies")
    p.add_argument("--update-codes", type=float, metavar="FRACTION",
                   help="packed models: PV-tuning's discrete step, re-encode up to this fraction (0, 1] of each "
                        "layer's code groups, those with the largest linearised improvement (default: codes frozen)")
    p.add_argument("--update-codes-every", type=int, default=8, metavar="STEPS",
                   help="optimizer steps between two code updates (with --update-codes)")
    p.add_argument("--amp", "--bf16", action="store_true",
                   help="bf16 autocast (mixed precision; weights stay fp32); float32 on CPUs without bfloat16 instructions")
    add_common_args(p, out="runs/ft_opt_<dataset>_<loss>[_k<k>_m<m>]", resume=True,
                    seed_help="weight init of new heads, data order", data_dir_help="folder with the dataset's "
                    "files (e.g. wiki.train.raw, wiki.test.raw); wikitext2 also comes from the datasets cache")
    args = p.parse_args(argv)
    args.loss = args.loss.lower()
    if args.loss not in TOKEN_LOSSES:
        raise UserError(f"unknown loss {args.loss!r}; choose one of {', '.join(TOKEN_LOSSES)}")
    get_loss(args.loss, k=args.k, m=args.m)  # the one check of k and m
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    require_positive_ints(args, "epochs", "micro_bs", "grad_accum", "eval_bs", "max_steps", "eval_windows", "threads",
                          "update_codes_every")
    if args.update_codes is not None and not 0 < args.update_codes <= 1:
        raise UserError(f"--update-codes is the fraction of code groups re-encoded per update, in (0, 1]; got {args.update_codes}")
    if args.warmup_steps < 0 or args.weight_decay < 0:
        raise UserError("--warmup-steps and --weight-decay must be >= 0")
    if args.dataset not in lm.DATASETS and not (args.train_file and args.eval_file):
        raise UserError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(lm.DATASETS)}")
    if args.out is None:
        rlo = f"_k{args.k:g}_m{args.m:g}" if is_rooted(args.loss) else ""
        args.out = os.path.join("runs", f"ft_opt_{args.dataset}_{args.loss}{rlo}")
    return args


def load_text(args, split, path):
    return lm.read_text_file(path) if path else lm.load_text(args.dataset, split, args.data_dir)


def training_blocks(ids, seqlen):
    """The train token stream cut into (n, seqlen) blocks, remainder dropped (run_clm's group_texts)."""
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"the training text has {ids.numel()} tokens, fewer than one block of --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def mean_over_ranks(values):
    """Mean of this rank's values averaged over the ranks (each rank holds as many)."""
    mean = torch.tensor(sum(values) / len(values), dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return float(mean)


def freeze_embeddings(model):
    """requires_grad False for the input embeddings and the output head (tied or not)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.requires_grad_(False)


def code_buffers(model):
    """{name: tensor} of every QuantLinear's frozen code buffers."""
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)
            for b, t in m.code_tensors().items()}


def prepare_quantized(model):
    """Finetuning in quantized space: every QuantLinear gets trainable per-channel scales; its codes
    are buffers, so only continuous parameters train. Returns a copy of the code buffers, to check
    that they come out bit-identical."""
    for m in model.modules():
        if isinstance(m, quant.QuantLinear):
            m.add_channel_scales()
    return {name: t.clone() for name, t in code_buffers(model).items()}


def code_updater(args, model, codes_before, world):
    """The V step of PV-tuning (`quant.pv.CodeUpdater`) for --update-codes, or None."""
    if args.update_codes is None:
        return None
    if codes_before is None:
        raise UserError(f"--update-codes re-encodes the codes of a packed model (opt.py --save); {args.model!r} is not one")
    if world > 1:
        raise UserError("--update-codes runs in one process (the codes would differ between ranks); run it without torchrun")
    return CodeUpdater(model, args.update_codes)


@torch.no_grad()
def batch_loss(model, objective, input_ids, autocast):
    """The loss on one batch in eval mode (no dropout): what a code update must lower."""
    model.eval()
    with autocast:
        loss = float(objective(input_ids, lm.shift_labels(input_ids)))
    model.train()
    return loss


def build_optimizer(model, args):
    # Like the HF Trainer the authors used: no weight decay on biases and norm weights (1-D tensors);
    # none on a QuantLinear's scales either (decay would shrink the quantized weights themselves).
    scales = {id(p) for m in model.modules() if isinstance(m, quant.QuantLinear) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in scales], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2 or id(p) in scales], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr)


def build_model(args, device):
    """(model, tokenizer, code snapshot or None) ready to train: a packed model gets its channel scales,
    --freeze-embeddings freezes embeddings and head."""
    model, tokenizer = lm.load_causal_lm(args.model, device=device)
    codes = prepare_quantized(model) if hasattr(model, "rlo_quantization") else None
    if args.freeze_embeddings:
        freeze_embeddings(model)
    return model, tokenizer, codes


def main(argv=None):
    args = parse_args(argv)
    set_threads(args)
    with distributed(args.device) as (rank, world, device):
        return run(args, rank, world, device)


def run(args, rank, world, device):
    """One process of the run (rank of world). Each optimizer step sees `grad_accum` global micro-batches
    of micro_bs x world blocks; rank r trains on rows r*micro_bs..(r+1)*micro_bs of each, DDP (or FSDP)
    averages the gradients, so N ranks with --micro-bs b equal one process with --micro-bs N*b. Only rank 0
    evaluates and writes."""
    if args.fsdp and world == 1:
        raise UserError("--fsdp shards the model over the processes of torchrun: run it under torchrun --nproc_per_node N")
    # The texts first: a missing or empty file is reported before a model loads for seconds or minutes.
    train_text = load_text(args, "train", args.train_file)
    test_text = load_text(args, "test", args.eval_file)
    torch.manual_seed(args.seed)
    model, tokenizer, codes_before = build_model(args, device)
    data = tokenize(args, model, tokenizer, train_text, test_text)
    objective = lm.NextTokenLoss(model, args.loss, fused=args.fused_loss, k=args.k, m=args.m)
    updater = code_updater(args, model, codes_before, world)
    # a code update is kept when it lowers the loss of these blocks, fixed for the run (the gradient it
    # follows is the sum over the micro-batches since the last update)
    probe = data.blocks[torch.randperm(len(data.blocks), generator=torch.Generator().manual_seed(args.seed))
                        [:args.micro_bs]].to(device)
    plan = plan_steps(args, len(data.blocks), world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_amp(args.amp, device))
    ckpt, metrics = start_or_resume(args, model, data, plan, codes_before, updater)
    started, seconds_before = time.time(), metrics.get("seconds", 0.0)  # wall seconds of the run, over its invocations
    clock = lambda: seconds_before + time.time() - started

    if metrics["ppl_before"] is None and rank == 0:  # before sharding: rank 0 holds the whole model
        metrics["ppl_before"] = evaluate(args, model, data, device)
        print(f"perplexity before finetuning: {metrics['ppl_before']:.3f}")
    train_objective = spread_over_ranks(args, objective, model, rank, world)
    # built after sharding: FSDP replaces the parameters by their shards
    optimizer = build_optimizer(model, args)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(args.warmup_steps, plan.total_steps), plan.total_steps)
    start_epoch, step = restore(ckpt, model, optimizer, scheduler, args.out)
    loop = SimpleNamespace(model=model, objective=train_objective, optimizer=optimizer, scheduler=scheduler,
                           autocast=autocast, updater=updater,
                           probe_loss=lambda: batch_loss(model, objective, probe, autocast))

    for epoch in range(start_epoch, args.epochs):
        if step >= plan.total_steps:
            break
        losses, step = train_epoch(args, loop, plan, data.blocks, epoch, step, rank, device, metrics)
        metrics["train_loss"].append(mean_over_ranks(losses))
        metrics["steps"], metrics["seconds"] = step, clock()
        save_epoch(args, loop, epoch, step, metrics, rank)

    if args.fsdp:  # rank 0 evaluates and saves an unsharded copy holding the trained weights
        model_state, _ = full_state(model)
        if rank == 0:
            model, tokenizer, _ = build_model(args, device)
            model.load_state_dict(model_state)
    if rank != 0:
        return None
    return finish(args, model, tokenizer, data, device, updater, codes_before, metrics, clock)


def tokenize(args, model, tokenizer, train_text, test_text):
    """The token streams and the sequence lengths they are cut into: training blocks, the test ids."""
    seqlen = lm.default_seqlen(model, args.seqlen)
    eval_seqlen = lm.default_seqlen(model, args.eval_seqlen)
    train_ids, test_ids = lm.encode(tokenizer, train_text), lm.encode(tokenizer, test_text)
    blocks = training_blocks(train_ids, seqlen)
    if test_ids.numel() < eval_seqlen:
        raise UserError(f"the evaluation text has {test_ids.numel()} tokens, fewer than one window of {eval_seqlen}"
                        " (lower --eval-seqlen)")
    return SimpleNamespace(seqlen=seqlen, eval_seqlen=eval_seqlen, blocks=blocks, test_ids=test_ids)


def plan_steps(args, n_blocks, world):
    """Global micro-batch size, micro-batches per epoch and the optimizer steps of the whole run."""
    global_bs = args.micro_bs * world
    # a last, incomplete global micro-batch would leave some ranks without rows: dropped under torchrun
    micro_batches = math.ceil(n_blocks / global_bs) if world == 1 else n_blocks // global_bs
    if micro_batches == 0:
        raise UserError(f"{n_blocks} training blocks are fewer than one global micro-batch of {global_bs}")
    total_steps = math.ceil(micro_batches / args.grad_accum) * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    return SimpleNamespace(global_bs=global_bs, micro_batches=micro_batches, total_steps=total_steps)


def start_or_resume(args, model, data, plan, codes_before, updater):
    """(checkpoint or None, metrics): the run directory prepared, fresh metrics, or the checkpoint's with
    --resume (args.json's run-defining flags equal ours: prepare_run_dir)."""
    prepare_run_dir(args, ("metrics.json", "checkpoint.pt"), RESUME_KEYS)
    metrics = {"model": args.model, "dataset": args.dataset, "loss": args.loss, "k": args.k, "m": args.m,
               "seqlen": data.seqlen, "eval_seqlen": data.eval_seqlen, "train_tokens": data.blocks.numel(),
               "eval_tokens": data.test_ids.numel(), "global_bs": plan.global_bs, "ppl_before": None,
               "ppl_after": None, "train_loss": [], "steps": 0, "seconds": 0.0, "quantized": codes_before is not None,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "args": run_args(args)}
    if updater is not None:
        metrics.update(code_groups=updater.groups(), codes_changed=0, code_updates=0)
    if not args.resume:
        return None, metrics
    ckpt = load_checkpoint(os.path.join(args.out, "checkpoint.pt"), CHECKPOINT_KEYS)
    if ckpt["metrics"]["global_bs"] != plan.global_bs:  # --micro-bs x processes: any split of it resumes
        raise UserError(f"--resume: {args.out} was started with --micro-bs x processes = "
                        f"{ckpt['metrics']['global_bs']}, now {plan.global_bs}")
    return ckpt, ckpt["metrics"]


def evaluate(args, model, data, device):
    return lm.perplexity(model, data.test_ids, data.eval_seqlen, args.eval_bs, device, args.eval_windows)


def spread_over_ranks(args, objective, model, rank, world):
    """The objective training runs: FSDP-sharded blocks (--fsdp), DDP under torchrun, else itself."""
    if not args.fsdp:
        return DistributedDataParallel(objective) if world > 1 else objective
    train_objective, blocks_sharded = fully_shard_blocks(objective, model)
    if rank == 0:
        print(f"FSDP: {blocks_sharded} transformer blocks + the rest sharded over {world} processes")
    return train_objective


def restore(ckpt, model, optimizer, scheduler, out):
    """(first epoch, step) to go on from: the checkpoint's state loaded, or (0, 0) for a new run."""
    if ckpt is None:
        return 0, 0
    load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    print(f"resumed from {os.path.join(out, 'checkpoint.pt')} after epoch {ckpt['epoch']} (step {ckpt['step']})")
    return ckpt["epoch"], ckpt["step"]


def train_epoch(args, loop, plan, blocks, epoch, step, rank, device, metrics):
    """One epoch (or what is left of the run's steps) of `loop` (model, objective, optimizer, scheduler,
    autocast, code updater, probe loss): (this rank's micro-batch losses, the step reached)."""
    loop.model.train()
    # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    losses, pending = [], 0
    bar = tqdm(range(plan.micro_batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=rank != 0)
    for i in bar:
        first = i * plan.global_bs + rank * args.micro_bs
        input_ids = blocks[order[first:min(first + args.micro_bs, (i + 1) * plan.global_bs)]].to(device)
        with loop.autocast:
            loss = loop.objective(input_ids, lm.shift_labels(input_ids))
        (loss / args.grad_accum).backward()
        losses.append(loss.item())
        pending += 1
        if pending == args.grad_accum or i == plan.micro_batches - 1:
            loop.optimizer.step()
            loop.scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
            pending, step = 0, step + 1
            if loop.updater is not None and step % args.update_codes_every == 0:
                metrics["codes_changed"] += loop.updater.step(loop.probe_loss)
                metrics["code_updates"] += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}", step=step)
            if step >= plan.total_steps:
                break
    return losses, step


def save_epoch(args, loop, epoch, step, metrics, rank):
    """The checkpoint of a finished epoch (for --resume) and metrics.json, written by rank 0."""
    model_state, optimizer_state = full_state(loop.model, loop.optimizer)  # every rank takes part
    if rank == 0:
        print(f"epoch {epoch + 1}: train {args.loss} loss {metrics['train_loss'][-1]:.4f} ({step} steps)")
        atomic_save({"model": model_state, "optimizer": optimizer_state, "scheduler": loop.scheduler.state_dict(),
                     "rng": rng_state(), "epoch": epoch + 1, "step": step, "metrics": metrics},
                    os.path.join(args.out, "checkpoint.pt"))
        atomic_write_json(os.path.join(args.out, "metrics.json"), metrics)
    barrier()  # every rank sees the checkpoint of a finished epoch


def finish(args, model, tokenizer, data, device, updater, codes_before, metrics, clock):
    """Rank 0 after training: the perplexity after, the codes checked, the model saved, the checkpoint gone."""
    if hasattr(model, "rlo_quantization"):  # evaluate the packed model as its file stores it
        round_to_stored(model, model.rlo_quantization.get("stored_dtype") or "float16")
    metrics["ppl_after"] = evaluate(args, model, data, device)
    print(f"perplexity after finetuning: {metrics['ppl_after']:.3f}")
    if updater is not None:
        updater.close()
        metrics["codes_differ"] = updater.differ()
        print(f"code updates: {metrics['codes_changed']} code groups re-encoded in {metrics['code_updates']} "
              f"updates; {metrics['codes_differ']} of {metrics['code_groups']} groups differ from the start")
    elif codes_before is not None:
        codes_after = code_buffers(model)
        metrics["codes_unchanged"] = all(torch.equal(codes_after[k].cpu(), v.cpu()) for k, v in codes_before.items())
        if not metrics["codes_unchanged"]:
            raise RuntimeError("finetuning in quantized space changed the frozen codes")  # a bug, not a user error
    lm.save_pretrained(model, tokenizer, args.out)
    metrics["seconds"] = clock()
    atomic_write_json(os.path.join(args.out, "metrics.json"), metrics)
    # The finished model is saved; the optimizer checkpoint (3x the model) is only for resuming.
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    print(f"saved model, tokenizer and metrics.json to {args.out}")
    return metrics


if __name__ == "__main__":
    cli(main)
