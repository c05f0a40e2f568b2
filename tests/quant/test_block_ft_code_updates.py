"""Finetuning during quantization (opt.py --block-ft, quant.blockft) and code updates in finetuning in
quantized space (ft_opt.py --update-codes, quant.pv), on tiny random Llama checkpoints, offline on CPU."""
import json
import os

import pytest
import torch

import ft_opt
import lm
import opt
import quant
from engine import UserError
from quant.blockft import BlockFT, _keep_best, finetune_e2e, relative_adam, relative_error
from quant.e8p import get_codebook
from quant.linear import QuantLinear
from quant.model import _hessians, _layer_inputs, _run, decoder_layers, quantize_model
from quant.pv import CodeUpdater, apply, propose
from tests.lm_fixtures import save_tiny_gpt2

CALIB = ["--nsamples", "8", "--seqlen", "32", "--device", "cpu"]
QFT = ["--seqlen", "32", "--lr", "3e-3", "--warmup-steps", "2", "--micro-bs", "4", "--grad-accum", "2", "--loss", "ce"]


# --- blockwise finetuning during quantization ----------------------------------------------------------

def test_block_ft_lowers_the_layer_output_error_on_held_out_rows(assets):
    """Layer 0 sees the same inputs (the embeddings) with and without --block-ft: on the held-out
    calibration rows, its output is closer to the fp layer's after finetuning, in float32 and under bf16
    autocast (--amp), whose trained parameters stay float32."""
    fp, tokenizer = lm.load_causal_lm(assets["llama"])
    ids = lm.calibration_batch(tokenizer, "wikitext2", 10, 32, 0, assets["data"])
    inps, kwargs = _layer_inputs(fp, decoder_layers(fp)[0], ids, "cpu")
    target = _run(decoder_layers(fp)[0][0], inps, kwargs)
    errors = {}
    for run in ("none", "fp32", "amp"):
        model, _ = lm.load_causal_lm(assets["llama"])
        del decoder_layers(model)[0][1:]  # only layer 0 is measured
        ft = None if run == "none" else BlockFT(40, lr=3e-3, amp=run == "amp")
        rows = quantize_model(model, ids, "cpu", 2, "e8p", block_ft=ft)
        layer = decoder_layers(model)[0][0]
        errors[run] = relative_error(layer, inps[-1:], target[-1:], kwargs, 1)  # held out
        if ft is not None:
            records = [r["block_ft"] for r in rows if "block_ft" in r]
            assert [r["group"] for r in records[:4]] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                        ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                        ["mlp.down_proj"]]
            assert all(r["heldout_after"] <= r["heldout_before"] for r in records)
            assert records[3]["heldout_after"] == pytest.approx(errors[run], rel=1e-4)  # the kept state
            assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert errors["fp32"] < 0.9 * errors["none"] and errors["amp"] < 0.9 * errors["none"]
    assert errors["amp"] != errors["fp32"]  # the autocast steps did run in bfloat16


@pytest.mark.parametrize("steps, checked", [(1, [1]), (5, [2, 4, 5]), (8, [2, 4, 6, 8]), (20, [5, 10, 15, 20]),
                                            (22, [6, 12, 18, 22])])
def test_held_out_error_is_measured_before_and_at_each_quarter_and_the_best_state_is_kept(steps, checked):
    """A parameter walks 1, 2, 3, ... away from 0 and the held-out error is |x - 3.2|: measured before the steps
    and after every quarter (at most 5 times in all), the best measured state is restored, whichever step it was."""
    x = torch.nn.Parameter(torch.zeros(()))
    measured = []

    def train_step(step):
        with torch.no_grad():
            x.add_(1.0)

    def heldout():
        measured.append(int(x))
        return abs(float(x) - 3.2)

    before, best, best_step = _keep_best([x], steps, train_step, heldout)
    assert measured == [0] + checked
    assert best_step == min([0] + checked, key=lambda s: abs(s - 3.2))
    assert float(x) == best_step and before == pytest.approx(3.2) and best == pytest.approx(abs(best_step - 3.2))


