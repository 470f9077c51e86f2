"""Batched generation: left padding, EOS/stop handling, seeded sampling or greedy, tokens/s.

`generate` takes chat-formatted prompt strings and returns token ids and text per prompt, so a
different backend (vLLM) only has to implement the same function.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..errors import UserError
from ..models import context_window
from .decode import FastDecoder
from .scoring import accepts_logits_to_keep, cache_arg, expand_cache, prefix_kv, returned_cache, shared_prefix_length

if TYPE_CHECKING:
    from ..config import RolloutSettings


@dataclass
class SamplingSettings:
    """How responses are drawn. temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # one per prompt (item_seed); None: item_seed(seed, 0, i)

    @classmethod
    def of_run(
        cls,
        rollout: RolloutSettings,
        *,
        seed: int,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> SamplingSettings:
        """A run's sampling (its rollout section's temperature, top_p, max_new_tokens): every sampler
        that stands in for the training rollouts (the rollouts themselves, the collapse probe, teacher
        targets, Cross-SFT answers) draws the same way, so a temperature change reaches them all."""
        return cls(
            max_new_tokens=rollout.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            batch_size=batch_size,
            seed=seed,
            seeds=None if seeds is None else tuple(seeds),
        )


def item_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of one answer: a hash of (seed, step, the item's index in the step's
    whole batch). Each answer draws from its own stream, so the rollouts are the same however a
    batch is split across processes or into generation batches, and no two processes share one."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniforms(seeds: Sequence[int], n: int) -> torch.Tensor:
    """[len(seeds), n] uniforms, row r from its own generator seeded with seeds[r]: the draws
    next_tokens consumes, one per decode step."""
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.float64)


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


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / T) cut to the
    top-p nucleus (the tokens, most probable first, whose mass before them is below top_p). Drawn
    by inverting the cumulative distribution with one uniform per row: the same distribution as
    torch.multinomial, which on CPU draws an exponential for every vocabulary entry (the slowest
    part of a small model's decode step). `u` [B, 1]: the rows' uniforms (default: drawn here)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    if u is None:
        u = torch.rand(cdf.size(0), 1, device=cdf.device, dtype=cdf.dtype)
    u = u.to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True)
    # A draw that float rounding puts at the total would land past the last entry with mass.
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)
    picked = torch.minimum(picked, last)
    picked = picked.squeeze(-1)
    return picked if order is None else order.gather(-1, picked[:, None]).squeeze(-1)


