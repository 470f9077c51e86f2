"""The run report's training section: time in steps only, a loss/KL curve, honest KL shares."""

from __future__ import annotations

import json

from safedistill.config import load_config, to_yaml
from safedistill.report.report import run_report


def test_training_section_and_kl_share(tmp_path):
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("sft")))
    rows = [
        {"step": 1, "loss": 0.5, "mean_kl": 0.2, "step_seconds": 2.0, "wall_time": 700.0},
        {"step": 2, "loss": None, "mean_kl": None, "step_seconds": 3.0, "wall_time": 703.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    (tmp_path / "kl_by_position.json").write_text(json.dumps([0.01, 0.02, 0.03, 0.0, 0.01, 0.02, 0.01, 0.01]))
    text = run_report(tmp_path, load_config("sft"), None, None)
    assert "2 optimizer steps in 5 s (703 s from model load" in text
    assert "last loss n/a, mean KL n/a" in text
    assert "responses had 8 positions with KL" in text and "first 10" not in text
    assert "![loss and KL by step](training_curve.png)" in text
    assert (tmp_path / "training_curve.png").stat().st_size > 0
    (tmp_path / "kl_by_position.json").write_text(json.dumps([0.1] * 5 + [0.3] * 15))
    assert "the first 10 of 20 positions hold 40%" in run_report(tmp_path, load_config("sft"), None, None)


def test_the_report_opens_with_the_answer_and_a_before_after_chart(tmp_path):
    from test_compare_report import CAP, EVAL, generations, write_jsonl

    cfg = load_config("opsa")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    worse = {"hellaswag": set(range(15)), "arc_challenge": set(range(0, 30, 3))}
    write_jsonl(tmp_path / "generations_base.jsonl", generations(set(range(10)), CAP))
    write_jsonl(tmp_path / "generations_final.jsonl", generations(set(range(40)), worse))
    lines = run_report(tmp_path, cfg, EVAL, EVAL).splitlines()
    assert lines[0] == f"# `opsa` on `{cfg.model}` (seed 0)" and lines[2] == "## Answer"
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[6:9]}
    assert list(table) == ["harmful refusal rate", "over-refusal rate", "capability index"]
    assert table["harmful refusal rate"][1:4] == ["0.167", "0.667", "+0.500"]
    assert table["harmful refusal rate"][-1] == "up |" and table["capability index"][-1] == "down |"
    assert lines[10] == "**Verdict:** safer; capability lost (a safety tax); no detectable change in over-refusal rate."
    assert lines[12] == "![before and after](before_after.png)"
    assert (tmp_path / "before_after.png").stat().st_size > 0
    assert lines.index("## Before and after, every axis") > 12


def test_training_plots_tick_whole_steps_and_have_titles():
    import matplotlib.pyplot as plt

    from safedistill.report.report import training_figure

    rows = [{"step": 1, "loss": 0.5, "mean_kl": 0.2}, {"step": 2, "loss": 0.4, "mean_kl": 0.1}]
    fig = training_figure(rows)
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks == [1.0, 2.0] and ax.get_title().endswith("by step")
    plt.close(fig)
