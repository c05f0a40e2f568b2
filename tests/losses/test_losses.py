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
from losses import rooted
from losses.rooted import binary_root_convex_grad_coef, binary_root_convex_hessian_coef, exponent_limit

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


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_gradient_matches_float64_autograd_of_reference(name, blocks, request):
    """The closed-form backward of the fused path equals autograd through the naive formula."""
    if blocks == "many":
        request.getfixturevalue("small_blocks")
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
    """Many row blocks: values and gradients still equal torch's CE."""
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


# ---- numerical edges, each against float64 --------------------------------------------------------

@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 24 logits, so that small inputs take the multi-block paths (and split samples along L)."""
    monkeypatch.setattr(rooted, "_BLOCK_ELEMENTS", 24)


def continued_convex(e, limit, m):
    """m (e^E - 1) up to the limit, then its tangent in E: the documented semantics, in float64."""
    e = torch.as_tensor(e, dtype=torch.float64)
    return m * torch.where(e <= limit, torch.expm1(e.clamp(max=limit)),
                           math.exp(limit) * (1 + e - limit) - 1)


def neg_logp(logits, target):
    return -torch.log_softmax(logits.double(), 1).gather(1, target[:, None]).squeeze(1)


@pytest.mark.parametrize("margin", [45.0, 50.0, 80.0])
def test_d1_root_gradient_of_confident_mistakes_is_exact(margin):
    """torch's expm1 backward (expm1(x) + 1) is 0 in fp32 below x = -16.6: the gradient was 0 from margin 50."""
    k = 3.0
    logits = torch.tensor([[0.0, margin, 1.0]])
    x = logits.clone().requires_grad_()
    get_loss("root", k=k, m=3)(x, torch.tensor([0])).backward()
    ref = logits.double().requires_grad_()
    reference_class_loss("root", ref, torch.tensor([0]), k=k, m=3).sum().backward()
    # relative to the gradient's size: the third entry (~1e-46 at margin 80) is below fp32's range
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-4 * ref.grad.abs().max().item())

    z = torch.tensor([-margin], requires_grad=True)
    get_loss("binary_root", k=k)(z, torch.tensor([1])).backward()
    z64 = z.detach().double().requires_grad_()
    reference_binary_loss("binary_root", z64, torch.tensor([1]), k=k).sum().backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["root_convex", "binary_root_convex"])
