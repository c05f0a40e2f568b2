"""Perplexity by the GPTQ/QuIP protocol and the glue between a causal LM's logits and a token loss."""
import math

import torch
import torch.nn.functional as F

from engine import UserError


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
