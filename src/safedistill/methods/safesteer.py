"""SafeSteer: the base model with a refusal direction added at one layer scores the rollouts; the
loss sums over the safety tokens S (vocab_mask). Direction, layer, scale and S come from the
steering search (searches/steering.py), or from `steer_from`."""

from __future__ import annotations

from ..config import DataSettings, SteeringSettings, TeacherSettings
from ..searches.steering import prepare_steering
from .base import Prepared, Setup, method_items, steering_search


def prepare(s: Setup, data: DataSettings, teacher: TeacherSettings, steering: SteeringSettings) -> Prepared:
    items = method_items(data, s)
    found = prepare_steering(steering_search(s, steering, teacher), s.model, s.tok, s.judge, s.out, progress=s.progress)
    return Prepared(items=items, teacher=found["steering"], vocab_ids=found["vocab_ids"])
