"""Loss registry: every loss of the paper by its command-line name.

`get_loss(name, **kwargs)` returns an `nn.Module` called as `criterion(logits, target)`:
- multi-class (`ce`, `focal`, `root`, `root_convex`): logits (N, C) or (N, C, ...), integer targets
  with `ignore_index` (default -100) or soft targets (N, C) for mixup/cutmix; `reduction` mean/sum/none.
- binary (`logistic`, `binary_root_convex`, `binary_root`): logits z (N,), labels y in {-1, +1}
  (0 is read as -1).
`linear_token_loss(hidden, weight, labels, name, **kwargs)` is any multi-class loss of an LM head
computed without the (tokens x vocab) logits (`losses/fused.py`).
`get_gan_loss(name, k)` returns the generator / discriminator pair for `ce` (logistic) or `root`.
The formulas, their numerics and derivations are in `losses/rooted.py`.

Keyword arguments that another loss of the registry takes (e.g. `k` for `ce`) are ignored, so a script
can pass all of its loss flags to any loss; a keyword that no loss takes (a typo such as `gama`) and bad
values (`k`, `m` not finite and > 0, ...) raise a one-line `engine.UserError` (a ValueError).
"""
import inspect

from engine.errors import UserError

from .rooted import (BinaryRoot, BinaryRootConvex, CrossEntropy, Focal, Logistic, LogisticGANLoss,
                     Root, RootConvex, RootedGANLoss, target_log_prob)

LOSSES = {
    "ce": CrossEntropy,
    "focal": Focal,
    "root": Root,
    "root_convex": RootConvex,
    "logistic": Logistic,
    "binary_root_convex": BinaryRootConvex,
    "binary_root": BinaryRoot,
}

GAN_LOSSES = {"ce": LogisticGANLoss, "root": RootedGANLoss}


def _keywords(builder):
    """The keyword arguments `builder` takes, in order; subclasses forward **kw along the MRO."""
    names = {}
    for cls in builder.__mro__:
        if "__init__" in vars(cls):
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    names[p.name] = None
    return list(names)


def _build(registry, kind, name, kwargs):
    key = str(name).lower()
    if key not in registry:
        raise UserError(f"unknown {kind} {name!r}; choose from: {', '.join(registry)}")
    accepted = _keywords(registry[key])
    known = {kw for builder in registry.values() for kw in _keywords(builder)}
    unknown = [kw for kw in kwargs if kw not in known]
    if unknown:
        raise UserError(f"{kind} {key!r}: unknown keyword {', '.join(map(repr, unknown))}; it takes: "
                        f"{', '.join(accepted) or 'none'}")
    return registry[key](**{k: v for k, v in kwargs.items() if k in accepted})


def get_loss(name, **kwargs):
    """Build the loss `name` (case-insensitive) from LOSSES with the keyword arguments it takes."""
    return _build(LOSSES, "loss", name, kwargs)


def get_gan_loss(name, **kwargs):
    """Build the GAN loss `name` ('ce' or 'root') from GAN_LOSSES; `k` for 'root'."""
    return _build(GAN_LOSSES, "GAN loss", name, kwargs)


from .fused import linear_token_loss  # noqa: E402  (it builds its loss through get_loss)

__all__ = ["LOSSES", "GAN_LOSSES", "get_loss", "get_gan_loss", "linear_token_loss", "target_log_prob"]
