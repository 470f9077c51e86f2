"""The two record kinds every source is turned into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to answer. `split` is "" until a split assigns "train" or "eval". `meta` carries what a
    benchmark ships beside the prompt (reference answers, the original of a rephrasing); it takes no
    part in hashing, so records stay usable as set members and dict keys."""

    id: str
    prompt: str
    category: str = ""
    source: str = ""
    split: str = ""
    meta: dict[str, str] = field(default_factory=dict, hash=False)

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
    category: str = ""  # "benign" marks a benign demonstration (augment rewrites the others)
    # A generated target cut at the token limit: trained without a stop token, so SFT does not
    # teach the student to end its answers where the generator's budget ran out.
    truncated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)
