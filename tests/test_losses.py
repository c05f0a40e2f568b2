"""losses/: every form against float64 references written from the formulas, gradients, closed forms,
limits (k -> inf gives cross-entropy), stability at extreme logits, ignore_index, soft targets, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import UserError
from losses import GAN_LOSSES, LOSSES, get_gan_loss, get_loss
from losses.rooted import (MAX_EXPONENT, binary_root_convex_grad_coef,
                           binary_root_convex_hessian_coef)

CLASS_LOSSES = ["ce", "focal", "root", "root_convex"]
BINARY_LOSSES = ["logistic", "binary_root_convex", "binary_root"]


def reference_class_loss(name, logits, target, k=3.0, m=3.0, alpha=0.25, gamma=3.0):
    """Per-sample losses in float64, straight from the formulas (softmax, index, power)."""
    p_y = torch.softmax(logits.double(), dim=1).gather(1, target[:, None]).squeeze(1)
    return {
        "ce": -torch.log(p_y),
        "focal": -alpha * (1 - p_y) ** gamma * torch.log(p_y),
        "root": m * (1 - p_y ** (1 / k)),
        "root_convex": m * (p_y ** (-1 / k) - 1),
    }[name]


def reference_binary_loss(name, z, y, k=3.0):
    z, y = z.double(), y.double()
    return {
        "logistic": torch.log1p(torch.exp(-y * z)),
        "binary_root_convex": k * (1 + torch.exp(-y * z)) ** (1 / k),
        "binary_root": k * (1 - torch.sigmoid(y * z) ** (1 / k)),
    }[name]


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(CLASS_LOSSES), n=st.integers(1, 9), c=st.integers(2, 12),
       k=st.floats(0.5, 30), m=st.floats(0.1, 20), scale=st.floats(0.1, 8), seed=st.integers(0, 2**16))
def test_class_losses_match_float64_reference(name, n, c, k, m, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    target = torch.randint(0, c, (n,), generator=g)
    got = get_loss(name, k=k, m=m, reduction="none")(logits, target)
    want = reference_class_loss(name, logits, target, k=k, m=m)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(BINARY_LOSSES), n=st.integers(1, 16), k=st.floats(0.5, 30),
       scale=st.floats(0.1, 10), seed=st.integers(0, 2**16))
def test_binary_losses_match_float64_reference(name, n, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g) * scale
    y = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    got = get_loss(name, k=k, reduction="none")(z, y)
    torch.testing.assert_close(got.double(), reference_binary_loss(name, z, y, k=k), rtol=2e-5, atol=2e-6)


def test_binary_labels_zero_one_read_as_minus_one_plus_one():
    z = torch.randn(10)
    y01 = torch.randint(0, 2, (10,))
    for name in BINARY_LOSSES:
        crit = get_loss(name, k=4)
        torch.testing.assert_close(crit(z, y01), crit(z, y01 * 2 - 1))


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_class_gradcheck_float64(name):
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 6, -100, 2])
    crit = get_loss(name, k=2.5, m=4.0)
    assert torch.autograd.gradcheck(lambda x: crit(x, target), (logits,))
    soft = torch.softmax(torch.randn(5, 7, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda x: crit(x, soft), (logits,))


@pytest.mark.parametrize("name", BINARY_LOSSES)
def test_binary_gradcheck_float64(name):
    z = torch.randn(9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (9,)) * 2 - 1
    assert torch.autograd.gradcheck(lambda a: get_loss(name, k=3.5)(a, y), (z,))


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_gradient_matches_float64_autograd_of_reference(name):
    """The closed-form backward of the fused path equals autograd through the naive formula."""
    logits = torch.randn(16, 10) * 2
    target = torch.randint(0, 10, (16,))
    x = logits.clone().requires_grad_()
    get_loss(name, k=3, m=3)(x, target).backward()
    ref = logits.double().requires_grad_()
    reference_class_loss(name, ref, target).mean().backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


def test_binary_convex_closed_forms_match_autograd():
    """Paper eq. 5-8: f' = -l^(1/k) t and f'' = l^(1/k) t (1 - t (1 - 1/k)), t = sigmoid(-z)."""
    for k in (1.5, 3.0, 7.0, 20.0):
        z = torch.linspace(-12, 12, 101, dtype=torch.float64, requires_grad=True)
        f = k * (1 + torch.exp(-z)) ** (1 / k)
        (d1,) = torch.autograd.grad(f.sum(), z, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), z)
        torch.testing.assert_close(binary_root_convex_grad_coef(z.detach(), k), d1.detach())
        torch.testing.assert_close(binary_root_convex_hessian_coef(z.detach(), k), d2)
        # the paper's expression, with its s read as sigmoid(-y w.x)
        s = torch.sigmoid(-z.detach())
        lk = (1 + torch.exp(-z.detach())) ** (1 / k)
        torch.testing.assert_close(binary_root_convex_hessian_coef(z.detach(), k), lk * s * (1 - s * (1 - 1 / k)))


