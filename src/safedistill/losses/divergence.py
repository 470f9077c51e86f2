"""Per-token divergences between a student and a teacher over the response tokens.

Everything is computed in float32 (bf16 log-softmax over a 150k vocabulary loses the small
differences a distillation loss lives on). Shapes: logits [B, T, V], per-token outputs [B, T];
reduce them with `masked_mean` over the response mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Divergence:
    """One entry of DIVERGENCES: what it computes and which options it honours."""

    help: str
    top_k: bool  # restricted to the teacher's top-k plus a tail bucket when top_k is set
    vocab_subset: bool  # can be summed over a vocabulary subset (vocab_mask: safety_tokens)
    over_vocab: Callable | None  # (log p_S, log p_T, alpha, beta) -> [B, T]; None: sampled tokens


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p||q) = sum_v p (log p - log q) over the last dim.

    Log-probs are clamped to the float32 minimum so that 0 * log 0 gives 0 (not NaN) in both
    the value and the gradient, e.g. for an empty tail bucket or -inf teacher logits.
    """
    tiny = torch.finfo(logp.dtype).min
    logp, logq = logp.clamp(min=tiny), logq.clamp(min=tiny)
    return (logp.exp() * (logp - logq)).sum(-1)


CHUNK_FLOATS = 2**21  # per chunk of rows: 8 MB of float32 temporaries, reused from chunk to chunk


def _row_chunks(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_FLOATS // max(vocab, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


class _FullReverseKL(torch.autograd.Function):
    """Full-vocabulary KL(p_S || p_T) per row, with its gradient with respect to the student
    logits, p_S (log p_S - log p_T - KL), formed in the same pass.

    The same numbers as `_kl` on two log-softmaxes, but computed a few rows at a time with
    in-place ops: on a [B, T, V] batch autograd's version keeps a handful of [B, T, V] float32
    temporaries alive and touches each of them again in the backward pass, which on a CPU costs
    more than the student's transformer layers for a 50k vocabulary."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        rows, vocab = student.shape
        tiny = torch.finfo(torch.float32).min
        kl = torch.empty(rows, dtype=torch.float32, device=student.device)
        grad = torch.empty(rows, vocab, dtype=student.dtype, device=student.device)
        for c in _row_chunks(rows, vocab):
            ls = F.log_softmax(student[c].float(), dim=-1).clamp_(min=tiny)
            d = F.log_softmax(teacher[c].float(), dim=-1).clamp_(min=tiny).neg_().add_(ls)
            p = ls.exp_()
            kl[c] = (p * d).sum(-1)
            grad[c] = p.mul_(d.sub_(kl[c, None]))
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out[:, None].to(grad.dtype)), None


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_S || p_T) over the whole vocabulary, [B, T] float32, from logits [B, T, V]."""
    shape = student_logits.shape
    kl = _FullReverseKL.apply(student_logits.reshape(-1, shape[-1]), teacher_logits.detach().reshape(-1, shape[-1]))
    return kl.view(shape[:-1])


@torch.no_grad()
def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    vocab_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What a step logs per response position ([B, T] float32 each), a few rows at a time:
    reverse_kl, student_entropy, teacher_entropy, token_kl (log p_S - log p_T of the sampled
    token) and, with vocab_ids, the student's and the teacher's total probability on them
    (mass_on_ids, teacher_mass_on_ids)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ"
        )
    shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    s2, t2 = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    tok = tokens.reshape(-1, 1).to(s2.device)
    names = ["reverse_kl", "student_entropy", "teacher_entropy", "token_kl"] + (
        ["mass_on_ids", "teacher_mass_on_ids"] if vocab_ids is not None else []
    )
    out = {n: torch.empty(s2.size(0), dtype=torch.float32, device=s2.device) for n in names}
    tiny = torch.finfo(torch.float32).min
    for c in _row_chunks(s2.size(0), vocab):
        ls = F.log_softmax(s2[c].float(), dim=-1).clamp_(min=tiny)
        lt = F.log_softmax(t2[c].float(), dim=-1).clamp_(min=tiny)
        out["token_kl"][c] = (ls.gather(-1, tok[c]) - lt.gather(-1, tok[c])).squeeze(-1)
        p = ls.exp()
        out["student_entropy"][c] = -(p * ls).sum(-1)
        if vocab_ids is not None:
            out["mass_on_ids"][c] = p.index_select(-1, vocab_ids.to(p.device)).sum(-1)
            out["teacher_mass_on_ids"][c] = lt.exp().index_select(-1, vocab_ids.to(lt.device)).sum(-1)
        out["reverse_kl"][c] = (p * ls.sub_(lt)).sum(-1)
        out["teacher_entropy"][c] = -(lt.exp().mul_(lt)).sum(-1)
    return {n: v.view(shape) for n, v in out.items()}


