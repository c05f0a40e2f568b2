"""Code updates in finetuning in quantized space: PV-tuning's discrete "V" step (Malinovskii et al. 2024,
"PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression").

Finetuning a packed model (`ft_opt.py --model PACKED_DIR`) trains only continuous parameters (the
"P" step). The V step also moves codes: with G = dL/dW_p, the gradient of the training loss wrt a
layer's decoded weights (in the processed basis, where the codes live), each code group (grid: one
weight; E8P: 8 weights; trellis: one tile's stream of T weights) gets a candidate, the codeword
nearest to its updated target W - eta G, and the groups whose linearised improvement -<G, W_new - W_old> is largest take their candidate, a fixed
fraction of each layer's groups per step. Everything else stays: the codes remain codewords of the
layer's codebook (they come from its encoder: a trellis tile is searched anew by the tail-biting
Viterbi of quantization, on its updated target in the scaled basis of its stream, so it stays a valid
stream), the checkpoint remains packed. A Viterbi search costs far more than rounding or the E8P search,
so in a trellis layer only CANDIDATES times as many tiles as will change are searched, those with the
largest |G| x norm.

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

from .linear import QuantLinear

LADDER = tuple(2.0 ** k for k in range(-4, 3))  # 1/16 .. 4 RMS group norms
CANDIDATES = 4  # costly encoders (trellis): groups searched per group to change, those of largest |G| x RMS norm


def group_count(layer):
    rows, cols = layer.spec["padded"]
    return rows * cols // layer.codebook.group_size(layer.spec)


@torch.no_grad()
def propose(layer, grad, candidates=None):
    """Every code group's candidate for the gradient `grad` (dL/dW_p, padded rows x cols): (current
    codes, candidate codes, linearised improvement per group; 0 where no candidate). With
    `candidates`, only that many groups are searched, those with the largest |G| x RMS group norm
    (the first-order gain of a step of one norm; PV-tuning also restricts its V step to a subspace
    chosen by the gradient)."""
    rows, cols = layer.spec["padded"]
    W = layer.codebook.group_view(layer, layer.processed_weight().detach())
    G = layer.codebook.group_view(layer, grad.to(W.dtype))
    old = layer.codebook.codes(layer, 0, rows)
    shape, old = old.shape, old.reshape(-1, old.shape[-1])
    per_row = len(W) // (rows // layer.codebook.group_rows(layer.spec))  # groups along a row of groups
    unit = W.reshape(-1, per_row, W.shape[1]).square().mean((1, 2)).sqrt() * math.sqrt(W.shape[1])
    unit = unit.repeat_interleave(per_row)[:, None]
    norm = G.norm(dim=-1, keepdim=True)
    direction = G / norm.clamp(min=1e-30)
    todo = torch.arange(len(W), device=W.device)
    if candidates is not None and candidates < len(W):
        todo = (norm * unit)[:, 0].topk(candidates).indices
    codes, values = old.clone(), W.clone()
    found = torch.zeros(len(W), dtype=torch.bool, device=W.device)
    for length in LADDER:
        target = W[todo] - length * unit[todo] * direction[todo]
        c, v = layer.codebook.encode_groups(layer, W, todo, target)
        take = (c != old[todo]).any(-1) & ((v - target).square().sum(-1) < (W[todo] - target).square().sum(-1))
        codes[todo[take]], values[todo[take]] = c[take], v[take]
        found[todo[take]] = True
        todo = todo[~take]
        if not todo.numel():
            break
    gain = torch.where(found, -(G * (values - W)).sum(-1), torch.zeros((), dtype=W.dtype, device=W.device))
    return old.reshape(shape), codes.reshape(shape), gain.reshape(shape[:-1])


@torch.no_grad()
def apply(layer, proposal, fraction):
    """Give the `fraction` of the groups with the largest positive improvement their candidate;
    the number of groups changed."""
    old, codes, gain = proposal
    k = max(1, round(fraction * gain.numel()))
    chosen = torch.zeros(gain.numel(), dtype=torch.bool, device=gain.device)
    chosen[gain.flatten().topk(k).indices] = True
    chosen = chosen.reshape(gain.shape) & (gain > 0)
    layer.codebook.set_codes(layer, torch.where(chosen[..., None], codes, old), 0, layer.spec["padded"][0])
    return int(chosen.sum())


class CodeUpdater:
    """Collects dL/dW_p of every QuantLinear of `model` over the backward passes since the last `step`
    (through `QuantLinear.weight_grad_hook`), and runs the V step on each with `fraction`."""

    def __init__(self, model, fraction):
        self.fraction = fraction
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        self.grads = {}
        self.start = {n: m.codebook.codes(m, 0, m.spec["padded"][0]).clone() for n, m in self.layers.items()}
        for name, m in self.layers.items():
            m.weight_grad_hook = lambda g, r0, r1, name=name: self._add(name, g, r0, r1)

    def groups(self):
        """Code groups of the model (the denominator of the fraction)."""
        return sum(group_count(m) for m in self.layers.values())

    def candidates(self, layer):
        """Groups searched in `layer` (None: all): a costly encode (a trellis tile's Viterbi search) runs per
        group and ladder step."""
        return CANDIDATES * max(1, round(self.fraction * group_count(layer))) if layer.codebook.costly_encode else None

    def differ(self):
        """Code groups whose codes differ from those at the start."""
        return sum(int((m.codebook.codes(m, 0, m.spec["padded"][0]) != self.start[n].to(m.codes_device())).any(-1).sum())
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
        proposals = {n: propose(self.layers[n], g, self.candidates(self.layers[n])) for n, g in self.grads.items()}
        self.clear()
        if not proposals:
            return 0
        before = evaluate()
        fraction = self.fraction
        for _ in range(tries):
            saved = {n: self.layers[n].codebook.codes(self.layers[n], 0, self.layers[n].spec["padded"][0]).clone()
                     for n in proposals}
            changed = sum(apply(self.layers[n], p, fraction) for n, p in proposals.items())
            if changed == 0 or evaluate() < before:
                return changed
            for n, codes in saved.items():
                self.layers[n].codebook.set_codes(self.layers[n], codes, 0, self.layers[n].spec["padded"][0])
            fraction /= 4
        return 0

    def close(self):
        for m in self.layers.values():
            m.weight_grad_hook = None
