"""Incoherence processing (QuIP): W -> U (W diag(s)) V^T and H -> V (diag(1/s) H diag(1/s)) V^T with
random orthogonal U (rows) and V (columns), which leaves the proxy loss unchanged and spreads the
weights' and the Hessian's mass evenly over the coordinates, so a uniform grid fits them.

Rotations (all seeded, regenerated exactly from (kind, size, seed); QuIP sets no seed):
- 'kron': P_out (A kron B) P_in, one random orthogonal factor A (p1 x p1) and B (p2 x p2) with
  p1 * p2 = n, p1 the largest divisor <= sqrt(n), and random permutations P_in, P_out. QuIP's
  `--pre_proj_extra 1`, the variant its `--incoh_processing` means to select (a typo,
  `args.proj_extra = 1`, leaves it on 0).
- 'butterfly': the same two-factor structure but a separate random factor for every fibre along each
  axis (block-diagonal factors), QuIP's `--pre_proj_extra 0`; 'butterfly_nopermute' without the
  permutations, QuIP's `--pre_proj_extra 2`.
- 'hadamard': the randomized Hadamard transform of QuIP#, (H_2^k kron Q_m) diag(random signs) / 2^(k/2)
  for n = 2^k m, m odd; QuIP# uses stored Hadamard matrices for the odd part, here Q_m is a random
  orthogonal m x m matrix (m = 1 for powers of two, 3 for 768 and 3072, 43 for 11008).
Rotations are generated in float64 on the CPU, so the same seed gives the same matrix on any device.
"""
import math

import torch

ROTATIONS = ("kron", "hadamard", "butterfly", "butterfly_nopermute")


def random_orthogonal(n, generator, count=1):
    """`count` Haar-random n x n orthogonal matrices (QR of a Gaussian, signs fixed), float64."""
    A = torch.randn(count, n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(R.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


def kron_factors(n):
    p1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return p1, n // p1


def fwht(x):
    """Orthonormal Walsh-Hadamard transform (Sylvester order) along dim 0, whose size is a power of 2."""
    n = x.shape[0]
    y = x.reshape(n, -1)
    h = 1
    while h < n:
        y = y.reshape(n // (2 * h), 2, h, -1)
        y = torch.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), dim=1)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


class _Cached:
    """Keeps the float64 CPU factors and their copies on the device/dtype last used."""

    def _factors(self, like):
        key = (like.device, like.dtype)
        if getattr(self, "_key", None) != key:
            self._key = key
            self._cast = [None if f is None else f.to(like.device, like.dtype) for f in self.factors]
        return self._cast


class Butterfly(_Cached):
    def __init__(self, n, generator, blocked, permute):
        self.n = n
        self.p1, self.p2 = kron_factors(n)
        A = random_orthogonal(self.p1, generator, self.p2 if blocked else 1)
        B = random_orthogonal(self.p2, generator, self.p1 if blocked else 1)
        p_in = torch.randperm(n, generator=generator) if permute else None
        p_out = torch.randperm(n, generator=generator) if permute else None
        self.factors = [A, B]
        self.p_in, self.p_out = p_in, p_out
        self.inv_in = None if p_in is None else torch.argsort(p_in)
        self.inv_out = None if p_out is None else torch.argsort(p_out)

    # A acts on the p1 axis (one factor per p2 fibre when blocked), B on the p2 axis (one per p1 fibre).
    def _a(self, A, x):
        return (A @ x.transpose(0, 1)).transpose(0, 1)

    def apply(self, X):
        """R @ X for X of shape (n, q): R = P_out B A P_in."""
        A, B = self._factors(X)
        x = X if self.p_in is None else X[self.p_in.to(X.device)]
        x = B @ self._a(A, x.reshape(self.p1, self.p2, -1))
        x = x.reshape(X.shape)
        return x if self.p_out is None else x[self.p_out.to(X.device)]

    def apply_t(self, X):
        """R^T @ X = P_in^T A^T B^T P_out^T X."""
        A, B = self._factors(X)
        x = X if self.inv_out is None else X[self.inv_out.to(X.device)]
        x = self._a(A.transpose(-1, -2), B.transpose(-1, -2) @ x.reshape(self.p1, self.p2, -1))
        x = x.reshape(X.shape)
        return x if self.inv_in is None else x[self.inv_in.to(X.device)]


class RandomHadamard(_Cached):
    def __init__(self, n, generator):
        self.n = n
        self.m = n >> ((n & -n).bit_length() - 1)  # odd part
        self.k2 = n // self.m
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        Q = random_orthogonal(self.m, generator)[0] if self.m > 1 else None
        self.factors = [signs, Q]

    def apply(self, X):
        signs, Q = self._factors(X)
        x = (X * signs[:, None]).reshape(self.k2, self.m, -1)
        x = fwht(x)
        if Q is not None:
            x = Q @ x
        return x.reshape(X.shape)

    def apply_t(self, X):
        signs, Q = self._factors(X)
        x = X.reshape(self.k2, self.m, -1)
        if Q is not None:
            x = Q.T @ x
        return fwht(x).reshape(X.shape) * signs[:, None]


def make_rotation(kind, n, generator):
    if kind == "kron":
        return Butterfly(n, generator, blocked=False, permute=True)
    if kind == "butterfly":
        return Butterfly(n, generator, blocked=True, permute=True)
    if kind == "butterfly_nopermute":
        return Butterfly(n, generator, blocked=True, permute=False)
    if kind == "hadamard":
        return RandomHadamard(n, generator)
    raise ValueError(f"unknown rotation {kind!r}; choose one of {', '.join(ROTATIONS)}")


def rescale_vector(W, H):
    """QuIP's diagonal rescaling s = (diag(H) / diag(W^T W))^(1/4) (H normalized by its largest entry),
    which balances the column norms of W diag(s) against the diagonal of diag(1/s) H diag(1/s)."""
    diag_h = (H.diagonal() / H.abs().max().clamp(min=1e-30)).clamp(min=1e-8)
    diag_w = W.square().sum(0).clamp(min=1e-8)
    return (diag_h / diag_w).sqrt().sqrt().clamp(min=1e-8)


class Incoherence:
    """The pre/post-processing of one weight matrix (rows, cols): optional rescaling vector `s` (cols,)
    and optional rotations of kind `rotation` regenerated from `seed` (U first, then V)."""

    def __init__(self, rows, cols, rescale=None, rotation=None, seed=0):
        self.rows, self.cols, self.s, self.rotation, self.seed = rows, cols, rescale, rotation, seed
        self.U = self.V = None
        if rotation is not None:
            g = torch.Generator().manual_seed(seed)
            self.U = make_rotation(rotation, rows, g)
            self.V = make_rotation(rotation, cols, g)

    def weight(self, W):
        """W -> U (W diag(s)) V^T."""
        if self.s is not None:
            W = W * self.s.to(W)
        if self.U is not None:
            W = self.V.apply(self.U.apply(W).T).T
        return W

    def hessian(self, H):
        """H -> V (diag(1/s) H diag(1/s)) V^T."""
        if self.s is not None:
            s = self.s.to(H)
            H = H / s[:, None] / s[None, :]
        if self.V is not None:
            H = self.V.apply(self.V.apply(H).T)
            H = (H + H.T) / 2  # exact symmetry for the Cholesky factorization
        return H

    def unweight(self, W):
        """Inverse of `weight`: U^T W V, then divide the columns by s."""
        if self.U is not None:
            W = self.V.apply_t(self.U.apply_t(W).T).T
        if self.s is not None:
            W = W / self.s.to(W)
        return W
