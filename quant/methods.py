"""The method table: the one place a quantization method is declared. `opt.py --quant` (choices and
help), option checking, `quantize_layer`'s dispatch and the codebook recorded in a packed checkpoint
all read it; adding a method is one entry here plus its rounding function.

Scalar methods round every weight to a grid (`grid.py`) with a rounding algorithm (`ldlq.py`); the
vector method `e8p` rounds 8 weights at a time to QuIP#'s lattice codebooks (`e8p.py`) with block
LDLQ, after the randomized Hadamard transform (`incoherence.py`, rotation 'hadamard').
"""
from dataclasses import dataclass
from typing import Callable

from .ldlq import allbal, block_ldlq, gptq, greedy_passes, ldlq, ldlqRG, nearest


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    codebook: str  # 'grid', or 'vector': the bit width picks the lattice codebook (VECTOR_CODEBOOKS)
    wbits: tuple = (2, 3, 4)
    greedy: bool = False  # takes QuIP's greedy passes (npasses)
    default_npasses: int = 0
    rotation: str = None  # the rotation the method needs (None: any, set by the incoherence options)
    stochastic: bool = True  # supports unbiased (stochastic) rounding
    # scalar methods: (W, H, grid, npasses, blocksize, lazy_batch, generator) -> (W_hat, greedy passes run)
    rounding: Callable = None
    uses_hessian: bool = True  # False: rounds without H, so H is not damped
    min_npasses: int = 0  # rounds only through its greedy passes when > 0


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
    Method("gptq", "GPTQ/OPTQ (Cholesky of H^-1), same result as ldlq", "grid", rounding=_run_ldlq_like(gptq)),
    Method("ldlq", "QuIP's LDLQ: linear feedback of the rounding errors", "grid", greedy=True,
           rounding=_run_ldlq_like(ldlq)),
    Method("ldlqRG", "LDLQ on columns by decreasing diag(H), then greedy passes (QuIP)", "grid", greedy=True,
           default_npasses=1, rounding=_run_ldlqRG),
    Method("allbal", "greedy coordinate passes only (QuIP)", "grid", greedy=True, default_npasses=1,
           rounding=_run_allbal, min_npasses=1),
    Method("e8p", "QuIP#: E8P lattice codebook, 8 weights per code (2 bits; 3/4 bits as residual VQ), "
                  "block LDLQ, randomized Hadamard incoherence", "vector", rotation="hadamard", stochastic=False),
]}
METHODS = tuple(TABLE)
VECTOR_CODEBOOKS = {2: "e8p", 3: "e8p_rvq3", 4: "e8p_rvq4"}  # bits per weight -> quant.e8p codebook


def vector_quantize(W, H, codebook, blocksize=128):
    """Block LDLQ of W (rows, cols; cols a multiple of 8) with a `quant.e8p` codebook, one scale per row:
    (W_hat, codes (rows, cols // 8, stages) int64, scale (rows, 1)).

    QuIP# uses one scale per matrix. After the RHT of the narrow matrices of small models the rows
    still differ in norm (a 64-wide random rotation equalizes them only up to ~20%), and on stories260K
    per-row scales took 2/3/4-bit perplexity from 53/11.6/5.2 to 30/6.6/4.1 (fp 3.64), for 4 bytes a row."""
    s = codebook.scale_for(W, dim=1)
    W_hat, codes = block_ldlq(W, H, codebook.quantizer(s), 8, blocksize)
    return W_hat, codes, s
