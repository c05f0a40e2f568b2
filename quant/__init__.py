"""QuIP-style post-training weight quantization of one linear layer (Chee et al. 2023, "QuIP: 2-Bit
Quantization of Large Language Models With Guarantees"), usable without `opt.py`.

    W_hat = quant.quantize(W, H, wbits=2, method="ldlqRG", incoherence=True, seed=0)

W (rows, cols) is a weight matrix, H (cols, cols) the second moment E[x x^T] of its inputs
(`quant.hessian.HessianAccumulator`). The steps, each also usable on its own:
1. incoherence pre-processing (`incoherence.Incoherence`): diagonal rescaling and seeded random
   orthogonal multiplication of both sides of W, matching multiplication of H;
2. damping of H (`hessian.damp`, `percdamp` x mean(diag(H)), escalated with a warning if needed);
3. a method from the table in `methods.py`, which names its codebook (`codebooks`: the codebook rounds
   the processed weights and says how its codes are stored): a grid (`grid.make_grid`, QuIP's qfn 'a'
   or 'b') and a rounding algorithm (`ldlq`): nearest, gptq, ldlq, ldlqRG (LDLQ on columns sorted by
   diag(H), then greedy coordinate passes), allbal (greedy passes only); or QuIP#'s lattice codebooks
   (`e8p`: E8P at 2 bits, residual E8P at 3 and 4) with block LDLQ after the randomized Hadamard
   transform; or QTIP's tail-biting bitshift trellis (`qtip`, `trellis.py`) with block LDLQ after the
   same transform;
4. post-processing back to the original basis. The proxy loss tr((W_hat - W) H (W_hat - W)^T) is
   computed in the original basis with the undamped H.
With YAQA's output-side Hessian H_out (rows, rows) as well (`quantize_layer(..., H_out=)`), the LDLQ
methods round against the Kronecker-factored proxy tr((W_hat - W)^T H_out (W_hat - W) H) instead
(`ldlq.two_sided_ldlq`), H_out processed on the rows as H on the columns.

`quantize_layer` returns everything needed to store the weights compactly (integer codes, grid,
rescaling vector, rotation kind and seed, and their layout as `spec`); `QuantLinear.from_result`
turns it into a layer that runs from the packed codes (`quant.linear`).
"""
from dataclasses import dataclass

import torch

from engine import UserError

from . import codebooks
from .grid import QFNS, WBITS, Grid, make_grid
from .hessian import HessianAccumulator, check_hessian, damp, proxy_loss, with_damping
from .incoherence import ROTATIONS, Incoherence, rescale_vector
from .ldlq import allbal, block_ldlq, gptq, greedy_passes, ldlq, ldlqRG, nearest, two_sided_ldlq, two_sided_ldlq_grid
from .linear import QuantLinear
from .methods import METHODS, TABLE

UNSUPPORTED = {"ldlbal_admm": "QuIP's experimental ADMM variant is not implemented here; use ldlqRG"}

__all__ = ["quantize", "quantize_layer", "QuantLinear", "QuantResult", "default_npasses", "check_options", "METHODS",
           "TABLE", "codebooks", "WBITS", "QFNS", "ROTATIONS", "HessianAccumulator", "proxy_loss", "damp", "with_damping", "make_grid",
           "Grid", "Incoherence", "nearest", "gptq", "ldlq", "ldlqRG", "allbal", "greedy_passes", "block_ldlq",
           "two_sided_ldlq", "two_sided_ldlq_grid"]


@dataclass
class QuantResult:
    w_hat: torch.Tensor  # dequantized weights, original basis, W's dtype
    # codes of the processed weights: grid methods uint8 (rows, cols); e8p int64 (rows, cols // 8, stages);
    # qtip uint8 trellis streams (rows // tile rows, cols // 16, T k / 8); None at 16 bits
    codes: torch.Tensor
    scale: torch.Tensor  # grid: value = scale * (code - zero), (1, 1), (rows, 1) or (rows, groups); e8p, qtip: (rows, 1)
    zero: torch.Tensor  # grid only
    groupsize: int
    wbits: int
    rescale: torch.Tensor  # (cols,) or None
    rotation: str  # kind or None
    seed: int
    proxy: float  # tr((W_hat - W) H (W_hat - W)^T), original basis, undamped H
    npasses: int  # greedy passes run
    damping: float  # relative damping of H used (after any escalation)
    spec: dict = None  # the `quant.linear.QuantLinear` layout of the codes (None at 16 bits)
    # with H_out: YAQA's two-sided proxy tr((W_hat - W)^T H_out (W_hat - W) H), original basis, undamped H's
    proxy_two_sided: float = None


