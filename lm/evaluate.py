"""Perplexity by the GPTQ/QuIP protocol and the glue between a causal LM and a token loss."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import UserError
from losses import get_loss, linear_token_loss
from quant.linear import QuantLinear


def shift_labels(input_ids, attention_mask=None, ignore_index=-100):
    """Next-token targets aligned with the logits: labels[:, t] = input_ids[:, t + 1], the last position
    (and targets the attention mask hides) set to `ignore_index`. Shifting the labels instead of slicing
    the logits lets a loss read `logits.view(-1, V)` without copying it."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1].masked_fill_(attention_mask[:, 1:] == 0, ignore_index)
    return labels


def token_loss(criterion, logits, labels):
    """`criterion` (a `losses.get_loss` module) on (batch, seq, V) logits and shifted labels, flattened
    with views only."""
    return criterion(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


class NextTokenLoss(nn.Module):
    """A causal LM's training loss as one module (what DDP / FSDP wrap): `loss` (a multi-class form of
    `losses`, with its `params`) of the next-token targets, mean over targets.

    fused=True computes it with `losses.linear_token_loss` from the base model's last hidden states and
    the output head (tied or not, with its bias), so the (tokens x vocab) logits never exist; that
    needs logits = head(last hidden state), which `check_fused` verifies once on a short input.
    fused=False runs the model's own forward and the registry loss on its logits.
    """

    def __init__(self, model, loss, fused=True, **params):
        super().__init__()
        # a packed head (opt.py --embed-bits) has no dense weight for the fused loss: its own matmul decodes codes
        fused = fused and not isinstance(model.get_output_embeddings(), QuantLinear)
        self.model, self.loss, self.fused, self.params = model, loss, fused, params
        self.criterion = get_loss(loss, ignore_index=-100, **params)
        if fused:
            check_fused(model)

    def forward(self, input_ids, labels):
        if not self.fused:
            return token_loss(self.criterion, self.model(input_ids=input_ids, use_cache=False).logits, labels)
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        return linear_token_loss(hidden, head.weight, labels, self.loss, bias=head.bias, **self.params)


@torch.no_grad()
def check_fused(model):
    """A UserError unless the model's logits are its output head applied to its base model's last
    hidden states (not so for e.g. soft-capped or scaled logits, which the fused loss would miss)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or model.base_model is model:
        raise UserError(f"{type(model).__name__} has no base model + linear output head: use --no-fused-loss")
    ids = torch.arange(1, 9, device=head.weight.device)[None] % head.out_features
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        model.train(was_training)
    recomputed = F.linear(hidden, head.weight, head.bias)
    if not torch.allclose(recomputed, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item()):
        raise UserError(f"{type(model).__name__}'s logits are not its output head of the last hidden states "
                        "(scaled or soft-capped?): use --no-fused-loss")


@torch.no_grad()
def perplexity(model, input_ids, seqlen, batch_size=1, device=None, max_windows=None):
    """exp(mean next-token NLL) over non-overlapping windows of `seqlen` tokens of the 1-D `input_ids`
    (the remainder after the last full window is dropped; only the first `max_windows` when given), as
    GPTQ/QuIP evaluate. Each window predicts its tokens 2..seqlen; the NLL is computed in fp32 per
    batch and summed in float64."""
    input_ids = input_ids.reshape(-1)
    nwindows = input_ids.numel() // seqlen
    if max_windows is not None:
        nwindows = min(nwindows, max_windows)
    if nwindows == 0:
        raise UserError(f"the evaluation text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    device = device if device is not None else next(model.parameters()).device
    windows = input_ids[: nwindows * seqlen].view(nwindows, seqlen)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for start in range(0, nwindows, batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                  reduction="sum")
            total += nll.double().cpu()
    finally:
        model.train(was_training)
    return math.exp(total.item() / (nwindows * (seqlen - 1)))
