"""Lattice vector codebooks of QuIP# (Tseng et al. 2024, "QuIP#: Even Better LLM Quantization with
Hadamard Incoherence and Lattice Codebooks"): 8 weights quantized jointly to one codeword.

Codebooks (`get_codebook(name)`):
- 'e8p' (2 bits/weight): E8P, 2^16 points of the shifted lattice E8 + 1/4, one 16-bit code per 8 weights.
- 'e8p_rvq3' (3 bits): E8P, then the 1-bit E8 codebook (256 points, 8 bits) on the scaled residual.
- 'e8p_rvq4' (4 bits): E8P, then E8P again on the scaled residual.

E8P. E8 = D8 u (D8 + 1/2), D8 the integer vectors of even sum. D8-hat = D8 + 1/2 is the set of
half-integer vectors of even sum, and (D8-hat - 1/4) u (D8-hat + 1/4) = E8 + 1/4. The 256-entry
table of "source" vectors (`E8P_ABS`, entries in {1/2, 3/2, 5/2}) holds the absolute values of the
227 points of D8-hat with squared norm <= 10, in lexicographic order, then 29 patterns of squared
norm 12 (five 3/2 and three 1/2) in QuIP#'s order, so table indices agree with QuIP#'s. Flipping
the sign of one coordinate of a half-integer vector changes its sum by an odd number, so for a
source vector a exactly half of the 2^8 sign patterns land in D8-hat: those whose number of
negative coordinates has the parity of sum(a). The code of the codeword sign * a + shift is
    bits 0-6   sign of coordinates 0..6 (1 = negative); the sign of coordinate 7 follows from the parity
    bit 7      shift: 1 for +1/4, 0 for -1/4
    bits 8-15  index of a in the source table
All 2^16 codewords are distinct, and every value is a multiple of 1/4 (exact in any float type).
QuIP#'s code (lib/codebook/latticee8_padded12.py) spans the same point set with another bit
layout, made for its CUDA kernel: bits 0-7 hold signs for a permuted coordinate order, the shift is
the parity of that byte, and coordinate 7 of odd-sum table entries is stored negated.

Nearest codeword (exact, no 2^16-way search): for each shift t the target y = x - t is matched
against sign * a. For a fixed a the best signs are sign(y), unless their parity is wrong; then the
coordinate with the smallest a_i |y_i| flips, costing 2 min_i a_i |y_i| of the score a . |y|. The 227
norm <= 10 entries are all permutations of 7 count patterns (j entries 5/2, k entries 3/2), so after
sorting |y| the best permutation of each pattern puts the large entries on the large |y_i| and a
wrong parity flips the smallest |y_i|; the 29 norm-12 entries are scored one by one. That is 36
candidates per shift instead of 2^15; a test checks the result against brute force.

E8 1-bit (`E8_1BIT`, QuIP#'s 3-bit residual stage): the 241 points of E8 with squared norm <= 2
(the origin and the 240 roots) and 15 of the 16 points +-2 e_i (all but -2 e_7) to fill 256 codes;
code = table index. Its nearest point is a plain argmax over the 256 entries.

Interface (what quantizers build on):
    cb = get_codebook("e8p_rvq3")         # cb.name, cb.dim == 8, cb.bits == 3, cb.code_bits == [16, 8]
    s = cb.scale_for(W)                   # 0-dim tensor: the matrix scale
    X_hat, codes = cb.quantize(X / s)     # X (n, 8); codes int64 (n, stages)
    cb.decode(codes)                      # (n, 8) float32 (or dtype=...), equal to X_hat
    cb.quantizer(s)                       # X -> (X_hat * s, codes) of X * s: `quant.ldlq.block_ldlq`'s quantize_block
    packed = cb.pack(codes)               # {"codes0": int16 (n,), "codes1": uint8 (n,)}
    cb.unpack(packed)                     # codes again, bit for bit
Stage i quantizes the residual of the stages before it multiplied by `stage_scales[i]` (1 for the
first stage): X_hat = sum_i decode_i(codes[:, i]) / stage_scales[i].

Scales: `scale_for(W)` = RMS(W) / `input_rms`, so the codebook sees X with RMS `input_rms` (QuIP#'s
`opt_scale`). `input_rms` and the residual `stage_scales` minimize the mean squared error per weight
on unit Gaussian 8-vectors (incoherence-processed weights are close to Gaussian): a search in steps
of 0.01 on 2^18 samples, which `python benchmarks/bench_e8p.py --fit` reproduces. Found:
    e8p       input_rms 1.04                      MSE 0.0914  (QuIP#: 1.03, same MSE)
    e8p_rvq3  input_rms 0.98, residual x 2.05     MSE 0.0295  (QuIP#: 0.98, 2.04, same MSE)
    e8p_rvq4  input_rms 0.89, residual x 3.86     MSE 0.0083  (QuIP#: 1.03, 3.45, MSE 0.0096)
At 4 bits a smaller first stage (less overload, finer second stage) is clearly better than QuIP#'s
constants, which do not beat the optimal scalar quantizer (0.0095).
"""
import itertools

