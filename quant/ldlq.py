"""Rounding algorithms: nearest, GPTQ (OPTQ), LDLQ and QuIP's greedy coordinate passes.

All take a weight matrix W (rows, cols), a positive definite (damped) H (cols, cols) and a `Grid`,
and return W_hat with every entry on the grid. Columns are processed in index order 0..cols-1 (QuIP's
code walks them from the last to the first; permute W and H to choose an order).

LDLQ (QuIP, Chee et al. 2023): with the decomposition H = (U + I) D (U + I)^T, U strictly upper
triangular, column k is rounded as W_hat_k = Q(W_k + (W_:k - W_hat_:k) U_:k,k): linear feedback of the
rounding errors of the columns before it. It is the same algorithm as GPTQ (QuIP's Theorem 6), which
`gptq` implements the GPTQ way (Cholesky of H^-1, updating the remaining weights), so the two give the
same W_hat; a test checks it.

Block LDLQ (QuIP#, Tseng et al. 2024) is the same with blocks of columns quantized jointly by a vector
codebook (`block_ldlq`); H = (U + I) D (U + I)^T with U block strictly upper and D block diagonal.

Two-sided LDLQ (YAQA, Tseng, Sun, De Sa 2025; `two_sided_ldlq`) rounds against tr(E^T H_out E H), an
output-side Hessian H_out (rows, rows) beside H: the rounding errors are fed back along the rows too.
"""
import itertools
import math

import torch

from engine import UserError


def _noise(W, generator):
    return None if generator is None else torch.rand(W.shape, generator=generator).to(W.device, W.dtype)


def nearest(W, grid, generator=None):
    """Round every entry to the nearest grid value (stochastically when a generator is given)."""
    return grid.round(W, _noise(W, generator))


def ldl_upper(H):
    """U strictly upper triangular with H = (U + I) D (U + I)^T: a lower Cholesky factor of H with
    rows and columns reversed, flipped back, is an upper factor M with H = M M^T; U + I = M diag(M)^-1."""
    M = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)
    return M / M.diagonal() - torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def ldlq(W, H, grid, blocksize=128, generator=None):
    """LDLQ. Errors of finished blocks of `blocksize` columns reach later columns through one matrix
    product per block (OPTQ's lazy batch updates); blocksize=1 updates after every column. Both give
    the same W_hat up to float rounding. Works on W^T so that each column is a contiguous row."""
    cols = W.shape[1]
    U = ldl_upper(H)
    noise = _noise(W, generator)
    Wt = W.T.contiguous()
    X = Wt.clone()  # row k: W_k plus the feedback from finished blocks
    err = torch.zeros_like(X)  # rows of (W - W_hat)^T
    Q = torch.empty_like(X)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        for k in range(i1, i2):
            x = X[k] + U[i1:k, k] @ err[i1:k] if k > i1 else X[k]
            Q[k] = grid.round_column(x, k, None if noise is None else noise[:, k])
            err[k] = Wt[k] - Q[k]
        X[i2:] += U[i1:i2, i2:].T @ err[i1:i2]
    return Q.T


