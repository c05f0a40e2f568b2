"""A C++ CPU kernel for `quant.QuantLinear` at decode token counts (1 to MAX_TOKENS tokens).

`forward(layer, x)` computes layer(x) in one call of `packed.cpp`: the activations' randomized Hadamard
transforms as FWHTs (O(n log n)), and a matmul that decodes the packed codes in registers inside the dot
products (scalar grids of 2-4 bits with their scales and zero points; E8P from its 256-entry table, sign
bits and shift, and the residual stages of e8p_rvq3/e8p_rvq4), threaded over output rows
(`at::parallel_for`, torch's thread count). Other rotations (kron, butterfly) run in torch around the
kernel's matmul. It returns None where it does not apply (other devices or dtypes, more tokens, gradients
needed, a codec it does not know) and QuantLinear's torch path runs: more tokens amortize decoding a
block of weights into one matmul.

The extension is built on first use with torch.utils.cpp_extension (ninja, a C++ compiler; about a
minute) into torch's extension cache (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions),
once per CPU capability (-mavx2 -mfma where torch reports AVX2 or AVX512), and reused afterwards.
RLO_NO_KERNEL=1 disables it; a failed build warns once and leaves the torch path.
"""
import os
import warnings

import torch

MAX_TOKENS = 16
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed.cpp")
_built = {}


def disabled():
    return os.environ.get("RLO_NO_KERNEL", "") not in ("", "0")


def extension():
    """The built extension module; None if disabled or if the build failed (warned once)."""
    if disabled():
        return None
    if "ext" not in _built:
        _built["ext"] = _build()
    return _built["ext"]


def _build():
    from torch.utils.cpp_extension import load

    from ..e8p import _ABS_ODD, E8_1BIT, E8P_ABS
    capability = torch.backends.cpu.get_cpu_capability()
    simd = ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []
    try:
        ext = load(name=f"rlo_packed_{capability.lower()}", sources=[SOURCE],
                   extra_cflags=["-O3", "-ffp-contract=fast", *simd])
    except Exception as e:  # no compiler or ninja, a read-only cache, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        warnings.warn(f"quant.kernels: the C++ kernel for packed layers could not be built ({reason}); "
                      "packed layers run the slower torch path (RLO_NO_KERNEL=1 skips the build)", stacklevel=3)
        return None
    ext.set_tables(E8P_ABS.float(), _ABS_ODD, E8_1BIT.float())
    return ext


def _codec_args(layer):
    """The codec part of the kernel's arguments, or None for a codec the kernel does not decode."""
    from ..e8p import CODEBOOKS
    spec = layer.spec
    if spec["codebook"] == "grid":
        return 0, [layer.codes], layer.scale, layer.zero, spec["wbits"], spec["groupsize"], [], []
    if spec["codebook"] in CODEBOOKS:
        cb = layer.codec.codebook
        codes = [getattr(layer, f"codes{i}") for i in range(len(cb.code_bits))]
        return 1, codes, layer.scale, None, spec["wbits"], -1, list(cb.code_bits), [float(m) for m in cb.stage_scales]
    return None


def forward(layer, x):
    """layer(x) for x (T, in_features) from the kernel, or None where it does not apply."""
    tokens = x.shape[0]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < tokens <= MAX_TOKENS
            or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())))):
        return None
    codec = _codec_args(layer)
    ext = extension() if codec is not None else None
    if ext is None:
        return None
    rows, cols = layer.spec["padded"]
    proc = layer.proc
    if proc.rotation in (None, "hadamard"):
        v = proc.V._factors(x) if proc.V is not None else (None, None)
        u = proc.U._factors(x) if proc.U is not None else (None, None)
        return ext.forward(x, layer.in_scale, layer.out_scale, layer.bias, rows, cols, layer.out_features,
                           *v, *u, *codec)
    t = ext.forward(layer.rotate_in(x), None, None, None, rows, cols, rows, None, None, None, None, *codec)
    return layer.rotate_out(t)
