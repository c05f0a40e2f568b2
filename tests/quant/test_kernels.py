"""quant.kernels: the C++ CPU kernel of QuantLinear at decode token counts, against the torch path."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import quant
from quant import kernels
from quant.e8p import get_codebook
from quant.linear import QuantLinear
from quant.trellis import CODES
from tests.helpers import ROOT

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def ext():
    """The extension, built once per session (cached in torch's extension dir across sessions)."""
    if not kernels.ENABLED:
        pytest.skip("RLO_NO_KERNEL is set: the C++ kernel is disabled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = kernels.extension()
    if module is None:
        pytest.skip(f"the C++ kernel could not be built: {caught[0].message if caught else 'unknown reason'}")
    return module


def random_layer(spec, seed, bias=True):
    """A QuantLinear with uniformly random codes (every bit pattern) and positive random scales."""
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(spec, bias=bias)
    layer.add_channel_scales()
    with torch.no_grad():
        for name, b in layer.named_buffers():
            if name == "zero":
                b.copy_(torch.randint(0, 2 ** spec["wbits"], b.shape, generator=g).float())
            elif b.dtype == torch.int16:
                b.copy_(torch.randint(-2 ** 15, 2 ** 15, b.shape, generator=g, dtype=torch.int16))
            else:
                b.copy_(torch.randint(0, 256, b.shape, generator=g, dtype=torch.uint8))
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return layer


def grid_spec(rows, cols, wbits, qfn, groupsize, rotation):
    padded = list(quant.Incoherence(rows, cols, None, rotation, 3).padded_shape)
    return dict(codebook="grid", wbits=wbits, shape=[rows, cols], padded=padded, rotation=rotation, seed=3,
                qfn=qfn, groupsize=groupsize)


def vector_spec(rows, cols, name, rotation="hadamard"):
    cb = get_codebook(name)
    padded = list(quant.Incoherence(rows, cols, None, rotation, 3).padded_shape)
    return dict(codebook=name, wbits=cb.bits, shape=[rows, cols], padded=padded, rotation=rotation, seed=3,
                stage_scales=list(cb.stage_scales))


def trellis_spec(rows, cols, k, code, L=16, T=256):
    padded = list(quant.Incoherence(rows, cols, None, "hadamard", 3).padded_shape)
    return dict(codebook="trellis", wbits=k, shape=[rows, cols], padded=padded, rotation="hadamard", seed=3,
                groupsize=-1, trellis=dict(L=L, V=CODES[code], T=T, code=code, k=k), tile=[T // 16, 16])


def torch_path(layer, x):
    kernels.ENABLED = False
    try:
        return layer(x)
    finally:
        kernels.ENABLED = True


def assert_matches(layer, x):
    """Kernel vs torch path: each token's outputs to 1e-6 relative (float32 sums in another order)."""
    with torch.no_grad():
        got = kernels.forward(layer, x)
        want = torch_path(layer, x)
    assert got is not None and got.shape == want.shape
    err = (got - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() < 1e-6, err.max()


SPECS = [grid_spec(37, 77, w, qfn, gs, rot) for w in (2, 3, 4)
         for qfn, gs, rot in (("a", -1, None), ("b", -1, "hadamard"), ("a", 16, None), ("a", 12, "kron"))]
SPECS += [grid_spec(20, 44, 2, "b", -1, "butterfly")]
# 8 bits (quantized heads): centred codes 64, then 16 at a time, then one at a time, per row and per group
SPECS += [grid_spec(37, cols, 8, "a", gs, None) for cols, gs in ((77, -1), (77, 16), (100, 48))]
SPECS += [vector_spec(37, 172, name) for name in ("e8p", "e8p_rvq3", "e8p_rvq4")] + [vector_spec(24, 64, "e8p", None)]
# trellis: 1MAD computed in the kernel (k = 2, 3: one stream window per 16 weights, and one token by whole tiles
# where the CPU has AVX512-VBMI; 4: two windows), 3INST gathered from its table, with fewer state bits in 16-row
# tiles and in a short sequence (tiles of 4 rows)
SPECS += [trellis_spec(32, 48, k, "1mad") for k in (2, 3, 4)]
SPECS += [trellis_spec(32, 48, 2, "3inst", L=12), trellis_spec(40, 32, 2, "3inst", L=12, T=64)]
# HYB (qtip): two weights per state, gathered as pairs
SPECS += [trellis_spec(32, 48, k, "hyb") for k in (2, 3, 4)] + [trellis_spec(40, 32, 2, "hyb", L=12, T=64)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s['codebook']}{s['wbits']}-{s.get('qfn', '')}"
                         f"{s.get('groupsize', '')}-{s['rotation']}-{s['shape'][0]}x{s['shape'][1]}")
def test_kernel_matches_the_torch_path_on_random_codes(ext, spec):
    layer = random_layer(spec, seed=len(str(spec)))
    if spec["codebook"] == "trellis":  # 1MAD computed from the state, exactly; other codes read the table
        assert kernels.plan(layer).inline_mad == (spec["trellis"]["code"] == "1mad")
    for tokens in (1, 3, 16):  # 16: two tiles of 8 tokens
        assert_matches(layer, torch.randn(tokens, spec["shape"][1]))


def test_layer_dispatch(ext):
    """layer(x) runs the kernel for 1-16 float32 CPU tokens without gradients, the torch path otherwise."""
    layer = random_layer(vector_spec(16, 40, "e8p"), seed=0)
    x = torch.randn(2, 5, 40)  # 10 tokens in a batch shape
    with torch.no_grad():
        assert torch.equal(layer(x), kernels.forward(layer, x.reshape(10, 40)).reshape(2, 5, 16))
        assert layer(x).shape == (2, 5, 16) and layer(x[0, 0]).shape == (16,)
        assert kernels.forward(layer, torch.randn(17, 40)) is None
        assert kernels.forward(layer, torch.randn(1, 40, dtype=torch.float64)) is None
    assert kernels.forward(layer, torch.randn(1, 40)) is None  # scales require grad: finetuning's torch path
    y = layer(torch.randn(1, 40))
    y.sum().backward()
    assert layer.scale.grad is not None


def test_kernel_reads_the_current_scales(ext):
    """Finetuned (in place) or replaced tensors are looked up on every call, not captured once."""
    layer = random_layer(grid_spec(8, 24, 2, "a", -1, "hadamard"), seed=1)
    x = torch.randn(1, 24)
    with torch.no_grad():
        before = kernels.forward(layer, x)
        layer.out_scale.mul_(2)
        layer.scale.mul_(3)
        assert not torch.allclose(kernels.forward(layer, x), before)
        assert_matches(layer, x)
        layer.bias = None
        layer.zero = layer.zero + 1  # a new buffer tensor
        assert_matches(layer, x)


def test_a_failed_build_warns_once_and_the_torch_path_runs(monkeypatch):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nerror: g++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.setattr(kernels, "_built", {})
    monkeypatch.setattr(kernels, "_plans", type(kernels._plans)())
    monkeypatch.setattr(kernels, "ENABLED", True)
    layers = [random_layer(vector_spec(8, 16, "e8p"), seed=2), random_layer(grid_spec(8, 16, 2, "a", -1, None), 3)]
    x = torch.randn(1, 16)
    with pytest.warns(UserWarning, match="could not be built .*g\\+\\+ not found.*torch path") as caught:
        with torch.no_grad():
            got = [layer(x) for layer in layers + layers]
    assert len(caught) == 1
    with torch.no_grad():
        assert all(torch.equal(y, torch_path(layer, x)) for y, layer in zip(got, layers + layers))


def test_rlo_no_kernel_disables_it():
    code = "import quant.kernels as k; print(k.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, RLO_NO_KERNEL="1"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
