"""Run several presets on the same data, budget and seeds; compare them item by item.

Base and trained models answer the same eval items (a fixed eval seed), so every method is compared
with the base, and every pair of methods with each other, item by item, pooled over training seeds
by a cluster bootstrap over items (eval/stats.py). A difference is called real only when its 95%
interval excludes zero. The verdict names a best trade-off only among methods whose harmful-refusal
gain over the base is significant, and says plainly when there is none. With frontier steps, each
run is also evaluated at those checkpoints, which gives capability at matched safety.
"""

from __future__ import annotations

import json
import shutil
import statistics
from itertools import combinations
from pathlib import Path

from .. import rundir
from ..config import RunConfig, load_config
from ..errors import UserError
from ..eval.drift import ratio_interval
from ..eval.evaluate import settings_record
from ..eval.stats import clustered_difference, clustered_mean, reading
from ..files import atomic_write_text, write_json
from ..methods import check_config
from ..train import eval_settings, evaluate_checkpoint, finished_run, train
from .report import (
    axis_values,
    capability_index_values,
    capability_label,
    fmt,
    fmt_ci,
    fmt_diff,
    get_or_none,
    judge_line,
    paired_groups,
    read_items,
)

# Per-seed aggregates from eval.json, kept as a descriptive table (mean and sd over seeds; not a test).
METRICS = [
    ("refusal", ("safety", "refusal_rate")),
    ("jailbreak_asr", ("jailbreak", "asr")),
    ("overrefusal", ("overrefusal", "refusal_rate")),
    ("capability", ("capability", "accuracy")),
    ("safety_score", ("safety_score",)),
    ("mean_length", ("expressiveness", "mean_length")),
    ("distinct_2", ("expressiveness", "distinct_2")),
    ("entropy", ("expressiveness", "mean_token_entropy")),
]
SAFETY = "harmful refusal rate"
OVERREFUSAL = "over-refusal rate"
MASS_ON_S = "mass on S (harmful answers)"  # only with steer_from (SafeSteer's S)
BETWEEN_METHODS = (SAFETY, "jailbreak refusal rate", OVERREFUSAL, MASS_ON_S)  # plus the capability row


def summarize(values: list[float | None]) -> dict:
    """Mean and sd over seeds, for description only; None when a run lacks the figure."""
    if any(v is None for v in values):
        return {"mean": None, "std": None, "values": values}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def check_frontier_steps(configs: dict[tuple[str, int], RunConfig], steps: list[int]) -> None:
    """Every frontier step must have a checkpoint (or be 0 = the base, or the last step)."""
    for (preset, _), cfg in configs.items():
        if steps and not cfg.eval:
            raise UserError(f"--frontier-steps: preset {preset} runs with eval=false, so there is nothing to plot")
        for step in steps:
            if step < 0 or step > cfg.steps:
                raise UserError(f"--frontier-steps {step}: preset {preset} trains for {cfg.steps} steps")
            if step not in (0, cfg.steps) and step % cfg.save_every:
                raise UserError(
                    f"--frontier-steps {step}: preset {preset} saves a checkpoint every {cfg.save_every} steps "
                    f"(set save_every to a divisor of {step})"
                )


def reuse_base_eval(model: str, settings, run_dir: Path, done: list[tuple[str, object, Path]]) -> None:
    """The base model's evaluation depends only on the model and the eval settings (a fixed eval
    seed, not the training seed): copy it from any earlier run with the same ones."""
    for done_model, done_settings, source in done:
        if done_model == model and done_settings == settings:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("eval_base.json", "generations_base.jsonl"):
                if (source / name).exists() and not (run_dir / name).exists():
                    shutil.copyfile(source / name, run_dir / name)
            return


def eval_files(run_dir: Path, step: int, last: int) -> tuple[dict | None, list[dict] | None]:
    """A run's eval at `step` (0: the base, `last`: the final model) and its per-item generations."""
    name = "base" if step == 0 else "final" if step == last else f"step-{step}"
    path = run_dir / f"eval_{name}.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    return results, read_items(run_dir / f"generations_{name}.jsonl")


