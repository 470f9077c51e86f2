"""Off-policy self-distillation (ThinkSafe-style): SFT on the context teacher's own generations on
OPSA's prompts, with OPSA's context choice (teachers/context_search.py, teachers/external.py)."""

from __future__ import annotations

from ..config import RunConfig
from ..teachers.context_search import choose_contexts
from ..teachers.external import generated_targets
from .base import Prepared, Setup, training_items


def prepare(cfg: RunConfig, s: Setup) -> Prepared:
    items = training_items(cfg, s.manifest)
    contexts = choose_contexts(cfg, s.model, s.tok, s.judge, items, s.manifest, s.out, progress=s.progress)
    targets = generated_targets(cfg, s.model, s.tok, s.judge, items, contexts, s.out, progress=s.progress)
    return Prepared(targets=targets)
