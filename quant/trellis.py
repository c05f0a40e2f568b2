"""Trellis-coded quantization with QTIP's bitshift trellis (Tseng et al. 2024, "QTIP: Quantization with
Trellises and Incoherence Processing").

A sequence of T weights is coded as a bitstream of T * k bits, read V weights (k V bits) per step.
The decoder's state is an L-bit window of the stream: each step shifts k V new bits in,
    state_t = ((state_{t-1} << kV) | c_t) mod 2^L,
and emits the V values `table[state_t]` of a code (a fixed function of the state). So state_t
determines state_{t+1} up to its k V new bits: every state has 2^kV successors and 2^kV
predecessors (the states whose low L - kV bits are its high ones), and the best stream for a
sequence x is the shortest path through this trellis, found by the Viterbi algorithm with the
squared error |x_t - table[state_t]|^2 as the edge cost.

Tail-biting: the stream is circular, state_0 is the window that ends k V bits into it and so
starts with the stream's last L - kV bits; a sequence costs exactly T k bits, no start state.
The exact tail-biting optimum needs one Viterbi run per value of those L - kV overlap bits;
like QTIP we run Viterbi once on the sequence rotated by half its length (the state at the seam,
well inside that path, is a good guess of the overlap; we search only seam_bits x L (8 L) stream
bits either side of the seam, QTIP the whole rotated sequence), then once more on the sequence with
state_0 and the last state constrained to that overlap (`quantize`). A test checks the constrained
runs against brute force over all streams.

Codes (`table`, (2^L, V), normalized to RMS 1 over the 2^L states):
- '1mad' (V = 1): an LCG x = 34038481 s + 76625530 mod 2^32, then the sum of x's four bytes, an
  approximately Gaussian value (Irwin-Hall of 4 uniform bytes). QTIP's "1MAD".
- '3inst' (V = 1): an LCG x = 89226354 s + 64248484 mod 2^32, its sign bit and 12 low bits of each
  16-bit half kept, XORed with 0x3B60 in each half, the halves read as two fp16 numbers and summed.
  QTIP's "3INST" (an LCG, an AND, an XOR in the kernel).
- 'hyb' (V = 2): QTIP's hybrid code: the hash h = s (s + 1), bits L-1-Q .. L-2 of h index a
  2^Q x 2 table (Q = `hyb_q`, 9 as in QTIP) and bit L-1 flips the sign of the first value. The
  table is k-means of 2-D Gaussians (seeded, float64 on the CPU, rounded to multiples of 2^-10:
  every machine rebuilds the same table, so a checkpoint stores none). QTIP trains it further; we
  do not.

Per weight, stored bits are exactly k; a decoder needs L, k, V, T and the code name. Values are
computed in float32 from integer states; `decode` is exact (the same table lookup as Viterbi).

    tr = Trellis(L=16, k=2, V=1, T=256, code="1mad")
    X_hat, packed = tr.quantize(X / s)          # X (n, T); packed uint8 (n, T k / 8)
    tr.decode(packed)                           # == X_hat
"""
import math

import torch

from engine import UserError

from . import kernels

CODES = {"1mad": 1, "3inst": 1, "hyb": 2}  # code -> V
KBITS = (2, 3, 4)
HYB_Q = 9  # the hyb table's index bits, QTIP's value
HYB_Q_RANGE = (4, 11)  # at most 11: at least 16 of hyb_table's 2^15 k-means points per center
# input_rms of Gaussian weights for each k (the scale rule of `scale_for`): the MSE minimizers found
# by `benchmarks/bench_trellis.py --fit` (steps of 0.02 on 32-48 unit Gaussian sequences, L = 16, T = 256).
# Below 1 at 3 and 4 bits: the codes' largest values overload less when the input is narrower.
INPUT_RMS = {"1mad": {2: 0.98, 3: 0.90, 4: 0.86}, "3inst": {2: 0.98, 3: 0.96, 4: 0.84},
             "hyb": {2: 0.98, 3: 0.92, 4: 0.82}}
# x L: stream bits on either side of the seam that the first (overlap) pass searches. MSE and search time
# of other values: `bench_trellis.py --sweep` (README).
SEAM_BITS = 8
_BEST_BYTES = 1 << 28  # bounds the memory of the per-step path costs: sequences per Viterbi pass


def _lcg(s, a, b):
    return (s * a + b) & 0xFFFFFFFF


