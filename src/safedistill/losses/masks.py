"""Token masks: which response positions a step's loss averages over.

TOKEN_MASKS maps `token_mask` to a function (response mask, detached per-token reverse KL, the
loss section) -> float loss mask [B, T]. The vocabulary mask (`vocab_mask`, e.g. SafeSteer's S) is a
restriction of the divergence's sum over the vocabulary, not of positions: see VOCAB_MASKS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import LossSettings


@dataclass(frozen=True)
class TokenMask:
    select: Callable[[torch.Tensor, torch.Tensor, LossSettings], torch.Tensor]  # (mask, reverse_kl, loss) -> mask
    help: str


@dataclass(frozen=True)
class VocabMask:
    help: str
    needs_ids: bool  # the run must prepare the ids (searches/steering.py: prepare_steering)


TOKEN_MASKS: dict[str, TokenMask] = {
    "all": TokenMask(lambda mask, kl, loss: mask, "every response position"),
    "first_k": TokenMask(lambda mask, kl, loss: first_k_mask(mask, loss.mask_k), "the first mask_k positions"),
    "top_fraction": TokenMask(
        lambda mask, kl, loss: top_fraction_mask(kl, mask, fraction=loss.mask_fraction),
        "the mask_fraction of positions where student and teacher disagree most",
    ),
    "threshold": TokenMask(
        lambda mask, kl, loss: top_fraction_mask(kl, mask, threshold=loss.mask_threshold),
        "positions whose reverse KL exceeds mask_threshold",
    ),
}

VOCAB_MASKS: dict[str, VocabMask] = {
    "none": VocabMask("the divergence sums over the whole vocabulary (or top_k)", False),
    "safety_tokens": VocabMask("sum over SafeSteer's safety tokens S only, not renormalised", True),
}


def top_fraction_mask(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    fraction: float | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Position mask selecting, within `mask`, the positions whose score (e.g. per-token
    teacher-student divergence, detached) is above `threshold`, or in the top `fraction` of each
    sequence's valid positions (at least one per non-empty sequence). Returns a float mask [B,T].

    Used to spend the distillation signal on the few tokens where student and teacher disagree.
    Ties at the cut-off are broken by position (earlier first). Exactly one option must be set.
    """
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction or threshold")
    if scores.shape != mask.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(mask.shape)} must be [B, T]")
    valid = mask != 0
    scores = scores.detach().float()
    if threshold is not None:
        return (valid & (scores > threshold)).float()
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = valid.sum(dim=1, keepdim=True)
    k = torch.ceil(n.double() * fraction - 1e-9).clamp(min=1)  # epsilon: 0.07 * 100 != 7 in fp
    lo = torch.finfo(torch.float32).min  # valid NaN/-inf scores still rank above padding
    ranked = scores.nan_to_num(nan=lo, neginf=lo).masked_fill(~valid, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (valid & (rank < k)).float()


def first_k_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Keep only the first k valid (mask==1) positions of each row. Returns a float mask.

    The earliest response tokens decide whether a reply starts to comply or refuse.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    valid = mask != 0
    return (valid & (valid.long().cumsum(dim=-1) <= k)).float()
