"""COPSD: a frozen teacher reads a constitution around the user turn (teachers/constitution.py);
with cold_start=cross_sft it is first calibrated by Cross-SFT (methods/cross_sft.py). The loss
is usually objective=clipped_reward (losses/objectives.py)."""

from __future__ import annotations

from ..config import CopsdSettings, DataSettings, OptimSettings, RolloutSettings, TeacherSettings
from ..methods.cross_sft import CrossSFT, calibrated_model
from ..teachers.constitution import load_constitution
from ..teachers.context import check_context, load_contexts
from .base import Prepared, Setup, method_items


def preflight(teacher: TeacherSettings, copsd: CopsdSettings, **_sections) -> None:
    """The Cross-SFT seed context is an id of the library, auto or literal text."""
    if copsd.cold_start == "cross_sft":
        check_context("cross_sft_seed_context", copsd.cross_sft_seed_context, load_contexts(teacher.contexts))


def prepare(
    s: Setup,
    data: DataSettings,
    teacher: TeacherSettings,
    copsd: CopsdSettings,
    rollout: RolloutSettings,
    optim: OptimSettings,
) -> Prepared:
    items = method_items(data, s)
    constitution = load_constitution(copsd.constitution)
    calibrated = None
    if copsd.cold_start == "cross_sft":
        cross = CrossSFT(copsd, rollout, optim, teacher, s.splits, s.seed)
        calibrated = calibrated_model(cross, s.model, s.tok, s.judge, items, constitution, s.out, progress=s.progress)
    return Prepared(items=items, teacher={"constitution": constitution, "calibrated": calibrated})
