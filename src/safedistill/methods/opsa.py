"""OPSA: the student's own rollouts, scored by the base model given a privileged context (the best
by teacher flip rate when context=auto; searches/context.py). Nothing else is its own."""

from __future__ import annotations

from ..config import DataSettings, TeacherSettings
from ..searches.context import choose_contexts
from .base import Prepared, Setup, method_items


def prepare(s: Setup, data: DataSettings, teacher: TeacherSettings) -> Prepared:
    items = method_items(data, s)
    contexts = choose_contexts(
        teacher, s.splits, s.model, s.tok, s.judge, items, s.out, seed=s.seed, progress=s.progress
    )
    return Prepared(items=items, teacher={"contexts": contexts})
