"""The run configuration: one dataclass, every knob named and documented; YAML presets in
`configs/`, overridden by a user YAML and then by `--set key=value`, validated with messages that
name the file or flag and the field."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


@dataclass
class RunConfig:
    """Everything a training run reads. Defaults are ours; presets set the published ones."""

    # --- what to run
    preset: str = "opsa"  # a name from configs/ (`safedistill run --help` lists them)
    trainer: str = "onpolicy"  # onpolicy (distillation on rollouts) or sft (fixed targets)
    model: str = "smollm2-135m-instruct"  # HF id, local directory or bundled alias
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...
    seed: int = 0  # rollouts, data order, LoRA init; the same seed gives the same numbers on CPU

    # --- training data
    harmful_source: str = "advbench"  # train split of this source
    benign_source: str = "benign"  # train split; OPSA trains on benign prompts too
    n_harmful: int = 64  # training prompts taken from the harmful train split
    n_benign: int = 32  # training prompts taken from the benign train split
    benign_ratio: float | None = None  # if set, n_benign = round(n_harmful * r / (1 - r)): share of benign prompts
    split_seed: int = 0  # same split as the evaluation, so eval prompts are never trained on
    targets: str = "demonstrations"  # sft: demonstrations | teacher (its generations) | external | refined (dgr)
    demonstrations: str = "builtin:safety_demos"  # targets=demonstrations|refined: builtin:NAME or JSONL
    n_samples: int | None = None  # demonstrations|refined targets: at most N, seeded (10 are among 30); None: all
    refine_retries: int = 2  # dgr: sampled retries after the greedy rewrite before giving up on a sample
    refine_on_fail: str = "fallback"  # dgr: fallback (keep the original sample) | drop
    refine_template: str | None = None  # dgr: response refinement prompt file ({prompt}, {reference}); None: built-in
    refine_reasoning_template: str | None = None  # dgr: the same for reasoning; None: built-in

    # --- teacher
    teacher: str = "context"  # context | constitution | steering | none (sft) ; more kinds come with their methods
    constitution: str = "builtin"  # teacher=constitution: builtin or a text/Markdown file wrapped around the user turn
    cold_start: str = "none"  # teacher=constitution: none | cross_sft (fine-tune a teacher copy first)
    cross_sft_steps: int = 16  # cold start: optimizer steps on the crossed set (LoRA on a copy, merged)
    cross_sft_lr: float = 5.0e-4  # cold start: learning rate
    cross_sft_batch_size: int = 8  # cold start: crossed pairs per step
    cross_sft_samples: int = 2  # cold start: samples per harmful prompt under the constitution; first judged safe kept
    cross_sft_max_new_tokens: int = 96  # cold start: token budget of the crossed answers
    context: str = "auto"  # harmful-side context: a built-in id, literal text, or auto (best flip rate)
    benign_context: str | None = "ctx-b01"  # teacher context on benign prompts (None: no context)
    contexts: str = "builtin"  # candidate library for auto: builtin or a JSONL file (id, text, side)
    context_search_prompts: int = 8  # harmful train prompts used to rank contexts when context=auto (CPU budget)
    context_search_tokens: int = 24  # greedy tokens per answer in the search; refusals show early
    external_model: str | None = None  # external-kd: the model whose generations are the targets
    keep_only_safe: bool = True  # offpolicy-sd/external-kd: keep harmful-prompt targets the judge calls safe

    # --- steering teacher and safety tokens (SafeSteer; see `safedistill steer`)
    steer_direction: str = "context-delta"  # context-delta (harmful with vs. without `context`) | harmful-harmless
    steer_layers: str = "auto"  # layers searched, comma-separated, or auto (all but the last 20%)
    steer_scales: str = "1.0"  # scales tried per candidate, comma-separated (scale * raw direction)
    # published (andyrdt/refusal_direction select_direction.py): ablating the direction on harmless prompts keeps
    # next-token KL <= steer_kl_cap, adding it makes harmless prompts refuse (refusal score >= 0), rank by how low
    # ablating it drives the refusal score on harmful prompts | legacy-add-kl: KL with the vector *added* <= cap,
    # rank by refusal score on harmful prompts with it added (this project's first rule)
    steer_selection: str = "published"
    steer_kl_cap: float = 0.1  # the KL cap of either selection rule (next-token KL on harmless prompts)
    steer_prompts: int = 16  # harmful and harmless train prompts each for the direction and its search
    steer_from: str | None = None  # a `safedistill steer` output dir to reuse instead of searching in the run
    safety_tokens_k: int = 50  # |S|, the vocabulary ids the safety_tokens mask sums over
    safety_token_prompts: int = 8  # harmless train prompts (disjoint from the direction's) sampled to choose S
    # S keeps tokens whose mean steered probability is at least this (published 1e-8). On a small model
    # the log-ratio votes favour rare word pieces the student never emits; a higher floor keeps S to
    # tokens with probability mass for the loss to move (ours).
    safety_token_min_prob: float = 1e-8

    # --- rollouts
    rollouts_per_prompt: int = 1
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 48

    # --- loss
    divergence: str = "mixture"  # reverse_kl | forward_kl | jsd | mixture | sampled
    alpha: float = 0.5  # mixture: alpha * forward KL + (1 - alpha) * reverse KL
    beta: float = 0.5  # jsd interpolation (0 forward KL, 1 reverse KL)
    top_k: int | None = 512  # teacher's top-k support plus a tail bucket; None: full vocabulary
    token_mask: str = "all"  # all | first_k | top_fraction | threshold (positions: where teacher and student disagree)
    mask_k: int = 10  # first_k: response positions kept
    mask_fraction: float = 0.2  # top_fraction: share of positions with the largest divergence
    objective: str = "divergence"  # divergence (the loss above) | clipped_reward (COPSD's signal, objectives.py)
    reward_clip_low: float = -3.0  # clipped_reward: r_t = clip(log pi_T - log pi_S, low, high) + bonus
    reward_clip_high: float = 5.0
    reward_bonus: float = 0.02
    ppo_clip: float = 0.2  # clipped_reward: PPO ratio clip epsilon
    ref_kl_coef: float = 0.005  # clipped_reward: weight of KL(student || frozen base) on sampled tokens
    mask_threshold: float = 0.1  # threshold: positions whose reverse KL(student || teacher) exceeds this
    vocab_mask: str = "none"  # none | safety_tokens: sum the reverse/forward KL over S only, not renormalised
    # (with divergence: sampled, the sampled-token reverse KL only where the sampled token is in S)

    # --- optimisation
    lora: bool = True  # LoRA on CPU; the papers train all parameters
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8  # prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 24  # optimizer steps
    precision: str = (
        "fp32"  # fp32 | bf16 (autocast for teacher and student passes) | auto (bf16 where the hardware has it)
    )
    rollout_backend: str = (
        "hf"  # hf (decode with the transformers student) | merged (on a LoRA-merged copy) | vllm (GPU; else hf)
    )

    # --- bookkeeping
    save_every: int = 4  # checkpoint every N steps (adapter/weights, optimizer, RNG, data position)
    eval: bool = True  # evaluate base and trained model
    # Eval sizes fit make demo's 15 minutes on 2 CPU cores (two evals beside training; README "Sizes").
    eval_limit: int | None = 30  # at most this many items per eval axis and per capability task (null: all)
    eval_seed: int = 0  # which eval items are taken; fixed, never the training seed, so runs pair item by item
    capability: str = "hellaswag:30,winogrande:30"  # eval capability basket: TASK[:N],... | demo | default
    eval_overrefusal: str = "xstest-safe"  # over-refusal set of the eval: xstest-safe | overrefusal (built-in) | JSONL
    eval_generalization: str = "past_tense,hypothetical"  # rephrasings of the held-out harmful prompts ("": none)
    judge: str = "heuristic"
    diagnostics_every: int = 4  # collapse probe (student and teacher samples) every N steps; 0: never
    diagnostics_prompts: int = 4  # held-out benign and benign-sensitive prompts per probe (each)
    notes: str = ""  # free text carried into the report (e.g. where defaults come from)

    extra: dict[str, Any] = field(default_factory=dict)  # method-specific knobs


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
CHOICES = {
    "trainer": {"onpolicy", "sft"},
    "divergence": {"reverse_kl", "forward_kl", "jsd", "mixture", "sampled"},
    "token_mask": {"all", "first_k", "top_fraction", "threshold"},
    "vocab_mask": {"none", "safety_tokens"},
    "steer_direction": {"context-delta", "harmful-harmless"},
    "steer_selection": {"published", "legacy-add-kl"},
    "lr_schedule": {"cosine", "constant"},
    "teacher": {"context", "constitution", "steering", "none"},
    "cold_start": {"none", "cross_sft"},
    "objective": {"divergence", "clipped_reward"},
    "targets": {"demonstrations", "teacher", "external", "refined"},
    "refine_on_fail": {"fallback", "drop"},
    "precision": {"fp32", "bf16", "auto"},
    "rollout_backend": {"hf", "merged", "vllm"},
}


def _field_types(name: str) -> tuple:
    hint = typing.get_type_hints(RunConfig)[name]
    return typing.get_args(hint) or (hint,)


def _coerce(name: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(RunConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: field '{name}' cannot be null")
    origin = typing.get_origin(base) or base
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
        if origin is dict and isinstance(value, dict):
            return value
    except (TypeError, ValueError):
        pass
    raise UserError(f"{where}: field '{name}' expects {getattr(base, '__name__', base)}, got {value!r}")


def _apply(cfg: dict, updates: dict, where: str) -> None:
    for key, value in updates.items():
        if key not in FIELDS:
            raise UserError(f"{where}: unknown field '{key}'")
        cfg[key] = _coerce(key, value, where)
        if key in CHOICES and cfg[key] not in CHOICES[key]:
            raise UserError(f"{where}: field '{key}' must be one of {sorted(CHOICES[key])}, got {value!r}")


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


def load_config(preset: str, *, config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Preset YAML, then the user's YAML, then `--set key=value` (values parsed as YAML)."""
    if preset not in preset_names():
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(preset_names())})")
    cfg: dict = {}
    text = resources.files("safedistill.configs").joinpath(f"{preset}.yaml").read_text()
    _apply(cfg, _read_yaml(text, f"configs/{preset}.yaml"), f"configs/{preset}.yaml")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"{config_file}: no such config file")
        _apply(cfg, _read_yaml(path.read_text(), config_file), config_file)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item}: expected key=value")
        key = key.strip()
        # Text fields take the value verbatim (a context may contain ': ' or read "no"); others parse as YAML.
        verbatim = key in FIELDS and str in _field_types(key) and raw.strip() not in {"null", "~"}
        value = raw if verbatim else _read_yaml(f"v: {raw}", f"--set {item}")["v"]
        _apply(cfg, {key: value}, f"--set {key}")
    cfg["preset"] = preset
    config = RunConfig(**cfg)
    validate(config)
    return config


