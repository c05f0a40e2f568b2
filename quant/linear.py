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

The `codebook` field of a layer's spec names the `quant.codebooks` codebook that says which tensors the
layer holds, how codes are packed and decoded, and how code updates (`quant.pv`) re-encode them.
"""
import torch
from torch import nn

from engine import UserError

from . import codebooks, kernels
from .codebooks.grid import pack_rows, unpack_rows  # noqa: F401  (grid bit packing, imported from here)
from .incoherence import Incoherence

CHUNK = 1 << 22  # decoded weights per block of rows (16 MB in fp32)


class QuantLinear(nn.Module):
    """A linear layer held as packed codes; `spec` (a JSON-able dict) describes the layout:
    codebook, wbits, shape [out, in], padded [rows, cols] of the processed matrix, rotation, seed,
    qfn and groupsize (grid codebooks), and whether in_scale/out_scale are present."""

    def __init__(self, spec, bias=False):
        super().__init__()
        self.spec = dict(spec)
        self.out_features, self.in_features = spec["shape"]
        self.codebook = codebooks.get(spec.get("codebook"))
        for name, (shape, dtype) in self.codebook.shapes(spec).items():
            t = torch.zeros(shape, dtype=dtype)
            if name in self.codebook.trainable:
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
            for name, t in layer.codebook.pack(spec, result).items():
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
        w = self.codebook.decode(self, r0, r1)
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
        x = x.reshape(-1, self.in_features)
        if x.shape[0] >= min(self.spec["padded"]):
            # at least as many tokens as the weight's shorter side: rotating the weight once costs less than
            # rotating every token (training and calibration batches)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.dense_weight().to(x.dtype), bias).reshape(*shape[:-1], -1)
        z = self.rotate_in(x)
        t = torch.cat([z @ self.processed_weight(r0, r1).to(z.dtype).T for r0, r1 in self._chunks()], 1)
        return self.rotate_out(t).reshape(*shape[:-1], self.out_features)

    def dense_weight(self, dtype=torch.float32):
        """The dense (out, in) weight this layer applies, out_scale * (U^T W_p V) * in_scale, computed in
        `dtype` and differentiable in the scales."""
        W = self.proc.unweight(self.processed_weight().to(dtype))
        if self.in_scale is not None:
            W = W * self.in_scale.to(dtype)
        if self.out_scale is not None:
            W = W * self.out_scale.to(dtype)[:, None]
        return W

    @torch.no_grad()
    def dequantize(self):
        """The dense (out, in) float32 weight this layer applies (for checks and export)."""
        return self.dense_weight(torch.float64).float()

    def extra_repr(self):
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, codebook={s['codebook']}, wbits={s['wbits']}, "
                f"rotation={s.get('rotation')}, bias={self.bias is not None}")
