"""Image classification with cross-entropy, focal loss or rooted logistic objectives (RLO).

    python train.py                                   # cifar10, ViT, root loss (k=3, m=3), 200 epochs
    python train.py --dataset cifar100 --net Swin --k 8 --m 10
    python train.py --dataset fake --net res18 --epochs 1 --steps-per-epoch 20   # offline smoke run
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

import losses
import models
from data import vision
from engine import (ArgumentParser, CSVLogger, UserError, add_common_args, atomic_save, cli, load_checkpoint,
                    prepare_run_dir, require_positive_ints, resolve_amp, restore, rng_state, run_args,
                    set_rng_state, set_threads)
from engine.distributed import distributed
from engine.loop import autocast_dtype, train_step

FIELDS = ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
          "wall_seconds", "val_loss", "val_acc"]  # val_*: empty without --val-split
# Arguments that define a run: --resume refuses to continue a run started with other values.
RUN_KEYS = ("dataset", "net", "loss", "k", "m", "gamma", "optimizer", "lr", "weight_decay", "momentum", "bs",
            "sched", "warmup_epochs", "epochs", "aug", "size", "seed", "patch", "dimhead", "steps_per_epoch",
            "num_classes", "fake_n", "pretrained", "val_split")
RUN_FILES = ("metrics.csv", "last.pt", "best.pt")
# What last.pt holds besides "args"; --resume checks them all before anything is built.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_acc", "wall_seconds", "rng")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of: {', '.join(vision.DATASETS)}")
    a("--download", action="store_true", help="let torchvision download CIFAR / Fashion-MNIST / Food-101 (needs network)")
    a("--net", default="ViT", help=f"one of: {', '.join(models.MODELS)}")
    a("--pretrained", default=None, help="local weights file (.safetensors, torch state dict, or our .pt), or "
      "'none' for random init; default: none, except finetuning nets (vit_timm), which need weights")
    a("--patch", type=int, default=None, help="ViT/CaiT/Mixer patch or Swin window (default 4 at 32px)")
    a("--dimhead", type=int, default=None, help="width of the ViT/CaiT/Mixer family (default 512); of the first "
                                                "ResNet stage (default 64)")
    a("--loss", default="root", help=losses.describe())
    a("--k", type=float, default=3.0, help="RLO root order k")
    a("--m", type=float, default=3.0, help="RLO scale m")
    a("--gamma", type=float, default=3.0, help="focal loss gamma (alpha 0.25)")
    a("--epochs", "--n_epochs", dest="epochs", type=int, default=200)
    a("--optimizer", "--opt", default="adamw", help="adamw, adam or sgd")
    a("--lr", type=float, default=None, help="default 1e-3 for convnets, 1e-4 for transformers (authors')")
    a("--weight-decay", "--wd", type=float, default=None, help="default 0.01 adamw, 0 adam, 5e-4 sgd")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--bs", type=int, default=512, help="global batch size: images per optimizer step, all processes together")
    a("--sched", default="cosine", help="cosine (per step, after warmup) or none")
    a("--warmup-epochs", type=float, default=0.0, help="linear warmup length in epochs")
    a("--aug", default="basic", help=f"one of: {', '.join(vision.AUGS)} (see data/vision.py)")
    a("--noaug", dest="aug", action="store_const", const="none", default=argparse.SUPPRESS,
      help="same as --aug none")
    a("--size", type=int, default=None, help="image size (default: 32 for CIFAR/fake, 224 otherwise)")
    a("--num-classes", type=int, default=10, help="classes of the fake data set")
    a("--fake-n", type=int, default=5000, help="training images of the fake data set (test: n // 5)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per rank")
    add_common_args(p, out="runs/<dataset>_<net>_<loss>[_k<k>_m<m>]", resume=True,
                    data_dir_help="root folder holding the data sets (layouts: data/vision.py)")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="bf16 autocast (fp16 + grad scaling on GPUs without bf16); default: on for CUDA, off on CPU")
    a("--noamp", dest="amp", action="store_false", default=argparse.SUPPRESS, help="same as --no-amp")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="NHWC memory format; default: on for convnets")
    a("--steps-per-epoch", type=int, default=None, help="cut every epoch to at most this many steps (default: all)")
    a("--val-split", type=int, default=0, help="hold out the last N training images (no augmentation) as a "
      "validation set, evaluated beside the test set; best.pt then follows the validation accuracy (for tuning "
      "on data the test split never sees)")
    a("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    a("--log-every", type=int, default=50, help="steps between progress-bar metric updates (host syncs)")
    args = p.parse_args(argv)
    return resolve(args)


def resolve(args):
    """Validate names and values; fill the defaults that depend on other arguments."""
    args.dataset = vision.canonical_name(args.dataset)
    args.net = models.canonical_name(args.net)
    args.loss = args.loss.lower()
    if args.loss not in losses.names():
        raise UserError(f"unknown loss {args.loss!r}; choose from: {', '.join(losses.names())}")
    args.optimizer, args.sched, args.aug = args.optimizer.lower(), args.sched.lower(), args.aug.lower()
    if args.optimizer not in ("adamw", "adam", "sgd"):
        raise UserError(f"unknown optimizer {args.optimizer!r}; choose from: adamw, adam, sgd")
    if args.sched not in ("cosine", "none"):
        raise UserError(f"unknown sched {args.sched!r}; choose from: cosine, none")
    if args.aug not in vision.AUGS:
        raise UserError(f"unknown aug {args.aug!r}; choose from: {', '.join(vision.AUGS)}")
    require_positive_ints(args, "epochs", "bs", "eval_every", "log_every", "num_classes", "fake_n",
                          "steps_per_epoch", "threads")
    if args.workers < 0 or args.warmup_epochs < 0 or args.val_split < 0:
        raise UserError("--workers, --warmup-epochs and --val-split must be >= 0")
    convnet = models.MODELS[args.net].convnet
    if args.lr is None:
        args.lr = 1e-3 if convnet else 1e-4
    if args.weight_decay is None:
        args.weight_decay = {"adamw": 0.01, "adam": 0.0, "sgd": 5e-4}[args.optimizer]
    if not min(args.lr, args.weight_decay, args.momentum) >= 0:  # torch's optimizers would raise a traceback
        raise UserError(f"--lr, --weight-decay and --momentum must be >= 0, got {args.lr}, {args.weight_decay}, "
                        f"{args.momentum}")
    if args.size is None:
        args.size = 224 if models.MODELS[args.net].finetune else vision.default_size(args.dataset)
    args.amp = args.device.startswith("cuda") if args.amp is None else resolve_amp(args.amp, args.device)
    if args.channels_last is None:
        args.channels_last = convnet
    if args.out is None:
        rlo = f"_k{args.k:g}_m{args.m:g}" if losses.is_rooted(args.loss) else ""
        args.out = os.path.join("runs", f"{args.dataset}_{args.net}_{args.loss}{rlo}")
    # Built here so a bad k / m / gamma is reported before anything is loaded.
    args.criterion = losses.get_loss(args.loss, k=args.k, m=args.m, gamma=args.gamma)
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
        # Only the CPU generator: the transforms draw from it, and torch.manual_seed would also queue a
        # reseed of every accelerator (a few ms per sample, and the GPU's dropout stream reset each time).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + i) % (1 << 63))
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
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=args.lr, weight_decay=args.weight_decay)


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
    state = rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def main(argv=None):
    args = parse_args(argv)
    set_threads(args)
    with distributed(args.device) as (rank, world, device):
        return run(args, rank, world, device)


class Run:
    """Everything one process trains with; `build` makes it, `restore` loads a checkpoint into it."""

    def __init__(self, args, rank, world, device):
        if args.bs % world:
            raise UserError(f"--bs {args.bs} is not divisible by the {world} processes")
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.train_ds, self.test_ds, self.val_ds = build_data(args, rank, world)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        self.model = models.build_model(args.net, self.train_ds.num_classes, args.size, pretrained=args.pretrained,
                                        patch=args.patch, dim=args.dimhead)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)
        self.optimizer = make_optimizer(args, self.model)
        self.sampler, self.train_loader, self.test_loader = make_loaders(args, self.train_ds, self.test_ds, rank,
                                                                         world, device)
        self.val_loader = None
        if self.val_ds is not None:  # evaluated like the test set (each rank every world-th image)
            self.val_loader = make_loaders(args, self.train_ds, self.val_ds, rank, world, device)[2]
        self.steps_per_epoch = min(len(self.train_loader), args.steps_per_epoch or len(self.train_loader))
        if self.steps_per_epoch == 0:
            raise UserError(f"--bs {args.bs} is larger than the {len(self.train_ds)} training images")
        total, warmup = args.epochs * self.steps_per_epoch, round(args.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warmup, args.sched))
        self.amp_dtype = autocast_dtype(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp and self.amp_dtype == torch.float16)
        self.epoch, self.step, self.best_acc, self.wall_before = 0, 0, -1.0, 0.0
        torch.manual_seed(args.seed + rank)  # per-rank dropout streams
        # Evaluation runs outside DDP: ranks may hold different numbers of test batches.
        self.eval_model = torch.compile(self.model) if args.compile else self.model
        self.train_model = self.eval_model
        if world > 1:
            self.train_model = DistributedDataParallel(
                self.eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.args.amp)

    def restore(self, ckpt):
        restore(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best_acc, self.wall_before = ckpt["best_acc"], ckpt["wall_seconds"]
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])

    def train_epoch(self, epoch):
        """One epoch (and its evaluation when due): the metrics row."""
        args, device = self.args, self.device
        t_epoch = time.time()
        self.sampler.set_epoch(epoch)
        self.train_model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=self.rank != 0,
                   dynamic_ncols=True, leave=False)
        t_log, seen = time.time(), 0
        for i, (x, y) in enumerate(itertools.islice(self.train_loader, self.steps_per_epoch)):
            x = x.to(device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(device, non_blocking=True)
            train_step(self.train_model, x, y, args.criterion, self.optimizer, self.scaler, self.autocast, sums)
            self.scheduler.step()
            self.step += 1
            seen += y.shape[0] * self.world
            bar.update()
            if (i + 1) % args.log_every == 0 or i + 1 == self.steps_per_epoch:
                loss, correct, n = sums.tolist()  # the one host sync per log interval (this rank's view)
                now = time.time()
                bar.set_postfix(loss=f"{loss / n:.4f}", acc=f"{100 * correct / n:.2f}",
                                img_s=f"{seen / (now - t_log):.0f}")
                t_log, seen = now, 0
        bar.close()
        train_loss, train_acc = reduce_mean(sums)
        test_loss = test_acc = val_loss = val_acc = ""
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_loss, test_acc = evaluate(self.eval_model, self.test_loader, args.criterion, self.autocast, device,
                                           self.memory_format)
            if self.val_loader is not None:
                val_loss, val_acc = evaluate(self.eval_model, self.val_loader, args.criterion, self.autocast, device,
                                             self.memory_format)
        self.epoch = epoch + 1
        return dict(epoch=epoch + 1, step=self.step, train_loss=train_loss, train_acc=train_acc,
                    test_loss=test_loss, test_acc=test_acc, lr=self.optimizer.param_groups[0]["lr"],
                    epoch_seconds=round(time.time() - t_epoch, 3), val_loss=val_loss, val_acc=val_acc)

    def save(self, row, rng):
        """best.pt when the test (with --val-split: validation) accuracy improved, then last.pt (rank 0)."""
        out, saved_args = self.args.out, run_args(self.args)
        state = self.model.state_dict()
        acc = row["val_acc" if self.val_ds is not None else "test_acc"]
        if acc != "" and acc > self.best_acc:
            self.best_acc = acc
            atomic_save({"model": state, "epoch": row["epoch"], "test_acc": row["test_acc"], "val_acc": row["val_acc"],
                         "args": saved_args}, os.path.join(out, "best.pt"))
        atomic_save({"model": state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": row["epoch"], "step": row["step"],
                     "best_acc": self.best_acc, "wall_seconds": row["wall_seconds"], "rng": rng, "args": saved_args},
                    os.path.join(out, "last.pt"))


def build_data(args, rank, world):
    data = dict(root=args.data_dir, size=args.size, download=args.download and rank == 0,
                num_classes=args.num_classes, n=args.fake_n)
    if args.net == "vit_timm":  # timm's ViT-B/16 weights expect inputs scaled to [-1, 1]
        data.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if args.download and world > 1:  # rank 0 downloads, the others wait and read
        if rank == 0:
            vision.build_dataset(args.dataset, split="train", aug="none", **data)
        dist.barrier()
        data["download"] = False
    train = vision.build_dataset(args.dataset, split="train", aug=args.aug, **data)
    test = vision.build_dataset(args.dataset, split="test", aug="none", **data)
    if not args.val_split:
        return train, test, None
    n = len(train) - args.val_split
    if n < 1:
        raise UserError(f"--val-split {args.val_split} leaves no training images (the set has {len(train)})")
    plain = vision.build_dataset(args.dataset, split="train", aug="none", **data)
    return Part(train, range(n)), test, Part(plain, range(n, len(plain)))


class Part(Subset):
    """Some images of a data set, keeping its class count."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, indices)
        self.num_classes = dataset.num_classes


