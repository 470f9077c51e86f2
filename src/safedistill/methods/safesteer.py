"""SafeSteer: the base model with a refusal direction added at one layer scores the rollouts; the
loss sums over the safety tokens S (vocab_mask). Direction, layer, scale and S come from the
steering search (teachers/steering_search.py), or from `steer_from`."""

from __future__ import annotations

from ..config import RunConfig
from ..teachers.steering_search import prepare_steering
from .base import Prepared, Setup, training_items


def prepare(cfg: RunConfig, s: Setup) -> Prepared:
    items = training_items(cfg, s.manifest)
    found = prepare_steering(cfg, s.model, s.tok, s.judge, s.manifest, s.out, progress=s.progress)
    return Prepared(items=items, teacher=found["steering"], vocab_ids=found["vocab_ids"])
