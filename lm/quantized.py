"""Packed low-bit checkpoints: save a model whose linear layers are `quant.QuantLinear`s, and load it back.

A directory written by `save_quantized` holds
- `config.json`: the model's HF config plus `quantization_config` (below), with model_type "rlo" and
  the family's own type under "rlo_base_model_type", `auto_map` naming `rlo_loader.py`, and
  "transformers_weights" set to a sentence that stops class-level loads of plain transformers;
- `rlo_loader.py` (a copy of `lm/rlo_loader.py`): what lets transformers load the directory (see there);
- `model.safetensors`: the state dict as it is: per quantized linear only its packed codes, scales
  (and zero points, in_scale/out_scale, bias), never a dense copy of the weight; every other tensor
  (embeddings, norms, head) in full precision. Tied tensors are stored once;
- the tokenizer files.

`quantization_config` = {"quant_method": "rlo", "format": FORMAT, "method", "wbits", "options",
"layers": {module name: QuantLinear spec}}, where a spec names the codebook, bit width, original and
padded shapes, rotation kind and seed (the rotations are regenerated, not stored), and the grid's
qfn/groupsize.

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
from safetensors.torch import load_model, save_model
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
    """Swap each named nn.Linear of `model` for an empty `QuantLinear` with that spec."""
    from quant.linear import QuantLinear

    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise UserError(f"quantization_config names layer {name!r}, which this model does not have") from None
        if list(spec["shape"]) != [old.out_features, old.in_features]:
            raise UserError(f"quantization_config: layer {name!r} is {spec['shape']}, the model's is "
                            f"{[old.out_features, old.in_features]}")
        setattr(parent, child, QuantLinear(spec, bias=biases.get(name, old.bias is not None)))


def quantization_specs(model):
    """{module name: spec} of every QuantLinear in `model` (after finetuning, with its added scales)."""
    from quant.linear import QuantLinear

    return {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model, tokenizer, path, quantization_config):
    """Write the packed checkpoint through `engine.atomic_dir`: a crash never leaves a half-written file."""
    qc = dict(quantization_config, quant_method="rlo", format=FORMAT, layers=quantization_specs(model))
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
        save_model(model, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "rlo": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


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
