"""Capability from real benchmarks, scored as lm-evaluation-harness scores them.

Multiple choice (hellaswag, arc_challenge, piqa, winogrande, truthfulqa_mc1, boolq, openbookqa):
each option's log-likelihood is the summed log-probability of its continuation tokens, tokenised
as lm-eval's `_encode_pair` does (trailing context spaces move to the continuation; the
continuation is the tail of encode(context + continuation) after encode(context)).
acc = [argmax ll == gold]; acc_norm = [argmax ll / len(choice in characters) == gold], with
lm-eval's choice strings (for winogrande, partial evaluation, the per-option contexts; lm-eval
reports only acc there). The options of one question share their context: it runs once and the
options are scored from its KV cache in one batch.

Generation (gsm8k, ifeval, arithmetic) runs through rollout.generate (batched, KV-cached, greedy)
with a token budget per task; answers that hit the budget are counted as `truncated`.
GSM8K uses lm-eval's gsm8k_cot_llama instruction as one chat turn (zero-shot) and its
flexible-extract filter (last number in the response) with exact match after its
regexes_to_ignore; IFEval uses the official strict and loose rules (eval/ifeval.py).

Why not lm_eval itself as the engine: it installs offline (lm-eval 0.4.13 and ~40 packages), but
its tasks load data through `datasets` from the hub, its IFEval checker downloads NLTK data at
import, and its HF loglikelihood path runs every (context, option) pair in full, so on 2 CPU
cores it is several times slower than sharing the context. The metric definitions are matched
in tests/test_capability.py against lm_eval's own functions when lm_eval is importable.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.benchmarks import MC_BUILDERS, TRUTHFULQA_PRIMER, GenItem, MCItem, load_gsm8k, load_ifeval, load_mc
from ..data.packaged import Manifest
from ..data.reasoning import MAX_NEW_TOKENS as ARITHMETIC_MAX_NEW_TOKENS
from ..data.reasoning import generate_problems, is_correct
from ..engine.rollout import SamplingSettings, generate
from ..engine.scoring import accepts_logits_to_keep, cache_arg, expand_cache, response_logits, returned_cache
from ..errors import UserError
from ..models import chat_text, context_window
from . import ifeval

# `safedistill eval`: the larger basket (per-task n and times on 2 CPU cores in
# docs/results/capability-smollm2-135m.md). `make demo`: the multiple-choice tasks that separate a
# 135M model from chance per CPU second, and a few IFEval prompts; GSM8K is left out because the
# 135M model is at its floor there (0/16, lm-eval's own 0-shot figure is 0.4%).
DEFAULT_BASKET = (
    "hellaswag:500,arc_challenge:500,piqa:500,winogrande:500,truthfulqa_mc1:300,boolq:300,openbookqa:500,"
    "gsm8k:100,ifeval:100"
)
DEMO_BASKET = "hellaswag:60,arc_challenge:60,piqa:60,winogrande:60,ifeval:8"

GSM8K_PROMPT = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the problem.\n'
)
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_STRICT = re.compile(r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))")
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def parse_basket(spec: str) -> list[tuple[str, int | None]]:
    """ "hellaswag:200,arc_challenge,gsm8k:50" -> [("hellaswag", 200), ("arc_challenge", None), ...]."""
    out: list[tuple[str, int | None]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, size = part.partition(":")
        name = name.strip()
        if name not in TASKS:
            raise UserError(f"capability: unknown task {name!r} (known: {', '.join(TASKS)})")
        if name in (n for n, _ in out):
            raise UserError(f"capability: task {name!r} listed twice")
        n = None
        if size.strip():
            try:
                n = int(size)
            except ValueError:
                raise UserError(f"capability: size of {name!r} must be a whole number, got {size!r}") from None
            if n < 1:
                raise UserError(f"capability: size of {name!r} must be at least 1, got {n}")
        out.append((name, n))
    if not out:
        raise UserError("capability: the basket names no task")
    return out


def subset(total: int, n: int | None, task: str, eval_seed: int) -> list[int]:
    """A fixed subset of item indices chosen by the eval seed alone; a larger n extends a smaller
    one (the first n of one seeded permutation), returned in file order."""
    order = list(range(total))
    random.Random(f"capability:{task}:{eval_seed}").shuffle(order)
    return sorted(order[: total if n is None else min(n, total)])


# --- multiple choice -----------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair for a causal model (no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def _fit(model, ctx: list[int], cont: list[int]) -> list[int]:
    """lm-eval keeps the last max_length + 1 tokens of context + continuation."""
    room = context_window(model) + 1 - len(cont)
    return ctx[-room:] if len(ctx) > room else ctx


def _shared_context(model, ctx: list[int], conts: Sequence[list[int]], pad: int) -> list[float]:
    """Log-likelihoods of several continuations of one context: the context runs once (batch 1),
    the continuations run as one right-padded batch on its expanded KV cache."""
    device = next(model.parameters()).device
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True, **keep)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    lls = [float(first[c[0]]) for c in conts]
    width = max(len(c) for c in conts) - 1
    if width == 0:
        return lls
    b, n_ctx = len(conts), len(ctx)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, n_ctx + width), dtype=torch.long)
    mask[:, :n_ctx] = 1
    for i, c in enumerate(conts):
        ids[i, : len(c) - 1] = torch.tensor(c[:-1])
        mask[i, n_ctx : n_ctx + len(c) - 1] = 1
    positions = (n_ctx + torch.arange(width)).expand(b, -1)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **cache_arg(model, expand_cache(returned_cache(out), b)),
    ).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    for i, c in enumerate(conts):
        if len(c) > 1:
            target = torch.tensor(c[1:], device=logp.device)
            lls[i] += float(logp[i, : len(c) - 1].gather(-1, target[:, None]).sum())
    return lls


def _full_pairs(model, pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> list[float]:
    """Log-likelihoods of (context, continuation) pairs with different contexts: one
    right-padded batch of whole sequences."""
    device = next(model.parameters()).device
    width = max(len(c) + len(t) for c, t in pairs) - 1
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (c, t) in enumerate(pairs):
        seq = (c + t)[:-1]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    out = []
    for i, (c, t) in enumerate(pairs):
        target = torch.tensor(t, device=logp.device)
        out.append(float(logp[i, len(c) - 1 : len(c) - 1 + len(t)].gather(-1, target[:, None]).sum()))
    return out


@torch.no_grad()
def mc_loglikelihoods(
    model, tokenizer, items: Sequence[MCItem], *, batch_size: int = 16, desc: str = "mc", progress: bool = True
) -> list[list[float]]:
    """Per item, the summed log-likelihood of each option (as lm-eval's loglikelihood requests)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float] | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="q", leave=False)
    pending: list[int] = []  # items whose options have different contexts, batched together

    def flush():
        pairs, owners = [], []
        for k in pending:
            for ctx, cont in zip(items[k].contexts, items[k].continuations, strict=True):
                c, t = encode_pair(tokenizer, ctx, cont)
                pairs.append((_fit(model, c, t), t))
                owners.append(k)
        lls = _full_pairs(model, pairs, pad)
        for k in pending:
            out[k] = [ll for ll, o in zip(lls, owners, strict=True) if o == k]
        bar.update(len(pending))
        pending.clear()

    for k, item in enumerate(items):
        if len(set(item.contexts)) == 1:
            encoded = [encode_pair(tokenizer, item.contexts[0], cont) for cont in item.continuations]
            ctx = encoded[0][0]
            conts = [t for _, t in encoded]
            out[k] = _shared_context(model, _fit(model, ctx, max(conts, key=len)), conts, pad)
            bar.update(1)
        else:
            pending.append(k)
            if sum(len(items[j].contexts) for j in pending) >= batch_size:
                flush()
    if pending:
        flush()
    bar.close()
    return [x for x in out if x is not None]


def mc_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """lm-eval's multiple_choice process_results: acc, acc_norm (by characters), acc_bytes."""
    chars = [float(len(c)) for c in choices]
    nbytes = [float(len(c.encode("utf-8"))) for c in choices]
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    pred_norm = max(range(len(lls)), key=lambda i: (lls[i] / chars[i], -i))
    pred_bytes = max(range(len(lls)), key=lambda i: (lls[i] / nbytes[i], -i))
    return {
        "acc": float(pred == gold),
        "acc_norm": float(pred_norm == gold),
        "acc_bytes": float(pred_bytes == gold),
        "pred": pred,
        "pred_norm": pred_norm,
        "p_gold": gold_probability(lls, gold),
        "p_gold_norm": gold_probability([ll / c for ll, c in zip(lls, chars, strict=True)], gold),
    }


def gold_probability(scores: Sequence[float], gold: int) -> float:
    """softmax(scores)[gold]: the model's probability on the gold option, normalised over the
    options. Given the metric's own scores (log-likelihoods for acc, per-character ones for
    acc_norm), it moves with every item's margin, long before the argmax behind acc flips."""
    top = max(scores)
    weights = [math.exp(x - top) for x in scores]
    return weights[gold] / sum(weights)


# --- generation ----------------------------------------------------------------------------


def gsm8k_extract(response: str, pattern: re.Pattern = GSM8K_FLEXIBLE) -> str:
    """lm-eval's regex filter with group_select -1 and take_first: the last match, its first
    non-empty group, stripped; "[invalid]" when nothing matches."""
    found = pattern.findall(response)
    if not found:
        return "[invalid]"
    match = found[-1]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def gsm8k_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match with gsm8k's regexes_to_ignore and ignore_case."""
    for pattern in GSM8K_IGNORE:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    return prediction.lower() == reference.lower()


def is_looping(text: str, span: int = 200, max_period: int = 100) -> bool:
    """Whether the text ends in a verbatim repetition: its last `span` characters equal the
    `span` characters one period earlier, for some period up to `max_period`. A truncated answer
    that loops would not have ended at any budget."""
    if len(text) < span + 1:
        return False
    tail = text[-span:]
    return any(text[-span - p : -p] == tail for p in range(1, max_period + 1) if len(text) >= span + p)


def _truncation(rollouts) -> dict:
    cut = [r for r in rollouts if not r.finished]
    return {"truncated": len(cut), "truncated_looping": sum(is_looping(r.text) for r in cut)}


def _generate(model, tokenizer, prompts, names, max_new_tokens, batch_size, seed, desc, progress):
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size, seed=seed)
    texts = [chat_text(tokenizer, p) for p in prompts]
    rollouts, _ = generate(model, tokenizer, texts, settings, names=names, desc=desc, progress=progress)
    return rollouts


