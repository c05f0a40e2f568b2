"""Network registry: every `--net` of the paper by name.

`build_model(name, num_classes, img_size, pretrained=None, patch=None, dim=None)` returns an
`nn.Module` mapping (N, 3, img_size, img_size) images to (N, num_classes) logits. Names are
case-insensitive; aliases accept the authors' spellings (`ViT`, `vit-l`, `Swin`). Convnets come
from torchvision (`torchvision_nets`), transformers and mixers from timm (`timm_nets`); small
images (<= 64 px) get the CIFAR forms, larger ones the ImageNet/finetuning forms.

`pretrained` is a local file (timm/HF `.safetensors`, a torch state dict, or one of our `last.pt` /
`best.pt` checkpoints), or "none" for random init. Weights are never downloaded: a finetuning net
(`vit_timm`) without a path looks in the local Hugging Face cache for timm's ViT-B/16 weights and
otherwise is an error (a silent random init would train a different experiment).
"""
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from engine.errors import UserError

from . import timm_nets as T
from . import torchvision_nets as TV

@dataclass(frozen=True)
class Net:
    """A --net: its builder (num_classes, img_size, patch, dim) -> nn.Module and its properties."""
    build: Callable
    convnet: bool = False  # channels_last helps it, and the authors trained it at lr 1e-3 (ViTs 1e-4)
    finetune: bool = False  # made to start from pretrained weights: without them it is an error


MODELS = {
    "vgg": Net(TV.vgg16_bn, convnet=True),
    "res18": Net(TV.resnet(18), convnet=True),
    "res34": Net(TV.resnet(34), convnet=True),
    "res50": Net(TV.resnet(50), convnet=True),
    "res101": Net(TV.resnet(101), convnet=True),
    "vit_tiny": Net(T.vit("vit_tiny")),
    "vit_small": Net(T.vit("vit_small")),
    "vit": Net(T.vit("vit")),
    "vit_base": Net(T.vit("vit")),
    "vit_large": Net(T.vit("vit_large")),
    "vit-l": Net(T.vit("vit_large")),
    "simplevit": Net(T.simplevit),
    "vit_timm": Net(T.vit_timm, finetune=True),
    "cait": Net(T.cait(mlp=512)),
    "cait_small": Net(T.cait(mlp=256)),
    "swin": Net(T.swin(128, (2, 2, 18, 2), (4, 8, 16, 32))),  # Swin-B widths (the paper's Swin)
    "swin_t": Net(T.swin(96, (2, 2, 6, 2), (3, 6, 12, 24))),  # Swin-T (the authors' script)
    "convmixer": Net(T.convmixer, convnet=True),
    "mlpmixer": Net(T.mlpmixer),
}


def canonical_name(name):
    key = str(name).lower()
    if key not in MODELS:
        raise UserError(f"unknown net {name!r}; choose from: {', '.join(MODELS)}")
    return key


def build_model(name, num_classes, img_size, pretrained=None, patch=None, dim=None):
    key = canonical_name(name)
    if num_classes < 1 or img_size < 1:
        raise UserError(f"num_classes and img_size must be positive, got {num_classes}, {img_size}")
    if (patch is not None and patch < 1) or (dim is not None and dim < 1):
        raise UserError(f"--patch and --dimhead must be positive, got {patch}, {dim}")
    model = MODELS[key].build(num_classes=num_classes, img_size=img_size, patch=patch, dim=dim)
    if pretrained == "none":
        return model
    if pretrained:
        load_pretrained(model, pretrained, key)
    elif MODELS[key].finetune:
        cached = _hf_cached_timm_weights(T.vit_timm_arch(img_size))
        if not cached:
            raise UserError(f"--net {key} finetunes pretrained weights: pass --pretrained FILE (e.g. timm's "
                            "vit_base_patch16_224 .safetensors), fill the local Hugging Face cache, or pass "
                            "--pretrained none to train from random init")
        load_pretrained(model, cached, key)
    return model


def _hf_cached_timm_weights(arch):
    """Path of timm's default weights for `arch` in the local HF cache, or None (no download)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    path = try_to_load_from_cache(repo, "model.safetensors")
    return path if isinstance(path, str) else None


def _read_state_dict(path):
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--pretrained: no such file {path}") from None
    except Exception as err:  # corrupt or foreign file: one line, not a traceback
        raise UserError(f"--pretrained: cannot read {path}: {err}".splitlines()[0]) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"--pretrained: {path} holds no state dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def load_pretrained(model, path, name="model"):
    """Load weights from a local file; a classifier of another class count is re-initialized."""
    sd = _read_state_dict(path)
    # timm's own key remapping and position-embedding resampling (e.g. 224 -> 384 px) where it has one.
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as err:
            msg = f"--pretrained: {path} does not fit --net {name}: {err}"
            raise UserError(msg.splitlines()[0]) from None
    own = model.state_dict()
    reinit = sorted(k for k, v in sd.items() if k in own and v.shape != own[k].shape)
    kept = {k: v for k, v in sd.items() if k not in reinit}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if k not in reinit]
    if missing or unexpected:
        raise UserError(f"--pretrained: {path} does not fit --net {name}: {len(missing)} missing keys "
                        f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    head = f"; re-initialized {', '.join(reinit)} (shape differs)" if reinit else ""
    print(f"loaded {len(sd) - len(reinit)} tensors from {path}{head}")
    return model
