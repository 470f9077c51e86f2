"""One small module per method: its extra step (context search, target generation, ...).

`prepare` runs before LoRA is added and returns what the chosen trainer needs: {"items",
"contexts", ...} for on-policy runs or {"targets"} for SFT runs. `build_teacher` turns that into
the teacher the on-policy step queries (cfg.teacher picks the kind).
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..data.packaged import Manifest


def prepare(cfg: RunConfig, model, tok, judge, manifest: Manifest, out: Path, *, progress: bool = True) -> dict:
    from ..trainer import training_items
    from . import baselines, copsd, dgr, opsa, safesteer

    if cfg.trainer == "sft" and cfg.targets == "demonstrations":
        return {"targets": baselines.demonstration_targets(cfg, manifest)}
    if cfg.trainer == "sft" and cfg.targets == "refined":
        return {"targets": dgr.refined_targets(cfg, model, tok, judge, manifest, out, progress=progress)}
    items = training_items(cfg, manifest)
    if cfg.teacher == "constitution":
        return copsd.prepare(cfg, model, tok, judge, items, out, progress=progress)
    contexts = {}
    if cfg.teacher == "context":
        contexts = opsa.choose_contexts(cfg, model, tok, judge, items, manifest, out, progress=progress)
    steering = {}
    if cfg.teacher == "steering" or cfg.vocab_mask == "safety_tokens":
        steering = safesteer.prepare_steering(cfg, model, tok, judge, manifest, out, progress=progress)
    if cfg.trainer == "onpolicy":
        return {"items": items, "contexts": contexts, **steering}
    return {"targets": baselines.generated_targets(cfg, model, tok, judge, items, contexts, out, progress=progress)}


def build_teacher(cfg: RunConfig, base, tok, prepared: dict):
    """The teacher for an on-policy run. `base` is a FrozenBase over the (LoRA-wrapped) student."""
    from ..teachers import ContextTeacher, SteeringTeacher

    if cfg.teacher == "context":
        return ContextTeacher(base, tok, prepared["contexts"])
    if cfg.teacher == "constitution":
        from . import copsd

        return copsd.build_teacher(base, tok, prepared)
    if cfg.teacher == "steering":
        return SteeringTeacher(base, tok, **prepared["steering"])
    raise ValueError(f"teacher '{cfg.teacher}' cannot score on-policy rollouts")
