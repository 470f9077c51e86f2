"""The steering teacher and activation steering: residual activations, difference-of-means directions, the hook that adds a
vector at one layer's input, directional ablation, and the refusal-direction candidate search
(Arditi et al.; the published selection rule of andyrdt/refusal_direction, and the older rule).

Works on any decoder whose layers sit at `model.model.layers` (Llama, Qwen2/3, Mistral, Gemma),
also behind a peft wrapper. Directions are computed in float64: the difference of two means of
large, similar activations loses most of its digits in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..engine.rollout import encode_prompts
from ..engine.scoring import response_logits
from ..errors import UserError
from ..models import chat_text
from .base import Item

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


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (unwrapping peft)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(inner).__name__}: steering needs a decoder exposing model.model.layers")
    return layers


@contextlib.contextmanager
def steer(model, layer: int, vector: torch.Tensor, scale: float = 1.0) -> Iterator:
    """Adds `scale * vector` to the input of decoder layer `layer` at every position while the
    context is open; the hook is removed on exit, also when the body raises."""
    block = decoder_layers(model)[layer]
    param = next(block.parameters())
    delta = (scale * vector.to(torch.float64)).to(device=param.device, dtype=param.dtype)

    def hook(module, args, kwargs):
        if args:
            return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + delta.to(kwargs["hidden_states"].dtype)
        return args, kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def _ablated(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


@contextlib.contextmanager
def ablate(model, direction: torch.Tensor) -> Iterator:
    """Projects `direction` out of the residual stream at every layer and position while open: each
    decoder layer's input, its attention output and its MLP output, as the refusal-direction code
    does (so no write into the stream carries the direction). Hooks are removed on exit."""
    unit = direction.to(torch.float64)
    unit = unit / (unit.norm() + 1e-8)
    handles = []

    def pre(module, args, kwargs):
        if args:
            return (_ablated(args[0], unit), *args[1:]), kwargs
        kwargs["hidden_states"] = _ablated(kwargs["hidden_states"], unit)
        return args, kwargs

    def post(module, args, output):
        if isinstance(output, tuple):
            return (_ablated(output[0], unit), *output[1:])
        return _ablated(output, unit)

    try:
        for block in decoder_layers(model):
            attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            if attn is None or mlp is None:
                raise UserError(f"{type(block).__name__}: ablation needs decoder layers with self_attn and mlp")
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.register_forward_hook(post))
            handles.append(mlp.register_forward_hook(post))
        yield model
    finally:
        for h in handles:
            h.remove()


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


class SteeringTeacher:
    """Base model with `scale * vector` added at one layer's input (activation steering). It sees
    the same prompt as the student; only the hidden states differ."""

    def __init__(self, base, tokenizer, *, layer: int, vector: torch.Tensor, scale: float = 1.0):
        self.base, self.tokenizer, self.reference = base, tokenizer, base
        self.layer, self.vector, self.scale = layer, vector, scale

    @torch.no_grad()
    def logits(self, student, items: Sequence[Item], responses: Sequence[Sequence[int]]) -> torch.Tensor:
        prompts = encode_prompts(self.tokenizer, [chat_text(self.tokenizer, it.prompt) for it in items])
        with self.base.weights(student) as model, steer(model, self.layer, self.vector, self.scale):
            logits, _ = response_logits(model, prompts, responses, pad_id=self.tokenizer.pad_token_id)
        return logits
