"""Image classification with cross-entropy, focal loss or rooted logistic objectives (RLO).

    python train.py                                   # cifar10, ViT, root loss (k=3, m=3), 200 epochs
    python train.py --dataset cifar100 --net Swin --k 8 --m 10
    python train.py --dataset fake --net res18 --epochs 1 --max-steps 20   # offline smoke run
    torchrun --nproc_per_node=4 train.py --dataset cifar10 --net res50 --loss ce

Writes `--out` (default runs/<dataset>_<net>_<loss>[_k<k>_m<m>]): args.json, metrics.csv (one row per
epoch), last.pt (full training state, for --resume) and best.pt (model with the best test accuracy),
all written atomically. `python plot.py runs/A runs/B` compares runs.
"""
import argparse
import itertools
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, Subset
from tqdm import tqdm

import models
from data import vision
from engine import ArgumentParser, CSVLogger, UserError, atomic_save, atomic_write_json, cli, require_positive_ints
from engine.distributed import distributed
from losses import get_loss

CLASSIFICATION_LOSSES = ("ce", "focal", "root", "root_convex")
FIELDS = ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
          "wall_seconds"]
# Arguments that define a run: --resume refuses to continue a run started with other values.
RUN_KEYS = ("dataset", "net", "loss", "k", "m", "gamma", "opt", "lr", "wd", "momentum", "bs", "sched",
            "warmup", "epochs", "aug", "size", "seed", "patch", "dimhead", "max_steps", "num_classes",
            "fake_n", "pretrained")
# What last.pt holds besides "args"; --resume checks them all before anything is built.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_acc", "wall_seconds", "rng")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of: {', '.join(vision.DATASETS)}")
    a("--data-dir", default="./data", help="root folder holding the data sets (layouts: data/vision.py)")
    a("--download", action="store_true", help="let torchvision download CIFAR / Food-101 (needs network)")
    a("--net", default="ViT", help=f"one of: {', '.join(models.MODELS)}")
    a("--pretrained", default=None, help="local weights file (.safetensors, torch state dict, or our .pt)")
    a("--patch", type=int, default=None, help="ViT/CaiT/Mixer patch or Swin window (default 4 at 32px)")
    a("--dimhead", type=int, default=None, help="width of the ViT/CaiT/Mixer family (default 512); of the first "
                                                "ResNet stage (default 64)")
    a("--loss", default="root", help=f"one of: {', '.join(CLASSIFICATION_LOSSES)}")
    a("--k", type=float, default=3.0, help="RLO root order k")
    a("--m", type=float, default=3.0, help="RLO scale m")
    a("--gamma", type=float, default=3.0, help="focal loss gamma (alpha 0.25)")
    a("--epochs", "--n_epochs", dest="epochs", type=int, default=200)
    a("--opt", default="adamw", help="adamw, adam or sgd")
    a("--lr", type=float, default=None, help="default 1e-3 for convnets, 1e-4 for transformers (authors')")
    a("--wd", type=float, default=None, help="weight decay; default 0.01 adamw, 0 adam, 5e-4 sgd")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--bs", type=int, default=512, help="global batch size (split across processes)")
    a("--sched", default="cosine", help="cosine (per step, after warmup) or none")
    a("--warmup", type=float, default=0.0, help="linear warmup length in epochs")
    a("--aug", default="basic", help=f"one of: {', '.join(vision.AUGS)} (see data/vision.py)")
    a("--noaug", dest="aug", action="store_const", const="none", help="same as --aug none")
    a("--size", type=int, default=None, help="image size (default: 32 for CIFAR/fake, 224 otherwise)")
    a("--num-classes", type=int, default=10, help="classes of the fake data set")
    a("--fake-n", type=int, default=5000, help="training images of the fake data set (test: n // 5)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per rank")
    a("--out", default=None, help="run folder (default runs/<dataset>_<net>_<loss>...)")
    a("--overwrite", action="store_true", help="replace a run already in --out")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--seed", type=int, default=0)
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast (fp16 + grad scaling on GPUs without bf16); default: on for CUDA, off on CPU")
    a("--noamp", dest="amp", action="store_false", help="same as --no-amp")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="NHWC memory format; default: on for convnets")
    a("--max-steps", type=int, default=None, help="cut every epoch to at most this many steps")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    a("--log-every", type=int, default=50, help="steps between progress-bar metric updates (host syncs)")
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    return resolve(args)


