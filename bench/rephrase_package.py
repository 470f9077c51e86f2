"""Write the shipped model rephrasings of AdvBench's held-out split (data/builtin/rephrasings-advbench.jsonl).

Run once, under the CPU lock, with the bigger bundled model; the demo's 30 eval items first, then the
rest of the held-out split, each style in turn, appending (a rerun continues where it stopped, so
the work splits into lock holds of at most --minutes each):
    flock /tmp/safedistill-cpu.lock python bench/rephrase_package.py [--limit N] [--minutes M] [--raw PATH]
The first line (provenance) is rewritten at the end of each piece with what the file covers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safedistill.data.packaged import Manifest
from safedistill.data.rephrase import MODEL_PROMPT_SHA, STYLES, in_style
from safedistill.data.sources import load_prompts
from safedistill.data.splits import split_records, take
from safedistill.eval.rewrite import model_rewrites
from safedistill.models import load_model

MODEL = "qwen2.5-coder-0.5b-instruct"
FILTERS = (
    "model_rewrites' filters (eval/rewrite.py, data/rephrase.py): a copy (word overlap >= 0.95), a rewrite that "
    "lost the request (under half its content words), one that repeats a prompt example or one not framed in the "
    "style (data/rephrase.in_style) is dropped and asked again; rows of the first "
    "piece were written before the style check existed and were checked afterwards, without a new attempt"
)
OUT = Path(__file__).resolve().parents[1] / "src/safedistill/data/builtin/rephrasings-advbench.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="items of the held-out split (demo's order)")
    ap.add_argument("--chunk", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=None, help="start no new chunk after this many minutes")
    ap.add_argument("--attempts", type=int, default=3, help="greedy, then sampled retries of dropped items")
    ap.add_argument("--out", type=Path, default=OUT, help="the file written (default: the package's)")
    ap.add_argument("--raw", type=Path, default=None, help="also append each model answer, uncleaned, here")
    args = ap.parse_args()
    out = args.out
    began = time.perf_counter()
    held = split_records(load_prompts("advbench", Manifest()), seed=0, eval_fraction=0.2)[1]
    ordered = take(held, args.limit, seed=0)  # the eval seed 0 order: the demo's 30 come first
    done = set()
    if out.exists():
        done = {(r["style"], r["original"]) for r in map(json.loads, out.read_text().splitlines()[1:])}
    else:
        out.write_text("")
    model, tok = load_model(MODEL)
    if out.stat().st_size == 0:
        header = {
            "provenance": {
                "model": MODEL,
                "prompt": "Andriushchenko & Flammarion 2024 few-shot reformulation prompt (past tense; "
                "hypothetical: same construction), data/rephrase.py",
                "prompt_sha256": MODEL_PROMPT_SHA,
                "decoding": f"greedy, 48 new tokens, the answer opened with 'Reformulated request: \"'; an item "
                f"dropped by the filters asked again up to {args.attempts - 1} times, sampled at temperature 1.0 "
                "(seed 0 + attempt), the first kept rewrite counts (the paper samples several per request)",
                "seed": 0,
                "filters": FILTERS,
                "source": "advbench held-out split (split seed 0, eval fraction 0.2), eval-seed-0 order",
                "date": time.strftime("%Y-%m-%d"),
            }
        }
        out.write_text(json.dumps(header) + "\n")
    for start in range(0, len(ordered), args.chunk):
        if args.minutes is not None and time.perf_counter() - began > 60 * args.minutes:
            print(f"stopped after {(time.perf_counter() - began) / 60:.1f} min; rerun to continue", flush=True)
            break
        chunk = ordered[start : start + args.chunk]
        for style in STYLES:
            todo = [r for r in chunk if (style, r.prompt) not in done]
            if not todo:
                continue
            t = time.perf_counter()
            rows = model_rewrites(model, tok, todo, style, attempts=args.attempts, progress=False)
            with out.open("a") as f:
                for row in rows:
                    f.write(
                        json.dumps(
                            {k: row[k] for k in ("original", "style", "rewrite", "overlap", "dropped", "attempt")}
                        )
                        + "\n"
                    )
            if args.raw is not None:
                with args.raw.open("a") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
            kept = sum(r["rewrite"] is not None for r in rows)
            print(
                f"{style} items {start}-{start + len(chunk)}: {kept}/{len(rows)} kept, {time.perf_counter() - t:.0f} s",
                flush=True,
            )
    _cover(ordered, out)


def _cover(ordered, out: Path) -> None:
    """The provenance line's "covered": which held-out items the file now has, per style. Rows
    written before model_rewrites checked the style (data/rephrase.in_style) are checked here."""
    lines = out.read_text().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    for r in rows:
        if r["rewrite"] and not in_style(r["rewrite"], r["style"]):
            r["rewrite"], r["dropped"] = None, "not in the style"
    lines = lines[:1] + [json.dumps(r) for r in rows]
    header["provenance"]["filters"] = FILTERS
    position = {r.prompt: i for i, r in enumerate(ordered)}
    parts = []
    for style in STYLES:
        have = [position[r["original"]] for r in rows if r["style"] == style and r["original"] in position]
        kept = sum(1 for r in rows if r["style"] == style and r["rewrite"])
        first = next((i for i in range(len(ordered)) if i not in set(have)), len(ordered))
        parts.append(f"{style}: the first {first} of the {len(ordered)} held-out items written, {kept} kept")
    header["provenance"]["covered"] = (
        "; ".join(parts) + " (eval-seed-0 order; make demo's 30 first); items not covered are written on first use"
    )
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")


if __name__ == "__main__":
    main()
