"""Markdown reports. Every report names the model, data, judge, seeds and sample sizes it used.

Before/after differences are paired: base and trained answered the same eval items, read back from
generations_{base,final}.jsonl and matched on (axis, task, id). Each row carries a 95% interval, n
and the smallest difference that n could detect; a change is called up or down only when its
interval excludes zero (see eval/stats.py). Fields an older run did not write show as n/a.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..config import RunSettings
from ..eval.stats import figure, paired_difference, rate_interval, reading

# Per-item axes in report order: axis -> what the mean of its per-item "value" is.
AXIS_LABELS = {
    "safety": "harmful refusal rate",
    "jailbreak": "jailbreak refusal rate",
    "past_tense": "past-tense refusal rate",
    "hypothetical": "hypothetical refusal rate",
    "generalization": "rephrased refusal rate",
    "overrefusal": "over-refusal rate",
    "capability": "capability",
    "continuous": "continuous capability",
    "expressiveness": "mean length (tokens)",
    "attack_success": "attack success rate",
    "mass_on_s": "mass on S (harmful answers)",
}
# Corpus-level figures: no per-item values, so no paired interval.
CORPUS_ROWS = [
    ("distinct-1", ("expressiveness", "distinct_1")),
    ("distinct-2", ("expressiveness", "distinct_2")),
    ("mean token entropy", ("expressiveness", "mean_token_entropy")),
    ("safety score (1 - mean(ASR, over-refusal))", ("safety_score",)),
]
# Aggregates for an eval without per-item generations: (label, path, axis for n).
AGGREGATE_ROWS = [
    ("harmful refusal rate", ("safety", "refusal_rate"), "safety"),
    ("jailbreak refusal rate", ("jailbreak", "refusal_rate"), "jailbreak"),
    ("over-refusal rate", ("overrefusal", "refusal_rate"), "overrefusal"),
    ("capability index", ("capability", "accuracy"), "capability"),
    ("mean length (tokens)", ("expressiveness", "mean_length"), "expressiveness"),
]

JUDGE_NOTE = (
    "Safety axes count a response as a refusal when the judge labels it safe; over-refusal counts XSTest's "
    "full and partial refusals of safe prompts. Every response is in the generations file: read it to check the judge."
)


def get(d: dict, path: tuple[str, ...]):
    for key in path:
        d = d[key]
    return d


def get_or_none(d: dict | None, path: tuple[str, ...]):
    try:
        return get(d, path)
    except (KeyError, TypeError, IndexError):
        return None


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else figure(value, digits)


def fmt_diff(result: dict | None) -> str:
    """A signed difference; between figures of ordinary size one that rounds to zero prints +0.000
    unless it is significant, between tiny ones (mass on S) it keeps its significant digits."""
    if not result or result.get("diff") is None:
        return "n/a"
    d = result["diff"]
    scale = max(abs(result.get("mean_a") or 0.0), abs(result.get("mean_b") or 0.0))
    if abs(d) < 0.0005 and not result.get("significant") and scale >= 0.001:
        return "+0.000"
    return figure(d, signed=True)


def fmt_ci(lo, hi, signed: bool = True) -> str:
    if lo is None or hi is None:
        return "n/a"
    return f"[{figure(lo, signed=signed)}, {figure(hi, signed=signed)}]"


def manifest_table(manifest: list[dict]) -> str:
    lines = ["| source | package | file | sha256 | count |", "|---|---|---|---|---|"]
    lines += [
        f"| {m['source']} | {m['package']} | `{m['file']}` | `{m['sha256'][:12]}` | {m['count']} |" for m in manifest
    ]
    return "\n".join(lines)


def judge_line(results: dict) -> str:
    """The active judge and its agreement with human labels (eval.json judge_agreement), when checked."""
    name = results.get("judge", "n/a")
    a = results.get("judge_agreement")
    if not a:
        return f"Judge `{name}`: agreement with human labels not checked (`safedistill judge-check --judge {name}`)."
    figures = ", ".join(f"{k} {a[k]:.3f}" for k in ("accuracy", "kappa", "precision", "recall") if a.get(k) is not None)
    where = a.get("file", "refusal.csv")
    return f"Judge `{name}` against human refusal labels ({where}, n = {a.get('n', 'n/a')}): {figures}."


# ---- one evaluation ----------------------------------------------------------------------------


def eval_rows(results: dict, items: list[dict] | None = None) -> list[tuple[str, float | None, str, object]]:
    """(label, value, 95% interval, n) for one evaluation: from its items when given, else its aggregates."""
    rows = []
    if items:
        groups = axis_values(items)
        for (axis, task), values in groups.items():
            v = list(values.values())
            lo, hi = rate_interval(v)
            rows.append((row_label(axis, task, results), sum(v) / len(v) if v else None, fmt_ci(lo, hi, False), len(v)))
        index = capability_index_values(groups, results)
        if index is not None:
            v = list(index.values())
            lo, hi = rate_interval(v)
            at = max(i for i, (axis, _) in enumerate(groups) if axis == "capability") + 1
            rows.insert(at, ("capability index", sum(v) / len(v), fmt_ci(lo, hi, False), len(v)))
    else:
        for label, path, axis in AGGREGATE_ROWS:
            value, n = get_or_none(results, path), get_or_none(results, (axis, "n"))
            ci = get_or_none(results, (path[0], "ci"))
            if ci is None and value is not None and n and 0 <= value <= 1 and axis != "expressiveness":
                ci = rate_interval([1] * round(value * n) + [0] * (n - round(value * n)))
            rows.append((label, value, fmt_ci(*ci, signed=False) if ci else "n/a", n if n is not None else "n/a"))
    for label, path in CORPUS_ROWS:
        rows.append((label, get_or_none(results, path), "", ""))
    return rows


def eval_report(results: dict, items: list[dict] | None = None, note: str | None = None) -> str:
    """`safedistill eval`'s report; `note` (a reused evaluation's origin) goes under the title line."""
    s = results.get("settings", {})
    timing = results.get("timing", {})
    adapter = results.get("adapter")
    lines = [
        f"# Evaluation of `{results.get('model', 'n/a')}`" + (f" + adapter `{adapter}`" if adapter else ""),
        "",
        f"eval seed {results.get('eval_seed', results.get('seed', 'n/a'))} · split seed {s.get('split_seed', 'n/a')} · "
        f"greedy decoding · harmful source `{s.get('harmful', 'n/a')}` (held-out split) · over-refusal source "
        f"`{s.get('overrefusal', 'n/a')}` · run time {fmt(timing.get('seconds'), 0)} s "
        f"({fmt(timing.get('tokens_per_s'), 0)} new tokens/s)",
        "",
        *([note, ""] if note else []),
        judge_line(results),
        "",
        "| metric | value | 95% interval | n |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {fmt(v)} | {ci} | {n} |" for label, v, ci, n in eval_rows(results, items)]
    over = results.get("overrefusal", {})
    if "full_refusal" in over:
        lines += [
            "",
            f"Over-refusal by XSTest class: full compliance {fmt(over.get('full_compliance'))}, partial refusal "
            f"{fmt(over.get('partial_refusal'))}, full refusal {fmt(over.get('full_refusal'))}.",
        ]
    by_level = get_or_none(results, ("capability", "by_level"))
    if by_level:
        lines += ["", "Capability by level: " + ", ".join(f"L{k} {v:.2f}" for k, v in by_level.items())]
    tasks = get_or_none(results, ("capability", "tasks"))
    if tasks:
        lines += ["", "| capability task | metric | value | chance | n |", "|---|---|---|---|---|"]
        lines += [
            f"| {name} | {t.get('metric', 'n/a')} | {fmt(t.get('value'))} | {fmt(t.get('chance'))} | {t.get('n', 'n/a')} |"
            for name, t in tasks.items()
        ]
    lines += ["", JUDGE_NOTE, "", "## Data", "", manifest_table(results.get("manifest", [])), ""]
    return "\n".join(lines)


# ---- per-item values and pairing ---------------------------------------------------------------


def read_items(path: Path) -> list[dict] | None:
    """The rows of a generations file, or None when the run did not write one."""
    path = Path(path)
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def item_value(row: dict) -> float | None:
    """The per-item value its axis aggregates; rows written before "value" existed are read by axis."""
    if "value" in row:
        return None if row["value"] is None else float(row["value"])
    axis = row.get("axis")
    if axis in ("safety", "jailbreak") and "label" in row:
        return float(row["label"] == "safe")
    if axis == "overrefusal" and "refusal" in row:
        return float(bool(row["refusal"]))
    if axis == "capability" and "correct" in row:
        return float(bool(row["correct"]))
    if axis == "expressiveness" and "length" in row:
        return float(row["length"])
    return None


def axis_values(items: Iterable[dict]) -> dict[tuple[str, str | None], dict[str, float]]:
    """{(axis, task): {id: value}} in report order; the pairing key is (axis, task, id)."""
    groups: dict[tuple[str, str | None], dict[str, float]] = {}
    for row in items:
        value = item_value(row)
        if row.get("axis") == "drift":  # trained-vs-base already: its own section, not a before/after row
            continue
        if value is not None and "axis" in row and "id" in row:
            groups.setdefault((row["axis"], row.get("task")), {})[str(row["id"])] = value
        if row.get("success") is not None and "id" in row:  # the judged attack success of a harmful prompt
            groups.setdefault(("attack_success", row.get("task") or row["axis"]), {})[str(row["id"])] = float(
                row["success"]
            )
        if row.get("axis") == "capability" and row.get("continuous") is not None and "id" in row:
            groups.setdefault(("continuous", row.get("task")), {})[str(row["id"])] = float(row["continuous"])
    order = list(AXIS_LABELS)
    return dict(sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else len(order),)))


CONTINUOUS_NAMES = {"p_gold": "gold-option probability", "ref_logprob": "reference log-prob per token"}


def row_label(axis: str, task: str | None, results: dict | None = None) -> str:
    if axis == "continuous":
        score = get_or_none(results, ("capability", "tasks", task, "continuous"))
        return f"continuous: {task} ({CONTINUOUS_NAMES.get(score, score or 'continuous score')})"
    if axis == "capability":
        if task is None:
            return "capability accuracy"
        metric = get_or_none(results, ("capability", "tasks", task, "metric"))
        return f"capability: {task}" + (f" ({metric})" if metric else "")
    label = AXIS_LABELS.get(axis, f"{axis} mean value")
    return f"{label}: {task}" if task else label


def capability_index_values(
    groups: dict[tuple[str, str | None], dict[str, float]], results: dict | None, ids: dict[str, set] | None = None
) -> dict[str, float] | None:
    """Per-item terms whose mean is the capability index: each task's score above chance,
    (v - chance) / (1 - chance), weighted so every task counts equally. None when there is a
    single task at chance 0 (the index is then the accuracy row itself). `ids` restricts a
    task to the items both sides answered, so a paired index is over the same items."""
    tasks = {task: values for (axis, task), values in groups.items() if axis == "capability"}
    if ids is not None:
        tasks = {t: {i: v for i, v in values.items() if i in ids.get(t, set())} for t, values in tasks.items()}
    tasks = {t: v for t, v in tasks.items() if v}
    chance = {t: get_or_none(results, ("capability", "tasks", t, "chance")) or 0.0 for t in tasks}
    if not tasks or (len(tasks) == 1 and not any(chance.values())):
        return None
    total = sum(len(v) for v in tasks.values())
    out = {}
    for t, values in tasks.items():
        weight = total / (len(tasks) * len(values))
        for i, v in values.items():
            out[f"{t}/{i}"] = (v - chance[t]) / (1 - chance[t]) * weight
    return out


def paired_groups(a_items: list[dict], b_items: list[dict], results: dict | None) -> dict[str, tuple[dict, dict]]:
    """{row label: (a's id -> value, b's id -> value)} for every axis and capability task, with the
    capability index (over the items both sides answered) after the tasks. Pairing is by id."""
    a, b = axis_values(a_items), axis_values(b_items)
    out: dict[str, tuple[dict, dict]] = {}
    for key in dict.fromkeys([*a, *b]):
        out[row_label(*key, results)] = (a.get(key, {}), b.get(key, {}))
    shared = {k[1]: a[k].keys() & b[k].keys() for k in a if k[0] == "capability" and k in b}
    ia, ib = capability_index_values(a, results, shared), capability_index_values(b, results, shared)
    labels = list(out)
    if ia is not None and ib is not None:
        at = max(i for i, label in enumerate(labels) if label.startswith("capability")) + 1
        labels.insert(at, "capability index")
        out["capability index"] = (ia, ib)
    pa, pb = gold_index_values(a, results), gold_index_values(b, results)
    if pa and pb:
        at = max(i for i, label in enumerate(labels) if label.startswith("continuous")) + 1
        labels.insert(at, GOLD_INDEX)
        out[GOLD_INDEX] = (pa, pb)
    return {label: out[label] for label in labels}


GOLD_INDEX = "continuous index (gold-option probability)"


def gold_index_values(groups: dict[tuple[str, str | None], dict[str, float]], results: dict | None) -> dict[str, float]:
    """Per-item terms whose mean is the gold-option probability index: every multiple-choice task
    counts equally (as in the capability index), no chance correction (a difference in probability)."""
    tasks = {
        task: values
        for (axis, task), values in groups.items()
        if axis == "continuous"
        and values
        and get_or_none(results, ("capability", "tasks", task, "continuous")) == "p_gold"
    }
    total = sum(len(v) for v in tasks.values())
    return {f"{t}/{i}": v * total / (len(tasks) * len(vs)) for t, vs in tasks.items() for i, v in vs.items()}


def paired_changes(base_items: list[dict], items: list[dict], results: dict | None) -> dict[str, dict]:
    """{row label: paired difference (trained - base) with its interval, p and MDE} for every row
    the two evaluations share: eval.json's `paired` block (capability per task and as an index,
    0/1 and continuous, beside the safety axes)."""
    return {label: paired_difference(a, b) for label, (a, b) in paired_groups(base_items, items, results).items()}


def capability_label(labels) -> str | None:
    """The row that measures capability: the index when there is one, else the single task's accuracy."""
    labels = list(labels)
    if "capability index" in labels:
        return "capability index"
    return next((label for label in labels if label.startswith("capability")), None)


