"""The CUDA tier (`pytest -m cuda`, `make gpu-check`): the entry points at tiny sizes on a GPU, compared
with the same run on the CPU where the two must agree. Skipped without a GPU; the 2-rank NCCL run needs
two.

- train.py: one epoch with bf16 autocast, with and without --compile, against the fp32 CPU epoch;
- ft_opt.py: bf16 with the fused LM-head loss against the unfused loss and the fp32 CPU run, on a
  dense and on a packed model (finetuning in quantized space leaves the codes bit-identical);
- opt.py: every method of quant/methods.py quantizes on CUDA to the CPU's codes or perplexity, and the
  checkpoint written on the GPU reloads on the CPU at the perplexity the GPU reported;
- QuantLinear: packed forward (and the scales' gradients) of every codec layout on CUDA against the CPU
  (its C++ decode kernel and its torch path);
- torchrun: 2 NCCL ranks of ft_opt.py (DDP and FSDP) equal one process with the same global batch.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import ft_opt
import lm
import opt
import quant
import train
from engine import read_csv
from tests.helpers import torchrun_ft_opt

DEVICE = "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")]

TINY_VISION = ["--dataset", "fake", "--size", "16", "--num-classes", "4", "--fake-n", "64", "--bs", "16",
               "--epochs", "1", "--workers", "0", "--log-every", "2", "--lr", "1e-3"]
FT = ["--seqlen", "32", "--lr", "3e-3", "--warmup-steps", "0", "--micro-bs", "4", "--grad-accum", "2", "--epochs", "1",
      "--max-steps", "4", "--eval-seqlen", "32", "--eval-windows", "4"]
QUANT = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "4", "--wbits", "2", "--dtype", "float32"]


def train_row(out, device, *flags, net=("--net", "res18", "--size", "8")):
    train.main([*TINY_VISION, *net, "--device", device, "--out", out, *flags])
    (row,) = read_csv(os.path.join(out, "metrics.csv"))
    return row


@pytest.mark.parametrize("net", [("--net", "res18", "--size", "8"), ("--net", "vit_tiny", "--dimhead", "32")],
                         ids=["res18", "vit_tiny"])
def test_train_one_epoch_amp_and_compile_agree_with_the_cpu(tmp_path, net):
    cpu = train_row(str(tmp_path / "cpu"), "cpu", "--no-amp", net=net)
    amp = train_row(str(tmp_path / "amp"), DEVICE, "--amp", net=net)
    compiled = train_row(str(tmp_path / "compiled"), DEVICE, "--amp", "--compile", net=net)
    fp32 = train_row(str(tmp_path / "fp32"), DEVICE, "--no-amp", net=net)
    for row in (amp, compiled, fp32):
        assert (row["epoch"], row["step"]) == (1, 4) and 0 <= row["test_acc"] <= 100
    # the same init, data and augmentation: fp32 on the GPU is the CPU epoch up to summation order and
    # cuDNN's TF32 convolutions, bf16 autocast within bf16's precision, and compiling changes no result
    # beyond kernel fusion
    assert fp32["train_loss"] == pytest.approx(cpu["train_loss"], rel=1e-2)
    assert fp32["test_loss"] == pytest.approx(cpu["test_loss"], rel=1e-2)
    assert amp["train_loss"] == pytest.approx(cpu["train_loss"], rel=5e-2)
    assert compiled["train_loss"] == pytest.approx(amp["train_loss"], rel=2e-2)
    assert compiled["test_loss"] == pytest.approx(amp["test_loss"], rel=2e-2)


def finetune(assets, model, out, device, *flags):
    return ft_opt.main(["--model", model, "--data-dir", assets["data"], "--out", str(assets["root"] / out),
                        "--device", device, *FT, *flags])


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_ft_opt_bf16_with_the_fused_loss_agrees_with_the_cpu(assets, kind):
    cpu = finetune(assets, assets[kind], f"ft_{kind}_cpu", "cpu")
    fp32 = finetune(assets, assets[kind], f"ft_{kind}_fp32", DEVICE)
    fused = finetune(assets, assets[kind], f"ft_{kind}_bf16", DEVICE, "--bf16")
    plain = finetune(assets, assets[kind], f"ft_{kind}_bf16_plain", DEVICE, "--bf16", "--no-fused-loss")
    assert cpu["steps"] == fp32["steps"] == fused["steps"] == plain["steps"] == 4
    assert fp32["ppl_before"] == pytest.approx(cpu["ppl_before"], rel=1e-4)
    assert fp32["train_loss"][-1] == pytest.approx(cpu["train_loss"][-1], rel=1e-3)
    assert fp32["ppl_after"] == pytest.approx(cpu["ppl_after"], rel=1e-3)
    # the fused head + loss computes in chunks what the plain path does at once: same bf16 result
    assert fused["train_loss"][-1] == pytest.approx(plain["train_loss"][-1], rel=1e-2)
    assert fused["train_loss"][-1] == pytest.approx(cpu["train_loss"][-1], rel=3e-2)
    assert fused["ppl_after"] == pytest.approx(cpu["ppl_after"], rel=3e-2)
    assert fused["ppl_after"] < fused["ppl_before"]
    reloaded, tokenizer = lm.load_causal_lm(str(assets["root"] / f"ft_{kind}_bf16"))  # saved from the GPU, on CPU
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", assets["data"]))
    assert lm.perplexity(reloaded, ids, 32, max_windows=4) == pytest.approx(fused["ppl_after"], rel=1e-4)


def test_ft_opt_in_quantized_space_on_cuda_keeps_the_codes(assets):
    packed = str(assets["root"] / "packed_e8p")
    opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], *QUANT, "--quant", "e8p", "--incoh_processing",
              "--device", "cpu", "--save", packed])
    cpu = finetune(assets, packed, "ftq_cpu", "cpu")
    gpu = finetune(assets, packed, "ftq_gpu", DEVICE, "--bf16")
    assert gpu["quantized"] and gpu["codes_unchanged"] and gpu["steps"] == 4
    assert gpu["ppl_after"] == pytest.approx(cpu["ppl_after"], rel=3e-2)
    before, after = (code_tensors(d) for d in (packed, str(assets["root"] / "ftq_gpu")))
    assert before and before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def code_tensors(path):
    """The packed codes of a checkpoint (integer tensors: codes, codes0, ...) and the grids' zero points."""
    tensors = load_file(os.path.join(path, "model.safetensors"))
    return {k: v for k, v in tensors.items() if not v.is_floating_point() or k.endswith(".zero")}