import torch

from engine import UserError

DIM = 8

# The 29 squared-norm-12 source vectors (five 3/2, three 1/2), QuIP#'s order: the positions of their 1/2s.
_NORM12_HALVES = ("123", "023", "013", "012", "367", "357", "347", "356", "346", "345", "267", "257", "247",
                  "256", "246", "245", "167", "157", "147", "156", "146", "045", "067", "057", "047", "056",
                  "046", "014", "237")


def _abs_table():
    small = [p for p in itertools.product((0.5, 1.5, 2.5), repeat=DIM) if sum(v * v for v in p) <= 10]
    norm12 = [[0.5 if str(i) in halves else 1.5 for i in range(DIM)] for halves in _NORM12_HALVES]
    return torch.tensor(small + norm12, dtype=torch.float64)


def _e8_1bit_table():
    ints = [p for p in itertools.product((-1, 0, 1), repeat=DIM) if sum(p) % 2 == 0 and sum(v * v for v in p) <= 2]
    halves = [p for p in itertools.product((-0.5, 0.5), repeat=DIM) if sum(p) % 2 == 0]
    twos = [[2.0 * sign * (i == j) for j in range(DIM)] for sign in (1, -1) for i in range(DIM)][:-1]
    return torch.tensor(ints + halves + twos, dtype=torch.float64)


E8P_ABS = _abs_table()  # (256, 8)
E8_1BIT = _e8_1bit_table()  # (256, 8)
_ABS_ODD = (E8P_ABS.sum(1) % 2).to(torch.bool)  # parity of sum(a): the parity of the number of negative signs
_N_SMALL = 227
# The 7 count patterns of the norm <= 10 entries, as values by rank of |y| (largest first).
_PATTERNS = [(j, k) for j in (0, 1) for k in range(5 - 3 * j)]
_RANKED = torch.tensor([[2.5] * j + [1.5] * k + [0.5] * (DIM - j - k) for j, k in _PATTERNS], dtype=torch.float64)
_RANKED_ODD = torch.tensor([k % 2 == 1 for _, k in _PATTERNS])
_NORM12 = E8P_ABS[_N_SMALL:]
# Source-table index of an abs pattern, by its base-3 key sum_i (2 a_i - 1) / 2 * 3^i.
_POW3 = 3 ** torch.arange(DIM)
_KEY_TO_INDEX = torch.full((3 ** DIM,), -1, dtype=torch.int64)
_KEY_TO_INDEX[((E8P_ABS - 0.5).long() * _POW3).sum(1)] = torch.arange(len(E8P_ABS))
_CHUNK = 1 << 15  # vectors per pass of the nearest search (bounds its temporaries)


class _Tables:
    """CPU float64 tables, with their copies on the device and dtype last asked for."""

    def __init__(self, **tables):
        self.cpu, self._key, self._cast = tables, None, None

    def on(self, device, dtype):
        if (device, dtype) != self._key:
            self._key = (device, dtype)
            self._cast = {k: t.to(device, dtype if t.is_floating_point() else t.dtype) for k, t in self.cpu.items()}
        return self._cast


