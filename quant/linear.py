"""`QuantLinear`: a linear layer that runs from its packed low-bit codes.

A quantized weight is stored in the processed (incoherent) basis, W_p = U (W diag(s)) V^T (see
`incoherence`), as codes of a codebook plus scales. The layer never rebuilds W itself:

    y = out_scale * (U^T W_p V (in_scale * x)) + bias

The rotations U, V act on the activations (fast Walsh-Hadamard / Kronecker factors, regenerated from
the seed), and W_p is decoded from its codes a block of rows at a time (`CHUNK` values), so the
extra memory of a forward pass is one block of decoded weights. `in_scale` starts as 1/s (QuIP's
rescaling vector) and `out_scale` as 1; with the codebook scales they are the continuous parameters
that finetuning in quantized space trains (QuIP# trains its sign vectors the same way), while the
codes stay frozen buffers.

Codecs (the `codebook` field of a layer's spec) say how codes are packed, decoded and re-encoded:
- `grid`: scalar affine grids (QuIP's qfn a/b): value = scale * (code - zero), codes of `wbits` bits
  packed little-endian into each row's own bytes (so a block of rows decodes on its own);
- the lattice codebooks of `quant.e8p` (E8P and its residual variants): one 16-bit (or 8-bit) word per
  8 weights and stage, one scale per row;
- `trellis` (`quant.trellis`, method qtip): one tail-biting stream of T k bits per tile of T weights,
  one scale per row.
Every codec has the same interface (`quant.pv`, PV-tuning's discrete step, uses it to update codes):
    decode(layer, r0, r1)          rows r0:r1 of W_p, float32, differentiable in the scales
    group                          weights per code group along a row (grid 1, lattice 8)
    codes(layer, r0, r1)           int64 (r1 - r0, cols // group, stages): the codes of rows r0:r1
    encode(layer, target, r0, r1)  (codes, values): the codeword nearest to each group of `target`
                                   (rows r0:r1 of W_p, decode's units) under the layer's scales, and its
                                   decoded values; exact for grids and E8P, stage by stage (greedy) for
                                   the residual codebooks, as their quantizer
    set_codes(layer, codes, r0, r1)  pack `codes` into rows r0:r1 of the layer's buffers
"""
import math

import torch
from torch import nn

from engine import UserError

from . import kernels
from .e8p import CODEBOOKS, get_codebook
from .grid import expand
from .incoherence import Incoherence

