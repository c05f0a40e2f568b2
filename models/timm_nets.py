"""Transformer and mixer networks of the paper, configured from timm's implementations.

The CIFAR configurations are the authors' (`rlo-dnn/train.py`, built there on lucidrains-style
modules): width `dim` (their `--dimhead`, default 512), patch 4, 64-wide attention heads, dropout 0.1
on embeddings, attention weights and projections. timm ties the attention width to the model width
(head width = dim / heads); `HeadDim64Attention` restores the authors' fixed 64-wide heads, so e.g.
`vit` has 16 heads x 64 = 1024-wide attention inside a 512-wide model, as theirs does.

Images larger than `SMALL_MAX` get the finetuning forms: patch 16 for ViTs, Swin with patch 4 and
window 7, ConvMixer with patch 7, i.e. timm's ImageNet layouts.
"""
import timm
from timm.layers import Attention
from timm.models.cait import Cait
from timm.models.convmixer import ConvMixer
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .torchvision_nets import SMALL_MAX  # one threshold for the CIFAR forms of every family

DEFAULT_DIM = 512


class HeadDim64Attention(Attention):
    """timm attention with 64-wide heads whatever the model width (lucidrains' `dim_head=64`)."""

    def __init__(self, dim, **kwargs):
        super().__init__(dim, attn_head_dim=64, **kwargs)


def _patch(patch, img_size, small=4, large=16):
    if patch is not None:
        return patch
    return small if img_size <= SMALL_MAX else large


# name: (depth, heads, mlp width, dropout) from the authors' script; dim is --dimhead.
VIT_CONFIGS = {
    "vit_tiny": (4, 6, 256, 0.1),
    "vit_small": (6, 8, 512, 0.1),
    "vit": (12, 16, 1024, 0.1),
    "vit_large": (24, 16, 4096, 0.1),
}


def vit(config):
    depth, heads, mlp, drop = VIT_CONFIGS[config]

    def build(num_classes, img_size, patch=None, dim=None, **_):
        dim = dim or DEFAULT_DIM
        return VisionTransformer(
            img_size=img_size, patch_size=_patch(patch, img_size), num_classes=num_classes,
            embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp / dim, qkv_bias=False,
            pos_drop_rate=drop, proj_drop_rate=drop, attn_drop_rate=drop,
            attn_layer=HeadDim64Attention)

    return build


def simplevit(num_classes, img_size, patch=None, dim=None, **_):
    # lucidrains' SimpleViT: no class token (mean pooling), no dropout. timm learns the position
    # embedding where SimpleViT fixes a 2-D sin-cos one.
    dim = dim or DEFAULT_DIM
    return VisionTransformer(
        img_size=img_size, patch_size=_patch(patch, img_size), num_classes=num_classes,
        embed_dim=dim, depth=6, num_heads=8, mlp_ratio=512 / dim, qkv_bias=False,
        class_token=False, global_pool="avg", attn_layer=HeadDim64Attention)


def cait(mlp):
    # timm's CaiT derives the head width from dim / heads; the authors' cait_small (6 heads of 64 in
    # a 512-wide model) cannot be expressed, so both forms use dim / 64 heads (8 at dim 512).
    def build(num_classes, img_size, patch=None, dim=None, **_):
        dim = dim or DEFAULT_DIM
        return Cait(
            img_size=img_size, patch_size=_patch(patch, img_size), num_classes=num_classes,
            embed_dim=dim, depth=6, depth_token_only=2, num_heads=max(1, dim // 64),
            mlp_ratio=mlp / dim, mlp_ratio_token_only=mlp / dim, pos_drop_rate=0.1,
            proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.05)

    return build


def swin(embed_dim, depths, heads):
    def build(num_classes, img_size, patch=None, **_):
        if img_size <= SMALL_MAX:
            # 32x32: patch 2 then three merges (16, 8, 4, 2 px per stage) with 4x4 windows, close to
            # the authors' downscaling (2, 2, 2, 1); timm shrinks a window to a smaller stage.
            patch_size, window = 2, patch or 4
        else:
            patch_size, window = 4, patch or 7
        return SwinTransformer(
            img_size=img_size, patch_size=patch_size, window_size=window, num_classes=num_classes,
            embed_dim=embed_dim, depths=depths, num_heads=heads)

    return build


def convmixer(num_classes, img_size, patch=None, **_):
    # Authors: ConvMixer(256, 16, kernel 8, patch 1) at 32x32.
    small = img_size <= SMALL_MAX
    return ConvMixer(dim=256, depth=16, kernel_size=8 if small else 9,
                     patch_size=patch or (1 if small else 7), num_classes=num_classes)


def mlpmixer(num_classes, img_size, patch=None, dim=None, **_):
    return MlpMixer(num_classes=num_classes, img_size=img_size, patch_size=_patch(patch, img_size),
                    num_blocks=6, embed_dim=dim or DEFAULT_DIM)


def vit_timm(num_classes, img_size, **_):
    """timm ViT-B/16 for finetuning (the 384 variant at 384 px, as in the authors' script)."""
    return timm.create_model(vit_timm_arch(img_size), pretrained=False, num_classes=num_classes,
                             img_size=img_size)


def vit_timm_arch(img_size):
    return "vit_base_patch16_384" if img_size == 384 else "vit_base_patch16_224"
