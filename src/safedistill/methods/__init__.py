"""METHODS: one module per method, each exporting `prepare(cfg, setup) -> Prepared` with only
what is its own (docs/design.md, "Adding a method"). A run's method follows from its config:
on-policy runs by `teacher`, SFT runs by `targets`; presets name the published settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import RunConfig
from . import copsd, dgr, external_kd, offpolicy_sd, opsa, safesteer, sft
from .base import Prepared, Setup, add_vocab_mask


@dataclass(frozen=True)
class Method:
    prepare: Callable[[RunConfig, Setup], Prepared]
    trainer: str  # onpolicy | sft
    key: str  # the `teacher` (onpolicy) or the `targets` (sft) that selects it


METHODS: dict[str, Method] = {
    "opsa": Method(opsa.prepare, "onpolicy", "context"),
    "safesteer": Method(safesteer.prepare, "onpolicy", "steering"),
    "copsd": Method(copsd.prepare, "onpolicy", "constitution"),
    "sft": Method(sft.prepare, "sft", "demonstrations"),
    "dgr": Method(dgr.prepare, "sft", "refined"),
    "offpolicy-sd": Method(offpolicy_sd.prepare, "sft", "teacher"),
    "external-kd": Method(external_kd.prepare, "sft", "external"),
}


def method_name(cfg: RunConfig) -> str:
    key = cfg.teacher if cfg.trainer == "onpolicy" else cfg.targets
    return next(n for n, m in METHODS.items() if (m.trainer, m.key) == (cfg.trainer, key))


def prepare(cfg: RunConfig, setup: Setup) -> Prepared:
    """The method's own preparation (before LoRA is added), then the vocabulary mask's ids."""
    prepared = METHODS[method_name(cfg)].prepare(cfg, setup)
    return add_vocab_mask(cfg, setup, prepared) if cfg.trainer == "onpolicy" else prepared
