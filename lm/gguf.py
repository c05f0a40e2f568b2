"""Convert a GGUF model (llama.cpp's format) to a plain Hugging Face directory: config.json,
model.safetensors (the dequantized weights) and the tokenizer files. Every LLM entry point reads GGUF files
directly too (`lm.load_causal_lm`); this is for users who want an HF directory once.

    python -m lm.gguf ../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2
"""
import os

import torch

from engine import ArgumentParser, UserError, atomic_dir, cli

from .load import find_gguf, load_causal_lm


def main(argv=None):
    p = ArgumentParser(description="Convert a GGUF model to a plain Hugging Face directory "
                                   "(dequantized weights, config.json, tokenizer files).")
    p.add_argument("gguf", help="the .gguf file (or a directory holding one)")
    p.add_argument("out", help="the new directory to write")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (float32 keeps the dequantized values exactly)")
    args = p.parse_args(argv)
    if find_gguf(args.gguf) is None:
        raise UserError(f"{args.gguf!r} is not a .gguf file or a directory holding one")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"{args.out!r} exists and is not an empty directory; choose a new path")
    model, tokenizer = load_causal_lm(args.gguf, dtype=getattr(torch, args.dtype))
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{args.dtype}) to {args.out}")


if __name__ == "__main__":
    cli(main)
