"""The method table: the one place a quantization method is declared. `opt.py --quant` (choices and
help), option checking, `quantize_layer`'s dispatch and the codebook recorded in a packed checkpoint
all read it; adding a method is one entry here plus its rounding function.

Scalar methods round every weight to a grid (`grid.py`) with a rounding algorithm (`ldlq.py`); the
vector method `e8p` rounds 8 weights at a time to QuIP#'s lattice codebooks (`e8p.py`) with block
LDLQ, after the randomized Hadamard transform (`incoherence.py`, rotation 'hadamard'); the trellis
method `qtip` codes tiles of 16 x 16 weights as tail-biting bitshift-trellis streams (`trellis.py`), with
block LDLQ over blocks of 16 columns after the same transform.
"""
from dataclasses import dataclass
from typing import Callable

from engine import UserError

from .ldlq import allbal, block_ldlq, gptq, greedy_passes, ldlq, ldlqRG, nearest


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    codebook: str  # 'grid'; 'vector': the bit width picks the lattice codebook (VECTOR_CODEBOOKS); 'trellis'
    trellis: dict = None  # 'trellis': quant.trellis.Trellis options besides k (the bit width)
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
    Method("qtip", "QTIP: tail-biting bitshift trellis (L=16, HYB code, 2 weights per step) on 16x16 tiles, "
                   "Viterbi search, block LDLQ over 16 columns, randomized Hadamard incoherence", "trellis",
           trellis=dict(L=16, V=2, T=256, code="hyb"), rotation="hadamard", stochastic=False),
    Method("qtip1mad", "qtip with QTIP's computed 1MAD code (1 weight per step): lower MSE than HYB, "
                       "about 2.5x its Viterbi time", "trellis",
           trellis=dict(L=16, V=1, T=256, code="1mad"), rotation="hadamard", stochastic=False),
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


TILE_COLS = 16  # trellis tiles: TILE_COLS columns (one block LDLQ block) x T / TILE_COLS rows


def trellis_tile(trellis, shape):
    """(tile rows, tile cols) of a `quant.trellis.Trellis` on a processed (rows, cols) matrix; UserError
    when the matrix does not split into whole tiles."""
    rows, cols = shape
    tx = trellis.T // TILE_COLS
    if trellis.T % TILE_COLS or rows % tx or cols % TILE_COLS:
        raise UserError(f"trellis sequences of T = {trellis.T} weights are tiles of {TILE_COLS} columns x T / "
                        f"{TILE_COLS} rows; the processed {rows}x{cols} matrix does not split into them")
    return tx, TILE_COLS


def trellis_quantize(W, H, trellis, blocksize=128):
    """QTIP's quantizer: block LDLQ of W (rows, cols) over blocks of 16 columns, each block's
    (rows, 16) target cut into tiles of T / 16 rows, every tile (row-major) one tail-biting trellis
    sequence, Viterbi-searched for all tiles of the block at once; one scale per row (as `vector_quantize`).
    Returns (W_hat, streams uint8 (rows / tile rows, cols / 16, T k / 8), scale (rows, 1))."""
    tx, ty = trellis_tile(trellis, W.shape)
    s = trellis.scale_for(W, dim=1)

    def quantize_block(X):
        n = X.shape[0] // tx
        tiles = (X / s).reshape(n, tx * ty)  # row-major tile of tx rows of ty consecutive columns
        X_hat, packed = trellis.quantize(tiles)
        return X_hat.reshape(X.shape) * s, packed

    W_hat, codes = block_ldlq(W, H, quantize_block, ty, -(-blocksize // ty) * ty)
    return W_hat, codes, s
