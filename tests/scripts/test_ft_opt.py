"""ft_opt.py on tiny random OPT / Llama checkpoints and generated wikitext files, offline on CPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, ViTConfig

import ft_opt
import lm
from engine import UserError
from losses import get_loss
from tests.helpers import ROOT, torchrun_ft_opt

FAST = ["--seqlen", "32", "--lr", "3e-3", "--warmup-steps", "2", "--micro-bs", "4", "--grad-accum", "2", "--epochs", "2"]


def float64_perplexity(model, ids, seqlen):
    model = model.double()
    nll, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        window = ids[w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None]).logits[0], dim=-1)
        nll -= logp[torch.arange(seqlen - 1), window[1:]].sum().item()
        count += seqlen - 1
    return math.exp(nll / count)


def check_run(out, data, metrics):
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert math.isfinite(metrics["ppl_after"]) and metrics["ppl_after"] < metrics["ppl_before"]
    assert json.load(open(os.path.join(out, "metrics.json")))["ppl_after"] == metrics["ppl_after"]
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))  # a finished run keeps only the model
    # The saved directory reloads and reproduces the reported perplexity exactly (same logits), and the
    # fp32 protocol agrees with a float64 recomputation.
    model, tokenizer = lm.load_causal_lm(out)
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", data))
    assert lm.perplexity(model, ids, metrics["eval_seqlen"]) == pytest.approx(metrics["ppl_after"], rel=1e-12)
    assert float64_perplexity(model, ids, metrics["eval_seqlen"]) == pytest.approx(metrics["ppl_after"], rel=1e-5)


def test_finetune_opt_in_process(assets):
    out = str(assets["root"] / "out_opt")
    metrics = ft_opt.main(["--model", assets["opt"], "--data-dir", assets["data"], "--out", out, *FAST])
    assert metrics["steps"] == 2 * 7  # 54 blocks of 32 tokens, 14 micro-batches of 4, accumulation 2
    check_run(out, assets["data"], metrics)


def test_finetune_llama_subprocess(assets):
    out = str(assets["root"] / "out_llama")
    proc = subprocess.run([sys.executable, "ft_opt.py", "--model", assets["llama"], "--data-dir", assets["data"],
                           "--out", out, "--loss", "ce", *FAST], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity after finetuning" in proc.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    check_run(out, assets["data"], metrics)
    # Identical logits after reloading with plain transformers.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_resume_reproduces_uninterrupted_run(assets, monkeypatch):
    args = ["--model", assets["opt"], "--data-dir", assets["data"], "--loss", "root_convex", "--k", "3", *FAST]
    full = ft_opt.main([*args, "--out", str(assets["root"] / "full")])
    out = str(assets["root"] / "resumed")
    real_save = ft_opt.atomic_save

    def save_then_crash(obj, path):  # the process dies right after the epoch-1 checkpoint
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft_opt, "atomic_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ft_opt.main([*args, "--out", out])
    monkeypatch.setattr(ft_opt, "atomic_save", real_save)
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        ft_opt.main([*args, "--out", out])
    with pytest.raises(UserError, match="started with other arguments: --k 3.0 -> 4.0"):
        ft_opt.main([*args, "--out", out, "--resume", "--k", "4"])
    resumed = ft_opt.main([*args, "--out", out, "--resume"])
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    assert resumed["ppl_after"] == pytest.approx(full["ppl_after"], rel=1e-6)


@pytest.mark.parametrize("name", ["root", "root_convex"])
def test_token_rlo_matches_hand_written_reference_with_masks(name):
    torch.manual_seed(0)
    k, m, vocab = 5.0, 5.0, 50
    ids = torch.randint(0, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 2:] = 0
    logits = (3 * torch.randn(3, 9, vocab)).requires_grad_()
    loss = lm.token_loss(get_loss(name, k=k, m=m, ignore_index=-100), logits, lm.shift_labels(ids, mask))
    loss.backward()

    ref_logits = logits.detach().double().requires_grad_()
    terms = []
    for b in range(3):
        for t in range(8):  # position t predicts token t + 1; padding targets and the last position drop out
            if mask[b, t + 1]:
                p = torch.softmax(ref_logits[b, t], dim=0)[ids[b, t + 1]]
                terms.append(m * (1 - p ** (1 / k)) if name == "root" else m * (p ** (-1 / k) - 1))
    ref = torch.stack(terms).mean()
    ref.backward()
    assert len(terms) == 8 + 5 + 1
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-7)
    assert logits.grad[1, 5:].abs().max() == 0 and logits.grad[:, -1].abs().max() == 0


def test_bad_input_exits_2_with_one_line(assets):
    proc = subprocess.run([sys.executable, "ft_opt.py", "--loss", "hinge"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown loss 'hinge'; choose one of ce, focal, root, root_convex"


def test_bad_input_user_errors(assets, tmp_path):
    base = ["--model", assets["opt"], "--data-dir", assets["data"], "--out", str(tmp_path / "o"), "--seqlen", "32"]
    with pytest.raises(UserError, match="k must be a finite number > 0"):
        ft_opt.main([*base, "--k", "0"])
    with pytest.raises(UserError, match="m must be"):
        ft_opt.main([*base, "--m", "-1"])
    with pytest.raises(UserError, match="larger than the model's 128 positions"):
        ft_opt.main([*base, "--seqlen", "256"])
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "vit")
    with pytest.raises(UserError, match="not a causal language model"):
        ft_opt.main([*base[2:], "--model", str(tmp_path / "vit")])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="empty.txt' is empty"):
        ft_opt.main([*base, "--train-file", str(tmp_path / "empty.txt")])
    with pytest.raises(UserError, match="empty.txt' is empty"):  # the data is checked before the model loads
        ft_opt.main([*base[2:], "--model", str(tmp_path / "no-model"), "--train-file", str(tmp_path / "empty.txt")])
    with pytest.raises(UserError, match=r"put wiki\.train\.raw"):
        ft_opt.main([*base, "--data-dir", str(tmp_path)])  # the last --data-dir wins
    assert not os.path.exists(tmp_path / "o")  # no error left a run folder behind


def test_default_run_folder_names_loss_k_and_m():
    outs = {ft_opt.parse_args(["--k", k]).out for k in ("3", "5")} | {ft_opt.parse_args(["--loss", "ce"]).out}
    assert outs == {os.path.join("runs", name) for name in
                    ("ft_opt_wikitext2_root_k3_m5", "ft_opt_wikitext2_root_k5_m5", "ft_opt_wikitext2_ce")}


@pytest.fixture(scope="module")
def packed_llama(assets):
    """The tiny Llama packed at 2 bits (ldlqRG, incoherence); read-only, both losses finetune from it."""
    import opt
    packed = str(assets["root"] / "packed")
    opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], "--nsamples", "4", "--seqlen", "32",
              "--wbits", "2", "--quant", "ldlqRG", "--incoh_processing", "--proxy_only", "--save", packed])
    return packed


@pytest.mark.parametrize("loss", ["ce", "root"])
def test_finetuning_in_quantized_space_keeps_the_codes_and_lowers_perplexity(assets, packed_llama, loss):
    import quant
    packed = packed_llama
    out = str(assets["root"] / f"qft_{loss}")
    metrics = ft_opt.main(["--model", packed, "--data-dir", assets["data"], "--out", out, "--loss", loss, *FAST,
                           "--max-steps", "6"])
    assert metrics["quantized"] and metrics["codes_unchanged"]
    before, _ = lm.load_causal_lm(packed)
    after, tokenizer = lm.load_causal_lm(out)  # saved back packed
    codes = lambda model: {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, quant.QuantLinear)
                           for b, t in m.code_tensors().items()}
    assert codes(before).keys() == codes(after).keys() and len(codes(after)) == 2 * 7 * 2
    assert all(torch.equal(codes(before)[k], t) for k, t in codes(after).items())  # bit-identical codes
    assert metrics["ppl_after"] < metrics["ppl_before"]
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", assets["data"]))
    assert lm.perplexity(after, ids, metrics["eval_seqlen"]) == pytest.approx(metrics["ppl_after"], rel=1e-6)
    trained = {n for n, p in after.named_parameters()
               if not torch.equal(p, dict(before.named_parameters()).get(n, torch.empty(0)))}
    assert any(n.endswith("q_proj.out_scale") for n in trained) and any(n.endswith("norm.weight") for n in trained)


def test_freeze_embeddings_leaves_embeddings_and_head_unchanged(assets):
    out = str(assets["root"] / "frozen_emb")
    ft_opt.main(["--model", assets["opt"], "--data-dir", assets["data"], "--out", out, "--freeze-embeddings",
                 *FAST, "--epochs", "1"])
    before, after = (AutoModelForCausalLM.from_pretrained(d) for d in (assets["opt"], out))
    assert torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)
    assert not torch.equal(before.model.decoder.layers[0].fc1.weight, after.model.decoder.layers[0].fc1.weight)


# 54 training blocks = 9 global micro-batches of 6: one process with --micro-bs 6 and two with --micro-bs 3 see the
# same rows in every step (3 per epoch with accumulation 3)
TORCHRUN = ["--seqlen", "32", "--lr", "3e-3", "--warmup-steps", "2", "--grad-accum", "3", "--epochs", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def single_process_run(assets):
    out = str(assets["root"] / "torchrun_single")
    return out, ft_opt.main(["--model", assets["opt"], "--data-dir", assets["data"], *TORCHRUN, "--micro-bs", "6", "--out", out])


def assert_same_run(out, metrics, reference_out, reference):
    assert metrics["steps"] == reference["steps"] == 6
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    assert metrics["ppl_after"] == pytest.approx(reference["ppl_after"], rel=1e-5)
    a, b = (AutoModelForCausalLM.from_pretrained(d) for d in (reference_out, out))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_resume_a_one_process_checkpoint_and_match_the_one_process_run(assets, single_process_run,
                                                                                           mode, monkeypatch):
    # epoch 1 in one process, killed after its checkpoint; epoch 2 resumed by two processes at the same global
    # batch (2 x 3 = 6): the checkpoint holds full (unsharded) state dicts, so it loads under DDP, FSDP or
    # neither, and the finished run equals the one-process run
    out = str(assets["root"] / f"torchrun_resumed_{mode}")
    args = ["--model", assets["opt"], "--data-dir", assets["data"], *TORCHRUN, "--out", out]
    real_save = ft_opt.atomic_save

    def save_then_crash(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft_opt, "atomic_save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ft_opt.main([*args, "--micro-bs", "6"])
    stdout = torchrun_ft_opt([*args, "--micro-bs", "3", "--resume", *(["--fsdp"] if mode == "fsdp" else [])])
    assert "resumed from" in stdout and "after epoch 1" in stdout
    assert ("FSDP: 2 transformer blocks + the rest sharded over 2 processes" in stdout) == (mode == "fsdp")
    assert_same_run(out, json.load(open(os.path.join(out, "metrics.json"))), *single_process_run)


def test_fsdp_needs_torchrun(assets, tmp_path):
    with pytest.raises(UserError, match="--fsdp shards the model over the processes of torchrun"):
        ft_opt.main(["--model", assets["opt"], "--data-dir", assets["data"], "--out", str(tmp_path / "o"), "--fsdp"])


def test_fused_loss_and_no_fused_loss_train_the_same_model(assets, tmp_path):
    args = ["--model", assets["llama"], "--data-dir", assets["data"], *FAST, "--epochs", "1", "--max-steps", "3"]
    fused = ft_opt.main([*args, "--out", str(tmp_path / "fused")])
    plain = ft_opt.main([*args, "--out", str(tmp_path / "plain"), "--no-fused-loss"])
    assert fused["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    assert fused["ppl_after"] == pytest.approx(plain["ppl_after"], rel=1e-5)
    assert fused["ppl_after"] != fused["ppl_before"]
