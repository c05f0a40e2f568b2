# Drop-in replacement for `training/loss.py` of NVIDIA's StyleGAN2-ADA (PyTorch),
# https://github.com/NVlabs/stylegan2-ada-pytorch, adding the rooted logistic objective (RLO) of
# "Accelerated Neural Network Training with Rooted Logistic Objectives" (arXiv 2310.03890, eq. 9).
#
# Same imports, classes, constructor and `accumulate_gradients` phases as the original; style mixing,
# path-length and R1 regularization are unchanged. Copy this file over `training/loss.py` in a
# StyleGAN2-ADA checkout and set the two module-level settings below. It is self-contained: it imports
# only torch, numpy and StyleGAN2-ADA's own `torch_utils`.
"""StyleGAN2 loss with a switch between the logistic (softplus) losses and their rooted forms.

With ``ls = 'ce'`` the three logistic terms are exactly StyleGAN2-ADA's:
    G:      softplus(-gen_logits)                 = -log sigmoid(gen_logits)
    D fake: softplus(gen_logits)                  = -log(1 - sigmoid(gen_logits))
    D real: softplus(-real_logits)                = -log sigmoid(real_logits)
With ``ls = 'rlo'`` (k = kparam) each ``softplus(x)`` becomes ``k * (1 + exp(x))^(1/k)``:
    G:      k * (1 + exp(-gen_logits))^(1/k)
    D fake: k * (1 + exp(gen_logits))^(1/k)
    D real: k * (1 + exp(-real_logits))^(1/k)
computed as ``k * exp(softplus(x) / k)``: the literal ``pow(1 + exp(x), 1/k)`` overflows to inf once
x > 88 in fp32, although the loss itself is finite up to x ~ 88 k. Two bounds on the exponent
E = softplus(x)/k, both straight-through (the gradient keeps its direction):
- the gradient is that of k * exp(min(E, 20)): at most e^20 ~ 4.9e8 per sample. The exact gradient
  e^E reaches 1e33 at a fake logit of -154 with k = 2, and one Adam step then sets every generator
  parameter's exp_avg_sq to inf (fp32), so every later update is 0 and training stops for good;
- the value is exact up to E = 80 (k * e^80 is finite in fp32 for any k < 1e3) and clamped there.
E > 20 needs a logit beyond 20 k in the wrong direction (-40 at k = 2), far outside normal training.
As k -> inf, k * (1 + e^x)^(1/k) - k -> softplus(x): RLO tends to the original loss.
"""
import numpy as np
import torch
from torch_utils import training_stats
from torch_utils import misc
from torch_utils.ops import conv2d_gradfix

# ---- settings (edit here; read at every call) -------------------------------------------------------
kparam = 2  # k of the rooted loss; the paper uses k = 2 on FFHQ and k = 11 on Stanford Dogs.
ls = 'rlo'  # 'rlo': rooted logistic objective; 'ce': the original StyleGAN2 softplus losses.

_MAX_EXPONENT = 80.0  # k * exp(80) stays finite in fp32 (max ~ exp(88.7)) for any k < 1e3
_GRAD_EXPONENT = 20.0  # gradients at most e^20 per sample: squared (Adam's exp_avg_sq) still finite in fp32


def logistic_loss(x):
    """Per-sample loss for a logit `x` that should be large: softplus(-x) ('ce') or k (1 + e^-x)^(1/k) ('rlo')."""
    if ls == 'ce':
        return torch.nn.functional.softplus(-x)
    if ls != 'rlo':
        raise ValueError(f"loss.py: ls must be 'ce' or 'rlo', got {ls!r}")
    k = float(kparam)
    if not k > 0:
        raise ValueError(f'loss.py: kparam must be > 0, got {kparam!r}')
    exponent = torch.nn.functional.softplus(-x.float()) / k
    # value k e^min(E, 20), gradient k e^min(E, 20) dE/dx (straight-through), then the exact value added
    bounded = k * torch.exp(exponent - (exponent - exponent.clamp(max=_GRAD_EXPONENT)).detach())
    return bounded + (k * torch.exp(exponent.detach().clamp(max=_MAX_EXPONENT)) - bounded).detach()

#----------------------------------------------------------------------------

class Loss:
    def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, sync, gain): # to be overridden by subclass
        raise NotImplementedError()

#----------------------------------------------------------------------------

