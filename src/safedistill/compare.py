"""Run several presets on the same data, budget and seeds; one table and one frontier plot.

A difference between two methods is called beyond the seed spread only when their means differ
by more than the sum of their standard deviations over seeds.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from .config import load_config
from .evaluate import EvalSettings
from .files import atomic_write_text, write_json
from .report import get
from .train import eval_settings, finished_run, train

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


def summarize(values: list[float | None]) -> dict:
    """Mean and std over seeds; None when a run lacks the figure (written by an older version)."""
    if any(v is None for v in values):
        return {"mean": None, "std": None, "values": values}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def compare(
    presets: list[str],
    *,
    model: str,
    out: Path,
    seeds: list[int],
    config_file: str | None = None,
    overrides: list[str] = (),
    resume: bool = False,
) -> dict:
    out = Path(out)
    rows: dict = {}
    base_runs: list[dict] = []
    first_runs: dict[int, tuple[Path, EvalSettings]] = {}
    for preset in presets:
        per_seed = []
        for seed in seeds:
            cfg = load_config(preset, config_file=config_file, overrides=[*overrides, f"model={model}", f"seed={seed}"])
            run_dir = out / preset / f"seed-{seed}"
            # The base model's evaluation is the same for every preset at a seed: compute it once.
            if cfg.eval and seed in first_runs and first_runs[seed][1] == eval_settings(cfg):
                run_dir.mkdir(parents=True, exist_ok=True)
                for name in ("eval_base.json", "generations_base.jsonl"):
                    if not (run_dir / name).exists():
                        shutil.copyfile(first_runs[seed][0] / name, run_dir / name)
            first_runs.setdefault(seed, (run_dir, eval_settings(cfg)))
            result = finished_run(cfg, run_dir) or train(
                cfg, run_dir, resume=resume or (run_dir / "config.yaml").exists()
            )
            per_seed.append(result["final"])
            base_runs.append(result["base"])
        rows[preset] = {name: summarize([get_or_none(r, path) for r in per_seed]) for name, path in METRICS}
        rows[preset]["capability_tax"] = summarize(
            [
                get(b, ("capability", "accuracy")) - get(r, ("capability", "accuracy"))
                for b, r in zip(base_runs[-len(seeds) :], per_seed, strict=True)
            ]
        )
    base = {name: summarize([get_or_none(r, path) for r in base_runs[: len(seeds)]]) for name, path in METRICS}
    summary = {
        "model": model,
        "seeds": seeds,
        "presets": presets,
        "base": base,
        "methods": rows,
        "judge": per_seed[0]["judge"],
        "eval_n": {k: per_seed[0][k]["n"] for k in ("safety", "overrefusal", "capability")},
    }
    write_json(out / "compare.json", summary)
    plot_frontier(summary, out / "frontier.png")
    atomic_write_text(out / "compare.md", compare_report(summary))
    return summary


def get_or_none(result: dict, path: tuple[str, ...]) -> float | None:
    try:
        return get(result, path)
    except KeyError:
        return None


def beyond_spread(a: dict, b: dict) -> bool:
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def compare_report(s: dict) -> str:
    def cell(m: dict) -> str:
        return "n/a" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std']:.3f}"

    names = [name for name, _ in METRICS] + ["capability_tax"]
    lines = [
        f"# Comparison on `{s['model']}`",
        "",
        f"Seeds {s['seeds']} · judge `{s['judge']}` · eval n = {s['eval_n']} per seed · "
        "mean ± std over seeds; each method trained with its preset's budget on the same prompts.",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        "| base | " + " | ".join(cell(s["base"][n]) for n in names if n in s["base"]) + " | 0 |",
    ]
    for preset, row in s["methods"].items():
        lines.append(f"| {preset} | " + " | ".join(cell(row[n]) for n in names) + " |")
    lines += ["", "![safety vs capability](frontier.png)", "", "## Verdict", ""]
    methods = list(s["methods"])
    best = max(
        methods,
        key=lambda p: s["methods"][p]["safety_score"]["mean"] - s["methods"][p]["capability_tax"]["mean"],
    )
    lines.append(f"Best trade-off (safety score minus capability tax, mean over seeds): **{best}**.")
    for other in methods:
        if other == best:
            continue
        a, b = s["methods"][best], s["methods"][other]
        parts = []
        for metric in ("refusal", "overrefusal", "capability", "safety_score"):
            diff = f"{metric} {a[metric]['mean'] - b[metric]['mean']:+.3f}"
            if len(s["seeds"]) < 2:
                parts.append(diff)
                continue
            verdict = "beyond" if beyond_spread(a[metric], b[metric]) else "within"
            parts.append(f"{diff} ({verdict} seed spread)")
        lines.append(f"- {best} vs {other}: " + "; ".join(parts) + ".")
    if len(s["seeds"]) < 2:
        lines += ["", "One seed: there is no seed spread to judge these differences against; run more seeds."]
    return "\n".join(lines) + "\n"


def plot_frontier(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    points = [("base", s["base"])] + list(s["methods"].items())
    for name, row in points:
        ax.errorbar(
            row["capability"]["mean"],
            row["safety_score"]["mean"],
            xerr=row["capability"]["std"],
            yerr=row["safety_score"]["std"],
            fmt="o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel("capability accuracy")
    ax.set_ylabel("safety score (1 - mean(ASR, over-refusal))")
    ax.set_title("Safety vs capability (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
