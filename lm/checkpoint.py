"""What a checkpoint is before any model is built: hub names vs local paths (offline checks, quiet hub
clients, transformers' dtype keyword), and the packed format's names and config.json.

The bottom of lm/ with `lm.rlo_loader`, the only lm module it imports: every loader and writer can import it.

The packed format's config.json keys and `RloConfig` live in `lm.rlo_loader` (a copy of it ships in
every packed directory, so it imports nothing of the toolkit).
"""
import contextlib
import json
import logging
import os
import shutil

import torch
import transformers
from safetensors import SafetensorError, safe_open

from engine import UserError

from .rlo_loader import packed_config_dict

# transformers >= 4.56 takes `dtype=`; older releases only know `torch_dtype=`.
DTYPE_KW = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"

WHERE = ("pass a local directory holding config.json, the weights (model.safetensors) and the tokenizer "
         "files (e.g. one written by save_pretrained), or run once with network access to fill the "
         "Hugging Face cache")


@contextlib.contextmanager
def quiet_hub():
    """Silence the hub clients' retry warnings while we try the cache/network: a failure becomes one
    UserError line of ours instead."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "transformers", "filelock")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def looks_local(name):
    """True when `name` is meant as a path (absolute, ./ or ../, or existing), not a hub name."""
    return os.path.isabs(name) or name.startswith(".") or os.path.exists(name)


def cached_on_hub(name):
    """True when the Hugging Face cache holds the hub model `name` (its config.json)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def not_found(name, err):
    return UserError(f"cannot load {name!r} ({str(err).splitlines()[0]}); {WHERE}")


# The packed format (docs/packed-format.md)
FORMAT = "rlo-packed-v1"
QUANT_METHOD = "rlo"
WEIGHTS = "model.safetensors"
LOADER_FILE = "rlo_loader.py"
STORED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def is_quantized_dir(path):
    """True when `path` is a directory whose config.json carries an RLO quantization_config."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        qc = json.load(f).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def write_packed_config(config, quantization_config, directory):
    """config.json of a packed checkpoint (the family's `config` with `quantization_config`, in the packed
    layout) and the loader file it names, into `directory`."""
    config.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config_dict = json.load(f)
    config_dict["quantization_config"] = quantization_config
    with open(path, "w") as f:
        json.dump(packed_config_dict(config_dict), f, indent=2, sort_keys=True)
    shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), LOADER_FILE),
                    os.path.join(directory, LOADER_FILE))


def stored_shapes(weights):
    """{name: shape} of a safetensors file, read from its header."""
    try:
        with safe_open(weights, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights!r} is not a readable safetensors file ({err})") from None