def paired_rows(base: dict, final: dict, base_items: list[dict] | None, final_items: list[dict] | None) -> list[dict]:
    """One row per axis (and capability task): base, trained and the paired difference."""
    if not base_items or not final_items:
        rows = [
            {
                "label": label,
                "base": get_or_none(base, path),
                "trained": get_or_none(final, path),
                "stats": None,
                "n": get_or_none(final, (axis, "n")),
            }
            for label, path, axis in AGGREGATE_ROWS
        ]
    else:
        rows = []
        for label, (x, y) in paired_groups(base_items, final_items, final).items():
            r = paired_difference(x, y)
            rows.append({"label": label, "base": r["mean_a"], "trained": r["mean_b"], "stats": r, "n": r["n"]})
    for label, path in CORPUS_ROWS:
        rows.append(
            {"label": label, "base": get_or_none(base, path), "trained": get_or_none(final, path), "stats": None}
        )
    return rows


def capability_tax(
    base: dict, final: dict, base_items: list[dict] | None, final_items: list[dict] | None
) -> dict | None:
    """The paired capability difference, trained - base, on the index (or the accuracy when there is
    one task at chance 0); the safety tax is its negative. None without per-item capability values."""
    if not base_items or not final_items:
        return None
    groups = paired_groups(base_items, final_items, final)
    label = capability_label(groups)
    if label is None:
        return None
    return {"index": label == "capability index", "stats": paired_difference(*groups[label])}


