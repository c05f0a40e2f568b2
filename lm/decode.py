"""Whole-model CPU decoding of Llama-style causal LMs (Llama, SmolLM2, Mistral, Qwen2) in C++, dense or packed.

`lm.generate` runs the prompt through the model's own batched forward (prefill), copies its keys and values
into a preallocated cache, then calls `quant/kernels/decode.h` once per new token: the embedding
(dense or a quantized `QuantEmbedding`), every decoder layer (RMSNorm, RoPE, grouped-query attention over
the cache, SwiGLU, residuals), the final norm, the LM head and the greedy argmax, without Python or torch
ops between them. Packed linears run the same `quant.kernels` Plans that `QuantLinear` calls, on the layer's
own buffers; dense ones a float32 matvec over their weights, read as float16 or bfloat16 where that holds
every value exactly (`compact`). Sampling stays in Python, over the step's logits, with transformers'
warpers (temperature, top-k, top-p) in `generate`'s order.

Where it does not apply (another family or layout, a codebook without a kernel decoder, a generation
config with other logits processors, a GPU) `why_not` says why, and where the extension is disabled or
cannot be built `available()` is false; `lm.generate` then uses transformers' `generate`.
"""
import inspect
import weakref

import torch
from torch import nn

from quant import kernels
from quant.embedding import QuantEmbedding
from quant.linear import QuantLinear

FAMILIES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin that depend on the position alone
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # the order of decode.h's slots
# generation-config fields whose non-default values add logits processors the fast path does not apply
PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
              "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
              "forced_bos_token_id": None, "forced_eos_token_id": None, "min_p": None, "typical_p": 1.0,
              "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
              "exponential_decay_length_penalty": None, "renormalize_logits": False, "guidance_scale": None}


def _linear_reason(name, module):
    if isinstance(module, QuantLinear):
        if kernels.plan(module) is None:
            return f"{name} ({module.spec['codebook']}) has no decoder in the C++ kernel"
        return None
    if type(module) is not nn.Linear or module.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"{name} is a {type(module).__name__} of {getattr(module, 'weight', torch.empty(0)).dtype}"
    return None


def available():
    """Whether the C++ extension is enabled and built (a failed build warns once)."""
    return kernels.ENABLED and kernels.extension() is not None


