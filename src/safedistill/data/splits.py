"""Deterministic, disjoint train/eval splits: a record's side depends only on its id and the seed."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence

from .schema import PromptRecord


def _unit(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(
    records: Sequence[PromptRecord], *, seed: int = 0, eval_fraction: float = 0.2
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Hash-based split: adding records to a source never moves existing ones across sides."""
    train, held_out = [], []
    for r in records:
        side = "eval" if _unit(f"{seed}:{r.id}") < eval_fraction else "train"
        (held_out if side == "eval" else train).append(dataclasses.replace(r, split=side))
    return train, held_out


def take(records: Sequence[PromptRecord], limit: int | None, *, seed: int = 0) -> list[PromptRecord]:
    """A seeded sample of at most `limit` records, in a stable order."""
    out = list(records)
    random.Random(seed).shuffle(out)
    return out if limit is None else out[:limit]
