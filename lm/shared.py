"""Where the shared data directory beside the repo (`../shared/data`) keeps the real models and texts that
experiments, demos and benchmarks use by default (see that directory's README for sources and checksums)."""
import os

SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))
# Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embedding), Q4_1 GGUF
SMOLLM2 = os.path.join(SHARED_DATA, "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
# llama2.c's stories260K (260K parameters): the fast real model of tests
STORIES260K = os.path.join(SHARED_DATA, "models", "stories260K", "stories260K.bin")
WIKITEXT2_RAW = os.path.join(SHARED_DATA, "text", "wikitext-2-raw")
WIKI_VALID = os.path.join(WIKITEXT2_RAW, "wiki.valid.raw")
WIKI_TEST = os.path.join(WIKITEXT2_RAW, "wiki.test.raw")