def _number_list(text: str, cast) -> bool:
    try:
        return text.strip() == "auto" or len([cast(x) for x in text.split(",")]) > 0
    except ValueError:
        return False


def validate(c: RunConfig) -> None:
    checks = [
        (c.steps >= 1, "steps", "must be at least 1"),
        (c.batch_size >= 1, "batch_size", "must be at least 1"),
        (c.grad_accum >= 1, "grad_accum", "must be at least 1"),
        (c.learning_rate > 0, "learning_rate", "must be positive"),
        (0 <= c.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
        (c.temperature >= 0, "temperature", "must be >= 0"),
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
        (c.n_samples is None or c.n_samples >= 1, "n_samples", "must be at least 1 or null"),
        (c.refine_retries >= 0, "refine_retries", "must be >= 0"),
        (c.benign_ratio is None or 0 <= c.benign_ratio < 1, "benign_ratio", "must be in [0, 1) or null"),
        (c.reward_clip_low <= c.reward_clip_high, "reward_clip_low", "must not exceed reward_clip_high"),
        (0 < c.ppo_clip < 1, "ppo_clip", "must be in (0, 1)"),
        (c.diagnostics_every >= 0, "diagnostics_every", "must be >= 0"),
        (c.cross_sft_steps >= 1, "cross_sft_steps", "must be at least 1"),
        (c.cross_sft_batch_size >= 1, "cross_sft_batch_size", "must be at least 1"),
        (c.cross_sft_samples >= 1, "cross_sft_samples", "must be at least 1"),
        (
            c.vocab_mask == "none" or c.divergence in {"reverse_kl", "forward_kl", "sampled"},
            "vocab_mask",
            "safety_tokens needs divergence reverse_kl, forward_kl or sampled",
        ),
        (c.safety_tokens_k >= 1, "safety_tokens_k", "must be at least 1"),
        (_number_list(c.steer_layers, int), "steer_layers", "must be auto or comma-separated layer indices"),
        (_number_list(c.steer_scales, float), "steer_scales", "must be comma-separated numbers"),
        (c.steer_prompts >= 1, "steer_prompts", "must be at least 1"),
        (c.safety_token_prompts >= 1, "safety_token_prompts", "must be at least 1"),
        (0 <= c.safety_token_min_prob < 1, "safety_token_min_prob", "must be in [0, 1)"),
    ]
    checks.append(
        (
            c.targets != "external" or c.external_model is not None,
            "external_model",
            "must be set when targets=external (--set external_model=HF_ID_OR_DIR)",
        )
    )
    for name in ("refine_template", "refine_reasoning_template"):
        path = getattr(c, name)
        checks.append((path is None or Path(path).is_file(), name, "must name an existing template file"))
    for ok, name, msg in checks:
        if not ok:
            raise UserError(f"config field '{name}' {msg} (got {getattr(c, name)!r})")
    _validate_eval(c)


def _validate_eval(c: RunConfig) -> None:
    from .evaluate import EvalSettings, capability_basket, generalization_styles

    for name, check in (
        ("capability", lambda: capability_basket(EvalSettings(capability=c.capability))),
        ("eval_generalization", lambda: generalization_styles(c.eval_generalization)),
    ):
        try:
            check()
        except UserError as e:
            raise UserError(f"config field '{name}': {e}") from None


def to_yaml(c: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(c), sort_keys=False)


def same_settings(saved_yaml: str, c: RunConfig) -> bool:
    """Whether a run directory's saved config.yaml describes `c`. A field the saved file lacks was
    added to RunConfig after that run was written; it matches when `c` keeps its default."""
    saved = yaml.safe_load(saved_yaml) or {}
    current = dataclasses.asdict(c)
    defaults = dataclasses.asdict(RunConfig())
    if set(saved) - set(current):
        return False
    return all(saved[k] == v if k in saved else v == defaults[k] for k, v in current.items())
