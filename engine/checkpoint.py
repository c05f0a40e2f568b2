"""Resume checkpoints shared by train.py and ft_opt.py: saved with `atomic_save`, read back here with
`torch.load(weights_only=True)` (tensors and plain containers only, never arbitrary pickles)."""
import os

import torch

from .errors import UserError


def load_checkpoint(path, keys):
    """The checkpoint at `path`, which must hold `keys`; a missing or unreadable file is one UserError."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint {path} (the run stopped before its first one; "
                        "start it again with --overwrite)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in keys if k not in ckpt]
    except Exception as err:
        msg = f"--resume: cannot read {path} ({type(err).__name__}: {err})"
        raise UserError(msg.splitlines()[0]) from None
    if missing:
        raise UserError(f"--resume: cannot read {path} (no {', '.join(missing)})")
    return ckpt


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(ckpt, **stateful):
    """`obj.load_state_dict(ckpt[name])` for each name=obj (model, optimizer, scheduler, ...)."""
    for name, obj in stateful.items():
        obj.load_state_dict(ckpt[name])
