"""Per-task capability scores and times for one model, task by task, as `safedistill eval` computes
them (run_capability), written after every task so a long basket can be read while it runs.

    python bench/capability.py OUT.json BASKET [BASKET ...]
    python bench/capability.py m.json demo default --model smollm2-135m-instruct

BASKET is "demo", "default" or TASK[:N],... (eval/capability.py). Prints one JSON line per task;
OUT.json holds {"runs": [{"basket", "tasks", "items", "seconds", "manifest"}]}. Run it under
`flock /tmp/safedistill-cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from safedistill.data.packaged import Manifest
from safedistill.eval.capability import DEFAULT_BASKET, DEMO_BASKET, parse_basket, run_capability
from safedistill.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("baskets", nargs="+")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    log: dict = {"model": args.model, "eval_seed": args.eval_seed, "threads": torch.get_num_threads(), "runs": []}
    for spec in args.baskets:
        basket = {"demo": DEMO_BASKET, "default": DEFAULT_BASKET}.get(spec, spec)
        manifest, start = Manifest(), time.perf_counter()
        run: dict = {"basket": basket, "tasks": {}, "items": []}
        log["runs"].append(run)
        for name, n in parse_basket(basket):
            results, items = run_capability(
                model,
                tok,
                [(name, n)],
                eval_seed=args.eval_seed,
                batch_size=args.batch_size,
                manifest=manifest,
                progress=False,
            )
            run["tasks"][name] = results["tasks"][name]
            run["items"] += items
            run["seconds"] = round(time.perf_counter() - start, 1)
            run["manifest"] = manifest.to_list()
            print(json.dumps({"task": name, **results["tasks"][name]}), flush=True)
            with open(args.out, "w") as f:
                json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
