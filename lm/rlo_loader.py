"""The packed format's config.json keys and `RloConfig`, in the one lm/ module that imports nothing but
transformers: it ships inside every packed checkpoint (copied there as `rlo_loader.py`; config.json's
`auto_map` names its `RloConfig`), where transformers runs it for `from_pretrained(DIR, trust_remote_code=True)`
without the toolkit's other files.

A packed directory's config.json is written so that transformers never builds the family's model with
newly initialized linears:
- model_type "rlo" (the family's own type under "rlo_base_model_type"), so the Auto classes and
  `pipeline` need `RloConfig`: registered by `import lm`, or run from this file under
  `trust_remote_code=True`, which then imports the toolkit itself (it must be on PYTHONPATH) or fails
  with one line saying so;
- "transformers_weights" (the weights file transformers reads) set to `PLAIN_LOAD_STOP`, which is no
  file name: a class-level load (`LlamaForCausalLM.from_pretrained(DIR)`), which reads config.json
  without the Auto mapping, stops with transformers' ValueError quoting it before any model is built,
  unless the toolkit is imported (its quantizer drops the key, `lm.hf_quantizer`).
Either way `RloConfig.from_dict` hands transformers the family's config (LlamaConfig, ...) carrying the
quantization_config (quant_method "rlo"), and the toolkit's quantizer builds the QuantLinears.
"""
from transformers import PretrainedConfig

MODEL_TYPE = "rlo"
BASE_KEY = "rlo_base_model_type"
STOP_KEY = "transformers_weights"
PLAIN_LOAD_STOP = ("this is a packed low-bit checkpoint of the RLO toolkit, its linear layers are codes that plain "
                   "transformers would replace by random weights: `import lm` (the toolkit, on PYTHONPATH) before "
                   "from_pretrained, or load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) "
                   "or lm.load_causal_lm(DIR)")
LOADER_KEYS = ("auto_map", BASE_KEY, STOP_KEY)  # what the packed config adds to the family's


def packed_config_dict(config_dict):
    """The family model's config.json dict -> the packed checkpoint's (see the module docstring)."""
    return dict(config_dict, model_type=MODEL_TYPE, auto_map={"AutoConfig": "rlo_loader.RloConfig"},
                **{BASE_KEY: config_dict["model_type"], STOP_KEY: PLAIN_LOAD_STOP})


class RloConfig(PretrainedConfig):
    """model_type "rlo": what the Auto classes map a packed config.json to."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """The family's config (not an RloConfig) from a packed checkpoint's config.json; the toolkit is
        imported first, which registers the quantizer that reads the packed tensors. The import sits in a try
        block so that transformers' check of a remote file's imports does not ask to pip-install `lm`."""
        try:
            import lm.hf_quantizer  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"this is a packed low-bit checkpoint of the RLO toolkit ({err}): its linear layers are codes that "
                "only the toolkit's quant package decodes; put the toolkit's folder (the one holding lm/ and "
                "quant/) on PYTHONPATH (then `import lm` before from_pretrained, or keep trust_remote_code=True)"
            ) from None
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        base = {k: v for k, v in config_dict.items() if k not in LOADER_KEYS}
        if config_dict.get(BASE_KEY) not in CONFIG_MAPPING:
            raise ValueError(f"packed RLO checkpoint: unknown {BASE_KEY} {config_dict.get(BASE_KEY)!r}")
        base["model_type"] = config_dict[BASE_KEY]
        return CONFIG_MAPPING[base["model_type"]].from_dict(base, **kwargs)
