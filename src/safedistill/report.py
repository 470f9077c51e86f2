"""Markdown reports. Every report names the model, data, judge, seeds and sample sizes it used."""

from __future__ import annotations

# (label, path into eval.json, stderr path, higher is better)
ROWS = [
    ("harmful refusal rate", ("safety", "refusal_rate"), ("safety", "stderr"), True),
    ("attack success rate", ("safety", "asr"), ("safety", "stderr"), False),
    ("jailbreak ASR", ("jailbreak", "asr"), ("jailbreak", "stderr"), False),
    ("over-refusal rate", ("overrefusal", "refusal_rate"), ("overrefusal", "stderr"), False),
    ("capability accuracy", ("capability", "accuracy"), ("capability", "stderr"), True),
    ("safety score", ("safety_score",), None, True),
    ("mean length (tokens)", ("expressiveness", "mean_length"), None, None),
    ("distinct-1", ("expressiveness", "distinct_1"), None, None),
    ("distinct-2", ("expressiveness", "distinct_2"), None, None),
    ("mean token entropy", ("expressiveness", "mean_token_entropy"), None, None),
]

JUDGE_NOTE = (
    "The keyword judge counts a response as a refusal when a refusal phrase appears in its first "
    "300 characters; it misses refusals phrased otherwise and can be fooled by a refusal followed by "
    "compliance. Read `generations.jsonl` to check it. Over-refusal always uses refusal phrases, "
    "since a harm classifier cannot tell a refusal from a harmless answer."
)


def get(d: dict, path: tuple[str, ...]):
    for key in path:
        d = d[key]
    return d


def fmt(value: float, err: float | None = None) -> str:
    return f"{value:.3f}" if err is None else f"{value:.3f} ± {err:.3f}"


def manifest_table(manifest: list[dict]) -> str:
    lines = ["| source | package | file | sha256 | count |", "|---|---|---|---|---|"]
    lines += [
        f"| {m['source']} | {m['package']} | `{m['file']}` | `{m['sha256'][:12]}` | {m['count']} |" for m in manifest
    ]
    return "\n".join(lines)


def eval_report(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"# Evaluation of `{results['model']}`" + (f" + adapter `{results['adapter']}`" if results["adapter"] else ""),
        "",
        f"Judge: `{results['judge']}` · seed {results['seed']} · split seed {s['split_seed']} · "
        f"greedy decoding · harmful source `{s['harmful']}` (held-out split) · "
        f"run time {results['timing']['seconds']:.0f} s ({results['timing']['tokens_per_s']:.0f} new tokens/s)",
        "",
        "| metric | value (± std. error) | n |",
        "|---|---|---|",
    ]
    for label, path, err, _ in ROWS:
        n = get(results, (path[0], "n")) if len(path) > 1 else ""
        lines.append(f"| {label} | {fmt(get(results, path), get(results, err) if err else None)} | {n} |")
    by_level = results["capability"]["by_level"]
    lines += [
        "",
        "Capability by level: " + ", ".join(f"L{k} {v:.2f}" for k, v in by_level.items()),
        "",
        JUDGE_NOTE,
        "",
        "## Data",
        "",
        manifest_table(results["manifest"]),
        "",
    ]
    return "\n".join(lines)


def noise_note(diff: float, err: float) -> str:
    """A difference under two standard errors is reported as within noise."""
    return "within noise" if abs(diff) < 2 * err else ("up" if diff > 0 else "down")


def before_after(base: dict, final: dict) -> list[str]:
    lines = ["| metric | base | trained | change | |", "|---|---|---|---|---|"]
    for label, path, err, _ in ROWS:
        b, f = get(base, path), get(final, path)
        if err:
            eb, ef = get(base, err), get(final, err)
            e = (eb**2 + ef**2) ** 0.5
            lines.append(f"| {label} | {fmt(b, eb)} | {fmt(f, ef)} | {f - b:+.3f} | {noise_note(f - b, e)} |")
        else:
            lines.append(f"| {label} | {fmt(b)} | {fmt(f)} | {f - b:+.3f} | |")
    return lines


