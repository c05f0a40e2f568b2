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
- 'hadamard': QuIP#'s randomized Hadamard transform (RHT), R = H_n diag(random signs) / sqrt(n) with H_n
  a Hadamard matrix (entries +-1, H H^T = n I). For n = 2^a m, H_n = H_2^a kron H_m: H_2^a in Sylvester
  order, applied by the fast Walsh-Hadamard transform in O(n log n), and H_m (m = 1 or a Paley order
  up to HADAMARD_MAX) a small dense matrix built by Paley's construction I (m = q + 1, q prime = 3
  mod 4: 12, 20, 24, 44, 48, 60, ...) or II (m = 2 (q + 1), q prime = 1 mod 4: 12, 28, 36, 60, 76,
  ...). QuIP# ships stored matrices instead, among them orders Paley with a prime q does not give
  (52 needs q = 25, 172 other constructions).
  A size with no such factorization is zero-padded to `hadamard_size(n)`, the smallest one >= n that
  has one (columns: also a multiple of 8, so that 8-dimensional vector codebooks tile the rows), e.g.
  172 -> 176 = 4 x 44 and 11008 -> 11264 = 256 x 44 (QuIP# uses H_172 for 11008 = 64 x 172). The
  padded input coordinates are zero, so padding changes nothing the layer computes: `weight`
  returns the padded (rows_p, cols_p) matrix, `hessian` the padded H (cols_p, cols_p; H is padded
  with zeros, and the quantizer's damping makes it definite), and `unweight` crops back.
Rotations are generated in float64 on the CPU, so the same seed gives the same matrix on any device.
"""
import math

import torch

from engine import UserError

ROTATIONS = ("kron", "hadamard", "butterfly", "butterfly_nopermute")


def random_orthogonal(n, generator, count=1):
    """`count` Haar-random n x n orthogonal matrices (QR of a Gaussian, signs fixed), float64."""
    A = torch.randn(count, n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(R.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


def kron_factors(n):
    p1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return p1, n // p1


HADAMARD_MAX = 256  # largest dense Hadamard factor H_m


def _is_prime(q):
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _quadratic_character(q):
    """Jacobsthal matrix Q[i, j] = chi(j - i) mod q, chi the Legendre symbol (chi(0) = 0), float64."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[sorted({i * i % q for i in range(1, q)})] = 1
    chi[0] = 0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley_construction(m):
    """1 or 2 when Paley's construction I (q = m - 1 prime = 3 mod 4) or II (q = m / 2 - 1 prime = 1 mod 4)
    gives a Hadamard matrix of order m, else None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2
    return None


def paley_hadamard(m):
    """A Hadamard matrix of order m (float64 +-1, H H^T = m I) by Paley's construction I or II."""
    kind = _paley_construction(m)
    if kind == 1:  # I + [[0, 1^T], [-1, Q]], Q skew-symmetric
        q = m - 1
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _quadratic_character(q)
        return S + torch.eye(m, dtype=torch.float64)
    if kind == 2:  # conference matrix C = [[0, 1^T], [1, Q]], 0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]]
        q = m // 2 - 1
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _quadratic_character(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    raise UserError(f"no Paley construction for a Hadamard matrix of order {m}")


def hadamard_factor(n):
    """The smallest m (1, or a Paley order <= HADAMARD_MAX) with n = 2^a m; None if there is none."""
    odd = n >> ((n & -n).bit_length() - 1)
    if odd == 1:
        return 1
    m = 4 * odd
    while m <= min(n, HADAMARD_MAX):
        if n % m == 0 and _paley_construction(m):
            return m
        m *= 2
    return None


def hadamard_size(n, multiple=1):
    """The smallest size >= n, a multiple of `multiple`, that has a Hadamard factorization here."""
    size = -(-n // multiple) * multiple
    while hadamard_factor(size) is None:
        size += multiple
    return size


FWHT_RADIX = 64  # largest dense Sylvester factor per pass: one small matmul beats log2(64) elementwise passes
_SYLVESTER = {}


def sylvester(r, device, dtype):
    """The r x r Sylvester Hadamard matrix (entries +-1), r a power of 2, cached per device and dtype."""
    key = (r, device, dtype)
    if key not in _SYLVESTER:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < r:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        _SYLVESTER[key] = H.to(device, dtype)
    return _SYLVESTER[key]


def fwht(x):
    """Orthonormal Walsh-Hadamard transform (Sylvester order) along dim 0, whose size is a power of 2.
    H_n = H_r1 kron H_r2 kron ... with factors of at most FWHT_RADIX: one batched matmul per factor,
    O(n log n) work (n * FWHT_RADIX per log2(FWHT_RADIX) levels) and no n x n matrix."""
    n = x.shape[0]
    y = x.reshape(n, -1)
    q, inner = y.shape[1], n
    while inner > 1:
        r = min(inner, FWHT_RADIX)
        inner //= r
        y = sylvester(r, y.device, y.dtype) @ y.reshape(-1, r, inner * q)
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
    """R = (H_2^a kron H_m) diag(signs) / sqrt(n); n must have a factorization (`hadamard_size`)."""

    def __init__(self, n, generator):
        m = hadamard_factor(n)
        if m is None:
            raise UserError(f"no Hadamard matrix of order {n} here; pad to {hadamard_size(n)}")
        self.n, self.m, self.k2 = n, m, n // m
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        Hm = paley_hadamard(m) / math.sqrt(m) if m > 1 else None
        self.factors = [signs, Hm]

    # Index i = i2 * m + im: the FWHT acts on the power-of-two axis i2, H_m on the axis im.
    def apply(self, X):
        """R @ X for X of shape (n, q)."""
        signs, Hm = self._factors(X)
        x = fwht((X * signs[:, None]).reshape(self.k2, self.m, -1))
        if Hm is not None:
            x = Hm @ x
        return x.reshape(X.shape)

    def apply_t(self, X):
        """R^T @ X = diag(signs) (H_2^a kron H_m^T) X / sqrt(n) (Sylvester matrices are symmetric)."""
        signs, Hm = self._factors(X)
        x = X.reshape(self.k2, self.m, -1)
        if Hm is not None:
            x = Hm.T @ x
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
    and optional rotations of kind `rotation` regenerated from `seed` (U first, then V). The processed
    matrices have `padded_shape` (rows_p, cols_p): (rows, cols) except for 'hadamard', which pads
    sizes without a Hadamard factorization (rows to `hadamard_size(rows)`, cols to
    `hadamard_size(cols, 8)`)."""

    def __init__(self, rows, cols, rescale=None, rotation=None, seed=0):
        self.rows, self.cols, self.s, self.rotation, self.seed = rows, cols, rescale, rotation, seed
        self.padded_shape = (rows, cols)
        if rotation == "hadamard":
            self.padded_shape = (hadamard_size(rows), hadamard_size(cols, 8))
        self.U = self.V = None
        if rotation is not None:
            g = torch.Generator().manual_seed(seed)
            self.U = make_rotation(rotation, self.padded_shape[0], g)
            self.V = make_rotation(rotation, self.padded_shape[1], g)

    def _pad(self, X, rows, cols):
        return torch.nn.functional.pad(X, (0, cols - X.shape[1], 0, rows - X.shape[0]))

    def weight(self, W):
        """W -> U (W diag(s)) V^T, W zero-padded to `padded_shape` first."""
        if self.s is not None:
            W = W * self.s.to(W)
        if self.U is not None:
            W = self._pad(W, *self.padded_shape)
            W = self.V.apply(self.U.apply(W).T).T
        return W

    def hessian(self, H):
        """H -> V (diag(1/s) H diag(1/s)) V^T, H zero-padded to (cols_p, cols_p) first."""
        if self.s is not None:
            s = self.s.to(H)
            H = H / s[:, None] / s[None, :]
        if self.V is not None:
            H = self._pad(H, self.padded_shape[1], self.padded_shape[1])
            H = self.V.apply(self.V.apply(H).T)
            H = (H + H.T) / 2  # exact symmetry for the Cholesky factorization
        return H

    def output_hessian(self, H_out):
        """An output-side Hessian (rows, rows) (YAQA's, E[g g^T] of the layer's output gradients) -> U H_out U^T,
        zero-padded to (rows_p, rows_p) first: what `hessian` does with V, for the rows (the rescaling acts
        on the columns only), so that tr(E^T H_out E H) is the same in both bases."""
        if self.U is None:
            return H_out
        H_out = self._pad(H_out, self.padded_shape[0], self.padded_shape[0])
        H_out = self.U.apply(self.U.apply(H_out).T)
        return (H_out + H_out.T) / 2

    def unweight(self, W):
        """Inverse of `weight` for a `padded_shape` matrix: U^T W V, cropped to (rows, cols), then the
        columns divided by s."""
        if tuple(W.shape) != self.padded_shape:
            raise UserError(f"unweight expects the processed {self.padded_shape} matrix, got {tuple(W.shape)}")
        if self.U is not None:
            W = self.V.apply_t(self.U.apply_t(W).T).T[:self.rows, :self.cols]
        if self.s is not None:
            W = W / self.s.to(W)
        return W
