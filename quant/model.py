"""Sequential layer-by-layer quantization of a decoder-only LM (the families of `FAMILIES`), as GPTQ
and QuIP do: the calibration inputs of decoder layer i are computed by the already quantized layers
0..i-1, only one decoder layer sits on the accelerator at a time (a 7B model fits on one GPU), and
all linear layers of a decoder layer are quantized from Hessians collected in one forward pass.

Each quantized linear is replaced by a `quant.linear.QuantLinear` that runs from its packed codes, so
the next layer is calibrated on the outputs of exactly the layers that will be saved and reloaded.
With `block_ft` (`quant.blockft`, QuIP#'s finetuning during quantization) the linears of a layer are
quantized group by group instead, each group from Hessians of the layer as finetuned so far. With `yaqa`
every linear is rounded against YAQA's Kronecker-factored Hessian of the full model's KL: its input-side H
times its output-side Fisher (`output_hessians`), collected once on the fp model before quantization.
"""
import contextlib
import copy
import time
import warnings
import zlib
from collections import namedtuple

import torch
from tqdm import tqdm

from engine import UserError

from . import quantize_layer
from .blockft import finetune, linear_groups
from .hessian import HessianAccumulator
from .linear import QuantLinear

Family = namedtuple("Family", "layers covers")  # path of the decoder layer list; the models it covers

# The decoder-only families (Hugging Face `model_type`) whose decoder layers hold their projections as
# nn.Linear, each tested on a tiny random config (tests/quant/test_families.py). Mixture-of-experts families
# (mixtral, qwen3_moe) are left out: their experts are fused 3-D parameters, not nn.Linear.
FAMILIES = {
    "opt": Family("model.decoder.layers", "OPT"),
    "llama": Family("model.layers", "Llama-2, Llama-3 / 3.1 / 3.2 (rope_type llama3), TinyLlama, llama2.c"),
    "mistral": Family("model.layers", "Mistral 7B"),
    "qwen2": Family("model.layers", "Qwen2, Qwen2.5"),
    "qwen3": Family("model.layers", "Qwen3 (dense)"),
    "gemma": Family("model.layers", "Gemma"),
    "gemma2": Family("model.layers", "Gemma 2 (soft-capped logits: ft_opt.py needs --no-fused-loss)"),
    "phi3": Family("model.layers", "Phi-3, Phi-4 (fused qkv_proj / gate_up_proj)"),
    "olmo2": Family("model.layers", "OLMo 2"),
    "granite": Family("model.layers", "Granite 3 (scaled logits: ft_opt.py needs --no-fused-loss)"),
    "starcoder2": Family("model.layers", "StarCoder2"),
}


def decoder_layers(model):
    """(ModuleList of decoder layers, its attribute path) for a supported model family."""
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise UserError(f"model family {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    path = FAMILIES[family].layers
    layers = model
    for attr in path.split("."):
        layers = getattr(layers, attr)
    return layers, path


def layer_seed(seed, name):
    """A per-layer rotation seed from the run seed and the layer's name (stable across runs)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


def _move_outside(model, layers, device):
    """Move every parameter and buffer that is not inside `layers` (embeddings, norms, rotary tables,
    head) to `device`."""
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in inside:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and id(b) not in inside:
                module._buffers[name] = b.to(device)


class _Captured(Exception):
    """Raised by a forward hook to end a layer call once what it collects has run."""


def _layer_inputs(model, layers, input_ids, device):
    """Hidden states entering decoder layer 0 for each calibration row, plus the keyword arguments
    (attention mask, position ids / rotary embeddings) the model passes to its layers."""
    inps, kwargs = [], {}

    def hook(module, args, kw):
        inps.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in input_ids:
            try:
                model(row[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return torch.cat(inps), kwargs


ROWS_PER_PASS = 8  # calibration rows per layer call: fewer calls, larger matmuls


def _calls(layer, inps, kwargs):
    """Calls of the layer on a few rows of `inps` at a time (the captured keyword arguments are those of one
    row; they broadcast over the batch): yields (first row, the call's output, or None where a forward hook
    ended the call with _Captured). Its QuantLinears run as plain linears of their dequantized weights: the
    same map, decoded once per pass instead of once per call."""
    with _dequantized(layer):
        for j in range(0, inps.shape[0], ROWS_PER_PASS):
            try:
                out = layer(inps[j:j + ROWS_PER_PASS], **kwargs)
            except _Captured:
                yield j, None
                continue
            yield j, out[0] if isinstance(out, (tuple, list)) else out


def _run(layer, inps, kwargs):
    """The layer's outputs for the rows of `inps` (see `_calls`)."""
    outs = torch.empty_like(inps)
    for j, out in _calls(layer, inps, kwargs):
        outs[j:j + out.shape[0]] = out
    return outs


class _Dequantized(torch.nn.Module):
    """A QuantLinear's map as a plain linear of its dequantized weight, in the dtype of its inputs."""

    def __init__(self, q):
        super().__init__()
        self.weight = q.dequantize()
        self.bias = None if q.bias is None else q.bias.detach()

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@contextlib.contextmanager
def _dequantized(layer):
    """Inside: every QuantLinear of `layer` runs as a `_Dequantized` linear."""
    swapped = [(name, q) for name, q in layer.named_modules() if isinstance(q, QuantLinear)]
    for name, q in swapped:
        layer.set_submodule(name, _Dequantized(q))
    try:
        yield
    finally:
        for name, q in swapped:
            layer.set_submodule(name, q)


def sample_tokens(logits, generator):
    """One token per position, drawn from the model's own next-token distribution softmax(logits) (seq, vocab)."""
    return torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator)[:, 0]


