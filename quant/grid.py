"""Quantization grids (QuIP's `qfn`).

Every grid is affine: a code q in {0, ..., 2^wbits - 1} stands for the value scale * (q - zero).
- qfn 'a': per-row (or per-group of `groupsize` columns) asymmetric min/max range that includes 0,
  integer zero point (GPTQ's and QuIP's default).
- qfn 'b': one scale per matrix, s = 2.4 * RMS(W), symmetric levels {-s, ..., s}; at 2 bits
  {-s, -s/3, s/3, s}. Meant for incoherence-processed weights, whose entries are roughly Gaussian.
  As an affine grid: scale = 2s / maxq, zero = maxq / 2.

`scale` and `zero` broadcast against the (rows, cols) matrix: shape (1, 1) for 'b', (rows, 1) for
'a', (rows, cols) for 'a' with groups (expanded per column so that column permutations stay simple).
"""
import torch

from engine import UserError

WBITS = (2, 3, 4, 16)
QFNS = ("a", "b")


class Grid:
    def __init__(self, scale, zero, wbits):
        self.scale, self.zero, self.wbits = scale, zero, wbits
        self.maxq = 2 ** wbits - 1

    def _col(self, t, c):
        return t[:, c] if t.shape[1] > 1 else t[:, 0]

    def _round(self, x, s, z, noise):
        u = x / s + z
        q = torch.floor(u + noise) if noise is not None else torch.round(u)
        return s * (q.clamp(0, self.maxq) - z)

    def round_column(self, x, c, noise=None):
        """Nearest grid value of column `c` for the values `x` (rows,); with `noise` (uniform [0, 1))
        stochastic rounding, which is unbiased inside the range."""
        return self._round(x, self._col(self.scale, c), self._col(self.zero, c), noise)

    def round(self, x, noise=None):
        """Nearest grid value of every entry of the whole matrix `x`."""
        return self._round(x, self.scale, self.zero, noise)

    def round_entries(self, x, rows, cols, noise=None):
        """Nearest grid values for the values `x` (k,) of the entries (rows[i], cols[i]) of the matrix."""
        def at(t):
            return t[rows if t.shape[0] > 1 else 0, cols if t.shape[1] > 1 else 0]
        return self._round(x, at(self.scale), at(self.zero), noise)

    def codes(self, x):
        """Integer codes (uint8) of a matrix whose entries already lie on the grid."""
        return torch.round(x / self.scale + self.zero).clamp(0, self.maxq).to(torch.uint8)

    def permuted(self, perm):
        """The grid of the matrix with columns reordered as x[:, perm]."""
        if self.scale.shape[1] == 1:
            return self
        return Grid(self.scale[:, perm], self.zero[:, perm], self.wbits)


def make_grid(W, wbits, qfn="a", groupsize=-1):
    """The grid QuIP's quantizer fits to the (processed) weight matrix W (rows, cols)."""
    if not 2 <= wbits <= 8:  # 2-4 for the weight methods, 8 for quantized embeddings
        raise UserError(f"a grid needs wbits from 2 to 8, got {wbits}")
    maxq = 2 ** wbits - 1
    if qfn == "b":
        if groupsize != -1:
            raise UserError("--groupsize works with --qfn a only (qfn b has one scale per matrix)")
        s = 2.4 * W.square().mean().sqrt() + 1e-16
        scale = (2 * s / maxq).reshape(1, 1)
        return Grid(scale, torch.full_like(scale, maxq / 2), wbits)
    if qfn != "a":
        raise UserError(f"unknown qfn {qfn!r}; choose a or b")
    rows, cols = W.shape
    if groupsize == -1 or groupsize >= cols:
        groups = W.unsqueeze(1)  # (rows, 1, cols)
    elif groupsize > 0:
        pad = (-cols) % groupsize  # a last, shorter group: pad with its own last value (no effect on min/max)
        Wp = torch.cat([W, W[:, -1:].expand(rows, pad)], 1) if pad else W
        groups = Wp.reshape(rows, -1, groupsize)
    else:
        raise UserError(f"groupsize must be -1 (whole rows) or positive, got {groupsize}")
    zeros = torch.zeros((), dtype=W.dtype, device=W.device)
    xmin = torch.minimum(groups.amin(-1), zeros)
    xmax = torch.maximum(groups.amax(-1), zeros)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    if scale.shape[1] > 1:
        scale = scale.repeat_interleave(groupsize, 1)[:, :cols]
        zero = zero.repeat_interleave(groupsize, 1)[:, :cols]
    return Grid(scale, zero, wbits)


def compact(t, groupsize):
    """A per-column expanded grid parameter back to one value per (row, group)."""
    return t[:, ::groupsize] if t.shape[1] > 1 else t


def expand(t, groupsize, cols):
    """Inverse of `compact`."""
    return t.repeat_interleave(groupsize, 1)[:, :cols] if t.shape[1] > 1 else t
