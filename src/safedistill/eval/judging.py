"""Judges by name: the offline judges, the generative guards and any HF classifier behind one
`load_judge(spec)`. It sits above judges.py and guards.py so neither imports the other."""

from __future__ import annotations

from ..errors import UserError
from .guards import GUARDS, load_guard
from .judges import ClassifierJudge, HeuristicJudge, KeywordJudge

OFFLINE_JUDGES = {"heuristic": HeuristicJudge, "keyword": KeywordJudge}
GUARD_KINDS = tuple(GUARDS)


def load_judge(spec: str):
    """`heuristic` (default), `keyword`, `llamaguard:ID_OR_PATH`, `harmbench:ID_OR_PATH`,
    `strongreject:ID_OR_PATH` (any instruct model), or an HF sequence-classifier id/path."""
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
