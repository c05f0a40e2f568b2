"""What a checkpoint is before any model is built: hub names vs local paths (offline checks, quiet hub
clients, transformers' dtype keyword), and the packed format's names and config.json.

The bottom of lm/: it imports no other lm module, so every loader and writer can import it.

A packed directory's config.json is written so that transformers never builds the family's model with
newly initialized linears:
- model_type "rlo" (the family's own type under "rlo_base_model_type"), so the Auto classes and
  `pipeline` need `RloConfig`: registered by `import lm`, or imported by the directory's `rlo_loader.py`
  under `trust_remote_code=True` (the toolkit must be on PYTHONPATH; a copy of `lm/rlo_loader.py`);
- "transformers_weights" (the weights file transformers reads) set to `PLAIN_LOAD_STOP`, which is no
  file name: a class-level load (`LlamaForCausalLM.from_pretrained(DIR)`), which reads config.json
  without the Auto mapping, stops with transformers' ValueError quoting it before any model is built,
  unless the toolkit is imported (its quantizer drops the key, `lm.hf_quantizer`).
Either way `RloConfig.from_dict` hands transformers the family's config (LlamaConfig, ...) carrying the
quantization_config (quant_method "rlo"), and the quantizer of `lm.hf_quantizer` builds the QuantLinears.
"""
import contextlib
import json
import logging
import os
import shutil

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from engine import UserError

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
MODEL_TYPE = "rlo"
BASE_KEY = "rlo_base_model_type"
STOP_KEY = "transformers_weights"
PLAIN_LOAD_STOP = ("this is a packed low-bit checkpoint of the RLO toolkit, its linear layers are codes that plain "
                   "transformers would replace by random weights: `import lm` (the toolkit, on PYTHONPATH) before "
                   "from_pretrained, or load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) "
                   "or lm.load_causal_lm(DIR)")
LOADER_KEYS = ("auto_map", BASE_KEY, STOP_KEY)  # what the packed config adds to the family's


def is_quantized_dir(path):
    """True when `path` is a directory whose config.json carries an RLO quantization_config."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        qc = json.load(f).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def packed_config_dict(config_dict):
    """The family model's config.json dict -> the packed checkpoint's (see the module docstring)."""
    return dict(config_dict, model_type=MODEL_TYPE, auto_map={"AutoConfig": "rlo_loader.RloConfig"},
                **{BASE_KEY: config_dict["model_type"], STOP_KEY: PLAIN_LOAD_STOP})


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


class RloConfig(PretrainedConfig):
    """model_type "rlo": what the Auto classes map a packed config.json to (registered by `lm.hf_quantizer`,
    imported by a packed directory's `rlo_loader.py`)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The family's config (not an RloConfig) from a packed checkpoint's config.json."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        base = {k: v for k, v in config_dict.items() if k not in LOADER_KEYS}
        if config_dict.get(BASE_KEY) not in CONFIG_MAPPING:
            raise ValueError(f"packed RLO checkpoint: unknown {BASE_KEY} {config_dict.get(BASE_KEY)!r}")
        base["model_type"] = config_dict[BASE_KEY]
        return CONFIG_MAPPING[base["model_type"]].from_dict(base, **kwargs)
