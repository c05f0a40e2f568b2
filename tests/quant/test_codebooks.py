"""quant.codebooks: the registry, and a codebook added from outside the package (one class plus one
registry entry) running through quantize_layer, QuantLinear, code updates and a packed checkpoint."""
import pytest
import torch

import lm
import quant
from engine import UserError
from lm_fixtures import make_text, tiny_model, train_tokenizer
from quant import codebooks
from quant.codebooks import CODEBOOKS, Codebook, Quantized
from quant.methods import TABLE, Method
from quant.model import quantize_model
from quant.pv import apply, propose


class Ternary(Codebook):
    """Round to nearest of {-s, 0, s}, one scale s (the max |w|) per row; one byte per code."""

    name = "ternary"

    def quantize(self, Wp, H, wbits, options):
        scale = Wp.abs().amax(1, keepdim=True).clamp(min=1e-8)
        codes = (torch.round(Wp / scale) + 1).to(torch.uint8)
        return Quantized(scale * (codes.to(Wp.dtype) - 1), codes, scale.float(),
                         spec=dict(groupsize=-1, codebook=self.name))

    def describe(self, method, qfn):
        return "ternary {-s, 0, s}"

    def shapes(self, spec):
        rows, cols = spec["padded"]
        return {"codes": ((rows, cols), torch.uint8), "scale": ((rows, 1), torch.float32)}

    def pack(self, spec, result):
        return {"codes": result.codes, "scale": result.scale.float()}

    def decode(self, layer, r0, r1):
        return layer.scale[r0:r1] * (layer.codes[r0:r1].float() - 1)

    def codes(self, layer, r0, r1):
        return layer.codes[r0:r1].long()[..., None]

    def encode(self, layer, target, r0, r1):
        scale = layer.scale.detach()[r0:r1]
        q = torch.round(target / scale).clamp(-1, 1)
        return (q + 1).long()[..., None], scale * q

    def set_codes(self, layer, codes, r0, r1):
        layer.codes[r0:r1] = codes[..., 0].to(torch.uint8)


@pytest.fixture
def ternary(monkeypatch):
    """The codebook and a method using it, registered for one test."""
    monkeypatch.setitem(CODEBOOKS, "ternary", Ternary())
    monkeypatch.setitem(TABLE, "ternary", Method("ternary", "round to nearest of a ternary codebook", "ternary",
                                                 wbits=(2,), stochastic=False, uses_hessian=False))
    return "ternary"


def _problem(rows=32, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(256, cols, generator=g)
    return W, X.T @ X / 256, torch.randn(5, cols, generator=g)


def test_registry_names_every_spec_codebook_and_every_method_family():
    assert set(CODEBOOKS) == {"grid", "e8p", "e8p_rvq3", "e8p_rvq4", "trellis"}
    assert all(isinstance(cb, Codebook) and cb.name == name for name, cb in CODEBOOKS.items())
    assert all(m.codebook in CODEBOOKS for m in TABLE.values())
    assert [codebooks.get("e8p").for_bits(b).name for b in (2, 3, 4)] == ["e8p", "e8p_rvq3", "e8p_rvq4"]
    assert codebooks.get("grid").for_bits(3) is CODEBOOKS["grid"]
    with pytest.raises(UserError, match="unknown codebook 'nope'"):
        codebooks.get("nope")
    with pytest.raises(UserError, match="unknown codebook 'nope'"):
        quant.QuantLinear(dict(shape=[4, 8], padded=[4, 8], wbits=2, codebook="nope"))


@pytest.mark.parametrize("incoherence", [False, True])
def test_an_added_codebook_quantizes_packs_and_runs_as_its_dequantized_matmul(ternary, incoherence):
    W, H, x = _problem()
    r = quant.quantize_layer(W, H, 2, ternary, incoherence=incoherence)
    assert r.spec["codebook"] == "ternary" and r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 2
    assert r.damping == 0.0  # uses_hessian=False: no damping
    layer = quant.QuantLinear.from_result(r)
    assert isinstance(layer.scale, torch.nn.Parameter) and "codes" in layer.code_tensors()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantize().T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.dequantize(), r.w_hat, atol=1e-5, rtol=1e-5)
    assert r.proxy < quant.proxy_loss(W, torch.zeros_like(W), H)


def test_an_added_codebook_takes_code_updates(ternary):
    W, H, x = _problem()
    layer = quant.QuantLinear.from_result(quant.quantize_layer(W, H, 2, ternary, incoherence=False))
    grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    before = layer.codebook.codes(layer, 0, 32).clone()
    assert apply(layer, propose(layer, grad), 0.05) == round(0.05 * 32 * 64)
    after = layer.codebook.codes(layer, 0, 32)
    assert int((after != before).sum()) == round(0.05 * 32 * 64) and int(after.max()) <= 2


def test_an_added_codebook_saves_packed_and_reloads(ternary, tmp_path):
    tokenizer = train_tokenizer(make_text(20))
    model = tiny_model("llama", tokenizer)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, ids, "cpu", 2, ternary, incoherence=True)
    layers = [m for m in model.modules() if isinstance(m, quant.QuantLinear)]
    assert layers and all(m.spec["codebook"] == "ternary" for m in layers)
    path = str(tmp_path / "packed")
    lm.save_quantized(model, tokenizer, path, dict(method=ternary, wbits=2, options={}), dtype="float32")
    again, _ = lm.load_causal_lm(path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    for a, b in zip(layers, [m for m in again.modules() if isinstance(m, quant.QuantLinear)]):
        assert torch.equal(a.codes, b.codes) and a.spec == b.spec