@pytest.mark.parametrize("method", quant.METHODS)
def test_every_opt_method_on_cuda_gives_the_cpu_codes_or_perplexity(assets, method):
    model = assets["llama"]  # widths 64 / 128: multiples of the lattice (8) and trellis (16) tiles
    runs = []
    for role, device in (("cpu", "cpu"), ("gpu", DEVICE)):
        out = str(assets["root"] / f"q_{method}_{role}")
        runs.append((opt.main([model, "wikitext2", "--data-dir", assets["data"], *QUANT, "--quant", method,
                               "--incoh_processing", "--device", device, "--save", out]), out))
    (cpu, cpu_dir), (gpu, gpu_dir) = runs
    a, b = code_tensors(cpu_dir), code_tensors(gpu_dir)
    assert a.keys() == b.keys()
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())
    # rounding decisions at ties may flip with the summation order; then the model is as good
    assert same == 1.0 or gpu["ppl"]["wikitext2"] == pytest.approx(cpu["ppl"]["wikitext2"], rel=2e-2), same
    assert gpu["total_proxy"] == pytest.approx(cpu["total_proxy"], rel=5e-2)
    reloaded, tokenizer = lm.load_causal_lm(gpu_dir)  # written from the GPU, read on the CPU
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", assets["data"]))
    assert lm.perplexity(reloaded, ids, 32, max_windows=4) == pytest.approx(gpu["ppl"]["wikitext2"], rel=1e-4)


@pytest.mark.parametrize("method", ["ldlqRG", "e8p"])
def test_opt_in_its_cuda_default_fp16_is_close_to_fp32(assets, method):
    runs = [opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], *QUANT, "--quant", method,
                      "--incoh_processing", "--device", device, "--dtype", dtype,
                      "--out", str(assets["root"] / f"q16_{method}_{device}_{dtype}")])
            for device, dtype in (("cpu", "float32"), (DEVICE, "auto"))]
    assert runs[1]["args"]["dtype"] == "auto"  # float16 on CUDA
    assert runs[1]["ppl"]["wikitext2"] == pytest.approx(runs[0]["ppl"]["wikitext2"], rel=5e-2)


