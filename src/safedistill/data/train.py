"""The run's training prompts: the train sides of its harmful and benign sources, loaded once (on
first use) in the run's setup and handed to everything that draws training prompts (the method's
items, the context and steering searches), so no component re-derives the split."""

from __future__ import annotations

from dataclasses import dataclass, field

from .packaged import Manifest
from .schema import PromptRecord
from .sources import load_prompts
from .splits import split_records


@dataclass
class TrainSplits:
    """The train sides of `harmful_source` and `benign_source` under `split_seed` (the
    evaluation holds out the rest); each is loaded, and recorded in `manifest`, when first used."""

    harmful_source: str
    benign_source: str
    split_seed: int = 0
    manifest: Manifest | None = None
    _loaded: dict[str, list[PromptRecord]] = field(default_factory=dict, repr=False)

    def of(self, source: str) -> list[PromptRecord]:
        if source not in self._loaded:
            self._loaded[source] = split_records(load_prompts(source, self.manifest), seed=self.split_seed)[0]
        return self._loaded[source]

    @property
    def harmful(self) -> list[PromptRecord]:
        return self.of(self.harmful_source)

    @property
    def benign(self) -> list[PromptRecord]:
        return self.of(self.benign_source)