class E8P:
    """The 2-bit E8P stage: 16-bit codes (layout in the module docstring)."""
    bits = 16

    def __init__(self):
        self._t = _Tables(abs=E8P_ABS, odd=_ABS_ODD, ranked=_RANKED, ranked_odd=_RANKED_ODD,
                          norm12=_NORM12, key=_KEY_TO_INDEX, pow3=_POW3)

    def decode(self, codes, dtype=torch.float32):
        """A gather from the full 2^16 x 8 codebook (2 MB in fp32), built once per device and dtype
        from the bit layout (`_decode_bits`): the packed-model forward decodes every weight each time."""
        key = (codes.device, dtype)
        if getattr(self, "_full_key", None) != key:
            self._full_key = key
            self._full = self._decode_bits(torch.arange(1 << 16, device=codes.device), dtype)
        return self._full.index_select(0, codes)

    def _decode_bits(self, codes, dtype):
        t = self._t.on(codes.device, dtype)
        index = codes >> 8
        neg = (codes[:, None] >> torch.arange(7, device=codes.device)) & 1
        neg7 = (neg.sum(1) + t["odd"][index]) % 2
        sign = 1 - 2 * torch.cat([neg, neg7[:, None]], 1)
        shift = torch.where(((codes >> 7) & 1) == 1, 0.25, -0.25).to(dtype)
        return t["abs"][index] * sign + shift[:, None]

    def nearest(self, x):
        """Nearest codeword of every row of x (n, 8): (reconstruction, codes)."""
        hats, codes = zip(*(self._nearest(c) for c in x.split(_CHUNK)))
        return torch.cat(hats), torch.cat(codes)

    def _nearest(self, x):
        """The nearest codeword of each shift, then the closer of the two."""
        lo, lo_code = self._nearest_d8hat(x + 0.25)
        hi, hi_code = self._nearest_d8hat(x - 0.25)
        lo, hi = lo - 0.25, hi + 0.25
        up = (x - hi).square().sum(1) < (x - lo).square().sum(1)
        return torch.where(up[:, None], hi, lo), torch.where(up, hi_code | (1 << 7), lo_code)

    def _nearest_d8hat(self, y):
        """Nearest sign * a (a a source vector, signs of the right parity) to every row of y: the point
        and its code without the shift bit. The score to maximize is 2 (sign * a) . y - |a|^2."""
        t = self._t.on(y.device, y.dtype)
        u = y.abs()
        neg = y < 0
        odd = neg.sum(1) % 2 == 1
        us, order = u.sort(1, descending=True)
        # The 7 permutation classes: sorted assignment; a wrong parity flips the smallest |y_i| (its a_i is 1/2).
        wrong_r = odd[:, None] != t["ranked_odd"][None, :]
        score_r = us @ t["ranked"].T - wrong_r * us[:, -1:]
        gain_r = 2 * score_r - t["ranked"].square().sum(1)
        # The 29 norm-12 entries (odd sum): a wrong parity flips the coordinate with the smallest a_i |y_i|.
        P = t["norm12"]
        au_min = u[:, :1] * P[:, 0]
        for i in range(1, DIM):
            au_min = torch.minimum(au_min, u[:, i:i + 1] * P[:, i])
        wrong_e = ~odd
        score_e = u @ P.T - wrong_e[:, None] * (2 * au_min)
        gain_e = 2 * score_e - 12
        pick = torch.cat([gain_r, gain_e], 1).argmax(1)
        ranked = pick < len(_PATTERNS)
        r, e = pick.clamp(max=len(_PATTERNS) - 1), (pick - len(_PATTERNS)).clamp(min=0)
        a = torch.where(ranked[:, None], torch.zeros_like(u).scatter(1, order, t["ranked"][r]), P[e])
        flip = torch.where(ranked, order[:, -1], (u * P[e]).argmin(1))
        wrong = torch.where(ranked, wrong_r.gather(1, r[:, None])[:, 0], wrong_e)
        neg = neg ^ (torch.nn.functional.one_hot(flip, DIM).bool() & wrong[:, None])
        index = t["key"][((a - 0.5).long() * t["pow3"]).sum(1)]
        code = (index << 8) | (neg[:, :7].long() << torch.arange(7, device=y.device)).sum(1)
        return torch.where(neg, -a, a), code


class E8OneBit:
    """The 1-bit E8 stage: 8-bit codes, the index into `E8_1BIT`."""
    bits = 8

    def __init__(self):
        self._t = _Tables(grid=E8_1BIT)

    def decode(self, codes, dtype=torch.float32):
        return self._t.on(codes.device, dtype)["grid"].index_select(0, codes)

    def nearest(self, x):
        grid = self._t.on(x.device, x.dtype)["grid"]
        code = (2 * x @ grid.T - grid.square().sum(1)).argmax(1)
        return grid[code], code


