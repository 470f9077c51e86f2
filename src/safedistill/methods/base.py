"""What every method's `prepare(setup, **sections)` gets and returns.

`Setup` is the loaded base model (before LoRA), the run's shared services (judge, manifest, run
directory, the train splits loaded once) and identity (seed, model and judge names); each method
also takes the config sections its METHODS row names. `Prepared` is what the trainer needs:
prompts and its teacher's inputs for on-policy methods, targets for SFT methods."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import AugmentSettings, DataSettings, SteeringSettings, TeacherSettings
from ..data.augment import FRAMES, SHOTS, choose, evaluation_items, parse_styles, rewrites, rewritten
from ..data.packaged import Manifest
from ..data.rephrase import rephrase_text
from ..data.schema import Demonstration, PromptRecord
from ..data.sources import check_trainable, chosen_templates, jailbreak_wrapped, load_jailbreak_templates
from ..data.splits import take
from ..data.train import TrainSplits
from ..errors import UserError
from ..eval.rewrite import model_rewrites
from ..files import write_jsonl
from ..losses.masks import VOCAB_MASKS
from ..models import load_model
from ..searches.steering import (
    SteeringSearch,
    last_logprobs,
    prepare_steering,
    refusal_score,
    refusal_token_ids,
)
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


def training_items(
    data: DataSettings,
    splits: TrainSplits,
    seed: int,
    complies: Callable[[list[PromptRecord]], list[bool]] | None = None,
) -> list[Item]:
    """Harmful and benign prompts from the TRAIN side of the split the evaluation holds out; the
    harmful side shaped by `jailbreak_share` and, with `complies` (harmful_filter: complied), only
    the prompts the base model does not refuse."""
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
        if group == "harmful" and (complies is not None or data.jailbreak_share > 0):
            templates = (
                chosen_templates(load_jailbreak_templates(), data.jailbreak_templates) if data.jailbreak_share else []
            )
            picked = harmful_pool(
                splits.of(source), n, seed, templates=templates, share=data.jailbreak_share, complies=complies
            )
        else:
            picked = take(splits.of(source), n, seed=seed)
        if len(picked) < n:
            print(f"note: {source} has only {len(picked)} training prompts (asked for {n})", file=sys.stderr)
        items += [Item(r.id, r.prompt, group) for r in picked]
    if data.borderline_source:
        items += borderline_items(data.borderline_source, data.n_borderline, splits, seed=seed)
    if not items:
        raise UserError("no training prompts")
    return items


def harmful_pool(
    records: list[PromptRecord],
    n: int,
    seed: int,
    *,
    templates: list[dict] = (),
    share: float = 0.0,
    complies: Callable[[list[PromptRecord]], list[bool]] | None = None,
    chunk: int = 16,
) -> list[PromptRecord]:
    """The harmful train side in the seeded order `take` uses, a `share` of it (picked by a seeded
    hash of the id, `templates` taken in turn) wrapped in a jailbreak template; with `complies`,
    scored a chunk at a time in that order and kept where the model complies, until n are kept (so
    a model that refuses most pays for a few chunks, not the whole split)."""
    ordered = take(records, None, seed=seed)
    if share > 0:
        wrap = choose([r.id for r in ordered], [t["id"] for t in templates], share, seed)
        by_id = {t["id"]: t for t in templates}
        ordered = [jailbreak_wrapped(r, by_id[wrap[r.id]]) if r.id in wrap else r for r in ordered]
    if complies is None:
        return ordered[:n]
    kept: list[PromptRecord] = []
    for start in range(0, len(ordered), chunk):
        part = ordered[start : start + chunk]
        kept += [r for r, ok in zip(part, complies(part), strict=True) if ok]
        if len(kept) >= n:
            break
    return kept[:n]


def complied_filter(s: Setup) -> Callable[[list[PromptRecord]], list[bool]]:
    """harmful_filter: complied. Whether the base model does not refuse each prompt: its refusal
    score (the log-odds of refusal openings at the first answer position, as the refusal-direction
    pipeline's filter_data scores) below 0. Every scored prompt and its score is written to
    harmful_filter.jsonl in the run directory, which says what was kept and why."""
    ref_ids = refusal_token_ids(s.tok)
    path = Path(s.out) / "harmful_filter.jsonl"
    rows: list[dict] = []

    def complies(records: list[PromptRecord]) -> list[bool]:
        scores = refusal_score(last_logprobs(s.model, s.tok, [r.prompt for r in records], batch_size=4), ref_ids)
        rows.extend(
            {"id": r.id, "refusal_score": round(float(v), 4), "kept": bool(v < 0)}
            for r, v in zip(records, scores, strict=True)
        )
        write_jsonl(path, rows)
        return [bool(v < 0) for v in scores]

    return complies


def method_items(data: DataSettings, s: Setup) -> list[Item]:
    """training_items with the run's model as the compliance filter when harmful_filter asks for it."""
    complies = complied_filter(s) if data.harmful_filter == "complied" else None
    items = training_items(data, s.splits, s.seed, complies)
    if complies is not None:
        n = sum(it.group == "harmful" for it in items)
        print(f"harmful_filter complied: {n} harmful training prompts the base model does not refuse", file=sys.stderr)
    return items


def borderline_items(source: str, n: int, splits: TrainSplits, *, seed: int) -> list[Item]:
    """Borderline-safe prompts for the benign side (the teacher's helpful answer is distilled on
    them too): a seeded sample of the train side of `source`, split as the evaluation splits it, so
    the built-in over-refusal set's eval side stays held out. XSTest never: it is evaluation-only."""
    check_trainable(source)
    picked = take(splits.of(source), n, seed=seed + 3)
    if len(picked) < n:
        print(f"note: {source} has only {len(picked)} borderline training prompts (asked for {n})", file=sys.stderr)
    return [Item(r.id, r.prompt, "benign") for r in picked]


def augment_prepared(section: AugmentSettings, setup: Setup, prepared: Prepared) -> Prepared:
    """`augment`: a share of the harmful training prompts (on-policy items with group harmful, SFT
    targets not marked benign) replaced by rewrites written once from the train side
    (data/augment.py); the prompts the evaluation holds out are never rewritten."""
    if not parse_styles(section.augment):
        return prepared
    harmful = [x for x in prepared.data if (x.group == "harmful" if isinstance(x, Item) else x.category != "benign")]

    rows, excluded = rewrites(
        section,
        [PromptRecord(x.id, x.prompt) for x in harmful],
        writer=(
            model_writer(section.augment_model, setup),
            section.augment_model or "the trained model (before training)",
        ),
        eval_items=evaluation_items(setup.splits.harmful_source, setup.splits.split_seed),
        seed=setup.seed,
        out=setup.out,
        manifest=setup.manifest,
    )
    if excluded:
        print(
            f"note: augment left {excluded} harmful prompts unrewritten: they are also evaluation items",
            file=sys.stderr,
        )
    if prepared.targets is not None:
        return dataclasses.replace(prepared, targets=rewritten(prepared.targets, rows))
    return dataclasses.replace(prepared, items=rewritten(prepared.items, rows, teacher_reads=section.augment_teacher))


def model_writer(name: str | None, setup: Setup) -> Callable[[list[PromptRecord], str], list[tuple[str, str]]]:
    """(records, style) -> one (rewrite, made by) per record, written by model `name` (the base model
    when None, loaded on first use) exactly as the eval's model-written axis asks
    (eval/rewrite.model_rewrites: the few-shot prompt, the answer opened with its label, the same
    filters, a dropped item asked again sampled, seeded by the run's seed); the eval's prompts for
    past_tense and hypothetical, data/augment.SHOTS for the other styles. Where every attempt was
    dropped: the eval's rule (past_tense, hypothetical) or a fixed frame of the style."""

    @functools.cache
    def loaded():
        if name is None:
            return setup.model, setup.tok
        return load_model(name, device=next(setup.model.parameters()).device)

    def write(records: list[PromptRecord], style: str) -> list[tuple[str, str]]:
        model, tok = loaded()
        rows = model_rewrites(
            model,
            tok,
            records,
            style,
            prompt=SHOTS.get(style),
            attempts=AUGMENT_ATTEMPTS,
            seed=setup.seed,
            progress=setup.progress,
        )
        return [
            (row["rewrite"], "model") if row["rewrite"] else _fallback(r.prompt, style)
            for r, row in zip(records, rows, strict=True)
        ]

    return write


AUGMENT_ATTEMPTS = 3  # as the shipped eval rewrites: greedy, then up to 2 sampled attempts


def _fallback(prompt: str, style: str) -> tuple[str, str]:
    """A rewrite no model attempt passed the filters for: the eval's rule, or the style's frame."""
    if style in FRAMES:
        return FRAMES[style].format(request=prompt), "frame"
    return rephrase_text(prompt, style), "rule"


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
