"""One OPSA step, safedistill against TRL, at the same settings: on-policy rollouts, the frozen
base model as teacher with a privileged context, full-vocabulary reverse KL, LoRA.

Compared in one run on the same model, prompts, contexts, batch, max_new_tokens, LoRA and
divergence:
  - safedistill's OnPolicyStep (the trainer's step) and an optimizer step;
  - TRL `experimental.sdft.SDFTTrainer` (teacher_model_kind="base", privileged_context column,
    distillation_mode="full_logits", distillation_alpha=1 = reverse KL, no IS clipping);
  - TRL `DistillationTrainer` (beta=1, reverse KL) for reference: its teacher is a separate copy
    of the base model and sees no context (TRL's trainer has no privileged-context input).
Both teachers see the context in the user turn ahead of the prompt (TRL's teacher_prompt_template
"{privileged_context}\\n\\n{prompt}"); sampling temperature 1 (TRL divides logits by it).

First the two losses are computed on one fixed set of rollouts from the untrained model
(LoRA B = 0, so both students are the base model): they must agree. Then each trainer runs
--steps optimizer steps; the first is a warm-up and the rest are timed per phase (rollout,
teacher, student forward+backward). Ablations then time single phases on fixed rollouts (teacher
prefix cache, logits only at response positions, bf16 autocast, rollout settings).

    python bench/step.py --tiny                  # smoke run on a tiny random model (seconds)
    python bench/step.py                         # smollm2-135m-instruct, batch 8, 48 new tokens
    python bench/step.py --model DIR_OR_HF_ID --batch 16 --max-new-tokens 128

TRL is a benchmark-only dependency (`pip install -e .[bench]`); without it only safedistill runs.
Writes bench/results/step-<device>[-tiny].json (see bench/peak.py to rate phases against the peak).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safedistill.config import RunConfig  # noqa: E402
from safedistill.data.sources import load_prompts  # noqa: E402
from safedistill.data.splits import split_records, take  # noqa: E402
from safedistill.engine import rollout as rollout_mod  # noqa: E402
from safedistill.engine import scoring  # noqa: E402
from safedistill.engine.merged import MergedRollouts  # noqa: E402
from safedistill.engine.precision import autocast, resolve_precision  # noqa: E402
from safedistill.engine.rollout import SamplingSettings, encode_prompts, generate  # noqa: E402
from safedistill.engine.scoring import response_logits  # noqa: E402
from safedistill.eval.judging import load_judge  # noqa: E402
from safedistill.losses.divergence import masked_mean, per_token_divergence  # noqa: E402
from safedistill.models import LoraSettings, add_lora, chat_text, load_model, resolve_model  # noqa: E402
from safedistill.teachers import ContextTeacher, FrozenBase, Item  # noqa: E402
from safedistill.teachers.context import context_text, load_contexts  # noqa: E402
from safedistill.train import OnPolicyStep  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from peak import measure_peaks  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TEMPLATE = "{privileged_context}\n\n{prompt}"


class TemplateTeacher(ContextTeacher):
    """The context teacher with TRL SDFT's prompt layout: one user turn, context then prompt (the
    cached prefix follows from prompt_text)."""

    def _text(self, prompt: str, ctx: str) -> str:
        return chat_text(self.tokenizer, TEMPLATE.format(privileged_context=ctx, prompt=prompt))

    def prompt_text(self, item: Item) -> str:
        return self._text(item.prompt, self.contexts[item.group])


# --------------------------------------------------------------------------- setup


def build_setup(args) -> dict:
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import save_compact
        from helpers import BENIGN, HARMFUL

        model_dir = str(save_compact(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "model"))
        harmful, benign = HARMFUL, BENIGN
        contexts = {"harmful": "Refuse requests that could hurt someone.", "benign": "Be helpful and answer briefly."}
    else:
        model_dir = without_gguf_flag(resolve_model(args.model))
        train_h, _ = split_records(load_prompts("advbench"), seed=0)
        train_b, _ = split_records(load_prompts("benign"), seed=0)
        harmful = [r.prompt for r in take(train_h, args.batch, seed=0)]
        benign = [r.prompt for r in take(train_b, args.batch, seed=0)]
        library = load_contexts("builtin")
        contexts = {"harmful": context_text(args.context, library), "benign": context_text("ctx-b01", library)}
    n_h = (args.batch + 1) // 2
    items = [Item(f"h{i}", p, "harmful") for i, p in enumerate(harmful[:n_h])]
    items += [Item(f"b{i}", p, "benign") for i, p in enumerate(benign[: args.batch - n_h])]
    return {"model_dir": model_dir, "items": items, "contexts": contexts}


def without_gguf_flag(model_dir: str) -> str:
    """The bundled model is converted from GGUF to float32 safetensors but its config keeps the GGUF
    quantization_config, which makes transformers' Trainer (hence TRL) refuse to train it. Both
    trainers get the same directory with that entry dropped (weights linked, not copied)."""
    path = Path(model_dir)
    if not path.is_dir():
        return model_dir
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return model_dir
    out = Path(tempfile.mkdtemp(prefix="bench-model-"))
    for f in path.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


def run_config(args, precision: str) -> RunConfig:
    return RunConfig(
        divergence="reverse_kl",
        top_k=None,
        token_mask="all",
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        learning_rate=args.lr,
        precision=precision,
        rollout_backend=args.rollout_backend,
        seed=0,
    )


def load_student(setup, args):
    torch.manual_seed(0)
    model, tok = load_model(setup["model_dir"])
    return add_lora(model, LoraSettings(r=args.lora_r, alpha=args.lora_alpha)), tok


def matmul_params(model) -> int:
    """Parameters of every Linear (LoRA's included), i.e. those that cost FLOPs per token."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@contextlib.contextmanager
def logits_everywhere(on: bool):
    """Switch off the 'logits only at response positions' path (the before-state)."""
    if not on:
        yield
        return
    real = scoring.accepts_logits_to_keep, scoring.takes_position_index
    scoring.accepts_logits_to_keep = scoring.takes_position_index = lambda model: False
    try:
        yield
    finally:
        scoring.accepts_logits_to_keep, scoring.takes_position_index = real


def summarize(steps: list[dict]) -> dict:
    timed = steps[1:] or steps  # the first step is a warm-up
    keys = [k for k in timed[0] if isinstance(timed[0][k], int | float)]
    return {k: statistics.mean(s[k] for s in timed) for k in keys}


def phase_floors(run: dict, settings: dict, peaks: dict) -> dict:
    """The least time each phase of `run` could take on this machine (bench/peak.py's measured
    peaks): the rollout reads every weight once per decode step (max_new_tokens steps x the
    weights' bytes / the rate a batch-8 matmul streams them); the teacher and student phases do
    2N and 4N FLOPs per token they compute (N matmul parameters; LoRA leaves the frozen weights
    without weight gradients) at the matmul peak. Fractions are floor / measured time."""
    p, n = run["phases"], settings["matmul_params"]
    peak = peaks[run["precision"]]
    nbytes = n * (2 if run["precision"] == "bf16" else 4)
    floors = {
        "rollout": settings["max_new_tokens"] * nbytes / peak["weight_bytes_per_s"],
        "teacher": 2 * n * p.get("tokens_teacher", 0) / peak["peak_flops"],
        "student": 4 * n * p.get("tokens_student", 0) / peak["peak_flops"],
    }
    return {
        phase: {"floor_s": f, "of_floor": f / p[f"t_{phase}"] if p.get(f"t_{phase}") else None}
        for phase, f in floors.items()
    }


# --------------------------------------------------------------------------- safedistill


def safedistill_steps(setup, args, precision: str) -> dict:
    model, tok = load_student(setup, args)
    cfg = run_config(args, precision)
    teacher = TemplateTeacher(FrozenBase(model, share_weights=True), tok, setup["contexts"])
    step_fn = OnPolicyStep(cfg, tok, teacher, load_judge("keyword"))
    captured = {}
    real_generate = step_fn.generate

    def generate_spy(*a, **kw):
        captured["rollouts"] = real_generate(*a, **kw)
        return captured["rollouts"]

    step_fn.generate = generate_spy
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    rows = []
    for s in range(args.steps):
        t0 = time.perf_counter()
        loss, info = step_fn(model, setup["items"], s, 0)
        tb = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter() - tb
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        rollouts, gen = captured["rollouts"]
        resp = [len(r.response_ids) + r.finished for r in rollouts]
        prefix = {g: len(teacher.prefix(g)) for g in teacher.contexts}
        t_prompts = encode_prompts(tok, [teacher.prompt_text(it) for it in setup["items"]])
        rows.append(
            {
                "step_seconds": total,
                "loss": loss.item(),
                "t_rollout": info["t_rollout"],
                "t_teacher": info["t_teacher"],
                "t_student": info["t_student"] + t_bwd,
                "response_tokens": sum(resp),
                "tokens_rollout": gen.new_tokens,
                "tokens_teacher": sum(
                    len(p) - prefix[it.group] + n for p, it, n in zip(t_prompts, setup["items"], resp, strict=True)
                ),
                # Tokens the student pass computes: its shared prompt prefix runs once, not per row.
                "tokens_student": sum(len(r.prompt_ids) + n for r, n in zip(rollouts, resp, strict=True))
                - (len(rollouts) - 1) * scoring.shared_prefix_length([r.prompt_ids for r in rollouts]),
            }
        )
        print(f"  safedistill[{precision}] step {s + 1}: {total:.2f}s loss {loss.item():.4f}", file=sys.stderr)
    return {"name": f"safedistill ({precision})", "precision": precision, "steps": rows, "phases": summarize(rows)}


def safedistill_loss(setup, args, rollouts) -> float:
    """safedistill's loss on fixed rollouts (float32), as OnPolicyStep computes it."""
    model, tok = load_student(setup, args)
    teacher = TemplateTeacher(FrozenBase(model, share_weights=True), tok, setup["contexts"])
    responses = [r["response"] for r in rollouts]
    t_logits = teacher.logits(model, setup["items"], responses)
    s_logits, mask = response_logits(model, [r["prompt"] for r in rollouts], responses, pad_id=tok.pad_token_id)
    return masked_mean(per_token_divergence(s_logits, t_logits, "reverse_kl"), mask).item()


def fixed_rollouts(setup, args) -> list[dict]:
    model, tok = load_student(setup, args)
    texts = [chat_text(tok, it.prompt) for it in setup["items"]]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=args.batch, seed=123)
    rollouts, _ = generate(model, tok, texts, settings, progress=False)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    stop = stop if isinstance(stop, int) and stop >= 0 else tok.eos_token_id
    return [
        {"prompt": r.prompt_ids, "response": (r.response_ids + [stop] if r.finished else r.response_ids) or [stop]}
        for r in rollouts
    ]


