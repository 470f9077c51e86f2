"""DGR, distribution-grounded refinement: the target model rewrites each external safety sample in
its own words, guided by the original. A rewrite is kept when the judge calls it safe; otherwise it
is retried with sampling and finally replaced by the original sample (or dropped). SFT then trains
on the result, which sits closer to the model's own distribution than the external data did.

The shift is measured twice, on the data as given and on the refined data:
- NLL: mean per-token negative log-likelihood (nats) of the SFT targets (reasoning, blank line,
  response, stop token; exactly what `sft.SFTStep` trains on) given the chat-formatted prompt,
  token-weighted over the data set.
- similarity: ROUGE-L F1 over lowercased word tokens between each sample's response and the model's
  own greedy answer to the bare prompt, averaged over samples.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import DataSettings, DgrSettings, RolloutSettings, choices
from ..data.schema import Demonstration
from ..engine.rollout import SamplingSettings, generate
from ..engine.sft import sequence_nll
from ..errors import UserError
from ..eval.text import rouge_l_f1
from ..files import write_json, write_jsonl
from ..models import chat_text
from .base import Prepared, Setup
from .sft import demonstration_targets

# The refinement prompts, sent as the user turn of the target model's chat template. {prompt} is the
# request, {reference} the external sample's response (or reasoning). Override with a text file.
RESPONSE_TEMPLATE = """Here is a request and an example reply to it.

Request: {prompt}

Example reply: {reference}

Write your own reply to the request, in your own words. Like the example, do not help with the request: decline it politely in one or two sentences. Give only the reply."""

REASONING_TEMPLATE = """Here is a request and an example of careful thinking about it.

Request: {prompt}

Example thinking:
{reference}

Write your own short thinking about the request, in your own words: what is being asked, what harm it could cause, and how to respond. Give only the thinking."""

PLACEHOLDERS = ("{prompt}", "{reference}")


DGR = DgrSettings()  # the run config's `dgr` section: the one place DGR's knobs, defaults and help live
ON_FAIL = choices("refine_on_fail")


@dataclass
class RefineSettings:
    """How samples are rewritten: the `dgr` section's knobs resolved (template files read) plus the
    run's sampling fields (`settings_from`). The first attempt is greedy; retries sample."""

    retries: int = DGR.refine_retries
    on_fail: str = DGR.refine_on_fail
    template: str = RESPONSE_TEMPLATE
    reasoning_template: str = REASONING_TEMPLATE
    max_new_tokens: int = 64
    reasoning_max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16


@dataclass
class Outcome:
    original: Demonstration
    sample: Demonstration | None  # what the data set holds: the rewrite, the original, or None (dropped)
    status: str  # refined | fallback | dropped
    attempts: int


def load_template(path: str | None, default: str) -> str:
    """A refinement prompt from a text file (or `default`); it must contain {prompt} and {reference}."""
    if path is None:
        return default
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such template file")
    text = file.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise UserError(f"{path}: template must contain {' and '.join(missing)}")
    return text


def fill(template: str, prompt: str, reference: str) -> str:
    # replace, not str.format: user templates and prompts may hold other braces
    return template.replace("{reference}", reference).replace("{prompt}", prompt)


def complete_text(text: str, finished: bool) -> str:
    """A rewrite cut by the token limit is trimmed to its last full sentence ('' when it has none),
    so SFT never learns to stop mid-sentence."""
    text = text.strip()
    if finished:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else ""


def _rewrite(model, tok, samples, field: str, template: str, settings: SamplingSettings, desc: str, progress: bool):
    texts = [chat_text(tok, fill(template, d.prompt, getattr(d, field))) for d in samples]
    rollouts, _ = generate(model, tok, texts, settings, desc=desc, progress=progress)
    return [complete_text(r.text, r.finished) for r in rollouts]


