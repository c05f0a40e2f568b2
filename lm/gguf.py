"""GGUF models (llama.cpp's format): find the file, check it, and load it through transformers' GGUF loader
(dequantized to plain tensors); every LLM entry point reads GGUF files this way (`lm.load_causal_lm`).
As a command, convert one to a plain Hugging Face directory once: config.json, model.safetensors (the
dequantized weights) and the tokenizer files.

    python -m lm.gguf ../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2
"""
import contextlib
import functools
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import ArgumentParser, UserError, atomic_dir, cli

from .checkpoint import DTYPE_KW, quiet_hub

try:
    from transformers.utils.quantization_config import GgufConfig
except ImportError:  # transformers < 5 always dequantizes GGUF tensors
    GgufConfig = None

GGUF_SUFFIX = ".gguf"


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


@contextlib.contextmanager
def parse_once():
    """Within this block gguf parses each file's metadata once and builds its tensor-name table once per
    architecture: transformers' loader parses the file three times (config, tokenizer, weights) and rebuilds
    the table for every tensor, 27 s of a SmolLM2-135M load on one core."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_gguf(path, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) from the GGUF file `path`: tensors dequantized to `dtype`, the tokenizer built from
    the file; the model is in eval mode on `device`. A file transformers cannot load is diagnosed by
    `check_gguf` only then: parsing a file's metadata (its vocabulary) costs seconds."""
    folder, file = os.path.split(os.path.abspath(path))
    kwargs = {DTYPE_KW: dtype}
    if GgufConfig is not None:  # newer transformers can keep GGUF blocks; every tool here wants plain tensors
        kwargs["quantization_config"] = GgufConfig(gguf_file=file, dequantize=True)
    try:
        with quiet_hub(), parse_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **kwargs)
    except UserError:
        raise
    except Exception as err:  # whatever transformers raised, the user gets the file's diagnosis in one line
        arch = check_gguf(path)
        raise UserError(f"cannot load GGUF file {path!r} (architecture {arch!r}): {str(err).splitlines()[0]}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        # dense after dequantization: a plain model, which save_pretrained and training accept
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(device).eval(), tokenizer


def main(argv=None):
    p = ArgumentParser(description="Convert a GGUF model to a plain Hugging Face directory "
                                   "(dequantized weights, config.json, tokenizer files).")
    p.add_argument("gguf", help="the .gguf file (or a directory holding one)")
    p.add_argument("out", help="the new directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (float32 keeps the dequantized values exactly)")
    args = p.parse_args(argv)
    path = find_gguf(args.gguf)
    if path is None:
        raise UserError(f"{args.gguf!r} is not a .gguf file or a directory holding one")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"{args.out!r} exists and is not an empty directory; choose a new path")
    model, tokenizer = load_gguf(path, dtype=getattr(torch, args.dtype))
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{args.dtype}) to {args.out}")


if __name__ == "__main__":
    cli(main)
