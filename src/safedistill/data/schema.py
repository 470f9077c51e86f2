"""The two record kinds every source is turned into."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to answer. `split` is "" until a split assigns "train" or "eval"."""

    id: str
    prompt: str
    category: str = ""
    source: str = ""
    split: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Demonstration:
    """A prompt with a target response (and optional reasoning), for the SFT-style methods."""

    prompt: str
    response: str
    id: str = ""
    reasoning: str | None = None
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)
