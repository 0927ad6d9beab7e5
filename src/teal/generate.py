"""Text generation on our model: dense prefill, then one-token decode steps on the
static KV cache (sparse when the model's sparsity is on, in ``decode`` mode)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from teal.engine.sampling import sample
from teal.errors import ContextLengthError, TealError
from teal.model.decoder import Transformer


@dataclass
class GenerationResult:
    text: str  # the new text only
    token_ids: list[int]  # the new tokens
    prompt_tokens: int
    new_tokens: int
    tokens_per_second: float  # decode steps only; prefill excluded
    prefill_seconds: float
    decode_seconds: float


def encode_prompt(model: Transformer, prompt: str, chat: bool = False) -> list[int]:
    tok = model.tokenizer
    if tok is None:
        raise TealError("this model has no tokenizer: pass token ids instead of text")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise TealError("this model's tokenizer has no chat template: drop --chat")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in new versions
            ids = ids["input_ids"]
        return list(ids)
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    return list(ids)


def _plan_length(model: Transformer, n_prompt: int, max_new_tokens: int) -> int:
    """Prompts longer than the context are an error; a request for more new tokens than
    fit is shortened with a warning (the user still gets text)."""
    ctx = model.config.max_seq_len
    if n_prompt == 0:
        raise TealError("the prompt is empty")
    if n_prompt >= ctx:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens but the model's context is {ctx}: shorten the prompt"
        )
    if n_prompt + max_new_tokens > ctx:
        fit = ctx - n_prompt
        warnings.warn(
            f"only {fit} new tokens fit in the {ctx}-token context after a {n_prompt}-token"
            f" prompt; generating {fit} instead of {max_new_tokens}",
            stacklevel=3,
        )
        max_new_tokens = fit
    return max_new_tokens


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: str | list[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    stream: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (text or token ids), greedy
    when ``temperature`` is 0.  ``stream`` receives text pieces as they are made."""
    if max_new_tokens < 1:
        raise TealError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise TealError("temperature must be >= 0 and top_p in (0, 1]")
    ids = encode_prompt(model, prompt, chat) if isinstance(prompt, str) else list(prompt)
    max_new_tokens = _plan_length(model, len(ids), max_new_tokens)
    device = model.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    eos = set(model.config.eos_token_ids)
    tok = model.tokenizer
    if tok is not None and tok.eos_token_id is not None:
        eos.add(int(tok.eos_token_id))

    if device.type == "cuda":
        return _generate_cuda(model, ids, max_new_tokens, temperature, top_p, eos, stream,
                              stop_at_eos, gen_seed=seed)  # fmt: skip
    model.setup_cache(1, len(ids) + max_new_tokens)
    prompt_t = torch.tensor([ids], device=device)
    t0 = time.perf_counter()
    logits = model(prompt_t, torch.arange(len(ids), device=device))
    nxt = sample(logits[:, -1], temperature, top_p, gen)
    new = [int(nxt)]
    t1 = time.perf_counter()
    printed = ""
    pos = len(ids)
    while len(new) < max_new_tokens and not (stop_at_eos and new[-1] in eos):
        if stream is not None and tok is not None:
            printed = _emit(tok, new, printed, stream)
        logits = model(nxt.view(1, 1), torch.tensor([pos], device=device))
        nxt = sample(logits[:, -1], temperature, top_p, gen)
        new.append(int(nxt))  # the host needs the token to stop at end-of-sequence
        pos += 1
    t2 = time.perf_counter()
    if stop_at_eos and new[-1] in eos:
        new = new[:-1]
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else ""
    if stream is not None and text[len(printed) :]:
        stream(text[len(printed) :])
    model.clear_cache()
    steps = max(len(new) - 1, 0)
    return GenerationResult(
        text=text,
        token_ids=new,
        prompt_tokens=len(ids),
        new_tokens=len(new),
        tokens_per_second=steps / (t2 - t1) if steps and t2 > t1 else 0.0,
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
    )


def _emit(tok, new: list[int], printed: str, stream: Callable[[str], None]) -> str:
    """Stream the text decoded so far, holding back an incomplete UTF-8 piece."""
    text = tok.decode(new, skip_special_tokens=True)
    if text.endswith("\ufffd"):
        return printed
    if text.startswith(printed) and len(text) > len(printed):
        stream(text[len(printed) :])
        return text
    return printed


def _generate_cuda(
    model: Transformer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos: set[int],
    stream: Callable[[str], None] | None,
    stop_at_eos: bool,
    gen_seed: int | None,
) -> GenerationResult:
    """On CUDA the compiled engine decodes (one graph replay per token); this loop reads
    each token back only to print it and to stop at end-of-sequence."""
    from teal.engine.cuda import CudaEngine

    if gen_seed is not None:
        torch.manual_seed(gen_seed)
    tok = model.tokenizer
    engine = CudaEngine(model, len(ids) + max_new_tokens, temperature=temperature, top_p=top_p)
    engine.capture()
    prompt_t = torch.tensor([ids], device=model.device)
    new: list[int] = []
    printed = ""
    t0 = time.perf_counter()
    t1 = t0
    for i, token in enumerate(engine.stream_tokens(prompt_t, max_new_tokens)):
        if i == 0:
            t1 = time.perf_counter()
        new.append(token)
        if stop_at_eos and token in eos:
            break
        if stream is not None and tok is not None:
            printed = _emit(tok, new, printed, stream)
    t2 = time.perf_counter()
    model.decode_blocks = None
    model.set_decode_attention(None)
    model.clear_cache()
    if stop_at_eos and new and new[-1] in eos:
        new = new[:-1]
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else ""
    if stream is not None and text[len(printed) :]:
        stream(text[len(printed) :])
    steps = max(len(new) - 1, 0)
    return GenerationResult(
        text=text,
        token_ids=new,
        prompt_tokens=len(ids),
        new_tokens=len(new),
        tokens_per_second=steps / (t2 - t1) if steps and t2 > t1 else 0.0,
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
    )
