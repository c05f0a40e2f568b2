"""The supervised training step of train.py, in a package so that benchmarks measure the same code."""
import torch


def autocast_dtype(device):
    """bf16, or fp16 (with grad scaling) on CUDA GPUs without bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def train_step(model, x, y, criterion, optimizer, scaler, autocast, sums):
    """One optimizer step. Metrics are added into the device tensor `sums` = [loss * n, correct, n];
    nothing here waits for the device."""
    with autocast():
        logits = model(x)
    loss = criterion(logits, y)  # the losses compute in fp32 from bf16/fp16 logits
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        n = y.shape[0]
        sums[0] += loss.detach() * n
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += n
