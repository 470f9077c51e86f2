"""The calibrated teacher: COPSD's Cross-SFT cold start, a fine-tuned frozen copy of the model
that reads the constitution (teachers/constitution.py) without collapsing into short answers.

Cross-SFT (the paper has not published its recipe; this is our reading):
  constitution + harmful prompt -> a safe answer the model itself gave under the constitution
                                   (judge-verified; prompts with no safe sample are dropped)
  constitution + benign prompt  -> the model's own answer to the bare prompt (no constitution)
A copy of the model is fine-tuned (LoRA, merged afterwards) on these crossed pairs, so that the
constitution keeps its effect on harmful prompts but no longer shortens or hedges benign answers;
frozen, it is the teacher for constitution-conditioned on-policy distillation into the original
student. The crossed set is written to crossed.jsonl, the adapter to cross_sft/ (reused on resume).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from ..data.schema import Demonstration
from ..engine.fit import Batching, fit
from ..engine.rollout import SamplingSettings, generate
from ..engine.scoring import common_prefix, response_logits, returned_cache
from ..engine.sft import SFTStep
from ..errors import UserError
from ..files import append_jsonl, write_json, write_jsonl
from ..models import LoraSettings, add_lora, chat_text, save_model
from .constitution import wrap


def crossed_rows(cfg, model, tok, judge, items, constitution: str, *, progress: bool = True) -> list[dict]:
    """The crossed data set (see the module docstring); `cross_sft_samples` tries per harmful prompt."""
    harmful = [it for it in items if it.group == "harmful"]
    benign = [it for it in items if it.group != "harmful"]
    settings = SamplingSettings(
        max_new_tokens=cfg.cross_sft_max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=16,
        seed=cfg.seed * 31 + 5,
    )
    k = cfg.cross_sft_samples
    rows: list[dict] = []
    if harmful:
        tries = [it for it in harmful for _ in range(k)]
        texts = [chat_text(tok, wrap(constitution, it.prompt)) for it in tries]
        out, _ = generate(model, tok, texts, settings, desc="crossed: harmful", progress=progress)
        verdicts = judge([it.prompt for it in tries], [r.text for r in out])
        done: set[str] = set()
        for it, r, v in zip(tries, out, verdicts, strict=True):
            if it.id in done or not v.safe_target or not r.text.strip():
                continue
            done.add(it.id)
            rows.append(_row(it, constitution, r, "constitution", v.label))
    if benign:
        texts = [chat_text(tok, it.prompt) for it in benign]
        out, _ = generate(model, tok, texts, settings, desc="crossed: benign", progress=progress)
        rows += [
            _row(it, constitution, r, "own-answer", None) for it, r in zip(benign, out, strict=True) if r.text.strip()
        ]
    return rows


def _row(item, constitution: str, rollout, source: str, label: str | None) -> dict:
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

    def __init__(self, cfg, tok, truncated: set[str]):
        super().__init__(cfg, tok)
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


def cross_sft(cfg, model, tok, rows: list[dict], out: Path, *, progress: bool = True):
    """A fine-tuned, merged, frozen copy of `model`; the adapter is saved to out/cross_sft."""
    from peft import PeftModel

    adapter_dir = out / "cross_sft"
    teacher = copy.deepcopy(model)
    if (adapter_dir / "adapter_config.json").exists():
        return PeftModel.from_pretrained(teacher, adapter_dir).merge_and_unload().eval()
    data = [Demonstration(r["input"], r["response"], f"{i}", None, r["source"]) for i, r in enumerate(rows)]
    truncated = {f"{i}" for i, r in enumerate(rows) if not r["finished"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 13 + 3)
        teacher = add_lora(teacher, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
        params = [p for p in teacher.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.cross_sft_lr)
        (out / "cross_sft_metrics.jsonl").unlink(missing_ok=True)
        batching = Batching(batch_size=cfg.cross_sft_batch_size, grad_accum=1, seed=cfg.seed)
        for done in fit(
            teacher,
            CrossSFTStep(cfg, tok, truncated),
            data,
            optimizer,
            batching,
            steps=cfg.cross_sft_steps,
            max_grad_norm=cfg.max_grad_norm,
            desc="cross-sft",
            progress=progress,
        ):
            append_jsonl(out / "cross_sft_metrics.jsonl", {"step": done.step + 1, **done.logs[0]})
    teacher.eval()
    save_model(teacher, tok, adapter_dir)
    return teacher.merge_and_unload().eval()


def calibrated_model(cfg, model, tok, judge, items, constitution: str, out: Path, *, progress: bool = True):
    """The crossed set (crossed.jsonl, reused on resume) and the Cross-SFT copy trained on it."""
    path = out / "crossed.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = crossed_rows(cfg, model, tok, judge, items, constitution, progress=progress)
        write_jsonl(path, rows)
    n_harm = sum(it.group == "harmful" for it in items)
    kept = sum(r["group"] == "harmful" for r in rows)
    summary = {
        "harmful_prompts": n_harm,
        "harmful_kept": kept,
        "benign_rows": len(rows) - kept,
        "benign_truncated": sum(r["group"] != "harmful" and not r["finished"] for r in rows),
    }
    write_json(out / "crossed_summary.json", summary)
    print(
        f"cross-sft: {kept}/{n_harm} harmful prompts got a safe answer; {len(rows) - kept} benign rows", file=sys.stderr
    )
    if not rows:
        raise UserError("cross-sft: the crossed data set is empty (no safe harmful answer and no benign prompt)")
    return cross_sft(cfg, model, tok, rows, out, progress=progress)
