"""Rooted logistic objectives (RLO) and their cross-entropy relatives, computed stably.

The paper approximates log(u) ~ k * (u^(1/k) - 1) for large k. Two multi-class forms follow, both in
the authors' public code, both here:

- ``root`` (the authors' training form, behind the paper's CIFAR / Tiny-ImageNet / Food-101 tables):
  ``loss_i = m * (1 - p_y^(1/k))``. Bounded by m; with m = k it tends to cross-entropy as k -> inf.
- ``root_convex`` (paper eq. 4 written for softmax): ``loss_i = m * (p_y^(-1/k) - 1)``. For two classes
  with logit z it is ``m * ((1 + exp(-y z))^(1/k) - 1)``, the strictly convex rooted logistic loss of
  Lemma 1 (m = k). Also tends to cross-entropy as k -> inf with m = k.

Every multi-class form is a function f(log p_y) of the target log-probability, so one memory-light
autograd function (`target_log_prob`) computes ``log p_y = z_y - logsumexp(z)`` in fp32 (float64 for
float64 input) and its gradient ``(onehot(y) - softmax(z)) * g`` in closed form, chunked over rows:
it saves only the logits, so a (tokens x vocab) LM head costs one gradient tensor and no fp32 copy.
The per-form f then runs through ordinary autograd on an (N,) vector, which costs nothing.

The authors' code computes softmax, indexes it, then takes a power: p_y underflows to 0 for confident
mistakes and the gradient becomes NaN. Here ``p_y^(1/k) = exp(log p_y / k)`` never underflows to a NaN.

The convex forms grow like ``exp(-log p_y / k)``, which overflows fp32 when ``-log p_y / k > 88``
(e.g. a logit margin of 1e4 at k = 3). Their exponent is clamped in log space at ``MAX_EXPONENT`` = 80
for fp32/bf16 logits and lower for fp16 logits (where the gradient, stored in fp16, would otherwise
overflow 65504; see `exponent_limit`); beyond the clamp the loss and its gradient coefficient stay at
the (finite, huge) value at the clamp. The clamp is straight-through: a clamped sample still gets a
gradient pointing the right way.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError

MAX_EXPONENT = 80.0  # exp(80) ~ 5.5e34 < fp32 max ~ 3.4e38, with room for the factor m
_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of ~4M logits (16 MB of fp32 temporaries)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _softplus(x):
    # torch's softplus returns x above its threshold (20): exact to fp32, off by e^-20 ~ 2e-9 in float64.
    return F.softplus(x, threshold=40.0 if x.dtype == torch.float64 else 20.0)


def _upcast(x):
    return x.to(_compute_dtype(x))


def _row_chunks(n_rows, n_cols):
    step = max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    return [(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


class _TargetLogProb(torch.autograd.Function):
    """log p_y = log_softmax(z)[y] per row, fp32 (or float64) math, gradient in closed form.

    Both passes use torch's fused (log_)softmax kernels on row chunks, so the only full-size
    tensors are the saved logits and the gradient; the chunk temporaries are bounded.
    """

    @staticmethod
    def forward(ctx, logits, target):
        dtype = _compute_dtype(logits)
        n, c = logits.shape
        logp = torch.empty(n, dtype=dtype, device=logits.device)
        for s, e in _row_chunks(n, c):
            chunk = F.log_softmax(logits[s:e], dim=1, dtype=dtype)
            logp[s:e] = chunk.gather(1, target[s:e, None]).squeeze(1)
        ctx.save_for_backward(logits, target)
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        dtype = _compute_dtype(logits)
        n, c = logits.shape
        if torch.is_grad_enabled():  # create_graph=True (Hessians, gradient penalties): out of place
            g = grad_out.to(dtype)[:, None]
            onehot = F.one_hot(target, c).to(dtype)
            return ((onehot - F.softmax(logits, dim=1, dtype=dtype)) * g).to(logits.dtype), None
        chunks = _row_chunks(n, c)
        grad = None if len(chunks) == 1 and logits.dtype == dtype else torch.empty_like(logits)
        g = grad_out.to(dtype)[:, None]
        for s, e in chunks:
            # d(log p_y)/dz = onehot(y) - softmax(z)
            chunk = F.softmax(logits[s:e], dim=1, dtype=dtype).mul_(-g[s:e])
            chunk.scatter_add_(1, target[s:e, None], g[s:e])
            if grad is None:
                return chunk, None
            grad[s:e] = chunk
        return grad, None


def target_log_prob(logits, target):
    """log softmax(logits)[i, target_i] for (N, C) logits and (N,) int targets, shape (N,), fp32+."""
    return _TargetLogProb.apply(logits, target)


# Per-form f(log p_y): the per-sample loss as a function of the target log-probability.
def _ce(logp):
    return -logp


def exponent_limit(dtype, scale=1.0):
    """Largest exponent e with scale * exp(e) safely finite in `dtype` (capped at MAX_EXPONENT)."""
    headroom = math.log(torch.finfo(dtype).max) - math.log(max(scale, 1.0)) - 1.0
    return min(MAX_EXPONENT, headroom)


def _clamped_exp_argument(exponent, limit):
    """exponent clamped at `limit` in value, with the unclamped exponent's gradient (straight-through)."""
    return exponent + (exponent.clamp(max=limit) - exponent).detach()