def _item(task: str, item_id: str, value: float, **extra) -> dict:
    return {"axis": "capability", "task": task, "id": item_id, "value": value, **extra}


@dataclass(frozen=True)
class TaskContext:
    """What a task's runner needs beside the model and its items."""

    batch_size: int
    eval_seed: int
    manifest: Manifest | None
    progress: bool


def reference_logprob(
    model, tokenizer, prompts: Sequence[str], references: Sequence[str], batch_size: int
) -> list[float]:
    """Per item, the mean per-token log-probability of a reference answer as the reply to the
    prompt (chat template, as the task is generated): a continuous, paired score for generation
    tasks whose 0/1 exact match rarely moves on a small model."""
    from ..engine.rollout import encode_prompts

    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), min(batch_size, 8)):
        texts = [chat_text(tokenizer, p) for p in prompts[start : start + min(batch_size, 8)]]
        refs = references[start : start + len(texts)]
        ids = [tokenizer(r, add_special_tokens=False)["input_ids"] or [pad] for r in refs]
        with torch.no_grad():
            logits, mask = response_logits(model, encode_prompts(tokenizer, texts), ids, pad_id=pad)
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.zeros(mask.shape, dtype=torch.long)
        for i, t in enumerate(ids):
            target[i, : len(t)] = torch.tensor(t)
        picked = logp.gather(-1, target.to(logp.device)[..., None])[..., 0] * mask.to(logp.dtype)
        out += (picked.sum(-1) / mask.sum(-1).clamp_min(1)).tolist()
    return out


