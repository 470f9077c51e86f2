"""METHODS: one row per method, naming what the recipe needs of it: its trainer kind, `prepare`
(setup -> Prepared, only what is its own), what it prepares for a teacher (any TEACHERS row whose
factory takes no more fits: `teacher:` selects it), the files it writes in a run directory and its sections of report.md. A preset
names its `method:`; docs/design.md, "Adding a method"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, problems
from ..data.rephrase import check_rephraser
from ..engine.backends import ROLLOUT_BACKENDS
from ..errors import UserError
from ..eval.evaluate import capability_basket, generalization_styles, parse_axes
from ..losses.divergence import DIVERGENCES
from ..losses.masks import TOKEN_MASKS, VOCAB_MASKS
from ..losses.objectives import OBJECTIVES, REF_KL_ESTIMATORS, REWARD_LEVELS
from ..searches import context as context_search
from ..searches import steering as steering_search
from ..teachers import TEACHERS, Teacher, TeacherKind
from . import copsd, cross_sft, dgr, external_kd, offpolicy_sd, opsa, safesteer, sft, targets
from .base import Prepared, Setup, add_vocab_mask, augment_prepared


@dataclass(frozen=True)
class Method:
    help: str
    trainer: str  # onpolicy | sft
    prepare: Callable[..., Prepared]  # (setup, **{section: its settings for each of `sections`})
    sections: tuple[str, ...]  # the config sections its prepare takes, by name
    gives: tuple[str, ...]  # what it prepares for a teacher (a teacher fits when its row's `inputs` are among these)
    targets: tuple[str, ...] = ()  # sft: the `targets` it trains on
    files: tuple[str, ...] = ()  # what its preparation writes in the run directory
    report: tuple[Callable[[Path], list[str]], ...] = ()  # its sections of report.md (each [] without its file)
    preflight: Callable[..., None] | None = None  # (**sections) -> None; raises before anything is written


METHODS: dict[str, Method] = {
    "opsa": Method(
        "on-policy self-distillation from the base model given a privileged context",
        "onpolicy",
        opsa.prepare,
        ("data", "teacher"),
        ("contexts",),
        files=context_search.FILES,
        report=(context_search.flip_rate_section,),
    ),
    "safesteer": Method(
        "on-policy distillation from the steered base model, the loss on the safety tokens S",
        "onpolicy",
        safesteer.prepare,
        ("data", "teacher", "steering"),
        ("layer", "vector", "scale"),
        files=(*context_search.FILES, *steering_search.FILES),
        report=(context_search.flip_rate_section, steering_search.steering_section),
    ),
    "copsd": Method(
        "on-policy distillation from a constitution-reading teacher, optionally calibrated by Cross-SFT",
        "onpolicy",
        copsd.prepare,
        ("data", "teacher", "copsd", "rollout", "optim"),
        ("constitution", "calibrated"),
        files=(*context_search.FILES, *cross_sft.FILES),
        report=(cross_sft.crossed_section, context_search.flip_rate_section),
        preflight=copsd.preflight,
    ),
    "sft": Method("SFT on fixed demonstrations", "sft", sft.prepare, ("data",), (), ("demonstrations",)),
    "dgr": Method(
        "SFT on demonstrations the base model rewrote in its own words",
        "sft",
        dgr.prepare,
        ("data", "dgr", "rollout"),
        (),
        ("refined",),
        files=dgr.FILES,
        report=(dgr.shift_section,),
    ),
    "offpolicy-sd": Method(
        "SFT on the context teacher's own generations",
        "sft",
        offpolicy_sd.prepare,
        ("data", "teacher", "rollout"),
        ("contexts",),
        ("teacher",),
        files=(*context_search.FILES, *targets.FILES),
        report=(context_search.flip_rate_section,),
    ),
    "external-kd": Method(
        "SFT on another model's generations",
        "sft",
        external_kd.prepare,
        ("data", "rollout"),
        (),
        ("external",),
        targets.FILES,
    ),
}
# The plug-point tables the config's PLUG_FIELDS name (each field's Literal holds the same keys).
PLUG_TABLES: dict[str, dict] = {
    "method": METHODS,
    "teacher": TEACHERS,
    "divergence": DIVERGENCES,
    "token_mask": TOKEN_MASKS,
    "vocab_mask": VOCAB_MASKS,
    "objective": OBJECTIVES,
    "reward_level": REWARD_LEVELS,
    "ref_kl_estimator": REF_KL_ESTIMATORS,
    "rollout_backend": ROLLOUT_BACKENDS,
}


# A vocab_mask that needs ids (safety_tokens) gets S from the steering search whatever the method.
VOCAB_IDS_FILES = steering_search.FILES
VOCAB_IDS_REPORT = steering_search.steering_section


def make_teacher(teacher: str, base, tok, prepared: Prepared) -> Teacher:
    """The run's teacher: its TEACHERS row's factory over the frozen base and what the method prepared."""
    return TEACHERS[teacher].factory(base, tok, **prepared.teacher)


def prepared_files() -> tuple[str, ...]:
    """Every file a method's preparation may write in a run directory (a run that never took a
    step is replaced whatever method wrote it)."""
    names = [f for m in METHODS.values() for f in m.files] + list(VOCAB_IDS_FILES)
    return tuple(dict.fromkeys(names))


def report_sections(method: str, vocab_mask: str, out: Path) -> list[str]:
    """The method's own sections of report.md, then S's when the vocabulary mask found it."""
    sections = list(METHODS[method].report)
    if VOCAB_MASKS[vocab_mask].needs_ids and VOCAB_IDS_REPORT not in sections:
        sections.append(VOCAB_IDS_REPORT)
    return [line for section in sections for line in section(out)]


def check_config(cfg: RunConfig) -> None:
    """What the plug-point tables rule out, and the eval's fields, checked once before anything
    is written or loaded (train.preflight; the CLI right after reading a config)."""
    for name, table in PLUG_TABLES.items():  # a config built in code, not read from YAML, is checked too
        if getattr(cfg, name) not in table:
            raise UserError(f"config field '{name}' must be one of {sorted(table)}, got {getattr(cfg, name)!r}")
    problems(cfg, _combinations(cfg, METHODS[cfg.method], TEACHERS[cfg.teacher]))
    for name, check in (
        ("capability", lambda: capability_basket(cfg.section("eval"))),
        ("eval_generalization", lambda: generalization_styles(cfg.eval_generalization)),
        ("eval_axes", lambda: parse_axes(cfg.eval_axes)),
        ("eval_rephraser", lambda: check_rephraser(cfg.eval_rephraser)),
    ):
        try:
            check()
        except UserError as e:
            raise UserError(f"config field '{name}': {e}") from None


def _combinations(c: RunConfig, method: Method, teacher: TeacherKind) -> list[tuple[bool, str, str]]:
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
        (c.trainer == method.trainer, "trainer", f"must be {method.trainer} for method={c.method}"),
        (
            set(teacher.inputs) <= set(method.gives),
            "teacher",
            f"needs {', '.join(teacher.inputs)}, which method={c.method} does not prepare "
            f"(method: {' | '.join(n for n, m in METHODS.items() if set(teacher.inputs) <= set(m.gives))} does)",
        ),
        (
            c.trainer != "sft" or c.targets in method.targets,
            "targets",
            f"is not what method={c.method} trains on (it takes: {', '.join(method.targets)})",
        ),
    ]


__all__ = [
    "METHODS",
    "PLUG_TABLES",
    "Method",
    "Prepared",
    "Setup",
    "add_vocab_mask",
    "augment_prepared",
    "check_config",
    "make_teacher",
    "prepared_files",
    "report_sections",
]
