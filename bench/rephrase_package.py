"""Write the shipped model rephrasings of AdvBench's held-out split (data/builtin/rephrasings-advbench.jsonl).

Run once, under the CPU lock, with the bigger bundled model; the demo's 30 eval items first, then the
rest of the held-out split, each style in turn, appending (a rerun continues where it stopped):
    flock /tmp/safedistill-cpu.lock python bench/rephrase_package.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safedistill.data.packaged import Manifest
from safedistill.data.rephrase import MODEL_PROMPT_SHA, STYLES
from safedistill.data.sources import load_prompts
from safedistill.data.splits import split_records, take
from safedistill.eval.rewrite import model_rewrites
from safedistill.models import load_model

MODEL = "qwen2.5-coder-0.5b-instruct"
OUT = Path(__file__).resolve().parents[1] / "src/safedistill/data/builtin/rephrasings-advbench.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="items of the held-out split (demo's order)")
    ap.add_argument("--chunk", type=int, default=30)
    args = ap.parse_args()
    held = split_records(load_prompts("advbench", Manifest()), seed=0, eval_fraction=0.2)[1]
    ordered = take(held, args.limit, seed=0)  # the eval seed 0 order: the demo's 30 come first
    done = set()
    if OUT.exists():
        done = {(r["style"], r["original"]) for r in map(json.loads, OUT.read_text().splitlines()[1:])}
    else:
        OUT.write_text("")
    model, tok = load_model(MODEL)
    if OUT.stat().st_size == 0:
        header = {
            "provenance": {
                "model": MODEL,
                "prompt": "Andriushchenko & Flammarion 2024 few-shot reformulation prompt (past tense; "
                "hypothetical: same construction), data/rephrase.py",
                "prompt_sha256": MODEL_PROMPT_SHA,
                "decoding": "greedy, 48 new tokens, the answer opened with 'Reformulated request: \"'",
                "seed": 0,
                "source": "advbench held-out split (split seed 0, eval fraction 0.2), eval-seed-0 order",
                "date": time.strftime("%Y-%m-%d"),
            }
        }
        OUT.write_text(json.dumps(header) + "\n")
    for start in range(0, len(ordered), args.chunk):
        chunk = ordered[start : start + args.chunk]
        for style in STYLES:
            todo = [r for r in chunk if (style, r.prompt) not in done]
            if not todo:
                continue
            t = time.perf_counter()
            rows = model_rewrites(model, tok, todo, style, progress=False)
            with OUT.open("a") as f:
                for row in rows:
                    f.write(
                        json.dumps({k: row[k] for k in ("original", "style", "rewrite", "overlap", "dropped")}) + "\n"
                    )
            kept = sum(r["rewrite"] is not None for r in rows)
            print(
                f"{style} items {start}-{start + len(chunk)}: {kept}/{len(rows)} kept, {time.perf_counter() - t:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