def _run_mc(model, tokenizer, name: str, items: list[MCItem], ctx: TaskContext):
    spec = TASKS[name]
    lls = mc_loglikelihoods(model, tokenizer, items, batch_size=ctx.batch_size, desc=name, progress=ctx.progress)
    rows, sums = [], {"acc": 0.0, "acc_norm": 0.0}
    for item, ll in zip(items, lls, strict=True):
        m = mc_metrics(ll, item.choices, item.gold)
        sums["acc"] += m["acc"]
        sums["acc_norm"] += m["acc_norm"]
        p_gold = m["p_gold_norm"] if spec.metric == "acc_norm" else m["p_gold"]
        sums["p_gold"] = sums.get("p_gold", 0.0) + p_gold
        prompt = item.contexts[0].removeprefix(TRUTHFULQA_PRIMER).lstrip() if len(set(item.contexts)) == 1 else ""
        rows.append(
            _item(
                name,
                item.id,
                m[spec.metric],
                prompt=prompt,
                choices=list(item.choices),
                gold=item.gold,
                pred=m["pred"],
                pred_norm=m["pred_norm"],
                loglik=[round(x, 4) for x in ll],
                continuous=p_gold,
            )
        )
    n = len(items)
    metrics = {k: v / n for k, v in sums.items()}
    if name == "winogrande":
        metrics.pop("acc_norm")  # lm-eval's winogrande reports acc only (its "choices" are contexts)
    chance = sum(1 / len(i.choices) for i in items) / n
    return metrics, chance, rows


