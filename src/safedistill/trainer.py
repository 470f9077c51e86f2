"""A training run, top to bottom: data, base evaluation, teacher, LoRA, the step loop with
checkpoints, the trained model, the final evaluation and the report.

Two step kinds share everything else: `onpolicy` (student rollouts scored token by token by a
teacher, masked divergence) and `sft` (cross-entropy on fixed targets; see sft.py).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import RunConfig, same_settings, to_yaml
from .data.packaged import Manifest
from .data.sources import load_prompts
from .data.splits import split_records, take
from .diagnostics import CollapseProbe, text_stats
from .distributed import Processes
from .divergence import (
    first_k_mask,
    masked_mean,
    per_token_divergence,
    token_stats,
    top_fraction_mask,
)
from .errors import UserError
from .evaluate import EvalSettings, evaluate
from .files import append_jsonl, atomic_write_text, write_json, write_jsonl
from .judges import load_judge
from .models import LoraSettings, add_lora, chat_text, load_model, resolve_device, save_model
from .objectives import clipped_reward_step
from .precision import autocast, resolve_precision
from .rollout import SamplingSettings, generate, stop_token_ids
from .scoring import response_logits
from .teachers import FrozenBase, Item


def training_items(cfg: RunConfig, manifest: Manifest) -> list[Item]:
    """Harmful and benign prompts from the TRAIN side of the split the evaluation holds out."""
    items = []
    n_benign = (
        cfg.n_benign if cfg.benign_ratio is None else round(cfg.n_harmful * cfg.benign_ratio / (1 - cfg.benign_ratio))
    )
    for source, n, group in (
        (cfg.harmful_source, cfg.n_harmful, "harmful"),
        (cfg.benign_source, n_benign, "benign"),
    ):
        if n <= 0:
            continue
        train, _ = split_records(load_prompts(source, manifest), seed=cfg.split_seed)
        picked = take(train, n, seed=cfg.seed)
        if len(picked) < n:
            print(
                f"note: {source} has only {len(picked)} training prompts (asked for {n})",
                file=sys.stderr,
            )
        items += [Item(r.id, r.prompt, group) for r in picked]
    if not items:
        raise UserError("no training prompts")
    return items


def batch_for_step(items: list, step: int, micro: int, cfg: RunConfig) -> list:
    """Deterministic in (seed, step): a fresh seeded permutation per epoch, so a resumed run
    sees exactly the batches the uninterrupted one would have."""
    per_step = cfg.batch_size
    start = (step * cfg.grad_accum + micro) * per_step
    epoch, offset = divmod(start, len(items))
    order = list(range(len(items)))
    random.Random(cfg.seed * 7919 + epoch).shuffle(order)
    picked = []
    while len(picked) < per_step:
        if offset >= len(order):
            epoch, offset = epoch + 1, 0
            order = list(range(len(items)))
            random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        picked.append(items[order[offset]])
        offset += 1
    return picked


def eval_settings(cfg: RunConfig) -> EvalSettings:
    return EvalSettings(
        harmful=cfg.harmful_source,
        benign=cfg.benign_source,
        overrefusal=cfg.eval_overrefusal,
        generalization=cfg.eval_generalization,
        capability=cfg.capability,
        limit=cfg.eval_limit,
        seed=cfg.eval_seed,
        split_seed=cfg.split_seed,
        judge=cfg.judge,
    )


def run_eval(
    model, tok, cfg: RunConfig, out: Path, name: str, adapter_note: str | None, *, progress: bool = True
) -> dict:
    path = out / f"eval_{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    if progress:
        print(f"evaluating {'base' if name == 'base' else 'trained'} model", flush=True)
    results, generations = evaluate(
        model,
        tok,
        load_judge(cfg.judge),
        eval_settings(cfg),
        model_name=cfg.model,
        adapter=adapter_note,
        progress=progress,
    )
    write_jsonl(out / f"generations_{name}.jsonl", generations)
    write_json(path, results)
    return results


class OnPolicyStep:
    """Steps 2-6 of DESIGN.md's on-policy step for one micro-batch; returns (loss, metrics)."""

    def __init__(self, cfg: RunConfig, tok, teacher, judge, *, vocab_ids: torch.Tensor | None = None):
        self.cfg, self.tok, self.teacher, self.judge = cfg, tok, teacher, judge
        # The frozen base for objective=clipped_reward's KL term: the teacher's base unless it names another.
        self.reference = getattr(teacher, "reference", None) or getattr(teacher, "base", None)
        self.probe = CollapseProbe(cfg, tok, judge) if cfg.diagnostics_every else None
        self.vocab_ids = vocab_ids if cfg.vocab_mask == "safety_tokens" else None
        if cfg.vocab_mask == "safety_tokens" and vocab_ids is None:
            raise ValueError("vocab_mask=safety_tokens needs the safety token ids")
        self.stops = stop_token_ids(tok)
        self.kl_sum = torch.zeros(cfg.max_new_tokens + 1)
        self.kl_count = torch.zeros(cfg.max_new_tokens + 1)
        self.generate = generate
        if cfg.rollout_backend == "merged":
            from .merged_rollout import MergedRollouts

            self.generate = MergedRollouts(cfg.precision)
        elif cfg.rollout_backend == "vllm":
            from .vllm_rollout import vllm_generate_or_none

            self.generate = vllm_generate_or_none(cfg) or generate

    def __call__(self, model, batch: list[Item], step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        items = [it for it in batch for _ in range(cfg.rollouts_per_prompt)]
        diag = self.probe(model, self.teacher) if self.probe and micro == 0 and self.probe.due(step) else {}
        t0 = time.perf_counter()
        sampling = SamplingSettings(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=len(items),
            seed=cfg.seed * 1_000_003 + step * 101 + micro,
        )
        model.eval()
        device = next(model.parameters()).device
        precision = resolve_precision(cfg.precision, device)
        rollouts, gen = self.generate(
            model,
            self.tok,
            [chat_text(self.tok, it.prompt) for it in items],
            sampling,
            progress=False,
        )
        # The stop token is part of what the student must learn to produce.
        responses = [r.response_ids + ([self.stops[0]] if r.finished else []) for r in rollouts]
        responses = [r if r else [self.stops[0]] for r in responses]
        t1 = time.perf_counter()
        with autocast(precision, device):
            teacher_logits = self.teacher.logits(model, items, responses)
        t2 = time.perf_counter()
        model.train()
        prompts = [r.prompt_ids for r in rollouts]
        with autocast(precision, device):
            student_logits, mask = response_logits(model, prompts, responses, pad_id=self.tok.pad_token_id)
        tokens = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for i, r in enumerate(responses):
            tokens[i, : len(r)] = torch.tensor(r)
        if cfg.objective == "clipped_reward":
            per_token, extra = clipped_reward_step(
                cfg,
                model,
                self.reference,
                prompts,
                responses,
                student_logits,
                teacher_logits,
                tokens,
                mask,
                pad_id=self.tok.pad_token_id,
            )
        else:
            extra = {}
            per_token = per_token_divergence(
                student_logits,
                teacher_logits,
                cfg.divergence,
                tokens=tokens,
                alpha=cfg.alpha,
                beta=cfg.beta,
                top_k=None if cfg.divergence == "sampled" or self.vocab_ids is not None else cfg.top_k,
                vocab_ids=self.vocab_ids,
            )
        # A loss over a few ids can shrink mass instead of moving it: watch entropy and mass on S.
        stats = token_stats(student_logits, teacher_logits, tokens, self.vocab_ids)
        reverse_kl = stats["reverse_kl"]
        if cfg.token_mask == "first_k":
            loss_mask = first_k_mask(mask, cfg.mask_k)
        elif cfg.token_mask == "top_fraction":
            loss_mask = top_fraction_mask(reverse_kl, mask, fraction=cfg.mask_fraction)
        elif cfg.token_mask == "threshold":
            loss_mask = top_fraction_mask(reverse_kl, mask, threshold=cfg.mask_threshold)
        else:
            loss_mask = mask
        loss = masked_mean(per_token, loss_mask)
        t3 = time.perf_counter()
        width = min(mask.size(1), self.kl_sum.numel())
        self.kl_sum[:width] += (reverse_kl * mask)[:, :width].sum(0).cpu()
        self.kl_count[:width] += mask[:, :width].sum(0).cpu()
        n_tok = int(mask.sum())
        harmful = [i for i, it in enumerate(items) if it.group == "harmful"]
        refused = sum(self.judge.is_refusal(rollouts[i].text) for i in harmful)
        if self.vocab_ids is not None:
            extra["student_mass_on_s"] = float(masked_mean(stats["mass_on_ids"], mask))
        return loss, {
            "loss": loss.item(),
            "student_entropy": float(masked_mean(stats["student_entropy"], mask)),
            "mean_kl": float(masked_mean(reverse_kl, mask)),
            "sampled_kl": float(masked_mean(stats["token_kl"], mask)),
            "masked_fraction": float(loss_mask.sum() / mask.sum()),
            "rollout_length": n_tok / len(items),
            "student_refusal_rate": refused / len(harmful) if harmful else 0.0,
            "tokens": n_tok,
            "rollout_tokens_per_s": gen.tokens_per_s,
            "t_rollout": t1 - t0,
            "t_teacher": t2 - t1,
            "t_student": t3 - t2,
            "teacher_entropy": float(masked_mean(stats["teacher_entropy"], mask)),
            "rollout_distinct_2": text_stats([r.text for r in rollouts], [len(r) for r in responses])["distinct_2"],
            **extra,
            **diag,
        }

    def kl_by_position(self) -> list[float]:
        return (self.kl_sum / self.kl_count.clamp(min=1)).tolist()


def make_scheduler(optimizer, cfg: RunConfig):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = int(round(cfg.warmup_ratio * cfg.steps))
    if cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def finished_run(cfg: RunConfig, out: Path) -> dict | None:
    """{'base', 'final'} of a run in `out` that already ran to its final eval with these settings,
    read from disk so that re-running a comparison does not reload the model for it; else None."""
    files = [out / "config.yaml", out / "eval_base.json", out / "eval_final.json"]
    if not cfg.eval or not all(f.is_file() for f in files) or not same_settings(files[0].read_text(), cfg):
        return None
    return {"base": json.loads(files[1].read_text()), "final": json.loads(files[2].read_text())}


def prepare_out(out: Path, cfg: RunConfig, resume: bool) -> None:
    if (out / "config.yaml").exists() and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and (out / "config.yaml").exists() and not same_settings((out / "config.yaml").read_text(), cfg):
        raise UserError(f"{out}/config.yaml differs from this run's config; resume with the same settings")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))


