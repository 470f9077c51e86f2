"""Teachers: one Teacher protocol (base.py) and one module per kind.

  context.py        base model + privileged system context, and its library of contexts
  steering.py       base model + a steering vector at one layer (searches/steering.py finds it)
  constitution.py   a frozen model (the base, or COPSD's Cross-SFT copy) reading a constitution

TEACHERS maps the config's `teacher` to what that kind can do and its factory, which the recipe
calls with the frozen base, the tokenizer and what the method prepared for it (e.g. the contexts);
methods.check_config derives the allowed (teacher, trainer, targets) combinations from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import FrozenBase, FrozenModel, Item, PromptedTeacher, Teacher
from .constitution import ConstitutionTeacher, constitution_teacher
from .context import ContextTeacher, check_contexts
from .steering import SteeringTeacher


@dataclass(frozen=True)
class TeacherKind:
    help: str
    scores_rollouts: bool  # usable with trainer=onpolicy
    targets: tuple[str, ...]  # sft `targets` it can serve
    factory: Callable[..., Teacher] | None = None  # (frozen base, tok, **inputs) -> Teacher
    inputs: tuple[str, ...] = ()  # what the factory takes that a method prepares (METHODS rows' `gives`)
    preflight: Callable[..., None] | None = None  # (teacher section) -> None; raises before anything is written


TEACHERS: dict[str, TeacherKind] = {
    "context": TeacherKind(
        "the base model with a privileged system context (OPSA)",
        True,
        ("teacher",),
        ContextTeacher,
        ("contexts",),
        check_contexts,
    ),
    "steering": TeacherKind(
        "the base model with a refusal direction added at one layer (SafeSteer)",
        True,
        (),
        SteeringTeacher,
        ("layer", "vector", "scale"),
    ),
    "constitution": TeacherKind(
        "a frozen model reading a constitution; cold_start=cross_sft calibrates it",
        True,
        (),
        constitution_teacher,
        ("constitution", "calibrated"),
    ),
    "none": TeacherKind("no teacher: SFT on fixed targets", False, ("demonstrations", "external", "refined")),
}

__all__ = [
    "TEACHERS",
    "ConstitutionTeacher",
    "ContextTeacher",
    "FrozenBase",
    "FrozenModel",
    "Item",
    "PromptedTeacher",
    "SteeringTeacher",
    "Teacher",
    "TeacherKind",
]