def test_d2_past_the_limit_value_and_gradient_agree(name):
    """gradcheck (float64) on both sides of the limit, where the loss turns linear in log p_y."""
    k, m = 3.0, 3.0
    limit = exponent_limit(torch.float64, m if name == "root_convex" else k)
    for e in (limit - 2.0, limit + 2.0, limit + 300.0):
        if name == "root_convex":  # -log p_y ~ E k for logits (0, E k) and target 0
            x = torch.tensor([[0.0, e * k], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
            crit = get_loss(name, k=k, m=m, reduction="none")
            assert torch.autograd.gradcheck(lambda v: crit(v, torch.tensor([0, 1])), (x,))
        else:
            z = torch.tensor([-e * k, 0.5], dtype=torch.float64, requires_grad=True)
            crit = get_loss(name, k=k, reduction="none")
            assert torch.autograd.gradcheck(lambda v: crit(v, torch.tensor([1, 1])), (z,))


def test_d2_continued_convex_form_is_continuous_and_matches_float64_in_fp32():
    k, m = 3.0, 3.0
    crit = get_loss("root_convex", k=k, m=m, reduction="none")
    for dtype in (torch.float64, torch.float32):
        limit = exponent_limit(torch.float32 if dtype == torch.float32 else torch.float64, m)
        eps = 1e-9 if dtype == torch.float64 else 1e-4
        # value and slope just below and just above the limit
        margins = torch.tensor([(limit - eps) * k, (limit + eps) * k], dtype=torch.float64)
        x = torch.stack([torch.zeros(2, dtype=torch.float64), margins], 1).to(dtype).requires_grad_()
        loss = crit(x, torch.tensor([0, 0]))
        loss.sum().backward()
        torch.testing.assert_close(loss[0].double(), loss[1].double(), rtol=10 * eps, atol=0)
        torch.testing.assert_close(x.grad[0].double(), x.grad[1].double(), rtol=10 * eps, atol=0)
    # fp32 far past the limit: the continued value and its gradient, against float64
    limit = exponent_limit(torch.float32, m)
    logits = torch.tensor([[0.0, (limit + 1) * k], [0.0, 1e4], [0.0, 1e6], [2.0, -1.0]])
    target = torch.tensor([0, 0, 0, 0])
    x = logits.clone().requires_grad_()
    loss = crit(x, target)
    loss.sum().backward()
    e = neg_logp(logits, target) / k
    torch.testing.assert_close(loss.double(), continued_convex(e, limit, m), rtol=1e-5, atol=0)
    slope = m / k * torch.exp(e.clamp(max=limit))  # d loss / d(-log p_y)
    p = torch.softmax(logits.double(), 1)
    want = slope[:, None] * (p - F.one_hot(target, 2))
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("k,m,margin", [(1.01, 3.0, 12.0), (2.0, 3.0, 30.0), (3.0, 3.0, 45.0), (8.0, 10.0, 120.0)])
def test_d3_fp16_logits_are_exact_where_fp32_is(k, m, margin):
    """The old limit came from fp16's range: 2.43e4 instead of 4.34e5 at k=1.01, margin 12."""
    logits = torch.tensor([[0.0, margin], [1.0, -2.0]], dtype=torch.float16)
    target = torch.tensor([0, 0])
    got = get_loss("root_convex", k=k, m=m, reduction="none")(logits, target)
    want = reference_class_loss("root_convex", logits, target, k=k, m=m)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    if margin == 12.0:
        assert got[0].item() == pytest.approx(4.3357e5, rel=1e-4)
    z = torch.tensor([-margin, 1.5], dtype=torch.float16)
    got = get_loss("binary_root_convex", k=k, reduction="none")(z, torch.tensor([1, 1]))
    want = reference_binary_loss("binary_root_convex", z, torch.tensor([1, 1]), k=k)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("blocks", ["one", "many"])
def test_d3_fp16_gradient_is_scaled_into_range_not_inf(blocks, request):
    """reduction='none' with upstream weights 3: rows whose gradient passes 65504 are scaled down to it
    (direction kept); the others are the float64 gradient to fp16 precision."""
    if blocks == "many":
        request.getfixturevalue("small_blocks")
    k, m = 1.01, 3.0
    margins = torch.tensor([1.0, 4.0, 8.0, 9.0, 12.0, 30.0])
    logits = torch.stack([torch.zeros(6), margins, -margins], 1).half()
    target = torch.zeros(6, dtype=torch.long)
    weights = torch.full((6,), 3.0)
    for soft in (False, True):
        x = logits.clone().requires_grad_()
        tgt = F.one_hot(target, 3).half() if soft else target
        get_loss("root_convex", k=k, m=m, reduction="none")(x, tgt).backward(weights)
        ref = logits.double().requires_grad_()
        reference_class_loss("root_convex", ref, target, k=k, m=m).backward(weights.double())
        assert torch.isfinite(x.grad).all()
        peak = ref.grad.abs().amax(1)
        fits = peak < 65504
        assert fits[:3].all() and not fits[3:].any()
        torch.testing.assert_close(x.grad[fits].double(), ref.grad[fits], rtol=2e-3, atol=1e-6)
        direction = ref.grad[~fits] / peak[~fits, None]
        torch.testing.assert_close(x.grad[~fits].double() / 65504, direction, rtol=2e-3, atol=1e-6)
    z = (-margins).half().requires_grad_()
    get_loss("binary_root_convex", k=k, reduction="none")(z, torch.ones(6)).backward(weights)
    assert torch.isfinite(z.grad).all() and (z.grad < 0).all()


def test_d4_reductions_stay_finite_and_match_float64():
    """fp32 sums of huge rows (m=3, 4096 rows; k=8, 1000 rows) and a huge m no longer overflow."""
    k, m = 3.0, 3.0
    limit = exponent_limit(torch.float32, m)
    logits = torch.zeros(4096, 2)
    logits[:, 1] = torch.linspace(1e3, 1e4, 4096)
    target = torch.zeros(4096, dtype=torch.long)
    want = continued_convex(neg_logp(logits, target) / k, limit, m)
    for reduction, ref in (("sum", want.sum()), ("mean", want.mean())):
        x = logits.clone().requires_grad_()
        got = get_loss("root_convex", k=k, m=m, reduction=reduction)(x, target)
        got.backward()
        assert torch.isfinite(x.grad).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)

    z = -torch.linspace(1e3, 1e4, 1000)
    e = F.softplus(-z.double()) / 8
    want = 8 * (1 + continued_convex(e, exponent_limit(torch.float32, 8.0), 1.0))
    for reduction, ref in (("sum", want.sum()), ("mean", want.mean())):
        zz = z.clone().requires_grad_()
        got = get_loss("binary_root_convex", k=8, reduction=reduction)(zz, torch.ones(1000))
        got.backward()
        assert torch.isfinite(zz.grad).all()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)

    for m in (1e4, 1e8):  # the limit accounts for m: one row no longer overflows once m > 6.1e3
        logits = torch.tensor([[0.0, 1e3]], requires_grad=True)
        got = get_loss("root_convex", k=k, m=m, reduction="sum")(logits, torch.tensor([0]))
        got.backward()
        e = neg_logp(logits.detach(), torch.tensor([0])) / k
        want = continued_convex(e, exponent_limit(torch.float32, m), m)
        torch.testing.assert_close(got.double(), want.sum(), rtol=1e-5, atol=0)
        assert torch.isfinite(logits.grad).all()