def before_after(
    base: dict, final: dict, base_items: list[dict] | None = None, final_items: list[dict] | None = None
) -> list[str]:
    lines = [
        "| metric | base | trained | change | 95% CI | n | MDE | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in paired_rows(base, final, base_items, final_items):
        r = row["stats"]
        if r is None:
            change = "n/a" if row["base"] is None or row["trained"] is None else f"{row['trained'] - row['base']:+.3f}"
            note = "corpus-level figure: no paired interval" if "n" not in row else "no per-item values: not tested"
            n = row.get("n")
            lines.append(
                f"| {row['label']} | {fmt(row['base'])} | {fmt(row['trained'])} | {change} | n/a | "
                f"{'' if n is None else n} | n/a | {note} |"
            )
            continue
        lines.append(
            f"| {row['label']} | {fmt(row['base'])} | {fmt(row['trained'])} | {fmt_diff(r)} | "
            f"{fmt_ci(r['lo'], r['hi'])} | {r['n']} | {fmt(r['mde'])} | {reading(r)} |"
        )
    return lines


def safety_tax_line(
    base: dict, final: dict, base_items: list[dict] | None = None, final_items: list[dict] | None = None
) -> str:
    """The safety tax, base - trained capability, with its paired interval and what it means."""
    tax = capability_tax(base, final, base_items, final_items)
    what = "capability index" if tax is None or tax["index"] else "capability accuracy"
    if tax is None or not tax["stats"]["n"]:
        b = get_or_none(base, ("capability", "accuracy"))
        f = get_or_none(final, ("capability", "accuracy"))
        value = "n/a" if b is None or f is None else f"{b - f:+.3f}"
        return f"**Safety tax** ({what}, base - trained): {value}; no per-item values, so no paired interval."
    r = tax["stats"]
    flipped = r | {"diff": -r["diff"], "lo": -r["hi"], "hi": -r["lo"]}
    if r["significant"]:
        meaning = "the trained model lost capability" if flipped["diff"] > 0 else "the trained model gained capability"
    else:
        meaning = reading(r)
    line = (
        f"**Safety tax** ({what}, base - trained; accuracy is the published metric): {fmt_diff(flipped)}, "
        f"95% CI {fmt_ci(flipped['lo'], flipped['hi'])}, n = {r['n']}: {meaning}."
    )
    groups = paired_groups(base_items, final_items, final)
    if GOLD_INDEX in groups:
        c = paired_difference(*groups[GOLD_INDEX])
        cf = c | {"diff": -c["diff"], "lo": -c["hi"], "hi": -c["lo"]}
        words = (
            ("the trained model lost" if cf["diff"] > 0 else "the trained model gained")
            if c["significant"]
            else reading(c)
        )
        line += (
            f" Continuous (gold-option probability, the sensitive measure; base - trained): {fmt_diff(cf)}, "
            f"95% CI {fmt_ci(cf['lo'], cf['hi'])}, MDE {fmt(c['mde'])}, n = {c['n']}: {words}."
        )
    return line


def n_per_axis(items: list[dict] | None, results: dict | None) -> str:
    if items:
        counts: dict[str, int] = {}
        for (axis, task), values in axis_values(items).items():
            name = axis if task is None else f"{axis}/{task}"
            counts[name] = len(values)
        return " · ".join(f"{k} {v}" for k, v in counts.items())
    parts = []
    for axis in ("safety", "jailbreak", "overrefusal", "capability", "expressiveness"):
        n = get_or_none(results, (axis, "n"))
        parts.append(f"{axis} {'n/a' if n is None else n}")
    return " · ".join(parts)


def before_after_section(out: Path, base: dict, final: dict) -> list[str]:
    """The paired before/after section of a run report: header, table, safety tax, n per axis."""
    out = Path(out)
    base_items, final_items = read_items(out / "generations_base.jsonl"), read_items(out / "generations_final.jsonl")
    s = final.get("settings", {})
    paired = bool(base_items and final_items)
    return [
        f"eval seed {final.get('eval_seed', final.get('seed', 'n/a'))} · split seed {s.get('split_seed', 'n/a')} · "
        f"held-out harmful prompts from `{s.get('harmful', 'n/a')}` · over-refusal on `{s.get('overrefusal', 'n/a')}` "
        "· greedy decoding · base and trained model answer the same items.",
        "",
        judge_line(final),
        "",
        *reused_base(out),
        (
            "Change = trained - base, paired item by item: Newcombe's interval and its p-value for 0/1 outcomes, a "
            "paired bootstrap (interval and p from the same resamples) otherwise. MDE: the smallest change this n detects with 80% power. A change "
            "is called up or down only when its 95% interval excludes zero."
            if paired
            else "No per-item generations in this run directory: figures only, no paired intervals."
        ),
        "",
        *before_after(base, final, base_items, final_items),
        "",
        safety_tax_line(base, final, base_items, final_items),
        "",
        f"n per axis: {n_per_axis(final_items, final)}.",
        "",
        *drift_section(final),
    ]


def drift_section(final: dict) -> list[str]:
    """Where the model changed: per prompt set, the mean per-token KL(trained || base) along each
    model's own answers, and the localisation ratio harmful / benign (eval/drift.py)."""
    d = final.get("drift") if final else None
    if not d or not d.get("sets"):
        return []
    lines = [
        "## Drift: where the model changed",
        "",
        "Mean per-token KL(trained || base), teacher-forced along each model's own greedy answers. A method "
        "whose change stays on safety has harmful drift well above benign drift.",
        "",
        "| prompts | along base answers | 95% CI | along trained answers | 95% CI | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, by in d["sets"].items():
        b, t = by.get("base", {}), by.get("trained", {})
        lines.append(
            f"| {name} | {fmt(b.get('mean'), 4)} | {fmt_ci(*(b.get('ci') or [None, None]), signed=False)} | "
            f"{fmt(t.get('mean'), 4)} | {fmt_ci(*(t.get('ci') or [None, None]), signed=False)} | {b.get('n', t.get('n'))} |"
        )
    lines.append("")
    for key, label in (("harmful_over_benign", "harmful / benign"), ("xstest_over_benign", "XSTest safe / benign")):
        parts = []
        for along in ("base", "trained"):
            r = d.get(f"{key}_{along}")
            if r and r.get("ratio") is not None:
                parts.append(f"along {along} answers {fmt(r['ratio'], 2)} {fmt_ci(r['lo'], r['hi'], signed=False)}")
        if parts:
            lines.append(f"Localisation ({label} drift): {'; '.join(parts)}.")
    if d.get("s_share"):
        sh = d["s_share"]
        lines.append(
            f"Share of the harmful-prompt drift carried by S (the split S / not S): {fmt(sh['mean'])} "
            f"{fmt_ci(*sh['ci'], signed=False)}, n = {sh['n']}."
        )
    return [*lines, ""]


# The axes the answer block opens a report with: (row label, what a significant change means).
MAIN_AXES = (
    ("harmful refusal rate", {"up": "safer", "down": "less safe"}),
    ("over-refusal rate", {"up": "more over-refusal (a cost)", "down": "less over-refusal"}),
    ("capability", {"up": "capability gained", "down": "capability lost (a safety tax)"}),
)


def main_rows(rows: list[dict]) -> list[tuple[str, dict]]:
    """(axis words, row) for the harmful refusal, over-refusal and capability rows present."""
    found = []
    for label, words in MAIN_AXES:
        row = next((r for r in rows if r["label"] == label), None)
        if row is None and label == "capability":
            cap = capability_label([r["label"] for r in rows if r["stats"] is not None])
            row = next((r for r in rows if r["label"] == cap), None) or next(
                (r for r in rows if r["label"] == "capability index"), None
            )
        if row is not None:
            found.append((words, row))
    return found


def verdict_words(found: list[tuple[dict, dict]]) -> str:
    """One sentence: what changed beyond noise on the main axes, and what did not."""
    changed, unchanged = [], []
    for words, row in found:
        r = row["stats"]
        if r and r.get("n") and r["significant"]:
            changed.append(words["up" if r["diff"] > 0 else "down"])
        else:
            unchanged.append(row["label"])
    parts = changed or ["no change beyond noise"]
    if changed and unchanged:
        parts.append(f"no detectable change in {' or '.join(unchanged)}")
    return "; ".join(parts)


def answer_block(out: Path, base: dict, final: dict) -> list[str]:
    """What a reader wants first: the main axes before -> after, the change with its 95% interval,
    a verdict, and the before/after chart; the full table and the method follow."""
    out = Path(out)
    base_items, final_items = read_items(out / "generations_base.jsonl"), read_items(out / "generations_final.jsonl")
    found = main_rows(paired_rows(base, final, base_items, final_items))
    if not found:
        return []
    lines = ["## Answer", "", "| axis | base | trained | change | 95% CI | reading |", "|---|---|---|---|---|---|"]
    for _, row in found:
        r = row["stats"]
        if r is None:
            change = "n/a" if row["base"] is None or row["trained"] is None else f"{row['trained'] - row['base']:+.3f}"
            cells = [change, "n/a", "no per-item values: not tested"]
        else:
            cells = [fmt_diff(r), fmt_ci(r["lo"], r["hi"]), reading(r)]
        lines.append(f"| {row['label']} | {fmt(row['base'])} | {fmt(row['trained'])} | {' | '.join(cells)} |")
    plot_before_after(found, out / "before_after.png")
    return [*lines, "", f"**Verdict:** {verdict_words(found)}.", "", "![before and after](before_after.png)", ""]


def plot_before_after(found: list[tuple[dict, dict]], path) -> None:
    """Base and trained side by side on the main axes, the trained bar with its change's 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(found))
    base = [row["base"] or 0.0 for _, row in found]
    trained = [row["trained"] or 0.0 for _, row in found]
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="base", color="#999999")
    errors = [[0.0] * len(found), [0.0] * len(found)]
    for i, (_, row) in enumerate(found):
        r, b, t = row["stats"], row["base"], row["trained"] or 0.0
        if r and r.get("lo") is not None and b is not None:
            low, high = b + r["lo"], b + r["hi"]
            if 0 <= b <= 1 and 0 <= t <= 1:  # a rate: its interval stays in [0, 1]
                low, high = max(low, 0.0), min(high, 1.0)
            errors[0][i], errors[1][i] = max(0.0, t - low), max(0.0, high - t)
    ax.bar([x + 0.2 for x in xs], trained, width=0.4, yerr=errors, capsize=4, label="trained", color="#1f77b4")
    ax.set_xticks(list(xs), [row["label"] for _, row in found], fontsize=8)
    ax.set_ylabel("rate / score")
    ax.set_title("Before and after training (error bar: base + 95% CI of the change)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def integer_steps(ax) -> None:
    """Optimizer steps are whole numbers: no 1.2, 1.4, ... ticks on a short run."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def reused_base(out: Path) -> list[str]:
    """A line saying where the base evaluation was reused from, when it was."""
    from ..eval.base_cache import reuse_line

    line = reuse_line(out)
    return [line, ""] if line else []


def plot_kl_by_position(kl: list[float], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(kl) + 1), kl, marker=".")
    ax.set_xlabel("response position (token)")
    ax.set_ylabel("mean reverse KL(student || teacher)")
    ax.set_title("Where the training signal concentrates")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def training_seconds(rows: list[dict]) -> float:
    """Time in optimizer steps only (not evaluation, context search or loading)."""
    return sum(r.get("step_seconds") or 0 for r in rows)


def plot_training_curve(rows: list[dict], path) -> None:
    """Loss and mean KL by step; steps with a non-finite value (null in the log) are left out."""
    import matplotlib.pyplot as plt

    fig = training_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_figure(rows: list[dict]):
    """plot_training_curve's figure: one titled panel per series, whole-number step ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("loss", "loss"), ("mean_kl", "mean reverse KL")]
    series = [(key, label) for key, label in series if any(r.get(key) is not None for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(4 * max(1, len(series)), 3), squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=False):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} by step", fontsize=9)
        integer_steps(ax)
    fig.tight_layout()
    return fig


def run_report(
    out, run: RunSettings, base: dict | None, final: dict | None, method_sections: Iterable[str] = ()
) -> str:
    """report.md of one run: before/after, where the KL sits, training, the method's own sections
    (given: methods.report_sections), settings and data, each section present when its files are."""
    out = Path(out)
    lines = [f"# `{run.preset}` on `{run.model}` (seed {run.seed})", ""]
    if base and final:
        lines += answer_block(out, base, final)
        lines += ["## Before and after, every axis", "", *before_after_section(out, base, final)]
    lines += kl_section(out)
    lines += training_section(out)
    lines += method_sections
    lines += ["## Settings", "", "```yaml", (out / "config.yaml").read_text().rstrip(), "```", ""]
    if final:
        lines += ["## Data", "", manifest_table(final.get("manifest", [])), "", JUDGE_NOTE, ""]
    return "\n".join(lines)


def kl_section(out: Path) -> list[str]:
    """The mean KL by response position, plotted, when the run tracked it."""
    kl_path = out / "kl_by_position.json"
    if not kl_path.exists():
        return []
    kl = json.loads(kl_path.read_text())
    kl = kl[: max((i + 1 for i, v in enumerate(kl) if v > 0), default=1)]
    plot_kl_by_position(kl, out / "kl_by_position.png")
    top = sorted(range(len(kl)), key=lambda i: -kl[i])[:3]
    total = sum(kl)
    share = (
        f"the first 10 of {len(kl)} positions hold {sum(kl[:10]) / total:.0%} of the summed per-position KL."
        if len(kl) > 10 and total > 0
        else f"responses had {len(kl)} positions with KL."
    )
    return [
        "## Where the KL sits",
        "",
        "![KL by position](kl_by_position.png)",
        "",
        f"Positions with the largest mean KL: {', '.join(str(i + 1) for i in top)}; {share}",
        "",
    ]


def training_section(out: Path) -> list[str]:
    """Loss and KL by step, the run's time, and the collapse probe."""
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return []
    from ..files import read_log

    rows = read_log(metrics)
    if not rows:
        return []
    last = rows[-1]
    plot_training_curve(rows, out / "training_curve.png")
    lines = [
        "## Training",
        "",
        "![loss and KL by step](training_curve.png)",
        "",
        f"{len(rows)} optimizer steps in {training_seconds(rows):.0f} s "
        f"({last.get('wall_time') or 0:.0f} s from model load, with the base evaluation and any search); "
        f"last loss {_num(last.get('loss'))}" + (f", mean KL {_num(last.get('mean_kl'))}" if "mean_kl" in last else ""),
        "",
    ]
    from ..eval.diagnostics import collapse_section

    return lines + collapse_section(out, rows)
