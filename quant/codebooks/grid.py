"""Scalar affine grids (QuIP's qfn a/b, `quant.grid`): value = scale * (code - zero), rounded by the
method's scalar algorithm (`quant.ldlq`); codes of `wbits` bits packed little-endian into each row's
own bytes (so a block of rows decodes on its own). Tensors: buffers `codes` (packed rows) and `zero`,
parameter `scale`, both (1, 1) (qfn b), (rows, 1) (qfn a) or (rows, groups) (qfn a with groups)."""
import math

import torch

from ..grid import compact, expand, make_grid
from ..ldlq import two_sided_ldlq_grid
from .base import Codebook, Quantized


def pack_rows(codes, wbits):
    """uint8 codes (rows, cols) < 2^wbits -> (rows, ceil(cols * wbits / 8)) uint8, little-endian bits,
    each row starting on a byte boundary. Torch ops only, on the codes' device."""
    rows, cols = codes.shape
    bits = (codes.to(torch.uint8)[..., None] >> torch.arange(wbits, device=codes.device, dtype=torch.uint8)) & 1
    bits = bits.reshape(rows, cols * wbits)
    pad = (-bits.shape[1]) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(rows, pad)], 1)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (bits.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_rows(packed, wbits, cols):
    """Inverse of `pack_rows`: (rows, cols) uint8 codes."""
    rows = packed.shape[0]
    if 8 % wbits == 0:  # whole codes per byte: one shift-and-mask per code position
        shifts = torch.arange(0, 8, wbits, device=packed.device, dtype=torch.uint8)
        return ((packed[..., None] >> shifts) & (2 ** wbits - 1)).reshape(rows, -1)[:, :cols]
    # every wbits bytes hold 8 whole codes: one 64-bit word each (3-8x faster than bit by bit)
    words = -(-packed.shape[1] // wbits)
    packed = torch.nn.functional.pad(packed, (0, words * wbits - packed.shape[1]))
    byte_shifts = 8 * torch.arange(wbits, device=packed.device)
    word = (packed.reshape(rows, words, wbits).long() << byte_shifts).sum(-1)  # disjoint bits: sum = or
    codes = (word[..., None] >> (wbits * torch.arange(8, device=packed.device))) & (2 ** wbits - 1)
    return codes.reshape(rows, -1)[:, :cols].to(torch.uint8)


class GridCodebook(Codebook):
    name = "grid"
    scalar_options = True

    def quantize(self, Wp, H, wbits, options):
        grid = make_grid(Wp, wbits, options.qfn, options.groupsize)
        # a fresh generator per call: the same noise on every damping attempt
        generator = torch.Generator().manual_seed(options.seed) if options.unbiased else None
        if options.h_out is None:
            Wq, passes = options.method.rounding(Wp, H, grid, options.npasses, options.blocksize, options.lazy_batch,
                                                 generator)
        else:  # a method with `two_sided`: LDLQ, in YAQA's two-sided form
            Wq, passes = two_sided_ldlq_grid(Wp, H, options.h_out, grid, generator), 0
        gsize = options.groupsize if options.groupsize != -1 else Wp.shape[1]
        return Quantized(Wq, grid.codes(Wq), compact(grid.scale, gsize), compact(grid.zero, gsize), passes,
                         dict(codebook=self.name, qfn=options.qfn, groupsize=options.groupsize))

    def describe(self, method, qfn):
        return f"qfn {qfn}"

    def shapes(self, spec):
        rows, cols = spec["padded"]
        groups = 1 if spec["groupsize"] == -1 else math.ceil(cols / spec["groupsize"])
        grid_rows = 1 if spec["qfn"] == "b" else rows
        return {"codes": ((rows, math.ceil(cols * spec["wbits"] / 8)), torch.uint8),
                "scale": ((grid_rows, groups), torch.float32), "zero": ((grid_rows, groups), torch.float32)}

    def pack(self, spec, result):
        return {"codes": pack_rows(result.codes, spec["wbits"]), "scale": result.scale.float(),
                "zero": result.zero.float()}

    def _scale_zero(self, layer, rows):
        """The layer's scale and zero of `rows` (a slice or an index tensor), expanded to one per column."""
        spec = layer.spec
        scale, zero = layer.scale, layer.zero
        if scale.shape[0] > 1:
            scale, zero = scale[rows], zero[rows]
        cols, g = spec["padded"][1], spec["groupsize"]
        return expand(scale, g, cols), expand(zero, g, cols)

    def decode_rows(self, layer, rows):
        """The processed weights of `rows` (a slice or an index tensor, e.g. the token ids a quantized
        embedding looks up), float32."""
        scale, zero = self._scale_zero(layer, rows)
        return scale * (unpack_rows(layer.codes[rows], layer.spec["wbits"], layer.spec["padded"][1]).float() - zero)

    def decode(self, layer, r0, r1):
        return self.decode_rows(layer, slice(r0, r1))

    def codes(self, layer, r0, r1):
        return unpack_rows(layer.codes[r0:r1], layer.spec["wbits"], layer.spec["padded"][1]).long()[..., None]

    def encode(self, layer, target, r0, r1):
        scale, zero = self._scale_zero(layer, slice(r0, r1))
        scale = scale.detach()
        q = torch.round(target / scale + zero).clamp(0, 2 ** layer.spec["wbits"] - 1)
        return q.long()[..., None], scale * (q - zero)

    def set_codes(self, layer, codes, r0, r1):
        layer.codes[r0:r1] = pack_rows(codes[..., 0], layer.spec["wbits"])

    def kernel_layout(self, layer):
        spec = layer.spec
        if spec["wbits"] not in (2, 3, 4, 8):
            return None
        return 0, spec["wbits"], spec["groupsize"], [], [], None
