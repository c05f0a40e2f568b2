"""The loader shipped inside every packed RLO checkpoint (copied there as `rlo_loader.py`; config.json's
`auto_map` names it). It needs only transformers at import time.

A packed directory's config.json says model_type "rlo" and keeps the family's own type under
"rlo_base_model_type", so transformers never builds the family's model with newly initialized linears:
- with the RLO toolkit imported (`import lm`), model_type "rlo" is registered to `RloConfig`;
- without it, `from_pretrained(DIR)` stops and asks for `trust_remote_code=True`; with that flag this
  file runs from the checkpoint and imports the toolkit itself (it must be importable: on PYTHONPATH),
  or fails with one line saying so.
Either way `RloConfig.from_dict` hands transformers the family's config (LlamaConfig, ...) carrying the
quantization_config (quant_method "rlo"), and the quantizer registered by `lm.hf_quantizer` builds the
QuantLinears from the packed tensors.
"""
from transformers import PretrainedConfig

MODEL_TYPE = "rlo"
BASE_KEY = "rlo_base_model_type"


class RloConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The family's config (not an RloConfig) from a packed checkpoint's config.json."""
        try:
            import lm.hf_quantizer  # noqa: F401  (registers quant_method "rlo")
        except ImportError as err:
            raise ImportError(
                f"this is a packed low-bit checkpoint of the RLO toolkit ({err}): its linear layers are codes that "
                "only the toolkit's quant package decodes; put the toolkit's folder (the one holding lm/ and "
                "quant/) on PYTHONPATH (then `import lm` before from_pretrained, or keep trust_remote_code=True)"
            ) from None
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        base = {k: v for k, v in config_dict.items() if k not in ("auto_map", BASE_KEY)}
        if config_dict.get(BASE_KEY) not in CONFIG_MAPPING:
            raise ValueError(f"packed RLO checkpoint: unknown {BASE_KEY} {config_dict.get(BASE_KEY)!r}")
        base["model_type"] = config_dict[BASE_KEY]
        return CONFIG_MAPPING[base["model_type"]].from_dict(base, **kwargs)