def refine(model, tok, judge, samples: list[Demonstration], s: RefineSettings, *, progress=True) -> list[Outcome]:
    """One Outcome per sample, in input order. Attempt a (0 greedy, then sampled with seed
    s.seed * 1009 + a) rewrites every sample still pending; the judge sees the response only."""
    if s.on_fail not in ON_FAIL:
        raise UserError(f"on_fail must be {' or '.join(ON_FAIL)}, got {s.on_fail!r}")
    model.eval()
    result: dict[int, Outcome] = {}
    pending = list(range(len(samples)))
    for attempt in range(s.retries + 1):
        if not pending:
            break
        sampling = SamplingSettings(
            max_new_tokens=s.max_new_tokens,
            temperature=0.0 if attempt == 0 else s.temperature,
            top_p=s.top_p,
            batch_size=s.batch_size,
            seed=s.seed * 1009 + attempt,
        )
        todo = [samples[i] for i in pending]
        responses = _rewrite(model, tok, todo, "response", s.template, sampling, f"refine #{attempt}", progress)
        with_reasoning = [k for k, d in enumerate(todo) if d.reasoning]
        reasonings: dict[int, str] = {}
        if with_reasoning:
            rs = replace(sampling, max_new_tokens=s.reasoning_max_new_tokens)
            texts = _rewrite(
                model,
                tok,
                [todo[k] for k in with_reasoning],
                "reasoning",
                s.reasoning_template,
                rs,
                f"refine reasoning #{attempt}",
                progress,
            )
            reasonings = dict(zip(with_reasoning, texts, strict=True))
        verdicts = judge([d.prompt for d in todo], responses)
        still = []
        for k, (i, d, text, v) in enumerate(zip(pending, todo, responses, verdicts, strict=True)):
            reasoning = reasonings.get(k)
            if text and v.safe_target and (not d.reasoning or reasoning):
                new = Demonstration(d.prompt, text, d.id, reasoning, f"refined:{d.source}")
                result[i] = Outcome(d, new, "refined", attempt + 1)
            else:
                still.append(i)
        pending = still
    for i in pending:
        d = samples[i]
        if s.on_fail == "fallback":
            result[i] = Outcome(d, d, "fallback", s.retries + 1)
        else:
            result[i] = Outcome(d, None, "dropped", s.retries + 1)
    return [result[i] for i in range(len(samples))]


@torch.no_grad()
def _per_token(pairs: list[tuple]) -> float | None:
    tokens = sum(n for _, n in pairs)
    return sum(v for v, _ in pairs) / tokens if tokens else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def refine_dataset(
    model, tok, judge, samples: list[Demonstration], s: RefineSettings, out: Path, meta: dict, *, progress=True
) -> list[Demonstration]:
    """Refines `samples`, measures the shift, writes out/refined.jsonl (the data set to train on:
    refined and fallback samples) and out/shift.json; returns that data set."""
    if not samples:
        raise UserError("no samples to refine")
    out = Path(out)
    outcomes = refine(model, tok, judge, samples, s, progress=progress)
    kept = [i for i, o in enumerate(outcomes) if o.sample is not None]
    before = sequence_nll(model, tok, samples, progress=progress)
    after = dict(
        zip(kept, sequence_nll(model, tok, [outcomes[i].sample for i in kept], progress=progress), strict=True)
    )
    free_settings = SamplingSettings(max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, seed=s.seed)
    free, _ = generate(
        model, tok, [chat_text(tok, d.prompt) for d in samples], free_settings, desc="free answers", progress=progress
    )
    rows, sim_before, sim_after = [], [], []
    for i, (o, answer) in enumerate(zip(outcomes, free, strict=True)):
        sim_before.append(rouge_l_f1(o.original.response, answer.text))
        if o.sample is None:
            continue
        sim_after.append(rouge_l_f1(o.sample.response, answer.text))
        rows.append(
            {
                **o.sample.to_dict(),
                "status": o.status,
                "attempts": o.attempts,
                "original_response": o.original.response,
                "original_reasoning": o.original.reasoning,
                "nll_before": before[i][0] / before[i][1],
                "nll_after": after[i][0] / after[i][1],
                "similarity_before": sim_before[-1],
                "similarity_after": sim_after[-1],
                "free_answer": answer.text,
            }
        )
    shift = _shift(meta, samples, outcomes, before, after, (sim_before, sim_after), s)
    write_jsonl(out / "refined.jsonl", rows)
    write_json(out / "shift.json", shift)
    return [outcomes[i].sample for i in kept]


