"""ROLLOUT_BACKENDS: how the on-policy step samples the student's answers.

Each entry builds, from the run's rollout section and a few named values, a callable with
`rollout.generate`'s signature. The `hf` entry reads `rollout.generate` when the step is built, so
patching it watches the student's rollouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import rollout

if TYPE_CHECKING:
    from ..config import RolloutSettings


def _hf(settings: RolloutSettings, *, model: str, precision: str, seed: int) -> Callable:
    return rollout.generate


def _merged(settings: RolloutSettings, *, model: str, precision: str, seed: int) -> Callable:
    from .merged import MergedRollouts

    return MergedRollouts(precision)


def _vllm(settings: RolloutSettings, *, model: str, precision: str, seed: int) -> Callable:
    from .vllm import vllm_generate_or_none

    return (
        vllm_generate_or_none(
            model, precision=precision, gpu_memory_utilization=settings.vllm_gpu_memory_utilization, seed=seed
        )
        or rollout.generate
    )


@dataclass(frozen=True)
class RolloutBackend:
    build: Callable[..., Callable]  # (rollout section, *, model, precision, seed) -> generate
    help: str


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {
    "hf": RolloutBackend(_hf, "decode with the transformers student"),
    "merged": RolloutBackend(_merged, "decode on a LoRA-merged copy, refreshed before each rollout"),
    "vllm": RolloutBackend(
        _vllm, "vLLM colocated on the GPU (TRL's pattern; never run here); falls back to hf with a note"
    ),
}


def rollout_backend(settings: RolloutSettings, *, model: str, precision: str, seed: int) -> Callable:
    return ROLLOUT_BACKENDS[settings.rollout_backend].build(settings, model=model, precision=precision, seed=seed)