def output_hessians(model, input_ids, device, seed=0):
    """YAQA's output-side Hessians: {full linear name: E[g g^T]} for every linear of every decoder layer
    (float32, on `device`), g the gradient of -sum_t log p(y_t) with respect to the linear's output at a
    token, y_t drawn from the model's own next-token distribution at every position t (seeded): the
    Fisher, which is the Hessian of KL(p_model || p) at p = p_model. One forward and one backward pass
    of the whole model (on `device`) per row of `input_ids`, gradients taken for its inputs' embeddings
    only (no weight gradients); averaged over tokens."""
    layers, prefix = decoder_layers(model)
    home = next(model.parameters()).device
    acc, handles = {}, []

    def capture(name):
        def hook(module, inputs, out):
            out.register_hook(lambda g: acc[name].add(g))
        return hook

    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                acc[f"{prefix}.{i}.{name}"] = HessianAccumulator(m.out_features, device)
                handles.append(m.register_forward_hook(capture(f"{prefix}.{i}.{name}")))
    generator = torch.Generator(device).manual_seed(seed)
    embed = model.get_input_embeddings()
    model.to(device)
    try:
        with torch.enable_grad():
            for row in tqdm(input_ids, desc="output-side Fisher"):
                x = embed(row[None].to(device)).detach().requires_grad_()
                logits = model(inputs_embeds=x, use_cache=False).logits[0].float()
                loss = torch.nn.functional.cross_entropy(logits, sample_tokens(logits, generator), reduction="sum")
                torch.autograd.grad(loss, x)
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    return {name: a.hessian() for name, a in acc.items()}


def _hessians(layer, names, inps, kwargs, device):
    """{name: H accumulator} of the named linears of `layer` from one pass over the rows of `inps`; linears
    that read the same input tensor (q/k/v, gate/up) share one accumulator. Each call of the layer stops
    once all of them have run: the rest of the layer adds nothing to their Hessians (for the first group
    of --block-ft, q/k/v, that is nearly the whole layer)."""
    linears = {n: layer.get_submodule(n) for n in names}
    acc = {}
    last = {}  # the input tensor of the latest call and the accumulator it went to
    seen = set()  # the named linears that ran in the current call; a call ends when all have

    def add(name, x):
        seen.add(name)
        if x is last.get("x"):
            acc.setdefault(name, last["acc"])
            if acc[name] is last["acc"]:
                return stop_when_done()
        if name not in acc:
            acc[name] = HessianAccumulator(x.shape[-1], device)
        acc[name].add(x)
        last.update(x=x, acc=acc[name])
        stop_when_done()

    def stop_when_done():
        if len(seen) == len(linears):
            seen.clear()
            raise _Captured

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: add(n, inp[0])) for n, m in linears.items()]
    try:
        for _ in _calls(layer, inps, kwargs):
            pass
    finally:
        for h in handles:
            h.remove()
    return acc