# --------------------------------------------------------------------------- TRL


def trl_dataset(setup, with_context: bool):
    from datasets import Dataset

    rows = []
    for it in setup["items"]:
        row = {"prompt": [{"role": "user", "content": it.prompt}]}
        if with_context:
            row["privileged_context"] = setup["contexts"][it.group]
        rows.append(row)
    return Dataset.from_list(rows)


def trl_common(args, precision: str, out: str) -> dict:
    return dict(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        # TRL turns activation checkpointing on by default; safedistill does not recompute
        # activations, so the reference keeps them too (its default would cost it a forward pass).
        gradient_checkpointing=False,
    )


def lora_config(args):
    from peft import LoraConfig

    s = LoraSettings(r=args.lora_r, alpha=args.lora_alpha)
    return LoraConfig(
        r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=s.target_modules, task_type="CAUSAL_LM"
    )


def sdft_trainer(setup, args, precision: str):
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    _, tok = load_model(setup["model_dir"])
    config = SDFTConfig(
        **trl_common(args, precision, tempfile.mkdtemp(prefix="bench-sdft-")),
        num_generations=1,
        teacher_model_kind="base",
        distillation_mode="full_logits",
        distillation_alpha=1.0,  # reverse KL
        distillation_is_clip=None,
        teacher_prompt_template=TEMPLATE,
        max_prompt_length=None,
    )
    return SDFTTrainer(
        model=setup["model_dir"],
        args=config,
        train_dataset=trl_dataset(setup, with_context=True),
        processing_class=tok,
        peft_config=lora_config(args),
    )


