"""losses.linear_token_loss (fused LM head + token loss) against the unfused path and float64, and
lm.NextTokenLoss on tiny OPT / Llama models."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import OPTConfig, OPTForCausalLM

import lm
from engine import UserError
from losses import get_loss, linear_token_loss
from tests.lm_fixtures import make_text, tiny_model, train_tokenizer

FORMS = [("ce", {}), ("focal", {}), ("root", dict(k=5, m=5)), ("root_convex", dict(k=3, m=3))]


def case(dtype=torch.float32, shape=(3, 29), d=24, vocab=97, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=dtype).requires_grad_()
    weight = (2 * torch.randn(vocab, d, generator=g, dtype=dtype) / d ** 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::4] = -100
    return hidden, weight, b, labels


def unfused(hidden, weight, bias, labels, name, reduction="mean", **params):
    logits = F.linear(hidden, weight, bias)
    loss = get_loss(name, reduction=reduction, **params)(logits.reshape(-1, weight.shape[0]), labels.reshape(-1))
    return loss.reshape(labels.shape) if reduction == "none" else loss


def grads(loss, inputs, upstream):
    return torch.autograd.grad(loss, [x for x in inputs if x is not None], upstream)


@pytest.mark.parametrize("name, params", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_unfused_path_in_fp32(name, params, reduction):
    hidden, weight, bias, labels = case()
    ref = unfused(hidden, weight, bias, labels, name, reduction, **params)
    out = linear_token_loss(hidden, weight, labels, name, bias=bias, reduction=reduction, chunk_tokens=10, **params)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.rand_like(ref) + 0.5
    for got, want in zip(grads(out, (hidden, weight, bias), upstream), grads(ref, (hidden, weight, bias), upstream)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name, params", FORMS)
def test_gradcheck_in_float64(name, params):
    # reduction 'none' recomputes in backward, so gradcheck's repeated backward passes can run
    hidden, weight, bias, labels = case(torch.float64, shape=(2, 5), d=4, vocab=7)
    fn = lambda h, w, b: linear_token_loss(h, w, labels, name, bias=b, reduction="none", chunk_tokens=3, **params)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    # 'mean' computes its gradients in the forward pass: equal to the unfused float64 ones
    out = linear_token_loss(hidden, weight, labels, name, bias=bias, chunk_tokens=3, **params)
    ref = unfused(hidden, weight, bias, labels, name, **params)
    assert out.item() == pytest.approx(ref.item(), rel=1e-13)
    for got, want in zip(grads(out, (hidden, weight, bias), None), grads(ref, (hidden, weight, bias), None)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_confident_mistakes_follow_the_registry_past_the_convex_limit():
    # margins of hundreds of nats put -log(p_y)/k beyond root_convex's fp32 exponent limit (~67.6 at k=m=3),
    # where the registry continues the loss linearly: the fused path must do exactly the same
    hidden, weight, bias, labels = case(shape=(40,), d=8, vocab=11, bias=False)
    hidden = (60 * hidden).detach().requires_grad_()
    out = linear_token_loss(hidden, weight, labels, "root_convex", k=3, m=3, reduction="none", chunk_tokens=7)
    ref = unfused(hidden, weight, None, labels, "root_convex", "none", k=3, m=3)
    valid = labels != -100
    logp = torch.log_softmax(F.linear(hidden, weight).double(), 1)[torch.arange(40), labels.clamp(min=0)]
    assert (-logp[valid] / 3 > 67.6).sum() >= 5 and torch.isfinite(out).all()
    # logits of size ~ 300: an fp32 ulp of a logit (chunked vs whole matmul) moves the loss by ~1e-5 relative
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=0)
    for got, want in zip(grads(out.sum(), (hidden, weight), None), grads(ref.sum(), (hidden, weight), None)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, bias, labels = case()
    labels.fill_(-100)
    out = linear_token_loss(hidden, weight, labels, "root", bias=bias)
    assert out.item() == 0
    assert all(g.abs().max() == 0 for g in grads(out, (hidden, weight, bias), None))


class LargestTensor(TorchDispatchMode):
    """Records the shapes of the tensors ops produce, and the largest number of elements among them."""

    def __init__(self):
        super().__init__()
        self.largest, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tokens_x_vocab_tensor_is_ever_built(reduction):
    hidden, weight, _, labels = case(shape=(400,), d=16, vocab=1000, bias=False)
    with LargestTensor() as mode:
        out = linear_token_loss(hidden, weight, labels, "root", reduction=reduction, chunk_tokens=50)
        out.sum().backward()
    assert mode.largest == 50 * 1000  # one chunk of logits; the full logits would be 400 x 1000


@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
def test_bf16_is_as_accurate_as_the_unfused_bf16_path(accum_dtype):
    hidden, weight, _, labels = case(torch.bfloat16, shape=(512,), d=32, vocab=300, bias=False)
    ref64 = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    truth = grads(unfused(*ref64[:2], None, labels, "root", k=5, m=5), ref64, None)
    err = lambda gs: [((g.double() - t).abs().max() / t.abs().max()).item() for g, t in zip(gs, truth)]
    fused = err(grads(linear_token_loss(hidden, weight, labels, "root", k=5, m=5, chunk_tokens=16,
                                        accum_dtype=accum_dtype), (hidden, weight), None))
    plain = err(grads(unfused(hidden, weight, None, labels, "root", k=5, m=5), (hidden, weight), None))
    assert fused[0] <= 1.5 * plain[0] + 1e-3  # d/dhidden: one chunk, the same rounding
    # d/dweight: 32 bf16 roundings of the running sum, or one with the fp32 accumulator
    assert fused[1] <= (1.5 * plain[1] if accum_dtype else 8 * plain[1]) + 1e-3


def test_autocast_with_fp32_master_weights():
    hidden, weight, bias, labels = case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_token_loss(hidden, weight, labels, "root", bias=bias, k=5, m=5, chunk_tokens=8)
        ref = unfused(hidden, weight, bias, labels, "root", k=5, m=5)
    got, want = grads(out, (hidden, weight, bias), None), grads(ref, (hidden, weight, bias), None)
    assert all(g.dtype == torch.float32 for g in got)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0.02, atol=0.02 * w.abs().max().item())


def test_no_gradient_work_without_autograd():
    hidden, weight, _, labels = case(shape=(400,), d=16, vocab=1000, bias=False)
    with torch.no_grad(), LargestTensor() as mode:
        out = linear_token_loss(hidden, weight, labels, "root", chunk_tokens=50)
    assert not out.requires_grad and mode.largest == 50 * 1000
    assert (1000, 16) not in mode.shapes  # no weight-gradient accumulator
    assert out.item() == pytest.approx(unfused(hidden, weight, None, labels, "root").item(), rel=1e-6)


def test_backward_twice_is_refused():
    hidden, weight, bias, labels = case()
    out = linear_token_loss(hidden, weight, labels, "ce")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_bad_input_is_one_user_error():
    hidden, weight, _, labels = case()
    with pytest.raises(UserError, match="multi-class token loss"):
        linear_token_loss(hidden, weight, labels, "logistic")
    with pytest.raises(UserError, match="do not fit"):
        linear_token_loss(hidden, weight[:, :5], labels, "ce")
    with pytest.raises(UserError, match="chunk_tokens"):
        linear_token_loss(hidden, weight, labels, "ce", chunk_tokens=0)


def opt_with_projection(tokenizer):
    """OPT-350m's layout: hidden 64 projected to a 32-wide word embedding that the head shares."""
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=32, ffn_dim=128,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, dropout=0.0,
                       attention_dropout=0.0, do_layer_norm_before=False)
    torch.manual_seed(0)
    return OPTForCausalLM(config)


@pytest.mark.parametrize("kind", ["opt", "opt-projected", "llama", "llama-untied"])
def test_next_token_loss_fused_equals_the_models_own_logits(kind):
    tokenizer = train_tokenizer(make_text(20))
    if kind == "opt-projected":
        model = opt_with_projection(tokenizer)
    else:
        model = tiny_model(kind.split("-")[0], tokenizer)
        if kind == "llama-untied":
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.1)
    model.train()
    ids = torch.randint(4, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(1))
    labels = lm.shift_labels(ids)
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss = lm.NextTokenLoss(model, "root", fused=fused, k=5, m=5)(ids, labels)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    # absolute tolerance on the scale of all gradients: some are 0 in exact arithmetic (OPT's k_proj bias)
    scale = max(g.abs().max().item() for g in plain_grads.values())
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_next_token_loss_refuses_logits_that_are_not_the_head_of_the_hidden_states():
    model = tiny_model("llama", train_tokenizer(make_text(20)))
    model.lm_head.register_forward_hook(lambda module, inputs, out: 0.5 * out)  # a logit scale (Cohere)
    with pytest.raises(UserError, match="--no-fused-loss"):
        lm.NextTokenLoss(model, "root", k=5, m=5)
