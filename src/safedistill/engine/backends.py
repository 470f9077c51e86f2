"""ROLLOUT_BACKENDS: how the on-policy step samples the student's answers.

Each entry builds, from the run config, a callable with `rollout.generate`'s signature. The `hf`
entry reads `rollout.generate` when the step is built, so patching it watches the student's rollouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import rollout

if TYPE_CHECKING:
    from ..config import RunConfig


def _merged(cfg: RunConfig) -> Callable:
    from .merged import MergedRollouts

    return MergedRollouts(cfg.precision)


def _vllm(cfg: RunConfig) -> Callable:
    from .vllm import vllm_generate_or_none

    return vllm_generate_or_none(cfg) or rollout.generate


@dataclass(frozen=True)
class RolloutBackend:
    build: Callable[[RunConfig], Callable]
    help: str


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {
    "hf": RolloutBackend(lambda cfg: rollout.generate, "decode with the transformers student"),
    "merged": RolloutBackend(_merged, "decode on a LoRA-merged copy, refreshed before each rollout"),
    "vllm": RolloutBackend(_vllm, "vLLM colocated on the GPU; falls back to hf with a note"),
}


def rollout_backend(cfg: RunConfig) -> Callable:
    return ROLLOUT_BACKENDS[cfg.rollout_backend].build(cfg)