GSM8K_REFERENCE = "The final answer is {answer}"  # the ending GSM8K_PROMPT asks for, as the scored reference


def _run_gsm8k(model, tokenizer, name: str, items: list[GenItem], ctx: TaskContext):
    spec = TASKS[name]
    prompts = [GSM8K_PROMPT.format(question=i.prompt) for i in items]
    rollouts = _generate(
        model,
        tokenizer,
        prompts,
        [i.id for i in items],
        spec.max_new_tokens,
        ctx.batch_size,
        ctx.eval_seed,
        "gsm8k",
        ctx.progress,
    )
    refs = reference_logprob(
        model, tokenizer, prompts, [GSM8K_REFERENCE.format(answer=i.answer) for i in items], ctx.batch_size
    )
    rows, flexible, strict = [], 0, 0
    for item, r, ref in zip(items, rollouts, refs, strict=True):
        pred = gsm8k_extract(r.text)
        ok = gsm8k_exact_match(pred, item.answer)
        ok_strict = gsm8k_exact_match(gsm8k_extract(r.text, GSM8K_STRICT), item.answer)
        flexible += ok
        strict += ok_strict
        rows.append(
            _item(
                "gsm8k",
                item.id,
                float(ok),
                prompt=item.prompt,
                response=r.text,
                gold=item.answer,
                pred=pred,
                strict=ok_strict,
                truncated=not r.finished,
                continuous=ref,
            )
        )
    n = len(items)
    metrics = {"exact_match": flexible / n, "strict_match": strict / n, **_truncation(rollouts)}
    return metrics | {"ref_logprob": sum(refs) / n}, spec.chance, rows


def _run_ifeval(model, tokenizer, name: str, items: list[GenItem], ctx: TaskContext):
    spec = TASKS[name]
    ifeval.record_punkt(ctx.manifest)
    rollouts = _generate(
        model,
        tokenizer,
        [i.prompt for i in items],
        [i.id for i in items],
        spec.max_new_tokens,
        ctx.batch_size,
        ctx.eval_seed,
        "ifeval",
        ctx.progress,
    )
    rows, counts = [], {"prompt_strict": 0, "prompt_loose": 0, "inst_strict": 0, "inst_loose": 0, "inst_n": 0}
    for item, r in zip(items, rollouts, strict=True):
        s = ifeval.score(item.instruction_ids, item.kwargs, r.text)
        counts["prompt_strict"] += s["strict"]
        counts["prompt_loose"] += s["loose"]
        counts["inst_strict"] += sum(s["inst_strict"])
        counts["inst_loose"] += sum(s["inst_loose"])
        counts["inst_n"] += len(s["inst_strict"])
        rows.append(
            _item(
                "ifeval",
                item.id,
                float(s["strict"]),
                prompt=item.prompt,
                response=r.text,
                instructions=list(item.instruction_ids),
                strict=s["inst_strict"],
                loose=s["inst_loose"],
                truncated=not r.finished,
            )
        )
    n = len(items)
    return (
        {
            "prompt_strict": counts["prompt_strict"] / n,
            "prompt_loose": counts["prompt_loose"] / n,
            "inst_strict": counts["inst_strict"] / counts["inst_n"],
            "inst_loose": counts["inst_loose"] / counts["inst_n"],
            **_truncation(rollouts),
        },
        spec.chance,
        rows,
    )


def _run_arithmetic(model, tokenizer, name: str, n: int, ctx: TaskContext):
    spec = TASKS[name]
    problems = generate_problems(n, seed=ctx.eval_seed)
    rollouts = _generate(
        model,
        tokenizer,
        [p.prompt for p in problems],
        [p.id for p in problems],
        spec.max_new_tokens,
        ctx.batch_size,
        ctx.eval_seed,
        "arithmetic",
        ctx.progress,
    )
    refs = reference_logprob(
        model, tokenizer, [p.prompt for p in problems], [str(p.answer) for p in problems], ctx.batch_size
    )
    rows, correct = [], 0
    for p, r, ref in zip(problems, rollouts, refs, strict=True):
        ok = is_correct(r.text, p.answer)
        correct += ok
        rows.append(
            _item(
                "arithmetic",
                p.id,
                float(ok),
                prompt=p.prompt,
                response=r.text,
                gold=p.answer,
                level=p.level,
                truncated=not r.finished,
                continuous=ref,
            )
        )
    return {"accuracy": correct / n, **_truncation(rollouts), "ref_logprob": sum(refs) / n}, spec.chance, rows


