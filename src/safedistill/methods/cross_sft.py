"""COPSD's own extra step, the Cross-SFT cold start: a fine-tuned frozen copy of the model that
reads the constitution (teachers/constitution.py) without collapsing into short answers; the
constitution teacher's factory takes it as `calibrated`.

Cross-SFT (the paper has not published its recipe; this is our reading):
  constitution + harmful prompt -> a safe answer the model itself gave under the constitution
                                   (judge-verified), else a refusal it gave under a privileged
                                   context (`cross_sft_seed_context`: the flipped answers a small
                                   model gives far more often than under a long constitution);
                                   prompts with neither are dropped
  constitution + benign prompt  -> the model's own answer to the bare prompt (no constitution)
A copy of the model is fine-tuned (LoRA, merged afterwards) on these crossed pairs, so that the
constitution keeps its effect on harmful prompts but no longer shortens or hedges benign answers;
frozen, it is the teacher for constitution-conditioned on-policy distillation into the original
student. Harmful rows are repeated up to `cross_sft_harmful_share` of the set. The crossed set is
written to crossed.jsonl (its make-up and harmful share to crossed_summary.json), the adapter to
cross_sft/ (reused on resume).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data.schema import Demonstration
from ..engine.fit import Batching, fit
from ..engine.rollout import SamplingSettings, generate
from ..engine.scoring import common_prefix, response_logits, returned_cache
from ..engine.sft import SFTStep
from ..errors import UserError
from ..files import append_jsonl, write_json, write_jsonl
from ..models import LoraSettings, add_lora, chat_text, save_model
from ..searches.context import choose_contexts
from ..teachers.constitution import wrap
from ..teachers.context import check_context, context_text, load_contexts

if TYPE_CHECKING:
    from ..config import CopsdSettings, OptimSettings, RolloutSettings, TeacherSettings
    from ..data.train import TrainSplits


@dataclass(frozen=True)
class CrossSFT:
    """What the cold start reads: its own section (copsd), the rollout section (answers are drawn as
    the rollouts are), the optim section (LoRA rank, clipping), the teacher section and the train
    splits (a seed context found by the context search) and the run's seed."""

    copsd: CopsdSettings
    rollout: RolloutSettings
    optim: OptimSettings
    teacher: TeacherSettings
    splits: TrainSplits | None
    seed: int


def crossed_rows(
    c: CrossSFT, model, tok, judge, items, constitution: str, *, seed_context: str | None = None, progress=True
) -> list[dict]:
    """The crossed data set (see the module docstring): `cross_sft_samples` tries per harmful
    prompt under the constitution, then under `seed_context` for the prompts still without a safe
    answer; harmful rows repeated up to `cross_sft_harmful_share` (balance)."""
    harmful = [it for it in items if it.group == "harmful"]
    benign = [it for it in items if it.group != "harmful"]
    settings = SamplingSettings.of_run(c.rollout, seed=c.seed * 31 + 5, max_new_tokens=c.copsd.cross_sft_max_new_tokens)
    ask = partial(_safe_answers, model, tok, judge, settings=settings, k=c.copsd.cross_sft_samples, progress=progress)
    rows: list[dict] = []
    found = ask(harmful, lambda it: chat_text(tok, wrap(constitution, it.prompt)), desc="crossed: harmful")
    rows += [_row(it, constitution, *found[it.id], "constitution") for it in harmful if it.id in found]
    missing = [it for it in harmful if it.id not in found]
    if seed_context is not None and missing:
        seeded = ask(missing, lambda it: chat_text(tok, it.prompt, system=seed_context), desc="crossed: seed context")
        rows += [_row(it, constitution, *seeded[it.id], "context") for it in missing if it.id in seeded]
    if benign:
        texts = [chat_text(tok, it.prompt) for it in benign]
        out, _ = generate(model, tok, texts, settings, desc="crossed: benign", progress=progress)
        rows += [
            _row(it, constitution, r, None, "own-answer") for it, r in zip(benign, out, strict=True) if r.text.strip()
        ]
    return balance(rows, c.copsd.cross_sft_harmful_share)