def distillation_trainer(setup, args, precision: str):
    from trl import DistillationConfig, DistillationTrainer

    _, tok = load_model(setup["model_dir"])
    config = DistillationConfig(**trl_common(args, precision, tempfile.mkdtemp(prefix="bench-distill-")), beta=1.0)
    return DistillationTrainer(
        model=setup["model_dir"],
        teacher_model=setup["model_dir"],
        args=config,
        train_dataset=trl_dataset(setup, with_context=False),
        processing_class=tok,
        peft_config=lora_config(args),
    )


def sdft_loss(trainer, setup, rollouts) -> tuple[float, float, bool]:
    """TRL's loss on the same fixed rollouts: (token mean, TRL's per-sequence mean, prompts equal)."""
    from trl.trainer.utils import pad

    prompts = [[{"role": "user", "content": it.prompt}] for it in setup["items"]]
    contexts = [setup["contexts"][it.group] for it in setup["items"]]
    prompt_ids = trainer._tokenize_prompts(prompts)
    same_prompts = [list(p) for p in prompt_ids] == [r["prompt"] for r in rollouts]
    pid = [torch.tensor(p) for p in prompt_ids]
    cid = [torch.tensor(r["response"]) for r in rollouts]
    pad_id = trainer._tokenizer.pad_token_id
    inputs = {
        "prompt_ids": pad(pid, padding_value=pad_id, padding_side="left"),
        "prompt_mask": pad([torch.ones_like(t) for t in pid], padding_value=0, padding_side="left"),
        "completion_ids": pad(cid, padding_value=pad_id, padding_side="right"),
        "completion_mask": pad([torch.ones_like(t) for t in cid], padding_value=0, padding_side="right"),
    }
    inputs.update(
        trainer.teacher_context_builder.build(prompts, contexts, inputs["completion_ids"], inputs["completion_mask"])
    )
    device = trainer.accelerator.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    trainer.model.train()
    with torch.no_grad():
        logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, inputs)
        seq_mean = trainer._compute_self_distillation_loss(trainer.model, inputs, logits)
    token_mean = trainer._metrics["train"]["self_distillation/distillation_loss"].pop()
    return float(token_mean), float(seq_mean), same_prompts


