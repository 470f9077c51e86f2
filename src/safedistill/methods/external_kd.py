"""External-teacher distillation (SafeChain-style): SFT on `external_model`'s generations on
OPSA's prompts (teachers/external.py)."""

from __future__ import annotations

from ..config import RunConfig
from ..teachers.external import generated_targets
from .base import Prepared, Setup, training_items


def prepare(cfg: RunConfig, s: Setup) -> Prepared:
    items = training_items(cfg, s.manifest)
    targets = generated_targets(cfg, s.model, s.tok, s.judge, items, {}, s.out, progress=s.progress)
    return Prepared(targets=targets)
