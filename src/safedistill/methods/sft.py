"""Vanilla SFT on external safety demonstrations (a built-in set or a JSONL file); with
`demonstrations` and `n_samples` equal to a `dgr` run's, it is that run's baseline."""

from __future__ import annotations

import random

from ..config import DataSettings
from ..data.schema import Demonstration
from ..data.sources import load_demonstrations
from .base import Prepared, Setup


def prepare(s: Setup, data: DataSettings) -> Prepared:
    return Prepared(targets=demonstration_targets(data, s.manifest, s.seed))


def demonstration_targets(data: DataSettings, manifest, seed: int) -> list[Demonstration]:
    """data.demonstrations, limited to n_samples by a seeded shuffle (so 10 samples are a subset of 30)."""
    demos = load_demonstrations(
        data.demonstrations, manifest, harmful_source=data.harmful_source, split_seed=data.split_seed
    )
    return subset(demos, data.n_samples, seed)


def subset(demos: list[Demonstration], n: int | None, seed: int) -> list[Demonstration]:
    """At most n demonstrations by a seeded shuffle: for one seed, the first 10 are among the first 30."""
    if n is None:
        return list(demos)
    demos = list(demos)
    random.Random(seed).shuffle(demos)
    return demos[:n]
