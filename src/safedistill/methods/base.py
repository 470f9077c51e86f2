"""What every method's `prepare(setup, **sections)` gets and returns.

`Setup` is the loaded base model (before LoRA), the run's shared services (judge, manifest, run
directory, the train splits loaded once) and identity (seed, model and judge names); each method
also takes the config sections its METHODS row names. `Prepared` is what the trainer needs:
prompts and its teacher's inputs for on-policy methods, targets for SFT methods."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DataSettings, SteeringSettings, TeacherSettings
from ..data.packaged import Manifest
from ..data.schema import Demonstration
from ..data.splits import take
from ..data.train import TrainSplits
from ..errors import UserError
from ..losses.masks import VOCAB_MASKS
from ..searches.steering import SteeringSearch, prepare_steering
from ..teachers.base import Item


@dataclass
class Setup:
    model: object  # the base model, before LoRA
    tok: object
    judge: object
    manifest: Manifest
    out: Path
    splits: TrainSplits
    seed: int
    model_name: str
    judge_name: str
    progress: bool = True


@dataclass
class Prepared:
    items: list[Item] = field(default_factory=list)  # on-policy: training prompts
    teacher: dict = field(default_factory=dict)  # on-policy: what the TEACHERS row's factory takes (e.g. contexts)
    vocab_ids: torch.Tensor | None = None  # vocab_mask ids (SafeSteer's S)
    targets: list[Demonstration] | None = None  # sft: what the SFT step trains on

    @property
    def data(self) -> list:
        return self.targets if self.targets is not None else self.items


def training_items(data: DataSettings, splits: TrainSplits, seed: int) -> list[Item]:
    """Harmful and benign prompts from the TRAIN side of the split the evaluation holds out."""
    items = []
    n_benign = (
        data.n_benign
        if data.benign_ratio is None
        else round(data.n_harmful * data.benign_ratio / (1 - data.benign_ratio))
    )
    for source, n, group in (
        (data.harmful_source, data.n_harmful, "harmful"),
        (data.benign_source, n_benign, "benign"),
    ):
        if n <= 0:
            continue
        picked = take(splits.of(source), n, seed=seed)
        if len(picked) < n:
            print(f"note: {source} has only {len(picked)} training prompts (asked for {n})", file=sys.stderr)
        items += [Item(r.id, r.prompt, group) for r in picked]
    if not items:
        raise UserError("no training prompts")
    return items


def steering_search(s: Setup, steering: SteeringSettings, teacher: TeacherSettings) -> SteeringSearch:
    return SteeringSearch(steering, teacher, s.splits, s.seed, s.model_name)


def add_vocab_mask(
    vocab_mask: str, s: Setup, steering: SteeringSettings, teacher: TeacherSettings, prepared: Prepared
) -> Prepared:
    """A vocab_mask that needs ids (safety_tokens) gets S from the steering search, unless the
    method already found it."""
    if VOCAB_MASKS[vocab_mask].needs_ids and prepared.vocab_ids is None:
        found = prepare_steering(
            steering_search(s, steering, teacher), s.model, s.tok, s.judge, s.out, progress=s.progress
        )
        prepared.vocab_ids = found["vocab_ids"]
    return prepared
