"""stylegan_patch/loss.py, the drop-in for StyleGAN2-ADA's training/loss.py, run here without that repo.

The three `torch_utils` modules it imports are replaced by minimal stand-ins injected into sys.modules
(`training_stats.report` records what it is given; `misc.ddp_sync` and `conv2d_gradfix.no_weight_gradients`
are plain context managers, as they are on one GPU), and G_mapping / G_synthesis / D are tiny modules
with StyleGAN2-ADA's call signatures. The training loop's convention is reproduced: only the module a
phase trains has requires_grad.
"""
import ast
import contextlib
import copy
import importlib.util
import inspect
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import ROOT

LOSS_PY = os.path.join(ROOT, "stylegan_patch", "loss.py")
PHASES = ["Gmain", "Greg", "Gboth", "Dmain", "Dreg", "Dboth"]
Z_DIM, W_DIM, NUM_WS, N = 4, 6, 3, 6


def _standin_torch_utils():
    training_stats = types.ModuleType("torch_utils.training_stats")
    training_stats.reports = []

    def report(name, value):
        training_stats.reports.append((name, value.detach().clone() if torch.is_tensor(value) else value))
        return value

    training_stats.report = report
    misc = types.ModuleType("torch_utils.misc")
    misc.ddp_sync = lambda module, sync: contextlib.nullcontext()
    conv2d_gradfix = types.ModuleType("torch_utils.ops.conv2d_gradfix")
    conv2d_gradfix.no_weight_gradients = contextlib.nullcontext
    ops = types.ModuleType("torch_utils.ops")
    ops.__path__ = []
    ops.conv2d_gradfix = conv2d_gradfix
    pkg = types.ModuleType("torch_utils")
    pkg.__path__ = []
    pkg.training_stats, pkg.misc, pkg.ops = training_stats, misc, ops
    return {"torch_utils": pkg, "torch_utils.training_stats": training_stats, "torch_utils.misc": misc,
            "torch_utils.ops": ops, "torch_utils.ops.conv2d_gradfix": conv2d_gradfix}


