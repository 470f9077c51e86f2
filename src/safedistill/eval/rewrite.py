"""Harmful requests rewritten by a model, with the paper's few-shot prompts (data/rephrase.py).

The prompts, the cleaning of an answer and the checks that drop a copy live in data/rephrase.py,
which imports no model code; generating with a model is this layer's: the eval's model-written
generalisation axis (`model_rewrites`, cached by data/rephrase.model_rephrase) and the training
augment (methods/base.model_writer: the same call with its own styles' prompts, falling back to a
rule or a fixed frame where every attempt was dropped) both ask through here."""

from __future__ import annotations

from collections.abc import Sequence

from ..data.rephrase import (
    ANSWER_OPENING,
    COPY_OVERLAP,
    MODEL_PROMPTS,
    STYLES,
    clean_model_rewrite,
    in_style,
    is_example_copy,
    word_overlap,
)
from ..data.schema import PromptRecord
from ..engine.rollout import SamplingSettings, generate
from ..errors import UserError
from ..models import chat_text


def model_rewrites(
    model,
    tokenizer,
    records: Sequence[PromptRecord],
    style: str,
    *,
    prompt: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    attempts: int = 1,
    temperature: float = 1.0,
    progress: bool = True,
) -> list[dict]:
    """Per record {id, original, style, rewrite (None when dropped), overlap, dropped, attempt}: the
    model's greedy rewrite with the paper's few-shot prompt, cleaned by `clean_model_rewrite`; a
    copy of the request, a rewrite that lost it (under half its content words) or one not framed
    in the style (data/rephrase.in_style) is dropped, never
    replaced by the rule, so the model-written axis holds only model-written items. With
    `attempts` > 1, a dropped item is asked again, sampled at `temperature` (seed + attempt), as
    the paper draws several reformulations per request; the first kept one counts. `prompt`: a
    few-shot template in the same format ({request}; examples labelled 'Reformulated request: "'),
    for a style the eval does not ask (data/augment.SHOTS); default the paper's for `style`."""
    if prompt is None and style not in STYLES:
        raise UserError(f"rephrase style {style!r} unknown (known: {', '.join(STYLES)})")
    template = prompt or MODEL_PROMPTS[style]
    records = list(records)
    # The answer is opened with the examples' own label, so a small model continues the pattern
    # instead of repeating the request (Qwen2.5-0.5B copied every request without it) or refusing.
    texts = [chat_text(tokenizer, template.format(request=r.prompt)) + ANSWER_OPENING for r in records]
    rows: list[dict] = [{} for _ in records]
    for attempt in range(attempts):
        todo = [i for i, row in enumerate(rows) if not row or row["dropped"]]
        if not todo:
            break
        settings = SamplingSettings(
            max_new_tokens=max_new_tokens,
            temperature=0.0 if attempt == 0 else temperature,
            batch_size=batch_size,
            seed=seed + attempt,
        )
        outs, _ = generate(
            model, tokenizer, [texts[i] for i in todo], settings, desc=f"rephrasing ({style})", progress=progress
        )
        for i, o in zip(todo, outs, strict=True):
            rows[i] = {**_rewrite_row(records[i], style, o.text, prompt), "attempt": attempt}
    return rows


def _rewrite_row(r: PromptRecord, style: str, raw: str, prompt: str | None) -> dict:
    """One model answer, cleaned and checked (model_rewrites); `prompt` None: the eval's styles, whose
    example copies are looked for in both of the paper's prompts, as before."""
    text = clean_model_rewrite(raw, r.prompt)
    overlap = word_overlap(text, r.prompt) if text else None
    dropped = "" if text else ("copy or lost the request" if raw.strip() else "empty")
    if text and overlap is not None and overlap >= COPY_OVERLAP:
        dropped = "copy"
    elif text and is_example_copy(text, prompt):
        dropped = "copy of a prompt example"
    elif text and not in_style(text, style):
        dropped = "not in the style"
    return {
        "id": r.id,
        "original": r.prompt,
        "style": style,
        "rewrite": None if dropped else text,
        "raw": raw,
        "overlap": overlap,
        "dropped": dropped,
    }
