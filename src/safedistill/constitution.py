"""The constitution teacher: a frozen model that reads a constitution wrapped around the user turn.
Only the teacher's prompt carries it; the student answers the bare prompt, as at test time."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from .data.sources import builtin_bytes
from .errors import UserError
from .models import chat_text
from .rollout import encode_prompts
from .scoring import common_prefix
from .teachers import ContextTeacher, Item

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


class FrozenModel:
    """FrozenBase's interface over a separate frozen model (e.g. the Cross-SFT teacher)."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def weights(self, student) -> Iterator:
        yield self.model


class ConstitutionTeacher(ContextTeacher):
    """ContextTeacher whose privileged text wraps the user turn instead of sitting in the system
    role; the constitution prefix is the same for every prompt, so its KV cache is reused."""

    def __init__(self, base, tokenizer, constitution: str, *, use_cache: bool = True):
        self.base, self.tokenizer, self.use_cache = base, tokenizer, use_cache
        self.constitution = constitution
        self.contexts = {}
        self._kv: dict[str, object] = {}
        a, b = encode_prompts(tokenizer, [chat_text(tokenizer, wrap(constitution, x)) for x in ("A", "B")])
        prefix = common_prefix([a, b])
        self._prefix = defaultdict(lambda: prefix)

    def prompt_text(self, item: Item) -> str:
        return chat_text(self.tokenizer, wrap(self.constitution, item.prompt))