class VectorCodebook:
    """A residual vector quantizer of 8-vectors (see the module docstring): `stages` quantize in turn,
    stage i the residual of the stages before it times `stage_scales[i]`."""
    dim = DIM

    def __init__(self, name, stages, input_rms, stage_scales):
        self.name, self.stages = name, stages
        self.input_rms, self.stage_scales = input_rms, stage_scales
        self.code_bits = [s.bits for s in stages]
        self.bits = sum(self.code_bits) // DIM

    def __repr__(self):
        return f"VectorCodebook({self.name!r}, {self.bits} bits/weight, code bits {self.code_bits})"

    def scale_for(self, W, dim=None):
        """The scale s: quantize W / s, reconstruct X_hat * s. One for the matrix (0-dim), or with
        `dim=1` one per row ((rows, 1))."""
        if dim is None:
            return W.square().mean().sqrt() / self.input_rms + 1e-16
        return W.square().mean(dim, keepdim=True).sqrt() / self.input_rms + 1e-16

    def quantizer(self, scale):
        """The function X -> (reconstruction, codes) for X in the weight's own units (X / scale is
        quantized): what `quant.ldlq.block_ldlq` takes as quantize_block."""
        def quantize_block(X):
            X_hat, codes = self.quantize(X / scale)
            return X_hat * scale, codes
        return quantize_block

    def quantize(self, X):
        """Nearest codeword stage by stage for X (n, 8), already divided by the matrix scale:
        (X_hat (n, 8) in X's dtype, codes int64 (n, stages))."""
        if X.dim() != 2 or X.shape[1] != DIM:
            raise UserError(f"{self.name} quantizes (n, {DIM}) tensors, got shape {tuple(X.shape)}")
        work = X if X.dtype == torch.float64 else X.float()
        X_hat = torch.zeros_like(work)
        codes = []
        for stage, m in zip(self.stages, self.stage_scales):
            q, c = stage.nearest((work - X_hat) * m)
            X_hat = X_hat + q / m
            codes.append(c)
        return X_hat.to(X.dtype), torch.stack(codes, 1)

    def decode(self, codes, dtype=torch.float32):
        """Reconstruction (n, 8) from codes (n, stages); bit for bit `quantize`'s X_hat of that dtype."""
        self._check_codes(codes)
        X_hat = 0
        for i, (stage, m) in enumerate(zip(self.stages, self.stage_scales)):
            X_hat = X_hat + stage.decode(codes[:, i], dtype) / m
        return X_hat

    def pack(self, codes):
        """Stage i's codes as "codes{i}": int16 (16-bit codes, two's-complement reinterpretation of the
        unsigned value) or uint8 (8-bit codes)."""
        self._check_codes(codes)
        out = {}
        for i, bits in enumerate(self.code_bits):
            c = codes[:, i]
            out[f"codes{i}"] = ((c ^ 0x8000) - 0x8000).to(torch.int16) if bits == 16 else c.to(torch.uint8)
        return out

    def unpack(self, packed):
        """Inverse of `pack`: int64 codes (n, stages)."""
        missing = [f"codes{i}" for i in range(len(self.stages)) if f"codes{i}" not in packed]
        if missing:
            raise UserError(f"packed {self.name} codes lack {', '.join(missing)}")
        return torch.stack([packed[f"codes{i}"].long() & ((1 << bits) - 1)
                            for i, bits in enumerate(self.code_bits)], 1)

    def _check_codes(self, codes):
        if codes.dim() != 2 or codes.shape[1] != len(self.stages) or codes.dtype != torch.int64:
            raise UserError(f"{self.name} codes must be int64 of shape (n, {len(self.stages)}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")
        for i, bits in enumerate(self.code_bits):
            if codes.numel() and (int(codes[:, i].min()) < 0 or int(codes[:, i].max()) >= 1 << bits):
                raise UserError(f"{self.name} stage {i} codes must lie in [0, {1 << bits})")


CODEBOOKS = ("e8p", "e8p_rvq3", "e8p_rvq4")


def get_codebook(name):
    """The codebook called `name` (one of CODEBOOKS)."""
    if name == "e8p":
        return VectorCodebook(name, [E8P()], 1.04, [1.0])
    if name == "e8p_rvq3":
        return VectorCodebook(name, [E8P(), E8OneBit()], 0.98, [1.0, 2.05])
    if name == "e8p_rvq4":
        return VectorCodebook(name, [E8P(), E8P()], 0.89, [1.0, 3.86])
    raise UserError(f"unknown codebook {name!r}; choose one of {', '.join(CODEBOOKS)}")
