"""The flags every script shares, with one meaning each (README "Conventions"), and the run folder.

`add_common_args(parser, out=...)` adds --out, --overwrite, (--resume), --seed, --device, --data-dir and
--threads; `prepare_run_dir(args, files)` checks --out against --overwrite / --resume and writes
args.json atomically. Under torchrun only rank 0 looks at the folder and the others receive its verdict,
so no rank sees the args.json that rank 0 has just written.
"""
import json
import os

import torch
import torch.distributed as dist

from .errors import UserError
from .io import atomic_write_json

DATA_DIR_ENV = "RLO_DATA_DIR"


def default_data_dir():
    """$RLO_DATA_DIR, else ./datasets (gitignored; not ./data, which is the `data` Python package)."""
    return os.environ.get(DATA_DIR_ENV) or "datasets"


def default_threads():
    # torch's default, one thread per core, crawls when other jobs share the cores (opt.py barely
    # progressed on a busy 2-core machine); half the cores, at most 8, stays fast when alone.
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(p, out, resume=False, seeds=False, seed_help="random seed", device=None,
                    data_dir_help="folder holding the data sets", data_dir=None, threads=None):
    """The shared flags. `out`: the default run folder in words; `seeds`: --seed takes a list (one run
    each; --seeds is an alias); `device`/`data_dir`/`threads`: the script's defaults where they differ,
    False for a script without that flag (regression.py runs on the CPU, gan.py generates its data)."""
    a = p.add_argument
    a("--out", default=None, help=f"run folder (default: {out})")
    a("--overwrite", action="store_true", help="replace the run already in --out")
    if resume:
        a("--resume", action="store_true", help="continue the run in --out (same run-defining flags)")
    if seeds:
        a("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0], help=f"{seed_help}; one run per seed")
    else:
        a("--seed", type=int, default=0, help=seed_help)
    if device is not False:
        a("--device", default=device or default_device(), help="cuda, cuda:N or cpu")
    if data_dir is not False:
        a("--data-dir", default=data_dir or default_data_dir(),
          help=f"{data_dir_help} (default: ${DATA_DIR_ENV}, else ./datasets; now %(default)s)")
    a("--threads", type=int, default=threads or default_threads(), help="torch CPU threads (torch.set_num_threads)")


def set_threads(args):
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def run_args(args):
    """args as JSON-able values (objects a script attached, such as a built criterion, dropped)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool, list, tuple))}


def _check_run_dir(args, files, run_keys):
    out = args.out
    present = [f for f in ("args.json", *files) if os.path.exists(os.path.join(out, f))]
    resume = getattr(args, "resume", False)
    if resume:
        path = os.path.join(out, "args.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"--resume: no run to continue in {out} (cannot read {path}: {type(err).__name__})") from None
        current = run_args(args)
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {current.get(k)}" for k in run_keys
                   if saved.get(k) != current.get(k)]
        if changed:
            raise UserError(f"--resume: {out} was started with other arguments: {'; '.join(changed)}")
        return
    if present and not args.overwrite:
        raise UserError(f"{out} already holds a run; pass "
                        + ("--resume to continue it or " if hasattr(args, "resume") else "")
                        + "--overwrite to replace it, or choose another --out")
    for f in present:
        os.remove(os.path.join(out, f))
    atomic_write_json(os.path.join(out, "args.json"), run_args(args))


def prepare_run_dir(args, files=(), run_keys=()):
    """Refuse an --out that holds a run (args.json or any of `files`) unless --overwrite (its `files`
    are removed) or --resume (args.json's `run_keys` must equal ours); write args.json for a new run.
    Under torchrun rank 0 decides and writes, then every rank raises the same UserError or none."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    error = None
    if rank0:
        try:
            _check_run_dir(args, files, run_keys)
        except UserError as err:
            error = str(err)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
