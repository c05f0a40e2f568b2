"""losses.hf.token_loss_func inside transformers.Trainer: gradient accumulation equals one big batch."""
import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from losses import get_loss
from losses.hf import token_loss_func
from tests.lm_fixtures import make_text, tiny_model, train_tokenizer


def batch(n=4, seqlen=16, seed=0):
    """Rows of random tokens whose labels end in a different amount of padding (-100), so the
    micro-batches of an accumulation step hold different numbers of targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n, seqlen), generator=g)
    labels = ids.clone()
    for i, pad in enumerate([0, 9, 3, 12][:n]):
        if pad:
            labels[i, -pad:] = -100
    return [{"input_ids": ids[i], "labels": labels[i], "attention_mask": torch.ones(seqlen, dtype=torch.long)}
            for i in range(n)]


@pytest.mark.parametrize("name, params", [("root", dict(k=5, m=5)), ("ce", {}), ("root_convex", dict(k=3, m=3))])
def test_trainer_with_accumulation_matches_one_large_batch(tmp_path, name, params):
    torch.manual_seed(0)
    model = tiny_model("llama", train_tokenizer(make_text(20)), seed=0)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    rows = batch()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      compute_loss_func=token_loss_func(name, **params))
    trainer.train()

    # the plain loop: one batch of all four rows, loss = mean over every target token, one SGD step
    reference.train()
    full = default_data_collator(rows)
    logits = reference(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    targets = full["labels"][:, 1:]
    criterion = get_loss(name, reduction="mean", ignore_index=-100, **params)
    criterion(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for (label, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=label)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial.parameters()))  # it stepped


def test_without_num_items_it_is_the_mean_over_targets():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    loss = token_loss_func("ce")({"logits": logits}, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