def resolve(args):
    """Validate names and values; fill the defaults that depend on other arguments."""
    args.dataset = vision.canonical_name(args.dataset)
    args.net = models.canonical_name(args.net)
    args.loss = args.loss.lower()
    if args.loss not in CLASSIFICATION_LOSSES:
        raise UserError(f"unknown loss {args.loss!r}; choose from: {', '.join(CLASSIFICATION_LOSSES)}")
    args.opt, args.sched, args.aug = args.opt.lower(), args.sched.lower(), args.aug.lower()
    if args.opt not in ("adamw", "adam", "sgd"):
        raise UserError(f"unknown opt {args.opt!r}; choose from: adamw, adam, sgd")
    if args.sched not in ("cosine", "none"):
        raise UserError(f"unknown sched {args.sched!r}; choose from: cosine, none")
    if args.aug not in vision.AUGS:
        raise UserError(f"unknown aug {args.aug!r}; choose from: {', '.join(vision.AUGS)}")
    require_positive_ints(args, "epochs", "bs", "eval_every", "log_every", "num_classes", "fake_n", "max_steps")
    if args.workers < 0 or args.warmup < 0:
        raise UserError("--workers and --warmup must be >= 0")
    convnet = args.net in models.CONVNETS
    if args.lr is None:
        args.lr = 1e-3 if convnet else 1e-4
    if args.wd is None:
        args.wd = {"adamw": 0.01, "adam": 0.0, "sgd": 5e-4}[args.opt]
    if not min(args.lr, args.wd, args.momentum) >= 0:  # torch's optimizers would raise a traceback
        raise UserError(f"--lr, --wd and --momentum must be >= 0, got {args.lr}, {args.wd}, {args.momentum}")
    if args.size is None:
        args.size = 224 if args.net == "vit_timm" else vision.default_size(args.dataset)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    if args.channels_last is None:
        args.channels_last = convnet
    if args.out is None:
        rlo = f"_k{args.k:g}_m{args.m:g}" if args.loss.startswith("root") else ""
        args.out = os.path.join("runs", f"{args.dataset}_{args.net}_{args.loss}{rlo}")
    # Built here so a bad k / m / gamma is reported before anything is loaded.
    args.criterion = get_loss(args.loss, k=args.k, m=args.m, gamma=args.gamma)
    return args


class EpochTagged(Sampler):
    """Yields (epoch, index) so each sample's augmentation can be seeded by (seed, epoch, index)."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


class SeededSamples(Dataset):
    """Runs the dataset's random transforms under a seed fixed by (seed, epoch, index): the same
    augmented batch whatever the worker count, process count or a resume in between."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + i) % (1 << 63))
            return self.dataset[i]


def make_loaders(args, train_ds, test_ds, rank, world, device):
    per_rank = args.bs // world
    sampler = EpochTagged(DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                             seed=args.seed))
    # drop_last: a last batch of one image breaks BatchNorm (and skews the step size).
    batches = BatchSampler(sampler, per_rank, drop_last=True)
    # Own generators: creating a loader iterator draws worker seeds, which must not shift the global
    # RNG (dropout) differently for different --workers (augmentations are seeded per sample anyway).
    common = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                  persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed))
    train = DataLoader(SeededSamples(train_ds, args.seed), batch_sampler=batches, **common)
    # Each rank evaluates every world-th test image: exact totals after an all-reduce, no padding.
    test = DataLoader(Subset(test_ds, range(rank, len(test_ds), world)), batch_size=per_rank, **common)
    return sampler, train, test


def lr_factor(step, total, warmup, sched):
    if step < warmup:
        return (step + 1) / warmup
    if sched == "none":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    cls = torch.optim.AdamW if args.opt == "adamw" else torch.optim.Adam
    return cls(params, lr=args.lr, weight_decay=args.wd)


def autocast_dtype(device):
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def train_step(model, x, y, criterion, optimizer, scaler, autocast, sums):
    """One optimizer step. Metrics are added into the device tensor `sums` = [loss * n, correct, n];
    nothing here waits for the device."""
    with autocast():
        logits = model(x)
    loss = criterion(logits, y)  # the losses compute in fp32 from bf16/fp16 logits
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        n = y.shape[0]
        sums[0] += loss.detach() * n
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += n


@torch.no_grad()
def evaluate(model, loader, criterion, autocast, device, memory_format):
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        sums[0] += criterion(logits, y) * y.shape[0]
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.shape[0]
    return reduce_mean(sums)


def reduce_mean(sums):
    """(mean loss, accuracy in %) over all ranks' samples."""
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, correct, n = sums.tolist()
    return loss / max(n, 1), 100.0 * correct / max(n, 1)


def rng_states(world):
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def prepare_out(args, rank):
    """Check --out against --resume / --overwrite; return the checkpoint to resume from, or None."""
    files = ("args.json", "metrics.csv", "last.pt", "best.pt")
    holds_run = any(os.path.exists(os.path.join(args.out, f)) for f in files)
    last = os.path.join(args.out, "last.pt")
    if args.resume:
        if not os.path.isfile(last):
            raise UserError(f"--resume: no checkpoint {last}")
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=True)
            saved = ckpt["args"]
            _ = [ckpt[k] for k in CHECKPOINT_KEYS]  # all that run() reads back
        except Exception as err:
            msg = f"--resume: cannot read {last} ({type(err).__name__}: {err})"
            raise UserError(msg.splitlines()[0]) from None
        changed = [f"--{k} {saved.get(k)} -> {getattr(args, k)}"
                   for k in RUN_KEYS if saved.get(k) != getattr(args, k)]
        if changed:
            raise UserError(f"--resume: {args.out} was started with other arguments: {'; '.join(changed)}")
        return ckpt
    if holds_run and not args.overwrite:
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it "
                        "or --overwrite to replace it")
    if holds_run and rank == 0:
        for f in files:
            if os.path.exists(os.path.join(args.out, f)):
                os.remove(os.path.join(args.out, f))
    return None


