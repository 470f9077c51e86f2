"""OPSA's context search (context=auto): rank the library by teacher flip rate, then confirm the
best three on held-out TRAIN prompts and take the best by confirmation.

flip(c) = #{x in H: judge(y_0(x)) unsafe and judge(y_c(x)) safe} / |H|, greedy decoding, y_0
without the context and y_c with it. The OPSA paper found this ranks contexts as post-training
harmfulness does. We also report the rate conditional on an unsafe base answer, and the refusal
rate the context causes on benign prompts (over-refusal it would teach).

Why two stages: the top of a ranking of ~40 candidates on a few prompts is partly luck (winner's
curse), so its flip rate overstates the context's. The confirmation prompts are disjoint from the
ranking prompts and come from the train split, so the evaluation's held-out prompts stay unseen.
Both stages go to flip_rates.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import console, faults
from ..data.schema import PromptRecord
from ..data.splits import take
from ..data.train import TrainSplits
from ..engine.rollout import SamplingSettings, generate
from ..errors import UserError
from ..eval import base_cache
from ..files import write_json
from ..models import chat_text
from ..teachers.base import Item
from ..teachers.context import context_text, load_contexts

if TYPE_CHECKING:
    from ..config import TeacherSettings

CONFIRM_TOP = 3  # candidates carried from the ranking into the confirmation stage
FILES = (
    "flip_rates.json",
    "flip_rates_reused.json",
)  # what the search writes in a run directory (the second: base_cache.SEARCH_REUSED)
TRAITS = ("strength", "length", "framing", "specificity", "style")


def flip_rates(
    model,
    tokenizer,
    judge,
    harmful: Sequence[PromptRecord],
    benign: Sequence[PromptRecord],
    contexts: Sequence[dict],
    *,
    max_new_tokens: int = 40,
    batch_size: int = 128,
    progress: bool = True,
    desc: str = "flip rate",
) -> list[dict]:
    """Per harmful-side context: flip rate and the rest, best first (flip rate, then less benign
    refusal, then id). Every context's harmful and benign prompts are one batched generation call:
    each context's prefix is computed once and rows of several contexts share a batch (one call
    of 24 rows per context decoded a third of the rows per weight read that a batch of 64 does;
    on the 2-core CPU a decode step of 128 rows costs 1.75x one of 64, docs/performance.md round 6);
    with no benign prompts, benign_refusal_rate is None."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)

    def judged_safe(responses: Sequence[str]) -> list[bool]:
        return [v.label == "safe" for v in judge([r.prompt for r in harmful], list(responses))]

    base, _ = generate(model, tokenizer, [chat_text(tokenizer, r.prompt) for r in harmful], settings, progress=False)
    base_safe = judged_safe([o.text for o in base])
    ranked = [c for c in contexts if c.get("side", "harmful") == "harmful"]
    records = [*harmful, *benign]
    texts = [chat_text(tokenizer, r.prompt, system=c["text"]) for c in ranked for r in records]
    groups = [c["id"] for c in ranked for _ in records]
    out, _ = generate(model, tokenizer, texts, settings, groups=groups, desc=desc, progress=progress)
    rows = []
    for k, ctx in enumerate(ranked):
        answers = [o.text for o in out[k * len(records) : (k + 1) * len(records)]]
        safe = judged_safe(answers[: len(harmful)])
        benign_refused = sum(judge.is_refusal(t) for t in answers[len(harmful) :])
        rows.append(_row(ctx, base_safe, safe, benign_refused, len(benign)))
    rows.sort(key=lambda r: (-r["flip_rate"], r["benign_refusal_rate"] or 0.0, r["id"]))
    return rows


def _row(ctx: dict, base_safe: list[bool], safe: list[bool], benign_refused: int, n_benign: int) -> dict:
    n, n_unsafe = len(safe), sum(not s for s in base_safe)
    flipped = sum(s and not b for s, b in zip(safe, base_safe, strict=True))
    return {
        "id": ctx["id"],
        "text": ctx["text"],
        "flip_rate": flipped / n,
        "conditional_flip_rate": flipped / n_unsafe if n_unsafe else 0.0,
        "n_harmful": n,
        "n_unsafe_base": n_unsafe,
        "n_flipped": flipped,
        "refusal_rate_with_context": sum(safe) / n,
        "benign_refusal_rate": benign_refused / n_benign if n_benign else None,
        "n_benign": n_benign,
        **{k: ctx[k] for k in TRAITS if k in ctx},
    }


