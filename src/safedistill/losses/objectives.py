"""The published COPSD training signal, usable with any teacher: a clipped per-token reward on the
sampled tokens, normalised over each prompt's group of rollouts, in a PPO-style clipped surrogate,
plus a small KL to the reference (the frozen base).

    r_t = clip(log pi_T(y_t) - log pi_S_old(y_t), low, high) + bonus
    A_t = (r_t - mean_group(r)) / (std_group(r) + eps)      over all tokens of the group's rollouts
    L_t = -min(rho_t A_t, clip(rho_t, 1 - e, 1 + e) A_t) + kl_coef * k3(pi_S || pi_ref)_t
    rho_t = pi_S(y_t) / pi_S_old(y_t)

Shapes are [B, T] per-token tensors with a [B, T] response mask; rows of one group are adjacent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .divergence import DIVERGENCES, masked_mean, per_token_divergence


def clipped_reward(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    *,
    low: float = -3.0,
    high: float = 5.0,
    bonus: float = 0.02,
) -> torch.Tensor:
    """Detached per-token reward; the bonus rewards every emitted token, which counters the
    pull toward short answers that a pure log-ratio reward exerts."""
    return (teacher_logp.detach().float() - student_logp.detach().float()).clamp(low, high) + bonus


def group_normalize(values: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(v - mean) / (std + eps) with mean and (population) std over all masked tokens of each
    block of `group_size` adjacent rows; zero outside the mask."""
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must be the same [B, T]")
    if group_size < 1 or values.size(0) % group_size:
        raise ValueError(f"batch of {values.size(0)} rows does not split into groups of {group_size}")
    m = mask.float()
    v = torch.where(m != 0, values.float(), 0.0)
    g = values.size(0) // group_size
    vg, mg = v.view(g, -1), m.view(g, -1)
    n = mg.sum(1, keepdim=True).clamp(min=1)
    mean = vg.sum(1, keepdim=True) / n
    std = (((vg - mean) ** 2 * mg).sum(1, keepdim=True) / n).sqrt()
    return (((vg - mean) / (std + eps)) * mg).view_as(v)


def ppo_clipped_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """Per-token -min(rho A, clip(rho) A); no gradient where the clipped term is the minimum."""
    ratio = (logp.float() - old_logp.detach().float()).exp()
    adv = advantages.detach().float()
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_S || pi_ref) on tokens sampled from pi_S (always >= 0):
    exp(d) - d - 1 with d = log pi_ref - log pi_S."""
    d = ref_logp.detach().float() - logp.float()
    return d.exp() - d - 1


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y_t], [B, T], in float32."""
    return logits.float().log_softmax(-1).gather(-1, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1)


def clipped_reward_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    *,
    group_size: int,
    old_logp: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    low: float = -3.0,
    high: float = 5.0,
    bonus: float = 0.02,
    clip: float = 0.2,
    kl_coef: float = 0.005,
) -> tuple[torch.Tensor, dict]:
    """(per-token loss [B, T], detached stats). `old_logp`: the rollout policy's log-probs of
    the sampled tokens (default: the current ones, detached: one update per rollout batch)."""
    logp = token_logprobs(student_logits, tokens)
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    reward = clipped_reward(token_logprobs(teacher_logits, tokens), old, low=low, high=high, bonus=bonus)
    adv = group_normalize(reward, mask, group_size)
    loss = ppo_clipped_loss(logp, old, adv, clip)
    stats = {"reward": reward, "clipped": ((logp.detach() - old).exp() - 1).abs() > clip}
    if ref_logits is not None and kl_coef:
        kl = k3_kl(logp, token_logprobs(ref_logits, tokens))
        loss = loss + kl_coef * kl
        stats["ref_kl"] = kl.detach()
    return loss, stats


@dataclass
class Scored:
    """One micro-batch after rollout and scoring: what every objective reads."""

    prompts: list[list[int]]  # student prompt ids
    responses: list[list[int]]  # sampled ids, the stop token included when the answer finished
    tokens: torch.Tensor  # [B, T] the responses, padded with 0
    mask: torch.Tensor  # [B, T] response positions
    student_logits: torch.Tensor  # [B, T, V] with grad
    teacher_logits: torch.Tensor  # [B, T, V] no grad
    vocab_ids: torch.Tensor | None  # vocab_mask ids (SafeSteer's S), else None


def divergence_objective(cfg, batch: Scored, student, reference, pad_id: int) -> tuple[torch.Tensor, dict]:
    """The on-policy distillation loss: cfg.divergence per token (top_k and vocab_ids as it allows)."""
    kind = DIVERGENCES[cfg.divergence]
    per_token = per_token_divergence(
        batch.student_logits,
        batch.teacher_logits,
        cfg.divergence,
        tokens=batch.tokens,
        alpha=cfg.alpha,
        beta=cfg.beta,
        top_k=cfg.top_k if kind.top_k and batch.vocab_ids is None else None,
        vocab_ids=batch.vocab_ids,
    )
    return per_token, {}


def clipped_reward_step(cfg, batch: Scored, student, reference, pad_id: int) -> tuple[torch.Tensor, dict]:
    """COPSD's signal: per-token loss and logged figures. The reference forward (adapter off, or
    the frozen copy) runs only when the KL term is on."""
    from ..engine.scoring import response_logits

    ref_logits = None
    if reference is not None and cfg.ref_kl_coef:
        with torch.no_grad(), reference.weights(student) as ref:
            ref_logits, _ = response_logits(ref, batch.prompts, batch.responses, pad_id=pad_id)
    loss, stats = clipped_reward_objective(
        batch.student_logits,
        batch.teacher_logits,
        batch.tokens,
        batch.mask,
        group_size=cfg.rollouts_per_prompt,
        ref_logits=ref_logits,
        low=cfg.reward_clip_low,
        high=cfg.reward_clip_high,
        bonus=cfg.reward_bonus,
        clip=cfg.ppo_clip,
        kl_coef=cfg.ref_kl_coef,
    )
    info = {
        "reward_mean": float(masked_mean(stats["reward"], batch.mask)),
        "clip_fraction": float(masked_mean(stats["clipped"].float(), batch.mask)),
    }
    if "ref_kl" in stats:
        info["ref_kl"] = float(masked_mean(stats["ref_kl"], batch.mask))
    return loss, info


@dataclass(frozen=True)
class Objective:
    loss: Callable  # (cfg, Scored, student, reference, pad_id) -> (per-token loss [B, T], metrics)
    help: str
    uses_divergence: bool  # reads cfg.divergence (and so vocab_mask)


OBJECTIVES: dict[str, Objective] = {
    "divergence": Objective(divergence_objective, "the masked per-token divergence (docs/design.md)", True),
    "clipped_reward": Objective(clipped_reward_step, "COPSD's clipped reward, group-normalised, PPO-clip", False),
}