def default_npasses(method, npasses=None):
    """Greedy passes: the given number, else the method's default (1 for ldlqRG and allbal: QuIP's
    default 0 would run none for ldlqRG, silently)."""
    if npasses is not None:
        return npasses
    return TABLE[method].default_npasses if method in TABLE else 0


def check_options(method, wbits, qfn, npasses, unbiased, groupsize, rotation, two_sided=False):
    """UserError for an unknown or unsupported option, or a combination `quantize_layer` refuses
    (two_sided: rounding against an output-side Hessian too, YAQA's)."""
    if method in UNSUPPORTED:
        raise UserError(f"method {method!r}: {UNSUPPORTED[method]}")
    if method not in TABLE:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    m = TABLE[method]
    if wbits not in WBITS:
        raise UserError(f"wbits must be one of {', '.join(map(str, WBITS))}, got {wbits}")
    if wbits != 16 and wbits not in m.wbits:
        raise UserError(f"{method} supports wbits {', '.join(map(str, m.wbits))}, got {wbits}")
    if qfn not in QFNS:
        raise UserError(f"unknown qfn {qfn!r}; choose one of {', '.join(QFNS)}")
    if rotation is not None and rotation not in ROTATIONS:
        raise UserError(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATIONS)}")
    if m.rotation is not None and rotation != m.rotation:
        raise UserError(f"{method} works after the {m.rotation!r} rotation (QuIP#'s randomized Hadamard "
                        f"transform), got rotation {rotation!r}")
    if npasses < 0:
        raise UserError(f"npasses must be >= 0, got {npasses}")
    if npasses > 0 and not m.greedy:
        greedy = ", ".join(n for n, t in TABLE.items() if t.greedy)
        raise UserError(f"greedy passes (npasses={npasses}) apply to {greedy}, not {method}")
    if npasses < m.min_npasses:
        raise UserError(f"{method} rounds only through its greedy passes; give npasses >= {m.min_npasses}")
    if unbiased and not m.stochastic:
        raise UserError(f"unbiased (stochastic) rounding is not available for {method}")
    if unbiased and npasses > 0:
        raise UserError("unbiased (stochastic) rounding cannot be combined with greedy passes; set npasses 0")
    if not codebooks.get(m.codebook).scalar_options and groupsize != -1:
        raise UserError(f"{method} has one scale per row; groupsize applies to the grid methods")
    if groupsize != -1 and (groupsize <= 0 or qfn != "a"):
        raise UserError(f"groupsize {groupsize}: use -1 or a positive size, with qfn a")
    if two_sided and not m.two_sided:
        usable = ", ".join(n for n, t in TABLE.items() if t.two_sided)
        raise UserError(f"{method} has no two-sided rounding for YAQA's output-side Hessian; use {usable}")
    if two_sided and npasses > 0:
        raise UserError("greedy passes lower the one-sided proxy only; with YAQA's output-side Hessian set npasses 0")


