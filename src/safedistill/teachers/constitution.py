"""The constitution teacher: a frozen model that reads a constitution wrapped around the user turn.
Only the teacher's prompt carries it; the student answers the bare prompt, as at test time."""

from __future__ import annotations

from pathlib import Path

from ..data.sources import builtin_bytes
from ..errors import UserError
from ..models import chat_text
from .base import FrozenModel, Item, PrefixTeacher

REQUEST_HEADER = "## The request"
REQUEST_FOOTER = "Assess the risk silently, choose path A, B or C, then reply to the request directly."


def load_constitution(spec: str = "builtin") -> str:
    """The built-in constitution or a user's text/Markdown file."""
    if spec == "builtin":
        text = builtin_bytes("constitution.md").decode()
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"constitution: no such file {spec}")
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"constitution: {spec} is empty")
    return text.strip()


def wrap(constitution: str, prompt: str) -> str:
    """The teacher's user turn: the constitution, then the request, then the instruction to answer."""
    return f"{constitution}\n\n{REQUEST_HEADER}\n\n{prompt}\n\n{REQUEST_FOOTER}"


class ConstitutionTeacher(PrefixTeacher):
    """A frozen model (the base, or COPSD's calibrated Cross-SFT copy) that reads the constitution
    wrapped around the user turn; the constitution prefix's KV cache is reused (PrefixTeacher).
    `reference` stays the original model even when `base` is the calibrated copy."""

    def __init__(self, base, tokenizer, constitution: str, *, reference=None, use_cache: bool = True):
        super().__init__(base, tokenizer, reference=reference, use_cache=use_cache)
        self.constitution = constitution

    def prompt_text(self, item: Item) -> str:
        return chat_text(self.tokenizer, wrap(self.constitution, item.teacher_view))


def constitution_teacher(base, tokenizer, *, constitution: str, calibrated=None) -> ConstitutionTeacher:
    """TEACHERS["constitution"]'s factory: the Cross-SFT copy when there is one, else the frozen
    base; the KL-to-reference term pulls toward the original model either way."""
    frozen = FrozenModel(calibrated) if calibrated is not None else base
    return ConstitutionTeacher(frozen, tokenizer, constitution, reference=base)
