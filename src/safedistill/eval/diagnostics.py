"""Collapse diagnostics: is the teacher pulling the student toward short, repetitive, over-cautious
answers? Mean response length, distinct-1/2, mean token entropy and over-refusal on
benign-but-sensitive prompts, for the student and for the teacher's own samples.

Every on-policy step logs the free figures (entropies and distinct-n of the training rollouts);
every `diagnostics_every` steps a probe samples both models on a few held-out benign and
benign-sensitive prompts (CPU budget: `diagnostics_prompts` of each).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine.rollout import SamplingSettings, encode_prompts, generate
from ..engine.scoring import mean_entropy, response_logits
from ..models import chat_text
from ..teachers.base import Item, PromptedTeacher
from .evaluate import distinct_n, held_out

if TYPE_CHECKING:
    from ..config import RolloutSettings

PANELS = [
    ("length", "mean response length (tokens)"),
    ("distinct_2", "distinct-2"),
    ("overrefusal", "over-refusal (benign-sensitive)"),
    ("entropy", "mean token entropy (nats)"),
]


def text_stats(texts: list[str], lengths: list[int]) -> dict:
    words = [t.split() for t in texts]
    return {
        "length": sum(lengths) / len(lengths) if lengths else 0.0,
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
    }


class CollapseProbe:
    """Samples student and teacher on the same held-out prompts; the teacher through its own
    prompt (context or constitution) and weights. Deterministic: the same seed at every probe, so
    the frozen teacher's figures are computed once and repeated."""

    def __init__(
        self,
        tok,
        judge,
        rollout: RolloutSettings,
        *,
        every: int,
        prompts: int,
        steps: int,
        benign: str,
        split_seed: int,
        seed: int,
    ):
        """`every` steps (and at the last of `steps`) on `prompts` held-out prompts of `benign` and of
        the built-in over-refusal set, sampled as the rollouts are (`rollout`) with a seed of its own."""
        self.tok, self.judge, self.rollout = tok, judge, rollout
        self.every, self.steps, self.seed = every, steps, seed
        self.teacher_stats: dict | None = None
        taken = {"split_seed": split_seed, "limit": prompts, "seed": seed}
        self.benign = held_out(benign, None, **taken) if prompts else []
        self.sensitive = held_out("overrefusal", None, **taken) if prompts else []

    def due(self, step: int) -> bool:
        every = self.every
        return bool(every) and bool(self.benign or self.sensitive) and (step % every == 0 or step + 1 == self.steps)

    def _side(self, model, texts: list[str]) -> dict:
        sampling = SamplingSettings.of_run(self.rollout, batch_size=len(texts), seed=self.seed * 7 + 11)
        rollouts, _ = generate(model, self.tok, texts, sampling, progress=False)
        nb = len(self.benign)
        own = rollouts[:nb]
        stats = text_stats([r.text for r in own], [len(r.response_ids) for r in own])
        sens = rollouts[nb:]
        stats["overrefusal"] = sum(self.judge.is_refusal(r.text) for r in sens) / len(sens) if sens else 0.0
        responses = [r.response_ids or [self.tok.pad_token_id] for r in own]
        if own:
            with torch.no_grad():
                logits, mask = response_logits(
                    model, encode_prompts(self.tok, texts[:nb]), responses, pad_id=self.tok.pad_token_id
                )
            stats["entropy"] = mean_entropy(logits, mask)
        return stats

    def __call__(self, student, teacher) -> dict:
        """{"diag_student_*", "diag_teacher_*"}; teacher figures only for teachers that read their
        own prompt (PromptedTeacher: `prompt_text`, and `base`, the frozen weights they run)."""
        records = [*self.benign, *self.sensitive]
        was_training = student.training
        student.eval()
        out = {
            f"diag_student_{k}": v
            for k, v in self._side(student, [chat_text(self.tok, r.prompt) for r in records]).items()
        }
        if self.teacher_stats is None and isinstance(teacher, PromptedTeacher):
            texts = [teacher.prompt_text(Item(r.id, r.prompt, "benign")) for r in records]
            with teacher.base.weights(student) as model:
                self.teacher_stats = {f"diag_teacher_{k}": v for k, v in self._side(model, texts).items()}
        out.update(self.teacher_stats or {})
        student.train(was_training)
        return out


def plot_collapse(rows: list[dict], path: Path) -> bool:
    """Student vs teacher over training steps, one panel per figure; False if nothing to plot."""
    probed = [r for r in rows if "diag_student_length" in r]
    if not probed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for who, style in (("student", "o-"), ("teacher", "s--")):
            pts = [(r["step"], r[f"diag_{who}_{key}"]) for r in probed if f"diag_{who}_{key}" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=who)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    fig.suptitle("Collapse probe: student vs teacher by training step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def collapse_section(out: Path, rows: list[dict]) -> list[str]:
    """Report lines: the plot and first/last probe values."""
    if not plot_collapse(rows, Path(out) / "collapse.png"):
        return []
    probed = [r for r in rows if "diag_student_length" in r]
    first, last = probed[0], probed[-1]
    lines = [
        "## Collapse diagnostics",
        "",
        "![collapse diagnostics](collapse.png)",
        "",
        f"Probe: {len(probed)} times, on held-out benign (length, distinct-n, entropy) and benign-sensitive "
        "(over-refusal) prompts, sampled at the rollout temperature with a fixed seed, at the start of the "
        "step (step 1: before any update). The teacher is frozen; its line is the pull the student feels.",
        "",
        f"| figure | student step {first['step']} | student step {last['step']} "
        f"| teacher step {first['step']} | teacher step {last['step']} |",
        "|---|---|---|---|---|",
    ]
    for key, label in PANELS:
        cells = [r.get(f"diag_{who}_{key}") for who in ("student", "teacher") for r in (first, last)]
        lines.append(f"| {label} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    return [*lines, ""]
