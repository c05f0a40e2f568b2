"""The abstract codebook: what `quant.quantize_layer` (rounding), `quant.linear.QuantLinear` (storage),
`quant.pv` (code updates), `quant.kernels` (the C++ decode kernel) and `opt.py` ask of a codebook.
One instance per `codebook` name of a layer spec; see the package docstring for the contract."""
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Options:
    """The rounding options of one `quant.quantize_layer` call that a codebook may read."""
    method: object  # the quant.methods.Method being run (its rounding, codebook_options)
    qfn: str  # scalar options: grid kind, columns per grid, greedy passes, stochastic rounding
    groupsize: int
    npasses: int
    unbiased: bool
    lazy_batch: bool  # LDLQ updates in blocks of `blocksize` columns (same result)
    seed: int  # seeds the noise of unbiased rounding
    blocksize: int  # columns per LDLQ update block
    # YAQA: the damped output-side Hessian (rows, rows) of the processed weights; methods with `two_sided`
    # round against tr(E^T h_out E H) with it. None: the one-sided proxy
    h_out: object = None


@dataclass
class Quantized:
    """A codebook's rounding of a processed weight matrix Wp (rows, cols)."""
    w: torch.Tensor  # the rounded weights, Wp's units and dtype
    codes: torch.Tensor  # what `pack` stores (QuantResult.codes)
    scale: torch.Tensor
    zero: torch.Tensor = None
    passes: int = 0  # greedy passes run
    spec: dict = field(default_factory=dict)  # the layer spec's codebook fields: `codebook`, groupsize, its own


class Codebook(ABC):
    """Subclasses set `name` and implement the abstract methods; the rest have defaults for codebooks
    whose code groups are runs of `group` weights along a row."""

    name = None  # the spec's `codebook` field and the registry key
    group = 1  # weights per code group along a row (what `encode` rounds jointly)
    trainable = ("scale",)  # tensors of `shapes` that are nn.Parameters (the rest are frozen buffers)
    scalar_options = False  # takes the scalar methods' qfn, groupsize, greedy passes and unbiased rounding
    costly_encode = False  # an encode costs a search: code updates search only the most promising groups
    # decoding whole weights in torch costs more than the C++ kernel's passes over a prompt in 16-token chunks
    costly_decode = False

    # --- quantization -------------------------------------------------------------------------------

    def for_bits(self, wbits):
        """The member of this codebook's family that codes `wbits` bits per weight."""
        return self

    @abstractmethod
    def quantize(self, Wp, H, wbits, options):
        """Round the processed weights Wp (rows, cols) given the (damped) Hessian H: a `Quantized`."""

    @abstractmethod
    def describe(self, method, qfn):
        """The codebook part of opt.py's one-line run summary."""

    def unit(self, method):
        """What one code covers, for messages (e.g. '8 weights per code')."""
        return "one weight per code"

    # --- storage ------------------------------------------------------------------------------------

    @abstractmethod
    def shapes(self, spec):
        """{tensor name: (shape, dtype)} of a layer with this spec; UserError if the spec is inconsistent."""

    @abstractmethod
    def pack(self, spec, result):
        """{tensor name: tensor} to store for a `quant.QuantResult` (names and shapes as `shapes`)."""

    @abstractmethod
    def decode(self, layer, r0, r1):
        """Rows r0:r1 of the layer's processed weights, float32, differentiable in its parameters."""

    # --- code updates (quant.pv) --------------------------------------------------------------------

    @abstractmethod
    def codes(self, layer, r0, r1):
        """The codes of rows r0:r1, one row per code group (last dim: what a group's code is made of)."""

    @abstractmethod
    def encode(self, layer, target, r0, r1):
        """(codes, values): the codeword nearest to each group of `target` (rows r0:r1 of the processed
        weights, decode's units) under the layer's scales, and the values they decode to."""

    @abstractmethod
    def set_codes(self, layer, codes, r0, r1):
        """Store `codes` (as `codes` returns them) into rows r0:r1 of the layer."""

    def group_size(self, spec):
        """Weights per code group."""
        return self.group

    def group_rows(self, spec):
        """Rows a code group spans (groups tile the matrix row-major)."""
        return 1

    def group_view(self, layer, M):
        """A (rows, cols) matrix as its code groups, flat (groups, group_size), in `codes`' order."""
        return M.reshape(-1, self.group)

    def encode_groups(self, layer, W, index, targets):
        """(codes, values) of the groups `index` of W (group_view of the decoded weights) moved to
        `targets`. Default: encode the whole matrix with them in place (cheap for run encoders)."""
        rows, cols = layer.spec["padded"]
        full = W.clone()
        full[index] = targets
        codes, values = self.encode(layer, full.reshape(rows, cols), 0, rows)
        return codes.reshape(-1, codes.shape[-1])[index], values.reshape(W.shape)[index]

    # --- C++ kernel ---------------------------------------------------------------------------------

    def kernel_layout(self, layer):
        """(codec id, wbits, groupsize, code bits, stage scales, values) of the decode kernel
        `quant/kernels/packed.cpp` (values: a table of code values or None), or None where it has no decoder
        for this layer (the torch path runs)."""
        return None