CHUNK = 1 << 22  # decoded weights per block of rows (16 MB in fp32)


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
    bits = (packed[..., None] >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    bits = bits.reshape(rows, -1)[:, :cols * wbits].reshape(rows, cols, wbits)
    weights = (1 << torch.arange(wbits, device=packed.device, dtype=torch.int32)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


class GridCodec:
    """Scalar grid codes: buffers `codes` (packed rows) and `zero`; parameter `scale` of shape (1, 1)
    (qfn b), (rows, 1) (qfn a) or (rows, groups) (qfn a with groups)."""

    name = "grid"

    @staticmethod
    def tensors(spec, result):
        return {"codes": pack_rows(result.codes, spec["wbits"]), "scale": result.scale.float(),
                "zero": result.zero.float()}

    @staticmethod
    def shapes(spec):
        rows, cols = spec["padded"]
        groups = 1 if spec["groupsize"] == -1 else math.ceil(cols / spec["groupsize"])
        grid_rows = 1 if spec["qfn"] == "b" else rows
        return {"codes": ((rows, math.ceil(cols * spec["wbits"] / 8)), torch.uint8),
                "scale": ((grid_rows, groups), torch.float32), "zero": ((grid_rows, groups), torch.float32)}

    trainable = ("scale",)

    @staticmethod
    def decode(layer, r0, r1):
        spec = layer.spec
        cols = spec["padded"][1]
        q = unpack_rows(layer.codes[r0:r1], spec["wbits"], cols).float()
        scale, zero = layer.scale, layer.zero
        if scale.shape[0] > 1:
            scale, zero = scale[r0:r1], zero[r0:r1]
        g = spec["groupsize"]
        return expand(scale, g, cols) * (q - expand(zero, g, cols))

    group = 1

    @staticmethod
    def codes(layer, r0, r1):
        return unpack_rows(layer.codes[r0:r1], layer.spec["wbits"], layer.spec["padded"][1]).long()[..., None]

    @staticmethod
    def encode(layer, target, r0, r1):
        spec = layer.spec
        cols, g = spec["padded"][1], spec["groupsize"]
        scale, zero = layer.scale.detach(), layer.zero
        if scale.shape[0] > 1:
            scale, zero = scale[r0:r1], zero[r0:r1]
        scale, zero = expand(scale, g, cols), expand(zero, g, cols)
        q = torch.round(target / scale + zero).clamp(0, 2 ** spec["wbits"] - 1)
        return q.long()[..., None], scale * (q - zero)

    @staticmethod
    def set_codes(layer, codes, r0, r1):
        layer.codes[r0:r1] = pack_rows(codes[..., 0], layer.spec["wbits"])


class VectorCodec:
    """Lattice codebook codes (`quant.e8p`): buffers `codes0`, `codes1`, ... (one per stage, rows x cols/8,
    int16 for 16-bit codes, uint8 for 8-bit ones); parameter `scale` (rows, 1), one scale per
    row of the processed matrix."""

    trainable = ("scale",)

    def __init__(self, name):
        self.name = name
        self.codebook = get_codebook(name)

    def tensors(self, spec, result):
        rows, blocks, stages = result.codes.shape
        packed = self.codebook.pack(result.codes.reshape(-1, stages))
        return dict({k: v.reshape(rows, blocks) for k, v in packed.items()}, scale=result.scale.float())

    def shapes(self, spec):
        if list(spec.get("stage_scales", [])) != list(self.codebook.stage_scales):
            raise UserError(f"{self.name} layer written with residual stage scales {spec.get('stage_scales')}, "
                            f"this version decodes with {self.codebook.stage_scales}")
        rows, cols = spec["padded"]
        codes = {f"codes{i}": ((rows, cols // 8), torch.int16 if bits == 16 else torch.uint8)
                 for i, bits in enumerate(self.codebook.code_bits)}
        return dict(codes, scale=((rows, 1), torch.float32))

    def decode(self, layer, r0, r1):
        stages = len(self.codebook.code_bits)
        codes = self.codebook.unpack({f"codes{i}": getattr(layer, f"codes{i}")[r0:r1].reshape(-1) for i in range(stages)})
        return self.codebook.decode(codes).reshape(r1 - r0, -1) * layer.scale[r0:r1]

    group = 8

    def codes(self, layer, r0, r1):
        stages = len(self.codebook.code_bits)
        codes = self.codebook.unpack({f"codes{i}": getattr(layer, f"codes{i}")[r0:r1].reshape(-1) for i in range(stages)})
        return codes.reshape(r1 - r0, -1, stages)

    def encode(self, layer, target, r0, r1):
        scale = layer.scale.detach()[r0:r1]
        values, codes = self.codebook.quantize((target.float() / scale).reshape(-1, 8))
        return codes.reshape(r1 - r0, -1, codes.shape[1]), values.reshape(r1 - r0, -1) * scale

    def set_codes(self, layer, codes, r0, r1):
        for name, t in self.codebook.pack(codes.reshape(-1, codes.shape[-1])).items():
            getattr(layer, name)[r0:r1] = t.reshape(r1 - r0, -1)


class TrellisCodec:
    """Bitshift-trellis streams (`quant.trellis`): buffer `codes` uint8 (rows / tile rows, cols / 16, T k / 8),
    one stream per tile of (tile rows x 16) weights (row-major in the tile); parameter `scale` (rows, 1)."""

    name = "trellis"
    trainable = ("scale",)

    @staticmethod
    def trellis(spec):
        from .trellis import Trellis

        key = tuple(sorted(spec["trellis"].items()))
        if key not in _TRELLISES:
            _TRELLISES[key] = Trellis(**spec["trellis"])
        return _TRELLISES[key]

    @staticmethod
    def tensors(spec, result):
        return {"codes": result.codes, "scale": result.scale.float()}

    @classmethod
    def shapes(cls, spec):
        rows, cols = spec["padded"]
        tr = cls.trellis(spec)
        tx, ty = spec["tile"]
        if tx * ty != tr.T or rows % tx or cols % ty:
            raise UserError(f"trellis layer spec: tiles {spec['tile']} do not hold T = {tr.T} weights of a "
                            f"{rows}x{cols} matrix")
        return {"codes": ((rows // tx, cols // ty, tr.T * tr.k // 8), torch.uint8), "scale": ((rows, 1), torch.float32)}

    @classmethod
    def decode(cls, layer, r0, r1):
        """Rows r0:r1: the tile rows that cover them are decoded, then cropped."""
        tr, (tx, ty) = cls.trellis(layer.spec), layer.spec["tile"]
        t0, t1 = r0 // tx, -(-r1 // tx)
        codes = layer.codes[t0:t1]
        n, blocks = codes.shape[:2]
        W = tr.decode(codes.reshape(n * blocks, -1)).reshape(n, blocks, tx, ty).transpose(1, 2).reshape(n * tx, -1)
        return W[r0 - t0 * tx:r1 - t0 * tx] * layer.scale[r0:r1]

    # Code updates (PV-tuning's V step, quant.pv): a code group is a whole tile's stream, re-encoded
    # by a new Viterbi search; rows r0:r1 must cover whole tiles.
    @classmethod
    def _tiles(cls, layer, r0, r1):
        tx = layer.spec["tile"][0]
        if r0 % tx or r1 % tx:
            raise UserError(f"trellis code groups are tiles of {tx} rows; rows {r0}:{r1} cut them")
        return r0 // tx, r1 // tx

    @classmethod
    def codes(cls, layer, r0, r1):
        """The streams of the tiles of rows r0:r1: uint8 (tiles down, tiles across, T k / 8)."""
        t0, t1 = cls._tiles(layer, r0, r1)
        return layer.codes[t0:t1]

    @classmethod
    def tiles(cls, layer, M):
        """(rows, cols) -> (tiles down, tiles across, T): each tile's weights in stream order."""
        (tx, ty), (rows, cols) = layer.spec["tile"], M.shape
        return M.reshape(rows // tx, tx, cols // ty, ty).transpose(1, 2).reshape(rows // tx, cols // ty, tx * ty)

    @classmethod
    def untile(cls, layer, tiles):
        """Inverse of `tiles`: (rows, cols)."""
        (tx, ty), (n, blocks) = layer.spec["tile"], tiles.shape[:2]
        return tiles.reshape(n, blocks, tx, ty).transpose(1, 2).reshape(n * tx, blocks * ty)

    @classmethod
    def encode_tiles(cls, layer, targets, scales):
        """(streams (m, T k / 8), values (m, T)): tiles `targets` (m, T, decode's units) coded anew under the
        per-weight row scales `scales` (m, T), by the tail-biting Viterbi search of quantization."""
        values, packed = cls.trellis(layer.spec).quantize(targets.float() / scales)
        return packed, values * scales

    @classmethod
    def encode(cls, layer, target, r0, r1):
        """(streams, values): every tile of `target` (rows r0:r1 of W_p, decode's units) coded anew under
        the layer's row scales, and the values they decode to."""
        cls._tiles(layer, r0, r1)
        scale = layer.scale.detach()[r0:r1].expand_as(target)
        tiles, scales = cls.tiles(layer, target), cls.tiles(layer, scale)
        packed, values = cls.encode_tiles(layer, tiles.reshape(-1, tiles.shape[-1]), scales.reshape(-1, tiles.shape[-1]))
        return packed.reshape(*tiles.shape[:2], -1), cls.untile(layer, values.reshape(tiles.shape))

    @classmethod
    def set_codes(cls, layer, codes, r0, r1):
        t0, t1 = cls._tiles(layer, r0, r1)
        layer.codes[t0:t1] = codes


_TRELLISES = {}  # one Trellis (its code table) per option set
CODECS = dict({GridCodec.name: GridCodec, TrellisCodec.name: TrellisCodec},
              **{name: VectorCodec(name) for name in CODEBOOKS})


def codec(spec):
    name = spec.get("codebook")
    if name not in CODECS:
        raise UserError(f"unknown codebook {name!r} in a quantized layer; known: {', '.join(CODECS)}")
    return CODECS[name]


class QuantLinear(nn.Module):
    """A linear layer held as packed codes; `spec` (a JSON-able dict) describes the layout:
    codebook, wbits, shape [out, in], padded [rows, cols] of the processed matrix, rotation, seed,
    qfn and groupsize (grid codebooks), and whether in_scale/out_scale are present."""

    def __init__(self, spec, bias=False):
        super().__init__()
        self.spec = dict(spec)
        self.out_features, self.in_features = spec["shape"]
        self.codec = codec(spec)
        for name, (shape, dtype) in self.codec.shapes(spec).items():
            t = torch.zeros(shape, dtype=dtype)
            if name in self.codec.trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        self.in_scale = nn.Parameter(torch.ones(self.in_features)) if spec.get("in_scale") else None
        self.out_scale = nn.Parameter(torch.ones(self.out_features)) if spec.get("out_scale") else None
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.weight_grad_hook = None
        rows, cols = spec["shape"]
        self.proc = Incoherence(rows, cols, None, spec.get("rotation"), spec.get("seed", 0))
        if tuple(self.proc.padded_shape) != tuple(spec["padded"]):
            raise UserError(f"quantized layer spec: padded shape {spec['padded']} does not match rotation "
                            f"{spec.get('rotation')!r} of a {rows}x{cols} weight ({list(self.proc.padded_shape)})")

    @classmethod
    def from_result(cls, result, bias=None):
        """A QuantLinear holding a `quant.QuantResult` (codes of the processed weights) and the
        original layer's bias."""
        spec = dict(result.spec)
        layer = cls(spec, bias=bias is not None)
        with torch.no_grad():
            for name, t in layer.codec.tensors(spec, result).items():
                getattr(layer, name).copy_(t)
            if layer.in_scale is not None:
                layer.in_scale.copy_(1 / result.rescale.float())
            if bias is not None:
                layer.bias.copy_(bias.float())
        return layer

    def add_channel_scales(self):
        """Give the layer trainable in_scale / out_scale (ones where absent), for finetuning."""
        for name, n in (("in_scale", self.in_features), ("out_scale", self.out_features)):
            if getattr(self, name) is None:
                setattr(self, name, nn.Parameter(torch.ones(n, device=self.codes_device())))
                self.spec[name] = True

    def codes_device(self):
        return next(iter(self.buffers())).device

    def code_tensors(self):
        """The frozen buffers: codes (and zero points), what finetuning in quantized space must leave
        bit-identical."""
        return dict(self.named_buffers())

    def processed_weight(self, r0=0, r1=None):
        """Rows r0:r1 of W_p decoded from the codes, float32 (differentiable in the scales). With
        `weight_grad_hook` set, the backward pass hands it (dL/dW_p[r0:r1], r0, r1): the gradient wrt
        the decoded weights that the code updates of `quant.pv` rank groups by."""
        r1 = self.spec["padded"][0] if r1 is None else r1
        w = self.codec.decode(self, r0, r1)
        if self.weight_grad_hook is not None and w.requires_grad:
            w.register_hook(lambda g: self.weight_grad_hook(g, r0, r1))
        return w

    def _chunks(self):
        rows, cols = self.spec["padded"]
        step = max(1, CHUNK // cols)
        return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]

    def rotate_in(self, x):
        """(T, in_features) activations -> V (in_scale * x), zero-padded to the processed width."""
        rows, cols = self.spec["padded"]
        if self.in_scale is not None:
            x = x * self.in_scale.to(x.dtype)
        if cols > self.in_features:
            x = torch.nn.functional.pad(x, (0, cols - self.in_features))
        return x if self.proc.V is None else self.proc.V.apply(x.T).T

    def rotate_out(self, t):
        """(T, rows) products with W_p -> out_scale * (U^T t) + bias, cropped to out_features."""
        y = t if self.proc.U is None else self.proc.U.apply_t(t.T).T
        y = y[:, :self.out_features]
        if self.out_scale is not None:
            y = y * self.out_scale.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def forward(self, x):
        y = kernels.forward(self, x)  # CPU decode token counts (C++); None: the torch path below
        if y is not None:
            return y
        shape = x.shape
        z = self.rotate_in(x.reshape(-1, self.in_features))
        t = torch.cat([z @ self.processed_weight(r0, r1).to(z.dtype).T for r0, r1 in self._chunks()], 1)
        return self.rotate_out(t).reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def dequantize(self):
        """The dense (out, in) float32 weight this layer applies (for checks and export)."""
        W = self.proc.unweight(self.processed_weight().double()).float()
        if self.in_scale is not None:
            W = W * self.in_scale.float()
        if self.out_scale is not None:
            W = W * self.out_scale.float()[:, None]
        return W

    def extra_repr(self):
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, codebook={s['codebook']}, wbits={s['wbits']}, "
                f"rotation={s.get('rotation')}, bias={self.bias is not None}")