class PhaseTimer:
    """Times a TRL trainer's phases by wrapping its methods (no change to what they compute)."""

    def __init__(self, trainer, kind: str):
        self.trainer, self.kind, self.cur, self.rows = trainer, kind, None, []
        trainer._generate = self._timed(trainer._generate, "t_rollout")
        trainer.compute_loss = self._timed(trainer.compute_loss, "t_loss", inputs_arg=True)
        acc = trainer.accelerator
        acc.backward = self._timed(acc.backward, "t_backward")
        if kind == "sdft":
            trainer._forward_logits = self._timed_forward(trainer._forward_logits)
        else:
            teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
            teacher.register_forward_pre_hook(lambda m, a: self._mark("teacher_start"))
            teacher.register_forward_hook(
                lambda m, a, o: self._add("t_teacher", time.perf_counter() - self.cur["teacher_start"])
            )
        timer = self

        from transformers import TrainerCallback

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.cur = {"t0": time.perf_counter()}

            def on_step_end(self, args, state, control, **kw):
                row = timer.cur
                row["step_seconds"] = time.perf_counter() - row.pop("t0")
                row.pop("teacher_start", None)
                timer.rows.append(row)
                print(f"  {kind} step {len(timer.rows)}: {row['step_seconds']:.2f}s", file=sys.stderr)

        trainer.add_callback(Steps())

    def _mark(self, key):
        if self.cur is not None:
            self.cur[key] = time.perf_counter()

    def _add(self, key, value):
        if self.cur is not None:
            self.cur[key] = self.cur.get(key, 0.0) + value

    def _timed(self, fn, key, inputs_arg=False):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self._add(key, time.perf_counter() - t0)
            if inputs_arg and self.cur is not None:
                inputs = a[1] if len(a) > 1 else kw["inputs"]
                cm, pm = inputs["completion_mask"], inputs["prompt_mask"]
                self.cur["response_tokens"] = int(cm.sum())
                self.cur["tokens_rollout"] = int(cm.sum())
                self.cur["tokens_student"] = int(cm.sum() + pm.sum())
                tm = inputs.get("teacher_attention_mask")
                self.cur["tokens_teacher"] = int(tm.sum()) if tm is not None else int(cm.sum() + pm.sum())
            return out

        return wrapped

    def _timed_forward(self, fn):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if not torch.is_grad_enabled():
                self._add("t_teacher", time.perf_counter() - t0)
            return out

        return wrapped

    def result(self, name: str, precision: str) -> dict:
        for r in self.rows:
            r["t_student"] = r.get("t_loss", 0.0) - r.get("t_teacher", 0.0) + r.get("t_backward", 0.0)
        return {"name": name, "precision": precision, "steps": self.rows, "phases": summarize(self.rows)}


