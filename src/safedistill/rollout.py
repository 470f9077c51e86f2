"""Batched generation: left padding, EOS/stop handling, seeded sampling or greedy, tokens/s.

`generate` takes chat-formatted prompt strings and returns token ids and text per prompt, so a
different backend (vLLM) only has to implement the same function.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .models import context_window
from .scoring import expand_cache, prefix_kv, shared_prefix_length


@dataclass
class SamplingSettings:
    """How responses are drawn. temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool  # ended on an EOS/stop token rather than the length limit


@dataclass
class GenerationStats:
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids from the tokenizer, the generation config and the chat template's end-of-turn."""
    ids = set()
    for source in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(source)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def check_fits(model, encoded: Sequence[Sequence[int]], max_new_tokens: int, names: Sequence[str] | None = None):
    """Raise a UserError naming the first prompt that cannot fit with its answer in the context."""
    limit = context_window(model)
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > limit:
            name = names[i] if names else f"#{i}"
            raise UserError(
                f"prompt {name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                f"it exceeds the model's context window of {limit}"
            )


def finish(prompt_ids: list[int], new: list[int], stops: Sequence[int], tokenizer, stats: GenerationStats) -> Rollout:
    """A rollout from the generated ids: cut at the first stop token, which counts as generated
    but is not kept."""
    cut = next((k for k, t in enumerate(new) if t in stops), None)
    response = new if cut is None else new[:cut]
    stats.new_tokens += len(response) + (cut is not None)
    return Rollout(prompt_ids, response, tokenizer.decode(response, skip_special_tokens=True), cut is not None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    settings: SamplingSettings,
    *,
    names: Sequence[str] | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> tuple[list[Rollout], GenerationStats]:
    """Responses for chat-formatted `prompts`, in input order. Batches are built from prompts of
    similar length (less padding); batch b is sampled with seed `settings.seed + b`, so a given
    seed reproduces the same responses."""
    encoded = encode_prompts(tokenizer, prompts)
    check_fits(model, encoded, settings.max_new_tokens, names)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    sample = settings.temperature > 0
    gen_kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
    )
    if sample:
        gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)

    # Prompts that share a long prefix (a context as system message, say) compute it once.
    shared = shared_prefix_length(encoded)
    prefix_cache = prefix_kv(model, encoded[0][:shared]) if shared else None

    results: list[Rollout | None] = [None] * len(encoded)
    stats = GenerationStats()
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress, unit="prompt", leave=False)
    for b, start in enumerate(range(0, len(order), settings.batch_size)):
        idx = order[start : start + settings.batch_size]
        width = shared + max(len(encoded[i]) - shared for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            # Left padding sits between the shared prefix and each prompt's own tokens.
            input_ids[row, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
            attention[row, :shared] = 1
            input_ids[row, width - len(ids) + shared :] = torch.tensor(ids[shared:])
            attention[row, width - len(ids) + shared :] = 1
        if prefix_cache is not None:
            gen_kwargs["past_key_values"] = expand_cache(prefix_cache, len(idx))
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed + b)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **gen_kwargs)
        stats.seconds += time.perf_counter() - t0
        for row, i in enumerate(idx):
            results[i] = finish(encoded[i], out[row, width:].tolist(), stops, tokenizer, stats)
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
    bar.close()
    return [r for r in results if r is not None], stats
