"""Generate text with any model `lm.load_causal_lm` reads (dense or packed directories, GGUF files, hub
names, llama2.c files), and report prefill and decode speed.

    python -m lm.generate runs/q2 "The history of Rome" --max-new-tokens 64
    python -m lm.generate ../shared/data/models/smollm2-135m-instruct --chat          # interactive chat
    python -m lm.generate MODEL "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1

Greedy by default (--temperature 0). The prompt is encoded as `lm.encode` does (the tokenizer's usual BOS);
with --chat it goes through the model's chat template, and without a prompt --chat reads turns from standard
input until an empty line or end of input, keeping the conversation. The last line gives the prompt
(prefill) and generated (decode) tokens per second: prefill is timed to the first new token, decode over
the tokens after it.

Llama, Mistral and Qwen2 models (dense or packed) decode through `lm.decode`'s C++ loop by default
(--runtime auto), one call per token; other models, and any model with --runtime hf, through transformers'
`generate`. --runtime fast insists on the C++ loop: a model it cannot run is an error, and where the C++
extension is disabled or cannot be built one line says so and `generate` runs.
"""
import os
import sys
import time

import torch

from engine import ArgumentParser, UserError, cli

from . import decode as fast
from .load import load_causal_lm, model_max_positions
from .text import encode

RUNTIMES = ("auto", "fast", "hf")


class _Clock:
    """A transformers streamer that only records when the prompt was consumed and each new token came."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())  # first call: the prompt; then one call per new token

    def end(self):
        pass


def prompt_ids(tokenizer, prompt, chat=None):
    """(1, T) token ids of `prompt`, or of the conversation `chat` ([{"role", "content"}, ...]) through the
    tokenizer's chat template with the assistant's turn opened."""
    if chat is None:
        return encode(tokenizer, prompt)[None]
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat needs a model whose tokenizer has a chat template (an instruct model); this one has none")
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, runtime="auto"):
    """(new token ids (n,), prefill seconds, decode seconds) continuing `ids` (1, T): greedy for temperature
    0, else sampling with `temperature`, nucleus `top_p` and the generation config's top-k, seeded. `runtime`
    (RUNTIMES): the C++ decode loop where it applies ("auto"), that loop or an error ("fast"), or
    transformers' `generate` ("hf")."""
    limit = model_max_positions(model)
    if ids.shape[1] + max_new_tokens > limit:
        raise UserError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceed the "
                        f"model's {limit} positions")
    if runtime not in RUNTIMES:
        raise UserError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "hf":
        if not fast.available():
            if runtime == "fast":
                print("note: --runtime fast: the C++ extension is disabled or could not be built; "
                      "decoding with transformers' generate", file=sys.stderr)
        else:
            reason = fast.why_not(model, ids.shape[1] + max_new_tokens)
            if reason is None:
                return _fast_generate(model, ids.cpu(), max_new_tokens, temperature, top_p, seed)
            if runtime == "fast":
                raise UserError(f"--runtime fast cannot run this model: {reason} (--runtime hf runs it)")
    return _hf_generate(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed)


def _hf_generate(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed):
    device = next(model.parameters()).device
    ids = ids.to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    torch.manual_seed(seed)
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=clock,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                         **sampling)
    new = out[0, ids.shape[1]:].cpu()
    token_times = clock.times[1:]
    prefill = (token_times[0] if token_times else time.perf_counter()) - start
    decode = token_times[-1] - token_times[0] if len(token_times) > 1 else 0.0
    return new, prefill, decode


def _sampler(model, ids, temperature, top_p):
    """next token id from (vocab,) logits: argmax, or a draw after transformers' warpers in `generate`'s
    order (temperature, the generation config's top-k, top-p)."""
    if temperature == 0:
        return lambda logits: int(logits.argmax())
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    top_k = getattr(model.generation_config, "top_k", None)
    top_k = 50 if top_k is None else top_k  # generate's default where the config leaves it unset
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return lambda logits: int(torch.multinomial(torch.softmax(warpers(ids, logits[None].clone()), -1), 1))


def _fast_generate(model, ids, max_new_tokens, temperature, top_p, seed):
    """`generate` through `lm.decode.FastDecoder`: a batched prefill, then one C++ call per token, stopping
    after an end-of-sequence token as `generate` does."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    pick = _sampler(model, ids, temperature, top_p)
    torch.manual_seed(seed)
    start = time.perf_counter()
    decoder = fast.FastDecoder(model, ids.shape[1] + max_new_tokens)
    token = pick(decoder.prefill(ids))
    first = time.perf_counter()
    new, pos = [token], ids.shape[1]
    while len(new) < max_new_tokens and token not in eos:
        greedy = decoder.step(token, pos)
        token = greedy if temperature == 0 else pick(decoder.logits)
        new.append(token)
        pos += 1
    return torch.tensor(new, dtype=ids.dtype), first - start, time.perf_counter() - first if len(new) > 1 else 0.0


def speed_line(n_prompt, n_new, prefill, decode):
    rate = lambda n, s: f"{n / s:.1f} tokens/s" if s > 0 and n > 0 else "-"  # noqa: E731
    return (f"prefill {n_prompt} tokens: {rate(n_prompt, prefill)}; decode {max(n_new - 1, 0)} tokens: "
            f"{rate(n_new - 1, decode)} ({torch.get_num_threads()} thread(s))")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="packed or dense directory, GGUF file, hub name or llama2.c .bin")
    p.add_argument("prompt", nargs="?", help="text to continue (with --chat: the first user turn; none: read turns "
                                              "from standard input)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer")
    p.add_argument("--chat", action="store_true", help="use the model's chat template (instruct models)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the dense tensors")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="auto: the C++ decode loop for Llama/Mistral/Qwen2 models, else transformers' generate; "
                        "fast: the C++ loop or an error; hf: transformers' generate")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.prompt is None and not args.chat:
        raise UserError("give a PROMPT (or --chat to read turns from standard input)")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("the prompt is empty")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
    options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, runtime=args.runtime)
    if not args.chat:
        ids = prompt_ids(tokenizer, args.prompt)
        new, prefill, decode = generate(model, tokenizer, ids, args.max_new_tokens, **options)
        print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
        print(speed_line(ids.shape[1], len(new), prefill, decode))
        return tokenizer.decode(new, skip_special_tokens=True)
    chat, turns = [], [args.prompt] if args.prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return chat
            text = turns.pop()
        else:
            print("> ", end="", flush=True, file=sys.stderr)
            text = sys.stdin.readline()
            if not text.strip():
                return chat
        chat.append({"role": "user", "content": text.strip()})
        ids = prompt_ids(tokenizer, None, chat)
        new, prefill, decode = generate(model, tokenizer, ids, args.max_new_tokens, **options)
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        chat.append({"role": "assistant", "content": answer})
        print(answer)
        print(speed_line(ids.shape[1], len(new), prefill, decode))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli(main)