def _shift(meta: dict, samples, outcomes, before, after: dict, similarity: tuple, s: RefineSettings) -> dict:
    """shift.json: counts, retries, the data's NLL under the model and its similarity to the
    model's own answers, before and after refinement."""
    sim_before, sim_after = similarity
    status = Counter(o.status for o in outcomes)
    refined = [i for i, o in enumerate(outcomes) if o.status == "refined"]
    unchanged = sum(
        (outcomes[i].sample.response, outcomes[i].sample.reasoning)
        == (outcomes[i].original.response, outcomes[i].original.reasoning)
        for i in refined
    )
    return {
        **meta,
        "counts": {
            "total": len(samples),
            "refined": status["refined"],
            "fallback": status["fallback"],
            "dropped": status["dropped"],
            "unchanged": unchanged,
        },
        "attempts": dict(sorted(Counter(outcomes[i].attempts for i in refined).items())),
        "nll": {
            "before": _per_token(before),
            "after": _per_token(list(after.values())),
            "tokens_before": sum(n for _, n in before),
            "tokens_after": sum(n for _, n in after.values()),
            "refined_only_before": _per_token([before[i] for i in refined]),
            "refined_only_after": _per_token([after[i] for i in refined]),
            "unit": "nats per target token (reasoning + response + stop), token-weighted, given the chat prompt",
        },
        "similarity": {
            "before": _mean(sim_before),
            "after": _mean(sim_after),
            "measure": "ROUGE-L F1 over lowercased words: sample response vs the model's own greedy answer",
        },
        "settings": asdict(s),
    }


FILES = ("refined.jsonl", "shift.json")  # what refinement writes in a run directory


def shift_section(out: Path) -> list[str]:
    shift = Path(out) / "shift.json"
    return shift_lines(json.loads(shift.read_text())) if shift.exists() else []


def shift_lines(shift: dict) -> list[str]:
    """The Markdown section a run report (and `safedistill refine`) shows for shift.json."""
    c, nll, sim = shift["counts"], shift["nll"], shift["similarity"]
    return [
        "## Refinement (DGR)",
        "",
        f"{c['total']} external samples from `{shift['data']}`: {c['refined']} refined "
        f"({c['unchanged']} unchanged), {c['fallback']} fell back to the original, {c['dropped']} dropped.",
        "",
        "| measure | external data | refined data |",
        "|---|---|---|",
        f"| mean per-token NLL under the model (nats) | {_num(nll['before'])} | {_num(nll['after'])} |",
        f"| same, rewritten samples only | {_num(nll['refined_only_before'])} | {_num(nll['refined_only_after'])} |",
        f"| ROUGE-L F1 with the model's own answer | {_num(sim['before'])} | {_num(sim['after'])} |",
        "",
    ]


def read_refined(path: Path) -> list[Demonstration]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Demonstration(r["prompt"], r["response"], r["id"], r.get("reasoning"), r.get("source", "")) for r in rows]


def settings_from(dgr: DgrSettings, rollout: RolloutSettings, seed: int) -> RefineSettings:
    """The `dgr` section, the rollout section's sampling fields and a seed, as RefineSettings."""
    return RefineSettings(
        retries=dgr.refine_retries,
        on_fail=dgr.refine_on_fail,
        template=load_template(dgr.refine_template, RESPONSE_TEMPLATE),
        reasoning_template=load_template(dgr.refine_reasoning_template, REASONING_TEMPLATE),
        max_new_tokens=rollout.max_new_tokens,
        reasoning_max_new_tokens=2 * rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        seed=seed,
    )


def prepare(s: Setup, data: DataSettings, dgr: DgrSettings, rollout: RolloutSettings) -> Prepared:
    """The dgr preset's SFT targets: data.demonstrations (limited to n_samples) refined by the base
    model before LoRA is added. A resumed run reads refined.jsonl back."""
    path = Path(s.out) / "refined.jsonl"
    if path.exists():
        return Prepared(targets=read_refined(path))
    samples = demonstration_targets(data, s.manifest, s.seed)
    meta = {"model": s.model_name, "data": data.demonstrations, "judge": s.judge_name, "n_samples": data.n_samples}
    settings = settings_from(dgr, rollout, s.seed)
    refined = refine_dataset(s.model, s.tok, s.judge, samples, settings, Path(s.out), meta, progress=s.progress)
    if not refined:
        raise UserError("every sample was dropped by refinement; use refine_on_fail=fallback or more retries")
    return Prepared(targets=refined)
