"""Writes tests/lm/packed_v1/: packed checkpoints of the current format ("rlo-packed-v1") that stay in the
repository, so that every later version of the toolkit is tested on files an earlier one wrote.

    python -m tests.lm.write_packed_fixture    # only when the format's version changes: a new folder

Two tiny random models (hidden 64, 2 layers): Llama with E8P 2-bit codes (Hadamard incoherence) and an
8-bit embedding tied to its head; OPT with scalar 2-bit LDLQ codes (Kronecker incoherence) and biases. Beside
each, expected.safetensors holds the logits the model gave on IDS when it was written.
"""
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

import lm
import opt
from tests.helpers import OPT_FAST
from tests.lm_fixtures import make_text, save_tiny_lm, write_wikitext

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed_v1")
IDS = torch.arange(3, 40)[None]
METHODS = {"llama_e8p": ("llama", ["--quant", "e8p", "--embed-bits", "8"]),
           "opt_ldlqRG": ("opt", ["--quant", "ldlqRG"])}


def main():
    if os.path.exists(HERE):
        sys.exit(f"error: {HERE} exists; the files of a released format version are never rewritten")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_wikitext(os.path.join(tmp, "data"))
        staging = os.path.join(tmp, "packed_v1")
        for name, (kind, method) in METHODS.items():
            dense = save_tiny_lm(os.path.join(tmp, kind), kind, text=make_text(30))
            out = os.path.join(staging, name)
            opt.main([dense, "wikitext2", "--data-dir", data, *OPT_FAST, "--wbits", "2", *method,
                      "--incoh_processing", "--proxy_only", "--save", out])
            model, _ = lm.load_causal_lm(out)
            with torch.no_grad():
                save_file({"ids": IDS, "logits": model(IDS).logits.contiguous()}, os.path.join(out, "expected.safetensors"))
        shutil.move(staging, HERE)


if __name__ == "__main__":
    main()
