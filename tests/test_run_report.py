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
