"""A fused LM head + token loss that never builds the (tokens x vocab) logits.

    loss = linear_token_loss(hidden, lm_head.weight, labels, loss="root", k=5, m=5)

equals ``get_loss("root", k=5, m=5)(F.linear(hidden, weight, bias).view(-1, V), labels.view(-1))`` with
its gradients w.r.t. `hidden`, `weight` and `bias`, but works on chunks of tokens: each chunk's logits
(chunk x V) exist only while that chunk is processed. Every multi-class form of the registry is a
function f(log p_y) of the token's log-probability, so the scheme Liger-Kernel's fused linear
cross-entropy and Apple's cut-cross-entropy use for CE serves all of them:

    logits_c = h_c W^T + b,   log p_y = logits_c[y] - logsumexp(logits_c)      (fp32)
    g = f'(log p_y) * (1 / count for mean)                                     (zero where ignored)
    dL/dlogits_c = g * (onehot(y) - softmax(logits_c))
    dL/dh_c = dL/dlogits_c W,   dL/dW += dL/dlogits_c^T h_c,   dL/db += sum_rows dL/dlogits_c

For `mean` and `sum` the chunk gradients are computed during the forward pass (the scalar's upstream
gradient only scales them), so the cost is the unfused path's three matmuls; for `none` the backward
pass recomputes each chunk's logits (a fourth matmul). Not twice differentiable.

Numerics: the matmuls run in the inputs' dtype (the autocast dtype under autocast), as `F.linear`
would, the softmax and f in fp32, the loss sum in float64. The weight gradient is accumulated over
chunks in `accum_dtype` (default: the weight's dtype, like Liger; with bf16 weights and many chunks
pass torch.float32 for the unfused path's single rounding, at 2 bytes/parameter of extra memory).
Under autocast with fp32 master weights the accumulator is the fp32 gradient itself. A row of logits
is at most 1 MB of fp32 for a 256k vocabulary, so chunks of whole rows suffice (no vocab chunking).
"""
import torch

from engine.errors import UserError

from . import get_loss
from .rooted import _ClassLoss, _reduce

# Logits per chunk (32 MB of fp32): small next to the weight gradient, large enough for efficient matmuls;
# but at least 128 tokens: every chunk re-reads the (vocab x hidden) weight-gradient accumulator, which
# made 65-token chunks memory-bound (2x the unfused time with bf16 at vocab 128256; 1.0x at 128 tokens).
_CHUNK_ELEMENTS = 1 << 23
_MIN_CHUNK_TOKENS = 128


def _chunk(hidden_c, weight, bias, labels_c, valid_c, f, scale, work):
    """Per-token losses of one chunk (0 where ignored) and, when `scale` is given (a per-token upstream
    gradient; None for no gradient), the gradient w.r.t. the chunk's logits in the matmul dtype.

    The logits, their softmax and their gradient all live in `work` = (compute buffer, matmul-dtype
    buffer or None), chunk x V each, reused by every chunk: for bf16 / fp16 matmuls the logits come out
    in the second (rounded as F.linear returns them) and the gradient goes back into it."""
    z = work[0][:len(hidden_c)]
    low = work[1][:len(hidden_c)] if work[1] is not None else z
    if bias is None:
        torch.mm(hidden_c, weight.t(), out=low)
    else:
        torch.addmm(bias, hidden_c, weight.t(), out=low)
    if low is not z:
        z.copy_(low)
    labels_c = labels_c.unsqueeze(1)
    target = z.gather(1, labels_c).squeeze(1)
    top = z.amax(1, keepdim=True)
    total = z.sub_(top).exp_().sum(1)  # z now holds exp(logit - max)
    logp = target - top.squeeze(1) - total.log()
    with torch.enable_grad():
        x = logp.requires_grad_()
        values = f(torch.where(valid_c, x, 0.0))
        (df,) = torch.autograd.grad(values, x, torch.ones_like(values)) if scale is not None else (None,)
    values = torch.where(valid_c, values.detach(), 0.0)
    if scale is None:
        return values, None
    g = torch.where(valid_c, df * scale, 0.0).unsqueeze(1)
    # (onehot - softmax) * g
    grad = z.div_(total.unsqueeze(1)).mul_(-g).scatter_add_(1, labels_c, g)
    return values, grad if low is z else low.copy_(grad)


def _sweep(hidden, weight, bias, labels, valid, f, chunk, matmul_dtype, scale=None, grads=None):
    """Per-token losses of all chunks (compute dtype); with `scale` (per-token upstream gradients) each
    chunk's gradients are added to `grads`."""
    compute = torch.float64 if matmul_dtype == torch.float64 else torch.float32
    rows, vocab = min(chunk, len(hidden)), weight.shape[0]
    work = (torch.empty(rows, vocab, dtype=compute, device=hidden.device),
            torch.empty(rows, vocab, dtype=matmul_dtype, device=hidden.device) if matmul_dtype != compute else None)
    w = weight.to(matmul_dtype)
    b = bias.to(matmul_dtype) if bias is not None else None
    values = torch.empty(len(hidden), dtype=compute, device=hidden.device)
    for s in range(0, len(hidden), chunk):
        h = hidden[s:s + chunk].to(matmul_dtype)
        values[s:s + chunk], grad = _chunk(h, w, b, labels[s:s + chunk], valid[s:s + chunk], f,
                                           None if scale is None else scale[s:s + chunk].to(compute), work)
        if grad is not None:
            grads.add(s, grad, h, w)
    return values