def _root(logp, k, m):
    # expm1 keeps precision for large k, where p_y^(1/k) is within 1e-5 of 1.
    return -m * torch.expm1(logp / k)


def _root_convex(logp, k, m, limit):
    return m * torch.expm1(_clamped_exp_argument(-logp / k, limit))


def _focal(logp, alpha, gamma):
    # (1 - p)^gamma from log space: 1 - exp(logp) = -expm1(logp) keeps precision near p = 1.
    return -alpha * (-torch.expm1(logp)).clamp(min=0).pow(gamma) * logp


class _ClassLoss(nn.Module):
    """A multi-class loss defined by f(log p_y): hard or soft targets, ignore_index, reductions.

    Soft targets (N, C) give sum_j t_ij * f(log p_ij), the exact mixup/cutmix combination
    lambda * loss(y_a) + (1 - lambda) * loss(y_b).
    """

    def __init__(self, reduction="mean", ignore_index=-100):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        sample_shape = (logits.shape[0],) + tuple(logits.shape[2:])
        if logits.dim() > 2:  # (N, C, d1, ...) -> (N * d1 * ..., C), as F.cross_entropy accepts
            n_classes = logits.shape[1]
            logits = logits.movedim(1, -1).reshape(-1, n_classes)
            target = (target.movedim(1, -1).reshape(-1, n_classes) if target.is_floating_point()
                      else target.reshape(-1))
        if target.is_floating_point():
            logp = F.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
            loss = (target.to(logp.dtype) * self.per_sample(logp, logits.dtype)).sum(1)
            count = loss.new_tensor(loss.numel())
        else:
            valid = target != self.ignore_index
            logp = target_log_prob(logits, torch.where(valid, target, 0))
            # Ignored rows get logp = 0 (a finite f) and a zero weight, so their gradient is exactly 0.
            loss = torch.where(valid, self.per_sample(torch.where(valid, logp, 0.0), logits.dtype), 0.0)
            # Mean over non-ignored rows; an all-ignored batch gives 0 (not NaN) so LM padding is safe.
            count = valid.sum().clamp(min=1)
        if self.reduction == "none":
            return loss.reshape(sample_shape)
        return loss.sum() if self.reduction == "sum" else loss.sum() / count


class CrossEntropy(_ClassLoss):
    """-log p_y (same values as F.cross_entropy, computed by the same fp32 path as the RLO forms)."""

    def per_sample(self, logp, logits_dtype):
        return _ce(logp)


