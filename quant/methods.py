"""The method table: the one place a quantization method is declared. `opt.py --quant` (choices and
help), option checking, `quantize_layer`'s dispatch and the codebook recorded in a packed checkpoint
all read it; adding a method is one entry here (plus its rounding function, or a codebook in
`quant.codebooks`).

Scalar methods round every weight to a grid (codebook `grid`) with a rounding algorithm (`ldlq.py`); the
vector method `e8p` rounds 8 weights at a time to QuIP#'s lattice codebooks (codebook `e8p`) with block
LDLQ, after the randomized Hadamard transform (`incoherence.py`, rotation 'hadamard'); the trellis
methods `qtip`, `qtip1mad` code tiles of 16 x 16 weights as tail-biting bitshift-trellis streams
(codebook `trellis`), with block LDLQ over blocks of 16 columns after the same transform.
"""
from dataclasses import dataclass
from typing import Callable

from .ldlq import allbal, gptq, greedy_passes, ldlq, ldlqRG, nearest


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    codebook: str  # its codebook family, a name of quant.codebooks.CODEBOOKS (the bit width picks the member)
    codebook_options: dict = None  # what the family reads besides the bit width (trellis: Trellis options but k)
    wbits: tuple = (2, 3, 4)
    greedy: bool = False  # takes QuIP's greedy passes (npasses)
    default_npasses: int = 0
    rotation: str = None  # the rotation the method needs (None: any, set by the incoherence options)
    stochastic: bool = True  # supports unbiased (stochastic) rounding
    # scalar methods: (W, H, grid, npasses, blocksize, lazy_batch, generator) -> (W_hat, greedy passes run)
    rounding: Callable = None
    uses_hessian: bool = True  # False: rounds without H, so H is not damped
    min_npasses: int = 0  # rounds only through its greedy passes when > 0
    two_sided: bool = False  # its rounding is (block) LDLQ, which YAQA's two-sided form replaces given H_out


def _run_nearest(W, H, grid, npasses, blocksize, lazy_batch, generator):
    return nearest(W, grid, generator), 0


def _run_ldlq_like(algorithm):
    def run(W, H, grid, npasses, blocksize, lazy_batch, generator):
        Wr = algorithm(W, H, grid, blocksize if lazy_batch else 1, generator)
        return greedy_passes(W, H, Wr, grid, npasses, blocksize) if npasses else (Wr, 0)
    return run


def _run_ldlqRG(W, H, grid, npasses, blocksize, lazy_batch, generator):
    return ldlqRG(W, H, grid, npasses, blocksize, lazy_batch, generator)


def _run_allbal(W, H, grid, npasses, blocksize, lazy_batch, generator):
    return allbal(W, H, grid, npasses, blocksize)


TABLE = {m.name: m for m in [
    Method("nearest", "round to nearest grid value", "grid", rounding=_run_nearest, uses_hessian=False),
    Method("gptq", "GPTQ/OPTQ (Cholesky of H^-1), same result as ldlq", "grid", rounding=_run_ldlq_like(gptq),
           two_sided=True),
    Method("ldlq", "QuIP's LDLQ: linear feedback of the rounding errors", "grid", greedy=True,
           rounding=_run_ldlq_like(ldlq), two_sided=True),
    Method("ldlqRG", "LDLQ on columns by decreasing diag(H), then greedy passes (QuIP)", "grid", greedy=True,
           default_npasses=1, rounding=_run_ldlqRG),
    Method("allbal", "greedy coordinate passes only (QuIP)", "grid", greedy=True, default_npasses=1,
           rounding=_run_allbal, min_npasses=1),
    Method("e8p", "QuIP#: E8P lattice codebook, 8 weights per code (2 bits; 3/4 bits as residual VQ), "
                  "block LDLQ, randomized Hadamard incoherence", "e8p", rotation="hadamard", stochastic=False,
           two_sided=True),
    Method("qtip", "QTIP: tail-biting bitshift trellis (L=16, HYB code, 2 weights per step) on 16x16 tiles, "
                   "Viterbi search, block LDLQ over 16 columns, randomized Hadamard incoherence", "trellis",
           codebook_options=dict(L=16, V=2, T=256, code="hyb"), rotation="hadamard", stochastic=False,
           two_sided=True),
    Method("qtip1mad", "qtip with QTIP's computed 1MAD code (1 weight per step): lower MSE than HYB, "
                       "about 2.5x its Viterbi time", "trellis",
           codebook_options=dict(L=16, V=1, T=256, code="1mad"), rotation="hadamard", stochastic=False,
           two_sided=True),
]}
METHODS = tuple(TABLE)
