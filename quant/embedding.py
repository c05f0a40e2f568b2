"""Quantized token embeddings and LM heads.

At 2 bits the decoder layers of a small model are a fraction of its file: SmolLM2-135M's tied 49,152 x 576
embedding alone is 57 MB in 16-bit, twice the size of its 30 decoder layers. `quantize_embeddings` rounds the
table to an affine grid of 4 or 8 bits with per-row (or per-group) scales and zero points (round to nearest:
the embedding lookup has no input Hessian, and the tied head shares its codes) and holds it as a grid
`QuantLinear` without rotation:

- the head's matmul runs through that `QuantLinear` (the same packed path, kernels and finetuning as every
  quantized layer; QFT trains its scales, and with them the embedding rows);
- the embedding becomes a `QuantEmbedding` that decodes only the rows it looks up, from the head's codes when
  the model ties them (stored once), else from a table of its own (its child `table`).

In the packed format's `layers`, the head (or the embedding's own table) is an ordinary grid spec and the
embedding is {"kind": "embedding", "tied_to": head name or None} (plus the table's spec when untied).
"""
import torch
from torch import nn

from engine import UserError

from .grid import make_grid
from .linear import QuantLinear

EMBED_BITS = (4, 8)
KIND = "embedding"


class _GridTable:
    """What `QuantLinear.from_result` reads of a quantization result (grid codes, no rotation)."""

    def __init__(self, codes, scale, zero, spec):
        self.codes, self.scale, self.zero, self.spec, self.rescale = codes, scale, zero, spec, None


def check_groupsize(bits, groupsize):
    """--embed-groupsize: -1 (one scale per row) or a positive size, and only with --embed-bits."""
    if groupsize != -1 and (bits is None or groupsize <= 0):
        raise UserError(f"--embed-groupsize {groupsize}: give -1 or a positive size, with --embed-bits")


@torch.no_grad()
def quantize_table(W, wbits, groupsize=-1):
    """(QuantLinear, relative squared error) of the (rows, cols) table W rounded to the nearest value of a
    per-row (groupsize -1) or per-group min/max grid of `wbits` bits."""
    if wbits not in EMBED_BITS:
        raise UserError(f"embedding bits must be one of {', '.join(map(str, EMBED_BITS))}, got {wbits}")
    W = W.detach().float()
    rows, cols = W.shape
    if groupsize != -1 and (groupsize <= 0 or cols % groupsize):
        raise UserError(f"embedding groupsize {groupsize} must be -1 (whole rows) or divide the width {cols}")
    grid = make_grid(W, wbits, "a", groupsize)
    Wq = grid.round(W)
    step = cols if groupsize == -1 else groupsize
    spec = dict(shape=[rows, cols], padded=[rows, cols], wbits=wbits, rotation=None, seed=0, in_scale=False,
                codebook="grid", qfn="a", groupsize=groupsize)
    table = QuantLinear.from_result(_GridTable(grid.codes(Wq), grid.scale[:, ::step].contiguous(),
                                               grid.zero[:, ::step].contiguous(), spec))
    return table, float((Wq - W).square().sum() / W.square().sum().clamp(min=1e-30))


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup from the grid codes of a `QuantLinear` table (vocab, dim): only the looked-up
    rows are decoded, with the table's in/out scales, in the dtype the model runs in."""

    def __init__(self, spec, dtype=torch.float32):
        super().__init__()
        self.spec = dict(spec)
        self.output_dtype = dtype
        if spec.get("tied_to") is None:
            self.table = QuantLinear({k: v for k, v in spec.items() if k not in ("kind", "tied_to")})
            self.num_embeddings, self.embedding_dim = self.table.out_features, self.table.in_features
        else:
            object.__setattr__(self, "_tied", None)  # set by `tie`

    def tie(self, head):
        if head.spec["codebook"] != "grid" or head.spec.get("rotation") is not None:
            raise UserError("a quantized embedding reads a grid table without rotation; "
                            f"its head {self.spec['tied_to']!r} is {head.spec['codebook']} / {head.spec.get('rotation')}")
        object.__setattr__(self, "_tied", head)  # not a child: its tensors belong to the head alone
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight_table(self):
        return self._tied if self.spec.get("tied_to") is not None else self.table

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() change the dtype the lookups return, as they would an nn.Embedding's weight
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        return super()._apply(fn, recurse)

    def current_spec(self):
        """The spec to save: the untied table's live spec (finetuning may have added channel scales)."""
        if self.spec.get("tied_to") is not None:
            return dict(kind=KIND, tied_to=self.spec["tied_to"])
        return dict(self.table.spec, kind=KIND, tied_to=None)

    def forward(self, ids):
        t = self.weight_table
        if t is None:
            raise RuntimeError("QuantEmbedding used before its tied head was attached")
        rows = ids.reshape(-1)
        w = t.codebook.decode_rows(t, rows)
        if t.in_scale is not None:
            w = w * t.in_scale
        if t.out_scale is not None:
            w = w * t.out_scale[rows, None]
        return w.to(self.output_dtype).reshape(*ids.shape, w.shape[-1])

    @torch.no_grad()
    def dequantize(self):
        return self.weight_table.dequantize()

    def extra_repr(self):
        t = self.weight_table
        return (f"{self.num_embeddings}, {self.embedding_dim}, wbits={t.spec['wbits']}, groupsize={t.spec['groupsize']}, "
                f"tied_to={self.spec.get('tied_to')!r}")


def _module_name(model, module):
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def quantize_embeddings(model, wbits, groupsize=-1):
    """Replace the model's input embedding (and its output head) by quantized ones, in place. A tied head
    becomes the grid QuantLinear that both read; an untied one is quantized on its own grid. Returns
    {"tied", "embedding_error", "head_error"} (relative squared errors)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise UserError(f"--embed-bits: the input embedding is a {type(emb).__name__}, not an nn.Embedding")
    emb_name = _module_name(model, emb)
    dtype = emb.weight.dtype
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    info = {"tied": tied}
    if head is not None:
        head_name = _module_name(model, head)
        table, info["head_error"] = quantize_table(head.weight, wbits, groupsize)
        if getattr(head, "bias", None) is not None:
            raise UserError(f"--embed-bits: the head {head_name!r} has a bias; quantized heads have none")
        model.set_submodule(head_name, table)
    if tied:
        q_emb = QuantEmbedding(dict(kind=KIND, tied_to=head_name), dtype)
        q_emb.tie(table)
        info["embedding_error"] = info["head_error"]
    else:
        own, info["embedding_error"] = quantize_table(emb.weight, wbits, groupsize)
        q_emb = QuantEmbedding(dict(own.spec, kind=KIND, tied_to=None), dtype)
        q_emb.table = own
    model.set_submodule(emb_name, q_emb)
    if tied:  # transformers must not re-tie a head that is no longer an nn.Linear with a weight
        model.config.tie_word_embeddings = False
    return info

