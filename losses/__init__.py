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
from dataclasses import dataclass

from engine.errors import UserError

from .rooted import (BinaryRoot, BinaryRootConvex, CrossEntropy, Focal, Logistic, LogisticGANLoss,
                     Root, RootConvex, RootedGANLoss, target_log_prob)



@dataclass(frozen=True)
class Loss:
    """A registry entry: the nn.Module class and what scripts need to know about it."""
    cls: type
    help: str
    rooted: bool = False  # an RLO form: takes k (and m); runs are named and labelled by them
    multiclass: bool = True  # (N, C) logits and class targets; False: one logit z, labels y in {-1, +1}


LOSSES = {
    "ce": Loss(CrossEntropy, "cross-entropy"),
    "focal": Loss(Focal, "focal loss -alpha (1 - p_y)^gamma log p_y"),
    "root": Loss(Root, "bounded RLO m (1 - p_y^(1/k)) (the authors' training loss)", rooted=True),
    "root_convex": Loss(RootConvex, "convex RLO m (p_y^(-1/k) - 1) (paper eq. 4 for softmax)", rooted=True),
    "logistic": Loss(Logistic, "log(1 + e^(-y z))", multiclass=False),
    "binary_root_convex": Loss(BinaryRootConvex, "k (1 + e^(-y z))^(1/k) (paper eq. 4)", rooted=True,
                               multiclass=False),
    "binary_root": Loss(BinaryRoot, "k (1 - sigmoid(y z)^(1/k))", rooted=True, multiclass=False),
}

GAN_LOSSES = {"ce": Loss(LogisticGANLoss, "non-saturating logistic GAN loss"),
              "root": Loss(RootedGANLoss, "rooted GAN loss (paper eq. 9)", rooted=True)}


def names(multiclass=True):
    """Names of the multi-class (classification, token) losses, or of the binary ones."""
    return tuple(name for name, entry in LOSSES.items() if entry.multiclass == multiclass)


def is_rooted(name):
    entry = LOSSES.get(str(name).lower())
    return entry is not None and entry.rooted


def describe(multiclass=True):
    """'name: help' of each loss, for --help."""
    return "; ".join(f"{name}: {LOSSES[name].help}" for name in names(multiclass))


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
    accepted = _keywords(registry[key].cls)
    known = {kw for entry in registry.values() for kw in _keywords(entry.cls)}
    unknown = [kw for kw in kwargs if kw not in known]
    if unknown:
        raise UserError(f"{kind} {key!r}: unknown keyword {', '.join(map(repr, unknown))}; it takes: "
                        f"{', '.join(accepted) or 'none'}")
    return registry[key].cls(**{k: v for k, v in kwargs.items() if k in accepted})


def get_loss(name, **kwargs):
    """Build the loss `name` (case-insensitive) from LOSSES with the keyword arguments it takes."""
    return _build(LOSSES, "loss", name, kwargs)


def get_gan_loss(name, **kwargs):
    """Build the GAN loss `name` ('ce' or 'root') from GAN_LOSSES; `k` for 'root'."""
    return _build(GAN_LOSSES, "GAN loss", name, kwargs)


from .fused import linear_token_loss  # noqa: E402  (it builds its loss through get_loss)

__all__ = ["LOSSES", "GAN_LOSSES", "Loss", "names", "is_rooted", "describe", "get_loss", "get_gan_loss",
           "linear_token_loss", "target_log_prob"]
