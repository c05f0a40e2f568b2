"""models/: every --net builds and trains one step at 32x32, the finetuning forms at 224; weights load."""
import os

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

import models
from engine import UserError

ALIASES = {"vit_base": "vit", "vit-l": "vit_large"}
NETS = [n for n in models.MODELS if n not in ALIASES and n != "vit_timm"]


def _fwd_bwd(model, size, classes=10):
    model.train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NETS)
def test_every_net_trains_at_32(name):
    torch.manual_seed(0)
    _fwd_bwd(models.build_model(name, 10, 32), 32)


@pytest.mark.parametrize("name", ["vit_timm", "res18", "swin_t"])
def test_finetune_forms_at_224(name):
    torch.manual_seed(0)
    model = models.build_model(name, 7, 224, pretrained="none")
    _fwd_bwd(model, 224, classes=7)


def test_forms_follow_the_image_size():
    small, large = models.build_model("res18", 10, 32), models.build_model("res18", 10, 224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    assert isinstance(models.build_model("vgg", 10, 32).classifier, torch.nn.Linear)
    vit = models.build_model("ViT", 10, 32)  # the authors' CIFAR ViT
    assert vit.patch_embed.patch_size == (4, 4) and len(vit.blocks) == 12 and vit.embed_dim == 512
    attn = vit.blocks[0].attn
    assert attn.num_heads == 16 and attn.qkv.out_features == 3 * 16 * 64  # 64-wide heads
    assert vit.blocks[0].mlp.fc1.out_features == 1024
    small_224 = models.build_model("vit_small", 10, 224, dim=64)
    assert small_224.patch_embed.patch_size == (16, 16) and small_224.embed_dim == 64
    swin = models.build_model("swin", 10, 32)  # Swin-B widths, 4x4 windows
    assert swin.embed_dim == 128 and [len(s.blocks) for s in swin.layers] == [2, 2, 18, 2]
    assert swin.layers[0].blocks[0].window_size == (4, 4)


def test_resnet_width():
    """--dimhead narrows a ResNet to stage widths dim x (1, 2, 4, 8); without it, torchvision's own network."""
    from torchvision import models as tvm

    narrow = models.build_model("res18", 10, 32, dim=16)
    assert [narrow.conv1.out_channels] + [layer[-1].conv2.out_channels for layer in
                                          (narrow.layer1, narrow.layer2, narrow.layer3, narrow.layer4)] == [16, 16, 32, 64, 128]
    assert narrow.fc.in_features == 128 and narrow(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    wide = models.build_model("res50", 10, 224, dim=32)
    assert wide.fc.in_features == 32 * 8 * 4 and wide(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    torch.manual_seed(0)
    ref = tvm.resnet18(num_classes=10)
    torch.manual_seed(0)
    ours = models.build_model("res18", 10, 224)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))


def test_aliases_are_case_insensitive():
    for alias, name in {**ALIASES, "ViT": "vit", "Swin": "swin", "RES18": "res18"}.items():
        assert models.canonical_name(alias) == alias.lower()
        assert models.MODELS[alias.lower()] is models.MODELS[name] or alias.lower() in ALIASES
    with pytest.raises(UserError, match="unknown net 'resnet9'; choose from: vgg, res18"):
        models.build_model("resnet9", 10, 32)
    with pytest.raises(UserError, match="--patch and --dimhead must be positive"):
        models.build_model("vit_small", 10, 32, patch=0)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_pretrained_loads_and_reinitializes_another_head(tmp_path, fmt):
    torch.manual_seed(0)
    src = models.build_model("res18", 10, 32)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)  # DDP-style keys
    else:
        save_file(src.state_dict(), str(path))
    dst = models.build_model("res18", 100, 32, pretrained=str(path))
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(dst.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var, rtol=0, atol=0)
    assert dst.fc.weight.shape == (100, 512)


def test_pretrained_vit_resamples_position_embedding(tmp_path):
    src = models.build_model("vit_tiny", 10, 32, dim=32)
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    dst = models.build_model("vit_tiny", 10, 64, dim=32, pretrained=str(tmp_path / "vit.safetensors"))
    assert dst.pos_embed.shape == (1, 1 + 16 * 16, 32)
    torch.testing.assert_close(dst.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight, rtol=0, atol=0)
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # class token position kept


def test_pretrained_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        models.build_model("res18", 10, 32, pretrained=str(tmp_path / "none.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        models.build_model("res18", 10, 32, pretrained=str(tmp_path / "junk.pt"))
    torch.save(models.build_model("vgg", 10, 32).state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(UserError, match="does not fit --net res18") as err:
        models.build_model("res18", 10, 32, pretrained=str(tmp_path / "vgg.pt"))
    assert "\n" not in str(err.value)


def test_vit_timm_weights_come_from_the_local_cache_or_an_explicit_none(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(UserError, match="finetunes pretrained weights: pass --pretrained FILE.*--pretrained none"):
        models.build_model("vit_timm", 5, 64)  # no silent random init
    model = models.build_model("vit_timm", 5, 64, pretrained="none")
    assert model.head.out_features == 5 and model.patch_embed.patch_size == (16, 16)
    # A cached snapshot of timm's default weights is found and read (here a file that does not fit).
    repo = tmp_path / "models--timm--vit_base_patch16_224.augreg2_in21k_ft_in1k"
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text("abc123")
    os.makedirs(repo / "snapshots" / "abc123")
    save_file({"cls_token": torch.zeros(1, 1, 768)}, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    with pytest.raises(UserError, match=r"snapshots/abc123/model.safetensors does not fit --net vit_timm"):
        models.build_model("vit_timm", 5, 64)
