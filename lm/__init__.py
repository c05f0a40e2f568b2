"""Shared helpers for causal language models, used by `ft_opt.py` (finetuning) and `opt.py`
(quantization): loading a model and tokenizer (`load`), reading and tokenizing the evaluation
corpora (`text`), and the GPTQ/QuIP perplexity protocol plus the next-token loss glue (`evaluate`).
Importing it registers the packed format with transformers (`hf_quantizer`): from then on
`AutoModelForCausalLM.from_pretrained(PACKED_DIR)` builds the QuantLinears."""
from . import hf_quantizer  # noqa: F401  (registers quant_method and model_type "rlo")
from .evaluate import NextTokenLoss, perplexity, shift_labels, token_loss
from .load import default_seqlen, load_causal_lm, load_quantized, model_max_positions
from .quantized import save_pretrained, save_quantized
from .text import DATASETS, calibration_batch, calibration_windows, encode, load_text, read_text_file

__all__ = [
    "load_causal_lm", "model_max_positions", "default_seqlen", "load_quantized", "save_quantized", "save_pretrained",
    "DATASETS", "load_text", "read_text_file", "encode", "calibration_batch", "calibration_windows",
    "perplexity", "shift_labels", "token_loss", "NextTokenLoss",
]