def safety_tax(base: dict, final: dict) -> tuple[float, float]:
    cb, cf = base["capability"], final["capability"]
    return cb["accuracy"] - cf["accuracy"], (cb["stderr"] ** 2 + cf["stderr"] ** 2) ** 0.5


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


def run_report(out, cfg, base: dict | None, final: dict | None) -> str:
    import json
    from pathlib import Path

    out = Path(out)
    lines = [f"# `{cfg.preset}` on `{cfg.model}` (seed {cfg.seed})", ""]
    if base and final:
        tax, err = safety_tax(base, final)
        lines += [
            f"Judge `{final['judge']}` · eval seed {final['seed']} · split seed {final['settings']['split_seed']} · "
            f"held-out harmful prompts from `{final['settings']['harmful']}` · greedy decoding · "
            "± is one standard error (binomial); a change under two standard errors is marked within noise.",
            "",
            *before_after(base, final),
            "",
            f"**Safety tax** (capability lost): {tax:+.3f} ± {err:.3f} ({noise_note(-tax, err)}).",
            "",
        ]
    kl_path = out / "kl_by_position.json"
    if kl_path.exists():
        kl = json.loads(kl_path.read_text())
        kl = kl[: max((i + 1 for i, v in enumerate(kl) if v > 0), default=1)]
        plot_kl_by_position(kl, out / "kl_by_position.png")
        top = sorted(range(len(kl)), key=lambda i: -kl[i])[:3]
        first10 = sum(kl[:10]) / max(1, sum(kl))
        lines += [
            "## Where the KL sits",
            "",
            "![KL by position](kl_by_position.png)",
            "",
            f"Positions with the largest mean KL: {', '.join(str(i + 1) for i in top)}; "
            f"the first 10 positions hold {first10:.0%} of the summed per-position KL.",
            "",
        ]
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            last = rows[-1]
            lines += [
                "## Training",
                "",
                f"{len(rows)} optimizer steps, {last['wall_time']:.0f} s of training; "
                f"last loss {last['loss']:.4f}" + (f", mean KL {last['mean_kl']:.4f}" if "mean_kl" in last else ""),
                "",
            ]
            from .diagnostics import collapse_section

            lines += collapse_section(out, rows)
    flip = out / "flip_rates.json"
    if flip.exists():
        ranking = json.loads(flip.read_text())
        lines += [
            "## Context chosen by teacher flip rate",
            "",
            "| context | flip rate | conditional | benign refusal |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['id']} | {r['flip_rate']:.2f} | {r['conditional_flip_rate']:.2f} | {r['benign_refusal_rate']:.2f} |"
            for r in ranking[:5]
        ]
        lines.append("")
    if (out / "shift.json").exists():
        from .methods.dgr import shift_lines

        lines += shift_lines(json.loads((out / "shift.json").read_text()))
    lines += steering_section(out)
    lines += ["## Settings", "", "```yaml", (out / "config.yaml").read_text().rstrip(), "```", ""]
    if final:
        lines += ["## Data", "", manifest_table(final["manifest"]), "", JUDGE_NOTE, ""]
    return "\n".join(lines)


def steering_section(out) -> list[str]:
    """The chosen steering candidate and the safety token set S, when the run has them."""
    import json
    from pathlib import Path

    from .methods.safesteer import describe_choice

    lines: list[str] = []
    steering, tokens = Path(out) / "steering.json", Path(out) / "safety_tokens.json"
    if steering.exists():
        s = json.loads(steering.read_text())
        c = s["chosen"]
        lines += [
            "## Steering direction",
            "",
            f"`{s['direction']}` direction, post-instruction {describe_choice(c)}; "
            f"{len(s['candidates'])} candidates in steering.json.",
            "",
        ]
    if tokens.exists():
        t = json.loads(tokens.read_text())["tokens"]
        lines += [
            f"## Safety tokens S ({len(t)})",
            "",
            " ".join(f"`{x['text']!r}`" for x in t),
            "",
        ]
    return lines