def gptq(W, H, grid, blocksize=128, generator=None):
    """GPTQ/OPTQ: round a column, spread its error over the not yet rounded columns through the rows of
    the upper Cholesky factor of H^-1, lazily in blocks."""
    rows, cols = W.shape
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    R = torch.linalg.cholesky(Hinv, upper=True)
    noise = _noise(W, generator)
    W = W.clone()
    W_hat = torch.empty_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        R1 = R[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = i1 + i
            q = grid.round_column(W1[:, i], k, None if noise is None else noise[:, k])
            W_hat[:, k] = q
            err1[:, i] = (W1[:, i] - q) / R1[i, i]
            W1[:, i:] -= err1[:, i:i + 1] * R1[i, i:]
        W[:, i2:] -= err1 @ R[i1:i2, i2:]
    return W_hat


def greedy_passes(W, H, W_hat, grid, npasses, blocksize=128):
    """QuIP's greedy passes: coordinate descent on tr((W_hat - W) H (W_hat - W)^T), one column at a
    time in index order, each column set to the grid value nearest to its exact minimizer (which, for
    a 1-D convex quadratic on a uniform grid, is the best grid value: the loss never increases).
    Starts from `W_hat` (W itself for QuIP's 'allbal'). Stops early at a fixed point.
    Returns (W_hat, passes run). Within a block the gradient G = (W_hat - W) H[:, block] is updated
    by rank-1 steps; each block starts from one matrix product (lazy batch updates)."""
    rows, cols = W.shape
    W_hat = W_hat.clone()
    diag = H.diagonal()
    passes = 0
    for _ in range(npasses):
        passes += 1
        before = W_hat.clone()
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            G = (W_hat - W) @ H[:, i1:i2]
            for i in range(i2 - i1):
                k = i1 + i
                new = grid.round_column(W_hat[:, k] - G[:, i] / diag[k], k)
                G += (new - W_hat[:, k])[:, None] * H[k, i1:i2]
                W_hat[:, k] = new
        if torch.equal(before, W_hat):
            break
    return W_hat, passes


def _by_diag(W, H, grid):
    """W, H and grid with columns in QuIP's order for ldlqRG and allbal: largest diag(H) first."""
    perm = torch.argsort(H.diagonal(), descending=True)
    return perm, W[:, perm], H[perm][:, perm], grid.permuted(perm)


def ldlqRG(W, H, grid, npasses=1, blocksize=128, lazy_batch=True, generator=None):
    """QuIP's ldlqRG: LDLQ on the columns sorted by decreasing diag(H), then `npasses` greedy passes
    in the same order. Returns (W_hat, greedy passes run)."""
    perm, Ws, Hs, gs = _by_diag(W, H, grid)
    Wq = ldlq(Ws, Hs, gs, blocksize if lazy_batch else 1, generator)
    Wq, passes = greedy_passes(Ws, Hs, Wq, gs, npasses, blocksize)
    return Wq[:, torch.argsort(perm)], passes


def allbal(W, H, grid, npasses=1, blocksize=128):
    """QuIP's allbal: greedy passes only, starting from the unrounded W (the first pass rounds each
    column given the errors of the columns already rounded), columns by decreasing diag(H)."""
    perm, Ws, Hs, gs = _by_diag(W, H, grid)
    Wq, passes = greedy_passes(Ws, Hs, Ws, gs, npasses, blocksize)
    return Wq[:, torch.argsort(perm)], passes


def block_ldl(H, block):
    """(U, D) with H = (U + I) D (U + I)^T, U block strictly upper triangular and D block diagonal
    (blocks of `block` columns; D as (cols // block, block, block)). From the upper factor M with
    H = M M^T (`ldl_upper`'s flipped Cholesky): U + I = M diag(M_JJ)^-1 blockwise, D_J = M_JJ M_JJ^T."""
    n = H.shape[0]
    nb = n // block
    M = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)
    Mjj = M.reshape(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    cols = M.reshape(n, nb, block).transpose(0, 1)  # column block J of M: (nb, n, block)
    UI = torch.linalg.solve_triangular(Mjj, cols, upper=True, left=False).transpose(0, 1).reshape(n, n)
    return UI - torch.eye(n, dtype=H.dtype, device=H.device), Mjj @ Mjj.transpose(1, 2)


def block_ldlq(W, H, quantize_block, block=8, blocksize=128):
    """Block LDLQ: columns J = j..j+block-1 in index order get
        W_hat[:, J] = quantize_block(W[:, J] + (W - W_hat)[:, :j] U[:j, J]),
    the linear feedback of the errors of the blocks before. `quantize_block` maps a (rows, block)
    tensor to its reconstruction, e.g. `lambda X: cb.quantize(X / s)[0] * s` for a
    `quant.e8p.VectorCodebook` cb and matrix scale s, or to (reconstruction, codes), e.g.
    `cb.quantizer(s)`; then the codes come back too (re-quantizing W_hat need not give them back: a
    residual codebook's greedy stages can pick other codes for the same sum). Returns W_hat, or
    (W_hat, codes stacked as (rows, cols // block, ...)).

    With a (block-)diagonal H, U = 0 and this is exactly the nearest codeword of every block. Errors
    of finished groups of `blocksize` columns reach later columns through one matrix product per group
    (lazy batch updates, as `ldlq`)."""
    rows, cols = W.shape
    if cols % block or blocksize % block:
        raise UserError(f"block LDLQ needs columns ({cols}) and blocksize ({blocksize}) in multiples of {block}")
    U, _ = block_ldl(H, block)
    X = W.clone()  # W plus the feedback from finished groups
    err = torch.zeros_like(W)  # W - W_hat
    W_hat = torch.empty_like(W)
    codes = []
    for g1 in range(0, cols, blocksize):
        g2 = min(g1 + blocksize, cols)
        for j1 in range(g1, g2, block):
            j2 = j1 + block
            x = X[:, j1:j2] + err[:, g1:j1] @ U[g1:j1, j1:j2] if j1 > g1 else X[:, j1:j2]
            out = quantize_block(x)
            W_hat[:, j1:j2], code = out if isinstance(out, tuple) else (out, None)
            err[:, j1:j2] = W[:, j1:j2] - W_hat[:, j1:j2]
            codes.append(code)
        X[:, g2:] += err[:, g1:g2] @ U[g1:g2, g2:]
    return W_hat if codes[0] is None else (W_hat, torch.stack(codes, 1))


ROW_BLOCK = 16  # YAQA's tile height: about rows / 16 batched steps instead of rows
COLUMN_GROUP = 16  # columns per step, as YAQA's 16 x 16 tiles: one matrix product gives their row feedback


def _unit_upper(H, block):
    """U of H = (U + I) D (U + I)^T over blocks of `block` (`ldl_upper`'s exact factor for single ones)."""
    return ldl_upper(H) if block == 1 else block_ldl(H, block)[0]


def row_blocks(rows, row_block):
    """Sizes of two-sided LDLQ's row blocks, top to bottom: `row_block` rows, but never more than the rows
    after the block (the last holds one): ..., row_block, ..., 4, 2, 1, 1."""
    sizes, left = [], rows
    while left:
        sizes.append(min(left, row_block, max(1, rows - left)))
        left -= sizes[-1]
    return sizes[::-1]


def two_sided_ldlq(W, H, H_out, round_tiles, block=1, row_block=ROW_BLOCK, whole_blocks=False):
    """YAQA's two-sided LDLQ (Tseng, Sun, De Sa 2025): rounds W (rows, cols) against the Kronecker-factored
    proxy tr(E^T H_out E H), E = W - W_hat, H (cols, cols) the input-side and H_out (rows, rows) the
    output-side Hessian. Tiles are one row block (`row_blocks`) by `block` columns, one codeword per row;
    `round_tiles(X, rows, blocks)` maps the targets X (k, block) of the tile rows `rows` (k,) in column
    blocks `blocks` (k,) to their rounding, or to (rounding, codes). Returns W_hat, or (W_hat, codes as
    (rows, cols // block, ...)).

    whole_blocks: every row block is `row_block` rows (rows a multiple of it), for codes that span a
    block's rows jointly (trellis tiles): `round_tiles` then gets whole blocks, each one's rows together.

    Derivation: with H = (U + I) D (U + I)^T over column blocks and H_out = (V + I) S (V + I)^T over row
    blocks, U and V block strictly upper, D and S block diagonal, the proxy is sum_AB tr(F_AB^T S_A F_AB D_B)
    with F = (V + I)^T E (U + I), and F_AB holds E_AB plus errors of tiles (A', B') != (A, B) with A' <= A,
    B' <= B only. Rounding W_hat_AB = Q(W_AB + [(V + I)^T E_done (U + I)]_AB), E_done the errors of the
    tiles rounded before (zero elsewhere, at (A, B) too), makes F_AB exactly tile (A, B)'s rounding error;
    Q rounds every row of the tile to its own nearest codeword, ignoring S_A as block LDLQ ignores D_B. That
    feedback is C_AB + R_A U_:B, C = V^T E_done (from the row blocks above, same columns) and R = E_done + C
    on the rounded tiles (zero elsewhere): the cross term is R's C part. V = 0 (H_out = I) leaves one-sided
    LDLQ, row by row. Tile (A, B) needs the tiles above and to the left only: a step takes an anti-diagonal
    of row blocks by groups of codewords (up to `COLUMN_GROUP` columns), C for a group at once, and rounds
    the group's codewords one after another, in one batched call each.

    S_A is H_out's block A given the rows below it (a Schur complement): the fewer rows below, the more of
    H_out's correlation it keeps, which is why the blocks shrink towards the end. Each row block fills a
    slot of `row_block` rows padded with uncorrelated rows (an identity in H_out), never rounded: the slots'
    factors restricted to the real rows are those of the blocks.
    """
    rows, cols = W.shape
    if cols % block:
        raise UserError(f"two-sided LDLQ needs columns ({cols}) in multiples of {block}")
    nb = cols // block
    group = math.gcd(nb, max(1, COLUMN_GROUP // block))  # codewords per group
    gw, ng = group * block, nb // group
    if whole_blocks and rows % row_block:
        raise UserError(f"two-sided LDLQ over whole blocks of {row_block} rows needs rows ({rows}) in multiples of it")
    sizes = [row_block] * (rows // row_block) if whole_blocks else row_blocks(rows, row_block)
    nrb = len(sizes)
    rows_p = nrb * row_block
    first = [0, *itertools.accumulate(sizes)]  # first row of every block, then rows
    pos = torch.cat([A * row_block + torch.arange(n, device=W.device) for A, n in enumerate(sizes)])  # rows' slots
    H_out_p = torch.eye(rows_p, dtype=H_out.dtype, device=H_out.device)
    H_out_p[pos[:, None], pos] = H_out
    # slot A of V^T: the feedback weights of the rows before onto A's rows
    VT = _unit_upper(H_out_p, row_block).T.reshape(nrb, row_block, rows_p)
    U = _unit_upper(H, block)
    # Groups in reverse order, so that the tiles of an anti-diagonal (row blocks ascending, groups descending)
    # read contiguous slices: U_rev[j] = U[:, group ng-1-j], E_rev[j] = E[:, group ng-1-j].
    U_rev = U.reshape(cols, ng, gw).permute(1, 0, 2).flip(0).contiguous()
    U_in = U.reshape(ng, gw, ng, gw).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # the feedback inside a group
    E_rev = torch.zeros(ng, rows_p, gw, dtype=W.dtype, device=W.device)
    R = torch.zeros(rows_p, cols, dtype=W.dtype, device=W.device)  # rows in their slots
    Wg = W.reshape(rows, ng, gw)
    W_hat = torch.empty_like(Wg)
    codes = None
    for t in range(nrb + ng - 1):
        A0, A1 = max(0, t - ng + 1), min(nrb, t + 1)
        a = torch.arange(first[A0], first[A1], device=W.device)  # the tiles' rows
        p = pos[a]
        G = t - p // row_block
        j0, k = ng - 1 - t + A0, A1 - A0
        above, n = (A1 - 1) * row_block, (t - A0) * gw  # slots above the last tile; columns left of the first
        C = torch.bmm(VT[A0:A1, :, :above], E_rev[j0:j0 + k, :above]).reshape(-1, gw)[p - A0 * row_block]
        RU = torch.bmm(R.view(nrb, row_block, cols)[A0:A1, :, :n], U_rev[j0:j0 + k, :n])
        Wt = Wg[a, G]  # the tiles' weights
        X = Wt + C + RU.reshape(-1, gw)[p - A0 * row_block]
        Ui, Rg, X_hat = U_in[G], torch.empty_like(X), torch.empty_like(X)
        for i in range(0, gw, block):
            x = X[:, i:i + block] + torch.bmm(Rg[:, None, :i], Ui[:, :i, i:i + block]).squeeze(1) if i else X[:, :block]
            out = round_tiles(x, a, G * group + i // block)
            X_hat[:, i:i + block], code = out if isinstance(out, tuple) else (out, None)
            Rg[:, i:i + block] = Wt[:, i:i + block] - X_hat[:, i:i + block] + C[:, i:i + block]
            if code is not None:
                codes = codes if codes is not None else code.new_empty(rows, nb, *code.shape[1:])
                codes[a, G * group + i // block] = code
        W_hat[a, G] = X_hat
        E_rev[ng - 1 - G, p] = Wt - X_hat
        R.view(rows_p, ng, gw)[p, G] = Rg
    W_hat = W_hat.reshape(rows, cols)
    return W_hat if codes is None else (W_hat, codes)


def two_sided_ldlq_grid(W, H, H_out, grid, generator=None, row_block=ROW_BLOCK):
    """`two_sided_ldlq` with a scalar `Grid`, tiles of one column; with H_out = I it is `ldlq` (same noise
    for unbiased rounding)."""
    noise = _noise(W, generator)

    def round_tiles(X, rows, cols):
        return grid.round_entries(X[:, 0], rows, cols, None if noise is None else noise[rows, cols])[:, None]

    return two_sided_ldlq(W, H, H_out, round_tiles, row_block=row_block)