def test_block_ft_steps_are_relative_to_each_tensors_rms():
    """Adam's first step moves every entry by its learning rate: here that is lr times the tensor's RMS, so
    a row scale of 0.02 and a norm weight of 1 change by the same fraction; an all-zero tensor takes the
    1e-3 floor."""
    g = torch.Generator().manual_seed(0)
    tensors = [0.02 * (1 + torch.rand(64, generator=g)), 1 + torch.rand(64, generator=g), torch.zeros(64)]
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    optimizer = relative_adam(params, 5e-3)
    sum((p * torch.randn(64, generator=g)).sum() for p in params).backward()
    optimizer.step()
    for t, p in zip(tensors, params):
        rms = max(float(t.square().mean().sqrt()), 1e-3)
        assert (p.detach() - t).abs() == pytest.approx(torch.full((64,), 5e-3 * rms), rel=1e-4)


def test_hessian_pass_of_a_group_stops_after_it_and_equals_a_full_pass(assets):
    """The Hessians of q/k/v collected by `_hessians` equal those of hooks over a full pass of the layer,
    while the layer's later linears never run."""
    fp, tokenizer = lm.load_causal_lm(assets["llama"])
    ids = lm.calibration_batch(tokenizer, "wikitext2", 10, 32, 0, assets["data"])
    inps, kwargs = _layer_inputs(fp, decoder_layers(fp)[0], ids, "cpu")
    layer = decoder_layers(fp)[0][0]
    group = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    seen = []
    handles = [layer.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.append((n, i[0])))
               for n in group + ["mlp.down_proj"]]
    _run(layer, inps, kwargs)
    full = {n: torch.cat([x.reshape(-1, x.shape[-1]) for name, x in seen if name == n]).double() for n in group}
    seen.clear()
    acc = _hessians(layer, group, inps, kwargs, "cpu")
    for h in handles:
        h.remove()
    assert {n for n, _ in seen} == set(group)  # the pass ended before the MLP
    assert acc["self_attn.q_proj"] is acc["self_attn.v_proj"]  # one input, one accumulator
    for n, x in full.items():
        torch.testing.assert_close(acc[n].hessian().double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)


def test_e2e_ft_lowers_the_held_out_kl_to_the_fp_model(assets):
    fp, tokenizer = lm.load_causal_lm(assets["llama"])
    ids = lm.calibration_batch(tokenizer, "wikitext2", 10, 32, 0, assets["data"])
    model, _ = lm.load_causal_lm(assets["llama"])
    quantize_model(model, ids, "cpu", 2, "nearest")
    codes = {k: t.clone() for k, t in model.state_dict().items() if "codes" in k}
    record = finetune_e2e(model, fp, ids, "cpu", BlockFT(20, lr=3e-3))
    assert record["heldout_after"] < 0.8 * record["heldout_before"] and record["best_step"] > 0
    assert all(torch.equal(model.state_dict()[k], t) for k, t in codes.items())  # codes untouched


def test_opt_block_ft_and_e2e_ft_record_what_they_did_and_reload_with_the_same_perplexity(assets, tmp_path):
    save = str(tmp_path / "bft")
    report = opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], *CALIB, "--wbits", "2",
                       "--quant", "ldlqRG", "--block-ft", "5", "--e2e-ft", "8", "--e2e-ft-lr", "1e-3", "--check",
                       "--save", save])
    assert report["block_ft"]["steps"] == 5 and report["block_ft"]["groups"] == 2 * 4
    e2e = report["e2e_ft"]
    assert e2e["steps"] == 8 and e2e["heldout_after"] <= e2e["heldout_before"]
    assert report["reloaded_ppl"] == report["ppl"]
    config = json.load(open(os.path.join(save, "config.json")))["quantization_config"]
    assert config["block_ft"]["steps"] == 5 and config["e2e_ft"]["steps"] == 8 and config["layers"]["model.layers.0.mlp.up_proj"]["out_scale"]


def test_block_ft_bad_options_are_one_line_errors(assets, tmp_path):
    gpt2 = str(tmp_path / "gpt2")
    save_tiny_gpt2(gpt2, assets["llama"])
    with pytest.raises(UserError, match="--block-ft finetunes inside decoder layers; model family 'gpt2' has none"):
        opt.main([gpt2, "wikitext2", "--data-dir", assets["data"], *CALIB, "--wbits", "2", "--block-ft", "3"])
    for flags, match in [(["--block-ft", "0"], "--block-ft"), (["--block-ft", "3", "--nsamples", "1"], "nsamples >= 2"),
                         (["--block-ft", "3", "--wbits", "16"], "needs --wbits"),
                         (["--block-ft", "3", "--block-ft-lr", "-1"], "--block-ft-lr"),
                         (["--e2e-ft", "3", "--load", "x"], "--e2e-ft finetunes while quantizing"),
                         (["--amp"], "--amp only applies to the training steps of --block-ft and --e2e-ft")]:
        with pytest.raises(UserError, match=match):
            opt.parse_args(["m", "wikitext2", "--wbits", "2", *flags])


