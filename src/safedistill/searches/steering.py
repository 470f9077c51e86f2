"""The steering teacher's search: the refusal direction and its (position, layer, scale), then the
safety token set S that vocab_mask=safety_tokens sums over (SafeSteer). Residual activations,
difference-of-means directions, the refusal score and the candidate search follow Arditi et al. and
the published selection rule of andyrdt/refusal_direction (and this project's older rule).
Directions are computed in float64: the difference of two means of large, similar activations
loses most of its digits in float32. Both are fixed before training and saved:

  steering.json                    every candidate with its figures, and the chosen one
  steering_direction.safetensors   the chosen vector (float64) and all directions [P, L, d]
  safety_tokens.json               S: ids, decoded strings, votes, mean steered probability
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..data.splits import take
from ..data.train import TrainSplits
from ..engine.rollout import SamplingSettings, encode_prompts, generate, stop_token_ids
from ..engine.scoring import cache_arg, response_logits, returned_cache
from ..errors import UserError
from ..files import save_tensors, write_json
from ..models import chat_text
from ..teachers.base import Item
from ..teachers.context import context_text, load_contexts
from ..teachers.steering import ablate, decoder_layers, steer
from .context import choose_contexts

if TYPE_CHECKING:
    from ..config import SteeringSettings, TeacherSettings

REFUSAL_PREFIXES = (
    "I'm sorry",
    "I am sorry",
    "I cannot",
    "I can't",
    "Sorry",
    "I apologize",
    "As an AI",
    "Unfortunately",
)

FILES = ("steering.json", "steering_direction.safetensors", "safety_tokens.json")
SAMPLES = 8  # steered samples per harmless prompt (published)
HORIZON = 7  # H positions scored: the first answer position and one after each of H-1 samples (published)
VOTE_TOP = 200  # each position's top entries by log-ratio get a vote (published)
SAFETY_TOKEN_RULES = ("published", "legacy")


def post_instruction_length(tokenizer, prompts: Sequence[str]) -> int:
    """How many trailing tokens of every chat-formatted prompt come from the template after the
    user text (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`): the longest common token suffix."""
    texts = [chat_text(tokenizer, p) for p in (*prompts, "A", "Zebra?")]
    encoded = encode_prompts(tokenizer, texts)
    n = min(len(e) for e in encoded)
    k = 0
    while k < n and len({e[-1 - k] for e in encoded}) == 1:
        k += 1
    return max(1, k)


def _batches(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _right_padded(
    model, tokenizer, prompts: Sequence[str], system: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    encoded = encode_prompts(tokenizer, [chat_text(tokenizer, p, system=system) for p in prompts])
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        attn[i, : len(e)] = 1
    device = next(model.parameters()).device
    last = torch.tensor([len(e) - 1 for e in encoded], device=device)
    return ids.to(device), attn.to(device), last


@torch.no_grad()
def post_instruction_activations(
    model, tokenizer, prompts: Sequence[str], n_positions: int, *, system: str | None = None, batch_size: int = 16
) -> torch.Tensor:
    """Sum (float64) of the residual stream at each layer's input, at the last `n_positions`
    prompt positions: [n_positions, n_layers, d]. Divide by len(prompts) for the mean."""
    n_layers = len(decoder_layers(model))
    total = None
    for chunk in _batches(list(prompts), batch_size):
        ids, attn, last = _right_padded(model, tokenizer, chunk, system)
        hidden = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        offsets = torch.arange(-n_positions + 1, 1, device=ids.device)
        index = (last[:, None] + offsets[None, :]).clamp(min=0)  # [B, P]
        rows = torch.arange(len(chunk), device=ids.device)[:, None]
        per_layer = torch.stack([hidden[layer][rows, index] for layer in range(n_layers)], dim=2)  # [B, P, L, d]
        part = per_layer.double().sum(0).cpu()
        total = part if total is None else total + part
    assert total is not None
    return total


def mean_difference(
    model,
    tokenizer,
    a: Sequence[str],
    b: Sequence[str],
    n_positions: int,
    *,
    system_a: str | None = None,
) -> torch.Tensor:
    """mean(act(a)) - mean(act(b)) per (post-instruction position, layer): float64 [P, L, d].
    `system_a` puts a system message before every prompt of `a` (the context-delta direction)."""
    if not a or not b:
        raise UserError("a steering direction needs prompts on both sides")
    mean_a = post_instruction_activations(model, tokenizer, a, n_positions, system=system_a) / len(a)
    mean_b = post_instruction_activations(model, tokenizer, b, n_positions) / len(b)
    return mean_a - mean_b


def refusal_token_ids(tokenizer) -> list[int]:
    """First tokens of common refusal openings (the refusal score's numerator)."""
    ids = {encode_prompts(tokenizer, [p])[0][0] for p in REFUSAL_PREFIXES}
    return sorted(ids - set(tokenizer.all_special_ids))


@torch.no_grad()
def last_logprobs(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """Next-token log-probs (float32) at the end of each chat-formatted prompt: [N, V]."""
    from ..engine.scoring import takes_position_index

    per_row = takes_position_index(model)  # project only the last position of each row onto the vocabulary
    out = []
    for chunk in _batches(list(prompts), batch_size):
        ids, attn, last = _right_padded(model, tokenizer, chunk)
        if per_row:
            logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=last[:, None]).logits[:, 0]
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits[torch.arange(len(chunk), device=ids.device), last]
        out.append(logits.float().log_softmax(-1).cpu())
    return torch.cat(out)


def refusal_score(logprobs: torch.Tensor, refusal_ids: Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """Log-odds of the refusal tokens, log(p(R) + eps) - log(1 - p(R) + eps), per row of [N, V]
    log-probs, in float64 (the published score; eps bounds it near +-18.4)."""
    is_ref = torch.zeros(logprobs.size(-1), dtype=torch.bool)
    is_ref[list(refusal_ids)] = True
    lp = logprobs.double()
    ref = lp[:, is_ref].logsumexp(-1).exp()
    rest = lp[:, ~is_ref].logsumexp(-1).exp()
    return (ref + eps).log() - (rest + eps).log()


def next_token_kl(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base || other) of next-token distributions per row of [N, V] log-probs (float64)."""
    base, other = base.double(), other.double()
    return (base.exp() * (base - other)).sum(-1)


def candidate_layers(n_layers: int, layers: Sequence[int] | None, skip_last: float = 0.2) -> list[int]:
    """Layers searched: the given ones or all, minus the last `skip_last` share of the stack."""
    limit = int(n_layers * (1.0 - skip_last))
    chosen = range(n_layers) if layers is None else layers
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise UserError(f"--layers: layer {layer} out of range (the model has {n_layers})")
    return sorted({layer for layer in chosen if layer < max(1, limit)})


def search_candidates(
    model,
    tokenizer,
    directions: torch.Tensor,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    kl_cap: float = 0.1,
    skip_last: float = 0.2,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The legacy rule (`steer_selection: legacy-add-kl`), not the published one: every
    (position, layer, scale) candidate with its refusal score on harmful prompts when added, the
    same on harmless prompts, and KL(base || steered) of the next token on harmless prompts with the
    vector added. The chosen one has the highest harmful refusal score among those under the KL cap
    (if none is, the one with the smallest KL, flagged)."""
    n_pos, n_layers, _ = directions.shape
    ref_ids = refusal_token_ids(tokenizer)
    base_h = last_logprobs(model, tokenizer, harmful)
    base_b = last_logprobs(model, tokenizer, harmless)
    base_score = float(refusal_score(base_h, ref_ids).mean())
    rows = []
    grid = [
        (p, layer, s) for p in range(n_pos) for layer in candidate_layers(n_layers, layers, skip_last) for s in scales
    ]
    for pos, layer, scale in tqdm(grid, desc="steering candidates", disable=not progress):
        vec = directions[pos, layer]
        with steer(model, layer, vec, scale):
            lh = last_logprobs(model, tokenizer, harmful)
            lb = last_logprobs(model, tokenizer, harmless)
        kl = (base_b.exp() * (base_b - lb)).sum(-1).mean()
        rows.append(
            {
                "position": pos - n_pos,  # offset from the end of the prompt (-1 = last token)
                "layer": layer,
                "scale": scale,
                "norm": float(vec.norm()),
                "refusal_score_harmful": float(refusal_score(lh, ref_ids).mean()),
                "refusal_score_harmless": float(refusal_score(lb, ref_ids).mean()),
                "kl_harmless": float(kl),
            }
        )
    if not rows:
        raise UserError("no steering candidates (check --layers)")
    ok = [r for r in rows if r["kl_harmless"] <= kl_cap]
    best = max(ok, key=lambda r: r["refusal_score_harmful"]) if ok else min(rows, key=lambda r: r["kl_harmless"])
    chosen = {**best, "kl_cap": kl_cap, "kl_cap_met": bool(ok), "base_refusal_score_harmful": base_score}
    return rows, chosen


def search_published(
    model,
    tokenizer,
    directions: torch.Tensor,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    kl_cap: float = 0.1,
    induce_threshold: float = 0.0,
    skip_last: float = 0.2,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The published selection rule (andyrdt/refusal_direction, select_direction.py). Per
    (position, layer), with the direction ablated everywhere: `ablation_kl` = mean next-token
    KL(base || ablated) on harmless prompts, `bypass_score` = mean refusal score on harmful prompts;
    per scale, with `scale * direction` added at the layer's input: `induce_score` = mean refusal
    score on harmless prompts. A candidate survives if its layer is outside the last `skip_last`
    share of the stack, ablation_kl <= kl_cap and induce_score >= induce_threshold; the survivor
    with the lowest bypass score is chosen. If none survives (their code stops there), the one with
    the highest induce score among those under the KL cap (else the lowest ablation KL) is taken and
    flagged `filters_met: false`."""
    n_pos, n_layers, _ = directions.shape
    ref_ids = refusal_token_ids(tokenizer)
    base_h = last_logprobs(model, tokenizer, harmful)
    base_b = last_logprobs(model, tokenizer, harmless)
    base = {
        "base_refusal_score_harmful": float(refusal_score(base_h, ref_ids).mean()),
        "base_refusal_score_harmless": float(refusal_score(base_b, ref_ids).mean()),
    }
    searched = candidate_layers(n_layers, layers, skip_last)
    grid = [(p, layer) for p in range(n_pos) for layer in searched]
    rows = []
    for pos, layer in tqdm(grid, desc="steering candidates (ablate, add)", disable=not progress):
        vec = directions[pos, layer]
        with ablate(model, vec):
            lb = last_logprobs(model, tokenizer, harmless)
            lh = last_logprobs(model, tokenizer, harmful)
        kl = float(next_token_kl(base_b, lb).mean())
        bypass = float(refusal_score(lh, ref_ids).mean())
        for scale in scales:
            with steer(model, layer, vec, scale):
                induce = float(refusal_score(last_logprobs(model, tokenizer, harmless), ref_ids).mean())
            ok = all(map(math.isfinite, (kl, bypass, induce))) and kl <= kl_cap and induce >= induce_threshold
            rows.append(
                {
                    "position": pos - n_pos,  # offset from the end of the prompt (-1 = last token)
                    "layer": layer,
                    "scale": scale,
                    "norm": float(vec.norm()),
                    "ablation_kl": kl,
                    "induce_score": induce,
                    "bypass_score": bypass,
                    "passes_filters": ok,
                }
            )
    return rows, pick_published(rows, base, kl_cap=kl_cap, induce_threshold=induce_threshold)


def pick_published(rows: list[dict], base: dict, *, kl_cap: float, induce_threshold: float) -> dict:
    """The survivor with the lowest bypass score; without one, the most refusal-inducing candidate
    under the KL cap (else the lowest ablation KL), flagged `filters_met: false`."""
    if not rows:
        raise UserError("no steering candidates (check --layers)")
    survivors = [r for r in rows if r["passes_filters"]]
    if survivors:
        best = min(survivors, key=lambda r: r["bypass_score"])
    else:
        under = [r for r in rows if r["ablation_kl"] <= kl_cap]
        best = max(under, key=lambda r: r["induce_score"]) if under else min(rows, key=lambda r: r["ablation_kl"])
    chosen = {
        **best,
        "selection": "published",
        "kl_cap": kl_cap,
        "induce_threshold": induce_threshold,
        "n_survivors": len(survivors),
        "filters_met": bool(survivors),
        **base,
    }
    return chosen


def refusal_filter(
    model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], *, min_kept: int = 4
) -> tuple[list[str], list[str], dict]:
    """The published pipeline's data filter (run_pipeline.py `filter_data`): keep the harmful prompts
    the model refuses (refusal score > 0) and the harmless ones it does not (score < 0). A side
    left with fewer than `min_kept` prompts is kept whole (their code would run on too few or
    none); the returned dict says what was kept."""
    ref_ids = refusal_token_ids(tokenizer)
    score_h = refusal_score(last_logprobs(model, tokenizer, harmful), ref_ids).tolist() if harmful else []
    score_b = refusal_score(last_logprobs(model, tokenizer, harmless), ref_ids).tolist() if harmless else []
    kept_h = [p for p, s in zip(harmful, score_h, strict=True) if s > 0]
    kept_b = [p for p, s in zip(harmless, score_b, strict=True) if s < 0]
    info = {
        "harmful_refused": len(kept_h),
        "harmful_total": len(harmful),
        "harmless_not_refused": len(kept_b),
        "harmless_total": len(harmless),
        "harmful_filtered": len(kept_h) >= min_kept,
        "harmless_filtered": len(kept_b) >= min_kept,
    }
    return (
        kept_h if info["harmful_filtered"] else list(harmful),
        kept_b if info["harmless_filtered"] else list(harmless),
        info,
    )


@dataclass(frozen=True)
class SteeringSearch:
    """What the search reads: its own section, the teacher section (context-delta's context, the
    greedy answer length), the run's train splits, seed and model name (recorded in steering.json)."""

    steering: SteeringSettings
    teacher: TeacherSettings
    splits: TrainSplits
    seed: int
    model_name: str


def parse_list(text: str, cast, field: str) -> list | None:
    if text.strip() in {"", "auto"}:
        return None
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{field}: expected comma-separated numbers or auto, got {text!r}") from None


def safety_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    layer: int,
    vector: torch.Tensor,
    scale: float,
    k: int = 50,
    seed: int = 0,
    min_prob: float = 1e-8,
    horizon: int = HORIZON,
    rule: str = "published",
) -> list[dict]:
    """S (see select_safety_tokens), without the record of how it was chosen."""
    steering = (layer, vector, scale)
    return select_safety_tokens(
        model, tokenizer, prompts, steering, k=k, seed=seed, min_prob=min_prob, horizon=horizon, rule=rule
    )[0]


@torch.no_grad()
def select_safety_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    steering: tuple,
    *,
    k: int = 50,
    seed: int = 0,
    min_prob: float = 1e-8,
    horizon: int = HORIZON,
    rule: str = "published",
    vote_top: int = VOTE_TOP,
) -> tuple[list[dict], dict]:
    """(S, how it was chosen). `published` is the authors' get_safe_tokens (vote): SAMPLES steered
    samples per prompt forced to horizon-1 tokens; steered and unsteered log-probs at the `horizon`
    positions (the first answer position and one after each sampled token), a position skipped
    from the unsteered model's first greedy end-of-turn on; special tokens, tokens containing "<|"
    and tokens under the floor set to -inf BEFORE each position's top-`vote_top`. `legacy` is this
    project's first reading (unforced samples, horizon-1 positions, the floor after the vote)."""
    if rule not in SAFETY_TOKEN_RULES:
        raise UserError(f"safety_token_rule: {rule!r} unknown (known: {', '.join(SAFETY_TOKEN_RULES)})")
    if rule == "legacy":
        return _legacy_safety_tokens(model, tokenizer, prompts, steering, k, seed, min_prob, horizon, vote_top)
    prompt_ids = encode_prompts(tokenizer, [chat_text(tokenizer, p) for p in prompts])
    prompt_ids = [ids for ids in prompt_ids for _ in range(SAMPLES)]
    stops = end_of_turn_ids(tokenizer, model)
    sampled = forced_samples(model, prompt_ids, horizon - 1, steering, stops, seed=seed, pad=_pad(tokenizer))
    lp_s, lp_b = horizon_logprobs(model, prompt_ids, sampled, steering, pad=_pad(tokenizer))
    banned = banned_token_ids(tokenizer, lp_s.size(-1))
    picked, info = published_vote(lp_s, lp_b, stops, banned, min_prob=min_prob, k=k, vote_top=vote_top)
    tokens = [{**row, "text": tokenizer.decode([row["id"]])} for row in picked]
    sampling = {"temperature": 1.0, "top_p": 1.0, **generation_defaults(model)}
    return tokens, {
        "rule": rule,
        "horizon": horizon,
        "samples": SAMPLES,
        "sampling": sampling,
        "vote_top": vote_top,
        **info,
    }


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """The ids the published code treats as the end of a turn: EOS and the chat templates'
    end-of-turn tokens (<|eot_id|>, <|end_of_text|>, <|im_end|>, <|endoftext|>, ...)."""
    ids = set(stop_token_ids(tokenizer, model))
    for name in ("<|end_of_text|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def banned_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Special tokens and every token whose string contains "<|" (the published
    exclude_special_tokens): bool [vocab_size]."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    n = min(len(tokenizer), vocab_size)
    names = tokenizer.convert_ids_to_tokens(list(range(n)))
    ids = [i for i in tokenizer.all_special_ids if i < vocab_size]
    ids += [i for i, name in enumerate(names) if isinstance(name, str) and "<|" in name]
    banned[ids] = True
    return banned


def generation_defaults(model) -> dict:
    """What HF `generate(do_sample=True, temperature=1, top_p=1)` adds from the model's generation
    config, as the authors' sampling call leaves them: top-k (HF's default 50) and the repetition
    penalty (1.0 unless the model sets one, e.g. Qwen2.5's 1.05). transformers 5 leaves an unset
    field None rather than the default: None means the transformers 4 default the authors ran with."""
    config = getattr(model, "generation_config", None)
    top_k = getattr(config, "top_k", None)
    penalty = getattr(config, "repetition_penalty", None)
    return {
        "top_k": 50 if top_k is None else int(top_k),
        "repetition_penalty": 1.0 if penalty is None else float(penalty),
    }


def forced_samples(
    model, prompt_ids: list[list[int]], n_new: int, steering: tuple, stops: Sequence[int], *, seed: int, pad: int
) -> list[list[int]]:
    """`n_new` tokens per prompt sampled from the steered model (temperature 1, top-p 1, and the
    model's generation-config top-k and repetition penalty, as HF generate applies them to the
    authors' call) with every end-of-turn id masked out, so each sample has exactly n_new tokens
    (the published min_new_tokens = max_new_tokens = horizon - 1). Seeded; batched, left-padded."""
    if n_new <= 0:
        return [[] for _ in prompt_ids]
    sampling = generation_defaults(model)
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]), steer(model, *steering):
        torch.manual_seed(seed)
        for start in range(0, len(prompt_ids), 32):
            out += _forced_batch(model, prompt_ids[start : start + 32], n_new, stops, pad, **sampling)
    return out


def _forced_batch(model, chunk, n_new: int, stops, pad: int, *, top_k: int, repetition_penalty: float) -> list:
    device = next(model.parameters()).device
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attn = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, p in enumerate(chunk):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    past, seen, step_ids = None, ids, ids
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    for _ in range(n_new):
        res = model(
            input_ids=step_ids.to(device),
            attention_mask=attn.to(device),
            position_ids=position.to(device),
            use_cache=True,
            **(cache_arg(model, past) if past is not None else {}),
        )
        past = returned_cache(res)
        logits = res.logits[:, -1].float().cpu()
        if repetition_penalty != 1.0:  # HF's RepetitionPenaltyLogitsProcessor, over the whole row
            picked = logits.gather(1, seen)
            logits.scatter_(1, seen, torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty))
        logits[:, list(stops)] = float("-inf")
        if top_k and top_k < logits.size(-1):
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        step_ids = torch.multinomial(logits.softmax(-1), 1)
        seen = torch.cat([seen, step_ids], dim=1)
        attn = torch.cat([attn, torch.ones_like(step_ids)], dim=1)
        position = position[:, -1:] + 1
    return seen[:, width:].tolist()


def horizon_logprobs(model, prompt_ids, sampled, steering: tuple, *, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(steered, unsteered) log-probs [N, H, V] (float32) at the H = len(sample) + 1 positions:
    the first answer position and one after each sampled token. A placeholder appended to each
    sample stands for the token after the last position: logits never see their own target."""
    lp_s, lp_b = [], []
    for start in range(0, len(prompt_ids), 32):
        p = prompt_ids[start : start + 32]
        r = [[*s, pad] for s in sampled[start : start + 32]]
        base, _ = response_logits(model, p, r, pad_id=pad)
        with steer(model, *steering):
            steered, _ = response_logits(model, p, r, pad_id=pad)
        lp_b.append(base.float().log_softmax(-1).cpu())
        lp_s.append(steered.float().log_softmax(-1).cpu())
    return torch.cat(lp_s), torch.cat(lp_b)


def published_vote(
    lp_s: torch.Tensor,
    lp_b: torch.Tensor,
    stops: Sequence[int],
    banned: torch.Tensor,
    *,
    min_prob: float,
    k: int,
    vote_top: int = VOTE_TOP,
) -> tuple[list[dict], dict]:
    """The published vote on [N, H, V] log-probs. A row's positions from the first one whose
    unsteered argmax is an end-of-turn id on are skipped; mean probabilities are over the kept
    (row, position) pairs; banned ids and ids whose mean steered probability is under `min_prob`
    are -inf before each position's top-`vote_top` by log p_steered - log p_base; the k most voted
    (ties: larger mean log-ratio, then lower id) with at least one vote form S."""
    argmax = lp_b.argmax(-1)
    is_end = torch.isin(argmax, torch.tensor(list(stops), dtype=argmax.dtype))
    valid = ~(is_end.long().cummax(dim=1).values.bool())  # [N, H]
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UserError("safety tokens: the unsteered model ends its turn at every scored position")
    V = lp_s.size(-1)
    prob_s, prob_b, ratio = _position_means(lp_s, lp_b, valid)
    below = prob_s < min_prob
    excluded = banned | below
    votes = torch.zeros(V, dtype=torch.long)
    for t in range(lp_s.size(1)):
        for rows in valid[:, t].nonzero().flatten().split(64):
            delta = lp_s[rows, t] - lp_b[rows, t]
            delta[:, excluded] = float("-inf")
            top = delta.topk(min(vote_top, V), dim=-1)
            votes += torch.bincount(top.indices[torch.isfinite(top.values)], minlength=V)
    votes[excluded] = 0
    candidates = [int(i) for i in (votes > 0).nonzero().flatten()]
    order = sorted(candidates, key=lambda i: (-int(votes[i]), -float(ratio[i]), i))[:k]
    picked = [
        {
            "id": i,
            "votes": int(votes[i]),
            "mean_steered_prob": float(prob_s[i]),
            "mean_base_prob": float(prob_b[i]),
            "mean_log_ratio": float(ratio[i]),
        }
        for i in order
    ]
    info = {
        "min_prob": min_prob,
        "positions_total": int(valid.numel()),
        "positions_scored": n_valid,
        "positions_skipped_end_of_turn": int(valid.numel()) - n_valid,
        "excluded_special_or_template": int(banned.sum()),
        "excluded_below_floor": int((below & ~banned).sum()),
        "mass_steered": float(prob_s[order].sum()) if order else 0.0,
    }
    return picked, info


def _position_means(lp_s: torch.Tensor, lp_b: torch.Tensor, valid: torch.Tensor) -> tuple:
    """Mean steered probability, unsteered probability and log-ratio per vocabulary entry over the
    kept (row, position) pairs, float64, in chunks of rows ([N, H, V] is large for a real vocabulary)."""
    sums = [torch.zeros(lp_s.size(-1), dtype=torch.float64) for _ in range(3)]
    for rows in torch.arange(lp_s.size(0)).split(64):
        w = valid[rows].unsqueeze(-1).double()
        sums[0] += (lp_s[rows].double().exp() * w).sum((0, 1))
        sums[1] += (lp_b[rows].double().exp() * w).sum((0, 1))
        sums[2] += ((lp_s[rows] - lp_b[rows]).double() * w).sum((0, 1))
    n = int(valid.sum())
    return tuple(x / n for x in sums)


def _legacy_safety_tokens(model, tokenizer, prompts, steering, k, seed, min_prob, horizon, vote_top) -> tuple:
    """This project's first rule: SAMPLES steered samples of horizon-1 tokens (stopping at EOS,
    empty ones dropped); at every sampled position (horizon-1 of them) the top-vote_top entries by
    log-ratio get a vote; the k most voted non-special tokens with mean steered probability >=
    min_prob (the floor applied after the vote)."""
    texts = [chat_text(tokenizer, p) for p in prompts for _ in range(SAMPLES)]
    settings = SamplingSettings(max_new_tokens=horizon - 1, temperature=1.0, batch_size=32, seed=seed)
    with steer(model, *steering):
        rollouts, _ = generate(model, tokenizer, texts, settings, progress=False)
    keep = [r for r in rollouts if r.response_ids]
    if not keep:
        raise UserError("safety tokens: every steered sample was empty")
    prompt_ids = encode_prompts(tokenizer, [chat_text(tokenizer, p) for p in prompts])
    prompt_ids = [prompt_ids[i // SAMPLES] for i, r in enumerate(rollouts) if r.response_ids]
    responses = [r.response_ids for r in keep]
    votes, prob_sum, ratio_sum, n_pos = _votes(model, prompt_ids, responses, _pad(tokenizer), steering, vote_top)
    V = votes.numel()
    mean_prob = prob_sum / n_pos
    eligible = votes > 0
    eligible &= mean_prob >= min_prob
    specials = [i for i in tokenizer.all_special_ids if i < V]
    eligible[specials] = False
    order = sorted(
        (int(i) for i in eligible.nonzero().flatten()),
        key=lambda i: (-float(votes[i]), -float(ratio_sum[i]), i),
    )[:k]
    tokens = [
        {
            "id": i,
            "text": tokenizer.decode([i]),
            "votes": int(votes[i]),
            "mean_steered_prob": float(mean_prob[i]),
            "mean_log_ratio": float(ratio_sum[i] / n_pos),
        }
        for i in order
    ]
    info = {
        "rule": "legacy",
        "horizon": horizon,
        "samples": SAMPLES,
        "vote_top": vote_top,
        "min_prob": min_prob,
        "positions_scored": n_pos,
        "samples_dropped_empty": len(rollouts) - len(keep),
        "mass_steered": float(mean_prob[order].sum()) if order else 0.0,
    }
    return tokens, info


def _votes(model, prompt_ids, responses, pad: int, steering: tuple, vote_top: int = VOTE_TOP) -> tuple:
    """Per vocabulary entry: votes (top vote_top log-ratio at a position), summed steered
    probability (float64) and summed log-ratio over the sampled positions; and their count."""
    V = None
    votes = prob_sum = ratio_sum = None
    n_pos = 0
    for start in range(0, len(responses), 32):
        p, r = prompt_ids[start : start + 32], responses[start : start + 32]
        base, mask = response_logits(model, p, r, pad_id=pad)
        with steer(model, *steering):
            steered, _ = response_logits(model, p, r, pad_id=pad)
        lb, ls = base.float().log_softmax(-1), steered.float().log_softmax(-1)
        valid = mask.bool()
        diff, ls = (ls - lb)[valid], ls[valid]  # [N, V]
        if V is None:
            V = diff.size(-1)
            votes, prob_sum, ratio_sum = torch.zeros(V), torch.zeros(V, dtype=torch.float64), torch.zeros(V)
        top = diff.topk(min(vote_top, V), dim=-1).indices
        votes += torch.bincount(top.flatten().cpu(), minlength=V).float()
        prob_sum += ls.exp().double().sum(0).cpu()
        ratio_sum += diff.sum(0).cpu()
        n_pos += diff.size(0)
    return votes, prob_sum, ratio_sum, n_pos


def steering_prompts(s: SteeringSearch) -> tuple[list[str], list[str], list[str]]:
    """(harmful, harmless for the direction, harmless for S): train-side prompts only; the two
    harmless sets are disjoint."""
    st = s.steering
    harmful = [r.prompt for r in take(s.splits.harmful, st.steer_prompts, seed=s.seed)]
    benign = [r.prompt for r in take(s.splits.benign, st.steer_prompts + st.safety_token_prompts, seed=s.seed + 2)]
    if not harmful or len(benign) < 2:
        raise UserError("steering needs harmful and harmless train prompts (steer_prompts, benign_source)")
    cut = min(st.steer_prompts, len(benign) - 1)
    return harmful, benign[:cut], benign[cut:]


def search_steering(s: SteeringSearch, model, tok, judge, out: Path, *, progress=True) -> dict:
    """Direction, candidate search and S, written to `out`; returns what load_steering returns."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = s.steering
    harmful, harmless, s_prompts = steering_prompts(s)
    n_pos = post_instruction_length(tok, harmful + harmless)
    found = steering_directions(s, model, tok, judge, out, harmful, harmless, n_pos, progress)
    context, directions, filters = found
    rows, chosen = choose_candidate(st, model, tok, directions, harmful, harmless, filters, progress)
    vector = directions[chosen["position"] + n_pos, chosen["layer"]]
    tokens, s_info = choose_safety_tokens(st, s.seed, model, tok, s_prompts, (chosen["layer"], vector, chosen["scale"]))
    tokens_per_answer = s.teacher.context_search_tokens
    chosen.update(steered_refusals(model, tok, judge, harmful, chosen, vector, tokens_per_answer))
    chosen.update(intervention_refusals(model, tok, judge, harmful, harmless, chosen, vector, tokens_per_answer))
    suffix = encode_prompts(tok, [chat_text(tok, harmful[0])])[0][-n_pos:]
    write_json(
        out / "steering.json",
        {
            "model": s.model_name,
            "direction": st.steer_direction,
            "context": context,
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            "post_instruction_tokens": [tok.decode([t]) for t in suffix],
            "candidates": rows,
            "chosen": chosen,
            "safety_tokens": s_info,
        },
    )
    save_tensors({"vector": vector.clone(), "directions": directions.contiguous()}, out / FILES[1])
    meta = {"k": st.safety_tokens_k, **{key: v for key, v in s_info.items() if key != "prompts"}}
    write_json(out / "safety_tokens.json", {**meta, "tokens": tokens})
    return load_steering(out)


def choose_safety_tokens(
    st: SteeringSettings, seed: int, model, tok, prompts: Sequence[str], steering: tuple
) -> tuple[list, dict]:
    """S on the harmless validation prompts and the record steering.json keeps of it (rule, H,
    floor, the prompts used). The published rule keeps only the prompts the unsteered model does
    not refuse (refusal score < 0, as the pipeline's filter_data; all of them when fewer than 4 pass)."""
    prompts, prompt_filter = list(prompts), None
    if st.safety_token_rule == "published":
        _, prompts, prompt_filter = refusal_filter(model, tok, [], prompts)
    tokens, info = select_safety_tokens(
        model,
        tok,
        prompts,
        steering,
        k=st.safety_tokens_k,
        seed=seed,
        min_prob=st.safety_token_min_prob,
        horizon=st.safety_token_horizon,
        rule=st.safety_token_rule,
    )
    info = {**info, "n_prompts": len(prompts), "prompts": prompts}
    if prompt_filter is not None:
        info["prompt_filter"] = {k: v for k, v in prompt_filter.items() if not k.startswith("harmful")}
    return tokens, info


def choose_candidate(
    st: SteeringSettings, model, tok, directions, harmful, harmless, filters: dict, progress
) -> tuple[list[dict], dict]:
    """Every (position, layer, scale) candidate with its figures, and the one the selection rule
    (steer_selection) picks; the published rule first filters the prompts by the model's own
    refusal score. A warning when no candidate passes the rule's filters."""
    published = st.steer_selection == "published"
    select_h, select_b = harmful, harmless
    if published:
        select_h, select_b, select_filter = refusal_filter(model, tok, harmful, harmless)
        filters["selection_filter"] = select_filter
    search = search_published if published else search_candidates
    rows, chosen = search(
        model,
        tok,
        directions,
        select_h,
        select_b,
        layers=parse_list(st.steer_layers, int, "steer_layers"),
        scales=parse_list(st.steer_scales, float, "steer_scales") or [1.0],
        kl_cap=st.steer_kl_cap,
        progress=progress,
    )
    chosen.setdefault("selection", st.steer_selection)
    if published:
        chosen["prompt_filters"] = filters
    if published and not chosen["filters_met"]:
        print(
            "warning: no steering candidate passed the published filters (ablation KL <= "
            f"{st.steer_kl_cap}, induce score >= 0); took the most refusal-inducing one under the KL cap",
            file=sys.stderr,
        )
    elif not published and not chosen["kl_cap_met"]:
        print(
            f"warning: no steering candidate met the KL cap {st.steer_kl_cap}; took the lowest-KL one", file=sys.stderr
        )
    return rows, chosen


def steering_directions(s: SteeringSearch, model, tok, judge, out: Path, harmful, harmless, n_pos, progress):
    """(context, directions [P, L, d], prompt filters): context-delta contrasts harmful prompts with
    and without the safety context (the best by flip rate when context=auto); harmful-harmless the
    two sets, which the published rule takes from disjoint train prompts filtered by the model's
    own refusal score."""
    st, teacher = s.steering, s.teacher
    if st.steer_direction == "context-delta":
        if teacher.context == "auto":
            items = [Item(f"h{i}", p, "harmful") for i, p in enumerate(harmful)]
            chosen = choose_contexts(teacher, s.splits, model, tok, judge, items, out, seed=s.seed, progress=progress)
            context = chosen["harmful"]
        else:
            context = context_text(teacher.context, load_contexts(teacher.contexts))
        return context, mean_difference(model, tok, harmful, harmful, n_pos, system_a=context), {}
    if st.steer_selection != "published":
        return None, mean_difference(model, tok, harmful, harmless, n_pos), {}
    train_h, train_b = direction_prompts(s)
    split = "disjoint train prompts" if train_h else "the selection prompts (no more train prompts)"
    train_h, train_b, train_filter = refusal_filter(model, tok, train_h or harmful, train_b or harmless)
    filters = {"direction_prompts": split, "direction_filter": train_filter}
    return None, mean_difference(model, tok, train_h, train_b, n_pos), filters


def direction_prompts(s: SteeringSearch) -> tuple[list[str], list[str]]:
    """Train prompts for the direction itself, disjoint from steering_prompts' (the published
    pipeline takes directions from a train split and selects on a validation split): the next
    steer_prompts of each shuffled train list. Empty when the sources have no more."""
    n, skip = s.steering.steer_prompts, s.steering.steer_prompts + s.steering.safety_token_prompts
    harmful = [r.prompt for r in take(s.splits.harmful, None, seed=s.seed)[n : 2 * n]]
    benign = [r.prompt for r in take(s.splits.benign, None, seed=s.seed + 2)[skip : skip + n]]
    return (harmful, benign) if harmful and benign else ([], [])


def steered_refusals(model, tok, judge, harmful: Sequence[str], chosen: dict, vector, tokens: int) -> dict:
    """What the chosen candidate does to greedy answers (of up to `tokens` tokens) on harmful prompts
    (the teacher flip rate OPSA ranks contexts by): refusal rate without and with steering, and the
    share flipped."""
    settings = SamplingSettings(max_new_tokens=tokens, temperature=0.0, batch_size=32)
    texts = [chat_text(tok, p) for p in harmful]
    base, _ = generate(model, tok, texts, settings, progress=False)
    with steer(model, chosen["layer"], vector, chosen["scale"]):
        steered, _ = generate(model, tok, texts, settings, progress=False)
    b = [judge.is_refusal(r.text) for r in base]
    s = [judge.is_refusal(r.text) for r in steered]
    n = max(1, len(harmful))
    return {
        "greedy_refusal_rate_base": sum(b) / n,
        "greedy_refusal_rate_steered": sum(s) / n,
        "flip_rate": sum(y and not x for x, y in zip(b, s, strict=True)) / n,
        "n_flip_prompts": len(harmful),
        "steered_examples": [r.text for r in steered[:3]],
    }


def intervention_refusals(
    model, tok, judge, harmful: Sequence[str], harmless: Sequence[str], chosen: dict, vector, tokens: int
) -> dict:
    """Greedy answers under the two interventions the published rule scores: the chosen vector
    added on harmless prompts (induced refusals) and the direction ablated everywhere on harmful
    prompts (bypass: base refusals that ablation turns into non-refusals)."""
    settings = SamplingSettings(max_new_tokens=tokens, temperature=0.0, batch_size=32)
    harmless_texts = [chat_text(tok, p) for p in harmless]
    harmful_texts = [chat_text(tok, p) for p in harmful]
    base_b, _ = generate(model, tok, harmless_texts, settings, progress=False)
    with steer(model, chosen["layer"], vector, chosen["scale"]):
        added_b, _ = generate(model, tok, harmless_texts, settings, progress=False)
    base_h, _ = generate(model, tok, harmful_texts, settings, progress=False)
    with ablate(model, vector):
        ablated_h, _ = generate(model, tok, harmful_texts, settings, progress=False)
    rb = [judge.is_refusal(r.text) for r in base_b]
    ab = [judge.is_refusal(r.text) for r in added_b]
    rh = [judge.is_refusal(r.text) for r in base_h]
    ah = [judge.is_refusal(r.text) for r in ablated_h]
    return {
        "n_harmless_prompts": len(harmless),
        "harmless_refusals_base": sum(rb),
        "harmless_refusals_added": sum(ab),
        "induced_refusals": sum(y and not x for x, y in zip(rb, ab, strict=True)),
        "harmful_refusals_base": sum(rh),
        "harmful_refusals_ablated": sum(ah),
        "bypassed": sum(x and not y for x, y in zip(rh, ah, strict=True)),
        "added_harmless_examples": [r.text for r in added_b[:3]],
        "ablated_harmful_examples": [r.text for r in ablated_h[:3]],
    }


def steering_section(out: Path) -> list[str]:
    """The chosen steering candidate and the safety token set S, when the run has them."""
    lines: list[str] = []
    steering, tokens = Path(out) / "steering.json", Path(out) / "safety_tokens.json"
    if steering.exists():
        s = json.loads(steering.read_text())
        c = s["chosen"]
        lines += [
            "## Steering direction",
            "",
            f"`{s['direction']}` direction, post-instruction {describe_choice(c)}; "
            f"{len(s['candidates'])} candidates in steering.json.",
            "",
        ]
    if tokens.exists():
        t = json.loads(tokens.read_text())["tokens"]
        lines += [
            f"## Safety tokens S ({len(t)})",
            "",
            " ".join(f"`{x['text']!r}`" for x in t),
            "",
        ]
    return lines


def describe_choice(chosen: dict) -> str:
    """One line on the chosen candidate: its selection figures and what it does to greedy answers."""
    c = chosen
    head = f"layer {c['layer']}, position {c['position']}, scale {c['scale']} (norm {c['norm']:.2f})"
    if c.get("selection") == "published":
        figures = (
            f"published rule, {c['n_survivors']} candidates passed"
            + ("" if c["filters_met"] else " (NONE: fallback)")
            + f" · ablation KL on harmless {c['ablation_kl']:.3f} (cap {c['kl_cap']}) · induce score on harmless "
            f"{c['base_refusal_score_harmless']:+.2f} -> {c['induce_score']:+.2f} · bypass score on harmful "
            f"{c['base_refusal_score_harmful']:+.2f} -> {c['bypass_score']:+.2f}"
        )
    else:
        figures = (
            f"legacy-add-kl rule · refusal score on harmful {c['base_refusal_score_harmful']:+.2f} -> "
            f"{c['refusal_score_harmful']:+.2f} · KL on harmless {c['kl_harmless']:.3f} (cap {c['kl_cap']}"
            + ("" if c["kl_cap_met"] else ", NOT met")
            + ")"
        )
    greedy = ""
    if "flip_rate" in c:
        n = c["n_flip_prompts"]
        greedy = (
            f" · greedy refusals on {n} harmful prompts {c['greedy_refusal_rate_base'] * n:.0f} -> "
            f"{c['greedy_refusal_rate_steered'] * n:.0f} added (flips {c['flip_rate'] * n:.0f}/{n})"
        )
    if "induced_refusals" in c:
        greedy += (
            f" · induced refusals on harmless {c['induced_refusals']}/{c['n_harmless_prompts']} "
            f"({c['harmless_refusals_base']} -> {c['harmless_refusals_added']}) · bypass {c['bypassed']} of "
            f"{c['harmful_refusals_base']} harmful refusals removed by ablation"
        )
    return f"{head}; {figures}{greedy}"


def load_steering(directory: Path) -> dict:
    """{"steering": {layer, vector, scale}, "vocab_ids": LongTensor, "safety_tokens": [...]}."""
    directory = Path(directory)
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise UserError(f"{directory}: not a `safedistill steer` output (missing {', '.join(missing)})")
    chosen = json.loads((directory / "steering.json").read_text())["chosen"]
    tokens = json.loads((directory / "safety_tokens.json").read_text())["tokens"]
    vector = load_file(directory / FILES[1])["vector"]
    return {
        "steering": {"layer": int(chosen["layer"]), "vector": vector, "scale": float(chosen["scale"])},
        "vocab_ids": torch.tensor([t["id"] for t in tokens], dtype=torch.long),
        "safety_tokens": tokens,
    }


def prepare_steering(s: SteeringSearch, model, tok, judge, out: Path, *, progress=True) -> dict:
    """Reuse `steer_from` (or this run's own files on resume); otherwise search now."""
    steer_from = s.steering.steer_from
    if steer_from:
        prepared = load_steering(Path(steer_from))
        for name in FILES:  # the run directory documents what it trained with
            (Path(out) / name).write_bytes((Path(steer_from) / name).read_bytes())
        return prepared
    if all((Path(out) / f).is_file() for f in FILES):
        return load_steering(out)
    return search_steering(s, model, tok, judge, out, progress=progress)
