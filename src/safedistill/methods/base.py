"""What every method's `prepare(cfg, setup)` gets and returns.

`Setup` is the loaded base model (before LoRA) and the run's shared services; `Prepared` is what
the trainer needs: prompts and a teacher factory for on-policy methods, targets for SFT methods."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.packaged import Manifest
from ..data.schema import Demonstration
from ..data.sources import load_prompts
from ..data.splits import split_records, take
from ..errors import UserError
from ..losses.masks import VOCAB_MASKS
from ..teachers.base import Item
from ..teachers.steering_search import prepare_steering


@dataclass
class Setup:
    model: object  # the base model, before LoRA
    tok: object
    judge: object
    manifest: Manifest
    out: Path
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


def training_items(cfg: RunConfig, manifest: Manifest) -> list[Item]:
    """Harmful and benign prompts from the TRAIN side of the split the evaluation holds out."""
    items = []
    n_benign = (
        cfg.n_benign if cfg.benign_ratio is None else round(cfg.n_harmful * cfg.benign_ratio / (1 - cfg.benign_ratio))
    )
    for source, n, group in ((cfg.harmful_source, cfg.n_harmful, "harmful"), (cfg.benign_source, n_benign, "benign")):
        if n <= 0:
            continue
        train, _ = split_records(load_prompts(source, manifest), seed=cfg.split_seed)
        picked = take(train, n, seed=cfg.seed)
        if len(picked) < n:
            print(f"note: {source} has only {len(picked)} training prompts (asked for {n})", file=sys.stderr)
        items += [Item(r.id, r.prompt, group) for r in picked]
    if not items:
        raise UserError("no training prompts")
    return items


def add_vocab_mask(cfg: RunConfig, setup: Setup, prepared: Prepared) -> Prepared:
    """A vocab_mask that needs ids (safety_tokens) gets S from the steering search, unless the
    method already found it."""
    if VOCAB_MASKS[cfg.vocab_mask].needs_ids and prepared.vocab_ids is None:
        s = setup
        prepared.vocab_ids = prepare_steering(cfg, s.model, s.tok, s.judge, s.manifest, s.out, progress=s.progress)[
            "vocab_ids"
        ]
    return prepared
