"""The context teacher: the frozen base model with a privileged context added to its own system
prompt (c_h on harmful prompts, c_b on benign ones; models.chat_text); the student never sees the
context, so the teacher's prompt is the student's with the context inserted and nothing else.
Also the library of candidate contexts; the flip-rate search over it is searches/context.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.sources import builtin_bytes, read_jsonl
from ..errors import UserError
from ..models import chat_text
from .base import Item, PrefixTeacher

if TYPE_CHECKING:
    from ..config import TeacherSettings


class ContextTeacher(PrefixTeacher):
    """Base model + per-group context added to the model's own system prompt (chat_text); the
    context prefix's KV cache is computed once per group (PrefixTeacher)."""

    def __init__(self, base, tokenizer, contexts: dict[str, str | None], *, use_cache: bool = True):
        super().__init__(base, tokenizer, use_cache=use_cache)
        self.contexts = contexts

    def prompt_text(self, item: Item) -> str:
        return chat_text(self.tokenizer, item.teacher_view, system=self.contexts.get(item.group))


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


def check_contexts(teacher: TeacherSettings) -> None:
    """TEACHERS["context"]'s preflight: `context` and `benign_context` are ids of the library, auto
    or literal text, checked before anything is written."""
    library = load_contexts(teacher.contexts)
    for field in ("context", "benign_context"):
        check_context(field, getattr(teacher, field), library)


def context_text(spec: str | None, library: Sequence[dict]) -> str | None:
    """A library id resolves to its text; anything else is taken as the literal context."""
    if spec is None:
        return None
    by_id = {c["id"]: c["text"] for c in library}
    return by_id.get(spec, spec)
