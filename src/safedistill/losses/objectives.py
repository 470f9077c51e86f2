"""The published COPSD training signal, usable with any teacher: a clipped per-token reward on the
sampled tokens, summed over each response and normalised over its prompt's group of rollouts
(GRPO style), in a PPO-style clipped surrogate, plus a small KL to the reference (the frozen base).

Every log-probability here is of the tempered distribution softmax(logits / tau), tau the rollout
temperature, for student, teacher and reference alike: the tokens were drawn from the student's
tempered distribution, and a sampled-token estimator is unbiased only for the distribution that
drew it (TRL's GRPO and GKD divide the logits by the temperature the same way). Tempering the
teacher and the reference too keeps the fixed point at student = teacher and the KL term at zero
for the base model.

    r_t = clip(log pi_T(y_t) - log pi_S_old(y_t), low, high) + bonus
    reward_level sequence: R = sum_t r_t over the response, A = (R - mean_group R) / (std_group R + eps),
                           A_t = A at each of its tokens (the bonus adds bonus * length to R)
    reward_level token:    A_t = (r_t - mean_group r) / (std_group r + eps) over all tokens of the group
                           (a constant per-token bonus cancels exactly)
    L_t = -min(rho_t A_t, clip(rho_t, 1 - e, 1 + e) A_t) + kl_coef * KL_t,  rho_t = pi_S(y_t) / pi_S_old(y_t)
    KL_t (REF_KL_ESTIMATORS) k3_forward: exp(d) - d - 1, d = log pi_ref(y_t) - log pi_S(y_t); its value
                           estimates KL(pi_S || pi_ref) but its expected gradient is grad KL(pi_ref || pi_S)
                           full_reverse: KL(pi_S || pi_ref) summed over the vocabulary at each position

Shapes are [B, T] per-token tensors with a [B, T] response mask; rows of one group are adjacent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .divergence import DIVERGENCES, full_reverse_kl, masked_mean, per_token_divergence

if TYPE_CHECKING:
    from ..config import LossSettings, RolloutSettings

ADV_EPS = 1e-6  # a group whose rewards are all equal gets advantage 0, not 0/0


def sampling_temperature(temperature: float) -> float:
    """The temperature the rollouts were drawn at; greedy rollouts (0) are scored at 1."""
    return temperature if temperature > 0 else 1.0


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (the same tensor at 1)."""
    return logits if temperature == 1.0 else logits.float() / temperature


def clipped_reward(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    *,
    low: float = -3.0,
    high: float = 5.0,
    bonus: float = 0.02,
) -> torch.Tensor:
    """Detached per-token reward; the bonus rewards every emitted token, which counters the
    pull toward short answers that a pure log-ratio reward exerts (through a sequence reward:
    per token it cancels in the normalisation)."""
    return (teacher_logp.detach().float() - student_logp.detach().float()).clamp(low, high) + bonus


def _check_groups(values: torch.Tensor, mask: torch.Tensor, group_size: int) -> None:
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must be the same [B, T]")
    if group_size < 1 or values.size(0) % group_size:
        raise ValueError(f"batch of {values.size(0)} rows does not split into groups of {group_size}")