def saved_storages(fn):
    """(storage pointer, numel) of every tensor autograd saves while running fn()."""
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_d6_spatial_logits_are_not_copied(name, small_blocks):
    """(N, C, H, W) logits: every saved tensor is the input itself or per-sample sized; values and
    gradients (many blocks, samples split along H W) equal the flattened (N H W, C) float64 reference."""
    n, c, h, w = 2, 5, 3, 4
    logits = torch.randn(n, c, h, w) * 3
    target = torch.randint(0, c, (n, h, w))
    target[0, 1, 2] = -100
    soft = torch.softmax(torch.randn(n, c, h, w), 1)
    for tgt in (target, soft):
        x = logits.clone().requires_grad_()
        crit = get_loss(name, k=3, m=2, reduction="none")
        loss, saved = saved_storages(lambda: crit(x, tgt))
        for ptr, numel in saved:
            assert ptr in (x.untyped_storage().data_ptr(), tgt.untyped_storage().data_ptr()) or numel <= n * h * w
        loss.backward(torch.linspace(0.5, 2, loss.numel()).view_as(loss))
        flat = logits.double().movedim(1, -1).reshape(-1, c).requires_grad_()
        if tgt is soft:
            flat_t = soft.double().movedim(1, -1).reshape(-1, c)
            want = sum(flat_t[:, j] * reference_class_loss(name, flat, torch.full((n * h * w,), j), k=3, m=2)
                       for j in range(c))
        else:
            flat_t = target.reshape(-1)
            want = torch.where(flat_t != -100, reference_class_loss(name, flat, flat_t.clamp(min=0), k=3, m=2), 0.0)
        want.backward(torch.linspace(0.5, 2, loss.numel(), dtype=torch.float64))
        torch.testing.assert_close(loss.double(), want.view(n, h, w), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), flat.grad.view(n, h, w, c).movedim(-1, 1), rtol=1e-5, atol=1e-6)


def test_d6_create_graph_builds_no_dense_one_hot():
    """The create_graph branch used to build an int64 one-hot of the logits' shape (3.3 GB at 8192 x 50272)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):  # records every tensor the aten ops produce, backward included
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [(o.shape, o.dtype) for o in (out if isinstance(out, (list, tuple)) else [out])
                          if isinstance(o, torch.Tensor)]
            return out

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    loss = get_loss("root", k=3)(x, torch.randint(0, 5, (6,)))
    with Shapes() as mode:
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    assert (x.shape, torch.int64) not in mode.seen
    assert grad.requires_grad


@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_d6_soft_targets_save_only_their_inputs_and_match_in_blocks(name, small_blocks):
    """Soft targets run in blocks and save no (N, C) intermediate; gradients, gradcheck and Hessians hold."""
    logits = torch.randn(7, 6, dtype=torch.float64) * 2
    soft = torch.softmax(torch.randn(7, 6, dtype=torch.float64), 1)
    x = logits.clone().requires_grad_()
    crit = get_loss(name, k=3, m=2)
    loss, saved = saved_storages(lambda: crit(x, soft))
    inputs = {x.untyped_storage().data_ptr(), soft.untyped_storage().data_ptr()}
    assert {ptr for ptr, numel in saved if numel > 7} <= inputs
    loss.backward()
    ref = logits.clone().requires_grad_()
    want = sum(soft[:, j] * reference_class_loss(name, ref, torch.full((7,), j), k=3, m=2) for j in range(6)).mean()
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, ref.grad)
    assert torch.autograd.gradcheck(crit, (logits.clone().requires_grad_(), soft.clone().requires_grad_()))
    # Hessians through soft targets, vectorized too (regression.py's --diagnose uses them)
    h = torch.autograd.functional.hessian(lambda v: crit(v, soft), logits, vectorize=True)
    torch.testing.assert_close(h, torch.autograd.functional.hessian(
        lambda v: sum(soft[:, j] * reference_class_loss(name, v, torch.full((7,), j), k=3, m=2)
                      for j in range(6)).mean(), logits))


def test_d7_unknown_keywords_and_non_finite_values_are_rejected():
    with pytest.raises(UserError, match=r"^loss 'focal': unknown keyword 'gama'; it takes: alpha, gamma, ") as err:
        get_loss("focal", gama=0.5)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown keyword 'kk'"):
        get_gan_loss("root", kk=2)
    for bad in (float("inf"), float("nan"), "x"):
        for name in ("root", "root_convex"):
            with pytest.raises(UserError, match="m must be a finite number > 0"):
                get_loss(name, m=bad)
        for name in ("root", "root_convex", "binary_root", "binary_root_convex"):
            with pytest.raises(UserError, match="k must be a finite number > 0"):
                get_loss(name, k=bad)
        with pytest.raises(UserError, match="alpha must be"):
            get_loss("focal", alpha=bad)
        with pytest.raises(UserError, match="gamma must be"):
            get_loss("focal", gamma=bad)
    assert get_loss("focal", gamma=0).gamma == 0.0
