"""quant.e8p lattice codebooks, the randomized Hadamard transform (quant.incoherence) and block LDLQ."""
import math

import pytest
import torch

from engine import UserError
from quant.e8p import CODEBOOKS, E8_1BIT, E8P_ABS, get_codebook
from quant.hessian import damp, proxy_loss
from quant.incoherence import (FWHT_RADIX, HADAMARD_MAX, Incoherence, RandomHadamard, _paley_construction, hadamard_factor,
                               hadamard_size, make_rotation, paley_hadamard)
from quant.ldlq import block_ldl, block_ldlq


def gaussian(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def e8p_grid():
    return get_codebook("e8p").stages[0].decode(torch.arange(1 << 16), torch.float64)


def brute_nearest(X, grid):
    norm = grid.square().sum(1)
    return torch.cat([(2 * c @ grid.T - norm).argmax(1) for c in X.split(256)])


def realistic_hessian(n, seed, tokens=2000):
    """X^T X / tokens of correlated inputs with a decaying spectrum, damped as the quantizer does."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g) * torch.logspace(0, -1.5, n)
    return damp(X.T @ X / tokens, 0.01)


# --- E8P and E8 tables -------------------------------------------------------------------------------

def test_source_table_is_227_points_of_norm_at_most_10_and_29_of_norm_12():
    assert E8P_ABS.shape == (256, 8) and len(torch.unique(E8P_ABS, dim=0)) == 256
    assert set(E8P_ABS.unique().tolist()) == {0.5, 1.5, 2.5}
    norms = E8P_ABS.square().sum(1)
    assert int((norms <= 10).sum()) == 227 and bool((norms[227:] == 12).all())
    assert torch.equal(torch.unique(E8P_ABS[:227], dim=0), E8P_ABS[:227])  # lexicographic order, as QuIP#'s table


def test_e8_1bit_table_is_256_distinct_e8_points():
    assert E8_1BIT.shape == (256, 8) and len(torch.unique(E8_1BIT, dim=0)) == 256
    twice = E8_1BIT * 2
    integer = (E8_1BIT == E8_1BIT.round()).all(1)
    half = ((twice % 2) == 1).all(1)
    assert bool((integer | half).all()) and bool((E8_1BIT.sum(1) % 2 == 0).all())
    norms = E8_1BIT.square().sum(1)
    assert int((norms == 0).sum()) == 1 and int((norms == 2).sum()) == 240 and int((norms == 4).sum()) == 15


def test_e8p_codes_follow_the_documented_layout():
    codes = torch.arange(1 << 16)
    G = e8p_grid()
    assert len(torch.unique(G, dim=0)) == 1 << 16
    shift = torch.where((codes >> 7) & 1 == 1, 0.25, -0.25).double()
    P = G - shift[:, None]
    assert bool(((2 * P) % 2 == 1).all()) and bool((P.sum(1) % 2 == 0).all())  # in D8-hat: G in E8 + 1/4
    torch.testing.assert_close(P.abs(), E8P_ABS[codes >> 8], rtol=0, atol=0)
    neg = (codes[:, None] >> torch.arange(7)) & 1
    assert torch.equal((P[:, :7] < 0).long(), neg)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_fast_e8p_search_is_the_exact_nearest_codeword(scale):
    X = gaussian(3000, seed=int(scale * 10)) * scale
    X[:50] *= 4  # far outside the ball: the search must still be exact
    G = e8p_grid().float()
    hat, codes = get_codebook("e8p").stages[0].nearest(X)
    ref = brute_nearest(X, G)
    err, err_ref = (X - hat).square().sum(1), (X - G[ref]).square().sum(1)
    assert bool((err <= err_ref + 1e-5).all())
    assert float((codes == ref).float().mean()) > 0.999  # all but float ties
    assert torch.equal(G[codes], hat)


def test_fast_search_in_float64_matches_brute_force():
    X = gaussian(1000, seed=5, dtype=torch.float64)
    _, codes = get_codebook("e8p").stages[0].nearest(X)
    assert torch.equal(codes, brute_nearest(X, e8p_grid()))


# --- VectorCodebook -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, bits, code_bits", [("e8p", 2, [16]), ("e8p_rvq3", 3, [16, 8]), ("e8p_rvq4", 4, [16, 16])])
def test_codebook_attributes_decode_and_pack_round_trip(name, bits, code_bits):
    cb = get_codebook(name)
    assert (cb.name, cb.dim, cb.bits, cb.code_bits) == (name, 8, bits, code_bits)
    X = gaussian(500, seed=1)
    X_hat, codes = cb.quantize(X / cb.scale_for(X))
    assert X_hat.shape == (500, 8) and X_hat.dtype == torch.float32
    assert codes.shape == (500, len(code_bits)) and codes.dtype == torch.int64
    assert torch.equal(cb.decode(codes), X_hat)
    packed = cb.pack(codes)
    assert [packed[f"codes{i}"].dtype for i in range(len(code_bits))] == \
        [torch.int16 if b == 16 else torch.uint8 for b in code_bits]
    assert torch.equal(cb.unpack(packed), codes)


def test_pack_stores_16_bit_codes_as_twos_complement_int16():
    cb = get_codebook("e8p_rvq3")
    codes = torch.tensor([[0, 0], [0x7FFF, 1], [0x8000, 128], [0xFFFF, 255]])
    packed = cb.pack(codes)
    assert packed["codes0"].tolist() == [0, 32767, -32768, -1]
    assert packed["codes1"].tolist() == [0, 1, 128, 255]
    assert torch.equal(cb.unpack(packed), codes)


def test_float64_input_stays_float64_and_decodes_bit_for_bit():
    cb = get_codebook("e8p_rvq4")
    X = gaussian(200, seed=2, dtype=torch.float64)
    X_hat, codes = cb.quantize(X)
    assert X_hat.dtype == torch.float64 and torch.equal(cb.decode(codes, torch.float64), X_hat)


def test_scale_for_gives_the_codebook_its_input_rms():
    W = torch.randn(64, 96) * 0.02
    for name in CODEBOOKS:
        cb = get_codebook(name)
        X = W / cb.scale_for(W)
        assert float(X.square().mean().sqrt()) == pytest.approx(cb.input_rms, rel=1e-5)


def test_gaussian_mse_beats_scalar_quantization_and_more_bits_help():
    Z = gaussian(1 << 14, seed=3)
    mse = {}
    for name in CODEBOOKS:
        cb = get_codebook(name)
        s = cb.scale_for(Z)
        mse[name] = float((cb.quantize(Z / s)[0] * s - Z).square().mean())
    # rate-distortion bound < codebook < the optimal scalar quantizer (Lloyd-Max: 0.1175, 0.03455, 0.009497)
    assert 2 ** -4 < mse["e8p"] < 0.095
    assert 2 ** -6 < mse["e8p_rvq3"] < 0.031
    assert 2 ** -8 < mse["e8p_rvq4"] < 0.0088


def test_codebook_mistakes_are_user_errors():
    with pytest.raises(UserError, match="unknown codebook 'e8'; choose one of e8p, e8p_rvq3, e8p_rvq4"):
        get_codebook("e8")
    cb = get_codebook("e8p_rvq3")
    with pytest.raises(UserError, match=r"quantizes \(n, 8\) tensors, got shape \(10, 4\)"):
        cb.quantize(torch.zeros(10, 4))
    with pytest.raises(UserError, match=r"int64 of shape \(n, 2\)"):
        cb.decode(torch.zeros(10, 1, dtype=torch.int64))
    with pytest.raises(UserError, match=r"stage 1 codes must lie in \[0, 256\)"):
        cb.pack(torch.tensor([[0, 256]]))
    with pytest.raises(UserError, match="lack codes1"):
        cb.unpack({"codes0": torch.zeros(3, dtype=torch.int16)})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X = gaussian(4000, seed=4)
    for name in CODEBOOKS:
        cb = get_codebook(name)
        X_hat, codes = cb.quantize(X)
        X_hat_c, codes_c = cb.quantize(X.cuda())
        assert float((codes_c.cpu() == codes).float().mean()) > 0.999
        assert torch.equal(cb.decode(codes.cuda()).cpu(), cb.decode(codes))
        torch.testing.assert_close(X_hat_c.cpu()[codes_c.cpu().eq(codes).all(1)], X_hat[codes_c.cpu().eq(codes).all(1)])


# --- randomized Hadamard transform ----------------------------------------------------------------------

def test_paley_matrices_are_hadamard():
    orders = [m for m in range(4, HADAMARD_MAX + 1, 4) if _paley_construction(m)]
    assert {12, 20, 28, 36, 44, 60, 76, 108} <= set(orders) and 52 not in orders  # 52 needs q = 25, not prime
    assert {_paley_construction(m) for m in orders} == {1, 2}  # both constructions exercised
    for m in orders:
        H = paley_hadamard(m)
        assert bool((H.abs() == 1).all()) and torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64)), m


def test_hadamard_sizes_pad_only_what_has_no_factorization():
    assert [hadamard_factor(n) for n in (4096, 768, 5120, 13824, 14336, 11008)] == [1, 12, 20, 108, 28, None]
    assert hadamard_size(172) == hadamard_size(172, 8) == 176  # 4 x 44 (Paley I, q = 43)
    assert hadamard_size(11008, 8) == 11264  # 256 x 44
    assert hadamard_size(768, 8) == 768 and hadamard_size(12) == 12 and hadamard_size(12, 8) == 16
    with pytest.raises(UserError, match="pad to 176"):
        make_rotation("hadamard", 172, torch.Generator())


@pytest.mark.parametrize("n", [8, 64, 12, 44, 176, 768])
def test_rht_is_orthogonal_and_its_transpose_inverts_it(n):
    rot = make_rotation("hadamard", n, torch.Generator().manual_seed(n))
    I = torch.eye(n, dtype=torch.float64)
    R = rot.apply(I)
    torch.testing.assert_close(R @ R.T, I, atol=1e-10, rtol=0)
    torch.testing.assert_close(rot.apply_t(I), R.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(R.abs(), torch.full_like(R, 1 / math.sqrt(n)), atol=1e-12, rtol=0)  # +-1 / sqrt(n)


def test_rht_of_a_padded_11008_preserves_inner_products_and_inverts():
    proc = Incoherence(8, 11008, rotation="hadamard", seed=1)
    assert proc.padded_shape == (8, 11264)
    X = torch.randn(11264, 6, dtype=torch.float64)
    Y = proc.V.apply(X)
    torch.testing.assert_close(Y.T @ Y, X.T @ X, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(proc.V.apply_t(Y), X, atol=1e-10, rtol=0)


def test_power_of_two_rht_builds_no_n_by_n_matrix():
    n = 4096
    rot = make_rotation("hadamard", n, torch.Generator().manual_seed(0))
    assert rot.m == 1 and rot.factors[1] is None and sum(f.numel() for f in rot.factors if f is not None) == n
    X = torch.randn(n, 2, dtype=torch.float64)

    class Record(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            operands = [a.shape for a in args if torch.is_tensor(a)]
            self.calls.append((getattr(func, "__name__", str(func)), out.numel() if torch.is_tensor(out) else 0,
                               operands))
            return out

    for f in (rot.apply, rot.apply_t):
        with Record() as rec:
            f(X)
        assert max(size for _, size, _ in rec.calls) <= 2 * X.numel()
        assert not [name for name, _, _ in rec.calls if name == "kron"]
        # the only products are by small Sylvester factors (radix <= FWHT_RADIX), never an n x n matrix
        factors = [ops[0] for name, _, ops in rec.calls if name in ("matmul", "mm", "__matmul__")]
        assert factors and all(tuple(f) == (FWHT_RADIX, FWHT_RADIX) for f in factors)


def test_hadamard_incoherence_pads_crops_and_keeps_the_proxy():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 172, generator=g, dtype=torch.float64)
    X = torch.randn(500, 172, generator=g, dtype=torch.float64)
    H = X.T @ X / 500
    s = torch.rand(172, generator=g, dtype=torch.float64) + 0.5
    proc = Incoherence(64, 172, s, "hadamard", seed=3)
    assert proc.padded_shape == (64, 176)
    Wp, Hp = proc.weight(W), proc.hessian(H)
    assert Wp.shape == (64, 176) and Hp.shape == (176, 176)
    torch.testing.assert_close(proc.unweight(Wp), W, atol=1e-12, rtol=0)
    W2 = W + 0.1 * torch.randn(64, 172, generator=g, dtype=torch.float64)
    assert proxy_loss(Wp, proc.weight(W2), Hp) == pytest.approx(proxy_loss(W, W2, H), rel=1e-10)
    Eq = 0.01 * torch.randn(64, 176, generator=g, dtype=torch.float64)  # any error in the padded basis
    assert proxy_loss(Wp, Wp + Eq, Hp) == pytest.approx(proxy_loss(W, proc.unweight(Wp + Eq), H), rel=1e-10)
    with pytest.raises(UserError, match=r"processed \(64, 176\) matrix"):
        proc.unweight(W)
    tall = Incoherence(172, 64, rotation="hadamard", seed=3)  # rows pad too
    assert tall.padded_shape == (176, 64)
    torch.testing.assert_close(tall.unweight(tall.weight(W.T)), W.T, atol=1e-12, rtol=0)


def test_hadamard_incoherence_is_seeded_u_then_v():
    proc = Incoherence(24, 96, rotation="hadamard", seed=5)
    g = torch.Generator().manual_seed(5)
    U, V = RandomHadamard(24, g), RandomHadamard(96, g)
    X = torch.randn(96, 3, dtype=torch.float64)
    assert torch.equal(proc.V.apply(X), V.apply(X)) and torch.equal(proc.U.apply(X[:24]), U.apply(X[:24]))
    other = Incoherence(24, 96, rotation="hadamard", seed=6)
    assert not torch.equal(other.V.apply(X), proc.V.apply(X))


# --- block LDLQ ---------------------------------------------------------------------------------------------

def test_block_ldl_factors_h():
    H = realistic_hessian(64, 0).double()
    U, D = block_ldl(H, 8)
    UI = U + torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(UI @ torch.block_diag(*D) @ UI.T, H, atol=1e-12, rtol=0)
    below = torch.ones(8, 8).triu(1).repeat_interleave(8, 0).repeat_interleave(8, 1) == 0
    assert float(U[below].abs().max()) < 1e-12  # U is block strictly upper


@pytest.mark.parametrize("name", CODEBOOKS)
def test_block_ldlq_with_a_block_diagonal_h_is_nearest(name):
    cb = get_codebook(name)
    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    s = cb.scale_for(W)
    A = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(2))
    for H in (torch.diag(torch.rand(64) + 0.1), torch.block_diag(*(A @ A.transpose(1, 2) + torch.eye(8)))):
        W_hat, codes = block_ldlq(W, H, cb.quantizer(s))
        near, near_codes = cb.quantize(W.reshape(-1, 8) / s)
        assert torch.equal(W_hat, (near * s).reshape(W.shape))
        assert torch.equal(codes, near_codes.reshape(40, 8, -1))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["e8p", "e8p_rvq3"])
def test_block_ldlq_beats_nearest_on_a_realistic_h(name, seed):
    cb = get_codebook(name)
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(seed + 10))
    H = realistic_hessian(128, seed)
    s = cb.scale_for(W)
    W_hat = block_ldlq(W, H, lambda X: cb.quantize(X / s)[0] * s)
    near = (cb.quantize(W.reshape(-1, 8) / s)[0] * s).reshape(W.shape)
    assert proxy_loss(W, W_hat, H) < 0.7 * proxy_loss(W, near, H)


def test_block_ldlq_codes_rebuild_w_hat_and_lazy_groups_change_nothing():
    cb = get_codebook("e8p_rvq4")
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H = realistic_hessian(256, 3).double()
    s = cb.scale_for(W)
    W_hat, codes = block_ldlq(W, H, cb.quantizer(s), blocksize=128)
    assert torch.equal((cb.decode(codes.reshape(-1, 2), torch.float64) * s).reshape(W.shape), W_hat)
    W_eager, codes_eager = block_ldlq(W, H, cb.quantizer(s), blocksize=8)  # update after every block
    assert torch.equal(codes_eager, codes) and torch.equal(W_eager, W_hat)  # float64: no near ties here


def test_block_ldlq_needs_whole_blocks():
    with pytest.raises(UserError, match=r"columns \(12\) and blocksize \(128\) in multiples of 8"):
        block_ldlq(torch.zeros(4, 12), torch.eye(12), lambda X: X)