def packed_layers():
    """One QuantLinear per codec layout that opt.py writes, from a synthetic 128 x 96 weight (padded
    where the rotation needs it) with a bias."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 96, generator=g) * 0.05
    X = torch.randn(512, 96, generator=g)
    H = X.T @ X / 512
    layouts = {"grid": ("ldlq", 3, dict(incoherence=False)), "grid+kron": ("ldlqRG", 2, dict(incoherence=True)),
               "e8p": ("e8p", 2, {}), "e8p_rvq4": ("e8p", 4, {}), "qtip": ("qtip", 2, {})}
    bias = torch.randn(128, generator=g)
    return {name: quant.QuantLinear.from_result(quant.quantize_layer(W, H, bits, method, seed=1, **options), bias)
            for name, (method, bits, options) in layouts.items()}


@pytest.mark.parametrize("tokens", [1, 4, 64])  # decode counts (the CPU's C++ kernel) and prefill (torch path)
def test_packed_quantlinear_forward_and_scale_grads_on_cuda_match_the_cpu(tokens):
    for name, layer in packed_layers().items():
        x = torch.randn(2, tokens, 96, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            expected = layer(x)
        on_gpu = layer.to(DEVICE)
        assert on_gpu.codes_device().type == torch.device(DEVICE).type
        with torch.no_grad():
            torch.testing.assert_close(on_gpu(x.to(DEVICE)).cpu(), expected, rtol=1e-4, atol=1e-4, msg=name)
            # bf16 activations: the decoded weights meet them in bf16
            torch.testing.assert_close(on_gpu(x.to(DEVICE, torch.bfloat16)).float().cpu(), expected,
                                       rtol=5e-2, atol=5e-2, msg=name)
        grads = []
        for device in (DEVICE, "cpu"):  # .to moves the module itself: one device after the other
            on_device = layer.to(device)
            on_device.zero_grad()
            on_device(x.to(device)).square().sum().backward()
            grads.append({n: p.grad.clone().cpu() for n, p in on_device.named_parameters()})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n, g in grads[1].items():
            torch.testing.assert_close(grads[0][n], g, rtol=1e-3, atol=1e-3, msg=f"{name} {n}")


def test_packed_model_generates_the_same_text_on_cuda(assets):
    packed = str(assets["root"] / "packed_gen")
    opt.main([assets["opt"], "wikitext2", "--data-dir", assets["data"], *QUANT, "--quant", "ldlqRG",
              "--incoh_processing", "--device", "cpu", "--save", packed])
    model, tokenizer = lm.load_causal_lm(packed)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = model(ids).logits
        cpu_text = opt.generate(model, tokenizer, "The cat", 8, "cpu")
        gpu_model, _ = lm.load_causal_lm(packed, device=DEVICE)
        torch.testing.assert_close(gpu_model(ids.to(DEVICE)).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert opt.generate(gpu_model, tokenizer, "The cat", 8, DEVICE) == cpu_text


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_nccl_ranks_equal_one_process_with_the_same_global_batch(assets, mode):
    # 54 blocks of 32 tokens = 9 global micro-batches of 6: --micro-bs 6 alone, 3 per rank on 2 ranks
    base = ["--model", assets["opt"], "--data-dir", assets["data"], "--seqlen", "32", "--lr", "3e-3",
            "--warmup-steps", "2", "--grad-accum", "3", "--epochs", "2", "--device", DEVICE]
    single_out, ranks_out = (str(assets["root"] / f"nccl_{mode}_{n}") for n in ("single", "ranks"))
    single = ft_opt.main([*base, "--micro-bs", "6", "--out", single_out])
    stdout = torchrun_ft_opt([*base, "--micro-bs", "3", "--out", ranks_out, *(["--fsdp"] if mode == "fsdp" else [])])
    assert ("sharded over 2 processes" in stdout) == (mode == "fsdp")
    ranks = json.load(open(os.path.join(ranks_out, "metrics.json")))
    assert ranks["steps"] == single["steps"] == 6
    assert ranks["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)
    assert ranks["ppl_after"] == pytest.approx(single["ppl_after"], rel=1e-4)