def why_not(model, total_len=0):
    """None if the fast path runs `model` for `total_len` positions, else the reason (a phrase). Ask
    `available()` first: without the extension no packed layer has a decoder."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"it runs the {', '.join(FAMILIES)} families, not {config.model_type!r}"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the model is not on the CPU, where the loop runs"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "norm", None) is None or getattr(model, "lm_head", None) is None:
        return "the model is not laid out as model.layers / model.norm / lm_head"
    if getattr(config, "hidden_act", None) != "silu":
        return f"it runs SwiGLU (silu) MLPs, not {getattr(config, 'hidden_act', None)!r}"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and total_len > window:
        return f"{total_len} positions exceed the sliding attention window ({window})"
    rope = getattr(inner, "rotary_emb", None)
    if getattr(rope, "rope_type", None) not in STATIC_ROPE:
        return f"RoPE type {getattr(rope, 'rope_type', None)!r} is not one of {', '.join(STATIC_ROPE)}"
    gen = model.generation_config
    for field, default in PROCESSORS.items():
        if getattr(gen, field, default) not in (default, None):
            return f"the generation config sets {field}"
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantEmbedding):
        table = emb.weight_table
        if table.spec.get("rotation") is not None or table.spec["wbits"] not in (4, 8):
            return "the quantized embedding is not a 4/8-bit grid table without rotation"
    elif type(emb) is not nn.Embedding or emb.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the embedding is a {type(emb).__name__}"
    for i, layer in enumerate(layers):
        for name in LINEARS:
            reason = _linear_reason(f"layer {i} {name}", layer.get_submodule(name))
            if reason:
                return reason
    return _linear_reason("lm_head", model.lm_head)


_COMPACT = {}  # id of a float32 weight -> (weak reference to it, its version, its compact copy)


def compact(weight):
    """A float32 weight as float16 or bfloat16 where every value converts exactly (a packed directory's
    unquantized tensors are stored in float16): the same products at half the bytes. Kept per weight and
    rebuilt when the weight changes in place."""
    if weight.dtype != torch.float32:
        return weight.detach()
    known = _COMPACT.get(id(weight))
    if known is not None and known[0]() is weight and known[1] == weight._version:
        return known[2]
    w = small = weight.detach()
    for dtype in (torch.float16, torch.bfloat16):
        # the first row rejects most weights that do not convert before the whole tensor is converted
        if torch.equal(w[:1].to(dtype).float(), w[:1]) and torch.equal((candidate := w.to(dtype)).float(), w):
            small = candidate
            break
    key = id(weight)
    _COMPACT[key] = (weakref.ref(weight, lambda _: _COMPACT.pop(key, None)), weight._version, small)
    return small


def _empty(t):
    return torch.empty(0) if t is None else t.detach()


class FastDecoder:
    """The C++ decoder (`quant/kernels/decode.h`) of `model` with a cache of `max_len` positions; check
    `why_not(model)` first."""

    def __init__(self, model, max_len):
        c, inner = model.config, model.model
        attn = inner.layers[0].self_attn
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        head_dim = getattr(attn, "head_dim", None) or c.hidden_size // heads
        positions = torch.arange(max_len)[None]
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # the model's own tables
        ext = kernels.extension()
        self.model, self.max_len = model, max_len
        self.chunked = any(isinstance(m, QuantLinear) and m.codebook.costly_decode for m in model.modules())
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.vocab = model.lm_head.out_features
        self.step_bytes = 0  # weight bytes one decode step reads (the embedding's one row left out)
        self.ext = ext.Decoder(len(inner.layers), c.hidden_size, heads, kv_heads, head_dim, c.intermediate_size,
                               self.vocab, max_len, float(c.rms_norm_eps), float(attn.scaling), cos[0], sin[0])
        per_layer = len(LINEARS)
        for i, layer in enumerate(inner.layers):
            for j, name in enumerate(LINEARS):
                self._set_linear(i * per_layer + j, layer.get_submodule(name))
            self._set_norm(2 * i, layer.input_layernorm.weight.detach())
            self._set_norm(2 * i + 1, layer.post_attention_layernorm.weight.detach())
        self._set_norm(2 * len(inner.layers), inner.norm.weight.detach())
        self._set_linear(len(inner.layers) * per_layer, model.lm_head)
        emb = model.get_input_embeddings()
        if isinstance(emb, QuantEmbedding):
            t = emb.weight_table
            self.ext.set_grid_embedding(t.codes, t.scale.detach(), t.zero, t.spec["wbits"], t.spec["groupsize"],
                                        _empty(t.in_scale), _empty(t.out_scale))
        else:
            self.ext.set_embedding(compact(emb.weight))

    def _set_norm(self, slot, weight):
        self.ext.set_norm(slot, weight)
        self.step_bytes += weight.nbytes

    def _set_linear(self, slot, module):
        if isinstance(module, QuantLinear):
            self.ext.set_packed(slot, kernels.plan(module), module._parameters, module._buffers)
            tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        else:
            tensors = [compact(module.weight), _empty(module.bias)]
            self.ext.set_dense(slot, *tensors)
        self.step_bytes += sum(t.nbytes for t in tensors)

    @torch.no_grad()
    def prefill(self, ids):
        """Runs the prompt `ids` (1, T) through the model's batched forward and fills the cache with its
        keys and values; returns the last position's logits (vocab,) float32. Where a codebook's torch
        decode is costly (`costly_decode`: the trellis) the prompt goes in chunks of `quant.kernels.MAX_TOKENS`
        tokens, so that those layers run the C++ kernel (one decode of each weight per 8 tokens, in
        registers) instead of decoding whole weights in torch."""
        step = kernels.MAX_TOKENS if self.chunked else ids.shape[1]
        cache = None
        for start in range(0, ids.shape[1], step):
            chunk = ids[:, start:start + step]
            out = self.model(chunk, attention_mask=torch.ones(1, start + chunk.shape[1], dtype=ids.dtype),
                             use_cache=True, logits_to_keep=1, **({} if cache is None else {self.cache_arg: cache}))
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for i, layer in enumerate(cache.layers):
            self.ext.set_cache(i, layer.keys[0].float(), layer.values[0].float())
        return out.logits[0, -1].float()

    def step(self, token, pos):
        """Greedy next token after `token` at position `pos`; `logits` then holds the step's logits."""
        return self.ext.step(token, pos)

    @property
    def logits(self):
        return self.ext.logits

    def profile(self, on=True):
        """Per-part seconds (matmul, attention, head, other) of the steps since the last call; `on` turns
        the clocks on or off."""
        self.ext.profiling = on
        return self.ext.profile(reset=True)