class StyleGAN2Loss(Loss):
    def __init__(self, device, G_mapping, G_synthesis, D, augment_pipe=None, style_mixing_prob=0.9, r1_gamma=10, pl_batch_shrink=2, pl_decay=0.01, pl_weight=2):
        super().__init__()
        self.device = device
        self.G_mapping = G_mapping
        self.G_synthesis = G_synthesis
        self.D = D
        self.augment_pipe = augment_pipe
        self.style_mixing_prob = style_mixing_prob
        self.r1_gamma = r1_gamma
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_weight = pl_weight
        self.pl_mean = torch.zeros([], device=device)  # running mean of path lengths

    def run_G(self, z, c, sync):
        with misc.ddp_sync(self.G_mapping, sync):
            ws = self.G_mapping(z, c)
            if self.style_mixing_prob > 0:
                # With probability style_mixing_prob, the layers from a random cutoff on take the
                # styles of a second latent (cutoff = num_ws means no mixing).
                with torch.autograd.profiler.record_function('style_mixing'):
                    num_ws = ws.shape[1]
                    cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, num_ws)
                    mix = torch.rand([], device=ws.device) < self.style_mixing_prob
                    cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, num_ws))
                    ws[:, cutoff:] = self.G_mapping(torch.randn_like(z), c, skip_w_avg_update=True)[:, cutoff:]
        with misc.ddp_sync(self.G_synthesis, sync):
            img = self.G_synthesis(ws)
        return img, ws

    def run_D(self, img, c, sync):
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        with misc.ddp_sync(self.D, sync):
            logits = self.D(img, c)
        return logits

    def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, sync, gain):
        assert phase in ['Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth']
        do_Gmain = phase in ['Gmain', 'Gboth']
        do_Dmain = phase in ['Dmain', 'Dboth']
        do_Gpl = phase in ['Greg', 'Gboth'] and self.pl_weight != 0
        do_Dr1 = phase in ['Dreg', 'Dboth'] and self.r1_gamma != 0

        # Gmain: raise D's logits for generated images.
        if do_Gmain:
            with torch.autograd.profiler.record_function('Gmain_forward'):
                gen_img, _gen_ws = self.run_G(gen_z, gen_c, sync=(sync and not do_Gpl))  # Gpl syncs instead
                gen_logits = self.run_D(gen_img, gen_c, sync=False)
                training_stats.report('Loss/scores/fake', gen_logits)
                training_stats.report('Loss/signs/fake', gen_logits.sign())
                loss_Gmain = logistic_loss(gen_logits)
                training_stats.report('Loss/G/loss', loss_Gmain)
            with torch.autograd.profiler.record_function('Gmain_backward'):
                loss_Gmain.mean().mul(gain).backward()

        # Gpl: path-length regularization on a shrunk batch.
        if do_Gpl:
            with torch.autograd.profiler.record_function('Gpl_forward'):
                batch_size = gen_z.shape[0] // self.pl_batch_shrink
                gen_img, gen_ws = self.run_G(gen_z[:batch_size], gen_c[:batch_size], sync=sync)
                pl_noise = torch.randn_like(gen_img) / np.sqrt(gen_img.shape[2] * gen_img.shape[3])
                with torch.autograd.profiler.record_function('pl_grads'), conv2d_gradfix.no_weight_gradients():
                    pl_grads = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()], inputs=[gen_ws],
                                                   create_graph=True, only_inputs=True)[0]
                pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
                pl_mean = self.pl_mean.lerp(pl_lengths.mean(), self.pl_decay)
                self.pl_mean.copy_(pl_mean.detach())
                pl_penalty = (pl_lengths - pl_mean).square()
                training_stats.report('Loss/pl_penalty', pl_penalty)
                loss_Gpl = pl_penalty * self.pl_weight
                training_stats.report('Loss/G/reg', loss_Gpl)
            with torch.autograd.profiler.record_function('Gpl_backward'):
                # gen_img * 0 keeps the synthesis output in the graph (DDP expects every parameter used).
                (gen_img[:, 0, 0, 0] * 0 + loss_Gpl).mean().mul(gain).backward()

        # Dmain, fake half: lower D's logits for generated images.
        loss_Dgen = 0
        if do_Dmain:
            with torch.autograd.profiler.record_function('Dgen_forward'):
                gen_img, _gen_ws = self.run_G(gen_z, gen_c, sync=False)
                gen_logits = self.run_D(gen_img, gen_c, sync=False)  # synced by the real pass below
                training_stats.report('Loss/scores/fake', gen_logits)
                training_stats.report('Loss/signs/fake', gen_logits.sign())
                loss_Dgen = logistic_loss(-gen_logits)
            with torch.autograd.profiler.record_function('Dgen_backward'):
                loss_Dgen.mean().mul(gain).backward()

        # Dmain, real half: raise D's logits for real images. Dr1: R1 regularization.
        if do_Dmain or do_Dr1:
            name = 'Dreal_Dr1' if do_Dmain and do_Dr1 else 'Dreal' if do_Dmain else 'Dr1'
            with torch.autograd.profiler.record_function(name + '_forward'):
                real_img_tmp = real_img.detach().requires_grad_(do_Dr1)
                real_logits = self.run_D(real_img_tmp, real_c, sync=sync)
                training_stats.report('Loss/scores/real', real_logits)
                training_stats.report('Loss/signs/real', real_logits.sign())

                loss_Dreal = 0
                if do_Dmain:
                    loss_Dreal = logistic_loss(real_logits)
                    training_stats.report('Loss/D/loss', loss_Dgen + loss_Dreal)

                loss_Dr1 = 0
                if do_Dr1:
                    with torch.autograd.profiler.record_function('r1_grads'), conv2d_gradfix.no_weight_gradients():
                        r1_grads = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real_img_tmp],
                                                       create_graph=True, only_inputs=True)[0]
                    r1_penalty = r1_grads.square().sum([1, 2, 3])
                    loss_Dr1 = r1_penalty * (self.r1_gamma / 2)
                    training_stats.report('Loss/r1_penalty', r1_penalty)
                    training_stats.report('Loss/D/reg', loss_Dr1)

            with torch.autograd.profiler.record_function(name + '_backward'):
                (real_logits * 0 + loss_Dreal + loss_Dr1).mean().mul(gain).backward()

#----------------------------------------------------------------------------