@pytest.fixture(scope="module")
def sg():
    """stylegan_patch/loss.py imported against the stand-ins; sys.modules restored afterwards."""
    standins = _standin_torch_utils()
    saved = {name: sys.modules.get(name) for name in standins}
    sys.modules.update(standins)
    try:
        spec = importlib.util.spec_from_file_location("stylegan_patch_loss_under_test", LOSS_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    module.stats = standins["torch_utils.training_stats"]
    return module


@pytest.fixture(autouse=True)
def _restore_settings(request):
    if "sg" not in request.fixturenames:
        yield
        return
    sg = request.getfixturevalue("sg")
    settings = (sg.ls, sg.kparam)
    sg.stats.reports.clear()
    yield
    sg.ls, sg.kparam = settings


class Mapping(nn.Module):
    """z (N, z_dim), c (N, c_dim) -> ws (N, num_ws, w_dim), like StyleGAN2-ADA's MappingNetwork."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(Z_DIM, W_DIM)

    def forward(self, z, c, skip_w_avg_update=False):
        return torch.tanh(self.fc(z))[:, None, :].repeat(1, NUM_WS, 1)


class Synthesis(nn.Module):
    """ws (N, num_ws, w_dim) -> image (N, 3, 4, 4); nonlinear so path lengths depend on the weights."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(NUM_WS, W_DIM, 48) / W_DIM ** 0.5)

    def forward(self, ws):
        return torch.tanh(torch.einsum("nlw,lwp->np", ws, self.weight)).view(-1, 3, 4, 4)


class Disc(nn.Module):
    """image (N, 3, 4, 4), c -> logits (N, 1)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, 8), nn.Linear(8, 1)

    def forward(self, img, c):
        return self.fc2(torch.tanh(self.fc1(img.flatten(1)))) * 3


def make_nets(seed=0):
    torch.manual_seed(seed)
    return Mapping(), Synthesis(), Disc()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(N, 3, 4, 4, generator=g) * 2 - 1
    return dict(real_img=real, real_c=torch.zeros(N, 0), gen_z=torch.randn(N, Z_DIM, generator=g),
                gen_c=torch.zeros(N, 0))


def run_phase(sg, phase, nets, seed=2, gain=1.0, **loss_kwargs):
    """One accumulate_gradients call as the training loop makes it; returns {param name: grad}."""
    mapping, synthesis, disc = nets
    g_side = phase.startswith("G")
    for module in nets:
        module.zero_grad(set_to_none=True)
        module.requires_grad_((module is disc) != g_side)
    loss = sg.StyleGAN2Loss(torch.device("cpu"), mapping, synthesis, disc, **loss_kwargs)
    torch.manual_seed(seed)
    loss.accumulate_gradients(phase=phase, sync=True, gain=gain, **batch())
    named = [("G_mapping", mapping), ("G_synthesis", synthesis), ("D", disc)]
    return {f"{m}.{n}": p.grad for m, module in named for n, p in module.named_parameters()}, loss


def reported(sg, name):
    return [v for n, v in sg.stats.reports if n == name]


def test_interface_matches_stylegan2_ada(sg):
    params = inspect.signature(sg.StyleGAN2Loss.__init__).parameters
    assert list(params) == ["self", "device", "G_mapping", "G_synthesis", "D", "augment_pipe",
                            "style_mixing_prob", "r1_gamma", "pl_batch_shrink", "pl_decay", "pl_weight"]
    assert [params[p].default for p in list(params)[5:]] == [None, 0.9, 10, 2, 0.01, 2]
    assert list(inspect.signature(sg.Loss.accumulate_gradients).parameters) == [
        "self", "phase", "real_img", "real_c", "gen_z", "gen_c", "sync", "gain"]
    assert issubclass(sg.StyleGAN2Loss, sg.Loss)
    assert (sg.kparam, sg.ls) == (2, "rlo")


def test_self_contained_imports():
    """It is copied into another repo: only torch, numpy and StyleGAN2-ADA's torch_utils."""
    with open(LOSS_PY) as f:
        tree = ast.parse(f.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots == {"numpy", "torch", "torch_utils"}


EXPECTED_REPORTS = {
    "Gmain": {"Loss/scores/fake", "Loss/signs/fake", "Loss/G/loss"},
    "Greg": {"Loss/pl_penalty", "Loss/G/reg"},
    "Dmain": {"Loss/scores/fake", "Loss/signs/fake", "Loss/scores/real", "Loss/signs/real", "Loss/D/loss"},
    "Dreg": {"Loss/scores/real", "Loss/signs/real", "Loss/r1_penalty", "Loss/D/reg"},
}
EXPECTED_REPORTS["Gboth"] = EXPECTED_REPORTS["Gmain"] | EXPECTED_REPORTS["Greg"]
EXPECTED_REPORTS["Dboth"] = EXPECTED_REPORTS["Dmain"] | EXPECTED_REPORTS["Dreg"]


@pytest.mark.parametrize("ls", ["ce", "rlo"])
@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_reaches_the_right_network(sg, phase, ls):
    sg.ls = ls
    grads, loss = run_phase(sg, phase, make_nets())
    for name, grad in grads.items():
        if name.startswith(phase[0]):
            assert grad is not None and torch.isfinite(grad).all(), name
        else:
            assert grad is None, name
    # Every trained network moves (R1 leaves D's output bias at a zero gradient, as it should).
    for net in ("G_mapping", "G_synthesis") if phase[0] == "G" else ("D",):
        assert sum(g.abs().sum() for n, g in grads.items() if n.startswith(net)) > 0, net
    assert {n for n, _ in sg.stats.reports} == EXPECTED_REPORTS[phase]
    assert (loss.pl_mean > 0) == (phase in ("Greg", "Gboth"))


@pytest.mark.parametrize("side", ["G", "D"])
def test_both_phase_is_main_plus_reg(sg, side):
    """Gboth = Gmain + Greg and Dboth = Dmain + Dreg (same random draws, gradients accumulate)."""
    nets = make_nets()
    both, _ = run_phase(sg, side + "both", nets, gain=3.0)
    main, _ = run_phase(sg, side + "main", nets, gain=3.0)
    torch.manual_seed(2)  # Greg/Dreg continue the random stream where the main phase left it
    loss = sg.StyleGAN2Loss(torch.device("cpu"), *nets)
    for module in nets:
        module.zero_grad(set_to_none=True)
    loss.accumulate_gradients(phase=side + "main", sync=True, gain=3.0, **batch())
    loss.accumulate_gradients(phase=side + "reg", sync=True, gain=3.0, **batch())
    added = 0.0
    for name, p in [(f"{m}.{n}", p) for m, mod in zip(["G_mapping", "G_synthesis", "D"], nets)
                    for n, p in mod.named_parameters()]:
        if name.startswith(side):
            torch.testing.assert_close(p.grad, both[name], rtol=1e-5, atol=1e-6)
            added += (p.grad - main[name]).abs().sum()
    assert added > 1e-3, "the reg phase must add something"


def reference_grads(nets, k, dtype, side, gain):
    """G or D gradients of the three GAN terms written out directly (no style mixing), in `dtype`."""
    mapping, synthesis, disc = (copy.deepcopy(m).to(dtype).requires_grad_(True) for m in nets)
    b = {key: v.to(dtype) for key, v in batch().items()}
    gen = disc(synthesis(mapping(b["gen_z"], b["gen_c"])), b["gen_c"])
    real = disc(b["real_img"], b["real_c"])
    if k is None:
        term = lambda x: F.softplus(-x)
    else:
        term = lambda x: k * (1 + torch.exp(-x)) ** (1 / k)
    if side == "G":
        loss = term(gen).mean()
    else:
        loss = term(-gen).mean() + term(real).mean()
    (loss * gain).backward()
    named = [("G_mapping", mapping), ("G_synthesis", synthesis), ("D", disc)]
    return {f"{m}.{n}": p.grad for m, mod in named for n, p in mod.named_parameters() if m.startswith(side)}


@pytest.mark.parametrize("side", ["G", "D"])
@pytest.mark.parametrize("ls,k", [("ce", None), ("rlo", 2), ("rlo", 11), ("rlo", 0.5)])
def test_main_phase_gradients_match_reference(sg, side, ls, k):
    """'ce' gives the softplus losses' gradients; 'rlo' the float64 gradients of k (1 + e^-x)^(1/k)."""
    sg.ls, sg.kparam = ls, k if k is not None else sg.kparam
    nets = make_nets()
    got, _ = run_phase(sg, side + "main", nets, gain=2.0, style_mixing_prob=0)
    want = reference_grads(nets, k, torch.float64, side, gain=2.0)
    for name, ref in want.items():
        torch.testing.assert_close(got[name].double(), ref, rtol=1e-4, atol=1e-6)


def test_ce_reports_exactly_the_softplus_losses(sg):
    sg.ls = "ce"
    run_phase(sg, "Gmain", make_nets())
    (fake,), (g_loss,) = reported(sg, "Loss/scores/fake"), reported(sg, "Loss/G/loss")
    assert torch.equal(g_loss, F.softplus(-fake))
    sg.stats.reports.clear()
    run_phase(sg, "Dmain", make_nets())
    (fake,), (real,), (d_loss,) = (reported(sg, n) for n in ["Loss/scores/fake", "Loss/scores/real", "Loss/D/loss"])
    assert torch.equal(d_loss, F.softplus(fake) + F.softplus(-real))


@pytest.mark.parametrize("k", [2, 11])
def test_rlo_reports_match_float64_formula(sg, k):
    sg.kparam = k
    nets = make_nets()
    with torch.no_grad():  # larger logits than the default init gives, to exercise the exp
        nets[2].fc2.weight.mul_(4)
    run_phase(sg, "Dmain", nets)
    (fake,), (real,), (d_loss,) = (reported(sg, n) for n in ["Loss/scores/fake", "Loss/scores/real", "Loss/D/loss"])
    fake, real = fake.double(), real.double()
    want = k * (1 + torch.exp(fake)) ** (1 / k) + k * (1 + torch.exp(-real)) ** (1 / k)
    assert fake.abs().max() > 3
    torch.testing.assert_close(d_loss.double(), want, rtol=1e-6, atol=0)


def test_large_k_approaches_ce(sg):
    """k (1 + e^x)^(1/k) = k + softplus(x) + O(softplus(x)^2 / k): gradients and values minus k agree."""
    nets = make_nets()
    sg.ls = "ce"
    ce, _ = run_phase(sg, "Dmain", nets)
    ce_loss = reported(sg, "Loss/D/loss")[0]
    sg.ls, sg.kparam = "rlo", 1e4
    sg.stats.reports.clear()
    rlo, _ = run_phase(sg, "Dmain", nets)
    rlo_loss = reported(sg, "Loss/D/loss")[0]
    for name in ce:
        if name.startswith("D"):  # relative gap ~ softplus(x) / k ~ 1e-3
            torch.testing.assert_close(rlo[name], ce[name], rtol=3e-3, atol=3e-3 * ce[name].abs().max().item())
    torch.testing.assert_close(rlo_loss - 2e4, ce_loss, rtol=0, atol=5e-3)
    sg.kparam = 10
    sg.stats.reports.clear()
    far, _ = run_phase(sg, "Dmain", nets)
    assert max((far[n] - ce[n]).abs().max() for n in ce if n.startswith("D")) > 1e-2  # k = 10 still differs


def test_rlo_finite_where_the_literal_pow_overflows(sg):
    x = torch.tensor([150.0, -150.0, 158.0, -158.0, 0.0, -39.0, -41.0], requires_grad=True)  # exponent up to 79
    literal = 2 * torch.pow(1 + torch.exp(-x.detach()), 0.5)
    assert torch.isinf(literal[1]), "the authors' form overflows at -150 in fp32"
    got = sg.logistic_loss(x)
    want = 2 * torch.exp(F.softplus(-x.detach().double()) / 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)  # exact values
    got.sum().backward()
    ref_x = x.detach().double().requires_grad_(True)
    exponent = F.softplus(-ref_x) / 2
    (2 * torch.exp(exponent)).sum().backward()
    # exact gradients up to exponent 20 (x = -40 at k = 2), beyond it scaled down to e^20 per sample
    bound = torch.exp(20 - exponent.detach()).clamp(max=1)
    torch.testing.assert_close(x.grad.double(), ref_x.grad * bound, rtol=1e-5, atol=1e-12)
    assert bound[5] == 1 and bound[6] < 1


def test_adam_keeps_training_the_generator_at_extreme_fake_logits(sg):
    """Fake logits near -154 with k = 2: exact gradients ~1e33 would make Adam's exp_avg_sq inf (fp32) for
    every generator parameter after one step, and every later update 0."""
    sg.ls, sg.kparam = "rlo", 2
    nets = make_nets()
    with torch.no_grad():
        nets[2].fc2.bias.fill_(-154 / 3)  # Disc scales its output by 3
    params = [p for module in nets[:2] for p in module.parameters()]
    adam = torch.optim.Adam(params, lr=1e-3)
    for step in range(4):
        before = [p.detach().clone() for p in params]
        run_phase(sg, "Gmain", nets, seed=2 + step, style_mixing_prob=0)
        assert reported(sg, "Loss/scores/fake")[-1].max() < -150
        adam.step()
        assert all(torch.isfinite(adam.state[p]["exp_avg_sq"]).all() for p in params)
        assert all((p != b).any() for p, b in zip(params, before))  # every generator tensor moves


def test_rlo_clamps_extreme_logits_with_gradient_of_the_right_sign(sg):
    x = torch.tensor([-1e4, -1e6, 1e6], requires_grad=True)
    loss = sg.logistic_loss(x)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert loss[0].item() == loss[1].item() == pytest.approx(2 * math.exp(80), rel=1e-5)
    assert (x.grad[:2] < 0).all() and x.grad[2] == 0  # pushes x up; a saturated-correct logit gets none


def test_bad_settings_raise(sg):
    sg.ls = "wgan"
    with pytest.raises(ValueError, match="ls must be 'ce' or 'rlo'"):
        sg.logistic_loss(torch.zeros(2))
    sg.ls, sg.kparam = "rlo", 0
    with pytest.raises(ValueError, match="kparam must be > 0"):
        sg.logistic_loss(torch.zeros(2))


def test_path_length_regularization_matches_float64_reference(sg):
    """Greg: penalty (|J^T y| - a)^2 with a = lerp(0, mean length, pl_decay), on half the batch."""
    nets = make_nets()
    got, loss = run_phase(sg, "Greg", nets, seed=5, gain=4.0, style_mixing_prob=0, pl_weight=3)
    mapping, synthesis, _ = (copy.deepcopy(m).double().requires_grad_(True) for m in nets)
    z = batch()["gen_z"][: N // 2].double()
    torch.manual_seed(5)  # without style mixing the noise is the phase's first random draw
    noise = torch.randn(N // 2, 3, 4, 4).double() / 4
    ws = mapping(z, None)
    jty = torch.autograd.grad((synthesis(ws) * noise).sum(), ws, create_graph=True)[0]
    lengths = jty.pow(2).sum(2).mean(1).sqrt()
    pl_mean = 0.01 * lengths.mean()
    penalty = (lengths - pl_mean) ** 2
    (penalty * 3).mean().mul(4.0).backward()
    torch.testing.assert_close(reported(sg, "Loss/pl_penalty")[0].double(), penalty.detach(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(loss.pl_mean.double(), pl_mean.detach(), rtol=1e-5, atol=0)
    for name, p in [("G_mapping.fc.weight", mapping.fc.weight), ("G_synthesis.weight", synthesis.weight)]:
        torch.testing.assert_close(got[name].double(), p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item())


def test_r1_regularization_matches_float64_reference(sg):
    """Dreg: gamma/2 * |d D(x) / d x|^2 on real images."""
    nets = make_nets()
    got, _ = run_phase(sg, "Dreg", nets, gain=2.0, r1_gamma=0.5)
    disc = copy.deepcopy(nets[2]).double().requires_grad_(True)
    real = batch()["real_img"].double().requires_grad_(True)
    grad_x = torch.autograd.grad(disc(real, None).sum(), real, create_graph=True)[0]
    penalty = grad_x.pow(2).sum([1, 2, 3])
    (penalty * 0.25).mean().mul(2.0).backward()
    torch.testing.assert_close(reported(sg, "Loss/r1_penalty")[0].double(), penalty.detach(), rtol=1e-5, atol=1e-9)
    for name, p in disc.named_parameters():  # the output bias does not enter the penalty: zero gradient
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got["D." + name].double(), want, rtol=1e-4, atol=1e-9)