@torch.no_grad()
def quantize_model(model, input_ids, device, wbits, method, seed=0, on_result=None, block_ft=None, yaqa=False,
                   **options):
    """Quantize every linear layer inside the decoder layers of `model` in place, from the (nsamples,
    seqlen) calibration `input_ids`: each becomes a `QuantLinear` holding its packed codes. `options`
    go to `quant.quantize_layer` (incoherence, qfn, rescale, rotation, percdamp, damp_h, npasses,
    groupsize, unbiased, lazy_batch). `yaqa`: first `output_hessians` of the fp model (tokens drawn
    with `seed`), then each linear rounded against its input-side H and that output-side Hessian.

    Returns one dict per linear layer (layer index, module name, proxy loss, greedy passes, damping,
    seconds; with `yaqa` also the two-sided proxy; with `block_ft` (a `quant.blockft.BlockFT`) the last
    linear of each group also carries the group's finetuning record under "block_ft"). `on_result(row)`
    is called as each linear layer finishes."""
    layers, prefix = decoder_layers(model)
    h_out = output_hessians(model, input_ids, device, seed) if yaqa else None
    use_cache = model.config.use_cache
    model.config.use_cache = False
    home = next(model.parameters()).device
    _move_outside(model, layers, device)
    try:
        inps, kwargs = _layer_inputs(model, layers, input_ids, device)
    finally:
        _move_outside(model, layers, home)
    rows = []
    fp_inps = inps  # with block_ft: the fp model's hidden states, the targets of the finetuning
    for i in tqdm(range(len(layers)), desc="layers"):
        layer = layers[i].to(device)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        if block_ft is None:
            groups, acc = [list(linears)], _hessians(layer, linears, inps, kwargs, device)
        else:
            groups = linear_groups(layer, inps[:1], kwargs)
            groups += [[n] for n in linears if not any(n in g for g in groups)]  # not called: quantized alone
            fp_outs = _run(copy.deepcopy(layer), fp_inps, kwargs)
        for gi, group in enumerate(groups):
            if block_ft is not None:
                acc = _hessians(layer, group, inps, kwargs, device)
            group_rows = _quantize_group(layer, group, acc, h_out, i, prefix, wbits, method, seed, device, options,
                                         channel_scales=block_ft is not None)
            if block_ft is not None:
                group_rows[-1]["block_ft"] = dict(finetune(layer, inps, fp_outs, kwargs, block_ft, tag=i * 100 + gi),
                                                  group=group)
            for row in group_rows:
                rows.append(row)
                if on_result is not None:
                    on_result(row)
        inps = _run(layer, inps, kwargs)  # inputs of the next layer, from this quantized layer
        if block_ft is not None:
            fp_inps = fp_outs
        layers[i] = layer.to(home)
    model.config.use_cache = use_cache
    return rows


def _quantize_group(layer, names, acc, h_out, i, prefix, wbits, method, seed, device, options, channel_scales):
    """Quantize the named linears of decoder layer `layer` (number i) from their Hessian accumulators
    `acc` (and their output-side Hessians `h_out`, by full name, unless None) and put QuantLinears in
    their place (with trainable in/out scales when `channel_scales`); one result row per linear."""
    rows = []
    for name in names:
        linear = layer.get_submodule(name)
        full = f"{prefix}.{i}.{name}"
        tick = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = quantize_layer(linear.weight.data, acc[name].hessian(), wbits, method,
                               seed=layer_seed(seed, full), H_out=None if h_out is None else h_out.pop(full),
                               **options)
        if torch.device(device).type == "cuda":  # honest per-layer seconds
            torch.cuda.synchronize()
        parent, _, child = name.rpartition(".")
        q = QuantLinear.from_result(r, linear.bias).to(device)
        if channel_scales:
            q.add_channel_scales()
        setattr(layer.get_submodule(parent), child, q)
        del acc[name]
        row = dict(layer=i, module=name, proxy=r.proxy, npasses=r.npasses, damping=r.damping,
                   seconds=time.time() - tick, warnings=[str(w.message) for w in caught])
        if r.proxy_two_sided is not None:
            row["proxy_two_sided"] = r.proxy_two_sided
        rows.append(row)
    return rows
