"""A C++ CPU kernel for `quant.QuantLinear` at decode token counts (1 to MAX_TOKENS tokens).

`forward(layer, x)` computes layer(x) in one call of `packed.cpp`: the activations' rotations (the
randomized Hadamard transform as an FWHT, O(n log n); kron/butterfly from their small factors), and a
matmul that decodes the packed codes in registers inside the dot products (scalar grids of 2-4 and 8 bits
with their scales and zero points; E8P from its 256-entry table, sign bits and shift, and the residual
stages of e8p_rvq3/e8p_rvq4; trellis tiles, 1MAD computed from the state, 3INST and HYB read from the
code's table), threaded over output rows (`at::parallel_for`, torch's thread count). `decode.h`, compiled
with it, is `lm.decode`'s whole-model decode loop over these plans (`plan(layer)`). One call per layer
matters as much as the matmul on small models, where per-op overhead dominates. It returns None where it
does not apply (another device or dtype, more tokens, gradients needed, a codebook without a
`kernel_layout`) and QuantLinear's torch path runs: more tokens amortize decoding a block of weights
into a matmul.

The extension is built on first use with torch.utils.cpp_extension (ninja, a C++ compiler; about half a
minute of one core) into torch's extension cache (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions),
once per CPU capability (-mavx2 -mfma -mf16c where torch reports AVX2 or AVX512), and reused afterwards.
RLO_NO_KERNEL=1 (read at import) disables it; a failed build warns once and leaves the torch path.
`extension("trellis")` is the second extension, `trellis.cpp`: the Viterbi search of quant.trellis
(called from `Trellis.viterbi`) as the operator torch.ops.rlo_trellis.viterbi, built and disabled the same way.
"""
import os
import threading
import warnings
import weakref

import torch

from ..incoherence import Butterfly, RandomHadamard

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_TOKENS = 16
# extension name -> (sources, its torch.ops namespace (None: a Python module), what runs instead where it
# cannot be built)
SOURCES = {"packed": (("packed.cpp",), None, "packed layers and generation run the slower torch path"),
           "trellis": (("trellis.cpp",), "rlo_trellis", "the trellis Viterbi search runs the slower torch path")}
ENABLED = os.environ.get("RLO_NO_KERNEL", "") in ("", "0")  # read once at import; tests toggle this flag
_built = {}
_locks = {name: threading.Lock() for name in SOURCES}  # one build per extension when threads race
_plans = weakref.WeakKeyDictionary()  # layer -> its extension Plan, or None where the kernel cannot run it


def extension(name="packed"):
    """The built extension `name` (SOURCES): its Python module, or its torch.ops namespace; None if its build
    failed (warned once)."""
    with _locks[name]:
        if name not in _built:
            ext = _build(name)
            if ext is not None and name == "packed":
                from ..e8p import _ABS_ODD, E8_1BIT, E8P_ABS
                ext.set_tables(E8P_ABS.float(), _ABS_ODD, E8_1BIT.float())
            _built[name] = ext
        return _built[name]


def _build(name):
    from torch.utils.cpp_extension import load

    sources, ops, fallback = SOURCES[name]
    capability = torch.backends.cpu.get_cpu_capability()
    simd = ["-mavx2", "-mfma", "-mf16c"] if capability in ("AVX2", "AVX512") else []
    if capability == "AVX512":  # 16-float vectors (trellis states and codes, dense matvecs); torch's AVX512 has BW
        simd += ["-mavx512f", "-mavx512bw"]
    source = " and ".join(sources)
    try:
        # -fopenmp: at::parallel_for is inline OpenMP code; compiled without it, it runs on one thread
        ext = load(name=f"rlo_{name}_{capability.lower()}", sources=[os.path.join(HERE, s) for s in sources],
                   extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp", *simd], extra_ldflags=["-fopenmp"],
                   is_python_module=ops is None)
    except Exception as e:  # no compiler or ninja, a read-only cache, ...
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1]).strip()
        warnings.warn(f"quant.kernels: the C++ kernel {source} could not be built ({reason}); {fallback} "
                      "(RLO_NO_KERNEL=1 skips the build)", stacklevel=4)
        return None
    return ext if ops is None else getattr(torch.ops, ops)


def _rotation(rot):
    """(kind, factors) of an `incoherence` rotation for the extension: 0 none, 1 hadamard, 2 butterfly/kron."""
    empty = torch.empty(0)
    if rot is None:
        return 0, []
    if isinstance(rot, RandomHadamard):
        signs, Hm = rot.factors
        return 1, [signs, empty if Hm is None else Hm]
    if isinstance(rot, Butterfly):
        A, B = rot.factors
        return 2, [A, B, empty if rot.p_in is None else rot.p_in, empty if rot.p_out is None else rot.p_out]
    return None


def _plan(layer):
    """The extension's Plan of a layer, or None (a codebook or rotation it does not know, or no extension)."""
    layout = layer.codebook.kernel_layout(layer)
    if layout is None:
        return None
    v, u = _rotation(layer.proc.V), _rotation(layer.proc.U)
    ext = extension() if v is not None and u is not None else None
    if ext is None:
        return None
    rows, cols = layer.spec["padded"]
    *layout, values = layout
    values = torch.empty(0) if values is None else values
    return ext.Plan(rows, cols, layer.in_features, layer.out_features, *layout, values, *v, *u)


def plan(layer):
    """The layer's Plan (built once per layer), or None where the kernel cannot run it or is disabled."""
    if not ENABLED:
        return None
    p = _plans.get(layer, False)
    if p is False:
        p = _plans[layer] = _plan(layer)
    return p


def forward(layer, x):
    """layer(x) for x (..., in_features) from the kernel, or None where it does not apply."""
    if (not ENABLED or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0
            or x.shape[-1] != layer.in_features or not 0 < x.numel() <= MAX_TOKENS * layer.in_features
            or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())))):
        return None
    p = plan(layer)
    return None if p is None else p(x, layer._parameters, layer._buffers)
