"""The context teacher: the frozen base model with a privileged context added to its own system
prompt (c_h on harmful prompts, c_b on benign ones; models.chat_text); the student never sees the
context, so the teacher's prompt is the student's with the context inserted and nothing else. Its library of
candidate contexts, and the search that ranks them by teacher flip rate:

flip(c) = #{x in H: judge(y_0(x)) unsafe and judge(y_c(x)) safe} / |H|, greedy decoding, y_0
without the context and y_c with it. The OPSA paper found this ranks contexts as post-training
harmfulness does. We also report the rate conditional on an unsafe base answer, and the refusal
rate the context causes on benign prompts (over-refusal it would teach).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .. import console, faults
from ..data.schema import PromptRecord
from ..data.sources import builtin_bytes, load_prompts, read_jsonl
from ..data.splits import split_records, take
from ..engine.rollout import SamplingSettings, generate
from ..errors import UserError
from ..files import write_json
from ..models import chat_text
from .base import Item, PrefixTeacher


class ContextTeacher(PrefixTeacher):
    """Base model + per-group context added to the model's own system prompt (chat_text); the
    context prefix's KV cache is computed once per group (PrefixTeacher)."""

    def __init__(self, base, tokenizer, contexts: dict[str, str | None], *, use_cache: bool = True):
        super().__init__(base, tokenizer, use_cache=use_cache)
        self.contexts = contexts

    def prompt_text(self, item: Item) -> str:
        return chat_text(self.tokenizer, item.prompt, system=self.contexts.get(item.group))


def load_contexts(spec: str = "builtin") -> list[dict]:
    """Candidate contexts: the built-in library or a JSONL file with id, text and optional side."""
    if spec == "builtin":
        rows = [json.loads(line) for line in builtin_bytes("contexts.jsonl").decode().splitlines() if line.strip()]
    else:
        rows = read_jsonl(Path(spec))
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise UserError(f"{spec}:{n}: context needs a non-empty 'text'")
        r.setdefault("id", f"ctx-{n:03d}")
        r.setdefault("side", "harmful")
    if not rows:
        raise UserError(f"{spec}: no contexts")
    return rows


def check_context(field: str, spec: str | None, library: Sequence[dict]) -> None:
    """A context is auto, a library id, or literal text; a single word that is no id is taken for
    a mistyped id rather than sent to the teacher as its whole context."""
    import difflib

    ids = [c["id"] for c in library]
    if spec is None or spec == "auto" or spec in ids or any(ch.isspace() for ch in spec.strip()):
        return
    number = re.fullmatch(r"(.*?)0*(\d+)", spec)
    same = [i for i in ids if number and re.fullmatch(re.escape(number[1]) + r"0*" + number[2], i)]
    close = same or difflib.get_close_matches(spec, ids, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(
        f"config field '{field}': {spec!r} is not a context id ({ids[0]} ... {ids[-1]}); {hint}"
        "literal context text needs more than one word"
    )


def context_text(spec: str | None, library: Sequence[dict]) -> str | None:
    """A library id resolves to its text; anything else is taken as the literal context."""
    if spec is None:
        return None
    by_id = {c["id"]: c["text"] for c in library}
    return by_id.get(spec, spec)


def flip_rates(
    model,
    tokenizer,
    judge,
    harmful: Sequence[PromptRecord],
    benign: Sequence[PromptRecord],
    contexts: Sequence[dict],
    *,
    max_new_tokens: int = 40,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """Per context: flip rate and the rest, sorted best first (flip rate, then less benign refusal)."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)

    def answers(records: Sequence[PromptRecord], system: str | None) -> list[str]:
        texts = [chat_text(tokenizer, r.prompt, system=system) for r in records]
        out, _ = generate(model, tokenizer, texts, settings, progress=False)
        return [o.text for o in out]

    def judged_safe(responses: Sequence[str]) -> list[bool]:
        return [v.label == "safe" for v in judge([r.prompt for r in harmful], list(responses))]

    base_safe = judged_safe(answers(harmful, None))
    n_unsafe = sum(not s for s in base_safe)
    rows = []
    for ctx in tqdm(
        [c for c in contexts if c.get("side", "harmful") == "harmful"],
        desc="flip rate",
        disable=not progress,
    ):
        # One generation call per context: harmful and benign prompts share its cached prefix.
        texts = answers([*harmful, *benign], ctx["text"])
        safe = judged_safe(texts[: len(harmful)])
        flipped = sum(s and not b for s, b in zip(safe, base_safe, strict=True))
        benign_refused = sum(judge.is_refusal(t) for t in texts[len(harmful) :])
        rows.append(
            {
                "id": ctx["id"],
                "text": ctx["text"],
                "flip_rate": flipped / len(harmful),
                "conditional_flip_rate": flipped / n_unsafe if n_unsafe else 0.0,
                "n_harmful": len(harmful),
                "n_unsafe_base": n_unsafe,
                "n_flipped": flipped,
                "refusal_rate_with_context": sum(safe) / len(harmful),
                "benign_refusal_rate": benign_refused / len(benign) if benign else 0.0,
                "n_benign": len(benign),
                **{k: ctx[k] for k in ("strength", "length", "framing", "specificity", "style") if k in ctx},
            }
        )
    rows.sort(key=lambda r: (-r["flip_rate"], r["benign_refusal_rate"], r["id"]))
    return rows


def choose_contexts(cfg, model, tok, judge, items, manifest, out: Path, *, progress: bool = True) -> dict:
    """{"harmful": c_h, "benign": c_b}. With context=auto, c_h is the best by flip rate on
    harmful TRAIN prompts; the ranking is written to flip_rates.json (and reused on resume)."""
    library = load_contexts(cfg.contexts)
    harmful_ctx = cfg.context
    if harmful_ctx == "auto":
        path = out / "flip_rates.json"
        if path.exists():
            ranking = json.loads(path.read_text())
        else:
            harmful = [PromptRecord(it.id, it.prompt) for it in items if it.group == "harmful"]
            harmful = harmful[: cfg.context_search_prompts]
            benign_train, _ = split_records(load_prompts(cfg.benign_source, manifest), seed=cfg.split_seed)
            benign = take(benign_train, max(4, cfg.context_search_prompts // 2), seed=cfg.seed + 1)
            if not harmful:
                raise UserError("context=auto needs harmful training prompts (n_harmful > 0)")
            ranked = sum(c.get("side", "harmful") == "harmful" for c in library)
            console.say(
                f"ranking {ranked} contexts (context=auto) on {len(harmful)} harmful + {len(benign)} benign "
                f"train prompts: {ranked * (len(harmful) + len(benign))} answers of up to "
                f"{cfg.context_search_tokens} tokens before step 1 (the bar shows the ETA; --set context=ID skips it)"
            )
            ranking = flip_rates(
                model, tok, judge, harmful, benign, library, max_new_tokens=cfg.context_search_tokens, progress=progress
            )
            faults.point("context-search")
            write_json(path, ranking)
        harmful_ctx = ranking[0]["id"]
        console.say(
            f"context: {harmful_ctx} (flip rate {ranking[0]['flip_rate']:.2f} on {ranking[0]['n_harmful']} "
            "harmful train prompts)"
        )
    return {
        "harmful": context_text(harmful_ctx, library),
        "benign": context_text(cfg.benign_context, library),
    }