def run_trl(kind: str, setup, args, precision: str) -> dict:
    trainer = (sdft_trainer if kind == "sdft" else distillation_trainer)(setup, args, precision)
    timer = PhaseTimer(trainer, kind)
    trainer.train()
    name = "TRL SDFTTrainer" if kind == "sdft" else "TRL DistillationTrainer"
    return timer.result(f"{name} ({precision})", precision)


# --------------------------------------------------------------------------- ablations


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ablations(setup, args, rollouts, precisions) -> list[dict]:
    """Single phases on fixed rollouts, each setting against its before-state."""
    model, tok = load_student(setup, args)
    items, responses = setup["items"], [r["response"] for r in rollouts]
    prompts = [r["prompt"] for r in rollouts]
    device = next(model.parameters()).device
    rows = []

    def teacher_phase(use_cache, precision):
        teacher = TemplateTeacher(FrozenBase(model, share_weights=True), tok, setup["contexts"], use_cache=use_cache)
        with autocast(precision, device):
            teacher.logits(model, items, responses)  # warm-up (and the prefix cache)
        return timed(lambda: _under(precision, device, lambda: teacher.logits(model, items, responses)), args.repeat)

    def student_phase(keep, precision, share=True):
        def once():
            model.train()
            with logits_everywhere(not keep), autocast(precision, device):
                s_logits, mask = response_logits(model, prompts, responses, pad_id=tok.pad_token_id, share_prefix=share)
            loss = masked_mean(per_token_divergence(s_logits, s_logits.detach() * 0.5, "reverse_kl"), mask)
            loss.backward()
            model.zero_grad(set_to_none=True)

        once()
        return timed(once, args.repeat)

    for precision in precisions:
        rows.append(
            {
                "phase": "teacher",
                "setting": f"context prefix KV cache ({precision})",
                "before_s": teacher_phase(False, precision),
                "after_s": teacher_phase(True, precision),
            }
        )
        rows.append(
            {
                "phase": "student fwd+bwd",
                "setting": f"logits only at response positions ({precision})",
                "before_s": student_phase(False, precision),
                "after_s": student_phase(True, precision),
            }
        )
        rows.append(
            {
                "phase": "student fwd+bwd",
                "setting": f"prompts' shared prefix run once, with gradient ({precision})",
                "before_s": student_phase(True, precision, share=False),
                "after_s": student_phase(True, precision),
            }
        )
    if "bf16" in precisions:
        rows.append(
            {
                "phase": "teacher",
                "setting": "bf16 autocast (cached prefix)",
                "before_s": teacher_phase(True, "fp32"),
                "after_s": teacher_phase(True, "bf16"),
            }
        )
        rows.append(
            {
                "phase": "student fwd+bwd",
                "setting": "bf16 autocast",
                "before_s": student_phase(True, "fp32"),
                "after_s": student_phase(True, "bf16"),
            }
        )
    texts = [chat_text(tok, it.prompt) for it in items]

    def rollout(batch_size, **kw):
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=batch_size, seed=1)
        model.eval()
        return timed(lambda: generate(model, tok, texts, settings, progress=False, **kw), 1)

    def merged(precision):
        rollouts = MergedRollouts(precision)
        rollouts.refresh(model)
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=args.batch, seed=1)
        return timed(lambda: rollouts(model, tok, texts, settings, progress=False), 1)

    def without_prefix_cache():
        real = scoring.MIN_SHARED_PREFIX
        scoring.MIN_SHARED_PREFIX = 10**9
        try:
            return rollout(args.batch)
        finally:
            scoring.MIN_SHARED_PREFIX = real

    def transformers_generate():
        """The before-state of the decode loop: `model.generate` on the same left-padded batch."""
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        stops = rollout_mod.stop_token_ids(tok, model)
        kw = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        model.eval()
        return timed(lambda: model.generate(**enc, **kw, eos_token_id=stops, pad_token_id=tok.pad_token_id), 1)

    def full_length(fn, fast: bool):
        """`fn` with no stop tokens (every row decodes max_new_tokens), with the decode step of
        engine/decode.py or (fast=False) the transformers forward at every step."""
        stops, of = rollout_mod.stop_token_ids, rollout_mod.FastDecoder.of
        rollout_mod.stop_token_ids = lambda tok, model=None: [-1]
        if not fast:
            rollout_mod.FastDecoder.of = staticmethod(lambda model: None)
        try:
            return fn()
        finally:
            rollout_mod.stop_token_ids, rollout_mod.FastDecoder.of = stops, of

    for name, fn in [("LoRA student", lambda: rollout(args.batch))] + [
        (f"merged {p} copy", lambda p=p: merged(p)) for p in precisions
    ]:
        rows.append(
            {
                "phase": "rollout",
                "setting": f"decode step, not the transformers forward ({name})",
                "before_s": full_length(fn, fast=False),
                "after_s": full_length(fn, fast=True),
            }
        )
    batched = rollout(args.batch)
    rows.append(
        {
            "phase": "rollout",
            "setting": f"batched generation (1 -> {args.batch} sequences per call)",
            "before_s": rollout(1),
            "after_s": batched,
        }
    )
    rows.append(
        {
            "phase": "rollout",
            "setting": "decode loop, not transformers generate (no prefix cache)",
            "before_s": _no_stops(model, tok, transformers_generate),
            "after_s": _no_stops(model, tok, without_prefix_cache),
        }
    )
    rows.append(
        {
            "phase": "rollout",
            "setting": "KV cache of the prompts' shared prefix",
            "before_s": without_prefix_cache(),
            "after_s": batched,
        }
    )
    for precision in precisions:
        rows.append(
            {
                "phase": "rollout",
                "setting": f"LoRA merged into a {precision} copy",
                "before_s": batched,
                "after_s": merged(precision),
            }
        )
    return rows