def run(args, rank, world, device):
    r = Run(args, rank, world, device)  # data and model first: a bad --data-dir leaves --out untouched
    prepare_run_dir(args, RUN_FILES, RUN_KEYS)
    if args.resume:
        r.restore(load_checkpoint(os.path.join(args.out, "last.pt"), CHECKPOINT_KEYS))
    log = None
    if rank == 0:
        log = CSVLogger(os.path.join(args.out, "metrics.csv"), FIELDS)
        log.truncate_after("epoch", r.epoch)  # rows a killed run logged after its last.pt
        n_params = sum(p.numel() for p in r.model.parameters())
        print(f"{args.net} ({n_params / 1e6:.2f}M params) on {args.dataset} {args.size}px "
              f"({len(r.train_ds)} train / {len(r.test_ds)} test, {r.train_ds.num_classes} classes), "
              f"loss {args.loss}, "
              f"{world} x {device.type}, amp {args.amp}, channels_last {args.channels_last} -> {args.out}")
    t_start = time.time()
    for epoch in range(r.epoch, args.epochs):
        row = r.train_epoch(epoch)
        row["wall_seconds"] = round(r.wall_before + time.time() - t_start, 3)
        rng = rng_states(world)
        if rank != 0:
            continue
        log.log(**row)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} | "
              f"test loss {row['test_loss'] if row['test_loss'] == '' else format(row['test_loss'], '.4f')} acc "
              f"{row['test_acc'] if row['test_acc'] == '' else format(row['test_acc'], '.2f')} | "
              f"{row['epoch_seconds']:.1f}s")
        r.save(row, rng)
    return args.out


if __name__ == "__main__":
    cli(main)
