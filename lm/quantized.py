"""Packed low-bit checkpoints in memory and on disk: build the QuantLinears a quantization_config names, and
write a model whose linear layers are `quant.QuantLinear`s as a packed directory.

A directory written by `save_quantized` holds
- `config.json`: the model's HF config plus `quantization_config` (below), with model_type "rlo" and
  the family's own type under "rlo_base_model_type", `auto_map` naming `rlo_loader.py`, and
  "transformers_weights" set to a sentence that stops class-level loads of plain transformers
  (`lm.checkpoint`);
- `rlo_loader.py` (a copy of `lm/rlo_loader.py`): what lets transformers load the directory (see there);
- `model.safetensors`: per quantized linear only its packed codes and zero points (exact), its scales
  (in_scale/out_scale, bias) in `stored_dtype`, never a dense copy of the weight; every other tensor
  (embeddings, norms, an unquantized head) in `stored_dtype` too (float16 unless asked). Tied tensors are
  stored once;
- the tokenizer files.

`quantization_config` = {"quant_method": "rlo", "format": FORMAT, "method", "wbits", "options",
"stored_dtype", "layers": {module name: spec}}, where a QuantLinear's spec names the codebook, bit width,
original and padded shapes, rotation kind and seed (the rotations are regenerated, not stored), and the
grid's qfn/groupsize; a quantized embedding's spec is {"kind": "embedding", "tied_to": the head whose grid
codes it reads} or, untied, its own grid table's spec (`quant.embedding`).

One loader reads it: transformers' `from_pretrained(DIR)` through the quantizer of `lm.hf_quantizer`
(`lm.load_causal_lm` and `lm.load_quantized` call it), which checks every stored tensor against the
config (`check_tensors`). Without the toolkit imported, transformers refuses the directory instead of
loading random linears: the Auto classes and pipeline for model_type "rlo", class-level loads
(LlamaForCausalLM...) for "transformers_weights" (see `lm.checkpoint`). Directories written before either
change load the same.
"""
import os

import torch
from safetensors.torch import save_file

from engine import UserError, atomic_dir

from .checkpoint import FORMAT, QUANT_METHOD, STORED_DTYPES, WEIGHTS, write_packed_config


def replace_linears(model, specs, biases):
    """Swap each named nn.Linear of `model` for an empty `QuantLinear` with that spec, and each named
    nn.Embedding with an "embedding" spec for a `QuantEmbedding` (tied to its head's codes, or with a table
    of its own)."""
    from quant.embedding import KIND, QuantEmbedding
    from quant.linear import QuantLinear

    embeddings = {}
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise UserError(f"quantization_config names layer {name!r}, which this model does not have") from None
        embedding = spec.get("kind") == KIND
        shape = [old.num_embeddings, old.embedding_dim] if embedding else [old.out_features, old.in_features]
        if "shape" in spec and list(spec["shape"]) != shape:
            raise UserError(f"quantization_config: layer {name!r} is {spec['shape']}, the model's is {shape}")
        if embedding:
            new = embeddings[name] = QuantEmbedding(spec, old.weight.dtype)
        else:
            new = QuantLinear(spec, bias=biases.get(name, old.bias is not None))
        setattr(parent, child, new)
    for name, embedding in embeddings.items():
        head_name = embedding.spec.get("tied_to")
        if head_name is not None:
            head = model.get_submodule(head_name) if head_name in specs else None
            if not isinstance(head, QuantLinear):
                raise UserError(f"quantization_config: embedding {name!r} is tied to {head_name!r}, which is not "
                                "a quantized layer of the config")
            embedding.tie(head)


def quantization_specs(model):
    """{module name: spec} of every QuantLinear and QuantEmbedding in `model` (after finetuning, with its
    added scales); an untied embedding's own table is part of the embedding's spec."""
    from quant.embedding import QuantEmbedding
    from quant.linear import QuantLinear

    specs, tables = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            specs[name] = module.current_spec()
            tables.add(f"{name}.table")
        elif isinstance(module, QuantLinear) and name not in tables:
            specs[name] = module.spec
    return specs