def _safe_answers(model, tok, judge, items, prompt_text, *, settings, k: int, desc: str, progress: bool) -> dict:
    """{item id: (first answer of k samples the judge takes as a safe target, its label)}."""
    if not items:
        return {}
    tries = [it for it in items for _ in range(k)]
    out, _ = generate(model, tok, [prompt_text(it) for it in tries], settings, desc=desc, progress=progress)
    verdicts = judge([it.prompt for it in tries], [r.text for r in out])
    found: dict[str, tuple] = {}
    for it, r, v in zip(tries, out, verdicts, strict=True):
        if it.id not in found and v.safe_target and r.text.strip():
            found[it.id] = (r, v.label)
    return found


def balance(rows: list[dict], share: float | None) -> list[dict]:
    """`rows` plus copies of its harmful rows (in order, each marked with `copy`: 1, 2, ...) until
    harmful rows make at least `share` of the set; unchanged when share is None or no harmful row
    exists."""
    harmful = [r for r in rows if r["group"] == "harmful"]
    if share is None or not harmful:
        return rows
    need = math.ceil(share * (len(rows) - len(harmful)) / (1 - share) - 1e-9)
    return rows + [dict(harmful[i % len(harmful)], copy=1 + i // len(harmful)) for i in range(need - len(harmful))]


def crossed_summary(rows: list[dict], n_harmful_prompts: int, target: float | None, seed_context) -> dict:
    """What crossed_summary.json records: where the harmful rows came from and their share."""
    harmful = [r for r in rows if r["group"] == "harmful"]
    distinct = [r for r in harmful if not r.get("copy")]
    benign = [r for r in rows if r["group"] != "harmful"]
    return {
        "harmful_prompts": n_harmful_prompts,
        "harmful_kept": len(distinct),
        "harmful_from_constitution": sum(r["source"] == "constitution" for r in distinct),
        "harmful_from_context": sum(r["source"] == "context" for r in distinct),
        "harmful_copies": len(harmful) - len(distinct),
        "harmful_rows": len(harmful),
        "benign_rows": len(benign),
        "benign_truncated": sum(not r["finished"] for r in benign),
        "harmful_share": len(harmful) / len(rows) if rows else 0.0,
        "harmful_share_distinct": len(distinct) / (len(distinct) + len(benign)) if distinct or benign else 0.0,
        "target_share": target,
        "seed_context": seed_context,
    }


def _row(item, constitution: str, rollout, label: str | None, source: str) -> dict:
    return {
        "id": item.id,
        "group": item.group,
        "prompt": item.prompt,
        "input": wrap(constitution, item.prompt),
        "response": rollout.text,
        "finished": rollout.finished,
        "source": source,
        "judge": label,
    }


class CrossSFTStep(SFTStep):
    """SFT on the crossed pairs; an answer cut at the length limit gets no stop token, so the
    teacher does not learn to end answers early."""

    def __init__(self, tok, truncated: set[str]):
        super().__init__(tok)
        self.truncated = truncated

    def target_ids(self, d: Demonstration) -> list[int]:
        ids = super().target_ids(d)
        return ids[:-1] if d.id in self.truncated else ids

    def response_logits(self, model, prompts: list[list[int]], targets: list[list[int]]):
        """SFTStep's logits, with the constitution prefix (same for every row) run once at batch 1
        and its KV cache, with grad, expanded to the batch: exact, and ~4x less compute on CPU."""
        shared = min(len(common_prefix(prompts)), min(len(p) for p in prompts) - 1) if len(prompts) > 1 else 0
        if shared < 2:
            return super().response_logits(model, prompts, targets)
        device = next(model.parameters()).device
        cache = returned_cache(model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True))
        suffixes = [p[shared:] for p in prompts]
        return response_logits(model, suffixes, targets, pad_id=self.tok.pad_token_id, prefix_cache=cache)


def cross_sft(c: CrossSFT, model, tok, rows: list[dict], out: Path, *, progress: bool = True):
    """A fine-tuned, merged, frozen copy of `model`; the adapter is saved to out/cross_sft."""
    from peft import PeftModel

    adapter_dir = out / "cross_sft"
    teacher = copy.deepcopy(model)
    if (adapter_dir / "adapter_config.json").exists():
        return PeftModel.from_pretrained(teacher, adapter_dir).merge_and_unload().eval()
    data = [Demonstration(r["input"], r["response"], f"{i}", None, r["source"]) for i, r in enumerate(rows)]
    truncated = {f"{i}" for i, r in enumerate(rows) if not r["finished"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed * 13 + 3)
        teacher = add_lora(teacher, LoraSettings(r=c.optim.lora_r, alpha=c.optim.lora_alpha))
        params = [p for p in teacher.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.copsd.cross_sft_lr)
        (out / "cross_sft_metrics.jsonl").unlink(missing_ok=True)
        batching = Batching(batch_size=c.copsd.cross_sft_batch_size, grad_accum=1, seed=c.seed)
        for done in fit(
            teacher,
            CrossSFTStep(tok, truncated),
            data,
            optimizer,
            batching,
            steps=c.copsd.cross_sft_steps,
            max_grad_norm=c.optim.max_grad_norm,
            desc="cross-sft",
            progress=progress,
        ):
            append_jsonl(out / "cross_sft_metrics.jsonl", {"step": done.step + 1, **done.logs[0]})
    teacher.eval()
    save_model(teacher, tok, adapter_dir)
    return teacher.merge_and_unload().eval()


def seed_context(c: CrossSFT, model, tok, judge, items, out: Path, *, progress: bool = True) -> str | None:
    """The text of `cross_sft_seed_context`: a library id, literal text, auto (OPSA's flip-rate
    search, flip_rates.json) or None."""
    spec = c.copsd.cross_sft_seed_context
    if spec == "auto":
        searched = dataclasses.replace(c.teacher, context="auto")
        chosen = choose_contexts(searched, c.splits, model, tok, judge, items, out, seed=c.seed, progress=progress)
        return chosen["harmful"]
    library = load_contexts(c.teacher.contexts)
    check_context("cross_sft_seed_context", spec, library)
    return context_text(spec, library)


def calibrated_model(c: CrossSFT, model, tok, judge, items, constitution: str, out: Path, *, progress: bool = True):
    """The crossed set (crossed.jsonl, reused on resume; its make-up in crossed_summary.json) and
    the Cross-SFT copy trained on it."""
    path = out / "crossed.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        context = seed_context(c, model, tok, judge, items, out, progress=progress)
        rows = crossed_rows(c, model, tok, judge, items, constitution, seed_context=context, progress=progress)
        write_jsonl(path, rows)
    n_harm = sum(it.group == "harmful" for it in items)
    summary = crossed_summary(rows, n_harm, c.copsd.cross_sft_harmful_share, c.copsd.cross_sft_seed_context)
    write_json(out / "crossed_summary.json", summary)
    print(f"cross-sft: {summary_line(summary)}", file=sys.stderr)
    if not rows:
        raise UserError("cross-sft: the crossed data set is empty (no safe harmful answer and no benign prompt)")
    return cross_sft(c, model, tok, rows, out, progress=progress)


FILES = ("crossed.jsonl", "crossed_summary.json", "cross_sft_metrics.jsonl", "cross_sft")  # in a run directory


def crossed_section(out: Path) -> list[str]:
    """report.md's line on the crossed set, when the run made one."""
    crossed = Path(out) / "crossed_summary.json"
    if not crossed.exists():
        return []
    return [f"Cross-SFT cold start: {summary_line(json.loads(crossed.read_text()))}; see `crossed.jsonl`.", ""]


def summary_line(c: dict) -> str:
    """One sentence on the crossed set: where its harmful rows came from and their share (also the report's)."""
    copies = f" + {c['harmful_copies']} repeated" if c.get("harmful_copies") else ""
    target = f" (target {c['target_share']:.2f})" if c.get("target_share") is not None else ""
    seeded = f", {c['harmful_from_context']} from the seed context {c['seed_context']}" if c.get("seed_context") else ""
    return (
        f"{c['harmful_kept']}/{c['harmful_prompts']} harmful prompts got a judge-verified safe answer "
        f"({c.get('harmful_from_constitution', c['harmful_kept'])} under the constitution{seeded}){copies}; "
        f"{c['benign_rows']} benign rows ({c['benign_truncated']} cut at the token limit); harmful share of the rows "
        f"{c.get('harmful_share', 0.0):.2f}{target}"
    )