def _code_1mad(states):
    x = _lcg(states, 34038481, 76625530)
    y = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
    return (y.double() - 510)[:, None]


def _code_3inst(states):
    x = (_lcg(states, 89226354, 64248484) & 0x8FFF8FFF) ^ 0x3B603B60
    halves = torch.stack([x >> 16, x & 0xFFFF], 1)
    halves = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)
    return halves.view(torch.float16).double().sum(1, keepdim=True)


_HYB_TABLES = {}


def hyb_table(q=HYB_Q, iters=25):
    """The 2^q x 2 table: k-means (seeded Lloyd iterations, float64, CPU) of 2^15 2-D unit Gaussians,
    rounded to multiples of 2^-10 so that float noise of another machine's matmul cannot change it."""
    if q not in _HYB_TABLES:
        g = torch.Generator().manual_seed(q)
        data = torch.randn(1 << 15, 2, generator=g, dtype=torch.float64)
        centers = data[torch.randperm(len(data), generator=g)[:1 << q]].clone()
        for _ in range(iters):
            score = torch.addcmul(-centers.square().sum(1), data[:, :1], centers[:, 0], value=2)
            assign = score.addcmul_(data[:, 1:], centers[:, 1], value=2).argmax(1)  # nearest center
            counts = torch.bincount(assign, minlength=len(centers))
            sums = torch.zeros_like(centers).index_add_(0, assign, data)
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        _HYB_TABLES[q] = torch.round(centers * 1024) / 1024
    return _HYB_TABLES[q]


def _code_hyb(states, L, q):
    h = states * (states + 1)
    idx = (h >> (L - 1 - q)) & ((1 << q) - 1)
    flip = 1 - 2 * ((h >> (L - 1)) & 1).double()
    values = hyb_table(q)[idx].clone()
    values[:, 0] *= flip
    return values