def compare(
    presets: list[str],
    *,
    model: str | None = None,
    out: Path,
    seeds: list[int],
    config_file: str | None = None,
    overrides: list[str] = (),
    resume: bool = False,
    frontier_steps: list[int] = (),
) -> dict:
    """Every preset x seed trained and evaluated (finished runs reused), then compared with the
    base model and with each other: compare.json, compare.md and frontier.png in `out`."""
    out = Path(out)
    frontier_steps = sorted(set(frontier_steps))
    configs = load_configs(presets, seeds, model=model, config_file=config_file, overrides=overrides)
    check_frontier_steps(configs, frontier_steps)
    results = run_all(configs, out, resume=resume, frontier_steps=frontier_steps)
    summary = summarise(presets, seeds, configs, results, out)
    summary["frontier"] = frontier(presets, seeds, configs, out, frontier_steps)
    summary["verdict"] = verdict(summary)
    write_json(out / "compare.json", summary)
    plot_frontier(summary, out / "frontier.png")
    atomic_write_text(out / "compare.md", compare_report(summary))
    return summary


def load_configs(
    presets: list[str], seeds: list[int], *, model: str | None, config_file: str | None, overrides: list[str]
) -> dict[tuple[str, int], object]:
    """Every preset x seed's config, so a bad preset or override fails before anything trains."""
    configs = {
        (preset, seed): load_config(
            preset,
            config_file=config_file,
            overrides=[*overrides, *([f"model={model}"] if model is not None else []), f"seed={seed}"],
        )
        for preset in presets
        for seed in seeds
    }
    for cfg in configs.values():
        check_config(cfg)
    return configs


def run_all(configs: dict, out: Path, *, resume: bool, frontier_steps: list[int]) -> dict[tuple[str, int], dict]:
    """Train and evaluate each run in turn (a finished one is read back), sharing a base model's
    evaluation between runs with the same model and eval settings, plus the frontier checkpoints."""
    done: list[tuple[str, object, Path]] = []
    results: dict[tuple[str, int], dict] = {}
    for (preset, seed), cfg in configs.items():
        run_dir = out / preset / f"seed-{seed}"
        rundir.check_out_dir(run_dir)
        with rundir.hold(run_dir):  # this run's directory is ours until its evaluations are written
            if cfg.eval:
                reuse_base_eval(cfg.model, settings_record(*eval_settings(cfg)), run_dir, done)
            results[(preset, seed)] = finished_run(cfg, run_dir) or train(
                cfg, run_dir, resume=resume or (run_dir / "config.yaml").exists()
            )
            if cfg.eval and (run_dir / "eval_base.json").exists():
                done.append((cfg.model, settings_record(*eval_settings(cfg)), run_dir))
            for step in frontier_steps:
                if step not in (0, cfg.steps):
                    evaluate_checkpoint(cfg, run_dir, step)
    return results


def summarise(presets: list[str], seeds: list[int], configs: dict, results: dict, out: Path) -> dict:
    """The descriptive table, each method against the base model, and each pair of methods, with
    paired statistics over the same eval items."""
    items = {
        key: (
            read_items(out / key[0] / f"seed-{key[1]}" / "generations_base.jsonl"),
            read_items(out / key[0] / f"seed-{key[1]}" / "generations_final.jsonl"),
        )
        for key in results
    }
    first = results[(presets[0], seeds[0])]["final"] or {}
    return {
        "model": configs[(presets[0], seeds[0])].model,
        "seeds": seeds,
        "presets": presets,
        "judge": first.get("judge"),
        "judge_agreement": first.get("judge_agreement"),
        "eval_seed": first.get("eval_seed", first.get("seed")),
        "eval_n": {k: get_or_none(first, (k, "n")) for k in ("safety", "overrefusal", "capability")},
        **descriptive(presets, seeds, results),
        "vs_base": {
            p: pooled([(items[(p, s)][0], items[(p, s)][1], results[(p, s)]["final"]) for s in seeds]) for p in presets
        },
        "between": {
            f"{b} - {a}": pooled([(items[(a, s)][1], items[(b, s)][1], results[(b, s)]["final"]) for s in seeds])
            for a, b in combinations(presets, 2)
        },
        "drift": {p: drift_by_method([items[(p, s)][1] for s in seeds]) for p in presets},
    }