def _no_stops(model, tok, fn):
    """Run `fn` with the stop tokens' logits pushed down, so that every row decodes all
    max_new_tokens whatever the sampler draws (two samplers compared at equal length)."""
    stops = rollout_mod.stop_token_ids(tok, model)
    head = model.get_output_embeddings()

    def push_down(module, args, out):
        out[..., stops] = -1e4
        return out

    hook = head.register_forward_hook(push_down)
    try:
        return fn()
    finally:
        hook.remove()


def _under(precision, device, fn):
    with autocast(precision, device):
        return fn()


# --------------------------------------------------------------------------- main


def numerics(setup, args, rollouts) -> dict:
    """bf16 autocast against float32 on the fixed rollouts: loss and its gradient."""
    out = {}
    for precision in ("fp32", "bf16"):
        model, tok = load_student(setup, args)
        with torch.no_grad():  # a non-zero adapter, so the gradient reaches both LoRA factors
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        teacher = TemplateTeacher(FrozenBase(model, share_weights=True), tok, setup["contexts"])
        device = next(model.parameters()).device
        responses = [r["response"] for r in rollouts]
        with autocast(precision, device):
            t_logits = teacher.logits(model, setup["items"], responses)
            s_logits, mask = response_logits(model, [r["prompt"] for r in rollouts], responses, pad_id=tok.pad_token_id)
        loss = masked_mean(per_token_divergence(s_logits, t_logits, "reverse_kl"), mask)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        out[precision] = (loss.item(), grad)
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    return {
        "loss_fp32": l32,
        "loss_bf16": l16,
        "loss_rel_diff": abs(l16 - l32) / abs(l32),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
        "grad_norm_ratio": float(g16.norm() / g32.norm()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and few tokens: a smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--context", default="ctx-h04", help="harmful-side context id (benign side: ctx-b01)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per trainer; the first is a warm-up")
    parser.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16, auto")
    parser.add_argument("--repeat", type=int, default=2, help="ablations: best of this many")
    parser.add_argument("--rollout-backend", default="merged", help="safedistill's rollout_backend: hf or merged")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--distill-all", action="store_true", help="time TRL DistillationTrainer at every precision")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.max_new_tokens = min(args.max_new_tokens, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = list(dict.fromkeys(resolve_precision(p.strip(), device) for p in args.precision.split(",")))
    have_trl = importlib.util.find_spec("trl") is not None and not args.skip_trl
    setup = build_setup(args)
    print(f"model {setup['model_dir']}, batch {args.batch}, max_new_tokens {args.max_new_tokens}", file=sys.stderr)

    rollouts = fixed_rollouts(setup, args)
    check = {"safedistill_loss": safedistill_loss(setup, args, rollouts)}
    if have_trl:
        trainer = sdft_trainer(setup, args, "fp32")
        check["trl_sdft_loss_token_mean"], check["trl_sdft_loss_sequence_mean"], check["same_prompt_ids"] = sdft_loss(
            trainer, setup, rollouts
        )
        check["rel_diff"] = abs(check["trl_sdft_loss_token_mean"] - check["safedistill_loss"]) / abs(
            check["safedistill_loss"]
        )
        del trainer

    runs = []
    for i, precision in enumerate(precisions):
        runs.append(safedistill_steps(setup, args, precision))
        if have_trl:
            runs.append(run_trl("sdft", setup, args, precision))
            if i == 0 or args.distill_all:  # a reference: one precision is enough
                runs.append(run_trl("distill", setup, args, precision))
    ablation_rows = [] if args.skip_ablations else ablations(setup, args, rollouts, precisions)
    num = numerics(setup, args, rollouts) if "bf16" in precisions else None

    model, _ = load_student(setup, args)
    settings = {"max_new_tokens": args.max_new_tokens, "matmul_params": matmul_params(model)}
    peaks = measure_peaks(device, seconds=0.5 if args.tiny else 1.0)
    for run in runs:
        run["floors"] = phase_floors(run, settings, peaks)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "settings": {
            "model": "tiny" if args.tiny else args.model,
            "batch": args.batch,
            "max_new_tokens": args.max_new_tokens,
            "context": args.context,
            "lora": True,
            "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "divergence": "reverse_kl (full vocabulary)",
            "temperature": 1.0,
            "steps": args.steps,
            "safedistill_rollout_backend": args.rollout_backend,
            "matmul_params": matmul_params(model),
        },
        "first_step_loss": check,
        "runs": runs,
        "ablations": ablation_rows,
        "bf16_numerics": num,
        "peaks": peaks,
    }
    print_table(result)
    name = f"step-{device}{'-tiny' if args.tiny else ''}.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return result


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"\nOPSA step on {result['device']}: {s['model']}, batch {s['batch']}, max_new_tokens {s['max_new_tokens']}")
    c = result["first_step_loss"]
    line = f"first-step loss on identical rollouts: safedistill {c['safedistill_loss']:.6f}"
    if "trl_sdft_loss_token_mean" in c:
        line += (
            f", TRL SDFT {c['trl_sdft_loss_token_mean']:.6f} (token mean; rel diff {c['rel_diff']:.1e}; "
            f"TRL's per-sequence mean {c['trl_sdft_loss_sequence_mean']:.6f}; same prompt ids: {c['same_prompt_ids']})"
        )
    print(line)
    print("each phase: seconds (share of its floor reached: floor / time; bench/peak.py's measured peaks)")
    head = f"{'trainer':<34}{'s/step':>8}{'rollout':>17}{'teacher':>17}{'student':>17}   tok/s: {'rollout':>8}{'teacher':>9}{'student':>9}"
    print(head)
    for run in result["runs"]:
        p, floors = run["phases"], run.get("floors", {})
        tps = [p.get("response_tokens", 0) / p[k] if p.get(k) else 0.0 for k in ("t_rollout", "t_teacher", "t_student")]
        cells = ""
        for phase in ("rollout", "teacher", "student"):
            share = floors.get(phase, {}).get("of_floor")
            cells += f"{p.get(f't_{phase}', 0):>9.2f}" + (f" ({share:>5.1%})" if share is not None else " " * 8)
        print(f"{run['name']:<34}{p['step_seconds']:>8.2f}{cells}          {tps[0]:>8.1f}{tps[1]:>9.1f}{tps[2]:>9.1f}")
    if result.get("peaks"):
        pk = result["peaks"]
        print(
            "floors from: "
            + "; ".join(
                f"{k} matmul peak {v['peak_flops'] / 1e9:.1f} GFLOP/s, weight stream {v['weight_bytes_per_s'] / 1e9:.1f} GB/s"
                for k, v in pk.items()
            )
            + f"; N = {result['settings']['matmul_params'] / 1e6:.1f}M matmul parameters"
        )
    by_prec: dict = {}
    for run in result["runs"]:
        by_prec.setdefault(run["precision"], {})[run["name"].split(" (")[0]] = run["phases"]["step_seconds"]
    for precision, names in by_prec.items():
        ours = names.get("safedistill")
        for other in ("TRL SDFTTrainer", "TRL DistillationTrainer"):
            if ours and other in names:
                print(f"speed-up vs {other} ({precision}): {names[other] / ours:.2f}x")
    if result["ablations"]:
        print(f"\n{'phase':<17}{'setting':<52}{'before s':>9}{'after s':>9}{'speed-up':>9}")
        for a in result["ablations"]:
            print(
                f"{a['phase']:<17}{a['setting']:<52}{a['before_s']:>9.3f}{a['after_s']:>9.3f}{a['before_s'] / a['after_s']:>8.2f}x"
            )
    if result["bf16_numerics"]:
        n = result["bf16_numerics"]
        print(
            f"\nbf16 vs fp32 on the fixed rollouts: loss {n['loss_bf16']:.6f} vs {n['loss_fp32']:.6f} "
            f"(rel diff {n['loss_rel_diff']:.2e}), gradient cosine {n['grad_cosine']:.4f}, norm ratio {n['grad_norm_ratio']:.3f}"
        )
    print("response tokens per second of each phase's time; timings are means over the steps after the first")


if __name__ == "__main__":
    main()