def train(cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole run. Returns {'base': eval, 'final': eval} (either None when cfg.eval is off)."""
    from . import methods

    out = Path(out)
    procs = Processes(resolve_device(cfg.device))
    procs.check(cfg.batch_size)
    progress = progress and procs.is_main
    if procs.is_main:
        prepare_out(out, cfg, resume)
    procs.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    manifest = Manifest()
    model, tok = load_model(cfg.model, device=procs.device)
    judge = load_judge(cfg.judge)
    started = time.perf_counter()

    base_eval = run_eval(model, tok, cfg, out, "base", None, progress=progress) if cfg.eval and procs.is_main else None

    # Method-specific preparation: a teacher for on-policy runs, targets for SFT runs.
    with procs.main_first():  # process 0 writes the caches (flip rates, targets) the others read
        prepared = methods.prepare(cfg, model, tok, judge, manifest, out, progress=progress)
    if procs.is_main:
        write_json(out / "manifest.json", manifest.to_list())

    if cfg.lora:
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    if cfg.trainer == "onpolicy":
        teacher = methods.build_teacher(cfg, FrozenBase(model, share_weights=cfg.lora), tok, prepared)
        masks = {"vocab_ids": prepared["vocab_ids"]} if cfg.vocab_mask == "safety_tokens" else {}
        step_fn = OnPolicyStep(cfg, tok, teacher, judge, **masks)
        data = prepared["items"]
    else:
        from .sft import SFTStep

        step_fn = SFTStep(cfg, tok)
        data = prepared["targets"]

    params = [p for p in model.parameters() if p.requires_grad]
    procs.broadcast_(params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    start = 0
    metrics_path = out / "metrics.jsonl"
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        start = meta["step"]
        if hasattr(step_fn, "kl_sum") and "kl_sum" in meta["extra"]:
            step_fn.kl_sum = torch.tensor(meta["extra"]["kl_sum"])
            step_fn.kl_count = torch.tensor(meta["extra"]["kl_count"])
        print(f"resuming from {ckpt.name}", file=sys.stderr)
    # Metrics past the checkpoint belong to the step that was lost; it is redone.
    if metrics_path.exists() and procs.is_main:
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))

    bar = tqdm(
        range(start, cfg.steps),
        desc=f"{cfg.preset} training",
        initial=start,
        total=cfg.steps,
        disable=not progress,
    )
    for step in bar:
        t0 = time.perf_counter()
        logs: list[dict] = []
        for micro in range(cfg.grad_accum):
            loss, info = step_fn(model, procs.shard(batch_for_step(data, step, micro, cfg)), step, micro)
            (loss / cfg.grad_accum).backward()
            logs.append(info)
        procs.average_gradients_(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        # Some figures (the collapse probe) come from the first micro-batch only.
        keys = dict.fromkeys(k for d in logs for k in d)
        row = procs.average_metrics({k: sum(d[k] for d in logs if k in d) / sum(k in d for d in logs) for k in keys})
        row.update(
            step=step + 1,
            lr=scheduler.get_last_lr()[0],
            grad_norm=float(grad_norm),
            step_seconds=seconds,
            tokens_per_s=sum(d["tokens"] for d in logs) / seconds,
            wall_time=time.perf_counter() - started,
        )
        bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row.get('mean_kl', 0):.3f}")
        if not procs.is_main:
            continue
        append_jsonl(metrics_path, row)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            extra = {}
            if hasattr(step_fn, "kl_sum"):
                extra = {"kl_sum": step_fn.kl_sum.tolist(), "kl_count": step_fn.kl_count.tolist()}
            save_checkpoint(
                out / "checkpoints" / f"step-{step + 1}",
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                step=step + 1,
                extra=extra,
            )
    bar.close()
    procs.barrier()
    if not procs.is_main:
        return {"base": None, "final": None, "config": asdict(cfg)}

    if hasattr(step_fn, "kl_by_position"):
        write_json(out / "kl_by_position.json", step_fn.kl_by_position())
    model.eval()
    if not (out / "final").exists():
        save_model(model, tok, out / "final")
    if cfg.lora:
        model = model.merge_and_unload()  # same function, no adapter overhead in the final eval
    adapter_note = str(out / "final") if cfg.lora else None
    final_eval = run_eval(model, tok, cfg, out, "final", adapter_note, progress=progress) if cfg.eval else None

    from .report import run_report

    atomic_write_text(out / "report.md", run_report(out, cfg, base_eval, final_eval))
    return {"base": base_eval, "final": final_eval, "config": asdict(cfg)}
