"""Load a causal LM and its tokenizer from a hub name or a local directory (transformers Auto classes).

Anything the user can fix (a missing directory, an uncached hub name while offline, a model that is
not a causal LM) becomes one `engine.UserError` line that says what to put where.
"""
import contextlib
import logging
import os

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from engine import UserError

try:
    from transformers.utils.quantization_config import GgufConfig
except ImportError:  # transformers < 5 always dequantizes GGUF tensors
    GgufConfig = None

# transformers >= 4.56 takes `dtype=`; older releases only know `torch_dtype=`.
_DTYPE_KW = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"

_WHERE = ("pass a local directory holding config.json, the weights (model.safetensors) and the tokenizer "
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


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _not_found(name, err):
    return UserError(f"cannot load {name!r} ({str(err).splitlines()[0]}); {_WHERE}")


def load_causal_lm(name_or_path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) for a hub name or a local directory (a packed quantized one too, see
    `lm.quantized`), a GGUF file or a directory holding one (see `lm.gguf`) or a llama2.c `.bin` file
    (see `lm.llama2c`); the model is in eval mode on `device`."""
    name = os.path.expanduser(os.fspath(name_or_path))
    gguf_file = find_gguf(name)
    if gguf_file is not None:
        return _load_gguf(gguf_file, dtype, device)
    if name.endswith(".bin") and os.path.isfile(name):
        # imported here: a module-level import would warn when `python -m lm.llama2c` runs it as __main__
        from .llama2c import load

        model, tokenizer = load(name, dtype=dtype)
        return model.to(device).eval(), tokenizer
    looks_local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name)
    if looks_local and not os.path.isdir(name):
        raise UserError(f"model directory {name!r} does not exist; {_WHERE}")
    from .quantized import is_quantized_dir, load_quantized  # quantized imports this module

    if os.path.isdir(name) and is_quantized_dir(name):
        return load_quantized(name, dtype=dtype, device=device)
    if not os.path.isdir(name) and _offline() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise UserError(f"{name!r} is not a local path and HF_HUB_OFFLINE is set (offline), and the Hugging Face "
                        f"cache does not hold it; {_WHERE}")
    try:
        with quiet_hub():
            config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{name!r} is a {config.model_type!r} model, not a causal language model "
                        "(expected e.g. an OPT or Llama checkpoint)")
    try:
        with quiet_hub():
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, **{_DTYPE_KW: dtype})
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None
    return model.to(device).eval(), tokenizer


GGUF_SUFFIX = ".gguf"  # llama.cpp's files: transformers' GGUF loader dequantizes them


def find_gguf(path):
    """The GGUF file `path` names: itself if it is a `.gguf` file, the one `.gguf` file of a directory
    without config.json, else None (not a GGUF model)."""
    if os.path.isfile(path) and path.lower().endswith(GGUF_SUFFIX):
        return path
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(GGUF_SUFFIX))
    if len(files) > 1:
        raise UserError(f"{path!r} holds {len(files)} GGUF files ({', '.join(files)}); pass the one to load")
    return os.path.join(path, files[0]) if files else None


def check_gguf(path):
    """The architecture named in the GGUF file at `path`, after checking that the file is whole (every
    tensor inside it) and that transformers can build that architecture; one UserError line otherwise."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as err:
        raise UserError(f"{path!r} is not a readable GGUF file ({str(err).splitlines()[0]}); "
                        "is it truncated? compare its size with the original") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path!r}: GGUF file without general.architecture; transformers cannot build a model from it")
    arch = field.contents()
    supported = set(GGUF_SUPPORTED_ARCHITECTURES)
    if arch not in supported:
        raise UserError(f"{path!r}: GGUF architecture {arch!r} is not one transformers reads "
                        f"(it reads: {', '.join(sorted(supported))})")
    return arch


def _load_gguf(path, dtype, device):
    """transformers' GGUF loader: tensors dequantized to `dtype`, the tokenizer built from the file."""
    arch = check_gguf(path)
    folder, file = os.path.split(os.path.abspath(path))
    kwargs = {_DTYPE_KW: dtype}
    if GgufConfig is not None:  # newer transformers can keep GGUF blocks; every tool here wants plain tensors
        kwargs["quantization_config"] = GgufConfig(gguf_file=file, dequantize=True)
    try:
        with quiet_hub():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        raise UserError(f"cannot load GGUF file {path!r} (architecture {arch!r}): {str(err).splitlines()[0]}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        # dense after dequantization: a plain model, which save_pretrained and training accept
        model.hf_quantizer.remove_quantization_config(model)
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
