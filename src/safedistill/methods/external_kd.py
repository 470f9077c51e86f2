"""External-teacher distillation (SafeChain-style): SFT on `external_model`'s generations on
OPSA's prompts (methods/targets.py)."""

from __future__ import annotations

from ..config import DataSettings, RolloutSettings
from ..methods.targets import generated_targets
from .base import Prepared, Setup, method_items


def prepare(s: Setup, data: DataSettings, rollout: RolloutSettings) -> Prepared:
    items = method_items(data, s)
    targets = generated_targets(data, rollout, s.seed, s.model, s.tok, s.judge, items, {}, s.out, progress=s.progress)
    return Prepared(targets=targets)
