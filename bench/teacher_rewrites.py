"""Does the context teacher refuse the rewritten prompts it scores? (issue 25) Per group of prompts:
the base model's refusal, the teacher's (the same model with a privileged context) and the flips,
greedy, judged by `heuristic`. A teacher that complies with a rephrasing cannot teach the student to
refuse it; this is what `augment_teacher: original` answers.

    python bench/teacher_rewrites.py RUN_DIR [RUN_DIR ...] [--context ctx-h38] [--json OUT.json]

Groups: each run's augment.jsonl rewrites by style and writer (model, rule, frame), the plain train
originals of the first run, and the first run's evaluation items (generations_base.jsonl: safety,
and the generalization axis by style). Reads the run directories; writes nothing unless --json.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from safedistill.data.schema import PromptRecord
from safedistill.eval.judging import load_judge
from safedistill.models import load_model
from safedistill.searches.context import flip_rates
from safedistill.teachers.context import load_contexts


def groups_of(runs: list[Path]) -> dict[str, list[PromptRecord]]:
    groups: dict[str, list[PromptRecord]] = collections.defaultdict(list)
    for k, run in enumerate(runs):
        for line in (run / "augment.jsonl").read_text().splitlines():
            r = json.loads(line)
            groups[f"train-{r['style']}-{r['by']}"].append(PromptRecord(f"{r['id']}#{k}", r["rewrite"]))
            if k == 0:
                groups["train-plain"].append(PromptRecord(r["id"], r["original"]))
    for line in (runs[0] / "generations_base.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["axis"] == "generalization":
            groups["eval-" + r["id"].split("+")[1]].append(PromptRecord(r["id"], r["prompt"]))
        elif r["axis"] == "safety":
            groups["eval-plain"].append(PromptRecord(r["id"], r["prompt"]))
    return dict(sorted(groups.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories with augment.jsonl (the first also its eval)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context", default="ctx-h38", help="a built-in context id")
    ap.add_argument("--tokens", type=int, default=48, help="answer length (the run's max_new_tokens)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    judge = load_judge("heuristic")
    ctx = [c for c in load_contexts("builtin") if c["id"] == args.context]
    if not ctx:
        ap.error(f"--context: no built-in context {args.context!r}")
    out = {}
    print("| prompts | n | base refusal | teacher refusal | flips |\n|---|---|---|---|---|")
    for name, records in groups_of(args.runs).items():
        (row,) = flip_rates(model, tok, judge, records, [], ctx, max_new_tokens=args.tokens, progress=False)
        n = row["n_harmful"]
        base = (n - row["n_unsafe_base"]) / n
        print(
            f"| {name} | {n} | {base:.2f} | {row['refusal_rate_with_context']:.2f} | {row['n_flipped']} |", flush=True
        )
        out[name] = row | {"base_refusal_rate": base}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