@torch.no_grad()
def quantize_layer(W, H, wbits, method, incoherence=True, seed=0, *, qfn=None, rescale=None, rotation=None,
                   percdamp=0.01, damp_h=True, npasses=None, groupsize=-1, unbiased=False, lazy_batch=True,
                   blocksize=128, H_out=None):
    """Quantize W (rows, cols) given its input Hessian H (cols, cols); returns a `QuantResult`.

    incoherence=True is QuIP's `--incoh_processing`: rescale=True, rotation='kron' ('hadamard' for
    e8p, which needs it), qfn='b' (each can be overridden); False: no rescaling, no rotation, qfn 'a'.
    damp_h (QuIP's `--pre_gptqH`) zeroes dead columns and adds percdamp x mean(diag(H)) to the
    diagonal. With a rotation, H is first normalized to mean diagonal 1 and 0.01 I is added, as QuIP
    does. lazy_batch: LDLQ updates in blocks of `blocksize` columns (otherwise after every column; same
    result). Computation is float32 (float64 inputs stay float64) on W's device.

    H_out (rows, rows), YAQA's output-side Hessian (`quant.model.output_hessians`): round against
    tr(E^T H_out E H) instead (methods with `two_sided`). It is rotated with the rows as H with the
    columns, normalized and damped as H (relative to its mean diagonal, escalated with H), and the result
    records that two-sided proxy too.
    """
    m = TABLE.get(method)
    npasses = default_npasses(method, npasses)
    qfn = qfn if qfn is not None else ("b" if incoherence else "a")
    rescale = rescale if rescale is not None else incoherence
    if rotation is None and m is not None and m.rotation is not None:
        rotation = m.rotation
    rotation = rotation if rotation is not None or not incoherence else "kron"
    check_options(method, wbits, qfn, npasses, unbiased, groupsize, rotation, two_sided=H_out is not None)
    rows, cols = W.shape
    check_hessian(H, cols)
    if H_out is not None:
        check_hessian(H_out, rows, "H_out", "rows")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W0 = W.to(dtype)
    H0 = H.to(W.device, dtype)
    Ho0 = None if H_out is None else H_out.to(W.device, dtype)
    if wbits == 16:
        return QuantResult(W.clone(), None, None, None, groupsize, 16, None, None, seed, 0.0, 0, 0.0)

    s = rescale_vector(W0, H0) if rescale else None
    proc = Incoherence(rows, cols, s, rotation, seed)
    Wp, Hp = proc.weight(W0), proc.hessian(H0)
    Hop = None if Ho0 is None else proc.output_hessian(Ho0)
    if rotation is not None:
        Hp = _normalized(Hp)
        Hop = None if Hop is None else _normalized(Hop)
    if damp_h:
        dead = Hp.diagonal() == 0
        if bool(dead.any()):
            Hp = Hp.clone()
            Hp[dead, dead] = 1
            Wp = Wp.clone()
            Wp[:, dead] = 0
    spec = dict(shape=[rows, cols], padded=list(Wp.shape), wbits=wbits, rotation=rotation, seed=seed,
                in_scale=s is not None)
    what = f"H{'' if Hop is None else ' or H_out'} ({rows}x{cols} weight)"
    codebook = codebooks.get(m.codebook).for_bits(wbits)

    def options(d):
        return codebooks.Options(m, qfn, groupsize, npasses, unbiased, lazy_batch, seed, blocksize,
                                 None if Hop is None else damp(Hop, d))

    if not m.uses_hessian:  # hence no damping
        q, damping = codebook.quantize(Wp, Hp, wbits, options(0.0)), 0.0
    else:
        found = []

        def attempt(d):
            found[:] = [codebook.quantize(Wp, damp(Hp, d), wbits, options(d))]
            return found[0].w

        _, damping = with_damping(percdamp if damp_h else 0.0, attempt, what=what)
        q, = found
    spec.update(q.spec)
    W_hat = proc.unweight(q.w)
    return QuantResult(W_hat.to(W.dtype), q.codes, q.scale, q.zero, groupsize, wbits, s, rotation, seed,
                       proxy_loss(W0, W_hat, H0), q.passes, damping, spec,
                       None if Ho0 is None else proxy_loss(W0, W_hat, H0, Ho0))


def _normalized(H):
    """H scaled to mean diagonal 1, plus 0.01 I: what QuIP does after a rotation."""
    n = H.shape[0]
    return H * (n / H.trace().clamp(min=1e-30)) + 0.01 * torch.eye(n, dtype=H.dtype, device=H.device)


def quantize(W, H, wbits, method, incoherence=True, seed=0, **options):
    """Dequantized quantized weights (same shape and dtype as W); options as in `quantize_layer`."""
    return quantize_layer(W, H, wbits, method, incoherence, seed, **options).w_hat
