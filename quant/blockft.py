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
before training and after every quarter of the steps (at most 5 measurements; measured after every
step, they took over a quarter of a 5-step finetuning), and the parameters with the lowest held-out
error are kept (the layer as quantized if no measured state beats it). Loss: mean squared error of the
layer's output relative to the mean square of the target. Adam with relative step sizes (as Adafactor's): each
tensor's learning rate is `lr` times its RMS (at least 1e-3), so one rate moves codebook row scales of
about 0.02, norms near 1 and the still unquantized weights by the same fraction per step; batches of
`batch` rows, float32 whatever the model's dtype; with `amp` the training steps' forward and backward
passes run under bfloat16 autocast (twice the matmul throughput on CPUs with AVX-512 BF16) while the
parameters, the loss and the held-out errors that choose the kept state stay float32.

`finetune_e2e` is QuIP#'s second, end-to-end stage: after every layer is quantized, the same
continuous parameters of all decoder layers (and the final norm) train together to match the fp
model's next-token distributions on the calibration rows (KL(fp || quantized) per token), with the
same held-out rows and keep-the-best rule and one absolute Adam learning rate for all tensors (on
SmolLM2-135M relative rates gave no lower perplexity);
embeddings and head stay as they are, and so do the codes.
"""
import contextlib
import math
import time
from dataclasses import dataclass

import torch

from engine import UserError

BLOCK_FT_LR = 5e-3  # relative to each tensor's RMS (`relative_adam`)


@dataclass(frozen=True)
class BlockFT:
    steps: int  # optimizer steps per group of linears
    lr: float = BLOCK_FT_LR
    holdout: float = 0.1  # fraction of the calibration rows held out (at least one row)
    batch: int = 4
    seed: int = 0
    amp: bool = False  # bfloat16 autocast in the training steps


def check_finetuning(flag, lr, nsamples):
    """`--{flag}` (block-ft or e2e-ft) can run: a usable learning rate and calibration rows to hold out."""
    if nsamples < 2:
        raise UserError(f"--{flag} holds out calibration rows to choose when to stop: give --nsamples >= 2")
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--{flag}-lr must be a finite number > 0, got {lr}")


def _autocast(ft, device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=ft.amp)


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
    with _float32(layer):
        return _finetune(layer, inps, targets, kwargs, ft, tag, train, tick)


@contextlib.contextmanager
def _float32(module):
    """Train in float32: the parameters of `module` are float32 inside, their own dtype again after."""
    dtypes = {name: p.dtype for name, p in module.named_parameters()}
    for p in module.parameters():
        p.data = p.data.float()
    try:
        yield
    finally:
        for name, p in module.named_parameters():
            p.data = p.data.to(dtypes.get(name, p.dtype))


def _keep_best(params, steps, train_step, heldout):
    """Run `train_step(step)` `steps` times, measure `heldout()` before and after every quarter of the steps
    (ceil(steps / 4) steps apart, and after the last), leave `params` at their best held-out state: (error
    before, best error, best step)."""
    best = before = heldout()
    best_state, best_step = [p.detach().clone() for p in params], 0
    every = max(1, math.ceil(steps / 4))
    with torch.enable_grad():
        for step in range(1, steps + 1):
            train_step(step)
            if step % every == 0 or step == steps:
                err = heldout()
                if err < best:
                    best, best_step = err, step
                    best_state = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    return before, best, best_step


def relative_adam(params, lr):
    """Adam whose learning rate for each tensor is `lr` times the tensor's RMS at the start (floored at
    1e-3, as Adafactor's relative steps): one absolute rate would move a row scale of 0.02 fifty times
    further, relative to its size, than a norm weight of 1."""
    return torch.optim.Adam([dict(params=[p], lr=lr * max(float(p.detach().float().square().mean().sqrt()), 1e-3))
                             for p in params])


def _finetune(layer, inps, targets, kwargs, ft, tag, train, tick):
    kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else
              tuple(t.float() for t in v) if isinstance(v, tuple) and all(torch.is_tensor(t) for t in v) else v
              for k, v in kwargs.items()}
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = relative_adam(params, ft.lr)
    g = torch.Generator().manual_seed(ft.seed * 1_000_003 + tag)
    scale = targets[:train].float().square().mean().clamp(min=1e-30)

    def train_step(step):
        rows = torch.randint(train, (min(ft.batch, train),), generator=g).to(inps.device)
        with _autocast(ft, inps.device):
            out = _out(layer, inps[rows].float(), kwargs)
        loss = (out.float() - targets[rows].float()).square().mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    before, best, best_step = _keep_best(params, ft.steps, train_step,
                                         lambda: relative_error(layer, inps[train:], targets[train:], kwargs, ft.batch))
    return dict(heldout_before=before, heldout_after=best, best_step=best_step, seconds=time.time() - tick)


def _kl(model, fp_model, ids):
    """Mean over tokens of KL(fp || model) of the next-token distributions of the rows `ids`."""
    with torch.no_grad():
        p = torch.log_softmax(fp_model(ids, use_cache=False).logits.float(), -1)
    q = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean()


def finetune_e2e(model, fp_model, input_ids, device, ft):
    """QuIP#'s end-to-end stage (module docstring) on the (nsamples, seqlen) calibration `input_ids`:
    {heldout_before, heldout_after (mean KL per token), best_step, seconds}."""
    tick = time.time()
    n = input_ids.shape[0]
    hold = max(1, round(n * ft.holdout))
    train = n - hold
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    ids = input_ids.to(device)
    g = torch.Generator().manual_seed(ft.seed)
    with _float32(model):
        optimizer = torch.optim.Adam(params, lr=ft.lr)

        def train_step(step):
            rows = torch.randint(train, (min(ft.batch, train),), generator=g).to(device)
            with _autocast(ft, device):
                loss = _kl(model, fp_model, ids[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def heldout():
            with torch.no_grad():
                return sum(float(_kl(model, fp_model, ids[j:j + 1])) for j in range(train, n)) / hold

        before, best, best_step = _keep_best(params, ft.steps, train_step, heldout)
    return dict(heldout_before=before, heldout_after=best, best_step=best_step, seconds=time.time() - tick)
