"""Load a causal LM and its tokenizer: a hub name or a local directory (transformers Auto classes), a packed
quantized directory (through the quantizer of `lm.hf_quantizer`), a GGUF file (`lm.gguf`) or a llama2.c
checkpoint (`lm.llama2c`).

Anything the user can fix (a missing directory, an uncached hub name while offline, a model that is
not a causal LM) becomes one `engine.UserError` line that says what to put where.
"""
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from engine import UserError

from . import hf_quantizer  # noqa: F401  (registers the loader of packed directories with transformers)
from .checkpoint import (DTYPE_KW, WEIGHTS, WHERE, cached_on_hub, is_quantized_dir, looks_local, not_found, offline,
                         quiet_hub, stored_shapes)


def load_causal_lm(name_or_path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) for a hub name or a local directory (a packed quantized one too, see
    `load_quantized`), a GGUF file or a directory holding one (see `lm.gguf`) or a llama2.c `.bin` file
    (see `lm.llama2c`); the model is in eval mode on `device`."""
    # lm.gguf and lm.llama2c are imported here: a module-level import would warn when `python -m` runs them
    from .gguf import find_gguf, load_gguf

    name = os.path.expanduser(os.fspath(name_or_path))
    gguf_file = find_gguf(name)
    if gguf_file is not None:
        return load_gguf(gguf_file, dtype, device)
    if name.endswith(".bin") and os.path.isfile(name):
        from .llama2c import load

        model, tokenizer = load(name, dtype=dtype)
        return model.to(device).eval(), tokenizer
    kind = {".gguf": "GGUF file", ".bin": "llama2.c checkpoint"}.get(os.path.splitext(name)[1].lower())
    if (looks_local(name) or kind) and not os.path.isdir(name):
        if kind:  # a file path (no hub name ends so): where it should be, not how an HF directory looks
            raise UserError(f"{kind} {name!r} does not exist; put the file at that path or pass another model (a GGUF "
                            "file, a llama2.c .bin, a model directory or a hub name)")
        raise UserError(f"model directory {name!r} does not exist; {WHERE}")
    if os.path.isdir(name) and is_quantized_dir(name):
        return load_quantized(name, dtype=dtype, device=device)
    if not os.path.isdir(name) and offline() and not cached_on_hub(name):
        raise UserError(f"{name!r} is not a local path and HF_HUB_OFFLINE is set (offline), and the Hugging Face "
                        f"cache does not hold it; {WHERE}")
    try:
        with quiet_hub():
            config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise not_found(name, err) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{name!r} is a {config.model_type!r} model, not a causal language model "
                        "(expected e.g. an OPT or Llama checkpoint)")
    try:
        with quiet_hub():
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, **{DTYPE_KW: dtype})
    except (OSError, ValueError) as err:
        raise not_found(name, err) from None
    return model.to(device).eval(), tokenizer


def load_quantized(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from a packed directory (`lm.quantized.save_quantized`): transformers' from_pretrained,
    whose quantizer (`lm.hf_quantizer`) builds the QuantLinears and checks every stored tensor against the
    config; what is not a whole packed directory is one UserError line before transformers reads it."""
    if not is_quantized_dir(path):
        raise UserError(f"{path!r} is not a packed quantized checkpoint (no config.json with an rlo "
                        "quantization_config); write one with `opt.py ... --save DIR`")
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise UserError(f"{path!r} has no {WEIGHTS}; the packed codes and weights go there")
    stored_shapes(weights)  # readable
    with quiet_hub():
        model = AutoModelForCausalLM.from_pretrained(path, **{DTYPE_KW: dtype})
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def model_max_positions(model_or_config):
    """The longest sequence the model's position embeddings cover (2048 for OPT)."""
    config = getattr(model_or_config, "config", model_or_config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"cannot tell the maximum sequence length of a {config.model_type!r} model; pass --seqlen")


def default_seqlen(model_or_config, seqlen=None):
    """`seqlen` checked against the model's positions; None -> the model's maximum (GPTQ/QuIP use
    2048 for OPT, i.e. its full context)."""
    limit = model_max_positions(model_or_config)
    if seqlen is None:
        return limit
    if seqlen < 2:
        raise UserError(f"seqlen must be at least 2 (one input and one next token), got {seqlen}")
    if seqlen > limit:
        raise UserError(f"seqlen {seqlen} is larger than the model's {limit} positions")
    return seqlen