def group_normalize(values: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """(v - mean) / (std + eps) with mean and (population) std over all masked tokens of each
    block of `group_size` adjacent rows; zero outside the mask."""
    _check_groups(values, mask, group_size)
    m = mask.float()
    v = torch.where(m != 0, values.float(), 0.0)
    g = values.size(0) // group_size
    vg, mg = v.reshape(g, -1), m.reshape(g, -1)
    n = mg.sum(1, keepdim=True).clamp(min=1)
    mean = vg.sum(1, keepdim=True) / n
    std = (((vg - mean) ** 2 * mg).sum(1, keepdim=True) / n).sqrt()
    return (((vg - mean) / (std + eps)) * mg).view_as(v)


def sequence_advantages(
    reward: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = ADV_EPS
) -> torch.Tensor:
    """GRPO's advantage: each response's summed reward R, normalised by the mean and (population)
    std of R over its group of `group_size` adjacent rows, broadcast to its tokens; zero outside
    the mask. A group of one has nothing to compare with (A = 0), so it is refused."""
    _check_groups(reward, mask, group_size)
    if group_size < 2:
        raise ValueError("a sequence reward needs groups of at least 2 rollouts (a group of one has advantage 0)")
    m = mask.float()
    total = torch.where(m != 0, reward.float(), 0.0).sum(1).view(-1, group_size)
    mean, std = total.mean(1, keepdim=True), total.std(1, correction=0, keepdim=True)
    return ((total - mean) / (std + eps)).view(-1, 1) * m


@dataclass(frozen=True)
class RewardLevel:
    advantages: Callable  # (reward [B, T], mask [B, T], group_size) -> advantages [B, T]
    help: str


REWARD_LEVELS: dict[str, RewardLevel] = {
    "sequence": RewardLevel(
        sequence_advantages,
        "GRPO: per-token rewards summed over each response, normalised across the prompt's rollouts, "
        "broadcast to its tokens (the length bonus counts); needs rollouts_per_prompt >= 2",
    ),
    "token": RewardLevel(
        group_normalize,
        "each token's reward normalised over all tokens of the prompt's rollouts (a constant per-token "
        "bonus cancels exactly: reward_bonus has no effect)",
    ),
}


def ppo_clipped_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """Per-token -min(rho A, clip(rho) A); no gradient where the clipped term is the minimum."""
    ratio = (logp.float() - old_logp.detach().float()).exp()
    adv = advantages.detach().float()
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


@torch.no_grad()
def clip_active(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """Where the PPO clip acts (the token gets no gradient): rho > 1 + e with A > 0, or
    rho < 1 - e with A < 0. Always false at the rollout policy (rho = 1)."""
    ratio = (logp.float() - old_logp.float()).exp()
    return ((ratio > 1 + clip) & (advantages > 0)) | ((ratio < 1 - clip) & (advantages < 0))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = log pi_ref - log pi_S, on tokens sampled from pi_S (always >= 0).
    Its value is an unbiased estimate of KL(pi_S || pi_ref); its gradient, (1 - pi_ref/pi_S)
    grad log pi_S, has expectation -sum_y pi_ref(y) grad log pi_S(y) = grad KL(pi_ref || pi_S):
    it pulls in the forward direction."""
    d = ref_logp.detach().float() - logp.float()
    return d.exp() - d - 1


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y_t], [B, T], in float32."""
    return logits.float().log_softmax(-1).gather(-1, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class RefKL:
    per_token: Callable  # (student logits, reference logits, tokens, student token log-probs) -> [B, T]
    help: str


REF_KL_ESTIMATORS: dict[str, RefKL] = {
    "k3_forward": RefKL(
        lambda s, ref, tokens, logp: k3_kl(logp, token_logprobs(ref, tokens)),
        "k3 on the sampled tokens: its value estimates KL(student || base) but its expected gradient is that of "
        "the forward KL(base || student) (mass-covering)",
    ),
    "full_reverse": RefKL(
        lambda s, ref, tokens, logp: full_reverse_kl(s, ref),
        "the reverse KL(student || base) summed over the whole vocabulary at each response position: value and "
        "gradient exact at each position (mode-seeking); one more [B, T, V] pass",
    ),
}


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
    temperature: float = 1.0,
    reward_level: str = "sequence",
    ref_kl: str = "k3_forward",
) -> tuple[torch.Tensor, dict]:
    """(per-token loss [B, T], detached stats). `old_logp`: the rollout policy's tempered
    log-probs of the sampled tokens (default: the current ones, detached: the first update on a
    rollout batch); the reward is computed from them, so it stays fixed over ppo_epochs."""
    student, teacher = tempered(student_logits, temperature), tempered(teacher_logits, temperature)
    logp = token_logprobs(student, tokens)
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    reward = clipped_reward(token_logprobs(teacher, tokens), old, low=low, high=high, bonus=bonus)
    adv = REWARD_LEVELS[reward_level].advantages(reward, mask, group_size)
    loss = ppo_clipped_loss(logp, old, adv, clip)
    stats = {
        "reward": reward,
        "advantage": adv,
        "clipped": clip_active(logp, old, adv, clip),
        "ratio_dev": (logp.detach() - old).exp().sub(1).abs(),
    }
    if ref_logits is not None and kl_coef:
        kl = REF_KL_ESTIMATORS[ref_kl].per_token(student, tempered(ref_logits, temperature), tokens, logp)
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
    old_logp: torch.Tensor | None = None  # [B, T] the rollout policy's tempered log-probs, on reused rollouts


def divergence_objective(
    loss: LossSettings, rollout: RolloutSettings, batch: Scored, student, reference, pad_id: int
) -> tuple[torch.Tensor, dict]:
    """The on-policy distillation loss: loss.divergence per token (top_k and vocab_ids as it allows).
    A sampled-token divergence reads student and teacher at the rollout temperature (its
    expected gradient is then that of the tempered divergence); the full-vocabulary ones do not
    depend on how the tokens were drawn and stay at temperature 1."""
    kind = DIVERGENCES[loss.divergence]
    tau = sampling_temperature(rollout.temperature) if kind.over_vocab is None else 1.0
    per_token = per_token_divergence(
        tempered(batch.student_logits, tau),
        tempered(batch.teacher_logits, tau),
        loss.divergence,
        tokens=batch.tokens,
        alpha=loss.alpha,
        beta=loss.beta,
        top_k=loss.top_k if kind.top_k and batch.vocab_ids is None else None,
        vocab_ids=batch.vocab_ids,
    )
    return per_token, {}


def clipped_reward_step(
    loss: LossSettings, rollout: RolloutSettings, batch: Scored, student, reference, pad_id: int
) -> tuple[torch.Tensor, dict]:
    """COPSD's signal: per-token loss and logged figures. The reference forward (adapter off, or
    the frozen copy) runs only when the KL term is on."""
    from ..engine.scoring import response_logits

    ref_logits = None
    if reference is not None and loss.ref_kl_coef:
        with torch.no_grad(), reference.weights(student) as ref:
            ref_logits, _ = response_logits(ref, batch.prompts, batch.responses, pad_id=pad_id)
    per_token, stats = clipped_reward_objective(
        batch.student_logits,
        batch.teacher_logits,
        batch.tokens,
        batch.mask,
        group_size=rollout.rollouts_per_prompt,
        old_logp=batch.old_logp,
        ref_logits=ref_logits,
        low=loss.reward_clip_low,
        high=loss.reward_clip_high,
        bonus=loss.reward_bonus,
        clip=loss.ppo_clip,
        kl_coef=loss.ref_kl_coef,
        temperature=sampling_temperature(rollout.temperature),
        reward_level=loss.reward_level,
        ref_kl=loss.ref_kl_estimator,
    )
    info = {
        name: float(masked_mean(stats[key].float(), batch.mask))
        for name, key in (("reward_mean", "reward"), ("clip_fraction", "clipped"), ("ppo_ratio_dev", "ratio_dev"))
    }
    if "ref_kl" in stats:
        info["ref_kl"] = float(masked_mean(stats["ref_kl"], batch.mask))
    return per_token, info


@dataclass(frozen=True)
class Objective:
    loss: Callable  # (loss section, rollout section, Scored, student, reference, pad_id) -> (per-token [B, T], metrics)
    help: str
    uses_divergence: bool  # reads loss.divergence (and so vocab_mask)


OBJECTIVES: dict[str, Objective] = {
    "divergence": Objective(divergence_objective, "the masked per-token divergence (docs/design.md)", True),
    "clipped_reward": Objective(
        clipped_reward_step, "COPSD's clipped reward, group-normalised (reward_level), PPO-clip", False
    ),
}