def test_binary_convex_hessian_of_risk_is_psd_for_k_above_one():
    """Strict convexity (Lemma 1): the Hessian of the mean loss in w is PD at random w, k > 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=g) * 2 - 1
    crit = get_loss("binary_root_convex", k=2.0)
    for _ in range(5):
        w = torch.randn(5, generator=g, dtype=torch.float64) * 3
        hess = torch.autograd.functional.hessian(lambda v: crit(x @ v, y), w)
        h = binary_root_convex_hessian_coef(y * (x @ w), 2.0)
        torch.testing.assert_close(hess, x.T @ (h[:, None] * x) / len(x))
        assert torch.linalg.eigvalsh(hess).min() > 0


@pytest.mark.parametrize("name", ["root", "root_convex"])
def test_rooted_forms_tend_to_cross_entropy_as_k_grows(name):
    logits = torch.randn(32, 10, dtype=torch.float64) * 2
    target = torch.randint(0, 10, (32,))
    ce_x = logits.clone().requires_grad_()
    ce = F.cross_entropy(ce_x, target)
    ce.backward()
    errors = []
    for k in (10.0, 100.0, 1000.0, 10000.0):
        x = logits.clone().requires_grad_()
        loss = get_loss(name, k=k, m=k)(x, target)
        loss.backward()
        errors.append(((loss - ce).abs().item(), (x.grad - ce_x.grad).abs().max().item()))
    for (v0, g0), (v1, g1) in zip(errors, errors[1:]):
        assert v1 < v0 / 5 and g1 < g0 / 5  # error is O(1/k)
    # first-order term: k(1 - p^(1/k)) = -log p - (log p)^2 / (2k) + ..., and (p^(-1/k) - 1) flips the sign
    logp = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    assert errors[-1][0] == pytest.approx((logp ** 2).mean().item() / (2 * 1e4), rel=0.01)
    assert errors[-1][1] < 1e-4


def test_rooted_gan_loss_tends_to_logistic_gan_loss():
    """k (1+e^x)^(1/k) = k + softplus(x) + O(1/k): compare after removing the constant k."""
    gen, real = torch.randn(64, dtype=torch.float64) * 3, torch.randn(64, dtype=torch.float64) * 3
    ce = get_gan_loss("ce")
    for k in (1e3, 1e5):
        root = get_gan_loss("root", k=k)
        assert abs(root.generator(gen) - k - ce.generator(gen)) < 20 / k
        assert abs(root.discriminator(gen, real) - 2 * k - ce.discriminator(gen, real)) < 40 / k


def test_gan_losses_match_float64_reference():
    gen, real = torch.randn(50) * 4, torch.randn(50) * 4
    k = 2.0
    g64, r64 = gen.double(), real.double()
    root = get_gan_loss("root", k=k)
    torch.testing.assert_close(root.generator(gen).double(), (k * (1 + torch.exp(-g64)) ** (1 / k)).mean(),
                               rtol=1e-5, atol=0)
    want_d = (k * (1 + torch.exp(g64)) ** (1 / k)).mean() + (k * (1 + torch.exp(-r64)) ** (1 / k)).mean()
    torch.testing.assert_close(root.discriminator(gen, real).double(), want_d, rtol=1e-5, atol=0)
    ce = get_gan_loss("ce")
    torch.testing.assert_close(ce.generator(gen).double(), F.softplus(-g64).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CLASS_LOSSES + BINARY_LOSSES)
def test_no_nan_or_inf_at_extreme_logits(name, dtype):
    g = torch.Generator().manual_seed(1)
    if name in BINARY_LOSSES:
        logits = torch.tensor([-1e4, -300.0, -30.0, 0.0, 30.0, 300.0, 1e4]).to(dtype).requires_grad_()
        target = torch.tensor([1, 1, 1, -1, -1, -1, -1])
    else:
        logits = (torch.randn(16, 50, generator=g).sign() * 1e4).to(dtype).requires_grad_()
        target = torch.randint(0, 50, (16,), generator=g)
    for reduction in ("mean", "sum"):
        logits.grad = None
        loss = get_loss(name, k=3, m=3, reduction=reduction)(logits, target)
        loss.backward()
        assert torch.isfinite(loss).all(), (name, dtype, loss)
        assert torch.isfinite(logits.grad).all(), (name, dtype)


def test_confident_mistake_keeps_a_useful_gradient():
    """Where the authors' softmax-index-pow form underflows to p_y = 0 (NaN gradient), ours stays finite
    and still pushes the target logit up."""
    logits = torch.tensor([[200.0, 0.0, -200.0]], requires_grad=True)
    target = torch.tensor([2])
    naive = logits.detach().clone().requires_grad_()
    p_y = torch.softmax(naive, 1)[0, 2]
    (3 * (p_y ** (-1 / 3) - 1)).backward()
    assert not torch.isfinite(naive.grad).all()
    loss = get_loss("root_convex", k=3, m=3)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss > 1e30
    assert logits.grad[0, 2] < 0 < logits.grad[0, 0]


def test_convex_value_is_clamped_in_log_space():
    logits = torch.tensor([[0.0, 1e4]])
    loss = get_loss("root_convex", k=1, m=1)(logits, torch.tensor([0]))
    assert math.isclose(loss.item(), math.expm1(MAX_EXPONENT), rel_tol=1e-5)


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_ignore_index_and_reductions(name):
    logits = torch.randn(6, 4)
    target = torch.tensor([1, -100, 3, 0, -100, 2])
    valid = target != -100
    crit = get_loss(name, k=3, m=3, reduction="none")
    per = crit(logits, target)
    assert per[~valid].eq(0).all()
    torch.testing.assert_close(per[valid], get_loss(name, k=3, m=3, reduction="none")(logits[valid], target[valid]))
    torch.testing.assert_close(get_loss(name, k=3, m=3)(logits, target), per[valid].mean())
    torch.testing.assert_close(get_loss(name, k=3, m=3, reduction="sum")(logits, target), per.sum())
    x = logits.clone().requires_grad_()
    get_loss(name, k=3, m=3)(x, target).backward()
    assert x.grad[~valid].eq(0).all()
    all_ignored = get_loss(name)(logits, torch.full((6,), -100))
    assert all_ignored.item() == 0


def test_ce_matches_torch_including_ignore_index_and_spatial_dims():
    logits = torch.randn(3, 5, 4, 2)
    target = torch.randint(0, 5, (3, 4, 2))
    target[0, 0, 0] = -100
    torch.testing.assert_close(get_loss("ce")(logits, target), F.cross_entropy(logits, target))
    per = get_loss("ce", reduction="none")(logits, target)
    torch.testing.assert_close(per, F.cross_entropy(logits, target, reduction="none"))


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_soft_targets_equal_the_mixup_combination(name):
    logits = torch.randn(8, 6)
    ya, yb = torch.randint(0, 6, (8,)), torch.randint(0, 6, (8,))
    lam = 0.3
    soft = lam * F.one_hot(ya, 6).float() + (1 - lam) * F.one_hot(yb, 6).float()
    crit = get_loss(name, k=4, m=2)
    torch.testing.assert_close(crit(logits, soft), lam * crit(logits, ya) + (1 - lam) * crit(logits, yb))
    onehot = F.one_hot(ya, 6).float()
    torch.testing.assert_close(crit(logits, onehot), crit(logits, ya))


def test_large_vocabulary_uses_chunks_and_matches_cross_entropy():
    """More than one row chunk (4M logits each): values and gradients still equal torch's CE."""
    logits = torch.randn(90, 50_000, dtype=torch.bfloat16)
    target = torch.randint(0, 50_000, (90,))
    target[5] = -100
    x = logits.clone().requires_grad_()
    loss = get_loss("ce")(x, target)
    loss.backward()
    ref = logits.float().requires_grad_()
    F.cross_entropy(ref, target).backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target), rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=1e-2, atol=1e-7)


