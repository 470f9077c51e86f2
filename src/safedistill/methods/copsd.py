"""COPSD: a frozen teacher reads a constitution around the user turn (teachers/constitution.py);
with cold_start=cross_sft it is first calibrated by Cross-SFT (teachers/calibrated.py). The loss
is usually objective=clipped_reward (losses/objectives.py)."""

from __future__ import annotations

from ..config import RunConfig
from ..teachers.calibrated import calibrated_model
from ..teachers.constitution import load_constitution
from .base import Prepared, Setup, training_items


def prepare(cfg: RunConfig, s: Setup) -> Prepared:
    items = training_items(cfg, s.manifest)
    constitution = load_constitution(cfg.constitution)
    calibrated = None
    if cfg.cold_start == "cross_sft":
        calibrated = calibrated_model(
            cfg, s.model, s.tok, s.judge, items, constitution, s.out, manifest=s.manifest, progress=s.progress
        )
    return Prepared(items=items, teacher={"constitution": constitution, "calibrated": calibrated})
