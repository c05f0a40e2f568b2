"""The packed format (`lm.quantized`) as a transformers quantization method: importing `lm` registers
quant_method "rlo" (`register_quantization_config` / `register_quantizer`) and model_type "rlo"
(`lm.rlo_loader.RloConfig`), so that

    import lm
    model = AutoModelForCausalLM.from_pretrained(PACKED_DIR, dtype=..., device_map=...)

builds the family's model with a `quant.QuantLinear` for every layer the quantization_config names,
filled from the packed tensors by transformers' own loader (device_map and dtype honoured for the
unquantized tensors; a QuantLinear's scales stay float32, its codes their integer type, as
`opt.py` keeps them). It is the one loader of packed directories: `lm.load_causal_lm` and
`lm.load_quantized` call it too. The family's own class (`LlamaForCausalLM.from_pretrained(DIR)`),
`AutoModel` (the base model, without the head) and `pipeline("text-generation", model=DIR)` load the
same way. `model.save_pretrained(DIR)` writes the packed format back (`save_packed`); `model.dequantize()`
turns the model into the plain dense one.
"""
import contextlib
import types

import torch
from transformers import AutoConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from engine import UserError

from .checkpoint import FORMAT, QUANT_METHOD, stored_shapes
from .quantized import check_tensors, replace_linears, save_quantized
from .rlo_loader import BASE_KEY, LOADER_KEYS, MODEL_TYPE, RloConfig


class RloQuantizationConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a packed checkpoint: format, method, wbits, options and the
    per-layer QuantLinear specs (`lm.quantized`)."""

    # what every save recomputes (`lm.quantized.save_quantized`), not how the model was quantized
    RECOMPUTED = ("quant_method", "format", "layers")

    def __init__(self, format=None, method=None, wbits=None, options=None, layers=None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format, self.method, self.wbits = format, method, wbits
        self.options, self.layers = options or {}, layers or {}
        # what else opt.py recorded (e.g. block_ft / e2e_ft): kept, so save_pretrained writes it back unchanged
        for key, value in kwargs.items():
            setattr(self, key, value)


@contextlib.contextmanager
def _float32_on_cpu():
    """transformers builds the model on the meta device in the requested dtype; a QuantLinear regenerates
    its rotations from seeds (real tensors) and holds its scales in float32 (whatever dtype they were stored in)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _is_base_model(model):
    """LlamaModel, OPTModel, ... (what AutoModel builds): the model under the ...ForCausalLM's prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and not hasattr(model, prefix)


def _model_names(model, layers):
    """The quantization_config's layer names (of the ...ForCausalLM model) as `model` names them: without
    the base-model prefix for a base model (`AutoModel.from_pretrained(DIR)` builds LlamaModel, whose
    checkpoint keys transformers strips the same way)."""
    if not _is_base_model(model):
        return layers
    prefix = model.base_model_prefix + "."
    return {name[len(prefix):] if name.startswith(prefix) else name: spec for name, spec in layers.items()}


class RloHfQuantizer(HfQuantizer):
    """Loads packed checkpoints (quantizing on the fly is opt.py's job: it needs calibration data)."""

    requires_calibration = True

    def validate_environment(self, device_map=None, **kwargs):
        if self.quantization_config.format != FORMAT:
            raise UserError(f"quantization format {self.quantization_config.format!r}, this toolkit reads {FORMAT!r}")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("packed RLO layers cannot be offloaded to disk; use a device_map without 'disk'")

    def update_attn_implementation(self, config):
        """The one hook that sees the config before the weights are looked up. A class-level load
        (`LlamaForCausalLM.from_pretrained(DIR)`) reads config.json as it is, with the keys that stop plain
        transformers (`lm.checkpoint`): check the family and drop them (a dense save must not carry them)."""
        base = getattr(config, BASE_KEY, None)
        if base is not None and base != type(config).model_type:
            raise ValueError(f"this is a packed {base!r} checkpoint, not a {type(config).model_type!r} one: load it "
                             f"with AutoModelForCausalLM or the {base!r} family's own class")
        for key in LOADER_KEYS:
            if key in config.__dict__:
                delattr(config, key)
        if config.__dict__.get("model_type") == MODEL_TYPE:
            config.model_type = type(config).model_type
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=(), **kwargs):
        """The QuantLinears the config names, empty, then every stored tensor checked against the model they
        make: a missing or misshapen tensor is one error line, never a randomly initialized one."""
        stored = {k: v for f in checkpoint_files or () for k, v in stored_shapes(f).items()}
        names = self.quantization_config.layers
        layers = _model_names(model, names)
        biases = _model_names(model, {n: f"{n}.bias" in stored for n in names}) if stored else {}
        with _float32_on_cpu():
            replace_linears(model, layers, biases)
        for name in layers:  # empty like the rest; the loader fills them
            model.get_submodule(name).to_empty(device="meta")
        if stored and not _is_base_model(model):  # a base model reads the checkpoint's names renamed
            check_tensors(model, ", ".join(checkpoint_files), stored)

    def update_weight_conversions(self, weight_conversions, model):
        """A packed checkpoint stores a tied embedding once, possibly under the head's name (lm_head.weight):
        a base model (`AutoModel`), which has no head, reads it as its input embedding."""
        conversions = super().update_weight_conversions(weight_conversions, model)
        if _is_base_model(model) and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            from transformers.core_model_loading import WeightRenaming

            embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
            conversions.append(WeightRenaming(r"^lm_head\.weight$", f"{model.base_model_prefix}.{embed}.weight"))
        return conversions

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Tag the loaded model: `rlo_quantization` (how it was quantized: the quantization_config less what every
        save recomputes) and a `save_pretrained` that writes the packed format. transformers' own writes the
        family's config.json, which plain transformers loads with random linears, and its quantizer hooks choose
        only the tensors a save writes; the model's class stays the family's own."""
        qc = self.quantization_config.to_dict()
        model.rlo_quantization = {k: v for k, v in qc.items() if k not in RloQuantizationConfig.RECOMPUTED}
        model.save_pretrained = types.MethodType(save_packed, model)
        return model

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: every QuantLinear back to an nn.Linear holding the weight it applies, every
        QuantEmbedding to an nn.Embedding (tied to its head again where it was) (the dense model transformers
        and any tool load as usual; save_pretrained writes it plainly)."""
        from quant.embedding import QuantEmbedding
        from quant.linear import QuantLinear

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        tied, embeddings = {}, []  # a tied embedding and its head are tied again once both are dense
        for name, module in list(model.named_modules()):
            if any(name.startswith(e + ".") for e in embeddings):
                continue  # an untied embedding's own table: dequantized with it
            if isinstance(module, QuantEmbedding):
                embeddings.append(name)
                table = module.weight_table
                embedding = torch.nn.Embedding(module.num_embeddings, module.embedding_dim, device=table.codes_device(),
                                               dtype=dtype)
                with torch.no_grad():
                    embedding.weight.copy_(module.dequantize())
                model.set_submodule(name, embedding)
                if module.spec.get("tied_to") is not None:
                    tied[module.spec["tied_to"]] = embedding
            elif isinstance(module, QuantLinear):
                device = module.codes_device()
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                         device=device, dtype=dtype)
                with torch.no_grad():
                    linear.weight.copy_(module.dequantize())
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                model.set_submodule(name, linear)
        for head_name, embedding in tied.items():
            model.get_submodule(head_name).weight = embedding.weight
            model.config.tie_word_embeddings = True
        del model.rlo_quantization, model.save_pretrained  # back to transformers' own
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True  # the scales, norms and the unquantized tensors train; the codes are buffers


def save_packed(model, save_directory, is_main_process=True, push_to_hub=False, **kwargs):
    """A loaded packed model's `save_pretrained`: the packed checkpoint (always one model.safetensors; state_dict,
    sharding and serialization options do not apply). The tokenizer is saved apart, as with transformers."""
    if push_to_hub:
        raise ValueError("save the packed model to a local directory, then upload that directory")
    if is_main_process:
        save_quantized(model, None, save_directory, model.rlo_quantization)


def register():
    """Idempotent: the config classes and the quantizer, for transformers' Auto classes."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(RloQuantizationConfig)
    register_quantizer(QUANT_METHOD)(RloHfQuantizer)
    AutoConfig.register(MODEL_TYPE, RloConfig, exist_ok=True)


register()
