"""METHODS: one module per method, each exporting `prepare(cfg, setup) -> Prepared` with only
what is its own (docs/design.md, "Adding a method"). A run's method follows from its config:
on-policy runs by `teacher`, SFT runs by `targets`; presets name the published settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import RunConfig, problems
from ..engine.backends import ROLLOUT_BACKENDS
from ..errors import UserError
from ..eval.evaluate import EvalSettings, capability_basket, generalization_styles
from ..losses.divergence import DIVERGENCES
from ..losses.masks import TOKEN_MASKS, VOCAB_MASKS
from ..losses.objectives import OBJECTIVES, REF_KL_ESTIMATORS, REWARD_LEVELS
from ..teachers import TEACHERS
from . import copsd, dgr, external_kd, offpolicy_sd, opsa, safesteer, sft
from .base import Prepared, Setup, add_vocab_mask

# The plug-point tables the config's PLUG_FIELDS name (each field's Literal holds the same keys).
PLUG_TABLES: dict[str, dict] = {
    "teacher": TEACHERS,
    "divergence": DIVERGENCES,
    "token_mask": TOKEN_MASKS,
    "vocab_mask": VOCAB_MASKS,
    "objective": OBJECTIVES,
    "reward_level": REWARD_LEVELS,
    "ref_kl_estimator": REF_KL_ESTIMATORS,
    "rollout_backend": ROLLOUT_BACKENDS,
}


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


def check_config(cfg: RunConfig) -> None:
    """What the plug-point tables rule out, and the eval's fields, checked once before anything
    is written or loaded (train.preflight; the CLI right after reading a config)."""
    problems(cfg, _combinations(cfg))
    for name, check in (
        ("capability", lambda: capability_basket(EvalSettings(capability=cfg.capability))),
        ("eval_generalization", lambda: generalization_styles(cfg.eval_generalization)),
    ):
        try:
            check()
        except UserError as e:
            raise UserError(f"config field '{name}': {e}") from None


def _combinations(c: RunConfig) -> list[tuple[bool, str, str]]:
    teacher = TEACHERS[c.teacher]
    serves = [k for k, v in TEACHERS.items() if v.scores_rollouts]
    writers = [k for k, v in TEACHERS.items() if v.targets]
    uses_divergence = OBJECTIVES[c.objective].uses_divergence
    subset_ok = [k for k, v in DIVERGENCES.items() if v.vocab_subset]
    return [
        (
            c.trainer != "onpolicy" or teacher.scores_rollouts,
            "teacher",
            f"cannot score on-policy rollouts (trainer=onpolicy needs one of {', '.join(serves)})",
        ),
        (
            c.trainer != "sft" or bool(teacher.targets),
            "teacher",
            f"only scores on-policy rollouts; trainer=sft needs one of {', '.join(writers)}",
        ),
        (
            c.trainer != "sft" or not teacher.targets or c.targets in teacher.targets,
            "targets",
            f"is not served by teacher={c.teacher} with trainer=sft (it serves: {', '.join(teacher.targets)})",
        ),
        (
            not (c.trainer == "onpolicy" and uses_divergence and VOCAB_MASKS[c.vocab_mask].needs_ids)
            or DIVERGENCES[c.divergence].vocab_subset,
            "vocab_mask",
            f"{c.vocab_mask} needs divergence {' or '.join(subset_ok)}",
        ),
    ]