def drift_by_method(finals: list[list[dict] | None]) -> dict:
    """Per drift set and answer source, the mean per-token KL(trained || base) pooled over seeds
    (a cluster bootstrap over items), and the harmful / benign ratio along the base's answers."""
    maps: dict[str, list[dict[str, float]]] = {}
    shares: list[dict[str, float]] = []
    for rows in finals:
        per: dict[str, dict[str, float]] = {}
        share: dict[str, float] = {}
        for r in rows or []:
            if r.get("axis") == "drift":
                per.setdefault(r["task"], {})[str(r["id"])] = float(r["value"])
                if r.get("s_share") is not None:
                    share[str(r["id"])] = float(r["s_share"])
        for task, m in per.items():
            maps.setdefault(task, []).append(m)
        if share:
            shares.append(share)
    out = {task: clustered_mean(ms) for task, ms in maps.items()}
    if shares:  # runs with steer_from: the share of the harmful drift carried by S, per item
        out["s_share"] = clustered_mean(shares)
    harmful = [v for m in maps.get("harmful/base", []) for v in m.values()]
    benign = [v for m in maps.get("benign/base", []) for v in m.values()]
    if harmful and benign:
        out["ratio"] = ratio_interval(harmful, benign)
    return out


def descriptive(presets: list[str], seeds: list[int], results: dict) -> dict:
    """The old per-seed table: mean and sd over seeds of each eval.json figure."""
    rows = {}
    for p in presets:
        finals = [results[(p, s)]["final"] for s in seeds]
        bases = [results[(p, s)]["base"] for s in seeds]
        rows[p] = {name: summarize([get_or_none(r, path) for r in finals]) for name, path in METRICS}
        taxes = [
            None if b is None or f is None else b - f
            for b, f in (
                (get_or_none(x, ("capability", "accuracy")), get_or_none(y, ("capability", "accuracy")))
                for x, y in zip(bases, finals, strict=True)
            )
        ]
        rows[p]["capability_tax"] = summarize(taxes)
    bases = [results[(presets[0], s)]["base"] for s in seeds]
    return {"base": {name: summarize([get_or_none(r, path) for r in bases]) for name, path in METRICS}, "methods": rows}


def pooled(per_seed: list[tuple[list[dict] | None, list[dict] | None, dict | None]]) -> dict:
    """{row label: clustered difference b - a} over the seeds that have per-item generations."""
    groups = [paired_groups(a, b, r) for a, b, r in per_seed if a and b]
    labels = list(dict.fromkeys(label for g in groups for label in g))
    return {label: clustered_difference([g[label] for g in groups if label in g]) for label in labels}


def frontier(presets, seeds, configs, out: Path, steps: list[int]) -> list[dict]:
    """Harmful refusal and capability of each method at step 0 (the base), the frontier steps and
    its last step, pooled over seeds with cluster-bootstrap intervals."""
    points = []
    for p in presets:
        last = configs[(p, seeds[0])].steps
        for step in sorted({0, *steps, last}):
            safety, capability, label = [], [], None
            for s in seeds:
                results, items = eval_files(out / p / f"seed-{s}", step, configs[(p, s)].steps)
                if not items:
                    continue
                groups = axis_values(items)
                safety.append(groups.get(("safety", None), {}))
                index = capability_index_values(groups, results)
                cap = [k for k in groups if k[0] == "capability"]
                if index is not None:
                    capability.append(index)
                    label = "capability index"
                elif cap:
                    capability.append(groups[cap[0]])
                    label = "capability accuracy"
            if safety:
                points.append(
                    {
                        "method": p,
                        "step": step,
                        "refusal": clustered_mean(safety),
                        "capability": clustered_mean(capability),
                        "capability_label": label,
                    }
                )
    return points


def matched_safety(points: list[dict]) -> dict | None:
    """Capability at matched safety: the highest harmful refusal rate every method reaches at some
    step, and each method's best capability among its points at or above it."""
    methods = list(dict.fromkeys(pt["method"] for pt in points))
    usable = [pt for pt in points if pt["refusal"]["mean"] is not None and pt["capability"]["mean"] is not None]
    if not methods or any(not [pt for pt in usable if pt["method"] == m] for m in methods):
        return None
    level = min(max(pt["refusal"]["mean"] for pt in usable if pt["method"] == m) for m in methods)
    best = {}
    for m in methods:
        above = [pt for pt in usable if pt["method"] == m and pt["refusal"]["mean"] >= level - 1e-12]
        best[m] = max(above, key=lambda pt: pt["capability"]["mean"])
    return {"level": level, "points": best}


