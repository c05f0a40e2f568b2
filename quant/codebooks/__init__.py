"""Codebooks: one class per family, one instance per `codebook` name of a layer spec, each owning both
sides of its codes (the abstract base is `base.Codebook`):

- quantization: `for_bits(wbits)` (the family member for a bit width), `quantize(Wp, H, wbits, options)`
  (H the damped Hessian, options an `Options`: the method and the scalar rounding options) ->
  `Quantized(w, codes, scale, zero, passes, spec)`: the rounded processed weights, what to store and
  the codebook's own spec fields; `describe` / `unit` for opt.py's messages; `scalar_options` says
  whether qfn, groupsize, greedy passes and unbiased rounding apply;
- storage (`quant.linear.QuantLinear`): `shapes(spec)`, `pack(spec, result)`, `trainable` (which of the
  tensors are parameters), `decode(layer, r0, r1)` (rows of the processed weights, differentiable in
  the parameters);
- code updates (`quant.pv`): `codes`, `encode`, `set_codes`, `group_size`, `group_rows`, `group_view`,
  `encode_groups`, `costly_encode`;
- the C++ decode kernel (`quant.kernels`): `kernel_layout(layer)`, None where it has no decoder;
  `costly_decode` (`lm.decode` prefills through the kernel).

Families: `grid` (scalar affine grids, QuIP's qfn a/b), E8P and its residual forms (`e8p`, `e8p_rvq3`,
`e8p_rvq4`: QuIP#), `trellis` (QTIP). A method of `quant.methods.TABLE` names its family by registry
name (`Method.codebook`), plus `codebook_options` the family reads.

Adding a codebook is one file plus one line of CODEBOOKS. E.g. a ternary codebook with one scale per row
(tests/quant/test_codebooks.py has it complete):

    class Ternary(Codebook):
        name = "ternary"

        def quantize(self, Wp, H, wbits, options):
            scale = Wp.abs().amax(1, keepdim=True).clamp(min=1e-8)
            codes = (torch.round(Wp / scale) + 1).to(torch.uint8)  # {0, 1, 2}
            return Quantized(scale * (codes.float() - 1), codes, scale, spec=dict(groupsize=-1, codebook=self.name))

        def shapes(self, spec):
            rows, cols = spec["padded"]
            return {"codes": ((rows, cols), torch.uint8), "scale": ((rows, 1), torch.float32)}

        def pack(self, spec, result):
            return {"codes": result.codes, "scale": result.scale.float()}

        def decode(self, layer, r0, r1):
            return layer.scale[r0:r1] * (layer.codes[r0:r1].float() - 1)

        ...  # describe (opt.py's summary); codes, encode, set_codes (code updates)

then `"ternary": Ternary(),` in CODEBOOKS below, and a method that uses it in `quant.methods.TABLE`:
`Method("ternary", "round to nearest of {-s, 0, s}", "ternary", wbits=(2,), stochastic=False,
uses_hessian=False)`. Optional: `kernel_layout` (a decoder in quant/kernels/packed.cpp), `for_bits`
(a family with one member per bit width), and the code group methods where groups are not runs of
`group` weights along a row (the trellis's tiles).
"""
from engine import UserError

from .base import Codebook, Options, Quantized
from .e8p import E8PCodebook
from .grid import GridCodebook
from .trellis import TrellisCodebook

CODEBOOKS = {
    "grid": GridCodebook(),
    "e8p": E8PCodebook("e8p"),
    "e8p_rvq3": E8PCodebook("e8p_rvq3"),
    "e8p_rvq4": E8PCodebook("e8p_rvq4"),
    "trellis": TrellisCodebook(),
}

__all__ = ["CODEBOOKS", "Codebook", "Options", "Quantized", "get"]


def get(name):
    """The codebook registered as `name` (a layer spec's `codebook`, or a Method's family)."""
    if name not in CODEBOOKS:
        raise UserError(f"unknown codebook {name!r} in a quantized layer; known: {', '.join(CODEBOOKS)}")
    return CODEBOOKS[name]
