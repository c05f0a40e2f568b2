"""Packed low-bit checkpoints: save a model whose linear layers are `quant.QuantLinear`s, and load it back.

A directory written by `save_quantized` holds
- `config.json`: the model's HF config plus `quantization_config` (below), with model_type "rlo" and
  the family's own type under "rlo_base_model_type", `auto_map` naming `rlo_loader.py`, and
  "transformers_weights" set to a sentence that stops class-level loads of plain transformers;
- `rlo_loader.py` (a copy of `lm/rlo_loader.py`): what lets transformers load the directory (see there);
- `model.safetensors`: per quantized linear only its packed codes, float32 scales (and zero points,
  in_scale/out_scale, bias), never a dense copy of the weight; every other tensor (embeddings, norms, an
  unquantized head) in `stored_dtype` (float16 unless asked). Tied tensors are stored once;
- the tokenizer files.

`quantization_config` = {"quant_method": "rlo", "format": FORMAT, "method", "wbits", "options",
"stored_dtype", "layers": {module name: spec}}, where a QuantLinear's spec names the codebook, bit width,
original and padded shapes, rotation kind and seed (the rotations are regenerated, not stored), and the
grid's qfn/groupsize; a quantized embedding's spec is {"kind": "embedding", "tied_to": the head whose grid
codes it reads} or, untied, its own grid table's spec (`quant.embedding`).

Two loaders read it: `load_quantized(DIR)` (what `lm.load_causal_lm` dispatches to; it checks every
stored tensor against the config), and, once `lm` is imported, transformers' own
`AutoModelForCausalLM.from_pretrained(DIR)` through the quantizer of `lm.hf_quantizer`. Without the
toolkit imported, transformers refuses the directory instead of loading random linears: the Auto
classes and pipeline for model_type "rlo", class-level loads (LlamaForCausalLM...) for
"transformers_weights" (see `lm.rlo_loader`). Directories written before either change load the same.
"""
import json
import os
import shutil
import types

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine import UserError, atomic_dir

from .load import _DTYPE_KW, quiet_hub
from .rlo_loader import packed_config_dict

FORMAT = "rlo-packed-v1"
WEIGHTS = "model.safetensors"


def is_quantized_dir(path):
    """True when `path` is a directory whose config.json carries an RLO quantization_config."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        qc = json.load(f).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "rlo"


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


def _unquantized_names(model):
    """Names of the state dict's floating-point tensors outside the quantized layers (what `stored_dtype` applies to)."""
    from quant.embedding import QuantEmbedding
    from quant.linear import QuantLinear

    exact = {f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))
             for k in m.state_dict()}
    return {k for k, t in model.state_dict().items() if t.is_floating_point() and k not in exact}


def packed_tensors(model, dtype=torch.float16):
    """The tensors a packed checkpoint stores: each quantized layer's own (codes, float32 scales) as they are,
    every other floating-point tensor (embeddings, norms, an unquantized head) in `dtype`, tied tensors once."""
    cast = _unquantized_names(model)
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
    for name in _unquantized_names(model):
        state[name].copy_(state[name].to(STORED_DTYPES[dtype]))


STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def save_quantized(model, tokenizer, path, quantization_config, dtype=None):
    """Write the packed checkpoint through `engine.atomic_dir`: a crash never leaves a half-written file.
    `dtype` (a name of STORED_DTYPES): what the tensors outside the quantized layers are stored in; default the
    config's `stored_dtype` (a packed model saved again keeps its choice), else float16."""
    dtype = dtype or quantization_config.get("stored_dtype") or "float16"
    if dtype not in STORED_DTYPES:
        raise UserError(f"stored dtype must be one of {', '.join(STORED_DTYPES)}, got {dtype!r}")
    qc = dict(quantization_config, quant_method="rlo", format=FORMAT, layers=quantization_specs(model), stored_dtype=dtype)
    with atomic_dir(path) as tmp:
        model.config.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        config["quantization_config"] = qc
        # plain transformers must neither know the type nor find the weights: it would build random linears
        config = packed_config_dict(config)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rlo_loader.py"),
                        os.path.join(tmp, "rlo_loader.py"))
        save_file(packed_tensors(model, STORED_DTYPES[dtype]), os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "rlo": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def directory_bytes(path):
    """Bytes of every file in the directory `path` (what a user downloads or keeps on disk)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _save_packed(model, save_directory, is_main_process=True, push_to_hub=False, **kwargs):
    """A packed model's `save_pretrained`: the packed checkpoint (always one model.safetensors; state_dict,
    sharding and serialization options do not apply). The tokenizer is saved apart, as with transformers."""
    if push_to_hub:
        raise ValueError("save the packed model to a local directory, then upload that directory")
    if is_main_process:
        save_quantized(model, None, save_directory, model.rlo_quantization)


def mark_packed(model, quantization):
    """Tag a loaded packed model: `rlo_quantization` (method, wbits, options) and a `save_pretrained` that
    writes the packed format (transformers' own would write a config that loads random linears)."""
    model.rlo_quantization = quantization
    model.save_pretrained = types.MethodType(_save_packed, model)
    return model


def save_pretrained(model, tokenizer, path):
    """The one atomic save of a model that `load_causal_lm` reads: packed again when it came from a packed
    directory (`rlo_quantization`), else transformers' save_pretrained (safetensors) and the tokenizer."""
    if hasattr(model, "rlo_quantization"):
        return save_quantized(model, tokenizer, path, model.rlo_quantization)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _stored_shapes(weights):
    """{name: shape} of a safetensors file, read from its header."""
    try:
        with safe_open(weights, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights!r} is not a readable safetensors file ({err})") from None


def _check_tensors(model, weights, stored):
    """One UserError line when the stored tensors do not match what the config describes."""
    expected = model.state_dict()
    # tied tensors (embedding and head) are stored once, under either name
    stored_ptrs = {expected[k].data_ptr() for k in stored if k in expected}
    problems = [f"missing {k}" for k, v in expected.items() if k not in stored and v.data_ptr() not in stored_ptrs]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    for k, shape in stored.items():
        if k in expected and shape != tuple(expected[k].shape):
            problems.append(f"{k} has shape {list(shape)}, the config implies {list(expected[k].shape)}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{weights!r} does not match its quantization_config: {'; '.join(problems[:3])}{more}")


def load_quantized(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a `save_quantized` directory, its linears rebuilt as QuantLinears."""
    if not is_quantized_dir(path):
        raise UserError(f"{path!r} is not a packed quantized checkpoint (no config.json with an rlo "
                        "quantization_config); write one with `opt.py ... --save DIR`")
    config = AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    del config.quantization_config  # our format, not one transformers' quantizers know
    if qc.get("format") != FORMAT:
        raise UserError(f"{path!r}: quantization format {qc.get('format')!r}, expected {FORMAT!r}")
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise UserError(f"{path!r} has no {WEIGHTS}; the packed codes and weights go there")
    model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KW: dtype})
    stored = _stored_shapes(weights)
    replace_linears(model, qc["layers"], {n: f"{n}.bias" in stored for n in qc["layers"]})
    _check_tensors(model, weights, stored)
    load_model(model, weights, strict=False)
    model.tie_weights()
    mark_packed(model, {k: v for k, v in qc.items() if k not in ("layers", "quant_method", "format")})
    with quiet_hub():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer
