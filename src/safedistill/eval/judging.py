"""Judges by name: the one registry that run, eval and judge-check load judges from. It sits above
judges.py and guards.py so neither imports the other.

A spec is a registry name (`heuristic`, `keyword`), `KIND:MODEL` for a generative guard
(`llamaguard:`, `harmbench:`, `strongreject:` with any instruct model), or an HF
sequence-classifier id/path (anything else)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..errors import UserError
from .guards import GUARDS, load_guard
from .judges import ClassifierJudge, HeuristicJudge, Judge, KeywordJudge

# name -> factory of an offline judge (nothing from the hub; judge-check never caches their figures).
# heuristic-hidden: the heuristic's refusal, attack success read from the bundled SmolLM2's hidden
# states by an MLP (attack_success.READERS["hidden"]) instead of from the response's words.
OFFLINE_JUDGES: dict[str, Callable[[], Judge]] = {
    "heuristic": HeuristicJudge,
    "heuristic-hidden": partial(HeuristicJudge, attack_success_reader="hidden", name="heuristic-hidden"),
    "keyword": KeywordJudge,
}
GUARD_KINDS = tuple(GUARDS)  # KIND:MODEL specs, loaded by guards.load_guard


def load_judge(spec: str) -> Judge:
    """The judge a spec names (module docstring); a bad spec fails with one line."""
    if spec in OFFLINE_JUDGES:
        return OFFLINE_JUDGES[spec]()
    kind, sep, target = spec.partition(":")
    if sep and kind in GUARD_KINDS:
        if not target:
            raise UserError(f"judge {spec}: give a model id or path after '{kind}:'")
        return load_guard(kind, target)
    from ..models import check_hub_name

    check_hub_name(spec, known=[*OFFLINE_JUDGES, *(f"{k}:MODEL" for k in GUARD_KINDS)], what="judge")
    return ClassifierJudge(spec)