def main(argv=None):
    args = parse_args(argv)
    with distributed(args.device) as (rank, world, device):
        return run(args, rank, world, device)


def run(args, rank, world, device):
    if args.bs % world:
        raise UserError(f"--bs {args.bs} is not divisible by the {world} processes")
    ckpt = prepare_out(args, rank)
    criterion = args.criterion
    run_args = {k: v for k, v in vars(args).items() if k != "criterion"}

    data = dict(root=args.data_dir, size=args.size, download=args.download and rank == 0,
                num_classes=args.num_classes, n=args.fake_n)
    if args.net == "vit_timm":  # timm's ViT-B/16 weights expect inputs scaled to [-1, 1]
        data.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if args.download and world > 1:  # rank 0 downloads, the others wait and read
        if rank == 0:
            vision.build_dataset(args.dataset, split="train", aug="none", **data)
        dist.barrier()
        data["download"] = False
    train_ds = vision.build_dataset(args.dataset, split="train", aug=args.aug, **data)
    test_ds = vision.build_dataset(args.dataset, split="test", aug="none", **data)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = models.build_model(args.net, train_ds.num_classes, args.size, pretrained=args.pretrained,
                               patch=args.patch, dim=args.dimhead)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(args, model)
    sampler, train_loader, test_loader = make_loaders(args, train_ds, test_ds, rank, world, device)
    steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    if steps_per_epoch == 0:
        raise UserError(f"--bs {args.bs} is larger than the {len(train_ds)} training images")
    total_steps = args.epochs * steps_per_epoch
    warmup = round(args.warmup * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, args.sched))
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp)

    start_epoch, step, best_acc, wall_before = 0, 0, -1.0, 0.0
    torch.manual_seed(args.seed + rank)  # per-rank dropout streams
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        best_acc, wall_before = ckpt["best_acc"], ckpt["wall_seconds"]
        rng = ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    raw_model = model
    # Evaluation runs outside DDP: ranks may hold different numbers of test batches.
    eval_model = torch.compile(model) if args.compile else model
    model = eval_model
    if world > 1:
        model = DistributedDataParallel(eval_model,
                                        device_ids=[device.index] if device.type == "cuda" else None)

    log = None
    if rank == 0:
        if ckpt is None:
            atomic_write_json(os.path.join(args.out, "args.json"), run_args)
        log = CSVLogger(os.path.join(args.out, "metrics.csv"), FIELDS)
        log.truncate_after("epoch", start_epoch)  # rows a killed run logged after its last.pt
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.net} ({n_params / 1e6:.2f}M params) on {args.dataset} {args.size}px "
              f"({len(train_ds)} train / {len(test_ds)} test, {train_ds.num_classes} classes), "
              f"loss {args.loss}, "
              f"{world} x {device.type}, amp {args.amp}, channels_last {args.channels_last} -> {args.out}")

    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        sampler.set_epoch(epoch)
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0,
                   dynamic_ncols=True, leave=False)
        t_log, seen = time.time(), 0
        for i, (x, y) in enumerate(itertools.islice(train_loader, steps_per_epoch)):
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            train_step(model, x, y, criterion, optimizer, scaler, autocast, sums)
            scheduler.step()
            step += 1
            seen += y.shape[0] * world
            bar.update()
            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
                loss, correct, n = sums.tolist()  # the one host sync per log interval (this rank's view)
                now = time.time()
                bar.set_postfix(loss=f"{loss / n:.4f}", acc=f"{100 * correct / n:.2f}",
                                img_s=f"{seen / (now - t_log):.0f}")
                t_log, seen = now, 0
        bar.close()
        train_loss, train_acc = reduce_mean(sums)
        test_loss = test_acc = ""
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_loss, test_acc = evaluate(eval_model, test_loader, criterion, autocast, device, memory_format)
        epoch_seconds = time.time() - t_epoch
        wall = wall_before + time.time() - t_start
        rng = rng_states(world)
        if rank != 0:
            continue
        row = dict(epoch=epoch + 1, step=step, train_loss=train_loss, train_acc=train_acc,
                   test_loss=test_loss, test_acc=test_acc, lr=optimizer.param_groups[0]["lr"],
                   epoch_seconds=round(epoch_seconds, 3), wall_seconds=round(wall, 3))
        log.log(**row)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.2f} | test loss "
              f"{test_loss if test_loss == '' else f'{test_loss:.4f}'} acc "
              f"{test_acc if test_acc == '' else f'{test_acc:.2f}'} | {epoch_seconds:.1f}s")
        state = raw_model.state_dict()
        if test_acc != "" and test_acc > best_acc:
            best_acc = test_acc
            atomic_save({"model": state, "epoch": epoch + 1, "test_acc": test_acc, "args": run_args},
                        os.path.join(args.out, "best.pt"))
        atomic_save({"model": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step, "best_acc": best_acc,
                     "wall_seconds": wall, "rng": rng, "args": run_args}, os.path.join(args.out, "last.pt"))
    return args.out


if __name__ == "__main__":
    cli(main)
