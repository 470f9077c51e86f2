"""Forward passes that return logits at the response positions only, aligned across a batch.

Sequences are right-padded (scoring needs no generation, so positions stay contiguous) and the
logits predicting response token j land at column j, so student and teacher line up even when
their prompts differ in length (the teacher's carries a privileged context).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

MIN_SHARED_PREFIX = 16  # tokens; below this a prefix cache is not worth its bookkeeping


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix all sequences share."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return list(first[:n])


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares (leaving each at least one of its own), or 0
    when that is too short to be worth a separate pass."""
    if len(prompts) < 2:
        return 0
    n = min(len(common_prefix(prompts)), min(len(p) for p in prompts) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def has_dropout(model) -> bool:
    """Whether a training-mode forward is random (a prefix shared across rows would then share
    its dropout mask too, unlike one pass per row)."""
    if not model.training:
        return False
    if getattr(getattr(model, "config", None), "attention_dropout", 0.0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def recomputes_layers(model) -> bool:
    """Whether this forward runs under gradient checkpointing: the backward replays each layer,
    which would write a KV cache a second time, so such a pass takes no shared-prefix cache."""
    if not (model.training and torch.is_grad_enabled()):
        return False
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def response_logits(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    prefix_cache: DynamicCache | None = None,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], mask [B, T]) with T the longest response. With `prefix_cache`, every
    sequence continues the same cached prefix (batch 1), which is expanded to the batch.

    Without one, the prompts' shared leading tokens (the chat template's system turn) run once at
    batch 1 and are expanded over the batch, with gradient when gradients are on: the same
    logits and gradients as one pass per row (autograd sums over the expanded rows), for
    fewer tokens. `share_prefix=False`, a model with active dropout, or one under gradient
    checkpointing, runs every row whole."""
    if prefix_cache is None and share_prefix and not has_dropout(model) and not recomputes_layers(model):
        k = shared_prefix_length(prompts)
        if k:
            prefix_cache = _prefix_pass(model, prompts[0][:k])
            prompts = [p[k:] for p in prompts]
    ids, index, mask = _packed(prompts, responses, pad_id)
    width = ids.size(1)
    device = next(model.parameters()).device
    index = index.to(device)
    # Vocabulary projections only at those positions: the prompt positions' would be thrown away.
    # Given the positions themselves, transformers gathers the hidden states (a contiguous
    # [B, T, H] input: one matmul for the output projection, not a strided batched one) and the
    # logits need no gather; older models take a count of trailing positions instead.
    if takes_position_index(model):
        kwargs, first = {"logits_to_keep": index}, None
    elif accepts_logits_to_keep(model):
        first = max(min(len(p) for p in prompts) - 1, 0)
        kwargs = {"logits_to_keep": width - first}
    else:
        kwargs, first = {}, 0
    if prefix_cache is not None:
        offset = prefix_cache.get_seq_length()
        kwargs = {
            **kwargs,
            **cache_arg(model, expand_cache(prefix_cache, len(prompts))),
            "attention_mask": torch.ones(len(prompts), offset + width, dtype=torch.long, device=device),
        }
    logits = model(input_ids=ids.to(device), use_cache=prefix_cache is not None, **kwargs).logits
    if first is None:
        out = logits
    else:
        shifted = index - first
        out = logits.gather(1, shifted.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
    return out, mask.to(device)


def _packed(prompts, responses, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids [B, W]; per row, the positions len(prompt)-1 ...
    len(prompt)+len(response)-2 that predict the response [B, T]; the response mask [B, T]."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    t_max = max(1, max(len(r) for r in responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    index = torch.zeros(len(prompts), t_max, dtype=torch.long)
    mask = torch.zeros(len(prompts), t_max)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor([*p, *r], dtype=torch.long)
        n = len(r)
        index[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        index[i, n:] = max(len(p) - 1, 0)
        mask[i, :n] = 1
    return ids, index, mask


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _causal_lm(model):
    while hasattr(model, "module") or hasattr(model, "get_base_model"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return model


@functools.cache
def _slices_by_positions(cls: type) -> bool:
    try:
        return "slice_logits_to_keep(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def takes_position_index(model) -> bool:
    """Whether the causal LM takes `logits_to_keep` as a [B, T] tensor of positions per row
    (transformers' `slice_logits_to_keep`, in most decoders since transformers 5)."""
    return _slices_by_positions(type(_causal_lm(model)))


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any peft/DDP wrappers can skip logits (transformers >= 4.50)."""
    return _forward_takes(type(_causal_lm(model)), "logits_to_keep")


def cache_arg(model, cache) -> dict:
    """The KV cache as a forward() keyword: `cache` where transformers renamed `past_key_values`
    (deprecated, removed in 5.40), the old name before."""
    name = "cache" if _forward_takes(type(_causal_lm(model)), "cache") else "past_key_values"
    return {name: cache}


def returned_cache(output):
    """The KV cache a forward() with use_cache=True returned, under either name."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def expand_cache(prefix_cache: DynamicCache, batch: int) -> DynamicCache:
    """A fresh cache holding the batch-1 prefix for every row; the prefix itself is never
    written to (new keys are concatenated into new tensors)."""
    cache = DynamicCache()
    for layer, cached in enumerate(prefix_cache.layers):
        cache.update(cached.keys.expand(batch, -1, -1, -1), cached.values.expand(batch, -1, -1, -1), layer)
    return cache


def _prefix_pass(model, prefix_ids: Sequence[int]) -> DynamicCache:
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    return returned_cache(model(input_ids=ids, use_cache=True, **kwargs))


@torch.no_grad()
def prefix_kv(model, prefix_ids: Sequence[int]) -> DynamicCache:
    """The KV cache of a prefix, without gradient (for frozen models and generation)."""
    return _prefix_pass(model, prefix_ids)


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of -sum_v p log p, logits [B, T, V]."""
    with torch.no_grad():
        logp = logits.float().log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)
        m = mask.float()
        return float((ent * m).sum() / m.sum().clamp(min=1))
