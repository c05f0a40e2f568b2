"""Finetuning inside a decoder layer while it is quantized (QuIP#'s "fine-tuning during quantization",
Tseng et al. 2024, section 5): `quant.model.quantize_model(..., block_ft=BlockFT(steps, lr))`.

The linears of a decoder layer are quantized group by group, a group being the linears that read the
same input (found by a forward pass: q/k/v, o, gate/up, down for Llama; q/k/v, out, fc1, fc2 for
OPT), each group from Hessians collected on the layer as it is at that point. After each group the
layer is trained to map its calibration inputs (the outputs of the already quantized layers before it)
to the fp model's hidden states after this layer: every continuous parameter of the layer trains, that
is the still unquantized linears, the norms and biases, and the quantized linears' codebook scales and
per-channel in/out scales (QuIP#'s sign vectors, treated as reals, are these two diagonals); codes are
buffers and stay. The last `holdout` calibration rows are never trained on: their error is measured
before training and every `steps // 8` steps, and the parameters with the lowest held-out error are
kept (the layer as quantized if no step beats it). Loss: mean squared error of the layer's output
relative to the mean square of the target. Adam, batches of `batch` rows, float32 whatever the
model's dtype.
"""
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockFT:
    steps: int  # optimizer steps per group of linears
    lr: float = 1e-3
    holdout: float = 0.1  # fraction of the calibration rows held out (at least one row)
    batch: int = 4
    seed: int = 0


def linear_groups(layer, inp, kwargs):
    """Names of the layer's nn.Linear modules grouped by the input they read, in call order: one
    forward of one calibration row, the groups are runs of calls that receive the same tensor."""
    calls = []
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: calls.append((n, args[0])))
               for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        layer(inp, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = []
    for i, (name, x) in enumerate(calls):
        if i and x is calls[i - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _out(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def relative_error(layer, inps, targets, kwargs, batch):
    """sum ||layer(x) - y||^2 / sum ||y||^2 over the rows of `inps`."""
    err = total = 0.0
    with torch.no_grad():
        for j in range(0, inps.shape[0], batch):
            y = targets[j:j + batch].float()
            err += float((_out(layer, inps[j:j + batch].float(), kwargs) - y).square().sum())
            total += float(y.square().sum())
    return err / max(total, 1e-30)


def finetune(layer, inps, targets, kwargs, ft, tag=0):
    """Train every parameter of `layer` (see the module docstring) for `ft.steps` Adam steps on the
    first rows of `inps` -> `targets`, keep the state with the lowest error on the held-out last rows.
    Returns {heldout_before, heldout_after, best_step, seconds}."""
    tick = time.time()
    n = inps.shape[0]
    hold = max(1, round(n * ft.holdout))
    train = n - hold
    dtypes = {name: p.dtype for name, p in layer.named_parameters()}
    layer.float()
    kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else
              tuple(t.float() for t in v) if isinstance(v, tuple) and all(torch.is_tensor(t) for t in v) else v
              for k, v in kwargs.items()}
    params = [p for p in layer.parameters() if p.requires_grad]
    held_x, held_y = inps[train:], targets[train:]
    best = before = relative_error(layer, held_x, held_y, kwargs, ft.batch)
    best_state, best_step = [p.detach().clone() for p in params], 0
    every = max(1, ft.steps // 8)
    optimizer = torch.optim.Adam(params, lr=ft.lr)
    g = torch.Generator().manual_seed(ft.seed * 1_000_003 + tag)
    scale = targets[:train].float().square().mean().clamp(min=1e-30)
    with torch.enable_grad():
        for step in range(1, ft.steps + 1):
            rows = torch.randint(train, (min(ft.batch, train),), generator=g).to(inps.device)
            loss = (_out(layer, inps[rows].float(), kwargs) - targets[rows].float()).square().mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % every == 0 or step == ft.steps:
                err = relative_error(layer, held_x, held_y, kwargs, ft.batch)
                if err < best:
                    best, best_step = err, step
                    best_state = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
        for name, p in layer.named_parameters():
            p.data = p.data.to(dtypes.get(name, p.dtype))
    return dict(heldout_before=before, heldout_after=best, best_step=best_step, seconds=time.time() - tick)