@dataclass(frozen=True)
class SearchPrompts:
    """The ranking's harmful prompts, the confirmation's (disjoint, also train split) and the
    benign train prompts the confirmation measures over-refusal on."""

    ranking: list[PromptRecord]
    confirmation: list[PromptRecord]
    benign: list[PromptRecord]


def search_prompts(teacher: TeacherSettings, splits: TrainSplits, items: Sequence[Item], seed: int) -> SearchPrompts:
    """The run's harmful training prompts first, then the rest of the harmful source's train split
    (seeded): the first `context_search_prompts` rank, the next `context_confirm_prompts` confirm."""
    train = splits.harmful
    pool = [PromptRecord(it.id, it.prompt) for it in items if it.group == "harmful"]
    taken = {r.id for r in pool} | {r.prompt for r in pool}
    pool += take([r for r in train if r.id not in taken and r.prompt not in taken], None, seed=seed + 2)
    n_rank, n_confirm = teacher.context_search_prompts, teacher.context_confirm_prompts
    if len(pool) < n_rank:
        raise UserError(
            f"config field 'context_search_prompts': {n_rank} harmful train prompts asked, "
            f"{splits.harmful_source} has {len(pool)} in its train split"
        )
    if len(pool) < n_rank + n_confirm:
        raise UserError(
            f"config field 'context_confirm_prompts': {n_confirm} held-out train prompts asked, "
            f"{len(pool) - n_rank} of {splits.harmful_source}'s are left after the {n_rank} ranking prompts"
        )
    benign = take(splits.benign, max(4, n_confirm // 2), seed=seed + 1)
    return SearchPrompts(pool[:n_rank], pool[n_rank : n_rank + n_confirm], benign)


def search_contexts(model, tok, judge, prompts: SearchPrompts, library, *, tokens: int, progress: bool = True) -> dict:
    """Both stages (greedy answers of up to `tokens` tokens); the chosen context is the best of the
    top three by confirmation flip rate (ties: less benign refusal, then the better ranking place)."""
    kw = {"max_new_tokens": tokens, "progress": progress}
    harmful_side = [c for c in library if c.get("side", "harmful") == "harmful"]
    ranking = flip_rates(model, tok, judge, prompts.ranking, [], harmful_side, desc="ranking contexts", **kw)
    place = {r["id"]: i for i, r in enumerate(ranking)}
    top = [c for c in harmful_side if place[c["id"]] < CONFIRM_TOP]
    confirmation = flip_rates(
        model, tok, judge, prompts.confirmation, prompts.benign, top, desc=f"confirming the top {len(top)}", **kw
    )
    confirmation.sort(key=lambda r: (-r["n_flipped"], r["benign_refusal_rate"] or 0.0, place[r["id"]]))
    for r in confirmation:
        r["ranking_place"] = place[r["id"]] + 1
    return {
        "chosen": confirmation[0]["id"],
        "reason": choice_reason(confirmation, ranking),
        "ranking": {"prompts": [r.id for r in prompts.ranking], "rows": ranking},
        "confirmation": {
            "prompts": [r.id for r in prompts.confirmation],
            "benign_prompts": [r.id for r in prompts.benign],
            "rows": confirmation,
        },
    }


def choice_reason(confirmation: list[dict], ranking: list[dict]) -> str:
    best = confirmation[0]
    rank = next(r for r in ranking if r["id"] == best["id"])
    text = (
        f"most flips on the {best['n_harmful']} held-out confirmation prompts: {best['n_flipped']}/"
        f"{best['n_harmful']} (ranking place {best['ranking_place']}, {rank['n_flipped']}/{rank['n_harmful']})"
    )
    tied = [r["id"] for r in confirmation[1:] if r["n_flipped"] == best["n_flipped"]]
    if tied:
        benign_tie = all(r["benign_refusal_rate"] == best["benign_refusal_rate"] for r in confirmation[: len(tied) + 1])
        text += f"; tied with {', '.join(tied)}, taken for " + (
            "its better ranking place" if benign_tie else "less benign refusal"
        )
    return text


def chosen_id(search) -> str:
    """The chosen context of a flip_rates.json; files written before the confirmation stage
    existed are a bare ranking, best first."""
    return search["chosen"] if isinstance(search, dict) else search[0]["id"]


def choose_contexts(
    teacher: TeacherSettings, splits: TrainSplits, model, tok, judge, items, out: Path, *, seed: int, progress=True
) -> dict:
    """{"harmful": c_h, "benign": c_b}. With context=auto, c_h comes from the two-stage search on
    harmful TRAIN prompts, written to flip_rates.json (and read back on resume)."""
    library = load_contexts(teacher.contexts)
    harmful_ctx = teacher.context
    if harmful_ctx == "auto":
        path = out / "flip_rates.json"
        if path.exists():
            search = json.loads(path.read_text())
        else:
            if not any(it.group == "harmful" for it in items):
                raise UserError("context=auto needs harmful training prompts (n_harmful > 0)")
            ranked = sum(c.get("side", "harmful") == "harmful" for c in library)
            if not ranked:
                raise UserError(f"config field 'contexts': {teacher.contexts} has no harmful-side context to rank")
            prompts = search_prompts(teacher, splits, items, seed)
            n_top = min(CONFIRM_TOP, ranked)
            answers = ranked * len(prompts.ranking) + n_top * (len(prompts.confirmation) + len(prompts.benign))
            console.say(
                f"ranking {ranked} contexts (context=auto) on {len(prompts.ranking)} harmful train prompts, then "
                f"confirming the top {n_top} on {len(prompts.confirmation)} other train prompts (+ "
                f"{len(prompts.benign)} benign): {answers} answers of up to {teacher.context_search_tokens} tokens "
                "before step 1 (the bars show the ETA; --set context=ID skips it)"
            )
            payload = {
                "prompts": asdict(prompts),
                "library": library,
                "tokens": teacher.context_search_tokens,
                "confirm_top": CONFIRM_TOP,
            }
            search = base_cache.search_once(
                lambda: search_contexts(
                    model, tok, judge, prompts, library, tokens=teacher.context_search_tokens, progress=progress
                ),
                base_cache.search_inputs(model, judge, payload),
                out,
            )
            faults.point("context-search")
            write_json(path, search)
        harmful_ctx = chosen_id(search)
        if isinstance(search, dict):
            console.say(f"context: {harmful_ctx} ({search['reason']})")
    return {
        "harmful": context_text(harmful_ctx, library),
        "benign": context_text(teacher.benign_context, library),
    }


def flip_rate_section(out: Path) -> list[str]:
    """The context search's confirmation stage and its ranking's five best, when the run ranked contexts."""
    flip = Path(out) / "flip_rates.json"
    if not flip.exists():
        return []
    lines = flip_rate_lines(json.loads(flip.read_text()))
    note = Path(out) / base_cache.SEARCH_REUSED
    if note.is_file():
        meta = json.loads(note.read_text())
        lines[2:2] = [
            f"The search was reused from the cache (`{meta['cache']}`), first computed by `{meta.get('origin')}`: "
            "the same model values, judge, prompts, contexts, answer length and code.",
            "",
        ]
    return lines


def flip_rate_lines(search) -> list[str]:
    """report.md's section on the context search (either flip_rates.json format)."""
    lines = ["## Context chosen by teacher flip rate", ""]
    ranking = search if isinstance(search, list) else search["ranking"]["rows"]
    if isinstance(search, dict):
        lines += [
            f"Chosen: {search['chosen']}, {search['reason']}.",
            "",
            "| confirmation (held-out train prompts) | flips | conditional | benign refusal | ranking flips |",
            "|---|---|---|---|---|",
        ]
        by_id = {r["id"]: r for r in ranking}
        lines += [
            f"| {r['id']} | {r['n_flipped']}/{r['n_harmful']} | {r['conditional_flip_rate']:.2f} | "
            f"{_rate(r['benign_refusal_rate'])} | {by_id[r['id']]['n_flipped']}/{by_id[r['id']]['n_harmful']} |"
            for r in search["confirmation"]["rows"]
        ]
        lines.append("")
    lines += ["| ranking (top 5) | flips | conditional | refusal with the context |", "|---|---|---|---|"]
    lines += [
        f"| {r['id']} | {r['n_flipped']}/{r['n_harmful']} | {r['conditional_flip_rate']:.2f} | "
        f"{r['refusal_rate_with_context']:.2f} |"
        for r in ranking[:5]
    ]
    return [*lines, ""]


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"
