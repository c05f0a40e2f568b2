"""QuIP#'s lattice codebooks (`quant.e8p`): E8P at 2 bits, residual E8P (e8p_rvq3, e8p_rvq4) at 3 and 4;
8 weights per code, one scale per row, block LDLQ. Tensors: buffers `codes0`, `codes1`, ... (one per
stage, rows x cols / 8, int16 for 16-bit codes, uint8 for 8-bit ones), parameter `scale` (rows, 1)."""
import torch

from engine import UserError

from ..e8p import get_codebook
from ..ldlq import block_ldlq, two_sided_ldlq
from .base import Codebook, Quantized

BY_BITS = {2: "e8p", 3: "e8p_rvq3", 4: "e8p_rvq4"}  # bits per weight -> the family member (quant.e8p name)


def vector_quantize(W, H, lattice, blocksize=128, H_out=None):
    """Block LDLQ of W (rows, cols; cols a multiple of 8) with a `quant.e8p` codebook, one scale per row:
    (W_hat, codes (rows, cols // 8, stages) int64, scale (rows, 1)). With the output-side Hessian H_out
    (rows, rows), YAQA's two-sided LDLQ (`two_sided_ldlq`) over the same 8-column codewords.

    QuIP# uses one scale per matrix. After the RHT of the narrow matrices of small models the rows
    still differ in norm (a 64-wide random rotation equalizes them only up to ~20%), and on stories260K
    per-row scales took 2/3/4-bit perplexity from 53/11.6/5.2 to 30/6.6/4.1 (fp 3.64), for 4 bytes a row."""
    s = lattice.scale_for(W, dim=1)
    if H_out is None:
        W_hat, codes = block_ldlq(W, H, lattice.quantizer(s), 8, blocksize)
    else:
        W_hat, codes = two_sided_ldlq(W, H, H_out, lambda X, rows, blocks: lattice.quantizer(s[rows])(X), 8)
    return W_hat, codes, s


class E8PCodebook(Codebook):
    group = 8

    def __init__(self, name):
        self.name = name
        self.lattice = get_codebook(name)

    def for_bits(self, wbits):
        from . import get  # the registry holds the family's members (it imports this module)

        return get(BY_BITS[wbits])

    def quantize(self, Wp, H, wbits, options):
        Wq, codes, scale = vector_quantize(Wp, H, self.lattice, options.blocksize, options.h_out)
        return Quantized(Wq, codes, scale.float(), spec=dict(groupsize=-1, codebook=self.name,
                                                              stage_scales=list(self.lattice.stage_scales)))

    def describe(self, method, qfn):
        return f"codebook {self.name}"

    def unit(self, method):
        return "8 weights per code"

    def shapes(self, spec):
        if list(spec.get("stage_scales", [])) != list(self.lattice.stage_scales):
            raise UserError(f"{self.name} layer written with residual stage scales {spec.get('stage_scales')}, "
                            f"this version decodes with {self.lattice.stage_scales}")
        rows, cols = spec["padded"]
        codes = {f"codes{i}": ((rows, cols // 8), torch.int16 if bits == 16 else torch.uint8)
                 for i, bits in enumerate(self.lattice.code_bits)}
        return dict(codes, scale=((rows, 1), torch.float32))

    def pack(self, spec, result):
        rows, blocks, stages = result.codes.shape
        packed = self.lattice.pack(result.codes.reshape(-1, stages))
        return dict({k: v.reshape(rows, blocks) for k, v in packed.items()}, scale=result.scale.float())

    def decode(self, layer, r0, r1):
        return self.lattice.decode(self._flat_codes(layer, r0, r1)).reshape(r1 - r0, -1) * layer.scale[r0:r1]

    def _flat_codes(self, layer, r0, r1):
        stages = len(self.lattice.code_bits)
        return self.lattice.unpack({f"codes{i}": getattr(layer, f"codes{i}")[r0:r1].reshape(-1) for i in range(stages)})

    def codes(self, layer, r0, r1):
        codes = self._flat_codes(layer, r0, r1)
        return codes.reshape(r1 - r0, -1, codes.shape[1])

    def encode(self, layer, target, r0, r1):
        """Exact for E8P, stage by stage (greedy) for the residual forms, as their quantizer."""
        scale = layer.scale.detach()[r0:r1]
        values, codes = self.lattice.quantize((target.float() / scale).reshape(-1, 8))
        return codes.reshape(r1 - r0, -1, codes.shape[1]), values.reshape(r1 - r0, -1) * scale

    def set_codes(self, layer, codes, r0, r1):
        for name, t in self.lattice.pack(codes.reshape(-1, codes.shape[-1])).items():
            getattr(layer, name)[r0:r1] = t.reshape(r1 - r0, -1)

    def kernel_layout(self, layer):
        return 1, layer.spec["wbits"], -1, list(self.lattice.code_bits), [float(m) for m in self.lattice.stage_scales], None
