"""Off-policy self-distillation (ThinkSafe-style): SFT on the context teacher's own generations on
OPSA's prompts, with OPSA's context choice (searches/context.py, methods/targets.py)."""

from __future__ import annotations

from ..config import DataSettings, RolloutSettings, TeacherSettings
from ..methods.targets import generated_targets
from ..searches.context import choose_contexts
from .base import Prepared, Setup, method_items


def prepare(s: Setup, data: DataSettings, teacher: TeacherSettings, rollout: RolloutSettings) -> Prepared:
    items = method_items(data, s)
    contexts = choose_contexts(
        teacher, s.splits, s.model, s.tok, s.judge, items, s.out, seed=s.seed, progress=s.progress
    )
    targets = generated_targets(
        data, rollout, s.seed, s.model, s.tok, s.judge, items, contexts, s.out, progress=s.progress
    )
    return Prepared(targets=targets)
