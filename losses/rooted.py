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
float64 input) and its gradient ``(onehot(y) - softmax(z)) * g`` in closed form, in blocks of rows
written straight into the gradient: it saves only the logits (the input, or a view of it for
(N, C, d1, ...) logits), so a (tokens x vocab) LM head costs one gradient tensor and no fp32 copy.
The per-form f then runs through ordinary autograd on an (N,) vector, which costs nothing. Soft targets
go through the same blocks (`_SoftTargetRows`), recomputed block by block in backward.

Exactness at the edges:
- ``p_y^(1/k) = exp(log p_y / k)`` never underflows to a NaN (the authors' softmax-index-pow form does),
  and every ``expm1`` here is differentiated as ``exp(x)`` (`_expm1`): torch's backward uses
  ``expm1(x) + 1``, exactly 0 in fp32 once x < -16.6, which zeroed ``root``'s gradient for confident
  mistakes (-log p_y > 16.6 k).
- The convex forms grow like ``e^E``, ``E = -log(p_y) / k``, which overflows fp32 at E ~ 88. Beyond
  ``exponent_limit(compute dtype, m)`` = ln(dtype max) - ln(max(m, 1)) - 20 (E = 67.6 for fp32 and
  m = 3; 688.7 for float64) the loss continues along its tangent in E, i.e. linearly in log p_y, like a
  scaled cross-entropy: value and gradient agree (gradcheck holds on both sides), the loss stays convex,
  the gradient coefficient stays at its finite value at the limit, and the e^20 ~ 5e8 of headroom
  keeps sums over many such rows finite. The limit depends on the fp32 (or float64) compute only, not
  on the logits' dtype.
- The gradient's own dtype bounds only the gradient: for fp16 logits a row whose gradient would pass
  65504 is scaled down into range (its direction kept, the loss value unchanged).
- ``mean`` / ``sum`` accumulate in float64.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError

_HEADROOM = 20.0  # e^20 ~ 5e8: room below the dtype's max for sums of rows past the limit, and their growth
# Logits per block (16 MB of fp32 temporaries): few enough kernel launches (and thread-pool wake-ups
# on a shared CPU) to cost nothing next to the math, small enough to bound the temporaries.
_BLOCK_ELEMENTS = 1 << 22


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _softplus(x):
    # torch's softplus returns x above its threshold (20): exact to fp32, off by e^-20 ~ 2e-9 in float64.
    return F.softplus(x, threshold=40.0 if x.dtype == torch.float64 else 20.0)


class _Upcast(torch.autograd.Function):
    """x in its compute dtype; backward clamps the gradient into x's own dtype range (fp16: 65504)
    where the cast back would overflow to inf (straight-through: the value is exact)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.to(_compute_dtype(x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        bound = torch.finfo(ctx.dtype).max
        return grad.clamp(-bound, bound).to(ctx.dtype)


def _upcast(x):
    return x if x.dtype == _compute_dtype(x) else _Upcast.apply(x)


def _blocks(logits):
    """Indices of blocks of about _BLOCK_ELEMENTS of (N, C) or (N, C, L) logits, the class dim 1 always
    whole; a sample larger than a block is split along L. Per-sample tensors ((N,) or (N, L)) are
    indexed by the same tuples through their `.unsqueeze(1)` views."""
    n, per_sample = logits.shape[0], logits[0].numel()
    if logits.dim() == 2 or per_sample <= _BLOCK_ELEMENTS:
        step = max(1, _BLOCK_ELEMENTS // max(1, per_sample))
        return [(slice(s, s + step),) for s in range(0, n, step)]
    step = max(1, _BLOCK_ELEMENTS // logits.shape[1])
    return [(slice(s, s + 1), slice(None), slice(i, i + step))
            for s in range(n) for i in range(0, logits.shape[2], step)]


class _TargetLogProb(torch.autograd.Function):
    """log p_y = log_softmax(z, dim=1)[y] for (N, C) or (N, C, L) logits, fp32 (or float64) math,
    gradient in closed form.

    Both passes run torch's fused (log_)softmax kernels block by block, so the only full-size tensors
    are the saved logits (the caller's) and the gradient.
    """

    @staticmethod
    def forward(ctx, logits, target):
        dtype = _compute_dtype(logits)
        logp = torch.empty(target.shape, dtype=dtype, device=logits.device)
        t, out = target.unsqueeze(1), logp.unsqueeze(1)
        for idx in _blocks(logits):
            torch.gather(F.log_softmax(logits[idx], dim=1, dtype=dtype), 1, t[idx], out=out[idx])
        ctx.save_for_backward(logits, target)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, target = ctx.saved_tensors
        dtype = _compute_dtype(logits)
        # Every entry of a row's gradient g * (onehot - softmax) is at most |g|: clamping g to the
        # gradient dtype's range (fp16: 65504) scales an overflowing row down, direction kept.
        bound = torch.finfo(logits.dtype).max
        g = grad_logp.to(dtype).clamp(-bound, bound).unsqueeze(1)
        t = target.unsqueeze(1)
        if torch.is_grad_enabled():  # create_graph=True (Hessians, gradient penalties): out of place
            grad = F.softmax(logits, dim=1, dtype=dtype).mul(-g).scatter_add(1, t, g)
            return grad.to(logits.dtype), None
        grad, minus_g = torch.empty_like(logits), -g
        in_place = grad.dtype == dtype
        for idx in _blocks(logits):
            # (softmax - onehot) * -g, built in the gradient itself when it has the compute dtype, else in
            # an fp32 block temporary cast into it at the end (a mixed-dtype mul(out=) is slower on CPU)
            if in_place:
                p = torch.softmax(logits[idx], dim=1, out=grad[idx])
            else:
                p = F.softmax(logits[idx], dim=1, dtype=dtype)
            p.scatter_(1, t[idx], -1.0, reduce="add").mul_(minus_g[idx])
            if not in_place:
                grad[idx] = p
        return grad, None


def target_log_prob(logits, target):
    """log softmax(logits, dim=1)[target] for (N, C) or (N, C, L) logits and (N,) or (N, L) int targets;
    shape of the target, fp32 (float64 for float64 logits)."""
    return _TargetLogProb.apply(logits, target)


def _soft_rows(logits, target, f):
    """sum_j t_j f(log p_j) per sample (dim 1 kept), in the compute dtype."""
    logp = F.log_softmax(logits, dim=1, dtype=_compute_dtype(logits))
    return (target.to(logp.dtype) * f(logp)).sum(1, keepdim=True)


def _fit_rows(grad, dtype):
    """`grad` cast to `dtype`, each row (along dim 1) that would overflow it scaled down into range."""
    bound = torch.finfo(dtype).max
    if bound < torch.finfo(grad.dtype).max:
        grad = grad * (bound / grad.abs().amax(1, keepdim=True)).clamp(max=1)
    return grad.to(dtype)


class _SoftTargetRows(torch.autograd.Function):
    """sum_j t_ij f(log p_ij) for soft targets, in the blocks of `_blocks`: saves only its inputs, and
    backward recomputes one block at a time under autograd. With create_graph=True it differentiates the
    whole batch at once, in the graph, so that Hessians (vectorized ones too) see ordinary ops."""

    @staticmethod
    def forward(ctx, logits, target, f):
        rows = torch.empty(target.shape[:1] + target.shape[2:], dtype=_compute_dtype(logits),
                           device=logits.device)
        out = rows.unsqueeze(1)
        for idx in _blocks(logits):
            out[idx] = _soft_rows(logits[idx], target[idx], f)
        ctx.save_for_backward(logits, target)
        ctx.f = f
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        logits, target = ctx.saved_tensors
        needs, g = ctx.needs_input_grad[:2], grad_rows.unsqueeze(1)
        if torch.is_grad_enabled():
            return (*_soft_rows_grad(logits, target, g, ctx.f, needs, create_graph=True), None)
        grads = [torch.empty_like(x) if need else None for x, need in zip((logits, target), needs)]
        for idx in _blocks(logits):
            parts = _soft_rows_grad(logits[idx].detach(), target[idx].detach(), g[idx], ctx.f, needs,
                                    create_graph=False)
            for grad, part in zip(grads, parts):
                if grad is not None:
                    grad[idx] = part
        return (*grads, None)


def _soft_rows_grad(logits, target, grad_rows, f, needs, create_graph):
    """Gradients of _soft_rows w.r.t. (logits, target), None where not needed; the logits' in fp32,
    fitted to their dtype's range by row."""
    with torch.enable_grad():
        if not create_graph:
            logits, target = logits.requires_grad_(needs[0]), target.requires_grad_(needs[1])
        upcast = logits.to(_compute_dtype(logits))
        wrt = [x for x, need in zip((upcast, target), needs) if need]
        found = iter(torch.autograd.grad(_soft_rows(upcast, target, f), wrt, grad_rows,
                                         create_graph=create_graph))
    return (_fit_rows(next(found), logits.dtype) if needs[0] else None, next(found) if needs[1] else None)


class _Expm1(torch.autograd.Function):
    """expm1 with the gradient exp(x) computed directly (torch's expm1(x) + 1 is 0 in fp32 for x < -16.6)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.expm1(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x)


def _expm1(x):
    return _Expm1.apply(x)


def exponent_limit(dtype, scale=1.0):
    """The exponent E beyond which the convex forms continue linearly: scale * e^E stays a factor e^20
    below the largest finite `dtype` value (67.6 for fp32 and scale 3)."""
    return math.log(torch.finfo(dtype).max) - math.log(max(scale, 1.0)) - _HEADROOM


def _tangent_expm1(e, limit):
    """expm1(e) up to `limit`, continued beyond it along its tangent: C1, convex, finite gradient."""
    return _expm1(e.clamp(max=limit)) + math.exp(limit) * (e - limit).clamp(min=0)


# Per-form f(log p_y): the per-sample loss as a function of the target log-probability.
def _ce(logp):
    return -logp


def _root(logp, k, m):
    # expm1 keeps precision for large k, where p_y^(1/k) is within 1e-5 of 1.
    return -m * _expm1(logp / k)


def _root_convex(logp, k, m):
    return m * _tangent_expm1(-logp / k, exponent_limit(logp.dtype, m))


def _focal(logp, alpha, gamma):
    # (1 - p)^gamma from log space: 1 - exp(logp) = -expm1(logp) keeps precision near p = 1.
    return -alpha * (-_expm1(logp)).clamp(min=0).pow(gamma) * logp


def _reduce(loss, reduction, count):
    """`reduction` of per-sample losses; the sum runs in float64 so that it cannot overflow on the way."""
    if reduction == "none":
        return loss
    total = loss.sum(dtype=torch.float64)
    return (total if reduction == "sum" else total / count).to(loss.dtype)


class _ClassLoss(nn.Module):
    """A multi-class loss defined by f(log p_y): hard or soft targets, ignore_index, reductions.

    Soft targets (N, C, ...) give sum_j t_ij * f(log p_ij), the exact mixup/cutmix combination
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
        soft = target.is_floating_point()
        if logits.dim() > 2:  # (N, C, d1, ...) -> (N, C, L): a view of contiguous logits, not a copy
            logits = logits.reshape(logits.shape[0], logits.shape[1], -1)
            target = target.reshape(logits.shape if soft else (logits.shape[0], -1))
        if soft:
            loss = _SoftTargetRows.apply(logits, target, self.per_sample)
            count = loss.numel()
        else:
            valid = target != self.ignore_index
            logp = target_log_prob(logits, torch.where(valid, target, 0))
            # Ignored rows get logp = 0 (a finite f) and a zero weight, so their gradient is exactly 0.
            loss = torch.where(valid, self.per_sample(torch.where(valid, logp, 0.0)), 0.0)
            # Mean over non-ignored rows; an all-ignored batch gives 0 (not NaN) so LM padding is safe.
            count = valid.sum().clamp(min=1)
        return _reduce(loss, self.reduction, count).reshape(sample_shape if self.reduction == "none" else ())


class CrossEntropy(_ClassLoss):
    """-log p_y (same values as F.cross_entropy, computed by the same fp32 path as the RLO forms)."""

    def per_sample(self, logp):
        return _ce(logp)


class Focal(_ClassLoss):
    """Focal loss -alpha * (1 - p_y)^gamma * log p_y (authors' alpha 0.25, gamma 3)."""

    def __init__(self, alpha=0.25, gamma=3.0, **kw):
        super().__init__(**kw)
        self.alpha, self.gamma = _finite("alpha", alpha), _finite("gamma", gamma, zero_ok=True)

    def per_sample(self, logp):
        return _focal(logp, self.alpha, self.gamma)


class _RootedBase(_ClassLoss):
    def __init__(self, k=3.0, m=3.0, **kw):
        super().__init__(**kw)
        self.k, self.m = _finite("k", k), _finite("m", m)

    def extra_repr(self):
        return f"k={self.k}, m={self.m}"


class Root(_RootedBase):
    """m * (1 - p_y^(1/k)): the authors' training form (bounded by m; CE as k -> inf with m = k).

    d loss / d log p_y = -(m/k) p_y^(1/k): a cross-entropy gradient reweighted by p_y^(1/k).
    """

    def per_sample(self, logp):
        return _root(logp, self.k, self.m)


class RootConvex(_RootedBase):
    """m * (p_y^(-1/k) - 1): paper eq. 4 for softmax (strictly convex for two classes, k > 1).

    Past exponent_limit(fp32, m) in -log(p_y)/k it continues linearly in log p_y (module docstring).
    """

    def per_sample(self, logp):
        return _root_convex(logp, self.k, self.m)


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
        loss = self.of_margin(_signed_margin(z, y))
        return _reduce(loss, self.reduction, loss.numel())


class Logistic(_BinaryLoss):
    """log(1 + exp(-y z)) = softplus(-y z)."""

    def of_margin(self, margin):
        return _softplus(-margin)


class BinaryRootConvex(_BinaryLoss):
    """k * (1 + exp(-y z))^(1/k): paper eq. 4 per sample (strictly convex in w for k > 1).

    Computed as k * exp(softplus(-y z) / k), continued linearly past exponent_limit(fp32, k).
    """

    def __init__(self, k=3.0, **kw):
        super().__init__(**kw)
        self.k = _finite("k", k)

    def of_margin(self, margin):
        return binary_root_convex(margin, self.k)


class BinaryRoot(_BinaryLoss):
    """k * (1 - sigmoid(y z)^(1/k)): the bounded twin, computed as k * (1 - exp(logsigmoid(y z) / k))."""

    def __init__(self, k=3.0, **kw):
        super().__init__(**kw)
        self.k = _finite("k", k)

    def of_margin(self, margin):
        return -self.k * _expm1(F.logsigmoid(margin) / self.k)


def binary_root_convex(margin, k):
    """k * (1 + exp(-margin))^(1/k) elementwise, margin = y * z, stable; past exponent_limit(dtype, k)
    in softplus(-margin) / k it continues along its tangent."""
    margin = _upcast(margin)
    return k * (1 + _tangent_expm1(_softplus(-margin) / k, exponent_limit(margin.dtype, k)))


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
        self.k = _finite("k", k)

    def _term(self, margin):
        loss = binary_root_convex(_upcast(margin), self.k)
        return _reduce(loss, "mean", loss.numel())

    def generator(self, gen_logits):
        return self._term(gen_logits)

    def discriminator(self, gen_logits, real_logits):
        return self._term(-gen_logits) + self._term(real_logits)


def _finite(name, value, zero_ok=False):
    """float(value) if it is a finite number > 0 (>= 0 with zero_ok), else a UserError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and (x > 0 or (zero_ok and x == 0))):
        raise UserError(f"{name} must be a finite number {'>=' if zero_ok else '>'} 0, got {value!r}")
    return x
