"""OPSA: the student's own rollouts, scored by the base model given a privileged context (the best
by teacher flip rate when context=auto; teachers/context_search.py). Nothing else is its own."""

from __future__ import annotations

from ..config import RunConfig
from ..teachers.context_search import choose_contexts
from .base import Prepared, Setup, training_items


def prepare(cfg: RunConfig, s: Setup) -> Prepared:
    items = training_items(cfg, s.manifest)
    contexts = choose_contexts(cfg, s.model, s.tok, s.judge, items, s.manifest, s.out, progress=s.progress)
    return Prepared(items=items, teacher={"contexts": contexts})
