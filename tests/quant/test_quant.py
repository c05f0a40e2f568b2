"""quant/: rounding methods, grids, incoherence processing, damping, codes (small random matrices)."""
import math
import warnings

import pytest
import torch

import quant
from engine import UserError
from quant.grid import make_grid
from quant.linear import pack_rows, unpack_rows
from quant.hessian import HessianAccumulator, damp, proxy_loss
from quant.incoherence import ROTATIONS, Incoherence, make_rotation


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hessian(n, seed=0, decay=3.0, tokens=4000, dtype=torch.float32):
    """E[x x^T] of inputs with a decaying spectrum (eigenvalues 1 .. 10^-decay) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(0, -decay / 2, n, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    X = X @ Q.T
    return (X.T @ X / tokens).to(dtype)


def weight(m, n, seed=0, spikes=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    if spikes:  # a coherent matrix: a few huge entries set the grid range of their rows
        idx = torch.randint(0, m * n, (spikes,), generator=g)
        W.view(-1)[idx] = 40.0
    return W.to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("incoherence", [False, True])
def test_ldlq_beats_nearest_and_ldlqRG_beats_ldlq(seed, incoherence):
    W, H = weight(32, 64, seed), hessian(64, seed)
    loss = {m: quant.quantize_layer(W, H, 2, m, incoherence, seed).proxy for m in ("nearest", "ldlq", "ldlqRG")}
    assert loss["ldlq"] < 0.8 * loss["nearest"]
    assert loss["ldlqRG"] <= loss["ldlq"]


def test_greedy_passes_never_increase_the_loss():
    W, H = weight(24, 48, 3).double(), hessian(48, 3, dtype=torch.float64)
    Hd = damp(H, 0.01)
    grid = make_grid(W, 2, "a")
    W_hat = quant.ldlq(W, Hd, grid)
    losses = [proxy_loss(W, W_hat, Hd)]
    for npasses in (1, 2, 4):
        Wg, ran = quant.greedy_passes(W, Hd, W_hat, grid, npasses)
        assert 1 <= ran <= npasses
        losses.append(proxy_loss(W, Wg, Hd))
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


def test_incoherence_lowers_2bit_ldlq_loss_on_a_spiky_weight():
    W, H = weight(48, 96, 0, spikes=6), hessian(96, 0)
    plain = quant.quantize_layer(W, H, 2, "ldlq", incoherence=False).proxy
    incoh = quant.quantize_layer(W, H, 2, "ldlq", incoherence=True).proxy
    assert incoh < 0.7 * plain


@pytest.mark.parametrize("kind", ROTATIONS)
def test_pre_post_processing_is_an_exact_inverse_and_keeps_the_proxy(kind):
    W, H = weight(24, 96, 1), hessian(96, 1)
    proc = Incoherence(24, 96, quant.incoherence.rescale_vector(W, H), kind, seed=7)
    Wp = proc.weight(W)
    assert not torch.allclose(Wp, W * proc.s, atol=1e-2)  # it really rotated
    torch.testing.assert_close(proc.unweight(Wp), W, atol=1e-5, rtol=0)
    W2 = W + 0.1 * weight(24, 96, 2)
    expected = proxy_loss(W, W2, H)
    assert proxy_loss(Wp, proc.weight(W2), proc.hessian(H)) == pytest.approx(expected, rel=1e-4)


def _van_loan_rank(R, p1, p2):
    """Rank of the Van Loan rearrangement of R: 1 exactly when R is a Kronecker product A (p1) x B (p2)."""
    blocks = R.reshape(p1, p2, p1, p2).permute(0, 2, 1, 3).reshape(p1 * p1, p2 * p2)
    s = torch.linalg.svdvals(blocks)
    return int((s > 1e-8 * s[0]).sum())


def test_kron_rotation_is_a_kronecker_product_and_butterfly_is_not():
    n = 48  # 6 x 8
    kron = make_rotation("kron", n, torch.Generator().manual_seed(0))
    I = torch.eye(n, dtype=torch.float64)
    R = kron.apply(I)
    torch.testing.assert_close(R @ R.T, I)
    inner = R[torch.argsort(kron.p_out)][:, kron.p_in]  # undo R = P_out (A kron B) P_in
    assert _van_loan_rank(inner, kron.p1, kron.p2) == 1
    A, B = kron.factors
    torch.testing.assert_close(inner, torch.kron(A[0], B[0]))
    nop = make_rotation("butterfly_nopermute", n, torch.Generator().manual_seed(0))
    assert _van_loan_rank(nop.apply(I), nop.p1, nop.p2) > 1


def test_rotations_are_seeded():
    X = torch.randn(60, 3, dtype=torch.float64)
    for kind in ROTATIONS:
        a = make_rotation(kind, 60, torch.Generator().manual_seed(5)).apply(X)
        b = make_rotation(kind, 60, torch.Generator().manual_seed(5)).apply(X)
        c = make_rotation(kind, 60, torch.Generator().manual_seed(6)).apply(X)
        assert torch.equal(a, b) and not torch.allclose(a, c)
    W, H = weight(16, 60), hessian(60)
    r1, r2 = (quant.quantize(W, H, 2, "ldlq", seed=3) for _ in range(2))
    assert torch.equal(r1, r2)
    assert not torch.equal(r1, quant.quantize(W, H, 2, "ldlq", seed=4))


@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("method", [n for n, m in quant.TABLE.items() if m.codebook == "grid"])
@pytest.mark.parametrize("incoherence", [False, True])
def test_every_entry_is_on_its_grid_and_codes_rebuild_the_weights(wbits, method, incoherence):
    W, H = weight(16, 40, wbits), hessian(40, wbits)
    r = quant.quantize_layer(W, H, wbits, method, incoherence, seed=1)
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 2 ** wbits - 1
    layer = quant.QuantLinear.from_result(r)
    torch.testing.assert_close(layer.dequantize(), r.w_hat, atol=1e-5, rtol=1e-5)
    x = torch.randn(5, 40)  # the layer applies W_hat from its packed codes, rotating the activations
    torch.testing.assert_close(layer(x), x @ r.w_hat.T, atol=1e-4, rtol=1e-4)
    if not incoherence:  # no transform to undo: W_hat itself sits on the per-row grid
        u = r.w_hat / r.scale + r.zero
        torch.testing.assert_close(u, u.round(), atol=1e-4, rtol=0)
        assert all(len(torch.unique(row)) <= 2 ** wbits for row in u.round())


@pytest.mark.parametrize("method", ["ldlqRG", "e8p"])
def test_many_tokens_rotate_the_weight_once_with_the_same_values_and_gradients(method):
    """At least min(padded rows, cols) tokens run as one matmul with the rotated dense weight instead of
    rotating every token: the same outputs, and the same gradients for every trained scale."""
    W, H = weight(24, 40, 7), hessian(40, 7)
    layer = quant.QuantLinear.from_result(quant.quantize_layer(W, H, 2, method, True, seed=2), torch.randn(24))
    layer.add_channel_scales()
    rows, cols = layer.spec["padded"]
    x = torch.randn(3, min(rows, cols), 40)
    out = {}
    for path in ("weight", "tokens"):
        layer.zero_grad()
        if path == "weight":
            y = layer(x)
        else:
            flat = x.reshape(-1, 40)
            y = layer.rotate_out(layer.rotate_in(flat) @ layer.processed_weight().T).reshape(3, -1, 24)
        y.square().sum().backward()
        out[path] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    torch.testing.assert_close(out["weight"][0], out["tokens"][0], atol=1e-4, rtol=1e-4)
    assert set(out["weight"][1]) == {"scale", "in_scale", "out_scale", "bias"}
    for name, grad in out["weight"][1].items():
        torch.testing.assert_close(grad, out["tokens"][1][name], atol=1e-3, rtol=1e-4)


def test_qfn_b_levels_at_2_bits():
    W = weight(20, 30, 4)
    grid = make_grid(W, 2, "b")
    s = 2.4 * W.square().mean().sqrt()
    levels = torch.unique(grid.round(W * 3))
    torch.testing.assert_close(levels, torch.stack([-s, -s / 3, s / 3, s]), atol=1e-5, rtol=1e-5)


def test_qfn_a_is_per_row_min_max_and_groups_work():
    W = weight(8, 20, 5)
    grid = make_grid(W, 2, "a")
    torch.testing.assert_close(grid.scale[:, 0], (W.amax(1).clamp(min=0) - W.amin(1).clamp(max=0)) / 3)
    H = hessian(20, 5)
    r = quant.quantize_layer(W, H, 3, "ldlq", incoherence=False, groupsize=8)
    assert r.scale.shape == (8, 3)  # groups of 8, 8, 4 columns
    torch.testing.assert_close(quant.QuantLinear.from_result(r).dequantize(), r.w_hat, atol=1e-6, rtol=0)
    full = quant.quantize_layer(W, H, 3, "ldlq", incoherence=False)
    assert r.proxy < full.proxy  # finer grids fit better


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_and_ldlq_agree_and_lazy_batch_changes_nothing(device):
    W = weight(24, 70, 6, dtype=torch.float64).to(device)
    H = damp(hessian(70, 6, dtype=torch.float64).to(device), 0.01)
    grid = make_grid(W, 2, "a")
    a = quant.gptq(W, H, grid, blocksize=16)
    b = quant.ldlq(W, H, grid, blocksize=16)
    c = quant.ldlq(W, H, grid, blocksize=1)
    assert torch.equal(a, b) and torch.equal(b, c)
    for method in ("ldlqRG", "ldlq", "gptq"):
        lazy = quant.quantize_layer(W, H, 2, method, lazy_batch=True, blocksize=16)
        eager = quant.quantize_layer(W, H, 2, method, lazy_batch=False)
        assert torch.equal(lazy.codes, eager.codes), method


def test_ldlqRG_runs_one_greedy_pass_unless_told_zero():
    W, H = weight(16, 32), hessian(32)
    assert quant.quantize_layer(W, H, 2, "ldlqRG").npasses == 1
    assert quant.quantize_layer(W, H, 2, "ldlqRG", npasses=0).npasses == 0
    assert quant.quantize_layer(W, H, 2, "ldlq").npasses == 0
    assert 1 <= quant.quantize_layer(W, H, 2, "ldlqRG", npasses=5).npasses <= 5


def test_wbits16_is_the_identity_and_dtype_is_kept():
    W, H = weight(8, 16).half(), hessian(16)
    r = quant.quantize_layer(W, H, 16, "ldlqRG")
    assert torch.equal(r.w_hat, W) and r.proxy == 0 and r.codes is None
    W_hat = quant.quantize(W, H, 2, "ldlq")
    assert W_hat.dtype == torch.float16 and W_hat.shape == W.shape and not torch.equal(W_hat, W)


def test_proxy_loss_is_in_the_original_basis_with_the_undamped_H():
    W, H = weight(16, 32, 8), hessian(32, 8)
    r = quant.quantize_layer(W, H, 2, "ldlqRG", incoherence=True)
    E = (r.w_hat - W).double()
    assert r.proxy == pytest.approx(float(torch.trace(E @ H.double() @ E.T)), rel=1e-4)


def test_unbiased_rounding_is_seeded_and_unbiased_on_average():
    W = torch.full((200, 50), 0.3)
    W[:, 0] = 1.0  # grid 0..1 in steps of 1/3: 0.3 lies between 1/3 * 0 and 1/3 * 1
    W[:, 1] = 0.0
    H = torch.eye(50)
    a = quant.quantize(W, H, 2, "nearest", incoherence=False, unbiased=True, seed=1)
    b = quant.quantize(W, H, 2, "nearest", incoherence=False, unbiased=True, seed=1)
    assert torch.equal(a, b)
    assert float(a[:, 2:].mean()) == pytest.approx(0.3, abs=0.01)
    torch.testing.assert_close(torch.unique(a[:, 2:]), torch.tensor([0.0, 1 / 3]))


def test_damping_escalates_with_a_warning_for_a_singular_H():
    W = weight(8, 20)
    X = torch.randn(5, 20)
    H = X.T @ X / 5  # rank 5 of 20
    with pytest.warns(UserWarning, match="escalated damping"):
        r = quant.quantize_layer(W, H, 2, "ldlq", incoherence=False, damp_h=False)
    assert r.damping > 0 and torch.isfinite(r.w_hat).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quant.quantize_layer(W, H, 2, "ldlq", incoherence=False).damping == 0.01


def test_hessian_accumulator_matches_the_mean_outer_product():
    X = torch.randn(3, 7, 10, dtype=torch.float64)
    acc = HessianAccumulator(10)
    for chunk in X:
        acc.add(chunk)
    flat = X.reshape(-1, 10)
    torch.testing.assert_close(acc.hessian().double(), flat.T @ flat / 21, atol=1e-5, rtol=1e-5)


def test_hessian_accumulator_strips_give_the_full_symmetric_product(monkeypatch):
    monkeypatch.setattr(HessianAccumulator, "BLOCK", 4)  # 10 columns: strips of 4, 4 and 2 rows
    X = torch.randn(50, 10, dtype=torch.float64)
    acc = HessianAccumulator(10)
    acc.add(X[:20])
    acc.add(X[20:])
    H = acc.hessian()
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), X.T @ X / 50, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wbits", [2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("cols", [7, 40])  # rows ending inside a word of 8 codes, and whole words
def test_packed_rows_round_trip_bit_exact(wbits, cols):
    codes = torch.randint(0, 2 ** wbits, (13, cols), dtype=torch.uint8)
    packed = pack_rows(codes, wbits)
    assert packed.dtype == torch.uint8 and packed.shape == (13, math.ceil(cols * wbits / 8))
    assert torch.equal(unpack_rows(packed, wbits, cols), codes)
    assert torch.equal(unpack_rows(packed[4:9], wbits, cols), codes[4:9])  # a block of rows decodes alone
    # little-endian bits within each row: code j occupies bits j*wbits .. j*wbits + wbits - 1
    row = sum(int(c) << (j * wbits) for j, c in enumerate(codes[0]))
    assert packed[0].tolist() == list(row.to_bytes(packed.shape[1], "little"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(wbits=5, method="ldlq"), "wbits must be one of 2, 3, 4, 16"),
    (dict(wbits=2, method="foo"), "unknown method 'foo'"),
    (dict(wbits=2, method="ldlbal_admm"), "not implemented here"),
    (dict(wbits=2, method="nearest", npasses=2), "apply to ldlq, ldlqRG, allbal, not"),
    (dict(wbits=2, method="allbal", npasses=0), "give npasses >= 1"),
    (dict(wbits=2, method="ldlqRG", unbiased=True), "cannot be combined with greedy passes"),
    (dict(wbits=2, method="ldlq", qfn="b", groupsize=4, incoherence=False), "with qfn a"),
    (dict(wbits=2, method="ldlq", rotation="dense"), "unknown rotation"),
])
def test_bad_options_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        quant.quantize_layer(weight(4, 8), hessian(8), **kwargs)


def test_bad_hessians_are_user_errors():
    W = weight(4, 8)
    with pytest.raises(UserError, match="expected \\(8, 8\\)"):
        quant.quantize(W, torch.eye(6), 2, "ldlq")
    H = hessian(8)
    H[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        quant.quantize(W, H, 2, "ldlq")
    with pytest.raises(UserError, match="negative diagonal"):
        quant.quantize(W, -torch.eye(8), 2, "ldlq", incoherence=False)
    H = torch.eye(8)
    H[0, 1] = H[1, 0] = 3.0  # eigenvalue -2 with mean(diag) 1: no damping up to 1 x mean(diag) helps
    with pytest.raises(UserError, match="not positive definite even with damping"):
        quant.quantize(W, H, 2, "ldlq", incoherence=False)


@pytest.mark.parametrize("wbits, stages", [(2, 1), (3, 2), (4, 2)])
def test_e8p_layer_pads_172_columns_and_runs_from_its_codes(wbits, stages):
    W, H = weight(24, 172, wbits), hessian(172, wbits)
    r = quant.quantize_layer(W, H, wbits, "e8p", seed=2)
    assert r.spec["padded"] == [24, 176] and r.rotation == "hadamard"  # 172 -> 176 = 4 x 44 (Paley)
    assert r.codes.shape == (24, 176 // 8, stages) and r.scale.shape == (24, 1)  # one scale per row
    layer = quant.QuantLinear.from_result(r)
    x = torch.randn(3, 172)
    torch.testing.assert_close(layer(x), x @ r.w_hat.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.dequantize(), r.w_hat, atol=1e-5, rtol=1e-5)
    nearest = quant.quantize_layer(W, H, wbits, "nearest", rotation="hadamard")
    assert r.proxy < nearest.proxy  # vector codebook + block LDLQ beat scalar rounding
