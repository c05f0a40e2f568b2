"""quant.trellis (QTIP's bitshift trellis), the qtip method, its packed layers and checkpoints."""
import json
import os

import pytest
import torch

import ft_opt
import lm
import opt
import quant
from engine import UserError
from quant import kernels
from quant.codebooks import CODEBOOKS
from quant.trellis import SEAM_BITS, Trellis
from tests.helpers import OPT_FAST


def all_streams(tr):
    """Every bitstream of T k bits, as (2^(T k), T k / 8) uint8."""
    nbytes = tr.T * tr.k // 8
    ints = torch.arange(1 << (tr.T * tr.k))
    return torch.stack([(ints >> (8 * (nbytes - 1 - i))) & 255 for i in range(nbytes)], 1).to(torch.uint8)


@pytest.fixture(params=["torch", pytest.param("kernel", marks=pytest.mark.kernel)])
def viterbi_path(request, monkeypatch):
    """Each Viterbi test on both paths: the torch code and the C++ search (quant/kernels/trellis.cpp)."""
    if request.param == "kernel":
        if not kernels.ENABLED:
            pytest.skip("RLO_NO_KERNEL is set: the C++ kernel is disabled")
        if kernels.extension("trellis") is None:
            pytest.skip("the C++ Viterbi could not be built")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "kernel")
    return request.param


@pytest.mark.parametrize("L, k, code", [(6, 2, "1mad"), (6, 2, "3inst"), (10, 2, "hyb")])
def test_viterbi_finds_the_exact_tail_biting_optimum_of_a_small_trellis(L, k, code, viterbi_path):
    tr = Trellis(L=L, k=k, T=8, code=code)
    streams = all_streams(tr)  # 2^16 tail-biting paths
    values = tr.decode(streams)
    X = torch.randn(6, tr.T, generator=torch.Generator().manual_seed(L))
    err = torch.cdist(X, values).square()  # (6, 2^16)
    overlaps = range(1 << (L - tr.kv))
    constrained = torch.stack([(tr.values(tr.viterbi(X, torch.full((6,), o))) - X).square().sum(1)
                               for o in overlaps], 1)
    # the best path with each overlap is the brute-force optimum over the streams with that overlap ...
    overlap_of = tr.unpack(streams)[:, -1] & ((1 << (L - tr.kv)) - 1)
    for o in overlaps:
        torch.testing.assert_close(constrained[:, o], err[:, overlap_of == o].min(1).values, atol=1e-4, rtol=1e-4)
    # ... so their minimum is the global optimum; QTIP's two passes give a valid stream no better than it,
    # with the default overlap pass and the shortest
    for seam_bits in (SEAM_BITS, 1):
        short = Trellis(L=L, k=k, T=8, code=code, seam_bits=seam_bits)
        X_hat, packed = short.quantize(X)
        assert torch.equal(short.decode(packed), X_hat)
        assert bool(((X_hat - X).square().sum(1) >= err.min(1).values - 1e-4).all())
    free = (tr.values(tr.viterbi(X)) - X).square().sum(1)  # no tail-biting: a lower bound
    assert bool((free <= err.min(1).values + 1e-4).all())


@pytest.mark.parametrize("L, k, code", [(16, 2, "hyb"), (12, 3, "hyb"), (16, 4, "hyb"), (14, 2, "1mad"),
                                        (16, 3, "3inst"), (8, 4, "1mad"), (6, 2, "3inst")])