def test_registry_errors_list_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'nope'; choose from: ce, focal, root, root_convex"):
        get_loss("nope")
    with pytest.raises(ValueError, match="k must be"):
        get_loss("root", k=0)
    with pytest.raises(ValueError, match="m must be"):
        get_loss("root_convex", m=-1)
    with pytest.raises(UserError, match="k must be"):
        get_loss("binary_root_convex", k=float("inf"))
    with pytest.raises(UserError, match="choose from: ce, root"):
        get_gan_loss("wgan")
    with pytest.raises(UserError, match="reduction"):
        get_loss("ce", reduction="avg")


def test_registry_is_case_insensitive_and_ignores_foreign_flags():
    crit = get_loss("ROOT", k=5, m=7, gamma=2.0, alpha=0.1)
    assert (crit.k, crit.m) == (5.0, 7.0)
    focal = get_loss("Focal", k=5, gamma=2.0)
    assert (focal.alpha, focal.gamma) == (0.25, 2.0)
    assert set(LOSSES) >= set(CLASS_LOSSES + BINARY_LOSSES) and set(GAN_LOSSES) == {"ce", "root"}


def test_float64_binary_forms_are_exact_at_large_margins():
    """softplus's linear cut-off (x > 20) would cost 2e-9 relative error in float64."""
    z = torch.tensor([-35.0, -25.0, -21.0, 21.0, 30.0], dtype=torch.float64)
    y = torch.ones(5, dtype=torch.long)
    torch.testing.assert_close(get_loss("logistic", reduction="none")(z, y), torch.log1p(torch.exp(-z)),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(get_loss("binary_root_convex", k=3, reduction="none")(z, y),
                               3 * (1 + torch.exp(-z)) ** (1 / 3), rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_second_derivatives_match_the_reference(name):
    """create_graph=True works through the fused path: Hessian in the logits equals the naive formula's."""
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    crit = get_loss(name, k=3, m=2)
    got = torch.autograd.functional.hessian(lambda x: crit(x, target), logits)
    want = torch.autograd.functional.hessian(
        lambda x: reference_class_loss(name, x, target, k=3, m=2).mean(), logits)
    torch.testing.assert_close(got, want)
