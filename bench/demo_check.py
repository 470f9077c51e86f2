"""make demo's evaluations and context search with this checkout's code, against an earlier demo run
directory: every generation row (response, label, outcome, value, success, predictions, loglik),
the drift values and flip_rates.json, with the time each took. Run it under the CPU lock.

    python bench/demo_check.py RUN_DIR base final search
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safedistill import methods  # noqa: E402
from safedistill.config import load_config  # noqa: E402
from safedistill.data.packaged import Manifest  # noqa: E402
from safedistill.data.train import TrainSplits  # noqa: E402
from safedistill.eval.evaluate import evaluate  # noqa: E402
from safedistill.eval.judging import load_judge  # noqa: E402
from safedistill.models import load_model  # noqa: E402
from safedistill.report.report import read_items  # noqa: E402
from safedistill.train import drift_reference, eval_settings, merged_in_place, prepare_method  # noqa: E402

RUN = Path(sys.argv[1])
cfg = load_config("opsa", overrides=["model=smollm2-135m-instruct"])
judge = load_judge(cfg.judge)
settings, sources = eval_settings(cfg)
KEYS = ("axis", "task", "id", "response", "label", "outcome", "value", "success", "pred", "pred_norm", "loglik")


def compare(rows, ref, tol_keys=("continuous", "score", "success_score")):
    assert len(rows) == len(ref), (len(rows), len(ref))
    bad, worst = [], {}
    for a, b in zip(rows, ref, strict=True):
        if a["axis"] == "drift":
            if (a["task"], a["id"], a["response"]) != (b["task"], b["id"], b["response"]):
                bad.append((a["axis"], a.get("task"), a["id"]))
            worst["drift"] = max(worst.get("drift", 0.0), abs(a["value"] - b["value"]))
            continue
        if any(a.get(k) != b.get(k) for k in KEYS):
            bad.append((a["axis"], a.get("task"), a["id"], [k for k in KEYS if a.get(k) != b.get(k)]))
        for k in tol_keys:
            if isinstance(a.get(k), float):
                worst[k] = max(worst.get(k, 0.0), abs(a[k] - b[k]))
    return bad, worst


for what in sys.argv[2:]:
    t0 = time.perf_counter()
    if what == "base":
        model, tok = load_model(cfg.model)
        res, rows = evaluate(model, tok, judge, settings, sources, model_name=cfg.model, progress=False)
        took = time.perf_counter() - t0
        bad, worst = compare(rows, read_items(RUN / "generations_base.jsonl"))
        old = json.loads((RUN / "eval_base.json").read_text())["timing"]
    elif what == "final":
        model, tok = load_model(cfg.model, adapter=str(RUN / "final"))
        reference = drift_reference(cfg, RUN, model)
        model = merged_in_place(model)
        model.eval()
        t0 = time.perf_counter()
        res, rows = evaluate(
            model, tok, judge, settings, sources, model_name=cfg.model, progress=False, reference=reference
        )
        took = time.perf_counter() - t0
        bad, worst = compare(rows, read_items(RUN / "generations_final.jsonl"))
        old = json.loads((RUN / "eval_final.json").read_text())["timing"]
    elif what == "search":
        model, tok = load_model(cfg.model)
        manifest = Manifest()
        out = Path(tempfile.mkdtemp())
        from safedistill.eval import base_cache

        base_cache.search_once = lambda compute, inputs, out: compute()  # computed here, never read from the cache
        splits = TrainSplits(cfg.harmful_source, cfg.benign_source, cfg.split_seed, manifest)
        setup = methods.Setup(model, tok, judge, manifest, out, splits, cfg.seed, cfg.model, cfg.judge, False)
        t0 = time.perf_counter()
        prepare_method(cfg, setup)
        took = time.perf_counter() - t0
        new, ref = json.loads((out / "flip_rates.json").read_text()), json.loads((RUN / "flip_rates.json").read_text())
        bad = [] if new == ref else ["flip_rates.json differs"]
        worst, old = {}, {}
        print("chosen", new["chosen"], ref["chosen"])
    by_axis = res["timing"]["by_axis"] if what != "search" else ""
    print(f"{what}: {took:.1f} s (the run's: {old.get('seconds')}), by axis {by_axis}")
    print(f"  was {old.get('by_axis')}")
    print(f"  rows differing: {len(bad)} {bad[:6]}  max abs diff {worst}", flush=True)