def _stored_dtype_names(model):
    """Names of the state dict's floating-point tensors other than the quantized layers' frozen code buffers
    (codes and zero points, kept exact): what `stored_dtype` applies to. A quantized layer's scales are among
    them: 16 bits change a 2-bit weight by a relative 5e-4 (float16) and halve their bytes."""
    from quant.embedding import QuantEmbedding
    from quant.linear import QuantLinear

    exact = {f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))
             for k, _ in m.named_buffers()}
    return {k for k, t in model.state_dict().items() if t.is_floating_point() and k not in exact}


def packed_tensors(model, dtype=torch.float16):
    """The tensors a packed checkpoint stores: the quantized layers' codes and zero points as they are, every
    other floating-point tensor (their scales, embeddings, norms, an unquantized head) in `dtype`, tied tensors
    once."""
    cast = _stored_dtype_names(model)
    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = (t.to(dtype) if name in cast else t).detach().contiguous()
    return tensors


@torch.no_grad()
def round_to_stored(model, dtype):
    """Round the tensors outside the quantized layers to `dtype` (a name of STORED_DTYPES) in place, keeping
    their own dtype: the in-memory model becomes the one its packed file holds, so what is evaluated is
    what is saved."""
    state = model.state_dict()
    for name in _stored_dtype_names(model):
        state[name].copy_(state[name].to(STORED_DTYPES[dtype]))


def save_quantized(model, tokenizer, path, quantization_config, dtype=None):
    """Write the packed checkpoint through `engine.atomic_dir`: a crash never leaves a half-written file.
    `dtype` (a name of STORED_DTYPES): what the tensors outside the quantized layers are stored in; default the
    config's `stored_dtype` (a packed model saved again keeps its choice), else float16."""
    dtype = dtype or quantization_config.get("stored_dtype") or "float16"
    if dtype not in STORED_DTYPES:
        raise UserError(f"stored dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    qc = dict(quantization_config, quant_method=QUANT_METHOD, format=FORMAT, layers=quantization_specs(model),
              stored_dtype=dtype)
    with atomic_dir(path) as tmp:
        # plain transformers must neither know the type nor find the weights: it would build random linears
        write_packed_config(model.config, qc, tmp)
        save_file(packed_tensors(model, STORED_DTYPES[dtype]), os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "rlo": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def directory_bytes(path):
    """Bytes of every file in the directory `path` (what a user downloads or keeps on disk)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def save_pretrained(model, tokenizer, path):
    """The one atomic save of a model that `load_causal_lm` reads: packed again when it came from a packed
    directory (`rlo_quantization`), else transformers' save_pretrained (safetensors) and the tokenizer."""
    if hasattr(model, "rlo_quantization"):
        return save_quantized(model, tokenizer, path, model.rlo_quantization)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def check_tensors(model, weights, stored):
    """One UserError line when the stored tensors ({name: shape}, `checkpoint.stored_shapes`) do not match the
    tensors of `model`, built from the quantization_config (on any device, the meta device too)."""
    expected = model.state_dict(keep_vars=True)
    # tied tensors (embedding and head) are stored once under either name: tied already (one parameter), or
    # to be tied by transformers once loaded (all_tied_weights_keys: {target: source})
    stored_ids = {id(expected[k]) for k in stored if k in expected}
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    tied = {a for pair in ties.items() for a, b in (pair, pair[::-1]) if b in stored}
    problems = [f"missing {k}" for k, v in expected.items()
                if k not in stored and k not in tied and id(v) not in stored_ids]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    for k, shape in stored.items():
        if k in expected and shape != tuple(expected[k].shape):
            problems.append(f"{k} has shape {list(shape)}, the config implies {list(expected[k].shape)}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{weights!r} does not match its quantization_config: {'; '.join(problems[:3])}{more}")