class Trellis:
    """A bitshift trellis code: state bits L, k bits per weight, V weights per step, sequences of T
    weights, and a code (CODES); for 'hyb' the table's index bits hyb_q. seam_bits sets the length of
    the overlap pass of `quantize`. See the module docstring."""

    def __init__(self, L=16, k=2, V=None, T=256, code="1mad", hyb_q=HYB_Q, seam_bits=SEAM_BITS):
        if code not in CODES:
            raise UserError(f"unknown trellis code {code!r}; choose one of {', '.join(CODES)}")
        V = CODES[code] if V is None else V
        if V != CODES[code]:
            raise UserError(f"trellis code {code} emits V = {CODES[code]} weights per step, got V = {V}")
        if k not in KBITS:
            raise UserError(f"trellis bits per weight k must be one of {', '.join(map(str, KBITS))}, got {k}")
        if code == "hyb" and not HYB_Q_RANGE[0] <= hyb_q <= HYB_Q_RANGE[1]:
            raise UserError(f"hyb table index bits hyb_q must lie in [{HYB_Q_RANGE[0]}, {HYB_Q_RANGE[1]}], "
                            f"got {hyb_q}")
        if not (isinstance(seam_bits, int) and seam_bits > 0):
            raise UserError(f"trellis seam_bits must be a positive integer, got {seam_bits!r}")
        lo = max(hyb_q + 1 if code == "hyb" else 0, 2 * k * V)
        if not lo <= L <= 16:
            raise UserError(f"trellis state bits L must lie in [{lo}, 16] for k = {k}, V = {V}, code {code}, got {L}")
        if T <= 0 or T % V or (T * k) % 8 or T * k < max(16, L):
            raise UserError(f"trellis sequence length T must be a positive multiple of {V} with T k a multiple of "
                            f"8 and at least {max(16, L)} bits, got T = {T} (k = {k})")
        self.L, self.k, self.V, self.T, self.code = L, k, V, T, code
        self.hyb_q, self.seam_bits = hyb_q, seam_bits
        self.kv, self.steps = k * V, T // V
        # steps the overlap pass of `quantize` searches on either side of the seam
        self.seam_steps = min(self.steps // 2, -(-seam_bits * L // self.kv))
        states = torch.arange(1 << L, dtype=torch.int64)
        code_of = {"1mad": _code_1mad, "3inst": _code_3inst, "hyb": lambda st: _code_hyb(st, L, hyb_q)}
        table = code_of[code](states)
        self.rms = float(table.square().mean().sqrt())  # the code's RMS before normalization
        self.table = (table / self.rms).float()  # (2^L, V), RMS 1
        self.input_rms = INPUT_RMS[code][k]
        self._cast = {}

    def __repr__(self):
        extra = f", hyb_q={self.hyb_q}" if self.code == "hyb" and self.hyb_q != HYB_Q else ""
        if self.seam_bits != SEAM_BITS:
            extra += f", seam_bits={self.seam_bits}"
        return f"Trellis(L={self.L}, k={self.k}, V={self.V}, T={self.T}, code={self.code!r}{extra})"

    def _table(self, device):
        if device not in self._cast:
            t = self.table.to(device)
            self._cast = {device: (t, t.square().sum(1))}
        return self._cast[device]

    def scale_for(self, W, dim=None):
        """RMS(W) / input_rms: for the matrix, or with dim=1 one per row ((rows, 1))."""
        if dim is None:
            return W.square().mean().sqrt() / self.input_rms + 1e-16
        return W.square().mean(dim, keepdim=True).sqrt() / self.input_rms + 1e-16

    # --- Viterbi ----------------------------------------------------------------------------------------

    def viterbi(self, X, overlap=None):
        """The best state path of every row of X (n, m V), m steps (T / V for a whole sequence): int64
        states (n, m). Without `overlap` any start is allowed and the end is free (no tail-biting); with
        `overlap` (n,) the path starts in a state whose high L - kV bits are `overlap` and ends in one
        whose low L - kV bits are `overlap`: the best tail-biting stream with that overlap."""
        n = X.shape[0]
        if not n:
            return torch.zeros(0, X.shape[1] // self.V, dtype=torch.int64, device=X.device)
        ext = kernels.extension("trellis") if kernels.ENABLED and X.device.type == "cpu" else None
        if ext is not None:  # the C++ search (quant/kernels/trellis.cpp), same costs and states
            table, norms = self._table(X.device)
            X = X.float().contiguous()
            overlap = None if overlap is None else overlap.long().contiguous()
            free = torch.empty(0, dtype=torch.int64)
            return torch.cat([ext.viterbi(X[a:b], table, norms, self.L, self.kv,
                                          free if overlap is None else overlap[a:b], group)
                              for a, b, group in self._kernel_groups(n)])
        step = max(1, _BEST_BYTES // (4 * (X.shape[1] // self.V) << (self.L - self.kv)))
        return torch.cat([self._viterbi(X[i:i + step], None if overlap is None else overlap[i:i + step])
                          for i in range(0, n, step)])

    def _kernel_groups(self, n):
        """(first, end, group) row ranges for the kernel: groups of 8 sequences share each table load where
        2^kV >= 16 (1 elsewhere; fastest measured); a remainder goes in the smallest group size that
        holds it, since a short group repeats its last sequence (on small layers, e.g. 4 tiles a block,
        groups of 8 did twice the work)."""
        group = 8 if self.kv >= 4 else 1
        bulk = n - n % group
        parts = [(0, bulk, group)] if bulk else []
        if bulk < n:
            parts.append((bulk, n, next(g for g in (1, 2, 4, 8) if g >= n - bulk)))
        return parts

    def _viterbi(self, X, overlap):
        """Forward pass over the steps, keeping per step only best[t][b] = the cost of the best path
        into any state b 2^kV + c at step t before its own error; the traceback recomputes the 2^kV
        predecessor costs of the state it is at from those (no backpointers).

        Layout: a step's costs are held as M[c, b] (c the kV low bits, b the L - kV high bits), so that
        adding best[b] broadcasts along a contiguous axis. The predecessors of the states b 2^kV + c
        are a 2^(L-kV) + b, a in [0, 2^kV); with L >= 2 kV such a state sits at M[b mod 2^kV,
        a 2^(L-2kV) + b div 2^kV], so the minimum over a is one reduction over an axis of M."""
        L, kv, V = self.L, self.kv, self.V
        n, nb, nc, steps = X.shape[0], 1 << (L - kv), 1 << kv, X.shape[1] // V
        X = X.float().reshape(n, steps, V)
        table, norms = self._table(X.device)
        fT = [table[:, v].view(nb, nc).T.contiguous() for v in range(V)]  # [c, b]
        normsT = norms.view(nb, nc).T.contiguous()
        best = torch.empty(steps, n, nb, device=X.device)
        best[0] = 0.0
        if overlap is not None:  # state_0 = overlap 2^kV + c
            best[0].masked_fill_(torch.arange(nb, device=X.device)[None, :] != overlap[:, None], math.inf)
        cost = torch.empty(n, nc, nb, device=X.device)
        for t in range(steps):
            torch.add(normsT, best[t][:, None, :], out=cost)
            for v in range(V):
                cost.addcmul_(X[:, t, v].view(n, 1, 1), fT[v], value=-2.0)
            if t + 1 < steps:
                low = cost.view(n, nc, nc, nb // nc).amin(2)  # [b' mod 2^kV, b' div 2^kV]
                best[t + 1].view(n, nb // nc, nc).copy_(low.transpose(1, 2))
        final = cost.transpose(1, 2).reshape(n, -1)  # natural state order b 2^kV + c
        if overlap is not None:
            low_bits = torch.arange(1 << L, device=X.device) & (nb - 1)
            final = final.masked_fill(low_bits[None, :] != overlap[:, None], math.inf)
        states = torch.empty(n, steps, dtype=torch.int64, device=X.device)
        s = final.argmin(1)
        states[:, -1] = s
        rows = torch.arange(n, device=X.device)[:, None]
        high = torch.arange(nc, device=X.device) << (L - kv)
        for t in range(steps - 1, 0, -1):
            p = high[None, :] | (s >> kv)[:, None]  # (n, 2^kV) predecessors
            c = best[t - 1][rows, p >> kv] + norms[p]
            for v in range(V):
                c = c - 2.0 * X[:, t - 1, v:v + 1] * table[p, v]
            s = p[rows[:, 0], c.argmin(1)]
            states[:, t - 1] = s
        return states

    def quantize(self, X):
        """Tail-biting trellis quantization of each row of X (n, T): (X_hat (n, T) in X's dtype,
        packed uint8 (n, T k / 8)). QTIP's two passes (module docstring)."""
        if X.dim() != 2 or X.shape[1] != self.T:
            raise UserError(f"{self!r} quantizes (n, {self.T}) tensors, got shape {tuple(X.shape)}")
        # the seam (last step, then step 0) in the middle of a free path over seam_bits L stream bits
        # either side; the last step's low L - kV bits are the overlap
        w = self.seam_steps
        seam = self.viterbi(torch.cat([X[:, (self.steps - w) * self.V:], X[:, :w * self.V]], 1))
        overlap = seam[:, w - 1] & ((1 << (self.L - self.kv)) - 1)
        states = self.viterbi(X, overlap)
        return self.values(states).to(X.dtype), self.pack(states)

    def values(self, states):
        """(n, T) values of state paths (n, T / V)."""
        table, _ = self._table(states.device)
        return table[states].reshape(states.shape[0], self.T)

    # --- bitstreams -------------------------------------------------------------------------------------

    def pack(self, states):
        """Tail-biting state paths (n, T / V) -> their streams (n, T k / 8) uint8: the kV new bits of each
        step, most significant first, bytes big-endian."""
        c = states & ((1 << self.kv) - 1)
        bits = (c[..., None] >> torch.arange(self.kv - 1, -1, -1, device=states.device)) & 1
        bits = bits.reshape(states.shape[0], -1, 8)
        return (bits << torch.arange(7, -1, -1, device=states.device)).sum(-1).to(torch.uint8)

    def unpack(self, packed):
        """Streams (n, T k / 8) uint8 -> states (n, T / V) int64: state_t is the L-bit window of the
        circular stream ending (t + 1) kV bits in, read from the 3 bytes that hold it."""
        nbytes = self.T * self.k // 8
        if packed.dim() != 2 or packed.shape[1] != nbytes or packed.dtype != torch.uint8:
            raise UserError(f"{self!r} streams must be uint8 of shape (n, {nbytes}), got {packed.dtype} "
                            f"{tuple(packed.shape)}")
        p = packed.long()
        ext = torch.cat([p[:, -2:], p, torch.zeros_like(p[:, :2])], 1)  # 16 bits of wrap-around in front
        start = torch.arange(1, self.steps + 1, device=packed.device) * self.kv - self.L + 16
        j, off = start // 8, start % 8
        word = (ext[:, j] << 16) | (ext[:, j + 1] << 8) | ext[:, j + 2]
        return (word >> (24 - self.L - off)) & ((1 << self.L) - 1)

    def decode(self, packed):
        """Values (n, T) float32 of streams (n, T k / 8)."""
        return self.values(self.unpack(packed))