class Focal(_ClassLoss):
    """Focal loss -alpha * (1 - p_y)^gamma * log p_y (authors' alpha 0.25, gamma 3)."""

    def __init__(self, alpha=0.25, gamma=3.0, **kw):
        super().__init__(**kw)
        if alpha <= 0 or gamma < 0:
            raise UserError(f"focal needs alpha > 0 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        self.alpha, self.gamma = alpha, gamma

    def per_sample(self, logp, logits_dtype):
        return _focal(logp, self.alpha, self.gamma)


class _RootedBase(_ClassLoss):
    def __init__(self, k=3.0, m=3.0, **kw):
        super().__init__(**kw)
        _check_k(k)
        if not float(m) > 0:
            raise UserError(f"m must be > 0, got {m}")
        self.k, self.m = float(k), float(m)

    def extra_repr(self):
        return f"k={self.k}, m={self.m}"


class Root(_RootedBase):
    """m * (1 - p_y^(1/k)): the authors' training form (bounded by m; CE as k -> inf with m = k).

    d loss / d log p_y = -(m/k) p_y^(1/k): a cross-entropy gradient reweighted by p_y^(1/k).
    """

    def per_sample(self, logp, logits_dtype):
        return _root(logp, self.k, self.m)


class RootConvex(_RootedBase):
    """m * (p_y^(-1/k) - 1): paper eq. 4 for softmax (strictly convex for two classes, k > 1).

    The exponent -log(p_y)/k is clamped at MAX_EXPONENT (straight-through) so values stay finite.
    """

    def per_sample(self, logp, logits_dtype):
        return _root_convex(logp, self.k, self.m, exponent_limit(logits_dtype, self.m / self.k))


# ---- binary forms: logit z (N,), label y in {-1, +1} (0 is read as -1) -----------------------------

def _signed_margin(z, y):
    z = _upcast(z)
    return torch.where(y > 0, 1.0, -1.0).to(z.dtype) * z


class _BinaryLoss(nn.Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise UserError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, z, y):
        loss = self.of_margin(_signed_margin(z, y), z.dtype)
        return loss if self.reduction == "none" else loss.sum() if self.reduction == "sum" else loss.mean()


class Logistic(_BinaryLoss):
    """log(1 + exp(-y z)) = softplus(-y z)."""

    def of_margin(self, margin, logits_dtype):
        return _softplus(-margin)


class BinaryRootConvex(_BinaryLoss):
    """k * (1 + exp(-y z))^(1/k): paper eq. 4 per sample (strictly convex in w for k > 1).

    Computed as k * exp(softplus(-y z) / k), exponent clamped at MAX_EXPONENT (straight-through).
    """

    def __init__(self, k=3.0, **kw):
        super().__init__(**kw)
        _check_k(k)
        self.k = float(k)

    def of_margin(self, margin, logits_dtype):
        return binary_root_convex(margin, self.k, exponent_limit(logits_dtype))


class BinaryRoot(_BinaryLoss):
    """k * (1 - sigmoid(y z)^(1/k)): the bounded twin, computed as k * (1 - exp(logsigmoid(y z) / k))."""

    def __init__(self, k=3.0, **kw):
        super().__init__(**kw)
        _check_k(k)
        self.k = float(k)

    def of_margin(self, margin, logits_dtype):
        return -self.k * torch.expm1(F.logsigmoid(margin) / self.k)


def binary_root_convex(margin, k, limit=MAX_EXPONENT):
    """k * (1 + exp(-margin))^(1/k) elementwise, margin = y * z, stable; exponent clamped at `limit`."""
    return k * torch.exp(_clamped_exp_argument(_softplus(-margin) / k, limit))


def binary_root_convex_grad_coef(margin, k):
    """d/dz of f(z) = k (1 + e^-z)^(1/k) at z = y w.x (so grad_w = y x f'(z)).

    With l = 1 + e^-z and t = sigmoid(-z) = 1 - sigmoid(z):  f'(z) = -l^(1/k) t.
    As k -> inf this is -sigmoid(-z), the logistic loss derivative (paper eq. 5-6).
    """
    return -torch.exp(_softplus(-margin) / k) * torch.sigmoid(-margin)


def binary_root_convex_hessian_coef(margin, k):
    """d2/dz2 of f(z) = k (1 + e^-z)^(1/k); the empirical Hessian is X^T diag(h) X / n.

    Derivation: f = k s^(-1/k) with s = sigmoid(z), s' = s(1-s). Then f' = -s^(-1/k)(1-s) and
        f'' = s^(-1/k)(1-s) [ (1-s)/k + s ] = l^(1/k) t (1 - t (1 - 1/k)),   t = sigmoid(-z), l = 1 + e^-z.
    This is the paper's h = l^k s (1 - s (1 - 1/k)) (eq. 7-8) with its s read as sigmoid(-y w.x), the
    probability of the wrong label. h > 0 for every z and k > 1 (strict convexity, Lemma 1); as k -> inf
    it tends to t (1 - t), the logistic Hessian coefficient.
    """
    t = torch.sigmoid(-margin)
    return torch.exp(_softplus(-margin) / k) * t * (1 - t * (1 - 1 / k))


# ---- GAN losses (from discriminator logits) ------------------------------------------------------

class LogisticGANLoss:
    """The non-saturating logistic GAN loss (StyleGAN2's): G softplus(-gen), D softplus(gen) + softplus(-real)."""

    def generator(self, gen_logits):
        return _softplus(-_upcast(gen_logits)).mean()

    def discriminator(self, gen_logits, real_logits):
        return _softplus(_upcast(gen_logits)).mean() + _softplus(-_upcast(real_logits)).mean()


class RootedGANLoss:
    """The rooted GAN loss (paper eq. 9): each softplus(x) becomes k (1 + e^x)^(1/k) = k exp(softplus(x)/k).

    G: k (1 + exp(-gen))^(1/k);  D: k (1 + exp(gen))^(1/k) + k (1 + exp(-real))^(1/k).
    """

    def __init__(self, k=2.0):
        _check_k(k)
        self.k = float(k)

    def _term(self, margin):
        return binary_root_convex(_upcast(margin), self.k, exponent_limit(margin.dtype)).mean()

    def generator(self, gen_logits):
        return self._term(gen_logits)

    def discriminator(self, gen_logits, real_logits):
        return self._term(-gen_logits) + self._term(real_logits)


def _check_k(k):
    try:
        ok = math.isfinite(float(k)) and float(k) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"k must be a finite number > 0, got {k!r}")
