"""The supervised training step of train.py, in a package so that benchmarks measure the same code, and
the mixed-precision choice every training script shares (`resolve_amp`)."""
import platform

import torch


def bf16_pays(device):
    """Whether bfloat16 autocast speeds training up on `device`: on CUDA, and on CPUs with bfloat16
    instructions (AVX512-BF16 or AMX on x86; CPUs of other architectures are trusted). An x86 CPU without
    them emulates bfloat16, and autocast runs many times slower than float32 there (25x for a 2048 x 576 x 1536
    linear layer's forward and backward on an AVX2-only AMD EPYC, 1 thread)."""
    device = torch.device(device)
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_amp(amp, device):
    """--amp as a run applies it: off, with one printed line, on a CPU where bf16 autocast would slow it down."""
    if amp and not bf16_pays(device):
        print("--amp: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), where bf16 autocast runs many "
              "times slower than float32; training in float32")
        return False
    return bool(amp)


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