# --- code updates (PV-tuning's V step) --------------------------------------------------------------------

def _layer(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    r = quant.quantize_layer(W, X.T @ X / 256, 2, method, incoherence=method == "e8p")
    return QuantLinear.from_result(r), X, X @ W.T


@pytest.mark.parametrize("method", ["nearest", "e8p"])
def test_code_updates_change_the_requested_fraction_to_valid_codewords_and_lower_the_loss(method):
    layer, X, Y = _layer(method)
    loss = torch.no_grad()(lambda: float((layer(X) - Y).square().mean()))
    updater = CodeUpdater(layer, 0.05)
    groups = updater.groups()
    before, first = layer.codebook.codes(layer, 0, 16), loss()
    (layer(X) - Y).square().mean().backward()
    grad = updater.grads[""]  # the layer is the root module
    proposal = propose(layer, grad)
    assert int((proposal[2] > 0).sum()) >= round(0.05 * groups)
    assert apply(layer, proposal, 0.05) == round(0.05 * groups)  # exactly the requested fraction
    after = layer.codebook.codes(layer, 0, 16)
    assert int((after != before).any(-1).sum()) == round(0.05 * groups)
    Wp = layer.processed_weight().detach()
    if method == "e8p":  # every group is still an E8P codeword: its own nearest codeword
        cb = get_codebook("e8p")
        X8 = (Wp / layer.scale.detach()).reshape(-1, 8)
        assert torch.allclose(cb.quantize(X8)[0], X8, atol=1e-5)
    else:
        assert int(after.max()) <= 3 and int(after.min()) >= 0
    assert torch.equal(layer.codebook.encode(layer, Wp, 0, 16)[0], after)  # decoded values re-encode to the codes
    layer.codebook.set_codes(layer, before, 0, 16)
    updater.grads = {"": grad}
    assert updater.step(loss) > 0 and loss() < first  # the guarded step lowers the loss


def test_trellis_code_updates_re_encode_the_requested_fraction_of_tiles_to_valid_streams_and_lower_the_loss():
    """A trellis code group is a tile's stream: the V step searches it anew (Viterbi) on its updated
    target; the streams it writes decode to the values it ranked them by. The layer fits a moved target
    (as after finetuning moved the rest of the model): at LDLQ's own optimum every whole-tile change
    costs more than its linearised gain (measured: all 8 tiles), so the guarded step keeps none there."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    layer = QuantLinear.from_result(quant.quantize_layer(W, X.T @ X / 256, 2, "qtip1mad", seed=0))
    Y = X @ (W + 0.3 * torch.randn(32, 64, generator=g)).T
    loss = torch.no_grad()(lambda: float((layer(X) - Y).square().mean()))
    updater = CodeUpdater(layer, 0.25)
    assert updater.groups() == 8 and updater.candidates(layer) == 8  # 2 x 4 tiles of 16 x 16; 2 to change
    before, first = layer.codes.clone(), loss()
    (layer(X) - Y).square().mean().backward()
    grad = updater.grads[""]
    Wp = layer.processed_weight().detach()
    old, streams, gain = propose(layer, grad)
    assert streams.dtype == torch.uint8 and streams.shape == old.shape == (2, 4, 64)  # 256 weights x 2 bits
    assert int((gain > 0).sum()) >= 2
    assert apply(layer, (old, streams, gain), 0.25) == 2
    changed = (layer.codes != before).any(-1)
    assert int(changed.sum()) == 2 and bool((gain[changed] >= gain[~changed].max()).all())  # the 2 best tiles
    tiles = lambda M: layer.codebook.tiles(layer, M)
    new = layer.processed_weight().detach()
    assert torch.equal(tiles(new)[~changed], tiles(Wp)[~changed])
    # the stored streams decode to the candidates that were ranked: same linearised gain
    torch.testing.assert_close(-(tiles(grad) * (tiles(new) - tiles(Wp))).sum(-1)[changed], gain[changed], rtol=1e-4, atol=1e-7)
    assert int((propose(layer, grad, 3)[2] != 0).sum()) <= 3  # a limited search ranks only its candidates
    layer.codes.copy_(before)
    updater.grads = {"": grad}
    assert updater.step(loss) > 0 and loss() < first  # the guarded step lowers the loss
    updater.close()


def test_ft_opt_update_codes_on_a_trellis_checkpoint_lowers_the_loss_and_stays_packed(assets):
    packed, out = str(assets["root"] / "qtip"), str(assets["root"] / "qtip_pv")
    opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], *CALIB, "--nsamples", "4", "--wbits", "2",
              "--quant", "qtip", "--proxy_only", "--save", packed])
    metrics = ft_opt.main(["--model", packed, "--data-dir", assets["data"], "--out", out, *QFT, "--epochs", "2",
                           "--update-codes", "0.05", "--update-codes-every", "3"])
    before, _ = lm.load_causal_lm(packed)
    layers = [q for q in before.modules() if isinstance(q, QuantLinear)]
    assert metrics["code_groups"] == sum(q.spec["padded"][0] * q.spec["padded"][1] // 256 for q in layers)
    assert metrics["code_updates"] == 4 and 0 < metrics["codes_differ"] <= metrics["codes_changed"]
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] and metrics["ppl_after"] < metrics["ppl_before"]
    model, tokenizer = lm.load_causal_lm(out)  # packed streams again, the updated ones in it
    assert all(q.codes.dtype == torch.uint8 for q in model.modules() if isinstance(q, QuantLinear))
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", assets["data"]))
    assert lm.perplexity(model, ids, metrics["eval_seqlen"]) == pytest.approx(metrics["ppl_after"], rel=1e-6)


def test_ft_opt_update_codes_trains_saves_packed_and_reloads_with_the_same_perplexity(assets):
    packed = str(assets["root"] / "packed")
    opt.main([assets["llama"], "wikitext2", "--data-dir", assets["data"], *CALIB, "--wbits", "2", "--quant", "e8p",
              "--proxy_only", "--save", packed])
    out = str(assets["root"] / "qft_pv")
    metrics = ft_opt.main(["--model", packed, "--data-dir", assets["data"], "--out", out, *QFT,
                           "--epochs", "2", "--update-codes", "0.02", "--update-codes-every", "1"])
    assert metrics["code_updates"] == 14 and 0 < metrics["codes_differ"] <= metrics["codes_changed"]
    before, _ = lm.load_causal_lm(packed)
    layers = [q for q in before.modules() if isinstance(q, QuantLinear)]
    groups = [q.spec["padded"][0] * q.spec["padded"][1] // 8 for q in layers]
    assert metrics["code_groups"] == sum(groups)
    assert metrics["codes_changed"] <= 14 * sum(round(0.02 * n) for n in groups)  # at most the fraction per update
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] and metrics["ppl_after"] < metrics["ppl_before"]
    model, tokenizer = lm.load_causal_lm(out)  # packed again, the updated codes in it
    ids = lm.encode(tokenizer, lm.load_text("wikitext2", "test", assets["data"]))
    assert lm.perplexity(model, ids, metrics["eval_seqlen"]) == pytest.approx(metrics["ppl_after"], rel=1e-6)
    codes = lambda m: torch.cat([q.codebook.codes(q, 0, q.spec["padded"][0]).flatten() for q in m.modules()
                                 if isinstance(q, QuantLinear)])
    assert int((codes(before) != codes(model)).sum()) > 0


def test_update_codes_bad_options_are_one_line_errors(assets):
    for value in ("0", "1.5", "-0.1"):
        with pytest.raises(UserError, match=r"--update-codes .* in \(0, 1\]"):
            ft_opt.parse_args(["--update-codes", value])
    with pytest.raises(UserError, match="--update-codes re-encodes the codes of a packed model"):
        ft_opt.main(["--model", assets["llama"], "--data-dir", assets["data"], "--out", str(assets["root"] / "x"),
                     *QFT, "--max-steps", "1", "--update-codes", "0.1"])