@pytest.mark.kernel
def test_kernel_viterbi_finds_paths_as_cheap_as_the_torch_path(L, k, code, monkeypatch):
    """Every vector layout of the C++ search (2^kV >= or < the vector width, groups of 8 or single
    sequences, scalar code for tiny L): valid paths with the torch path's cost, free and constrained."""
    if not kernels.ENABLED or kernels.extension("trellis") is None:
        pytest.skip("the C++ Viterbi is disabled or could not be built")
    tr = Trellis(L=L, k=k, code=code, T=64)
    g = torch.Generator().manual_seed(L + k)
    X = torch.randn(11, tr.T, generator=g)  # 11: a short last group of sequences
    for overlap in (None, torch.randint(0, 1 << (L - tr.kv), (11,), generator=g)):
        got = tr.viterbi(X, overlap)
        monkeypatch.setattr(kernels, "ENABLED", False)
        want = tr.viterbi(X, overlap)
        monkeypatch.setattr(kernels, "ENABLED", True)
        mask = (1 << L) - 1
        assert torch.equal((got[:, :-1] << tr.kv) & mask, got[:, 1:] & ~((1 << tr.kv) - 1) & mask)  # a path
        if overlap is not None:  # the start's high and the end's low L - kV bits are the overlap
            assert torch.equal(got[:, 0] >> tr.kv, overlap) and torch.equal(got[:, -1] & ((1 << (L - tr.kv)) - 1), overlap)
        cost = lambda states: (tr.values(states) - X).square().sum(1)  # noqa: E731
        torch.testing.assert_close(cost(got), cost(want), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("k, code", [(2, "1mad"), (3, "3inst"), (4, "hyb"), (3, "hyb")])
def test_streams_unpack_to_consistent_states_and_pack_back(k, code):
    tr = Trellis(L=16, k=k, code=code)
    packed = torch.randint(0, 256, (5, tr.T * k // 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    states = tr.unpack(packed)
    assert states.shape == (5, tr.T // tr.V)
    mask = (1 << tr.L) - 1
    shifted = ((states.roll(1, 1) << tr.kv) | (states & ((1 << tr.kv) - 1))) & mask  # state_{t-1} -> state_t,
    assert torch.equal(shifted, states)  # the wrap from the last state to the first included (tail-biting)
    assert torch.equal(tr.pack(states), packed)


@pytest.mark.parametrize("q", [4, 9])
def test_hyb_code_reads_every_entry_of_its_table_with_both_signs(q):
    tr = Trellis(L=16, code="hyb", hyb_q=q)
    assert len(torch.unique(tr.table, dim=0)) == 2 << q  # 2^q entries x the sign of the first value
    assert abs(float(tr.table.square().mean()) - 1) < 1e-5


def test_gaussian_mse_at_2_bits_is_near_qtips_and_the_bound():
    tr = Trellis(k=2, code="hyb")  # the qtip method's code
    Z = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))
    s = tr.scale_for(Z)
    mse = float((tr.quantize(Z / s)[0] * s - Z).square().mean())
    # QTIP (Table 1) reports 0.069-0.071 for its L = 16 codes; the bound is 2^-4; e8p is 0.091
    assert 0.0625 < mse < 0.073


def test_trellis_option_mistakes_are_user_errors():
    for kwargs, match in [(dict(k=5), "k must be one of 2, 3, 4"), (dict(code="e8"), "unknown trellis code"),
                          (dict(code="1mad", V=2), "emits V = 1"), (dict(L=17, code="hyb"), r"L must lie in \[10, 16\]"),
                          (dict(code="1mad", k=4, L=6), r"L must lie in \[8, 16\]"),
                          (dict(T=100, k=3), "T must be a positive multiple"),
                          (dict(code="hyb", hyb_q=12), r"hyb_q must lie in \[4, 11\]"),
                          (dict(code="hyb", L=10, hyb_q=10), r"L must lie in \[11, 16\]"),
                          (dict(seam_bits=0), "seam_bits must be a positive integer")]:
        with pytest.raises(UserError, match=match):
            Trellis(**kwargs)
    tr = Trellis(k=2)
    with pytest.raises(UserError, match=r"quantizes \(n, 256\) tensors"):
        tr.quantize(torch.zeros(3, 128))
    with pytest.raises(UserError, match=r"uint8 of shape \(n, 64\)"):
        tr.unpack(torch.zeros(3, 32, dtype=torch.uint8))
    W = torch.randn(24, 64)  # 24 rows: no whole 16-row tiles
    with pytest.raises(UserError, match="does not split into them"):
        quant.quantize_layer(W, torch.eye(64), 2, "qtip")
    with pytest.raises(UserError, match="does not take --groupsize"):
        opt.main(["no/such/model", "wikitext2", "--wbits", "2", "--quant", "qtip", "--groupsize", "64"])


@pytest.mark.parametrize("wbits", [2, 3])
def test_qtip_layer_runs_from_its_streams_and_beats_e8p_on_the_proxy(wbits):
    g = torch.Generator().manual_seed(wbits)
    W = torch.randn(32, 176, generator=g)
    X = torch.randn(400, 176, generator=g) * torch.logspace(0, -1, 176)
    H = X.T @ X / 400
    r = quant.quantize_layer(W, H, wbits, "qtip", seed=1)
    assert r.spec["tile"] == [16, 16] and r.spec["padded"] == [32, 176]
    assert r.codes.dtype == torch.uint8 and r.codes.shape == (2, 11, 256 * wbits // 8)
    layer = quant.QuantLinear.from_result(r)
    x = torch.randn(5, 176, generator=g)
    torch.testing.assert_close(layer(x), x @ r.w_hat.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.dequantize(), r.w_hat, atol=1e-5, rtol=1e-5)
    for r0, r1 in [(3, 21), (17, 32), (0, 5)]:  # row blocks that cut tiles decode the same rows
        torch.testing.assert_close(layer.processed_weight(r0, r1), layer.processed_weight()[r0:r1], atol=0, rtol=0)
    assert r.proxy < quant.quantize_layer(W, H, wbits, "e8p", seed=1).proxy
    if wbits == 2:  # code updates: re-encoding the decoded weights finds streams of the same values
        W_p = layer.processed_weight().detach()
        streams, values = CODEBOOKS["trellis"].encode(layer, W_p, 0, 32)
        torch.testing.assert_close(values, W_p, atol=1e-6, rtol=0)
        CODEBOOKS["trellis"].set_codes(layer, streams[1:], 16, 32)
        torch.testing.assert_close(layer.processed_weight(), W_p, atol=1e-6, rtol=0)
        with pytest.raises(UserError, match="tiles of 16 rows"):
            CODEBOOKS["trellis"].codes(layer, 3, 16)


def test_packed_size_at_opt_125m_shapes_is_below_0_14_of_fp16():
    for rows, cols in [(768, 768), (3072, 768), (768, 3072)]:
        spec = dict(padded=[rows, cols], tile=[16, 16], trellis=dict(L=16, k=2, V=2, T=256, code="hyb"))
        size = sum(torch.zeros((), dtype=dtype).element_size() * torch.Size(shape).numel()
                   for shape, dtype in CODEBOOKS["trellis"].shapes(spec).values())  # streams + scales
        assert size / (2 * rows * cols) <= 0.14, (rows, cols)


def test_qtip_checkpoint_reloads_with_the_same_perplexity_and_finetunes_with_frozen_codes(assets):
    packed = str(assets["root"] / "qtip")
    report = opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], *OPT_FAST, "--wbits", "2",
                       "--quant", "qtip", "--incoh_processing", "--check", "--save", packed])
    assert report["check_max_rel_diff"] < 1e-5
    assert report["reloaded_ppl"]["wikitext2"] == pytest.approx(report["ppl"]["wikitext2"], rel=1e-6)
    config = json.load(open(os.path.join(packed, "config.json")))["quantization_config"]
    assert {spec["codebook"] for spec in config["layers"].values()} == {"trellis"}
    from safetensors import safe_open
    with safe_open(os.path.join(packed, "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if k.startswith("model.layers.0.mlp.up_proj.")]
        codes = f.get_tensor("model.layers.0.mlp.up_proj.codes")
    # the streams, the row scales and the rescaling vector (in_scale), nothing dense
    assert sorted(names) == [f"model.layers.0.mlp.up_proj.{t}" for t in ("codes", "in_scale", "scale")]
    assert codes.dtype == torch.uint8 and codes.numel() == 128 * 64 * 2 // 8  # 2 bits per weight, nothing else
    out = str(assets["root"] / "qft")
    metrics = ft_opt.main(["--model", packed, "--data-dir", assets["data"], "--out", out, "--loss", "ce", "--seqlen",
                           "32", "--lr", "3e-3", "--warmup-steps", "2", "--micro-bs", "4", "--grad-accum", "2",
                           "--max-steps", "6"])
    assert metrics["quantized"] and metrics["codes_unchanged"]
    before, after = lm.load_causal_lm(packed)[0], lm.load_causal_lm(out)[0]
    codes = lambda model: {n: m.codes for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)}
    assert all(torch.equal(codes(before)[n], c) for n, c in codes(after).items()) and len(codes(after)) == 14
    assert metrics["ppl_after"] < metrics["ppl_before"]