def peak_mass(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mass on S where it matters: per response ([B, T] masses, mask of real positions), the
    position where the TEACHER puts the most mass on S, and there the student's mass; averaged over
    the responses that have a position. A mean over all positions dilutes the few where a steered
    teacher starts to refuse ("I'm sorry" at the first tokens), so the issue asks for these."""
    real = mask.bool()
    rows = real.any(-1)
    if not bool(rows.any()):
        return {}
    neg = torch.tensor(float("-inf"), device=teacher.device)
    t_max, where = torch.where(real, teacher.float(), neg).max(-1)
    s_at = student.float().gather(-1, where[:, None]).squeeze(-1)
    s_max = torch.where(real, student.float(), neg).max(-1).values
    return {
        "teacher_mass_on_s_max": float(t_max[rows].mean()),
        "student_mass_on_s_at_teacher_max": float(s_at[rows].mean()),
        "student_mass_on_s_max": float(s_max[rows].mean()),
    }


def _jsd(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD in TRL's GKD convention (beta=0: forward KL, beta=1: reverse KL).

    In between: m = beta*p_T + (1-beta)*p_S and JSD = beta*KL(p_T||m) + (1-beta)*KL(p_S||m).
    The endpoints are special-cased as in TRL: the mixture formula itself tends to 0 there.
    """
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    logm = torch.logsumexp(torch.stack([ls + math.log(1.0 - beta), lt + math.log(beta)]), dim=0)
    return beta * _kl(lt, logm) + (1.0 - beta) * _kl(ls, logm)


DIVERGENCES: dict[str, Divergence] = {
    "reverse_kl": Divergence("sum_v p_S (log p_S - log p_T): mode-seeking", True, True, lambda s, t, a, b: _kl(s, t)),
    "forward_kl": Divergence("sum_v p_T (log p_T - log p_S): mass-covering", True, True, lambda s, t, a, b: _kl(t, s)),
    "jsd": Divergence(
        "generalized JSD(beta), TRL's convention: 0 forward KL, 1 reverse KL",
        True,
        False,
        lambda s, t, a, b: _jsd(s, t, b),
    ),
    "mixture": Divergence(
        "alpha * forward KL + (1 - alpha) * reverse KL (OPSA)",
        True,
        False,
        lambda s, t, a, b: a * _kl(t, s) + (1.0 - a) * _kl(s, t),
    ),
    "sampled": Divergence(
        "reverse-KL score-function surrogate on the sampled tokens (with vocab_ids: only where the token is in it)",
        False,
        True,
        None,
    ),
}


def _top_k_with_tail(ls: torch.Tensor, lt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both log-distributions to the teacher's top-k entries plus one tail bucket.

    The tail holds the rest of each distribution's mass, so the result is again a proper
    distribution over k+1 outcomes (the divergence is a lower bound of the full one).
    """
    idx = lt.topk(k, dim=-1).indices
    # log of the remaining mass, as a logsumexp over the complement: exact even when tiny
    tail_s = ls.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    tail_t = lt.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    ls_k = torch.cat([ls.gather(-1, idx), tail_s], dim=-1)
    lt_k = torch.cat([lt.gather(-1, idx), tail_t], dim=-1)
    return ls_k, lt_k


def _check_bt(name: str, x: torch.Tensor | None, shape: torch.Size) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _gather_tokens(
    ls: torch.Tensor, lt: torch.Tensor, tokens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the sampled tokens under student and teacher, each [B, T]."""
    if tokens is None:
        raise ValueError("kind='sampled' needs tokens (the sampled token ids, [B, T])")
    _check_bt("tokens", tokens, ls.shape[:2])
    if tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a LongTensor, got {tokens.dtype}")
    idx = tokens.to(ls.device).unsqueeze(-1)
    return ls.gather(-1, idx).squeeze(-1), lt.gather(-1, idx).squeeze(-1)


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    tokens: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.5,
    top_k: int | None = None,
    vocab_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token loss [B, T] (float32) between student and teacher logits [B, T, V].

    kind:
      reverse_kl  sum_v p_S (log p_S - log p_T)  (mode-seeking; the on-policy distillation loss)
      forward_kl  sum_v p_T (log p_T - log p_S)  (mass-covering)
      jsd         generalized JSD, TRL GKD convention: beta=0 forward KL, beta=1 reverse KL
      mixture     alpha * forward KL + (1 - alpha) * reverse KL
      sampled     score-function surrogate on the sampled tokens y_t: r_t * log p_S(y_t) with
                  r_t = stopgrad(log p_S(y_t) - log p_T(y_t)); its gradient equals that of reverse
                  KL in expectation over y_t ~ p_S, but its value is not a KL (token_stats'
                  token_kl is the matching estimate).
    top_k: teacher's top-k entries plus one tail bucket per distribution (not for "sampled").
    vocab_ids: reverse_kl: sum over v in vocab_ids of p_S(v)(log p_S(v) - log p_T(v)) with
      full-softmax probabilities, deliberately NOT renormalised over the subset (can be < 0); its
      minimum in each p_S(v) is at p_T(v)/e. forward_kl: the same with student and teacher swapped
      (SafeSteer's ablation). sampled: the surrogate only at positions whose sampled token is in
      vocab_ids (0 elsewhere); its expected gradient is that of sum_{v in S} p_S(v)(log p_S(v) -
      log p_T(v)) - p_S(v), which settles at p_S(v) = p_T(v).
    """
    _check_args(student_logits, teacher_logits, kind, alpha=alpha, beta=beta, top_k=top_k, vocab_ids=vocab_ids)
    if kind == "reverse_kl" and vocab_ids is None and (top_k is None or top_k >= student_logits.shape[-1]):
        return full_reverse_kl(student_logits, teacher_logits)

    if vocab_ids is not None:
        if vocab_ids.dim() != 1 or vocab_ids.dtype != torch.long:
            raise ValueError("vocab_ids must be a 1-D LongTensor of token ids")
        V = student_logits.shape[-1]
        if vocab_ids.numel() and (vocab_ids.min() < 0 or vocab_ids.max() >= V):
            raise ValueError(f"vocab_ids must lie in [0, {V})")
        vocab_ids = vocab_ids.to(student_logits.device)

    ls = F.log_softmax(student_logits.float(), dim=-1)
    lt = F.log_softmax(teacher_logits.detach().float(), dim=-1)

    if kind == "sampled":
        if top_k is not None:
            raise ValueError("top_k is not supported with kind='sampled'")
        logp_s, logp_t = _gather_tokens(ls, lt, tokens)
        reward = (logp_s - logp_t).detach()
        if vocab_ids is not None:
            reward = reward * torch.isin(tokens.to(ls.device), vocab_ids)
        return reward * logp_s

    if vocab_ids is not None:
        ls, lt = ls.index_select(-1, vocab_ids), lt.index_select(-1, vocab_ids)
    elif top_k is not None and top_k < ls.shape[-1]:
        ls, lt = _top_k_with_tail(ls, lt, top_k)
    return DIVERGENCES[kind].over_vocab(ls, lt, alpha, beta)


def _check_args(student_logits, teacher_logits, kind: str, *, alpha, beta, top_k, vocab_ids) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {tuple(DIVERGENCES)}")
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be [B, T, V] with the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if vocab_ids is not None and not DIVERGENCES[kind].vocab_subset:
        subset = [f"'{k}'" for k, v in DIVERGENCES.items() if v.vocab_subset]
        raise ValueError(
            f"vocab_ids is only supported with kind={', '.join(subset[:-1])} or {subset[-1]}, not {kind!r}"
        )
    if vocab_ids is not None and top_k is not None:
        raise ValueError("vocab_ids and top_k cannot be combined")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(m*v)/sum(m); returns 0 (keeping the graph) when the mask is empty.

    Masked-out values are zeroed with `where` first, so NaN/inf at padding cannot leak in.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.float()
    v = torch.where(m != 0, values.float(), 0.0)
    return (v * m).sum() / m.sum().clamp(min=torch.finfo(torch.float32).tiny)
