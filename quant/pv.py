"""Code updates in finetuning in quantized space: PV-tuning's discrete "V" step (Malinovskii et al. 2024,
"PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression").

Finetuning a packed model (`ft_opt.py --model PACKED_DIR`) trains only continuous parameters (the
"P" step). The V step also moves codes: with G = dL/dW_p, the gradient of the training loss wrt a
layer's decoded weights (in the processed basis, where the codes live), each code group (grid: one
weight; E8P: 8 weights) gets a candidate, the codeword nearest to its updated target W - eta G, and the
groups whose linearised improvement -<G, W_new - W_old> is largest take their candidate, a fixed
fraction of each layer's groups per step. Everything else stays: the codes remain codewords of the
layer's codebook (they come from its encoder), the checkpoint remains packed.

The step eta: a gradient step small enough to leave a group at its codeword changes nothing, one large
enough to jump over many codewords is not a descent step of the linearised loss any more. So each
group walks a ladder of step lengths along -G / |G| (`LADDER`, in units of its row's RMS group norm)
and keeps the first candidate that is a different codeword and closer to that target than the current
one (the residual codebooks encode greedily, so the second condition is not implied): the nearest
other codeword in the descent direction. PV-tuning's own V step minimises the same linearised loss
plus a trust-region term over a subspace of groups chosen by their gradient; the ladder is our
stand-in for its step size. `CodeUpdater.step` keeps an update only if a loss it is given (ft_opt.py:
a fixed probe batch) goes down, trying a quarter of the fraction otherwise: on stories260K a plain
first-order step at 1% of the groups per step made finetuning worse.
"""
import math

import torch

from engine import UserError

from .linear import QuantLinear

LADDER = tuple(2.0 ** k for k in range(-4, 3))  # 1/16 .. 4 RMS group norms


@torch.no_grad()
def propose(layer, grad):
    """Every code group's candidate for the gradient `grad` (dL/dW_p, padded rows x cols): (current
    codes, candidate codes, linearised improvement per group; 0 where no candidate)."""
    codec = layer.codec
    rows, cols = layer.spec["padded"]
    size = codec.group
    W = layer.processed_weight().detach().reshape(rows, -1, size)
    G = grad.reshape(rows, -1, size).to(W.dtype)
    old = codec.codes(layer, 0, rows)
    direction = G / G.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    unit = W.square().mean((1, 2), keepdim=True).sqrt() * math.sqrt(size)
    codes, values = old.clone(), W.clone()
    found = torch.zeros(W.shape[:2], dtype=torch.bool, device=W.device)
    for length in LADDER:
        target = W - length * unit * direction
        c, v = codec.encode(layer, target.reshape(rows, cols), 0, rows)
        v = v.reshape(W.shape)
        take = ~found & (c != old).any(-1) & ((v - target).square().sum(-1) < (W - target).square().sum(-1))
        codes[take], values[take] = c[take], v[take]
        found |= take
        if bool(found.all()):
            break
    gain = torch.where(found, -(G * (values - W)).sum(-1), torch.zeros((), dtype=W.dtype, device=W.device))
    return old, codes, gain


@torch.no_grad()
def apply(layer, proposal, fraction):
    """Give the `fraction` of the groups with the largest positive improvement their candidate;
    the number of groups changed."""
    old, codes, gain = proposal
    k = max(1, round(fraction * gain.numel()))
    chosen = torch.zeros(gain.numel(), dtype=torch.bool, device=gain.device)
    chosen[gain.flatten().topk(k).indices] = True
    chosen = chosen.reshape(gain.shape) & (gain > 0)
    layer.codec.set_codes(layer, torch.where(chosen[..., None], codes, old), 0, old.shape[0])
    return int(chosen.sum())


class CodeUpdater:
    """Collects dL/dW_p of every QuantLinear of `model` over the backward passes since the last `step`
    (through `QuantLinear.weight_grad_hook`), and runs the V step on each with `fraction`."""

    def __init__(self, model, fraction):
        self.fraction = fraction
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        for name, m in self.layers.items():
            if not hasattr(m.codec, "group"):  # trellis: a code group is a whole tile, not a run along a row
                raise UserError(f"--update-codes re-encodes runs of codes along a row (grid and e8p codebooks); "
                                f"layer {name} uses the {m.codec.name} codec, whose code groups are whole tiles")
        self.grads = {}
        self.start = {n: m.codec.codes(m, 0, m.spec["padded"][0]).clone() for n, m in self.layers.items()}
        for name, m in self.layers.items():
            m.weight_grad_hook = lambda g, r0, r1, name=name: self._add(name, g, r0, r1)

    def groups(self):
        """Code groups of the model (the denominator of the fraction)."""
        return sum(m.spec["padded"][0] * m.spec["padded"][1] // m.codec.group for m in self.layers.values())

    def differ(self):
        """Code groups whose codes differ from those at the start."""
        return sum(int((m.codec.codes(m, 0, m.spec["padded"][0]) != self.start[n].to(m.codes_device())).any(-1).sum())
                   for n, m in self.layers.items())

    def _add(self, name, g, r0, r1):
        m = self.layers[name]
        if name not in self.grads:
            self.grads[name] = torch.zeros(m.spec["padded"], dtype=torch.float32, device=g.device)
        self.grads[name][r0:r1] += g.float()

    def clear(self):
        self.grads = {}

    def step(self, evaluate, tries=3):
        """The V step on every layer that received a gradient, kept only if the loss `evaluate()` goes down; otherwise the codes are restored and a quarter of
        the fraction is tried, `tries` times in all. Returns the number of code groups changed."""
        proposals = {n: propose(self.layers[n], g) for n, g in self.grads.items()}
        self.clear()
        if not proposals:
            return 0
        before = evaluate()
        fraction = self.fraction
        for _ in range(tries):
            saved = {n: self.layers[n].codec.codes(self.layers[n], 0, p[0].shape[0]) for n, p in proposals.items()}
            changed = sum(apply(self.layers[n], p, fraction) for n, p in proposals.items())
            if changed == 0 or evaluate() < before:
                return changed
            for n, codes in saved.items():
                self.layers[n].codec.set_codes(self.layers[n], codes, 0, codes.shape[0])
            fraction /= 4
        return 0

    def close(self):
        for m in self.layers.values():
            m.weight_grad_hook = None