ARITHMETIC_DEFAULT_N = 90


@dataclass(frozen=True)
class TaskSpec:
    """A capability task: how its items load, how they are scored, and its headline metric (the
    one that enters the capability index). `run(model, tokenizer, name, items, ctx)` returns
    (metrics, chance, rows); `chance` None: computed from the items (1 / number of options).
    `continuous` names the paired continuous score each row carries in "continuous": `p_gold`
    (probability on the gold option, normalised over the options as the metric normalises) or
    `ref_logprob` (mean per-token log-probability of the reference answer); None: the task has none."""

    name: str
    metric: str
    load: Callable[[str, Manifest | None], Any]  # (name, manifest) -> all items; arithmetic: None (generated)
    run: Callable[..., tuple[dict, float | None, list[dict]]]
    chance: float | None = None
    max_new_tokens: int = 0  # generation budget (generation tasks)
    size: int | None = None  # items available (None: generated on demand)
    continuous: str | None = None


def _mc(name: str, metric: str, size: int) -> TaskSpec:
    return TaskSpec(name, metric, load_mc, _run_mc, size=size, continuous="p_gold")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _mc("hellaswag", "acc_norm", 1000),
        _mc("arc_challenge", "acc_norm", 1172),
        _mc("piqa", "acc_norm", 1838),
        _mc("winogrande", "acc", 1267),
        _mc("truthfulqa_mc1", "acc", 817),
        _mc("boolq", "acc", 3270),
        _mc("openbookqa", "acc_norm", 500),
        TaskSpec(
            "gsm8k", "exact_match", lambda _, m: load_gsm8k(m), _run_gsm8k, 0.0, 384, 1319, continuous="ref_logprob"
        ),
        TaskSpec("ifeval", "prompt_strict", lambda _, m: load_ifeval(m), _run_ifeval, 0.0, 512, 541),
        TaskSpec(
            "arithmetic", "accuracy", None, _run_arithmetic, 0.0, ARITHMETIC_MAX_NEW_TOKENS, continuous="ref_logprob"
        ),
    )
}
assert set(MC_BUILDERS) == {n for n, t in TASKS.items() if t.run is _run_mc}


def load_task_items(name: str, n: int | None, eval_seed: int, manifest: Manifest | None):
    """The task's fixed items for this eval seed (data is read, so bad input fails early); a
    generated task (no loader) gets its item count."""
    spec = TASKS[name]
    if spec.load is None:
        return n or ARITHMETIC_DEFAULT_N
    items = spec.load(name, manifest)
    return [items[i] for i in subset(len(items), n, name, eval_seed)]


def normalized(value: float, chance: float) -> float:
    return (value - chance) / (1 - chance)


def run_capability(
    model,
    tokenizer,
    basket: str | Sequence[tuple[str, int | None]],
    *,
    eval_seed: int,
    batch_size: int,
    manifest: Manifest | None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """(results, items): per task its headline `metric`/`value`, `chance`, `n`, every metric and
    `seconds`; `index` is the mean over tasks of (value - chance) / (1 - chance)."""
    tasks = parse_basket(basket) if isinstance(basket, str) else list(basket)
    loaded = {name: load_task_items(name, n, eval_seed, manifest) for name, n in tasks}
    results: dict = {"tasks": {}}
    items: list[dict] = []
    ctx = TaskContext(batch_size=batch_size, eval_seed=eval_seed, manifest=manifest, progress=progress)
    for name, _ in tasks:
        spec, data = TASKS[name], loaded[name]
        start = time.perf_counter()
        metrics, chance, rows = spec.run(model, tokenizer, name, data, ctx)
        if spec.continuous:
            metrics["continuous"] = spec.continuous
        results["tasks"][name] = {
            "metric": spec.metric,
            "value": metrics[spec.metric],
            "chance": chance,
            "n": len(rows),
            **metrics,
            "seconds": round(time.perf_counter() - start, 1),
        }
        items.extend(rows)
    scores = [normalized(t["value"], t["chance"]) for t in results["tasks"].values()]
    results["index"] = sum(scores) / len(scores)
    return results, items
