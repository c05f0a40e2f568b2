"""Any token loss of the registry inside `transformers.Trainer`.

    from losses.hf import token_loss_func
    trainer = Trainer(model, args, train_dataset=..., compute_loss_func=token_loss_func("root", k=5, m=5))

The Trainer hands `compute_loss_func(outputs, labels, num_items_in_batch)` the *unshifted* labels
(-100 where ignored) and, with gradient accumulation, the number of target tokens of the whole
accumulated batch. The loss returned is the sum over this micro-batch's targets divided by that
number, so accumulating k micro-batches gives the same gradient as one batch k times larger (a mean
per micro-batch would weight short micro-batches more). The authors' `compute_loss` override does
not run on transformers >= 4.46, whose Trainer passes `num_items_in_batch`.
"""
import torch

from . import get_loss

IGNORE = -100


def token_loss_func(name, **params):
    """compute_loss_func for `transformers.Trainer` with `losses.get_loss(name, **params)` per token."""
    criterion = get_loss(name, reduction="sum", ignore_index=IGNORE, **params)

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # next-token targets: shift the labels, not the logits (a view, no copy of batch x seq x vocab)
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]
        total = criterion(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE).sum()
        return total / count

    return compute_loss_func