class _LinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, f, reduction, ignore_index, chunk, accum_dtype, matmul_dtype,
                grad_enabled):
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0)
        count = valid.sum().clamp(min=1)
        needs = [need and grad_enabled for need in ctx.needs_input_grad[:3]]  # (True under no_grad too)
        ctx.eager = reduction != "none" and any(needs)  # gradients now, scaled in backward
        grads, scale = None, None
        if ctx.eager:
            grads = _Grads(hidden, weight, bias, needs, accum_dtype)
            per_token = count.double().reciprocal() if reduction == "mean" else torch.ones((), device=hidden.device)
            scale = per_token.expand(len(hidden))
        values = _sweep(hidden, weight, bias, safe_labels, valid, f, chunk, matmul_dtype, scale, grads)
        ctx.grads = grads.finish() if ctx.eager else None
        if reduction == "none" and any(needs):
            ctx.save_for_backward(hidden, weight, bias, safe_labels, valid)
        ctx.setup = (f, chunk, accum_dtype, matmul_dtype)
        return _reduce(values, reduction, count)

    @staticmethod
    def backward(ctx, grad_out):
        nones = (None,) * 8
        if ctx.eager:
            grads, ctx.grads = ctx.grads, None  # released at once: they are as large as the parameters
            if grads is None:
                raise RuntimeError("linear_token_loss: backward through the same graph twice is not supported")
            return (*[None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads], None, *nones)
        hidden, weight, bias, labels, valid = ctx.saved_tensors
        f, chunk, accum_dtype, matmul_dtype = ctx.setup
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3], accum_dtype)
        _sweep(hidden, weight, bias, labels, valid, f, chunk, matmul_dtype, grad_out, grads)
        return (*grads.finish(), None, *nones)


class _Grads:
    """The gradients w.r.t. hidden, weight and bias, filled chunk by chunk (None where not needed)."""

    def __init__(self, hidden, weight, bias, needs, accum_dtype):
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.zeros_like(weight, dtype=accum_dtype) if needs[1] else None
        self.bias = torch.zeros_like(bias, dtype=accum_dtype) if bias is not None and needs[2] else None
        self.dtypes = (weight.dtype, bias.dtype if bias is not None else None)

    def add(self, start, grad_logits, hidden_c, weight):
        if self.hidden is not None:
            self.hidden[start:start + len(grad_logits)] = grad_logits @ weight
        if self.weight is not None:
            self.weight.addmm_(grad_logits.t().to(self.weight.dtype), hidden_c.to(self.weight.dtype))
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.bias.dtype)

    def finish(self):
        return (self.hidden,
                None if self.weight is None else self.weight.to(self.dtypes[0]),
                None if self.bias is None else self.bias.to(self.dtypes[1]))


def linear_token_loss(hidden, weight, labels, loss="root", *, bias=None, ignore_index=-100, reduction="mean",
                      chunk_tokens=None, accum_dtype=None, **params):
    """Token loss `loss` (a multi-class form of the registry, with its `params` such as k, m) of the
    logits `hidden @ weight.T + bias`, computed chunk by chunk without the (tokens x vocab) logits.

    hidden (..., d), weight (V, d), bias (V,) or None, labels (...) with `ignore_index` for no target.
    `reduction` 'mean' (over targets; 0 when there are none), 'sum' or 'none' (shape of labels).
    `chunk_tokens`: tokens per chunk (default: about 8M logits, at least 128 tokens).
    """
    criterion = get_loss(loss, ignore_index=ignore_index, reduction=reduction, **params)
    if not isinstance(criterion, _ClassLoss):
        raise UserError(f"linear_token_loss takes a multi-class token loss, not {loss!r}")
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2 or hidden.shape[:-1] != labels.shape:
        raise UserError(f"linear_token_loss: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                        f"labels {tuple(labels.shape)} do not fit (hidden (..., d), weight (V, d), labels (...))")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise UserError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = hidden.device.type
    matmul_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                    else torch.promote_types(hidden.dtype, weight.dtype))
    chunk = chunk_tokens or max(_MIN_CHUNK_TOKENS, _CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        out = _LinearTokenLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                     criterion.per_sample, reduction, ignore_index, chunk,
                                     accum_dtype or weight.dtype, matmul_dtype, torch.is_grad_enabled())
    return out.reshape(labels.shape) if reduction == "none" else out