def verdict(s: dict) -> dict:
    """Which methods raised harmful refusal significantly, and the best trade-off among those."""
    vs_base = s["vs_base"]
    tested = [p for p in s["presets"] if SAFETY in vs_base[p]]
    gained = [p for p in tested if vs_base[p][SAFETY]["significant"] and vs_base[p][SAFETY]["diff"] > 0]
    lost = [p for p in tested if vs_base[p][SAFETY]["significant"] and vs_base[p][SAFETY]["diff"] < 0]

    def score(p: str) -> float:
        """Change in safety score, (refusal gain - over-refusal rise) / 2, minus the capability tax."""
        r = vs_base[p]
        over = r[OVERREFUSAL]["diff"] if OVERREFUSAL in r else 0.0
        cap = capability_label(r)
        tax = -r[cap]["diff"] if cap else 0.0
        return (r[SAFETY]["diff"] - over) / 2 - tax

    best = max(gained, key=score) if gained else None
    return {
        "tested": tested,
        "significant_safety_gain": gained,
        "significant_safety_loss": lost,
        "best": best,
        "scores": {p: score(p) for p in gained},
    }


def compare_report(s: dict) -> str:
    seeds = s["seeds"]
    lines = [
        f"# Comparison on `{s['model']}`",
        "",
        *answer_lines(s),
        f"Seeds {seeds} · eval seed {s.get('eval_seed', 'n/a')} (the same eval items for every seed and method) · "
        "each method trained with its preset's budget on the same prompts.",
        "",
        judge_line({"judge": s.get("judge"), "judge_agreement": s.get("judge_agreement")}),
        "",
        "Eval items per seed: "
        + " · ".join(f"{k} {'n/a' if v is None else v}" for k, v in (s.get("eval_n") or {}).items())
        + ".",
        "",
        "## Against the base",
        "",
        "Change = method - base on the same items, pooled over seeds by a cluster bootstrap over items "
        "(one seed: Newcombe's interval and its p-value for 0/1 outcomes). n counts item-seed pairs; "
        "MDE is the smallest change this n detects with 80% power. A change is called up or down only when its "
        "95% interval excludes zero.",
        "",
        "| method | metric | base | method | change | 95% CI | n | MDE | reading |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    vs_base = s.get("vs_base", {})
    for p in s["presets"]:
        rows = vs_base.get(p, {})
        if not rows:
            lines.append(f"| {p} | all | n/a | n/a | n/a | n/a | n/a | n/a | no per-item generations: not tested |")
        for label, r in rows.items():
            lines.append(
                f"| {p} | {label} | {fmt(r['mean_a'])} | {fmt(r['mean_b'])} | {fmt_diff(r)} | "
                f"{fmt_ci(r['lo'], r['hi'])} | {r['n']} | {fmt(r['mde'])} | {reading(r)} |"
            )
    if s.get("between"):
        lines += [
            "",
            "## Between methods",
            "",
            "Change = X - Y on the same items and seeds.",
            "",
            "| X - Y | metric | X | Y | change | 95% CI | n | MDE | reading |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in s["between"].items():
            keep = [*BETWEEN_METHODS, capability_label(rows)]
            for label, r in rows.items():
                if label in keep:
                    lines.append(
                        f"| {name} | {label} | {fmt(r['mean_b'])} | {fmt(r['mean_a'])} | {fmt_diff(r)} | "
                        f"{fmt_ci(r['lo'], r['hi'])} | {r['n']} | {fmt(r['mde'])} | {reading(r)} |"
                    )
    lines += drift_compare_section(s)
    lines += frontier_section(s)
    lines += descriptive_section(s)
    return "\n".join(lines)


def drift_compare_section(s: dict) -> list[str]:
    """Where each method changed the model: drift per prompt set and the localisation ratio."""
    drift = {p: d for p, d in (s.get("drift") or {}).items() if d}
    if not drift:
        return []

    def cell(d: dict, task: str) -> str:
        m = d.get(task)
        return "n/a" if not m or m["mean"] is None else f"{fmt(m['mean'], 4)} {fmt_ci(m['lo'], m['hi'], signed=False)}"

    lines = [
        "",
        "## Drift: where each method changed the model",
        "",
        "Mean per-token KL(trained || base) along the base model's own greedy answers, pooled over seeds "
        "(95% interval: cluster bootstrap over items). Localisation = harmful drift / benign drift: a method "
        "whose change stays on safety has a large ratio. S share = the share of the harmful drift carried by "
        "the safety token set S (runs with steer_from; n/a without one).",
        "",
        "| method | benign | XSTest safe | harmful | harmful / benign | S share (harmful) |",
        "|---|---|---|---|---|---|",
    ]
    for p, d in drift.items():
        r = d.get("ratio")
        ratio = (
            "n/a" if not r or r["ratio"] is None else f"{fmt(r['ratio'], 2)} {fmt_ci(r['lo'], r['hi'], signed=False)}"
        )
        cells = " | ".join(cell(d, task) for task in ("benign/base", "xstest/base", "harmful/base"))
        share = (
            "n/a"
            if "s_share" not in d
            else f"{fmt(d['s_share']['mean'], 3)} " + fmt_ci(d["s_share"]["lo"], d["s_share"]["hi"], signed=False)
        )
        lines.append(f"| {p} | {cells} | {ratio} | {share} |")
    return [*lines, ""]


def answer_lines(s: dict) -> list[str]:
    """compare.md's opening: each method's change on the main axes (pooled, 95% interval) and the
    verdict; the tables they come from follow."""
    vs_base = s.get("vs_base", {})
    lines = ["## Answer", "", "| method | harmful refusal | over-refusal | capability |", "|---|---|---|---|"]
    for p in s["presets"]:
        rows = vs_base.get(p, {})
        cells = []
        for label in (SAFETY, OVERREFUSAL, capability_label(rows)):
            r = rows.get(label) if label else None
            cells.append(
                "n/a" if r is None else f"{fmt_diff(r)} {fmt_ci(r['lo'], r['hi'])} {reading(r).split(' (')[0]}"
            )
        lines.append(f"| {p} | {' | '.join(cells)} |")
    return [*lines, "", "Change = method - base, pooled over seeds, with its 95% interval.", "", *verdict_lines(s), ""]


def descriptive_section(s: dict) -> list[str]:
    def cell(m: dict) -> str:
        return "n/a" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}"

    names = [name for name, _ in METRICS] + ["capability_tax"]
    lines = [
        "",
        "## Per-seed figures",
        "",
        "Mean ± sd over seeds of each run's eval.json figures: a description of the runs, not a test "
        "(the tests are the paired tables above).",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        "| base | " + " | ".join(cell(s["base"][n]) for n in names if n in s["base"]) + " | 0 |",
    ]
    lines += [f"| {p} | " + " | ".join(cell(row[n]) for n in names) + " |" for p, row in s["methods"].items()]
    return [*lines, ""]


def frontier_section(s: dict) -> list[str]:
    points = s.get("frontier") or []
    lines = ["", "## Safety against capability", "", "![harmful refusal vs capability](frontier.png)", ""]
    if not points:
        return [*lines, "No per-item generations: no frontier points.", ""]
    lines += [
        "| method | step | harmful refusal (95% CI) | capability (95% CI) | n |",
        "|---|---|---|---|---|",
    ]
    for pt in points:
        r, c = pt["refusal"], pt["capability"]
        lines.append(
            f"| {pt['method']} | {pt['step']}{' (base)' if pt['step'] == 0 else ''} | {fmt(r['mean'])} "
            f"{fmt_ci(r['lo'], r['hi'], False)} | {fmt(c['mean'])} {fmt_ci(c['lo'], c['hi'], False)} | {r['n']} |"
        )
    matched = matched_safety(points)
    if matched:
        parts = [
            f"{m} {fmt(pt['capability']['mean'])} {fmt_ci(pt['capability']['lo'], pt['capability']['hi'], False)} "
            f"at step {pt['step']}"
            for m, pt in matched["points"].items()
        ]
        label = points[0].get("capability_label") or "capability"
        lines += [
            "",
            f"Capability at matched safety (harmful refusal ≥ {matched['level']:.3f}, the highest level every method "
            f"reaches at one of these steps), {label}: " + "; ".join(parts) + ". These are point estimates at "
            "different steps, not a test between methods.",
        ]
    return [*lines, ""]


def verdict_lines(s: dict) -> list[str]:
    v = s.get("verdict") or verdict(s)
    vs_base = s["vs_base"]
    if not v["tested"]:
        return ["These runs have no per-item generations, so no difference can be tested; no best trade-off is named."]
    lines = []
    seeds = f"{len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''}"
    if not v["significant_safety_gain"]:
        detail = "; ".join(f"{p} {fmt_diff(vs_base[p][SAFETY])}, {reading(vs_base[p][SAFETY])}" for p in v["tested"])
        lines.append(
            f"**No method beat the base beyond noise**: none raised the harmful refusal rate with a 95% interval "
            f"above zero (pooled over {seeds}): {detail}. No best trade-off is named."
        )
    else:
        gained = v["significant_safety_gain"]
        lines.append(
            "Methods whose harmful-refusal gain over the base is significant: "
            + ", ".join(
                f"{p} ({fmt_diff(vs_base[p][SAFETY])}, 95% CI {fmt_ci(vs_base[p][SAFETY]['lo'], vs_base[p][SAFETY]['hi'])})"
                for p in gained
            )
            + "."
        )
        best = v["best"]
        r = vs_base[best]
        cap = capability_label(r)
        tax = (
            f"capability {fmt_diff(r[cap])} {fmt_ci(r[cap]['lo'], r[cap]['hi'])}, {reading(r[cap])}"
            if cap
            else "capability not measured"
        )
        over = f"over-refusal {fmt_diff(r[OVERREFUSAL])}, {reading(r[OVERREFUSAL])}" if OVERREFUSAL in r else ""
        if len(gained) == 1:
            lines.append(f"**{best}** is the only one, so it is the best trade-off on this evidence: {tax}; {over}.")
        else:
            lines.append(
                f"Best trade-off among them (change in safety score, (refusal gain - over-refusal rise) / 2, minus "
                f"the capability tax, pooled): **{best}**; {tax}; {over}."
            )
            for other in gained:
                if other == best:
                    continue
                rows = s["between"].get(f"{other} - {best}") or s["between"].get(f"{best} - {other}") or {}
                sign = -1 if f"{other} - {best}" in s["between"] else 1
                keep = [SAFETY, OVERREFUSAL, capability_label(rows)]
                parts = []
                for label in keep:
                    if label in rows:
                        x = rows[label]
                        if sign < 0 and x["diff"] is not None:
                            x = x | {"diff": -x["diff"], "lo": -x["hi"], "hi": -x["lo"]}
                        parts.append(f"{label} {fmt_diff(x)}, {reading(x)}")
                if not any(rows[label]["significant"] for label in keep if label in rows):
                    parts.append("the ranking rests on point estimates")
                lines.append(f"- {best} - {other}: " + "; ".join(parts) + ".")
    for p in v["significant_safety_loss"]:
        lines.append(f"- {p} lowered the harmful refusal rate: {fmt_diff(vs_base[p][SAFETY])} (significant).")
    return lines


def plot_frontier(s: dict, path: Path) -> None:
    """Harmful refusal against capability: one line per method from the base through its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(pts: list[dict], key: str) -> list[list[float]]:
        return [[p[key]["mean"] - p[key]["lo"] for p in pts], [p[key]["hi"] - p[key]["mean"] for p in pts]]

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    points = [pt for pt in s.get("frontier") or [] if pt["capability"]["mean"] is not None]
    base = next((pt for pt in points if pt["step"] == 0), None)
    for method in dict.fromkeys(pt["method"] for pt in points):
        mine = [pt for pt in points if pt["method"] == method and pt["step"] > 0]
        path_pts = [base, *mine] if base else mine
        (line,) = ax.plot(
            [p["capability"]["mean"] for p in path_pts], [p["refusal"]["mean"] for p in path_pts], "-", alpha=0.6
        )
        xs, ys = [p["capability"]["mean"] for p in mine], [p["refusal"]["mean"] for p in mine]
        color = line.get_color()
        ax.errorbar(xs, ys, xerr=err(mine, "capability"), yerr=err(mine, "refusal"), fmt="o", capsize=3, color=color)
        ax.plot([], [], "o-", color=color, label=method)
        for pt, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(str(pt["step"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    if base:
        ax.errorbar(
            [base["capability"]["mean"]],
            [base["refusal"]["mean"]],
            xerr=err([base], "capability"),
            yerr=err([base], "refusal"),
            fmt="k*",
            markersize=12,
            capsize=3,
            label="base",
        )
    ax.set_xlabel(points[0]["capability_label"] if points and points[0]["capability_label"] else "capability")
    ax.set_ylabel("harmful refusal rate")
    ax.set_title("Safety vs capability by training step (95% intervals, seeds pooled)", fontsize=9)
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no per-item generations", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