def decode(
    model,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    cache,
    cached: int,
    settings: SamplingSettings,
    stops: Sequence[int],
    pad: int,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] for left-padded `input_ids`, whose first `cached`
    columns are already in `cache`. Rows that hit a stop token are padded afterwards; decoding
    ends when every row has stopped. A plain loop with a KV cache: what `model.generate` does for
    this case, without its per-step processor machinery; the prompt runs through the model's
    forward, each new token through FastDecoder's step (the same arithmetic, engine/decode.py)
    where the architecture has one. `draws` [B, max_new_tokens]: each row's uniforms
    (`uniforms`), column t for new token t."""
    positions = (attention.cumsum(-1) - 1).clamp_(min=0)
    stop_ids = torch.tensor(list(stops), device=input_ids.device)
    done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    step_ids, step_pos = input_ids[:, cached:], positions[:, cached:]
    fast = FastDecoder.of(model)
    out_tokens = []
    for t in range(settings.max_new_tokens):
        if fast is not None and t > 0:
            logits = fast.step(step_ids, step_pos, attention)
        else:
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_pos,
                use_cache=True,
                **cache_arg(model, cache),
                **keep,
            )
            logits = out.logits[:, -1]
            if fast is not None:
                fast.start(returned_cache(out), settings.max_new_tokens)
            cache = returned_cache(out)
        u = None if draws is None else draws[:, t : t + 1]
        token = next_tokens(logits, settings.temperature, settings.top_p, u)
        token = token.masked_fill(done, pad)
        out_tokens.append(token)
        done |= torch.isin(token, stop_ids)
        if bool(done.all()):
            break
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones(attention.size(0), 1)], dim=1)
    return torch.stack(out_tokens, dim=1) if out_tokens else input_ids.new_zeros((input_ids.size(0), 0))


def prefix_cache_for(caches: Sequence[DynamicCache | None], width: int) -> DynamicCache | None:
    """One batch's cache of its rows' prefixes, each right-aligned in `width` columns (left padding
    before it; a row without a prefix is all padding): the prefix KV computed once per group of
    rows serves rows of several groups in one batch. A batch whose rows share one prefix of that
    width gets views of it, as before."""
    if width == 0:
        return None
    first = caches[0]
    if first is not None and all(c is first for c in caches) and first.layers[0].keys.shape[2] == width:
        return expand_cache(first, len(caches))
    some = next(c for c in caches if c is not None)
    cache = DynamicCache()
    for layer, ref in enumerate(some.layers):
        b, (_, h, _, d), dv = len(caches), ref.keys.shape, ref.values.shape[-1]
        keys = ref.keys.new_zeros(b, h, width, d)
        values = ref.values.new_zeros(b, ref.values.shape[1], width, dv)
        for row, c in enumerate(caches):
            if c is not None:
                n = c.layers[layer].keys.shape[2]
                keys[row, :, width - n :] = c.layers[layer].keys[0]
                values[row, :, width - n :] = c.layers[layer].values[0]
        cache.update(keys, values, layer)
    return cache


def batch_layout(
    rows: Sequence[Sequence[int]], shared: Sequence[int], pad: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(cached columns, input_ids, attention) of one batch: row r's first shared[r] tokens (its
    group's prefix, in the cache) end at the cached column, its own tokens end the row; left
    padding goes before a prefix shorter than the batch's longest and between prefix and tokens."""
    cached = max(shared)
    width = cached + max(len(ids) - n for ids, n in zip(rows, shared, strict=True))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, n) in enumerate(zip(rows, shared, strict=True)):
        input_ids[row, cached - n : cached] = torch.tensor(ids[:n], dtype=torch.long)
        attention[row, cached - n : cached] = 1
        input_ids[row, width - len(ids) + n :] = torch.tensor(ids[n:], dtype=torch.long)
        attention[row, width - len(ids) + n :] = 1
    return cached, input_ids, attention


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    settings: SamplingSettings,
    *,
    names: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> tuple[list[Rollout], GenerationStats]:
    """Responses for chat-formatted `prompts`, in input order. Batches are built from prompts of
    similar length (less padding); prompt i samples from its own stream, seeded with
    `settings.seeds[i]` (default item_seed(settings.seed, 0, i)), so a given seed reproduces the
    same responses whatever the batching. Prompts of one of `groups` (a jailbreak template, a
    context as system message) share a long prefix: its KV is computed once, and rows of several
    groups still decode in one batch (default: one group)."""
    encoded = encode_prompts(tokenizer, prompts)
    check_fits(model, encoded, settings.max_new_tokens, names)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    groups = list(groups) if groups is not None else [""] * len(encoded)
    if len(groups) != len(encoded):
        raise ValueError(f"{len(groups)} groups for {len(encoded)} prompts")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    # Each group's shared prefix (a context as system message, a template) is computed once.
    shared = {g: shared_prefix_length([encoded[i] for i in idx]) for g, idx in members.items()}
    prefixes = {g: prefix_kv(model, encoded[members[g][0]][:n]) if n else None for g, n in shared.items()}

    seeds = settings.seeds or tuple(item_seed(settings.seed, 0, i) for i in range(len(encoded)))
    if len(seeds) != len(encoded):
        raise ValueError(f"{len(seeds)} sampling seeds for {len(encoded)} prompts")
    results: list[Rollout | None] = [None] * len(encoded)
    stats = GenerationStats()
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress, unit="prompt", leave=False)
    for start in range(0, len(order), settings.batch_size):
        idx = order[start : start + settings.batch_size]
        cached, input_ids, attention = batch_layout([encoded[i] for i in idx], [shared[groups[i]] for i in idx], pad)
        cache = prefix_cache_for([prefixes[groups[i]] for i in idx], cached)
        t0 = time.perf_counter()
        draws = uniforms([seeds[i] for i in idx], settings.max_new_tokens) if settings.temperature > 0 else None
        new = decode(model, input_ids.to(device), attention.to(device), cache, cached, settings, stops, pad, draws)
        stats.seconds += time.perf_counter() - t0
        for row, i in enumerate(idx):
            results[i] = finish(encoded[i], new[row].tolist(), stops, tokenizer, stats)
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}")
    bar.close()
    return [r for r in results if r is not None], stats
